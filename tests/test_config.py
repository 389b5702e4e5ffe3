"""Config files and --key=value overrides: strict, typed, with errors that say what to do."""

import json
import os

import pytest

from sqrllm.config import Config, ConfigError, load_config


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layer = 6\nlearning_rate = 1  # int promotes to float\nout_dir = 'out/x'\nimport math\n")
    cfg = load_config([str(f), "--n_layer=2", "--dropout=0.1", "--compile=true", "--dataset=abc"])
    assert cfg.n_layer == 2 and cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.dropout == 0.1 and cfg.compile is True and cfg.dataset == "abc" and cfg.out_dir == "out/x"


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'learnign_rate'; did you mean 'learning_rate'"):
        load_config(["--learnign_rate=0.1"])
    f = tmp_path / "c.py"
    f.write_text("n_layers = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        load_config([str(f)])


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=abc", "batch_size must be int, got 'abc'"),
    ("--batch_size=1.5", "batch_size must be int"),
    ("--compile=maybe", "compile must be a bool"),
    ("--batch_size", "must be written --key=value"),
    ("--batching=sequential", "batching='sequential' is not one of 'stream', 'random'"),
    ("--dropout=1.5", "dropout must be in \\[0, 1\\)"),
    ("--drop_path=1", "drop_path must be in \\[0, 1\\)"),
    ("--zoneout=-0.1", "zoneout must be in \\[0, 1\\)"),
    ("--zoneout=0.1 --model=gpt --n_head=4", "zoneout=0.1 acts on sqrll layers' memory"),
    ("--n_layer=0", "n_layer must be at least 1"),
    ("--eval_block_size=-1", "eval_block_size must be >= 0"),
    ("--burn_in=16", "burn_in=16 is for batching='random'"),
    ("--burn_in=16 --batching=random --model=gpt --n_head=4", "needs a model with memory"),
    ("--burn_in_rows=0", "burn_in_rows must be in \\(0, 1\\]"),
    ("--beta1=1.0", "beta1 must be in \\[0, 1\\)"),  # AdamW's bias correction would divide by zero
    ("--beta2=2", "beta2 must be in \\[0, 1\\)"),
    ("--weight_decay=nan", "weight_decay must be >= 0, got nan"),
    ("--min_lr=-1", "min_lr must be >= 0"),
    ("--lr_decay_iters=-1", "lr_decay_iters must be >= 0"),
    ("--eval_max_tokens=-5", "eval_max_tokens must be >= 0"),
    ("--max_time=-1", "max_time must be >= 0"),
    ("--init_std=-1", "init_std must be a positive number"),
    ("--max_timescale=0", "max_timescale must be at least 1 \\(tokens\\)"),
    ("--num_threads=-1", "num_threads must be >= 0"),
    ("--grad_clip=nan", "grad_clip must be >= 0, got nan"),  # 0 turns clipping off; nan would too, silently
    ("--learning_rate=0", "learning_rate must be a positive number, got 0.0"),  # not "min_lr is above it"
    ("--min_lr=5", "min_lr=5.0 is above learning_rate=0.003: the decay would raise the learning rate"),
    ("--out_dir=", "out_dir is empty \\(an unset variable\\?\\); pass a folder"),
    ("--seed=-1", "seed must be in \\[0, 2\\*\\*32\\), got -1"),  # numpy's seed would fail mid-setup
])
def test_bad_overrides_name_the_field(arg, message):
    with pytest.raises(ConfigError, match=message):
        load_config(arg.split())


def test_an_override_before_a_config_file_is_refused(tmp_path):
    # the file would overwrite it (nanoGPT's configurator applies its arguments in order too, silently)
    f = tmp_path / "c.py"
    f.write_text("max_iters = 20\n")
    with pytest.raises(ConfigError, match=rf"config file {f} comes after the override --max_iters=7, which it would "
                                          r"overwrite; put config files first"):
        load_config(["--max_iters=7", str(f)])
    assert load_config([str(f), "--max_iters=7"]).max_iters == 7


def test_wrong_type_in_file_names_field_and_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_embd = '128'\n")
    with pytest.raises(ConfigError, match=r"c.py: n_embd must be int, got str '128'"):
        load_config([str(f)])
    f.write_text("compile = 1\n")
    with pytest.raises(ConfigError, match="compile must be bool"):
        load_config([str(f)])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="config file nope.py not found"):
        load_config(["nope.py"])
    f = tmp_path / "c.py"
    f.write_text("n_layer = (\n")
    with pytest.raises(ConfigError, match="failed to run: SyntaxError"):
        load_config([str(f)])


def test_gpt_is_not_evaluated_past_its_context():
    with pytest.raises(ConfigError, match=r"eval_block_size=512 is longer than the GPT's context \(block_size=256\)"):
        load_config(["--model=gpt", "--n_head=4", "--block_size=256", "--eval_block_size=512"])
    assert load_config(["--model=gpt", "--n_head=4", "--block_size=256", "--eval_block_size=128"]).eval_block_size == 128


def test_shipped_configs_load():
    for name in ("small", "shakespeare_char", "shakespeare_char_cpu"):
        cfg = load_config([f"configs/{name}.py"])
        assert cfg.out_dir.endswith(name)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["--n_layer=5"])
    cfg.save(tmp_path / "config.json")
    assert Config(**json.loads((tmp_path / "config.json").read_text())) == cfg


def test_a_home_folder_in_a_path_is_expanded():
    # bash leaves --out_dir=~/x alone: the ~ reaches the config as it is
    cfg = load_config(["--out_dir=~/runs/a", "--data_dir=~/data"])
    assert cfg.out_dir == os.path.expanduser("~/runs/a") and cfg.data_dir == os.path.expanduser("~/data")
