"""Building the Accelerator from the config: which device, which backend, which precision, and
whether DeepSpeed runs the model.

On a machine without CUDA the toolkit chooses the CPU path itself: ``Accelerator(cpu=True)`` under
``torchrun``/``accelerate launch`` gives one gloo process group over all ranks (MULTI_CPU), and plain
``python train.py`` gives a single process. ``cpu=True`` makes Accelerate ignore DeepSpeed, so a
DeepSpeed run on CPU instead asks for a gloo process group (``InitProcessGroupKwargs``); with CUDA it
gets NCCL as usual.

DeepSpeed is told the same device choice (``DS_ACCELERATOR``) before anything imports it: Accelerate
imports it in every run where it is installed (``unwrap_model`` looks for a ``DeepSpeedEngine``), and
left to guess, DeepSpeed warns "Setting accelerator to CPU" in every CPU run, plain ones included.
"""

from __future__ import annotations

import datetime
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

from toolkit import zero
from toolkit.batch import BatchPlan
from toolkit.config import Config, ConfigError
from toolkit.processes import free_port


def wants_cpu(cfg: Config) -> bool:
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return cfg.train.device == "cpu" or not torch.cuda.is_available()


def debug_settings(cfg: Config) -> None:
    """``--debug``: one process, deterministic algorithms. Before the first CUDA call (cuBLAS reads its workspace
    setting once), so before anything runs on the device."""
    if cfg.train.debug:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--debug runs one process; start it with `python train.py --debug`, not a launcher")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def run_device(cfg: Config) -> torch.device:
    """This process's device, as the Accelerator will choose it: the CPU, or the launcher's LOCAL_RANK's GPU."""
    if wants_cpu(cfg):
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def init_process_group(device: torch.device) -> None:
    """The default process group before the Accelerator exists (``batch.micro_size: auto`` agrees on its answer
    through it, and the plan, which the DeepSpeed config needs, comes from that answer): the backend the
    Accelerator would choose. Accelerate and DeepSpeed take over a group that is already there."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None,
                                             timeout=datetime.timedelta(minutes=30))  # (Accelerate's and DeepSpeed's)


def mixed_precision(cfg: Config, on_cpu: bool) -> str:
    """bf16 autocast on GPU by default; fp32 on CPU, where bf16 is slow and the tests compare fp32."""
    if cfg.train.precision == "auto":
        return "no" if on_cpu else "bf16"
    return "no" if cfg.train.precision == "fp32" else "bf16"


def tracker(cfg: Config) -> str | None:
    """Accelerate's W&B tracker unless tracking is off (tracking.wandb=false or WANDB_MODE=disabled)."""
    off = not cfg.tracking.wandb or os.environ.get("WANDB_MODE", "").lower() == "disabled"
    return None if off else "wandb"


def build_accelerator(cfg: Config, plan: BatchPlan, hidden: int) -> Accelerator:
    """The Accelerator for this run's ``plan`` (made once, from the launcher's world size); ``hidden``: the model's
    width, which DeepSpeed's communication buckets are sized by."""
    on_cpu = wants_cpu(cfg)
    debug_settings(cfg)
    if on_cpu:
        # Read once, at DeepSpeed's first get_accelerator(); a user's own setting stands.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if zero.enabled(cfg):
        return build_deepspeed_accelerator(cfg, on_cpu, plan, hidden)
    # gradient_accumulation_steps stays 1: the trainer accumulates itself (explicit no_sync and its own
    # loss normalisation), so Accelerate must not divide the loss a second time. Precision and compilation
    # come from the run config, not from a launch file: the same run config gives the same run anywhere.
    return Accelerator(
        cpu=on_cpu,
        log_with=tracker(cfg),
        mixed_precision=mixed_precision(cfg, on_cpu),
        gradient_accumulation_steps=1,
        dynamo_backend="inductor" if cfg.model.compile else "no",  # compiled after DDP wrapping, in prepare()
    )


def build_deepspeed_accelerator(cfg: Config, on_cpu: bool, plan: BatchPlan, hidden: int) -> Accelerator:
    """Accelerate with a DeepSpeed plugin whose config is written from the batch plan (DeepSpeed asserts
    train_batch_size == micro x accumulation x world, so nothing is left as "auto")."""
    if "WORLD_SIZE" not in os.environ:
        # `python train.py deepspeed.stage=N`: DeepSpeed always runs in a process group; give it one of
        # one process, as its own launcher would.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world_size = plan.world_size
    if plan.ragged:
        raise ConfigError(f"batch.global_size=full with DeepSpeed needs the training split ({plan.global_size} samples) "
                          f"to be a multiple of batch.micro_size x world size ({plan.micro_size} x {world_size})")
    launched_accumulation = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    if launched_accumulation != "auto" and int(launched_accumulation) != plan.accumulation:
        raise ConfigError(
            f"the launch file's gradient_accumulation_steps: {launched_accumulation} disagrees with the batch plan's "
            f"{plan.accumulation} (global {plan.global_size} = micro {plan.micro_size} x accumulation "
            f"{plan.accumulation} x world {plan.world_size}); remove it from the launch file"
        )
    ds_config = zero.deepspeed_config(cfg, plan, on_cuda=not on_cpu, hidden=hidden)
    # The launch file's DeepSpeed fields are in the run config now (config.apply_deepspeed_launch) and
    # in ds_config; Accelerate would refuse the explicit config while they are still marked as set.
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
    if on_cpu:
        zero.cache_numa_topology()
    # gradient_accumulation_steps is the plan's, as in the DeepSpeed config: Accelerate sets its own
    # count to DeepSpeed's in prepare() anyway (and warns about the mismatch when they differ). It is
    # used only by accelerator.accumulate() and accelerator.backward(), which the trainer does not call
    # under DeepSpeed: it calls engine.backward(scale_wrt_gas=False) and normalises the loss itself.
    return Accelerator(
        log_with=tracker(cfg),
        mixed_precision=mixed_precision(cfg, on_cpu),
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        gradient_accumulation_steps=plan.accumulation,
        # Accelerate compiles the engine's module in place (DeepSpeedEngine.compile) after deepspeed.initialize.
        dynamo_backend="inductor" if cfg.model.compile else "no",
    )
