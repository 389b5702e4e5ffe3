"""The shakespeare_char race on one GPU, and sqrllm against the GPT baseline in the same harness.

The race: sqrllm reaches a val loss <= 1.46 (the whole val split in windows of 256 characters, memory
reset at each: the context the GPT sees) within 45 s of launch, start-up, compilation and
evaluations included; streamed through the whole split (memory carried) the target is <= 1.40.
Each run is a fresh process; its clock starts at the process's launch (sqrllm.trainer.process_start_time).

    python data/shakespeare_char/prepare.py --input PATH      # once
    python scripts/bench_gpu_race.py                          # configs/shakespeare_char.py, then the GPT's
    python scripts/bench_gpu_race.py --only sqrllm --set=--eval_interval=0
    python scripts/bench_gpu_race.py --variant mem768:--n_mem=768 --variant drop3:--dropout=0.3 \\
        --set=--max_iters=2000 --parallel 2                   # a sweep: compare losses, not times

    python scripts/bench_gpu_race.py --budget 40 --variant mlp2:--mlp_every=2 ...   # ablations at equal time

--seeds 1337,2,3 runs every config and variant once per seed (labels LABEL@sN) and then prints, per
variant, the spread over its seeds and how many of its runs met each target: at this corpus's size
runs of one config differ by about 0.01 in val loss, as much as most ablations move it.

--budget S gives every run the same wall-clock: a probe run of --probe_iters steps times the run's
start-up, step and final evaluation, and the run then gets as many steps as fit in S seconds from
launch, its learning-rate schedule ending there (max_time=S stops it if the estimate was long).

With --parallel above 1 the runs share the GPU, so their times and speeds mean nothing; compare
them at a fixed step count. Prints one table row per run, from the runs' metrics.jsonl.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {"sqrllm": "configs/shakespeare_char.py", "gpt": "configs/shakespeare_char_gpt.py"}
LEVELS = (1.60, 1.50, 1.46)
TARGET, BUDGET, STREAM_TARGET = 1.46, 45.0, 1.40


def summarize(label, out_dir, log):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    params = re.search(r"([\d.]+)M parameters", log)
    steady = train_rows[1:] or train_rows  # the first interval holds compilation
    first = {x: next((r["elapsed"] for r in evals if r["val_loss"] <= x), None) for x in LEVELS}
    best = min(evals, key=lambda r: r["val_loss"])
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    mems = [r["mem_gib"] for r in train_rows if r.get("mem_gib") is not None]
    return {
        "run": label, "params_m": float(params.group(1)) if params else None, "steps": evals[-1]["step"],
        "tok_per_s": statistics.median(r["tok_per_s"] for r in steady),
        "mfu": statistics.median(mfus) if mfus else None, "mem_gib": max(mems) if mems else None,
        **{f"to_{x:.2f}": first[x] for x in LEVELS},
        "best_val": best["val_loss"], "best_at": best["elapsed"], "final_val": evals[-1]["val_loss"],
        "final_stream": evals[-1].get("val_loss_stream"), "wall": evals[-1]["elapsed"],
    }


def table(results):
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = ("| run | params | steps | tok/s | MFU | peak GiB | s to 1.60 | s to 1.50 | s to 1.46 | best val (at s) "
            "| final val | final streamed | wall s |")
    lines = [head, "|" + "---|" * 13]
    for r in results:
        lines.append(
            f"| {r['run']} | {f(r['params_m'], '.2f')}M | {r['steps']} | {f(r['tok_per_s'], ',.0f')} "
            f"| {'-' if r['mfu'] is None else format(100 * r['mfu'], '.1f') + '%'} | {f(r['mem_gib'], '.2f')} "
            + "".join("| " + f(r[f"to_{x:.2f}"], ".1f") + " " for x in LEVELS)
            + f"| {r['best_val']:.4f} ({r['best_at']:.1f}) | {r['final_val']:.4f} | {f(r['final_stream'], '.4f')} "
            f"| {r['wall']:.1f} |")
    return "\n".join(lines)


def met(r):
    """(windowed target met within the budget, streamed target met) for one run's summary."""
    return (r["to_1.46"] is not None and r["to_1.46"] <= BUDGET,
            r["final_stream"] is not None and r["final_stream"] <= STREAM_TARGET)


def seed_spread(results):
    """Lines, one per variant run under several seeds (labels LABEL@sN): its final val loss and streamed
    loss as mean, standard deviation and range, and how many of its runs met each target."""
    groups = {}
    for r in results:
        label, at, seed = r["run"].rpartition("@s")
        if at and seed.isdigit():
            groups.setdefault(label, []).append(r)
    lines = []
    for label, runs in groups.items():
        if len(runs) < 2:
            continue
        parts = [f"{label}: {len(runs)} seeds"]
        for key, name in (("final_val", "val"), ("final_stream", "streamed")):
            v = [r[key] for r in runs if r[key] is not None]
            if len(v) > 1:
                parts.append(f"{name} {statistics.mean(v):.4f} +- {statistics.stdev(v):.4f} ({min(v):.4f}-{max(v):.4f})")
        hits = [met(r) for r in runs]
        parts.append(f"race met {sum(h[0] for h in hits)}/{len(runs)}, streamed <= {STREAM_TARGET} "
                     f"{sum(h[1] for h in hits)}/{len(runs)}")
        lines.append("; ".join(parts))
    return lines


def fit_steps(label, config, overrides, args, out):
    """Overrides that make one run end `args.budget` seconds after launch: max_iters from a probe run
    of this config alone (start-up, seconds per step, the final evaluation), and max_time."""
    probe_dir = out / f"{label}_probe"
    shutil.rmtree(probe_dir, ignore_errors=True)  # a fresh run would keep the last one aside
    first = max(1, args.probe_iters // 3)
    cmd = [sys.executable, "train.py", config, f"--out_dir={probe_dir}", "--progress=false", *overrides, *args.set,
           f"--max_iters={args.probe_iters}", "--eval_interval=0", f"--log_interval={first}", "--max_time=0"]
    with open(out / f"{label}_probe.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    rows = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()]
    at = {r["step"]: r["elapsed"] for r in rows if "loss" in r}
    per_step = (at[args.probe_iters] - at[first]) / (args.probe_iters - first)
    start = at[first] - first * per_step
    evaluation = next(r["elapsed"] for r in rows if "val_loss" in r) - at[args.probe_iters]
    steps = int((args.budget - start - evaluation) / per_step * 0.97)
    print(f"{label}: probe: start-up {start:.1f} s, {1000 * per_step:.1f} ms per step, evaluation {evaluation:.1f} s "
          f"-> {steps} steps in {args.budget:.0f} s", flush=True)
    return [f"--max_iters={steps}", f"--max_time={args.budget}"]


def seed_list(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. --seeds 1337,2,3") from None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=list(RUNS), help="run only these of the two configs")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL:OVERRIDES",
                    help="also run configs/shakespeare_char.py with these space-separated overrides")
    ap.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE", help="an override for every run")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (a sweep; times are then meaningless)")
    ap.add_argument("--out", default="out/bench_gpu_race", help="parent folder of the runs' out_dirs and logs")
    ap.add_argument("--table", help="also write the table to this file")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds from launch per run, steps fitted by a probe")
    ap.add_argument("--probe_iters", type=int, default=150, help="steps of the --budget probe run")
    ap.add_argument("--seeds", type=seed_list, default=None,
                    help="comma-separated seeds: every run once per seed, then the spread per variant")
    args = ap.parse_args()

    jobs = [(name, RUNS[name], []) for name in (args.only or ([] if args.variant else list(RUNS)))]
    for spec in args.variant:
        label, _, overrides = spec.partition(":")
        jobs.append((label, RUNS["sqrllm"], overrides.split()))
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.budget:
        jobs = [(label, config, overrides + fit_steps(label, config, overrides, args, out))
                for label, config, overrides in jobs]
    if args.seeds:  # after the fit: one probe a variant, whatever its seed
        jobs = [(f"{label}@s{seed}", config, overrides + [f"--seed={seed}"])
                for label, config, overrides in jobs for seed in args.seeds]
    done = []
    for label, config, overrides in jobs:
        while sum(proc.poll() is None for _, proc, _ in done) >= args.parallel:
            time.sleep(0.5)
        out_dir = out / label
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, "train.py", config, f"--out_dir={out_dir}", "--progress=false", *overrides, *args.set]
        print("$", " ".join(cmd[1:]), flush=True)
        log = open(out / f"{label}.log", "w")
        done.append((label, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), out_dir))
    results = []
    for label, proc, out_dir in done:
        if proc.wait() != 0:
            print(f"{label}: failed (exit {proc.returncode}); see {out / (label + '.log')}", flush=True)
            continue
        results.append(summarize(label, out_dir, (out / f"{label}.log").read_text()))
        print(f"{label}: done", flush=True)
    text = table(results)
    print()
    print(text)
    for r in results:
        if r["run"] == "sqrllm":
            hit, stream = met(r)
            print(f"\nrace: val <= {TARGET} within {BUDGET:.0f} s: {'met' if hit else 'NOT met'}; "
                  f"streamed <= {STREAM_TARGET}: {'met' if stream else 'NOT met'}")
    spread = seed_spread(results)
    if spread:
        print("\n" + "\n".join(spread))
        if args.parallel > 1:
            print("(runs shared the GPU: the race's 45 s is not theirs; compare the losses)")
    if args.table:
        Path(args.table).write_text(text + "\n" + "".join("\n" + line for line in spread) + "\n")


if __name__ == "__main__":
    main()
