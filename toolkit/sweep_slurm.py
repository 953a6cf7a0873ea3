"""``toolkit sweep SWEEP.yaml --launcher slurm``: the sweep's points as Slurm job arrays.

The points that are not finished are submitted as one job array per process count (array tasks share
their resources: one node, one rank per process, and with ``--gpus-per-rank`` that many GPUs each). Every
array task is ``slurm/train.sbatch`` with the point's own ``train.py`` arguments, appending its output to
the point's ``train.log``, so a point's files are the same as under the local launcher and the report
collects them the same way. A preempted task checkpoints and requeues itself (the template's policy).

The sweep then waits for its arrays, printing each point as it ends, and writes the report. Ctrl-C stops
the waiting, not the jobs: the same command later waits for the same jobs (it never submits a point that a
job of this sweep still has queued or running), and ``scancel`` stops them. The jobs are recorded in
``DIR/slurm/jobs.jsonl``.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

from toolkit import slurm
from toolkit.sweep_file import Point, Sweep

POLL_S = 5.0
"""How often the waiting sweep asks Slurm about its arrays."""


def _jobs_file(sweep: Sweep) -> Path:
    return sweep.out / "slurm" / "jobs.jsonl"


def _recorded(sweep: Sweep) -> list[dict]:
    try:
        return [json.loads(line) for line in _jobs_file(sweep).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def active_points(sweep: Sweep) -> dict[str, str]:
    """{point name: "job_task"} for each point that a recorded array task of this sweep still has queued or
    running."""
    active = {}
    for job in _recorded(sweep):
        states = slurm.array_states(job["job_id"])
        for index, name in enumerate(job["points"]):
            if states.get(str(index), "UNKNOWN") in slurm.ACTIVE_STATES:
                active[name] = f"{job['job_id']}_{index}"
    return active


def _array_spec(sweep: Sweep, spec: slurm.JobSpec, processes: int) -> slurm.JobSpec:
    """The resources of the array of ``processes``-process points: one node, a rank per process, and
    ``spec.gpus_per_node`` read as GPUs per rank."""
    return slurm.JobSpec(**{**spec.__dict__, "nodes": 1, "procs_per_node": processes,
                            "gpus_per_node": spec.gpus_per_node * processes,
                            "job_name": f"{sweep.spec.name}-p{processes}"})


def submit_points(sweep: Sweep, points: list[Point], spec: slurm.JobSpec, train_args: Callable[[Point], list[str]],
                  say: Callable[[str], None]) -> list[dict]:
    """Submit ``points`` as job arrays, one per process count; returns the jobs as recorded."""
    folder = sweep.out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for processes in sorted({p.processes for p in points}):
        group = [p for p in points if p.processes == processes]
        group_spec = _array_spec(sweep, spec, processes)
        tasks = [(train_args(p), sweep.out / p.run_dir / "train.log") for p in group]
        for p in group:
            (sweep.out / p.run_dir).mkdir(parents=True, exist_ok=True)
        array = f"0-{len(group) - 1}"
        text = slurm.render(group_spec, tasks, folder / "slurm-%A_%a.out", Path.cwd(), sweep.script or slurm.TRAIN_SCRIPT,
                            array=array)
        pending = folder / "array-pending.sbatch"
        pending.write_text(text)
        job_id = slurm.sbatch(pending, slurm.sbatch_options(group_spec, folder / "slurm-%A_%a.out", Path.cwd(), array))
        pending.rename(folder / f"array-{job_id}.sbatch")
        record = {"job_id": job_id, "points": [p.name for p in group], "processes": processes,
                  "submitted": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(_jobs_file(sweep), "a") as f:
            f.write(json.dumps(record) + "\n")
        say(f"submitted job array {job_id}: {len(group)} point(s) of {processes} process(es) "
            f"({', '.join(p.name for p in group)}); script {folder / f'array-{job_id}.sbatch'}")
        jobs.append(record)
    return jobs


def wait(sweep: Sweep, names: list[str], finished: Callable[[Point], dict | None], line: Callable[[Point], str],
         stop: Callable[[], bool], say: Callable[[str], None]) -> list[str]:
    """Wait until no array task of this sweep is active, printing each of ``names`` as it ends. Returns the
    names still active when ``stop()`` turned true (empty when all ended)."""
    by_name = {p.name: p for p in sweep.points}
    waiting = set(names)
    active: dict[str, str] = {name: "" for name in names}
    unanswered = False
    while True:
        try:
            active, unanswered = active_points(sweep), False
        except slurm.SlurmUnavailable as exc:  # keep the last known states; ask again
            if not unanswered:
                say(f"Slurm does not answer ({exc}); still waiting")
            unanswered = True
        for name in sorted(waiting - set(active)):
            waiting.discard(name)
            point = by_name[name]
            log = sweep.out / point.run_dir / "train.log"
            say(f"{name}: {line(point)}" if finished(point) is not None else f"{name}: ended unfinished; see {log}")
        if not active:
            return []
        deadline = time.monotonic() + POLL_S
        while time.monotonic() < deadline:
            if stop():
                return sorted(active)
            time.sleep(0.2)


def dry_run(sweep: Sweep, spec: slurm.JobSpec, say: Callable[[str], None]) -> None:
    """Print the job arrays' scripts (all points; a real run leaves the finished ones out)."""
    for processes in sorted({p.processes for p in sweep.points}):
        group = [p for p in sweep.points if p.processes == processes]
        say(f"\njob array for the points of {processes} process(es):\n" + slurm.render(
            _array_spec(sweep, spec, processes), [(train_args(sweep, p), sweep.out / p.run_dir / "train.log")
                                                  for p in group],
            sweep.out / "slurm" / "slurm-%A_%a.out", Path.cwd(), sweep.script or slurm.TRAIN_SCRIPT,
            array=f"0-{len(group) - 1}").rstrip("\n"))
    say("dry run: nothing was submitted (points already done are left out of the real arrays)")


def train_args(sweep: Sweep, point: Point) -> list[str]:
    return ["--config", str(sweep.base), *point.overrides]


def run(sweep: Sweep, spec: slurm.JobSpec, say: Callable[[str], None]) -> int:
    """Submit the unfinished points as job arrays (those a job of this sweep still runs are waited for, not
    submitted again), wait for them, write the report. Ctrl-C stops the waiting only."""
    from toolkit.sweep import _finish_line, _Signals, finish, finished

    todo = []
    for point in sweep.points:
        summary = finished(sweep.out / point.run_dir, point.steps)
        if summary is not None:
            say(f"{point.name}: done ({_finish_line(summary, sweep.target_loss)}); not run again")
        else:
            todo.append(point)
    with _Signals() as signals:
        active = active_points(sweep)
        for name, task in sorted(active.items()):
            say(f"{name}: still queued or running as Slurm job {task}; waiting for it")
        submit_points(sweep, [p for p in todo if p.name not in active], spec, lambda p: train_args(sweep, p), say)
        left = wait(
            sweep, [p.name for p in todo], lambda p: finished(sweep.out / p.run_dir, p.steps),
            lambda p: _finish_line(finished(sweep.out / p.run_dir, p.steps), sweep.target_loss),
            lambda: signals.signum is not None, say)
        if left:
            say(f"stopped waiting ({signal.Signals(signals.signum).name}); {len(left)} point(s) go on in Slurm "
                f"({', '.join(left)}): run the same command again to wait for them and write the report, or "
                f"scancel their jobs (listed in {sweep.out / 'slurm' / 'jobs.jsonl'})")
            return 128 + signals.signum
    return finish(sweep, [p for p in todo if finished(sweep.out / p.run_dir, p.steps) is None], "", say)
