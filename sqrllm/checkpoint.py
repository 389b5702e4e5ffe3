"""Checkpoints: tensors and plain types only, written atomically, loaded with weights_only=True.

A checkpoint is a dict: model and optimizer state, the resolved config, the tokenizer description,
step, best val loss, tokens seen, RNG states, the data cursor and the carried recurrent state.
"""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from sqrllm.config import Config
from sqrllm.model import SqrLLM
from sqrllm.tokenizer import from_meta

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save(path, ckpt):
    """Write `ckpt` to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path, map_location="cpu"):
    """Load a checkpoint safely (no code runs); clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote "
                              "(out_dir/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain types and was "
                              f"refused (nothing in it was run): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({str(e).splitlines()[0]}); "
                              "use an earlier checkpoint or retrain") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a sqrllm checkpoint (format {FORMAT})")
    return ckpt


def rng_state():
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": dict(zip(("version", "internal", "gauss"), random.getstate())),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))


def load_model(path, device="cpu"):
    """-> (model in eval mode, tokenizer, checkpoint dict) from a checkpoint file."""
    ckpt = load(path)
    cfg = Config(**ckpt["config"])
    model = SqrLLM.from_config(cfg, ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), from_meta(ckpt["tokenizer"]), ckpt
