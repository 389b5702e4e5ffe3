"""Compile-time variants of the QRNN kernels (kernels/qrnn.cu) side by side, on a CUDA machine.

    python scripts/qrnn_variants.py [--cell 8x512 256x64 ...] [--variant NAME:KEY=VALUE,...] [--profile] [--gemm]

For each (batch x length) cell of scripts/bench_lstm.py's setting (one layer of 320 units, float32,
strict), times the QRNN's inference and training calls as CUDA graphs under every variant, beside
cuDNN's LSTM timed in the same run, and prints how far each variant's outputs and input gradient
are from the default's. A variant sets .cu macros (QNT, QMAX_SEG, QSEG_U, QU, QU_BWD), sqrllm.cuda_layers's
min_threads / seg_steps, QRNN.FOLD_BIAS (fold_bias=0: cuBLAS adds the bias) and QRNN.SIDE_WGRAD
(side_wgrad=1: the weight gradient on a side stream beside the input gradient), e.g.
`seg8:QMAX_SEG=8,QSEG_U=16`. --profile prints, per cell, the GPU
kernels of one eager call of each mode under torch.profiler, microseconds each. --gemm times the
layer's input projection alone: with the weight as stored (F.linear: x @ W^T), held transposed, and
without the bias.
"""

import argparse
import functools
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lstm import calls, graphed, time_ms  # noqa: E402

from sqrllm import cuda, cuda_layers  # noqa: E402
from sqrllm.qrnn import QRNN  # noqa: E402

DEFAULTS = {"QNT": cuda_layers.QRNN_THREADS, "QMAX_SEG": cuda_layers.QRNN_MAX_SEG,
            "min_threads": cuda_layers.QRNN_MIN_THREADS, "seg_steps": cuda_layers.QRNN_SEG_STEPS,
            "fold_bias": int(QRNN.FOLD_BIAS), "side_wgrad": int(QRNN.SIDE_WGRAD)}


def apply(settings):
    """Point sqrllm.cuda_layers at the kernels compiled with these settings' macros."""
    import cupy

    macros = {k: v for k, v in settings.items() if k.isupper()}
    options = ("-std=c++17", *(f"-D{k}={v}" for k, v in macros.items()))

    @functools.cache
    def compiled(name, device):
        with cuda._on(device):
            return cupy.RawModule(code=cuda._source("qrnn.cu"), options=options).get_function(name)

    cuda_layers._qrnn_function = compiled
    cuda_layers.QRNN_THREADS = int(macros.get("QNT", DEFAULTS["QNT"]))
    cuda_layers.QRNN_MAX_SEG = int(macros.get("QMAX_SEG", DEFAULTS["QMAX_SEG"]))
    cuda_layers.QRNN_MIN_THREADS = int(settings.get("min_threads", DEFAULTS["min_threads"]))
    cuda_layers.QRNN_SEG_STEPS = int(settings.get("seg_steps", DEFAULTS["seg_steps"]))
    QRNN.FOLD_BIAS = bool(int(settings.get("fold_bias", DEFAULTS["fold_bias"])))
    QRNN.SIDE_WGRAD = bool(int(settings.get("side_wgrad", DEFAULTS["side_wgrad"])))


def parse_variant(text):
    name, _, spec = text.partition(":")
    return name, dict(kv.split("=") for kv in spec.split(",") if kv)


def run_once(m, x, gy):
    """The training call's output and input gradient, then the inference call's output and state."""
    xr = x.detach().requires_grad_()
    out, _ = m(xr)
    out.backward(gy)
    with torch.no_grad():
        y, h = m(x)
    return out.detach(), xr.grad, y, h


def profile(m, x, gy, n=20):
    """Print the GPU kernels of one eager call of each mode, microseconds each, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile as prof

    for mode, make in calls(x, gy).items():
        fn = make(m)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
        rows = {}
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                rows.setdefault(e.name, []).append(e.device_time)
        total = sum(sum(v) for v in rows.values()) / n
        print(f"  kernels of one eager {mode} call: {total:.1f} us on the GPU")
        for name, ts in sorted(rows.items(), key=lambda kv: -sum(kv[1])):
            print(f"    {sum(ts) / n:8.1f} us  x{len(ts) / n:.0f}  {name[:110]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cell", nargs="+", default=["8x512", "256x64"], help="BATCHxLENGTH")
    p.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,...")
    p.add_argument("--hidden", type=int, default=320)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--gemm", action="store_true")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    H = args.hidden
    variants = [("default", {})] + [parse_variant(v) for v in args.variant]
    torch.manual_seed(0)
    qrnn, lstm = QRNN(H, H).cuda(), nn.LSTM(H, H).cuda()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ms per call as CUDA graphs, strict fp32")
    for cell in args.cell:
        B, T = map(int, cell.split("x"))
        # the input takes a gradient, as in scripts/bench_lstm.py (cuDNN's LSTM computes it regardless)
        x, gy = torch.randn(T, B, H, device="cuda", requires_grad=True), torch.randn(T, B, H, device="cuda")
        modes = calls(x, gy)
        lstm_ms = {mode: time_ms(graphed(make(lstm)), args.repeats) for mode, make in modes.items()}
        print(f"B={B} T={T}: LSTM inference {lstm_ms['inference']:.4f} ms, training {lstm_ms['training']:.4f} ms")
        if args.gemm:
            w, b = qrnn.weight_ih_l0.detach(), qrnn.bias_ih_l0.detach()
            wt = w.t().contiguous().t()  # same values, column-major
            for label, weight, bias in (("W (3H, in) row-major", w, b), ("W column-major", wt, b),
                                        ("no bias", w, None)):
                with torch.no_grad():
                    ms = time_ms(graphed(lambda: torch.nn.functional.linear(x, weight, bias)), args.repeats)
                print(f"  projection, {label}: {ms:.4f} ms")
            qrnn.weight_ih_l0.data = wt
            ms = time_ms(graphed(modes["inference"](qrnn)), args.repeats)
            print(f"  QRNN inference with the weight column-major: {ms:.4f} ms "
                  f"({lstm_ms['inference'] / ms:5.2f}x)")
            qrnn.weight_ih_l0.data = w.clone()
        reference = None
        for name, settings in variants:
            apply(settings)
            got = run_once(qrnn, x, gy)
            reference = reference or got
            err = max((a - b).abs().max().item() for a, b in zip(got, reference))
            segs = cuda_layers.qrnn_segments(B, T, H)
            ms = {mode: time_ms(graphed(make(qrnn)), args.repeats) for mode, make in modes.items()}
            print(f"  {name:>12} ({segs:2d} segs): inference {ms['inference']:.4f} ms "
                  f"({lstm_ms['inference'] / ms['inference']:5.2f}x)  training {ms['training']:.4f} ms "
                  f"({lstm_ms['training'] / ms['training']:5.2f}x)  max |diff| vs default {err:.1e}", flush=True)
            if args.profile:
                profile(qrnn, x, gy)
        apply({})


if __name__ == "__main__":
    main()
