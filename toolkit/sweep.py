"""``toolkit sweep SWEEP.yaml``: a batch-size study, one real run per point of a grid.

A sweep file names a base run config, fixed overrides, a grid over any config keys (plus ``processes``),
a budget that every point gets (samples, tokens or steps), a target validation loss and how often to
validate. The sweep resolves every point's config and batch plan before it launches anything, then runs
the points one at a time, each a real launch (``python train.py`` for one process, ``accelerate launch``
for more) in its own run directory ``DIR/points/<name>``, all in one W&B group. It writes
``DIR/sweep.yaml`` (the file as given) and ``DIR/sweep.json`` (the points and the overrides each ran
with) before the first point, and the report (``toolkit.report.write_report``) at the end.

Resuming is the trainer's own: a finished point is skipped without a launch, any other is launched with
the same command, and the trainer continues it from its newest checkpoint. SIGINT or SIGTERM to the sweep
is passed on to the running point, which stops after its step with a checkpoint; the sweep then stops
(exit 130 or 143) and the same command continues it.

This module runs the points: their state (done, partial, new), their launch commands and environment, the
SIGINT/SIGTERM hand-over, the progress display, the dry-run table and the call of the report at the end. The
sweep file, the resolution of its points and sweep.json are toolkit/sweep_file.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from toolkit.config import ConfigError
from toolkit.sweep_file import ALIASES, Point, Sweep, match_existing, resolve, write_manifest

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train.py"
LAUNCH_DIR = ROOT / "launch"
CPU_LAUNCH = LAUNCH_DIR / "cpu.yaml"
"""Several processes on a machine without CUDA: torchrun through Accelerate, joined in a gloo group."""
GPU_LAUNCH = LAUNCH_DIR / "gpu8.yaml"
"""Several processes on a machine with CUDA: one per GPU, NCCL (``--num_processes`` overrides its 8)."""

STOP_WAIT_S = 120
"""After passing a SIGINT/SIGTERM on to the running point: how long to wait for its checkpoint before
killing its process tree."""
LOCK_WAIT_S = 180
"""Before launching a point: how long to wait for a process still holding its run.dir (the point of a sweep
that was killed, finishing its step and checkpoint)."""
POLL_S = 2.0
"""How often the progress display reads the running point's metrics.jsonl."""
PLAIN_LINE_S = 10.0
"""Without a terminal: at most one progress line per this many seconds (printed at validations)."""


# ----------------------------------------------------------------------------------------- state and commands
def finished(run_dir: Path, steps: int) -> dict | None:
    """The point's summary.json if the point is finished: it ran its train.steps, or stopped at the target."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("steps") == steps or summary.get("stopped_at_target") else None


def _checkpoints(run_dir: Path) -> list[Path]:
    """The point's complete checkpoints, newest first (``step-NNNNNNNN``; one being written has another name)."""
    from toolkit.checkpoint import list_checkpoints

    return [path for _, path in list_checkpoints(run_dir / "checkpoints")]


def point_status(sweep: Sweep, point: Point) -> str:
    """``done`` (finished: skipped), ``partial`` (has a checkpoint: the trainer resumes it) or ``new``."""
    run_dir = sweep.out / point.run_dir
    if finished(run_dir, point.steps) is not None:
        return "done"
    return "partial" if _checkpoints(run_dir) else "new"


@functools.lru_cache(maxsize=1)
def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _accelerate() -> list[str]:
    beside = Path(sys.executable).with_name("accelerate")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("accelerate")
    return [found] if found else [sys.executable, "-m", "accelerate.commands.launch"]


def command(sweep: Sweep, point: Point, port: int | str = "PORT") -> list[str]:
    """The point's launch: ``python train.py`` for one process; for more, ``accelerate launch`` with
    launch/cpu.yaml (gloo processes) on a machine without CUDA, launch/gpu8.yaml (one process per GPU,
    NCCL) with CUDA, and ``--num_processes`` the point's processes."""
    train = [str(sweep.script or TRAIN_SCRIPT), "--config", str(sweep.base), *point.overrides]
    if point.processes == 1:
        return [sys.executable, *train]
    launch = GPU_LAUNCH if _cuda_devices() else CPU_LAUNCH
    accelerate = _accelerate()
    launch_word = [] if accelerate[-1].endswith("launch") else ["launch"]
    return [*accelerate, *launch_word, "--config_file", str(launch), "--num_processes", str(point.processes),
            "--main_process_port", str(port), *train]


def child_env(processes: int) -> dict[str, str]:
    """The point's environment: this one, without a launcher's rank variables, unbuffered output, and for
    several processes one OMP thread each unless set (two spinning threads per rank on few cores run many
    times slower)."""
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if processes > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def check_devices(sweep: Sweep) -> None:
    """With CUDA, a point cannot have more processes than GPUs (without, any number shares the CPU)."""
    most = max(p.processes for p in sweep.points)
    if most > 1 and 0 < _cuda_devices() < most:
        point = next(p for p in sweep.points if p.processes == most)
        raise ConfigError(f"point {point.name} needs {most} processes but this machine has {_cuda_devices()} GPUs")


# ----------------------------------------------------------------------------------------- display
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def table(sweep: Sweep, statuses: list[str]) -> str:
    short = {k: ALIASES.get(k, k.split(".")[-1]) for k in sweep.grid_keys}
    head = ["point", *(short[k] for k in sweep.grid_keys), "steps", "micro", "accum", "status"]
    rows = [[p.name, *(_fmt(p.values[k]) for k in sweep.grid_keys), str(p.steps), str(p.micro_size),
             str(p.accumulation), s] for p, s in zip(sweep.points, statuses, strict=True)]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])


def header(sweep: Sweep, statuses: list[str]) -> str:
    s = sweep.spec
    kind = next(k for k in ("samples", "tokens", "steps") if getattr(s.budget, k) is not None)
    counts = ", ".join(f"{statuses.count(k)} {k}" for k in ("done", "partial", "new") if statuses.count(k))
    return (f"sweep {s.name}: {len(sweep.points)} point{'s' if len(sweep.points) > 1 else ''} ({counts}) in {sweep.out}; budget {getattr(s.budget, kind):,} "
            f"{kind} per point, target val_loss {s.target.val_loss:g} (a point stops at <= {sweep.target_loss:g})")


class _Progress:
    """The running point's step and losses, read from its metrics.jsonl: a tqdm bar on a terminal, else a
    plain line at a validation (at most one per PLAIN_LINE_S)."""

    def __init__(self, point: Point, metrics: Path, say: Callable[[str], None]):
        self.point, self.path, self.say = point, metrics, say
        self.offset, self.step, self.samples = 0, 0, 0
        self.loss: float | None = None
        self.val: float | None = None
        self.val_step = -1
        self.first, self.last_line = True, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=point.steps, desc=point.name, unit="step", leave=False, file=sys.stderr,
                            dynamic_ncols=True)

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
            if size < self.offset:  # a resumed run cut the file after its checkpoint's step
                self.offset = 0
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.offset += end
        new_val = False
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            self.step = max(self.step, int(rec.get("step", 0)))
            self.samples = rec.get("samples", self.samples)
            if "loss" in rec:
                self.loss = rec["loss"]
            elif "val_loss" in rec:
                self.val, self.val_step, new_val = rec["val_loss"], int(rec.get("step", 0)), True
        if self.bar is not None:
            self.bar.n = min(self.step, self.point.steps)
            parts = [f"loss {self.loss:.3f}" if self.loss is not None else "",
                     f"val {self.val:.3f}" if self.val is not None else ""]
            self.bar.set_postfix_str("  ".join(p for p in parts if p), refresh=False)
            self.bar.refresh()
        elif new_val and not self.first and time.monotonic() - self.last_line >= PLAIN_LINE_S:
            self.last_line = time.monotonic()
            loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
            self.say(f"  {self.point.name}: step {self.step}/{self.point.steps}, {self.samples:,} samples{loss}, "
                     f"val {self.val:.3f}")
        self.first = False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _steps(n: Any) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _finish_line(summary: dict | None, target: float) -> str:
    if summary is None:
        return "no summary.json"
    val = summary.get("val_loss")
    val_text = f"val {val:.3f}" if isinstance(val, (int, float)) else "no val loss"
    if summary.get("stopped_at_target") or (isinstance(val, (int, float)) and val <= target):
        return f"{_steps(summary.get('steps'))}, {val_text}, target reached at {summary.get('samples', 0):,} samples"
    return (f"{_steps(summary.get('steps'))}, {val_text}, target {target:g} not reached in "
            f"{summary.get('samples', 0):,} samples")


# ----------------------------------------------------------------------------------------- running
class _Signals:
    """SIGINT/SIGTERM while the sweep runs: the first is passed on to the running point (by the loop), a
    second kills the point's process tree at once."""

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame):
        self.count += 1
        if self.signum is None:
            self.signum = signum


def _stop_with_parent():
    """A preexec_fn for the point's launch: when the sweep dies without a chance to stop it (SIGKILL, the OOM
    killer), the kernel sends the point SIGTERM (Linux PR_SET_PDEATHSIG), so it stops after its step with a
    checkpoint (``accelerate launch`` passes it on to the ranks) instead of running on unwatched."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc, parent = ctypes.CDLL(None, use_errno=True), os.getpid()

    def preexec() -> None:
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


@contextlib.contextmanager
def _sweep_lock(out: Path):
    """One sweep per output directory at a time (flock: the kernel drops it however the sweep ends)."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".sweep.lock", "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ConfigError(f"{out} is in use by another sweep ({f.read().strip() or 'another process'}); wait "
                              f"for it, or use another --out DIR") from None
        except OSError:
            pass  # a file system without locks: go on unguarded
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield
    finally:
        f.close()


def _wait_for_run_dir(run_dir: Path, point: Point, signals: _Signals, say: Callable[[str], None]) -> bool:
    """Wait until no process holds the point's run.dir lock. A sweep that was killed leaves its running point
    to stop by itself (PR_SET_PDEATHSIG: it finishes its step and checkpoints), which may take a while; a
    sweep started again at once would otherwise see that point refuse to start ("in use") and count it as
    failed. False if it is still held after LOCK_WAIT_S (or a signal came)."""
    from toolkit.rundir import LOCK_FILE

    lock_path = run_dir / LOCK_FILE
    if not lock_path.exists():
        return True
    deadline, said = time.monotonic() + LOCK_WAIT_S, False
    with open(lock_path, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                pass
            if signals.signum is not None or time.monotonic() > deadline:
                say(f"{point.name}: {run_dir} is still in use by another process (see {lock_path}); not started")
                return False
            if not said:
                say(f"{point.name}: waiting for the process still holding {lock_path} to stop (the previous sweep's "
                    f"point, finishing its step and checkpoint)")
                said = True
            time.sleep(0.5)


def _run_point(sweep: Sweep, point: Point, signals: _Signals, say: Callable[[str], None]) -> int:
    """Launch the point and wait for it (passing a SIGINT/SIGTERM of the sweep on to it). Returns its exit
    code."""
    from toolkit.processes import free_port, kill_tree

    run_dir = sweep.out / point.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not _wait_for_run_dir(run_dir, point, signals, say):
        return 1
    cmd = command(sweep, point, free_port() if point.processes > 1 else "PORT")
    progress = _Progress(point, run_dir / "metrics.jsonl", say)
    with open(run_dir / "train.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} toolkit sweep: {shlex.join(cmd)}\n".encode())
        log.flush()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(point.processes), start_new_session=True,
                                preexec_fn=_stop_with_parent())
        try:
            forwarded, deadline, next_poll = False, None, 0.0
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if signals.signum is not None and not forwarded:
                    forwarded, deadline = True, time.monotonic() + STOP_WAIT_S
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signals.signum)
                if signals.count > 1:
                    say(f"{point.name}: a second signal: stopping it at once (its newest earlier checkpoint stays)")
                    kill_tree(proc)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    say(f"{point.name}: no exit {STOP_WAIT_S} s after the signal; killing its processes")
                    kill_tree(proc)
                    break
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL_S
                    progress.poll()
        finally:
            if proc.poll() is None:
                kill_tree(proc)
            progress.close()
            log.write(f"=== exit {proc.returncode} after {time.monotonic() - started:.0f} s\n".encode())
    return proc.returncode


def run_sweep(path: str | os.PathLike, out: str | os.PathLike | None = None, dry_run: bool = False,
              say: Callable[[str], None] = print, slurm_spec=None) -> int:
    """Resolve the sweep, then (unless ``dry_run``) run its points in order and write the report. Returns the
    exit code: 0 all points done, 1 some failed (named), 130/143 stopped by SIGINT/SIGTERM. Raises ConfigError
    (exit 2) when any point cannot run, before launching anything. With ``slurm_spec`` (a
    ``toolkit.slurm.JobSpec``: time limit, partition ...) the points run as Slurm job arrays instead
    (toolkit/sweep_slurm.py)."""
    sweep = resolve(path, out)
    if slurm_spec is None:
        check_devices(sweep)
    else:
        from toolkit.slurm import check_spec

        check_spec(slurm_spec)
    match_existing(sweep)
    statuses = [point_status(sweep, p) for p in sweep.points]
    if dry_run and slurm_spec is not None:
        from toolkit import sweep_slurm

        say(header(sweep, statuses))
        say(table(sweep, statuses))
        sweep_slurm.dry_run(sweep, slurm_spec, say)
        return 0
    if dry_run:
        say(header(sweep, statuses))
        say(table(sweep, statuses))
        multi = any(p.processes > 1 for p in sweep.points)
        say("\ncommands (stdout and stderr to DIR/points/<name>/train.log" +
            ("; PORT: a free port at launch" if multi else "") + "):")
        for point in sweep.points:
            say(shlex.join(command(sweep, point)))
        say("dry run: nothing was launched")
        return 0

    with _sweep_lock(sweep.out):
        write_manifest(sweep)
        say(header(sweep, statuses))
        if slurm_spec is not None:
            from toolkit import sweep_slurm

            return sweep_slurm.run(sweep, slurm_spec, say)
        failed: list[Point] = []
        started = time.monotonic()
        total = len(sweep.points)
        with _Signals() as signals:
            for index, point in enumerate(sweep.points, 1):
                tag = f"[{index}/{total}] {point.name}"
                summary = finished(sweep.out / point.run_dir, point.steps)
                if summary is not None:
                    say(f"{tag}: done ({_finish_line(summary, sweep.target_loss)}); not run again")
                    continue
                if signals.signum is not None:
                    break
                how = "resuming" if _checkpoints(sweep.out / point.run_dir) else "starting"
                say(f"{tag}: {how} ({_steps(point.steps)} of {point.global_size} samples, {point.processes} "
                    f"process{'es' if point.processes > 1 else ''}, micro {point.micro_size} x accumulation "
                    f"{point.accumulation})")
                t0 = time.monotonic()
                code = _run_point(sweep, point, signals, say)
                took = time.monotonic() - t0
                log = sweep.out / point.run_dir / "train.log"
                summary = finished(sweep.out / point.run_dir, point.steps)
                if signals.signum is not None and (code != 0 or summary is None):
                    return _stopped(sweep, point, signals.signum, say)
                if code != 0:
                    failed.append(point)
                    say(f"{tag}: failed (exit {code}) after {took:.0f} s; see {log}")
                    continue
                say(f"{tag}: done in {took:.0f} s, {_finish_line(summary, sweep.target_loss)}")
            if signals.signum is not None:
                return _stopped(sweep, None, signals.signum, say)
        return finish(sweep, failed, f" ({time.monotonic() - started:.0f} s in this command)", say)


def finish(sweep: Sweep, failed: list[Point], took: str, say: Callable[[str], None]) -> int:
    """The sweep's last lines and its report; returns the exit code (1 if any point failed)."""
    say(f"sweep {sweep.spec.name}: {len(sweep.points) - len(failed)} of {len(sweep.points)} points done{took}")
    _report(sweep, say)
    if failed:
        say(f"failed points ({len(failed)}): " + "; ".join(
            f"{p.name} (see {sweep.out / p.run_dir / 'train.log'})" for p in failed))
        say("run the same command again to retry them (finished points are not run again)")
        return 1
    return 0


def _stopped(sweep: Sweep, point: Point | None, signum: int, say: Callable[[str], None]) -> int:
    name = signal.Signals(signum).name
    if point is None:
        say(f"stopped by {name} between points; run the same command again to continue")
    else:
        ckpts = _checkpoints(sweep.out / point.run_dir)
        where = f"its newest checkpoint is {ckpts[0].name}" if ckpts else "it has no checkpoint yet"
        say(f"stopped by {name}: point {point.name} stopped ({where}); run the same command again to continue")
    return 128 + signum


def _report(sweep: Sweep, say: Callable[[str], None]) -> None:
    try:
        from toolkit.report import write_report
    except ImportError as exc:
        if exc.name not in ("toolkit.report",):
            raise
        say("report: toolkit.report is not available in this version; skipped")
        return
    write_report(sweep.out, say=say, wandb=any(p.cfg.tracking.wandb for p in sweep.points))
