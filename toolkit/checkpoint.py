"""Checkpoints: written atomically, verified by a manifest, loaded without executing pickles.

Layout of one checkpoint, ``<run.dir>/checkpoints/step-NNNNNNNN/``:

* ``model.safetensors``: the plain model state dict (tied weights stored as copies);
* ``optimizer.pt``: the optimizer state dict (tensors, numbers, lists and dicts only);
* ``rng-rank<R>.pt``: each rank's torch RNG states;
* ``state.json``: step, samples, the batch plan it was written with;
* ``manifest.json``, written last: size and SHA-256 of every other file.

The folder is assembled under a temporary name, every file is flushed to disk, and then it is renamed
into place, so a checkpoint either exists whole or not at all. A checkpoint is valid only when its
manifest verifies; loading uses ``torch.load(weights_only=True)`` and safetensors, so a file that
would run code when unpickled is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "state.json", "rng-rank0.pt")
STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or unsafe to load."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path) -> None:
    """Record size and checksum of every file in ``folder`` (written last, flushed)."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    with open(folder / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def verify(folder: Path) -> None:
    """Raise CheckpointError unless every file the manifest names is there with its size and checksum."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete checkpoint)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"{manifest_path}: does not list {', '.join(missing)}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, manifest says {expected['bytes']}")
        try:
            digest = _sha256(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: unreadable ({exc.strerror})") from None
        if digest != expected["sha256"]:
            raise CheckpointError(f"{path}: checksum does not match the manifest")


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders under ``root`` as (step, path), newest first (temporary folders ignored)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def newest_valid(root: Path, warn=print) -> Path | None:
    """The newest checkpoint whose manifest verifies; each newer invalid one is reported in one line."""
    for _, path in list_checkpoints(root):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            warn(f"warning: skipping invalid checkpoint: {exc}")
    return None


@dataclass
class TrainingState:
    """What a checkpoint restores besides the model and optimizer tensors."""

    step: int
    """Optimizer steps done; also the sampler's position."""
    samples: int
    """Samples consumed (step x global size)."""
    plan: dict
    """The batch plan the checkpoint was written with (the world size may differ on resume)."""
    skipped_steps: int = 0
    """Steps dropped so far for a non-finite gradient."""
    skipped_in_row: int = 0
    """Of those, how many in a row up to this step (for train.max_skipped)."""
    val_loss: float | None = None
    """The last validation loss (a run resumed at its final step reports it without validating again)."""
    wandb_run_id: str | None = None
    """The W&B run this run logs to: a resumed or requeued run continues the same W&B run."""
    noise_scale: list | None = None
    """The gradient noise scale's moving averages [|G|^2, tr(Sigma)], so that a resumed run goes on with them."""


def save(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    rng_state: dict[str, torch.Tensor],
    state: TrainingState | None,
    rank: int,
    barrier,
) -> Path:
    """Write a checkpoint collectively. Rank 0 writes the model, optimizer and state; every rank writes
    its RNG state; rank 0 then writes the manifest and renames the folder into place.

    ``barrier()`` must synchronise all ranks (``accelerator.wait_for_everyone``).
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    barrier()
    _save_synced(rng_state, tmp / f"rng-rank{rank}.pt")  # each rank flushes its own file
    if rank == 0:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=2))
    barrier()
    if rank == 0:
        for path in tmp.iterdir():  # flush every file before the manifest vouches for them
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        write_manifest(tmp)
        _fsync_dir(tmp)
        # A checkpoint of the same step from an earlier attempt is moved aside first and deleted only
        # after the new one is in place, so a kill at any moment leaves one of the two whole.
        trash = root / f".trash-step-{step:08d}"
        if final.exists():
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)
    barrier()
    return final


def _save_synced(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def prune(root: Path, keep: int, current_step: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``current_step`` (rank 0 only).

    Folders of later steps belong to a branch the run left by resuming from an older checkpoint: they
    are renamed ``stale-step-N`` (kept, but no longer resumed from) rather than deleted. A folder being
    deleted is renamed first, so a kill half-way leaves no half-deleted checkpoint that looks valid.
    """
    found = list_checkpoints(root)
    for step, path in found:
        if step > current_step:
            os.replace(path, root / f"stale-{path.name}")
    for _, path in [c for c in found if c[0] <= current_step][keep:]:
        doomed = root / f".trash-{path.name}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an UnpicklingError names the forbidden global; keep its first line
        raise CheckpointError(f"{path}: refused to load ({str(exc).splitlines()[0]})") from None


def load(folder: Path, rank: int) -> tuple[dict, dict, dict | None, TrainingState]:
    """Verify and read a checkpoint: model state, optimizer state, this rank's RNG (None if the checkpoint
    had fewer ranks), training state."""
    verify(folder)
    try:
        model_state = load_file(str(folder / "model.safetensors"))
        state = TrainingState(**json.loads((folder / "state.json").read_text()))
    except Exception as exc:  # a verified file that still does not parse (written by another version)
        raise CheckpointError(f"{folder}: cannot read ({str(exc).splitlines()[0]})") from None
    optimizer_state = _torch_load(folder / "optimizer.pt")
    rng_path = folder / f"rng-rank{rank}.pt"
    rng_state = _torch_load(rng_path) if rng_path.is_file() else None
    return model_state, optimizer_state, rng_state, state


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
