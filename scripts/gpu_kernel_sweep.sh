#!/usr/bin/env bash
# On a CUDA machine with CuPy: scripts/bench_kernel.py's sqrllm rows for several tile shapes
# (forward L, blocks per SM, backward L, blocks per SM), to pick the tiles per dtype.
# Logs go under $OUT (default: out/). Usage: bash scripts/gpu_kernel_sweep.sh DTYPE "TILES ..." [bench args]
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
dtype=$1; tiles=$2; shift 2
for t in $tiles; do
    echo "== tiles $t"
    timeout 120 python3 scripts/bench_kernel.py --impls sqrllm --dtypes "$dtype" --tiles "$t" "$@" 2>&1 \
        | grep -E "^\| \(|copy" | tee -a "$OUT/sweep_$dtype.log"
done
