#!/usr/bin/env bash
# On a CUDA machine with CuPy: install the package, run the QRNN tests (GPU ones included), then the
# QRNN vs cuDNN LSTM benchmark, graphed and eager (strict float32; arguments go to both runs of
# scripts/bench_lstm.py). Logs and tables go under $OUT.
source "$(dirname "$0")/gpu_env.sh"
timeout 300 python3 -m pytest -q tests/test_qrnn.py 2>&1 | tee "$OUT/pytest_qrnn.log" | tail -5
timeout 300 python3 scripts/bench_lstm.py --graphs --markdown "$OUT/bench_lstm_graphs.md" "$@" 2>&1 | tee "$OUT/bench_lstm_graphs.log"
timeout 300 python3 scripts/bench_lstm.py --markdown "$OUT/bench_lstm.md" "$@" 2>&1 | tee "$OUT/bench_lstm.log"
