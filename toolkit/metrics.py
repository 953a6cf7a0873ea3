"""Measurements of a run that are not the loss: the gradient noise scale and MFU (memory: toolkit/memory.py).

The simple noise scale of McCandlish et al. (2018, "An Empirical Model of Large-Batch Training",
appendix A) is ``B_simple = tr(Sigma) / |G|^2``: the per-sample gradient covariance's trace over the true
gradient's squared norm. Batches much smaller than it waste steps on noise, much larger waste samples.
It is estimated for free from two gradient norms data-parallel training already has: that of a small
batch (one micro-batch on one rank, before the all-reduce) and that of the big batch (the global one).
For a batch of B samples, ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``, so two batch sizes give two equations:

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Both are unbiased; their ratio is not, and each is noisy, so each is smoothed with an exponential moving
average and the ratio is taken of the averages (as the paper does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def noise_scale_terms(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates of (|G|^2, tr(Sigma)) from the squared gradient norms of two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small} and {b_big}")
    return _terms(small_sq, big_sq, b_small, b_big)


def _terms(small_sq, big_sq, b_small, b_big):
    """``noise_scale_terms`` without the check (which would read device tensors back to the host)."""
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


@dataclass
class NoiseScale:
    """Exponential moving averages of |G|^2 and tr(Sigma), and their ratio B_simple."""

    decay: float = 0.95
    """EMA decay per update (0.95: about the last 20 steps count)."""

    grad_sq: float | None = None
    trace: float | None = None

    def update(self, small_sq: float, big_sq: float, b_small: float, b_big: float) -> None:
        """Add one step's norms. Nothing is returned: the terms may be device tensors, and reading the ratio
        back every step would make each step wait for the device (``value`` reads it when asked)."""
        grad_sq, trace = noise_scale_terms(small_sq, big_sq, b_small, b_big)
        if self.grad_sq is None:
            self.grad_sq, self.trace = grad_sq, trace
        else:
            self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
            self.trace = self.decay * self.trace + (1 - self.decay) * trace

    @property
    def value(self) -> float | None:
        """B_simple, or None until both smoothed terms are positive (their ratio means nothing before)."""
        if self.grad_sq is None or self.grad_sq <= 0 or self.trace <= 0:
            return None
        return float(self.trace / self.grad_sq)


# Dense bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets (without sparsity), matched as
# substrings of ``torch.cuda.get_device_name()`` in this order (so that "H100 PCIe" wins over "H100" and
# "L40S" over "L4"). MFU is reported for bf16 runs on these devices only: on a CPU, in fp32 (where the
# peak depends on whether TF32 is allowed) or on an unknown device it is left out rather than guessed.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's peak FLOP/s for ``precision``, or None when it is not known (see PEAK_BF16_FLOPS)."""
    if precision != "bf16":
        return None
    return next((peak for name, peak in PEAK_BF16_FLOPS if name in device_name), None)


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the FLOP/s the model's training math needs over the device's peak."""
    return tokens_per_s_per_device * flops_per_token / peak if peak else None


class Throughput:
    """The training clock: wall time of the training steps only, over all of a run's segments.

    Validation and checkpoints pause it (``pause_since``); a log step reads the interval since the last one
    (``lap``), which ends at the host sync that reading the loss makes anyway."""

    def __init__(self, train_time_s: float, step: int):
        self.train_time_s = train_time_s  # up to the last lap (a resumed run starts with its earlier segments')
        self.restart(step)

    def restart(self, step: int) -> None:
        self.lap_started, self.lap_step = time.perf_counter(), step

    def pause_since(self, started: float) -> None:
        """Move the clock past work that is not training and began at ``started``."""
        self.lap_started += time.perf_counter() - started

    def now(self, step: int) -> float:
        """Training time up to ``step``, the steps since the last lap included."""
        return self.train_time_s + (time.perf_counter() - self.lap_started if step > self.lap_step else 0.0)

    def lap(self, step: int) -> tuple[float, int]:
        """(seconds, steps) since the last lap, added to the training time; the next lap starts now."""
        elapsed, steps = time.perf_counter() - self.lap_started, step - self.lap_step
        self.train_time_s += elapsed
        self.restart(step)
        return elapsed, steps


def speed_record(elapsed: float, steps: int, samples: int, tokens_per_sample: float, world_size: int,
                 flops_per_token: float | None, peak: float | None) -> dict:
    """A log step's speed over ``steps`` steps of ``samples`` samples in ``elapsed`` seconds."""
    tokens_per_s = samples * tokens_per_sample / elapsed if elapsed > 0 else 0.0
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / world_size,
        "samples_per_s": tokens_per_s / tokens_per_sample,
        "step_time_s": elapsed / max(steps, 1),
        "mfu": mfu(tokens_per_s / world_size, flops_per_token, peak) if flops_per_token else None,
    }


def local_norm_hook(probe, bucket):  # no annotations: DDP checks them against objects, not strings
    """DDP communication hook: add the squared norm of this rank's gradient bucket (before the all-reduce) to
    ``probe.small_sq``, then all-reduce it as DDP does by default."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    probe.small_sq = probe.small_sq + torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square()
    return default_hooks.allreduce_hook(None, bucket)


NOISE_KEYS = ("noise_scale", "critical_batch_tokens", "noise_grad_sq", "noise_trace")


class NoiseProbe:
    """The gradient noise scale of a run, from the two gradient norms each step already has: this rank's
    first micro-batch before the all-reduce (``take_small``, or ``local_norm_hook`` when a step has one
    micro-step), and the global batch after it. Batch sizes count targets, since the loss is a mean over them."""

    def __init__(self, decay: float, device: torch.device, tokens_per_sample: float):
        self.estimate = NoiseScale(decay)
        self.device = device
        # Targets per sample, measured at every update; and whether any update counted (both on the device).
        self.tokens_per_sample = torch.tensor(float(tokens_per_sample), device=device)
        self.started = torch.zeros((), dtype=torch.bool, device=device)
        self.begin_step()

    def begin_step(self) -> None:
        self.small_sq = torch.zeros((), device=self.device)

    def take_small(self, grads: list[torch.Tensor]) -> None:
        """After the first micro-step's backward (not yet all-reduced, nothing else added)."""
        self.small_sq = torch.stack(torch._foreach_norm(grads)).square().sum()

    def update(self, grad_norm: torch.Tensor, small_targets, global_targets, samples: int) -> None:
        """One step's estimate. The small gradient is of the first micro-batch's *summed* loss, so its mean
        gradient is that over ``small_targets``; the big one is already the global batch's mean. The counts may
        be device tensors: all of it stays on the device (no host sync), and a step whose first micro-batch has
        no target, or every target of the step, counts for nothing (``torch.where`` instead of an ``if``)."""
        small = torch.as_tensor(small_targets, device=self.device).float()
        big = torch.as_tensor(global_targets, device=self.device).float()
        ok = (small > 0) & (small < big)
        small, big = torch.where(ok, small, 1.0), torch.where(ok, big, 2.0)  # (no division by zero when not ok)
        grad_sq, trace = _terms(self.small_sq / small**2, grad_norm.float().square(), small, big)
        e = self.estimate
        if e.grad_sq is None:
            e.grad_sq, e.trace = torch.zeros_like(grad_sq), torch.zeros_like(trace)
        smoothed = [torch.where(self.started, e.decay * old + (1 - e.decay) * new, new)
                    for old, new in ((e.grad_sq, grad_sq), (e.trace, trace))]
        e.grad_sq, e.trace = (torch.where(ok, new, old) for new, old in zip(smoothed, (e.grad_sq, e.trace), strict=True))
        self.tokens_per_sample = torch.where(ok, big / samples, self.tokens_per_sample)
        self.started = self.started | ok

    def value(self) -> tuple[float | None, float | None]:
        """(B_simple in samples, in targets), or (None, None) while it is not available."""
        if self.unavailable() is not None:
            return None, None
        targets = float(self.estimate.value)
        return targets / float(self.tokens_per_sample), targets

    def unavailable(self) -> str | None:
        """Why there is no value yet, or None. Both smoothed estimates must be positive: their ratio is
        meaningless otherwise (early on, either can be negative from noise)."""
        e = self.estimate
        if e.grad_sq is None or not bool(self.started):
            return "no step measured yet"
        if float(e.grad_sq) <= 0:
            return "the |G|^2 estimate is not positive yet (too few steps, or a batch far below the noise scale)"
        if float(e.trace) <= 0:
            return "the tr(Sigma) estimate is not positive yet (too few steps)"
        return None

    def record(self) -> dict:
        """A log step's noise scale (in samples and in targets) and the two moving estimates behind it (per
        target): |G|^2 and tr(Sigma)."""
        noise_scale, critical_targets = self.value()
        terms = self.state() or [None, None]
        return {"noise_scale": noise_scale, "critical_batch_tokens": critical_targets, "noise_grad_sq": terms[0],
                "noise_trace": terms[1]}

    def state(self) -> list[float] | None:
        """What a checkpoint keeps: the two moving averages."""
        e = self.estimate
        return None if e.grad_sq is None or not bool(self.started) else [float(e.grad_sq), float(e.trace)]

    def restore(self, state: list[float] | None) -> None:
        if state is not None:
            self.estimate.grad_sq, self.estimate.trace = (torch.tensor(v, device=self.device) for v in state)
            self.started = torch.ones((), dtype=torch.bool, device=self.device)
