"""Hugging Face ``transformers`` causal language models under the toolkit's model contract.

``model.source: hf`` builds the model from ``model.hf_config`` (a model type such as ``gpt2``, or a local
folder with a ``config.json``), with ``model.hf_overrides`` set over its config, without the network:
``from_config`` draws fresh weights from the seed; ``model.hf_pretrained`` loads a local folder's.

``HFCausalLM`` wraps it to the contract (``model(batch) -> (loss_sum, n_targets)``). HF models return
the *mean* loss of a micro-batch, which is exactly what must not be averaged again over micro-batches
(transformers#34191), so the wrapper computes the summed cross-entropy from the logits itself. A batch
is either the built-in corpora's ``(inputs, targets)`` (targets already shifted, padding -100) or an HF
dict with ``input_ids`` and ``labels`` (unshifted, as HF models take them; -100 ignored), plus any other
keys the model takes (``attention_mask``).

Weights are fp32 whatever dtype a folder's config names (``train.precision`` decides autocast). The run's
``final/`` folder is then written with ``save_pretrained``: ``AutoModelForCausalLM.from_pretrained``
loads it as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.config import Config, ConfigError
from toolkit.data import IGNORE


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM, returning ``(sum of token losses, number of targets)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = self.model(**inputs).logits[:, :-1]
            targets = batch["labels"][:, 1:]  # HF labels are the inputs; the model predicts the next one
        else:
            x, targets = batch
            logits = self.model(input_ids=x).logits
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE, reduction="sum")
        return loss_sum, (targets != IGNORE).sum()

    def training_flops_per_token(self) -> int:
        """6N (forward and backward of every weight once per token), N without position embeddings."""
        positions = {id(m.weight) for m in self.model.modules()
                     if isinstance(m, nn.Embedding) and m.num_embeddings == getattr(self.model.config, "n_positions", -1)}
        seen, n = set(), 0
        for p in self.model.parameters():
            if id(p) not in seen and id(p) not in positions:
                seen.add(id(p))
                n += p.numel()
        return 6 * n

    def save_final(self, folder: Path, whole_state: dict) -> None:
        """``save_pretrained`` with the whole (gathered) weights: a folder HF loads as is."""
        from transformers.utils import logging

        logging.disable_progress_bar()  # its "Writing model shards" bar is noise in a run's log
        state = {k.removeprefix("model."): v for k, v in whole_state.items()}
        self.model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)


def build_hf_model(cfg: Config, vocab_size: int | None) -> HFCausalLM:
    """The model ``model.hf_config`` names, weights from the seed (or the folder's, with hf_pretrained)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.source=hf needs the transformers package (pip install transformers)") from None
    m = cfg.model
    overrides = dict(m.hf_overrides)
    try:
        if Path(m.hf_config).is_dir():
            config = transformers.AutoConfig.from_pretrained(m.hf_config, local_files_only=True)
        else:
            config = transformers.AutoConfig.for_model(m.hf_config)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"model.hf_config={m.hf_config!r}: neither a transformers model type nor a folder with a "
                          f"config.json ({str(exc).splitlines()[0]})") from None
    # Dropout draws random numbers per rank, so a global batch split differently would train differently:
    # every dropout of the config follows model.dropout (0 by default) unless hf_overrides sets it.
    for key, value in config.to_dict().items():
        if isinstance(value, float) and (key.endswith("pdrop") or "dropout" in key) and key not in overrides:
            overrides[key] = m.dropout
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    vocab = overrides.get("vocab_size", getattr(config, "vocab_size", None))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # special tokens of a vocabulary not used here
        value = getattr(config, key, None)
        if isinstance(value, int) and vocab is not None and value >= vocab and key not in overrides:
            overrides[key] = None
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"model.hf_overrides.{key}: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    torch.manual_seed(cfg.seed)
    if m.hf_pretrained:
        model = transformers.AutoModelForCausalLM.from_pretrained(m.hf_config, config=config, local_files_only=True,
                                                                  dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return HFCausalLM(model)
