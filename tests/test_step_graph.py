"""cuda_graph=True: training micro-steps replayed from a CUDA graph compute what eager steps compute.

The GPU tests run where CUDA is (`pytest -m gpu tests/test_step_graph.py` on the device machine);
the CPU tests cover when a run asks for a graph and what it says when it cannot have one."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sqrllm.config import load_config
from sqrllm.step_graph import graph_wanted
from sqrllm.trainer import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def config(data_dir, out_dir, *extra):
    return load_config([
        f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", "--n_layer=2", "--n_embd=32",
        "--batch_size=8", "--block_size=32", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=5",
        "--log_interval=1", "--eval_interval=10", "--progress=false", "--num_threads=1", "--compile=false",
        "--dropout=0.1", *extra])


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_a_graph_is_for_one_cuda_process():
    cfg = SimpleNamespace(cuda_graph=True)
    assert graph_wanted(cfg, "cuda:0", distributed=False) == (True, None)
    assert graph_wanted(cfg, "cpu", distributed=False) == (False, None)  # CPU runs stay eager, as with compile
    assert graph_wanted(SimpleNamespace(cuda_graph=False), "cuda", distributed=True) == (False, None)
    graphed, note = graph_wanted(cfg, "cuda", distributed=True)  # under torchrun: eager, and the log says so
    assert not graphed and "torchrun" in note


def test_cpu_run_with_cuda_graph_trains_eagerly(data_dir, tmp_path):
    """A GPU config run on a CPU: same losses as without the flag."""
    runs = {flag: tmp_path / flag for flag in ("true", "false")}
    for flag, out in runs.items():
        train(config(data_dir, out, "--max_iters=6", "--device=cpu", f"--cuda_graph={flag}"))
    assert losses(runs["true"]) == losses(runs["false"])


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("extra", [
    ("--batching=random", "--dtype=float32"),
    ("--batching=stream", "--dtype=float32", "--gradient_accumulation_steps=2"),
    ("--batching=stream", "--dtype=bfloat16", "--ema_decay=0.9"),
    ("--model=gpt", "--n_head=2", "--dtype=bfloat16"),
    ("--batching=random", "--dtype=float16"),
    ("--batching=random", "--dtype=float32", "--burn_in=8"),
    ("--batching=random", "--dtype=float32", "--drop_path=0.2"),
    ("--batching=stream", "--dtype=bfloat16", "--zoneout=0.1"),
], ids=["random", "stream-accum2", "stream-bf16-ema", "gpt", "fp16-scaler", "burn-in", "drop-path", "zoneout"])
def test_graphed_steps_train_as_eager_steps(data_dir, tmp_path, extra):
    """30 steps with dropout: every logged train loss and val loss as the eager run's (the same
    kernels on the same inputs and the same dropout draws; matrix products may pick other algorithms
    inside a graph, hence a tolerance rather than equality)."""
    runs = {flag: tmp_path / flag for flag in ("true", "false")}
    for flag, out in runs.items():
        train(config(data_dir, out, "--max_iters=30", "--device=cuda", f"--cuda_graph={flag}", *extra))
    (train_g, val_g), (train_e, val_e) = losses(runs["true"]), losses(runs["false"])
    assert len(train_g) == len(train_e) == 30 and len(val_g) == len(val_e) == 3
    tol = 1e-4 if "--dtype=float32" in extra else 1e-2
    assert train_g == pytest.approx(train_e, rel=tol)
    assert val_g == pytest.approx(val_e, rel=tol)
    assert train_g[-1] < 0.7 * train_g[0]


@needs_cuda
@pytest.mark.gpu
def test_graphed_run_resumes_as_if_uninterrupted(data_dir, tmp_path):
    """Stopped at step 10 and resumed (a fresh graph, whose first step runs eagerly): the losses of
    steps 11-20 are those of the run that did not stop."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    common = ("--device=cuda", "--dtype=float32", "--cuda_graph=true", "--batching=stream", "--lr_decay_iters=20")
    train(config(data_dir, whole, *common, "--max_iters=20"))
    train(config(data_dir, halves, *common, "--max_iters=10"))
    train(config(data_dir, halves, *common, "--max_iters=20", "--init_from=resume"))
    assert losses(halves) == losses(whole)
