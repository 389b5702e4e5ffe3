"""Where a training step's GPU time goes: the race config's forward and backward, replayed from a
CUDA graph as train.py replays it, then gradient clipping and the optimizer step, under torch.profiler;
prints the kernels by total GPU time and the step's wall ms. Not in it: what train.py adds to a step
besides, the weight average's update (ema_decay) and the non-finite guard's read of two flags
(max_bad_steps), so its ms a step is a lower bound on train.py's.

    python scripts/profile_train_step.py [configs/shakespeare_char.py] [--key=value ...] [--steps 20]

Needs a CUDA device and the config's dataset prepared.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sqrllm.config import load_config
from sqrllm.data import RandomBatches
from sqrllm.model import SqrLLM
from sqrllm.step_graph import GraphedStep
from sqrllm.trainer import autocast, load_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="steps profiled, after 10 unprofiled")
    ap.add_argument("--rows", type=int, default=30, help="kernels listed")
    args, rest = ap.parse_known_args()
    cfg = load_config(rest or ["configs/shakespeare_char.py"])
    meta, train_tokens, _ = load_dataset(cfg)
    model = SqrLLM.from_config(cfg, meta["vocab_size"]).cuda()
    opt = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cuda")
    step = GraphedStep(model, lambda: autocast("cuda", torch.bfloat16, cache=False), lambda loss: loss, False)
    batches = RandomBatches(train_tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed)

    def one():
        x, y, _ = batches.next()
        step(x.cuda(non_blocking=True), y.cuda(non_blocking=True), None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)

    for _ in range(10):
        one()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        one()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            one()
        torch.cuda.synchronize()
    print(f"{model.num_params() / 1e6:.2f}M parameters, batch {cfg.batch_size} x {cfg.block_size}: "
          f"{ms:.2f} ms a step unprofiled ({cfg.batch_size * cfg.block_size / ms * 1e3:,.0f} tokens/s)")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
