#!/usr/bin/env bash
# On a host with 2 CUDA GPUs: data-parallel scaling (scripts/bench_ddp.py), then the ablations of
# configs/shakespeare_char.py at an equal time budget (scripts/bench_gpu_race.py --budget), one run at a
# time per GPU. Logs and tables go under $OUT (default: out/).
# Usage: bash scripts/gpu_train_check.sh PATH/TO/tinyshakespeare.txt [budget seconds, default 40]
BUDGET=${2:-40}
source "$(dirname "$0")/gpu_env.sh"
python3 data/shakespeare_char/prepare.py --input "$1" >"$OUT/prepare.log" 2>&1 || { cat "$OUT/prepare.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT/device.txt"
timeout 240 python3 scripts/bench_ddp.py --batch 64 512 2>&1 | tee "$OUT/bench_ddp.log"
# the README's table: configs/shakespeare_char.py as it was then (6 layers, dropout 0.3, no average of
# the weights, eager steps, the streamed loss over 256 streams) at n_mem 384, one more override per row
common=(--budget "$BUDGET" --set=--n_layer=6 --set=--dropout=0.3 --set=--ema_decay=0 --set=--cuda_graph=false
        --set=--eval_streams=256)
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 scripts/bench_gpu_race.py --out out/ablate "${common[@]}" \
    --variant base:--n_mem=384 --variant mlp_every2:"--n_mem=384 --mlp_every=2" \
    --variant mlp_every3:"--n_mem=384 --mlp_every=3" --table "$OUT/ablate0.md" >"$OUT/ablate0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 300 python3 scripts/bench_gpu_race.py --out out/ablate "${common[@]}" \
    --variant n_mem192:--n_mem=192 --variant n_mem768:--n_mem=768 --variant carried:"--n_mem=384 --batching=stream" \
    --table "$OUT/ablate1.md" >"$OUT/ablate1.log" 2>&1 &
wait
cat "$OUT/ablate0.log" "$OUT/ablate1.log" | grep -v "^\$"
