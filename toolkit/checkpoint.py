"""Checkpoints: written atomically, verified by a manifest, loaded without executing pickles.

Layout of one checkpoint, ``<run.dir>/checkpoints/step-NNNNNNNN/``:

* ``model.safetensors``: the plain model state dict (tied weights stored as copies);
* ``optimizer.pt``: the optimizer state dict (tensors, numbers, lists and dicts only);
* or, in a sharded checkpoint (``checkpoint.format``), ``shard-rank<R>.safetensors`` and ``index.json`` instead
  of those two: each rank's pieces of the same states, written in parallel (toolkit/shards.py);
* ``rng-rank<R>.pt``: each rank's torch RNG states;
* ``state.json``: step, samples, the batch plan it was written with;
* ``manifest.json``, written last: size and SHA-256 of every other file (each rank hashes what it wrote).

The folder is assembled under a temporary name, every file is flushed to disk, and then it is renamed
into place, so a checkpoint either exists whole or not at all. A checkpoint is valid only when its
manifest verifies; loading uses ``torch.load(weights_only=True)`` and safetensors, so a file that
would run code when unpickled is refused.

A full disk is found before writing where possible (rank 0 compares the checkpoint's estimated size
with the free space) and otherwise when a write fails; either way the temporary folder is removed,
every rank learns it through ``agree`` and raises the same ``CheckpointWriteError``, and the
previous checkpoint is untouched. A save killed half-way leaves ``.tmp-step-*`` (or ``.trash-*``)
behind: ``remove_leftovers`` clears them at the next start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from toolkit.errors import CheckpointWriteError  # noqa: F401  (raised here; defined where toolkit.run reads it)

MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.pt", "state.json", "rng-rank0.pt")
REQUIRED_SHARDED = ("index.json", "state.json", "rng-rank0.pt")
STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or unsafe to load."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A short write reaches us as an OSError from Python's own files, but as a RuntimeError from torch.save
# ("[enforce fail at inline_container.cc:672] . unexpected pos 927680 vs 927572", with no errno) and as
# a SafetensorError from safetensors ("I/O error: No space left on device (os error 28)").
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122",
                      "unexpected pos", "failed writing file")
FILE_OVERHEAD = 4096
"""Bytes added per file to the size estimate: file-system block rounding."""
TENSOR_OVERHEAD = 512
"""Bytes added per tensor: safetensors' header entry, or torch.save's zip record and alignment."""
SMALL_FILES = 64 * 1024
"""Bytes for state.json and manifest.json (the run config is in state.json)."""


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


def fsync_files(folder: Path, skip=()) -> None:
    """Flush every file in ``folder`` to disk, but those named in ``skip``."""
    for path in folder.iterdir():
        if path.name not in skip:
            with open(path, "rb+") as f:
                os.fsync(f.fileno())


def write_manifest(folder: Path, known: dict | None = None) -> None:
    """Record size and checksum of every file in ``folder`` (written last, flushed). ``known``: the entries of
    files whose writers hashed them as they wrote them (each rank its own), not read again here."""
    known = known or {}
    files = {
        p.name: known.get(p.name) or {"bytes": p.stat().st_size, "sha256": _sha256(p)}
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
    sharded = "index.json" in files
    missing = [name for name in (REQUIRED_SHARDED if sharded else REQUIRED) if name not in files]
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
    if sharded:  # every rank's shard is there (the index, verified above, says how many)
        try:
            shards = int(json.loads((folder / "index.json").read_text())["shards"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / 'index.json'}: unreadable index ({exc})") from None
        absent = [f"shard-rank{r}.safetensors" for r in range(shards) if f"shard-rank{r}.safetensors" not in files]
        if absent:
            raise CheckpointError(f"{manifest_path}: does not list {', '.join(absent)}")


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
    config: dict | None = None
    """The resolved run config it was trained with: a later command on the run directory is compared to it."""
    train_time_s: float = 0.0
    """Wall time of the training steps up to this checkpoint, over all the run's segments."""
    memory_peaks: dict | None = None
    """Measured peaks so far: ``setup`` (mode, world size, device, precision, micro-batch) and ``bytes`` [up to
    the update, with the update (both above the start), whole process], the largest over the ranks."""
    val_step: int | None = None
    """The step val_loss was measured at (a run resumed at its final step reports it only if it is that step)."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the disk or the quota is full."""
    for _ in range(8):  # the chain of causes, not followed forever
        if exc is None:
            return False
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(m in str(exc) for m in DISK_FULL_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _tensors(obj) -> tuple[int, int]:
    """Bytes and number of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size(), 1
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else ()
    total = count = 0
    for item in items:
        b, n = _tensors(item)
        total, count = total + b, count + n
    return total, count


def estimate_bytes(model_state: dict, optimizer_state: dict | None, rng_state: dict, world_size: int = 1) -> int:
    """The space a checkpoint takes on disk: its tensors' bytes (the model's, tied weights counted as the
    copies they are stored as, the optimizer's, one RNG file per rank) plus per-tensor and per-file
    overheads and the small JSON files."""
    model_bytes, model_tensors = _tensors(model_state)
    optim_bytes, optim_tensors = _tensors(optimizer_state)
    rng_bytes, rng_tensors = _tensors(rng_state)
    return (model_bytes + optim_bytes + (model_tensors + optim_tensors) * TENSOR_OVERHEAD + 4 * FILE_OVERHEAD
            + world_size * (rng_bytes + rng_tensors * TENSOR_OVERHEAD + FILE_OVERHEAD) + SMALL_FILES)


class _NoRoom(Exception):
    """Rank 0's estimate says the checkpoint does not fit: nothing was written."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _failure_message(root: Path, step: int, needed: int, own_failure: bool) -> str:
    """Rank 0's one line for a checkpoint that was not written (called after its temporary folder is gone)."""
    try:
        free = _mib(shutil.disk_usage(root).free)
    except OSError:
        free = "unknown"
    previous = newest_valid(root, warn=lambda _: None)
    last = (f"the last checkpoint {previous.name} is intact" if previous is not None
            else "there is no earlier checkpoint (a rerun starts from step 0)")
    reason = "the disk is full" if own_failure else "another rank could not write its part there (a full disk?)"
    return (f"cannot write checkpoint {step_dir(root, step).name} in {root}: {reason} ({free} free, the checkpoint "
            f"needs about {_mib(needed)}); {last}; free space and run the same command again")


def save(
    root: Path,
    step: int,
    model_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    rng_state: dict[str, torch.Tensor],
    state: TrainingState | None,
    rank: int,
    barrier: Callable[[], None] | None = None,
    agree: Callable[[bool], bool] | None = None,
    world_size: int = 1,
    gather: Callable[[dict], list[dict]] | None = None,
) -> Path:
    """Write a whole checkpoint collectively: rank 0 writes the model, optimizer and state, every rank its RNG
    state (see ``save_collectively`` for the protocol, ``agree`` and ``gather``). Without ``agree`` (one
    process, or old callers) ``barrier()`` synchronises and a failure is raised on the rank that met it only.
    """
    if agree is None:
        def agree(ok: bool) -> bool:
            if barrier is not None:
                barrier()
            return ok

    def write_main(tmp: Path) -> None:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        write_state(tmp, state)

    needed = estimate_bytes(model_state, optimizer_state, rng_state, world_size) if rank == 0 else 0
    return save_collectively(root, step, rank, agree, gather, needed,
                             write_own=lambda tmp: {f"rng-rank{rank}.pt": _save_synced(rng_state, tmp / f"rng-rank{rank}.pt")},
                             write_main=write_main)


def write_state(folder: Path, state: TrainingState) -> None:
    (folder / "state.json").write_text(json.dumps(state.__dict__, indent=2))


def save_collectively(root: Path, step: int, rank: int, agree: Callable[[bool], bool],
                      gather: Callable[[dict], list[dict]] | None, needed: int,
                      write_own: Callable[[Path], dict], write_main: Callable[[Path], None]) -> Path:
    """Write a checkpoint folder together: rank 0 checks that ``needed`` bytes fit and creates the temporary
    folder; every rank writes its own files (``write_own(tmp)``, returning their manifest entries, hashed as they
    were written); rank 0 gets all entries through ``gather`` and writes its shared files (``write_main(tmp)``),
    then the manifest, and renames the folder into place.

    ``agree(ok)`` must return True on every rank only if every rank passed True (an all-reduce MIN); it is
    also the synchronisation point between the phases. ``gather(entries)`` returns every rank's entries (an
    all-gather; None: one process). If any rank's part failed, every rank raises ``CheckpointWriteError``
    (rank 0's message names the cause; a rank's own error that is not a full disk is raised as it is), rank 0
    having removed the temporary folder.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:08d}"
    trash = root / f".trash-step-{step:08d}"
    error: BaseException | None = None
    known: dict = {}

    def attempt(action: Callable[[], None]) -> None:
        nonlocal error
        if error is None:
            try:
                action()
            except Exception as exc:  # judged below, once every rank has said how it went
                error = exc

    def agreed() -> None:
        if agree(error is None):
            return
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            if trash.is_dir() and not final.exists():  # failed between moving the old one aside and the rename
                os.replace(trash, final)
        if error is not None and not isinstance(error, _NoRoom) and not is_disk_full(error):
            raise error  # not a full disk: the error as it is, with its traceback
        if rank != 0:
            raise CheckpointWriteError(f"checkpoint {final.name} was not written (rank 0 says why)")
        raise CheckpointWriteError(_failure_message(root, step, needed, own_failure=error is not None)) from None

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        # Old checkpoints are pruned only after this one is in place: it needs its whole size free now.
        if needed > shutil.disk_usage(root).free:
            raise _NoRoom()
        tmp.mkdir()

    def own() -> None:
        known.update(write_own(tmp))

    def commit() -> None:
        fsync_files(tmp, skip=known)  # before the manifest vouches for them (the ranks flushed theirs)
        write_manifest(tmp, known)
        _fsync_dir(tmp)
        # A checkpoint of the same step from an earlier attempt is moved aside first and deleted only
        # after the new one is in place, so a kill at any moment leaves one of the two whole.
        if final.exists():
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(trash, ignore_errors=True)

    if rank == 0:
        attempt(prepare)
    agreed()
    attempt(own)
    for entries in (gather(dict(known)) if gather is not None else [dict(known)]):
        known.update(entries or {})
    if rank == 0:
        attempt(lambda: write_main(tmp))
    agreed()
    if rank == 0:
        attempt(commit)
    agreed()
    return final


def remove_leftovers(root: Path, say: Callable[[str], None] | None = print) -> list[Path]:
    """Put right what a failed or killed save left in ``root``: ``.tmp-step-N`` (a checkpoint being written)
    and ``.trash-step-N`` (one being replaced or pruned). Where ``step-N`` is missing and the folder's
    manifest verifies, the folder is the only whole copy of step N (a kill between the two renames of a
    save): it is renamed back to ``step-N``. Everything else is deleted, since it holds disk space and is
    never resumed from. Call it at the start of a run, on the main process, while no save can be running
    (under the run directory's lock). Returns the removed paths; ``say`` gets one line per folder."""
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.iterdir()):  # .tmp-step-N (the newer copy) before .trash-step-N
        match = re.match(r"^\.(?:tmp|trash)-(step-\d{8})$", path.name)
        if not path.is_dir() or not (match or path.name.startswith((".tmp-step-", ".trash-"))):
            continue
        final = root / match.group(1) if match else None
        if final is not None and not final.exists():
            try:
                verify(path)
                os.replace(path, final)
                if say is not None:
                    say(f"recovered checkpoint {final} from {path.name}, left whole by an interrupted save")
                continue
            except CheckpointError:
                pass
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        if say is not None:
            say(f"removed leftover {path} ({_mib(size)}) of an interrupted or failed checkpoint save")
    return removed


def _save_synced(obj, path: Path) -> dict:
    """torch.save, flushed to disk; returns the file's manifest entry."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


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


def read_state(folder: Path, verify_first: bool = True) -> TrainingState:
    """Read a checkpoint's training state only (no tensors are loaded), after verifying the checkpoint unless
    the caller just did (``verify_first=False``)."""
    if verify_first:
        verify(folder)
    try:
        return TrainingState(**json.loads((folder / "state.json").read_text()))
    except Exception as exc:  # a verified file that still does not parse (written by another version)
        raise CheckpointError(f"{folder}: cannot read state.json ({str(exc).splitlines()[0]})") from None


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
    return model_state, optimizer_state, load_rng(folder, rank), state


def load_rng(folder: Path, rank: int) -> dict | None:
    """This rank's RNG states in a checkpoint; None if the checkpoint had fewer ranks."""
    rng_path = folder / f"rng-rank{rank}.pt"
    return _torch_load(rng_path) if rng_path.is_file() else None


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
