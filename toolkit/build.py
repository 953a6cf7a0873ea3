"""Building a run's parts, in the order the data flows: config -> data -> plan -> model -> engine.

``RunParts`` makes what the trainer coordinates: the data (the user's datasets, or the built-in corpora),
the batch plan (once, from the launcher's world size), the model (the user's, an HF model, or the built-in
GPT), the Accelerator, and the components (checkpointer, tracker, memory meter, noise probe). ``prepare``
then wraps the model in DDP or a DeepSpeed engine, after a checkpoint's weights are loaded into it.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from toolkit import zero
from toolkit.autobatch import AUTO, choose_micro_size, settled_baseline
from toolkit.batch import FULL, BatchPlan, BatchSchedule, peak_lrs, schedule_for_config
from toolkit.checkpointer import Checkpointer
from toolkit.collective import Ranks
from toolkit.config import Config, ConfigError
from toolkit.data import GlobalBatchSampler, load_data
from toolkit.engine import build_accelerator, debug_settings, init_process_group, mixed_precision, run_device
from toolkit.loader import make_loader
from toolkit.memory import (
    PeakMeter,
    measured_report,
    peaks_over_ranks,
    predict,
    predict_for_config,
    report_line,
)
from toolkit.metrics import NoiseProbe, peak_flops
from toolkit.model import build_model, num_params, optimizer_groups, shape_from_config
from toolkit.steps import DDPSteps, DeepSpeedSteps
from toolkit.tracking import Tracker, package_versions


class RunParts:
    """Everything a run is built from; the trainer reads its parts from here."""

    plan: BatchPlan
    batches: BatchSchedule

    def __init__(self, cfg: Config, model, train_data, val_data, collate=None):
        self.cfg = cfg
        self.builtin_data = train_data is None
        if model is None and cfg.model.source == "builtin":
            self.shape = shape_from_config(cfg)
        else:
            self.shape = None
        # The data first: ``batch.global_size: full`` is the training split's size.
        if train_data is None:
            if val_data is not None:
                raise ConfigError("val_data was given without train_data; give both (or neither: the built-in corpora)")
            vocab = shape_from_config(cfg).vocab_size
            train_data, val_data = load_data(cfg, vocab)
        elif len(train_data) == 0:
            raise ConfigError("train_data is empty")
        self.train_data, self.val_data = train_data, val_data
        if val_data is None and cfg.train.stop_val_loss is not None:
            raise ConfigError("train.stop_val_loss needs validation data: pass val_data to the Trainer")
        self.tokens_per_sample = getattr(train_data, "tokens_per_sample", cfg.data.seq_len)
        # The plan, once, from the launcher's world size (the Accelerator below must agree).
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.plan, self.batches = schedule_for_config(cfg, world, len(train_data))
        # Constructing the first optimizer imports ~70 MB of modules (torch._dynamo); do it now, so that the
        # memory baseline below holds them and the measured peak counts the model's own memory only.
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        self.auto_micro = None
        self.deepspeed_wanted = zero.enabled(cfg)
        if cfg.batch.micro_size == AUTO:  # the model first, measured at growing micro sizes; then the plan
            baseline = self._choose_micro_size(model, collate, world)
        elif self.shape is None:  # the user's model (or an HF one): DeepSpeed's buckets are sized from it
            self.model = self._model(model)
        self.sampler = GlobalBatchSampler(len(train_data), self.plan.global_size, cfg.seed)
        self.accelerator = build_accelerator(cfg, self.plan, self.shape.n_embd if self.shape else hidden_size(self.model))
        acc = self.accelerator
        if self.auto_micro is None:
            # The baseline: what is in use before the built-in model is built (a model passed in is below it on a
            # CPU; on CUDA every model is still on the CPU here).
            self.memory = PeakMeter(acc.device, PeakMeter.baseline_now(acc.device))
            if self.shape is not None:
                self.model = build_model(cfg)
        else:
            self.memory = PeakMeter(acc.device, baseline)
            self.memory.reset_peak()  # the probe's last (perhaps failed) size is not the run's peak
        if acc.num_processes != self.plan.world_size:
            raise ConfigError(f"the launcher started {acc.num_processes} processes but WORLD_SIZE says {world}")
        self.ranks = Ranks(acc.process_index, acc.num_processes)
        self.deepspeed = zero.enabled(cfg)
        self.checkpointer = Checkpointer(cfg, self.ranks, self.plan.global_size)
        self.tracker = Tracker(acc, cfg.run_dir, self.ranks.is_main)
        self.n_params = num_params(self.model)  # without position embeddings: the N of 6N FLOPs per token
        self.n_params_total = num_params(self.model, exclude_positions=False)
        flops = getattr(self.model, "training_flops_per_token", None)
        self.flops_per_token = flops() if flops else None
        self.save_final = getattr(self.model, "save_final", None)
        o = cfg.optim
        self.peak_lr, self.min_lr = peak_lrs(cfg, self.plan.global_size)  # after optim.lr_scaling
        self.decay_samples = o.decay_samples or self.batches.samples_before(cfg.train.steps)
        self.device_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu"
        self.peak_flops = peak_flops(self.device_name, acc.mixed_precision)
        bf16, ds = acc.mixed_precision == "bf16", cfg.deepspeed
        n_trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.memory_plan = (
            predict_for_config(cfg, n_trained, self.plan.world_size, bf16, ds.stage, ds.offload_optimizer,
                               ds.offload_params, plan=self.plan) if self.shape else
            # The user's model: its activations are not known here; the model states are.
            predict(n_trained, self.plan.world_size, ds.stage, bf16=bf16, offload_optimizer=ds.offload_optimizer,
                    offload_params=ds.offload_params))
        self.memory_setup = f"{self.memory_plan.mode} on {self.plan.world_size} x {acc.device.type}, " \
                            f"{acc.mixed_precision}, micro {self.plan.micro_size}"
        # The gradient noise scale needs two batch sizes: one micro-batch on one rank, and the global batch.
        self.noise = (NoiseProbe(cfg.tracking.noise_scale_decay, acc.device, float(self.tokens_per_sample))
                      if self.noise_unavailable() is None else None)
        name = type(self.model).__name__ if not self.shape else cfg.model.size
        data_name = cfg.data.source if self.builtin_data else type(train_data).__name__
        self.default_group = f"{name}-{data_name}-seq{cfg.data.seq_len}"

    def _choose_micro_size(self, model, collate, world: int) -> int:
        """``batch.micro_size: auto``: build the model on this process's device, measure it at growing micro sizes
        (``toolkit/autobatch.py``; the ranks agree through a process group made here, before the Accelerator,
        which needs the plan), and plan with the size found. Returns the memory baseline (before the model)."""
        cfg = self.cfg
        debug_settings(cfg)  # (refused under a launcher, and deterministic cuBLAS needs it before the first call)
        device = run_device(cfg)
        init_process_group(device)
        ranks = Ranks(int(os.environ.get("RANK", "0")), world)
        ranks.all_ok(True)  # gloo allocates ~5 MB at its first collective: before the baseline, not the model's
        baseline = settled_baseline(device)
        self.model = (build_model(cfg) if self.shape is not None else self._model(model)).to(device)
        # The micro size must divide this process's share of the full step and of every ramp step (or, for a
        # full batch that does not divide, only be at most its share).
        shares = [-(-self.plan.global_size // world)]
        if cfg.batch.ramp.start is not None:
            shares += [cfg.batch.ramp.start // world, cfg.batch.ramp.increment // world]
        # A full batch without DeepSpeed takes any micro size: its micro-batches need not be equal (make_full_plan).
        ragged = cfg.batch.global_size == FULL and not self.deepspeed_wanted
        ds = cfg.deepspeed
        setup = {"zero_stage": ds.stage, "offload": [ds.offload_optimizer, ds.offload_params], "compile": cfg.model.compile,
                 "loss_chunk": cfg.model.loss_chunk, "margin": cfg.batch.memory_margin, "ragged": ragged}
        # Without DeepSpeed, DDP keeps a flat copy of the gradients for its all-reduce (from 2 processes on).
        ddp_buckets = 4 * sum(p.numel() for p in self.model.parameters() if p.requires_grad) \
            if world > 1 and not self.deepspeed_wanted else 0
        self.auto_micro = choose_micro_size(cfg, self.model, self.train_data, collate, device,
                                            mixed_precision(cfg, device.type == "cpu") == "bf16", baseline, shares,
                                            ranks, setup, ragged=ragged, extra_bytes=ddp_buckets)
        self.plan, self.batches = schedule_for_config(cfg, world, len(self.train_data), self.auto_micro.micro_size)
        return baseline

    def _model(self, model) -> torch.nn.Module:
        cfg = self.cfg
        if model is None and cfg.model.source == "hf":
            from toolkit.hf import build_hf_model

            return build_hf_model(cfg, shape_from_config(cfg).vocab_size if self.builtin_data and not cfg.model.hf_pretrained
                                  else None)
        if not isinstance(model, torch.nn.Module):  # a function that builds it: the same weights on every rank
            torch.manual_seed(cfg.seed)
            model = model()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"model: expected a torch.nn.Module (or a function returning one), got {type(model).__name__}")
        return model

    def noise_unavailable(self) -> str | None:
        """Why this run measures no noise scale, or None when it does."""
        if not self.cfg.tracking.noise_scale:
            return "tracking.noise_scale=false"
        if self.deepspeed:
            return "not computed under DeepSpeed yet"
        if self.plan.micro_size >= self.plan.global_size:
            return "needs two batch sizes: accumulation > 1 or more than one process"
        return None

    def prepare(self) -> None:
        """The optimizer, and the model and optimizer wrapped for the run (DDP, autocast, compile, or DeepSpeed)."""
        acc, o = self.accelerator, self.cfg.optim
        optimizer = make_optimizer(self.cfg, self.model, acc.device)
        # The parameters in the optimizer's order, and its groups: what a checkpoint's optimizer.pt indexes.
        ordered_params = [p for group in optimizer.param_groups for p in group["params"]]
        layout = zero.remember_groups(optimizer)
        # prepare() wraps the model in DDP when there are several processes (or in a DeepSpeed engine), wraps its
        # forward in autocast when mixed precision is on, and compiles it when model.compile is set.
        self.engine_model, self.optimizer = acc.prepare(self.model, optimizer)
        self.plain_model = acc.unwrap_model(self.engine_model, keep_torch_compile=False)  # eval, checks, saving
        self.checkpointer.bind(self.engine_model, self.optimizer, self.plain_model, ordered_params, layout, self.deepspeed)
        self.steps = (DeepSpeedSteps(self.engine_model, self.plain_model, self.plan.world_size)
                      if self.deepspeed else
                      DDPSteps(self.engine_model, self.optimizer, o.grad_clip, self.plan.world_size))

    def loader(self, dataset, batch_sampler, collate, persistent: bool = False):
        """This rank's loader over ``batch_sampler`` (data.workers, data.pin_memory on CUDA, data.prefetch_factor)."""
        d = self.cfg.data
        return make_loader(dataset, batch_sampler, collate, d.workers, d.pin_memory and self.accelerator.device.type == "cuda",
                           d.prefetch_factor, persistent, self.cfg.seed, self.checkpointer.lock_fds())

    def measured_memory(self) -> dict:
        """The measured peaks per device (the largest over the ranks: a collective) next to the prediction; printed."""
        peaks = peaks_over_ranks(self.memory, self.memory_setup, self.plan.world_size)["bytes"]
        report = measured_report(peaks, self.memory_plan, self.accelerator.device.type)
        self.ranks.say(report_line(report, self.memory_plan))
        return report

    def summary(self, trainer, memory: dict) -> dict:
        """summary.json: the run's outcome, speed, memory and noise scale."""
        plan, history = self.plan, self.tracker.history
        train_losses = [r["loss"] for r in history if "loss" in r]
        finite_losses = [x for x in train_losses if x == x]
        mfus = [r["mfu"] for r in history if r.get("mfu") is not None]
        noise_scale, critical_tokens = self.noise.value() if self.noise else (None, None)
        samples, train_time = self.batches.samples_before(trainer.step), trainer.clock.train_time_s
        return {
            "steps": trainer.step, "samples": samples, "tokens": samples * self.tokens_per_sample,
            "final_loss": train_losses[-1] if train_losses else None, "skipped_steps": trainer.skipped_steps,
            "first_loss": train_losses[0] if train_losses else None, "val_loss": trainer.last_val_loss,
            "world_size": plan.world_size, "micro_size": plan.micro_size, "accumulation": plan.accumulation,
            "global_size": plan.global_size, "auto_micro": self.auto_micro.as_dict() if self.auto_micro else None,
            # Over the whole run, all its segments (a resumed run carries the time of the earlier ones).
            "tokens_per_s": samples * self.tokens_per_sample / train_time if train_time else None,
            "train_time_s": train_time, "n_params": self.n_params, "n_params_total": self.n_params_total,
            "flops_per_token": self.flops_per_token,
            "model": asdict(self.shape) if self.shape else {"class": type(self.model).__name__},
            "memory": memory, "best_loss": min(finite_losses) if finite_losses else None,
            "mfu": sum(mfus) / len(mfus) if mfus else None, "memory_peak_gib": memory["process_peak_gib"],
            "noise_scale": noise_scale, "critical_batch_tokens": critical_tokens,
            "noise_scale_unavailable": self.noise_unavailable() or (self.noise.unavailable() if self.noise else None),
            "peak_lr": self.peak_lr,  # after optim.lr_scaling
            "target_val_loss": self.cfg.train.stop_val_loss, "stopped_at_target": trainer.stopped_at_target,
            "wandb_run_id": trainer.wandb_run_id if self.tracker.wandb_mode != "off" else None,
        }


def make_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``optimizer_groups``; on CUDA its fused kernel (one launch for all parameters, and no host sync:
    its step count stays on the device), on CPU PyTorch's default (the fused CPU kernel rounds differently).
    A GPU run whose ZeRO optimizer states are offloaded steps them on the CPU: there DeepSpeed's CPU Adam (SIMD,
    multi-threaded; built the first time it is used) where it can be built, else PyTorch's AdamW."""
    o = cfg.optim
    groups = optimizer_groups(model, o.weight_decay)
    if device.type == "cuda" and zero.enabled(cfg) and cfg.deepspeed.offload_optimizer:
        cpu_adam = deepspeed_cpu_adam(groups, cfg)
        if cpu_adam is not None:
            return cpu_adam
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             fused=True if device.type == "cuda" else None)


def deepspeed_cpu_adam(groups: list[dict], cfg: Config):
    """DeepSpeed's CPU Adam in AdamW mode, or None (said in one line) when its extension cannot be built here."""
    o = cfg.optim
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                adamw_mode=True)
    except Exception as exc:  # (a missing compiler, an unsupported CPU: the op builder raises several types)
        print(f"warning: DeepSpeed's CPU Adam is not available ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
              f"the offloaded optimizer steps with PyTorch's AdamW", flush=True)
        return None


def hidden_size(model: torch.nn.Module) -> int:
    """The width DeepSpeed's buckets are sized by: the built-in GPT's n_embd, an HF config's hidden size, else the
    square root of the largest weight matrix."""
    shape = getattr(model, "shape", None)
    if shape is not None and hasattr(shape, "n_embd"):
        return shape.n_embd
    config = getattr(getattr(model, "model", model), "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        if config is not None and getattr(config, key, None):
            return int(getattr(config, key))
    largest = max((p.numel() for p in model.parameters() if p.dim() == 2), default=1)
    return max(1, int(largest**0.5))


def describe(parts: RunParts, run_dir: Path) -> str:
    """What the run is, printed at its start: the plan, the model, the device, the memory predicted."""
    cfg, acc, plan = parts.cfg, parts.accelerator, parts.plan
    precision = ("fp32" if acc.mixed_precision != "bf16" else "bf16 (DeepSpeed: bf16 parameters, fp32 master copy)"
                 if parts.deepspeed else "bf16 autocast (fp32 parameters)")
    ramp_line = parts.batches.describe(plan) + "\n" if parts.batches.ramp_sizes else ""
    lr_line = ("" if cfg.optim.lr_scaling == "none" else
               f"peak LR {parts.peak_lr:.3g} = optim.lr {cfg.optim.lr:g} scaled by the {cfg.optim.lr_scaling} rule "
               f"from optim.reference_batch {cfg.optim.reference_batch} to {plan.global_size}\n")
    model = parts.shape if parts.shape else type(parts.model).__name__
    auto_line = parts.auto_micro.line() + "\n" if parts.auto_micro else ""
    return (f"run directory: {run_dir}\n{plan.table()}\n{auto_line}{ramp_line}{lr_line}"
            f"model: {parts.n_params_total:,} parameters ({parts.n_params:,} without position embeddings: the N "
            f"of 6N FLOPs per token), {model}\n"
            f"device: {acc.device} ({acc.distributed_type}), precision: {precision}"
            f"{', compiled (torch.compile)' if cfg.model.compile else ''}\n"
            f"memory predicted per device ({parts.memory_plan.mode}): {parts.memory_plan.summary()}")


def done_line(summary: dict) -> str:
    speed = f"{summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "no step timed"
    final = "none logged" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    val = "none" if summary["val_loss"] is None else f"{summary['val_loss']:.4f}"
    return f"done: {summary['steps']} steps, final loss {final}, val loss {val}, {speed}"


def wandb_config(parts: RunParts) -> dict:
    """The W&B run's config: the resolved run config, the batch plan, the hardware and the versions."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    acc, world = parts.accelerator, parts.plan.world_size
    return {
        **asdict(parts.cfg),
        "plan": parts.plan.as_dict(),
        "hardware": {"device": parts.device_name, "device_count": world, "nodes": max(1, world // max(local, 1)),
                     "distributed_type": str(acc.distributed_type), "precision": acc.mixed_precision},
        "versions": package_versions(),
        "model_class": type(parts.model).__name__,
        "auto_micro": parts.auto_micro.as_dict() if parts.auto_micro else None,
        "n_params": parts.n_params,
        "flops_per_token": parts.flops_per_token,
    }
