"""Sharded checkpoints (``checkpoint.format=sharded``): every rank writes its own part, in parallel, and reads back
only the part it needs; the run trains exactly as with whole checkpoints.

* DDP on 2 processes, 20 steps, checkpoints at 10 and 20, once with whole checkpoints and once with sharded
  ones written in the background (``checkpoint.async_save``): the same final weights bit for bit;
  ``toolkit checkpoint convert --to whole`` turns each sharded checkpoint into the whole one of the other run,
  tensor for tensor; final/model.safetensors streamed from the shards is the whole run's.
* A damaged shard (a byte flipped, or truncated) fails the manifest's check; resuming skips that checkpoint with
  one line naming the file and continues from the previous one, to the same final weights.
* ZeRO-3 on 4 processes: its sharded checkpoint resumes on 2 processes under ZeRO-2 and on 1 process under DDP
  within 1e-5 of the 4-process run, every step after the resume computing the same samples.
(The kills during asynchronous saves are in tests/test_resume_kill.py and tests/test_deepspeed.py; rank 0's
memory during a save in tests/test_bench.py.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, final_weights, read_jsonl, train
from safetensors.torch import load_file
from test_resume_kill import COMMON, GLOBAL

from toolkit import checkpoint, shards
from toolkit.bench.common import max_rel_diff

DDP = [*COMMON, "train.steps=20", "train.val_every=0", "checkpoint.every_steps=10", "checkpoint.keep=5"]
SHARDED = ["checkpoint.format=sharded", "checkpoint.async_save=true"]
ZERO3_STEPS, ZERO3_AT = 12, 6
ZERO3 = [*COMMON, f"train.steps={ZERO3_STEPS}", "train.val_every=0", f"checkpoint.every_steps={ZERO3_AT}",
         "checkpoint.keep=5", "checkpoint.format=sharded", "run.record_samples=true"]
TOL = 1e-5


def together(*calls):
    """Run ``train(...)`` calls at the same time (their processes share the two cores)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: train(*call[0], **call[1]), calls))


def step(run_dir: Path, k: int) -> Path:
    return run_dir / "checkpoints" / f"step-{k:08d}"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sharded")
    whole, sharded = root / "whole", root / "sharded"
    together((([*DDP, f"run.dir={whole}"],), {"processes": 2}),
             (([*DDP, *SHARDED, f"run.dir={sharded}"],), {"processes": 2}))
    return whole, sharded


def test_sharded_checkpoints_hold_what_whole_ones_hold(ddp_runs, tmp_path):
    whole, sharded = ddp_runs
    ref, got = final_weights(whole), final_weights(sharded)  # final/ of the sharded run: streamed from its shards
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    for k in (10, 20):
        folder = step(sharded, k)
        assert shards.is_sharded(folder) and not (folder / "model.safetensors").exists()
        sizes = [(folder / shards.shard_name(r)).stat().st_size for r in range(2)]
        assert abs(sizes[0] - sizes[1]) / max(sizes) < 0.02, f"the two ranks' shards should hold half each: {sizes}"
        out = tmp_path / f"step-{k}-whole"
        done = subprocess.run([str(Path(PYTHON).with_name("toolkit")), "checkpoint", "convert", str(folder), "--to", "whole",
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        checkpoint.verify(out)
        model, expected = load_file(str(out / "model.safetensors")), load_file(str(step(whole, k) / "model.safetensors"))
        assert model.keys() == expected.keys()
        assert all(torch.equal(model[n], expected[n]) for n in model), f"step {k}: converted weights differ"
        optimizer = torch.load(out / "optimizer.pt", weights_only=True)
        expected = torch.load(step(whole, k) / "optimizer.pt", weights_only=True)
        assert optimizer["param_groups"] == expected["param_groups"]
        assert optimizer["state"].keys() == expected["state"].keys()
        for i, entry in expected["state"].items():
            for key, value in entry.items():
                assert torch.equal(optimizer["state"][i][key], value), f"step {k}: optimizer state {i} {key} differs"
        for r in range(2):
            assert (out / f"rng-rank{r}.pt").read_bytes() == (step(whole, k) / f"rng-rank{r}.pt").read_bytes()


def test_a_damaged_shard_is_found_and_the_previous_checkpoint_used(ddp_runs, tmp_path):
    whole, sharded = ddp_runs
    truncated = tmp_path / "truncated"
    shutil.copytree(step(sharded, 10), truncated)
    shard = truncated / shards.shard_name(1)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(checkpoint.CheckpointError, match=f"shard-rank1.safetensors: {size - 100} bytes, manifest says {size}"):
        checkpoint.verify(truncated)

    run = tmp_path / "run"
    shutil.copytree(sharded, run)
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    shutil.rmtree(run / "final")
    damaged = step(run, 20) / shards.shard_name(1)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the middle of the tensors
    damaged.write_bytes(bytes(data))
    result = train([*DDP, *SHARDED, f"run.dir={run}"], processes=2)
    warnings = [line for line in result.stdout.splitlines() if "invalid checkpoint" in line]
    assert warnings == [f"warning: skipping invalid checkpoint: {damaged}: checksum does not match the manifest"], \
        result.stdout[-3000:]
    assert f"resumed from {step(run, 10)} at step 10" in result.stdout
    got, ref = final_weights(run), final_weights(whole)
    assert all(torch.equal(ref[k], got[k]) for k in ref), "the run resumed from step 10 should end as the reference"


@pytest.fixture(scope="module")
def zero3_four_processes(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3") / "four"
    train([*ZERO3, "deepspeed.stage=3", f"run.dir={run_dir}"], processes=4, timeout=400)
    index = json.loads((step(run_dir, ZERO3_AT) / shards.INDEX).read_text())
    assert index["shards"] == 4
    return run_dir


def test_zero3_on_four_processes_resumes_on_two_under_zero2_and_on_one_under_ddp(zero3_four_processes, tmp_path):
    reference, source = zero3_four_processes, step(zero3_four_processes, ZERO3_AT)
    two, one = tmp_path / "two", tmp_path / "one"
    results = together(
        (([*ZERO3, "deepspeed.stage=2", f"checkpoint.resume={source}", f"run.dir={two}"],), {"processes": 2, "timeout": 400}),
        (([*ZERO3, f"checkpoint.resume={source}", f"run.dir={one}"],), {"processes": 1, "timeout": 400}))
    ref_ranks = [read_jsonl(reference / f"samples-rank{r}.jsonl") for r in range(4)]
    for run_dir, processes, result in ((two, 2, results[0]), (one, 1, results[1])):
        line = next((x for x in result.stdout.splitlines() if x.startswith("resumed from")), "")
        accumulation = GLOBAL // (2 * processes)
        assert f"at step {ZERO3_AT} (written with 4 processes, now {processes}: accumulation 1 -> {accumulation})" in line, \
            result.stdout[-2000:]
        rel, where = max_rel_diff(final_weights(run_dir), final_weights(reference))
        print(f"\nZeRO-3 x4 -> {'ZeRO-2 x2' if processes == 2 else 'DDP x1'} at step {ZERO3_AT}: max relative "
              f"difference to the 4-process run {rel:.2e} ({where})")
        assert rel <= TOL, f"{where}: {rel:.2e}"
        ranks = [read_jsonl(run_dir / f"samples-rank{r}.jsonl") for r in range(processes)]
        for k in range(ZERO3_AT, ZERO3_STEPS):  # the same samples at every step after the resume
            got = sorted(i for records in ranks for r in records if r["step"] == k for i in r["indices"])
            expected = sorted(i for records in ref_ranks for r in records if r["step"] == k for i in r["indices"])
            assert len(got) == GLOBAL and got == expected, f"step {k}"
