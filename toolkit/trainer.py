"""The training loop, readable top to bottom: ``train`` -> ``train_step`` -> ``forward_backward``.

The math that must not depend on the hardware:

* Step k uses the global batch the sampler gives for k (seed and epoch only). This rank computes its
  slice of it, in ``plan.accumulation`` micro-batches.
* The loss of a step is the *sum* of per-token losses over the whole global batch divided by the
  number of valid targets in the whole global batch. Every rank knows that number before the first
  micro-step (``Samples.valid_targets`` reads it from the sample lengths, no communication), so each
  micro-batch's summed loss is divided by the same global count. DDP then *averages* gradients over
  the ranks, so each rank multiplies its loss by the world size to turn that mean back into a sum.
  Averaging per-micro-batch means instead would weigh a micro-batch of few valid tokens as much as a
  full one, and the gradient would change with the split (transformers#34191).
* Gradients are all-reduced once per optimizer step: every micro-step but the last runs under
  ``no_sync``.

Under DeepSpeed (``deepspeed.stage`` set) the engine owns the backward pass and the optimizer step:
``engine.backward`` divides the loss by its accumulation steps unless told not to (``scale_wrt_gas=False``
here, since the loss is already divided by the global count) and averages gradients over the ranks
like DDP; ``engine.step`` after every micro-step applies the update, clipped, at the accumulation
boundary only. ZeRO-2 and -3 reduce-scatter gradients on every micro-step (that is how they keep only a
shard of them), so "once per step" holds for DDP, stage 0 and stage 1.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import secrets
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from toolkit import checkpoint, rundir, zero
from toolkit.batch import BatchPlan, make_plan, peak_lrs, schedule_for_config
from toolkit.config import Config, ConfigError, to_yaml
from toolkit.data import GlobalBatchSampler, load_data, rank_micro_batches, validation_batches
from toolkit.engine import build_accelerator
from toolkit.memory import PeakMeter, predict_for_config
from toolkit.metrics import NoiseScale, mfu, peak_flops
from toolkit.model import build_model, flops_per_token, num_params, optimizer_groups, shape_from_config
from toolkit.schedule import lr_at
from toolkit.stop_signals import STOP_SIGNALS, take_early
from toolkit.tracking import WANDB_NAMES, MetricsLog, start_wandb, write_json_atomic


class NonFiniteError(RuntimeError):
    """A NaN or Inf that stops the run, naming the step (and in debug mode the micro-step and parameter)."""


class Preempted(Exception):
    """SIGTERM, SIGUSR1, SIGUSR2 or a Ctrl-C (SIGINT) reached a rank: all ranks stopped after the same step and wrote
    a checkpoint."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"preempted by {signal.Signals(signum).name}"
        super().__init__(f"{what}: stopped after step {step} with a checkpoint; run the same command again to continue")




class Trainer:
    def __init__(self, cfg: Config, fresh_run_dir: bool = False):
        """``fresh_run_dir``: empty run.dir first (a debug run's own directory: it never continues)."""
        self.cfg = cfg
        # The data first: ``batch.global_size: full`` is the training split's size.
        self.train_data, self.val_data = load_data(cfg, shape_from_config(cfg).vocab_size)
        self.accelerator = build_accelerator(cfg, len(self.train_data))
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        # The plan of a full-size step, and the size of every step (they differ only during a batch ramp).
        self.plan, self.batches = schedule_for_config(cfg, self.world_size, len(self.train_data))
        self._step_plans = {self.plan.global_size: self.plan}
        self.run_dir = cfg.run_dir
        self.checkpoint_root = self.run_dir / "checkpoints"
        self._previous_handlers: dict = {}
        # Before anything is built or written: this run alone on run.dir, and whether it continues a run.
        self.lock = self.claim_run_dir(fresh_run_dir)
        try:
            self.build(self.choose_checkpoint())
        except BaseException:
            self.release()  # a refused or failed start leaves the run directory free at once
            raise

    def build(self, resume_from: Path | None) -> None:
        """The model, data, optimizer and engine, restored from ``resume_from`` when it is set."""
        cfg, acc = self.cfg, self.accelerator
        self.deepspeed = zero.enabled(cfg)
        # Constructing the first optimizer imports ~70 MB of modules (torch._dynamo); do it now, so that the
        # memory baseline below holds them and the measured peak counts the model's own memory only.
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
        memory_baseline = PeakMeter.baseline_now(acc.device)
        model = build_model(cfg)
        self.shape = model.shape
        self.n_params = num_params(model)  # without position embeddings: the N of 6N FLOPs per token
        self.n_params_total = num_params(model, exclude_positions=False)
        self.flops_per_token = flops_per_token(model.shape, self.n_params)
        self.sampler = GlobalBatchSampler(len(self.train_data), self.plan.global_size, cfg.seed)

        o = cfg.optim
        optimizer = torch.optim.AdamW(
            optimizer_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )
        # The parameters in the optimizer's order, and its groups: what a checkpoint's optimizer.pt indexes.
        self.ordered_params = [p for group in optimizer.param_groups for p in group["params"]]
        self.optimizer_layout = zero.remember_groups(optimizer)
        ds = cfg.deepspeed
        self.memory_plan = predict_for_config(
            cfg, sum(p.numel() for p in self.ordered_params), self.world_size, acc.mixed_precision == "bf16",
            ds.stage, ds.offload_optimizer, ds.offload_params, plan=self.plan,
        )
        self.step = 0  # optimizer steps done; also the sampler's position
        self.skipped_steps = 0  # steps dropped for a non-finite gradient, in total
        self._skipped_in_row = 0
        self.last_val_loss: float | None = None
        self.last_val_step: int | None = None
        self.wandb_run_id: str | None = None  # from the checkpoint, or new (8 characters, as W&B makes them)
        # The gradient noise scale needs two batch sizes: one micro-batch on one rank, and the global batch.
        self.noise = (NoiseScale(cfg.tracking.noise_scale_decay)
                      if cfg.tracking.noise_scale and not self.deepspeed and self.plan.micro_size < self.plan.global_size
                      else None)
        self._small_sq = torch.zeros((), device=acc.device)  # |gradient of one micro-batch on this rank|^2
        self._tokens_per_sample = float(cfg.data.seq_len)
        # Weights are restored into the plain model before prepare(): DeepSpeed builds its fp32 shards
        # from them there. The optimizer state follows once it exists.
        restored = self.load_checkpoint(model, resume_from) if resume_from else None
        # prepare() wraps the model in DDP when there are several processes (or in a DeepSpeed engine),
        # wraps its forward in autocast when mixed precision is on, and compiles it when model.compile is set.
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.plain_model = acc.unwrap_model(self.model, keep_torch_compile=False)  # for eval, checks, saving
        self.decay_samples = o.decay_samples or self.batches.samples_before(cfg.train.steps)
        self.peak_lr, self.min_lr = peak_lrs(cfg, self.plan.global_size)  # after optim.lr_scaling
        self.stopped_at_target = False
        self.resumed = self.restore_training_state(*restored) if restored else False
        self.wandb_run_id = self.wandb_run_id or secrets.token_hex(4)
        self.memory = PeakMeter(acc.device, memory_baseline)
        self.memory_setup = (f"{self.memory_plan.mode} on {self.world_size} x {acc.device.type}, "
                             f"{acc.mixed_precision}, micro {self.plan.micro_size}")
        earlier = restored[3].memory_peaks if restored else None
        if earlier and earlier["setup"] == self.memory_setup:  # the peaks of the run's earlier segments
            self.memory.restore(*earlier["bytes"])  # (under another setup they would not compare)
        if self.noise is not None and self.plan.accumulation == 1:
            # One micro-step per step: DDP all-reduces inside backward, so the local gradient's norm is
            # taken in a communication hook, from each bucket before it is all-reduced.
            self.model.register_comm_hook(self, local_norm_hook)
        self.device_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu"
        self.peak_flops = peak_flops(self.device_name, acc.mixed_precision)
        self.wandb_mode = "off"

        self.lr = 0.0
        self.micro_step = 0  # micro-step within the current optimizer step (read by tests' hooks)
        self.metrics: MetricsLog | None = None
        # Wall time of the training steps, over all the run's segments (log intervals end at a host sync).
        self.train_time_s = restored[3].train_time_s if restored else 0.0
        # Running sums since the last log step, kept on the device so that no step waits for the host.
        self._loss_sum = torch.zeros((), device=acc.device)
        self._valid_since_log = 0
        self._grad_norm = torch.zeros((), device=acc.device)
        self._log_clock = (time.perf_counter(), 0)
        self._stop_signal: int | None = None
        self._interrupted = False
        self._flag_group = None

    # ----------------------------------------------------------------------------------------- run
    def train(self) -> dict:
        """The whole run: write the config, train ``train.steps`` steps, validate, save, summarise."""
        self.start()
        try:
            if not self.reached_target():  # (a run resumed where it had already reached it has nothing to train)
                self.run_steps(self.cfg.train.steps - self.step)
            return self.finish()
        except Preempted as exc:
            # Said at once, on every rank: a launcher may end the other ranks as soon as one exits.
            # One write: ranks share the launcher's stderr, and unbuffered, print() writes the line and its
            # newline apart, so that two ranks' lines could run together.
            sys.stderr.write(f"stopped: {exc}\n")
            sys.stderr.flush()
            self.close()
            raise
        except (NonFiniteError, checkpoint.CheckpointWriteError):
            self.close()
            raise

    def start(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        resumed = self.resumed
        if acc.is_main_process:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg, {"plan": self.plan.as_dict()}))
            precision = ("fp32" if acc.mixed_precision != "bf16" else "bf16 (DeepSpeed: bf16 parameters, fp32 master "
                         "copy)" if self.deepspeed else "bf16 autocast (fp32 parameters)")
            ramp_line = self.batches.describe(self.plan) + "\n" if self.batches.ramp_sizes else ""
            lr_line = ("" if cfg.optim.lr_scaling == "none" else
                       f"peak LR {self.peak_lr:.3g} = optim.lr {cfg.optim.lr:g} scaled by the {cfg.optim.lr_scaling} rule "
                       f"from optim.reference_batch {cfg.optim.reference_batch} to {self.plan.global_size}\n")
            print(f"run directory: {self.run_dir}\n{self.plan.table()}\n{ramp_line}{lr_line}"
                  f"model: {self.n_params_total:,} parameters ({self.n_params:,} without position embeddings: the N "
                  f"of 6N FLOPs per token), {self.shape}\n"
                  f"device: {acc.device} ({acc.distributed_type}), precision: {precision}\n"
                  f"memory predicted per device ({self.memory_plan.mode}): {self.memory_plan.summary()}", flush=True)
        acc.wait_for_everyone()  # config.yaml is written before any rank starts training
        self.metrics = MetricsLog(
            self.run_dir / "metrics.jsonl", enabled=acc.is_main_process, resumed_step=self.step if resumed else None
        )
        if acc.is_main_process and acc.log_with:
            self.wandb_mode = start_wandb(
                acc, cfg.tracking.project, self.wandb_config(), self.run_dir, self.wandb_run_id, cfg.run.name,
                cfg.tracking.group or f"{cfg.model.size}-{cfg.data.source}-seq{cfg.data.seq_len}", list(cfg.tracking.tags),
            )
        self._samples_file = (
            open(self.run_dir / f"samples-rank{self.rank}.jsonl", "w") if cfg.run.record_samples else None
        )
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        early, replaced = take_early()
        self._previous_handlers.update(replaced)  # at the end, the handlers from before train.py noted signals
        if early is not None and self._stop_signal is None:  # a stop signal came while this process started
            self._stop_signal = early
        self.first_step = self.step  # where this process started (after a resume, the checkpoint's step)
        self.progress = tqdm(
            total=cfg.train.steps, initial=self.step,
            # A bar redrawn with carriage returns is noise in a log file: only on a terminal.
            disable=not (acc.is_main_process and cfg.train.progress and sys.stderr.isatty()),
            dynamic_ncols=True, desc="train",
        )
        self._log_clock = (time.perf_counter(), self.step)

    def run_steps(self, count: int) -> None:
        """``count`` optimizer steps, with logging and periodic validation."""
        cfg = self.cfg
        for _ in range(count):
            self.train_step()
            self.progress.update(1)
            last = self.step == cfg.train.steps
            if self.step % cfg.train.log_every == 0 or last:
                self.log_train()
            if cfg.train.val_every and self.step % cfg.train.val_every == 0 and not last:
                self.log_validation()
                if self.reached_target():
                    return
            saved = cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not last
            if saved:
                self.save_checkpoint()
            if self.stop_agreed() and not last:
                if not saved:
                    self.save_checkpoint()
                raise Preempted(self.step, self._stop_signal or signal.SIGTERM)

    def reached_target(self) -> bool:
        """True when the validation at this step is at or below ``train.stop_val_loss``: the run ends here. The
        validation loss is all-reduced, so every rank decides alike."""
        target = self.cfg.train.stop_val_loss
        if target is None or self.last_val_step != self.step or self.last_val_loss > target:
            return False
        if not self.stopped_at_target:
            self.main_print(f"step {self.step}: val loss {self.last_val_loss:.4f} <= train.stop_val_loss={target}: "
                            f"target reached, finishing the run here")
        self.stopped_at_target = True
        return True

    # ----------------------------------------------------------------------------------------- preemption
    def _on_signal(self, signum, frame) -> None:
        """Only note the signal: the step in flight finishes, then all ranks agree to stop together. A second
        Ctrl-C stops at once (the newest checkpoint stays; a save cut short is put right at the next start)."""
        if self._interrupted:
            # A second Ctrl-C; under `accelerate launch` it reaches the ranks as torchrun's SIGTERM.
            raise KeyboardInterrupt
        self._interrupted = signum == signal.SIGINT  # this rank's own (another rank's arrives as _stop_signal)
        if self._stop_signal is None:
            self._stop_signal = signum  # the first one names the stop (and the exit code)
        if signum == signal.SIGINT and self.accelerator.is_main_process:
            print("Ctrl-C: stopping after the step in flight, with a checkpoint (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)

    def stop_agreed(self) -> bool:
        """True on every rank if a preemption signal reached any rank. A one-number all-reduce per step
        on a gloo group (the CPU), so that it never waits for the GPU."""
        flag = torch.tensor([0 if self._stop_signal is None else int(self._stop_signal)])
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.flag_group())
        if flag.item() and self._stop_signal is None:
            self._stop_signal = int(flag.item())  # another rank's signal
        return bool(flag.item())

    def train_time_now(self) -> float:
        """Wall time of the training steps so far, the steps since the last log line included."""
        since_log = time.perf_counter() - self._log_clock[0] if self.step > self._log_clock[1] else 0.0
        return self.train_time_s + since_log

    def all_ok(self, ok: bool) -> bool:
        """True on every rank only if every rank says ``ok``: how a write that failed on one rank (a full disk)
        reaches the others, so that all stop together instead of waiting for it."""
        flag = torch.tensor([int(ok)])
        if self.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.flag_group())
        return bool(flag.item())

    def flag_group(self):
        """The process group for one-number agreements: gloo, on the CPU, so that they never wait for the GPU."""
        if self._flag_group is None:
            gloo = torch.distributed.get_backend() == "gloo"
            self._flag_group = torch.distributed.group.WORLD if gloo else torch.distributed.new_group(backend="gloo")
        return self._flag_group

    def _pause_clock(self, started: float) -> None:
        """Move the throughput clock past work that is not training (validation, checkpoints)."""
        self._log_clock = (self._log_clock[0] + time.perf_counter() - started, self._log_clock[1])

    # ----------------------------------------------------------------------------------------- checkpoints
    def claim_run_dir(self, fresh: bool) -> rundir.RunLock | None:
        """Create run.dir and lock it for this run (the main process holds the lock; every rank learns whether
        it got it), then put right what a failed or killed checkpoint save left behind (or, ``fresh``,
        empty it)."""
        lock, refusal = rundir.prepare(self.run_dir, warn=print) if self.accelerator.is_main_process else (None, None)
        refusal = self.from_main(refusal)
        if refusal:
            raise ConfigError(refusal)
        if self.accelerator.is_main_process:  # under the lock, before anything resumes or saves
            if fresh:
                rundir.empty(self.run_dir)
            checkpoint.remove_leftovers(self.checkpoint_root)
        return lock

    def choose_checkpoint(self) -> Path | None:
        """The checkpoint folder to resume from, as ``checkpoint.resume`` says; None for a fresh start. Refuses a
        config that is not the checkpointed run's (see toolkit/rundir.py), and raises AlreadyFinished when the
        run in run.dir is complete. The main process decides; every rank follows its verdict.

        The world size may differ from the checkpoint's: the plan is re-derived for this run and the step
        number fixes the data order and the LR, so the run continues unchanged. A rank that the checkpoint
        has no RNG state for (more ranks than before) keeps its seeded generator and says so; the built-in
        loop draws no random numbers (dropout 0), so this changes nothing unless model.dropout > 0.
        """
        cfg = self.cfg.checkpoint
        if cfg.resume == "never":
            rundir.check_fresh_start(self.cfg, self.run_dir, checkpoint.list_checkpoints(self.checkpoint_root))
            return None
        folder = Path(cfg.resume) if cfg.resume != "auto" else self.agree_on_newest_checkpoint()
        if folder is None:
            # A finished run whose checkpoints were deleted: starting again would overwrite its metrics.
            rundir.check_fresh_start(self.cfg, self.run_dir, [])
            return None
        # The main process judges (the others would read the same files) and every rank follows its verdict,
        # so that no rank goes on into a collective that another has left.
        verdict = self.judge_checkpoint(folder) if self.accelerator.is_main_process else None
        kind, message = self.from_main(verdict)
        if kind == "refused":
            raise ConfigError(message)
        if kind == "finished":
            raise rundir.AlreadyFinished(message)
        if message:
            self.main_print(message)
        return folder

    def judge_checkpoint(self, folder: Path) -> tuple[str, str | None]:
        """("resume", a line to print or None), ("refused", why) or ("finished", the line to print)."""
        resume = self.cfg.checkpoint.resume
        try:
            state = checkpoint.read_state(folder, verify_first=resume != "auto")  # auto's folder is verified
            note = None
            if resume == "auto":  # this run directory's own run (a path may branch off another run's checkpoint)
                note = rundir.check_same_run(state.config, self.cfg, state.step, folder, self.run_dir)
            if state.plan["global_size"] != self.plan.global_size:
                raise ConfigError(
                    f"batch.global_size={self.plan.global_size} but checkpoint {folder} was trained with "
                    f"{state.plan['global_size']}; the global batch cannot change within a run"
                )
        except checkpoint.CheckpointError as exc:
            return "refused", f"checkpoint.resume: {exc}"
        except ConfigError as exc:
            return "refused", str(exc)
        summary = (rundir.finished_summary(self.run_dir, state.step, self.cfg.train.steps, self.cfg.train.stop_val_loss)
                   if resume == "auto" else None)
        if summary is not None:
            val = summary.get("val_loss")
            further = ("Lower train.stop_val_loss" if summary.get("stopped_at_target") and state.step < self.cfg.train.steps
                       else "Raise train.steps")
            return "finished", (f"{self.run_dir} is already finished: {state.step} steps"
                                + (f", val loss {val:.4f}" if isinstance(val, float) else "")
                                + (" (stopped at its target)" if summary.get("stopped_at_target") else "")
                                + f" (summary.json); nothing to do. {further} to train it further, or start "
                                  "a new run with run.name=NEW")
        return "resume", note

    def load_checkpoint(self, model: torch.nn.Module, folder: Path) -> tuple:
        """Load the chosen checkpoint's weights into the plain model; returns what ``restore_training_state``
        needs."""
        try:
            model_state, optimizer_state, rng, state = checkpoint.load(folder, self.rank)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"checkpoint.resume: {exc}") from None
        model.load_state_dict(model_state)
        return folder, optimizer_state, rng, state

    def from_main(self, value):
        """The main process's ``value`` on every rank (a broadcast when there are several)."""
        if self.world_size > 1:
            box = [value]
            torch.distributed.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def restore_training_state(self, folder: Path, optimizer_state: dict, rng: dict | None,
                               state: checkpoint.TrainingState) -> bool:
        """After prepare(): the optimizer state (into ZeRO's shards where DeepSpeed holds it), step and RNG."""
        acc = self.accelerator
        if self.zero_shards:
            zero.load_full_optimizer_state(self.ordered_params, self.model.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.step = state.step
        self.skipped_steps, self._skipped_in_row = state.skipped_steps, state.skipped_in_row
        self.last_val_loss, self.last_val_step = state.val_loss, state.val_step
        self.wandb_run_id = state.wandb_run_id
        if self.noise is not None and state.noise_scale is not None:
            self.noise.grad_sq, self.noise.trace = (torch.tensor(v, device=acc.device) for v in state.noise_scale)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            print(f"note: rank {self.rank} has no RNG state in {folder} (it had {state.plan['world_size']} ranks); "
                  f"keeping the seeded generator", flush=True)
        self.main_print(
            f"resumed from {folder} at step {self.step} (written with {state.plan['world_size']} processes, "
            f"now {self.world_size}: accumulation {state.plan['accumulation']} -> {self.plan.accumulation})"
        )
        acc.wait_for_everyone()
        return True

    def agree_on_newest_checkpoint(self) -> Path | None:
        """Rank 0 finds the newest valid checkpoint and tells the others, so that all ranks resume from
        the same one even if their views of the file system differ for a moment."""
        choice: tuple[str, str | None] = ("none", None)
        if self.accelerator.is_main_process:
            found = checkpoint.list_checkpoints(self.checkpoint_root)
            folder = checkpoint.newest_valid(self.checkpoint_root, warn=self.main_print)
            if folder is not None:
                choice = ("ok", str(folder))
            elif found:
                choice = ("error", f"none of the {len(found)} checkpoints in {self.checkpoint_root} verifies; "
                                   f"resume from a path (checkpoint.resume=PATH) or use another run.dir")
        choice = self.from_main(choice)
        if choice[0] == "error":
            raise ConfigError(choice[1])
        return Path(choice[1]) if choice[0] == "ok" else None

    @property
    def zero_shards(self) -> bool:
        """DeepSpeed holds the fp32 weights and optimizer states in shards (ZeRO 1-3, or its bf16 optimizer)."""
        return self.deepspeed and zero.uses_fragments(self.ordered_params)

    def whole_states(self, with_optimizer: bool) -> tuple[dict | None, dict | None, bool]:
        """The whole model and optimizer state dicts, as plain PyTorch would save them, on the main process
        (None elsewhere), and whether the weights are finite (the same verdict on every rank). Under ZeRO
        they are gathered from the shards: collectives, so every rank calls this."""
        main = self.accelerator.is_main_process
        if self.zero_shards:
            model_state, finite = zero.full_model_state(self.plain_model, keep=main)
            optimizer_state = (zero.full_optimizer_state(self.ordered_params, self.model.optimizer,
                                                         self.optimizer_layout, keep=main) if with_optimizer else None)
            return model_state if main else None, optimizer_state, finite
        # DDP and stage 0: every rank holds the same whole weights.
        finite = all(bool(torch.isfinite(p).all()) for p in self.plain_model.parameters())
        model_state = self.plain_model.state_dict() if main else None
        return model_state, self.optimizer.state_dict() if (with_optimizer and main) else None, finite

    def save_checkpoint(self) -> dict | None:
        """Write a checkpoint; returns the whole model state it wrote (on the main process, None elsewhere)."""
        started, main = time.perf_counter(), self.accelerator.is_main_process
        model_state, optimizer_state, finite = self.whole_states(with_optimizer=True)
        if not finite:
            raise NonFiniteError(f"non-finite weights at step {self.step}: not writing a checkpoint")
        checkpoint.save(
            self.checkpoint_root, self.step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            rng_state=checkpoint.rng_state(),
            state=checkpoint.TrainingState(
                self.step, self.batches.samples_before(self.step), self.plan.as_dict(), self.skipped_steps,
                self._skipped_in_row, self.last_val_loss, self.wandb_run_id,
                None if self.noise is None or self.noise.grad_sq is None
                else [float(self.noise.grad_sq), float(self.noise.trace)],
                config=asdict(self.cfg), train_time_s=self.train_time_now(), memory_peaks=self.memory_peaks(),
                val_step=self.last_val_step,
            ),
            rank=self.rank, agree=self.all_ok, world_size=self.world_size,
        )
        if main:
            checkpoint.prune(self.checkpoint_root, self.cfg.checkpoint.keep, self.step)
        self._pause_clock(started)
        return model_state

    def wandb_config(self) -> dict:
        """The W&B run's config: the resolved run config, the batch plan, the hardware and the versions."""
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        versions = {}
        for package in ("torch", "accelerate", "deepspeed", "wandb"):
            try:
                versions[package] = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                versions[package] = None
        return {
            **asdict(self.cfg),
            "plan": self.plan.as_dict(),
            "hardware": {"device": self.device_name, "device_count": self.world_size,
                         "nodes": max(1, self.world_size // max(local, 1)),
                         "distributed_type": str(self.accelerator.distributed_type),
                         "precision": self.accelerator.mixed_precision},
            "versions": versions,
            "n_params": self.n_params,
            "flops_per_token": self.flops_per_token,
        }

    def log(self, record: dict) -> None:
        """One record to metrics.jsonl and, under W&B's names, to W&B (main process). A resumed run does not
        send W&B the steps the killed run had already sent (the same numbers: the resume is exact), so that
        the W&B run's steps keep increasing."""
        self.metrics.log(record)
        if self.wandb_mode in ("online", "offline") and record["step"] > self.metrics.logged_up_to:
            values = {WANDB_NAMES[k]: v for k, v in record.items() if k in WANDB_NAMES and v is not None}
            self.accelerator.log(values, step=record["step"])

    def main_print(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # ----------------------------------------------------------------------------------------- step
    def train_step(self) -> None:
        """One optimizer step over one global batch."""
        cfg, plan = self.cfg, self.plan
        # The step's samples: the next ones of the data stream (seed and samples consumed only).
        size = self.batches.size(self.step)  # the global size, or less during a batch ramp
        step_plan = self.step_plan(size)
        global_batch = self.sampler.take(self.batches.samples_before(self.step), size)
        valid_targets = self.train_data.valid_targets(global_batch)  # the whole global batch's count
        micro_batches = rank_micro_batches(global_batch, step_plan, self.rank)
        if self._samples_file:
            self._samples_file.write(f'{{"step": {self.step}, "indices": {sum(micro_batches, [])}}}\n')

        samples_done = self.batches.samples_before(self.step + 1)
        lr = lr_at(samples_done, self.peak_lr, self.min_lr, cfg.optim.warmup_samples, self.decay_samples)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.lr = lr

        # From the second step on AdamW's states exist, and the peak before the update counts them all.
        self.memory.step_begins(count_states=self.step > self.first_step)
        step_loss = torch.zeros((), device=self.accelerator.device)
        self._small_sq = torch.zeros((), device=self.accelerator.device)
        for j, indices in enumerate(micro_batches):
            self.micro_step = j
            step_loss += self.forward_backward(indices, valid_targets, sync=j == len(micro_batches) - 1)
            if j == 0 and self.noise is not None and step_plan.accumulation > 1:
                # The first micro-batch's own gradient: not yet all-reduced (no_sync), nothing else added.
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                self._small_sq = torch.stack(torch._foreach_norm(grads)).square().sum()
        if self.deepspeed:
            self.finish_deepspeed_step(step_loss, valid_targets)
            return

        self.memory.update_begins()
        if cfg.optim.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # The gradient was all-reduced, so its norm is the same on every rank and they all decide alike.
        # This is the loop's one host sync per step (AMP's GradScaler makes the same check the same way).
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self._grad_norm = grad_norm
            # One micro-step per step: the hook took the local norm (DDP), or, in a ramp step, nobody did.
            if self.noise is not None and (step_plan.accumulation > 1 or plan.accumulation == 1):
                self.update_noise_scale(grad_norm, micro_batches[0], valid_targets, size)
            self._skipped_in_row = 0
            self._loss_sum += step_loss
            self._valid_since_log += valid_targets
        else:
            self._grad_norm = grad_norm  # logged as it was: NaN or Inf
            self.skip_step(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def step_plan(self, size: int) -> BatchPlan:
        """The plan of a step of ``size`` samples: the run's plan, or a ramp step's (same micro-batch, fewer
        accumulation steps)."""
        if size not in self._step_plans:
            self._step_plans[size] = make_plan(size, self.plan.micro_size, self.world_size, self.plan.seq_len)
        return self._step_plans[size]

    def finish_deepspeed_step(self, step_loss: torch.Tensor, valid_targets: int) -> None:
        """DeepSpeed stepped (or, on a non-finite gradient, skipped) at the last micro-step's ``engine.step``."""
        engine = self.model
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:  # stage 0 in fp32: DeepSpeed clipped with torch but kept no norm
            grad_norm = self._stage0_grad_norm
        grad_norm = torch.as_tensor(float(grad_norm))
        self._grad_norm = grad_norm
        if engine.was_step_applied() and torch.isfinite(grad_norm):
            self._skipped_in_row = 0
            self._loss_sum += step_loss
            self._valid_since_log += valid_targets
        elif engine.was_step_applied():
            # Stage 0 in fp32 has no overflow check: the update is already applied and cannot be taken back.
            raise NonFiniteError(f"non-finite gradient norm ({grad_norm.item()}) at step {self.step + 1} under "
                                 f"deepspeed.stage=0, which cannot skip a step; use ZeRO 1-3 or plain DDP")
        else:
            self.skip_step(grad_norm)  # ZeRO found the overflow and dropped the update
        self.step += 1

    def update_noise_scale(self, grad_norm: torch.Tensor, first_micro_batch: list[int], valid_targets: int,
                           samples: int) -> None:
        """One step's estimate of the gradient noise scale, from the squared norms of the small batch's
        gradient (this rank's first micro-batch) and the big batch's (the global batch, after the
        all-reduce), with batch sizes counted in valid targets since the loss is a mean over them. Kept on
        the device: it is read back only at log steps."""
        b_small = self.train_data.valid_targets(first_micro_batch)
        if not 0 < b_small < valid_targets:
            return
        # The gradient of micro-batch 0 as computed is world / valid_targets times its summed loss's
        # gradient; the small batch's mean gradient is that sum over b_small.
        scale = valid_targets / (self.world_size * b_small)
        self._tokens_per_sample = valid_targets / samples
        self.noise.update(self._small_sq * scale**2, grad_norm.float().square(), b_small, valid_targets)

    def noise_scale_now(self) -> tuple[float | None, float | None]:
        """(B_simple in samples, in valid tokens): tokens over the mean valid tokens per sample so far; (None,
        None) while it is not available (``noise_scale_unavailable`` says why)."""
        if self.noise_scale_unavailable() is not None:
            return None, None
        tokens = float(self.noise.value)
        return tokens / self._tokens_per_sample, tokens

    def noise_scale_unavailable(self) -> str | None:
        """Why there is no noise scale (yet), or None when there is one. Both smoothed estimates must be
        positive: their ratio is meaningless otherwise (early on, either can be negative from noise)."""
        if not self.cfg.tracking.noise_scale:
            return "tracking.noise_scale=false"
        if self.deepspeed:
            return "not computed under DeepSpeed yet"
        if self.noise is None:
            return "needs two batch sizes: accumulation > 1 or more than one process"
        if self.noise.grad_sq is None:
            return "no step measured yet"
        if float(self.noise.grad_sq) <= 0:
            return "the |G|^2 estimate is not positive yet (too few steps, or a batch far below the noise scale)"
        if float(self.noise.trace) <= 0:
            return "the tr(Sigma) estimate is not positive yet (too few steps)"
        return None

    def skip_step(self, grad_norm: torch.Tensor) -> None:
        """A non-finite gradient: drop the step (no update), or stop, as ``train.on_nonfinite`` says."""
        cfg = self.cfg.train
        step = self.step + 1
        if cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite gradient norm ({grad_norm.item()}) at step {step} (train.on_nonfinite=stop)")
        self.skipped_steps += 1
        self._skipped_in_row += 1
        self.main_print(f"warning: step {step}: non-finite gradient norm ({grad_norm.item()}); step skipped "
                        f"({self._skipped_in_row} in a row, {self.skipped_steps} in all)")
        if self._skipped_in_row >= cfg.max_skipped:
            raise NonFiniteError(f"{self._skipped_in_row} steps in a row with a non-finite gradient, up to step {step} "
                                 f"(train.max_skipped={cfg.max_skipped})")

    def forward_backward(self, indices: list[int], valid_targets: int, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; gradients are all-reduced only when ``sync``.
        Returns the micro-batch's summed loss (detached, on the device)."""
        acc = self.accelerator
        x, y = self.to_device(*self.train_data.batch(indices))
        if self.deepspeed:
            return self.deepspeed_forward_backward(x, y, valid_targets, last=sync)
        # DDP decides in forward whether the coming backward all-reduces (no_sync clears
        # require_backward_grad_sync, which forward reads), so the forward must run inside the context.
        with contextlib.nullcontext() if sync else acc.no_sync(self.model):
            loss_sum = self.model(x, y)
            if self.cfg.train.debug and not torch.isfinite(loss_sum):
                raise NonFiniteError(
                    f"non-finite loss ({loss_sum.item()}) at step {self.step + 1}, micro-step {self.micro_step}"
                )
            acc.backward(loss_sum * (self.world_size / valid_targets))
        if self.cfg.train.debug:
            self.check_gradients()  # after every micro-step, so the message names the one that broke
        return loss_sum.detach().float()

    def deepspeed_forward_backward(self, x: torch.Tensor, y: torch.Tensor, valid_targets: int, last: bool) -> torch.Tensor:
        engine = self.model
        loss_sum = engine(x, y)
        if self.cfg.train.debug and not torch.isfinite(loss_sum):
            raise NonFiniteError(f"non-finite loss ({loss_sum.item()}) at step {self.step + 1}, micro-step {self.micro_step}")
        # DeepSpeed averages gradients over the ranks like DDP (hence the world size), and would divide by
        # its accumulation steps on top of the global count: scale_wrt_gas=False keeps the loss exact.
        engine.backward(loss_sum * (self.world_size / valid_targets), scale_wrt_gas=False)
        if last and not self.zero_shards:
            # Stage 0 in fp32 clips inside step() without keeping the norm; gradients are all-reduced by now.
            grads = [p.grad for p in self.plain_model.parameters() if p.grad is not None]
            self._stage0_grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if last:
            self.memory.update_begins()
        engine.step()  # a no-op except at the accumulation boundary, where it clips and updates
        return loss_sum.detach().float()

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Host to device; pinned on CUDA so that the copy is asynchronous and the host runs ahead."""
        if self.accelerator.device.type == "cuda":
            return [t.pin_memory().to(self.accelerator.device, non_blocking=True) for t in tensors]
        return [t.to(self.accelerator.device) for t in tensors]

    def check_gradients(self) -> None:
        """Debug mode: the first parameter whose gradient is not finite stops the run."""
        for name, p in self.plain_model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise NonFiniteError(
                    f"non-finite gradient in parameter '{name}' at step {self.step + 1}, micro-step {self.micro_step}"
                )

    # ----------------------------------------------------------------------------------------- logs
    def log_train(self) -> None:
        """Read the running sums back from the device (the only host sync of the loop) and log them."""
        acc, plan = self.accelerator, self.plan
        loss_sum = acc.reduce(self._loss_sum, reduction="sum").item()  # .item() waits for the device
        # NaN when every step since the last log was skipped: there is no loss to report.
        loss = loss_sum / self._valid_since_log if self._valid_since_log else float("nan")
        elapsed = time.perf_counter() - self._log_clock[0]
        steps = self.step - self._log_clock[1]
        self.train_time_s += elapsed
        samples = self.batches.samples_before(self.step)
        tokens_per_s = (samples - self.batches.samples_before(self._log_clock[1])) * plan.seq_len / elapsed if elapsed > 0 else 0.0
        noise_scale, critical_tokens = self.noise_scale_now()
        step_plan = self.step_plan(self.batches.size(self.step - 1))  # the last step's (a ramp changes it)
        record = {
            "step": self.step,
            "samples": samples,
            "tokens": samples * plan.seq_len,
            "loss": loss,
            "lr": self.lr,
            "grad_norm": float(self._grad_norm),
            "skipped_steps": self.skipped_steps,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / plan.world_size,
            "samples_per_s": tokens_per_s / plan.seq_len,
            "step_time_s": elapsed / max(steps, 1),
            "mfu": mfu(tokens_per_s / plan.world_size, self.flops_per_token, self.peak_flops),
            "memory_peak_gib": self.memory.peak_so_far() / 2**30,
            "global_size": step_plan.global_size,
            "micro_size": plan.micro_size,
            "accumulation": step_plan.accumulation,
            "world_size": plan.world_size,
            "train_time_s": self.train_time_s,
            "noise_scale": noise_scale,
            "critical_batch_tokens": critical_tokens,
            # The two moving estimates behind it (per valid token): |G|^2 and tr(Sigma).
            "noise_grad_sq": None if self.noise is None or self.noise.grad_sq is None else float(self.noise.grad_sq),
            "noise_trace": None if self.noise is None or self.noise.trace is None else float(self.noise.trace),
        }
        self.log(record)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if acc.is_main_process:
            self.progress.write(
                f"step {self.step:>6}  loss {loss:.4f}  lr {self.lr:.2e}  tokens/s {tokens_per_s:,.0f}"
            )
        self._loss_sum.zero_()
        self._valid_since_log = 0
        self._log_clock = (time.perf_counter(), self.step)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted loss over ``train.val_batches`` fixed global batches of the validation split."""
        acc, model = self.accelerator, self.plain_model
        model.eval()
        loss_sum, valid = torch.zeros((), device=acc.device), 0
        for global_batch in validation_batches(self.val_data, self.plan, self.cfg.train.val_batches):
            valid += self.val_data.valid_targets(global_batch)
            for indices in rank_micro_batches(global_batch, self.plan, self.rank):
                loss_sum += model(*self.to_device(*self.val_data.batch(indices))).float()
        model.train()
        return acc.reduce(loss_sum, reduction="sum").item() / valid

    def log_validation(self) -> None:
        started = time.perf_counter()
        train_time_s = self.train_time_now()  # the training time up to this step, without this validation
        self.last_val_loss, self.last_val_step = self.evaluate(), self.step
        samples = self.batches.samples_before(self.step)
        self.log({"step": self.step, "samples": samples, "tokens": samples * self.plan.seq_len,
                  "val_loss": self.last_val_loss, "train_time_s": train_time_s})
        if self.accelerator.is_main_process:
            self.progress.write(f"step {self.step:>6}  val_loss {self.last_val_loss:.4f}")
        self._pause_clock(started)

    # ----------------------------------------------------------------------------------------- end
    def finish(self) -> dict:
        """Final validation, weights and summary; then a clean shutdown of the process group."""
        acc, plan = self.accelerator, self.plan
        memory = self.measured_memory()  # before validation and the final checkpoint add their own peaks
        # A run resumed from its own final checkpoint (killed while writing final/ or the summary, or
        # simply started again) ran no step: its final validation and checkpoint are already there.
        # Every rank knows this from the checkpoint alone, so all of them take the same branch.
        if self.step == self.first_step and self.last_val_step == self.step:
            self.main_print(f"step {self.step} was already done and validated; writing the final files only")
            final_weights, _, _ = self.whole_states(with_optimizer=False)  # a collective under ZeRO
        else:
            if self.step > self._log_clock[1]:  # a run stopped at its target between log steps: its last steps
                self.log_train()                # count in the loss, the train time and tokens/s too
            if self.last_val_step != self.step:  # (a run stopped at its target has just validated)
                self.log_validation()
                self.reached_target()  # (the last validation may reach it too: then it stopped there as well)
            final_weights = self.save_checkpoint()  # the weights it gathered are the final ones
        train_losses = [r["loss"] for r in self.metrics.history if "loss" in r]
        finite_losses = [x for x in train_losses if x == x]
        mfus = [r["mfu"] for r in self.metrics.history if r.get("mfu") is not None]
        noise_scale, critical_tokens = self.noise_scale_now()
        samples = self.batches.samples_before(self.step)
        summary = {
            "steps": self.step,
            "samples": samples,
            "tokens": samples * plan.seq_len,
            "final_loss": train_losses[-1] if train_losses else None,
            "skipped_steps": self.skipped_steps,
            "first_loss": train_losses[0] if train_losses else None,
            "val_loss": self.last_val_loss,
            "world_size": plan.world_size,
            "micro_size": plan.micro_size,
            "accumulation": plan.accumulation,
            "global_size": plan.global_size,
            # Over the whole run, all its segments (a resumed run carries the time of the earlier ones).
            "tokens_per_s": samples * plan.seq_len / self.train_time_s if self.train_time_s else None,
            "train_time_s": self.train_time_s,
            "n_params": self.n_params,
            "n_params_total": self.n_params_total,
            "flops_per_token": self.flops_per_token,
            "model": asdict(self.shape),
            "memory": memory,
            "best_loss": min(finite_losses) if finite_losses else None,
            "mfu": sum(mfus) / len(mfus) if mfus else None,
            "memory_peak_gib": memory["process_peak_gib"],
            "noise_scale": noise_scale,
            "critical_batch_tokens": critical_tokens,
            "noise_scale_unavailable": self.noise_scale_unavailable(),
            "peak_lr": self.peak_lr,  # after optim.lr_scaling
            "target_val_loss": self.cfg.train.stop_val_loss,
            "stopped_at_target": self.stopped_at_target,
            "wandb_run_id": self.wandb_run_id if self.wandb_mode != "off" else None,
        }
        if acc.is_main_process and self.wandb_mode in ("online", "offline"):
            acc.get_tracker("wandb", unwrap=True).summary.update(
                {f"final/{k}": v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        failure = self.write_final_files(final_weights, summary) if acc.is_main_process else None
        if not self.all_ok(failure is None):
            raise checkpoint.CheckpointWriteError(failure or "the final files were not written (rank 0 says why)")
        if acc.is_main_process:
            speed = f"{summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else "no step timed"
            final = "none logged" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
            print(f"done: {self.step} steps, final loss {final}, val loss {summary['val_loss']:.4f}, {speed}", flush=True)
        acc.wait_for_everyone()
        self.close()
        return summary

    def release(self) -> None:
        """Give back what the run holds in this process: the signal handlers and run.dir's lock."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        if self.lock:
            self.lock.release()

    def close(self) -> None:
        """Close the run's files and shut the process group down cleanly (also after a stop)."""
        self.release()
        self.progress.close()
        self.metrics.close()
        if self._samples_file:
            self._samples_file.close()
        self.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def memory_peaks(self) -> dict:
        """The measured peaks so far, the largest over the ranks (a collective), and the setup they were
        measured in: what a checkpoint keeps."""
        measured = torch.tensor([float(v) for v in self.memory.snapshot()], device=self.accelerator.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(measured, op=torch.distributed.ReduceOp.MAX)
        return {"setup": self.memory_setup, "bytes": [int(v) for v in measured.tolist()]}

    def measured_memory(self) -> dict:
        """Measured peak per device since training began (the largest over the ranks), next to the prediction."""
        measured = [float(v) for v in self.memory_peaks()["bytes"]]
        m = self.memory_plan
        result = {
            "mode": m.mode,
            "measured": "cuda_max_allocated" if self.accelerator.device.type == "cuda" else "peak_rss",
            # The two training peaks are above what was in use before the model was built, so they compare
            # with the prediction; 0 up to the update when the run had fewer than 2 steps.
            "measured_to_update_gib": measured[0] / 2**30,
            "measured_with_update_gib": measured[1] / 2**30,
            # The whole process (runtime and libraries included), as W&B's memory/peak_gib.
            "process_peak_gib": measured[2] / 2**30,
            "predicted_gib": m.total / 2**30,
            "predicted_model_states_gib": m.model_states / 2**30,
            "predicted_buffers_gib": m.buffers / 2**30,
            "predicted_activations_gib": m.activations / 2**30,
            "predicted_host_gib": m.host / 2**30,
        }
        self.main_print(f"memory per device ({m.mode}), GiB: predicted {m.summary()}; measured above the start "
                        f"{result['measured_to_update_gib']:.3f} up to the optimizer update, "
                        f"{result['measured_with_update_gib']:.3f} with the update; whole process "
                        f"{result['process_peak_gib']:.3f}")
        return result

    def write_final_files(self, final_weights: dict, summary: dict) -> str | None:
        """final/model.safetensors and summary.json (main process). Returns None, or the one line to print when
        the disk filled (what was half-written is removed; the final checkpoint, written before, is whole)."""
        try:
            self.save_final_weights(final_weights)
            write_json_atomic(self.run_dir / "summary.json", summary)
            return None
        except Exception as exc:
            if not checkpoint.is_disk_full(exc):
                raise
        for tmp in (self.run_dir / "final" / "model.safetensors.tmp", self.run_dir / "summary.json.tmp"):
            tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(self.run_dir).free / 2**20
        return (f"cannot write the final files (final/model.safetensors, summary.json) in {self.run_dir}: the disk is "
                f"full ({free:.1f} MiB free); the final checkpoint step-{self.step:08d} is intact; free space and run the "
                f"same command again (it writes the final files only)")

    def save_final_weights(self, whole_state: dict) -> None:
        """A plain state dict in safetensors, whole under every ZeRO stage; tied weights are stored as copies."""
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in whole_state.items()}
        final = self.run_dir / "final"
        final.mkdir(exist_ok=True)
        tmp = final / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(final / "model.safetensors")


def local_norm_hook(trainer, bucket):  # no annotations: DDP checks them against objects, not strings
    """DDP communication hook: add the squared norm of this rank's gradient bucket (before the
    all-reduce) to ``trainer._small_sq``, then all-reduce it as DDP does by default."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    trainer._small_sq = trainer._small_sq + torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square()
    return default_hooks.allreduce_hook(None, bucket)
