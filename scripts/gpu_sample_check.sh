#!/usr/bin/env bash
# On a CUDA machine with CuPy: install the package, run the sampling tests (GPU ones included), then
# the sampling benchmark on the GPU (sqrllm's decode steps and the GPT baseline).
# Logs go under $OUT (default: out/). Usage: bash scripts/gpu_sample_check.sh [bench_sample.py arguments]
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -x tests/test_sampling.py 2>&1 | tee "$OUT/pytest_sampling.log" | tail -30
timeout 300 python3 scripts/bench_sample.py --devices cuda "$@" 2>&1 | tee "$OUT/bench_sample.log"
