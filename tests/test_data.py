"""Token files, prepare scripts and batching."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sqrllm import prepare
from sqrllm.data import DataError, RandomBatches, StreamBatches, read_tokens, write_tokens
from sqrllm.prepare import prepare_text
from sqrllm.tokenizer import ByteTokenizer, CharTokenizer, StreamDecoder

ROOT = Path(__file__).resolve().parent.parent


def test_token_file_round_trip(tmp_path):
    for dtype in (np.uint8, np.uint16, np.uint32):
        ids = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, 1000).astype(dtype)
        write_tokens(tmp_path / "a.bin", ids)
        back = read_tokens(tmp_path / "a.bin")
        assert back.dtype.itemsize == ids.dtype.itemsize and np.array_equal(back, ids)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_token_file_over_4_gib_is_read(tmp_path):
    # 2**31 two-byte tokens: the header's size check multiplied in 32 bits and called the file truncated
    path = tmp_path / "big.bin"
    write_tokens(path, np.arange(8, dtype=np.uint16))
    header = bytearray(path.read_bytes()[:32])
    header[16:24] = (2**31).to_bytes(8, "little")
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(32 + 2**32)  # sparse: no disk used
    tokens = read_tokens(path)
    assert tokens.shape == (2**31,) and tokens.dtype == np.uint16 and tokens[-1] == 0


def test_bad_token_files_are_named(tmp_path):
    path = tmp_path / "train.bin"
    write_tokens(path, np.arange(100, dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(DataError, match="train.bin holds 197 bytes of tokens but its header says 100 x 2"):
        read_tokens(path)
    path.write_bytes(b"NOTATOKENFILE" + data[13:])
    with pytest.raises(DataError, match="not a sqrllm token file"):
        read_tokens(path)
    with pytest.raises(DataError, match="missing.bin not found; re-run"):
        read_tokens(tmp_path / "missing.bin")


@pytest.mark.parametrize("level", ["byte", "char"])
def test_prepare_text_round_trip(tmp_path, level):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("Hello, world! héllo ✓ 🙂\n" * 50, encoding="utf-8")
    (src / "b.txt").write_text("second file\n" * 30, encoding="utf-8")
    meta, replaced = prepare_text(tmp_path / "ds", [src], level=level, val_fraction=0.2)
    assert replaced == 0
    saved = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert saved == meta
    tok = ByteTokenizer() if level == "byte" else CharTokenizer(meta["tokenizer"]["chars"])
    text = (src / "a.txt").read_text() + (src / "b.txt").read_text()
    train = tok.decode(read_tokens(tmp_path / "ds" / "train.bin").tolist())
    val = tok.decode(read_tokens(tmp_path / "ds" / "val.bin").tolist())
    assert train + val == text
    assert meta["splits"]["val"]["bytes"] == len(val.encode())
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == (
        len(text.encode()) if level == "byte" else len(text))


def test_prepare_rejects_bad_input(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        prepare_text(tmp_path / "ds", [tmp_path / "empty.txt"])
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe more")
    with pytest.raises(DataError, match="bad.txt: invalid UTF-8 at byte offset 10"):
        prepare_text(tmp_path / "ds", [tmp_path / "bad.txt"])
    meta, replaced = prepare_text(tmp_path / "ds", [tmp_path / "bad.txt"], errors="replace")
    assert replaced == 2
    with pytest.raises(DataError, match="nope.txt not found"):
        prepare_text(tmp_path / "ds", [tmp_path / "nope.txt"])


def test_stream_batches_read_consecutive_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    b = StreamBatches(tokens, batch_size=4, block_size=10)
    x1, y1, reset1 = b.next()
    x2, y2, reset2 = b.next()
    assert reset1.all() and not reset2.any()
    assert np.array_equal(x1[:, 0].numpy(), [0, 249, 498, 747])  # each row its own quarter
    assert np.array_equal(y1.numpy(), x1.numpy() + 1)
    assert np.array_equal(x2.numpy(), x1.numpy() + 10)  # the next window of the same stream
    seen = [b.next() for _ in range(30)]
    assert any(r.all() for _, _, r in seen)  # streams wrap to their start and are flagged
    for x, _, _ in seen:
        assert (x.numpy() >= np.array([0, 249, 498, 747])[:, None]).all()
        assert (x.numpy() + 1 < np.array([249, 498, 747, 996])[:, None] + 1).all()


def test_stream_batches_cursor_round_trips():
    tokens = np.arange(500, dtype=np.uint16)
    a = StreamBatches(tokens, 3, 7)
    for _ in range(5):
        a.next()
    b = StreamBatches(tokens, 3, 7)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(u.numpy(), v.numpy()) for u, v in zip(a.next(), b.next()))
    with pytest.raises(DataError, match="keep batch_size"):
        StreamBatches(tokens, 4, 7).load_state_dict(a.state_dict())


def test_ranks_own_disjoint_streams():
    tokens = np.arange(1000, dtype=np.uint16)
    r0 = StreamBatches(tokens, 2, 5, rank=0, world_size=2).next()[0]
    r1 = StreamBatches(tokens, 2, 5, rank=1, world_size=2).next()[0]
    assert r0[:, 0].tolist() == [0, 249] and r1[:, 0].tolist() == [498, 747]


def test_split_too_short_is_an_error():
    with pytest.raises(DataError, match="lower batch_size or block_size"):
        StreamBatches(np.arange(50, dtype=np.uint8), batch_size=8, block_size=10)
    with pytest.raises(DataError, match="fewer than block_size"):
        RandomBatches(np.arange(5, dtype=np.uint8), 2, 10)
    with pytest.raises(DataError, match="fewer than burn_in \\+ block_size"):
        RandomBatches(np.arange(15, dtype=np.uint8), 2, 10, burn_in=8)


def test_random_batches_are_seeded_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16)
    a, b = RandomBatches(tokens, 4, 16, seed=3), RandomBatches(tokens, 4, 16, seed=3)
    assert np.array_equal(a.next()[0].numpy(), b.next()[0].numpy())
    state = a.state_dict()
    nxt = a.next()[0]
    b.load_state_dict(state)
    assert np.array_equal(b.next()[0].numpy(), nxt.numpy())


def test_random_batches_with_burn_in_hold_the_tokens_before_each_window():
    """burn_in = 8: rows of 8 + 16 tokens, y one ahead of x; about burn_in_rows of the rows keep the
    burned-in memory (reset False); without burn_in the windows and draws are as they were."""
    tokens = np.arange(10_000, dtype=np.uint16)
    plain, burnt = RandomBatches(tokens, 64, 16, seed=3), RandomBatches(tokens, 64, 16, seed=3, burn_in=8,
                                                                       burn_in_rows=0.25)
    x, y, reset = burnt.next()
    assert x.shape == y.shape == (64, 24) and torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(64, 23, dtype=torch.int64))  # consecutive tokens
    kept = sum(int((~burnt.next()[2]).sum()) for _ in range(50)) / (50 * 64)
    assert 0.2 < kept < 0.3
    assert plain.next()[2].all()  # no burn-in: every row starts from zero memory


def test_stream_decoder_holds_partial_utf8():
    tok = ByteTokenizer()
    dec = StreamDecoder(tok)
    pieces = [dec.feed(i) for i in tok.encode("a🙂b")]
    assert pieces == ["a", "", "", "", "🙂", "b"]
    assert dec.flush() == ""


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    assert tok.decode(tok.encode("cab")) == "cab"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")


def test_shakespeare_prepared_from_a_local_copy_needs_no_download_again(tmp_path, monkeypatch):
    # `prepare.py --input PATH` once; later `prepare.py && train.py ...` on a machine offline
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    copy = tmp_path / "tiny.txt"
    copy.write_text("A stand-in for the play: two lines of plain text.\nThe second of them, and so on.\n" * 20)
    with pytest.raises(DataError, match="could not download Tiny Shakespeare \\(no network\\); pass a local copy"):
        prepare.prepare_shakespeare_char(tmp_path / "fresh")

    class CutOff:  # a connection that closes before the whole file came
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            raise prepare.http.client.IncompleteRead(b"First Citizen", 1115381)

    monkeypatch.setattr(prepare.urllib.request, "urlopen", lambda *a, **kw: CutOff())
    with pytest.raises(DataError, match="could not download Tiny Shakespeare \\(IncompleteRead\\(13 bytes read"):
        prepare.prepare_shakespeare_char(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "input.txt").exists()
    made = prepare.prepare_shakespeare_char(tmp_path / "sc", copy)
    files = {f.name: f.read_bytes() for f in (tmp_path / "sc").iterdir()}
    assert prepare.prepare_shakespeare_char(tmp_path / "sc") == made
    assert {f.name: f.read_bytes() for f in (tmp_path / "sc").iterdir()} == files


def test_a_vocabulary_smaller_than_asked_is_noted(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("a short text, a short vocabulary: it holds few pieces.\n" * 50)
    meta, _ = prepare_text(tmp_path / "sp", [corpus], level="sentencepiece", vocab_size=8192)
    assert meta["vocab_size"] < 8192
    assert prepare.vocab_note(meta) == (f"note: the tokenizer has {meta['vocab_size']} pieces, not the 8192 asked: "
                                        "the training text holds no more (give more text for a larger vocabulary)")
    meta, _ = prepare_text(tmp_path / "char", [corpus], level="char")
    assert prepare.vocab_note(meta) is None


def test_a_failed_preparation_leaves_the_dataset_as_it_was(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("the first corpus, line after line\n" * 200)
    second.write_text("a second, other corpus: different words\n" * 200)
    out = tmp_path / "text"
    prepare_text(out, [first], level="sentencepiece", vocab_size=300)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(DataError, match="the val split is empty"):  # fails after training its tokenizer
        prepare_text(out, [second], level="sentencepiece", vocab_size=300, val_fraction=1e-7)
    junk = tmp_path / "junk.model"
    junk.write_text("not a SentencePiece model")
    with pytest.raises(DataError, match="is not a SentencePiece model"):
        prepare_text(out, [second], level="sentencepiece", tokenizer_model=junk)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    with pytest.raises(DataError, match="the val split is empty"):  # into a folder not there before: none after
        prepare_text(tmp_path / "fresh", [second], level="sentencepiece", vocab_size=300, val_fraction=1e-7)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["first.txt", "junk.model", "second.txt", "text"]
    prepare_text(out, [second], level="char")  # a new preparation replaces all of the old one's outputs
    assert sorted(f.name for f in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_dataset_name_is_one_plain_folder_name():
    assert prepare.dataset_name("my_corpus-2.v1") == "my_corpus-2.v1"
    for bad in ("", ".", "..", "a/b", "../x", ".hidden", "a b"):
        with pytest.raises(DataError, match="is not a folder name"):
            prepare.dataset_name(bad)


def test_one_long_line_trains_a_sentencepiece_model(tmp_path):
    # the trainer drops lines over 64 KiB; the text is given to it in parts instead
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    line = " ".join(words[(i * 7) % 8] + words[(i * 3) % 8] for i in range(12000))  # about 140 KB, no newline
    (tmp_path / "one_line.txt").write_text(line)
    meta, _ = prepare_text(tmp_path / "sp", [tmp_path / "one_line.txt"], level="sentencepiece", vocab_size=300)
    assert meta["vocab_size"] > 256 + 20  # pieces learned beyond the bytes and the characters


def test_sentencepiece_training_reads_no_more_than_max_bytes(tmp_path):
    from sqrllm.tokenizer import train_sentencepiece

    text = "".join(f"line {i} of a text that is one long document\n" for i in range(3000))  # about 140 KB
    seen = train_sentencepiece([text], tmp_path / "t.model", vocab_size=300, max_bytes=10_000)
    assert 10_000 <= seen["bytes"] < 10_100  # the cap is checked line by line, not once per document


def test_prepare_into_a_link_to_another_file_system(tmp_path):
    """The dataset is staged on the file system it ends on (a rename cannot cross file systems), and a
    second preparation replaces the first there."""
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than the test's tmp_path")
    target = Path(tempfile.mkdtemp(dir=shm))
    try:
        (tmp_path / "in.txt").write_text("to be or not to be\n" * 200)
        (tmp_path / "ds").symlink_to(target)
        prepare_text(tmp_path / "ds", [tmp_path / "in.txt"], level="byte")
        meta, _ = prepare_text(tmp_path / "ds", [tmp_path / "in.txt"], level="char")
        assert json.loads((target / "meta.json").read_text())["tokenizer"]["kind"] == "char"
        assert read_tokens(target / "train.bin").size == meta["splits"]["train"]["tokens"]
        assert not list(target.glob(".stage-*"))  # no staging folder left
    finally:
        shutil.rmtree(target)


def test_a_preparation_removes_what_a_killed_one_left(tmp_path):
    (tmp_path / "in.txt").write_text("to be or not to be\n" * 200)
    out = tmp_path / "ds"
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()  # its pid is now free
    host = prepare.stage_host()
    left = {name: out / f".stage-{name}" for name in
            (f"{host}-{killed.pid}-ab12", f"{host}-{os.getpid()}-cd34", f"elsewhere-{killed.pid}-ef56")}
    for stage in left.values():
        stage.mkdir(parents=True)
        (stage / "train.bin").write_bytes(b"\0" * 1000)
    prepare_text(out, [tmp_path / "in.txt"], level="byte")
    assert not left[f"{host}-{killed.pid}-ab12"].exists()  # its process is gone
    assert left[f"{host}-{os.getpid()}-cd34"].exists()  # a running preparation's
    assert left[f"elsewhere-{killed.pid}-ef56"].exists()  # another host's: its process cannot be asked
    assert sorted(p.name for p in out.glob(".stage-*")) == sorted(p.name for p in list(left.values())[1:])


def test_folders_are_walked_without_their_hidden_files(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("kept\n")
    (tmp_path / "notes" / ".git").mkdir()
    (tmp_path / "notes" / ".git" / "index").write_bytes(b"\xff\xfe binary")
    (tmp_path / "notes" / ".DS_Store").write_bytes(b"\x00\x01")
    text, files, _ = prepare.read_text_inputs([tmp_path / "notes"])
    assert text == "kept\n" and files == [tmp_path / "notes" / "a.txt"]


def test_builtin_prepare_answers_help_without_preparing(tmp_path):
    """`python data/builtin/prepare.py --help` prints its usage and writes nothing (it has no options)."""
    script = tmp_path / "prepare.py"  # it prepares into its own folder: a copy prepares into tmp_path
    shutil.copy(ROOT / "data" / "builtin" / "prepare.py", script)
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepare.py"]
