#!/usr/bin/env bash
# On a CUDA machine with CuPy: where stream mode's time goes at the single-sequence shapes. First
# scripts/trace_scan.py's iteration-by-iteration timeline of (1, 32768, 1024) forward (bf16 and fp32)
# and backward (bf16), and of (1, 131072, 256) fp32 forward; then scripts/bench_kernel_sizes.py's
# fixed cost and rate over T at 1024 features (stream mode at every T given). Arguments go to every
# trace_scan.py run, e.g. "--define FIRST_ALONE=1". Logs go under $OUT (default: out/).
# Usage: bash scripts/gpu_stream_trace.sh [trace_scan.py arguments]
source "$(dirname "$0")/gpu_env.sh"
for cell in "1,32768,1024 bf16" "1,32768,1024 bf16 --bwd" "1,32768,1024 fp32" "1,131072,256 fp32"; do
    echo "== trace $cell" | tee -a "$OUT/trace.log"
    # shellcheck disable=SC2086  # a cell is several arguments
    timeout 120 python3 scripts/trace_scan.py $cell "$@" 2>&1 | tee -a "$OUT/trace.log"
done
timeout 240 python3 scripts/bench_kernel_sizes.py --shapes 1,8192,1024 1,16384,1024 1,32768,1024 1,65536,1024 \
    1,131072,1024 2>&1 | tee "$OUT/sizes.log"
