"""``write_report`` on a synthetic sweep directory: sweep.json and point run directories written by the test from
S(B) = S_min (1 + B_crit / B), so the report's numbers have a known answer. No training: a few seconds."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_study import B_CRIT, BATCHES, noisy_steps, write_run

from toolkit.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGET = 2.0
PLOTS = ["loss_vs_samples.png", "steps_to_target.png", "samples_to_target.png", "throughput_vs_processes.png",
         "micro_batch.png", "noise_scale.png"]


def step_time(batch: int, processes: int = 1) -> float:
    """Seconds per step: a fixed cost and a per-sample cost (shared by the processes, at 90% efficiency)."""
    return 0.05 + 0.002 * batch / (0.9 * processes if processes > 1 else 1)


def make_sweep(root: Path) -> tuple[Path, list[dict]]:
    """7 batch sizes x 2 LRs (the larger LR needs 40% more steps), 2 processes at two batch sizes, a smaller
    micro-batch at one, an unfinished point and a point that never started."""
    root.mkdir(parents=True)
    steps = dict(zip(BATCHES, noisy_steps(seed=3), strict=True))
    specs = [(b, lr, 1, None) for b in BATCHES for lr in (1e-3, 3e-3)]
    specs += [(64, 1e-3, 2, None), (128, 1e-3, 2, None), (64, 1e-3, 1, 4)]
    points = []
    for b, lr, procs, micro in specs:
        name = f"b{b:04d}-lr{lr:.0e}-p{procs}" + (f"-m{micro}" if micro else "")
        values = {"batch.global_size": b, "optim.lr": lr, "processes": procs}
        if micro:
            values["batch.micro_size"] = micro
        write_run(root / "points" / name, b, steps[b] * (1.4 if lr == 3e-3 else 1.0), TARGET, lr=lr,
                  step_time_s=step_time(b, procs) * (1.3 if micro else 1.0), processes=procs, micro=micro,
                  memory_gib=0.2 + b / 1000 / (2 if micro else 1))
        points.append({"name": name, "run_dir": f"points/{name}", "values": values, "overrides": []})
    write_run(root / "points" / "b1024-unfinished", 1024, 300.0, TARGET, lr=1e-3, finished=False)
    points.append({"name": "b1024-unfinished", "run_dir": "points/b1024-unfinished",
                   "values": {"batch.global_size": 1024, "optim.lr": 1e-3, "processes": 1}, "overrides": []})
    points.append({"name": "b2048-never", "run_dir": "points/b2048-never",
                   "values": {"batch.global_size": 2048, "optim.lr": 1e-3, "processes": 1}, "overrides": []})
    (root / "sweep.json").write_text(json.dumps({
        "name": "synthetic", "sweep_file": "synthetic.yaml", "base_config": "/configs/tiny.yaml",
        "target": {"val_loss": TARGET, "margin": 0.02}, "budget": {"samples": 100000},
        "grid_keys": ["batch.global_size", "optim.lr", "processes", "batch.micro_size"], "points": points}))
    return root, points


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, list[dict], list[Path], list[str]]:
    root, points = make_sweep(tmp_path_factory.mktemp("report") / "sweep")
    said: list[str] = []
    written = write_report(root, say=said.append, wandb=False)
    return root, points, written, said


def test_paths_are_returned_and_said(report):
    root, _, written, said = report
    assert {p.name for p in written} == {*PLOTS, "summary.csv", "recommendation.json", "report.md"}
    assert all(p.is_file() for p in written)
    assert [str(p) for p in written] == said[:len(written)]


def test_summary_csv_has_every_summary_json_figure(report):
    root, points, _, _ = report
    with open(root / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_dir"] for r in rows] == [p["run_dir"] for p in points]
    checked = 0
    for row, point in zip(rows, points, strict=True):
        for key, value in point["values"].items():
            assert float(row[key]) == value
        path = root / point["run_dir"] / "summary.json"
        if not path.exists():
            assert row["steps"] == "" and row["status"] in ("unfinished", "not started")
            continue
        summary = json.loads(path.read_text())
        flat = {**{k: v for k, v in summary.items() if not isinstance(v, dict)},
                **{f"memory.{k}": v for k, v in summary["memory"].items()}}
        for key, value in flat.items():
            cell = row[key]
            if value is None:
                assert cell == "", key
            elif isinstance(value, bool) or isinstance(value, str):
                assert cell == str(value), key
            else:
                assert float(cell) == value, f"{point['name']}: {key}"
            checked += 1
        assert row["reached"] == "True" and float(row["steps_to_target"]) > 0
        assert row["regime"] in ("perfect scaling", "diminishing returns", "maximal data parallelism")
    assert checked > 300
    by_name = {p["name"]: r for p, r in zip(points, rows, strict=True)}
    # 2 processes: tokens/s per device over the 1-process tokens/s at the same batch, LR and micro-batch.
    eff = float(by_name["b0064-lr1e-03-p2"]["scaling_efficiency"])
    assert eff == pytest.approx(step_time(64) / step_time(64, 2) / 2)
    assert float(by_name["b0064-lr1e-03-p1"]["scaling_efficiency"]) == 1.0
    assert by_name["b0064-lr1e-03-p1-m4"]["scaling_efficiency"] == "1.0"  # its own 1-process baseline
    assert by_name["b1024-unfinished"]["status"] == "unfinished"
    assert by_name["b2048-never"]["status"] == "not started"


def test_recommendation_json(report):
    root, _, _, _ = report
    rec = json.loads((root / "recommendation.json").read_text())
    assert {"fastest_batch", "fewest_samples_batch", "b_crit", "noise_scale", "target", "s_min", "e_min",
            "evidence"} <= set(rec)
    assert rec["target"] == TARGET and rec["processes"] == 1
    assert rec["b_crit"]["value"] == pytest.approx(B_CRIT, rel=0.10)
    assert 0 < rec["b_crit"]["stderr"] < 0.5 * B_CRIT
    times = {r["global_size"]: r["time_s"] for r in rec["evidence"]}
    samples = {r["global_size"]: r["samples"] for r in rec["evidence"]}
    assert rec["fastest_batch"] == min(times, key=times.get) != rec["fewest_samples_batch"]
    assert rec["fewest_samples_batch"] == min(samples, key=samples.get)
    assert [r["global_size"] for r in rec["evidence"]] == BATCHES
    assert all(r["lr"] == 1e-3 for r in rec["evidence"])  # the better LR of each pair
    # the median over the 15 1-process points that reached the target (the 2-process ones are not compared)
    assert rec["noise_scale"]["points"] == 2 * len(BATCHES) + 1 and rec["noise_scale"]["at_target"] > 0


def check_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05, f"{path} is blank"


def test_every_plot_is_a_png(report):
    root, _, _, _ = report
    for name in PLOTS:
        check_png(root / "plots" / name)


def test_report_md_says_the_recommendation_and_lists_every_point(report):
    root, points, _, _ = report
    rec = json.loads((root / "recommendation.json").read_text())
    text = (root / "report.md").read_text()
    assert f"Fastest to the target on this hardware: global batch {rec['fastest_batch']}" in text
    assert f"Fewest samples to the target: global batch {rec['fewest_samples_batch']}" in text
    assert "Critical batch B_crit = " in text and "noise scale" in text
    for point in points:
        assert f"[{point['name']}]({point['run_dir']})" in text
    assert "| unfinished" in text and "| not started" in text
    for name in PLOTS:
        assert f"(plots/{name})" in text
    assert "How to read this" in text and "(S/S_min - 1)(E/E_min - 1) = 1" in text


def test_partial_sweep_skips_plots_and_does_not_crash(tmp_path):
    """Two points, one unfinished and one never started: every file is still written, plots skipped."""
    root = tmp_path / "sweep"
    write_run(root / "points" / "a", 32, 100.0, TARGET, finished=False, noise=False)
    (root / "sweep.json").write_text(json.dumps({
        "name": "partial", "target": {"val_loss": TARGET, "margin": 0.0}, "grid_keys": ["batch.global_size"],
        "points": [{"name": "a", "run_dir": "points/a", "values": {"batch.global_size": 32}},
                   {"name": "b", "run_dir": "points/b", "values": {"batch.global_size": 64}}]}))
    said: list[str] = []
    written = write_report(root, say=said.append, wandb=False)
    assert {p.name for p in written} == {"loss_vs_samples.png", "summary.csv", "recommendation.json", "report.md"}
    rec = json.loads((root / "recommendation.json").read_text())
    assert rec["fastest_batch"] is None and rec["b_crit"] is None
    assert "steps_to_target.png skipped: no point reached the target" in said
    assert "samples_to_target.png skipped: no point reached the target" in said
    text = (root / "report.md").read_text()
    assert "No point reached the target yet" in text and "noise_scale.png skipped" in text


def test_a_plot_that_fails_is_skipped_not_fatal(tmp_path, monkeypatch):
    from toolkit import report_plots

    root, _ = make_sweep(tmp_path / "sweep")

    def broken(data):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(report_plots.PLOTS, "micro_batch.png", broken)
    (root / "plots").mkdir(exist_ok=True)
    (root / "plots" / "micro_batch.png").write_bytes(b"an earlier report's image")
    said: list[str] = []
    written = write_report(root, say=said.append, wandb=False)
    assert "micro_batch.png skipped: drawing it failed (ZeroDivisionError: a bug)" in said
    assert not (root / "plots" / "micro_batch.png").exists()  # no stale image next to the report
    assert len([p for p in written if p.suffix == ".png"]) == len(PLOTS) - 1
    assert "micro_batch.png skipped: drawing it failed" in (root / "report.md").read_text()


def test_wandb_summary_run_offline(report, tmp_path, monkeypatch):
    import wandb

    root = tmp_path / "sweep"
    shutil.copytree(report[0], root)
    for key in [k for k in os.environ if k.startswith("WANDB_") and k != "WANDB_SERVICE"]:
        monkeypatch.delenv(key)
    # An earlier in-process wandb.init (the tracking bench) may have left WANDB_SERVICE pointing at its service,
    # which the teardown below stops: it must not come back afterwards, or the next wandb.init of this process
    # connects to a dead socket. Gone for good here; then recorded as absent, so that the WANDB_SERVICE which
    # wandb.init sets now is removed afterwards too (a later test's child must not inherit it either).
    os.environ.pop("WANDB_SERVICE", None)
    monkeypatch.setenv("WANDB_SERVICE", "")
    monkeypatch.delenv("WANDB_SERVICE")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    said: list[str] = []
    try:
        write_report(root, say=said.append, wandb=True)
    finally:
        wandb.teardown()
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, (runs, said)
    assert any(f.suffix == ".wandb" and f.stat().st_size > 1000 for f in runs[0].iterdir())
    assert any(line.startswith("wandb: offline (WANDB_MODE=offline)") for line in said), said
    assert not any("warning" in line for line in said), said
    media = list(runs[0].rglob("*.png"))
    assert len(media) == len(PLOTS)
    assert np.all([p.stat().st_size > 10_000 for p in media])
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in runs[0].rglob("*.table.json")}
    with open(root / "summary.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert tables["summary"]["columns"] == header and len(tables["summary"]["data"]) == len(rows) == 19
    assert [r[0] for r in tables["evidence"]["data"]] == BATCHES
    # Read back from the run's .wandb file: one run in the sweep's group, the recommendation as its summary.
    from test_wandb import records

    logged = records(runs[0])
    run = next(r["run"] for r in logged if r["type"] == "run")
    assert run["run_group"] == json.loads((root / "sweep.json").read_text())["name"]
    assert run["job_type"] == "sweep-summary"
    summary = {}
    for r in logged:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    recommendation = json.loads((root / "recommendation.json").read_text())
    assert summary["fastest_batch"] == recommendation["fastest_batch"]
    assert summary["b_crit"]["value"] == pytest.approx(recommendation["b_crit"]["value"])
    # The report written again continues the same summary run (same id), rather than adding one to the group.
    try:
        write_report(root, say=said.append, wandb=True)
    finally:
        wandb.teardown()
    again = sorted((root / "wandb").glob("offline-run-*"))
    assert len(again) == 2 and {p.name.rsplit("-", 1)[1] for p in again} == {run["run_id"]}
