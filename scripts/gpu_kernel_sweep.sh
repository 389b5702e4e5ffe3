#!/usr/bin/env bash
# On a CUDA machine with CuPy: scripts/bench_kernel.py's sqrllm rows under several variants, one
# after another in one run, so that their numbers compare. A variant is one string of bench_kernel.py
# arguments ("" = the defaults), e.g. "--tiles 24,1,16,1", "--define POLL=8 --loop-min-fill 0.5" or
# "--kernel build/ab/sqrll.cu" (another version of the kernel: list it twice, alternating, for an A/B).
# A variant "@DIR [ARGS]" runs the benchmark of another checkout at DIR instead, with its own package
# (for changes beyond the .cu; make one with `git archive main | tar -x -C DIR`).
# Logs go under $OUT (default: out/).
# Usage: bash scripts/gpu_kernel_sweep.sh "VARIANT" ... [-- bench args for every variant]
source "$(dirname "$0")/gpu_env.sh"
variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
[ "$1" = "--" ] && shift
for v in "${variants[@]}"; do
    echo "== variant: ${v:-defaults}" | tee -a "$OUT/sweep.log"
    tree=. path=${PYTHONPATH:-}
    if [[ $v == @* ]]; then  # another checkout's benchmark, importing that checkout's package
        tree=${v%% *}; tree=${tree#@}; v=${v#"@$tree"}
        checkout_package "$tree"
        path=$tree  # ahead of the editable install of this checkout (a script's sys.path has no cwd)
    fi
    # shellcheck disable=SC2086  # a variant is several arguments
    PYTHONPATH=$path timeout 180 python3 "$tree/scripts/bench_kernel.py" --impls sqrllm $v "$@" 2>&1 \
        | grep -E "^\| \(|copy|Error|error" | tee -a "$OUT/sweep.log"
done
