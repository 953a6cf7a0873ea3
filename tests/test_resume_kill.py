"""Resume after a kill: "Kill anywhere" and "Different world size".

* Kill anywhere: a run is SIGKILLed (the whole process group: accelerate launch, torchrun and the ranks)
  at a random moment after its first checkpoint (with 2 processes: while an asynchronous sharded checkpoint is
  being written, ``checkpoint.format=sharded checkpoint.async_save=true``), then the same command is run again. With
  ``checkpoint.resume=auto`` it continues from the newest valid checkpoint and must end with weights
  bit-identical to an uninterrupted run, ``summary.json`` counting all ``train.steps`` and a
  ``metrics.jsonl`` that holds every (step, kind) once, train steps strictly increasing.
* Different world size: checkpoints written by 2 processes are resumed with 1 (micro size unchanged, so
  the accumulation doubles); the final weights agree with the 2-process run within 1e-5 (max relative
  difference per tensor) and every step after the resume computes the same samples.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, child_env, final_weights, kill_job, read_jsonl, train, train_cmd, train_together

from toolkit.bench.common import max_rel_diff

GLOBAL = 8
COMMON = [
    "seed=1337",
    "model.size=nano",
    "model.vocab_size=256",
    "data.source=synthetic",
    "data.synthetic_tokens=100000",
    "data.pack=false",
    "data.seq_len=32",
    f"batch.global_size={GLOBAL}",
    "batch.micro_size=2",
    "train.val_batches=1",
    "train.log_every=5",
    "train.progress=false",
    "train.precision=fp32",
]
# Kill anywhere: measured on a 2-core CPU box, 1 process trains ~11 ms/step, 2 processes ~27 ms/step, so
# 240 steps last ~2.7 s / ~6.5 s of training after the first checkpoint (step 20) appears; a kill
# 0..MAX_DELAY s after that lands mid-run.
KILL_STEPS = 240
KILL_EVERY = 20
MAX_DELAY = {1: 1.5, 2: 3.0}
KILL_CONFIG = [*COMMON, f"train.steps={KILL_STEPS}", "train.val_every=50", f"checkpoint.every_steps={KILL_EVERY}"]

# Different world size.
WS_STEPS = 60
WS_EVERY = 10
WS_RESUME_AT = 30
WS_CONFIG = [*COMMON, f"train.steps={WS_STEPS}", "train.val_every=20", f"checkpoint.every_steps={WS_EVERY}",
             "checkpoint.keep=100", "run.record_samples=true"]
TOL = 1e-5





def valid_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoint folders that have a manifest, newest first."""
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if (p / "manifest.json").is_file()]
    return sorted(steps, reverse=True)


def check_metrics(run_dir: Path, steps: int) -> None:
    """Every (step, kind) once; train steps strictly increasing and ending at ``steps``."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    keys = []
    for r in records:
        assert ("loss" in r) != ("val_loss" in r), r
        keys.append((r["step"], "train" if "loss" in r else "val"))
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"duplicate metrics records (step, kind): {duplicates}"
    train_steps = [s for s, kind in keys if kind == "train"]
    assert all(a < b for a, b in zip(train_steps, train_steps[1:], strict=False)), f"train steps not increasing: {train_steps}"
    assert train_steps[-1] == steps


def check_summary(run_dir: Path, steps: int, world_size: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["samples"] == steps * GLOBAL
    assert summary["world_size"] == world_size
    return summary


def saves_in_flight(run_dir: Path) -> list[int]:
    """Steps of the checkpoints being written (their ``.tmp-step-N`` folders) beyond the newest valid one."""
    newest = max(valid_checkpoints(run_dir), default=0)
    found = [int(p.name.rsplit("-", 1)[1]) for p in (run_dir / "checkpoints").glob(".tmp-step-*")]
    return sorted(step for step in found if step > newest)


def start_and_kill(overrides: list[str], processes: int, run_dir: Path, delay: float,
                   env: dict | None = None, script: str = "train.py", during_save: bool = False) -> tuple[int | None, str]:
    """Start the run in its own process group, wait for its first checkpoint (``during_save``: then for a save in
    flight after it), sleep ``delay``, SIGKILL the group.

    Returns (newest valid checkpoint step after the kill, what happened)."""
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.stdout", "w") as out, \
            open(run_dir.parent / f"{run_dir.name}.stderr", "w") as err:
        proc = subprocess.Popen(train_cmd(overrides, processes, script), start_new_session=True, env=env or child_env(), cwd=ROOT,
                                stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not valid_checkpoints(run_dir) and proc.poll() is None:
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.02)
            assert proc.poll() in (None, 0), f"run failed before the kill: exit {proc.returncode}"
            while during_save and not saves_in_flight(run_dir) and proc.poll() is None:
                assert time.monotonic() < deadline, "no second checkpoint within 120 s"
                time.sleep(0.005)
            time.sleep(delay)
            in_flight = saves_in_flight(run_dir)
            finished = proc.poll() is not None
            if not finished:
                kill_job(proc)
        finally:
            if proc.poll() is None:
                kill_job(proc)
    steps = valid_checkpoints(run_dir)
    newest = steps[0] if steps else None
    logged = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] if (
        run_dir / "metrics.jsonl").exists() else []
    what = ("finished before the kill" if finished else f"killed (exit {proc.returncode})") + (
        f" while writing checkpoint step {in_flight[0]}" if in_flight and not finished else "") + (
        f"; newest checkpoint step {newest}, last logged train step {logged[-1] if logged else None}, "
        f"summary.json {'present' if (run_dir / 'summary.json').exists() else 'absent'}")
    return newest, what


# With 2 processes the checkpoints are sharded and written in the background, each shard 0.5 s slower
# (tests/probe_slow_shards.py), and the kill lands while one is being written.
ASYNC_SHARDED = ["checkpoint.format=sharded", "checkpoint.async_save=true"]
KILL_FORMAT = {1: [], 2: ASYNC_SHARDED}


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_anywhere_then_resume_is_bit_identical(tmp_path, processes):
    started = time.perf_counter()
    during_save = processes == 2
    delay = random.Random(20240 + processes).uniform(0.0, 0.4 if during_save else MAX_DELAY[processes])
    killed = tmp_path / "killed"
    config = [*KILL_CONFIG, *KILL_FORMAT[processes]]
    newest, what = start_and_kill([*config, f"run.dir={killed}"], processes, killed, delay, during_save=during_save,
                                  script=str(ROOT / "tests" / "probe_slow_shards.py") if during_save else "train.py")
    print(f"\n{processes} process(es): kill {delay:.2f} s after {'a save began' if during_save else 'the first checkpoint'}: "
          f"{what} ({time.perf_counter() - started:.1f} s)")
    assert newest is not None and newest % KILL_EVERY == 0
    if during_save:
        assert "while writing checkpoint step" in what, what

    # The uninterrupted reference run, and the resume (the same command again). One process each: at the same
    # time, one core each (after the kill, which alone is timed against the run's progress).
    t0 = time.perf_counter()
    reference = tmp_path / "reference"
    if processes == 1:
        _, result = train_together([[*KILL_CONFIG, f"run.dir={reference}"], [*config, f"run.dir={killed}"]])
    else:  # (the reference writes whole checkpoints: the format changes nothing in the training)
        train([*KILL_CONFIG, f"run.dir={reference}"], processes=processes)
        result = train([*config, f"run.dir={killed}"], processes=processes)
    print(f"reference and resume: {time.perf_counter() - t0:.1f} s; total {time.perf_counter() - started:.1f} s")
    match = re.search(r"resumed from (\S+) at step (\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert int(match.group(2)) == newest
    assert Path(match.group(1)).name == f"step-{newest:08d}"

    ref, got = final_weights(reference), final_weights(killed)
    assert ref.keys() == got.keys()
    different = [name for name in ref if not torch.equal(ref[name], got[name])]
    assert not different, f"after the kill at step {newest} these tensors differ: {different}"
    check_summary(killed, KILL_STEPS, processes)
    check_metrics(reference, KILL_STEPS)
    check_metrics(killed, KILL_STEPS)
    # The resumed run's log is the reference's log up to the checkpoint (bytes before the cut are kept).
    keep = lambda rs: [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss")} for r in rs]  # noqa: E731
    ref_records = read_jsonl(reference / "metrics.jsonl")
    got_records = read_jsonl(killed / "metrics.jsonl")
    assert keep(got_records) == keep(ref_records), "losses differ from the uninterrupted run"


def test_kill_after_final_checkpoint_logs_each_record_once(tmp_path):
    """A kill after finish() wrote the final checkpoint (say, while writing final/ or summary.json) leaves a
    checkpoint at train.steps; rerunning resumes there, runs 0 steps and finish() logs val_loss again."""
    cfg = [*COMMON, "train.steps=20", "train.val_every=0", "checkpoint.every_steps=10", f"run.dir={tmp_path}"]
    train(cfg)
    (tmp_path / "summary.json").unlink()  # as if killed right after the final checkpoint
    shutil.rmtree(tmp_path / "final")
    result = train(cfg)
    assert "resumed from" in result.stdout and "at step 20" in result.stdout
    check_summary(tmp_path, 20, 1)
    check_metrics(tmp_path, 20)


def test_resume_with_a_different_world_size(tmp_path):
    """Checkpoints of a 2-process run, resumed with 1 process, end where the 2-process run ends."""
    started = time.perf_counter()
    reference = tmp_path / "reference"
    train([*WS_CONFIG, f"run.dir={reference}"], processes=2)
    reference_s = time.perf_counter() - started
    assert valid_checkpoints(reference) == list(range(WS_STEPS, 0, -WS_EVERY))

    # The same 2-process run, stopped at step WS_RESUME_AT: its checkpoints were written by the run above
    # (same config and seed), so take a copy of that run directory and remove what came later.
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    for step in valid_checkpoints(resumed):
        if step > WS_RESUME_AT:
            shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    state = json.loads((resumed / "checkpoints" / f"step-{WS_RESUME_AT:08d}" / "state.json").read_text())
    assert state["plan"]["world_size"] == 2 and state["plan"]["accumulation"] == 2

    t0 = time.perf_counter()
    result = train([*WS_CONFIG, f"run.dir={resumed}"], processes=1)
    print(f"\n2-process reference {reference_s:.1f} s; 1-process resume from step {WS_RESUME_AT}: "
          f"{time.perf_counter() - t0:.1f} s")
    line = next((x for x in result.stdout.splitlines() if x.startswith("resumed from")), None)
    print(line)
    assert line is not None, result.stdout[-2000:]
    assert f"step-{WS_RESUME_AT:08d} at step {WS_RESUME_AT} " in line
    assert "written with 2 processes, now 1: accumulation 2 -> 4" in line

    summary = check_summary(resumed, WS_STEPS, 1)
    assert (summary["micro_size"], summary["accumulation"], summary["global_size"]) == (2, 4, GLOBAL)
    check_metrics(resumed, WS_STEPS)

    rel, where = max_rel_diff(final_weights(resumed), final_weights(reference))
    print(f"max relative difference to the 2-process run: {rel:.3e} ({where})")
    assert rel <= TOL, f"{where}: {rel:.3e}"

    # Samples: the resumed process rewrote samples-rank0.jsonl with the steps it ran.
    ref_ranks = [read_jsonl(reference / f"samples-rank{r}.jsonl") for r in range(2)]
    for records in ref_ranks:
        assert [r["step"] for r in records] == list(range(WS_STEPS))
    got = read_jsonl(resumed / "samples-rank0.jsonl")
    assert [r["step"] for r in got] == list(range(WS_RESUME_AT, WS_STEPS))
    for record in got:
        k = record["step"]
        expected = sorted(ref_ranks[0][k]["indices"] + ref_ranks[1][k]["indices"])
        assert len(record["indices"]) == GLOBAL
        assert sorted(record["indices"]) == expected, f"step {k}"
