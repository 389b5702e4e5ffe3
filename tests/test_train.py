"""End to end on a tiny corpus: train lowers the loss, writes what it promises, resumes where it
stopped; sample.py streams reproducible text from the checkpoint."""

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sqrllm import checkpoint, data
from sqrllm.config import ConfigError, load_config
from sqrllm.data import DataError
from sqrllm.trainer import evaluate, load_dataset, train

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(data_dir, out_dir, *extra):
    return load_config([
        f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", "--n_layer=2", "--n_embd=32",
        "--batch_size=8", "--block_size=32", "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=5",
        "--log_interval=5", "--eval_interval=20", "--progress=false", "--num_threads=1", *extra])


def read_metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_writes_outputs(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(data_dir, out, "--max_iters=60"))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert train_rows[-1]["loss"] < 0.6 * train_rows[0]["loss"]
    assert [r["step"] for r in evals] == [20, 40, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < 3.0
    for r in rows:
        assert r["elapsed"] > 0 and r["tokens"] == r["step"] * 8 * 32
    assert {"val_bpb", "val_loss_stream", "val_bpb_stream"} <= set(evals[-1])
    assert json.loads((out / "config.json").read_text())["n_embd"] == 32
    ckpt = checkpoint.load(out / "ckpt.pt")
    assert ckpt["step"] == 60 and ckpt["config"]["n_layer"] == 2 and len(ckpt["state"]) == 2
    assert result["step"] == 60


def test_tokens_per_second_leaves_out_the_evaluations(data_dir, tmp_path, monkeypatch):
    import sqrllm.trainer as trainer

    def slow_evaluate(*args, **kwargs):  # an evaluation far longer than the steps between logs
        time.sleep(1.0)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=12", "--log_interval=4", "--eval_interval=4",
                      "--eval_max_tokens=512"))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for r in rows[1:]:  # the intervals after an evaluation: 4 steps of a tiny model, well under the 1 s sleep
        assert 4 * 8 * 32 / r["tok_per_s"] < 0.8, r


def test_eval_block_size_sets_the_windows_of_the_reset_val_loss(data_dir, tmp_path):
    """Trained on rows of 32 tokens, evaluated in windows of 8: the logged val loss is that of windows
    of 8 (what block_size=8 alone would evaluate), not of 32; the streamed loss does not depend on it."""
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, "--max_iters=20", "--eval_block_size=8")
    train(cfg)
    last = [r for r in read_metrics(out) if "val_loss" in r][-1]
    model, _, _ = checkpoint.load_model(out)
    _, _, val = load_dataset(cfg)
    windows = {T: evaluate(model, val, dataclasses.replace(cfg, block_size=T, eval_block_size=0), "cpu",
                           torch.float32, stream=False) for T in (8, 32)}
    assert last["val_loss"] == windows[8] and windows[8] > windows[32]  # shorter contexts predict worse
    assert last["val_loss_stream"] == evaluate(model, val, cfg, "cpu", torch.float32, stream=True)


def test_streamed_val_loss_carries_the_memory_through_the_whole_split(data_dir, tmp_path):
    """eval_streams=1 (the default): the streamed loss is the model's over the whole val split read
    as one sequence, whatever the forward's chunk length; cut into 4 streams, each restarts from zero
    memory, which costs loss."""
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, "--max_iters=30")
    train(cfg)
    model, _, _ = checkpoint.load_model(out)
    _, _, val = load_dataset(cfg)
    ids = torch.from_numpy(val.astype("int64"))
    with torch.no_grad():
        _, whole, _ = model.eval()(ids[None, :-1], ids[None, 1:])
    one = evaluate(model, val, dataclasses.replace(cfg, eval_batch_size=2), "cpu", torch.float32, stream=True)
    four = evaluate(model, val, dataclasses.replace(cfg, eval_streams=4), "cpu", torch.float32, stream=True)
    assert len(val) > 2 * 32 * 2  # more than one forward of 2 x 32 tokens
    assert one == pytest.approx(whole.item(), rel=1e-5)
    assert four > one


def test_reset_every_zeroes_the_memory_once_a_step(data_dir, tmp_path, monkeypatch):
    """reset_every=2 with 3 micro-batches a step: the memory starts from zero at the first micro-batch of
    steps 0 and 2 only; the next micro-batches read on in the same streams, so they carry it."""
    from sqrllm.model import SqrLLM

    forward, fresh = SqrLLM.forward, []

    def spy(self, idx, targets=None, state=None, last_only=False):
        if self.training:
            fresh.append(state is None)
        return forward(self, idx, targets, state, last_only)

    monkeypatch.setattr(SqrLLM, "forward", spy)
    train(tiny_config(data_dir, tmp_path / "run", "--max_iters=4", "--reset_every=2", "--gradient_accumulation_steps=3",
                      "--eval_interval=0", "--eval_stream=false"))
    assert fresh == [True, False, False] + [False] * 3 + [True, False, False] + [False] * 3


def test_burn_in_trains_and_resumes_exactly(data_dir, tmp_path):
    """Random windows that start from the memory of the 8 tokens before them on half the rows: the
    loss falls, and a run stopped at step 10 and resumed logs the losses of one that did not stop
    (the rows' draws live in the checkpointed generator)."""
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    common = ("--batching=random", "--burn_in=8", "--dropout=0.1", "--lr_decay_iters=20", "--deterministic=true")
    train(tiny_config(data_dir, whole, *common, "--max_iters=20"))
    train(tiny_config(data_dir, halves, *common, "--max_iters=10"))
    train(tiny_config(data_dir, halves, *common, "--max_iters=20", "--init_from=resume"))
    logged = {k: [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r] for k, out in
              (("whole", whole), ("halves", halves))}
    assert logged["halves"] == logged["whole"] and len(logged["whole"]) == 4
    assert logged["whole"][-1][1] < 0.7 * logged["whole"][0][1]


def test_train_leaves_the_deterministic_setting_as_it_found_it(data_dir, tmp_path, monkeypatch):
    """A run with deterministic=true switches torch's deterministic algorithms on for itself only."""
    from sqrllm.model import SqrLLM

    forward, during = SqrLLM.forward, []

    def spy(self, *args, **kw):
        during.append(torch.are_deterministic_algorithms_enabled())
        return forward(self, *args, **kw)

    monkeypatch.setattr(SqrLLM, "forward", spy)
    assert not torch.are_deterministic_algorithms_enabled()
    train(tiny_config(data_dir, tmp_path / "a", "--max_iters=2", "--deterministic=true"))
    assert during and all(during)  # training and evaluation forwards
    assert not torch.are_deterministic_algorithms_enabled()
    during.clear()
    train(tiny_config(data_dir, tmp_path / "c", "--max_iters=2"))
    assert during and not any(during)
    torch.use_deterministic_algorithms(True)
    try:
        train(tiny_config(data_dir, tmp_path / "b", "--max_iters=2"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_resume_continues_from_saved_step(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=20"))
    first = checkpoint.load(out / "ckpt.pt")
    train(tiny_config(data_dir, out, "--max_iters=40", "--init_from=resume"))
    rows = read_metrics(out)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    resumed = checkpoint.load(out / "ckpt.pt")
    assert resumed["step"] == 40 and resumed["tokens_seen"] == 40 * 8 * 32
    assert not torch.equal(resumed["data"]["cursor"], first["data"]["cursor"])


def test_into_a_file_or_pipe_the_progress_bar_gives_way_to_log_lines(data_dir, tmp_path):
    run = subprocess.run([sys.executable, "train.py", f"--data_dir={data_dir}", "--dataset=tiny",
                          f"--out_dir={tmp_path / 'run'}", "--n_layer=1", "--n_embd=16", "--batch_size=2",
                          "--block_size=16", "--max_iters=6", "--log_interval=3", "--eval_interval=0",
                          "--num_threads=1"], cwd=ROOT, capture_output=True, text=True)  # progress left on
    assert run.returncode == 0, run.stderr
    assert [line.split(":")[0] for line in run.stdout.splitlines() if line.startswith("step ")][:2] == ["step 3",
                                                                                                     "step 6"]
    assert "\r" not in run.stderr and "it/s" not in run.stderr and "step/s" not in run.stderr


def test_an_out_dir_that_cannot_be_made_is_one_error_before_training(data_dir, tmp_path):
    (tmp_path / "afile").write_text("a file, not a folder")
    out = tmp_path / "afile" / "run"
    with pytest.raises(ConfigError, match=f"cannot write to out_dir {out} \\(Not a directory\\); pass an --out_dir"):
        train(tiny_config(data_dir, out, "--max_iters=5"))


def test_a_second_run_into_a_busy_out_dir_stops_and_moves_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", f"--data_dir={data_dir}", "--dataset=tiny",
                              f"--out_dir={out}", "--n_layer=1", "--n_embd=16", "--batch_size=2", "--block_size=16",
                              "--max_iters=100000", "--log_interval=1", "--eval_interval=2", "--eval_max_tokens=64",
                              "--progress=false", "--num_threads=1"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 2:"):  # an evaluation and a checkpoint are out
                break
        second = subprocess.run([sys.executable, "train.py", f"--data_dir={data_dir}", "--dataset=tiny",
                                 f"--out_dir={out}", "--n_layer=1", "--n_embd=16", "--max_iters=5"],
                                cwd=ROOT, capture_output=True, text=True)
        assert second.returncode == 1
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: out_dir {out} is in use by another run (pid {first.pid}); wait for it to end, or pass another "
            "--out_dir")
        assert not list(out.glob("previous-*")) and (out / "latest.json").is_file()
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert checkpoint.load(out)["step"] >= 2


def test_a_fresh_run_moves_another_runs_files_aside(data_dir, tmp_path, capsys):
    """Forgetting --init_from=resume loses nothing: the earlier run's files move, whole, into
    out_dir/previous-<time>, from which it resumes; the new run's metrics and checkpoints start afresh."""
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=20", "--eval_interval=10"))
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"}  # the lock stays: the folder's
    (out / "notes.txt").write_text("mine")
    (out / "wandb").mkdir()
    capsys.readouterr()
    train(tiny_config(data_dir, out, "--max_iters=10", "--eval_interval=10"))  # the same folder, afresh
    err = capsys.readouterr().err
    (aside,) = out.glob("previous-*")
    assert re.fullmatch(r"previous-\d{8}T\d{6}Z", aside.name)
    assert [line for line in err.splitlines() if "previous-" in line] == [
        f"warning: {out} held another run's files; moved them to {aside} (to continue that run instead: "
        f"--out_dir={aside} --init_from=resume)"]
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == earlier
    assert sorted(earlier) == ["ckpt-000010.pt", "ckpt-000020.pt", "ckpt.pt", "config.json", "latest.json",
                               "metrics.jsonl"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "wandb").is_dir()
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [5, 10]
    assert json.loads((out / "config.json").read_text())["max_iters"] == 10
    assert checkpoint.load(out)["step"] == 10 and sorted(p.name for p in out.glob("ckpt*")) == ["ckpt-000010.pt",
                                                                                                 "ckpt.pt"]
    train(tiny_config(data_dir, aside, "--max_iters=30", "--eval_interval=10", "--init_from=resume"))
    assert [r["step"] for r in read_metrics(aside) if "loss" in r] == [5, 10, 15, 20, 25, 30]
    assert checkpoint.load(out)["step"] == 10  # the new run's, untouched


def test_runs_started_in_one_second_set_aside_into_folders_of_their_own(tmp_path):
    folders = []
    for _ in range(3):
        (tmp_path / "metrics.jsonl").write_text("{}\n")
        folders.append(checkpoint.archive_run(tmp_path))
    assert len(set(folders)) == 3 and all((f / "metrics.jsonl").is_file() for f in folders)
    assert checkpoint.archive_run(tmp_path) is None  # nothing of a run left: nothing moves


def test_eval_only_needs_resume_and_writes_nothing(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=20"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match="eval_only=True evaluates a trained run's checkpoint; pass "
                                          "--init_from=resume too"):
        train(tiny_config(data_dir, out, "--eval_only=true"))
    row = train(tiny_config(data_dir, out, "--eval_only=true", "--init_from=resume", "--max_iters=999"))
    assert row["step"] == 20 and row["val_loss"] == read_metrics(out)[-1]["val_loss"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # config.json says max_iters 20 still


@pytest.mark.parametrize("max_iters", [20, 15])
def test_resume_with_nothing_to_train_says_so_and_changes_nothing(data_dir, tmp_path, capsys, max_iters):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=20"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    result = train(tiny_config(data_dir, out, f"--max_iters={max_iters}", "--init_from=resume"))
    assert result["step"] == 20
    assert capsys.readouterr().out == (f"nothing to train: {out / 'ckpt-000020.pt'} is at step 20 and max_iters is "
                                       f"{max_iters}; pass a larger --max_iters to train on ({out} is unchanged)\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_applies_changed_optimizer_settings(data_dir, tmp_path):
    """What config.json says is what runs: a resume with another beta2 and weight decay steps with them
    (weight decay on the matrices only), though the checkpoint's optimizer state holds the old ones."""
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=20"))
    assert [(g["betas"], g["weight_decay"]) for g in checkpoint.load(out)["optimizer"]["param_groups"]] == [
        ((0.9, 0.99), 0.1), ((0.9, 0.99), 0.0)]
    train(tiny_config(data_dir, out, "--max_iters=21", "--init_from=resume", "--beta2=0.95", "--weight_decay=0.5"))
    assert json.loads((out / "config.json").read_text())["beta2"] == 0.95
    assert [(tuple(g["betas"]), g["weight_decay"]) for g in checkpoint.load(out)["optimizer"]["param_groups"]] == [
        ((0.9, 0.95), 0.5), ((0.9, 0.95), 0.0)]


@pytest.mark.parametrize("before, after", [("float32", "float16"), ("float16", "float32")])
def test_resume_may_switch_to_or_from_float16(data_dir, tmp_path, before, after):
    """dtype is not part of the model's shape: a bfloat16 (or float32) run goes on in float16, whose
    gradient scaler starts afresh, and a float16 run goes on without one."""
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=5", "--device=cpu", f"--dtype={before}"))
    train(tiny_config(data_dir, out, "--max_iters=10", "--device=cpu", f"--dtype={after}", "--init_from=resume"))
    saved = checkpoint.load(out)
    assert saved["step"] == 10 and bool(saved["scaler"]) == (after == "float16")


def test_resume_refuses_another_model_shape(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=5"))
    with pytest.raises(ConfigError, match=f"n_embd: 32 -> 48\\); keep these keys as they were \\(the run's settings "
                                          f"are in {out / 'config.json'}\\)"):
        train(tiny_config(data_dir, out, "--max_iters=10", "--init_from=resume", "--n_embd=48"))


def test_missing_dataset_says_what_to_run(tmp_path):
    cfg = load_config([f"--data_dir={tmp_path}", "--dataset=nothing_here", f"--out_dir={tmp_path}/o"])
    with pytest.raises(DataError, match="prepare it first: python data/text/prepare.py"):
        train(cfg)
    assert not (tmp_path / "o").exists()


def test_a_dataset_prepared_in_the_repo_is_found_from_another_directory(data_dir, tmp_path, monkeypatch):
    # data/<name>/prepare.py writes beside itself; data_dir is relative to where train.py is started
    monkeypatch.setattr(data, "REPO_DATA", data_dir)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"dataset 'tiny' not found in data/tiny \\(data_dir is relative to the "
                                        f"current directory\\) but prepared in {data_dir / 'tiny'}: "
                                        f"pass --data_dir={data_dir}"):
        train(load_config(["--dataset=tiny", f"--out_dir={tmp_path}/o"]))
    assert not (tmp_path / "o").exists()


def test_train_script_reports_config_errors(tmp_path):
    run = subprocess.run([sys.executable, "train.py", "configs/small.py", "--learnign_rate=1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode != 0
    assert "did you mean 'learning_rate'" in run.stderr and "Traceback" not in run.stderr


def test_sample_is_reproducible_and_resembles_corpus(data_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, "--max_iters=150", "--eval_interval=0", "--eval_stream=false"))
    cmd = [sys.executable, "sample.py", f"--ckpt={out / 'ckpt.pt'}", "--prompt=line 7", "--max_new_tokens=120",
           "--seed=7", "--device=cpu"]
    a = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    b = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert a.stdout == b.stdout
    assert a.stdout.startswith("line 7") and len(a.stdout) >= 120
    assert "the quick brown fox" in a.stdout
    other = subprocess.run(cmd[:-2] + ["--seed=8", "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    assert other.stdout != a.stdout
    greedy = subprocess.run(cmd + ["--temperature=0"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert greedy.stdout.startswith("line 7")


def test_sample_reports_missing_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, "sample.py", f"--ckpt={tmp_path}/nope.pt"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "nope.pt not found" in run.stderr and "Traceback" not in run.stderr
