"""The language-model loss without the whole micro-batch's logits: the output layer and cross-entropy, in chunks.

The plain way, ``F.cross_entropy(lm_head(h).float(), targets)``, holds the logits of every token of the
micro-batch (tokens x vocabulary), an fp32 copy of them under bf16, and the log-softmax that autograd saves
for the backward pass: for GPT-2 small at micro 32 x 1024 tokens, 6.6 GB per fp32 copy, several times over.
That, not the model, is what stops a micro-batch from growing.

``chunked_cross_entropy`` computes the same sum ``chunk`` tokens at a time. Each chunk's logits are made,
turned into the loss *and* the gradient of the loss with respect to the chunk's hidden states and to the
output weight (``softmax - one_hot``, the cross-entropy's own derivative), and freed; the gradients wait for
the backward pass, which only scales them by the incoming gradient (1 for a loss that is summed). No logits
are recomputed, so the FLOPs are those of the plain way (the idea of Liger Kernel's fused linear
cross-entropy, in plain PyTorch so that it runs on every device). Under autocast the matrix multiplies run
in bf16, as ``nn.Linear`` would, and the softmax in fp32.

The price: the weight's gradient (vocabulary x width, fp32) is held from the forward to the backward pass,
less than one chunk's logits for any chunk above the width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from toolkit.data import IGNORE  # the target id that does not count (padding)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight).float()  # (chunk, vocabulary): the only logits alive at a time
            valid = t != IGNORE
            t = t.masked_fill(~valid, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * valid).sum()
            if want_hidden or want_weight:
                # d loss / d logits = softmax - one_hot(target), zero on ignored targets; in place over the logits.
                grad = logits.sub_(lse[:, None]).exp_()
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad *= valid[:, None]
                grad = grad.to(h.dtype if not torch.is_autocast_enabled(h.device.type) else
                               torch.get_autocast_dtype(h.device.type))
                if want_hidden:
                    grad_hidden[start:start + chunk] = grad @ weight.to(grad.dtype)
                if want_weight:
                    grad_weight += (grad.t() @ h.to(grad.dtype)).float()
                del grad
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    @once_differentiable  # (the gradients were computed in forward: a second derivative is not available)
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="sum")``,
    ``chunk`` rows of ``hidden`` (tokens, width) at a time; ``chunk <= 0``: the plain way, in one piece."""
    if chunk <= 0:
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # Validation (no_grad): the loss alone, chunk by chunk (inside the Function it would compute gradients:
        # ctx.needs_input_grad does not know about no_grad).
        loss = torch.zeros((), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[start:start + chunk], weight).float()
            loss = loss + F.cross_entropy(logits, targets[start:start + chunk], ignore_index=IGNORE, reduction="sum")
        return loss
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
