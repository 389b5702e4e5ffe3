"""Token files and batches.

A token file is a 32-byte header followed by the tokens, little-endian:

    magic b"SQRLTOKS" | version u32 | bytes per token u32 (1, 2 or 4) | token count u64 | reserved u64

Files are read through np.memmap, never loaded whole. A dataset folder holds meta.json (the
tokenizer and per-split token and byte counts; no pickle anywhere) and per split either one file
(train.bin, val.bin) or shards (train-00000.bin, train-00001.bin, ...) listed in meta.json's
splits.<name>.shards, read as one sequence (`ShardedTokens`). Datasets of documents end each
with the end-of-text token meta.json names as eot_id. `load_dataset(cfg)` opens the one a config
names, with what to run when it is not prepared.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sqrllm.tokenizer import from_meta, tokenizer_files, tokenizer_sha256

MAGIC = b"SQRLTOKS"
VERSION = 1
HEADER_SIZE = 32
_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the file and the fix."""


def token_dtype(vocab_size):
    """Smallest unsigned dtype that holds ids < vocab_size."""
    for size, dtype in _DTYPES.items():
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    raise DataError(f"vocab_size {vocab_size} does not fit in 32-bit token ids")


def write_tokens(path, tokens):
    """Write a token file atomically (temp file in the same folder, then rename)."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype.itemsize not in _DTYPES or tokens.dtype.kind != "u":
        raise DataError(f"tokens must be uint8, uint16 or uint32, got {tokens.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = MAGIC + np.array([VERSION, tokens.dtype.itemsize], "<u4").tobytes()
    header += np.array([tokens.size, 0], "<u8").tobytes()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tokens(path):
    """Memory-map a token file after checking its header and size; returns a 1-D array."""
    path = Path(path)
    fix = "re-run the dataset's prepare.py to rewrite it"
    if not path.is_file():
        raise DataError(f"{path} not found; {fix}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE or header[:8] != MAGIC:
        raise DataError(f"{path} is not a sqrllm token file (bad magic); {fix}")
    version, itemsize = map(int, np.frombuffer(header[8:16], "<u4"))  # Python ints: count * itemsize > 2**32
    count = int(np.frombuffer(header[16:24], "<u8")[0])
    if version != VERSION:
        raise DataError(f"{path} has format version {version}, this sqrllm reads {VERSION}; {fix}")
    if itemsize not in _DTYPES:
        raise DataError(f"{path} declares {itemsize} bytes per token (expected 1, 2 or 4); {fix}")
    if size != HEADER_SIZE + count * itemsize:
        raise DataError(f"{path} holds {size - HEADER_SIZE} bytes of tokens but its header says "
                        f"{count} x {itemsize}; the file is truncated or corrupt; {fix}")
    if count == 0:
        raise DataError(f"{path} holds no tokens; {fix} with more text")
    return np.memmap(path, dtype=np.dtype(_DTYPES[itemsize]).newbyteorder("<"), mode="r",
                     offset=HEADER_SIZE, shape=(count,))


def read_meta(folder):
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run the dataset's prepare.py")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run the dataset's prepare.py") from e
    # what every prepare.py writes and training reads
    fields = {"tokenizer": (dict, "an object"), "vocab_size": (int, "an integer"), "splits": (dict, "an object")}
    for key, (kind, what) in fields.items():
        value = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{path}: {key} must be {what}, got {json.dumps(value)}; re-run the dataset's prepare.py")
    return meta


def write_meta(folder, meta):
    path = Path(folder) / "meta.json"
    tmp = path.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_ids(tokens, vocab_size, path):
    """Every id in `tokens` must be < vocab_size (checked in slices, memory stays flat)."""
    step = 1 << 24
    for lo in range(0, len(tokens), step):
        top = int(tokens[lo : lo + step].max())
        if top >= vocab_size:
            raise DataError(f"{path} holds token id {top} but the tokenizer's vocab_size is {vocab_size}; "
                            "the file and meta.json disagree: re-run the dataset's prepare.py")


class ShardedTokens:
    """Token files read as one 1-D sequence, each through its own memmap; windows may span files.

    Supports len(), slices and integer-array indexing (any shape), which is what the batchers,
    the evaluation and check_ids use.
    """

    def __init__(self, shards):
        self.shards = list(shards)
        if not self.shards:
            raise DataError("no token files to read")
        self.dtype = np.result_type(*(s.dtype for s in self.shards))
        self.bounds = np.cumsum([0] + [len(s) for s in self.shards])  # shard k holds [bounds[k], bounds[k+1])

    def __len__(self):
        return int(self.bounds[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(lo, hi, step)]
            parts = [s[max(lo - a, 0) : min(hi - a, len(s))]
                     for s, a, b in zip(self.shards, self.bounds[:-1], self.bounds[1:]) if lo < b and hi > a]
            return np.concatenate(parts).astype(self.dtype, copy=False) if parts else np.empty(0, self.dtype)
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        shard = np.searchsorted(self.bounds, index, side="right") - 1
        out = np.empty(index.shape, dtype=self.dtype)
        for k in np.unique(shard):
            hit = shard == k
            out[hit] = self.shards[k][index[hit] - self.bounds[k]]
        return out


def read_split(folder, meta, split):
    """The tokens of one split of a dataset folder, shards as one sequence; ids checked."""
    folder = Path(folder)
    names = meta["splits"].get(split, {}).get("shards") or [f"{split}.bin"]
    shards = []
    for name in names:
        tokens = read_tokens(folder / name)
        check_ids(tokens, meta["vocab_size"], folder / name)
        shards.append(tokens)
    return shards[0] if len(shards) == 1 else ShardedTokens(shards)


def reset_token(cfg, meta):
    """The token at which training zeroes the carried memory (cfg.reset_at_eot), or None."""
    if not cfg.reset_at_eot:
        return None
    if cfg.model != "sqrll":
        raise DataError(f"reset_at_eot=True needs model='sqrll' (the {cfg.model} model carries no memory to reset)")
    if meta.get("eot_id") is None:
        raise DataError(f"reset_at_eot=True but dataset '{cfg.dataset}' has no end-of-text token (no eot_id in "
                        "its meta.json); prepare it with data/hf/prepare.py, or set reset_at_eot=False")
    return int(meta["eot_id"])


def copy_tokenizer_files(meta, src, dst):
    """Copy the files a tokenizer description names (a SentencePiece model) from src to dst, so
    that a checkpoint folder holds everything sampling and export need."""
    for name in tokenizer_files(meta["tokenizer"]):
        if Path(src).resolve() != Path(dst).resolve():
            Path(dst).mkdir(parents=True, exist_ok=True)
            tmp = Path(dst) / f".{name}.tmp"
            shutil.copyfile(Path(src) / name, tmp)
            os.replace(tmp, Path(dst) / name)


class StreamBatches:
    """Each of B rows reads consecutive windows of its own contiguous stretch of the tokens.

    The split is cut into world_size * B equal stretches; rank k owns rows k*B ... k*B+B-1. A row that
    reaches the end of its stretch wraps to its start and is flagged, so its memory is reset.
    """

    def __init__(self, tokens, batch_size, block_size, rank=0, world_size=1, path="split"):
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        n_streams = batch_size * world_size
        self.length = (len(tokens) - 1) // n_streams
        if self.length < block_size + 1:
            raise DataError(f"{path}: {len(tokens)} tokens cannot feed {n_streams} streams of block_size "
                            f"{block_size}; lower batch_size or block_size, or use more data")
        self.starts = (rank * batch_size + np.arange(batch_size)) * self.length
        self.cursor = np.zeros(batch_size, dtype=np.int64)

    def next(self):
        """-> x (B, T), y (B, T) int64 tensors and reset (B,) bool: rows whose memory must be zeroed."""
        reset = self.cursor + self.T + 1 > self.length
        self.cursor[reset] = 0
        reset |= self.cursor == 0
        idx = (self.starts + self.cursor)[:, None] + np.arange(self.T + 1)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        self.cursor += self.T
        return chunk[:, :-1], chunk[:, 1:], torch.from_numpy(reset)

    def state_dict(self):
        return {"cursor": torch.from_numpy(self.cursor.copy())}

    def load_state_dict(self, state):
        cursor = state["cursor"].numpy()
        if cursor.shape != self.cursor.shape:
            raise DataError(f"the checkpoint's data cursor has {cursor.shape[0]} streams, this run has "
                            f"{self.B}; keep batch_size as it was to resume")
        self.cursor = cursor.astype(np.int64).copy()


class RandomBatches:
    """nanoGPT-style: B windows at random offsets; no memory is carried.

    With burn_in = K, each row also holds the K tokens before its window (x and y are K + T long), for
    the trainer to read first without a gradient, so that the window starts from the memory they
    leave; a random burn_in_rows of the rows keep that memory, the others start from zero (`reset`)."""

    def __init__(self, tokens, batch_size, block_size, seed=0, path="split", burn_in=0, burn_in_rows=1.0):
        self.tokens, self.B, self.T = tokens, batch_size, burn_in + block_size
        self.burn_in, self.burn_in_rows = burn_in, burn_in_rows
        if len(tokens) < self.T + 1:
            what = f"burn_in + block_size + 1 = {self.T + 1}" if burn_in else f"block_size + 1 = {self.T + 1}"
            raise DataError(f"{path}: {len(tokens)} tokens are fewer than {what}; lower block_size or use more data")
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        """-> x (B, T), y (B, T) int64 (T: burn_in + block_size) and reset (B,) bool: rows whose memory
        starts from zero (all of them without burn_in)."""
        ix = torch.randint(len(self.tokens) - self.T, (self.B,), generator=self.gen).numpy()
        chunk = torch.from_numpy(self.tokens[ix[:, None] + np.arange(self.T + 1)].astype(np.int64))
        reset = torch.ones(self.B, dtype=torch.bool)
        if self.burn_in:
            reset = torch.rand(self.B, generator=self.gen) >= self.burn_in_rows
        return chunk[:, :-1], chunk[:, 1:], reset

    def state_dict(self):
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["generator"])


REPO_DATA = Path(__file__).resolve().parent.parent / "data"  # data/<name>/prepare.py of this checkout


def _near(path):
    """`path` relative to the current directory when it lies below it (shorter to read and to type)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def load_dataset(cfg):
    """-> (meta, train tokens, val tokens), preparing `builtin` on first use; meta's tokenizer
    description gains the sha256 of its model file, where it has one."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if cfg.dataset == "builtin" and not (folder / "meta.json").is_file():
        from sqrllm.prepare import prepare_builtin  # it writes with this module's helpers

        tqdm.write(f"preparing the builtin dataset in {folder} (Python's standard library source, once)")
        prepare_builtin(folder)
    if not (folder / "meta.json").is_file():
        repo = REPO_DATA / cfg.dataset  # the dataset's prepare.py writes there, whatever the current directory
        if (repo / "meta.json").is_file() and repo.resolve() != folder.resolve():
            where = " (data_dir is relative to the current directory)" if not Path(cfg.data_dir).is_absolute() else ""
            raise DataError(f"dataset '{cfg.dataset}' not found in {folder}{where} but prepared in {repo}: "
                            f"pass --data_dir={REPO_DATA}")
        script = next((d / "prepare.py" for d in (folder, repo) if (d / "prepare.py").is_file()), None)
        how = (f"python {_near(script)}" if script
               else f"python {_near(REPO_DATA / 'text' / 'prepare.py')} --input YOUR_FILES --name {cfg.dataset}")
        raise DataError(f"dataset '{cfg.dataset}' not found in {folder}; prepare it first: {how}")
    meta = read_meta(folder)
    try:  # the tokenizer and its files are usable (sample.py will need them beside the checkpoint)
        vocab = from_meta(meta["tokenizer"], folder).vocab_size
    except (ValueError, ImportError) as e:
        raise DataError(f"{folder / 'meta.json'}: {e}") from None
    if vocab != meta["vocab_size"]:
        raise DataError(f"{folder / 'meta.json'} says vocab_size {meta['vocab_size']} but its tokenizer has {vocab} "
                        "tokens; re-run the dataset's prepare.py")
    if digest := tokenizer_sha256(meta["tokenizer"], folder):  # checkpoints record it: resume refuses another model
        meta["tokenizer"] = {**meta["tokenizer"], "sha256": digest}
    train, val = read_split(folder, meta, "train"), read_split(folder, meta, "val")  # shards read as one; ids checked
    if len(val) < 2:
        raise DataError(f"{folder / 'val.bin'} holds {len(val)} token; evaluation needs at least 2 (one input, "
                        "one target): re-run the dataset's prepare.py with more text or a larger val share")
    return meta, train, val
