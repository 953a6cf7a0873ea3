"""Configuration: bad input is refused with one line and exit code 2; load_config and the batch plan.

The subprocess tests run the real entry (``python train.py ...``); config errors are raised before the
torch-heavy imports, so each takes a fraction of a second (the batch-plan error needs the world size,
so it comes from the trainer, a couple of seconds in).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ACCELERATE, PYTHON, ROOT, run

from toolkit.batch import make_plan
from toolkit.config import DEFAULT_CONFIG, Config, ConfigError, load_config

TOOLKIT = str(Path(ACCELERATE).with_name("toolkit"))

# (id, extra argv, substrings the one error line must contain)
BAD = [
    ("unknown-key", ["batch.foo=1"], ["batch.foo", "global_size", "micro_size"]),
    ("wrong-type", ["batch.global_size=abc"], ["batch.global_size", "abc"]),
    ("not-dividing", ["batch.global_size=30", "batch.micro_size=4"],
     ["batch.global_size=30", "valid global sizes nearby: 28, 32", "1, 2, 3, 5, 6, 10, 15, 30"]),
    ("micro-gt-global", ["batch.global_size=16", "batch.micro_size=32"],
     ["batch.micro_size=32", "batch.global_size=16"]),
    ("missing-data-file", ["data.source=tokens", "data.path=/nonexistent.bin"], ["data.path", "/nonexistent.bin"]),
    ("negative-steps", ["train.steps=-5"], ["train.steps=-5"]),
    ("missing-config-file", ["--config", "/nonexistent/run.yaml"], ["/nonexistent/run.yaml"]),
    ("bad-choice", ["model.size=huge"], ["model.size", "huge", "nano", "tiny", "small", "gpt2-small"]),
    ("not-key-value", ["batch.global_size"], ["batch.global_size", "key=value"]),
]


def assert_one_error_line(result, *needles: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.mark.parametrize("argv, needles", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_config_one_line_exit_2_run_dir_untouched(tmp_path, argv, needles):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sentinel = run_dir / "metrics.jsonl"
    sentinel.write_text('{"step": 1, "loss": 5.0}\n')
    os.utime(sentinel, (1_000_000_000, 1_000_000_000))
    fresh_dir = tmp_path / "fresh"

    result = run([PYTHON, "train.py", *argv, f"run.dir={run_dir}"], timeout=60)
    line = assert_one_error_line(result, *needles)
    print(line)

    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl"]
    assert sentinel.read_text() == '{"step": 1, "loss": 5.0}\n'
    assert sentinel.stat().st_mtime == 1_000_000_000

    # A run directory that does not exist yet is not created either.
    result = run([PYTHON, "train.py", *argv, f"run.dir={fresh_dir}"], timeout=60)
    assert_one_error_line(result, *needles)
    assert not fresh_dir.exists()


def test_unknown_top_level_key_in_yaml_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("seed: 1\nbogus_section: 3\nbatch:\n  global_size: 16\n")
    run_dir = tmp_path / "run"
    result = run([PYTHON, "train.py", "--config", str(config), f"run.dir={run_dir}"], timeout=60)
    line = assert_one_error_line(result, "bogus_section", str(config))
    assert "batch" in line and "seed" in line  # lists the valid top-level keys
    assert not run_dir.exists()


def test_unknown_nested_key_in_yaml_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("batch:\n  global_size: 16\n  micro: 4\n")
    result = run([PYTHON, "train.py", "--config", str(config)], timeout=60)
    assert_one_error_line(result, "batch.micro", str(config), "micro_size")


def test_yaml_wrong_type(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  steps: many\n")
    result = run([PYTHON, "train.py", "--config", str(config)], timeout=60)
    assert_one_error_line(result, "train.steps", str(config))


# ----------------------------------------------------------------------------------------- load_config


def test_defaults_come_from_tiny_yaml():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert DEFAULT_CONFIG == ROOT / "configs" / "tiny.yaml"
    assert cfg.seed == 1337
    assert cfg.run.name == "tiny" and cfg.run.dir is None
    assert cfg.run_dir == Path("runs") / "tiny"
    assert (cfg.batch.global_size, cfg.batch.micro_size) == (32, 4)
    assert (cfg.data.source, cfg.data.seq_len, cfg.data.pack) == ("stdlib", 128, True)
    assert cfg.model.size == "tiny"
    assert cfg.optim.lr == 3e-3 and cfg.optim.min_lr == 3e-4 and cfg.optim.warmup_samples == 1600
    assert (cfg.train.steps, cfg.train.log_every, cfg.train.val_every, cfg.train.val_batches) == (300, 20, 100, 4)
    # Not in the file: the dataclass defaults.
    assert cfg.train.log_every != Config().train.log_every  # the file overrides the default 10
    assert cfg.model.dropout == 0.0 and cfg.optim.grad_clip == 1.0 and cfg.train.debug is False
    assert cfg.optim.decay_samples is None and cfg.data.path is None


def test_overrides_merge_and_convert_types(tmp_path):
    cfg = load_config(None, ["batch.global_size=64", "batch.micro_size=null", "optim.lr=1", "train.steps=7",
                             "data.pack=false", f"run.dir={tmp_path}", "model.n_layer=3"])
    assert cfg.batch.global_size == 64 and type(cfg.batch.global_size) is int
    assert cfg.batch.micro_size is None
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.train.steps == 7
    assert cfg.data.pack is False
    assert cfg.run_dir == tmp_path
    assert cfg.model.n_layer == 3
    # Untouched keys keep the file's values; a later override wins over an earlier one.
    assert cfg.train.log_every == 20 and cfg.optim.warmup_samples == 1600
    assert load_config(None, ["train.steps=7", "train.steps=9"]).train.steps == 9


def test_own_yaml_file_merges_over_dataclass_defaults(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("batch:\n  global_size: 16\ntrain:\n  steps: 5\n")
    cfg = load_config(config, ["train.steps=6"])
    assert cfg.batch.global_size == 16
    assert cfg.batch.micro_size is None  # not tiny.yaml's 4: that file is not read
    assert cfg.train.steps == 6
    assert cfg.train.log_every == Config().train.log_every


@pytest.mark.parametrize("overrides, needle", [
    (["batch.foo=1"], "batch.foo"),
    (["nope=1"], "nope"),
    (["batch.global_size=abc"], "batch.global_size"),
    (["train.steps=0"], "train.steps"),
    (["batch.micro_size=0"], "batch.micro_size"),
    (["optim.min_lr=1"], "optim.min_lr"),
    (["data.val_fraction=0.9"], "data.val_fraction"),
    (["data.path=/x.bin"], "data.path"),
    (["train.precision=fp8"], "train.precision"),
    (["=3"], "key=value"),
])
def test_load_config_errors_are_one_line(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_missing_config_file_in_process(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------------- batch plan


@pytest.mark.parametrize("global_size, micro, world, expected_micro, expected_acc", [
    (32, 8, 1, 8, 4),
    (32, 8, 2, 8, 2),
    (32, 8, 4, 8, 1),
    (32, None, 1, 32, 1),
    (32, None, 4, 8, 1),
    (36, 4, 3, 4, 3),
    (24, 1, 8, 1, 3),
    (7, 1, 1, 1, 7),
])
def test_make_plan_derives_accumulation(global_size, micro, world, expected_micro, expected_acc):
    plan = make_plan(global_size, micro, world, seq_len=128)
    assert (plan.micro_size, plan.accumulation, plan.world_size) == (expected_micro, expected_acc, world)
    assert plan.micro_size * plan.accumulation * plan.world_size == global_size
    assert plan.per_rank == global_size // world
    assert plan.tokens_per_step == global_size * 128
    assert plan.as_dict()["tokens_per_step"] == global_size * 128
    assert str(global_size) in plan.table()


def test_make_plan_lists_valid_global_and_micro_sizes():
    with pytest.raises(ConfigError) as info:
        make_plan(30, 4, 1)
    message = str(info.value)
    assert "valid global sizes nearby: 28, 32" in message
    assert "valid micro sizes for global 30 on 1 processes: 1, 2, 3, 5, 6, 10, 15, 30" in message

    with pytest.raises(ConfigError) as info:
        make_plan(24, 8, 2)  # 8 x 2 = 16 does not divide 24
    message = str(info.value)
    assert "valid global sizes nearby: 16, 32" in message
    assert "valid micro sizes for global 24 on 2 processes: 1, 2, 3, 4, 6, 12" in message


def test_make_plan_world_size_not_dividing():
    with pytest.raises(ConfigError) as info:
        make_plan(30, None, 4)
    assert "valid global sizes nearby: 28, 32" in str(info.value)
    assert "4 processes" in str(info.value)

    with pytest.raises(ConfigError) as info:
        make_plan(32, 4, 3)  # 4 x 3 = 12
    message = str(info.value)
    assert "valid global sizes nearby: 24, 36" in message
    assert "does not divide over 3 processes" in message


def test_make_plan_micro_larger_than_global_and_bad_sizes():
    with pytest.raises(ConfigError, match="larger than batch.global_size=8"):
        make_plan(8, 16, 1)
    with pytest.raises(ConfigError, match="batch.global_size=0"):
        make_plan(0, None, 1)
    with pytest.raises(ConfigError, match="world size 0"):
        make_plan(8, None, 0)


# ----------------------------------------------------------------------------------------- toolkit plan


def toolkit_plan(*args: str):
    return run([TOOLKIT, "plan", *args], timeout=60)


def test_toolkit_plan_json():
    result = toolkit_plan("--world-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert {k: plan[k] for k in ("global_size", "micro_size", "accumulation", "world_size", "seq_len", "tokens_per_step")} == {
        "global_size": 32, "micro_size": 4, "accumulation": 4, "world_size": 2, "seq_len": 128, "tokens_per_step": 4096}
    assert {m["mode"] for m in plan["memory_bytes"]} >= {"DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"}

    result = toolkit_plan("--config", str(DEFAULT_CONFIG), "--world-size", "8", "--json", "batch.micro_size=null")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["micro_size"], plan["accumulation"], plan["world_size"]) == (4, 1, 8)


def test_toolkit_plan_table_and_errors():
    result = run([PYTHON, "-m", "toolkit.cli", "plan", "--world-size", "1", "batch.global_size=64"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "accumulation" in result.stdout and "8" in result.stdout and "64" in result.stdout

    # tiny.yaml's micro size 4 on 16 processes needs a global batch of 64.
    result = toolkit_plan("--world-size", "16", "--json")
    assert_one_error_line(result, "valid global sizes nearby: 64", "1, 2")


@pytest.mark.parametrize("overrides, needle", [
    (["optim.beta1=1.5"], "optim.beta1"),
    (["optim.beta2=-0.1"], "optim.beta2"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["data.synthetic_tokens=-5"], "data.synthetic_tokens"),
    (["data.val_path=/x.bin"], "data.val_path"),
    (["batch=3"], "'batch'"),
])
def test_values_that_would_fail_later_are_refused_up_front(overrides, needle):
    """Values AdamW or numpy would reject with a traceback get the one-line error instead."""
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_runs_config_yaml_loads_back(tmp_path):
    """config.yaml holds the resolved config plus the derived plan; it is a valid --config again."""
    from toolkit.batch import make_plan
    from toolkit.config import to_yaml

    cfg = load_config(None, ["batch.global_size=16", "train.steps=7"])
    plan = make_plan(cfg.batch.global_size, cfg.batch.micro_size, 2, cfg.data.seq_len)
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg, {"plan": plan.as_dict()}))
    again = load_config(saved)
    assert again == cfg
