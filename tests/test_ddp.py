"""Two CPU processes under torchrun (gloo) train as one process with the same global batch: the
same losses, identical weights on both ranks, and one checkpoint holding every stream's memory."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqrllm import checkpoint
from sqrllm.config import load_config
from sqrllm.trainer import train

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6

# Runs train() in each torchrun process and saves that rank's final weights beside the run; ends as
# train.py does (sqrllm.distributed.run_main).
RANK_SCRIPT = """
import os, sys, torch
from sqrllm import distributed
from sqrllm.config import load_config
from sqrllm.model import SqrLLM
from sqrllm.trainer import train

built = []
make = SqrLLM.from_config.__func__
SqrLLM.from_config = classmethod(lambda cls, cfg, vocab: built.append(make(cls, cfg, vocab)) or built[-1])

def main(argv):
    cfg = load_config(argv)
    train(cfg)
    torch.save(built[0].state_dict(), os.path.join(cfg.out_dir, f"weights-rank{os.environ['RANK']}.pt"))
    return 0

distributed.run_main(main, sys.argv[1:])
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args(data_dir, out_dir, batch_size):
    # stream batching with memory carried, two micro-steps per step (the first under no_sync)
    return [f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", "--n_layer=2", "--n_embd=32",
            f"--batch_size={batch_size}", "--block_size=16", "--gradient_accumulation_steps=2",
            f"--max_iters={STEPS}", "--log_interval=1", "--eval_interval=0", "--eval_max_tokens=512",
            "--learning_rate=1e-2", "--warmup_iters=2", "--dropout=0", "--progress=false", "--num_threads=1",
            "--device=cpu"]


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(data_dir, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)

    # world 2 x batch 4 reads streams 0-3 (rank 0) and 4-7 (rank 1): world 1 x batch 8's streams
    two = tmp_path / "two"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(script), *args(data_dir, two, 4)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    one = tmp_path / "one"
    train(load_config(args(data_dir, one, 8)))

    w0 = torch.load(two / "weights-rank0.pt", weights_only=True)
    w1 = torch.load(two / "weights-rank1.pt", weights_only=True)
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"ranks hold different {name}"

    (loss_two, eval_two), (loss_one, eval_one) = losses(two), losses(one)
    assert len(loss_two) == len(loss_one) == STEPS
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    assert loss_two[-1] < loss_two[0]
    assert eval_two[-1]["val_loss"] == pytest.approx(eval_one[-1]["val_loss"], rel=1e-4)
    assert eval_two[-1]["tokens"] == eval_one[-1]["tokens"] == STEPS * 8 * 16 * 2

    ckpt_two, ckpt_one = checkpoint.load(two / "ckpt.pt"), checkpoint.load(one / "ckpt.pt")
    for name in w0:
        assert torch.equal(ckpt_two["model"][name], w0[name])
        torch.testing.assert_close(ckpt_two["model"][name], ckpt_one["model"][name], rtol=1e-4, atol=1e-5)
    # the memory of all 8 streams, rank 0's rows first
    assert [s.shape for s in ckpt_two["state"]] == [s.shape for s in ckpt_one["state"]] == [(8, 32)] * 2
    for a, b in zip(ckpt_two["state"], ckpt_one["state"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(ckpt_two["ranks"]) == 2


@pytest.mark.parametrize("device, local_rank, message", [
    ("cuda:1", 0, "device='cuda:1' names one GPU, but torchrun started 2 processes; use --device=cuda"),
    ("cuda", 1, "torchrun started process LOCAL_RANK=1 on a machine with 1 CUDA device(s); pass --nproc_per_node=1"),
])
def test_torchrun_on_gpus_it_cannot_have_is_one_error_line(data_dir, tmp_path, monkeypatch, capsys, device,
                                                           local_rank, message):
    """A GPU named under torchrun, or more processes than the machine has GPUs: train.py exits with status 1
    and one error line naming the fix (not a traceback), before out_dir is made."""
    from sqrllm import config

    monkeypatch.setattr(config, "pick_device", lambda name: name)  # as on a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for var, value in (("RANK", local_rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", 2)):
        monkeypatch.setenv(var, str(value))
    monkeypatch.syspath_prepend(str(ROOT))
    import train as train_py

    out = tmp_path / "run"
    assert train_py.main([*args(data_dir, out, 4), f"--device={device}", "--dtype=float32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists()
