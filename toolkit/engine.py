"""Building the Accelerator from the config: which device, which backend, which precision.

On a machine without CUDA the toolkit chooses the CPU path itself: ``Accelerator(cpu=True)`` under
``torchrun``/``accelerate launch`` gives one gloo process group over all ranks (MULTI_CPU), and plain
``python train.py`` gives a single process.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from toolkit.config import Config, ConfigError


def wants_cpu(cfg: Config) -> bool:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return cfg.train.device == "cpu" or not torch.cuda.is_available()


def mixed_precision(cfg: Config, on_cpu: bool) -> str:
    """bf16 autocast on GPU by default; fp32 on CPU, where bf16 is slow and the tests compare fp32."""
    if cfg.train.precision == "auto":
        return "no" if on_cpu else "bf16"
    return "no" if cfg.train.precision == "fp32" else "bf16"


def build_accelerator(cfg: Config) -> Accelerator:
    on_cpu = wants_cpu(cfg)
    if cfg.train.debug:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--debug runs one process; start it with `python train.py --debug`, not a launcher")
        # cuBLAS needs this workspace setting before the first CUDA call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # gradient_accumulation_steps stays 1: the trainer accumulates itself (explicit no_sync and its own
    # loss normalisation), so Accelerate must not divide the loss a second time. Precision and compilation
    # come from the run config, not from a launch file: the same run config gives the same run anywhere.
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=mixed_precision(cfg, on_cpu),
        gradient_accumulation_steps=1,
        dynamo_backend="inductor" if cfg.model.compile else "no",  # compiled after DDP wrapping, in prepare()
    )
