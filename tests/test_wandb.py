"""wandb_log=True in WANDB_MODE=offline: the run folder under out_dir holds the resolved config, the
metrics rows of metrics.jsonl and the eval-time samples; a resumed run continues the same run id."""

import json
from pathlib import Path

import pytest

from sqrllm import checkpoint
from sqrllm.config import ConfigError, load_config
from sqrllm.prepare import prepare_text
from sqrllm.trainer import EXIT_DIVERGED, RunStopped, train

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300))


def offline_env(home):
    """Environment variables for wandb offline and quiet, with its own folders under `home`."""
    dirs = ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", **{var: str(home) for var in dirs}}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    for var, value in offline_env(tmp_path / "wandb_home").items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def tiny_data(tmp_path):
    """tmp_path holding TEXT prepared as the character-level dataset 'tiny'."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    prepare_text(tmp_path / "tiny", [tmp_path / "corpus.txt"], level="char")
    return tmp_path


def records(path):
    """The records of a .wandb file: a 7-byte header, then LevelDB-log chunks (32 KiB blocks, each
    chunk: crc32, length, type) holding protobuf Records."""
    data, pos, block, buf = Path(path).read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0 and n == 0:
            break
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def offline_runs(out):
    """The offline run folders under out/wandb, oldest first, once wandb has written them out: run.finish()
    may return before wandb's service has written the run's .wandb file past its header (seen about
    once in ten runs here), so this first waits for the service, as a process's exit does."""
    wandb.teardown()
    return sorted((out / "wandb").glob("offline-run-*"))


def exit_codes(run_dir):
    """The exit codes a run's .wandb file records (one per finished run)."""
    return [r.exit.exit_code for r in records(next(Path(run_dir).glob("run-*.wandb")))
            if r.WhichOneof("record_type") == "exit"]


def history(run_dir):
    """{step: {key: value}} of the logged rows, and the config keys, of one offline run folder."""
    rows, config = {}, {}
    for r in records(next(Path(run_dir).glob("run-*.wandb"))):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(row.pop("_step"), {}).update(row)
        elif kind in ("run", "config"):
            updates = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
    return rows, config


def tiny(root, out, *extra):
    return load_config([f"--data_dir={root}", "--dataset=tiny", f"--out_dir={out}", "--n_layer=1", "--n_embd=32",
                        "--batch_size=4", "--block_size=32", "--log_interval=5", "--eval_interval=10",
                        "--eval_max_tokens=500", "--progress=false", "--num_threads=1", "--compile=false",
                        "--wandb_log=true", "--wandb_project=sqrllm-test", "--wandb_run_name=tiny", *extra])


def test_offline_run_holds_config_metrics_and_samples_and_resume_reuses_the_id(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny(tiny_data, out, "--max_iters=20"))
    run_id = checkpoint.load(out / "ckpt.pt")["wandb_run_id"]
    runs = offline_runs(out)
    assert run_id and [r.name.rsplit("-", 1)[1] for r in runs] == [run_id]
    rows, config = history(runs[0])
    assert config["n_embd"] == 32 and config["wandb_run_name"] == "tiny" and config["dataset"] == "tiny"
    want = {}  # metrics.jsonl's rows merged by step, as wandb merges what is logged at one step
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        want.setdefault(row.pop("step"), {}).update({k: v for k, v in row.items() if v is not None})
    for step, row in want.items():
        for key, value in row.items():
            assert rows[step][key] == pytest.approx(value), (step, key)
    assert {"loss", "tok_per_s", "lr"} <= set(rows[5]) and {"val_loss", "val_bpb"} <= set(rows[10])
    tables = sorted((runs[0] / "files" / "media" / "table").glob("samples_*.table.json"))
    samples = json.loads(tables[-1].read_text())
    assert samples["columns"] == ["step", "sample"] and [r[0] for r in samples["data"]] == [10, 20]
    assert all(isinstance(r[1], str) and r[1] for r in samples["data"])

    train(tiny(tiny_data, out, "--max_iters=30", "--init_from=resume"))
    assert checkpoint.load(out / "ckpt.pt")["wandb_run_id"] == run_id
    runs = offline_runs(out)
    assert len(runs) == 2 and runs[1].name.endswith(f"-{run_id}")
    rows, _ = history(runs[1])
    assert {25, 30} <= set(rows) and min(rows) > 20 and "val_loss" in rows[30]
    # the table of samples holds the samples of before the resume too ("all samples so far")
    tables = sorted((runs[1] / "files" / "media" / "table").glob("samples_*.table.json"))
    assert [r[0] for r in json.loads(tables[-1].read_text())["data"]] == [10, 20, 30]


def test_without_wandb_the_error_says_how_to_install(tiny_data, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"pip install 'sqrllm\[wandb\]'"):
        train(tiny(tiny_data, tmp_path / "run", "--max_iters=2"))
    assert not (tmp_path / "run").exists()


def test_without_a_login_the_error_says_how_and_nothing_is_written(tiny_data, tmp_path, monkeypatch):
    """Online, with no API key: one error naming `wandb login` and offline mode, before out_dir is made."""
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    wandb.teardown()  # wandb reads its mode from the environment when it is set up
    try:
        with pytest.raises(ConfigError, match=r"wandb cannot log in .*run `wandb login` .*WANDB_MODE=offline"):
            train(tiny(tiny_data, tmp_path / "run", "--max_iters=2"))
    finally:
        wandb.teardown()
    assert not (tmp_path / "run").exists()


def test_a_stopped_run_is_finished_with_its_exit_status(tiny_data, tmp_path):
    out = tmp_path / "run"
    # a learning rate of 1e30 makes the weights overflow at step 2: steps 2-3 are non-finite
    with pytest.raises(RunStopped) as stop:
        train(tiny(tiny_data, out, "--max_iters=20", "--learning_rate=1e30", "--warmup_iters=0", "--max_bad_steps=2"))
    assert stop.value.code == EXIT_DIVERGED
    assert [exit_codes(run) for run in offline_runs(out)] == [[EXIT_DIVERGED]]


def test_a_stopped_run_keeps_its_status_when_wandb_cannot_finish(tiny_data, tmp_path, monkeypatch, capsys):
    def unfinished(self, *args, **kwargs):
        raise TimeoutError("the upload did not finish")

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", unfinished)
    with pytest.raises(RunStopped) as stop:
        train(tiny(tiny_data, tmp_path / "run", "--max_iters=20", "--learning_rate=1e30", "--warmup_iters=0",
                   "--max_bad_steps=2"))
    assert stop.value.code == EXIT_DIVERGED
    assert "warning: could not finish the wandb run (TimeoutError: the upload did not finish)" in capsys.readouterr().err


def test_when_wandb_cannot_start_the_run_the_error_says_how_and_a_rerun_goes_on(tiny_data, tmp_path, monkeypatch):
    """wandb.init failing (online: a network timeout) is one error naming offline mode and wandb_log,
    not a traceback; the out_dir is left free, so the next run (here without wandb) trains in it."""
    out = tmp_path / "run"

    def unreachable(*args, **kwargs):
        raise wandb.errors.CommError("Run initialization has timed out after 90.0 sec.")

    monkeypatch.setattr(wandb, "init", unreachable)
    with pytest.raises(ConfigError, match=r"wandb could not start the run \(CommError: Run initialization has "
                                          r"timed out.*WANDB_MODE=offline.*wandb_log=False"):
        train(tiny(tiny_data, out, "--max_iters=10"))
    assert not (out / "ckpt.pt").exists()
    train(tiny(tiny_data, out, "--max_iters=10", "--wandb_log=false"))
    assert (out / "ckpt.pt").exists()
