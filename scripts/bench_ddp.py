"""Data-parallel scaling: train.py's tokens/s on one GPU and on N GPUs of one host (torchrun, NCCL),
at the same per-GPU batch, for a few batch sizes.

    python data/shakespeare_char/prepare.py --input PATH      # once
    python scripts/bench_ddp.py                              # configs/shakespeare_char.py, batch 64 and 512
    python scripts/bench_ddp.py --batch 64 128 256 --set=--compile=true

tokens/s is the median over the logged intervals after the first (which holds start-up); each run
is a fresh process (or N of them) with the config's settings, evaluated once at the end on a slice of val.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run(config, gpus, batch, args, out_dir):
    """Train for args.iters steps on `gpus` GPUs -> (median tokens/s, median MFU)."""
    launch = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={gpus}"]
    cmd = launch + ["train.py", config, f"--out_dir={out_dir}", f"--batch_size={batch}", f"--max_iters={args.iters}",
                    f"--log_interval={args.iters // 5}", "--eval_interval=0", "--eval_max_tokens=8192",
                    "--cuda_graph=false", "--progress=false", *args.set]  # eager steps for 1 and N GPUs alike
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run would keep the last one aside
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_suffix(".log"), "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "tok_per_s" in r][1:]
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return statistics.median(r["tok_per_s"] for r in steady), statistics.median(mfus) if mfus else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/shakespeare_char.py")
    ap.add_argument("--gpus", type=int, default=0, help="GPUs for the data-parallel runs; 0 = all visible")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 512], help="per-GPU batch sizes")
    ap.add_argument("--iters", type=int, default=100, help="steps per run")
    ap.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE", help="an override for every run")
    ap.add_argument("--out", default="out/bench_ddp")
    args = ap.parse_args()
    gpus = args.gpus or torch.cuda.device_count()
    if gpus < 2:
        sys.exit(f"error: data-parallel scaling needs at least 2 GPUs; this machine shows {gpus}")
    print(f"{torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}, {args.config}, {args.iters} steps per run")
    head = f"| per-GPU batch | 1 GPU tok/s | MFU | {gpus} GPUs tok/s | MFU | speedup |"
    lines = [head, "|---:|---:|---:|---:|---:|---:|"]
    for batch in args.batch:
        one, mfu1 = run(args.config, 1, batch, args, ROOT / args.out / f"b{batch}_1gpu")
        many, mfu_n = run(args.config, gpus, batch, args, ROOT / args.out / f"b{batch}_{gpus}gpu")
        pct = ["-" if m is None else f"{100 * m:.1f}%" for m in (mfu1, mfu_n)]
        lines.append(f"| {batch} | {one:,.0f} | {pct[0]} | {many:,.0f} | {pct[1]} | {many / one:.2f}x |")
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
