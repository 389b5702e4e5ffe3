"""The training loop: config -> data -> model -> steps -> evaluations -> checkpoints.

train.py is a thin wrapper around `train(cfg)`.
"""

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sqrllm import checkpoint, distributed
from sqrllm.config import Config, ConfigError
from sqrllm.data import DataError, RandomBatches, StreamBatches, check_ids, read_meta, read_tokens
from sqrllm.flops import flops_per_token, mfu, peak_flops
from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM
from sqrllm.prepare import prepare_builtin
from sqrllm.tokenizer import from_meta

MODEL_KEYS = ("n_layer", "n_embd", "n_mem", "n_ffn", "mlp_every", "tie_weights", "bias")


def process_start_time():
    """Wall-clock time at which this process was launched (Linux), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def resolve_device(cfg):
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but this torch sees no CUDA device; use --device=cpu")
    dtype = cfg.dtype
    if dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    return device, getattr(torch, dtype)


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def lr_at(cfg, step):
    """Warmup then cosine decay to min_lr; a pure function of the step."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def load_dataset(cfg):
    """-> (meta, train tokens, val tokens), preparing `builtin` on first use."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if cfg.dataset == "builtin" and not (folder / "meta.json").is_file():
        tqdm.write(f"preparing the builtin dataset in {folder} (Python's standard library source, once)")
        prepare_builtin(folder)
    if not (folder / "meta.json").is_file():
        script = Path(cfg.data_dir) / cfg.dataset / "prepare.py"
        how = (f"python {script}" if script.is_file()
               else f"python data/text/prepare.py --input YOUR_FILES --name {cfg.dataset}")
        raise DataError(f"dataset '{cfg.dataset}' not found in {folder}; prepare it first: {how}")
    meta = read_meta(folder)
    train, val = read_tokens(folder / "train.bin"), read_tokens(folder / "val.bin")
    for name, tokens in (("train.bin", train), ("val.bin", val)):
        check_ids(tokens, meta["vocab_size"], folder / name)
    return meta, train, val


@torch.no_grad()
def evaluate(model, tokens, cfg, device, dtype, stream):
    """Mean loss (nats/token) over the val tokens (or the first eval_max_tokens of them).

    stream=False: windows of block_size, memory reset at each (the context a GPT of that block sees).
    stream=True: eval_batch_size contiguous streams, memory carried through each.
    """
    n = len(tokens) if cfg.eval_max_tokens <= 0 else min(len(tokens), cfg.eval_max_tokens + 1)
    T, B = cfg.block_size, cfg.eval_batch_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0

    def run(x, y, state):
        x = torch.from_numpy(x.astype(np.int64)).to(device)
        y = torch.from_numpy(y.astype(np.int64)).to(device)
        with autocast(device, dtype):
            _, loss, state = model(x, y, state)
        return loss.item() * y.numel(), y.numel(), state

    if stream:
        B = min(B, max(1, (n - 1) // T))
        length = (n - 1) // B
        rows = np.arange(B)[:, None] * length
        state = None
        for lo in range(0, length, T):
            hi = min(lo + T, length)
            idx = rows + np.arange(lo, hi + 1)
            loss, k, state = run(tokens[idx[:, :-1]], tokens[idx[:, 1:]], state)
            total, count = total + loss, count + k
    else:
        n_win = (n - 1) // T
        for lo in range(0, n_win, B):
            idx = (np.arange(lo, min(lo + B, n_win)) * T)[:, None] + np.arange(T + 1)
            loss, k, _ = run(tokens[idx[:, :-1]], tokens[idx[:, 1:]], None)
            total, count = total + loss, count + k
        rest = n - 1 - n_win * T
        if rest > 0:
            idx = np.arange(n_win * T, n)[None]
            loss, k, _ = run(tokens[idx[:, :-1]], tokens[idx[:, 1:]], None)
            total, count = total + loss, count + k
    model.train(was_training)
    return total / count


def bits_per_byte(loss, meta, split="val"):
    s = meta["splits"][split]
    return loss / math.log(2) * s["tokens"] / s["bytes"]


class Metrics:
    """Appends one JSON object per line to out_dir/metrics.jsonl; with path None (ranks other than 0)
    it writes nothing."""

    def __init__(self, path):
        self.path = path and Path(path)

    def log(self, **row):
        if not self.path:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def perf_text(row):
    """The speed part of a console line, from a metrics row."""
    parts = [f"{row['tok_per_s']:,.0f} tok/s"]
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("mem_gib") is not None:
        parts.append(f"peak mem {row['mem_gib']:.2f} GiB")
    parts.append(f"grad norm {row['grad_norm']:.3f}")
    return ", ".join(parts)


def check_resume(cfg, ckpt, path):
    saved = ckpt["config"]
    diff = [f"{k}: {saved.get(k)} -> {getattr(cfg, k)}" for k in MODEL_KEYS if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"cannot resume {path}: the model shape differs from the checkpoint's ({'; '.join(diff)}); "
                          "keep these keys as they were, or start a new out_dir")
    if saved["batch_size"] != cfg.batch_size and cfg.batching == "stream":
        raise ConfigError(f"cannot resume {path}: batch_size was {saved['batch_size']}, now {cfg.batch_size}; "
                          "the data streams depend on it, so keep it")


def train(cfg: Config, launched=None):
    """Train as `cfg` says; returns a dict with the final step, losses and the checkpoint path."""
    launched = launched or process_start_time()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device, dtype = resolve_device(cfg)
    dd, device = distributed.setup(device)  # one process per GPU under torchrun; a no-op otherwise
    meta, train_tokens, val_tokens = load_dataset(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"

    ckpt = None
    if cfg.init_from == "resume":
        ckpt = checkpoint.load(ckpt_path)
        check_resume(cfg, ckpt, ckpt_path)
        if ckpt["vocab_size"] != meta["vocab_size"]:
            raise DataError(f"{ckpt_path} has vocab_size {ckpt['vocab_size']} but dataset '{cfg.dataset}' has "
                            f"{meta['vocab_size']}; resume on the dataset the checkpoint was trained on")
        if len(ckpt.get("ranks", [None])) != dd.world_size:
            raise ConfigError(f"cannot resume {ckpt_path}: {len(ckpt.get('ranks', [None]))} processes wrote it, this "
                              f"run has {dd.world_size}; each process owns its data streams and memory, so start "
                              "as many as wrote it")

    model = (GPT if cfg.model == "gpt" else SqrLLM).from_config(cfg, meta["vocab_size"]).to(device)
    if dd.enabled:  # one init on every rank (seeded above), then each rank's own dropout masks
        torch.manual_seed(cfg.seed + dd.rank)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                          device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    if cfg.batching == "stream":
        batches = StreamBatches(train_tokens, cfg.batch_size, cfg.block_size, rank=dd.rank, world_size=dd.world_size,
                                path=Path(cfg.dataset) / "train.bin")
    else:
        batches = RandomBatches(train_tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed + dd.rank,
                                path=Path(cfg.dataset) / "train.bin")
    step, best_val, tokens_seen, state = 0, float("inf"), 0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        own = ckpt["ranks"][dd.rank] if dd.enabled else ckpt  # this rank's data cursor and RNG states
        batches.load_state_dict(own["data"])
        step, best_val, tokens_seen = ckpt["step"], ckpt["best_val"], ckpt["tokens_seen"]
        rows = slice(dd.rank * cfg.batch_size, (dd.rank + 1) * cfg.batch_size)  # this rank's streams' memory
        state = [s[rows].to(device) for s in ckpt["state"]] or None
        checkpoint.set_rng_state(own["rng"])

    if dd.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
    metrics = Metrics(out_dir / "metrics.jsonl" if dd.is_main else None)
    cuda = device.startswith("cuda")
    if cfg.compile and cuda:
        # block by block: blocks of one kind share one compiled graph (seconds, not minutes, to
        # compile), the scan is one opaque op inside it, and the elementwise work around it fuses
        for block in model.blocks:
            block.compile()
    ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None) if dd.enabled else None
    fwd = ddp or model
    n_params = model.num_params()
    flops_tok = flops_per_token(model, cfg.block_size)["total"]
    dtype_name = str(dtype).replace("torch.", "")
    peak = cfg.peak_flops or (peak_flops(torch.cuda.get_device_name(device), dtype_name) if cuda else None)
    if dd.is_main:
        tqdm.write(f"sqrllm: {cfg.model} model, {n_params / 1e6:.2f}M parameters, {flops_tok / 1e6:.1f} MFLOP per "
                   f"training token, {cfg.dataset} ({meta['vocab_size']} tokens vocab), device {device}"
                   f"{f' x {dd.world_size} processes' if dd.enabled else ''}, {dtype_name}, out_dir {out_dir}")

    def save_checkpoint():
        # every rank takes part: the carried memory of all streams is gathered, in rank order
        ckpt = {
            "format": checkpoint.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "config": cfg.to_dict(), "vocab_size": meta["vocab_size"],
            "tokenizer": meta["tokenizer"], "step": step, "best_val": best_val, "tokens_seen": tokens_seen,
            "rng": checkpoint.rng_state(), "data": batches.state_dict(),
            "state": [distributed.gather_rows(s.detach()).cpu() for s in state] if state else [],
        }
        if dd.enabled:  # each rank's data cursor and RNG states, in rank order
            ckpt["ranks"] = distributed.gather_objects({"data": batches.state_dict(), "rng": checkpoint.rng_state()})
        if dd.is_main:
            checkpoint.save(ckpt_path, ckpt)

    def run_eval():
        nonlocal best_val
        row = {"step": step, "tokens": tokens_seen}
        # eager: the compiled blocks are for the training shapes, and new shapes would recompile
        with torch.compiler.set_stance("force_eager"):
            row["val_loss"] = evaluate(model, val_tokens, cfg, device, dtype, stream=False)
            if cfg.eval_stream:
                row["val_loss_stream"] = evaluate(model, val_tokens, cfg, device, dtype, stream=True)
        if dd.enabled:  # every rank evaluated the same weights; they agree to the bit on what to save
            row.update(zip(row, distributed.mean(torch.tensor(list(row.values()), dtype=torch.float64,
                                                              device=device)).tolist()))
            row["step"], row["tokens"] = step, tokens_seen
        row["val_bpb"] = bits_per_byte(row["val_loss"], meta)
        if cfg.eval_stream:
            row["val_bpb_stream"] = bits_per_byte(row["val_loss_stream"], meta)
        row["elapsed"] = time.time() - launched
        metrics.log(**row)
        text = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val"))
        if dd.is_main:
            tqdm.write(f"step {step}: {text} ({row['elapsed']:.1f}s)")
        improved = row["val_loss"] < best_val
        best_val = min(best_val, row["val_loss"])
        if improved or cfg.always_save_checkpoint:
            save_checkpoint()
        return row

    if cfg.eval_only:
        return run_eval()

    model.train()
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * dd.world_size
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not (cfg.progress and dd.is_main), dynamic_ncols=True,
               unit="step")
    last_log, last_tokens, loss_sum, loss_n = time.time(), tokens_seen, 0.0, 0
    last_eval_row = None
    while step < cfg.max_iters:
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(cfg.gradient_accumulation_steps):
            x, y, reset = batches.next()
            if cfg.batching == "random" or (cfg.reset_every and step % cfg.reset_every == 0):
                state = None
            elif state is not None and reset.any():
                keep = (~reset).to(device)[:, None]
                state = [s * keep for s in state]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # DDP all-reduces the gradients in the backward of the last micro-step only
            last = micro == cfg.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                with autocast(device, dtype):
                    _, loss, state = fwd(x, y, state)
                scaler.scale(loss / cfg.gradient_accumulation_steps).backward()
            loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
        scaler.unscale_(optimizer)  # a no-op unless float16; the norm is of the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        bar.update(1)
        out_of_time = cfg.max_time > 0 and time.time() - launched >= cfg.max_time
        if cfg.max_time > 0 and dd.enabled:  # clocks differ: all ranks stop at the same step
            out_of_time = distributed.any_rank(out_of_time, device)
        if step % cfg.log_interval == 0 or step == cfg.max_iters or out_of_time:
            train_loss = distributed.mean(loss_sum / loss_n).item()  # waits for the device
            now = time.time()
            tok_s = (tokens_seen - last_tokens) / max(now - last_log, 1e-9)
            perf = {"tok_per_s": tok_s, "mfu": mfu(flops_tok, tok_s, peak, dd.world_size),
                    "mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                    "grad_norm": grad_norm.item()}
            metrics.log(step=step, elapsed=now - launched, tokens=tokens_seen, loss=train_loss, lr=lr, **perf)
            bar.set_postfix_str(f"loss {train_loss:.4f}, {perf_text(perf)}")
            if dd.is_main and not cfg.progress:
                tqdm.write(f"step {step}: loss {train_loss:.4f}, lr {lr:.2e}, {perf_text(perf)} "
                           f"({now - launched:.1f}s)")
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"training loss became {train_loss} at step {step}; "
                                         "lower learning_rate or raise warmup_iters")
            last_log, last_tokens, loss_sum, loss_n = now, tokens_seen, 0.0, 0
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_iters or out_of_time:
            last_eval_row = run_eval()
        if out_of_time:
            if dd.is_main:
                tqdm.write(f"stopping at step {step}: max_time {cfg.max_time}s reached")
            break
    bar.close()
    distributed.teardown()
    return {"step": step, "ckpt": str(ckpt_path), "best_val": best_val, "last_eval": last_eval_row}
