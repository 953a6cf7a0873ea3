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
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from toolkit.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "train.py"
LAUNCH_DIR = ROOT / "launch"
CPU_LAUNCH = LAUNCH_DIR / "cpu.yaml"
"""Several processes on a machine without CUDA: torchrun through Accelerate, joined in a gloo group."""
GPU_LAUNCH = LAUNCH_DIR / "gpu8.yaml"
"""Several processes on a machine with CUDA: one per GPU, NCCL (``--num_processes`` overrides its 8)."""

PROCESSES = "processes"
"""The grid key for the number of processes of a point (default 1); every other grid key is a config key."""

STOP_WAIT_S = 120
"""After passing a SIGINT/SIGTERM on to the running point: how long to wait for its checkpoint before
killing its process tree."""
POLL_S = 2.0
"""How often the progress display reads the running point's metrics.jsonl."""
PLAIN_LINE_S = 10.0
"""Without a terminal: at most one progress line per this many seconds (printed at validations)."""

SET_BY_SWEEP = ("run.dir", "run.name", "tracking.group", "train.steps", "train.stop_val_loss", "train.val_every",
                "train.val_batches")
"""Keys every point gets from the sweep itself (from its name, budget, target and validation); a sweep file
that sets them in ``overrides`` or ``grid`` is refused rather than silently overruled."""

ALIASES = {"batch.global_size": "b", "optim.lr": "lr", PROCESSES: "p", "batch.micro_size": "m",
           "deepspeed.stage": "z"}
"""Short names of common grid keys in point names (``b0064-lr3e-03-p1``); ``optim.lr_scaling`` shows its
value alone, other keys their last component and value."""
PADDED = ("b", "m", "p")
"""Aliases whose integer values are zero-padded to the widest value of the sweep, so names sort by value."""


# ----------------------------------------------------------------------------------------- the sweep file
@dataclass
class BudgetSpec:
    samples: int | None = None
    """Training samples every point may consume (the cap; a point may stop earlier at the target). Turned
    into train.steps per point with toolkit.batch.steps_for_samples (ramp aware)."""

    tokens: int | None = None
    """The cap in tokens instead: samples = tokens // data.seq_len of the point."""

    steps: int | None = None
    """The cap in optimizer steps instead (the same number of steps at every batch size)."""


@dataclass
class TargetSpec:
    val_loss: float = MISSING
    """The validation loss a point must reach; steps, samples and time to it are what the study compares."""

    margin: float = 0.0
    """A point stops at its first validation at or below ``val_loss - margin`` (train.stop_val_loss), so
    that the report can interpolate the crossing of ``val_loss`` between validations."""


@dataclass
class ValidationSpec:
    every_samples: int = 2048
    """Validate every this many training samples: train.val_every = max(1, every_samples // global size),
    so small and large batches are measured at the same samples, and often enough to interpolate."""

    samples: int = 512
    """Validation samples per validation: train.val_batches = ceil(samples / global size), so every point
    is validated on (at least) the same number of samples."""


@dataclass
class SweepSpec:
    name: str = MISSING
    """The sweep's name: the W&B group of every point (tracking.group) and the default output directory,
    ``sweeps/<name>``."""

    base: str = MISSING
    """The run config every point starts from, relative to the sweep file (e.g. ``../tiny.yaml``)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """Fixed dotted overrides for every point (``model.size: nano``), applied over ``base``."""

    grid: Any = MISSING
    """A mapping from keys to lists of values (their cross product), or a list of such mappings (the union
    of their cross products; identical points are run once). Any config key may be a grid key, and
    ``processes`` is the number of processes of a point (default 1). A single value stands for a list of one."""

    budget: BudgetSpec = field(default_factory=BudgetSpec)
    """The cap of every point: exactly one of ``samples``, ``tokens`` or ``steps``."""

    target: TargetSpec = field(default_factory=TargetSpec)
    """The target validation loss (and the margin below it at which a point stops)."""

    validation: ValidationSpec = field(default_factory=ValidationSpec)
    """How often and on how many samples the points validate."""

    micro_size_max: int | None = 32
    """For points that do not set batch.micro_size (in ``overrides`` or the grid): the micro-batch is the
    largest size that divides the point's samples per process and is at most min(micro_size_max, global / 2)
    (at least 1). So every point runs at least two micro-batches per step overall (accumulation on one
    process, or several processes), which the trainer needs to measure the gradient noise scale; the points
    of one global batch on different numbers of processes share a micro-batch (where it divides), so their
    throughput compares at the same micro-batch; and no micro-batch exceeds micro_size_max (what fits in
    memory). null: leave batch.micro_size as the base config has it."""


def _spec_error(exc: OmegaConfBaseException, path: Path) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        section = {"budget": BudgetSpec, "target": TargetSpec, "validation": ValidationSpec}.get(str(key).split(".")[0])
        cls = section if section is not None and "." in str(key) else SweepSpec
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        return ConfigError(f"{path}: unknown sweep key '{key}'; valid keys here: {valid}")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"{path}: '{key}' is required (see toolkit/sweep.py, SweepSpec)")
    return ConfigError(f"{path}: bad value for '{key}': {str(exc).splitlines()[0]}")


def load_sweep(path: str | os.PathLike) -> SweepSpec:
    """The sweep file, type-checked, with its grid as a list of mappings from key to a list of values.
    Raises ConfigError (one line naming the key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path} (e.g. configs/sweeps/cpu-batch.yaml)")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several types
        raise ConfigError(f"cannot parse sweep file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a sweep file is a mapping (name, base, overrides, grid, budget, target, ...)")
    try:
        spec: SweepSpec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepSpec), raw))
    except OmegaConfBaseException as exc:
        raise _spec_error(exc, path) from None
    if not re.fullmatch(r"[A-Za-z0-9._-]+", spec.name):
        raise ConfigError(f"{path}: name={spec.name!r} may only hold letters, digits and . _ - (it names a directory)")
    given = [k for k in ("samples", "tokens", "steps") if getattr(spec.budget, k) is not None]
    if len(given) != 1:
        raise ConfigError(f"{path}: budget needs exactly one of samples, tokens or steps (got "
                          f"{', '.join(given) or 'none'})")
    if getattr(spec.budget, given[0]) < 1:
        raise ConfigError(f"{path}: budget.{given[0]}={getattr(spec.budget, given[0])} must be positive")
    if spec.validation.every_samples < 1 or spec.validation.samples < 1:
        raise ConfigError(f"{path}: validation.every_samples and validation.samples must be positive")
    if spec.micro_size_max is not None and spec.micro_size_max < 1:
        raise ConfigError(f"{path}: micro_size_max={spec.micro_size_max} must be positive (or null)")
    if spec.target.margin < 0:
        raise ConfigError(f"{path}: target.margin={spec.target.margin} must be >= 0")
    spec.grid = _normalise_grid(spec.grid, path)
    for where, keys in (("overrides", list(spec.overrides)), ("grid", [k for g in spec.grid for k in g])):
        for key in keys:
            if key in SET_BY_SWEEP:
                raise ConfigError(f"{path}: {where} sets {key}, which the sweep sets for every point (from its "
                                  f"name, budget, target and validation); remove it")
            if key == PROCESSES and where == "overrides":
                raise ConfigError(f"{path}: processes belongs in the grid (e.g. processes: [2]), not in overrides")
    return spec


def _normalise_grid(grid: Any, path: Path) -> list[dict[str, list]]:
    if isinstance(grid, dict):
        grid = [grid]
    if not isinstance(grid, list) or not grid or not all(isinstance(g, dict) and g for g in grid):
        raise ConfigError(f"{path}: grid must be a mapping of keys to lists of values, or a non-empty list of "
                          f"such mappings (got {grid!r})")
    out = []
    for g in grid:
        entry = {}
        for key, values in g.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise ConfigError(f"{path}: grid key {key} has an empty list of values")
            entry[str(key)] = values
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------- points
@dataclass
class Point:
    """One run of the sweep: its name, its grid values, the overrides it runs with and its resolved plan."""

    name: str
    values: dict[str, Any]
    """Every grid key of the sweep with this point's value (keys a point's grid does not set: the value its
    resolved config has), and ``processes``."""
    processes: int
    overrides: list[str]
    """The full override list the point runs with (over the base config), derived ones last."""
    cfg: Config
    steps: int
    micro_size: int
    accumulation: int
    global_size: int
    """Samples per step (for ``full``: the training split's size)."""

    @property
    def run_dir(self) -> str:
        return f"points/{self.name}"


@dataclass
class Sweep:
    spec: SweepSpec
    path: Path
    base: Path
    out: Path
    grid_keys: list[str]
    points: list[Point]

    @property
    def target_loss(self) -> float:
        return round(self.spec.target.val_loss - self.spec.target.margin, 10)


def _value_text(value: Any) -> str:
    """A grid value as an override's right-hand side (what OmegaConf reads back as the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _get(cfg: Config, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), cfg)


def _sets(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0] == key for o in overrides)


def _rephrase(exc: ConfigError, where: str) -> str:
    return str(exc).replace("in the command line overrides", f"in {where}")


_SPLIT_SIZES: dict[str, int] = {}


def _split_size(cfg: Config) -> int:
    """Samples in the training split, for ``batch.global_size: full`` (loads the data, once per data and
    model config)."""
    key = json.dumps([dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.model)], sort_keys=True)
    if key not in _SPLIT_SIZES:
        from toolkit.data import load_data
        from toolkit.model import shape_from_config

        _SPLIT_SIZES[key] = len(load_data(cfg, shape_from_config(cfg).vocab_size)[0])
    return _SPLIT_SIZES[key]


def default_micro_size(global_size: int, processes: int, micro_max: int, full: bool = False,
                       ramp: tuple[int, int] | None = None) -> int | None:
    """The micro-batch of a point that does not set one: the largest size that divides its samples per
    process (and every ramp size's) and is at most min(micro_max, global / 2), at least 1. So every step runs
    at least two micro-batches overall (accumulation on one process, or several processes), which the
    trainer needs to measure the gradient noise scale; and the points of one global batch on 1, 2, 4 ...
    processes get the same micro-batch where it divides, so their throughput compares like with like. A full
    batch is cut into near-equal micro-batches, so it needs no divisor."""
    cap = max(1, min(micro_max, global_size // 2))
    if full:
        return cap
    unit = math.gcd(global_size, *ramp) if ramp else global_size
    if unit % processes:
        return None  # left unset: the plan refuses the point, naming the global sizes that divide
    per_process = unit // processes
    return max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)


def _expand(grid: list[dict[str, list]]) -> list[dict[str, Any]]:
    combos = []
    for g in grid:
        keys = list(g)
        for values in itertools.product(*(g[k] for k in keys)):
            combos.append(dict(zip(keys, values, strict=True)))
    return combos


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def resolve(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Sweep:
    """Every point of the sweep file, its config resolved with load_config and its batch plan checked for its
    processes. Raises ConfigError (one line naming the point) on the first point that cannot run."""
    from toolkit.batch import plan_for_config, schedule_for_config, steps_for_samples

    path = Path(path)
    spec = load_sweep(path)
    base = (path.parent / spec.base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base={spec.base}: file not found ({base}); it is relative to the sweep file")
    out_dir = Path(out) if out is not None else Path("sweeps") / spec.name
    fixed = [f"{k}={_value_text(v)}" for k, v in spec.overrides.items()]
    try:
        load_config(base, fixed)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {_rephrase(exc, 'the sweep overrides')}") from None
    grid_keys: list[str] = []
    for g in spec.grid:
        grid_keys += [k for k in g if k not in grid_keys]
    if PROCESSES in grid_keys:  # processes last in names and tables
        grid_keys = [k for k in grid_keys if k != PROCESSES] + [PROCESSES]
    budget_kind = next(k for k in ("samples", "tokens", "steps") if getattr(spec.budget, k) is not None)
    budget = getattr(spec.budget, budget_kind)
    target = round(spec.target.val_loss - spec.target.margin, 10)

    resolved, seen = [], set()
    for combo in _expand(spec.grid):
        what = f"point {_describe(combo)}"
        processes = combo.get(PROCESSES, 1)
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigError(f"{path}: {what}: processes={processes!r} must be a whole number >= 1")
        given = fixed + [f"{k}={_value_text(v)}" for k, v in combo.items() if k != PROCESSES]
        try:
            cfg = load_config(base, given)
            train_samples = _split_size(cfg) if cfg.batch.global_size == "full" else None
            global_size = train_samples if train_samples is not None else int(cfg.batch.global_size)
            derived = []
            if spec.micro_size_max is not None and not _sets(given, "batch.micro_size"):
                ramp = cfg.batch.ramp
                ramp_sizes = (ramp.start, ramp.increment) if ramp.start is not None else None
                micro = default_micro_size(global_size, processes, spec.micro_size_max,
                                           full=train_samples is not None, ramp=ramp_sizes)
                derived.append(f"batch.micro_size={_value_text(micro)}")  # null: the plan names valid sizes
                cfg.batch.micro_size = micro  # for the steps below; the whole list is loaded again at the end
            if budget_kind == "steps":
                steps = budget
            else:
                samples = budget if budget_kind == "samples" else budget // cfg.data.seq_len
                if samples < 1:
                    raise ConfigError(f"budget.tokens={budget} is less than one sample of data.seq_len="
                                      f"{cfg.data.seq_len} tokens")
                steps = steps_for_samples(cfg, samples, train_samples=train_samples, world_size=processes)
            val_every = max(1, spec.validation.every_samples // global_size)
            derived += [
                f"tracking.group={spec.name}",
                f"train.steps={steps}",
                f"train.stop_val_loss={_value_text(target)}",
                f"train.val_every={val_every}",
                f"train.val_batches={-(-spec.validation.samples // global_size)}",
            ]
            if not _sets(given, "checkpoint.every_steps"):
                derived.append(f"checkpoint.every_steps={val_every}")  # an interrupted point loses little
            if not _sets(given, "train.progress"):
                derived.append("train.progress=false")  # the sweep draws its own progress
            cfg = load_config(base, given + derived)
            plan = plan_for_config(cfg, processes, train_samples)
            schedule_for_config(cfg, processes, train_samples)  # a ramp that does not fit the plan
        except ConfigError as exc:
            raise ConfigError(f"{path}: {what}: {_rephrase(exc, 'the grid')}") from None
        identity = json.dumps([processes, {k: v for k, v in dataclasses.asdict(cfg).items() if k != "run"}],
                              sort_keys=True, default=str)
        if identity in seen:
            continue  # the same point from an overlapping grid
        seen.add(identity)
        values = {k: (combo[k] if k in combo else (processes if k == PROCESSES else _get(cfg, k))) for k in grid_keys}
        values[PROCESSES] = processes
        resolved.append((values, given + derived, cfg, plan, steps, global_size))

    names = point_names([v for v, *_ in resolved], grid_keys)
    points = []
    for name, (values, overrides, cfg, plan, steps, global_size) in zip(names, resolved, strict=True):
        run = [f"run.dir={(out_dir / 'points' / name).resolve()}", f"run.name={name}"]
        points.append(Point(name, values, values[PROCESSES], overrides + run, cfg, steps,
                            plan.micro_size, plan.accumulation, global_size))
    return Sweep(spec, path.resolve(), base, out_dir, grid_keys, points)


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text.replace("+", ""))


def point_names(values: list[dict[str, Any]], grid_keys: list[str]) -> list[str]:
    """Readable, deterministic names: ``b0064-lr3e-03-p1`` (see ALIASES), other keys as their last component
    followed by the value. The LR is written with as few digits as keep distinct values apart."""
    widths = {}
    for key in grid_keys:
        ints = [v[key] for v in values if isinstance(v.get(key), int) and not isinstance(v.get(key), bool)]
        widths[key] = max((len(str(i)) for i in ints), default=0)
    lr_digits = 0
    lrs = {v["optim.lr"] for v in values if isinstance(v.get("optim.lr"), (int, float))}
    while lr_digits < 6 and len({f"{x:.{lr_digits}e}" for x in lrs}) < len(lrs):
        lr_digits += 1

    def part(key: str, value: Any) -> str:
        alias = ALIASES.get(key)
        if key == "optim.lr_scaling":
            return str(value)
        if key == "optim.lr" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"lr{value:.{lr_digits}e}"
        if isinstance(value, bool) or value is None:
            text = str(value).lower()
        elif isinstance(value, int) and alias in PADDED:
            text = str(value).zfill(widths[key])
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        return f"{alias or key.split('.')[-1]}{text}"

    names = [_sanitize("-".join(part(k, v[k]) for k in grid_keys if k in v)) or "point" for v in values]
    for name in {n for n in names if names.count(n) > 1}:
        clash = [_describe(v) for v, n in zip(values, names, strict=True) if n == name]
        raise ConfigError(f"two points would share the name {name}: {clash[0]} and {clash[1]}; give them values "
                          f"that differ in their names")
    return names


# ----------------------------------------------------------------------------------------- state and commands
def finished(run_dir: Path, steps: int) -> dict | None:
    """The point's summary.json if the point is finished: it ran its train.steps, or stopped at the target."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("steps") == steps or summary.get("stopped_at_target") else None


def _checkpoints(run_dir: Path) -> list[Path]:
    """The point's complete checkpoints (``step-NNNNNNNN``; one being written has another name)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d{8}", p.name))


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
    train = [str(TRAIN_SCRIPT), "--config", str(sweep.base), *point.overrides]
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


# ----------------------------------------------------------------------------------------- sweep.json
def _comparable(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(("run.dir=", "run.name="))]


def manifest(sweep: Sweep) -> dict:
    s = sweep.spec
    budget = {k: getattr(s.budget, k) for k in ("samples", "tokens", "steps") if getattr(s.budget, k) is not None}
    return {
        "name": s.name, "sweep_file": str(sweep.path), "base_config": str(sweep.base),
        "target": {"val_loss": s.target.val_loss, "margin": s.target.margin},
        "budget": budget, "grid_keys": sweep.grid_keys,
        "points": [{"name": p.name, "run_dir": p.run_dir, "values": p.values, "overrides": p.overrides}
                   for p in sweep.points],
    }


def match_existing(sweep: Sweep) -> None:
    """Against a sweep.json already in the output directory: a point with the same overrides (but for its
    run directory) keeps its old name, so its run directory is continued; the sweep may add points, but an
    old point it no longer has means another sweep, which is refused (ConfigError)."""
    path = sweep.out / "sweep.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
        old_points = {(p["values"].get(PROCESSES, 1), json.dumps(_comparable(p["overrides"]))): p["name"]
                      for p in old["points"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); use another --out, or remove it") from None
    new = {(p.processes, json.dumps(_comparable(p.overrides))): p for p in sweep.points}
    missing = [name for key, name in old_points.items() if key not in new]
    if missing:
        raise ConfigError(f"{sweep.out} holds another sweep ({old.get('name')}: its point {missing[0]} is not in "
                          f"{sweep.path.name}, or has other overrides); use another --out DIR")
    for key, name in old_points.items():
        point = new[key]
        if point.name != name:
            point.overrides = _comparable(point.overrides) + [
                f"run.dir={(sweep.out / 'points' / name).resolve()}", f"run.name={name}"]
            point.name = name
    names = [p.name for p in sweep.points]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise ConfigError(f"{sweep.out}: a new point would take the name of an old one ({clash}); use another --out")


def write_manifest(sweep: Sweep) -> None:
    sweep.out.mkdir(parents=True, exist_ok=True)
    copy = sweep.out / "sweep.yaml"
    if not (copy.exists() and copy.samefile(sweep.path)):
        shutil.copyfile(sweep.path, copy)
    tmp = sweep.out / "sweep.json.tmp"
    tmp.write_text(json.dumps(manifest(sweep), indent=2) + "\n")
    os.replace(tmp, sweep.out / "sweep.json")


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


def _run_point(sweep: Sweep, point: Point, signals: _Signals, say: Callable[[str], None]) -> int:
    """Launch the point and wait for it (passing a SIGINT/SIGTERM of the sweep on to it). Returns its exit
    code."""
    from toolkit.processes import free_port, kill_tree

    run_dir = sweep.out / point.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
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
              say: Callable[[str], None] = print) -> int:
    """Resolve the sweep, then (unless ``dry_run``) run its points in order and write the report. Returns the
    exit code: 0 all points done, 1 some failed (named), 130/143 stopped by SIGINT/SIGTERM. Raises ConfigError
    (exit 2) when any point cannot run, before launching anything."""
    sweep = resolve(path, out)
    check_devices(sweep)
    match_existing(sweep)
    statuses = [point_status(sweep, p) for p in sweep.points]
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
        say(f"sweep {sweep.spec.name}: {total - len(failed)} of {total} points done "
            f"({time.monotonic() - started:.0f} s in this command)")
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
        where = f"its newest checkpoint is {ckpts[-1].name}" if ckpts else "it has no checkpoint yet"
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
