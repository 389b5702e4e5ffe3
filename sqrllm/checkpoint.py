"""Checkpoints: tensors and plain types only, written atomically, verified, loaded with weights_only=True.

A checkpoint is a dict: model, optimizer and grad-scaler state, the resolved config, the tokenizer
description, step, best val loss, tokens seen, every RNG state, the data cursor, the carried recurrent
state and the running loss sums: all a resumed run needs to go on bitwise as if it had not stopped.
With ema_decay, "model" is the average of the weights and "model_raw" the weights that train (sqrllm/ema.py).

A training run's out_dir holds its last `keep_checkpoints` checkpoints and a pointer to the newest:

    ckpt-000250.pt, ckpt-000500.pt   each written to a temp file, fsynced, then renamed
    latest.json                      {"latest": "ckpt-000500.pt", "checkpoints": [{"file", "step", "bytes",
                                     "sha256"}, ...]}, newest first; replaced (atomically) only once the
                                     checkpoint it names is complete
    ckpt.pt                          a hard link to the newest (a copy where links are not supported)

A run started afresh (not --init_from=resume) in an out_dir holding another run's files first moves
those into out_dir/previous-<UTC time> (`archive_run`), so that nothing is lost or mixed.

Loading a file that latest.json lists (ckpt.pt included, through its link) checks its size and
sha256, so a truncated or corrupted file is an error naming it; `load_latest` falls back to the
newest intact checkpoint with a warning.
"""

import contextlib
import hashlib
import itertools
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sqrllm.config import Config
from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM
from sqrllm.tokenizer import from_meta, tokenizer_files, tokenizer_sha256

FORMAT = 1
POINTER = "latest.json"
NEWEST = "ckpt.pt"
_NAME = re.compile(r"ckpt-(\d+)\.pt")
_RUN_FILE = re.compile(r"\.?(ckpt-\d+\.pt|ckpt\.pt|latest\.json|metrics\.jsonl|config\.json)(\.tmp)?")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class _Hashing:
    """A write-only file that hashes what passes through it, and keeps the OSError of a failed write
    (torch.save reports it as a RuntimeError without the errno)."""

    def __init__(self, f):
        self.f, self.sha256, self.error = f, hashlib.sha256(), None

    def write(self, data):
        self.sha256.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()


def _fsync_dir(folder):
    """Make a rename in `folder` durable (not every file system can open a folder; then skip)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_write(path, mode):
    """Yield a temp file beside `path`; on success flush, fsync and rename it over `path`.

    If anything fails (a full disk included) the temp file is removed and `path` is as it was."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def save(path, obj):
    """Write `obj` to a temp file in the same folder, fsync, then rename over `path`; -> its sha256 (hex).

    If anything fails (a full disk included) the temp file is removed and `path` is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_write(path, "wb") as f:
        out = _Hashing(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:
                raise out.error from None
            raise
    return out.sha256.hexdigest()


def _write_json(path, data):
    with _atomic_write(path, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")


def _link_newest(path, link):
    """Point `link` at the file `path` (hard link; a copy where links fail), replacing it atomically."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, link)
    finally:
        tmp.unlink(missing_ok=True)


def save_rotating(out_dir, ckpt, step, keep, entries):
    """Save `ckpt` as out_dir/ckpt-{step}.pt, then list it first in latest.json among the newest `keep`
    of `entries` (this run's earlier saves, newest first), then point ckpt.pt at it; checkpoint files
    no longer listed are deleted. -> the new entries. On an error the previous checkpoints are intact."""
    out_dir = Path(out_dir)
    name = f"ckpt-{step:06d}.pt"
    path = out_dir / name
    digest = save(path, ckpt)
    entry = {"file": name, "step": step, "bytes": path.stat().st_size, "sha256": digest}
    entries = ([entry] + [e for e in entries if e["file"] != name])[: max(1, keep)]
    _write_json(out_dir / POINTER, {"format": FORMAT, "latest": name, "checkpoints": entries})
    _link_newest(path, out_dir / NEWEST)
    listed = {e["file"] for e in entries}
    for f in out_dir.glob("ckpt-*.pt"):
        if _NAME.fullmatch(f.name) and f.name not in listed:
            f.unlink(missing_ok=True)
    return entries


def archive_run(out_dir, tokenizer_names=()):
    """Move a previous run's files out of the way of a new run in `out_dir`: its checkpoints, latest.json,
    ckpt.pt, metrics.jsonl, config.json, the tokenizer files `tokenizer_names` and their temp files go,
    as they are, into a new folder out_dir/previous-<UTC time> (from which that run resumes). Other
    files and folders stay. -> the new folder; None when out_dir holds none of a run's files."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    files = [f for f in out_dir.iterdir() if _RUN_FILE.fullmatch(f.name) and (f.is_file() or f.is_symlink())]
    if not files:
        return None
    files += [out_dir / n for name in tokenizer_names for n in (name, f".{name}.tmp") if (out_dir / n).is_file()]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for n in itertools.count(1):  # a run started in the same second gets the next number
        folder = out_dir / (f"previous-{stamp}" if n == 1 else f"previous-{stamp}-{n}")
        try:
            folder.mkdir()
            break
        except FileExistsError:
            continue
    for f in files:
        os.rename(f, folder / f.name)
    _fsync_dir(folder)
    _fsync_dir(out_dir)
    return folder


def read_pointer(folder):
    """-> the checkpoints folder/latest.json lists, newest first; None without a readable one."""
    try:
        data = json.loads((Path(folder) / POINTER).read_text(encoding="utf-8"))
        entries = data["checkpoints"]
        if all(_NAME.fullmatch(e["file"]) and isinstance(e["sha256"], str) and type(e.get("bytes")) is int
               for e in entries):
            return entries
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _listed_entry(path):
    """The latest.json entry recorded for `path` (by name, or the file ckpt.pt links to), or None."""
    entries = read_pointer(path.parent) or []
    for e in entries:
        listed = path.parent / e["file"]
        if e["file"] == path.name or (path.name == NEWEST and listed.is_file() and os.path.samefile(listed, path)):
            return e
    return None


def _verify(path, entry):
    size = path.stat().st_size
    if size != entry["bytes"] or _sha256(path) != entry["sha256"]:
        what = f"{size} bytes, {entry['bytes']} when written" if size != entry["bytes"] else "its sha256 differs"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({what}, per {path.parent / POINTER}); "
                              f"resume falls back to an earlier checkpoint, or pass the folder {path.parent} "
                              "to load the newest intact one")


class Unreadable(Exception):
    """Why `load_plain` read nothing: `kind` "foreign" (not a file torch.save wrote), "refused" (it
    holds objects other than tensors and plain types) or "corrupt"; `detail` says more, in one line."""

    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def load_plain(path, map_location="cpu"):
    """torch.load(path, weights_only=True): tensors and plain types, no code run; Unreadable else."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise Unreadable("foreign", "it is empty" if not head else "not a file torch.save wrote")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise Unreadable("refused", first_line(e)) from None
    except MemoryError:  # not the file's fault: no falling back to an older checkpoint for it
        raise
    except Exception as e:  # the archive or its pickle is cut short or damaged: errors of every kind
        raise Unreadable("corrupt", first_line(e)) from None


def _load_file(path, map_location):
    try:
        ckpt = load_plain(path, map_location)
    except Unreadable as e:
        raise CheckpointError({
            "foreign": f"{path} is not a sqrllm checkpoint ({e.detail}); pass the ckpt.pt that train.py wrote "
                       "(out_dir/ckpt.pt), or the out_dir",
            "refused": f"checkpoint {path} holds objects other than tensors and plain types and was refused "
                       f"(nothing in it was run): {e.detail}",
            "corrupt": f"checkpoint {path} is truncated or corrupt ({e.detail}); use an earlier checkpoint or "
                       "retrain",
        }[e.kind]) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a sqrllm checkpoint (format {FORMAT})")
    return ckpt


def first_line(e):
    """An exception's message in one line (its type's name when it has none), for an error line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load(path, map_location="cpu"):
    """Load a checkpoint safely (no code runs); clear errors for missing, corrupt or foreign files.

    `path` is a checkpoint file, or a run's out_dir (its newest intact checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return load_latest(path, map_location, warn=lambda text: print(text, file=sys.stderr),
                           hint="pass the out_dir of a run that has saved one, or a checkpoint file")[0]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote "
                              "(out_dir/ckpt.pt), or the out_dir")
    entry = _listed_entry(path.resolve())  # a link's target is what latest.json lists
    if entry is not None:
        _verify(path, entry)
    return _load_file(path, map_location)


def _candidates(folder):
    """-> [(path, latest.json entry or None)], newest first: what latest.json lists, then ckpt.pt (if
    the listed files are gone); else the ckpt-*.pt files by step, else ckpt.pt."""
    entries = read_pointer(folder)
    if entries:
        return [(folder / e["file"], e) for e in entries] + ([(folder / NEWEST, None)]
                                                             if (folder / NEWEST).is_file() else [])
    files = sorted((f for f in folder.glob("ckpt-*.pt") if _NAME.fullmatch(f.name)),
                   key=lambda f: int(_NAME.fullmatch(f.name)[1]), reverse=True)
    if not files and (folder / NEWEST).is_file():
        files = [folder / NEWEST]
    return [(f, None) for f in files]


def load_latest(folder, map_location="cpu", warn=None,
                hint="train once without --init_from=resume, or point out_dir at the run to continue"):
    """The newest intact checkpoint of a run -> (ckpt, path, entries).

    A newer checkpoint that is missing, truncated, corrupt or refused is skipped with a warning (through
    `warn`). `entries`: latest.json's entries from the loaded one on, newest first, for `save_rotating`.
    `hint`: what to do when the folder holds none, for the caller's user."""
    folder = Path(folder)
    found = _candidates(folder)
    if not found:
        raise CheckpointError(f"no checkpoint in {folder} (no {POINTER}, ckpt-*.pt or {NEWEST}); {hint}")
    skipped = []
    for i, (path, entry) in enumerate(found):
        try:
            if not path.is_file():
                raise CheckpointError(f"checkpoint {path} listed in {folder / POINTER} is missing")
            if entry is not None:
                _verify(path, entry)
            ckpt = _load_file(path, map_location)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped and warn:
            for text in skipped:
                warn(f"warning: {text}")
            warn(f"warning: using {path} (step {ckpt.get('step')}), the newest intact checkpoint, instead")
        if entry is None:
            kept = [{"file": p.name, "step": int(_NAME.fullmatch(p.name)[1]), "bytes": p.stat().st_size,
                     "sha256": _sha256(p)} for p, _ in found[i:] if _NAME.fullmatch(p.name)]
        else:
            kept = [e for _, e in found[i:] if e is not None]  # (ckpt.pt, last in line, is listed by its file)
        return ckpt, path, kept
    raise CheckpointError(f"no intact checkpoint in {folder}: " + "; ".join(skipped))


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


def folder_of(path):
    """Where a checkpoint's run keeps its files (a tokenizer's model): `path` if a folder, else the folder
    of the file (of the file a link points to)."""
    path = Path(path)
    return path if path.is_dir() else path.resolve().parent


def _tokenizer_of(ckpt, path):
    """The checkpoint's tokenizer, from its description and the model file beside it; CheckpointError if
    that file is another model than the run's (its sha256, which older checkpoints lack) or the
    vocabulary sizes differ."""
    meta, folder = ckpt["tokenizer"], folder_of(path)
    tokenizer = from_meta(meta, folder)
    saved, found = meta.get("sha256"), tokenizer_sha256(meta, folder)
    if saved is not None and found != saved:
        model_file = folder / tokenizer_files(meta)[0]
        raise CheckpointError(f"{model_file} is not the SentencePiece model {path} was trained with (sha256 "
                              f"{found[:12]}..., the checkpoint records {saved[:12]}...); put the run's own "
                              f"{model_file.name}, which train.py copies into out_dir, next to the checkpoint")
    if tokenizer.vocab_size != ckpt["vocab_size"]:
        raise CheckpointError(f"{path} was trained on {ckpt['vocab_size']} tokens but its tokenizer "
                              f"({', '.join(tokenizer_files(meta)) or meta['kind']}) has {tokenizer.vocab_size}; "
                              "put the run's own tokenizer next to the checkpoint")
    return tokenizer


def load_model(path, device="cpu"):
    """-> (model in eval mode, tokenizer, checkpoint dict) from a checkpoint file or a run's out_dir.

    The model is the class that trained: a SqrLLM, or the GPT baseline for model='gpt'."""
    ckpt = load(path)
    cfg = Config(**ckpt["config"])
    model = (GPT if cfg.model == "gpt" else SqrLLM).from_config(cfg, ckpt["vocab_size"])
    model.load_state_dict(ckpt["model"])
    tokenizer = _tokenizer_of(ckpt, path)
    if cfg.reset_at_eot:  # as in training: every layer's memory restarts at each end-of-text token
        model.reset_token = tokenizer.eot_id
    return model.to(device).eval(), tokenizer, ckpt
