"""A run's curves as PNG files, from its ``metrics.jsonl``: no W&B account, no network, no notebook.

``toolkit plot RUN_DIR`` writes ``RUN_DIR/plots/``:

- ``loss.png``: train loss (per log step) and validation loss against samples seen;
- ``lr.png``: the learning rate against samples (the schedule counts samples, not steps);
- ``throughput.png``: tokens/s against the optimizer step;
- ``noise_scale.png``: the gradient noise scale B_simple (in samples) against samples, next to the global
  batch; only when the run measured it (it needs more than one micro-batch per step).

``plot_run`` is the library entry (the batch-size study draws its runs with it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path


class PlotError(ValueError):
    """A run directory that cannot be plotted; the message is one line naming the file."""


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A torn last line (the run was killed while writing it) is
    skipped; a bad line anywhere else raises PlotError naming it."""
    if not path.is_file():
        raise PlotError(f"no metrics file: {path} (a run writes it in its run.dir; is this a run directory?)")
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn by a kill
                break
            raise PlotError(f"{path}:{number} is not a JSON object; metrics.jsonl holds one per line") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise PlotError(f"no records in {path}: the run has not logged a step yet")
    return records


def _series(records: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of the records that hold both as numbers (NaN kept: the line shows a gap)."""
    xs, ys = [], []
    for r in records:
        if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float)):
            xs.append(r[x])
            ys.append(r[y])
    return xs, ys


def _figure(title: str, xlabel: str, ylabel: str):
    # A Figure of its own, not pyplot: no backend to choose, no window, no global state (savefig renders the
    # PNG with Agg), so the batch-size study can draw from a process that uses pyplot for something else.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _marker(n: int) -> str:
    return "o" if n <= 50 else ""  # dots show where the records are on a short run


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             say: Callable[[str], None] = print) -> list[Path]:
    """Draw the curves of the run in ``run_dir`` into ``out_dir`` (default ``run_dir/plots``) and return the
    paths written. A figure without data is skipped, with a line through ``say`` saying why. Raises
    PlotError for a missing or empty ``metrics.jsonl``."""
    from matplotlib.ticker import LogFormatter, MaxNLocator, StrMethodFormatter

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    name = run_dir.resolve().name
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written: list[Path] = []

    def save(fig, filename: str) -> None:
        path = out / filename
        fig.savefig(path)
        written.append(path)

    # Loss: both against samples, the x-axis on which runs of different batch sizes compare.
    xs, ys = _series(train, "samples", "loss")
    vx, vy = _series(val, "samples", "val_loss")
    if xs or vx:
        fig, ax = _figure(f"loss: {name}", "samples", "loss (nats per token)")
        if xs:
            ax.plot(xs, ys, marker=_marker(len(xs)), markersize=3, label="train loss (mean since the previous log)")
        if vx:
            ax.plot(vx, vy, marker="s", markersize=4, label="validation loss")
        ax.legend()
        save(fig, "loss.png")
    else:
        say(f"loss.png skipped: no loss or val_loss in {run_dir / 'metrics.jsonl'}")

    xs, ys = _series(train, "samples", "lr")
    if xs:
        fig, ax = _figure(f"learning rate: {name}", "samples", "learning rate")
        ax.plot(xs, ys, marker=_marker(len(xs)), markersize=3)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        save(fig, "lr.png")
    else:
        say("lr.png skipped: no train records with lr")

    xs, ys = _series(train, "step", "tokens_per_s")
    if xs:
        fig, ax = _figure(f"throughput: {name}", "optimizer step", "tokens/s (all processes)")
        ax.plot(xs, ys, marker=_marker(len(xs)), markersize=3)
        ax.set_ylim(0, 1.1 * max((y for y in ys if math.isfinite(y)), default=1.0) or 1.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        save(fig, "throughput.png")
    else:
        say("throughput.png skipped: no train records with tokens_per_s")

    xs, ys = _series(train, "samples", "noise_scale")
    if xs and any(math.isfinite(y) for y in ys):
        fig, ax = _figure(f"gradient noise scale B_simple: {name}", "samples", "B_simple (samples)")
        first = next(x for x, y in zip(xs, ys, strict=True) if math.isfinite(y))
        late = f"; none before {first:,} samples" if any(r.get("samples", 0) < first for r in train) else ""
        ax.plot(xs, ys, marker=_marker(len(xs)), markersize=3, label=f"noise scale (EMA estimate{late})")
        batches = sorted({r["global_size"] for r in train if isinstance(r.get("global_size"), int)})
        for i, batch in enumerate(batches):
            ax.axhline(batch, color="tab:red", linestyle="--", linewidth=1,
                       label="global batch" if i == 0 else None)
        if min(y for y in ys if math.isfinite(y)) > 0:
            ax.set_yscale("log")  # it grows by orders of magnitude as the loss falls
            ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))  # 10 and 0.1, not 10^1 and 10^-1
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))  # labels thinned as by default
        else:  # a negative estimate: too few steps to tell the noise from the signal
            ax.axhline(0, color="grey", linewidth=0.8)
        ax.legend()
        save(fig, "noise_scale.png")
    elif any((r.get("accumulation") or 1) > 1 or (r.get("world_size") or 1) > 1 for r in train):
        say(f"noise_scale.png skipped: no estimate yet in {len(train)} log records (noise_scale stays null "
            f"until both of its smoothed estimates are positive; a longer run gets there)")
    else:
        say("noise_scale.png skipped: the run did not measure the noise scale (it needs more than one "
            "micro-batch per step: batch.micro_size below global_size / processes, or several processes; "
            "and tracking.noise_scale=true)")
    return written
