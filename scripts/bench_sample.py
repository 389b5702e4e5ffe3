"""Generation speed at batch 1: tokens/s early (tokens 100-600) and far out (10,000-10,500).

    python scripts/bench_sample.py                 # CPU, and the GPU if there is one
    python scripts/bench_sample.py --steps fast --far 2000

A recurrent model's step costs the same at every position, so the two columns should agree. The
model is the 10M-parameter shape (8 sqrll layers, width 384, a gated MLP of 1024 after every second
layer, 65-token vocabulary), randomly initialised: speed does not depend on the weights. Each token
is drawn (temperature 0.8, all tokens) and brought to the host, as sample.py does to print it.

"median far/near" compares the median time per token in the two windows, which a brief burst of
other work on the machine does not move. "other load" is the CPU time other processes used while
a row ran, in cores (from /proc/stat): a row taken with more than ~0.05 of it shared the machine.
"""

import argparse
import os
import time

import torch

from sqrllm.model import SqrLLM
from sqrllm.sampling import Sampler, SamplingParams


def cpu_seconds():
    """(CPU seconds used by the whole machine, by this process) so far; (0, 0) where /proc is missing."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq + steal) / tick, (utime + stime) / tick


def measure(model, step, near, far, width, prompt_len):
    """-> (tokens/s over [near, near + width) and over [far, far + width), each as (throughput,
    1 / median time per token), and prefill tokens/s)."""
    sampler = Sampler(model, step=step)
    prompt = torch.randint(0, model.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0))
    sampler.feed(prompt[:16].tolist())  # warm up the prefill path
    sampler.reset()
    sampler.stats.prefill_tokens = sampler.stats.prefill_seconds = 0
    sampler.feed(prompt.tolist())
    prefill = sampler.stats.prefill_tokens / sampler.stats.prefill_seconds
    generator = torch.Generator(device=sampler.device).manual_seed(0)
    windows = {near: [], far: []}  # start -> times at the end of tokens start .. start + width
    for i, ids in enumerate(sampler.tokens(far + width, SamplingParams(temperature=0.8), generator=generator), 1):
        ids.tolist()
        for start, times in windows.items():
            if start <= i <= start + width:
                times.append(time.perf_counter())

    def rates(times):
        gaps = torch.tensor(times).diff()
        return width / (times[-1] - times[0]), 1 / gaps.median().item()
    return rates(windows[near]), rates(windows[far]), prefill


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="auto", help="comma-separated, e.g. cpu,cuda; auto = cpu and cuda if present")
    ap.add_argument("--steps", default="plain,fast,native,graph",
                    help="decode steps to time (native: CPU only; graph: CUDA only)")
    ap.add_argument("--near", type=int, default=100, help="first window starts after this many tokens")
    ap.add_argument("--far", type=int, default=10000, help="second window starts after this many tokens")
    ap.add_argument("--width", type=int, default=500, help="tokens per window")
    ap.add_argument("--prompt_len", type=int, default=4096, help="prompt tokens for the prefill column")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    ap.add_argument("--n_ffn", type=int, default=1024)
    ap.add_argument("--mlp_every", type=int, default=2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices != "auto" else ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                                                                 else [])
    torch.manual_seed(0)
    model = SqrLLM(65, n_layer=8, n_embd=384, n_ffn=args.n_ffn, mlp_every=args.mlp_every).eval()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, 8 sqrll layers, width 384, n_ffn {args.n_ffn}, "
          f"mlp_every {args.mlp_every}; batch 1; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    near_head, far_head = f"{args.near}-{args.near + args.width}", f"{args.far}-{args.far + args.width}"
    head = (f"{'device':<8}{'step':<8}{'tok/s ' + near_head:>18}{'tok/s ' + far_head:>20}{'far/near':>10}"
            f"{'median far/near':>17}{f'prefill tok/s ({args.prompt_len})':>24}{'other load':>12}")
    print(head)
    print("-" * len(head))
    for device in devices:
        model.to(device)
        for step in args.steps.split(","):
            if (step == "native" and device != "cpu") or (step == "graph" and device == "cpu"):
                continue
            (all0, ours0), t0 = cpu_seconds(), time.perf_counter()
            near, far, prefill = measure(model, step, args.near, args.far, args.width, args.prompt_len)
            (all1, ours1), t1 = cpu_seconds(), time.perf_counter()
            others = ((all1 - all0) - (ours1 - ours0)) / (t1 - t0)  # cores' worth used by other processes
            print(f"{device:<8}{step:<8}{near[0]:>18,.0f}{far[0]:>20,.0f}{far[0] / near[0]:>10.3f}"
                  f"{far[1] / near[1]:>17.3f}{prefill:>24,.0f}{others:>12.2f}", flush=True)
    print("GPT baseline: none in this repository yet (the GPU-training issue adds it); not compared.")


if __name__ == "__main__":
    main()
