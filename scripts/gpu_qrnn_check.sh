#!/usr/bin/env bash
# On a CUDA machine with CuPy: install the package, run the QRNN tests (GPU ones included), then the
# QRNN vs cuDNN LSTM benchmark, graphed and eager (strict float32; arguments go to both runs of
# scripts/bench_lstm.py). Logs and tables go under $OUT.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
timeout 300 python3 -m pytest -q tests/test_qrnn.py 2>&1 | tee "$OUT/pytest_qrnn.log" | tail -5
timeout 300 python3 scripts/bench_lstm.py --graphs --markdown "$OUT/bench_lstm_graphs.md" "$@" 2>&1 | tee "$OUT/bench_lstm_graphs.log"
timeout 300 python3 scripts/bench_lstm.py --markdown "$OUT/bench_lstm.md" "$@" 2>&1 | tee "$OUT/bench_lstm.log"
