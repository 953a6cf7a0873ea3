"""Helpers shared by the benches: device sync, a CPU copy of the weights, and how far two sets of weights differ."""

from __future__ import annotations

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the plain state dict (unwrapped from torch.compile)."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest over tensors of ``max|a - b| / max|b|`` (per tensor, so a small tensor is not hidden by a
    large one) and the name of that tensor; 0.0 when the weights are bitwise equal."""
    if a.keys() != b.keys():
        raise ValueError(f"different parameters: {sorted(a.keys() ^ b.keys())}")
    worst = (0.0, "")
    for name, ref in b.items():
        diff = (a[name].double() - ref.double()).abs().max().item()
        scale = ref.double().abs().max().item()
        worst = max(worst, (diff / scale if scale > 0 else diff, name))
    return worst


def _log_step(step: int, steps: int, log_every: int) -> bool:
    """The trainer's cadence: every ``log_every`` steps and at the last step."""
    return step % log_every == 0 or step == steps
