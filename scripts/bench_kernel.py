"""Times the sqrll CUDA scan against a one-thread-per-feature baseline and accelerated-scan.

    python scripts/bench_kernel.py [--dtypes bf16 fp32] [--shapes 16,2048,1024 ...] [--out table.md]

Per shape (B, T, C) and dtype: forward ms; forward+backward ms (the backward through
torch.autograd.grad); effective GB/s, counting 3 elements moved forward (x, r in, y out) and 8
forward+backward (dy, r, y in, dx, dr out as well); that as a % of the device-to-device copy
bandwidth measured in the same run (bytes read + written); and `call us`, the wall time per call of
forward+backward in a loop, which shows host overhead where launches cannot keep the GPU busy.
GPU times are medians of CUDA-graph replays, so host overhead is left out. Each graph runs the call
over enough copies of the inputs to overflow L2 (at least 2 and up to 64, in turn), so inputs do not
sit in cache, and as many times as make about --graph-ms of GPU work (up to 64), so the graph's own
launch, about 5 us a replay, is spread over its calls as it is for the copy of 1 GiB it is compared
with (--graph-ms 0: one call a copy, the launch in every call's time, as tables before 2026-12-05).

Rows: `sqrllm` (the kernel, through `sqrllm.scan`); `baseline` (one thread per feature, serial over
T, wrapped in an autograd.Function); `accel-triton` / `accel-cuda` (accelerated-scan's
`scalar` and `warp` modules on their own (B, C, T) layout, through autograd) when that package is
importable; the CUDA one needs a power-of-two T, is compiled at import (slow) and only runs with
--accel-cuda.
"""

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from sqrllm import cuda
from sqrllm.scan import scan

SHAPES = [(16, 2048, 1024), (8, 2048, 4096), (256, 128, 1024), (1, 32768, 1024), (1, 131072, 256), (64, 256, 384)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def do_bench(fn, **kw):
    """triton.testing.do_bench (imported here: the script's other helpers run without triton)."""
    from triton.testing import do_bench

    return do_bench(fn, **kw)


def copy_bandwidth():
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() / ms / 1e6  # GB/s


def eager_ms(fn):
    """GPU ms of one call of fn after a warm-up call, launch included: a first guess at its time."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def graph_plan(nbytes, l2, graph_ms, guess_ms):
    """(calls, input copies) for a timed graph of a call moving nbytes: copies for 3 x l2 bytes of inputs
    (at least 2 where the graph holds more than one call, so that no call follows itself on its own inputs),
    calls for graph_ms of GPU time by guess_ms() a call (asked only when graph_ms > 0); 64 at most of each
    (a call moving under 3 x L2 / 64, about 2.5 MB on an H100, may still find some of its inputs in L2)."""
    needed = min(64, -(-3 * l2 // nbytes))
    calls = needed if graph_ms <= 0 else max(needed, min(64, math.ceil(graph_ms / guess_ms())))
    return calls, max(needed, min(2, calls))


def gpu_ms(make, args, nbytes, graph_ms):
    """Median GPU ms of one call of make(*args)(), replayed from a CUDA graph of graph_plan's calls over its
    input copies in turn."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    calls, n_copies = graph_plan(nbytes, l2, graph_ms, lambda: eager_ms(make(*args)))
    copies = [args] + [tuple(t.clone() for t in args) for _ in range(n_copies - 1)]
    fns = [make(*copies[i % n_copies]) for i in range(calls)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    t = time.perf_counter()
    while time.perf_counter() - t < 0.25:  # clocks up again after compiles and host work
        graph.replay()
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(30):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return sorted(times)[len(times) // 2]


def call_us(fn, ms):
    n = max(3, min(200, int(200 / ms)))  # about 0.2 s of calls
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


class Baseline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r):
        y = cuda.scan_fwd_baseline(x, r)
        ctx.save_for_backward(r, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        r, y = ctx.saved_tensors
        dx, dr, _ = cuda.scan_bwd_baseline(dy.contiguous(), r, y)
        return dx, dr


def autograd_pair(op):
    """make(x, r, dy) -> (forward, forward_backward) for op(x, r) with its own backward."""

    def make(x, r, dy):
        xg, rg = x.detach().requires_grad_(), r.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                op(x, r)

        def fwd_bwd():
            torch.autograd.grad(op(xg, rg), (xg, rg), dy)

        return fwd, fwd_bwd

    return make


def implementations(accel_cuda):
    """name -> make(x, r, dy) -> (forward, forward_backward); x, r, dy are (B, T, C)."""
    impls = {"sqrllm": autograd_pair(scan), "baseline": autograd_pair(Baseline.apply)}
    modules = {"accel-triton": "accelerated_scan.scalar"}
    if accel_cuda:
        modules["accel-cuda"] = "accelerated_scan.warp"
    for name, module in modules.items():
        try:
            accel_scan = __import__(module, fromlist=["scan"]).scan
        except Exception as e:  # not installed, or its extension failed to build
            print(f"# {name} ({module}) unavailable: {type(e).__name__}: {e}")
            continue

        def accel(x, r, dy, accel_scan=accel_scan):
            # its own layout: (B, C, T), gates first; the transposes happen once, untimed
            gates, tokens, g = (t.transpose(1, 2).contiguous() for t in (r, x, dy))
            return autograd_pair(lambda a, b: accel_scan(b, a))(tokens, gates, g)

        impls[name] = accel
    return impls


def isolated(args):
    """Run this script once per (shape, dtype), each with the other arguments given, rows appended to --out."""
    argv = [a for a in sys.argv[1:] if a != "--isolate"]
    first = not args.append
    for shape in args.shapes:
        for dname in args.dtypes:
            run = [sys.executable, __file__, *argv, "--shapes", shape, "--dtypes", dname]
            code = subprocess.run(run + ([] if first else ["--append"])).returncode
            if code:
                print(f"# ({shape}) {dname}: the benchmark process ended with exit status {code}; "
                      "the rows after its last printed one are missing")
            first = False


def add_plan_args(ap):
    """Options that override sqrllm.cuda's launch-planning settings (see apply_plan_args)."""
    ap.add_argument("--tiles", help="sqrllm forward and backward tiles as L,blocks,L,blocks (default: sqrllm.cuda's)")
    ap.add_argument("--loop-tiles", help="loop mode's forward and backward tiles as L,blocks,L,blocks "
                    "(default: sqrllm.cuda's)")
    ap.add_argument("--loop-min-fill", type=float, help="sqrllm.cuda.LOOP_MIN_FILL (default: sqrllm.cuda's)")
    ap.add_argument("--tree-log2", type=int, help="sqrllm.cuda.TREE_LOG2 (default: sqrllm.cuda's)")
    ap.add_argument("--chunk-reg-rows", help="sqrllm.cuda.CHUNK_REG_ROWS as forward,backward (default: sqrllm.cuda's)")
    ap.add_argument("--chunk-max-ct", type=int, help="sqrllm.cuda.CHUNK_MAX_CT (default: sqrllm.cuda's)")
    ap.add_argument("--chunk-min-cols", type=int, help="sqrllm.cuda.CHUNK_MIN_COLS (default: sqrllm.cuda's)")
    ap.add_argument("--stream-max-blocks", type=int,
                    help="sqrllm.cuda.STREAM_MAX_BLOCKS; 0: no stream mode (default: sqrllm.cuda's)")
    ap.add_argument("--stream-max-rows", type=int,
                    help="sqrllm.cuda.STREAM_MAX_ROWS, rows a thread owns in a stream-mode tile at most "
                    "(default: sqrllm.cuda's)")
    ap.add_argument("--stream-short-head", type=int, choices=(0, 1),
                    help="sqrllm.cuda.STREAM_SHORT_HEAD: 1, stream mode's first round of tiles short; 0, T split "
                    "evenly (default: sqrllm.cuda's)")
    ap.add_argument("--stream-buffers", type=int,
                    help="sqrllm.cuda.STREAM_BUFFERS, stream mode's tile buffers, for a kernel (--kernel) built "
                    "with that many (default: sqrllm.cuda's)")


def add_graph_arg(ap):
    """--graph-ms, for gpu_ms."""
    ap.add_argument("--graph-ms", type=float, default=1.0,
                    help="GPU time a timed graph replay aims at, in calls of up to 64 (default 1.0); "
                    "0: one call an input copy, the graph's launch in each call's time")


def tile_pair(text):
    """"L,blocks,L,blocks" as the forward and backward tiles ((L, blocks), (L, blocks))."""
    f_l, f_b, b_l, b_b = map(int, text.split(","))
    return (f_l, f_b), (b_l, b_b)


def apply_plan_args(args):
    """Set the sqrllm.cuda settings that add_plan_args's options name; the others keep their defaults."""
    if args.tiles:
        cuda.FWD_TILE, cuda.BWD_TILE = tile_pair(args.tiles)
    if args.loop_tiles:
        cuda.LOOP_FWD_TILE, cuda.LOOP_BWD_TILE = tile_pair(args.loop_tiles)
    if args.loop_min_fill is not None:
        cuda.LOOP_MIN_FILL = args.loop_min_fill
    if args.tree_log2 is not None:
        cuda.TREE_LOG2 = args.tree_log2
    if args.chunk_reg_rows:
        cuda.CHUNK_REG_ROWS = tuple(map(int, args.chunk_reg_rows.split(",")))
    if args.chunk_max_ct:
        cuda.CHUNK_MAX_CT = args.chunk_max_ct
    if args.chunk_min_cols:
        cuda.CHUNK_MIN_COLS = args.chunk_min_cols
    if args.stream_max_blocks is not None:
        cuda.STREAM_MAX_BLOCKS = args.stream_max_blocks
    if args.stream_max_rows:
        cuda.STREAM_MAX_ROWS = args.stream_max_rows
    if args.stream_short_head is not None:
        cuda.STREAM_SHORT_HEAD = bool(args.stream_short_head)
    if args.stream_buffers:
        cuda.STREAM_BUFFERS = args.stream_buffers


def patch_scan_source(defines, kernel=None):
    """Compile the scan from `kernel` (a .cu file; default kernels/sqrll.cu) with `defines`
    ("NAME=VALUE" macros) put in front of it."""
    source = cuda._source
    text = "".join(f"#define {d.replace('=', ' ', 1)}\n" for d in defines)
    kernel = str(Path(kernel).resolve()) if kernel else "sqrll.cu"  # absolute: not under kernels/

    def patched(name="sqrll.cu"):
        return text + source(kernel) if name == "sqrll.cu" else source(name)

    cuda._source = patched


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES], help="B,T,C")
    ap.add_argument("--impls", nargs="+", default=None, help="only these rows, e.g. sqrllm baseline")
    ap.add_argument("--accel-cuda", action="store_true", help="also accelerated-scan's CUDA variant")
    add_plan_args(ap)
    ap.add_argument("--define", nargs="+", default=[], metavar="NAME=VALUE",
                    help="macros put in front of kernels/sqrll.cu, e.g. POLL=8 (default: the .cu's)")
    ap.add_argument("--kernel", metavar="FILE",
                    help="compile the scan from FILE instead of kernels/sqrll.cu (two versions in one run)")
    add_graph_arg(ap)
    ap.add_argument("--out", help="also write the table to this markdown file, row by row")
    ap.add_argument("--append", action="store_true", help="add rows to --out without a new header")
    ap.add_argument("--isolate", action="store_true",
                    help="each (shape, dtype) in its own process: a crashing implementation costs only its rows")
    args = ap.parse_args()
    if args.isolate:
        isolated(args)
        return
    apply_plan_args(args)
    if args.define or args.kernel:
        patch_scan_source(args.define, args.kernel)

    device = torch.cuda.get_device_name()
    copy = copy_bandwidth()
    tiny = torch.randn(1, 16, 64, device="cuda", requires_grad=True)
    floor = call_us(lambda: torch.autograd.grad((tiny * tiny).sum(), tiny), 0.001)
    lines = [
        f"Device: {device}; device-to-device copy: {copy:.0f} GB/s (read + write). "
        f"sqrllm tiles: forward (L, blocks/SM) = {cuda.FWD_TILE}, backward = {cuda.BWD_TILE}, "
        f"loop mode's {cuda.LOOP_FWD_TILE} and {cuda.LOOP_BWD_TILE}; "
        f"loop mode from a fill of {cuda.LOOP_MIN_FILL}; "
        f"tree radix {2 ** cuda.TREE_LOG2}; chunk-mode register rows {cuda.CHUNK_REG_ROWS}, "
        f"at most {cuda.CHUNK_MAX_CT} threads across features, fewer to make {cuda.CHUNK_MIN_COLS} columns; "
        f"stream mode up to {cuda.STREAM_MAX_BLOCKS} blocks a column, "
        f"tiles of up to {cuda.STREAM_MAX_ROWS} rows a thread in {cuda.STREAM_BUFFERS} buffers, "
        f"{'the first round short' if cuda.STREAM_SHORT_HEAD else 'T split evenly'}; "
        f"macros: {' '.join(args.define) or 'the .cu defaults'}; "
        f"scan source: {args.kernel or 'kernels/sqrll.cu'}. "
        f"Timed graphs: {f'calls for about {args.graph_ms} ms a replay' if args.graph_ms > 0 else 'one call a copy'}. "
        f"Host floor here: {floor:.0f} us for the autograd forward+backward of a tiny x * x.",
        "",
        "| shape (B, T, C) | dtype | impl | fwd ms | fwd GB/s | fwd % copy | fwd+bwd ms | fwd+bwd GB/s "
        "| fwd+bwd % copy | call us |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out = open(args.out, "a" if args.append else "w") if args.out else None

    def emit(text):
        print(text, flush=True)
        if out:
            out.write(text + "\n")
            out.flush()

    if args.append:  # rows only: the header is in the file already
        print("\n".join(lines), flush=True)
    else:
        emit("\n".join(lines))
    impls = implementations(args.accel_cuda)
    for shape in args.shapes:
        B, T, C = map(int, shape.split(","))
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            x = torch.randn(B, T, C, device="cuda").to(dtype)
            r = torch.rand(B, T, C, device="cuda").mul_(0.3).add_(0.7).to(dtype)
            dy = torch.randn(B, T, C, device="cuda").to(dtype)
            nbytes = B * T * C * x.element_size()
            for name, make in impls.items():
                if args.impls and name not in args.impls:
                    continue
                if name == "accel-cuda" and T & (T - 1):
                    continue  # power-of-two T only
                try:
                    ms_f = gpu_ms(lambda *a: make(*a)[0], (x, r, dy), 3 * nbytes, args.graph_ms)
                    ms_fb = gpu_ms(lambda *a: make(*a)[1], (x, r, dy), 8 * nbytes, args.graph_ms)
                except RuntimeError as e:  # a call that cannot be captured: time it eagerly instead
                    if "illegal memory access" in str(e):  # the CUDA context is lost: nothing more runs here
                        raise
                    print(f"# {name}: no CUDA graph ({e}); eager do_bench instead")
                    fwd, fwd_bwd = make(x, r, dy)
                    ms_f = do_bench(fwd, warmup=25, rep=100, return_mode="median")
                    ms_fb = do_bench(fwd_bwd, warmup=25, rep=100, return_mode="median")
                fwd_bwd = make(x, r, dy)[1]
                gbs_f, gbs_fb = 3 * nbytes / ms_f / 1e6, 8 * nbytes / ms_fb / 1e6
                line = (
                    f"| ({B}, {T}, {C}) | {dname} | {name} | {ms_f:.3f} | {gbs_f:.0f} | {100 * gbs_f / copy:.1f} "
                    f"| {ms_fb:.3f} | {gbs_fb:.0f} | {100 * gbs_fb / copy:.1f} | {call_us(fwd_bwd, ms_fb):.0f} |"
                )
                emit(line)
            del x, r, dy
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
