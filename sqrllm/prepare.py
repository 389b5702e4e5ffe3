"""Corpus preparation: text in, token files and meta.json out (see sqrllm.data for the format).

- One text (the builtin corpus, local files): train.bin and val.bin, byte, char or SentencePiece.
- Documents (`prepare_documents`, fed by sqrllm.hf): each followed by the end-of-text token,
  tokenized by worker processes, written to shards of `shard_tokens` tokens.

The data/<name>/prepare.py scripts are thin command-line wrappers around these functions.
"""

import collections
import contextlib
import hashlib
import http.client
import itertools
import multiprocessing
import os
import platform
import re
import shutil
import sysconfig
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sqrllm.data import DataError, read_meta, token_dtype, write_meta, write_tokens
from sqrllm.tokenizer import (SPM_FILE, ByteTokenizer, CharTokenizer, SentencePieceTokenizer, TokenizerError,
                              train_sentencepiece)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
BUILTIN_VAL_PERCENT = 5  # share of stdlib files (by hash of their path) that go to val
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB at 2 bytes per token)
TASK_CHARS = 1 << 20  # text per encoding task sent to a worker


def decode_utf8(data, path, errors="strict"):
    """bytes -> str. strict: an error naming the file and byte offset; replace: (text, count replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise DataError(f"{path}: invalid UTF-8 at byte offset {e.start}; fix the file, or pass "
                            "--errors=replace to substitute U+FFFD") from None
    text = data.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")


_OUTPUT = re.compile(r"(train|val)(-\d+)?\.bin|meta\.json|" + re.escape(SPM_FILE))  # what a preparation writes


def dataset_name(name):
    """`name` if it can be a dataset's folder under data_dir (one plain name), else a DataError."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name or ""):
        raise DataError(f"--name {name!r} is not a folder name: use letters, digits, '_', '-' and '.' "
                        "(not first), e.g. --name my_corpus")
    return name


@contextlib.contextmanager
def staged(out_dir):
    """A fresh folder inside out_dir (.stage-*) to prepare a dataset in, whose files replace out_dir's
    only once all are written (meta.json last); a preparation that fails leaves out_dir as it was. Outputs of an
    earlier preparation that the new one lacks (more shards, a tokenizer model) are removed then;
    other files (prepare.py, a downloaded input.txt) stay. The folder's name holds the host and process id, so
    that the next preparation there removes what a killed one left (never a living one's)."""
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    host = stage_host()
    for old in out_dir.glob(f".stage-{host}-*"):  # left by a preparation killed on this host
        pid = re.fullmatch(rf"\.stage-{re.escape(host)}-(\d+)-.*", old.name)
        if pid and not _alive(int(pid[1])):
            shutil.rmtree(old, ignore_errors=True)
    # inside out_dir: on its file system, whatever links lead there (a rename cannot cross file systems)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{host}-{os.getpid()}-", dir=out_dir))
    try:
        try:
            yield stage
        except BaseException:
            if made:  # out_dir as it was: not there
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        new = {f.name for f in stage.iterdir()}
        for name in sorted(new, key=lambda n: n == "meta.json"):
            os.replace(stage / name, out_dir / name)
        for f in out_dir.iterdir():  # only once the new dataset is whole
            if _OUTPUT.fullmatch(f.name) and f.name not in new:
                f.unlink()
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def stage_host():
    """This host's name as `staged` puts it in a staging folder's name (.stage-<host>-<pid>-*)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", platform.node())


def _alive(pid):
    """Whether process pid runs on this host (another user's counts; on Windows, where signal 0 would be
    a Ctrl-C, every pid does)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # permission denied: it runs, as another user
        pass
    return True


def _write_dataset(out_dir, tokenizer, splits, source):
    """splits: {"train": str or bytes, "val": ...}; tokenizes and writes the three files."""
    out_dir = Path(out_dir)
    meta = {"format": 1, "tokenizer": tokenizer.to_meta(), "vocab_size": tokenizer.vocab_size,
            "splits": {}, "source": source}
    dtype = token_dtype(tokenizer.vocab_size)
    for name, content in splits.items():
        if len(content) < 2:
            raise DataError(f"the {name} split is empty after splitting {source.get('name', 'the input')}; "
                            "give more text or change the val share")
        if isinstance(content, bytes):
            ids = np.frombuffer(content, dtype=np.uint8).astype(dtype)
            n_bytes = len(content)
        elif isinstance(tokenizer, SentencePieceTokenizer):
            # pieces of models trained here never span a newline, so cutting there changes no id; a
            # batch of chunks at a time, so that id lists (tens of bytes an id) never hold a whole split
            chunks, parts, threads = _newline_chunks(content), [], os.cpu_count() or 1
            while batch := list(itertools.islice(chunks, max(16, 2 * threads))):
                parts.append(_flat(tokenizer.encode_batch(batch, num_threads=threads), dtype))
            ids = np.concatenate(parts)
            n_bytes = len(content.encode("utf-8"))
        else:
            ids = _char_ids(tokenizer, content, dtype)
            n_bytes = len(content.encode("utf-8"))
        write_tokens(out_dir / f"{name}.bin", ids)
        meta["splits"][name] = {"tokens": int(ids.size), "bytes": n_bytes}
    write_meta(out_dir, meta)
    return meta


def stdlib_files():
    """Source files of Python's standard library, tests excluded, as sorted relative paths."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p.relative_to(root) for p in root.rglob("*.py")
             if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return root, sorted(files, key=lambda p: p.as_posix())


def prepare_builtin(out_dir):
    """Byte-level corpus of the standard library's source; a file goes to val when the first byte
    of sha1(its relative path) mod 100 is under BUILTIN_VAL_PERCENT."""
    root, files = stdlib_files()
    parts = {"train": [], "val": []}
    val_files = []
    for rel in files:
        key = rel.as_posix()
        is_val = hashlib.sha1(key.encode()).digest()[0] % 100 < BUILTIN_VAL_PERCENT
        data = (root / rel).read_bytes()
        parts["val" if is_val else "train"].append(data + b"\n")
        if is_val:
            val_files.append(key)
    source = {"name": "builtin", "python": platform.python_version(), "stdlib": str(root),
              "files": len(files), "val_rule": f"sha1(path)[0] % 100 < {BUILTIN_VAL_PERCENT}",
              "val_files": val_files}
    with staged(out_dir) as stage:
        return _write_dataset(stage, ByteTokenizer(), {k: b"".join(v) for k, v in parts.items()}, source)


def read_text_inputs(paths, errors="strict"):
    """Concatenate text files (folders are walked, sorted) into one str; returns (text, files, replaced)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()  # hidden ones (.git, .DS_Store) are not text
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} not found; pass existing files or folders")
    texts, replaced = [], 0
    for f in files:
        text, n = decode_utf8(f.read_bytes(), f, errors)
        texts.append(text)
        replaced += n
    text = "".join(texts)
    if not text:
        raise DataError(f"the input ({', '.join(map(str, paths))}) holds no text; give a non-empty file")
    return text, files, replaced


def vocab_note(meta):
    """A note when a trained SentencePiece model has fewer pieces than asked for, else None."""
    asked = meta["source"].get("tokenizer", {}).get("trained", {}).get("vocab_size")
    if asked and asked != meta["vocab_size"]:
        return (f"note: the tokenizer has {meta['vocab_size']} pieces, not the {asked} asked: the training text "
                "holds no more (give more text for a larger vocabulary)")
    return None


def prepare_text(out_dir, paths, level="byte", val_fraction=0.1, errors="strict", name="text", vocab_size=8192,
                 model_type="unigram", tokenizer_model=None):
    """Any local text: the last val_fraction of the concatenated text is val.

    level="sentencepiece": a model of vocab_size pieces trained on the train part, or the existing
    tokenizer_model (a .model file), stored as out_dir/tokenizer.model.
    """
    if level not in ("byte", "char", "sentencepiece"):
        raise DataError(f"level must be 'byte', 'char' or 'sentencepiece', got {level!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    text, files, replaced = read_text_inputs(paths, errors)
    source = {"name": name, "inputs": [str(f) for f in files], "val_fraction": val_fraction,
              "replaced_invalid_utf8": replaced}
    with staged(out_dir) as stage:
        if level == "byte":
            text = text.encode("utf-8")
        cut = int(len(text) * (1 - val_fraction))
        if level == "sentencepiece":
            tok, source["tokenizer"] = sentencepiece_for(stage, [text[:cut]], vocab_size, model_type, tokenizer_model)
        else:
            tok = CharTokenizer.from_text(text) if level == "char" else ByteTokenizer()
        return _write_dataset(stage, tok, {"train": text[:cut], "val": text[cut:]}, source), replaced


def prepare_shakespeare_char(out_dir, input_path=None):
    """Tiny Shakespeare, char-level, first 90% train and last 10% val (as nanoGPT). Without input_path:
    out_dir/input.txt, downloaded once; a dataset prepared before from a local copy is kept as it is."""
    if input_path is None:
        input_path = Path(out_dir) / "input.txt"
        if not input_path.is_file() and (Path(out_dir) / "meta.json").is_file():
            return read_meta(out_dir)  # prepared before from a local copy: nothing to download, nothing to redo
        if not input_path.is_file():
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                    data = r.read()
            except (OSError, http.client.HTTPException) as e:  # the latter: a connection cut mid-file
                raise DataError(f"could not download Tiny Shakespeare ({e}); pass a local copy with "
                                "--input PATH") from None
            input_path.parent.mkdir(parents=True, exist_ok=True)
            input_path.write_bytes(data)
    text, _, _ = read_text_inputs([input_path])
    tok = CharTokenizer.from_text(text)
    cut = int(len(text) * 0.9)
    with staged(out_dir) as stage:
        return _write_dataset(stage, tok, {"train": text[:cut], "val": text[cut:]},
                              {"name": "shakespeare_char", "input": str(input_path), "split": "first 90% train"})


def sentencepiece_for(out_dir, train_texts, vocab_size=8192, model_type="unigram", tokenizer_model=None,
                      max_bytes=1 << 26):
    """out_dir/tokenizer.model: a copy of tokenizer_model, or trained on train_texts (an iterable of
    str, read up to max_bytes). -> (the tokenizer, a description of where it came from for meta.json)."""
    path = Path(out_dir) / SPM_FILE
    try:
        if tokenizer_model:
            if not Path(tokenizer_model).is_file():
                raise DataError(f"tokenizer model {tokenizer_model} not found; pass an existing SentencePiece .model")
            path.parent.mkdir(parents=True, exist_ok=True)
            if Path(tokenizer_model).resolve() != path.resolve():
                shutil.copyfile(tokenizer_model, path.with_name(SPM_FILE + ".tmp"))
                os.replace(path.with_name(SPM_FILE + ".tmp"), path)
            origin = {"model": str(tokenizer_model)}
        else:
            seen = train_sentencepiece(train_texts, path, vocab_size, model_type, max_bytes)
            origin = {"trained": {"model_type": model_type, "vocab_size": vocab_size, **seen}}
        return SentencePieceTokenizer(path), origin
    except TokenizerError as e:
        raise DataError(str(e)) from None


def _newline_chunks(text, size=TASK_CHARS):
    """Pieces of about `size` characters, each ending just after a newline (the last at the end)."""
    lo = 0
    while lo < len(text):
        hi = text.find("\n", lo + size)
        hi = len(text) if hi < 0 else hi + 1
        yield text[lo:hi]
        lo = hi


def _char_ids(tokenizer, text, dtype, chunk=1 << 22):
    """A char tokenizer's encode(text) as an array, looked up in numpy a chunk of characters at a time
    (a list of Python ints would take 8 bytes or more a character)."""
    points = np.array([ord(c) for c in tokenizer.chars], dtype=np.uint32)
    order = np.argsort(points)
    points = points[order]  # sorted: an id is order[position among them]
    ids = np.empty(len(text), dtype=dtype)
    for lo in range(0, len(text), chunk):
        text_points = np.frombuffer(text[lo:lo + chunk].encode("utf-32-le"), dtype="<u4")
        at = np.searchsorted(points, text_points).clip(max=len(points) - 1)
        if not np.array_equal(points[at], text_points):
            tokenizer.encode(text[lo:lo + chunk])  # raises, naming the characters
        ids[lo:lo + len(text_points)] = order[at]
    return ids


def _flat(id_lists, dtype):
    return np.fromiter(itertools.chain.from_iterable(id_lists), dtype=dtype, count=sum(map(len, id_lists)))


_ENCODER = None  # the worker process's tokenizer


def _start_encoder(model_file):
    global _ENCODER
    _ENCODER = SentencePieceTokenizer(model_file)


def _encode(task):
    """(split, documents) -> (split, their ids with an end-of-text after each, UTF-8 bytes, documents)."""
    split, docs = task
    ids = _flat(_ENCODER.encode_batch(docs, eot=True), token_dtype(_ENCODER.vocab_size))
    return split, ids, sum(len(d.encode("utf-8")) for d in docs), len(docs)


def _tasks(documents):
    """(split, document) pairs -> (split, documents) tasks of about TASK_CHARS characters each."""
    docs, chars = collections.defaultdict(list), collections.Counter()
    for split, doc in documents:
        docs[split].append(doc)
        chars[split] += len(doc)
        if chars[split] >= TASK_CHARS:
            yield split, docs.pop(split)
            chars[split] = 0
    for split, rest in docs.items():
        yield split, rest


def encode_documents(model_file, documents, workers=1):
    """-> an iterator of (split, ids, bytes, documents), one per task of `documents` ((split, text)
    pairs), in order.

    workers > 1: that many processes encode, started now (before the caller starts threads), a few
    tasks ahead of the consumer, so memory stays flat however long the input is; 1: this process.
    """
    if workers <= 1:
        _start_encoder(model_file)
        return map(_encode, _tasks(documents))
    # fork where there is one (no start-up cost: the workers need nothing re-imported), as
    # torch's DataLoader and datasets' map do on Linux
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, _start_encoder, (str(model_file),))
    return _in_order(pool, _tasks(documents), 2 * workers)


def _in_order(pool, tasks, ahead):
    with pool:
        pending = collections.deque()
        for task in tasks:
            pending.append(pool.apply_async(_encode, (task,)))
            if len(pending) > ahead:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    """Appends token arrays to one split's shard files, <split>-00000.bin, ..., of shard_tokens
    tokens each (the last one shorter); documents may continue from one shard into the next."""

    def __init__(self, folder, split, shard_tokens, dtype):
        self.folder, self.split, self.shard_tokens, self.dtype = Path(folder), split, shard_tokens, dtype
        self.parts, self.buffered, self.names = [], 0, []

    def add(self, ids):
        self.parts.append(ids)
        self.buffered += len(ids)
        while self.buffered >= self.shard_tokens:
            self._write(self.shard_tokens)

    def _write(self, n):
        data = np.concatenate(self.parts).astype(self.dtype, copy=False)
        name = f"{self.split}-{len(self.names):05d}.bin"
        write_tokens(self.folder / name, data[:n])
        self.names.append(name)
        self.parts, self.buffered = [data[n:]], len(data) - n

    def close(self):
        """Write what is left; delete shards of this split that an earlier prepare left behind."""
        if self.buffered:
            self._write(self.buffered)
        for old in self.folder.glob(f"{self.split}-[0-9][0-9][0-9][0-9][0-9].bin"):
            if old.name not in self.names:
                old.unlink()
        return self.names


def prepare_documents(out_dir, documents, source, workers=1, shard_tokens=SHARD_TOKENS, progress=True):
    """Tokenize (split, text) pairs with out_dir/tokenizer.model, each document followed by the
    end-of-text token, into train and val shards and meta.json; returns the meta dict."""
    out_dir = Path(out_dir)
    model_file = out_dir / SPM_FILE
    tok = SentencePieceTokenizer(model_file)
    if tok.eot_id is None:
        raise DataError(f"{model_file} has no end-of-text (eos) piece to separate documents; train one here "
                        "(leave out the tokenizer model) or use a model with an eos piece")
    dtype = token_dtype(tok.vocab_size)
    writers = {split: ShardWriter(out_dir, split, shard_tokens, dtype) for split in ("train", "val")}
    counts = {split: {"tokens": 0, "bytes": 0, "documents": 0} for split in writers}
    encoded = encode_documents(model_file, documents, workers)
    bar = tqdm(desc=f"tokenizing ({workers} worker{'s' * (workers > 1)})", unit="B", unit_scale=True,
               unit_divisor=1000, disable=not progress, dynamic_ncols=True)
    for split, ids, n_bytes, n_docs in encoded:
        writers[split].add(ids)
        c = counts[split]
        c["tokens"], c["bytes"], c["documents"] = c["tokens"] + len(ids), c["bytes"] + n_bytes, c["documents"] + n_docs
        bar.update(n_bytes)
        bar.set_postfix(docs=counts["train"]["documents"] + counts["val"]["documents"], refresh=False)
    bar.close()
    for split, c in counts.items():
        if c["documents"] == 0:
            raise DataError(f"the {split} split of {source.get('name', 'the input')} holds no documents; give more "
                            "text, or name a val split or a larger val fraction")
    splits = {split: {**counts[split], "shards": writers[split].close()} for split in writers}
    meta = {"format": 1, "tokenizer": tok.to_meta(), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "splits": splits, "source": source}
    write_meta(out_dir, meta)
    return meta
