"""The training loop: config -> data -> model -> steps -> evaluations -> checkpoints.

train.py is a thin wrapper around `train(cfg)`. What a run promises (docs/guarantees.md):
- Inputs are all checked (config, data, checkpoint, model shape, tokenizer) before out_dir is written;
  a fresh run first moves another run's files there into out_dir/previous-<UTC time>.
- A resumed run goes on bitwise as if it had not stopped: the LR is a pure function of the step, and
  the checkpoint holds the data cursor, the carried memory, every RNG state and the running loss sums.
- SIGTERM or SIGINT: the step finishes, a checkpoint is written, RunStopped(EXIT_PREEMPTED).
- A step with a non-finite loss or gradient norm is skipped; max_bad_steps of them in a row stop the
  run with a checkpoint of the last good state, RunStopped(EXIT_DIVERGED).
- A checkpoint that cannot be written (a full disk) stops the run, RunStopped(EXIT_NO_WRITE); the
  previous checkpoint is intact.
"""

import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sqrllm import checkpoint, distributed, tracking
from sqrllm.config import Config, ConfigError, resolve_device
from sqrllm.data import RandomBatches, StreamBatches, copy_tokenizer_files, load_dataset, reset_token
from sqrllm.ema import ema_for_run
from sqrllm.faults import (EXIT_DIVERGED, EXIT_NO_WRITE, EXIT_PREEMPTED, RunStopped, StopSignals, check_model_keys,
                           check_resume, hold_out_dir, mark_held, nonfinite, restart_data, set_aside_previous_run)
from sqrllm.flops import flops_per_token, mfu, peak_flops
from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM
from sqrllm.step_graph import GraphedStep, burn_in_window, graph_wanted


def process_start_time():
    """Wall-clock time at which this process was launched (Linux), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def autocast(device, dtype, cache=True):
    """cache=False: cast the weights at every use (what recording a CUDA graph needs)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, cache_enabled=cache)


def lr_at(cfg, step):
    """Warmup then cosine decay to min_lr; a pure function of the step."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    ratio = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, tokens, cfg, device, dtype, stream):
    """Mean loss (nats/token) over the val tokens (or the first eval_max_tokens of them).

    stream=False: windows of eval_block_size (or block_size), memory reset at each (the context a GPT
    of that block sees); eval_batch_size windows a forward.
    stream=True: the tokens cut into eval_streams contiguous streams (1: one stream, the memory
    carried through all of them), each read eval_batch_size x block_size / eval_streams tokens a
    forward (a SqrLLM: the GPT, which has no memory, is not evaluated so).
    """
    n = len(tokens) if cfg.eval_max_tokens <= 0 else min(len(tokens), cfg.eval_max_tokens + 1)
    if stream:
        B = max(1, min(cfg.eval_streams, n - 1))
        T = max(cfg.block_size, cfg.eval_batch_size * cfg.block_size // B)
    else:
        T, B = cfg.eval_block_size or cfg.block_size, cfg.eval_batch_size
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
        length = (n - 1) // B  # tokens a stream (predicted ones); the last n - 1 - B * length are left out
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
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise RunStopped(f"could not append to {self.path}: {e}; free space (or fix permissions) and continue "
                             "with --init_from=resume (the checkpoints are intact)", EXIT_NO_WRITE) from None

    def drop_after(self, step):
        """Remove the rows past `step`, written by a run that went on beyond the checkpoint now resumed
        (and a last line cut short); -> how many."""
        if not self.path.is_file():
            return 0
        keep = []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                pass
        if len(keep) < len(lines):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        return len(lines) - len(keep)


def perf_text(row):
    """The speed part of a console line, from a metrics row."""
    parts = [f"{row['tok_per_s']:,.0f} tok/s"]
    if row.get("mfu") is not None:
        parts.append(f"MFU {100 * row['mfu']:.1f}%")
    if row.get("mem_gib") is not None:
        parts.append(f"peak mem {row['mem_gib']:.2f} GiB")
    parts.append(f"grad norm {row['grad_norm']:.3f}")
    return ", ".join(parts)


def train(cfg: Config, launched=None):
    """Train as `cfg` says; returns a dict with the final step, losses and the checkpoint path.

    Raises ConfigError, DataError or CheckpointError before anything is written when an input is
    unusable, and RunStopped when the run stops early (see EXIT_*)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with contextlib.ExitStack() as ending:  # what _train opened that must close however it ends
            return _train(cfg, launched or process_start_time(), ending)
    finally:
        if torch.are_deterministic_algorithms_enabled() != deterministic:  # setting it imports torch._inductor (2 s)
            torch.use_deterministic_algorithms(deterministic)
        distributed.teardown()


def _train(cfg, launched, ending):
    if cfg.eval_only and cfg.init_from != "resume":
        raise ConfigError("eval_only=True evaluates a trained run's checkpoint; pass --init_from=resume too "
                          "(it evaluates out_dir's newest intact checkpoint)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS when CUDA first uses it
        torch.use_deterministic_algorithms(True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device, dtype = resolve_device(cfg)
    dd, device = distributed.setup(device)  # one process per GPU under torchrun; a no-op otherwise
    graphed, graph_note = graph_wanted(cfg, device, dd.enabled)
    meta, train_tokens, val_tokens = load_dataset(cfg)
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out_dir {out_dir} is a file; pass a folder for the run's outputs")

    def warn(text):
        if dd.is_main:
            tqdm.write(text, file=sys.stderr)

    ckpt, entries, changed = None, [], []
    writes = dd.is_main and not cfg.eval_only  # an evaluation alone leaves the run's files as they are

    def claim(wanted, mark):
        """out_dir's lock where `wanted` (process 0 only), else None. A collective: every rank calls it,
        and all raise the claim's error."""
        lock, held = None, None
        if wanted:
            try:
                lock = hold_out_dir(out_dir, mark)
                ending.callback(lock.close)
            except ConfigError as e:
                held = e
        if distributed.any_rank(held is not None, device):
            raise held or ConfigError(f"process 0 could not claim out_dir {out_dir}; its error says why")
        return lock

    lock = None
    if cfg.init_from == "resume":
        # held before the newest checkpoint is read: a run still writing one (relaunched right after a
        # stop) makes this one stop, rather than resume from an older one and delete the newer
        lock = claim(writes and out_dir.is_dir(), mark=False)
        ckpt, ckpt_path, entries = checkpoint.load_latest(out_dir, warn=warn)
        changed = check_resume(cfg, ckpt, ckpt_path, meta, dd.world_size, len(train_tokens))
        if ckpt["step"] >= cfg.max_iters and not cfg.eval_only:
            if dd.is_main:
                tqdm.write(f"nothing to train: {ckpt_path} is at step {ckpt['step']} and max_iters is {cfg.max_iters}; "
                           f"pass a larger --max_iters to train on ({out_dir} is unchanged)")
            return {"step": ckpt["step"], "ckpt": str(ckpt_path), "best_val": ckpt["best_val"], "last_eval": None}
    data_folder = Path(cfg.data_dir) / cfg.dataset

    model = (GPT if cfg.model == "gpt" else SqrLLM).from_config(cfg, meta["vocab_size"]).to(device)
    model.reset_token = reset_token(cfg, meta)  # reset_at_eot: memory restarts at each end-of-text
    if dd.enabled:  # one init on every rank (seeded above), then each rank's own dropout masks
        torch.manual_seed(cfg.seed + dd.rank)
    optimizer = model.configure_optimizer(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                          device.split(":")[0])
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)
    accum = cfg.gradient_accumulation_steps
    micro_step = GraphedStep(model, lambda: autocast(device, dtype, cache=False), lambda loss: scaler.scale(loss / accum),
                             keep_state=cfg.batching == "stream", burn_in=cfg.burn_in) if graphed else None
    if cfg.batching == "stream":
        batches = StreamBatches(train_tokens, cfg.batch_size, cfg.block_size, rank=dd.rank, world_size=dd.world_size,
                                path=Path(cfg.dataset) / "train.bin")
    else:
        batches = RandomBatches(train_tokens, cfg.batch_size, cfg.block_size, seed=cfg.seed + dd.rank,
                                path=Path(cfg.dataset) / "train.bin", burn_in=cfg.burn_in,
                                burn_in_rows=cfg.burn_in_rows)
    step, best_val, tokens_seen, state = 0, float("inf"), 0, None
    loss_sum, loss_n = 0.0, 0  # this rank's train loss summed over micro-batches since the last log line
    notes = [graph_note] if graph_note else []
    if ckpt is not None:
        raw = ckpt.get("model_raw", ckpt["model"])  # with EMA, "model" is the average and "model_raw" trains
        check_model_keys(model, raw, ckpt_path)
        model.load_state_dict(raw)
        ours = [{k: group[k] for k in ("betas", "weight_decay")} for group in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, chosen in zip(optimizer.param_groups, ours):  # the config's, as config.json records them
            group.update(chosen)
        if ckpt["scaler"]:  # empty from a run that was not float16: a float16 resume starts a fresh scale
            scaler.load_state_dict(ckpt["scaler"])
        step, best_val, tokens_seen = ckpt["step"], ckpt["best_val"], ckpt["tokens_seen"]
        own = ckpt["ranks"][dd.rank] if "ranks" in ckpt and not changed else ckpt  # this rank's cursor, RNG, sums
        if changed:
            how = restart_data(batches, ckpt, len(train_tokens), cfg)
            notes.append(f"resuming with {'; '.join(changed)}: {how}, memory at zero")
        else:
            batches.load_state_dict(own["data"])
            rows = slice(dd.rank * cfg.batch_size, (dd.rank + 1) * cfg.batch_size)  # this rank's streams' memory
            state = [s[rows].to(device) for s in ckpt["state"]] or None
        if own.get("loss_n"):
            loss_sum, loss_n = own["loss_sum"].to(device), own["loss_n"]
        checkpoint.set_rng_state(own["rng"])
        if changed and dd.enabled:
            torch.manual_seed(cfg.seed + dd.rank + step)  # the saved ranks no longer match: fresh dropout per rank
        notes.append(f"resuming {ckpt_path} at step {step}")
    ema = ema_for_run(model, cfg, ckpt, notes)  # None unless ema_decay
    averaged = ema.averaged if ema else contextlib.nullcontext  # evaluations see the average

    wandb_run = tracking.WandbRun(cfg, enabled=writes)  # no-op unless wandb_log; checks wandb is installed
    # Everything is checked: from here on, out_dir is written, by this run alone.
    if lock is not None:
        mark_held(lock)
    claim(writes and lock is None, mark=True)  # on every rank: its check is a collective
    if ckpt is None:
        set_aside_previous_run(out_dir, data_folder, meta, dd, device, warn)
    metrics = Metrics(out_dir / "metrics.jsonl" if writes else None)
    wandb_run.start(out_dir, ckpt and ckpt.get("wandb_run_id"), meta, data_folder,
                    ckpt and ckpt.get("wandb_samples"))
    ending.push(wandb_run.close)
    if ckpt is not None and writes and (dropped := metrics.drop_after(step)):
        notes.append(f"dropped {dropped} metrics.jsonl rows past step {step} (a run that went on beyond it)")
    if writes:
        cfg.save(out_dir / "config.json")
        copy_tokenizer_files(meta, data_folder, out_dir)  # out_dir alone serves sample.py
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
                   f"{f' x {dd.world_size} processes' if dd.enabled else ''}, {dtype_name}"
                   f"{', micro-steps replayed from a CUDA graph' if graphed else ''}, out_dir {out_dir}")
        for text in notes:
            tqdm.write(text)

    saved_step = step if ckpt is not None else None

    def run_state(rng=True):
        """What a resumed run needs besides the model, optimizer and scaler, as of now, on this rank.
        rng=False: torch's generators only (numpy's and Python's are not drawn from inside the loop)."""
        gens = checkpoint.rng_state() if rng else {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        return {"step": step, "tokens_seen": tokens_seen, "best_val": best_val, "rng": gens,
                "data": batches.state_dict(), "state": state, "loss_sum": loss_sum, "loss_n": loss_n}

    def save_checkpoint(run):
        """Checkpoint `run` (a run_state) -> its path; RunStopped on every rank if it cannot be written."""
        nonlocal entries, saved_step
        # every rank takes part: the carried memory of all streams is gathered, in rank order
        own = {"data": run["data"], "rng": {**checkpoint.rng_state(), **run["rng"]},
               "loss_sum": torch.as_tensor(run["loss_sum"]).detach().cpu(), "loss_n": run["loss_n"]}
        ckpt = {
            "format": checkpoint.FORMAT, "model": ema.state_dict(model) if ema else model.state_dict(),
            **({"model_raw": model.state_dict()} if ema else {}),  # sample.py and export read "model"
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "config": cfg.to_dict(), "vocab_size": meta["vocab_size"],
            "wandb_run_id": wandb_run.id,  # a resumed run continues this wandb run, and its table of samples
            "wandb_samples": [s for s in wandb_run.samples if s[0] <= run["step"]],
            "tokenizer": meta["tokenizer"], "world_size": dd.world_size, "train_tokens": len(train_tokens),
            "step": run["step"],
            "best_val": run["best_val"], "tokens_seen": run["tokens_seen"], **own,
            "state": [distributed.gather_rows(s.detach()).cpu() for s in run["state"] or []],
        }
        if dd.enabled:  # each rank's data cursor, RNG states and loss sums, in rank order
            ckpt["ranks"] = distributed.gather_objects(own)
        error = None
        if dd.is_main:
            try:
                entries = checkpoint.save_rotating(out_dir, ckpt, run["step"], cfg.keep_checkpoints, entries)
            except OSError as e:
                error = e
        if distributed.any_rank(error is not None, device):
            kept = (f"the previous checkpoint, {out_dir / entries[0]['file']}, is intact" if entries
                    else "no earlier checkpoint exists")
            raise RunStopped(f"could not write the checkpoint of step {run['step']} in {out_dir}: "
                             f"{error or 'failed on rank 0'}; {kept}; free space (or fix permissions), then "
                             "continue with --init_from=resume", EXIT_NO_WRITE)
        saved_step = run["step"]
        return out_dir / f"ckpt-{run['step']:06d}.pt"

    streamed = cfg.eval_stream and not isinstance(model, GPT)  # the GPT has no memory to stream

    def run_eval(save=True):
        nonlocal best_val
        row = {"step": step, "tokens": tokens_seen}
        # eager: the compiled blocks are for the training shapes, and new shapes would recompile
        # (without compile, nullcontext spares the CPU runs the 2 s import of torch._dynamo)
        eager = torch.compiler.set_stance("force_eager") if cfg.compile and cuda else contextlib.nullcontext()
        with eager, averaged():
            row["val_loss"] = evaluate(model, val_tokens, cfg, device, dtype, stream=False)
            if streamed:
                row["val_loss_stream"] = evaluate(model, val_tokens, cfg, device, dtype, stream=True)
        if dd.enabled:  # every rank evaluated the same weights; they agree to the bit on what to save
            row.update(zip(row, distributed.mean(torch.tensor(list(row.values()), dtype=torch.float64,
                                                              device=device)).tolist()))
            row["step"], row["tokens"] = step, tokens_seen
        row["val_bpb"] = bits_per_byte(row["val_loss"], meta)
        if streamed:
            row["val_bpb_stream"] = bits_per_byte(row["val_loss_stream"], meta)
        row["elapsed"] = time.time() - launched
        metrics.log(**row)
        wandb_run.log(row)
        with averaged():
            wandb_run.log_sample(model, step)
        text = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val"))
        if dd.is_main:
            tqdm.write(f"step {step}: {text} ({row['elapsed']:.1f}s)")
        improved = row["val_loss"] < best_val
        best_val = min(best_val, row["val_loss"])
        if save and (improved or cfg.always_save_checkpoint):
            save_checkpoint(run_state())
        return row

    if cfg.eval_only:
        return run_eval(save=False)

    model.train()
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * dd.world_size
    guard = cfg.max_bad_steps > 0
    bad_in_a_row, good = 0, None  # good: the run_state after the last good step
    last_log, last_tokens = time.time(), tokens_seen
    last_eval_row = None
    # the bar on a terminal; into a file or a pipe, a line per log_interval instead of the bar's redraws
    bar_on = cfg.progress and dd.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_iters, initial=step, disable=not bar_on, dynamic_ncols=True,
               unit="step")
    with StopSignals() as signals:
        try:
            while step < cfg.max_iters:
                if guard and bad_in_a_row == 0:
                    good = run_state(rng=False)
                lr = lr_at(cfg, step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                state_in, data_in = state, batches.state_dict() if guard else None
                step_loss = 0.0
                for micro in range(cfg.gradient_accumulation_steps):
                    x, y, reset = batches.next()
                    if cfg.batching == "random" or (cfg.reset_every and step % cfg.reset_every == 0 and micro == 0):
                        state = None
                    elif state is not None and reset.any():
                        keep = (~reset).to(device)[:, None]
                        state = [s * keep for s in state]
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    # DDP all-reduces the gradients in the backward of the last micro-step only
                    last = micro == cfg.gradient_accumulation_steps - 1
                    # burn_in: the rows that start from the memory the tokens before their window leave
                    burned = (~reset).to(device) if cfg.burn_in else None
                    if micro_step:
                        loss, state = micro_step(x, y, state, keep=burned)
                    else:
                        if cfg.burn_in:  # the other rows start from zero
                            with autocast(device, dtype):
                                state, x, y = burn_in_window(model, x, y, burned, cfg.burn_in)
                        with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
                            with autocast(device, dtype):
                                _, loss, state = fwd(x, y, state)
                            scaler.scale(loss / accum).backward()
                    step_loss = step_loss + loss.detach()
                scaler.unscale_(optimizer)  # a no-op unless float16; the norm is of the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                bad, stop = False, signals.received is not None
                if guard or dd.enabled:
                    # with the grad scaler on, infinite gradients are its business: it skips the step itself
                    flags = torch.stack([nonfinite(step_loss, None if scaler.is_enabled() else grad_norm),
                                         torch.tensor(float(stop), device=grad_norm.device)])
                    if dd.enabled:  # every rank skips the same steps and stops at the same step
                        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                    bad, stop = (bool(f) for f in flags.tolist())
                    bad = bad and guard
                if bad:
                    bad_in_a_row += 1
                    optimizer.zero_grad(set_to_none=micro_step is None)  # a graph writes .grad in place
                    if scaler.is_enabled():
                        scaler.update()
                    state = state_in  # the memory out of a non-finite forward is not carried on
                    what = f"loss {step_loss.item()}, gradient norm {grad_norm.item()}"
                    if dd.enabled:  # the flag came from any rank; the numbers and cursor are rank 0's
                        what += " on rank 0, skipped on all ranks"
                    where = {"cursor": data_in["cursor"].tolist()} if "cursor" in data_in else {}
                    metrics.log(step=step + 1, elapsed=time.time() - launched, tokens=tokens_seen + tokens_per_step,
                                skipped=what, **where)
                    if dd.is_main:
                        at = f" at data cursor {where['cursor']}" if where else ""
                        tqdm.write(f"step {step + 1}: skipped, {what}{at}; {bad_in_a_row} in a row, the run stops "
                                   f"at max_bad_steps={cfg.max_bad_steps}")
                    if bad_in_a_row >= cfg.max_bad_steps:
                        path = save_checkpoint(good)
                        raise RunStopped(f"steps {good['step'] + 1}-{step + 1} all had a non-finite loss or gradient "
                                         f"norm; saved the last good state (step {good['step']}) to {path}; lower "
                                         "learning_rate or raise warmup_iters, then continue with --init_from=resume",
                                         EXIT_DIVERGED)
                else:
                    bad_in_a_row = 0
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=micro_step is None)  # a graph writes .grad in place
                    if ema:
                        ema.update(step + 1)
                    loss_sum, loss_n = loss_sum + step_loss, loss_n + cfg.gradient_accumulation_steps
                step += 1
                tokens_seen += tokens_per_step
                bar.update(1)
                out_of_time = cfg.max_time > 0 and time.time() - launched >= cfg.max_time
                if cfg.max_time > 0 and dd.enabled:  # clocks differ: all ranks stop at the same step
                    out_of_time = distributed.any_rank(out_of_time, device)
                if (step % cfg.log_interval == 0 or step == cfg.max_iters or out_of_time) and loss_n:
                    train_loss = distributed.mean(loss_sum / loss_n).item()  # waits for the device
                    now = time.time()
                    tok_s = (tokens_seen - last_tokens) / max(now - last_log, 1e-9)
                    perf = {"tok_per_s": tok_s, "mfu": mfu(flops_tok, tok_s, peak, dd.world_size),
                            "mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                            "grad_norm": grad_norm.item()}
                    row = dict(step=step, elapsed=now - launched, tokens=tokens_seen, loss=train_loss, lr=lr, **perf)
                    metrics.log(**row)
                    wandb_run.log(row)
                    bar.set_postfix_str(f"loss {train_loss:.4f}, {perf_text(perf)}")
                    if dd.is_main and not bar_on:
                        tqdm.write(f"step {step}: loss {train_loss:.4f}, lr {lr:.2e}, {perf_text(perf)} "
                                   f"({now - launched:.1f}s)")
                    if not math.isfinite(train_loss):
                        raise RunStopped(f"training loss became {train_loss} at step {step}; lower learning_rate "
                                         "or raise warmup_iters (max_bad_steps > 0 skips such steps)", EXIT_DIVERGED)
                    last_log, last_tokens, loss_sum, loss_n = now, tokens_seen, 0.0, 0
                if (cfg.eval_interval and step % cfg.eval_interval == 0) or step == cfg.max_iters or out_of_time:
                    eval_start = time.time()
                    last_eval_row = run_eval(save=bad_in_a_row == 0)
                    last_log += time.time() - eval_start  # not training: left out of the next tok/s
                    if bad_in_a_row and (step == cfg.max_iters or out_of_time) and saved_step != good["step"]:
                        path = save_checkpoint(good)  # the run ends in skipped steps: what it learned before stays
                        if dd.is_main:
                            tqdm.write(f"steps {good['step'] + 1}-{step} were skipped; saved the last good state "
                                       f"(step {good['step']}) to {path}")
                if stop:
                    # in a run of bad steps, the last good state is the one to continue from
                    run = good if bad_in_a_row else run_state()
                    # (the same on every rank: saving is collective)
                    path = out_dir / f"ckpt-{run['step']:06d}.pt" if saved_step == run["step"] else save_checkpoint(run)
                    raise RunStopped(f"{signals.received or 'a signal to another rank'} received; saved step "
                                     f"{run['step']} to {path}; continue with --init_from=resume", EXIT_PREEMPTED)
                if out_of_time:
                    if dd.is_main:
                        tqdm.write(f"stopping at step {step}: max_time {cfg.max_time}s reached")
                    break
        finally:
            bar.close()
    return {"step": step, "ckpt": str(out_dir / checkpoint.NEWEST), "best_val": best_val, "last_eval": last_eval_row}
