"""Sharded token files read as one sequence through memmaps, and the memory reset at end-of-text
tokens (documents) in the model and the training loop."""

import json

import numpy as np
import pytest
import torch

from sqrllm.config import load_config
from sqrllm.data import (HEADER_SIZE, MAGIC, DataError, RandomBatches, ShardedTokens, StreamBatches, read_split,
                         read_tokens, write_meta, write_tokens)
from sqrllm.model import SqrLLM
from sqrllm.prepare import ShardWriter
from sqrllm.trainer import load_dataset, train

SIZES = [7, 1, 13, 5, 40]  # shard lengths: some shorter than a window, one of a single token


@pytest.fixture
def shards(tmp_path):
    whole = np.arange(sum(SIZES), dtype=np.uint16) * 3
    bounds = np.cumsum([0] + SIZES)
    names = []
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        names.append(f"train-{k:05d}.bin")
        write_tokens(tmp_path / names[-1], whole[lo:hi])
    write_tokens(tmp_path / "val.bin", whole[:10])
    meta = {"vocab_size": 65536, "splits": {"train": {"shards": names}, "val": {}}}
    return whole, ShardedTokens([read_tokens(tmp_path / n) for n in names]), meta, tmp_path


def test_reads_across_shard_boundaries(shards):
    whole, tokens, _, _ = shards
    assert len(tokens) == len(whole) and all(isinstance(s, np.memmap) for s in tokens.shards)
    for lo in range(len(whole)):
        for n in (1, 2, 9, 30):
            assert np.array_equal(tokens[lo : lo + n], whole[lo : lo + n])
    idx = np.random.default_rng(0).integers(0, len(whole), (4, 17))
    assert np.array_equal(tokens[idx], whole[idx]) and tokens[idx].dtype == np.uint16
    assert np.array_equal(tokens[::7], whole[::7]) and len(tokens[5:5]) == 0
    with pytest.raises(IndexError):
        tokens[np.array([len(whole)])]


def test_batchers_see_the_shards_as_one_sequence(shards):
    whole, tokens, _, _ = shards
    a, b = StreamBatches(tokens, 3, 5), StreamBatches(whole, 3, 5)
    for _ in range(12):
        for u, v in zip(a.next(), b.next()):
            assert torch.equal(u, v)
    a, b = RandomBatches(tokens, 4, 6, seed=1), RandomBatches(whole, 4, 6, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a.next(), b.next()))


def test_read_split_checks_every_shard(shards):
    whole, _, meta, folder = shards
    assert np.array_equal(read_split(folder, meta, "train")[:], whole)
    assert np.array_equal(read_split(folder, meta, "val"), whole[:10])  # no shard list: val.bin
    with pytest.raises(DataError, match="train-00002.bin holds token id 60 but the tokenizer.s vocab_size is 55"):
        read_split(folder, {**meta, "vocab_size": 55}, "train")
    data = (folder / "train-00003.bin").read_bytes()
    (folder / "train-00003.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match="train-00003.bin holds 8 bytes of tokens but its header says 5 x 2"):
        read_split(folder, meta, "train")


def test_shard_writer_cuts_at_shard_tokens_and_removes_stale_shards(tmp_path):
    write_tokens(tmp_path / "train-00007.bin", np.zeros(3, np.uint16))  # left by an earlier, larger prepare
    w = ShardWriter(tmp_path, "train", 10, np.uint16)
    for n in (4, 4, 15, 1, 2):
        w.add(np.arange(n, dtype=np.uint16))
    names = w.close()
    assert names == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert not (tmp_path / "train-00007.bin").exists()
    got = np.concatenate([read_tokens(tmp_path / n) for n in names])
    assert [len(read_tokens(tmp_path / n)) for n in names] == [10, 10, 6]
    assert np.array_equal(got, np.concatenate([np.arange(n) for n in (4, 4, 15, 1, 2)]))
    head = (tmp_path / names[0]).read_bytes()[:HEADER_SIZE]
    assert head[:8] == MAGIC and np.frombuffer(head[16:24], "<u8")[0] == 10


EOT = 1


def test_memory_restarts_at_end_of_text():
    torch.manual_seed(0)
    model = SqrLLM(16, n_layer=2, n_embd=16, mlp_every=1).eval()
    a = torch.tensor([[5, 6, 7, EOT, 9, 10, 11]])
    b = torch.tensor([[12, 3, EOT, 9, 10, 11]])  # another document before the same one
    carried = [torch.randn(1, 16) for _ in range(2)]
    logits_a, _, _ = model(a)
    logits_b, _, _ = model(b)
    assert not torch.allclose(logits_a[:, -3:], logits_b[:, -3:])  # without resets the past leaks in
    model.reset_token = EOT
    logits_a, _, state_a = model(a, state=carried)
    logits_b, _, state_b = model(b)
    assert torch.allclose(logits_a[:, -4:], logits_b[:, -4:], atol=1e-6)  # from the end-of-text on: the same
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(state_a, state_b))
    assert not torch.allclose(logits_a[:, 0], model(a)[0][:, 0])  # before it, the carried memory is read
    # the reset is within a window, at any row and position, and token by token the same
    x = torch.tensor([[EOT, 4, 4, EOT, 2], [3, 3, 3, 3, EOT]])
    whole, _, _ = model(x)
    state, steps = None, []
    for t in range(x.shape[1]):
        out, _, state = model(x[:, t : t + 1], state=state)
        steps.append(out)
    assert torch.allclose(whole, torch.cat(steps, 1), atol=1e-5)


def documents_dataset(root, eot=True):
    """A dataset of documents (byte ids): each a run of one repeated id, then end-of-text (or not);
    train in two shards."""
    rng = np.random.default_rng(0)
    ids = []
    for _ in range(600):
        word = int(rng.integers(2, 6))
        ids += [word] * int(rng.integers(3, 12)) + ([EOT] if eot else [])
    ids = np.array(ids, dtype=np.uint8)
    folder = root / "docs"
    cut = int(len(ids) * 0.9)
    write_tokens(folder / "train-00000.bin", ids[: cut // 2])
    write_tokens(folder / "train-00001.bin", ids[cut // 2 : cut])
    write_tokens(folder / "val.bin", ids[cut:])
    meta = {"format": 1, "tokenizer": {"kind": "byte"}, "vocab_size": 256,
            "splits": {"train": {"tokens": cut, "bytes": cut, "shards": ["train-00000.bin", "train-00001.bin"]},
                       "val": {"tokens": len(ids) - cut, "bytes": len(ids) - cut}}, "source": {"name": "docs"}}
    if eot:
        meta["eot_id"] = EOT
    write_meta(folder, meta)
    return folder


def tiny(root, *extra):
    return load_config([f"--data_dir={root}", "--dataset=docs", f"--out_dir={root / 'run'}", "--n_layer=1",
                        "--n_embd=16", "--batch_size=4", "--block_size=16", "--max_iters=4", "--eval_interval=0",
                        "--eval_max_tokens=200", "--progress=false", "--num_threads=1", "--compile=false", *extra])


def test_training_resets_memory_at_end_of_text(tmp_path, monkeypatch):
    documents_dataset(tmp_path)
    meta, train_tokens, _ = load_dataset(tiny(tmp_path))
    assert isinstance(train_tokens, ShardedTokens) and meta["eot_id"] == EOT
    seen = []
    forward = SqrLLM.forward

    def spy(self, idx, *args, **kwargs):
        seen.append(self.reset_token)
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(SqrLLM, "forward", spy)
    train(tiny(tmp_path, "--reset_at_eot=true"))
    assert seen and set(seen) == {EOT}  # training and evaluation
    seen.clear()
    train(tiny(tmp_path, "--reset_at_eot=false", f"--out_dir={tmp_path / 'run2'}"))
    assert set(seen) == {None}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["reset_at_eot"] is True


def test_reset_at_eot_needs_documents_and_a_sqrll_model(tmp_path):
    documents_dataset(tmp_path, eot=False)
    with pytest.raises(DataError, match="has no end-of-text token"):
        train(tiny(tmp_path, "--reset_at_eot=true"))
    documents_dataset(tmp_path)
    with pytest.raises(DataError, match="needs model='sqrll'"):
        train(tiny(tmp_path, "--reset_at_eot=true", "--model=gpt", "--n_head=2"))


def test_export_knows_the_new_keys():
    # reset_at_eot exports (tests/test_export.py::test_memory_restarts_at_end_of_text_as_in_training)
    from sqrllm.export import check_config

    check_config(load_config([]).to_dict())
    check_config(load_config(["--reset_at_eot=true"]).to_dict())


@pytest.mark.parametrize("name", ["tinystories", "fineweb_edu"])
def test_real_data_configs_load(name):
    cfg = load_config([f"configs/{name}.py"])
    assert cfg.dataset == name and cfg.out_dir == f"out/{name}" and cfg.reset_at_eot and cfg.batching == "stream"
