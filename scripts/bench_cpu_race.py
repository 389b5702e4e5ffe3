"""The CPU race against nanoGPT's shakespeare_char CPU recipe.

nanoGPT's 0.8M-parameter GPT (4 layers, width 128, block 64, batch 12, 2000 iterations) ends at a
val loss of about 1.88 after about 100 s on a 2-core machine, evaluations included. This runs
configs/shakespeare_char_cpu.py twice, each in a fresh process (so the clock includes Python start,
imports and the final evaluation over the whole val split in windows of 64 characters with the
memory reset at each window), and prints wall-clock and val loss from each run's metrics.jsonl.

    python data/shakespeare_char/prepare.py --input PATH   # once
    python scripts/bench_cpu_race.py

Run it on an otherwise idle machine: the numbers are wall-clock.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = [  # (label, overrides, target val loss, time budget in seconds)
    ("short", ["--max_iters=600"], 1.88, 25.0),
    ("long", ["--eval_stream=true"], 1.75, 100.0),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/bench_cpu_race", help="parent folder for the runs' out_dirs")
    ap.add_argument("--only", choices=[r[0] for r in RUNS], help="run one of the two")
    args = ap.parse_args()
    rows = []
    for label, overrides, target, budget in RUNS:
        if args.only and label != args.only:
            continue
        out_dir = Path(args.out) / label
        shutil.rmtree(ROOT / out_dir, ignore_errors=True)  # a fresh run would keep the last one aside
        cmd = [sys.executable, "train.py", "configs/shakespeare_char_cpu.py", f"--out_dir={out_dir}",
               "--progress=false", *overrides]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        evals = [json.loads(line) for line in (ROOT / out_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in evals if "val_loss" in r][-1]
        ok = last["val_loss"] <= target and last["elapsed"] <= budget
        rows.append((label, " ".join(overrides) or "(config as is)", last["step"], last["elapsed"],
                     last["val_loss"], last.get("val_loss_stream"), target, budget, ok))
    print()
    print(f"{'run':6} {'overrides':16} {'steps':>6} {'wall s':>7} {'val (64-window)':>16} {'val (streamed)':>15} "
          f"{'target':>14} {'met':>4}")
    for label, ov, steps, wall, val, stream, target, budget, ok in rows:
        streamed = "-" if stream is None else f"{stream:.4f}"  # the short run does no streamed evaluation
        print(f"{label:6} {ov:16} {steps:>6} {wall:>7.1f} {val:>16.4f} {streamed:>15} "
              f"{f'<= {target} in {budget:.0f}s':>14} {'yes' if ok else 'NO':>4}")


if __name__ == "__main__":
    main()
