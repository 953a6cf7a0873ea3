"""Weights & Biases: real offline runs, read back from their ``.wandb`` files with ``wandb leet inspect``.

* Every named metric is in the W&B run with the numbers of ``metrics.jsonl``; the config holds the plan,
  the hardware and the versions; a 2-process run makes exactly one W&B run. That run is the default job on
  2 processes, W&B offline (conftest.py's ``default_job_two_processes``, run once for the session: it is also
  an acceptance run of tests/test_train_run.py).
* A run killed and resumed continues the same W&B run id, its steps strictly increasing.
* With a fake API key and no network, training starts within 15 s and records offline.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, child_env, read_jsonl, train, train_cmd
from test_resume_kill import start_and_kill

from toolkit.tracking import WANDB_NAMES

WANDB = str(Path(PYTHON).with_name("wandb"))
SHORT = ["train.steps=20", "train.log_every=5", "train.val_every=10", "train.progress=false"]
# The resume and start-up tests are about W&B, not the model: a nano GPT on synthetic tokens (~10 ms a step, where
# the default job's takes ~0.4 s), 4 micro-steps per step so that the noise scale is logged too.
NANO = ["model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=100000",
        "data.seq_len=32", "batch.global_size=8", "batch.micro_size=2", "train.val_batches=1", "train.progress=false"]
# Left out of the W&B history when they have no value: MFU on a CPU (no known peak).
ONLY_WITH_A_VALUE = {"mfu"}


def records(run_folder: Path) -> list[dict]:
    out = subprocess.run([WANDB, "leet", "inspect", "--json", str(run_folder)], capture_output=True, text=True,
                         timeout=120, env=child_env(wandb=True))
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def history(run_folder: Path) -> list[dict]:
    """The history rows: (W&B step, the logged values)."""
    return [{"_step_num": r["history"]["step"]["num"], **r["history"]["item"]}
            for r in records(run_folder) if r["type"] == "history"]


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def two_process_run(default_job_two_processes) -> tuple[Path, str]:
    """The default job (300 steps) on 2 processes with W&B offline: its run directory and its stdout."""
    assert default_job_two_processes["wandb"]
    return default_job_two_processes["dir"], default_job_two_processes["stdout"]


def test_two_processes_make_one_offline_run_under_run_dir(two_process_run):
    run_dir, stdout = two_process_run
    runs = offline_runs(run_dir)
    assert len(runs) == 1, runs
    run_id = json.loads((run_dir / "summary.json").read_text())["wandb_run_id"]
    assert runs[0].name.endswith(f"-{run_id}")
    assert f"wandb sync {runs[0]}" in stdout  # the user is told how to upload it
    assert "offline (no W&B API key)" in stdout


def test_every_metric_matches_metrics_jsonl(two_process_run):
    run_dir, _ = two_process_run
    rows = {row["_step_num"]: row for row in history(offline_runs(run_dir)[0])}
    local = read_jsonl(run_dir / "metrics.jsonl")
    assert max(rows) == 300  # the last step is logged
    seen = set()
    for record in local:
        row = rows[record["step"]]
        for key, value in record.items():
            if key == "step" or value is None:
                continue
            name = WANDB_NAMES[key]
            assert row[name] == pytest.approx(value, rel=1e-12), f"step {record['step']}: {name}"
            seen.add(name)
    expected = {name for key, name in WANDB_NAMES.items() if key not in ONLY_WITH_A_VALUE}
    assert expected <= seen, f"never logged: {sorted(expected - seen)}"
    assert all(r["mfu"] is None for r in local if "mfu" in r)  # CPU: no peak, no MFU
    noise = [r["noise_scale"] for r in local if r.get("noise_scale") is not None]
    assert noise and all(n > 0 for n in noise)


def test_config_holds_plan_hardware_versions_and_x_axes(two_process_run):
    run_dir, _ = two_process_run
    recs = records(offline_runs(run_dir)[0])
    run = next(r["run"] for r in recs if r["type"] == "run")
    config = {}  # the run record's config, then the updates Accelerate's tracker makes after init
    for r in recs:
        if r["type"] in ("run", "config"):
            config.update((r["run"]["config"] if r["type"] == "run" else r["config"]).get("update", {}))
    assert config["plan"] == {"global_size": 32, "micro_size": 4, "accumulation": 4, "world_size": 2, "seq_len": 128,
                              "ragged": False, "tokens_per_step": 4096}
    assert config["hardware"]["device"] == "cpu" and config["hardware"]["device_count"] == 2
    assert config["hardware"]["nodes"] == 1
    assert {"torch", "accelerate", "deepspeed", "wandb"} <= set(config["versions"])
    assert config["batch"]["global_size"] == 32 and config["tracking"]["project"] == "batchkit"
    assert run["project"] == "batchkit" and run["run_group"] == "tiny-stdlib-seq128"
    metrics = {(m["metric"].get("name") or m["metric"].get("glob_name")): m["metric"].get("step_metric")
               for m in recs if m["type"] == "metric"}
    assert "samples" in metrics and "tokens" in metrics
    assert all(metrics.get(f"{prefix}/*") == "samples" for prefix in ("train", "perf", "memory", "batch", "val"))
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("best_loss", "memory_peak_gib", "noise_scale", "tokens_per_s"):
        assert summary[key] is not None and summary[key] > 0, key
    final = {}
    for r in recs:
        if r["type"] == "summary":
            final.update(r["summary"].get("update", {}))
    assert final["final/best_loss"] == pytest.approx(summary["best_loss"])


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    # The first checkpoint is at step 20; the kill comes 0.5-1.5 s later, while 380 steps (~4 s) are still to go.
    overrides = [*NANO, "train.steps=400", "train.log_every=5", "train.val_every=100", "checkpoint.every_steps=20",
                 f"run.dir={tmp_path / 'run'}"]
    env = child_env(wandb=True)
    newest, what = start_and_kill(overrides, 1, tmp_path / "run", random.Random(5).uniform(0.5, 1.5), env=env)
    print(f"\nkilled: {what}")
    assert newest is not None
    result = train(overrides, env=env)
    assert f"at step {newest}" in result.stdout
    runs = offline_runs(tmp_path / "run")
    assert len(runs) == 2, runs  # the killed process's and the resumed one's files ...
    ids = {run.name.rsplit("-", 1)[1] for run in runs}
    assert len(ids) == 1, ids  # ... of one W&B run
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["wandb_run_id"] in ids
    steps = [row["_step_num"] for run in runs for row in history(run)]  # in the order the files were made
    print(f"W&B steps: {steps}")
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False)), steps
    assert steps[-1] == 400


def test_fake_api_key_and_no_network_start_within_15_s(tmp_path):
    env = child_env(wandb=True)
    env["WANDB_API_KEY"] = "f" * 40  # and W&B's real server, which this machine cannot reach
    run_dir = tmp_path / "run"
    cmd = train_cmd([*SHORT, *NANO, "train.log_every=1", f"run.dir={run_dir}"])
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first_step is None and line.startswith("step "):
            first_step = time.monotonic() - started
    proc.wait(timeout=120)
    output = "".join(lines)
    assert proc.returncode == 0, output[-3000:]
    print(f"\nfirst training step logged {first_step:.1f} s after the start")
    assert first_step is not None and first_step < 15, output[-3000:]
    assert "offline (api.wandb.ai did not answer within" in output
    assert len(offline_runs(run_dir)) == 1
    assert max(row["_step_num"] for row in history(offline_runs(run_dir)[0])) == 20
