"""Val loss against wall-clock time and against tokens, for any set of runs, in one PNG.

    python scripts/plot_runs.py out/shakespeare_char out/shakespeare_char_gpt --out race.png --target 1.46

Reads each run folder's metrics.jsonl (the evaluation rows: `elapsed` is seconds from launch, so
start-up, compilation and the evaluations themselves are on the time axis) and labels it with the
folder's name, or with --labels. Needs matplotlib (pip install matplotlib).
"""

import argparse
import json
from pathlib import Path


def read_evals(folder, metric):
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; pass run folders (a training run's out_dir)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if metric in r]
    if not rows:
        raise SystemExit(f"error: {path} has no evaluation rows with '{metric}'")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    ap.add_argument("--out", default="runs.png", help="PNG to write")
    ap.add_argument("--labels", nargs="*", help="one label per run (default: the folders' names)")
    ap.add_argument("--metric", default="val_loss", help="val_loss (windows, memory reset) or val_loss_stream")
    ap.add_argument("--target", type=float, nargs="*", default=[], help="draw these loss levels")
    ap.add_argument("--title", default="", help="figure title")
    args = ap.parse_args()
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(args.runs)} runs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for run, label in zip(args.runs, labels):
        rows = read_evals(run, args.metric)
        loss = [r[args.metric] for r in rows]
        best = min(loss)
        line, = by_time.plot([r["elapsed"] for r in rows], loss, marker=".", label=f"{label} (best {best:.3f})")
        by_tokens.plot([r["tokens"] / 1e6 for r in rows], loss, marker=".", color=line.get_color())
    for level in args.target:
        for ax in (by_time, by_tokens):
            ax.axhline(level, color="gray", linestyle="--", linewidth=0.8)
    by_time.set_xlabel("wall-clock from launch (s)")
    by_tokens.set_xlabel("training tokens (millions)")
    by_time.set_ylabel(args.metric.replace("_", " "))
    for ax in (by_time, by_tokens):
        ax.grid(alpha=0.3)
    by_time.legend(loc="upper right", fontsize="small")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
