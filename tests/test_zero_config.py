"""DeepSpeed settings: from the run config or the launch file, written from the batch plan, and a user's
DeepSpeed JSON that disagrees with the plan refused in one line; the memory prediction's arithmetic."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import PYTHON, ROOT, run

from toolkit import zero
from toolkit.batch import make_plan
from toolkit.config import ConfigError, apply_deepspeed_launch, load_config
from toolkit.memory import predict

GB = 1e9


def launched(stage="2", **extra) -> dict:
    return {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage, **extra}


def test_launch_file_stage_fills_an_unset_stage():
    cfg = load_config(None, [])
    apply_deepspeed_launch(cfg, launched("3", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu",
                                         ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="none"))
    assert (cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params) == (3, True, False)


def test_no_deepspeed_launch_changes_nothing():
    cfg = load_config(None, [])
    apply_deepspeed_launch(cfg, {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})  # not launched with DeepSpeed
    assert cfg.deepspeed.stage is None


@pytest.mark.parametrize("env, message", [
    (launched("2"), "deepspeed.stage=1 but the launch file says zero_stage: 2"),
    (launched("1", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="nvme"), "offload_optimizer_device: nvme is not supported"),
    (launched("1", ACCELERATE_GRADIENT_CLIPPING="0.5"), "gradient_clipping: 0.5 disagrees with optim.grad_clip=1.0"),
])
def test_launch_file_that_disagrees_is_refused(env, message):
    cfg = load_config(None, ["deepspeed.stage=1"])
    with pytest.raises(ConfigError, match=message):
        apply_deepspeed_launch(cfg, env)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed.stage=4"], "deepspeed.stage=4 is not valid"),
    (["deepspeed.stage=2", "deepspeed.offload_params=true"], "offload_params=true needs deepspeed.stage=3"),
    (["deepspeed.offload_optimizer=true"], "offload_optimizer=true needs ZeRO stage 1, 2 or 3"),
    (["deepspeed.stage=2", "deepspeed.config_file=/nonexistent.json"], "deepspeed.config_file: file not found"),
])
def test_bad_deepspeed_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def ds_config(tmp_path, user: dict | None, world=2, overrides=()):
    extra = []
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        extra = [f"deepspeed.config_file={path}"]
    cfg = load_config(None, ["deepspeed.stage=2", "batch.global_size=32", "batch.micro_size=4", *extra, *overrides])
    plan = make_plan(32, 4, world, 128)
    return zero.deepspeed_config(cfg, plan, on_cuda=False, hidden=128)


def test_batch_fields_come_from_the_plan(tmp_path):
    config = ds_config(tmp_path, {"train_batch_size": "auto", "zero_optimization": {"overlap_comm": True,
                                                                                     "reduce_bucket_size": 1234}})
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (32, 4, 4)
    assert config["zero_optimization"]["stage"] == 2
    assert config["zero_optimization"]["overlap_comm"] is True  # the user's other settings are kept
    assert config["zero_optimization"]["reduce_bucket_size"] == 1234  # ... including a bucket size
    assert config["zero_optimization"]["allgather_bucket_size"] == 128 * 128  # filled where unset
    assert config["gradient_clipping"] == 1.0


@pytest.mark.parametrize("user, message", [
    ({"train_batch_size": 64}, "train_batch_size=64 disagrees with the batch plan's 32"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 disagrees with the batch plan's 4"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1 disagrees with the batch plan's 4"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 disagrees with deepspeed.stage=2"),
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 disagrees with optim.grad_clip=1.0"),
])
def test_user_json_that_disagrees_is_refused(tmp_path, user, message):
    with pytest.raises(ConfigError, match=message):
        ds_config(tmp_path, user)


def test_train_py_refuses_a_disagreeing_json_in_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 2}}))
    run_dir = tmp_path / "run"
    result = run([PYTHON, "train.py", "deepspeed.stage=2", f"deepspeed.config_file={path}", f"run.dir={run_dir}"],
                 timeout=120, cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train_batch_size=16" in lines[0] and "32" in lines[0], result.stderr
    assert not run_dir.exists()


def test_prediction_matches_the_zero_paper_figure_1():
    """Figure 1 of the ZeRO paper: 7.5B parameters, 64 GPUs, K = 12, mixed precision: 120 GB, 31.4 GB,
    16.6 GB and 1.9 GB per device for the baseline, P_os, P_os+g and P_os+g+p."""
    psi, n = 7.5e9, 64
    got = [predict(int(psi), n, stage, bf16=True).model_states / GB for stage in (0, 1, 2, 3)]
    assert got == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.06)


def test_prediction_in_fp32_and_with_offload():
    psi = 1_000_000
    ddp = predict(psi, 2, None, bf16=False)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.buffers) == (4 * psi, 4 * psi, 8 * psi, 4 * psi)
    assert predict(psi, 1, None, bf16=False).buffers == 0  # one process: no DDP wrapper, no buckets
    z1 = predict(psi, 2, 1, bf16=False)  # ZeRO keeps an fp32 copy of its shard even in fp32
    assert (z1.params, z1.grads, z1.optimizer) == (4 * psi, 4 * psi, 6 * psi)
    off = predict(psi, 2, 3, bf16=False, offload_optimizer=True, offload_params=True)
    assert (off.params, off.optimizer) == (0, 0)
    assert off.host == 6 * psi + 2 * psi + 2 * psi  # optimizer shard, fp32 gradient shard, parameter shard


def test_toolkit_plan_prints_the_memory_plan():
    result = subprocess.run([PYTHON, "-m", "toolkit.cli", "plan", "--world-size", "4", "--json",
                             "--config", str(ROOT / "configs" / "bench-memory.yaml"), "train.precision=bf16",
                             "batch.global_size=4"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["n_params_total"] == 56_870_400 and data["precision"] == "bf16"
    by_mode = {m["mode"]: m for m in data["memory_bytes"]}
    states = [by_mode[name]["model_states"] for name in ("ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3")]
    assert states == sorted(states, reverse=True) and len(set(states)) == 4
    assert states[0] == 16 * data["n_params_total"]  # 2 + 2 + 12 bytes per parameter
    table = subprocess.run([PYTHON, "-m", "toolkit.cli", "plan", "--world-size", "4"], capture_output=True, text=True,
                           timeout=120, cwd=ROOT).stdout
    assert "ZeRO-3" in table and "activ" in table
