"""`toolkit sweep`: a grid resolved and checked before anything runs, real runs per point, resume after a
SIGKILL of the whole sweep, SIGINT passed on to the running point, failures named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, alive, child_env, descendants, kill_job, read_jsonl, run

from toolkit.config import ConfigError
from toolkit.sweep_file import default_micro_size, match_existing, resolve, write_manifest

TOOLKIT = str(Path(PYTHON).with_name("toolkit"))

# A nano GPT on 300 kB of the standard library, 32 tokens per sample: a point trains in ~2 s after ~5 s of
# start-up. Its validation loss passes 3.31 after about 1,500 (global 8) and 2,000 samples (global 16).
BASE_OVERRIDES = """\
  model.size: nano
  data.seq_len: 32
  data.max_bytes: 300000
  optim.lr: 1.0e-2
  optim.schedule: constant
  optim.warmup_samples: 64
  tracking.wandb: false
  train.log_every: 8
"""


def write_sweep(tmp_path: Path, grid: str, budget: str = "{samples: 2400}", name: str = "t",
                extra: str = "", file: str = "sweep.yaml") -> Path:
    path = tmp_path / file
    path.write_text(f"name: {name}\nbase: {ROOT / 'configs' / 'tiny.yaml'}\noverrides:\n{BASE_OVERRIDES}"
                    f"grid: {grid}\nbudget: {budget}\ntarget: {{val_loss: 3.33, margin: 0.02}}\n"
                    f"validation: {{every_samples: 256, samples: 64}}\n{extra}")
    return path


THREE = "{batch.global_size: [8, 16, 32]}"
NAMES = ["b08", "b16", "b32"]


def sweep_cmd(sweep: Path, out: Path, *extra: str) -> list[str]:
    return [TOOLKIT, "sweep", str(sweep), "--out", str(out), *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """The sweep in a session of its own (as a terminal's foreground job is), its output to ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (exit {proc.returncode}) before the condition held:\n{log.read_text()}")
        if time.monotonic() > deadline:
            kill_job(proc)
            pytest.fail(f"timed out waiting:\n{log.read_text()}")
        time.sleep(0.05)


def has_checkpoint(run_dir: Path) -> bool:
    return any(p.name.startswith("step-") for p in (run_dir / "checkpoints").glob("step-*"))


def wait_gone(pids: list[int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def snapshot(run_dir: Path) -> dict[str, int]:
    """Every file of a run directory with its mtime (ns)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_dry_run_lists_points_steps_and_commands_and_runs_nothing(tmp_path):
    sweep = write_sweep(tmp_path, f"[{THREE}, {{batch.global_size: [16], optim.lr: [1.0e-2, 3.0e-3]}}, "
                                  "{batch.global_size: [16], processes: [2]}]")
    out = tmp_path / "out"
    result = run(sweep_cmd(sweep, out, "--dry-run"), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # b16 with lr 1e-2 is in both grids (the base's lr is 1e-2 too): run once
    names = ["b08-lr1e-02-p1", "b16-lr1e-02-p1", "b32-lr1e-02-p1", "b16-lr3e-03-p1", "b16-lr1e-02-p2"]
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split() and ln.split()[0] in names}
    assert set(rows) == set(names), result.stdout
    # columns: point, b, lr, p, steps, micro, accum, status; 2400 samples per point; micro <= global / 2
    assert rows["b08-lr1e-02-p1"][4:] == ["300", "4", "2", "new"]
    assert rows["b32-lr1e-02-p1"][4:] == ["75", "16", "2", "new"]
    assert rows["b16-lr1e-02-p2"][3:] == ["2", "150", "8", "1", "new"]  # the same micro-batch as on 1 process
    commands = [ln for ln in lines if "train.py" in ln]
    assert len(commands) == 5
    b08 = commands[0]
    for override in ("batch.global_size=8", "batch.micro_size=4", "train.steps=300", "train.stop_val_loss=3.31",
                     "train.val_every=32", "train.val_batches=8", "checkpoint.every_steps=32", "tracking.group=t",
                     f"run.dir={out.resolve() / 'points' / 'b08-lr1e-02-p1'}", "run.name=b08-lr1e-02-p1"):
        assert override in b08.split(), override
    assert b08.split()[1:3] == [str(ROOT / "train.py"), "--config"] and "python" in b08.split()[0]
    p2 = commands[-1]
    assert "launch --config_file" in p2 and "--num_processes 2" in p2 and "launch/cpu.yaml" in p2
    assert not out.exists()  # nothing written, nothing launched


@pytest.mark.parametrize("case", ["unknown_key", "bad_plan", "bad_config_value", "two_budgets", "validation"])
def test_a_bad_sweep_is_refused_in_one_line_before_anything_runs(tmp_path, case):
    grid, budget, extra = THREE, "{samples: 2400}", ""
    if case == "unknown_key":
        extra = "micro_size_maximum: 8\n"
        expect = ["micro_size_maximum", "micro_size_max", "valid keys"]
    elif case == "bad_plan":
        grid = "{batch.global_size: [8, 30], processes: [4]}"
        expect = ["point batch.global_size=30, processes=4:", "does not divide over 4 processes", "28, 32"]
    elif case == "bad_config_value":
        grid = "{batch.global_size: [8], optim.shedule: [constant]}"
        expect = ["optim.shedule", "schedule"]
    elif case == "two_budgets":
        budget = "{samples: 2400, steps: 10}"
        expect = ["exactly one of samples, tokens or steps"]
    else:  # 64 validation samples are 2 batches of 32 but not whole batches of 48: other samples than the rest
        grid = "{batch.global_size: [8, 32, 48]}"
        expect = ["point batch.global_size=48:", "validation.samples=64 is not a multiple", "use 192"]
    sweep = write_sweep(tmp_path, grid, budget, extra=extra)
    out = tmp_path / "out"
    result = run(sweep_cmd(sweep, out), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")
    for word in expect:
        assert word in result.stderr, result.stderr
    assert not out.exists()


def test_points_names_micro_rule_and_extending_a_sweep(tmp_path):
    """In-process: readable names, one point per distinct config, the micro-batch rule; a sweep.json of another
    sweep is refused, one that only gains points is extended and its points keep their names."""
    assert [default_micro_size(g, p, 32) for g, p in [(4, 1), (64, 1), (64, 2), (256, 1), (96, 2), (12, 4), (6, 4)]] == \
        [2, 32, 32, 32, 24, 3, None]
    out = tmp_path / "out"
    first = resolve(write_sweep(tmp_path, THREE), out)
    assert [p.name for p in first.points] == NAMES
    assert first.points[0].values == {"batch.global_size": 8, "processes": 1}
    write_manifest(first)
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["grid_keys"] == ["batch.global_size"] and manifest["budget"] == {"samples": 2400}
    assert manifest["target"] == {"val_loss": 3.33, "margin": 0.02}
    assert manifest["points"][1]["run_dir"] == "points/b16"
    assert "train.steps=150" in manifest["points"][1]["overrides"]
    assert (out / "sweep.yaml").read_text() == (tmp_path / "sweep.yaml").read_text()

    # More points, with a key that renames them: the old ones keep their names (and run directories)
    more = resolve(write_sweep(tmp_path, f"[{THREE}, {{batch.global_size: [16], processes: [2]}}]",
                               file="more.yaml"), out)
    assert [p.name for p in more.points] == ["b08-p1", "b16-p1", "b32-p1", "b16-p2"]
    match_existing(more)
    assert [p.name for p in more.points] == [*NAMES, "b16-p2"]
    assert f"run.dir={(out / 'points' / 'b08').resolve()}" in more.points[0].overrides

    other = resolve(write_sweep(tmp_path, THREE, budget="{samples: 3000}", file="other.yaml"), out)
    with pytest.raises(ConfigError, match="holds another sweep .*use another --out"):
        match_existing(other)


def test_sigkill_of_the_whole_sweep_then_the_same_command_runs_only_what_is_missing(tmp_path):
    sweep = write_sweep(tmp_path, THREE)
    out, log = tmp_path / "out", tmp_path / "sweep1.log"
    points = [out / "points" / n for n in NAMES]
    proc = start(sweep_cmd(sweep, out), log)
    try:
        wait_for(lambda: has_checkpoint(points[1]), proc, log)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep's whole process group
        proc.wait(timeout=30)
        # The point runs in a session of its own; the kernel tells it its sweep died (SIGTERM): it stops
        # after its step with a checkpoint. The same command is started again at once, while that point may
        # still be stopping: it waits for the point's run directory rather than count it as failed.
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert not (points[1] / "summary.json").exists(), "point 2 finished before the kill: the test proves nothing"
    assert (points[0] / "summary.json").exists() and not points[2].exists()
    first_point = snapshot(points[0])
    first_log = (points[0] / "train.log").read_text()

    result = run(sweep_cmd(sweep, out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    wait_gone(tree, timeout=5)  # nothing of the killed sweep is left running
    assert snapshot(points[0]) == first_point  # not run again: not a file touched
    assert (points[0] / "train.log").read_text() == first_log
    assert "[1/3] b08: done (" in result.stdout and "not run again" in result.stdout
    assert "[2/3] b16: resuming" in result.stdout
    second = (points[1] / "train.log").read_text()
    assert "resumed from" in second and second.count("toolkit sweep:") == 2  # two launches, one log
    for point in points[1:]:
        summary = json.loads((point / "summary.json").read_text())
        assert summary["steps"] <= {"b16": 150, "b32": 75}[point.name]
    steps = [r["step"] for r in read_jsonl(points[1] / "metrics.jsonl") if "loss" in r]
    assert steps == sorted(set(steps))  # every step once over the two segments
    s8 = json.loads((points[0] / "summary.json").read_text())
    assert s8["stopped_at_target"] and s8["val_loss"] <= 3.31 and s8["samples"] < 2400
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["name"] for p in manifest["points"]] == NAMES
    for name in ("report.md", "summary.csv", "recommendation.json"):
        assert (out / name).is_file(), name
    # `toolkit recommend` on one of these real runs: B_noise is the median of its last logged noise scales.
    predicted = run([TOOLKIT, "recommend", str(points[2]), "--json"], timeout=60)
    assert predicted.returncode == 0, predicted.stderr
    prediction = json.loads(predicted.stdout)
    logged = [r["noise_scale"] for r in read_jsonl(points[2] / "metrics.jsonl") if r.get("noise_scale") is not None]
    recent = sorted(logged[-prediction["recent_values"]:])
    assert prediction["values"] == len(logged) and recent[0] <= prediction["b_noise"] <= recent[-1]
    grid = prediction["grid"]["batch.global_size"]
    assert len(grid) == 7 and grid[-1] == 64 * grid[0] and grid[0] <= prediction["b_noise"] <= grid[-1]
    text = run([TOOLKIT, "recommend", str(points[2])], timeout=60).stdout
    assert "Predicted critical batch" in text and "grid:" in text


def test_sigint_stops_the_running_point_with_a_checkpoint_and_the_rerun_completes(tmp_path):
    # The first point runs on 2 processes (accelerate launch), so the SIGINT goes through torchrun.
    sweep = write_sweep(tmp_path, "[{batch.global_size: [16], processes: [2]}, {batch.global_size: [8]}]",
                        budget="{samples: 1600}")
    out, log = tmp_path / "out", tmp_path / "sweep1.log"
    point = out / "points" / "b16-p2"
    proc = start(sweep_cmd(sweep, out), log)
    try:
        wait_for(lambda: has_checkpoint(point), proc, log)
        tree = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the sweep alone gets it
        assert proc.wait(timeout=150) == 130, log.read_text()
        wait_gone(tree, timeout=30)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    text = log.read_text()
    assert "stopped by SIGINT: point b16-p2 stopped (its newest checkpoint is step-" in text, text
    assert "run the same command again to continue" in text and "[2/2]" not in text
    train_log = (point / "train.log").read_text()
    assert "stopped:" in train_log and train_log.rstrip().splitlines()[-1].startswith("=== exit ")
    assert not (point / "summary.json").exists()
    assert not (out / "points" / "b08-p1").exists()  # no further point was started

    result = run(sweep_cmd(sweep, out), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/2] b16-p2: resuming" in result.stdout
    assert "resumed from" in (point / "train.log").read_text()
    for name in ("b16-p2", "b08-p1"):
        assert (out / "points" / name / "summary.json").is_file()


def test_a_failed_point_is_named_the_others_run_and_the_exit_is_1(tmp_path):
    # Too little data for the stdlib corpus passes the sweep's checks but fails when the run loads its data.
    sweep = write_sweep(tmp_path, "[{batch.global_size: [8], data.max_bytes: [2000]}, {batch.global_size: [8]}]",
                        budget="{steps: 3}")
    out = tmp_path / "out"
    result = run(sweep_cmd(sweep, out), timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    log = out / "points" / "b8-max_bytes2000" / "train.log"
    assert "[1/2] b8-max_bytes2000: failed (exit 2)" in result.stdout and str(log) in result.stdout
    assert "found too few .py files" in log.read_text()
    assert "[2/2] b8-max_bytes300000: done in" in result.stdout
    assert (out / "points" / "b8-max_bytes300000" / "summary.json").is_file()
    assert result.stdout.rstrip().splitlines()[-2].startswith("failed points (1): b8-max_bytes2000 (see ")
    # The report names the failure with the point's own error, not the sweep's exit marker.
    report = (out / "report.md").read_text()
    assert "exit 2: error: data.source=stdlib: found too few .py files" in report, report
