"""Corpus preparation: text in, train.bin / val.bin / meta.json out (see sqrllm.data for the format).

The data/<name>/prepare.py scripts are thin command-line wrappers around these functions.
"""

import hashlib
import platform
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np

from sqrllm.data import DataError, token_dtype, write_meta, write_tokens
from sqrllm.tokenizer import ByteTokenizer, CharTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
BUILTIN_VAL_PERCENT = 5  # share of stdlib files (by hash of their path) that go to val
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


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
        else:
            ids = np.array(tokenizer.encode(content), dtype=dtype)
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
    return _write_dataset(out_dir, ByteTokenizer(), {k: b"".join(v) for k, v in parts.items()}, source)


def read_text_inputs(paths, errors="strict"):
    """Concatenate text files (folders are walked, sorted) into one str; returns (text, files, replaced)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
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


def prepare_text(out_dir, paths, level="byte", val_fraction=0.1, errors="strict", name="text"):
    """Any local text: the last val_fraction of the concatenated text is val."""
    if level not in ("byte", "char"):
        raise DataError(f"level must be 'byte' or 'char', got {level!r}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    text, files, replaced = read_text_inputs(paths, errors)
    source = {"name": name, "inputs": [str(f) for f in files], "val_fraction": val_fraction,
              "replaced_invalid_utf8": replaced}
    if level == "char":
        tok = CharTokenizer.from_text(text)
        cut = int(len(text) * (1 - val_fraction))
        return _write_dataset(out_dir, tok, {"train": text[:cut], "val": text[cut:]}, source), replaced
    data = text.encode("utf-8")
    cut = int(len(data) * (1 - val_fraction))
    return _write_dataset(out_dir, ByteTokenizer(), {"train": data[:cut], "val": data[cut:]}, source), replaced


def prepare_shakespeare_char(out_dir, input_path=None):
    """Tiny Shakespeare, char-level, first 90% train and last 10% val (as nanoGPT)."""
    if input_path is None:
        input_path = Path(out_dir) / "input.txt"
        if not input_path.is_file():
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                    data = r.read()
            except OSError as e:
                raise DataError(f"could not download Tiny Shakespeare ({e}); pass a local copy with "
                                "--input PATH") from None
            input_path.parent.mkdir(parents=True, exist_ok=True)
            input_path.write_bytes(data)
    text, _, _ = read_text_inputs([input_path])
    tok = CharTokenizer.from_text(text)
    cut = int(len(text) * 0.9)
    return _write_dataset(out_dir, tok, {"train": text[:cut], "val": text[cut:]},
                          {"name": "shakespeare_char", "input": str(input_path), "split": "first 90% train"})
