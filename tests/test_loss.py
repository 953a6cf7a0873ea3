"""The chunked output layer + cross-entropy (``toolkit/loss.py``): the plain loss's numbers, a fraction of its memory."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from conftest import PYTHON, child_env, report, run

from toolkit.config import load_config
from toolkit.data import IGNORE
from toolkit.loss import chunked_cross_entropy
from toolkit.model import build_model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The relative error ||a - b|| / ||b||."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def loss_and_grads(hidden, weight, targets, chunk):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_cross_entropy(h, w, targets, chunk)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def test_the_chunked_loss_gives_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3000, 48), torch.randn(1000, 48) * 0.05
    targets = torch.randint(0, 1000, (3000,))
    targets[::5] = IGNORE  # padding counts for nothing, in the loss and in the gradients
    plain = loss_and_grads(hidden, weight, targets, 0)
    assert torch.allclose(plain[0], F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE, reduction="sum"))
    for chunk in (1, 7, 512, 3000, 10_000):  # one token at a time, ragged chunks, one chunk, more than all
        loss, grad_hidden, grad_weight = loss_and_grads(hidden, weight, targets, chunk)
        assert abs(float(loss / plain[0]) - 1) <= 1e-6, chunk
        assert rel(grad_hidden, plain[1]) <= 1e-6 and rel(grad_weight, plain[2]) <= 1e-6, chunk
    # A loss scaled before backward scales the held gradients (the backward pass multiplies by its input).
    h = hidden.clone().requires_grad_()
    (3 * chunked_cross_entropy(h, weight, targets, 512)).backward()
    assert rel(h.grad, 3 * plain[1]) <= 1e-6


def test_the_gpt_trains_the_same_with_and_without_chunks():
    torch.manual_seed(1)
    x, y = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))
    y[1, 20:] = IGNORE
    results = []
    for chunk in (0, 50):
        model = build_model(load_config(overrides=["model.size=nano", "model.vocab_size=256", "data.seq_len=64",
                                                   f"model.loss_chunk={chunk}"]))
        loss, count = model((x, y))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    assert abs(float(loss1 / loss0) - 1) <= 1e-6
    assert max(rel(grads1[n], grads0[n]) for n in grads0) <= 1e-5  # (through 2 blocks of fp32 rounding)


PEAKS = """
import gc, json, sys, torch
from toolkit.loss import chunked_cross_entropy
from toolkit.memory import PeakMeter
torch.manual_seed(0)
hidden, weight = torch.randn(4096, 64), torch.randn(8192, 64) * 0.05
targets = torch.randint(0, 8192, (4096,))
meter, peaks = PeakMeter(torch.device("cpu"), 0), {}
for chunk in (0, 512, 0, 512):  # twice each, alternating: the second measurement of each is kept
    gc.collect()
    meter.reset_peak()
    start = meter.peak_now()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked_cross_entropy(h, w, targets, chunk).backward()
    del h, w
    peaks[chunk] = (meter.peak_now() - start) / 2**20
print(json.dumps(peaks))
"""


def test_the_chunked_loss_peaks_far_lower(request):
    """Measured on the CPU's resident set (the CUDA peak is in ``toolkit bench gpu``), in a process of its own
    whose allocator returns every freed block (MALLOC_MMAP_THRESHOLD_), so that the resident set follows what
    is alive: 4,096 tokens over a vocabulary of 8,192, whose logits alone are 128 MiB in fp32."""
    result = run([PYTHON, "-c", PEAKS], timeout=120, env={**child_env(), "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    assert 8 < peaks[512] < peaks[0] / 3, peaks  # (a chunk's logits and their gradient alone are 2 x 16 MiB)
    report(request, f"peak above the start, MiB: plain {peaks[0]:.1f}, chunks of 512 tokens {peaks[512]:.1f}")


def test_under_bf16_autocast_and_without_gradients_it_is_still_the_plain_loss():
    torch.manual_seed(2)
    hidden, weight = torch.randn(500, 32), torch.randn(300, 32) * 0.05
    targets = torch.randint(0, 300, (500,))
    targets[::3] = IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matrix multiplies in bf16, the softmax in fp32
        plain = loss_and_grads(hidden, weight, targets, 0)
        chunked = loss_and_grads(hidden, weight, targets, 64)
    assert abs(float(chunked[0] / plain[0]) - 1) <= 1e-5
    assert chunked[1].dtype == chunked[2].dtype == torch.float32
    assert rel(chunked[1], plain[1]) <= 1e-2 and rel(chunked[2], plain[2]) <= 1e-2  # (bf16 products, summed apart)
    fp32 = loss_and_grads(hidden, weight, targets, 0)[0]
    with torch.no_grad():  # validation: the loss only, chunk by chunk, no gradient buffers
        assert abs(float(chunked_cross_entropy(hidden, weight, targets, 64) / fp32) - 1) <= 1e-6
