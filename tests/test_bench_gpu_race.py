"""scripts/bench_gpu_race.py's summary of runs repeated over seeds (--seeds), on made-up run summaries."""

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_gpu_race")


def run(label, val, stream, to_146):
    return {"run": label, "final_val": val, "final_stream": stream, "to_1.46": to_146}


def test_seed_spread_groups_a_variants_seeds_and_counts_the_targets_met(bench):
    results = [run("sqrllm@s1337", 1.42, 1.398, 30.0), run("sqrllm@s2", 1.43, 1.41, 50.0),  # 50 s: too late
               run("wide@s1337", 1.47, 1.45, None), run("wide@s2", 1.45, 1.43, 44.0),
               run("gpt", 1.47, None, None), run("alone@s3", 1.40, 1.39, 20.0)]  # one seed: no spread
    lines = bench.seed_spread(results)
    assert len(lines) == 2
    sqrllm, wide = lines
    assert sqrllm.startswith("sqrllm: 2 seeds;")
    assert "val 1.4250 +- 0.0071 (1.4200-1.4300)" in sqrllm
    assert "race met 1/2" in sqrllm and "streamed <= 1.4 1/2" in sqrllm
    assert wide.startswith("wide: 2 seeds;") and "race met 1/2" in wide and "streamed <= 1.4 0/2" in wide


def test_a_label_with_an_at_sign_keeps_it(bench):
    lines = bench.seed_spread([run("lr@3e-3@s1", 1.4, 1.4, 1.0), run("lr@3e-3@s2", 1.4, 1.4, 1.0)])
    assert lines[0].startswith("lr@3e-3: 2 seeds;")
