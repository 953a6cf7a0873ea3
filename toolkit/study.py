"""The batch-size study's analysis: pure functions over run directories, numpy only.

- ``point_figures``: one run's figures (steps, samples, tokens and time to the target, throughput, memory,
  the gradient noise scale over training), finished or not.
- ``fit_steps``: McCandlish et al. (2018) S(B) = S_min (1 + B_crit / B) over the best LR per batch size.
- ``regimes``: Shallue et al. (2019) perfect scaling / diminishing returns / maximal data parallelism.
- ``recommend``: the fastest batch on the measured hardware, the one needing the fewest samples, B_crit and
  the measured noise scale, with the evidence table.
- ``predict_from_run`` / ``format_prediction``: ``toolkit recommend RUN_DIR``, B_crit from one run's noise scale
  before any sweep, and a sweep grid around it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

from toolkit.batch import scaled_lr
from toolkit.config import ConfigError
from toolkit.plot import PlotError, read_metrics

PERFECT_SLOPE = -0.8
"""d log S / d log B at or below this: perfect scaling (doubling the batch halves the steps)."""
MAXIMAL_SLOPE = -0.2
"""d log S / d log B at or above this: maximal data parallelism (a larger batch saves no steps)."""


@dataclass
class Crossing:
    """Where a run's validation loss first reached the target."""

    step: float
    """Optimizer steps to the target (fractional when interpolated)."""
    samples: float
    """Training samples consumed up to the target."""
    tokens: float
    """Training tokens consumed up to the target."""
    train_time_s: float | None
    """Training wall time up to the target (None when the records do not log train_time_s)."""
    interpolated: bool
    """False when the first validation was already at or below the target (taken as is)."""


@dataclass
class PointFigures:
    """Everything the study needs from one point's run directory."""

    run_dir: str
    """The run directory, as given."""
    finished: bool
    """summary.json exists (the run ended normally)."""
    reached: bool
    """A validation reached the target."""
    steps_to_target: float | None
    """Interpolated optimizer steps to the target (None when not reached)."""
    samples_to_target: float | None
    """Interpolated training samples to the target."""
    tokens_to_target: float | None
    """Interpolated training tokens to the target."""
    time_to_target_s: float | None
    """Interpolated training wall time (train_time_s) to the target."""
    interpolated: bool | None
    """Whether the crossing was interpolated between two validations (None when not reached)."""
    final_val_loss: float | None
    """The last validation loss."""
    best_val_loss: float | None
    """The lowest validation loss."""
    steps: int
    """Optimizer steps done."""
    samples: int
    """Training samples consumed."""
    tokens_per_s: float | None
    """Tokens/s over all processes (summary.json, else the median of the logged values)."""
    tokens_per_s_per_device: float | None
    """tokens_per_s / world_size."""
    memory_peak_gib: float | None
    """Peak memory of the run (GiB)."""
    noise_scale: float | None
    """The last gradient noise scale B_simple (samples), None when never measured."""
    noise_series: list[tuple[float, float]] = field(default_factory=list)
    """(samples, noise scale) of the train records that hold one."""
    val_series: list[tuple[float, float]] = field(default_factory=list)
    """(samples, validation loss) of every validation."""
    global_size: int | None = None
    """Samples per optimizer step (the plan's)."""
    micro_size: int | None = None
    """Samples per process per forward/backward."""
    world_size: int | None = None
    """Number of processes."""
    peak_lr: float | None = None
    """The effective peak LR (summary.json's peak_lr, else optim.lr after optim.lr_scaling)."""
    train_time_s: float | None = None
    """Training wall time so far."""
    step_time_s: float | None = None
    """Measured seconds per optimizer step: train_time_s / steps (else the median logged step_time_s)."""


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validations(records: list[dict]) -> list[dict]:
    """The validation records with a finite loss, sorted by step, a repeated step keeping its last record."""
    by_step = {r["step"]: r for r in records if _num(r.get("val_loss")) and _num(r.get("step"))}
    return [by_step[s] for s in sorted(by_step)]


def target_crossing(records: list[dict], target: float) -> Crossing | None:
    """The first validation at or below ``target``, its step/samples/tokens/train_time_s interpolated linearly in
    the validation loss between it and the validation before it. None when no validation reached it."""
    val = validations(records)
    for i, now in enumerate(val):
        if now["val_loss"] <= target:
            # Already below at the first validation: nothing to interpolate from, taken as is.
            before, frac = (now, 0.0) if i == 0 else (
                val[i - 1], (val[i - 1]["val_loss"] - target) / (val[i - 1]["val_loss"] - now["val_loss"]))
            at = [_between(before, now, frac, key) for key in ("step", "samples", "tokens", "train_time_s")]
            return Crossing(*at, interpolated=i > 0)
    return None


def _between(before: dict, now: dict, frac: float, key: str) -> float | None:
    if not (_num(before.get(key)) and _num(now.get(key))):
        return None
    return before[key] + frac * (now[key] - before[key])


def read_yaml(path: Path) -> dict:
    """A YAML mapping file ({} when absent); ConfigError naming it when it is not valid YAML."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return data if isinstance(data, dict) else {}


def read_summary(run_dir: Path) -> dict | None:
    """The run's summary.json, or None when the run has not finished."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON (a finished run writes it atomically)") from None


def _config_peak_lr(config: dict, global_size: int | None) -> float | None:
    """optim.lr after optim.lr_scaling, for a run without summary.json (the trainer's rule)."""
    optim = config.get("optim") or {}
    lr, rule, ref = optim.get("lr"), optim.get("lr_scaling", "none"), optim.get("reference_batch")
    if not _num(lr):
        return None
    if rule in ("linear", "sqrt") and _num(ref) and global_size:
        return scaled_lr(lr, global_size, ref, rule)
    return lr


def point_figures(run_dir: str | Path, target: float) -> dict:
    """The figures of the run in ``run_dir`` against a validation-loss ``target`` (a PointFigures as a dict).
    Reads summary.json when present, metrics.jsonl and config.yaml's ``plan:``; raises ConfigError when the run
    has no metrics.jsonl records."""
    run_dir = Path(run_dir)
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except PlotError as exc:
        raise ConfigError(str(exc)) from None
    summary = read_summary(run_dir) or {}
    config = read_yaml(run_dir / "config.yaml")
    train = [r for r in records if "loss" in r]
    last = train[-1] if train else records[-1]
    # Each figure from summary.json when the run finished, else from the plan or the records so far.
    plan = {k: _first(summary.get(k), (config.get("plan") or {}).get(k), last.get(k))
            for k in ("global_size", "micro_size", "world_size")}
    logged = {k: [r[k] for r in train if _num(r.get(k))] for k in ("tokens_per_s", "step_time_s", "memory_peak_gib")}
    crossing = target_crossing(records, target)
    at = asdict(crossing) if crossing else dict.fromkeys(("step", "samples", "tokens", "train_time_s", "interpolated"))
    val = validations(records)
    steps = int(_first(summary.get("steps"), max(r.get("step", 0) for r in records)))
    timed = [r for r in records if _num(r.get("train_time_s"))]
    train_time, time_step = (summary["train_time_s"], steps) if _num(summary.get("train_time_s")) else (
        (timed[-1]["train_time_s"], timed[-1]["step"]) if timed else (None, 0))
    step_time = train_time / time_step if train_time is not None and time_step else _median(logged["step_time_s"])
    tps = _first(summary.get("tokens_per_s"), _median(logged["tokens_per_s"]))
    noise = [(float(r["samples"]), float(r["noise_scale"])) for r in train
             if _num(r.get("noise_scale")) and _num(r.get("samples"))]
    return asdict(PointFigures(
        run_dir=str(run_dir), finished=bool(summary), reached=crossing is not None,
        steps_to_target=at["step"], samples_to_target=at["samples"], tokens_to_target=at["tokens"],
        time_to_target_s=at["train_time_s"], interpolated=at["interpolated"],
        final_val_loss=_first(summary.get("val_loss"), val[-1]["val_loss"] if val else None),
        best_val_loss=min((r["val_loss"] for r in val), default=None),
        steps=steps, samples=int(_first(summary.get("samples"), last.get("samples"), 0)),
        tokens_per_s=tps, tokens_per_s_per_device=tps / plan["world_size"] if tps and plan["world_size"] else None,
        memory_peak_gib=_first(summary.get("memory_peak_gib"), max(logged["memory_peak_gib"], default=None)),
        noise_scale=_first(summary.get("noise_scale"), noise[-1][1] if noise else None),
        noise_series=noise, val_series=[(float(r.get("samples", math.nan)), r["val_loss"]) for r in val],
        **plan, peak_lr=_first(summary.get("peak_lr"), _config_peak_lr(config, plan["global_size"])),
        train_time_s=train_time, step_time_s=step_time,
    ))


def _first(*values):
    """The first finite number among ``values`` (None if none)."""
    return next((v for v in values if _num(v)), None)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


@dataclass
class Fit:
    """S(B) = S_min (1 + B_crit / B), i.e. S = a + b / B with a = S_min and b = E_min = S_min B_crit."""

    s_min: float
    """Steps to the target with an infinitely large batch."""
    s_min_err: float
    """Standard error of s_min."""
    e_min: float
    """Samples (examples) to the target with an infinitely small batch."""
    e_min_err: float
    """Standard error of e_min."""
    b_crit: float
    """The critical batch E_min / S_min (samples): twice S_min steps and twice E_min samples there."""
    b_crit_err: float
    """Standard error of b_crit (delta method on the parameters' covariance)."""
    n_points: int
    """Number of batch sizes fitted."""

    def steps(self, batch):
        return self.s_min * (1 + self.b_crit / np.asarray(batch, dtype=float))

    def samples(self, batch):
        return self.e_min * (1 + np.asarray(batch, dtype=float) / self.b_crit)


def fit_steps(batches, steps) -> tuple[Fit | None, str]:
    """Fit S = a + b / B by weighted least squares; returns (Fit, "") or (None, why not).

    Weights are 1 / S^2, i.e. the fit minimises relative errors: steps to a target span decades across batch
    sizes and their run-to-run scatter is roughly proportional to S (a constant scatter on log axes), so an
    unweighted fit would be decided by the smallest batches alone (on 7 sizes over 64x with 5% scatter it
    recovers B_crit with a 7% spread, against 15% unweighted). Errors come from the weighted covariance scaled by the residual variance (n - 2 degrees of freedom)."""
    b = np.asarray(batches, dtype=float)
    s = np.asarray(steps, dtype=float)
    n = len(b)
    if len(np.unique(b)) != n:
        raise ValueError("fit_steps takes one steps-to-target per batch size (pick the best LR first)")
    if n < 3:
        return None, f"the fit needs steps to the target at 3 or more batch sizes; {n} reached it"
    if np.any(s <= 0) or np.any(b <= 0):
        raise ValueError("fit_steps needs positive batch sizes and steps")
    # Each row divided by its S: least squares on (S - a - b/B) / S, the relative residual.
    a_mat, y = np.column_stack([1 / s, 1 / (b * s)]), np.ones_like(s)
    beta, *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    a, slope = beta
    if a <= 0:
        return None, (f"the fit gives S_min = {a:.3g} <= 0: every batch size measured is in the perfect-scaling "
                      f"regime; add larger batches")
    if slope <= 0:
        return None, (f"the fit gives E_min = {slope:.3g} <= 0: steps do not fall with the batch; add smaller "
                      f"batches")
    resid = y - a_mat @ beta
    variance = float(resid @ resid) / (n - 2) if n > 2 else 0.0
    cov = variance * np.linalg.inv(a_mat.T @ a_mat)
    b_crit = slope / a
    # Delta method: B = b/a, dB/da = -b/a^2, dB/db = 1/a.
    grad = np.array([-slope / a**2, 1 / a])
    return Fit(float(a), float(math.sqrt(cov[0, 0])), float(slope), float(math.sqrt(cov[1, 1])), float(b_crit),
               float(math.sqrt(max(grad @ cov @ grad, 0.0))), n), ""


def regime_of(slope: float) -> str:
    """Shallue et al. (JMLR 2019): slope <= -0.8 "perfect scaling", >= -0.2 "maximal data parallelism", between
    them "diminishing returns"."""
    return ("perfect scaling" if slope <= PERFECT_SLOPE else
            "maximal data parallelism" if slope >= MAXIMAL_SLOPE else "diminishing returns")


def regimes(batches, steps, fit: Fit | None = None) -> list[str | None]:
    """The regime of each batch size from the local slope of log S against log B (see ``regime_of``).

    With a fit, the slope of the fitted curve at B, -B_crit / (B + B_crit): measured steps to the target are
    interpolated between validations and noisy, and neighbouring differences of noisy points can label a larger
    batch "perfect scaling" after a smaller one's "maximal data parallelism". Without one, the measured slope
    (central differences, one-sided at both ends). None for a lone point without a fit."""
    if fit is not None:
        return [regime_of(-fit.b_crit / (float(b) + fit.b_crit)) for b in batches]
    order = np.argsort(batches)
    lb, ls = np.log(np.asarray(batches, float)[order]), np.log(np.asarray(steps, float)[order])
    out: list[str | None] = [None] * len(lb)
    if len(lb) < 2:
        return out
    for i in range(len(lb)):
        lo, hi = max(i - 1, 0), min(i + 1, len(lb) - 1)
        out[order[i]] = regime_of((ls[hi] - ls[lo]) / (lb[hi] - lb[lo]))
    return out


def _processes(point: dict) -> int:
    return int(point.get("processes") or point.get("world_size") or 1)


def common_processes(points: list[dict]) -> int:
    """The most common processes value among the points (ties: the smaller), the study's comparison set."""
    counts = Counter(_processes(p) for p in points)
    return min(counts, key=lambda k: (-counts[k], k)) if counts else 1


def best_per_batch(points: list[dict]) -> dict[int, dict]:
    """Global batch size -> its best point: the fewest steps to the target among the points that reached it
    (Shallue et al.: the LR is re-tuned per batch size, so each batch size is represented by its best LR)."""
    best: dict[int, dict] = {}
    for p in points:
        if p.get("reached") and p.get("global_size") and _num(p.get("samples_to_target")):
            b = int(p["global_size"])
            if b not in best or p["steps_to_target"] < best[b]["steps_to_target"]:
                best[b] = p
    return dict(sorted(best.items()))


def noise_at_target(point: dict) -> float | None:
    """The point's noise scale interpolated (in samples) where it reached the target; None when it was not
    measured yet there (the estimate is null for the first steps), the last value when it stopped before."""
    series = point.get("noise_series") or []
    reached_at = point.get("samples_to_target")
    if not point.get("reached") or not series or not _num(reached_at) or reached_at < series[0][0]:
        return None
    xs, ys = zip(*series, strict=True)
    return float(np.interp(reached_at, xs, ys))


def recommend(points: list[dict], target: float) -> dict:
    """The study's answer from point figures (each may carry ``processes``, its sweep value).

    Only the points run with the most common ``processes`` value (normally 1) are compared, so that step times
    are measured on the same hardware; the others serve the throughput plots. Per batch size the best LR is the
    point with the fewest steps to the target. ``fastest_batch``: least steps_to_target x step_time_s.
    ``fewest_samples_batch``: least samples to the target. ``noise_scale.at_target``: the median over points
    that reached the target of the noise scale where each reached it (the value to compare with B_crit, which
    is fitted at the target); ``noise_scale.final``: the median of the points' last measured values."""
    procs = common_processes(points)
    compared = [p for p in points if _processes(p) == procs]
    best = best_per_batch(compared)
    batches = list(best)
    steps = [best[b]["steps_to_target"] for b in batches]
    fit, why = fit_steps(batches, steps)
    labels = regimes(batches, steps, fit)
    min_steps = min(steps, default=None)
    min_samples = min((best[b]["samples_to_target"] for b in batches), default=None)
    evidence = []
    for b, regime in zip(batches, labels, strict=True):
        p = best[b]
        time_s = p["steps_to_target"] * p["step_time_s"] if _num(p.get("step_time_s")) else None
        evidence.append({
            "global_size": b, "lr": p.get("peak_lr"), "steps": p["steps_to_target"],
            "samples": p["samples_to_target"], "time_s": time_s, "step_time_s": p.get("step_time_s"),
            "steps_rel": p["steps_to_target"] / min_steps, "samples_rel": p["samples_to_target"] / min_samples,
            "regime": regime, "run_dir": p.get("run_dir"),
        })
    timed = [row for row in evidence if row["time_s"] is not None]
    at_target = [v for v in (noise_at_target(p) for p in compared) if v is not None]
    finals = [p["noise_scale"] for p in compared if _num(p.get("noise_scale"))]

    return {
        "target": target,
        "processes": procs,
        "fastest_batch": min(timed, key=lambda r: r["time_s"])["global_size"] if timed else None,
        "fewest_samples_batch": min(evidence, key=lambda r: r["samples"])["global_size"] if evidence else None,
        "b_crit": {"value": fit.b_crit, "stderr": fit.b_crit_err} if fit else None,
        "s_min": {"value": fit.s_min, "stderr": fit.s_min_err} if fit else None,
        "e_min": {"value": fit.e_min, "stderr": fit.e_min_err} if fit else None,
        "fit_points": len(batches),
        "fit_problem": why or None,
        "noise_scale": {"at_target": float(np.median(at_target)) if at_target else None,
                        "final": float(np.median(finals)) if finals else None, "points": len(at_target)},
        "evidence": evidence,
    }


def predict_from_run(run_dir: str | Path) -> dict:
    """Predict B_crit from one ordinary run's logged noise scale B_simple (McCandlish et al.: B_crit ~ B_noise)
    and suggest a sweep around it. The prediction is the median of the last quarter of the logged values: the
    noise scale grows as the loss falls, so the recent value is the one that matters near a target. The grid
    is not capped by the data set's size: a run's files do not record the size of its training split."""
    run_dir = Path(run_dir)
    try:
        records = read_metrics(run_dir / "metrics.jsonl")
    except PlotError as exc:
        raise ConfigError(str(exc)) from None
    series = [(r["samples"], r["noise_scale"]) for r in records
              if "loss" in r and _num(r.get("noise_scale")) and _num(r.get("samples"))]
    recent = [v for _, v in series[-max(1, len(series) // 4):]]
    if not series or np.median(recent) <= 0:
        why = (read_summary(run_dir) or {}).get("noise_scale_unavailable") or (
            "no noise_scale in its metrics.jsonl" if not series else "the recent values are not positive")
        measured = any((r.get("accumulation") or 1) > 1 or (r.get("world_size") or 1) > 1 for r in records)
        need = ("run it longer: the estimate stays null until its smoothed terms are positive" if measured else
                "it needs more than one micro-batch per step (batch.micro_size below batch.global_size / processes, "
                "or more than one process) and tracking.noise_scale=true")
        raise ConfigError(f"{run_dir}: the run logged no usable gradient noise scale ({why}); {need}")
    b_noise = float(np.median(recent))
    figures = point_figures(run_dir, -math.inf)
    low = max(1, 2 ** round(math.log2(b_noise)) // 8)
    lr = figures["peak_lr"]
    return {
        "run_dir": str(run_dir), "b_noise": b_noise, "recent_values": len(recent), "values": len(series),
        "first": {"samples": series[0][0], "noise_scale": series[0][1]},
        "last": {"samples": series[-1][0], "noise_scale": series[-1][1]},
        "val_loss": figures["final_val_loss"], "global_size": figures["global_size"], "peak_lr": lr,
        # 7 powers of two spanning 64x, centred on B_noise unless the low end reaches 1.
        "grid": {"batch.global_size": [low * 2**k for k in range(7)],
                 "optim.lr": [float(f"{lr * f:.2g}") for f in (1 / 3, 1, 3)] if lr else [],
                 "processes": [int(figures["world_size"] or 1)]},
    }


def format_prediction(d: dict) -> str:
    """The prediction as a short explanation and a sweep-file ``grid:`` snippet."""
    first, last = d["first"], d["last"]
    loss = f", last validation loss {d['val_loss']:.4g}" if _num(d.get("val_loss")) else ""
    lines = [
        f"Predicted critical batch B_crit ~ B_noise = {d['b_noise']:.4g} samples (McCandlish et al. 2018)",
        f"  from {d['run_dir']}: the median of the last {d['recent_values']} of its {d['values']} noise-scale "
        f"values (global batch "
        f"{d['global_size']}, peak LR {d['peak_lr']:g}{loss}).",
        f"  Over the run it went from {first['noise_scale']:.4g} at {first['samples']:,.0f} samples to "
        f"{last['noise_scale']:.4g} at {last['samples']:,.0f}; it grows as the loss falls, so a lower target "
        f"has a larger B_crit.",
        "Below B_crit doubling the batch nearly halves the steps; above it, the extra samples buy few steps.",
        "A sweep that checks it: 7 powers of two spanning 64x around B_noise, and the LR at 1/3, 1 and 3 times the",
        f"run's (or drop optim.lr and set optim.lr_scaling: sqrt with optim.reference_batch: {d['global_size']}).",
        "Paste into the sweep file:",
        "",
        "grid:",
    ]
    for key, values in d["grid"].items():
        if values:
            lines.append(f"  {key}: [{', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}]")
    return "\n".join(lines)
