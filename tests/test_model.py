"""The built-in GPT: parameter count and FLOPs per token, tied embeddings, and a summed loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.config import ConfigError, load_config
from toolkit.data import IGNORE
from toolkit.model import GPT, PRESETS, GPTShape, build_model, flops_per_token, num_params, shape_from_config


def hand_param_count(L: int, d: int, V: int) -> int:
    """Parameters without position embeddings, tied embedding counted once (by hand, from the design)."""
    per_block = (
        2 * d  # ln1 (weight, bias)
        + 3 * d * d  # qkv (no bias)
        + d * d  # attention projection (no bias)
        + 2 * d  # ln2
        + d * 4 * d  # mlp up (no bias)
        + 4 * d * d  # mlp down (no bias)
    )
    return V * d + L * per_block + 2 * d  # token embedding (= lm_head), blocks, ln_f


def test_gpt2_small_params_and_flops_per_token():
    L, H, d = PRESETS["gpt2-small"]
    assert (L, H, d) == (12, 12, 768)
    V, T = 50257, 1024
    shape = GPTShape(n_layer=L, n_head=H, n_embd=d, vocab_size=V, seq_len=T)
    with torch.device("meta"):  # no memory, no init time
        model = GPT(shape)
    n = num_params(model)
    print(f"gpt2-small N (no position embeddings, tied once) = {n:,}")
    assert n == hand_param_count(L, d, V) == 123_570_432  # nanoGPT with bias=False
    assert num_params(model, exclude_positions=False) == n + T * d
    Q = d // H
    expected = 6 * 123_570_432 + 12 * L * H * Q * T
    assert expected == 854_668_800
    assert flops_per_token(shape, n) == expected
    print(f"gpt2-small FLOPs per token = {expected:,}")


@pytest.mark.parametrize("size", ["nano", "tiny", "small"])
def test_presets_match_the_hand_count(size):
    cfg = load_config(None, [f"model.size={size}"])
    shape = shape_from_config(cfg)
    assert (shape.n_layer, shape.n_head, shape.n_embd) == PRESETS[size]
    assert shape.vocab_size == 256 and shape.seq_len == 128
    with torch.device("meta"):
        model = GPT(shape)
    n = num_params(model)
    assert n == hand_param_count(shape.n_layer, shape.n_embd, 256)
    assert flops_per_token(shape, n) == 6 * n + 12 * shape.n_layer * shape.n_embd * shape.seq_len
    if size == "tiny":
        assert n == 821_504


def test_shape_overrides_and_errors():
    cfg = load_config(None, ["model.size=nano", "model.n_layer=3", "model.n_embd=96", "model.n_head=3"])
    shape = shape_from_config(cfg)
    assert (shape.n_layer, shape.n_head, shape.n_embd) == (3, 3, 96)
    with pytest.raises(ConfigError, match="divisible"):
        shape_from_config(load_config(None, ["model.n_embd=100", "model.n_head=3"]))
    with pytest.raises(ConfigError, match="vocab_size"):
        shape_from_config(load_config(None, ["model.vocab_size=100"]))
    synthetic = load_config(None, ["data.source=synthetic"])
    assert shape_from_config(synthetic).vocab_size == 50304


def nano_model(seq_len: int = 16, vocab: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTShape(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, seq_len=seq_len))


def test_tied_embeddings():
    model = nano_model()
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    names = [name for name, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "lm_head.weight" not in names  # one parameter, registered once
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"], state["tok_emb.weight"])
    # One gradient for both uses.
    x = torch.randint(0, 64, (2, 16))
    model((x, torch.randint(0, 64, (2, 16))))[0].backward()
    assert model.tok_emb.weight.grad is model.lm_head.weight.grad
    # Loading a plain state dict (two copies, as saved) keeps them tied.
    other = nano_model(seed=1)
    other.load_state_dict({k: v.clone() for k, v in state.items()})
    assert other.lm_head.weight is other.tok_emb.weight
    assert torch.equal(other.tok_emb.weight, model.tok_emb.weight)


def test_build_model_is_seeded():
    cfg = load_config(None, ["model.size=nano"])
    a, b = build_model(cfg), build_model(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    c = build_model(load_config(None, ["model.size=nano", "seed=1"]))
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_loss_is_a_sum_over_valid_targets():
    model = nano_model()
    model.eval()
    torch.manual_seed(3)
    x = torch.randint(0, 64, (3, 16))
    y = torch.randint(0, 64, (3, 16))
    y[0, 10:] = IGNORE  # padded tails of different lengths
    y[2, 3:] = IGNORE
    captured = {}
    # The output layer returns the loss itself (chunked, toolkit/loss.py): the logits from its input.
    handle = model.lm_head.register_forward_hook(lambda m, i, out: captured.__setitem__("hidden", i[0]))
    with torch.no_grad():
        loss, n_targets = model((x, y))
    handle.remove()
    logits = F.linear(captured["hidden"], model.lm_head.weight).float().view(-1, 64)
    valid = int((y != IGNORE).sum())
    assert valid == 16 + 10 + 3 == int(n_targets)  # the contract's count
    mean = F.cross_entropy(logits, y.view(-1), ignore_index=IGNORE)  # PyTorch's default: the mean
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, mean * valid, rtol=1e-5, atol=1e-5)
    per_token = F.cross_entropy(logits, y.view(-1).clamp(min=0), reduction="none")
    torch.testing.assert_close(loss, per_token[(y != IGNORE).view(-1)].sum(), rtol=1e-5, atol=1e-5)
    assert loss > mean * 10  # clearly not a mean

    # Ignoring one more target removes exactly its term; all ignored gives zero.
    with torch.no_grad():
        y2 = y.clone()
        y2[1, 5] = IGNORE
        dropped = per_token[1 * 16 + 5]
        torch.testing.assert_close(model((x, y2))[0], loss - dropped, rtol=1e-5, atol=1e-5)
        assert model((x, torch.full_like(y, IGNORE)))[0].item() == 0.0
        # Sample losses add up: the sum over a batch is the sum of the per-sample sums.
        parts = sum(model((x[i : i + 1], y[i : i + 1]))[0] for i in range(3))
    torch.testing.assert_close(parts, loss, rtol=1e-5, atol=1e-4)
