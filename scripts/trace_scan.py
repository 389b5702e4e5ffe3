"""A timeline of one launch of the sqrll CUDA scan, from timestamps the kernel itself records.

    python scripts/trace_scan.py 1,131072,256 bf16 [--bwd] [--save trace.npz]

Compiles kernels/sqrll.cu with TRACE defined: each block stamps the GPU's global nanosecond timer
at its start, once its first tile's inputs are loaded and folded, once that tile's carry-in is known
(chunk mode: the tree's nodes before it), and once its outputs are issued. Prints the launch's span
against the per-call time of the same kernel in CUDA-graph replays (scripts/bench_kernel.py's
harness: what the span leaves out is the scratch memset and the gaps between launches), the phases'
quantiles, and, bin by bin, how many blocks are in each phase and how much of the work is done.

In chunk mode it also splits a tile's wait for its carry-in: for the tiles before it to be loaded
and folded (the last of them, in time), then the tree: publishing the nodes that end at the tile
(reading their children), the first POLL nodes of the carry-in, the rest of them.

In stream mode, where a block walks many tiles, thread 0 of each block stamps each iteration instead
(its start, tile m's copies landed, tile m's map published, tile m - 1's carry-in known, tile m - 1's
outputs issued), and the table is iteration by iteration, then each phase summed over a block's
iterations, and how long before the launch's last stamp each block's last one came.
"""

import argparse
import os
import sys

import numpy as np
import torch

from sqrllm import cuda
from sqrllm.scan import scan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernel import (  # noqa: E402
    DTYPES, add_graph_arg, add_plan_args, apply_plan_args, copy_bandwidth, gpu_ms, patch_scan_source)

MAX_BLOCKS = 1 << 16  # blocks traced: the .cu's TRACE
STREAM_BLOCKS, STREAM_ROUNDS = cuda.NT * 4, 64  # stream mode: blocks and iterations traced, as the .cu's


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help="B,T,C")
    ap.add_argument("dtype", choices=list(DTYPES))
    ap.add_argument("--bwd", action="store_true", help="trace the backward kernel instead")
    ap.add_argument("--bin-us", type=float, default=2.0, help="timeline bin width, us")
    ap.add_argument("--calls", type=int, default=5, help="traced launches; the median-span one is shown")
    add_graph_arg(ap)
    ap.add_argument("--save", help="write every traced launch's stamps to this .npz")
    ap.add_argument("--define", nargs="+", default=[], metavar="NAME=VALUE",
                    help="more macros put in front of kernels/sqrll.cu, e.g. POLL=8")
    ap.add_argument("--kernel", metavar="FILE", help="trace the scan of FILE instead of kernels/sqrll.cu")
    add_plan_args(ap)
    args = ap.parse_args()
    apply_plan_args(args)

    import cupy

    patch_scan_source([f"TRACE={MAX_BLOCKS}", *args.define], args.kernel)
    modules = []
    made = cupy.RawModule

    def recording(*a, **k):  # keep the module, whose global holds the stamps
        modules.append(made(*a, **k))
        return modules[-1]

    cupy.RawModule = recording

    B, T, C = map(int, args.shape.split(","))
    dtype = DTYPES[args.dtype]
    x = torch.randn(B, T, C, device="cuda").to(dtype)
    r = torch.rand(B, T, C, device="cuda").mul_(0.3).add_(0.7).to(dtype)
    dy = torch.randn(B, T, C, device="cuda").to(dtype)
    nbytes = B * T * C * x.element_size()
    stream = cuda.launch_plan(x, args.bwd).mode == "STREAM"

    def make(x, r, dy):  # the traced kernel's call on these inputs
        if not args.bwd:
            return lambda: scan(x, r)
        y = scan(x, r)
        return lambda: cuda.scan_bwd(dy, r, y)

    moved = (5 if args.bwd else 3) * nbytes
    call = make(x, r, dy)
    call()
    torch.cuda.synchronize()
    if stream:
        trace = cupy.ndarray((STREAM_BLOCKS, STREAM_ROUNDS, 5), cupy.uint64,
                             memptr=modules[-1].get_global("sqrll_stream_trace"))
    else:
        trace = cupy.ndarray((MAX_BLOCKS, 8), cupy.uint64, memptr=modules[-1].get_global("sqrll_trace"))
    graph_us = 1e3 * gpu_ms(make, (x, r, dy), moved, args.graph_ms)
    copy = copy_bandwidth()

    runs = []
    for _ in range(args.calls):
        trace.fill(0)
        torch.cuda.synchronize()
        call()
        torch.cuda.synchronize()
        host = cupy.asnumpy(trace)
        runs.append(host[host[:, 0, 0] != 0] if stream else host[host[:, 0] != 0])
    if stream:
        return stream_rounds(runs, args, graph_us, moved, copy)
    h, spans = median_launch(runs, lambda h: (h[:, 3].max() - h[:, 0].min()) / 1e3, args.save)

    t0 = h[:, 0].min()
    s = (h[:, :4].astype(np.int64) - int(t0)) / 1e3  # us from the launch's first block
    span = s[:, 3].max()
    ideal = moved / copy / 1e3  # us at the copy bandwidth
    print(f"{args.shape} {args.dtype} {'backward' if args.bwd else 'forward'}: {len(h)} blocks on "
          f"{len(np.unique(h[:, 4]))} SMs; span {span:.1f} us (spans of {args.calls} launches: "
          f"{', '.join(f'{v:.1f}' for v in spans)}); graph replay {graph_us:.1f} us per call; "
          f"{moved / 1e6:.0f} MB = {ideal:.1f} us at the copy's {copy:.0f} GB/s")
    phases = {"load+fold": s[:, 1] - s[:, 0], "wait carry-in": s[:, 2] - s[:, 1],
              "replay": s[:, 3] - s[:, 2], "block": s[:, 3] - s[:, 0]}
    print("\n| phase, us | p10 | p50 | p90 | max |\n|---|---:|---:|---:|---:|")
    for name, v in phases.items():
        q = np.percentile(v, [10, 50, 90, 100])
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in q) + " |")
    p = cuda.launch_plan(x, args.bwd)
    if p.mode == "CHUNKS":
        tree_phases(s, h, p.ncol)
    print("\n| from us | started | loading | waiting | replaying | done % |\n|---:|---:|---:|---:|---:|---:|")
    for e in np.arange(0, span + args.bin_us, args.bin_us):
        mid = e + args.bin_us / 2
        started = int(((s[:, 0] >= e) & (s[:, 0] < e + args.bin_us)).sum())
        loading = int(((s[:, 0] <= mid) & (s[:, 1] > mid)).sum())
        waiting = int(((s[:, 1] <= mid) & (s[:, 2] > mid)).sum())
        replaying = int(((s[:, 2] <= mid) & (s[:, 3] > mid)).sum())
        done = 100 * (s[:, 3] <= e + args.bin_us).mean()
        print(f"| {e:.0f} | {started} | {loading} | {waiting} | {replaying} | {done:.1f} |")


def median_launch(runs, span, save):
    """The traced launch of median span(stamps) (us), and every launch's span; all their stamps to the
    .npz `save`, if given."""
    spans = [span(h) for h in runs]
    if save:
        np.savez(save, *runs)
    return runs[int(np.argsort(spans)[len(spans) // 2])], spans


def tree_phases(s, h, ncol):
    """Chunk mode: a tile's wait for its carry-in, split (blocks are numbered time-major, ncol a row)."""
    n = len(s) // ncol * ncol
    k = np.arange(n) // ncol
    lg = cuda.TREE_LOG2
    count = np.array([sum(int(d) for d in np.base_repr(i, 1 << lg)) for i in range(k.max() + 1)])[k]
    loaded = s[:n, 1].reshape(-1, ncol)
    before = np.maximum.accumulate(loaded, axis=0)  # the last of tiles 0..k of a column loaded and folded
    ready = np.maximum(np.vstack([np.zeros((1, ncol)), before[:-1]]), loaded).reshape(-1)
    t = (h[:n, [5, 6]].astype(np.int64) - int(h[:, 0].min())) / 1e3
    first = np.where(h[:n, 6] > 0, t[:, 1], s[:n, 2])  # tile 0 reads no node
    parts = {"publishing its nodes": t[:, 0] - s[:n, 1], "first POLL nodes": first - t[:, 0],
             "the other nodes": s[:n, 2] - first}
    print(f"\ncarry-in wait, us: the tiles before loaded and folded {np.median(ready - s[:n, 1]):.2f} after "
          "the tile itself (median); its three parts, by the number of nodes the carry-in reads:")
    print("\n| nodes | tiles | " + " | ".join(parts) + " |\n|---|---:|---:|---:|---:|")
    for lo, hi in ((0, 4), (5, 8), (9, 12), (13, 99)):
        m = (count >= lo) & (count <= hi)
        if m.any():
            print(f"| {lo}-{hi} | {m.sum()} | " + " | ".join(f"{v[m].mean():.2f}" for v in parts.values()) + " |")


def stream_rounds(runs, args, graph_us, moved, copy):
    """Stream mode: each block's iterations, as quantiles over the blocks, iteration by iteration."""
    def span(h):
        return (h[..., 4].max() - h[:, 0, 0].min()) / 1e3
    h, spans = median_launch(runs, span, args.save)
    t = np.where(h > 0, (h.astype(np.int64) - int(h[:, 0, 0].min())) / 1e3, np.nan)  # us from the first start
    rounds = int((~np.isnan(t[:, :, 0])).sum(axis=1).max())
    if rounds == STREAM_ROUNDS:
        print(f"(only the first {STREAM_ROUNDS} iterations of each block are traced)")
    ideal = moved / copy / 1e3
    print(f"{args.shape} {args.dtype} {'backward' if args.bwd else 'forward'}, stream mode: {len(h)} blocks, "
          f"{rounds} iterations each; span {span(h):.1f} us (spans of {args.calls} launches: "
          f"{', '.join(f'{v:.1f}' for v in spans)}); graph replay {graph_us:.1f} us per call; "
          f"{moved / 1e6:.0f} MB = {ideal:.1f} us at the copy's {copy:.0f} GB/s, "
          f"{ideal / (rounds - 1):.2f} us a round")
    print("\nIteration m folds tile m and replays tile m - 1; us, median over the blocks [90th percentile]:")
    print("\n| m | starts at | copy wait | fold, publish | look-back wait | replay | ends at |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")

    def q(v):
        v = v[~np.isnan(v)]
        return f"{np.median(v):.2f} [{np.percentile(v, 90):.2f}]" if len(v) else "-"
    t = t[:, :rounds]
    end = np.fmax(t[..., 2], t[..., 4])  # an iteration's last stamp (no replay in the first, no fold in the last)
    # (blocks, rounds) each: copy wait, fold and publish, look-back wait, replay
    steps = [t[..., 1] - t[..., 0], t[..., 2] - t[..., 1], t[..., 3] - np.fmax(t[..., 2], t[..., 0]),
             t[..., 4] - t[..., 3]]
    for m in range(rounds):
        print(f"| {m} | {q(t[:, m, 0])} | " + " | ".join(q(v[:, m]) for v in steps) + f" | {q(end[:, m])} |")
    last = np.nanmax(end, axis=1)
    names = ("copy wait", "fold and publish", "look-back wait", "replay")
    print("\nPer block, its iterations summed, us, median [90th percentile]: "
          + ", ".join(f"{name} {q(np.nansum(v, axis=1))}" for name, v in zip(names, steps))
          + f"; its last stamp {q(last.max() - last)} before the launch's last")


if __name__ == "__main__":
    main()
