"""Sharded checkpoint files: every rank writes the pieces of the states it holds, in parallel, and one index
says where every piece of every tensor lies, so that any number of processes in any mode reads back exactly
the elements it needs.

Inside a checkpoint folder (beside ``state.json``, ``rng-rank<R>.pt`` and ``manifest.json``, see checkpoint.py):

* ``shard-rank<R>.safetensors``: rank R's pieces. A piece is a run of one tensor's elements in flattened
  order, stored under ``<tensor>@<offset>``. The tensors are ``param/<i>`` (the fp32 weights of the optimizer's
  i-th parameter), ``exp_avg/<i>`` and ``exp_avg_sq/<i>`` (its AdamW moments) and ``buffer/<name>``.
* ``index.json``: every tensor's shape, dtype and pieces ``[rank, offset, length]`` (which tile it exactly, checked
  when written); the model's state-dict names of the parameters (tied weights name one tensor twice); the
  optimizer's step count and groups.

Why not ``torch.distributed.checkpoint`` (DCP), which has the same design: its ``.metadata`` file is read with
``pickle.load``, so a checkpoint folder could run code when resumed (this toolkit's checkpoints load without
unpickling anything: safetensors and JSON here, ``torch.load(weights_only=True)`` for the RNG); and ZeRO holds
each parameter as an arbitrary run of its flattened elements, which DCP can only describe through the deprecated
``ShardedTensor``. Safetensors' own ``save_file`` builds the whole file in memory first, so the writer here
streams each piece from the tensor's memory to the file (and through SHA-256 for the manifest) instead: a rank
needs no memory beyond its pieces (one piece's CPU copy when they live on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "index.json"
BLOCK = 64 << 20
"""Bytes handed to one write() call (and to SHA-256) at a time: the writer's buffer is a view, never a copy."""
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def shard_name(rank: int) -> str:
    return f"shard-rank{rank}.safetensors"


@dataclass
class Piece:
    """A run of one tensor's elements that this rank holds (a flat view of them, on any device)."""

    tensor: str
    offset: int
    data: torch.Tensor


def write_safetensors(path: Path, entries: list[tuple[str, list[int], torch.dtype, object]]) -> dict:
    """Write a safetensors file of ``entries`` (key, shape, dtype, a function returning the tensor), streaming
    each tensor from its memory when the writer reaches it (a GPU tensor is copied to the CPU one at a time);
    flushed to disk. Returns ``{"bytes", "sha256"}`` of the file, as the manifest records it."""
    header, offset = {}, 0
    for key, shape, dtype, _ in entries:
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digest, written = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
        for _, _, _, get in entries:
            data = get().detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # a view of a CPU tensor
            view = memoryview(data.numpy())
            for start in range(0, len(view), BLOCK):
                block = view[start:start + BLOCK]
                f.write(block)
                digest.update(block)
            written += len(view)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": written, "sha256": digest.hexdigest()}


def write_shard(folder: Path, rank: int, pieces: list[Piece]) -> dict[str, dict]:
    """This rank's shard file; returns its manifest entry ``{name: {"bytes", "sha256"}}``."""
    entries = [(f"{p.tensor}@{p.offset}", [p.data.numel()], p.data.dtype, lambda p=p: p.data)
               for p in pieces if p.data.numel()]
    return {shard_name(rank): write_safetensors(folder / shard_name(rank), entries)}


def describe(pieces: list[Piece]) -> list[tuple[str, int, int]]:
    """What the index needs of a rank's pieces: (tensor, offset, length)."""
    return [(p.tensor, p.offset, p.data.numel()) for p in pieces if p.data.numel()]


def build_index(tensors: dict[str, tuple[list[int], torch.dtype]], pieces_by_rank: list[list[tuple[str, int, int]]],
                names: dict[str, str], optimizer: dict) -> dict:
    """The index of a sharded checkpoint. ``tensors``: every tensor's shape and dtype; ``pieces_by_rank[r]``:
    rank r's pieces; ``names``: state-dict name -> tensor. Raises ValueError unless every tensor is tiled
    exactly once by the pieces (a bug, never a user's mistake: nothing would be written)."""
    entries = {name: {"shape": list(shape), "dtype": DTYPES[dtype], "pieces": []} for name, (shape, dtype) in tensors.items()}
    for rank, pieces in enumerate(pieces_by_rank):
        for tensor, offset, length in pieces:
            entries[tensor]["pieces"].append([rank, offset, length])
    for name, entry in entries.items():
        entry["pieces"].sort(key=lambda p: p[1])
        position = 0
        for _, offset, length in entry["pieces"]:
            if offset != position:
                raise ValueError(f"sharded checkpoint: {name}'s pieces leave a gap or overlap at element {position}")
            position += length
        if position != _numel(entry["shape"]):
            raise ValueError(f"sharded checkpoint: {name}'s pieces cover {position} of {_numel(entry['shape'])} elements")
    return {"format": "sharded", "shards": len(pieces_by_rank), "tensors": entries, "names": names, "optimizer": optimizer}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardReader:
    """Reads runs of a sharded checkpoint's tensors, touching only the pieces that overlap them (the files are
    memory-mapped; nothing else is read)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = json.loads((folder / INDEX).read_text())
        self.tensors: dict = self.index["tensors"]
        self._files: dict[int, object] = {}

    def numel(self, tensor: str) -> int:
        return _numel(self.tensors[tensor]["shape"])

    def read(self, tensor: str, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Elements ``start .. start+length`` of ``tensor`` (flattened), as a new 1-D CPU tensor."""
        entry = self.tensors[tensor]
        length = self.numel(tensor) - start if length is None else length
        out = torch.empty(length, dtype=DTYPE_NAMES[entry["dtype"]])
        for rank, offset, size in entry["pieces"]:
            lo, hi = max(start, offset), min(start + length, offset + size)
            if lo < hi:
                piece = self._file(rank).get_slice(f"{tensor}@{offset}")
                out[lo - start:hi - start] = piece[lo - offset:hi - offset]
        return out

    def whole(self, tensor: str) -> torch.Tensor:
        return self.read(tensor).reshape(self.tensors[tensor]["shape"])

    def model_names(self) -> dict[str, str]:
        """State-dict name -> tensor, parameters and buffers."""
        return self.index["names"]

    def _file(self, rank: int):
        if rank not in self._files:
            self._files[rank] = safe_open(str(self.folder / shard_name(rank)), framework="pt")
        return self._files[rank]


def is_sharded(folder: Path) -> bool:
    return (folder / INDEX).is_file()


def write_model_file(reader: ShardReader, path: Path) -> dict:
    """The whole model state dict as one safetensors file (final/model.safetensors, or an export), assembled one
    tensor at a time from the shards: the largest tensor is the memory it needs. Written under ``.tmp`` and
    renamed into place; returns its manifest entry."""
    entries = []
    for name, tensor in reader.model_names().items():
        entry = reader.tensors[tensor]
        entries.append((name, entry["shape"], DTYPE_NAMES[entry["dtype"]], lambda t=tensor: reader.read(t)))
    tmp = path.with_name(path.name + ".tmp")
    written = write_safetensors(tmp, entries)
    tmp.replace(path)
    return written
