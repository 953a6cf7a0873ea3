"""MFU: the peak table is matched by device name (most specific first) and only for bf16."""

from __future__ import annotations

import pytest

from toolkit.metrics import mfu, peak_flops


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("cpu", None),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_by_device_name(name, peak):
    assert peak_flops(name, "bf16") == peak


def test_no_peak_outside_bf16_and_mfu_arithmetic():
    assert peak_flops("NVIDIA H100 80GB HBM3", "no") is None  # fp32: the peak depends on TF32, not guessed
    # GPT-2 small on one H100 (DESIGN.md): 470k tokens/s at 6N + attention FLOPs per token -> ~40% MFU.
    flops_per_token = 6 * 124_000_000 + 12 * 12 * 12 * 64 * 1024
    assert mfu(470_000, flops_per_token, 989e12) == pytest.approx(470_000 * flops_per_token / 989e12)
    assert 0.35 < mfu(470_000, flops_per_token, 989e12) < 0.45
    assert mfu(470_000, flops_per_token, None) is None
