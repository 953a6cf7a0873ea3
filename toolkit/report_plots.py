"""The batch-size study's plots: the matplotlib figures of the report (toolkit/report.py) and the PLOTS table.

``PLOTS`` maps each ``plots/*.png`` file name to the function that draws it from the prepared ``PlotData``
(a Figure) or says why it cannot (a string); ``write_plots`` draws them all into the sweep's ``plots/``,
skipping, with one line each, a plot without data or one that fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit import study


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
        (out / name).unlink(missing_ok=True)  # an earlier report's image of a plot skipped now would mislead
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
