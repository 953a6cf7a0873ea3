"""One step interface over plain DDP (through Accelerate) and DeepSpeed, so that the training loop reads as one
path::

    with steps.accumulating(not last):      # no gradient all-reduce on accumulation micro-steps
        loss_sum, n_targets = model(batch)
        steps.backward(loss_sum, sync=last)
    applied, grad_norm = steps.step(global_targets, step_number)

**The loss is exact whatever the split.** The model returns the *sum* of its per-target losses and the
number of targets; the backward pass runs on the sum. Once the step's gradients are all-reduced (DDP and
DeepSpeed *average* them over the ranks), ``step`` multiplies them by ``world / global_targets``, the
number of targets in the whole global batch (all micro-steps, all ranks: one scalar all-reduce per step),
which turns the average of sums into the mean over every target of the global batch. The count need not
be known before the first micro-step, so a masked or variable-length batch weighs exactly (averaging
per-micro-batch means is the classic bug, transformers#34191).

**Under DeepSpeed** the engine owns the backward pass and the update: ``engine.backward`` (with
``scale_wrt_gas=False``: the division is ours) then ``engine.step`` after every micro-step, which applies
the update, clipped, at the accumulation boundary only. The division by the global count happens inside
that last ``engine.step``, as the *unscaling* of a loss scale: ZeRO's optimizers divide the gradients by
their loss scale and clip the result (and report the unscaled norm), so setting that scale to
``global_targets / world`` for the one call divides exactly as DDP's path does. Stage 0 keeps plain
gradients (``p.grad``), divided directly; DeepSpeed's BF16_Optimizer keeps them in its fp32 buffers.
"""

from __future__ import annotations

import contextlib

import torch

from toolkit.config import ConfigError
from toolkit.errors import NonFiniteError

CONTRACT = ("model(batch) must return (loss_sum, n_targets): the sum (not the mean) of the per-target losses of "
            "the micro-batch and how many targets it had")


def check_contract(out) -> tuple[torch.Tensor, torch.Tensor | int | float]:
    """A model's output as ``(loss_sum, n_targets)``, or ConfigError naming the contract (a plain mean, a
    transformers output, a per-target loss ...)."""
    if isinstance(out, tuple | list) and len(out) == 2 and torch.is_tensor(out[0]) and out[0].dim() == 0:
        n_targets = out[1]
        if torch.is_tensor(n_targets) and n_targets.numel() == 1:
            return out[0], n_targets.reshape(())
        if isinstance(n_targets, int | float):
            return out[0], n_targets
        raise ConfigError(f"{CONTRACT}; its n_targets is {type(n_targets).__name__}"
                          + (f" of shape {tuple(n_targets.shape)}" if torch.is_tensor(n_targets) else "")
                          + ", not one number")
    if hasattr(out, "logits"):
        got = f"a {type(out).__name__} (a transformers model: use model.source=hf, or wrap it in toolkit.hf.HFCausalLM)"
    elif torch.is_tensor(out):
        got = f"a tensor of shape {tuple(out.shape)}" + (" (a mean loss?)" if out.dim() == 0 else "")
    else:
        got = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple | list) else "")
    raise ConfigError(f"{CONTRACT}; got {got}")


def check_gradients(model: torch.nn.Module, where: str) -> None:
    """Debug mode: the first parameter whose gradient is not finite stops the run."""
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise NonFiniteError(f"non-finite gradient in parameter '{name}' {where}")


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class DDPSteps:
    """Accelerate's model (DDP when there are several processes) and a PyTorch optimizer. The calls go to PyTorch
    directly: Accelerate's wrappers for them only matter for fp16 loss scaling, FSDP and XLA, none of which runs
    here, and they cost a few per cent of a small model's step (``toolkit bench parity``)."""

    def __init__(self, model, optimizer, grad_clip: float, world_size: int):
        self.model, self.grad_clip, self.world_size = model, grad_clip, world_size
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside Accelerate's
        self.params = [p for p in model.parameters() if p.requires_grad]
        inner = getattr(model, "_orig_mod", model)  # model.compile wraps DDP (Accelerate compiles last)
        self.ddp = inner if isinstance(inner, torch.nn.parallel.DistributedDataParallel) else None

    def accumulating(self, accumulate: bool):
        """DDP decides in forward whether the coming backward all-reduces (``no_sync`` clears
        ``require_backward_grad_sync``, which forward reads), so forward and backward both run inside."""
        return self.ddp.no_sync() if accumulate and self.ddp is not None else contextlib.nullcontext()

    def backward(self, loss_sum: torch.Tensor, sync: bool) -> None:
        loss_sum.backward()

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def step(self, global_targets: torch.Tensor, number: int) -> tuple[bool, torch.Tensor]:
        """Divide by the global count, clip, and update unless the gradient norm is not finite. Returns (applied,
        norm). The gradient is all-reduced, so its norm is the same on every rank and all decide alike; the
        check is the loop's one host sync per step (AMP's GradScaler makes the same check the same way)."""
        grads = self.grads()
        torch._foreach_mul_(grads, (self.world_size / global_targets.double()).float())
        if self.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            grad_norm = global_norm(grads)
        applied = bool(torch.isfinite(grad_norm))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm


class DeepSpeedSteps:
    """A DeepSpeed engine (ZeRO stage 0-3)."""

    def __init__(self, engine, plain_model, world_size: int):
        self.engine, self.plain_model, self.world_size = engine, plain_model, world_size
        self.params = [p for p in plain_model.parameters() if p.requires_grad]

    def accumulating(self, accumulate: bool):
        return contextlib.nullcontext()  # the engine skips the reduction off the accumulation boundary itself

    def backward(self, loss_sum: torch.Tensor, sync: bool) -> None:
        # A new autograd node (clone) for engine.backward: DeepSpeed hooks the model's output tensors to divide
        # their gradient by the accumulation steps unless engine.backward's own hook on the loss ran first, and
        # hooks on one tensor run in the order they were registered (the output's at forward) -- so on the
        # model's own loss tensor stage 0 would divide by the accumulation steps after all.
        self.engine.backward(loss_sum.clone(), scale_wrt_gas=False)
        if not sync:
            self.engine.step()  # not a boundary: only counts the micro-step

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def step(self, global_targets: torch.Tensor, number: int) -> tuple[bool, torch.Tensor]:
        """The boundary's ``engine.step``: divided by the global count, clipped, and applied unless ZeRO found a
        non-finite gradient. Stage 0 in fp32 cannot skip: a non-finite norm there stops the run."""
        scale = float(global_targets) / self.world_size
        optimizer = self.engine.optimizer
        stage0_norm, zero_scale = None, None
        if hasattr(optimizer, "loss_scaler") and hasattr(type(optimizer), "loss_scale"):
            zero_scale = optimizer.loss_scale  # ZeRO 1-3: unscaled (divided) and clipped inside step()
            optimizer.loss_scale = scale
        elif hasattr(optimizer, "fp32_groups_gradients_flat"):
            # DeepSpeed's BF16_Optimizer (ZeRO-1 with an fp32 grad_accum_dtype): its fp32 gradient buffers, reduced
            # by the boundary's backward, are what it clips and applies.
            torch._foreach_div_(optimizer.fp32_groups_gradients_flat, scale)
        else:  # stage 0 (fp32, or bf16 through DeepSpeed's unfused optimizer): p.grad, all-reduced by now
            grads = self.grads()
            torch._foreach_div_(grads, scale)
            stage0_norm = global_norm(grads)  # DeepSpeed clips stage 0 without keeping the norm
        try:
            self.engine.step()
        finally:
            if zero_scale is not None:
                optimizer.loss_scale = zero_scale
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float(stage0_norm if grad_norm is None else grad_norm))
        finite = bool(torch.isfinite(grad_norm))
        if self.engine.was_step_applied() and not finite:
            # Stage 0 in fp32 has no overflow check: the update is already applied and cannot be taken back.
            raise NonFiniteError(f"non-finite gradient norm ({grad_norm.item()}) at step {number} under deepspeed.stage=0, which "
                                 f"cannot skip a step; use ZeRO 1-3 or plain DDP")
        return self.engine.was_step_applied() and finite, grad_norm
