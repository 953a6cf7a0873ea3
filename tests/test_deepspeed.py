"""DeepSpeed ZeRO from the batch plan: the same training as DDP at every stage, whole checkpoints that
resume after a kill and on another number of processes, clean exits, refused disagreeing configs.

Equivalence: 2 gloo processes, ``data.pack=false`` (samples of different numbers of valid targets),
global 8 = micro 2 x accumulation 2 x 2 processes, 5 steps, fp32. Each ZeRO stage (and ZeRO-3 with CPU
offload, started through its launch file) must end on the final weights of plain DDP (max relative
difference per tensor <= 1e-4) and log the same gradient norm before clipping at every step. The norm is
the sharper check: Adam's update hardly changes when every gradient is scaled by the same factor, so a
loss divided once more by DeepSpeed's accumulation steps would barely move the weights, but it halves the
norm (a probe run with ``scale_wrt_gas`` left on is in ``test_loss_scaling_is_visible_in_the_norm``).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ZERO_JOB, final_weights, read_jsonl, train, train_together
from test_resume_kill import start_and_kill, valid_checkpoints

from toolkit import shards
from toolkit.bench.common import max_rel_diff

COMMON = ZERO_JOB  # conftest.py: small_job(8, 5), micro 2, no checkpoint before the end
TOL = 1e-4
NORM_TOL = 1e-5
# mode -> (extra overrides, launch file or None for launch/cpu.yaml)
MODES = {
    "zero0": (["deepspeed.stage=0"], None),
    "zero1": (["deepspeed.stage=1"], None),
    "zero2": (["deepspeed.stage=2"], None),
    "zero3": (["deepspeed.stage=3"], None),
    "zero3-offload": ([], "zero3-offload.yaml"),  # stage and offload come from the launch file
}
ABORT_SIGNS = ("terminate called", "Aborted", "core dumped", "Traceback", "Segmentation fault")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ddp_two_processes, zero3_offload_two_processes) -> dict[str, tuple[Path, object]]:
    """Each mode's run. DDP's and ZeRO-3-offload's are made once for the session (conftest.py): the DDP run is
    also tests/test_invariance.py's 2x2x2 split, the offload run's output is what tests/test_output.py checks."""
    root = tmp_path_factory.mktemp("deepspeed")
    assert MODES["zero3-offload"] == ([], "zero3-offload.yaml")  # what the shared run was started with
    done = {"ddp": ddp_two_processes, "zero3-offload": zero3_offload_two_processes}
    for name, (extra, launch) in MODES.items():
        if name in done:
            continue
        started = time.perf_counter()
        result = train([*COMMON, *extra, f"run.dir={root / name}"], processes=2, launch=launch)
        print(f"{name}: {time.perf_counter() - started:.1f} s")
        done[name] = (root / name, result)
    return done


def norms(run_dir: Path) -> list[float]:
    return [r["grad_norm"] for r in read_jsonl(run_dir / "metrics.jsonl") if "grad_norm" in r]


@pytest.mark.parametrize("mode", list(MODES))
def test_stage_matches_ddp(runs, mode):
    ddp_dir, _ = runs["ddp"]
    run_dir, _ = runs[mode]
    ref, got = final_weights(ddp_dir), final_weights(run_dir)
    # Whole weights under every stage: same names and shapes as DDP's.
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    rel, where = max_rel_diff(got, ref)
    print(f"{mode}: max relative difference to DDP {rel:.2e} ({where})")
    assert rel <= TOL, f"{mode}: {where} differs by {rel:.2e}"
    ref_norms, got_norms = norms(ddp_dir), norms(run_dir)
    assert len(got_norms) == len(ref_norms) == 5
    for step, (a, b) in enumerate(zip(got_norms, ref_norms, strict=True), start=1):
        assert abs(a - b) <= NORM_TOL * b, f"{mode}: step {step} grad norm {a} vs DDP {b}"
    ref_loss = [r["loss"] for r in read_jsonl(ddp_dir / "metrics.jsonl") if "loss" in r]
    got_loss = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert got_loss == pytest.approx(ref_loss, rel=1e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_clean_exit(runs, mode):
    run_dir, result = runs[mode]
    assert result.returncode == 0
    output = result.stdout + result.stderr
    found = [sign for sign in ABORT_SIGNS if sign in output]
    assert not found, f"{mode}: {found} in the output:\n{result.stderr[-3000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 5


def test_launch_file_settings_are_recorded(runs):
    """The ZeRO-3 offload launch file's stage and offload settings end up in the run's config.yaml."""
    run_dir, _ = runs["zero3-offload"]
    text = (run_dir / "config.yaml").read_text()
    section = text[text.index("deepspeed:"):]
    assert "stage: 3" in section and "offload_optimizer: true" in section and "offload_params: true" in section
    assert json.loads((run_dir / "summary.json").read_text())["memory"]["mode"] == "ZeRO-3 +offload opt +offload params"


def test_loss_scaling_is_visible_in_the_norm(runs, tmp_path):
    """The norm check can fail: the same ZeRO-2 run with DeepSpeed dividing the loss by its accumulation
    steps (scale_wrt_gas=True, the engine's default) logs norms half of DDP's (accumulation 2)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import deepspeed.runtime.engine as e\n"
        "backward = e.DeepSpeedEngine.backward\n"
        "e.DeepSpeedEngine.backward = lambda self, loss, **kw: backward(self, loss)  # drops scale_wrt_gas=False\n"
        "from toolkit.cli import train_main\n"
        "sys.exit(train_main(sys.argv[1:]))\n"
    )
    train([*COMMON, "deepspeed.stage=2", f"run.dir={tmp_path / 'run'}"], processes=2, script=str(probe))
    ddp_dir, _ = runs["ddp"]
    ratios = [a / b for a, b in zip(norms(tmp_path / "run"), norms(ddp_dir), strict=True)]
    assert all(abs(r - 0.5) < 1e-4 for r in ratios), ratios


# ------------------------------------------------------------------------------------------ resume
RESUME_STEPS = 60
RESUME_EVERY = 10
RESUME = [*COMMON, "data.synthetic_tokens=100000", f"train.steps={RESUME_STEPS}", "train.log_every=5",
          f"checkpoint.every_steps={RESUME_EVERY}", "checkpoint.keep=100", "deepspeed.stage=2"]


@pytest.fixture(scope="module")
def zero2_reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "reference"
    train([*RESUME, f"run.dir={run_dir}"], processes=2)
    assert valid_checkpoints(run_dir) == list(range(RESUME_STEPS, 0, -RESUME_EVERY))
    return run_dir


def test_zero2_resume_after_sigkill_during_an_async_sharded_save_is_bit_identical(zero2_reference, tmp_path):
    """Sharded checkpoints written in the background (each shard 0.5 s slower: tests/probe_slow_shards.py); the run
    is killed while one is being written, and resumes from the one before, to the reference's (whole
    checkpoints) final weights, bit for bit."""
    delay = random.Random(7).uniform(0.0, 0.4)
    killed = tmp_path / "killed"
    config = [*RESUME, "checkpoint.format=sharded", "checkpoint.async_save=true"]
    newest, what = start_and_kill([*config, f"run.dir={killed}"], 2, killed, delay, during_save=True,
                                  script=str(ROOT / "tests" / "probe_slow_shards.py"))
    print(f"\nZeRO-2, kill {delay:.2f} s after a save began: {what}")
    assert newest is not None and "while writing checkpoint step" in what, what
    assert shards.is_sharded(killed / "checkpoints" / f"step-{newest:08d}")
    result = train([*config, f"run.dir={killed}"], processes=2)
    match = re.search(r"resumed from \S+ at step (\d+)", result.stdout)
    assert match and int(match.group(1)) == newest, result.stdout[-2000:]
    got, ref = final_weights(killed), final_weights(zero2_reference)
    different = [name for name in ref if not torch.equal(ref[name], got[name])]
    rel, where = max_rel_diff(got, ref)
    print(f"resumed at step {newest}: max relative difference to the uninterrupted run {rel:.2e} ({where})")
    assert not different, f"after the kill at step {newest} these tensors differ: {different} (max {rel:.2e})"
    assert json.loads((killed / "summary.json").read_text())["steps"] == RESUME_STEPS


def test_zero2_checkpoint_of_two_processes_resumes_on_one(zero2_reference, tmp_path):
    resume_at = 30
    source = zero2_reference / "checkpoints" / f"step-{resume_at:08d}"
    assert json.loads((source / "state.json").read_text())["plan"]["world_size"] == 2
    result = train([*RESUME, f"run.dir={tmp_path / 'one'}", f"checkpoint.resume={source}"], processes=1)
    line = next((x for x in result.stdout.splitlines() if x.startswith("resumed from")), "")
    assert f"at step {resume_at} (written with 2 processes, now 1: accumulation 2 -> 4)" in line, result.stdout[-2000:]
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["memory"]["mode"]) == (RESUME_STEPS, 1, "ZeRO-2")
    rel, where = max_rel_diff(final_weights(tmp_path / "one"), final_weights(zero2_reference))
    print(f"\nZeRO-2 2 -> 1 process at step {resume_at}: max relative difference to the 2-process run {rel:.2e} ({where})")
    assert rel <= TOL, f"{where}: {rel:.2e}"


def test_model_compile_trains_the_same_with_and_without_deepspeed(runs, tmp_path):
    """``model.compile=true`` (inductor) without DeepSpeed and under ZeRO-2 (Accelerate compiles the engine's module),
    one process each (accumulation 4 instead of 2 x 2): the same weights as eager DDP on 2 processes."""
    ddp = final_weights(runs["ddp"][0])
    jobs = {"compiled": [], "compiled-zero2": ["deepspeed.stage=2"]}
    results = train_together([[*COMMON, *extra, "model.compile=true", f"run.dir={tmp_path / name}"]
                              for name, extra in jobs.items()], timeout=400)
    for (name, extra), result in zip(jobs.items(), results, strict=True):
        assert "compiled (torch.compile)" in result.stdout and ("ZeRO-2" in result.stdout) == bool(extra)
        diff, where = max_rel_diff(final_weights(tmp_path / name), ddp)
        assert diff <= TOL, f"{name}: {where} differs by {diff:.2e}"
