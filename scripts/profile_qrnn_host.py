"""Where a QRNN training call's time goes on the host, on a CUDA machine.

    python scripts/profile_qrnn_host.py [--batch 8] [--length 32] [--hidden 320]

Prints the wall time per call (back-to-back calls, one synchronize at the end) of each piece of a
training call at one small shape, where the host, not the GPU, sets the pace; then the functions
with the most own time in a cProfile of the whole call.
"""

import argparse
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from sqrllm import cuda_layers
from sqrllm.qrnn import QRNN, _FusedPool


def us_per_call(fn, n=400):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--hidden", type=int, default=320)
    args = p.parse_args()
    B, T, H = args.batch, args.length, args.hidden
    torch.manual_seed(0)
    m = QRNN(H, H).cuda()
    lstm = torch.nn.LSTM(H, H).cuda()
    x = torch.randn(T, B, H, device="cuda")
    gy = torch.randn(T, B, H, device="cuda")
    w, b = m.weight_ih_l0, m.bias_ih_l0
    g = F.linear(x, w).detach()  # the fused layer's kernel adds the bias
    gr, br = g.clone().requires_grad_(), b.detach().clone().requires_grad_()
    tiny = torch.randn(1, 16, 64, device="cuda", requires_grad=True)
    h, c_all, c_last = cuda_layers.qrnn_fwd(g, b, None, H, 3, False, 1.0, 0, True)

    def train(mod):
        def fn():
            out, _ = mod(x)
            out.backward(gy)
        return fn

    def fused():
        hh, _ = _FusedPool.apply(gr, br, None, H, 3, False, 1.0, 0)
        hh.backward(gy)

    def linear():
        F.linear(x, w).backward(g)

    pieces = [
        ("autograd of a tiny x * x (the floor)", lambda: torch.autograd.grad((tiny * tiny).sum(), tiny)),
        ("torch.cuda.current_stream()", lambda: torch.cuda.current_stream(0).cuda_stream),
        ("cuda_layers.qrnn_fwd (allocate, launch)", lambda: cuda_layers.qrnn_fwd(g, b, None, H, 3, False, 1.0, 0, True)),
        ("cuda_layers.qrnn_bwd (allocate, launch)",
         lambda: cuda_layers.qrnn_bwd(g, b, c_all, None, gy, None, H, 3, False, 1.0, 0, want_dbias=True)),
        ("_FusedPool forward + backward", fused),
        ("F.linear forward + backward", linear),
        ("QRNN forward, no_grad", lambda: torch.no_grad()(m)(x)),
        ("QRNN forward + backward", train(m)),
        ("nn.LSTM forward + backward", train(lstm)),
    ]
    print(f"{torch.cuda.get_device_name()}, B={B} T={T} H={H}: wall us per call, back-to-back")
    for name, fn in pieces:
        print(f"{us_per_call(fn):9.1f}  {name}", flush=True)

    fn = train(m)
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    print("\ncProfile of 500 QRNN training calls, by own time:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
