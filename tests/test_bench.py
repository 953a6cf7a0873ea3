"""``toolkit bench parity``: both loops must compute the same math, and the dict must add up.

The speed ratio itself is what the benchmark measures; it is not asserted here (a test on a shared CPU
cannot time anything reliably). What can fail is asserted: the plain PyTorch loop and the toolkit's loop
end on the same weights and log the same losses, and the numbers in the result are consistent.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from toolkit.bench.parity import parity
from toolkit.config import load_config

# nano GPT, 8 samples of 32 tokens per step in 4 micro-batches of 2; synthetic documents of random length,
# unpacked, so the samples carry different numbers of valid targets and the loss normalisation is part of
# what must agree. Synthetic data starts faster than reading the standard library.
SMALL = [
    "model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=40000",
    "data.seq_len=32", "data.pack=false", "batch.global_size=8", "batch.micro_size=2",
    "optim.warmup_samples=16", "train.log_every=2",
]


@pytest.fixture(scope="module")
def result() -> dict:
    before = sorted(p.name for p in ROOT.iterdir())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nothing is timed against a target; one thread is fastest on a busy CPU
    try:
        out = parity(load_config(ROOT / "configs" / "bench-parity.yaml", SMALL), steps=5, repeats=2)
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in ROOT.iterdir()) == before, "the bench wrote into the repository"
    return out


def test_both_loops_end_on_the_same_weights_and_losses(result):
    assert result["weights_max_rel_diff"] <= 1e-5, result["report"]
    assert result["loss_max_abs_diff"] <= 1e-5, result["report"]


def test_result_adds_up(result):
    for loop in ("toolkit", "plain"):
        speeds = result[f"{loop}_tokens_per_s"]
        assert len(speeds) == 2 and all(s > 0 for s in speeds), speeds
        assert result[f"median_{loop}_tokens_per_s"] == statistics.median(speeds)
        assert all(s > 0 for s in result[f"{loop}_cpu_s"])
        assert result[f"{loop}_spread"] == max(speeds) / min(speeds)
    assert result["ratio"] == pytest.approx(
        result["median_toolkit_tokens_per_s"] / result["median_plain_tokens_per_s"], rel=1e-12
    )
    assert result["pair_ratios"] == [
        t / p for t, p in zip(result["toolkit_tokens_per_s"], result["plain_tokens_per_s"], strict=True)
    ]
    c = result["config"]
    assert (c["global_size"], c["micro_size"], c["accumulation"], c["seq_len"], c["steps"]) == (8, 2, 4, 32, 5)
    assert c["n_params"] > 0 and c["torch_threads"] >= 1
    assert result["report"].splitlines()[-1] == (
        f"parity ratio (toolkit / plain PyTorch tokens/s): {result['ratio']:.2f}"
    )


def test_default_config_exists():
    cfg = load_config(ROOT / "configs" / "bench-parity.yaml")
    assert (cfg.batch.global_size, cfg.batch.micro_size, cfg.data.seq_len) == (32, 8, 128)


def test_tracking_bench_runs_and_tracking_changes_no_weight(monkeypatch):
    """``toolkit bench tracking``: W&B (offline, in a temporary run.dir) and the noise scale on vs off.
    Tracking only reads; the final weights of both must be bitwise identical."""
    from toolkit.bench.tracking import tracking_overhead

    monkeypatch.setenv("WANDB_MODE", "offline")
    before = sorted(p.name for p in ROOT.iterdir())
    out = tracking_overhead(load_config(ROOT / "configs" / "bench-parity.yaml", SMALL), steps=4, repeats=1)
    assert sorted(p.name for p in ROOT.iterdir()) == before, "the bench wrote into the repository"
    assert out["weights_max_rel_diff"] == 0.0, out["report"]
    assert len(out["on_tokens_per_s"]) == len(out["off_tokens_per_s"]) == 1 and out["ratio"] > 0
    assert out["report"].splitlines()[-1] == f"tracking ratio (on / off tokens/s, medians): {out['ratio']:.3f}"


def test_the_gpu_bench_runs_its_rows_end_to_end_on_a_cpu(tmp_path):
    """``toolkit bench gpu`` is for a GPU; here its whole table, shrunk (nano model, eager, 2 steps a row), on the
    CPU: every row of the toolkit (1 process and ZeRO-2) against the plain loop at the same micro size, the
    loss in one piece against chunks, and batch.micro_size=auto with the largest size that fits."""
    from conftest import PYTHON, child_env, run

    out = tmp_path / "gpu.json"
    cmd = [str(Path(PYTHON).with_name("toolkit")), "bench", "gpu", "--micro", "1,2", "--modes", "eager", "--engines", "ddp,zero2", "--plain", "eager",
           "--warmup", "1", "--steps", "2", "--auto-share", "6", "--out", str(out), "train.device=cpu",
           "train.precision=fp32", "model.size=nano", "model.vocab_size=256", "data.seq_len=32",
           "data.synthetic_tokens=20000", "model.loss_chunk=16"]
    result = run(cmd, timeout=300, env=child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {(row["name"], row["micro_size"]): row for row in r["rows"]}
    for micro in (1, 2):
        assert rows[("plain eager", micro)]["tokens_per_s"] > 0
        for name in ("toolkit eager 1 GPU", "toolkit eager ZeRO-2"):
            assert 0.2 < rows[(name, micro)]["vs_plain"] < 5, rows[(name, micro)]
    assert rows[("toolkit eager, loss_chunk=0", 2)]["tokens_per_s"] > 0
    assert rows[("toolkit eager, loss_chunk=16", 2)]["tokens_per_s"] > 0
    auto = next(row for row in r["rows"] if row["name"] == "toolkit eager, micro auto")
    assert auto["auto_micro"]["micro_size"] == 6 and auto["accumulation"] == 1  # nothing runs out on a CPU
    assert auto["largest_fitting"] == 6 and auto["auto_vs_largest"] == 1.0
    assert "auto: micro 6" in result.stdout and "plain eager" in result.stdout


def test_a_sharded_save_holds_no_more_than_rank_0s_own_part_where_whole_holds_the_state():
    """``toolkit bench checkpoint`` on 4 processes, DDP and ZeRO-3, a 12.6M-parameter model (its state, fp32
    weights and AdamW moments, is 145 MiB): every rank's peak resident set above the one before the save stays
    within a bounded buffer (16 MiB; its own part, 36 MiB, is written from where it lies, not copied), while
    whole gathers (ZeRO-3) or copies (DDP) the state on rank 0. The step-time ratios are the bench's to report, not timed here."""
    from toolkit.bench.checkpoint import checkpoint_bench

    model = ["model.size=small", "model.n_layer=4", "model.n_head=8", "model.n_embd=512", "model.vocab_size=256"]
    result = checkpoint_bench(ROOT / "configs" / "bench-memory.yaml", model, processes=[4], engines=["ddp", "zero3"],
                              repeats=1, steps=2, every=1)
    print("\n" + result["report"])
    rows = {(r["engine"], r["format"]): r for r in result["rows"]}
    assert set(rows) == {("ddp", "whole"), ("ddp", "sharded"), ("zero3", "whole"), ("zero3", "sharded")}
    state = rows["ddp", "whole"]["state_bytes"]
    assert 140 * 2**20 < state < 150 * 2**20
    for engine in ("ddp", "zero3"):
        sharded = rows[engine, "sharded"]
        # A quarter of the state each: a copy of it would exceed the buffer, so the peak shows that none is made.
        assert all(2 * BUFFER < r["own_bytes"] < 0.3 * state for r in sharded["ranks"]), (engine, sharded["ranks"])
        assert all(r["peak_bytes"] <= BUFFER for r in sharded["ranks"]), (engine, sharded["ranks"])
    # whole: ZeRO-3 gathers the whole state on rank 0; DDP's rank 0 holds it anyway and copies the weights to write
    assert rows["zero3", "whole"]["peak_bytes"] >= 0.9 * state, rows["zero3", "whole"]
    assert rows["ddp", "whole"]["peak_bytes"] >= 0.3 * state, rows["ddp", "whole"]  # (a copy of the weights: 1/3)
    timing = result["timing"]
    assert timing["engine"] == "ddp" and all(len(timing[m]) == 1 and timing[m][0] > 0 for m in ("none", "async", "sync"))


BUFFER = 16 * 2**20
"""The bound on what a sharded save may add to a rank's memory: its Python objects (the index, the gathered piece
lists), never a copy of a tensor."""
