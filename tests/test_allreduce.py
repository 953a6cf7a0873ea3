"""One gradient all-reduce per optimizer step, counted with a DDP communication hook, not assumed.

A 2-process run with 4 accumulation steps (global 16 = micro 2 x accumulation 4 x 2 processes) runs
under tests/probe_allreduce.py, which registers a hook on the trainer's DDP model that records the
trainer's (step, micro-step) at every bucket all-reduce. Every call must come from the last micro-step,
every step must all-reduce every bucket exactly once, and the hook (which does DDP's own averaging) must
give the same weights as a plain ``train.py`` run.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import read_jsonl, small_job, train
from safetensors.torch import load_file

PROCESSES = 2
GLOBAL, MICRO = 16, 2
ACCUMULATION = GLOBAL // (MICRO * PROCESSES)
STEPS = 3
COMMON = [
    *small_job(GLOBAL, STEPS),
    "model.n_embd=128",  # ~0.4M parameters: more than the 1 MiB of DDP's first bucket, so several buckets
    f"batch.micro_size={MICRO}",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("allreduce")
    dirs = {"probe": root / "probe", "plain": root / "plain"}
    for name, script in (("probe", "tests/probe_allreduce.py"), ("plain", "train.py")):
        started = time.perf_counter()
        train([*COMMON, f"run.dir={dirs[name]}"], processes=PROCESSES, script=script)
        print(f"run {name}: {time.perf_counter() - started:.1f} s")
    return dirs


def probe_records(run_dir: Path) -> list[dict]:
    records = []
    for rank in range(PROCESSES):
        path = run_dir / f"allreduce-rank{rank}.json"
        assert path.is_file(), f"the probe wrote no {path.name}"
        records.append(json.loads(path.read_text()))
    return records


def test_one_allreduce_per_optimizer_step(runs):
    records = probe_records(runs["probe"])
    for rank, rec in enumerate(records):
        assert (rec["world_size"], rec["accumulation"], rec["steps"]) == (PROCESSES, ACCUMULATION, STEPS)
        calls = rec["calls"]
        assert calls, f"rank {rank}: the hook was never called"

        off_last = [c for c in calls if c["micro_step"] != ACCUMULATION - 1]
        assert not off_last, f"rank {rank}: all-reduce before the last micro-step: {off_last[:5]}"

        # DDP's buckets, by its own account: one layout for the first step, and the one it rebuilds
        # after the first backward (in the order gradients became ready) for every later step.
        first = rec["bucket_bytes"]["first_step"]
        later = rec["bucket_bytes"]["rebuilt"] or first
        assert first, "DDP reported no buckets"
        expected = [first] + [later] * (STEPS - 1)

        per_step = Counter(c["step"] for c in calls)
        print(f"rank {rank}: {len(calls)} hook calls in {STEPS} steps x {ACCUMULATION} micro-steps; "
              f"per step {[per_step[k] for k in range(STEPS)]}; DDP buckets: step 0 {len(first)} {first} B, "
              f"later {len(later)} {later} B; gradient {rec['grad_elements']} elements")
        assert sorted(per_step) == list(range(STEPS)), f"rank {rank}: steps with calls {sorted(per_step)}"
        assert [per_step[k] for k in range(STEPS)] == [len(layout) for layout in expected], f"rank {rank}"
        assert len(calls) == len(first) + (STEPS - 1) * len(later)
        assert all(per_step[k] == per_step[1] for k in range(1, STEPS)), f"rank {rank}: {per_step}"

        for step in range(STEPS):
            mine = sorted((c for c in calls if c["step"] == step), key=lambda c: c["bucket"])
            # Each bucket once, one of them the last, and together the whole gradient, once.
            assert [c["bucket"] for c in mine] == list(range(len(expected[step]))), f"rank {rank} step {step}"
            assert [c["bytes"] for c in mine] == expected[step], f"rank {rank} step {step}"
            assert sum(c["is_last"] for c in mine) == 1, f"rank {rank} step {step}"
            assert sum(c["numel"] for c in mine) == rec["grad_elements"], f"rank {rank} step {step}"

    # Both ranks took part in the same collectives.
    strip = [[(c["step"], c["bucket"], c["numel"]) for c in rec["calls"]] for rec in records]
    assert all(s == strip[0] for s in strip)


def test_hook_gives_the_same_weights_as_a_plain_run(runs):
    """The hook averaged as DDP does: the run it counted is the run train.py makes."""
    probe = load_file(str(runs["probe"] / "final" / "model.safetensors"))
    plain = load_file(str(runs["plain"] / "final" / "model.safetensors"))
    assert probe.keys() == plain.keys()
    worst = max(
        ((probe[k].double() - plain[k].double()).abs().max().item() / max(plain[k].abs().max().item(), 1e-30), k)
        for k in plain
    )
    print(f"probe vs plain run: max relative difference {worst[0]:.3e} ({worst[1]})")
    assert worst[0] <= 1e-6, f"weights differ by {worst[0]:.3e} in {worst[1]}"

    # Adam and clipping hide a gradient's scale from the weights; the logged pre-clip norm does not.
    logs = {name: [r for r in read_jsonl(runs[name] / "metrics.jsonl") if "grad_norm" in r] for name in runs}
    assert [r["step"] for r in logs["probe"]] == [r["step"] for r in logs["plain"]] == list(range(1, STEPS + 1))
    for a, b in zip(logs["probe"], logs["plain"], strict=True):
        print(f"step {b['step']}: grad_norm probe {a['grad_norm']:.6g} plain {b['grad_norm']:.6g}, "
              f"loss probe {a['loss']:.6g} plain {b['loss']:.6g}")
        assert b["grad_norm"] > 0
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
