"""Tokenizing throughput of the prepare step: MB of text per second into SentencePiece token shards.

    python scripts/bench_tokenize.py                         # 64 MB, 8192 pieces, bpe and unigram
    python scripts/bench_tokenize.py --mb 256 --workers 1 2 4

The text is Tiny Shakespeare (../shared/data/tinyshakespeare.txt, or --input), its paragraphs as
documents, repeated up to --mb; without the file, the source of Python's standard library, a file
a document. A model is trained on the first 16 MB (its time is shown apart), then the documents
go through `prepare_documents` (worker processes, end-of-text after each document, shards on disk)
and, with the datasets package, through data/hf/prepare.py's path from a jsonl file (streamed). The
times are wall-clock and include starting the workers.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from sqrllm.prepare import prepare_documents, sentencepiece_for, stdlib_files

ROOT = Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus(path, mb):
    """-> (documents adding up to about mb MB of UTF-8, where they came from)."""
    if path.is_file():
        docs = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d]
        source = f"{path.name}, paragraphs"
    else:
        root, files = stdlib_files()
        docs = [(root / f).read_text(encoding="utf-8", errors="replace") for f in files]
        source = "Python's standard library source, files"
    size = sum(len(d.encode()) for d in docs)
    return docs * max(1, round(mb * 1e6 / size)), source


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=SHAKESPEARE, help="text file whose paragraphs are the documents")
    ap.add_argument("--mb", type=float, default=64, help="MB of text to tokenize")
    ap.add_argument("--vocab_size", type=int, default=8192)
    ap.add_argument("--model_type", nargs="+", default=["bpe", "unigram"], choices=["bpe", "unigram"])
    ap.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    args = ap.parse_args(argv)
    docs, source = corpus(args.input, args.mb)
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"text: {n_bytes / 1e6:.1f} MB, {len(docs):,} documents ({source}); {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} before")
    try:
        import datasets  # noqa: F401
        from sqrllm.hf import prepare_hf
    except ImportError:
        prepare_hf = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "docs.jsonl"
        if prepare_hf is not None:
            with open(jsonl, "w", encoding="utf-8") as f:
                for d in docs:
                    f.write(json.dumps({"text": d}) + "\n")
        for model_type in args.model_type:
            out = tmp / model_type
            t0 = time.perf_counter()
            sample, size = [], 0
            for d in docs:
                sample.append(d)
                size += len(d)
                if size >= 16e6:
                    break
            sentencepiece_for(out, sample, args.vocab_size, model_type)
            print(f"{model_type}: trained {args.vocab_size} pieces on {size / 1e6:.0f} MB in "
                  f"{time.perf_counter() - t0:.1f} s")
            for workers in args.workers:
                t0 = time.perf_counter()
                pairs = (("val" if i == 0 else "train", d) for i, d in enumerate(docs))
                meta = prepare_documents(out, pairs, {"name": "bench"}, workers=workers, progress=False)
                dt = time.perf_counter() - t0
                tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
                rows.append((model_type, "documents in memory", workers, tokens, dt))
                if prepare_hf is not None:
                    t0 = time.perf_counter()
                    meta = prepare_hf(tmp / "hf", files=[str(jsonl)], streaming=True, workers=workers,
                                      tokenizer_model=str(out / "tokenizer.model"), val_fraction=0.001,
                                      cache_dir=str(tmp / "cache"), progress=False)
                    rows.append((model_type, "jsonl via datasets", workers, tokens, time.perf_counter() - t0))
    print(f"load average {os.getloadavg()[0]:.2f} after")
    print("\n| tokenizer | input | workers | tokens | bytes/token | seconds | MB/s |")
    print("|---|---|---|---|---|---|---|")
    for model_type, what, workers, tokens, dt in rows:
        print(f"| SentencePiece {model_type} {args.vocab_size} | {what} | {workers} | {tokens:,} | "
              f"{n_bytes / tokens:.2f} | {dt:.1f} | {n_bytes / dt / 1e6:.1f} |")


if __name__ == "__main__":
    main()
