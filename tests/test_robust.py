"""Runs that survive: exact resume in a new process, preemption, verified rotating checkpoints, the
non-finite step guard, a full disk, safe loading, and one clear error (nothing overwritten) per bad input."""

import ast
import errno
import json
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sqrllm import checkpoint, trainer
from sqrllm.checkpoint import CheckpointError
from sqrllm.config import load_config
from sqrllm.data import DataError, read_tokens, write_tokens
from sqrllm.faults import check_resume
from sqrllm.model import SqrLLM
from sqrllm.trainer import EXIT_DIVERGED, EXIT_NO_WRITE, EXIT_PREEMPTED, RunStopped, train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N = 30  # the exact-resume runs: 2N steps in one process == N, then N more in another
# dropout on, memory carried across batches (stream batching), deterministic mode, checkpoints rotating
ARGS = ["--dataset=tiny", "--n_layer=2", "--n_embd=16", "--batch_size=4", "--block_size=16", "--dropout=0.1",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--warmup_iters=5", f"--lr_decay_iters={2 * N}", "--log_interval=5",
        "--eval_interval=10", "--eval_max_tokens=200", "--eval_batch_size=8", "--keep_checkpoints=2",
        "--deterministic=true", "--progress=false", "--num_threads=1"]
NOISE = ("elapsed", "tok_per_s", "mfu", "mem_gib")  # timing columns of metrics.jsonl


def args(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *ARGS, *extra]


CLI = runpy.run_path(str(ROOT / "train.py"))["main"]  # train.py in this process: -> exit status


def run_cli(*argv, **kw):
    return subprocess.run([sys.executable, "train.py", *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, **kw)


def rows(out_dir):
    """metrics.jsonl without its timing columns."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in NOISE} for line in lines]


def same(a, b):
    """Equal to the bit: tensors, and dicts, lists and plain values holding them."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_run(a, b):
    """Every logged loss and the whole final checkpoint (weights, optimizer, memory, data cursor, RNG
    states) bitwise equal."""
    assert rows(a) == rows(b)
    ca, cb = checkpoint.load(a), checkpoint.load(b)
    assert ca["step"] == cb["step"] == 2 * N and len(ca["state"]) == 2
    assert same({k: v for k, v in ca.items() if k != "config"}, {k: v for k, v in cb.items() if k != "config"})


def one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """2N steps in one process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run = run_cli(*args(data_dir, out, f"--max_iters={2 * N}"))
    assert run.returncode == 0, run.stderr
    return out


def test_resume_in_a_new_process_is_bitwise_exact(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    first = run_cli(*args(data_dir, out, f"--max_iters={N}"))
    assert first.returncode == 0, first.stderr
    second = run_cli(*args(data_dir, out, f"--max_iters={2 * N}", "--init_from=resume"))
    assert second.returncode == 0, second.stderr
    assert_same_run(reference, out)
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt-000050.pt", "ckpt-000060.pt", "ckpt.pt"]


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *args(data_dir, out, f"--max_iters={2 * N}")], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line:  # the first metrics line is out
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert "Traceback" not in stderr and "stopped: SIGTERM received; saved step" in stderr
    stopped = checkpoint.load(out)["step"]
    assert 5 <= stopped < 2 * N
    assert max(r["step"] for r in rows(out)) <= stopped
    resumed = run_cli(*args(data_dir, out, f"--max_iters={2 * N}", "--init_from=resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(reference, out)


def test_ctrl_c_through_tee_still_saves_when_the_pipe_is_gone(data_dir, tmp_path):
    # `train.py ... | tee log`, Ctrl-C: tee exits at once, the run finishes its step and must still save,
    # though its next progress line meets a closed pipe
    out = tmp_path / "run"
    argv = args(data_dir, out, "--max_iters=100000", "--log_interval=1")
    proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("step ") and "loss" in line:
            break
    proc.stdout.close()
    proc.stderr.close()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    assert checkpoint.load(out)["step"] >= 1


def test_second_signal_during_the_write_leaves_a_valid_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    lr_at, save = trainer.lr_at, torch.save

    def lr_then_signal(cfg, step):
        if step == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(cfg, step)

    class Interrupting:
        """Ctrl-C at every write of the checkpoint file."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    def save_with_interrupt(obj, f, *a, **kw):
        save(obj, Interrupting(f), *a, **kw)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "lr_at", lr_then_signal)
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **kw: (
        save_with_interrupt(obj, f, *a, **kw) if obj.get("step") == 13 else save(obj, f, *a, **kw)))
    with pytest.raises(RunStopped, match="SIGTERM received; saved step 13") as stop:
        train(load_config(args(data_dir, out, "--max_iters=40")))
    assert stop.value.code == EXIT_PREEMPTED
    assert checkpoint.load(out / "ckpt-000013.pt")["step"] == 13
    assert checkpoint.load(out / "ckpt-000010.pt")["step"] == 10
    assert not list(out.glob(".*tmp"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back


@pytest.fixture(scope="module")
def three_checkpoints(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "run"
    train(load_config(args(data_dir, out, "--max_iters=30", "--keep_checkpoints=3")))
    return out


def test_last_k_checkpoints_and_a_pointer_to_the_newest(three_checkpoints):
    out = three_checkpoints
    pointer = json.loads((out / "latest.json").read_text())
    assert pointer["latest"] == "ckpt-000030.pt"
    assert [e["step"] for e in pointer["checkpoints"]] == [30, 20, 10]
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt-000030.pt")
    assert checkpoint.load_model(out)[2]["step"] == 30  # sample.py --ckpt OUT_DIR


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_corrupt_newest_checkpoint_is_named_and_resume_falls_back(three_checkpoints, data_dir, tmp_path, capsys,
                                                                  damage):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    (out / "ckpt.pt").unlink()
    os.link(out / "ckpt-000030.pt", out / "ckpt.pt")
    newest = out / "ckpt-000030.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF  # torch.load alone would not notice this one
    newest.write_bytes(data)
    for path in (newest, out / "ckpt.pt"):
        with pytest.raises(CheckpointError, match=f"checkpoint {path} is truncated or corrupt"):
            checkpoint.load(path)
    capsys.readouterr()
    result = train(load_config(args(data_dir, out, "--max_iters=30", "--init_from=resume")))
    err = capsys.readouterr().err
    assert f"warning: checkpoint {newest} is truncated or corrupt" in err
    assert "using" in err and "ckpt-000020.pt (step 20)" in err
    assert result["step"] == 30
    assert [r["step"] for r in rows(out) if "loss" in r] == [5, 10, 15, 20, 25, 30]  # the lost steps, once
    assert checkpoint.load(out)["step"] == 30


def test_ckpt_pt_serves_when_the_files_latest_json_lists_are_gone(three_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    for f in out.glob("ckpt-*.pt"):
        f.unlink()
    ckpt, path, entries = checkpoint.load_latest(out, warn=print)
    assert ckpt["step"] == 30 and path == out / "ckpt.pt" and entries == []
    assert f"checkpoint {out / 'ckpt-000030.pt'} listed in" in capsys.readouterr().out


def test_a_latest_json_entry_without_its_size_is_no_pointer(three_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    pointer = json.loads((out / "latest.json").read_text())
    del pointer["checkpoints"][0]["bytes"]
    (out / "latest.json").write_text(json.dumps(pointer))
    assert checkpoint.load(out)["step"] == 30  # the ckpt-*.pt files by step (a KeyError before)


def test_sample_names_a_corrupt_checkpoint_and_reads_a_run_folder(three_checkpoints, tmp_path, capsys):
    sample = runpy.run_path(str(ROOT / "sample.py"))["main"]
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    flags = ["--prompt=line", "--max_new_tokens=8", "--device=cpu", "--quiet"]
    sample([f"--ckpt={out}", *flags])
    assert capsys.readouterr().out.startswith("line")
    newest = out / "ckpt-000030.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(data)
    with pytest.raises(SystemExit) as stop:
        sample([f"--ckpt={newest}", *flags])
    assert str(stop.value.code).startswith(f"error: checkpoint {newest} is truncated or corrupt")
    sample([f"--ckpt={out}", *flags])  # a run's folder: its newest intact checkpoint
    captured = capsys.readouterr()
    assert captured.out.startswith("line") and f"using {out / 'ckpt-000020.pt'} (step 20)" in captured.err


@pytest.mark.parametrize("content, why", [
    (b"", "it is empty"),
    (b"hi\n", "not a file torch.save wrote"),
    (b'{"n_layer": 2}\n', "not a file torch.save wrote"),  # e.g. the run's config.json passed by mistake
])
def test_a_file_that_is_no_checkpoint_is_named_as_such(content, why, tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(content)
    sample = runpy.run_path(str(ROOT / "sample.py"))["main"]
    export = runpy.run_path(str(ROOT / "scripts" / "export.py"))["main"]
    for main in (lambda: sample([f"--ckpt={path}", "--device=cpu"]),
                 lambda: export([f"--ckpt={path}", f"--out={tmp_path / 'build'}"])):
        with pytest.raises(SystemExit) as stop:
            main()
        assert stop.value.code == f"error: {path} is not a sqrllm checkpoint ({why}); pass the ckpt.pt that " \
                                  "train.py wrote (out_dir/ckpt.pt), or the out_dir"
    assert path.read_bytes() == content and not (tmp_path / "build").exists()


def test_write_failing_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    entries = []
    for step in (1, 2):
        entries = checkpoint.save_rotating(tmp_path, {"format": 1, "model": {}, "step": step}, step, 3, entries)
    save = torch.save

    def half_then_fail(obj, f, *a, **kw):
        f.write(b"PK\x03\x04" + bytes(1000))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError):
        checkpoint.save_rotating(tmp_path, {"format": 1, "model": {}, "step": 3}, 3, 3, entries)
    monkeypatch.setattr(torch, "save", save)
    ckpt, path, _ = checkpoint.load_latest(tmp_path)
    assert ckpt["step"] == 2 and path.name == "ckpt-000002.pt"
    assert checkpoint.load(tmp_path / "ckpt.pt")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001.pt", "ckpt-000002.pt", "ckpt.pt",
                                                          "latest.json"]


def test_disk_full_stops_with_a_clear_message_and_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = torch.save

    def full_at_step_20(obj, f, *a, **kw):
        if obj["step"] == 20:
            f.write(bytes(4096))
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_at_step_20)
    with pytest.raises(RunStopped) as stop:
        train(load_config(args(data_dir, out, "--max_iters=30")))
    assert stop.value.code == EXIT_NO_WRITE
    assert (f"could not write the checkpoint of step 20 in {out}: [Errno 28] No space left on device; the previous "
            f"checkpoint, {out / 'ckpt-000010.pt'}, is intact") in str(stop.value)
    assert checkpoint.load(out)["step"] == 10 and not list(out.glob(".*tmp"))


def test_disk_full_from_the_command_line(data_dir, tmp_path, capsys):
    """A real write error (files limited to 20 kB, the checkpoint needs more): exit 74, one error line."""
    out = tmp_path / "run"
    limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limit[1]))
    try:
        code = CLI(args(data_dir, out, "--max_iters=10"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    line = one_error_line(capsys.readouterr().err)
    assert code == EXIT_NO_WRITE
    assert f"could not write the checkpoint of step 10 in {out}: [Errno 27] File too large; no earlier" in line
    assert not list(out.glob("*.pt")) and not list(out.glob(".*tmp"))


def inject(monkeypatch, bad_calls, value=float("nan")):
    """Make the model's loss and the memory it carries on `value` on the given forward calls (0-based,
    training forwards only); -> the parameters as they were when the first bad call began."""
    forward, calls, seen = SqrLLM.forward, [0], {}

    def poisoned(self, idx, targets=None, state=None, last_only=False):
        logits, loss, state = forward(self, idx, targets, state, last_only)
        if self.training:
            if calls[0] in bad_calls:
                seen.setdefault("params", {k: v.detach().clone() for k, v in self.state_dict().items()})
                loss, state = loss * value, [s * value for s in state]
            calls[0] += 1
        return logits, loss, state

    monkeypatch.setattr(SqrLLM, "forward", poisoned)
    return seen


def test_a_non_finite_step_is_skipped_and_logged(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = inject(monkeypatch, {6}, float("inf"))
    train(load_config(args(data_dir, out, "--max_iters=10", "--eval_interval=0")))
    skipped = [r for r in rows(out) if "skipped" in r]
    assert len(skipped) == 1 and skipped[0]["step"] == 7 and "loss inf" in skipped[0]["skipped"]
    assert skipped[0]["tokens"] == 7 * 4 * 16  # read, though not learned from, as every row counts them
    assert skipped[0]["cursor"] == [6 * 16] * 4  # where in its stretch each of the 4 rows read the bad batch
    assert [r["step"] for r in rows(out) if "loss" in r] == [5, 10]
    final = checkpoint.load(out)
    assert final["step"] == 10 and all(torch.isfinite(v).all() for v in final["model"].values())
    assert all(s["step"] == 9 for s in final["optimizer"]["state"].values())  # 10 steps, 1 without an update
    # the memory the bad forward left is not carried on: no later step is poisoned by it
    assert all(torch.isfinite(s).all() for s in final["state"]) and seen["params"]


def test_bad_steps_in_a_row_stop_with_the_last_good_state(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = inject(monkeypatch, set(range(12, 1000)))
    with pytest.raises(RunStopped, match="steps 13-15 all had a non-finite loss") as stop:
        train(load_config(args(data_dir, out, "--max_iters=40", "--max_bad_steps=3")))
    assert stop.value.code == EXIT_DIVERGED
    ckpt = checkpoint.load(out)
    assert ckpt["step"] == 12
    assert all(torch.equal(ckpt["model"][k], v) for k, v in seen["params"].items())
    assert ckpt["data"]["cursor"].tolist() == [12 * 16] * 4
    assert [r["step"] for r in rows(out) if "skipped" in r] == [13, 14, 15]


def test_a_run_that_ends_in_skipped_steps_saves_the_last_good_state(data_dir, tmp_path, monkeypatch, capsys):
    """The last two steps skipped, with no evaluation since step 10: their good predecessor is saved."""
    out = tmp_path / "run"
    seen = inject(monkeypatch, {16, 17})
    train(load_config(args(data_dir, out, "--max_iters=18", "--eval_interval=10")))
    ckpt = checkpoint.load(out)
    assert ckpt["step"] == 16 and all(torch.equal(ckpt["model"][k], v) for k, v in seen["params"].items())
    assert ckpt["data"]["cursor"].tolist() == [16 * 16] * 4
    assert "steps 17-18 were skipped; saved the last good state (step 16)" in capsys.readouterr().out


def test_divergence_from_the_command_line(data_dir, tmp_path, capsys):
    """A learning rate of 1e30 makes the weights overflow at step 2."""
    code = CLI(args(data_dir, tmp_path / "run", "--max_iters=40", "--learning_rate=1e30", "--warmup_iters=0",
                    "--max_bad_steps=2"))
    line = one_error_line(capsys.readouterr().err)
    assert code == EXIT_DIVERGED
    assert "steps 2-3 all had a non-finite loss or gradient norm; saved the last good state (step 1)" in line


# --- safe loading ---

SOURCES = [ROOT / "train.py", ROOT / "sample.py", *sorted((ROOT / "sqrllm").rglob("*.py")),
           *sorted((ROOT / "scripts").rglob("*.py")), *sorted((ROOT / "tests").rglob("*.py")),
           *sorted((ROOT / "data").rglob("*.py"))]
DATA_PIPELINE = [p for p in (ROOT / "sqrllm").glob("*.py") if p.stem in (
    "data", "prepare", "tokenizer", "spm_model", "hf")] + sorted((ROOT / "data").rglob("*.py"))


def calls(path):
    """(dotted name, call node) of every call in a source file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def test_every_torch_load_passes_weights_only_true():
    found, unsafe = 0, []
    for path in SOURCES:
        for name, node in calls(path):
            if name in ("torch.load", "torch.serialization.load"):
                found += 1
                if not any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords):
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
            if name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(allow_pickle=...)")
    assert found >= 2 and not unsafe, unsafe


def test_no_pickle_in_the_data_pipeline():
    for path in DATA_PIPELINE:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                    for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"pickle", "dill", "joblib", "shelve", "marshal"}, path


class Payload:
    """Unpickling this creates a file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_is_refused_and_never_runs(data_dir, three_checkpoints, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": {}, "x": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused \\(nothing in it was run\\)"):
        checkpoint.load(evil)
    # as the newest checkpoint of a run: resume skips it, with a warning, for the one before
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    (out / "ckpt-000030.pt").unlink()
    shutil.copy(evil, out / "ckpt-000030.pt")
    entries = json.loads((out / "latest.json").read_text())
    entries["checkpoints"][0].update(bytes=evil.stat().st_size, sha256=checkpoint._sha256(evil))
    (out / "latest.json").write_text(json.dumps(entries))
    ckpt, path, _ = checkpoint.load_latest(out, warn=print)
    assert ckpt["step"] == 20 and "refused" in capsys.readouterr().out
    assert not marker.exists()


# --- bad input: one error line naming the file or field and the fix; nothing in out_dir changes ---

@pytest.fixture(scope="module")
def bad_data(data_dir):
    """Damaged copies of the tiny dataset."""
    def variant(name, damage):
        shutil.copytree(data_dir / "tiny", data_dir / name)
        damage(data_dir / name)

    def truncate(d):
        (d / "train.bin").write_bytes((d / "train.bin").read_bytes()[:-3])

    def magic(d):
        (d / "train.bin").write_bytes(b"NOTSQRL!" + (d / "train.bin").read_bytes()[8:])

    def vocab(d):
        meta = json.loads((d / "meta.json").read_text())
        meta.update(vocab_size=10, tokenizer={"kind": "char", "chars": meta["tokenizer"]["chars"][:10]})
        (d / "meta.json").write_text(json.dumps(meta))

    def no_model(d):
        meta = json.loads((d / "meta.json").read_text())
        meta["tokenizer"] = {"kind": "sentencepiece", "model_file": "tokenizer.model"}
        (d / "meta.json").write_text(json.dumps(meta))

    def meta_vocab(d):
        meta = json.loads((d / "meta.json").read_text())
        meta["vocab_size"] += 7
        (d / "meta.json").write_text(json.dumps(meta))

    def no_splits(d):
        meta = json.loads((d / "meta.json").read_text())
        del meta["splits"]
        (d / "meta.json").write_text(json.dumps(meta))

    def short_val(d):
        from sqrllm.data import write_tokens
        write_tokens(d / "val.bin", np.array([3], dtype=np.uint8))

    for name, damage in (("trunc", truncate), ("magic", magic), ("vocab", vocab), ("shortval", short_val),
                         ("nomodel", no_model), ("metavocab", meta_vocab), ("nosplits", no_splits),
                         ("metalist", lambda d: (d / "meta.json").write_text("[]"))):
        variant(name, damage)
    return data_dir


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.mark.parametrize("extra, message", [
    (["--batch_size=abc"], "--batch_size=abc: batch_size must be int"),
    (["--learnign_rate=1"], "unknown config key 'learnign_rate'; did you mean 'learning_rate'"),
    (["--block_size=100000"], "tiny/train.bin: .* tokens cannot feed 4 streams of block_size 100000; lower"),
    (["--dataset=trunc"], "trunc/train.bin holds .* bytes of tokens but its header says .*; the file is truncated "
                          "or corrupt; re-run"),
    (["--dataset=magic"], "magic/train.bin is not a sqrllm token file \\(bad magic\\); re-run"),
    (["--dataset=vocab"], "vocab/train.bin holds token id .* but the tokenizer's vocab_size is 10"),
    (["--dataset=shortval"], "shortval/val.bin holds 1 token; evaluation needs at least 2"),
    (["--dataset=nomodel"], "nomodel/meta.json: SentencePiece model .*nomodel/tokenizer.model not found"),
    (["--dataset=metavocab"], "metavocab/meta.json says vocab_size 47 but its tokenizer has 40 tokens; re-run"),
    (["--dataset=nosplits"], "nosplits/meta.json: splits must be an object, got null; re-run the dataset's prepare.py"),
    (["--dataset=metalist"], "metalist/meta.json: tokenizer must be an object, got null; re-run"),
    (["--dataset=nothing"], "dataset 'nothing' not found in .*; prepare it first"),
    (["--init_from=resume", "--dataset=bytes"], "ckpt-000030.pt was trained with a char tokenizer of vocab_size "
                                                ".*, but dataset 'bytes' has a byte tokenizer of 256"),
    (["--init_from=resume", "--n_embd=24"], "the model shape differs from the checkpoint's \\(n_embd: 16 -> 24\\); "
                                            "keep these keys .* \\(the run's settings are in .*run/config.json"),
    (["--init_from=resume", "--batch_size=8"], "batch_size 4 -> 8; .* pass --allow_batch_change=true"),
    (["--init_from=resume", "--batching=random"], "batching stream -> random"),
    (["--eval_only=true"], "eval_only=True evaluates a trained run's checkpoint; pass --init_from=resume too"),
])
def test_bad_input_is_one_error_before_anything_is_written(bad_data, three_checkpoints, tmp_path, capsys, extra,
                                                           message):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    before = snapshot(out)
    code = CLI(args(bad_data, out, "--max_iters=40", *extra))
    captured = capsys.readouterr()
    assert code == 1
    line = one_error_line(captured.err)
    assert re.search(message, line), line
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def two_sentencepiece_datasets(tmp_path_factory):
    """Datasets 'spa' and 'spb': SentencePiece models of one vocab_size trained on different text."""
    pytest.importorskip("sentencepiece")
    from sqrllm.prepare import prepare_text

    root = tmp_path_factory.mktemp("spdata")
    for seed, name in enumerate(("spa", "spb")):  # 60 made-up words each, enough text for 300 pieces
        rng = np.random.default_rng(seed)
        words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(60)]
        (root / f"{name}.txt").write_text(" ".join(rng.choice(words, size=6000)) + "\n")
        meta, _ = prepare_text(root / name, [root / f"{name}.txt"], level="sentencepiece", vocab_size=300)
        assert meta["vocab_size"] == 300
    return root


def test_resume_with_another_sentencepiece_model_of_the_same_vocab_is_refused(two_sentencepiece_datasets, tmp_path,
                                                                               capsys):
    data, out = two_sentencepiece_datasets, tmp_path / "run"
    assert CLI(args(data, out, "--dataset=spa", "--max_iters=10")) == 0
    before = snapshot(out)
    assert before[Path("tokenizer.model")] == (data / "spa" / "tokenizer.model").read_bytes()
    capsys.readouterr()
    code = CLI(args(data, out, "--dataset=spb", "--max_iters=20", "--init_from=resume"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and re.search("ckpt-000010.pt was trained with a SentencePiece model of sha256 .*, but dataset "
                                   "'spb' has another model of the same vocab_size .*spb/tokenizer.model", line), line
    assert snapshot(out) == before  # the run's tokenizer.model included
    # a checkpoint written before the digest was recorded: out_dir's copy of the model decides
    ckpt = checkpoint.load(out)
    del ckpt["tokenizer"]["sha256"]
    cfg = load_config(args(data, out, "--dataset=spb", "--init_from=resume"))
    with pytest.raises(DataError, match=f"trained with the SentencePiece model {out / 'tokenizer.model'} "):
        check_resume(cfg, ckpt, out / "ckpt.pt", trainer.load_dataset(cfg)[0])
    assert CLI(args(data, out, "--dataset=spa", "--max_iters=20", "--init_from=resume")) == 0  # its own: goes on
    assert checkpoint.load(out)["step"] == 20


def test_resume_without_a_checkpoint_says_how_to_start(data_dir, tmp_path, capsys):
    code = CLI(args(data_dir, tmp_path / "empty", "--init_from=resume"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "no checkpoint in" in line and "train once without --init_from=resume" in line
    assert not (tmp_path / "empty").exists()


def test_a_resume_reads_the_newest_checkpoint_only_once_it_holds_out_dir(three_checkpoints, data_dir, tmp_path,
                                                                         monkeypatch):
    """Else a run relaunched while the stopped one still writes could resume from the checkpoint before,
    then rotate the newer ones away."""
    import fcntl

    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    load_latest, held = checkpoint.load_latest, []

    def spy(folder, **kw):
        with open(Path(folder) / ".lock") as other:  # a second open file: flock would block if held
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return load_latest(folder, **kw)

    monkeypatch.setattr(checkpoint, "load_latest", spy)
    train(load_config(args(data_dir, out, "--max_iters=32", "--init_from=resume")))
    assert held == [True]
    assert (out / ".lock").read_text() == f"pid {os.getpid()}\n"


def test_a_dataset_prepared_again_is_a_data_change_to_allow(three_checkpoints, data_dir, tmp_path, capsys):
    """The streams' stretches depend on the training split's length: a resume on a split of another
    length (prepared again, from less text) is refused like a batch change, and with the opt-in the
    streams restart at the saved share of their new stretches."""
    data, out = tmp_path / "data", tmp_path / "run"
    shutil.copytree(data_dir / "tiny", data / "tiny")
    shutil.copytree(three_checkpoints, out)
    n = len(read_tokens(data / "tiny" / "train.bin"))
    write_tokens(data / "tiny" / "train.bin", np.array(read_tokens(data / "tiny" / "train.bin")[: n // 2]))
    code = CLI(args(data, out, "--max_iters=35", "--init_from=resume"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and f"training tokens {n:,} -> {n // 2:,} (dataset 'tiny' changed since)" in line, line
    assert CLI(args(data, out, "--init_from=resume", "--eval_only=true")) == 0  # an evaluation reads no streams
    capsys.readouterr()
    result = train(load_config(args(data, out, "--max_iters=35", "--init_from=resume", "--allow_batch_change=true")))
    progress = 30 * 16 / ((n - 1) // 4)  # the saved share of the old stretches, on the new ones
    assert result["step"] == 35 and f"start {progress:.0%} of the way" in capsys.readouterr().out
    assert checkpoint.load(out)["data"]["cursor"].tolist() == [int(progress * ((n // 2 - 1) // 4)) + 5 * 16] * 4


def test_batch_change_with_opt_in_restarts_the_streams(three_checkpoints, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    result = train(load_config(args(data_dir, out, "--max_iters=35", "--init_from=resume", "--batch_size=2",
                                    "--allow_batch_change=true")))
    said = capsys.readouterr().out
    assert result["step"] == 35 and "batch_size 4 -> 2" in said
    # the 4 rows were 30 steps of 16 tokens into stretches of (n - 1) // 4; the 2 rows start as far
    # through their stretches of (n - 1) // 2, then read 5 steps
    n = len(read_tokens(data_dir / "tiny" / "train.bin"))
    progress = 30 * 16 / ((n - 1) // 4)
    assert f"the 2 data streams start {progress:.0%} of the way through their stretches" in said
    assert checkpoint.load(out)["data"]["cursor"].tolist() == [int(progress * ((n - 1) // 2)) + 5 * 16] * 2


@pytest.mark.parametrize("level", ["empty", "invalid utf-8"])
def test_prepare_script_errors(tmp_path, capsys, monkeypatch, level):
    src = tmp_path / "in.txt"
    src.write_bytes(b"" if level == "empty" else b"good text \xff\xfe more")
    name = f"_robust_test_{os.getpid()}"
    monkeypatch.setattr(sys, "argv", ["prepare.py", "--input", str(src), "--name", name])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(ROOT / "data" / "text" / "prepare.py"), run_name="__main__")
    message = str(done.value.code)
    assert message.startswith("error: ") and str(src) in message
    assert ("holds no text" if level == "empty" else "invalid UTF-8 at byte offset 10; fix the file, or pass "
            "--errors=replace") in message
    assert not (ROOT / "data" / name).exists()
