"""The gradient noise scale estimator against a problem where the true value is known analytically.

Linear regression y = x.w* + eps, x ~ N(0, I_d), eps ~ N(0, s^2), loss per sample (x.w - y)^2 / 2 at a
point w = w* + delta. The per-sample gradient is g = x (x.delta - eps), so G = E[g] = delta and, with
Gaussian fourth moments E[x x^T (x.delta)^2] = |delta|^2 I + 2 delta delta^T,
tr(Sigma) = E|g|^2 - |G|^2 = (d + 1)|delta|^2 + d s^2.  Hence B_simple = (d + 1) + d s^2 / |delta|^2.
"""

from __future__ import annotations

import pytest
import torch

from toolkit.metrics import NoiseScale, noise_scale_terms

D, SIGMA = 16, 1.0


def true_values(delta: torch.Tensor) -> tuple[float, float]:
    grad_sq = float(delta.pow(2).sum())
    return grad_sq, (D + 1) * grad_sq + D * SIGMA**2


def batch_gradient(x: torch.Tensor, delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean per-sample gradient of the batch."""
    return (x * (x @ delta - eps)[:, None]).mean(0)


def simulate(delta: torch.Tensor, global_size: int, micro: int, steps: int, seed: int) -> tuple[NoiseScale, list]:
    """Each step: one global batch; the small batch is its first micro-batch (one rank, one micro-step)."""
    generator = torch.Generator().manual_seed(seed)
    estimator, terms = NoiseScale(decay=0.998), []  # ~500 steps: the estimate is an average by nature
    for _ in range(steps):
        x = torch.randn(global_size, D, generator=generator, dtype=torch.float64)
        eps = SIGMA * torch.randn(global_size, generator=generator, dtype=torch.float64)
        small = batch_gradient(x[:micro], delta, eps[:micro])
        big = batch_gradient(x, delta, eps)
        small_sq, big_sq = float(small.pow(2).sum()), float(big.pow(2).sum())
        terms.append(noise_scale_terms(small_sq, big_sq, micro, global_size))
        estimator.update(small_sq, big_sq, micro, global_size)
    return estimator, terms


@pytest.fixture(scope="module")
def delta() -> torch.Tensor:
    d = torch.randn(D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return d / d.norm() * 0.7  # |delta|^2 = 0.49: B_simple = 17 + 16 / 0.49 = 49.7


def test_the_two_terms_are_unbiased(delta):
    grad_sq, trace = true_values(delta)
    _, terms = simulate(delta, 64, 8, steps=4000, seed=1)
    mean_grad_sq = sum(t[0] for t in terms) / len(terms)
    mean_trace = sum(t[1] for t in terms) / len(terms)
    print(f"|G|^2 {mean_grad_sq:.4f} (true {grad_sq:.4f}); tr(Sigma) {mean_trace:.3f} (true {trace:.3f})")
    assert abs(mean_grad_sq - grad_sq) <= 0.1 * grad_sq
    assert abs(mean_trace - trace) <= 0.05 * trace


@pytest.mark.parametrize("global_size, micro", [(64, 8), (64, 4), (64, 16), (128, 8), (32, 2)])
def test_noise_scale_within_20_percent_whatever_the_split(delta, global_size, micro):
    grad_sq, trace = true_values(delta)
    truth = trace / grad_sq
    estimator, _ = simulate(delta, global_size, micro, steps=3000, seed=2)
    print(f"global {global_size}, micro {micro}: B_simple {estimator.value:.1f} (true {truth:.1f})")
    assert abs(estimator.value - truth) <= 0.2 * truth


def test_terms_need_two_different_batch_sizes():
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale_terms(1.0, 0.5, 8, 8)
    assert NoiseScale().value is None
    assert NoiseScale(grad_sq=1.0, trace=-1.17).value is None  # a ratio of terms not yet positive is no estimate
    assert NoiseScale(grad_sq=2.0, trace=64.0).value == 32.0
