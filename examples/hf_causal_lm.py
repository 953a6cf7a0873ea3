"""A Hugging Face causal LM built from a config (no download), trained on HF-style batches.

    python examples/hf_causal_lm.py
    accelerate launch --config_file launch/cpu.yaml examples/hf_causal_lm.py batch.micro_size=2

The model is ``transformers``' GPT-2 class with 2 small layers, drawn from the seed; ``HFCausalLM`` wraps it
to the toolkit's model contract (the summed token loss and the number of tokens, instead of HF's mean).
The data is a map-style dataset of ``{"input_ids", "labels"}`` dicts, as HF's tokenised datasets give
(an HF ``datasets.Dataset`` with ``set_format("torch")`` works the same way): here byte-level chunks of
this Python's standard library, labels -100 on padding. The run's ``final/`` folder is written with
``save_pretrained``: ``AutoModelForCausalLM.from_pretrained("runs/hf-causal-lm/final")`` loads it as is.

The same model is also one config away for train.py: ``python train.py model.source=hf
model.hf_config=gpt2 model.hf_overrides.n_layer=2 ...``.
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from toolkit import HFCausalLM, Trainer, config_from_argv, run  # noqa: E402

SEQ_LEN = 64
DEFAULTS = [
    "run.name=hf-causal-lm", "batch.global_size=16", f"data.seq_len={SEQ_LEN}", "train.steps=60",
    "train.log_every=10", "train.val_every=30", "train.val_batches=2", "optim.lr=1e-3", "optim.warmup_samples=160",
    "checkpoint.every_steps=30",
]


class ByteChunks(Dataset):
    """Chunks of up to SEQ_LEN bytes of some standard-library modules, one document after another; the last
    chunk of a document is padded (input 0, label -100)."""

    tokens_per_sample = SEQ_LEN

    def __init__(self, modules: list[str]):
        import importlib

        self.chunks = []
        for name in modules:
            text = Path(importlib.import_module(name).__file__).read_bytes()
            self.chunks += [text[i : i + SEQ_LEN] for i in range(0, len(text), SEQ_LEN)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        chunk = torch.tensor(list(self.chunks[i]), dtype=torch.long)
        input_ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        labels = torch.full((SEQ_LEN,), -100, dtype=torch.long)
        input_ids[: len(chunk)] = chunk
        labels[: len(chunk)] = chunk
        return {"input_ids": input_ids, "labels": labels}  # HF's convention: the model shifts the labels


def gpt2() -> HFCausalLM:
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(vocab_size=256, n_positions=SEQ_LEN, n_layer=2, n_head=2, n_embd=64, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: same math on any split
    return HFCausalLM(AutoModelForCausalLM.from_config(config))


def main(argv: list[str] = sys.argv[1:]) -> dict:
    cfg = config_from_argv(argv, defaults=DEFAULTS)
    train = ByteChunks(["argparse", "textwrap", "dataclasses", "pathlib"])
    val = ByteChunks(["string", "shlex"])
    return Trainer(cfg, model=gpt2, train_data=train, val_data=val).train()


if __name__ == "__main__":
    sys.exit(run(main))
