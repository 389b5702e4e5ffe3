#!/usr/bin/env bash
# On a CUDA machine with CuPy: install the package, run the GPU tests, then the kernel benchmark.
# Logs go under $OUT (default: out/). Usage: bash scripts/gpu_check.sh [scripts/bench_kernel.py arguments]
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/device.txt"
timeout 300 python3 -m pytest -q -m gpu tests/test_cuda_scan.py --timeout 120 --timeout-method thread 2>&1 | tee "$OUT/pytest.log" | tail -30
timeout 300 python3 scripts/bench_kernel.py --out "$OUT/bench.md" "$@" 2>&1 | tee "$OUT/bench.log"
