#!/usr/bin/env bash
# On a CUDA machine: the race config's training step and the race itself for several variants, one
# after another in one run, so that their numbers compare. A variant is train.py overrides ("" = the
# config as it is), optionally after "@DIR": another checkout at DIR run with its own package (make
# one with `git archive BRANCH | tar -x -C DIR` and carry it; list variants twice, alternating, for
# an A/B). Per variant: scripts/profile_train_step.py (ms a step, the kernels by GPU time) and, unless
# RACE=0, scripts/bench_gpu_race.py on configs/shakespeare_char.py. data/shakespeare_char must be
# prepared here (it is copied into the other checkouts). Logs go under $OUT (default: out/).
# Usage: bash scripts/gpu_train_ab.sh "VARIANT" ...
source "$(dirname "$0")/gpu_env.sh"
i=0
for v in "$@"; do
    i=$((i + 1))
    tree=. path=${PYTHONPATH:-}
    if [[ $v == @* ]]; then  # another checkout, importing its own package ahead of this one's install
        tree=${v%% *}; tree=${tree#@}; v=${v#"@$tree"}
        checkout_package "$tree"
        mkdir -p "$tree/data/shakespeare_char" && cp data/shakespeare_char/{meta.json,train.bin,val.bin} "$tree/data/shakespeare_char/"
        path=$(cd "$tree" && pwd)
    fi
    echo "== variant $i: ${tree} ${v:-(the config)}" | tee -a "$OUT/ab.log"
    # shellcheck disable=SC2086  # a variant is several overrides
    (cd "$tree" && PYTHONPATH=$path timeout 150 python3 scripts/profile_train_step.py configs/shakespeare_char.py $v 2>&1 \
        | grep -v "Warning\|_warn_once" | head -22 | cut -c1-160) | tee -a "$OUT/ab.log"
    if [ "${RACE:-1}" != 0 ]; then
        (cd "$tree" && PYTHONPATH=$path timeout 150 python3 scripts/bench_gpu_race.py --out "out/ab$i" --variant "v$i:$v" 2>&1 \
            | grep "^| v$i") | tee -a "$OUT/ab.log"
    fi
done
