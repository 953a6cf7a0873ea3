"""Which pieces of the model and optimizer states this rank holds (what it writes into a sharded checkpoint), and
putting a sharded checkpoint's pieces back where this rank holds them (under any world size and mode).

* DDP and ZeRO stage 0 in fp32: every rank holds every state whole, so the ranks split the work: rank r writes
  elements ``[n*r/W, n*(r+1)/W)`` of every tensor of n elements, and a resuming rank reads them all.
* ZeRO-1/2: DeepSpeed's ``_hp_mapping`` says which run of each parameter's flattened elements this rank's fp32
  partition holds (``lp_fragment_address``) and gives views of the weights and moments there.
* ZeRO-3: parameter p's elements ``[r*s, r*s+s)`` live on rank r (s = ``p.partition_numel()``, the last
  partition padded), with views through DeepSpeed's local API.

Tensors: ``param/<i>``, ``exp_avg/<i>``, ``exp_avg_sq/<i>`` for the optimizer's i-th parameter (the order of
``optimizer.pt`` in a whole checkpoint); ``buffer/<name>`` and ``frozen/<name>`` (parameters the optimizer does not
hold), written whole by rank 0.
"""

from __future__ import annotations

import torch

from toolkit import zero
from toolkit.shards import Piece, ShardReader

ADAM_STATES = zero.ADAM_STATES


def _shape(p: torch.nn.Parameter) -> list[int]:
    return list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 empties p itself; ds_shape is the whole shape


def _zero3_range(p, rank: int) -> tuple[int, int, int]:
    """(start, valid length, partition size) of rank's ZeRO-3 partition of p."""
    size = p.partition_numel()
    start = rank * size
    return start, max(0, min(size, p.ds_numel - start)), size


def local_pieces(params: list[torch.nn.Parameter], optimizer, zero_optimizer, model: torch.nn.Module,
                 rank: int, world_size: int) -> tuple[list[Piece], dict]:
    """This rank's pieces (views where the states live: nothing is copied) and the tensors' shapes and dtypes
    ``{tensor: (shape, dtype)}``. ``optimizer`` is the torch optimizer of a run without ZeRO shards,
    ``zero_optimizer`` DeepSpeed's (None without it)."""
    pieces, tensors = [], {}
    if zero_optimizer is not None:
        zero.relink_fragments(zero_optimizer)  # (ZeRO-1/2: the groups stepped after the first are linked too)
    state = optimizer.state if zero_optimizer is None else {}
    for i, p in enumerate(params):
        shape = _shape(p)
        names = [f"param/{i}"] + ([f"{k}/{i}" for k in ADAM_STATES] if _has_moments(p, state, zero_optimizer) else [])
        tensors.update({n: (shape, torch.float32) for n in names})
        if zero_optimizer is None:  # whole on every rank: an even split of the elements
            n = p.numel()
            lo, hi = n * rank // world_size, n * (rank + 1) // world_size
            views = [p.detach()] + [state[p][k] for k in ADAM_STATES if len(names) > 1]
            pieces += [Piece(name, lo, v.reshape(-1)[lo:hi]) for name, v in zip(names, views, strict=True)]
        elif hasattr(p, "ds_id"):  # ZeRO-3
            start, valid, _ = _zero3_range(p, rank)
            views = [_zero3_view(p, None)] + [_zero3_view(p, k) for k in ADAM_STATES if len(names) > 1]
            pieces += [Piece(name, start, v.reshape(-1)[:valid]) for name, v in zip(names, views, strict=True)]
        elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2 (or DeepSpeed's bf16 optimizer)
            m = p._hp_mapping
            start = m.lp_fragment_address.start
            views = [m.hp_fragment] + [m.get_optim_state_fragment(k) for k in ADAM_STATES if len(names) > 1]
            pieces += [Piece(name, start, v.reshape(-1)) for name, v in zip(names, views, strict=True)]
    if rank == 0:
        named = dict(model.named_parameters())
        for name in frozen_parameters(model, params):  # whole on every rank (not under ZeRO-3: refused there)
            p = named[name]
            tensors[f"frozen/{name}"] = (list(p.shape), p.dtype)
            pieces.append(Piece(f"frozen/{name}", 0, p.detach().reshape(-1)))
        persistent = model.state_dict().keys()
        for name, b in model.named_buffers():
            if name in persistent:
                tensors[f"buffer/{name}"] = (list(b.shape), b.dtype)
                pieces.append(Piece(f"buffer/{name}", 0, b.detach().reshape(-1)))
    return pieces, tensors


def _zero3_view(p, key: str | None) -> torch.Tensor:
    """A view of this rank's ZeRO-3 partition of p's fp32 weights (``key`` None) or of an AdamW moment, where it
    lives. DeepSpeed's ``safe_get_local_fp32_param`` / ``safe_get_local_optimizer_state`` return the same elements
    moved to the accelerator, which with the optimizer offloaded to the CPU is a GPU copy of the whole partition."""
    view, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=True, optim_state_key=key)
    return view


def _has_moments(p, state: dict, zero_optimizer) -> bool:
    """Whether the optimizer has stepped (no moments exist before the first step, as in torch)."""
    if zero_optimizer is None:
        return p in state and "exp_avg" in state[p]
    return bool(zero_optimizer.optimizer.state)


def frozen_parameters(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[str]:
    """Names of the model's parameters the optimizer does not hold (frozen: ``requires_grad=False``)."""
    held = {id(p) for p in params}
    return [name for name, p in model.named_parameters() if id(p) not in held]


def state_dict_names(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[str, str]:
    """The model's state-dict names -> tensors (tied weights: both names, one tensor; a frozen parameter is written
    whole by rank 0, as ``frozen/<name>``)."""
    tensor = {id(p): f"param/{i}" for i, p in enumerate(params)}
    for name, p in model.named_parameters():  # (a tied frozen parameter's first name is the one written)
        tensor.setdefault(id(p), f"frozen/{name}")
    names = {name: tensor[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    persistent = model.state_dict().keys()
    names.update({name: f"buffer/{name}" for name, _ in model.named_buffers() if name in persistent})
    return names


def optimizer_step(optimizer, zero_optimizer) -> float | None:
    """The optimizer's step count (the same for every parameter), None before the first step."""
    inner = zero_optimizer.optimizer if zero_optimizer is not None else optimizer
    for s in inner.state.values():
        if "step" in s:
            return float(s["step"])
    return None


# ------------------------------------------------------------------------------------------ restoring
def load_weights(model: torch.nn.Module, reader: ShardReader) -> None:
    """Copy the checkpoint's weights and buffers into the plain model (before the engine is built), one tensor at a
    time. Refuses a checkpoint of another model, naming the names that differ."""
    names = reader.model_names()
    own = model.state_dict()
    if own.keys() != names.keys():
        missing, unexpected = sorted(own.keys() - names.keys()), sorted(names.keys() - own.keys())
        raise ValueError(f"{reader.folder}: the checkpoint is of another model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, tensor in own.items():
            value = reader.whole(names[name])
            if list(value.shape) != list(tensor.shape):
                raise ValueError(f"{reader.folder}: {name} has shape {list(value.shape)}, the model {list(tensor.shape)}")
            tensor.copy_(value)


def plain_optimizer_state(reader: ShardReader, layout: list[dict]) -> dict:
    """A whole ``torch.optim.AdamW.state_dict()`` read from the shards (for a run without ZeRO shards, where every
    rank holds the optimizer whole). ``layout``: the groups as ``zero.remember_groups`` describes them."""
    saved = reader.index["optimizer"]
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in saved["param_groups"]]
    state = {}
    if saved["step"] is not None:
        for i in range(sum(len(g["params"]) for g in layout)):
            if f"exp_avg/{i}" in reader.tensors:  # (a parameter that never had a gradient has no moments, as in torch)
                state[i] = {"step": torch.tensor(saved["step"], dtype=torch.float32),
                            **{k: reader.whole(f"{k}/{i}") for k in ADAM_STATES}}
    return {"state": state, "param_groups": groups}


def load_zero_optimizer_state(params: list[torch.nn.Parameter], zero_optimizer, reader: ShardReader, rank: int) -> None:
    """Put the checkpoint's moments into this rank's ZeRO partitions, reading only the elements it holds."""
    step = reader.index["optimizer"]["step"]
    if step is None:
        return
    zero.create_optimizer_states(zero_optimizer, torch.tensor(step, dtype=torch.float32))
    for i, p in enumerate(params):
        for key in ADAM_STATES:
            if f"{key}/{i}" not in reader.tensors:  # no moments (never a gradient): the zeros just created
                continue
            if hasattr(p, "ds_id"):  # ZeRO-3
                from deepspeed.utils import safe_set_local_optimizer_state

                start, valid, size = _zero3_range(p, rank)
                value = torch.zeros(size)
                value[:valid] = reader.read(f"{key}/{i}", start, valid)
                safe_set_local_optimizer_state(p, value, key)
            elif getattr(p, "_hp_mapping", None) is not None:
                m = p._hp_mapping
                target = m.get_optim_state_fragment(key)
                target.copy_(reader.read(f"{key}/{i}", m.lp_fragment_address.start, target.numel()).view_as(target))
