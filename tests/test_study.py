"""The batch-size study's analysis on synthetic data with known answers (no training: milliseconds).

Runs are generated from McCandlish et al.'s model S(B) = S_min (1 + B_crit / B): the fit must recover B_crit,
the regimes must follow the curve, and the recommendation must pick from measured step times.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from toolkit.config import ConfigError
from toolkit.study import (
    best_per_batch,
    fit_steps,
    format_prediction,
    noise_at_target,
    point_figures,
    predict_from_run,
    recommend,
    regimes,
    target_crossing,
)

S_MIN, B_CRIT = 200.0, 96.0
BATCHES = [8, 16, 32, 64, 128, 256, 512]  # 64x, B_crit/12 .. 5 B_crit
SEQ_LEN = 16


def steps_model(batch) -> np.ndarray:
    return S_MIN * (1 + B_CRIT / np.asarray(batch, dtype=float))


def noisy_steps(seed: int, batches=BATCHES, scatter: float = 0.05) -> np.ndarray:
    return steps_model(batches) * np.exp(np.random.default_rng(seed).normal(0, scatter, len(batches)))


# ------------------------------------------------------------------------------------------ synthetic runs


def write_run(run_dir: Path, batch: int, steps_to_target: float, target: float, *, lr: float = 3e-3,
              step_time_s: float = 0.1, processes: int = 1, micro: int | None = None, finished: bool = True,
              noise: bool = True, memory_gib: float = 0.5) -> dict:
    """A run directory as the trainer writes it: validation loss target * (steps_to_target / step) ** 0.5
    (so it crosses the target at steps_to_target), about 10 validations to the target, a stop one validation
    after it; train records with loss, throughput, train_time_s and a noise scale growing to B_CRIT at the
    target.
    Returns the summary (written only when ``finished``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    micro = micro or min(batch, 8)
    every = max(1, round(steps_to_target / 10))
    last = (math.floor(steps_to_target / every) + 1) * every
    world = processes
    tps = batch * SEQ_LEN / step_time_s
    records = []
    for step in range(1, last + 1):
        samples = step * batch
        if step % max(1, every // 2) == 0 or step == last:
            records.append({
                "step": step, "samples": samples, "tokens": samples * SEQ_LEN, "loss": 1.1 * target,
                "lr": lr, "grad_norm": 1.0, "tokens_per_s": tps, "tokens_per_s_per_device": tps / world,
                "step_time_s": step_time_s, "memory_peak_gib": memory_gib, "global_size": batch,
                "micro_size": micro, "accumulation": batch // (micro * world), "world_size": world,
                "noise_scale": B_CRIT * (0.25 + 0.75 * step / steps_to_target) if noise and step > 2 else None,
                "critical_batch_tokens": None, "train_time_s": step * step_time_s})
        if step % every == 0:
            records.append({"step": step, "samples": samples, "tokens": samples * SEQ_LEN,
                            "val_loss": target * (steps_to_target / step) ** 0.5, "train_time_s": step * step_time_s})
    if not finished:  # killed halfway
        records = [r for r in records if r["step"] <= last // 2]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plan = {"global_size": batch, "micro_size": micro, "accumulation": batch // (micro * world), "world_size": world,
            "seq_len": SEQ_LEN, "tokens_per_step": batch * SEQ_LEN}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "optim": {"lr": lr, "lr_scaling": "none"}, "tracking": {"project": "batchkit-test"}, "plan": plan}))
    val = [r["val_loss"] for r in records if "val_loss" in r]
    noises = [r["noise_scale"] for r in records if r.get("noise_scale") is not None]
    summary = {
        "steps": last, "samples": last * batch, "tokens": last * batch * SEQ_LEN, "final_loss": 1.1 * target,
        "skipped_steps": 0, "val_loss": val[-1], "world_size": world, "micro_size": micro,
        "accumulation": plan["accumulation"], "global_size": batch, "tokens_per_s": tps,
        "train_time_s": last * step_time_s, "n_params": 1000, "model": {"n_layer": 2, "n_head": 2},
        "memory": {"mode": "DDP", "process_peak_gib": memory_gib, "predicted_gib": 0.1},
        "best_loss": 1.0 * target, "mfu": None, "memory_peak_gib": memory_gib,
        "noise_scale": noises[-1] if noises else None, "critical_batch_tokens": None,
        "noise_scale_unavailable": None if noise else "one micro-batch per step", "wandb_run_id": None,
        "stopped_at_target": True, "peak_lr": lr, "target_val_loss": target,
    }
    if finished:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------- the fit


def test_fit_recovers_b_crit_from_noisy_steps():
    fit, why = fit_steps(BATCHES, noisy_steps(seed=1))
    assert why == "" and fit.n_points == 7
    assert fit.b_crit == pytest.approx(B_CRIT, rel=0.10)
    assert fit.s_min == pytest.approx(S_MIN, rel=0.10)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=0.15)
    # The reported error is the right size: within 3 of it, and not absurdly large.
    assert abs(fit.b_crit - B_CRIT) < 3 * fit.b_crit_err < 0.5 * B_CRIT


def test_fit_is_unbiased_and_its_errors_are_calibrated():
    """Over 200 noise draws: the mean error is small and about 68% land within one standard error."""
    fits = [fit_steps(BATCHES, noisy_steps(seed))[0] for seed in range(200)]
    rel = np.array([f.b_crit / B_CRIT - 1 for f in fits])
    within = np.mean([abs(f.b_crit - B_CRIT) <= f.b_crit_err for f in fits])
    assert abs(rel.mean()) < 0.02
    assert np.mean(np.abs(rel) < 0.10) > 0.75
    assert 0.5 < within < 0.85


def test_fit_without_noise_is_exact():
    fit, _ = fit_steps(BATCHES, steps_model(BATCHES))
    assert fit.b_crit == pytest.approx(B_CRIT, rel=1e-12)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-12)
    assert fit.e_min == pytest.approx(S_MIN * B_CRIT, rel=1e-12)
    assert fit.b_crit_err < 1e-9
    assert fit.steps(B_CRIT) == pytest.approx(2 * S_MIN) and fit.samples(B_CRIT) == pytest.approx(2 * S_MIN * B_CRIT)


def test_fit_refuses_too_few_batch_sizes_and_a_curve_without_a_knee():
    fit, why = fit_steps([8, 16], steps_model([8, 16]))
    assert fit is None and "3 or more batch sizes" in why and "2 reached" in why
    fit, why = fit_steps([8, 16, 32], [800, 400, 200])  # pure perfect scaling: S_min = 0
    assert fit is None and "perfect-scaling" in why and "larger batches" in why


def test_regimes_follow_the_curve():
    batches = B_CRIT * 2.0 ** np.arange(-4, 4)  # B_crit/16 .. 8 B_crit
    labels = regimes(batches, steps_model(batches))
    assert labels[:2] == ["perfect scaling"] * 2
    assert labels[2:-1] == ["diminishing returns"] * 5
    assert labels[-1] == "maximal data parallelism"
    assert regimes(batches[::-1], steps_model(batches[::-1])) == labels[::-1]  # the order of the input is kept
    assert regimes([64], [10]) == [None]
    # With a fit, the fitted curve's slope -B_crit / (B + B_crit): smooth where noisy measurements are not.
    # B / B_crit = 1.1 x 2^k, off the thresholds: slopes -0.94 -0.88 | -0.78 -0.65 -0.48 -0.31 | -0.19 -0.10.
    shifted = 1.1 * batches
    fit, _ = fit_steps(shifted, steps_model(shifted))
    noisy = steps_model(shifted) * np.array([1, 1, 1.3, 1, 1, 1, 1, 1])  # a bump: measured, 0.55 B_crit is "perfect"
    assert regimes(shifted, noisy, fit) == ["perfect scaling"] * 2 + ["diminishing returns"] * 4 + [
        "maximal data parallelism"] * 2
    assert regimes(shifted, noisy) != regimes(shifted, noisy, fit)


# ------------------------------------------------------------------------------------------ target crossing


def test_target_crossing_interpolates_between_validations():
    records = [
        {"step": 10, "samples": 320, "tokens": 5120, "val_loss": 3.0, "train_time_s": 1.0},
        {"step": 5, "samples": 160, "tokens": 2560, "loss": 2.0},  # a train record: ignored
        {"step": 20, "samples": 640, "tokens": 10240, "val_loss": 9.0, "train_time_s": 2.0},  # replaced below
        {"step": 20, "samples": 640, "tokens": 10240, "val_loss": 2.5, "train_time_s": 2.0},
        {"step": 30, "samples": 960, "tokens": 15360, "val_loss": 1.5, "train_time_s": 4.0},
        {"step": 40, "samples": 1280, "tokens": 20480, "val_loss": 1.0, "train_time_s": 5.0},
    ]
    c = target_crossing(records, 2.2)  # 30% of the way from 2.5 (step 20) to 1.5 (step 30)
    assert c.interpolated
    assert (c.step, c.samples, c.tokens, c.train_time_s) == pytest.approx((23, 736, 11776, 2.6))
    c = target_crossing(records, 3.5)  # the first validation is already below
    assert (c.step, c.samples, c.interpolated) == (10, 320, False)
    assert target_crossing(records, 1.5).step == 30  # at the target counts
    assert target_crossing(records, 0.5) is None
    assert target_crossing([{"step": 1, "val_loss": float("nan")}], 1.0) is None


def test_point_figures_of_a_finished_and_an_unfinished_run(tmp_path):
    write_run(tmp_path / "done", 32, 50.0, 2.0, lr=1e-3, step_time_s=0.2)
    f = point_figures(tmp_path / "done", 2.0)
    assert f["finished"] and f["reached"] and f["interpolated"]
    assert f["steps_to_target"] == pytest.approx(50.0, rel=0.02)
    assert f["samples_to_target"] == pytest.approx(32 * f["steps_to_target"])
    assert f["time_to_target_s"] == pytest.approx(0.2 * f["steps_to_target"])
    assert f["step_time_s"] == pytest.approx(0.2)
    assert (f["global_size"], f["micro_size"], f["world_size"], f["peak_lr"]) == (32, 8, 1, 1e-3)
    assert f["tokens_per_s"] == pytest.approx(32 * SEQ_LEN / 0.2)
    assert f["best_val_loss"] < 2.0 and f["final_val_loss"] == f["best_val_loss"]
    assert f["noise_series"][-1][1] == f["noise_scale"]
    write_run(tmp_path / "half", 32, 50.0, 2.0, lr=1e-3, step_time_s=0.2, finished=False)
    f = point_figures(tmp_path / "half", 2.0)
    assert not f["finished"] and not f["reached"] and f["steps_to_target"] is None
    assert f["step_time_s"] == pytest.approx(0.2) and f["peak_lr"] == 1e-3 and f["global_size"] == 32
    with pytest.raises(ConfigError, match="no metrics file"):
        point_figures(tmp_path / "nothing", 2.0)


# ------------------------------------------------------------------------------------------ recommendation


def fake_point(batch: int, steps: float, step_time: float, lr: float = 1e-3, processes: int = 1, **extra) -> dict:
    return {"global_size": batch, "reached": True, "steps_to_target": steps, "samples_to_target": steps * batch,
            "step_time_s": step_time, "peak_lr": lr, "processes": processes, "run_dir": f"b{batch}-lr{lr}",
            "noise_scale": None, "noise_series": [], **extra}


def test_best_lr_per_batch_is_the_fewest_steps_among_points_that_reached():
    points = [fake_point(32, 300, 0.1, lr=1e-3), fake_point(32, 250, 0.1, lr=3e-3),
              {**fake_point(32, 1, 0.1, lr=1e-2), "reached": False, "steps_to_target": None},
              fake_point(64, 200, 0.1, lr=1e-3)]
    best = best_per_batch(points)
    assert list(best) == [32, 64]
    assert best[32]["peak_lr"] == 3e-3 and best[64]["peak_lr"] == 1e-3


def test_recommendation_fastest_depends_on_step_time():
    # Step time grows with the batch (t = 0.05 + 0.002 B): the fewest samples are at the smallest batch, the
    # least wall time at sqrt(B_crit * 0.05 / 0.002) ~ 49, i.e. 32 or 64 among the powers of two.
    points = [fake_point(b, float(s), 0.05 + 0.002 * b) for b, s in zip(BATCHES, steps_model(BATCHES), strict=True)]
    points += [fake_point(b, 1.5 * s, 0.05 + 0.002 * b, lr=1e-2) for b, s in zip(BATCHES, steps_model(BATCHES),
                                                                                    strict=True)]
    # A 2-process point, much faster per step: not compared (its step time is another machine's).
    points.append(fake_point(512, float(steps_model(512)), 0.001, processes=2))
    rec = recommend(points, target=2.0)
    times = {b: steps_model(b) * (0.05 + 0.002 * b) for b in BATCHES}
    assert rec["processes"] == 1
    assert rec["fastest_batch"] == min(times, key=times.get) == 64
    assert rec["fewest_samples_batch"] == 8
    assert rec["b_crit"]["value"] == pytest.approx(B_CRIT) and rec["fit_points"] == 7
    table = rec["evidence"]
    assert [r["global_size"] for r in table] == BATCHES
    assert all(r["lr"] == 1e-3 for r in table)
    assert min(r["steps_rel"] for r in table) == 1.0 and table[-1]["steps_rel"] == 1.0
    assert table[0]["samples_rel"] == 1.0
    assert table[2]["time_s"] == pytest.approx(times[32])
    # From the fit's slope -B_crit / (B + B_crit): 8 is below B_crit / 4, 512 above 4 B_crit.
    assert table[0]["regime"] == "perfect scaling" and table[-1]["regime"] == "maximal data parallelism"


def test_recommendation_noise_scale_at_target_and_final():
    series = [(0.0, 10.0), (1000.0, 20.0), (2000.0, 40.0)]
    p = fake_point(10, 150, 0.1, noise_series=series, noise_scale=40.0)  # target at 1500 samples
    assert noise_at_target(p) == pytest.approx(30.0)
    q = fake_point(20, 40, 0.1, noise_series=[(1000.0, 50.0)], noise_scale=50.0)  # measured only after 800
    assert noise_at_target(q) is None
    rec = recommend([p, q], target=1.0)
    assert rec["noise_scale"] == {"at_target": 30.0, "final": 45.0, "points": 1}
    assert rec["b_crit"] is None and "3 or more" in rec["fit_problem"]


# ---------------------------------------------------------------------------------------------- recommend


def test_predict_from_one_run(tmp_path):
    summary = write_run(tmp_path / "run", 32, 80.0, 2.0, lr=3e-3)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    values = [r["noise_scale"] for r in records if r.get("noise_scale") is not None]
    recent = float(np.median(values[-(len(values) // 4):]))
    d = predict_from_run(tmp_path / "run")
    assert d["b_noise"] == pytest.approx(recent)
    assert d["first"]["noise_scale"] == values[0] < d["last"]["noise_scale"] == values[-1]
    sizes = d["grid"]["batch.global_size"]
    centre = 2 ** round(math.log2(recent))
    assert sizes == [centre // 8 * 2**k for k in range(7)] and sizes[-1] / sizes[0] == 64
    assert d["grid"]["optim.lr"] == [1e-3, 3e-3, 9e-3] and d["grid"]["processes"] == [1]
    text = format_prediction(d)
    assert f"B_crit ~ B_noise = {recent:.4g}" in text
    snippet = yaml.safe_load(text[text.index("grid:"):])
    assert snippet == {"grid": d["grid"]}
    assert summary["peak_lr"] == 3e-3


def test_predict_refuses_a_run_without_noise_scale(tmp_path):
    write_run(tmp_path / "plain", 8, 40.0, 2.0, micro=8, noise=False)
    with pytest.raises(ConfigError, match="plain: the run logged no usable gradient noise scale") as e:
        predict_from_run(tmp_path / "plain")
    assert "more than one process" in str(e.value) and "tracking.noise_scale=true" in str(e.value)
    assert "\n" not in str(e.value)
    # Measured (accumulation 4) but still null: the advice is to train longer.
    write_run(tmp_path / "short", 32, 40.0, 2.0, micro=8, noise=False)
    with pytest.raises(ConfigError, match="short: .*run it longer"):
        predict_from_run(tmp_path / "short")
