"""The scan on the CPU: the C++ kernel (kernels/scan_cpu.cpp) against the PyTorch loop it replaced,
alone and inside a training step, in one run so that the ratios compare.

    python scripts/bench_cpu_scan.py [--threads 2]

Per shape (B, T, C), float32: ms of the forward and of forward+backward (through torch.autograd.grad)
for each path. Then ms per training step (forward, backward, AdamW) of the model of configs/small.py
and of configs/shakespeare_char_cpu.py on random tokens, each path. Medians over repeats; run it on an
otherwise idle machine (the numbers are wall-clock).
"""

import argparse
import importlib
import statistics
import time

import torch

from sqrllm import cpu
from sqrllm.config import load_config
from sqrllm.model import SqrLLM
from sqrllm.scan import scan

scan_mod = importlib.import_module("sqrllm.scan")
SHAPES = [(16, 128, 128), (16, 64, 256), (64, 256, 384)]
CONFIGS = {"configs/small.py": 256, "configs/shakespeare_char_cpu.py": 65}  # config: its vocabulary


def use(path):
    scan_mod._cpu_backend = cpu if path == "kernel" else False


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def scan_times(B, T, C, repeats):
    x, r = torch.randn(B, T, C, requires_grad=True), torch.rand(B, T, C, requires_grad=True)
    h0, dy = torch.randn(B, C), torch.randn(B, T, C)
    with torch.no_grad():
        fwd = median_ms(lambda: scan(x, r, h0), repeats)
    both = median_ms(lambda: torch.autograd.grad(scan(x, r, h0), (x, r), dy), repeats)
    return fwd, both


def step_ms(config, vocab, repeats):
    cfg = load_config([config])
    torch.manual_seed(0)
    model = SqrLLM.from_config(cfg, vocab)
    opt = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu")
    idx = torch.randint(0, vocab, (cfg.batch_size, cfg.block_size + 1))

    def step():
        _, loss, _ = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()

    return median_ms(step, repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch (and kernel) threads")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ok, why = cpu.available("scan_cpu")
    if not ok:
        raise SystemExit(f"the C++ scan kernel cannot be built here: {why}")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| shape (B, T, C) | loop fwd ms | kernel fwd ms | loop fwd+bwd ms | kernel fwd+bwd ms | fwd+bwd speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        got = {}
        for path in ("loop", "kernel"):
            use(path)
            got[path] = scan_times(*shape, args.repeats)
        (lf, lb), (kf, kb) = got["loop"], got["kernel"]
        print(f"| {shape} | {lf:.3f} | {kf:.3f} | {lb:.3f} | {kb:.3f} | {lb / kb:.1f}x |")
    print("\n| training step of | loop ms | kernel ms | speed-up |")
    print("|---|---:|---:|---:|")
    for config, vocab in CONFIGS.items():
        got = {}
        for path in ("loop", "kernel"):
            use(path)
            got[path] = step_ms(config, vocab, max(5, args.repeats // 3))
        print(f"| `{config}` | {got['loop']:.1f} | {got['kernel']:.1f} | {got['loop'] / got['kernel']:.2f}x |")
    use("kernel")


if __name__ == "__main__":
    main()
