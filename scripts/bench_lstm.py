"""QRNN vs cuDNN LSTM in the QRNN paper's Figure 4 setting: one layer of 320 units, float32.

    python scripts/bench_lstm.py [--batch 8 16 ...] [--length 32 64 ...] [--tf32] [--graphs] [--markdown FILE]

For every (batch, length) cell both layers run on the same (T, B, 320) input in the same process:
inference (forward under torch.no_grad) and training (forward + backward of the output, weight
gradients accumulating as in a training step). Both run eagerly: no torch.compile, no CUDA graphs;
with --graphs both are captured instead, each call (forward, or forward + backward with the gradient
accumulation) one CUDA graph per cell, so that neither pays host-side dispatch per operation.
Times are CUDA-event medians over repeats of back-to-back calls, after warm-up. Matrix products use
strict float32 in both unless --tf32 (then both, cuDNN and cuBLAS, may use TF32).
Prints speedup = LSTM time / QRNN time, both times, and the scan op alone on the same shape.
"""

import argparse
import math
import statistics
import sys

import torch
from torch import nn

from sqrllm.qrnn import QRNN
from sqrllm.scan import scan


def time_ms(fn, repeats, min_ms=2.0):
    """Median ms per call of fn(); each repeat times enough back-to-back calls to last min_ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, math.ceil(min_ms / max(start.elapsed_time(end), 1e-3)))
    for _ in range(2 * inner):
        fn()
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def graphed(fn):
    """fn() captured as one CUDA graph (after warm-up on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def calls(x, gy):
    """{mode: make}, make(layer) -> a no-argument call of the layer on x: 'inference' (forward under
    no_grad) and 'training' (forward, then backward of the output with gradient gy)."""

    def infer(m):
        def fn():
            with torch.no_grad():
                m(x)
        return fn

    def train(m):
        def fn():
            out, _ = m(x)
            out.backward(gy)
        return fn

    return {"inference": infer, "training": train}


def bench_cell(qrnn, lstm, B, T, repeats, graphs=False):
    """{'inference': (qrnn ms, lstm ms), 'training': (...), 'scan': ms} for one (B, T)."""
    H = qrnn.hidden_size
    # the input takes a gradient, as in a model whose inputs are learned: cuDNN's LSTM computes it
    # whether asked or not, and the QRNN would otherwise skip its input-gradient matrix multiply
    x = torch.randn(T, B, qrnn.input_size, device="cuda", requires_grad=True)
    gy = torch.randn(T, B, H, device="cuda")
    res = {}
    wrap = graphed if graphs else (lambda fn: fn)
    for mode, make in calls(x, gy).items():
        lstm_ms = time_ms(wrap(make(lstm)), repeats)
        qrnn_ms = time_ms(wrap(make(qrnn)), repeats)
        res[mode] = (qrnn_ms, lstm_ms)
    xs, r = torch.randn(1, T, B * H, device="cuda"), torch.rand(1, T, B * H, device="cuda")
    res["scan"] = time_ms(lambda: scan(xs, r), repeats)
    return res


def tables(results, batches, lengths):
    """Markdown lines: per mode a speedup grid and a 'QRNN / LSTM ms' grid; then the scan op alone."""
    head = "| batch \\ length | " + " | ".join(str(t) for t in lengths) + " |"
    rule = "|---:|" + "---:|" * len(lengths)
    lines = []
    for mode in ("inference", "training"):
        what = "forward, no_grad" if mode == "inference" else "forward + backward"
        lines += ["", f"**{mode.capitalize()}** ({what}): speedup of QRNN over cuDNN LSTM", "", head, rule]
        for b in batches:
            cells = [results[b, t][mode][1] / results[b, t][mode][0] for t in lengths]
            lines.append(f"| {b} | " + " | ".join(f"{s:.1f}x" for s in cells) + " |")
        lines += ["", f"{mode.capitalize()} times, ms per call, QRNN / LSTM", "", head, rule]
        for b in batches:
            cells = [results[b, t][mode] for t in lengths]
            lines.append(f"| {b} | " + " | ".join(f"{q:.3f} / {l:.3f}" for q, l in cells) + " |")
    lines += ["", "The scan op alone (forward, on the layer's (1, T, B * hidden); what the general path runs), ms per call", "", head, rule]
    for b in batches:
        lines.append(f"| {b} | " + " | ".join(f"{results[b, t]['scan']:.3f}" for t in lengths) + " |")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--length", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--hidden", type=int, default=320, help="hidden units, also the input size")
    p.add_argument("--window", type=int, default=1, help="QRNN convolution width")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tf32", action="store_true", help="let both use TF32 for float32 matrix products")
    p.add_argument("--qrnn-min-threads", type=int,
                   help="sqrllm.cuda_layers.QRNN_MIN_THREADS: split walks over time while fewer threads (0: never)")
    p.add_argument("--graphs", action="store_true", help="capture each call of both layers as a CUDA graph")
    p.add_argument("--markdown", help="also write the tables to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lstm: needs a CUDA device (it compares against cuDNN)")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = False
    try:
        import sqrllm.cuda_layers

        if args.qrnn_min_threads is not None:
            sqrllm.cuda_layers.QRNN_MIN_THREADS = args.qrnn_min_threads
        backend = f"CUDA kernel, walks split while under {sqrllm.cuda_layers.QRNN_MIN_THREADS} threads"
    except ImportError as e:
        backend = f"pure-PyTorch loop ({e})"

    torch.manual_seed(0)
    H = args.hidden
    qrnn = QRNN(H, H, window=args.window).cuda()
    lstm = nn.LSTM(H, H).cuda()
    header = [
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}; scan: {backend}.",
        f"One layer, input {H}, hidden {H}, float32 ({'TF32 allowed' if args.tf32 else 'strict, no TF32'} "
        f"for both), time-major input; QRNN window {args.window} with output gate; "
        f"{'both captured as CUDA graphs, one per call' if args.graphs else 'both eager'}. "
        f"CUDA-event medians of {args.repeats} repeats.",
    ]
    print("\n".join(header), flush=True)
    # the fixed cost of a call (host dispatch and launches), on the smallest shape
    x1, xs1 = torch.randn(1, 1, H, device="cuda"), torch.randn(1, 1, H, device="cuda")
    with torch.no_grad():
        fixed = [time_ms(lambda: m(x1), args.repeats) * 1e3 for m in (qrnn, lstm)]
        fixed.append(time_ms(lambda: scan(xs1, xs1), args.repeats) * 1e3)
    header.append(f"Fixed cost per call (T = B = 1, no_grad): QRNN {fixed[0]:.0f} us (fused on CUDA; the general "
                  f"path's scan op alone: {fixed[2]:.0f} us); LSTM {fixed[1]:.0f} us.")
    print(header[-1], flush=True)
    results = {}
    for b in args.batch:
        for t in args.length:
            results[b, t] = r = bench_cell(qrnn, lstm, b, t, args.repeats, args.graphs)
            print(
                f"B={b:4d} T={t:4d}  inference {r['inference'][0]:.3f} / {r['inference'][1]:.3f} ms "
                f"({r['inference'][1] / r['inference'][0]:.1f}x)  training {r['training'][0]:.3f} / "
                f"{r['training'][1]:.3f} ms ({r['training'][1] / r['training'][0]:.1f}x)  "
                f"scan {r['scan']:.3f} ms",
                flush=True,
            )
    lines = header + tables(results, args.batch, args.length)
    speedups = {m: {k: v[m][1] / v[m][0] for k, v in results.items()} for m in ("inference", "training")}
    lines.append("")
    for m, s in speedups.items():
        worst = min(s, key=s.get)
        lines.append(f"{m}: lowest speedup {s[worst]:.1f}x at batch {worst[0]}, length {worst[1]}; "
                     f">= 5x in {sum(v >= 5 for v in s.values())} of {len(s)} cells"
                     + (f"; batch 8, length 512: {s[8, 512]:.1f}x" if (8, 512) in s else ""))
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
