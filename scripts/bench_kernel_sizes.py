"""How the sqrll CUDA scan's time grows with its size: a fixed cost per call, and a rate per byte.

    python scripts/bench_kernel_sizes.py --shapes 1,32768,256 1,65536,256 1,131072,256 [--dtypes bf16 fp32]

For each shape and dtype: forward and forward+backward us of the scan (scripts/bench_kernel.py's
harness: CUDA-graph replays over input copies that overflow L2), and the forward's bytes (x, r in,
y out) moved by `torch.add(x, r, out=y)` in the same harness: the plainest kernel that moves them,
a roofline at that size. Then, per dtype, the least-squares line time = fixed + bytes / rate over the
shapes given (pass shapes of one plan mode, e.g. T growing at B = 1): where a shape falls short of
the copy bandwidth, this says whether a per-call cost or the streaming rate is what is missing.
"""

import argparse
import os
import sys

import numpy as np
import torch

from sqrllm import cuda
from sqrllm.scan import scan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernel import DTYPES, add_graph_arg, autograd_pair, copy_bandwidth, gpu_ms  # noqa: E402


def fit(nbytes, us):
    """(fixed us, GB/s) of the line us = fixed + nbytes / rate."""
    slope, fixed = np.polyfit(np.asarray(nbytes, float), np.asarray(us, float), 1)
    return fixed, 1e-3 / slope


def add_call(x, r, dy):
    """The forward's bytes moved by the plainest kernel: y = x + r into a buffer made once."""
    y = torch.empty_like(x)
    return lambda: torch.add(x, r, out=y)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", required=True, help="B,T,C")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    add_graph_arg(ap)
    args = ap.parse_args()
    copy = copy_bandwidth()
    print(f"Device: {torch.cuda.get_device_name()}; device-to-device copy: {copy:.0f} GB/s (read + write)\n")
    print("| shape (B, T, C) | dtype | mode | fwd MB | add us | add % copy | fwd us | fwd % copy "
          "| fwd+bwd us | fwd+bwd % copy |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    make = autograd_pair(scan)
    lines = {}
    for dname in args.dtypes:
        for shape in args.shapes:
            B, T, C = map(int, shape.split(","))
            dtype = DTYPES[dname]
            x = torch.randn(B, T, C, device="cuda").to(dtype)
            r = torch.rand(B, T, C, device="cuda").mul_(0.3).add_(0.7).to(dtype)
            dy = torch.randn(B, T, C, device="cuda").to(dtype)
            nbytes = B * T * C * x.element_size()
            mode = cuda.launch_plan(x).mode
            us_add = 1e3 * gpu_ms(add_call, (x, r, dy), 3 * nbytes, args.graph_ms)
            us_f = 1e3 * gpu_ms(lambda *a: make(*a)[0], (x, r, dy), 3 * nbytes, args.graph_ms)
            us_fb = 1e3 * gpu_ms(lambda *a: make(*a)[1], (x, r, dy), 8 * nbytes, args.graph_ms)
            pct = lambda n, us: 100 * n / us / 1e3 / copy  # noqa: E731
            print(f"| ({B}, {T}, {C}) | {dname} | {mode.lower()} | {3 * nbytes / 1e6:.0f} | {us_add:.1f} "
                  f"| {pct(3 * nbytes, us_add):.1f} | {us_f:.1f} | {pct(3 * nbytes, us_f):.1f} | {us_fb:.1f} "
                  f"| {pct(8 * nbytes, us_fb):.1f} |", flush=True)
            for name, n, us in (("add", 3 * nbytes, us_add), ("fwd", 3 * nbytes, us_f), ("fwd+bwd", 8 * nbytes, us_fb)):
                lines.setdefault((dname, name), []).append((n, us))
            del x, r, dy
            torch.cuda.empty_cache()
    if len(args.shapes) > 1:
        print("\n| dtype | what | fixed us | GB/s | GB/s % copy |\n|---|---|---:|---:|---:|")
        for (dname, name), pts in lines.items():
            fixed, rate = fit(*zip(*pts))
            print(f"| {dname} | {name} | {fixed:.1f} | {rate:.0f} | {100 * rate / copy:.1f} |")


if __name__ == "__main__":
    main()
