"""``toolkit checkpoint convert CKPT --to whole``: a sharded checkpoint as a whole one, for export.

The copy is an ordinary whole checkpoint (model.safetensors, optimizer.pt, the RNG files, state.json and a
manifest): plain PyTorch and safetensors read it, and a run resumes from it (``checkpoint.resume=PATH``) as
from the sharded original. The model file is streamed from the shards a tensor at a time; optimizer.pt is one
torch.save, so the optimizer's whole state is in memory once (what ``whole`` means).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from toolkit import checkpoint, pieces, shards
from toolkit.config import ConfigError


def convert_to_whole(source: Path, out: Path | None = None) -> Path:
    """Write ``source`` (a sharded checkpoint folder, or a run directory: its newest valid checkpoint) as a whole
    checkpoint in ``out`` (default: beside it, ``<name>-whole``, which a run never resumes from by itself);
    returns ``out``. Raises ConfigError with one line for a folder that is not a valid sharded checkpoint or an
    ``out`` that exists."""
    source = Path(source)
    if not (source / checkpoint.MANIFEST).exists() and (source / "checkpoints").is_dir():  # a run directory
        newest = checkpoint.newest_valid(source / "checkpoints")
        if newest is None:
            raise ConfigError(f"checkpoint convert: {source}/checkpoints holds no valid checkpoint")
        source = newest
    out = Path(out) if out else source.with_name(f"{source.name}-whole")
    try:
        checkpoint.verify(source)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(f"checkpoint convert: {exc}") from None
    if not shards.is_sharded(source):
        raise ConfigError(f"checkpoint convert: {source} is already a whole checkpoint (it has no {shards.INDEX})")
    if out.exists():
        raise ConfigError(f"checkpoint convert: {out} exists; remove it or pass --out DIR")
    reader = shards.ShardReader(source)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        shards.write_model_file(reader, tmp / "model.safetensors")
        groups = reader.index["optimizer"]["param_groups"]
        torch.save(pieces.plain_optimizer_state(reader, groups), tmp / "optimizer.pt")
        for path in source.iterdir():
            if path.name.startswith("rng-rank") or path.name == "state.json":
                shutil.copy2(path, tmp / path.name)
        checkpoint.fsync_files(tmp)  # on disk before the manifest vouches for them
        checkpoint.write_manifest(tmp)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
