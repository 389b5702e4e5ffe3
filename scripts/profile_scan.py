r"""A few calls of the sqrll CUDA scan at one shape, for a profiler to pick a kernel launch from.

    ncu -k regex:sqrll_fwd --launch-skip 2 --launch-count 1 --set full \
        python3 scripts/profile_scan.py 1,131072,256 bf16 [--bwd]

Each call runs on fresh inputs (so no launch finds them in L2 from the one before); `--bwd` adds the
backward (the kernels named sqrll_bwd_*).
"""

import argparse
import os
import sys

import torch

from sqrllm.scan import scan

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernel import DTYPES  # noqa: E402  (the benchmark's dtype names)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help="B,T,C")
    ap.add_argument("dtype", choices=list(DTYPES))
    ap.add_argument("--bwd", action="store_true", help="also run the backward")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    B, T, C = map(int, args.shape.split(","))
    dtype = DTYPES[args.dtype]
    for _ in range(args.calls):
        x = torch.randn(B, T, C, device="cuda", dtype=dtype, requires_grad=args.bwd)
        r = torch.rand(B, T, C, device="cuda", dtype=dtype, requires_grad=args.bwd)
        y = scan(x, r)
        if args.bwd:
            torch.autograd.grad(y, (x, r), torch.randn_like(y))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
