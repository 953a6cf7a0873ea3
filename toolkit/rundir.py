"""The run directory: one run at a time, and what a second command on the same directory means.

* **A lock.** The main process holds an exclusive ``flock`` on ``run.dir/.lock`` for the whole run. The
  kernel drops it when the process ends, however it ends (a SIGKILL too), so it is never stale. A second
  run on the same directory is refused in one line that names the holder.
* **Same run or not.** A checkpoint keeps the config it was trained with. A command whose config
  differs from it in anything that shapes the training (the data, the model, the global batch, the
  optimiser, the seed ...) is refused in one line that lists the differing keys; hardware and launch
  keys (micro-batch, device, precision, DeepSpeed stage, logging, checkpoint cadence, tracking) may
  change, as may ``train.steps``: a higher value extends the run.
* **Finished.** A run whose checkpoint is at ``train.steps`` and whose ``summary.json`` is written is
  done: running the same command again changes nothing and says so.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from toolkit.config import Config, ConfigError

LOCK_FILE = ".lock"

# Keys that may differ between the segments of one run: they choose the hardware, the launch or the
# bookkeeping, not the optimisation (the data order, the loss and the update do not depend on them).
# A name ending in "." covers its whole section.
MAY_CHANGE = (
    "run.",                       # name, dir, record_samples
    "batch.micro_size",           # the split of the global batch
    "train.device", "train.precision", "train.debug", "train.progress",
    "train.log_every", "train.val_every", "train.val_batches",  # what is measured, not what is trained
    "train.on_nonfinite", "train.max_skipped",
    "train.steps",                # checked on its own: raised, it extends the run
    "train.stop_val_loss",        # where the run stops, not how it trains: lowered, it extends a run stopped there
    "model.compile",
    "checkpoint.",                # cadence, how many to keep, where to resume from
    "deepspeed.",                 # ZeRO checkpoints are whole: any stage (or DDP) resumes any other
    "tracking.",
)


class AlreadyFinished(Exception):
    """The run in run.dir reached train.steps and wrote its summary: nothing to do."""


def flat(config: dict, prefix: str = "") -> dict[str, object]:
    """``{"batch": {"global_size": 32}}`` -> ``{"batch.global_size": 32}``."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def differing_keys(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for each key that may not change within a run and did. Keys that
    only one side has (a key added or removed by another version of the toolkit) are not compared."""
    old, new = flat(saved), flat(current)
    return [(k, old[k], new[k]) for k in sorted(set(old) & set(new)) if not may_change(k) and old[k] != new[k]]


def check_same_run(saved: dict | None, cfg: Config, step: int, checkpoint_dir: Path, run_dir: Path) -> str | None:
    """Refuse (ConfigError) a config that is not the checkpointed run's; return a line to print when
    ``train.steps`` changed (None otherwise). ``saved`` is the checkpoint's config (None: a checkpoint
    written before configs were kept, which is not checked)."""
    how = "start a new run in a directory of its own: run.name=NEW (runs/NEW) or run.dir=PATH"
    if saved is not None:
        diff = differing_keys(saved, dataclasses.asdict(cfg))
        if diff:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:6]) + (", ..." if len(diff) > 6 else "")
            raise ConfigError(
                f"{run_dir} holds a run (checkpoint {checkpoint_dir.name}) whose config differs in {shown}; "
                f"within a run only hardware and launch keys may change (batch.micro_size, train.device, train.precision, "
                f"deepspeed.*, logging, checkpoint and tracking keys, train.steps); to change the others, {how}"
            )
    if step > cfg.train.steps:
        raise ConfigError(f"{run_dir} holds a run already at step {step} (checkpoint {checkpoint_dir.name}), beyond "
                          f"train.steps={cfg.train.steps}; raise train.steps to extend it, or {how}")
    old_steps = None if saved is None else saved.get("train", {}).get("steps")
    if old_steps is not None and old_steps != cfg.train.steps:
        decay = "" if cfg.optim.decay_samples else " (the LR decay now ends there too: optim.decay_samples is unset)"
        return (f"train.steps changed from {old_steps} to {cfg.train.steps}: the run continues from step {step} "
                f"to step {cfg.train.steps}{decay}")
    return None


def check_fresh_start(cfg: Config, run_dir: Path, checkpoints: list) -> None:
    """Refuse (ConfigError) a start that would train over a run: ``checkpoint.resume=never`` where checkpoints
    are, or a finished run's summary.json with no checkpoint to continue from (deleted to save space)."""
    if cfg.checkpoint.resume == "never" and checkpoints:
        raise ConfigError(f"checkpoint.resume=never but {run_dir / 'checkpoints'} holds checkpoints; use "
                          f"checkpoint.resume=auto to continue that run, or another run.dir")
    if cfg.checkpoint.resume == "auto" and not checkpoints and (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} holds a finished run's summary.json but no checkpoint to continue from; start "
                          f"a new run with run.name=NEW or run.dir=PATH")


def finished_summary(run_dir: Path, step: int, steps: int, stop_val_loss: float | None = None) -> dict | None:
    """The run's summary if the run is complete: its checkpoint at ``train.steps`` (or at the validation that
    reached ``train.stop_val_loss``) and summary.json written for that step (a run killed between the final
    checkpoint and the summary is not complete)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("steps") != step:
        return None
    at_target = (stop_val_loss is not None and summary.get("stopped_at_target")
                 and isinstance(summary.get("val_loss"), float) and summary["val_loss"] <= stop_val_loss)
    return summary if step == steps or at_target else None


class RunLock:
    """An exclusive lock on ``run.dir/.lock`` held by the main process until ``release`` or its end."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._file = None

    def acquire(self, warn=print) -> str | None:
        """Take the lock and record who holds it. Returns None, or the refusal (one line) if another
        process holds it. Writes nothing when refused. A file system without locks (Lustre mounted without
        ``flock``, NFS without lockd) gets a warning, and the run goes on unguarded."""
        try:
            f = open(self.path, "a+")
        except OSError as exc:
            return f"run.dir {self.path.parent}: cannot open {self.path.name} ({exc.strerror}); choose another run.dir"
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            return (f"run.dir {self.path.parent} is in use by another run ({holder}); wait for it to end, or give "
                    f"this run its own directory: run.name=NEW or run.dir=PATH")
        except OSError as exc:
            f.close()
            warn(f"warning: cannot lock {self.path} ({exc.strerror}); nothing stops a second run on this run.dir")
            return None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._file = f
        return None

    def fileno(self) -> int | None:
        """The lock file's descriptor (a forked child that keeps it open keeps the lock: DataLoader workers close it)."""
        return self._file.fileno() if self._file is not None else None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None


def prepare(run_dir: Path, warn=print) -> tuple[RunLock | None, str | None]:
    """Create ``run_dir`` and take its lock (main process). Returns (lock, None) or (None, refusal line)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return None, (f"run.dir={run_dir} is not a writable directory ({exc.strerror or exc}); choose another with "
                      f"run.dir=PATH or run.name=NAME (runs/NAME)")
    lock = RunLock(run_dir)
    refusal = lock.acquire(warn)
    return (None, refusal) if refusal else (lock, None)


def empty(run_dir: Path) -> None:
    """Remove everything in ``run_dir`` but its lock (a debug run's own directory, which never continues)."""
    removed = False
    for path in run_dir.iterdir():
        if path.name == LOCK_FILE:
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed = True
    if removed:
        print(f"debug: starting afresh in {run_dir} (the previous debug run there was removed)", flush=True)
