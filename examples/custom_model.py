"""Your own model and data: an ``nn.Module`` under the toolkit's model contract, on a ``TensorDataset``.

    python examples/custom_model.py                                   # one process, on the CPU
    python examples/custom_model.py batch.micro_size=4                # the same training, in 4 micro-batches
    accelerate launch --config_file launch/cpu.yaml examples/custom_model.py   # two processes, the same result

Each sample has 8 targets, of which only a random number (1 to 8) count: the mask. The model returns the
*sum* of its squared errors over the counted targets and how many there were, ``(loss_sum, n_targets)``;
the toolkit divides by the number of counted targets in the whole global batch, so the step is the same
however the batch is split over micro-batches and processes (a mean per micro-batch would not be).
It reads its command line as train.py does (``--config FILE``, ``key=value`` overrides: ``batch.global_size=64``,
``train.steps=500`` ...), so ``toolkit sweep`` (examples/custom_sweep.yaml) and ``toolkit slurm submit --script``
launch it like train.py, and it resumes, checkpoints and stops on a scheduler's signal the same way.
"""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from toolkit import Trainer, config_from_argv, run  # noqa: E402

DEFAULTS = [
    "run.name=custom-model", "batch.global_size=16", "train.steps=200", "train.log_every=20", "train.val_every=100",
    "train.val_batches=2", "optim.lr=3e-3", "optim.warmup_samples=160", "checkpoint.every_steps=100",
    "data.seq_len=8",  # "tokens" in the logs: 8 target slots per sample
]


class MaskedRegressor(nn.Module):
    """A small MLP mapping 16 features to 8 targets; only the targets where ``mask`` is 1 count."""

    def __init__(self, features: int = 16, hidden: int = 64, targets: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, targets))

    def forward(self, batch):
        x, y, mask = batch
        squared_error = (self.net(x) - y).square() * mask
        return squared_error.sum(), mask.sum()  # the model contract: (loss_sum, n_targets)


def make_data(samples: int, seed: int) -> TensorDataset:
    """y = tanh(x A) + noise, with a random number of counted targets per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 16, generator=g)
    a = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) / 4
    y = torch.tanh(x @ a) + 0.1 * torch.randn(samples, 8, generator=g)
    counted = torch.randint(1, 9, (samples, 1), generator=g)
    mask = (torch.arange(8) < counted).float()
    return TensorDataset(x, y, mask)


def main(argv: list[str] = sys.argv[1:]) -> dict:
    cfg = config_from_argv(argv, defaults=DEFAULTS)  # [--config FILE] [key=value ...], as train.py reads them
    # A function that builds the model: the toolkit seeds with cfg.seed first, so every process (and every
    # run of this config) starts from the same weights.
    return Trainer(cfg, model=MaskedRegressor, train_data=make_data(4096, seed=1), val_data=make_data(512, seed=2)).train()


if __name__ == "__main__":
    sys.exit(run(main))  # train.py's exit codes: 0 done, 2 bad config, 3 non-finite, 75 preempted, 130 Ctrl-C
