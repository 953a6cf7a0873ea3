"""The batch-size study's report: ``toolkit report DIR`` (also written when a sweep ends).

From ``DIR/sweep.json`` and every point's run directory it writes ``summary.csv`` (one row per point),
``recommendation.json``, ``plots/*.png`` and ``report.md``, and logs the table, the recommendation and the
plots to one W&B run in the sweep's group (offline without an API key, like training). Unfinished and failed
points are listed as such; a plot without data is skipped with one line saying so.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit import study
from toolkit.config import ConfigError
from toolkit.tracking import wandb_mode, write_json_atomic

STUDY_COLUMNS = ["steps_to_target", "samples_to_target", "tokens_to_target", "time_to_target_s", "reached",
                 "regime", "scaling_efficiency", "status"]
"""The columns summary.csv adds after the grid values and the summary.json figures."""


def load_sweep(sweep_dir: Path) -> dict:
    """DIR/sweep.json, checked for the keys the report reads."""
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"no sweep.json in {sweep_dir}: is this a sweep directory (toolkit sweep --out DIR)?")
    try:
        sweep = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    for key in ("name", "target", "points"):
        if key not in sweep:
            raise ConfigError(f"{path} has no '{key}' (sweep.json holds name, target, grid_keys and points)")
    if not isinstance((sweep["target"] or {}).get("val_loss"), (int, float)):
        raise ConfigError(f"{path}: target.val_loss must be a number (the validation loss to reach)")
    for i, point in enumerate(sweep["points"]):
        if not isinstance(point, dict) or "run_dir" not in point:
            raise ConfigError(f"{path}: points[{i}] has no run_dir")
    return sweep


def _last_line(path: Path) -> str | None:
    """The last non-empty line of a point's train.log (a failed point's error is usually there)."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else None


def collect(sweep: dict, sweep_dir: Path) -> list[dict]:
    """One entry per point: name, run_dir (relative), values, status, figures (None when unreadable), summary."""
    target = sweep["target"]["val_loss"]
    points = []
    for p in sweep["points"]:
        run_dir = sweep_dir / p["run_dir"]
        values = {"processes": 1, **(p.get("values") or {})}
        entry = {"name": p.get("name", Path(p["run_dir"]).name), "run_dir": p["run_dir"], "values": values,
                 "figures": None, "summary": None, "note": None}
        try:
            entry["summary"] = study.read_summary(run_dir)
            figures = study.point_figures(run_dir, target)
            figures.update(run_dir=p["run_dir"], name=entry["name"], processes=values["processes"])
            entry["figures"] = figures
            entry["status"] = "finished" if entry["summary"] is not None else "unfinished"
        except ConfigError as exc:
            started = (run_dir / "metrics.jsonl").exists()
            entry["status"], entry["note"] = ("unreadable", str(exc)) if started else ("not started", None)
        last = _last_line(run_dir / "train.log") if entry["status"] != "finished" else None
        entry["note"] = f"train.log ends: {last}" if last else entry["note"]
        points.append(entry)
    return points


def scaling_efficiency(points: list[dict]) -> list[float | None]:
    """Per point: tokens/s per device over the tokens/s of the 1-process point with the same grid values
    (processes aside) and micro-batch; None without such a baseline."""
    def key(p: dict):
        others = {k: v for k, v in p["values"].items() if k != "processes"}
        return json.dumps(others, sort_keys=True, default=str), p["figures"]["micro_size"]

    measured = [p for p in points if p["figures"] and p["figures"]["tokens_per_s"]]
    base = {key(p): p["figures"]["tokens_per_s"] for p in measured if p["values"]["processes"] == 1}
    return [p["figures"]["tokens_per_s_per_device"] / base[key(p)]
            if any(p is m for m in measured) and base.get(key(p)) else None for p in points]


def _flatten(summary: dict) -> dict:
    """summary.json's scalars, a nested dict of scalars as ``<key>.<sub>`` (memory.peak_gib...)."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def summary_table(points: list[dict], grid_keys: list[str], rec: dict) -> tuple[list[str], list[list]]:
    """summary.csv's header and rows: run_dir, the grid values, summary.json's figures, the study columns."""
    flats = [_flatten(p["summary"] or {}) for p in points]
    taken = {"run_dir", *grid_keys, *STUDY_COLUMNS}
    names: list[str] = []
    for flat in flats:
        names += [k for k in flat if k not in names]
    # A summary key named like a grid key or a study column is kept under summary.<key>.
    header_of = {k: f"summary.{k}" if k in taken else k for k in names}
    regime = {row["global_size"]: row["regime"] for row in rec["evidence"]}
    columns = ["run_dir", *grid_keys, *header_of.values(), *STUDY_COLUMNS]
    rows = []
    for p, flat, eff in zip(points, flats, scaling_efficiency(points), strict=True):
        f = p["figures"] or {}
        study_cells = [f.get("steps_to_target"), f.get("samples_to_target"), f.get("tokens_to_target"),
                       f.get("time_to_target_s"), f.get("reached"), regime.get(f.get("global_size")), eff, p["status"]]
        rows.append([p["run_dir"], *(p["values"].get(k) for k in grid_keys), *(flat.get(k) for k in names),
                     *study_cells])
    return columns, rows


# ---------------------------------------------------------------------------------------------------- plots


def _figure(title: str, xlabel: str, ylabel: str, ncols: int = 1):
    from matplotlib.figure import Figure  # no pyplot state, Agg on savefig (as toolkit/plot.py)

    fig = Figure(figsize=(7.5 if ncols == 1 else 11, 4.6), dpi=110, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig, axes


def _log2_axis(ax) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 64, not 2^6
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(LogLocator(base=2))


def _plain(x: float, _=None) -> str:
    return f"{x:,.0f}" if x >= 1 else f"{x:.2g}"


def _log_axis(axis, span: float) -> None:
    """A base-10 log axis labelled 20,000 rather than 2x10^4. Minor ticks are labelled too on a short axis
    (all under a decade, 2x and 5x under 2 decades), else a decade can have no label at all."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def minor(x: float, _=None) -> str:
        mantissa = x / 10 ** math.floor(math.log10(x) + 1e-9)
        return _plain(x) if span < 10 or (round(mantissa) in (2, 5) and abs(mantissa - round(mantissa)) < 1e-6) else ""

    axis.set_major_formatter(FuncFormatter(_plain))
    axis.set_minor_formatter(FuncFormatter(minor) if span < 100 else NullFormatter())


def _colours(batches: list[int]) -> dict[int, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {b: cmap(0.9 * i / max(1, len(batches) - 1)) for i, b in enumerate(sorted(batches))}


def _shown_per_batch(compared: list[dict]) -> dict[int, dict]:
    """Batch size -> the point drawn for it: the best LR that reached the target, else the lowest loss."""
    best, fallback = study.best_per_batch(compared), {}
    for f in compared:
        b = f.get("global_size")
        if b and b not in best and f["best_val_loss"] is not None:
            if b not in fallback or f["best_val_loss"] < fallback[b]["best_val_loss"]:
                fallback[b] = f
    return dict(sorted({**fallback, **best}.items()))


def _mark_batches(ax, rec: dict) -> list[float]:
    """B_crit (with its standard error as a band) and the measured noise scale as vertical lines; returns
    their positions."""
    bc, noise = rec["b_crit"], rec["noise_scale"]["at_target"] or rec["noise_scale"]["final"]
    at = []
    if bc:
        ax.axvline(bc["value"], color="tab:red", linestyle="--",
                   label=f"B_crit (fit) = {bc['value']:.3g} ± {bc['stderr']:.2g}")
        ax.axvspan(max(bc["value"] - bc["stderr"], 1e-9), bc["value"] + bc["stderr"], color="tab:red", alpha=0.1)
        at.append(bc["value"])
    if noise and noise > 0:
        when = "at the target" if rec["noise_scale"]["at_target"] else "final"
        ax.axvline(noise, color="tab:purple", linestyle=":", label=f"noise scale ({when}) = {noise:.3g}")
        at.append(noise)
    return at


@dataclass
class PlotData:
    """What the plots draw, prepared once."""

    figures: list[dict]
    """Every point with figures (all processes values)."""
    compared: list[dict]
    """The points run with the study's processes value (the ones the recommendation compares)."""
    shown: dict[int, dict]
    """Batch size -> the point drawn for it (the best LR, else the lowest validation loss)."""
    best: dict[int, dict]
    """Batch size -> its best point among those that reached the target."""
    colour: dict[int, tuple]
    """Batch size -> its line colour."""
    rec: dict
    """The recommendation (target, b_crit, noise scale...)."""
    fit: study.Fit | None
    """The fit of steps to the target, None without one."""


def _loss_plot(d: PlotData):
    if not any(f["val_series"] for f in d.shown.values()):
        return "no point has a validation yet"
    fig, (ax,) = _figure("validation loss per batch size (best LR)", "training samples", "validation loss")
    for b, f in d.shown.items():
        xs, ys = zip(*f["val_series"], strict=True) if f["val_series"] else ([], [])
        ax.plot(xs, ys, marker="o", markersize=3, color=d.colour[b],
                label=f"B={b}, lr={f['peak_lr'] or math.nan:.2g}" + ("" if f["reached"] else " (not reached)"))
    ax.axhline(d.rec["target"], color="tab:red", linestyle="--", label=f"target {d.rec['target']:g}")
    xs = [x for f in d.shown.values() for x, _ in f["val_series"] if x > 0]
    if xs:
        ax.set_xscale("log")  # batch sizes 64x apart reach the target at samples up to decades apart
        _log_axis(ax.xaxis, max(xs) / min(xs))
    ax.legend(fontsize=8, ncols=2)
    return fig


def _steps_plot(d: PlotData, samples: bool = False):
    """Steps (or samples) to the target against the batch on log-log axes: the best LR per batch size, the
    other LRs in grey, the fit, perfect scaling through the smallest batch, B_crit and the noise scale."""
    if not d.best:
        return "no point reached the target"
    label = "samples to the target" if samples else "optimizer steps to the target"
    fig, (ax,) = _figure(f"{label} against the global batch", "global batch (samples)", label)
    key = "samples_to_target" if samples else "steps_to_target"
    others = [f for f in d.compared if f["reached"] and d.best.get(f["global_size"]) is not f]
    bs = np.array(list(d.best), dtype=float)
    ys = np.array([f[key] for f in d.best.values()])
    if others:
        ax.scatter([o["global_size"] for o in others], [o[key] for o in others], s=14, color="0.6",
                   label="other learning rates")
    ax.plot(bs, ys, "o", color="tab:blue", markersize=7, label="best LR per batch size")
    marks = [m for m in _mark_batches(ax, d.rec) if m > 0]
    lo, hi = min([bs.min(), *marks]) / 1.5, max([bs.max(), *marks]) * 1.5
    grid = np.geomspace(lo, hi, 200)
    shown = [*ys, *(o[key] for o in others)]
    if d.fit:
        curve = d.fit.samples(grid) if samples else d.fit.steps(grid)
        what = "E_min (1 + B/B_crit)" if samples else "S_min (1 + B_crit/B)"
        ax.plot(grid, curve, color="tab:blue", label=f"fit: {what}")
        shown += list(curve[(grid >= bs.min()) & (grid <= bs.max())])
    perfect = np.full_like(grid, ys[0]) if samples else ys[0] * bs[0] / grid
    ax.plot(grid, perfect, color="0.3", linestyle="-.", linewidth=1,
            label="perfect scaling (" + ("flat" if samples else "slope -1") + f", through B={bs[0]:g})")
    _log2_axis(ax)
    ax.set_xlim(lo, hi)
    ax.set_yscale("log")
    ax.set_ylim(min(shown) / 1.3, max(shown) * 1.3)  # the data, not the whole perfect-scaling line
    _log_axis(ax.yaxis, max(shown) / min(shown))
    ax.legend(fontsize=8)
    return fig


def _processes_plot(d: PlotData):
    # One line per (global, micro) measured with more than one processes value; medians over the LRs.
    groups: dict[tuple, dict[int, list[float]]] = {}
    for f in d.figures:
        if f["tokens_per_s"]:
            by_p = groups.setdefault((f["global_size"], f["micro_size"]), {})
            by_p.setdefault(f["processes"], []).append(f["tokens_per_s"])
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return "no configuration was measured with more than one processes value"
    fig, (ax,) = _figure("throughput against processes", "processes", "tokens/s (all processes)")
    for i, ((g, m), by_p) in enumerate(sorted(groups.items())):
        ps = sorted(by_p)
        tps = [float(np.median(by_p[p])) for p in ps]
        line, = ax.plot(ps, tps, "o-", label=f"global {g}, micro {m}")
        ax.plot(ps, [tps[0] * p / ps[0] for p in ps], linestyle="--", color=line.get_color(),
                label="ideal (linear), dashed" if i == 0 else None)
    ax.set_xticks(sorted({p for v in groups.values() for p in v}))
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def _micro_plot(d: PlotData):
    # Compared at the same global batch (tokens/s depends on it too); medians over the LRs.
    micro: dict[int, dict[int, list[dict]]] = {}
    for f in d.compared:
        if f["micro_size"] and f["tokens_per_s"]:
            micro.setdefault(f["global_size"], {}).setdefault(f["micro_size"], []).append(f)
    micro = {b: by_m for b, by_m in micro.items() if len(by_m) > 1}
    if not micro:
        return "no global batch was measured at more than one micro-batch size"
    fig, (ax1, ax2) = _figure(f"throughput and memory against the micro-batch ({d.rec['processes']} process(es))",
                              "micro-batch (samples per process)", "tokens/s (all processes)", ncols=2)
    for b, by_m in sorted(micro.items()):
        ms = sorted(by_m)
        ax1.plot(ms, [np.median([f["tokens_per_s"] for f in by_m[m]]) for m in ms], "o-", label=f"global {b}")
        mem = [(m, max(f["memory_peak_gib"] for f in by_m[m])) for m in ms
               if all(f["memory_peak_gib"] is not None for f in by_m[m])]
        if mem:
            ax2.plot(*zip(*mem, strict=True), "s-", label=f"global {b}")
    ax2.set_ylabel("peak memory (GiB)")
    for ax in (ax1, ax2):
        _log2_axis(ax)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return fig


def _noise_plot(d: PlotData):
    noisy = {b: f for b, f in d.shown.items() if f["noise_series"]}
    if not noisy:
        return ("no point measured the noise scale (it needs accumulation > 1 or more than one process, and "
                "tracking.noise_scale=true)")
    fig, (ax,) = _figure("gradient noise scale B_simple during training", "training samples", "noise scale (samples)")
    for b, f in noisy.items():
        ax.plot(*zip(*f["noise_series"], strict=True), color=d.colour[b], label=f"B={b}")
    if d.fit:
        ax.axhline(d.fit.b_crit, color="tab:red", linestyle="--", label=f"B_crit (fit) = {d.fit.b_crit:.3g}")
    xs = [x for f in noisy.values() for x, _ in f["noise_series"]]
    values = [v for f in noisy.values() for _, v in f["noise_series"]]
    if min(xs) > 0:
        ax.set_xscale("log")  # as the loss plot
        _log_axis(ax.xaxis, max(xs) / min(xs))
    if min(values) > 0:  # it grows by orders of magnitude as the loss falls
        ax.set_yscale("log")
        _log_axis(ax.yaxis, max(values) / min(values))
    ax.legend(fontsize=8, ncols=2)
    return fig


PLOTS = {
    "loss_vs_samples.png": _loss_plot,
    "steps_to_target.png": _steps_plot,
    "samples_to_target.png": lambda d: _steps_plot(d, samples=True),
    "throughput_vs_processes.png": _processes_plot,
    "micro_batch.png": _micro_plot,
    "noise_scale.png": _noise_plot,
}
"""File name -> the function that draws it (a Figure) or says why it cannot (a string)."""


def write_plots(points: list[dict], rec: dict, out: Path) -> tuple[list[Path], list[str]]:
    """The study's PNGs in ``out``; returns (paths written, one line per plot skipped). A plot that fails on
    unexpected data is skipped with its error: the other report files must still be written."""
    out.mkdir(parents=True, exist_ok=True)
    figures = [p["figures"] for p in points if p["figures"]]
    compared = [f for f in figures if f["processes"] == rec["processes"]]
    shown = _shown_per_batch(compared)
    fit = study.Fit(rec["s_min"]["value"], rec["s_min"]["stderr"], rec["e_min"]["value"], rec["e_min"]["stderr"],
                    rec["b_crit"]["value"], rec["b_crit"]["stderr"], rec["fit_points"]) if rec["b_crit"] else None
    data = PlotData(figures, compared, shown, study.best_per_batch(compared), _colours(list(shown)), rec, fit)
    written, skipped = [], []
    for name, draw in PLOTS.items():
        try:
            fig = draw(data)
            if isinstance(fig, str):
                skipped.append(f"{name} skipped: {fig}")
                continue
            fig.savefig(out / name)
            written.append(out / name)
        except Exception as exc:  # a bug in one plot must not lose the report
            skipped.append(f"{name} skipped: drawing it failed ({type(exc).__name__}: {exc})")
    return written, skipped



# ---------------------------------------------------------------------------------------------------- files


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, (bool, str)):
        return str(x)
    return f"{x:,.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}",
            *(f"| {' | '.join(_fmt(c) for c in row)} |" for row in rows)]


def markdown(sweep: dict, points: list[dict], rec: dict, efficiency: list, pngs: list[Path],
             skipped: list[str]) -> str:
    """report.md's text."""
    fit, noise = rec["b_crit"], rec["noise_scale"]
    counts = {s: sum(p["status"] == s for p in points) for s in ("finished", "unfinished", "unreadable", "not started")}
    budget = ", ".join(f"{_fmt(v)} {k}" for k, v in (sweep.get("budget") or {}).items()) or "—"
    lines = [f"# Batch-size study: {sweep['name']}", "",
             f"Target: validation loss <= **{rec['target']:g}**. Budget per point: {budget}. "
             f"Points: {len(points)} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}).", "",
             "## Recommendation", ""]
    fastest = next((r for r in rec["evidence"] if r["global_size"] == rec["fastest_batch"]), None)
    fewest = next((r for r in rec["evidence"] if r["global_size"] == rec["fewest_samples_batch"]), None)
    if fastest:
        lines.append(f"- **Fastest to the target on this hardware: global batch {fastest['global_size']}** "
                     f"({_fmt(fastest['steps'])} steps x {_fmt(fastest['step_time_s'], 3)} s/step = "
                     f"{_fmt(fastest['time_s'], 3)} s; points run with {rec['processes']} process(es) compared).")
    if fewest:
        lines.append(f"- **Fewest samples to the target: global batch {fewest['global_size']}** "
                     f"({_fmt(fewest['samples'])} samples).")
    if fit:
        lines.append(f"- **Critical batch B_crit = {_fmt(fit['value'])} ± {_fmt(fit['stderr'], 2)} samples** "
                     f"(fit over {rec['fit_points']} batch sizes); S_min = {_fmt(rec['s_min']['value'])} ± "
                     f"{_fmt(rec['s_min']['stderr'], 2)} steps, E_min = {_fmt(rec['e_min']['value'])} ± "
                     f"{_fmt(rec['e_min']['stderr'], 2)} samples.")
    else:
        lines.append(f"- No fit: {rec['fit_problem']}.")
    lines.append(f"- Measured gradient noise scale B_noise: {_fmt(noise['at_target'])} samples where the points "
                 f"reached the target (median over {noise['points']}), {_fmt(noise['final'])} at their last log "
                 f"(median); McCandlish et al. predict B_crit ≈ B_noise.")
    if not rec["evidence"]:
        lines.append("- No point reached the target yet: no recommendation.")
    lines += ["", "## Evidence: the best learning rate per batch size", ""]
    lines += _table(["global batch", "best LR", "steps", "samples", "time (s)", "steps / min", "samples / min",
                     "regime"],
                    [[r["global_size"], r["lr"], r["steps"], r["samples"], r["time_s"], r["steps_rel"],
                      r["samples_rel"], r["regime"]] for r in rec["evidence"]])
    lines += ["", "## Points", ""]
    rows = []
    for p, eff in zip(points, efficiency, strict=True):
        f = p["figures"] or {}
        status = p["status"] + (f": {p['note']}" if p["status"] != "finished" and p["note"] else "")
        rows.append([f"[{p['name']}]({p['run_dir']})", status.replace("|", "/"),
                     f.get("global_size") or p["values"].get("batch.global_size"),
                     f.get("peak_lr"), p["values"].get("processes"), f.get("steps_to_target"),
                     f.get("samples_to_target"), f.get("final_val_loss"), f.get("tokens_per_s"), eff])
    lines += _table(["point", "status", "global batch", "peak LR", "processes", "steps to target",
                     "samples to target", "final val loss", "tokens/s", "scaling efficiency"], rows)
    lines += ["", "## Plots", ""]
    lines += [f"![{png.stem}](plots/{png.name})" for png in pngs] + [""] + [f"- {s}" for s in skipped]
    lines += ["", "## How to read this", "",
              "Steps S and samples E to reach the same loss trade off as (S/S_min - 1)(E/E_min - 1) = 1, i.e. "
              "S = S_min (1 + B_crit/B) and E = E_min (1 + B/B_crit) (McCandlish et al. 2018): at B = B_crit a run "
              "takes twice the minimum steps and twice the minimum samples. Below B_crit, doubling the batch "
              "nearly halves the steps (perfect scaling, local slope of log S against log B <= -0.8); above it, "
              "extra samples buy fewer and fewer steps (diminishing returns) until steps stop falling (maximal "
              "data parallelism, slope >= -0.2; Shallue et al. 2019). The learning rate is re-tuned per batch "
              "size, so each batch is represented by its best LR. The fastest batch also depends on the measured "
              "step time: a larger batch is worth it while its steps take less than proportionally longer, e.g. "
              "on more devices. The gradient noise scale is a cheap estimate of B_crit and grows as the loss "
              "falls.", ""]
    return "\n".join(lines)


def log_wandb(sweep: dict, sweep_dir: Path, columns: list[str], rows: list[list], rec: dict, pngs: list[Path],
              project: str, say: Callable[[str], None]) -> None:
    """One W&B run in the sweep's group with the table, the recommendation and the plots; offline without an
    API key (as training), nothing under WANDB_MODE=disabled; a failure is one warning line."""
    mode, why = wandb_mode()
    if mode == "disabled":
        say(f"wandb: {why}; no summary run")
        return
    try:
        import wandb

        os.environ.setdefault("WANDB_CACHE_DIR", str(sweep_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(sweep_dir / "wandb" / "data"))

        def init(mode: str):
            return wandb.init(project=project, group=sweep["name"], job_type="sweep-summary",
                              name=f"{sweep['name']}-summary", dir=str(sweep_dir), mode=mode,
                              config={k: sweep.get(k) for k in ("name", "target", "budget", "grid_keys")},
                              settings=wandb.Settings(console="off", silent=True, init_timeout=30))

        try:
            run = init(mode)
        except Exception:
            if mode != "online":
                raise
            wandb.teardown()  # as in tracking.py: the failed online start holds the service
            mode, why = "offline", "online start failed"
            run = init(mode)
        try:
            cells = [[c if c is None or isinstance(c, (int, float, bool)) else str(c) for c in row] for row in rows]
            data = {"summary": wandb.Table(columns=columns, data=cells, allow_mixed_types=True)}
            if rec["evidence"]:
                data["evidence"] = wandb.Table(columns=list(rec["evidence"][0]), allow_mixed_types=True,
                                               data=[list(row.values()) for row in rec["evidence"]])
            data.update({f"plots/{png.stem}": wandb.Image(str(png)) for png in pngs})
            run.log(data)
            run.summary.update({k: v for k, v in rec.items() if k != "evidence"})
        finally:
            run.finish()
        where = Path(run.dir).parent
        say(f"wandb: {mode} ({why}); summary run in {where}" + (f"; upload it with: wandb sync {where}"
                                                                 if mode == "offline" else ""))
    except Exception as exc:  # the report files are written; W&B is a copy of them
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        say(f"warning: wandb summary run failed ({first}); the report files are written")


def write_report(sweep_dir: Path, say: Callable[[str], None] = print, wandb: bool = True) -> list[Path]:
    """Write summary.csv, recommendation.json, plots/*.png and report.md in ``sweep_dir`` (and the W&B summary
    run); returns the paths written, each said in one line."""
    sweep_dir = Path(sweep_dir)
    sweep = load_sweep(sweep_dir)
    points = collect(sweep, sweep_dir)
    rec = study.recommend([p["figures"] for p in points if p["figures"]], sweep["target"]["val_loss"])
    # sweep.json's grid keys, then any other key a point's values hold (none when SWEEP wrote it).
    grid_keys = list(dict.fromkeys([*(sweep.get("grid_keys") or []), *(k for p in points for k in p["values"])]))
    pngs, skipped = write_plots(points, rec, sweep_dir / "plots")
    columns, rows = summary_table(points, grid_keys, rec)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    write_json_atomic(sweep_dir / "recommendation.json", rec)
    text = markdown(sweep, points, rec, scaling_efficiency(points), pngs, skipped)
    (sweep_dir / "report.md").write_text(text)
    written = [*pngs, sweep_dir / "summary.csv", sweep_dir / "recommendation.json", sweep_dir / "report.md"]
    for path in written:
        say(str(path))
    for line in skipped:
        say(line)
    if wandb:
        config = next((study.read_yaml(sweep_dir / p["run_dir"] / "config.yaml") for p in points
                       if (sweep_dir / p["run_dir"] / "config.yaml").is_file()), {})
        project = (config.get("tracking") or {}).get("project") or "batchkit"
        log_wandb(sweep, sweep_dir, columns, rows, rec, pngs, project, say)
    return written
