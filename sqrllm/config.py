"""Training configuration: one dataclass, filled from a Python config file and --key=value overrides.

    python train.py configs/small.py --batch_size=32 --learning_rate=3e-3

A config file is plain Python whose top-level assignments name fields of `Config`. Unknown keys
and wrong types are errors that name the field and suggest the nearest key; ints promote to floats.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import runpy
from dataclasses import dataclass
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which field and why."""


@dataclass
class Config:
    # --- I/O ---
    out_dir: str = "out/run"  # folder for config.json, metrics.jsonl and checkpoints
    init_from: str = "scratch"  # "scratch" or "resume" (continue from out_dir's newest intact checkpoint)
    log_interval: int = 10  # steps between console/metrics log lines
    eval_interval: int = 250  # steps between evaluations (and checkpoints); 0 = only at the end
    eval_only: bool = False  # evaluate the checkpoint (with init_from="resume") and exit
    eval_stream: bool = True  # also evaluate with state streamed through the whole val split (not the GPT: no state)
    eval_streams: int = 1  # contiguous streams the streamed evaluation cuts the val split into; 1 = memory carried through all of it
    eval_max_tokens: int = 0  # cap on val tokens per evaluation; 0 = the whole split
    eval_batch_size: int = 64  # windows (or streams) per evaluation forward
    eval_block_size: int = 0  # tokens per window of the window-reset val loss (memory reset at each); 0 = block_size
    always_save_checkpoint: bool = True  # save at every eval; False: when val improves (resume from the best)
    keep_checkpoints: int = 3  # newest checkpoints kept in out_dir as ckpt-<step>.pt (latest.json lists them)
    progress: bool = True  # tqdm progress bar on a terminal (into a file or a pipe: log lines, as with False)
    wandb_log: bool = False  # also log to Weights & Biases: config, metrics, tokens/s, eval samples (pip install wandb)
    wandb_project: str = "sqrllm"  # wandb project
    wandb_run_name: str = ""  # wandb run name; "" = wandb picks one
    # --- data ---
    dataset: str = "builtin"  # folder under data_dir holding train.bin, val.bin, meta.json
    data_dir: str = "data"  # where datasets live, relative to the working directory
    batching: str = "stream"  # "stream": rows read consecutive windows, memory carried; "random": nanoGPT windows
    burn_in: int = 0  # random batching: read the N tokens before each window first (no gradient), so it starts from a real memory
    burn_in_rows: float = 0.5  # with burn_in: the share of rows that start from that memory; the others start from zero
    reset_every: int = 0  # with stream batching, zero the carried memory every N steps; 0 = never
    reset_at_eot: bool = False  # zero the memory at each end-of-text token (datasets of documents, e.g. data/hf)
    # --- model ---
    model: str = "sqrll"  # "sqrll" (SqrLLM) or "gpt" (the Transformer baseline of sqrllm/gpt.py)
    n_layer: int = 4  # sqrll layers, followed by MLPs per mlp_every (model="gpt": attention layers, each with an MLP)
    n_head: int = 6  # attention heads, for model="gpt"
    n_embd: int = 256  # model width
    n_mem: int = 0  # memory width of each sqrll layer; 0 = n_embd
    n_ffn: int = 0  # hidden width of the gated MLP; 0 = 2 * n_embd
    mlp_every: int = 1  # a gated MLP block after every N-th sqrll layer; 0 = no MLP (model="gpt" ignores it)
    dropout: float = 0.0  # dropout on residual branches and embeddings
    drop_path: float = 0.0  # stochastic depth: a row skips a residual branch with this probability at the last block, 0 at the first
    zoneout: float = 0.0  # sqrll layers in training: a memory feature keeps its value at a step with this probability
    tie_weights: bool = True  # output head shares the token embedding
    bias: bool = True  # biases in linear layers (a sqrll layer's four gate biases, forget gate's included, stay on)
    init: str = "scaled"  # "scaled" (residual outputs' std / sqrt(2 * blocks), by depth as in GPT-2) or "normal"
    init_std: float = 0.02  # std of the normal weight init
    forget_init: str = "spread"  # forget bias: "spread" (timescales 1..max_timescale) or "zero"
    max_timescale: float = 64.0  # longest initial memory timescale in tokens, for forget_init="spread"
    # --- optimisation ---
    batch_size: int = 32  # rows per micro-batch (streams, with stream batching)
    block_size: int = 128  # tokens per row per step (truncated backprop length)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    max_time: float = 0.0  # stop after this many seconds of wall-clock; 0 = no limit
    learning_rate: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int = 0  # steps of cosine decay; 0 = max_iters
    weight_decay: float = 0.1  # AdamW weight decay on matrices (norm weights and biases are not decayed)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    ema_decay: float = 0.0  # evaluate and save the weights' average, ema = decay*ema + (1-decay)*w a step; 0 = off
    ema_start: int = 0  # step up to which the average copies the weights, then averages
    max_bad_steps: int = 10  # stop after this many consecutive non-finite (skipped) steps; 0 = no guard
    allow_batch_change: bool = False  # resume with another batch_size/batching/world size: streams restart
    # --- system ---
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (bfloat16 on capable CUDA, float32 elsewhere), "float32", "bfloat16", "float16"
    compile: bool = True  # torch.compile each block of the model on CUDA (CPU runs stay eager)
    cuda_graph: bool = False  # replay each micro-step's forward + backward from a CUDA graph (CUDA, one process; else eager)
    peak_flops: float = 0.0  # peak FLOP/s of one device for MFU; 0 = from the device's name (sqrllm/flops.py)
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default
    seed: int = 1337  # seeds torch, numpy and python RNGs
    deterministic: bool = False  # torch.use_deterministic_algorithms: runs and resumes repeat bitwise

    @property
    def mem_width(self):
        return self.n_mem or self.n_embd

    @property
    def ffn_width(self):
        return self.n_ffn or 2 * self.n_embd

    def validate(self):
        self.out_dir, self.data_dir = os.path.expanduser(self.out_dir), os.path.expanduser(self.data_dir)  # --k=~/x
        choices = {
            "init_from": ("scratch", "resume"),
            "model": ("sqrll", "gpt"),
            "batching": ("stream", "random"),
            "init": ("scaled", "normal"),
            "forget_init": ("spread", "zero"),
            "dtype": ("auto", "float32", "bfloat16", "float16"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(map(repr, allowed))}")
        positive = ("n_layer", "n_embd", "batch_size", "block_size", "gradient_accumulation_steps", "eval_batch_size",
                    "eval_streams", "keep_checkpoints", "log_interval")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("n_mem", "n_ffn", "mlp_every", "max_iters", "reset_every", "eval_interval", "warmup_iters",
                    "max_bad_steps", "ema_start", "eval_block_size", "burn_in", "lr_decay_iters", "eval_max_tokens",
                    "min_lr", "weight_decay", "max_time", "peak_flops", "grad_clip", "num_threads"):
            v = getattr(self, key)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{key} must be >= 0, got {v}")
        for key in ("beta1", "beta2"):  # AdamW divides by 1 - beta ** step
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError(f"init_std must be a positive number, got {self.init_std}")
        if not (math.isfinite(self.max_timescale) and self.max_timescale >= 1):
            raise ConfigError(f"max_timescale must be at least 1 (tokens), got {self.max_timescale}")
        if self.model == "gpt" and (self.n_head < 1 or self.n_embd % self.n_head):
            raise ConfigError(f"model='gpt' needs n_embd ({self.n_embd}) to be a multiple of n_head ({self.n_head})")
        if self.model == "gpt" and self.eval_block_size > self.block_size:
            raise ConfigError(f"eval_block_size={self.eval_block_size} is longer than the GPT's context "
                              f"(block_size={self.block_size}); use at most {self.block_size}, or 0 for block_size")
        if self.burn_in and self.batching != "random":
            raise ConfigError(f"burn_in={self.burn_in} is for batching='random' (stream batching carries the memory "
                              "from batch to batch already); pass --burn_in=0 or --batching=random")
        if self.burn_in and self.model != "sqrll":
            raise ConfigError(f"burn_in={self.burn_in} needs a model with memory; model={self.model!r} has none: "
                              "pass --burn_in=0")
        if not 0.0 < self.burn_in_rows <= 1.0:
            raise ConfigError(f"burn_in_rows must be in (0, 1], got {self.burn_in_rows}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"drop_path must be in [0, 1), got {self.drop_path}; 0 turns stochastic depth off")
        if not 0.0 <= self.zoneout < 1.0:
            raise ConfigError(f"zoneout must be in [0, 1), got {self.zoneout}; 0 turns zoneout off")
        if self.zoneout and self.model != "sqrll":
            raise ConfigError(f"zoneout={self.zoneout} acts on sqrll layers' memory; model={self.model!r} has none: "
                              "pass --zoneout=0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}; 0 turns the average off, "
                              "0.99 averages over about the last 100 steps")
        if not self.out_dir.strip():
            raise ConfigError("out_dir is empty (an unset variable?); pass a folder for the run, e.g. "
                              "--out_dir=out/run")
        if not 0 <= self.seed < 2**32:  # numpy's seed takes no more
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"learning_rate must be a positive number, got {self.learning_rate}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr={self.min_lr} is above learning_rate={self.learning_rate}: the decay would "
                              "raise the learning rate; pass a min_lr <= learning_rate")
        return self

    def to_dict(self):
        return dataclasses.asdict(self)

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _unknown(key):
    near = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.6)
    hint = f"; did you mean '{near[0]}'?" if near else "; run `python train.py --help` for the list of keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def coerce(key, value, source="config"):
    """Check `value` against the type of field `key` (ints promote to floats); return it typed."""
    if key not in FIELDS:
        raise _unknown(key)
    want = FIELDS[key].type
    want = {"int": int, "float": float, "bool": bool, "str": str}.get(want, want)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {key} must be {want.__name__}, got {type(value).__name__} {value!r}")


def _parse_override(text, key):
    """Parse the text of --key=value into the type of field `key`."""
    want = FIELDS[key].type
    want = {"int": int, "float": float, "bool": bool, "str": str}.get(want, want)
    if want is str:
        return text
    if want is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}={text}: {key} must be a bool (true/false)")
    try:
        return int(text) if want is int else float(text)
    except ValueError:
        raise ConfigError(f"--{key}={text}: {key} must be {want.__name__}, got {text!r}") from None


def load_config(argv, base=None):
    """Build a Config from [config_file.py] [--key=value ...]; `base` is a dict of starting values."""
    values = dict(base or {})
    override = None  # the first --key=value, after which a config file would overwrite it
    for arg in argv:
        if arg.startswith("--"):
            override = override or arg
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"override '{arg}' must be written --key=value")
            if key not in FIELDS:
                raise _unknown(key)
            values[key] = _parse_override(text, key)
        else:
            if override:
                raise ConfigError(f"config file {arg} comes after the override {override}, which it would overwrite; "
                                  "put config files first: train.py CONFIG.py --key=value ...")
            path = Path(arg)
            if not path.is_file():
                raise ConfigError(f"config file {arg} not found; pass a file from configs/, e.g. configs/small.py")
            try:
                namespace = runpy.run_path(str(path))
            except Exception as e:
                raise ConfigError(f"config file {arg} failed to run: {type(e).__name__}: {e}") from e
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                values[key] = coerce(key, value, source=str(path))
    for key, value in values.items():
        values[key] = coerce(key, value)
    return Config(**values).validate()


def config_help():
    lines = ["config keys (defaults):"]
    for name, f in FIELDS.items():
        lines.append(f"  --{name}={f.default!r}")
    return "\n".join(lines)


def pick_device(name):
    """"auto" -> "cuda" where there is a GPU, else "cpu"; a device this machine lacks is a ConfigError."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name):
        raise ConfigError(f"device={name!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name!r} but this torch sees no CUDA device; use --device=cpu")
        if name != "cuda" and int(name.split(":")[1]) >= count:
            raise ConfigError(f"device={name!r} but this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but this torch has no Apple GPU (MPS) here; use --device=cpu")
    return name


def resolve_device(cfg):
    device = pick_device(cfg.device)
    dtype = cfg.dtype
    if dtype == "auto":
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    return device, getattr(torch, dtype)
