"""The built-in GPT (nanoGPT's design): pre-norm blocks, SDPA attention, tied embeddings.

Linear layers have no bias (nanoGPT's ``bias=False``, as in most current LLMs). Besides being a little
faster, this removes the key bias, whose gradient is exactly zero in exact arithmetic (softmax ignores
a constant added to every score of a row): Adam turns its rounding noise into full-size updates, so
it would differ between any two batch splits for no reason of ours.

``forward`` follows the toolkit's model contract: it returns the *sum* of per-token cross-entropy losses,
ignoring padding targets, and the number of valid targets. The trainer divides the gradient by the number
of valid targets in the whole global batch, which is what makes it independent of how the batch is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.config import Config, ConfigError
from toolkit.data import IGNORE
from toolkit.loss import chunked_cross_entropy

PRESETS = {
    # name: (n_layer, n_head, n_embd)
    "nano": (2, 2, 64),
    "tiny": (4, 4, 128),
    "small": (4, 4, 256),
    "gpt2-small": (12, 12, 768),
}


@dataclass(frozen=True)
class GPTShape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    seq_len: int
    dropout: float = 0.0
    loss_chunk: int = 0


def shape_from_config(cfg: Config) -> GPTShape:
    n_layer, n_head, n_embd = PRESETS[cfg.model.size]
    n_layer = cfg.model.n_layer or n_layer
    n_head = cfg.model.n_head or n_head
    n_embd = cfg.model.n_embd or n_embd
    if n_embd % n_head:
        raise ConfigError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
    vocab = cfg.model.vocab_size or (256 if cfg.data.source == "stdlib" else 50304)
    if cfg.data.source == "stdlib" and vocab < 256:
        raise ConfigError(f"model.vocab_size={vocab} is too small for data.source=stdlib (bytes need 256)")
    return GPTShape(n_layer, n_head, n_embd, vocab, cfg.data.seq_len, cfg.model.dropout, cfg.model.loss_chunk)


class CausalSelfAttention(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.n_head, self.dropout = s.n_head, s.dropout
        self.qkv = nn.Linear(s.n_embd, 3 * s.n_embd, bias=False)
        self.proj = nn.Linear(s.n_embd, s.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(s.n_embd), CausalSelfAttention(s)
        self.ln2 = nn.LayerNorm(s.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(s.n_embd, 4 * s.n_embd, bias=False), nn.GELU(), nn.Linear(4 * s.n_embd, s.n_embd, bias=False)
        )
        self.drop = nn.Dropout(s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class LMHead(nn.Linear):
    """The output layer and the loss: called with the hidden states and the targets, it returns the summed
    cross-entropy, ``chunk`` tokens at a time (``toolkit/loss.py``: the whole micro-batch's logits never exist).
    A module of its own, so that ZeRO-3 gathers its (tied) weight around the call as around any layer's."""

    def __init__(self, in_features: int, out_features: int, bias: bool, chunk: int):
        super().__init__(in_features, out_features, bias=bias)
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1), self.chunk)


class GPT(nn.Module):
    def __init__(self, s: GPTShape):
        super().__init__()
        self.shape = s
        self.tok_emb = nn.Embedding(s.vocab_size, s.n_embd)
        self.pos_emb = nn.Embedding(s.seq_len, s.n_embd)
        self.drop = nn.Dropout(s.dropout)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.n_embd)
        self.lm_head = LMHead(s.n_embd, s.vocab_size, bias=False, chunk=s.loss_chunk)
        self.lm_head.weight = self.tok_emb.weight  # tied embeddings
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * s.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The toolkit's model contract: ``(loss_sum, n_targets)`` of a micro-batch ``(inputs, targets)``: the
        sum (not the mean) of the cross-entropy over its valid targets, in fp32, and how many there were."""
        idx, targets = batch
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        loss_sum = self.lm_head(self.ln_f(x), targets)
        return loss_sum, (targets != IGNORE).sum()

    def training_flops_per_token(self) -> int:
        """What MFU counts (see ``flops_per_token``)."""
        return flops_per_token(self.shape, num_params(self))


def num_params(model: nn.Module, exclude_positions: bool = True) -> int:
    """Parameters counted once (tied weights once); without position embeddings, as nanoGPT counts N."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_positions and name.endswith("pos_emb.weight")):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(s: GPTShape, n_params: int) -> int:
    """Training FLOPs per token: 6N for the matrix multiplies (forward + backward) plus 12·L·H·Q·T for
    attention scores (PaLM appendix B, as nanoGPT's estimate_mfu), Q = head dim, T = sequence length."""
    head_dim = s.n_embd // s.n_head
    return 6 * n_params + 12 * s.n_layer * s.n_head * head_dim * s.seq_len


def build_model(cfg: Config) -> GPT:
    """The model with weights drawn from ``cfg.seed`` (identical on every rank)."""
    torch.manual_seed(cfg.seed)
    return GPT(shape_from_config(cfg))


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings (dim >= 2), none on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
