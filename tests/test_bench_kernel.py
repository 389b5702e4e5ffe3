"""scripts/bench_kernel.py's timed-graph plan (the timing itself needs a GPU)."""

import pytest
from conftest import load_script

MB = 2**20
L2 = 60 * MB  # an H200's


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_kernel")


def test_a_short_call_at_a_long_shape_is_replayed_enough_times_to_hide_the_graphs_launch(bench):
    # (1, 32768, 1024) bf16 forward: 201 MB, one copy overflows L2, about 64 us a call
    calls, copies = bench.graph_plan(201 * MB, L2, 1.0, lambda: 0.064)
    assert calls == 16
    assert copies == 2  # a call never follows itself on the same inputs, which L2 might still hold


def test_a_slow_call_is_not_repeated_and_graph_ms_0_gives_one_call_a_copy(bench):
    assert bench.graph_plan(201 * MB, L2, 1.0, lambda: 14.0) == (1, 1)  # the serial baseline
    assert bench.graph_plan(201 * MB, L2, 0, lambda: pytest.fail("no guess is needed")) == (1, 1)


def test_small_calls_rotate_enough_copies_to_overflow_l2_whatever_the_graph_time(bench):
    # (64, 256, 384) bf16 forward: 38 MB, five copies make 3 x L2
    for graph_ms in (0, 0.01, 1.0):
        calls, copies = bench.graph_plan(38 * MB, L2, graph_ms, lambda: 0.016)
        assert copies == 5 and calls >= copies
    assert bench.graph_plan(1 * MB, L2, 1.0, lambda: 0.002) == (64, 64)  # at most 64 of each
