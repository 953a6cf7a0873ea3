"""A new user's first hour: reruns, a second command on the same run directory, Ctrl-C, two runs at once,
an unwritable run directory, the numbers a run prints (issue 9)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    PYTHON,
    ROOT,
    child_env,
    final_weights,
    kill_job,
    read_jsonl,
    run,
    train,
    train_cmd,
    train_together,
)

from toolkit.cli import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_PREEMPTED

SMALL = ["model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=40000",
         "data.seq_len=32", "batch.global_size=8", "batch.micro_size=2", "train.log_every=5", "train.val_every=0",
         "train.val_batches=1", "train.progress=false", "train.precision=fp32"]


def snapshot(run_dir: Path) -> dict:
    """Every file under run_dir with its bytes and modification time."""
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error_line(result, *needles: str) -> str:
    assert result.returncode == EXIT_CONFIG, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def start(overrides: list[str], tmp_path: Path, name: str, processes: int = 1, script: str = "train.py"):
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    proc = subprocess.Popen(train_cmd(overrides, processes, script=script), cwd=ROOT, env=child_env(), stdout=out,
                            stderr=err, start_new_session=True)
    proc.files = (out, err)
    return proc


def whole_lines(path: Path) -> int:
    """Records the run has finished writing (a line being appended has no newline yet)."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def wait_for_steps(proc, run_dir: Path, records: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while whole_lines(run_dir / "metrics.jsonl") < records:
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, "the run did not start training in time"
        time.sleep(0.05)


def finish(proc, timeout: float = 120) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill_job(proc)
        for f in proc.files:
            f.close()


# ----------------------------------------------------------------------------------------- 1. reruns


def test_rerunning_a_finished_run_changes_nothing_and_says_so(tmp_path):
    """A finished run's files (summary figures, metrics, checkpoints, final weights, the W&B run) are left
    exactly as they were, and the rerun says so in one line; W&B is offline here, so a rerun that started it
    would add a second offline-run folder."""
    run_dir = tmp_path / "run"
    config = [*SMALL, "train.steps=10", f"run.dir={run_dir}"]
    train(config, env=child_env(wandb=True))
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    before = snapshot(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0 and summary["train_time_s"] > 0 and summary["memory"]["measured_to_update_gib"] > 0

    again = train(config, env=child_env(wandb=True), timeout=120)
    lines = [line for line in again.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "already finished" in lines[0] and "nothing to do" in lines[0], again.stdout
    assert snapshot(run_dir) == before
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


# A finished 10-step run with checkpoints at steps 5 and 10: made once for the module (``finished``), and each
# test that starts from it works on a copy (``copy_of``).
FINISHED = [*SMALL, "train.steps=10", "checkpoint.every_steps=5"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train([*FINISHED, f"run.dir={run_dir}"])
    return run_dir


def copy_of(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_a_resumed_runs_summary_covers_every_segment(tmp_path, finished):
    """Killed after its final checkpoint (before the summary), the rerun's summary still holds the whole run's
    time, throughput and memory; extended (train.steps raised), the summary covers both segments."""
    run_dir = copy_of(finished, tmp_path)
    config = [*FINISHED, f"run.dir={run_dir}"]
    first = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()  # as if killed between the final checkpoint and the summary

    again = train(config)
    assert "at step 10" in again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    # The time is the first segment's (up to its final checkpoint), not zero.
    assert summary["train_time_s"] == pytest.approx(first["train_time_s"], rel=0.05)
    assert summary["tokens_per_s"] == pytest.approx(first["tokens_per_s"], rel=0.05)
    for key in ("measured_to_update_gib", "measured_with_update_gib", "process_peak_gib"):
        assert summary["memory"][key] >= first["memory"][key] > 0, key

    extended = train([*config, "train.steps=20"])
    assert "train.steps changed from 10 to 20: the run continues from step 10 to step 20" in extended.stdout
    whole = json.loads((run_dir / "summary.json").read_text())
    assert whole["steps"] == 20 and whole["first_loss"] == first["first_loss"]
    assert whole["train_time_s"] > first["train_time_s"]
    assert whole["tokens_per_s"] == pytest.approx(20 * 8 * 32 / whole["train_time_s"])
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [5, 10, 15, 20]


# ----------------------------------------------------------------------------------------- 2. another command


def test_a_different_config_on_a_run_dir_is_refused_naming_the_keys(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path)
    before = snapshot(run_dir)
    result = train([*FINISHED, f"run.dir={run_dir}", "batch.global_size=16", "optim.lr=0.001"], check=False)
    one_error_line(result, "batch.global_size: 8 -> 16", "optim.lr: 0.003 -> 0.001", "run.name=NEW")
    shorter = train([*FINISHED, "train.steps=3", f"run.dir={run_dir}"], check=False)
    one_error_line(shorter, "already at step 10", "train.steps=3")
    assert snapshot(run_dir) == before  # nothing written, nothing lost


def test_hardware_and_launch_keys_may_change_within_a_run(tmp_path):
    """Micro-batch, logging and checkpoint cadence change; the run continues (extended) and trains the same
    as a run that never changed them (the LR schedule is fixed in samples, past its warmup, so the extension
    does not move it)."""
    schedule = ["optim.warmup_samples=16", "optim.decay_samples=80"]
    reference = tmp_path / "reference"
    run_dir = tmp_path / "run"
    train_together([[*SMALL, *schedule, "train.steps=10", f"run.dir={reference}"],
                    [*SMALL, *schedule, "train.steps=5", f"run.dir={run_dir}"]])
    result = train([*SMALL, *schedule, "train.steps=10", f"run.dir={run_dir}", "batch.micro_size=4",
                    "train.log_every=1", "checkpoint.keep=1"])
    assert "resumed from" in result.stdout and "at step 5" in result.stdout
    ref, got = final_weights(reference), final_weights(run_dir)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-5


def test_debug_mode_uses_its_own_run_directory(tmp_path):
    """`python train.py --debug` after the default job neither resumes nor is refused by it: runs/<name>-debug."""
    script = str(ROOT / "train.py")
    first = run([PYTHON, script, *SMALL, "train.steps=5", "run.name=job"], timeout=120, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    debug = run([PYTHON, script, "--debug", *SMALL, "run.name=job"], timeout=120, cwd=tmp_path)
    assert debug.returncode == 0, debug.stderr
    assert "resumed" not in debug.stdout and "run directory: runs/job-debug" in debug.stdout
    assert json.loads((tmp_path / "runs" / "job-debug" / "summary.json").read_text())["steps"] == 20
    assert json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())["steps"] == 5


def test_a_finished_run_without_checkpoints_is_not_trained_over(tmp_path, finished):
    run_dir = copy_of(finished, tmp_path)
    shutil.rmtree(run_dir / "checkpoints")  # deleted to save space
    before = snapshot(run_dir)
    one_error_line(train([*FINISHED, f"run.dir={run_dir}"], check=False), "summary.json but no checkpoint")
    assert snapshot(run_dir) == before


def test_a_run_ended_at_a_checkpoint_between_validations_validates_there(tmp_path):
    """train.steps lowered to the step of a checkpoint written after the last validation: the run ends
    there, and its summary holds a validation of that step, not the older one."""
    run_dir = tmp_path / "run"
    train([*SMALL, "train.steps=8", "checkpoint.every_steps=4", "checkpoint.keep=3", "train.val_every=3",
           f"run.dir={run_dir}"])
    shutil.rmtree(run_dir / "checkpoints" / "step-00000008")
    (run_dir / "summary.json").unlink()
    train([*SMALL, "train.steps=4", "checkpoint.every_steps=4", "train.val_every=3", f"run.dir={run_dir}"])
    vals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] == vals[-1]["val_loss"]


# ----------------------------------------------------------------------------------------- 3. launch files


def test_every_launch_file_runs_the_shipped_configs():
    """Each launch file's process count divides the default config's and GPT-2 small's global batch at their
    micro-batch (the README's launch-modes table with the default config)."""
    import yaml

    from toolkit.batch import make_plan
    from toolkit.config import load_config

    launch_files = sorted((ROOT / "launch").glob("*.yaml"))
    assert len(launch_files) >= 7
    for config in (None, ROOT / "configs" / "gpt2-small.yaml"):
        cfg = load_config(config)
        for launch in launch_files:
            processes = yaml.safe_load(launch.read_text())["num_processes"]
            plan = make_plan(cfg.batch.global_size, cfg.batch.micro_size, processes, cfg.data.seq_len)
            assert plan.global_size == plan.micro_size * plan.accumulation * processes, (config, launch.name)
    gpt2 = load_config(ROOT / "configs" / "gpt2-small.yaml")
    assert gpt2.model.size == "gpt2-small" and gpt2.data.seq_len == 1024
    result = run([str(Path(PYTHON).with_name("toolkit")), "plan", "--world-size", "8"], timeout=60)
    assert result.returncode == 0 and "x processes (world size)" in result.stdout, result.stderr


# ----------------------------------------------------------------------------------------- 4. Ctrl-C


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    config = [*SMALL, "train.steps=100000", "checkpoint.every_steps=0", f"run.dir={run_dir}"]
    proc = start(config, tmp_path, "a")
    wait_for_steps(proc, run_dir, 2)
    os.kill(proc.pid, signal.SIGINT)
    assert finish(proc) == EXIT_INTERRUPTED
    err = (tmp_path / "a.err").read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    stopped = [line for line in err.splitlines() if line.startswith("stopped: interrupted (Ctrl-C)")]
    assert len(stopped) == 1 and "run the same command again to continue" in stopped[0], err
    step = int(re.search(r"after step (\d+)", stopped[0]).group(1))
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{step:08d}"]

    resumed = train([*config, f"train.steps={step + 5}"])
    assert f"at step {step}" in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == step + 5


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_ctrl_c_stops_at_once(tmp_path, processes):
    """The probe makes every checkpoint save wait 60 s first, so the second Ctrl-C lands while the first
    one's checkpoint is pending: the run must end at once, in one line, leaving no checkpoint half-written.
    Under `accelerate launch` the Ctrl-Cs reach the launcher, and the second reaches the ranks as SIGTERM."""
    run_dir = tmp_path / "run"
    proc = start([*SMALL, "train.steps=100000", "checkpoint.every_steps=0", f"run.dir={run_dir}"], tmp_path, "b",
                 processes=processes, script="tests/probe_slow_checkpoint.py")
    wait_for_steps(proc, run_dir, 2)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
    deadline = time.monotonic() + 30
    while "Ctrl-C: stopping after the step in flight" not in (tmp_path / "b.err").read_text():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    rc = finish(proc, timeout=60)
    assert time.monotonic() - sent < 15
    err = (tmp_path / "b.err").read_text()
    if processes == 1:
        assert rc == EXIT_INTERRUPTED and "Traceback" not in err, err[-3000:]
    else:  # the ranks' exit codes, in torchrun's report (torchrun itself raises on the signal)
        assert rc != 0 and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.count("interrupted (Ctrl-C): stopped at once") == 1, err[-3000:]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_ctrl_c_to_the_launcher_stops_both_ranks_after_the_same_step(tmp_path):
    """A terminal's Ctrl-C reaches `accelerate launch`, whose torchrun forwards SIGINT to each rank."""
    run_dir = tmp_path / "run"
    proc = start([*SMALL, "train.steps=100000", "checkpoint.every_steps=0", f"run.dir={run_dir}"], tmp_path, "c",
                 processes=2)
    wait_for_steps(proc, run_dir, 2)
    os.killpg(proc.pid, signal.SIGINT)  # the launcher's process group; the ranks run in sessions of their own
    rc = finish(proc)
    err = (tmp_path / "c.err").read_text()
    assert rc != 0  # torchrun itself raises on SIGINT (its own traceback) once the ranks have stopped
    stopped = [line for line in err.splitlines() if line.startswith("stopped: interrupted (Ctrl-C)")]
    assert len(stopped) == 2 and len(set(stopped)) == 1, err[-3000:]  # both ranks, the same step
    assert len(list((run_dir / "checkpoints").iterdir())) == 1


# ----------------------------------------------------------------------------------------- 5. two runs at once


def test_a_second_run_on_a_busy_run_dir_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    config = [*SMALL, "train.steps=100000", "checkpoint.every_steps=100", f"run.dir={run_dir}"]
    first = start(config, tmp_path, "first")  # runs until told to stop
    wait_for_steps(first, run_dir, 1)
    second = train(config, check=False, timeout=120)
    one_error_line(second, f"{run_dir} is in use by another run", f"pid {first.pid}")
    os.kill(first.pid, signal.SIGTERM)
    assert finish(first) == EXIT_PREEMPTED  # the first run went on untouched and stopped with a checkpoint
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(5, 5 * len(steps) + 1, 5)) and len(steps) >= 1

    killed_dir = tmp_path / "killed"
    killed = start([*config, f"run.dir={killed_dir}"], tmp_path, "killed")
    wait_for_steps(killed, killed_dir, 1)
    kill_job(killed)
    finish(killed)
    after = train([*SMALL, f"run.dir={killed_dir}", "train.steps=10"])  # not refused: the lock died with it
    assert "done: 10 steps" in after.stdout


# ----------------------------------------------------------------------------------------- 6. unwritable run.dir


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_an_unwritable_run_dir_is_one_line(tmp_path, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("not a directory")
        run_dir = tmp_path / "file" / "run"
    else:
        run_dir = Path("/proc/no-such-process/run")  # unwritable even for root
    result = train([*SMALL, "train.steps=5", f"run.dir={run_dir}"], check=False)
    one_error_line(result, f"run.dir={run_dir} is not a writable directory", "run.dir=PATH")


# ----------------------------------------------------------------------------------------- 8. the numbers


def test_a_runs_printed_numbers_agree_and_add_up(tmp_path):
    """Parameters as `toolkit plan` counts them, a memory prediction whose terms add up, the precision by
    its name, and no logged noise scale that is not positive."""
    run_dir = tmp_path / "run"
    result = train([*SMALL, "train.steps=20", "train.log_every=1", f"run.dir={run_dir}"], processes=2)
    plan = run([str(Path(PYTHON).with_name("toolkit")), "plan", "--world-size", "2", "--json", *SMALL], timeout=60)
    counts = json.loads(plan.stdout)
    assert f"model: {counts['n_params_total']:,} parameters ({counts['n_params']:,} without position" in result.stdout
    assert json.loads((run_dir / "summary.json").read_text())["n_params"] == counts["n_params"]
    assert "precision: fp32" in result.stdout
    line = next(line for line in result.stdout.splitlines() if line.startswith("memory predicted per device"))
    numbers = [float(x) for x in re.findall(r"(\d+\.\d+)", line)]
    assert numbers[0] == pytest.approx(sum(numbers[1:4]), abs=0.002), line
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["noise_scale"] is None or r["noise_scale"] > 0 for r in records), [r["noise_scale"] for r in records]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["noise_scale"] is None) == (summary["noise_scale_unavailable"] is not None)
    assert summary["memory_peak_gib"] == summary["memory"]["process_peak_gib"]


def test_a_noise_scale_with_a_negative_term_is_not_available():
    """The ratio of two smoothed estimates means nothing until both are positive: none is reported, with the
    reason, instead of a negative (or a meaningless positive) number."""
    from toolkit.metrics import NoiseProbe

    def probe_with(grad_sq: float, trace: float) -> NoiseProbe:
        probe = NoiseProbe(0.95, torch.device("cpu"), tokens_per_sample=32.0)
        probe.restore([grad_sq, trace])
        return probe

    for grad_sq, trace, reason in ((1.0, -1.17, "tr(Sigma)"), (-2.0, -3.0, "|G|^2"), (-2.0, 3.0, "|G|^2")):
        probe = probe_with(grad_sq, trace)
        assert probe.value() == (None, None)
        assert reason in probe.unavailable()
    probe = probe_with(2.0, 64.0)
    assert probe.value() == (1.0, 32.0) and probe.unavailable() is None
