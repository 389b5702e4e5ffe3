"""data/hf/prepare.py through the `datasets` library, offline, on local jsonl, parquet and text
files: documents in order, each followed by end-of-text, in header-checked shards; val by fraction
or from files of its own; streaming and worker processes change nothing in the output."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqrllm.data import DataError, ShardedTokens, read_split, read_tokens
from sqrllm.hf import prepare_hf
from sqrllm.tokenizer import from_meta

datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parent.parent
N_DOCS = 120


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def make_docs():
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "mat", "naïve", "café", "東京", "🙂", "42", "\n", "  "]
    return [f"Doc {i}: " + " ".join(rng.choice(words, int(rng.integers(5, 60)))) for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_files")
    docs = make_docs()
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "body": d, "extra": [i, i]}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(N_DOCS)), "body": docs}), root / "docs.parquet", row_group_size=25)
    return root, docs


def options(tmp_path, **kw):
    return {"text_field": "body", "val_fraction": 0.1, "vocab_size": 300, "shard_tokens": 700, "workers": 1,
            "cache_dir": str(tmp_path / "cache"), **kw}


def split_documents(folder, meta, split):
    """The documents of a split, cut at end-of-text, decoded."""
    tok = from_meta(meta["tokenizer"], folder)
    ids = read_split(folder, meta, split)[:].tolist()
    assert ids[-1] == meta["eot_id"]
    docs, cur = [], []
    for i in ids:
        if i == meta["eot_id"]:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_prepare_local_files_through_datasets(files, kind, tmp_path):
    root, docs = files
    out = tmp_path / "ds"
    meta = prepare_hf(out, files=[str(root / f"docs.{kind}")], progress=False, **options(tmp_path))
    assert meta["tokenizer"] == {"kind": "sentencepiece", "model_file": "tokenizer.model"}
    assert 258 < meta["vocab_size"] <= 300 and meta["eot_id"] == 1 and (out / "tokenizer.model").is_file()
    val = [d for i, d in enumerate(docs) if i % 10 == 9]  # every 10th document
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    assert split_documents(out, meta, "train") == train and split_documents(out, meta, "val") == val
    for split, want in (("train", train), ("val", val)):
        s = meta["splits"][split]
        assert s["documents"] == len(want) and s["bytes"] == sum(len(d.encode()) for d in want)
        counts = [len(read_tokens(out / name)) for name in s["shards"]]  # each header checked
        assert sum(counts) == s["tokens"] and all(c == 700 for c in counts[:-1]) and 0 < counts[-1] <= 700
        assert s["shards"] == [f"{split}-{k:05d}.bin" for k in range(len(counts))]
    assert len(meta["splits"]["train"]["shards"]) > 3
    assert isinstance(read_split(out, meta, "train"), ShardedTokens)
    src = meta["source"]
    assert src["text_field"] == "body" and src["val_fraction"] == 0.1 and src["files"] == [str(root / f"docs.{kind}")]
    assert src["tokenizer"]["trained"]["vocab_size"] == 300
    assert json.loads((out / "meta.json").read_text()) == meta


def test_streaming_and_workers_write_the_same_files(files, tmp_path):
    root, _ = files
    a = prepare_hf(tmp_path / "a", files=[str(root / "docs.jsonl")], progress=False, **options(tmp_path))
    b = prepare_hf(tmp_path / "b", files=[str(root / "docs.parquet")], progress=False,
                   **options(tmp_path, streaming=True, workers=2))
    assert a["splits"] == b["splits"]
    for name in ["tokenizer.model"] + a["splits"]["train"]["shards"] + a["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_text_files_and_val_files(tmp_path):
    docs = make_docs()[:20]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i:02d}.txt").write_text(d + "\n", encoding="utf-8")
    train = [str(tmp_path / f"d{i:02d}.txt") for i in range(16)]
    val = [str(tmp_path / f"d{i:02d}.txt") for i in range(16, 20)]
    meta = prepare_hf(tmp_path / "ds", files=train, val_files=val, progress=False,
                      **options(tmp_path, text_field="text", vocab_size=300, max_docs=0))
    assert split_documents(tmp_path / "ds", meta, "val") == [d + "\n" for d in docs[16:]]  # a file, one document
    assert sorted(split_documents(tmp_path / "ds", meta, "train")) == sorted(d + "\n" for d in docs[:16])
    assert meta["source"]["splits"] == {"train": "train", "val": "val_files"}


def test_max_docs_and_an_existing_tokenizer(files, tmp_path):
    root, docs = files
    first = prepare_hf(tmp_path / "a", files=[str(root / "docs.jsonl")], progress=False, **options(tmp_path))
    meta = prepare_hf(tmp_path / "b", files=[str(root / "docs.jsonl")], progress=False,
                      **options(tmp_path, max_docs=30, tokenizer_model=str(tmp_path / "a" / "tokenizer.model")))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == (tmp_path / "a" / "tokenizer.model").read_bytes()
    assert split_documents(tmp_path / "b", meta, "val") == [docs[9], docs[19], docs[29]]
    assert meta["source"]["tokenizer"] == {"model": str(tmp_path / "a" / "tokenizer.model")}
    assert first["vocab_size"] == meta["vocab_size"]


def test_errors_name_the_fix(files, tmp_path):
    root, _ = files
    with pytest.raises(DataError, match="no field 'text'; pass --text_field, one of: id, body, extra"):
        prepare_hf(tmp_path / "ds", files=[str(root / "docs.jsonl")], progress=False,
                   **options(tmp_path, text_field="text"))
    with pytest.raises(DataError, match="input .*nope.jsonl not found"):
        prepare_hf(tmp_path / "ds", files=[str(tmp_path / "nope.jsonl")], progress=False, **options(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(DataError, match="x.bin: unknown file type"):
        prepare_hf(tmp_path / "ds", files=[str(tmp_path / "x.bin")], progress=False, **options(tmp_path))
    with pytest.raises(DataError, match="a dataset name .* or local files"):
        prepare_hf(tmp_path / "ds", progress=False, **options(tmp_path))
    with pytest.raises(DataError, match="the val split of ds holds no documents"):
        prepare_hf(tmp_path / "ds", files=[str(root / "docs.jsonl")], progress=False,
                   **options(tmp_path, max_docs=5))


def test_command_line(files, tmp_path):
    root, _ = files
    run = subprocess.run([sys.executable, str(ROOT / "data" / "hf" / "prepare.py"), "--files", str(root / "docs.jsonl"),
                          "--text_field", "body", "--vocab_size", "300", "--workers", "1", "--name", "cli",
                          "--data_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "cli: SentencePiece vocab 2" in run.stdout and "--dataset=cli --reset_at_eot=true" in run.stdout
    assert (tmp_path / "cli" / "meta.json").is_file()
    run = subprocess.run([sys.executable, str(ROOT / "data" / "hf" / "prepare.py"), "--files", str(root / "docs.jsonl"),
                          "--data_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "error: the records have no field 'text'" in run.stderr
    assert "Traceback" not in run.stderr


def test_shard_tokens_below_one_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one document"}\n')
    with pytest.raises(DataError, match="shard_tokens must be at least 1, got 0"):
        prepare_hf(tmp_path / "out", files=[str(tmp_path / "a.jsonl")], shard_tokens=0, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_unreadable_or_folder_inputs_are_one_error(tmp_path, streaming):
    """Streamed, the files are read only as the documents are taken: the same one error line."""
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"could not read .*latin1.txt.* \(UnicodeDecodeError: .*\)"):
        prepare_hf(tmp_path / "out", files=[str(tmp_path / "latin1.txt")], progress=False, streaming=streaming)
    (tmp_path / "bad.jsonl").write_text('{"text": "one document"}\n{"text": "cut off\n')
    with pytest.raises(DataError, match=r"could not read .*bad.jsonl.* \(\w+: .*\)"):
        prepare_hf(tmp_path / "out", files=[str(tmp_path / "bad.jsonl")], progress=False, streaming=streaming)
    with pytest.raises(DataError, match=r"input .* is a folder; pass its files"):
        prepare_hf(tmp_path / "out", files=[str(tmp_path)], progress=False)
    assert not (tmp_path / "out").exists()
