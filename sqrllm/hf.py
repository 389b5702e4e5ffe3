"""Hugging Face datasets -> SentencePiece token shards (see sqrllm.prepare.prepare_documents).

The source is a dataset on the Hub (name, config, split names) or local files (text, json/jsonl,
parquet, csv; compressed too) read through the `datasets` library (pip install 'sqrllm[hf]'),
streamed if asked (nothing is stored but the tokens). Each record's text field is one document.
Val is a split of its own or every 1/val_fraction-th document of the train split.

    python data/hf/prepare.py --preset tinystories
    python data/hf/prepare.py --files notes/*.jsonl --text_field body --val_fraction 0.01 --name notes

The Hub needs network at prepare time; local files do not.
"""

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from sqrllm.checkpoint import first_line
from sqrllm.data import DataError
from sqrllm.prepare import SHARD_TOKENS, dataset_name, prepare_documents, sentencepiece_for, staged, vocab_note

PRESETS = {
    # 2.1M short stories in simple English (about 1.9 GB of text); its own validation split
    "tinystories": {"dataset": "roneneldan/TinyStories", "train_split": "train", "val_split": "validation",
                    "vocab_size": 4096},
    # a 10B-token sample of FineWeb-Edu (educational web pages, about 45 GB of text), streamed;
    # one document in 1000 goes to val
    "fineweb_edu": {"dataset": "HuggingFaceFW/fineweb-edu", "config": "sample-10BT", "train_split": "train",
                    "val_fraction": 0.001, "streaming": True, "vocab_size": 8192},
}
DEFAULTS = {"dataset": None, "config": None, "files": None, "val_files": None, "text_field": "text",
            "train_split": "train", "val_split": None, "val_fraction": 0.01, "max_docs": 0, "streaming": False,
            "tokenizer_model": None, "vocab_size": 8192, "model_type": "unigram", "tokenizer_train_bytes": 1 << 26,
            "workers": os.cpu_count() or 1, "shard_tokens": SHARD_TOKENS, "cache_dir": None}
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet", ".csv": "csv"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading Hugging Face datasets needs the datasets package: pip install 'sqrllm[hf]'") from None
    return datasets


def _builder(files):
    """The datasets builder for local files, from their extensions (compression suffixes ignored)."""
    kinds = set()
    for f in files:
        name = Path(f).name.lower()
        for z in _COMPRESSED:
            name = name.removesuffix(z)
        kind = _BUILDERS.get(Path(name).suffix)
        if kind is None:
            raise DataError(f"{f}: unknown file type; local files must be one of "
                            f"{', '.join(sorted(_BUILDERS))} (optionally {', '.join(_COMPRESSED)})")
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"the files mix {' and '.join(sorted(kinds))} records; prepare one kind at a time")
    return kinds.pop()


@contextlib.contextmanager
def _reading(opts, verb="open"):
    """What `datasets` raises while opening or reading the input, as one DataError that names it."""
    datasets = _datasets()
    where = opts["files"] or opts["dataset"]
    try:
        yield
    except DataError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError) as e:  # pyarrow's parse errors are ValueErrors
        raise DataError(f"could not {verb} {where} ({type(e).__name__}: {first_line(e)})") from None
    except datasets.exceptions.DatasetGenerationError as e:  # reading the files failed; the cause says why
        cause = e.__cause__ or e
        raise DataError(f"could not read {where} ({type(cause).__name__}: {first_line(cause)}); local files "
                        "must be UTF-8 text or records") from None


def open_split(opts, split):
    """One split as a `datasets` (Iterable)Dataset; split "train" or "val" names the role."""
    datasets = _datasets()
    with _reading(opts):
        if opts["files"]:
            files = {"train": opts["files"]}
            if opts["val_files"]:
                files["val"] = opts["val_files"]
            for f in files.get(split, []):
                if Path(f).is_dir():
                    raise DataError(f"input {f} is a folder; pass its files (e.g. {Path(f) / '*.jsonl'})")
                if not Path(f).is_file():
                    raise DataError(f"input {f} not found; pass existing files")
            kind = _builder(files[split])
            extra = {"sample_by": "document"} if kind == "text" else {}  # a text file is one document
            return datasets.load_dataset(kind, data_files=files, split=split, streaming=opts["streaming"],
                                         cache_dir=opts["cache_dir"], **extra)
        name = opts["train_split"] if split == "train" else opts["val_split"]
        return datasets.load_dataset(opts["dataset"], opts["config"], split=name, streaming=opts["streaming"],
                                     cache_dir=opts["cache_dir"])


def _texts(opts, split):
    """The text field of each record of a split, in order, skipping empty ones; at most max_docs records
    (0: all). Streamed, the input is read (and its errors met) only here."""
    ds, field, max_docs = open_split(opts, split), opts["text_field"], opts["max_docs"]
    if ds.column_names is not None and field not in ds.column_names:
        raise DataError(f"the records have no field {field!r}; pass --text_field, one of: "
                        f"{', '.join(ds.column_names)}")
    n = 0
    with _reading(opts, "read"):
        for batch in ds.select_columns([field]).iter(batch_size=1000):
            for text in batch[field]:
                if max_docs and n >= max_docs:
                    return
                n += 1
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"field {field!r} holds {type(text).__name__} values, not text; "
                                    "pass --text_field")
                if text:
                    yield text


def documents(opts, with_val=True):
    """(split, text) pairs: the val split's records (with_val=False: skipped), then the train
    split's, every 1/val_fraction-th of them to val when there is no val split."""
    own_val = bool(opts["val_split"] or opts["val_files"])
    if own_val and with_val:
        for text in _texts(opts, "val"):
            yield "val", text
    f = 0.0 if own_val else opts["val_fraction"]
    for i, text in enumerate(_texts(opts, "train")):
        yield ("val" if math.floor((i + 1) * f) > math.floor(i * f) else "train"), text


def prepare_hf(out_dir, progress=True, **options):
    """Prepare a dataset (keyword options as DEFAULTS and the command line) into out_dir."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if bool(opts["dataset"]) == bool(opts["files"]):
        raise DataError("give a dataset name (--dataset) or local files (--files), one of the two")
    if not (opts["val_split"] or opts["val_files"]) and not 0.0 < opts["val_fraction"] < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1, got {opts['val_fraction']}; or name a val split")
    if opts["shard_tokens"] < 1:
        raise DataError(f"shard_tokens must be at least 1, got {opts['shard_tokens']}")
    if opts["val_split"] and opts["files"]:
        raise DataError("local files have no split names; pass the val files with --val_files")
    with staged(out_dir) as stage:  # a failure leaves a dataset prepared there before as it was
        return _prepare_hf(out_dir, stage, opts, progress)


def _prepare_hf(out_dir, stage, opts, progress):
    train_texts = (text for split, text in documents(opts, with_val=False) if split == "train")
    tok, origin = sentencepiece_for(stage, train_texts, opts["vocab_size"], opts["model_type"],
                                    opts["tokenizer_model"], opts["tokenizer_train_bytes"])
    source = {"name": Path(out_dir).name, **{k: opts[k] for k in ("dataset", "config", "text_field", "max_docs",
                                                                   "streaming")}}
    if opts["files"]:
        source["files"] = [str(f) for f in opts["files"]] + [str(f) for f in opts["val_files"] or []]
    if opts["val_split"] or opts["val_files"]:
        source["splits"] = {"train": opts["train_split"], "val": opts["val_split"] or "val_files"}
    else:
        source["splits"] = {"train": opts["train_split"], "val": f"every {1 / opts['val_fraction']:g}th document"}
        source["val_fraction"] = opts["val_fraction"]
    source["tokenizer"] = origin
    return prepare_documents(stage, documents(opts), source, workers=max(1, opts["workers"]),
                             shard_tokens=opts["shard_tokens"], progress=progress)


def main(argv, data_dir, preset=None):
    """The command line of data/hf/prepare.py (and of data/<preset>/prepare.py); dataset folders
    go under data_dir unless --data_dir says otherwise."""
    ap = argparse.ArgumentParser(prog="prepare.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=preset, help="a ready-made dataset (options below "
                    "override its settings)")
    ap.add_argument("--dataset", help="a dataset on the Hugging Face Hub, e.g. roneneldan/TinyStories")
    ap.add_argument("--config", help="the dataset's configuration (subset), e.g. sample-10BT")
    ap.add_argument("--files", nargs="+", help="local files instead: .txt (one document each), .json/.jsonl, "
                    ".parquet, .csv")
    ap.add_argument("--val_files", nargs="+", help="local files for val (else --val_fraction of --files)")
    ap.add_argument("--text_field", help="the field holding each document's text (default: text)")
    ap.add_argument("--train_split", help="the Hub split to train on (default: train)")
    ap.add_argument("--val_split", help="the Hub split for val (default: none, take --val_fraction of train)")
    ap.add_argument("--val_fraction", type=float, help="share of train documents moved to val (default: 0.01)")
    ap.add_argument("--max_docs", type=int, help="read at most this many documents per split (default: 0 = all)")
    ap.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                    help="stream the records instead of downloading and caching the dataset first")
    ap.add_argument("--tokenizer_model", help="an existing SentencePiece .model to use instead of training one")
    ap.add_argument("--vocab_size", type=int, help="SentencePiece vocabulary to train (default: 8192)")
    ap.add_argument("--model_type", choices=("bpe", "unigram"),
                    help="SentencePiece algorithm (default: unigram, twice as fast to encode)")
    ap.add_argument("--tokenizer_train_bytes", type=int, help="train text the tokenizer learns from "
                    "(default: 64 MiB, the first train documents)")
    ap.add_argument("--workers", type=int, help="tokenizing processes (default: the CPU count)")
    ap.add_argument("--shard_tokens", type=int, help=f"tokens per shard file (default: {SHARD_TOKENS:,})")
    ap.add_argument("--cache_dir", help="where datasets keeps downloads (default: its own, ~/.cache/huggingface)")
    ap.add_argument("--name", help="dataset folder under --data_dir (default: the preset's name, or hf)")
    ap.add_argument("--data_dir", default=str(data_dir), help=f"where dataset folders go (default: {data_dir})")
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    options = {**PRESETS.get(args.preset, {}), **given}
    try:
        out = Path(args.data_dir) / dataset_name(args.name or args.preset or "hf")
        meta = prepare_hf(out, **options)
    except DataError as e:
        sys.exit(f"error: {e}")
    s = meta["splits"]
    print(f"{out.name}: SentencePiece vocab {meta['vocab_size']}, "
          f"{s['train']['tokens']:,} train tokens ({s['train']['documents']:,} documents, "
          f"{len(s['train']['shards'])} shards), {s['val']['tokens']:,} val tokens "
          f"({s['val']['documents']:,} documents) -> {out}")
    if note := vocab_note(meta):
        print(note)
    print(f"train with: python train.py --dataset={out.name} --reset_at_eot=true"
          + (f" --data_dir={args.data_dir}" if Path(args.data_dir).resolve() != Path(data_dir).resolve() else ""))
