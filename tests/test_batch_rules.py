"""The batch-size study's training rules: a batch-size ramp, LR scaling rules, full-batch steps, and a run that
stops at its target validation loss.

Each run here is checked against numbers the test works out itself (the ramp's sizes from Megatron-LM's
formula, the data stream from the seeded permutations, the LR from the warmup rule), not against the toolkit's
own helpers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, final_weights, read_jsonl, run, train, train_cmd
from test_resume_kill import start_and_kill

from toolkit.batch import BatchSchedule, make_full_plan, scaled_lr, schedule_for_config
from toolkit.bench.common import max_rel_diff
from toolkit.config import ConfigError, load_config
from toolkit.data import GlobalBatchSampler, load_data, rank_micro_batches
from toolkit.model import build_model, optimizer_groups

SEED = 1337
DATA = ["model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=60000",
        "data.pack=false", "data.seq_len=32", "train.precision=fp32", "train.progress=false", "tracking.wandb=false"]


def megatron_sizes(start: int, increment: int, ramp_samples: int, final: int, steps: int) -> list[int]:
    """Each step's global batch as Megatron-LM's ``--rampup-batch-size`` computes it from the samples consumed."""
    per_increment = ramp_samples / ((final - start) // increment)
    sizes, consumed = [], 0
    for _ in range(steps):
        size = min(final, start + int(consumed / per_increment) * increment)
        sizes.append(size)
        consumed += size
    return sizes


def stream(num_samples: int, global_size: int, seed: int, count: int) -> list[int]:
    """The first ``count`` positions of the data stream: epoch e is ``randperm`` seeded from (seed, e), of
    which the first whole global batches are used."""
    used = num_samples // global_size * global_size
    out, epoch = [], 0
    while len(out) < count:
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        out += torch.randperm(num_samples, generator=torch.Generator().manual_seed(epoch_seed))[:used].tolist()
        epoch += 1
    return out[:count]


def warmup_then_flat(samples_done: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, samples_done / warmup)


# ----------------------------------------------------------------------------------------- unit rules
def test_the_ramp_follows_megatron_and_counts_samples():
    schedule = BatchSchedule(64, ramp_start=16, ramp_increment=16, ramp_samples=1000)
    expected = megatron_sizes(16, 16, 1000, 64, 200)
    assert [schedule.size(k) for k in range(200)] == expected
    assert expected[0] == 16 and expected[-1] == 64 and sorted(set(expected)) == [16, 32, 48, 64]
    for k in (0, 1, 5, len(schedule.ramp_sizes), 150):
        assert schedule.samples_before(k) == sum(expected[:k])
    for samples in (1, 16, 17, 1000, 5000):
        steps = schedule.steps_for_samples(samples)
        assert sum(expected[:steps]) >= samples > sum(expected[: steps - 1])
    assert BatchSchedule(32).samples_before(7) == 7 * 32 and BatchSchedule(32).steps_for_samples(33) == 2


def test_toolkit_plan_shows_the_ramp():
    result = run([str(Path(PYTHON).with_name("toolkit")), "plan", "--json", "batch.global_size=32", "batch.micro_size=4",
                  "batch.ramp.start=8", "batch.ramp.increment=8", "batch.ramp.samples=1000", "--world-size", "2"],
                 timeout=60)
    assert result.returncode == 0, result.stderr
    sizes = megatron_sizes(8, 8, 1000, 32, 200)
    assert json.loads(result.stdout)["ramp_sizes"] == sizes[: sizes.index(32)]


def test_lr_rules():
    assert scaled_lr(1e-3, 512, 128, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 512, 128, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 512, 128, "none") == 1e-3
    with pytest.raises(ConfigError, match="optim.reference_batch"):
        load_config(None, ["optim.lr_scaling=sqrt"])
    with pytest.raises(ConfigError, match="optim.lr_scaling"):
        load_config(None, ["optim.lr_scaling=cubic"])


@pytest.mark.parametrize("overrides, message", [
    (["batch.ramp.start=6", "batch.ramp.increment=2", "batch.ramp.samples=100"], "batch.ramp.start=6 is not a multiple"),
    (["batch.ramp.start=8", "batch.ramp.increment=16", "batch.ramp.samples=100"], "batch.ramp.increment=16 must"),
    (["batch.ramp.start=64", "batch.ramp.increment=8", "batch.ramp.samples=100"], "batch.ramp.start=64 must be"),
    (["batch.ramp.start=8"], "needs batch.ramp.increment"),
    (["batch.ramp.start=8", "batch.ramp.increment=8", "batch.ramp.samples=100", "deepspeed.stage=2"],
     "not supported with DeepSpeed"),
    (["batch.global_size=full", "batch.ramp.start=8", "batch.ramp.increment=8", "batch.ramp.samples=100"],
     "cannot be combined"),
])
def test_a_bad_ramp_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(None, ["batch.global_size=32", "batch.micro_size=4", *overrides])
        schedule_for_config(cfg, world_size=2, train_samples=1000)


@pytest.mark.parametrize("samples, micro, world", [(118, 16, 2), (100, 7, 3), (64, 8, 2), (5, 4, 1)])
def test_a_full_batch_is_cut_into_near_equal_micro_batches(samples, micro, world):
    plan = make_full_plan(samples, micro, world)
    batch = list(range(1000, 1000 + samples))
    pieces = [m for rank in range(world) for m in rank_micro_batches(batch, plan, rank)]
    assert sum(pieces, []) == batch  # every sample once, in order, each rank a contiguous block
    assert len(pieces) == plan.accumulation * world
    sizes = [len(m) for m in pieces]
    assert max(sizes) <= micro and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert plan.ragged == (samples % (micro * world) != 0)


def test_the_sampler_reads_one_stream_across_epochs():
    sampler = GlobalBatchSampler(50, 16, seed=3)  # 3 whole batches an epoch, 2 samples dropped
    expected = stream(50, 16, 3, 200)
    assert sampler.take(0, 200) == expected
    assert sampler.take(40, 20) == expected[40:60]  # across the end of epoch 0 (48 used samples)
    assert [sampler.global_batch(k) for k in range(6)] == [expected[16 * k : 16 * (k + 1)] for k in range(6)]


# ----------------------------------------------------------------------------------------- real runs
RAMP = [*DATA, "seed=1337", "batch.global_size=32", "batch.micro_size=4", "batch.ramp.start=8",
        "batch.ramp.increment=8", "batch.ramp.samples=1200", "optim.schedule=constant", "optim.warmup_samples=800",
        "optim.lr=0.003", "train.steps=110", "train.log_every=1", "train.val_every=0", "train.val_batches=1"]


def test_a_ramped_run_follows_the_ramp_and_resumes_mid_ramp_bit_identically(tmp_path):
    steps, sizes = 110, megatron_sizes(8, 8, 1200, 32, 110)
    ramp_steps = sizes.index(32)
    assert 80 < ramp_steps < steps  # the ramp is most of the run, so a kill lands in it
    whole = tmp_path / "whole"
    train([*RAMP, f"run.dir={whole}", "run.record_samples=true", "checkpoint.every_steps=0"], processes=2)

    # The plan: each step's global batch and accumulation (micro 4 x 2 processes) follow the ramp.
    records = [r for r in read_jsonl(whole / "metrics.jsonl") if "loss" in r]
    assert [r["global_size"] for r in records] == sizes
    assert [r["accumulation"] for r in records] == [s // 8 for s in sizes]
    assert [r["samples"] for r in records] == [sum(sizes[: k + 1]) for k in range(steps)]
    # The LR follows the samples consumed (a warmup of 800 samples), not the steps.
    for k in (0, 10, 40, 99, 109):
        assert records[k]["lr"] == pytest.approx(warmup_then_flat(sum(sizes[: k + 1]), 0.003, 800), rel=1e-12)
    # The data order: step k takes the next sizes[k] samples of the seeded stream; rank r a contiguous half.
    cfg = load_config(None, [*RAMP])
    num_samples = len(load_data(cfg, 256)[0])
    expected = stream(num_samples, 32, SEED, sum(sizes))
    per_rank = [{r["step"]: r["indices"] for r in read_jsonl(whole / f"samples-rank{rank}.jsonl")} for rank in (0, 1)]
    for k in range(steps):
        begin = sum(sizes[:k])
        assert per_rank[0][k] + per_rank[1][k] == expected[begin : begin + sizes[k]], f"step {k}"
        assert len(per_rank[0][k]) == len(per_rank[1][k]) == sizes[k] // 2

    # Killed mid-ramp (SIGKILL of the whole process group), then the same command again.
    broken = tmp_path / "broken"
    command = [*RAMP, f"run.dir={broken}", "checkpoint.every_steps=10", "checkpoint.keep=100"]
    newest, what = start_and_kill(command, 2, broken, delay=0.0)
    assert newest is not None and newest < ramp_steps, f"the kill did not land in the ramp: {what}"
    resumed = train(command, processes=2)
    assert f"resumed from {broken / 'checkpoints' / f'step-{newest:08d}'}" in resumed.stdout
    a, b = final_weights(whole), final_weights(broken)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"not bit-identical after a resume at step {newest} (mid-ramp): {different}"
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["samples"] == sum(sizes) and summary["global_size"] == 32


def test_an_lr_scaled_run_and_a_run_that_stops_at_its_target(tmp_path):
    run_dir = tmp_path / "sqrt"
    stdlib = ["model.size=nano", "data.max_bytes=300000", "data.seq_len=32", "train.progress=false", "tracking.wandb=false"]
    overrides = [*stdlib, "batch.global_size=32", "batch.micro_size=8", "optim.lr=0.001", "optim.lr_scaling=sqrt",
                 "optim.reference_batch=8", "optim.schedule=constant", "optim.warmup_samples=320", "train.steps=400",
                 "train.log_every=7", "train.val_every=10", "train.val_batches=2", "train.stop_val_loss=3.0",
                 "run.record_samples=true", f"run.dir={run_dir}"]
    result = train(overrides)
    assert "peak LR 0.002 = optim.lr 0.001 scaled by the sqrt rule" in result.stdout
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in records if "loss" in r]
    # The LR at chosen samples: sqrt(32 / 8) x 0.001, reached after 320 samples (10 steps), flat after.
    for r in train_records[:10]:
        assert r["lr"] == pytest.approx(warmup_then_flat(r["samples"], 0.002, 320), rel=1e-12)
    assert {r["accumulation"] for r in train_records} == {4}
    # The data order is the seeded stream's, as without any rule.
    cfg = load_config(None, overrides)
    indices = [r["indices"] for r in read_jsonl(run_dir / "samples-rank0.jsonl")]  # one line per step
    expected = stream(len(load_data(cfg, 256)[0]), 32, cfg.seed, 32 * len(indices))
    assert sum(indices, []) == expected
    # It stopped at the first validation at or below 3.0, and says so.
    vals = [r for r in records if "val_loss" in r]
    assert vals[-1]["val_loss"] <= 3.0 and all(v["val_loss"] > 3.0 for v in vals[:-1])
    assert all("train_time_s" in r for r in records)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_at_target"] is True and summary["steps"] == vals[-1]["step"] < 400
    # Stopped between log steps (every 7; validations every 10): the last steps are logged and timed too.
    assert train_records[-1]["step"] == summary["steps"]
    assert summary["train_time_s"] == pytest.approx(train_records[-1]["train_time_s"])
    assert summary["train_time_s"] >= vals[-1]["train_time_s"] > vals[0]["train_time_s"]
    assert summary["peak_lr"] == pytest.approx(0.002) and summary["target_val_loss"] == 3.0
    assert "target reached" in result.stdout
    again = run(train_cmd(overrides), timeout=120)
    assert again.returncode == 0 and "is already finished" in again.stdout and "stopped at its target" in again.stdout


def hand_made_steps(cfg, data, indices: list[int], steps: int, dtype: torch.dtype) -> dict:
    """``steps`` AdamW steps on the mean loss of ``indices`` (one forward over all of them), clipped as the run is."""
    model = build_model(cfg).to(dtype)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    x, y = data.batch(indices)
    for _ in range(steps):
        (model((x, y))[0] / data.valid_targets(indices)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    return {name: value.float() for name, value in model.state_dict().items()}


def test_full_batch_equals_steps_over_the_whole_training_set_listed_by_hand(tmp_path):
    """Two steps of ``batch.global_size: full`` on 2 processes (180 samples of random-length documents, not a
    multiple of micro 16 x 2: 12 micro-batches of 15) against AdamW stepped by hand on the loss of all of them.

    The reference is computed in float64. Adam's first steps are sign-like, so float32 rounding in gradient
    elements that cancel to near zero moves some weights by ~1e-3 of their tensor's scale; the run must be
    as close to the exact math as the same hand-made steps in float32 are (and a batch missing 6 samples is
    far outside that)."""
    overrides = [*DATA, "data.synthetic_tokens=4000", "batch.global_size=full", "batch.micro_size=16",
                 "optim.warmup_samples=0", "optim.schedule=constant", "optim.lr=0.01", "train.steps=2",
                 "train.val_every=0", "train.log_every=1", "seed=1337"]
    run_dir = tmp_path / "full"
    train([*overrides, f"run.dir={run_dir}"], processes=2)
    cfg = load_config(None, overrides)
    data, _ = load_data(cfg, 256)
    everything = list(range(len(data)))  # the whole training set, listed by hand
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_size"] == len(everything) == 180 and summary["samples"] == 2 * 180
    assert summary["accumulation"] == 6  # ceil(180 / (16 x 2)): 6 micro-steps of 15 samples on each process

    exact = hand_made_steps(cfg, data, everything, 2, torch.float64)
    float32_noise, _ = max_rel_diff(hand_made_steps(cfg, data, everything, 2, torch.float32), exact)
    ours, worst = max_rel_diff(final_weights(run_dir), exact)
    assert ours <= max(2 * float32_noise, 1e-5), f"{worst}: {ours:.2e} from the exact full-batch steps " \
                                                  f"(float32 noise: {float32_noise:.2e})"
    missing_six, _ = max_rel_diff(hand_made_steps(cfg, data, everything[:-6], 2, torch.float64), exact)
    assert missing_six > 10 * max(2 * float32_noise, 1e-5)  # the test tells a batch that is not whole
    assert not math.isnan(summary["final_loss"])
