#!/usr/bin/env bash
# On a CUDA machine with CuPy: the GPU tests of another checkout at DIR (e.g. a branch, made with
# `git archive BRANCH | tar -x -C DIR`), importing that checkout's package, as gpu_kernel_sweep.sh's
# "@DIR" variants benchmark it. Arguments after DIR go to pytest (e.g. -k stream -x).
# Logs go under $OUT (default: out/). Usage: bash scripts/gpu_tree_tests.sh DIR [pytest arguments]
source "$(dirname "$0")/gpu_env.sh"
tree=$(cd "$1" && pwd) || exit 1
shift
checkout_package "$tree"
log="$OUT/tests_$(basename "$tree").log"
(cd "$tree" && PYTHONPATH=$tree timeout 300 python3 -m pytest -q -m gpu tests/test_cuda_scan.py "$@" 2>&1) \
    | tee "$log" | tail -15
