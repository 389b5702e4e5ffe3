#!/usr/bin/env bash
# On a CUDA machine with CuPy: install the package, run the sampling tests (GPU ones included), then
# the sampling benchmark on the GPU (sqrllm's decode steps and the GPT baseline).
# Logs go under $OUT (default: out/). Usage: bash scripts/gpu_sample_check.sh [bench_sample.py arguments]
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -x tests/test_sampling.py 2>&1 | tee "$OUT/pytest_sampling.log" | tail -30
timeout 300 python3 scripts/bench_sample.py --devices cuda "$@" 2>&1 | tee "$OUT/bench_sample.log"
