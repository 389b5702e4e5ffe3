"""Benchmark the exported model: native CLI and wasm under Node.js against sample.py, at batch 1.

    python train.py configs/small.py --out_dir=out/small --max_iters=200    # speed does not depend on training
    python scripts/bench_export.py --ckpt out/small/ckpt.pt

Exports the checkpoint to --out, builds the native CLI and (with em++) the wasm build, then measures
greedy generation of 100 tokens after a prompt of 100 and of 10,000 tokens (the median of --repeats
runs each): tokens/s must not depend on the position. sample.py is timed by its own speed report, as a
user runs it and with --step plain (the model's own PyTorch forward, one token per call). The
native CLI runs with --threads 1, --threads 2 and as by default (2 threads while they are faster
than 1, which it times as it goes); wasm on one thread; sample.py on the threads it picks. Text goes
to /dev/null: this measures generation, not a terminal. Also prints the size of the CLI and of the
wasm beyond their weight bytes. Timings are only meaningful on a quiet machine (on a shared one, run
it as `chrt -f 10 python scripts/bench_export.py ...`): the load average is printed first.
"""

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from sqrllm.checkpoint import load_model
from sqrllm.export import export_checkpoint

ROOT = Path(__file__).resolve().parent.parent
POSITIONS = (100, 10_000)  # prompt lengths; 100 tokens are generated after each
NATIVE = "native CLI as run by default (1 or 2 threads)"


def prompt_text(tokenizer, n):
    """n tokens of Python source from the standard library (ASCII, in the vocabulary), as text."""
    chars, need = [], n + 1000
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        chars += [c for c in text if (c.isascii() and (c.isprintable() or c == "\n"))]
        if len(chars) > need:
            break
    if tokenizer.kind == "char":
        chars = [c for c in chars if c in tokenizer.index]
    ids = tokenizer.encode("".join(chars))[:n]
    assert len(ids) == n, "not enough prompt text"
    return tokenizer.decode(ids)



def cli_rate(cmd, prompt):
    """Generation tokens/s that the CLI (native or wasm) reports on stderr."""
    run = subprocess.run([*cmd, "-n", "100", "-t", "0", prompt], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         check=True)
    m = re.search(rb"generated (\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)", run.stderr)
    return float(m.group(2))


def sample_py_rate(ckpt, prompt_file, *options):
    """Generation tokens/s that sample.py reports on stderr (None, its error printed, if it fails)."""
    run = subprocess.run([sys.executable, "sample.py", f"--ckpt={ckpt}", f"--prompt_file={prompt_file}",
                          "--temperature=0", "--max_new_tokens=100", "--device=cpu", *options], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if run.returncode != 0:
        print(f"sample.py {' '.join(options)}: {run.stderr.strip()}", file=sys.stderr)
        return None
    m = re.search(r"generation: [\d,]+ tokens, ([\d,.]+) tokens/s", run.stderr)
    return float(m.group(1).replace(",", "")) if m else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="build/bench_export", help="export and build folder")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    args.ckpt, args.out = map(os.path.abspath, (args.ckpt, args.out))  # sample.py runs in the repo's root

    print(f"load average before: {os.getloadavg()[0]:.2f} (timings need a quiet machine)")
    done = export_checkpoint(args.ckpt, args.out)
    out = Path(args.out)
    subprocess.run(["make", "-s", "-C", str(out), "sqrllm"], check=True)
    has_wasm = shutil.which("em++") and shutil.which("node")
    if has_wasm:
        subprocess.run(["make", "-s", "-C", str(out), "wasm"], check=True)
    _, tok, _ = load_model(args.ckpt)
    prompts = {n: prompt_text(tok, n) for n in POSITIONS}
    files = {}
    for n, text in prompts.items():
        files[n] = out / f"prompt_{n}.txt"
        files[n].write_text(text, encoding="utf-8")

    # name -> measure(position) -> tokens/s; runs interleaved, so that a load change hits every row alike
    cli = str(out / "sqrllm")
    measures = {"native CLI --threads 1": lambda n: cli_rate([cli, "--threads", "1"], prompts[n]),
                "native CLI --threads 2": lambda n: cli_rate([cli, "--threads", "2"], prompts[n]),
                NATIVE: lambda n: cli_rate([cli], prompts[n]),
                "sample.py (as run by default)": lambda n: sample_py_rate(args.ckpt, files[n]),
                f"sample.py --step plain (PyTorch, {torch.get_num_threads()} threads)":
                    lambda n: sample_py_rate(args.ckpt, files[n], "--step=plain")}
    if has_wasm:
        measures["wasm CLI under Node.js (1 thread)"] = lambda n: cli_rate(["node", str(out / "node_cli.js")], prompts[n])
    runs = {name: {n: [] for n in POSITIONS} for name in measures}
    for _ in range(args.repeats):
        for name, measure in measures.items():
            for n in POSITIONS:
                runs[name][n].append(measure(n))
    rows = {name: {n: statistics.median(r) for n, r in by_n.items()} for name, by_n in runs.items()
            if all(x is not None for r in by_n.values() for x in r)}

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\n{args.ckpt}: {done['params']:,} parameters, {done['tokenizer']} vocabulary of {done['vocab_size']}; "
          f"{cpu}, {os.cpu_count()} cores; greedy, batch 1, median of {args.repeats}")
    print(f"{'tokens/s':<52}{'at 100-200':>12}{'at 10,000-10,100':>18}{'ratio':>8}")
    for name, r in rows.items():
        a, b = r[POSITIONS[0]], r[POSITIONS[1]]
        print(f"{name:<52}{a:>12,.0f}{b:>18,.0f}{b / a:>8.2f}")
    for name in rows:
        if name.startswith("native"):
            drift = rows[name][POSITIONS[1]] / rows[name][POSITIONS[0]] - 1
            print(f"{name} at 10,000-10,100 vs 100-200: {drift:+.1%} (target: within 10%)")
    native = rows[NATIVE]
    for name in rows:
        if name.startswith("sample.py"):
            print(f"native CLI (default) / {name}: {native[100] / rows[name][100]:.1f}x at 100-200, "
                  f"{native[10_000] / rows[name][10_000]:.1f}x at 10,000-10,100 (target: >= 3x)")
    w = done["weight_bytes"]
    size = (out / "sqrllm").stat().st_size
    print(f"\nweights: {w:,} bytes of bfloat16")
    print(f"native CLI: {size:,} bytes, {size - w:,} beyond the weights")
    if has_wasm:
        wasm, js = (out / "web" / "sqrllm.wasm").stat().st_size, (out / "web" / "sqrllm.js").stat().st_size
        print(f"wasm: {wasm:,} bytes, {wasm - w:,} beyond the weights; JS loader sqrllm.js {js:,} bytes")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
