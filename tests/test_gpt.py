"""The GPT baseline: causal, the trainer's signature, trainable through the same loop."""

import json

import pytest
import torch

from sqrllm.config import ConfigError, load_config
from sqrllm.gpt import GPT
from sqrllm.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gpt_is_causal_and_keeps_the_signature():
    torch.manual_seed(0)
    model = GPT(50, block_size=16, n_layer=2, n_head=4, n_embd=32).eval()
    idx = torch.randint(0, 50, (2, 16))
    logits, loss, state = model(idx, idx)
    assert logits.shape == (2, 16, 50) and loss.isfinite() and state == []
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    later, _, _ = model(changed)
    torch.testing.assert_close(later[:, :10], logits[:, :10])  # no position sees the future
    assert not torch.allclose(later[:, 10:], logits[:, 10:])
    last, _, _ = model(idx, state=[torch.zeros(2, 32)], last_only=True)  # state is ignored
    torch.testing.assert_close(last, logits[:, -1:])
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_config_needs_heads_that_divide_the_width():
    with pytest.raises(ConfigError, match="multiple of n_head"):
        load_config(["--model=gpt", "--n_embd=32", "--n_head=3"])
    with pytest.raises(ConfigError, match="'sqrll', 'gpt'"):
        load_config(["--model=lstm"])


def test_trainer_trains_the_gpt(data_dir, tmp_path):
    out = tmp_path / "run"
    train(load_config([f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out}", "--model=gpt", "--n_head=2",
                       "--n_layer=2", "--n_embd=32", "--batch_size=8", "--block_size=32", "--max_iters=60",
                       "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=5", "--log_interval=10",
                       "--eval_interval=0", "--progress=false", "--num_threads=1"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert rows[-1]["val_loss"] < 2.5
    assert "val_loss_stream" not in rows[-1]  # no memory to stream (eval_stream is on by default)
    assert all(r["grad_norm"] > 0 and r["tok_per_s"] > 0 for r in rows if "loss" in r)
