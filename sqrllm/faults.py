"""What a training run meets and survives: stop signals, non-finite steps, checkpoints it cannot
continue from, another run's files in its out_dir; and the exit codes train.py returns for each.

The loop in sqrllm/trainer.py uses these; docs/guarantees.md lists the promises and their tests.
"""

import os
import signal
import threading
from pathlib import Path

import torch

from sqrllm import checkpoint, distributed
from sqrllm.config import Config, ConfigError
from sqrllm.data import DataError
from sqrllm.tokenizer import SPM_FILE, tokenizer_files, tokenizer_sha256

try:
    import fcntl
except ImportError:
    fcntl = None

MODEL_KEYS = ("n_layer", "n_embd", "n_mem", "n_ffn", "mlp_every", "tie_weights", "bias")

EXIT_DIVERGED = 65  # max_bad_steps non-finite steps in a row; the last good state was checkpointed
EXIT_NO_WRITE = 74  # a checkpoint could not be written (disk full, permissions); the previous one is intact
EXIT_PREEMPTED = 75  # SIGTERM or SIGINT: the step finished and a checkpoint was written; resume to go on


class RunStopped(Exception):
    """The run stopped before max_iters; `code` is the exit status train.py returns (one of EXIT_*)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


class StopSignals:
    """While active, SIGTERM and SIGINT only note that they came: the loop finishes its step, saves and
    stops. A second signal is counted and otherwise ignored, so a checkpoint being written completes."""

    def __init__(self):
        self.received, self.count, self._previous = None, 0, {}

    def _handle(self, signum, frame):
        # no printing here: the loop may be inside a write to the same stream
        self.received = self.received or signal.Signals(signum).name
        self.count += 1

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def to_devnull(stream):
    """Point a stream's file descriptor at os.devnull: its reader (a pipe) is gone, and a later
    write or Python's last flush should not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class ConsoleStream:
    """sys.stdout or sys.stderr for a run whose reader may go away: `train.py ... | tee log` stopped by
    Ctrl-C loses tee at once, while the run still finishes its step and saves. A write to the closed
    pipe then points the stream at os.devnull instead of raising, so that the save and the exit
    status are not lost to a progress line (nor Python's last flush, which would meet the pipe too)."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, op, *args):
        try:
            return op(*args)
        except BrokenPipeError:
            to_devnull(self._stream)
            return None

    def write(self, text):
        done = self._guard(self._stream.write, text)
        return len(text) if done is None else done

    def flush(self):
        self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def nonfinite(loss, grad_norm=None):
    """A 0-dim tensor, 1 if the step's loss or gradient norm is not finite, else 0.

    One flag per step, read with one device sync. Under data parallelism, an all-reduce of it with
    op=MAX makes every rank skip the same steps."""
    flag = (~torch.isfinite(loss)).float()
    if grad_norm is not None:
        flag = torch.maximum(flag, (~torch.isfinite(grad_norm)).float())
    return flag


def _saved(ckpt, key):
    """A config value as the checkpoint saved it (the default, for keys older checkpoints lack)."""
    return ckpt["config"].get(key, Config.__dataclass_fields__[key].default)


def _world_size(ckpt):
    """How many data-parallel processes wrote `ckpt`."""
    return ckpt.get("world_size", len(ckpt.get("ranks", [None])))


def check_resume(cfg, ckpt, path, meta, world_size=1, n_train=None):
    """Refuse a checkpoint this run cannot continue; -> the data layout changes the user allowed.
    n_train: the training split's tokens now (checkpoints record theirs)."""
    keys = MODEL_KEYS + ("model",) + (("n_head",) if cfg.model == "gpt" else ())
    diff = [f"{k}: {_saved(ckpt, k)} -> {getattr(cfg, k)}" for k in keys if _saved(ckpt, k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"cannot resume {path}: the model shape differs from the checkpoint's ({'; '.join(diff)}); "
                          "keep these keys as they were (the run's settings are in "
                          f"{Path(path).parent / 'config.json'}), or start a new out_dir")
    tok, saved_tok = meta["tokenizer"], ckpt["tokenizer"]
    if ckpt["vocab_size"] != meta["vocab_size"] or tok.get("kind") != saved_tok.get("kind") or (
            tok.get("kind") == "char" and tok.get("chars") != saved_tok.get("chars")):
        raise DataError(f"{path} was trained with a {saved_tok.get('kind')} tokenizer of vocab_size "
                        f"{ckpt['vocab_size']}, but dataset '{cfg.dataset}' has a {tok.get('kind')} tokenizer of "
                        f"{meta['vocab_size']}; resume on the dataset the checkpoint was trained on")
    _check_tokenizer_files(cfg, saved_tok, path, meta)
    changed = [f"{k} {_saved(ckpt, k)} -> {getattr(cfg, k)}" for k in ("batch_size", "batching")
               if _saved(ckpt, k) != getattr(cfg, k)]
    if _world_size(ckpt) != world_size:
        changed.append(f"world size (processes) {_world_size(ckpt)} -> {world_size}")
    # the dataset prepared again, or another one: the streams' stretches moved (random windows and an
    # evaluation alone do not mind)
    streams = _saved(ckpt, "batching") == "stream" and cfg.batching == "stream" and not cfg.eval_only
    if streams and n_train is not None and ckpt.get("train_tokens", n_train) != n_train:
        changed.append(f"training tokens {ckpt['train_tokens']:,} -> {n_train:,} (dataset '{cfg.dataset}' "
                       "changed since)")
    if changed and not cfg.allow_batch_change:
        raise ConfigError(f"cannot resume {path}: {'; '.join(changed)}; the data streams and the carried memory "
                          "depend on these, so keep them, or pass --allow_batch_change=true to restart the streams "
                          "at the saved progress with zero memory")
    return changed


def _check_tokenizer_files(cfg, saved_tok, path, meta):
    """Refuse a dataset whose tokenizer model (same kind and vocab_size) is another file than the one
    the checkpoint records (its sha256; older checkpoints lack it) or than the copy in out_dir."""
    ours = meta["tokenizer"].get("sha256")  # load_dataset's digest of the dataset's model file
    if ours is None:  # byte and char tokenizers are their description, compared above
        return
    data_folder = Path(cfg.data_dir) / cfg.dataset
    copy = Path(cfg.out_dir) / tokenizer_files(saved_tok)[0]
    for theirs, what in ((saved_tok.get("sha256"), "a SentencePiece model"),
                         (tokenizer_sha256(saved_tok, cfg.out_dir), f"the SentencePiece model {copy}")):
        if theirs is not None and theirs != ours:
            model_file = data_folder / tokenizer_files(meta["tokenizer"])[0]
            raise DataError(f"{path} was trained with {what} of sha256 {theirs[:12]}..., but dataset "
                            f"'{cfg.dataset}' has another model of the same vocab_size ({model_file}, sha256 "
                            f"{ours[:12]}...); resume on the dataset the checkpoint was trained on, or start a new "
                            "out_dir")


def hold_out_dir(out_dir, mark=True):
    """Create out_dir and lock out_dir/.lock -> the open lock file; the lock holds until it is closed
    or the process ends, so that a second run into the same out_dir stops at once instead of moving
    or overwriting this one's files. ConfigError when out_dir cannot be written or is held.
    mark: write this process's id into the lock file now (else `mark_held` does, once the run writes)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / ".lock", "a+")
    except OSError as e:
        raise ConfigError(f"cannot write to out_dir {out_dir} ({e.strerror}); pass an --out_dir you can "
                          "write") from None
    try:
        if fcntl is not None:  # None on Windows: no lock there
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"out_dir {out_dir} is in use by another run ({holder}); wait for it to end, or pass "
                          "another --out_dir") from None
    except OSError:  # a filesystem without locks (some network mounts): the run goes on unguarded
        pass
    if mark:
        mark_held(f)
    return f


def mark_held(f):
    """Name this process in a lock file `hold_out_dir` returned, for a run that finds it held."""
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()


def set_aside_previous_run(out_dir, data_folder, meta, dd, device, warn):
    """A fresh run in an out_dir holding another run's files: rank 0 moves them, whole, into
    out_dir/previous-<UTC time> and says so; RunStopped on every rank if it cannot."""
    folder, error = None, None
    if dd.is_main:
        same = out_dir.exists() and data_folder.resolve() == out_dir.resolve()  # the dataset's own tokenizer stays
        names = [] if same else sorted({SPM_FILE, *tokenizer_files(meta["tokenizer"])})
        try:
            folder = checkpoint.archive_run(out_dir, names)
        except OSError as e:
            error = e
    if distributed.any_rank(error is not None, device):
        raise RunStopped(f"could not move the previous run's files in {out_dir} aside: {error or 'failed on rank 0'}; "
                         f"nothing was deleted (what moved is in {out_dir / 'previous-*'}); fix the folder's "
                         "permissions, or pass another out_dir (or --init_from=resume to continue that run)",
                         EXIT_NO_WRITE)
    if folder is not None:
        warn(f"warning: {out_dir} held another run's files; moved them to {folder} (to continue that run instead: "
             f"--out_dir={folder} --init_from=resume)")


def check_model_keys(model, saved, path):
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in saved.items()}
    diff = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if diff:
        shown = "; ".join(f"{k}: {theirs.get(k, 'absent')} -> {ours.get(k, 'absent')}" for k in diff[:10])
        raise ConfigError(f"cannot resume {path}: {len(diff)} parameters differ from the checkpoint's ({shown}); "
                          "keep the model config as it was (the run's settings are in "
                          f"{Path(path).parent / 'config.json'}), or start a new out_dir")


def restart_data(batches, ckpt, n_tokens, cfg):
    """After an allowed batch change: with stream batching before and after, every row starts at the
    saved mean progress through its stretch; otherwise the data starts over. -> what was done."""
    if _saved(ckpt, "batching") == "stream" and cfg.batching == "stream":
        old_length = (ckpt.get("train_tokens", n_tokens) - 1) // (_saved(ckpt, "batch_size") * _world_size(ckpt))
        cursors = [r["data"]["cursor"] for r in ckpt.get("ranks", [ckpt])]
        progress = float(torch.cat(cursors).double().mean()) / max(1, old_length)
        cursor = batches.state_dict()["cursor"]
        batches.load_state_dict({"cursor": torch.full_like(cursor, int(progress * batches.length))})
        return f"the {cursor.numel()} data streams start {progress:.0%} of the way through their stretches"
    return "the data starts over (random batching draws from the seed again)"
