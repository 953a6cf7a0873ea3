"""Checkpoints: atomic layout, manifest verification, fallback past a corrupted one, no pickle execution,
and metrics.jsonl cut (not rewritten) on resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, train
from safetensors.torch import load_file

from toolkit import checkpoint, shards
from toolkit.tracking import MetricsLog, cut_after_step

SMALL = ["model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=20000",
         "data.seq_len=32", "batch.global_size=8", "batch.micro_size=4", "train.log_every=5",
         "train.val_every=0", "train.val_batches=1", "train.progress=false", "checkpoint.every_steps=5",
         "checkpoint.keep=3"]


def no_barrier() -> None:
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One real finished 15-step run (checkpoints at steps 5, 10 and 15), run once for the module: each
    end-to-end test below damages or resumes a copy of it (``finished_copy``), never the run itself."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train([*SMALL, "train.steps=15", f"run.dir={run_dir}"])
    return run_dir


def finished_copy(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def write_one(root: Path, step: int) -> Path:
    return checkpoint.save(
        root, step, model_state={"w": torch.arange(6.0).reshape(2, 3) * step},
        optimizer_state={"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.1}]},
        rng_state=checkpoint.rng_state(), state=checkpoint.TrainingState(step, step * 8, {"global_size": 8}),
        rank=0, barrier=no_barrier,
    )


def test_save_writes_a_verified_folder_and_loads_back(tmp_path):
    folder = write_one(tmp_path, 7)
    assert folder.name == "step-00000007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.pt", "rng-rank0.pt", "state.json"]
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary folder was renamed into place
    checkpoint.verify(folder)
    model, optim, rng, state = checkpoint.load(folder, rank=0)
    assert torch.equal(model["w"], torch.arange(6.0).reshape(2, 3) * 7)
    assert optim["state"][0]["step"].item() == 7.0 and state.step == 7 and state.samples == 56
    assert torch.equal(rng["torch"], torch.get_rng_state())
    assert checkpoint.load(folder, rank=1)[2] is None  # a rank the checkpoint did not have


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no-manifest"])
def test_verify_catches_damage_and_newest_valid_falls_back(tmp_path, damage):
    write_one(tmp_path, 5)
    newest = write_one(tmp_path, 10)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.verify(newest)
    warnings: list[str] = []
    assert checkpoint.newest_valid(tmp_path, warn=warnings.append) == tmp_path / "step-00000005"
    assert len(warnings) == 1 and "\n" not in warnings[0] and "step-00000010" in warnings[0]


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_one(tmp_path, 3)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Exploit()}, folder / "optimizer.pt")  # the zip format torch.save writes
    checkpoint.write_manifest(folder)  # an attacker can write a matching manifest too
    with pytest.raises(checkpoint.CheckpointError, match="refused to load"):
        checkpoint.load(folder, rank=0)
    assert not marker.exists()


def test_list_ignores_temporary_folders_and_prune_keeps_the_newest(tmp_path):
    for step in (2, 4, 6, 8):
        write_one(tmp_path, step)
    (tmp_path / ".tmp-step-00000010").mkdir()  # a write killed half-way
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [8, 6, 4, 2]
    checkpoint.prune(tmp_path, keep=2, current_step=8)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [8, 6]


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    """After resuming from an older checkpoint, later folders are set aside (not resumed from, not lost)."""
    for step in (10, 20, 30):
        write_one(tmp_path, step)
    write_one(tmp_path, 12)  # the run went back to step 10 and has just written step 12
    checkpoint.prune(tmp_path, keep=1, current_step=12)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [12]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stale-step-00000020", "stale-step-00000030", "step-00000012"]


def test_a_manifest_that_leaves_out_a_required_file_is_invalid(tmp_path):
    folder = write_one(tmp_path, 4)
    (folder / "optimizer.pt").unlink()
    checkpoint.write_manifest(folder)  # consistent with what is there, but incomplete
    with pytest.raises(checkpoint.CheckpointError, match="does not list optimizer.pt"):
        checkpoint.verify(folder)


def test_metrics_are_cut_after_the_checkpoint_step_not_rewritten(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (5, 10, 15, 20)]
    path.write_text("".join(lines) + '{"step": 25, "lo')  # torn by a kill
    cut_after_step(path, 10)
    assert path.read_text() == "".join(lines[:2])
    log = MetricsLog(path, enabled=True, resumed_step=10)
    log.log({"step": 15, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_jsonl(path)] == [5, 10, 15]
    assert [r["step"] for r in log.history] == [5, 10, 15]


def test_resume_auto_skips_a_corrupted_newest_checkpoint(tmp_path, finished):
    """End to end: truncate the newest checkpoint of a finished run; resume falls back with one warning
    line and finishes with the same weights as the uninterrupted run."""
    run_dir = finished_copy(finished, tmp_path)
    reference = load_file(str(run_dir / "final" / "model.safetensors"))
    newest = run_dir / "checkpoints" / "step-00000015"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])
    result = train([*SMALL, "train.steps=15", f"run.dir={run_dir}"])
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step-00000015" in warnings[0]
    assert "resumed from" in result.stdout and "step-00000010 at step 10" in result.stdout
    resumed = load_file(str(run_dir / "final" / "model.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    train_steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert train_steps == [5, 10, 15]


def test_no_valid_checkpoint_at_all_is_refused_not_restarted(tmp_path, finished):
    """If every checkpoint is damaged, auto-resume refuses (exit 2) instead of starting over and
    overwriting metrics.jsonl."""
    run_dir = finished_copy(finished, tmp_path)
    for folder in (run_dir / "checkpoints").iterdir():
        (folder / "model.safetensors").write_bytes(b"0")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    result = train([*SMALL, "train.steps=15", f"run.dir={run_dir}"], check=False)
    assert result.returncode == 2 and "none of the 3 checkpoints" in result.stderr, result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_rerunning_a_finished_two_process_run_ends_at_once(tmp_path):
    """Every rank knows (from the checkpoint and the summary) that the run is finished: all of them stop
    before writing anything, so nothing waits for a partner, and nothing is logged or rewritten."""
    run_dir = tmp_path / "run"
    train([*SMALL, "train.steps=5", f"run.dir={run_dir}"], processes=2)
    records = read_jsonl(run_dir / "metrics.jsonl")
    summary = (run_dir / "summary.json").read_bytes()
    again = train([*SMALL, "train.steps=5", f"run.dir={run_dir}"], processes=2, timeout=120)
    assert again.stdout.count("already finished") == 1
    assert read_jsonl(run_dir / "metrics.jsonl") == records
    assert (run_dir / "summary.json").read_bytes() == summary


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path, finished):
    run_dir = finished_copy(finished, tmp_path)
    def files():  # the run's files; .lock only records who holds the run directory now
        return {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    result = train([*SMALL, "train.steps=15", f"run.dir={run_dir}", "checkpoint.resume=never"], check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint.resume=never"), result.stderr
    assert files() == before


def test_resume_from_an_explicit_path_and_a_changed_global_batch_is_refused(tmp_path, finished):
    run_dir = finished_copy(finished, tmp_path)
    folder = run_dir / "checkpoints" / "step-00000005"
    other = tmp_path / "other"
    result = train([*SMALL, "train.steps=15", f"run.dir={other}", f"checkpoint.resume={folder}"])
    assert f"resumed from {folder} at step 5" in result.stdout
    a = load_file(str(run_dir / "final" / "model.safetensors"))
    b = load_file(str(other / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = train([*SMALL, "train.steps=15", "batch.global_size=16", f"run.dir={tmp_path / 'x'}",
                 f"checkpoint.resume={folder}"], check=False)
    assert bad.returncode == 2 and "cannot change within a run" in bad.stderr


def test_leftovers_are_put_right_not_lost(tmp_path):
    """A save killed between its two renames leaves the only whole copy of step N as .trash-step-N (the old
    one moved aside) or .tmp-step-N (the new one, manifest written): the next start renames it back. A
    partial folder (no manifest) is removed, and so is a whole copy when step-N exists."""
    os.replace(write_one(tmp_path, 4), tmp_path / ".trash-step-00000004")
    os.replace(write_one(tmp_path, 8), tmp_path / ".tmp-step-00000008")
    partial = tmp_path / ".tmp-step-00000012"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    write_one(tmp_path, 16)
    (tmp_path / ".trash-step-00000016").mkdir()  # an older copy of a step that is in place
    said = []
    removed = checkpoint.remove_leftovers(tmp_path, say=said.append)
    assert sorted(p.name for p in removed) == [".tmp-step-00000012", ".trash-step-00000016"]
    assert [step for step, _ in checkpoint.list_checkpoints(tmp_path)] == [16, 8, 4]
    for step in (4, 8, 16):
        checkpoint.verify(checkpoint.step_dir(tmp_path, step))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000008", "step-00000016"]
    assert sum("recovered" in line for line in said) == 2


# ------------------------------------------------------------------------------------------ shard files
def test_the_streaming_writer_writes_files_safetensors_reads(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
               "d": torch.tensor(2.5), "e": torch.tensor([True, False, True])}
    written = shards.write_safetensors(tmp_path / "x.safetensors",
                                       [(k, list(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()])
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    assert written["bytes"] == (tmp_path / "x.safetensors").stat().st_size
    assert written["sha256"] == checkpoint._sha256(tmp_path / "x.safetensors")


def test_a_reader_assembles_any_run_of_elements_from_the_pieces_that_hold_it(tmp_path):
    full = torch.randn(10, 3)
    flat = full.reshape(-1)
    cuts = [0, 7, 7, 19, 30]  # rank 1 holds nothing
    by_rank = [[shards.Piece("param/0", a, flat[a:b])] for a, b in zip(cuts, cuts[1:], strict=False)]
    for rank, own in enumerate(by_rank):
        shards.write_shard(tmp_path, rank, own)
    index = shards.build_index({"param/0": ([10, 3], torch.float32)}, [shards.describe(p) for p in by_rank],
                               {"w": "param/0"}, {"step": None, "param_groups": []})
    (tmp_path / shards.INDEX).write_text(json.dumps(index))
    reader = shards.ShardReader(tmp_path)
    assert torch.equal(reader.whole("param/0"), full)
    for start, length in ((0, 30), (5, 4), (6, 14), (19, 1), (29, 1), (3, 0)):
        assert torch.equal(reader.read("param/0", start, length), flat[start:start + length]), (start, length)
    with pytest.raises(ValueError, match="gap or overlap at element 7"):
        shards.build_index({"param/0": ([10, 3], torch.float32)}, [[("param/0", 0, 7)], [("param/0", 8, 22)]], {}, {})
    with pytest.raises(ValueError, match="cover 29 of 30"):
        shards.build_index({"param/0": ([10, 3], torch.float32)}, [[("param/0", 0, 29)]], {}, {})


def test_every_state_dict_name_of_a_sharded_checkpoint_names_a_tensor_it_writes():
    """A frozen weight tied under two names (as an embedding and an output layer are) is written once, and both
    names point at it; the trained parameters by their optimizer index."""
    from torch import nn

    from toolkit import pieces

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    model[0].weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    names = pieces.state_dict_names(model, params)
    own, tensors = pieces.local_pieces(params, torch.optim.AdamW(params), None, model, 0, 1)
    assert names == {"0.weight": "frozen/0.weight", "0.bias": "param/0", "1.weight": "frozen/0.weight", "1.bias": "param/1"}
    assert set(names.values()) <= set(tensors) == {p.tensor for p in own}
