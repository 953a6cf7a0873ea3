"""The sweep file and its points: what ``toolkit sweep SWEEP.yaml`` runs, resolved before anything runs.

It holds the typed dataclasses of the sweep file (``SweepSpec`` and its sections, the keys a sweep file may
set), their loading and validation (``load_sweep``), the expansion of the grid into points and their
resolution (``resolve``: each point's config, batch plan, steps for the budget and the overrides the sweep
derives for it), the points' names (``point_names``), and ``DIR/sweep.json``, the manifest of the points: how
it is written (``write_manifest``) and how a sweep already in the output directory is extended or refused
(``match_existing``). Running the points is toolkit/sweep.py.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from toolkit.config import Config, ConfigError, load_config

PROCESSES = "processes"
"""The grid key for the number of processes of a point (default 1); every other grid key is a config key."""

SET_BY_SWEEP = ("run.dir", "run.name", "tracking.group", "train.steps", "train.stop_val_loss", "train.val_every",
                "train.val_batches", "checkpoint.resume")
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
    """Validation samples per validation: train.val_batches = samples / global size, so every point is
    validated on the same samples (the first ``samples`` of the validation split); it must be a multiple of
    every point's global batch (a ``full`` point validates one batch of the split's size instead)."""


@dataclass
class SweepSpec:
    name: str = MISSING
    """The sweep's name: the W&B group of every point (tracking.group) and the default output directory,
    ``sweeps/<name>``."""

    base: str = MISSING
    """The run config every point starts from, relative to the sweep file (e.g. ``../tiny.yaml``)."""

    script: str | None = None
    """A training script to launch for every point instead of train.py, relative to the sweep file: a user's
    script on the library API that reads its command line with ``toolkit.config_from_argv`` (so it takes
    ``--config FILE key=value ...`` as train.py does), e.g. ``examples/custom_model.py``."""

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
        return ConfigError(f"{path}: '{key}' is required (see toolkit/sweep_file.py, SweepSpec)")
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
    script: Path | None = None
    """The user's training script (``script:``), or None for train.py."""

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
    script = (path.parent / spec.script).resolve() if spec.script else None
    if script is not None and not script.is_file():
        raise ConfigError(f"{path}: script={spec.script}: file not found ({script}); it is relative to the sweep file")
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
            if train_samples is None and spec.validation.samples % global_size:
                raise ConfigError(f"validation.samples={spec.validation.samples} is not a multiple of its global batch "
                                  f"{global_size}, so it would validate on other samples than the rest; use "
                                  f"{math.lcm(spec.validation.samples, global_size)} (a multiple of every global batch)")
            derived += [
                f"tracking.group={spec.name}",
                f"train.steps={steps}",
                f"train.stop_val_loss={_value_text(target)}",
                f"train.val_every={val_every}",
                f"train.val_batches={max(1, spec.validation.samples // global_size)}",
                "checkpoint.resume=auto",  # an interrupted point continues (a base config may say never)
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
    return Sweep(spec, path.resolve(), base, out_dir, grid_keys, points, script)


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
