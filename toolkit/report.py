"""The batch-size study's report: ``toolkit report DIR`` (also written when a sweep ends).

From ``DIR/sweep.json`` and every point's run directory it writes ``summary.csv`` (one row per point),
``recommendation.json``, ``plots/*.png`` and ``report.md``, and logs the table, the recommendation and the
plots to one W&B run in the sweep's group (offline without an API key, like training). Unfinished and failed
points are listed as such; a plot without data is skipped with one line saying so.

This module reads the sweep (sweep.json and the points' run directories) and writes the tables, summary.csv,
recommendation.json, report.md and the W&B summary run; the plots are toolkit/report_plots.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from toolkit import study
from toolkit.config import ConfigError
from toolkit.report_plots import write_plots
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
    """The last line of a point's train.log that the point wrote (a failed point's error is usually there),
    with the exit code of its last launch when the sweep marked it (``=== exit N after S s``)."""
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    exits = [line for line in lines if line.startswith("=== exit ")]
    # (a Slurm job's own lines, srun's and slurm/train.sbatch's, are not the point's)
    written = [line for line in lines if not line.startswith(("=== ", "batchkit: ", "srun: ", "slurmstepd"))]
    code = exits[-1].split()[2] if exits else None
    last = written[-1][:200] if written else None
    if code not in (None, "0"):
        return f"exit {code}" + (f": {last}" if last else "")
    return last


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
            # One run id per sweep directory: a report written again (`toolkit report DIR`) continues the same
            # summary run rather than adding another to the group (offline, `wandb sync` merges its folders).
            run_id = hashlib.sha1(str(sweep_dir.resolve()).encode()).hexdigest()[:8]
            return wandb.init(project=project, group=sweep["name"], job_type="sweep-summary", id=run_id,
                              resume="allow", name=f"{sweep['name']}-summary", dir=str(sweep_dir), mode=mode,
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
