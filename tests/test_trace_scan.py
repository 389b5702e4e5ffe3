"""scripts/trace_scan.py's stream-mode table, on made-up stamps (the kernel's own need a GPU)."""

import types

import numpy as np
import pytest
from conftest import load_script

NS = 1000  # stamps are nanoseconds, the table's cells microseconds


@pytest.fixture(scope="module")
def trace():
    return load_script("trace_scan")


def stamps(blocks, iterations, slow_block=None, slow_round=None):
    """Blocks whose every phase takes 1 us, but for one block's look-back in one round (5 us). The
    first iteration has no look-back or replay, the last no copies or fold, as in the kernel; the rest
    of the array stays unset."""
    h = np.zeros((blocks, 64, 5), np.uint64)
    for b in range(blocks):
        t = 10**9 + b * 100  # blocks start 0.1 us apart
        for m in range(iterations):
            h[b, m, 0] = t
            if m < iterations - 1:  # tile m's copies land, then its map is published
                h[b, m, 1], h[b, m, 2] = t + NS, t + 2 * NS
                t += 2 * NS
            if m > 0:  # tile m - 1's carry-in, then its replay
                t += (5 if (b, m) == (slow_block, slow_round) else 1) * NS
                h[b, m, 3], h[b, m, 4] = t, t + NS
                t += NS
    return h


def table(trace, capsys, runs):
    args = types.SimpleNamespace(shape="1,32768,1024", dtype="bf16", bwd=False, calls=len(runs), save=None)
    trace.stream_rounds(runs, args, graph_us=80.0, moved=201e6, copy=4245.0)
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return out, {int(r[0]): [c.strip() for c in r[1:]] for r in rows}


def test_each_iteration_gets_a_row_of_its_phases(trace, capsys):
    out, rows = table(trace, capsys, [stamps(10, 5)])
    assert "10 blocks, 5 iterations each" in out
    assert sorted(rows) == [0, 1, 2, 3, 4]
    # starts at, copy wait, fold, look-back wait, replay, ends at
    assert rows[0][1:5] == ["1.00 [1.00]", "1.00 [1.00]", "-", "-"]  # no replay in the first iteration
    assert rows[2][1:5] == ["1.00 [1.00]"] * 4
    assert rows[4][1:5] == ["-", "-", "1.00 [1.00]", "1.00 [1.00]"]  # no copies or fold in the last
    assert rows[4][0] == "14.45 [14.81]"  # 2 + 3 * 4 us after each block's start; blocks 0.1 us apart


def test_a_slow_look_back_shows_in_its_round_and_delays_the_span(trace, capsys):
    out, rows = table(trace, capsys, [stamps(10, 5), stamps(10, 5, slow_block=3, slow_round=2)])
    assert rows[2][3] == "1.00 [1.40]"  # one block of ten at 5 us: the median stays, the 90th rises
    # a block takes 2 + 3 * 4 + 2 us and the last starts at 0.9; in the second launch block 3 (started at
    # 0.3) takes 4 us more; of two launches the table shows the second
    assert "span 20.3 us (spans of 2 launches: 16.9, 20.3)" in out
    # round 3 starts 10 us + 0.1 us a block in, but 14.3 for the slow block: the median moves by half a
    # step (10.5 and 10.6), the 90th percentile a tenth of the way from 10.9 to 14.3
    assert rows[3][0] == "10.55 [11.24]"


def test_each_blocks_phases_are_summed_and_its_end_set_against_the_last(trace, capsys):
    out, _ = table(trace, capsys, [stamps(10, 5, slow_block=3, slow_round=2)])
    # four iterations of each phase at 1 us; block 3's look-back 4 us more (the 90th percentile of
    # nine 4s and an 8 is 4.4); blocks end 0.1 us apart, block 3 now last
    summed = "copy wait 4.00 [4.00], fold and publish 4.00 [4.00], look-back wait 4.00 [4.40], replay 4.00 [4.00]"
    assert summed in out
    # the others end 16 us after their starts (0.1 us apart), block 3 at 20.3: 4.3 to 3.4 us before it
    assert "its last stamp 3.75 [4.21] before the launch's last" in out
