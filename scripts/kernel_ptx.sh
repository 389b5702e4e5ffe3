#!/usr/bin/env bash
# PTX of a spread of kernels/sqrll.cu's entry points (each mode, direction and storage type; chunk
# mode with and without register rows), one file each, through nvcc where one is installed (the
# package itself needs none: it compiles with NVRTC). For a change meant to leave the generated code
# alone: run it before and after, then `diff -r BEFORE AFTER`.
# Usage: bash scripts/kernel_ptx.sh OUT_DIR [ARCH (default sm_90)]
set -euo pipefail
out=$1 arch=${2:-sm_90}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
src=$(mktemp --suffix .cu)
trap 'rm -f "$src"' EXIT
# storage type, V, L, backward, mode, blocks per SM, register rows (as sqrllm/cuda.py's SQRLL_SCAN lines)
for spec in "bf16_t 8 12 false CHUNKS 2 6" "bf16_t 8 12 false CHUNKS 2 0" "float 4 12 false CHUNKS 2 6" \
    "bf16_t 8 8 true CHUNKS 2 3" "float 4 8 true CHUNKS 2 3" "bf16_t 8 12 false LOOP 2 0" \
    "float 4 8 true LOOP 2 0" "f16_t 8 12 false ONE_TILE 2 0" "float 1 8 true ONE_TILE 2 0"; do
    read -r S V L BWD MODE MIN_BLOCKS LX <<<"$spec"
    name=sqrll_${S}_v${V}_l${L}_${BWD}_${MODE}_b${MIN_BLOCKS}_x${LX}
    { cat "$root/kernels/storage.cuh" "$root/kernels/sqrll.cu"
      echo "SQRLL_SCAN($name, $S, $V, $L, $BWD, $MODE, $MIN_BLOCKS, $LX)"; } >"$src"
    nvcc -std=c++17 -arch="$arch" -ptx -o "$out/$name.ptx" "$src"
done
ls "$out"
