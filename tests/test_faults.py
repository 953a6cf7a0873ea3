"""Preemption (SIGTERM/SIGUSR1 to one rank) and non-finite steps (skip on every rank, or stop)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    child_env,
    descendants,
    final_weights,
    kill_job,
    read_jsonl,
    train,
    train_cmd,
    train_together,
)

from toolkit.cli import EXIT_NONFINITE, EXIT_PREEMPTED

COMMON = ["model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=100000",
          "data.pack=false", "data.seq_len=32", "batch.global_size=8", "batch.micro_size=2",
          "train.log_every=5", "train.val_every=0", "train.val_batches=1", "train.progress=false",
          "train.precision=fp32", "checkpoint.every_steps=1000"]


def rank_pids(launcher_pid: int, rank: int) -> list[int]:
    """Processes below the launcher whose environment says RANK=<rank> (torchrun's workers)."""
    found = []
    for pid in descendants(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"train.py" in cmdline:
            found.append(pid)
    return found



@pytest.mark.parametrize("processes, signum", [(1, signal.SIGTERM), (2, signal.SIGUSR1)])
def test_preemption_stops_all_ranks_with_a_checkpoint_and_resumes_identically(tmp_path, processes, signum):
    # The signal goes out once step 15 is logged; the ranks stop within a step or two of it, ~100 steps (over a
    # second at 11-27 ms a step) before the end. A run that finished first would fail the exit-code check.
    steps = 120
    config = [*COMMON, f"train.steps={steps}"]
    reference = tmp_path / "reference"  # the uninterrupted run, made after the preempted one (see below)

    run_dir = tmp_path / "preempted"
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    proc = subprocess.Popen(train_cmd([*config, f"run.dir={run_dir}"], processes), cwd=ROOT, env=child_env(),
                            stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        # Wait until training is under way (a few log lines), then signal the last rank only.
        while not (run_dir / "metrics.jsonl").is_file() or len(read_jsonl(run_dir / "metrics.jsonl")) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "run ended or never started"
            time.sleep(0.05)
        target = rank_pids(proc.pid, processes - 1) if processes > 1 else [proc.pid]
        assert len(target) == 1, target
        os.kill(target[0], signum)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc)
        out.close()
        err.close()
    stderr = (tmp_path / "err.txt").read_text()
    print(stderr[-1500:])
    if processes == 1:
        assert rc == EXIT_PREEMPTED
    else:  # torchrun fails itself and reports the workers' exit code (sometimes only the first one's)
        assert rc != 0 and f"exitcode  : {EXIT_PREEMPTED}" in stderr, stderr[-3000:]
    # Every rank stopped on its own account after the same step, not killed by the launcher.
    assert stderr.count(f"stopped: preempted by {signal.Signals(signum).name}") == processes, stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    train_steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1
    stopped_at = json.loads((checkpoints[0] / "state.json").read_text())["step"]
    print(f"stopped at step {stopped_at} of {steps}; last logged step {train_steps[-1]}")
    assert train_steps[-1] <= stopped_at < steps  # the checkpoint is at the step the ranks stopped after

    # The resume and the uninterrupted reference run; one process each at the same time (one core each).
    if processes == 1:
        _, resumed = train_together([[*config, f"run.dir={reference}"], [*config, f"run.dir={run_dir}"]])
    else:
        train([*config, f"run.dir={reference}"], processes=processes)
        resumed = train([*config, f"run.dir={run_dir}"], processes=processes)
    assert f"at step {stopped_at}" in resumed.stdout
    ref, got = final_weights(reference), final_weights(run_dir)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def probe(overrides: list[str], bad_step: int, bad_rank: int, processes: int, check: bool = True):
    return train([str(bad_step), str(bad_rank), *overrides], processes=processes, check=check,
                 script="tests/probe_nonfinite.py")


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """NaN loss on rank 1 at step 3: no rank updates its weights in step 3, both count one skipped step,
    and the run otherwise matches a run that never saw step 3's update (weights after = weights before)."""
    run_dir = tmp_path / "skip"
    result = probe([*COMMON, "train.steps=6", "train.log_every=1", f"run.dir={run_dir}"], 3, 1, processes=2)
    assert "warning: step 3: non-finite gradient norm" in result.stdout
    records = [json.loads((run_dir / f"nonfinite-rank{r}.json").read_text()) for r in (0, 1)]
    for record in records:
        assert record["weights_changed_by_bad_step"] is False and record["skipped_steps"] == 1, record
    metrics = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert metrics[2]["skipped_steps"] == 0 and metrics[3]["skipped_steps"] == 1 and metrics[6]["skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(metrics[s]["loss"])) for s in (1, 2, 4, 5, 6))
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 1


def test_nonfinite_loss_under_zero2_is_skipped_on_every_rank(tmp_path):
    """Under DeepSpeed ZeRO-2 the engine finds the overflow and drops the update itself; the toolkit counts
    the step as skipped on every rank, and the run goes on."""
    run_dir = tmp_path / "zero2"
    result = probe([*COMMON, "train.steps=5", "train.log_every=1", "deepspeed.stage=2", f"run.dir={run_dir}"], 3, 1,
                   processes=2)
    assert "warning: step 3: non-finite gradient norm" in result.stdout
    for r in (0, 1):
        record = json.loads((run_dir / f"nonfinite-rank{r}.json").read_text())
        assert record["weights_changed_by_bad_step"] is False and record["skipped_steps"] == 1, record
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and torch.isfinite(torch.tensor(summary["final_loss"]))


def test_nonfinite_loss_with_stop_exits_3_naming_the_step(tmp_path):
    run_dir = tmp_path / "stop"
    result = probe([*COMMON, "train.steps=6", "train.on_nonfinite=stop", f"run.dir={run_dir}"], 4, 0,
                   processes=1, check=False)
    assert result.returncode == EXIT_NONFINITE
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: non-finite gradient norm (nan) at step 4 (train.on_nonfinite=stop)"], result.stderr
    assert not (run_dir / "summary.json").exists()
