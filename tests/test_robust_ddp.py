"""Faults under data parallelism (two gloo ranks under torchrun on the CPU): a non-finite loss on one
rank only stops both at the same step with one checkpoint; SIGTERM to the launcher makes every rank
finish the step and save one consistent checkpoint, with no hang, and the run resumes exactly; a
rank that has left its group ends with its own status and everything it printed."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sqrllm import checkpoint
from sqrllm.trainer import EXIT_DIVERGED

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS = 40

# train.py, run as a script, in each torchrun process; with POISON_FROM=k, rank 1's loss is +inf from
# its k-th training forward on (a constant added to it: that rank's gradients stay finite, only its
# loss flag is raised).
RANK_SCRIPT = """
import os, runpy, sys, torch
from sqrllm.model import SqrLLM

poison_from, calls, forward = int(os.environ.get("POISON_FROM", -1)), [0], SqrLLM.forward

def poisoned(self, idx, targets=None, state=None, last_only=False):
    logits, loss, state = forward(self, idx, targets, state, last_only)
    if self.training:
        if os.environ["RANK"] == "1" and 0 <= poison_from <= calls[0]:
            loss = loss + torch.tensor(float("inf"))
        calls[0] += 1
    return logits, loss, state

SqrLLM.forward = poisoned
if os.environ.get("SLOW_WANDB_FINISH"):  # seconds: an upload that takes its time
    import time, wandb
    finish = wandb.sdk.wandb_run.Run.finish
    wandb.sdk.wandb_run.Run.finish = lambda *a, **k: time.sleep(float(os.environ["SLOW_WANDB_FINISH"])) or finish(*a, **k)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(data_dir):
    (data_dir / "rank.py").write_text(RANK_SCRIPT)
    return data_dir


def torchrun(root, out_dir, *extra, env=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(root / "rank.py"), str(ROOT / "train.py"), f"--data_dir={root}", "--dataset=tiny",
           f"--out_dir={out_dir}", "--n_layer=2", "--n_embd=16", "--batch_size=2", "--block_size=16",
           "--dropout=0.1", "--learning_rate=1e-2", "--warmup_iters=2", f"--lr_decay_iters={STEPS}",
           "--log_interval=1", "--eval_interval=10", "--eval_max_tokens=200", "--eval_batch_size=4",
           "--deterministic=true", "--progress=false", "--num_threads=1", "--device=cpu", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def rows(out_dir):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed", "tok_per_s", "mfu", "mem_gib")}
            for line in lines]


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_both_at_the_same_step(setup, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(setup, out, f"--max_iters={STEPS}", "--max_bad_steps=2", env={"POISON_FROM": "5"})
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stops = [line for line in stderr.splitlines() if line.startswith("error: steps 6-7 all had a non-finite loss")]
    # every rank that got to print names the same steps; once the first rank exits, the launcher
    # stops the other, so its report may hold one rank's status or both. That both ranks reached
    # the same step shows in the checkpoint below, gathered from both by a collective.
    assert 1 <= len(stops) <= 2, stderr[-3000:]
    assert stderr.count(f"exitcode  : {EXIT_DIVERGED} ") >= 1
    ckpt = checkpoint.load(out)
    assert ckpt["step"] == 5 and len(ckpt["ranks"]) == 2 and [s.shape[0] for s in ckpt["state"]] == [4, 4]
    skipped = [r for r in rows(out) if "skipped" in r]
    assert [r["step"] for r in skipped] == [6, 7]
    assert "skipped on all ranks" in skipped[0]["skipped"] and "loss inf" not in skipped[0]["skipped"]


@pytest.mark.slow
def test_rank_0_finishes_its_wandb_run_after_the_other_rank_has_exited(setup, tmp_path):
    pytest.importorskip("wandb")
    from test_wandb import exit_codes, offline_env

    out = tmp_path / "run"
    env = {"POISON_FROM": "5", "SLOW_WANDB_FINISH": "3", **offline_env(tmp_path / "wandb_home")}
    proc = torchrun(setup, out, f"--max_iters={STEPS}", "--max_bad_steps=2", "--wandb_log=true",
                    "--wandb_project=sqrllm-test", env=env)
    stdout, stderr = proc.communicate(timeout=300)
    # rank 1 exits at once, and the launcher signals rank 0 while it is still finishing its run
    assert exit_codes(next((out / "wandb").glob("offline-run-*"))) == [EXIT_DIVERGED], stderr[-3000:]
    # and rank 0 still said why it stopped, then ended with the run's status
    assert len([line for line in stderr.splitlines() if line.startswith("error: steps 6-7")]) == 2, stderr[-3000:]
    assert stderr.count(f"exitcode  : {EXIT_DIVERGED} ") >= 1 and "exitcode  : -15" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_one_checkpoint_and_resumes_exactly(setup, tmp_path):
    reference = tmp_path / "reference"
    ref = torchrun(setup, reference, f"--max_iters={STEPS}")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]

    out = tmp_path / "run"
    proc = torchrun(setup, out, f"--max_iters={STEPS}")
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)  # no hang
    assert proc.returncode != 0  # torchrun's own status: it reports the signal it got
    ckpt = checkpoint.load(out)
    assert 1 <= ckpt["step"] < STEPS and len(ckpt["ranks"]) == 2
    # each rank (exit status EXIT_PREEMPTED) says it saved that one step
    assert stderr.count(f"saved step {ckpt['step']} to {out / 'ckpt'}") == 2, stderr[-3000:]

    resumed = torchrun(setup, out, f"--max_iters={STEPS}", "--init_from=resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert rows(out) == rows(reference)
    a, b = checkpoint.load(out), checkpoint.load(reference)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))
    assert [r["data"]["cursor"].tolist() for r in a["ranks"]] == [r["data"]["cursor"].tolist() for r in b["ranks"]]


@pytest.mark.slow
def test_a_fresh_run_sets_the_previous_runs_files_aside_once(setup, tmp_path):
    """The same command twice: process 0 alone moves the first run's files into one previous-* folder."""
    out = tmp_path / "run"
    for _ in range(2):
        proc = torchrun(setup, out, "--max_iters=2")
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    (aside,) = out.glob("previous-*")
    assert stderr.count("held another run's files; moved them to") == 1, stderr[-3000:]
    assert checkpoint.load(aside)["step"] == 2 and len(rows(aside)) == len(rows(out))
    assert checkpoint.load(out)["step"] == 2 and [r["step"] for r in rows(out) if "loss" in r] == [1, 2]


# One process in a gloo group of one, which it has left, ending through run_main as train.py does.
ENDING = """
import os, sys, torch, torch.distributed as dist
from sqrllm import distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo")
dist.all_reduce(torch.ones(3))
distributed.teardown()

def main(argv):
    print("written before the end")  # to a pipe: block-buffered, so lost unless flushed
    if argv == ["raise"]:
        raise RuntimeError("a bug")
    if argv == ["exit-none"]:
        sys.exit()
    if argv == ["exit-text"]:
        sys.exit("stopped: a reason")
    return 65

distributed.run_main(main, sys.argv[2:])
"""


@pytest.mark.parametrize("how", ["status", "raise", "exit-none", "exit-text"])
def test_a_rank_that_left_its_group_ends_with_its_status_and_output(tmp_path, how):
    script = tmp_path / "ending.py"
    script.write_text(ENDING)
    argv = [sys.executable, str(script), str(free_port())] + ([] if how == "status" else [how])
    proc = subprocess.run(argv, cwd=ROOT, env={**ENV, "PYTHONUNBUFFERED": ""}, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout == "written before the end\n"
    if how == "status":
        assert proc.returncode == 65, proc.stderr
    elif how == "raise":  # the traceback, as Python prints one, and status 1
        assert proc.returncode == 1 and "RuntimeError: a bug" in proc.stderr and "Traceback" in proc.stderr
    elif how == "exit-none":  # as sys.exit: success
        assert proc.returncode == 0, proc.stderr
    else:  # as sys.exit: the text on stderr, status 1
        assert proc.returncode == 1 and proc.stderr.strip().endswith("stopped: a reason"), proc.stderr
