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

from dataclasses import dataclass


def noise_scale_terms(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates of (|G|^2, tr(Sigma)) from the squared gradient norms of two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got {b_small} and {b_big}")
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
