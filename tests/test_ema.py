"""ema_decay: evaluations and the checkpoint's "model" are the average of the weights, training itself
is untouched, and a resumed run goes on bitwise, average included."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from sqrllm import checkpoint, optim, trainer
from sqrllm.config import ConfigError, load_config
from sqrllm.model import SqrLLM
from sqrllm.trainer import train

N = 8  # the resume runs: 2N steps in one go == N, then N more resumed (N a multiple of eval_interval)
# dropout on, memory carried across batches, deterministic mode, evaluations (and checkpoints) mid-run
ARGS = ["--dataset=tiny", "--n_layer=2", "--n_embd=16", "--batch_size=4", "--block_size=16", "--dropout=0.1",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=2", f"--lr_decay_iters={2 * N}", "--log_interval=2",
        "--eval_interval=4", "--eval_max_tokens=200", "--eval_batch_size=8", "--deterministic=true",
        "--progress=false", "--num_threads=1", "--device=cpu"]
EMA = ["--ema_decay=0.8", "--ema_start=1"]
NOISE = ("elapsed", "tok_per_s", "mfu", "mem_gib")  # timing columns of metrics.jsonl


def config(data_dir, out_dir, *extra):
    return load_config([f"--data_dir={data_dir}", f"--out_dir={out_dir}", *ARGS, *extra])


def run(data_dir, out_dir, *extra):
    train(config(data_dir, out_dir, *extra))
    return checkpoint.load(out_dir)


def rows(out_dir, kind):
    """metrics.jsonl's rows holding `kind` ("loss" or "val_loss"), without the timing columns."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k not in NOISE} for r in map(json.loads, lines) if kind in r]


def same(a, b):
    """Equal to the bit: tensors, and dicts and lists holding them (the checkpoint's config aside)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        a, b = ({k: v for k, v in d.items() if k != "config"} for d in (a, b))
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def plain(data_dir, tmp_path_factory):
    """2N steps without EMA."""
    out = tmp_path_factory.mktemp("plain") / "run"
    return out, run(data_dir, out, f"--max_iters={2 * N}")


@pytest.fixture(scope="module")
def averaged(data_dir, tmp_path_factory):
    """The same 2N steps with EMA."""
    out = tmp_path_factory.mktemp("ema") / "run"
    return out, run(data_dir, out, f"--max_iters={2 * N}", *EMA)


def test_off_by_default_and_on_it_leaves_training_alone(plain, averaged):
    (plain_dir, p), (ema_dir, e) = plain, averaged
    assert "model_raw" not in p and p["config"]["ema_decay"] == 0.0
    assert same(e["model_raw"], p["model"]) and same(e["optimizer"], p["optimizer"]) and same(e["rng"], p["rng"])
    assert rows(ema_dir, "loss") == rows(plain_dir, "loss")
    assert not same(e["model"], p["model"])
    assert e["model"]["lm_head.weight"] is e["model"]["wte.weight"]  # tied: one averaged tensor
    ema_val, plain_val = rows(ema_dir, "val_loss"), rows(plain_dir, "val_loss")
    assert [r["step"] for r in ema_val] == [r["step"] for r in plain_val] == [4, 8, 12, 16]
    assert all(a["val_loss"] != b["val_loss"] for a, b in zip(ema_val, plain_val))


@pytest.mark.parametrize("start", [0, 2])
def test_saved_model_is_the_average_of_the_steps(data_dir, tmp_path, monkeypatch, start):
    """decay 0.5, 3 steps: the average recomputed from the weights after each optimizer step."""
    from_config, step, models, seen = SqrLLM.from_config, optim.AdamW.step, [], []

    def build(cls, cfg, vocab_size):
        models.append(from_config(cfg, vocab_size))
        return models[-1]

    def step_and_record(self):
        if not seen:  # the initial weights, before the first step
            seen.append({k: v.clone() for k, v in models[0].state_dict().items()})
        step(self)
        seen.append({k: v.clone() for k, v in models[0].state_dict().items()})

    monkeypatch.setattr(SqrLLM, "from_config", classmethod(build))
    monkeypatch.setattr(optim.AdamW, "step", step_and_record)
    ckpt = run(data_dir, tmp_path / "run", "--max_iters=3", "--eval_interval=0", "--ema_decay=0.5",
               f"--ema_start={start}")
    assert len(seen) == 4
    expected = seen[0]
    for k, weights in enumerate(seen[1:], 1):
        expected = weights if k <= start else {n: 0.5 * expected[n] + 0.5 * w for n, w in weights.items()}
    assert ckpt["model"].keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=0, atol=1e-7)
        assert torch.equal(ckpt["model_raw"][name], seen[-1][name])


def test_val_loss_is_of_the_saved_average(data_dir, averaged, tmp_path):
    out, ckpt = averaged
    cfg = config(data_dir, out)
    _, _, val = trainer.load_dataset(cfg)
    model, _, _ = checkpoint.load_model(out)  # what sample.py and export read
    last = rows(out, "val_loss")[-1]
    assert last["step"] == ckpt["step"]
    assert trainer.evaluate(model, val, cfg, "cpu", torch.float32, stream=False) == last["val_loss"]
    model.load_state_dict(ckpt["model_raw"])
    assert trainer.evaluate(model, val, cfg, "cpu", torch.float32, stream=False) != last["val_loss"]
    again = tmp_path / "run"
    shutil.copytree(out, again)
    row = train(config(data_dir, again, "--init_from=resume", "--eval_only=true", *EMA))  # evaluates the average
    assert row["val_loss"] == last["val_loss"]


def test_eval_only_without_ema_decay_evaluates_the_saved_average(data_dir, averaged, tmp_path, capsys):
    """--eval_only evaluates the checkpoint's "model" (the average) even when the run's --ema_decay is
    not given again, not the raw weights it would train on from."""
    out, _ = averaged
    again = tmp_path / "run"
    shutil.copytree(out, again)
    capsys.readouterr()
    row = train(config(data_dir, again, "--init_from=resume", "--eval_only=true"))
    assert row["val_loss"] == rows(out, "val_loss")[-1]["val_loss"]
    assert "the average is dropped" not in capsys.readouterr().out


def test_resume_with_ema_is_bitwise_exact(data_dir, averaged, tmp_path):
    ref_dir, ref = averaged
    out = tmp_path / "run"
    run(data_dir, out, f"--max_iters={N}", *EMA)
    resumed = run(data_dir, out, f"--max_iters={2 * N}", "--init_from=resume", *EMA)
    assert same(resumed, ref)  # the average, the raw weights, optimizer, memory, cursor, RNG states
    assert rows(out, "loss") == rows(ref_dir, "loss") and rows(out, "val_loss") == rows(ref_dir, "val_loss")


def test_switching_ema_on_or_off_at_a_resume(data_dir, plain, tmp_path, capsys):
    """Training goes on from the raw weights either way; each switch is said at the start."""
    _, ref = plain
    off = tmp_path / "off"
    run(data_dir, off, f"--max_iters={N}", *EMA)
    capsys.readouterr()
    after = run(data_dir, off, f"--max_iters={2 * N}", "--init_from=resume")
    assert "ema_decay is 0 but the checkpoint holds an average" in capsys.readouterr().out
    assert "model_raw" not in after and same(after["model"], ref["model"])
    on = tmp_path / "on"
    run(data_dir, on, f"--max_iters={N}")
    after = run(data_dir, on, f"--max_iters={2 * N}", "--init_from=resume", *EMA)
    out = capsys.readouterr().out
    assert "EMA of the weights on (ema_decay 0.8" in out and "the average starts from the resumed weights" in out
    assert same(after["model_raw"], ref["model"]) and not same(after["model"], ref["model"])


@pytest.mark.parametrize("arg, message", [
    ("--ema_decay=1", r"ema_decay must be in \[0, 1\), got 1.0; 0 turns the average off"),
    ("--ema_decay=-0.5", r"ema_decay must be in \[0, 1\), got -0.5"),
    ("--ema_decay=nan", r"ema_decay must be in \[0, 1\), got nan"),
    ("--ema_start=-1", "ema_start must be >= 0, got -1"),
])
def test_bad_ema_settings_name_the_knob(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config([arg])
