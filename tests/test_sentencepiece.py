"""SentencePiece: trained by the prepare step so that any UTF-8 text round-trips exactly; an existing
.model is accepted; byte counts make bits per byte right; a checkpoint folder alone is enough for
sample.py and the exporter; the exported C++ tokenizer gives the same ids."""

import ctypes
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqrllm.config import load_config
from sqrllm.data import read_split, read_tokens
from sqrllm.prepare import prepare_documents, prepare_text, sentencepiece_for
from sqrllm.tokenizer import SentencePieceTokenizer, StreamDecoder, TokenizerError, from_meta, train_sentencepiece
from sqrllm.trainer import bits_per_byte, train

spm = pytest.importorskip("sentencepiece")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

# characters a corpus has and a test string may hold: ASCII, Latin, Greek, CJK, emoji with
# modifiers, characters NFKC would change (ﬁ, Ａ, ①), spaces of other kinds, control characters
ALPHABET = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"-_()[]{}\n\t  ")
            + list("éüßñπλ≈—“”中文字日本語한국어😀👍🏽🇫🇷ﬁＡ①㍿\u00a0\u3000\u200b\ufeff\x00\x01\x1b\x7f\r\u0301\u2581"))
CASES = ["", " ", "  two  spaces  ", "\n\n\n", "▁", "a▁b ▁▁ c▁", " leading and trailing ", "x" * 500,
         "emoji 🙂👍🏽🏳️‍🌈 CJK 中文字 한국어 \x00\x01\x7f\t\r\n", "ﬁ Ａ ① ㍿ e\u0301 \ufeffBOM", "12345678901234567890",
         "<|endoftext|> <unk> <0x41> </s>", "\U0010ffff \U0001f9ea \u0800 \x80"]


def words(rng, n):
    return "".join(rng.choice(ALPHABET, size=n))


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    english = "the quick brown fox jumps over the lazy dog; it was 1984 and 42 were there.\n"
    return [english * 3 + words(rng, 200) + "\n中文字 日本語 😀\n" for _ in range(200)]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(corpus, tmp_path_factory, request):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    seen = train_sentencepiece(corpus, path, vocab_size=600, model_type=request.param)
    assert seen["lines"] > 0 and seen["bytes"] > 0
    return SentencePieceTokenizer(path)


def test_any_utf8_round_trips(tok):
    rng = np.random.default_rng(1)
    texts = CASES + [words(rng, int(rng.integers(1, 80))) for _ in range(300)]
    # code points from every plane, surrogates excepted (not UTF-8)
    texts += ["".join(chr(c) for c in rng.integers(1, 0x110000, 30) if not 0xD800 <= c < 0xE000) for _ in range(50)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        dec = StreamDecoder(tok)
        assert "".join(dec.feed(i) for i in ids) + dec.flush() == text  # what sample.py streams
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_settings_and_special_ids(tok):
    assert tok.vocab_size == 600 and tok.eot_id == 1
    assert tok.sp.id_to_piece(1) == "<|endoftext|>" and tok.token_bytes(1) == b""
    assert [tok.token_bytes(i) for i in range(2, 258)] == [bytes([b]) for b in range(256)]
    assert tok.encode("a ") != tok.encode("a") and tok.encode(" a")[0] != tok.encode("a")[0]  # no dummy prefix
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("12345")]
    assert all(len(p) == 1 for p in digits) or all(p.startswith("<0x") for p in digits)  # split digits
    ids = tok.encode_batch(["ab", "c▁"], eot=True)
    assert ids[0][-1] == 1 and ids[1][-1] == 1 and tok.decode(ids[0] + ids[1]) == "abc▁"
    assert tok.to_meta() == {"kind": "sentencepiece", "model_file": "tokenizer.model"}


def test_from_meta_looks_in_the_folder(tok, tmp_path):
    assert from_meta(tok.to_meta(), tok.path.parent).encode("hello") == tok.encode("hello")
    with pytest.raises(TokenizerError, match="tokenizer.model not found; a dataset folder holds it"):
        from_meta(tok.to_meta(), tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        from_meta(tok.to_meta(), tmp_path)


def test_vocab_too_large_for_the_text(tmp_path):
    with pytest.raises(TokenizerError, match="lower vocab_size or give more text"):
        train_sentencepiece(["tiny text"], tmp_path / "t.model", vocab_size=5000, model_type="bpe")
    train_sentencepiece(["tiny text"], tmp_path / "u.model", vocab_size=5000, model_type="unigram")
    assert 258 < SentencePieceTokenizer(tmp_path / "u.model").vocab_size < 5000  # as many pieces as the text has


def test_prepare_text_sentencepiece_round_trips_and_counts_bytes(tmp_path):
    animals = ["cat", "dog", "heron", "otter", "lynx", "wren", "mole", "newt", "toad", "hare", "yak"]
    text = "".join(f"Line {i}: naïve café, 東京 🙂 the {animals[i % 11]} met a {animals[i * 7 % 11]} {i * 7919}\n"
                   for i in range(600))
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta, _ = prepare_text(tmp_path / "ds", [tmp_path / "in.txt"], level="sentencepiece", vocab_size=300,
                           val_fraction=0.1)
    assert meta["tokenizer"] == {"kind": "sentencepiece", "model_file": "tokenizer.model"}
    assert meta["vocab_size"] == 300 and meta["source"]["tokenizer"]["trained"]["model_type"] == "unigram"
    tok = from_meta(meta["tokenizer"], tmp_path / "ds")
    train_text = tok.decode(read_tokens(tmp_path / "ds" / "train.bin").tolist())
    val_text = tok.decode(read_tokens(tmp_path / "ds" / "val.bin").tolist())
    assert train_text + val_text == text
    for split, part in (("train", train_text), ("val", val_text)):
        assert meta["splits"][split]["bytes"] == len(part.encode("utf-8"))
        assert meta["splits"][split]["tokens"] == len(read_tokens(tmp_path / "ds" / f"{split}.bin"))


def test_an_existing_model_file_is_used_as_it_is(corpus, tmp_path):
    (tmp_path / "c.txt").write_text("".join(corpus))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "mine"),
                                   vocab_size=700, model_type="unigram", byte_fallback=True, minloglevel=2)
    (tmp_path / "in.txt").write_text("hello world, again and again\n" * 40)
    meta, _ = prepare_text(tmp_path / "ds", [tmp_path / "in.txt"], level="sentencepiece",
                           tokenizer_model=tmp_path / "mine.model")
    assert (tmp_path / "ds" / "tokenizer.model").read_bytes() == (tmp_path / "mine.model").read_bytes()
    assert meta["source"]["tokenizer"] == {"model": str(tmp_path / "mine.model")}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "mine.model"))
    assert read_tokens(tmp_path / "ds" / "train.bin").tolist()[:6] == sp.encode("hello world, again and again\n")[:6]


def test_bits_per_byte_hand_computed(tmp_path):
    # 4 tokens over 10 bytes, each predicted with probability 1/16: 4 bits a token, 1.6 bits a byte
    meta = {"splits": {"val": {"tokens": 4, "bytes": 10}}}
    assert bits_per_byte(math.log(16), meta) == pytest.approx(1.6)
    # a SentencePiece val split of one document: its bytes are the text's UTF-8 bytes, by hand
    # "naïve" 6 + " " 1 + "café" 5 + " " 1 + "🙂" 4 = 17 (the end-of-text token adds a token, no byte)
    sentencepiece_for(tmp_path, ["naïve café 🙂 and more text\n" * 50], vocab_size=300, model_type="bpe")
    docs = [("train", "naïve café 🙂 and more text")] * 20 + [("val", "naïve café 🙂")]
    meta = prepare_documents(tmp_path, docs, {"name": "t"}, progress=False)
    val = meta["splits"]["val"]
    assert val["bytes"] == 17 and val["documents"] == 1
    tokens = len(read_split(tmp_path, meta, "val"))
    assert val["tokens"] == tokens == len(from_meta(meta["tokenizer"], tmp_path).encode("naïve café 🙂")) + 1
    assert bits_per_byte(2.0, meta) == pytest.approx(2.0 / math.log(2) * tokens / 17)


@pytest.fixture(scope="module")
def moved_checkpoint(tmp_path_factory):
    """A tiny model trained on a SentencePiece dataset; ckpt.pt and tokenizer.model copied to a
    folder of their own, the dataset and run folders deleted."""
    root = tmp_path_factory.mktemp("spckpt")
    (root / "in.txt").write_text("".join(f"the cat sat on the mat number {i}.\n" for i in range(400)))
    prepare_text(root / "data" / "sp", [root / "in.txt"], level="sentencepiece", vocab_size=300)
    train(load_config([f"--data_dir={root / 'data'}", "--dataset=sp", f"--out_dir={root / 'run'}", "--n_layer=2",
                       "--n_embd=32", "--batch_size=8", "--block_size=32", "--max_iters=60", "--eval_interval=0",
                       "--eval_stream=false", "--learning_rate=1e-2", "--warmup_iters=5", "--progress=false",
                       "--num_threads=1", "--compile=false"]))
    assert (root / "run" / "tokenizer.model").read_bytes() == (root / "data" / "sp" / "tokenizer.model").read_bytes()
    alone = root / "alone"
    alone.mkdir()
    shutil.copyfile(root / "run" / "ckpt.pt", alone / "ckpt.pt")
    shutil.copyfile(root / "run" / "tokenizer.model", alone / "tokenizer.model")
    shutil.rmtree(root / "data")
    shutil.rmtree(root / "run")
    return alone / "ckpt.pt"


def test_checkpoint_folder_alone_is_enough_for_sample_py(moved_checkpoint, tmp_path):
    cmd = [sys.executable, str(ROOT / "sample.py"), f"--ckpt={moved_checkpoint}", "--prompt=the cat",
           "--max_new_tokens=40", "--temperature=0", "--device=cpu"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)  # not the repo: no data/ around
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("the cat") and "sat on the mat" in run.stdout
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(moved_checkpoint, lonely / "ckpt.pt")
    run = subprocess.run([*cmd[:2], f"--ckpt={lonely / 'ckpt.pt'}", *cmd[3:]], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "tokenizer.model not found" in run.stderr


def test_sample_py_refuses_a_tokenizer_model_that_is_not_the_runs(moved_checkpoint, tok, tmp_path):
    """Another run's tokenizer.model beside the checkpoint, or an empty file, is one error line (not text
    decoded through the wrong pieces, then an IndexError)."""
    shutil.copyfile(moved_checkpoint, tmp_path / "ckpt.pt")
    for model, message in [(tok.path.read_bytes(), f"{tmp_path / 'tokenizer.model'} is not the SentencePiece "
                                                    f"model {tmp_path / 'ckpt.pt'} was trained with (sha256 "),
                           (b"", f"{tmp_path / 'tokenizer.model'} is not a SentencePiece model (it has no pieces)")]:
        (tmp_path / "tokenizer.model").write_bytes(model)
        with pytest.raises(SystemExit) as e:
            sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--device=cpu"])
        assert str(e.value.code).startswith(f"error: {message}")


def test_sample_py_names_a_prompt_that_is_not_utf8(moved_checkpoint, tmp_path):
    """A byte that is not UTF-8 reaches Python as a lone surrogate: one error line for a prompt, and a
    note that keeps an interactive session going."""
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={moved_checkpoint}", "--prompt=the \udcff cat", "--device=cpu"])
    assert str(e.value.code) == ("error: prompt: the text is not valid UTF-8: character 4 is the lone surrogate "
                                 "'\\udcff' (the byte 0xff of text that is not UTF-8); pass UTF-8 text")
    run = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"--ckpt={moved_checkpoint}", "--interactive",
                          "--temperature=0", "--max_new_tokens=8", "--device=cpu"],
                         input=b"the \xff cat\nthe cat\n", capture_output=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert b"is not valid UTF-8" in run.stderr and run.stdout.strip()  # the second line was answered


def test_checkpoint_folder_alone_is_enough_for_export(moved_checkpoint, tmp_path):
    from sqrllm.export import export_checkpoint

    done = export_checkpoint(moved_checkpoint, tmp_path / "build")
    assert done["tokenizer"] == "sentencepiece" and (tmp_path / "build" / "model.cpp").is_file()


def test_exported_cpp_tokenizer_gives_the_same_ids(tok, tmp_path):
    """The exporter's C++ encoder reads the .model this prepare step trains and agrees with it
    (text without U+2581, which the Python side alone treats specially)."""
    if shutil.which("c++") is None or shutil.which("make") is None:
        pytest.skip("c++ and make build the exported tokenizer")
    from sqrllm.export import export
    from sqrllm.model import SqrLLM

    export(SqrLLM(tok.vocab_size, n_layer=1, n_embd=8), tok.to_meta(), tmp_path / "build", base_dir=tok.path.parent)
    run = subprocess.run(["make", "-s", "-C", str(tmp_path / "build"), "lib", "CXXFLAGS=-O1"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    lib = ctypes.CDLL(str(tmp_path / "build" / "libsqrllm.so"))
    rng = np.random.default_rng(2)
    texts = [t for t in CASES if "\u2581" not in t] + [words(rng, int(rng.integers(1, 60))).replace("\u2581", "")
                                                         for _ in range(100)]
    for text in texts:
        data = text.encode("utf-8")
        ids = (ctypes.c_int * (4 * len(data) + 8))()
        n = lib.sq_encode(data, len(data), ids, len(ids))
        assert list(ids[:n]) == tok.encode(text), text
