"""Generation speed at batch 1: tokens/s early (tokens 100-600) and far out (10,000-10,500).

    python scripts/bench_sample.py                 # CPU, and the GPU if there is one
    python scripts/bench_sample.py --steps fast --far 2000

A recurrent model's step costs the same at every position, so the two columns should agree. The
model is the 10M-parameter shape (8 sqrll layers, width 384, a gated MLP of 1024 after every second
layer, 65-token vocabulary), randomly initialised: speed does not depend on the weights. Each token
is drawn (temperature 0.8, all tokens) and brought to the host, as sample.py does to print it.

The GPT baseline (configs/shakespeare_char_gpt.py's shape, 10.7M parameters, randomly initialised)
generates as nanoGPT's sample.py does: each token runs the model over the last 256 tokens (its
block size) and draws from the last position's logits, the same way. Past token 256 every GPT step
costs the same, so on the CPU (about 10 tokens/s) only its first window is timed.

"median far/near" compares the median time per token in the two windows, which a brief burst of
other work on the machine does not move. "other load" is the CPU time other processes used while
a row ran, in cores (from /proc/stat): a row taken with more than ~0.05 of it shared the machine.
"""

import argparse
import os
import time

import torch

from sqrllm.config import load_config
from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM
from sqrllm.sampling import Sampler, SamplingParams, pick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    sampler.feed(prompt.tolist())  # warm up the prefill path: the kernels of every chunk length it runs
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

    return rates(windows[near], width), rates(windows[far], width), prefill


def rates(times, width):
    """(tokens/s over the window, 1 / median time per token)."""
    gaps = torch.tensor(times, dtype=torch.float64).diff()  # float32 cannot tell apart times hours after boot
    return width / (times[-1] - times[0]), 1 / gaps.median().item()


@torch.inference_mode()
def measure_gpt(model, near, far, width):
    """As `measure`, for a GPT generating nanoGPT's way (the context cropped to its block size);
    far=None times the near window only."""
    device = next(model.parameters()).device
    idx = torch.randint(0, model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    params = SamplingParams(temperature=0.8)
    windows = {near: []} | ({far: []} if far is not None else {})
    for i in range(1, max(windows) + width + 1):
        logits = model(idx[:, -model.block_size :], last_only=True)[0][:, -1]
        ids = pick(logits, params, generator)
        idx = torch.cat([idx[:, -model.block_size :], ids[:, None]], dim=1)
        ids.tolist()
        for start, times in windows.items():
            if start <= i <= start + width:
                times.append(time.perf_counter())
    return rates(windows[near], width), rates(windows[far], width) if far is not None else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="auto", help="comma-separated, e.g. cpu,cuda; auto = cpu and cuda if present")
    ap.add_argument("--steps", default="plain,fast,native,native_bf16,graph",
                    help="decode steps to time (native, native_bf16: CPU only; graph: CUDA only)")
    ap.add_argument("--near", type=int, default=100, help="first window starts after this many tokens")
    ap.add_argument("--far", type=int, default=10000, help="second window starts after this many tokens")
    ap.add_argument("--width", type=int, default=500, help="tokens per window")
    ap.add_argument("--prompt_len", type=int, default=4096, help="prompt tokens for the prefill column")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    ap.add_argument("--gpt", type=int, default=1, help="1: also time the GPT baseline; 0: skip it")
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
    head = (f"{'device':<8}{'step':<13}{'tok/s ' + near_head:>18}{'tok/s ' + far_head:>20}{'far/near':>10}"
            f"{'median far/near':>17}{f'prefill tok/s ({args.prompt_len})':>24}{'other load':>12}")
    print(head)
    print("-" * len(head))
    for device in devices:
        model.to(device)
        for step in args.steps.split(","):
            if (step.startswith("native") and device != "cpu") or (step == "graph" and device == "cpu"):
                continue
            (all0, ours0), t0 = cpu_seconds(), time.perf_counter()
            near, far, prefill = measure(model, step, args.near, args.far, args.width, args.prompt_len)
            (all1, ours1), t1 = cpu_seconds(), time.perf_counter()
            others = ((all1 - all0) - (ours1 - ours0)) / (t1 - t0)  # cores' worth used by other processes
            print(f"{device:<8}{step:<13}{near[0]:>18,.0f}{far[0]:>20,.0f}{far[0] / near[0]:>10.3f}"
                  f"{far[1] / near[1]:>17.3f}{prefill:>24,.0f}{others:>12.2f}", flush=True)
        if args.gpt:
            torch.manual_seed(0)
            cfg = load_config([os.path.join(ROOT, "configs", "shakespeare_char_gpt.py")])
            gpt = GPT.from_config(cfg, 65).eval().to(device)
            (all0, ours0), t0 = cpu_seconds(), time.perf_counter()
            near, far = measure_gpt(gpt, args.near, args.far if device != "cpu" else None, args.width)
            (all1, ours1), t1 = cpu_seconds(), time.perf_counter()
            others = ((all1 - all0) - (ours1 - ours0)) / (t1 - t0)
            far_cols = (f"{far[0]:>20,.0f}{far[0] / near[0]:>10.3f}{far[1] / near[1]:>17.3f}" if far
                        else f"{'-':>20}{'-':>10}{'-':>17}")
            print(f"{device:<8}{'GPT':<13}{near[0]:>18,.0f}{far_cols}{'-':>24}{others:>12.2f}", flush=True)
    if args.gpt:
        print(f"GPT: {gpt.num_params() / 1e6:.2f}M parameters (configs/shakespeare_char_gpt.py), context cropped "
              f"to its block size of {gpt.block_size} tokens, as nanoGPT samples")


if __name__ == "__main__":
    main()
