"""The training loop, readable top to bottom: ``train`` -> ``run_steps`` -> ``train_step``.

    from toolkit import Trainer, load_config
    summary = Trainer(load_config("configs/tiny.yaml"), model=..., train_data=..., val_data=...).train()

Without a model and data it trains the built-in GPT on the built-in corpora (what ``train.py`` runs). The math
that must not depend on the hardware:

* Step k uses the global batch the sampler gives for k (seed and samples consumed only); this rank loads its
  slice of it, in ``plan.accumulation`` micro-batches, through a DataLoader (``toolkit/loader.py``).
* The model returns ``(loss_sum, n_targets)`` per micro-batch (the model contract). The step's gradient is that
  of the sum over the whole global batch over the number of targets in the whole global batch, however it is
  split: ``toolkit/steps.py`` divides once the gradients are all-reduced, once per step (``no_sync`` before).

The components do the work: ``Checkpointer``, ``Tracker``, ``Throughput`` and ``NoiseProbe``, ``PeakMeter``, the
step interface over DDP and DeepSpeed (``toolkit/steps.py``), all built by ``toolkit/build.py``. It coordinates.
"""

from __future__ import annotations

import secrets
import signal
import sys
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from toolkit.build import RunParts, describe, done_line, wandb_config
from toolkit.checkpoint import TrainingState
from toolkit.config import Config, to_yaml
from toolkit.errors import CheckpointWriteError, NonFiniteError, Preempted
from toolkit.loader import StepBatches, to_device, validation_micro_batches
from toolkit.memory import peaks_over_ranks
from toolkit.metrics import NOISE_KEYS, Throughput, local_norm_hook, speed_record
from toolkit.schedule import lr_at
from toolkit.steps import check_contract, check_gradients
from toolkit.stop_signals import StopSignals

__all__ = ["Trainer", "NonFiniteError", "Preempted"]

class Trainer:
    def __init__(self, cfg: Config, model=None, train_data=None, val_data=None, collate=None, fresh_run_dir: bool = False):
        """``model``: an ``nn.Module`` under the model contract (or a function returning one, called after seeding
        with ``cfg.seed``); ``train_data``/``val_data``: map-style datasets; ``collate``: the DataLoader's
        collate function. Without them, the built-in GPT and corpora (or ``model.source: hf``).
        ``fresh_run_dir``: empty run.dir first (a debug run's own directory: it never continues)."""
        self.cfg, self.collate = cfg, collate
        self.parts = RunParts(cfg, model, train_data, val_data, collate)  # model, data, plan, engine
        p = self.parts
        self.accelerator, self.ranks, self.plan, self.batches = p.accelerator, p.ranks, p.plan, p.batches
        self.rank, self.world_size = p.ranks.rank, p.ranks.world_size
        self.train_data, self.val_data, self.run_dir = p.train_data, p.val_data, cfg.run_dir
        self.step, self.micro_step, self.skipped_steps, self.skipped_in_row = 0, 0, 0, 0
        self.last_val_loss = self.last_val_step = None
        self.stopped_at_target, self.wandb_run_id = False, None
        self.closed, self.progress, self._samples_file, self.batch_iter, self.val_loader = False, None, None, None, None
        self.stops = StopSignals(self.ranks.is_main)  # SIGTERM, SIGUSR1/2, Ctrl-C: stop after the step, agreed
        self.clock = Throughput(0.0, 0)  # the training time (a resumed run's starts with its earlier segments')
        try:
            # Before anything is built or written: this run alone on run.dir, and whether it continues a run.
            p.checkpointer.claim(fresh_run_dir)
            folder = p.checkpointer.choose()
            loaded = p.checkpointer.load_weights(p.model, folder) if folder else None
            p.prepare()  # DDP or DeepSpeed around the (restored) model; the step interface
            self.model, self.plain_model, self.optimizer, self.steps = p.engine_model, p.plain_model, p.optimizer, p.steps
            earlier = self.load_training_state(p.checkpointer.restore(loaded, self.plan.accumulation)) if loaded else None
            self.resumed = loaded is not None
            self.wandb_run_id = self.wandb_run_id or secrets.token_hex(4)  # (8 characters, as W&B makes them)
            if earlier and earlier["setup"] == p.memory_setup:  # the peaks of the run's earlier segments
                p.memory.restore(*earlier["bytes"])  # (under another setup they would not compare)
            if p.noise is not None and self.plan.accumulation == 1:
                # One micro-step per step: DDP all-reduces inside backward, so the local gradient's norm is
                # taken in a communication hook, from each bucket before it is all-reduced.
                self.model.register_comm_hook(p.noise, local_norm_hook)
        except BaseException:
            self.close()  # a refused or failed start leaves the run directory free at once
            raise

    # ----------------------------------------------------------------------------------------- state
    def training_state(self) -> TrainingState:
        """What a checkpoint keeps besides the tensors (the Checkpointer writes it)."""
        p = self.parts
        return TrainingState(
            self.step, self.batches.samples_before(self.step), self.plan.as_dict(), self.skipped_steps,
            self.skipped_in_row, self.last_val_loss, self.wandb_run_id, p.noise.state() if p.noise else None,
            config=asdict(self.cfg), train_time_s=self.clock.now(self.step),
            memory_peaks=peaks_over_ranks(p.memory, p.memory_setup, self.world_size), val_step=self.last_val_step,
        )

    def load_training_state(self, state: TrainingState) -> dict | None:
        """Take a checkpoint's state back; returns its memory peaks."""
        self.step, self.skipped_steps, self.skipped_in_row = state.step, state.skipped_steps, state.skipped_in_row
        self.last_val_loss, self.last_val_step, self.wandb_run_id = state.val_loss, state.val_step, state.wandb_run_id
        self.clock = Throughput(state.train_time_s, state.step)
        if self.parts.noise is not None:
            self.parts.noise.restore(state.noise_scale)
        return state.memory_peaks

    # ----------------------------------------------------------------------------------------- run
    def train(self) -> dict:
        """The whole run: write the config, train ``train.steps`` steps, validate, save, summarise. Returns the
        summary (also in run.dir/summary.json)."""
        try:
            self.start()
            if not self.reached_target():  # (a run resumed where it had already reached it has nothing to train)
                self.run_steps(self.cfg.train.steps - self.step)
            return self.finish()
        except Preempted as exc:
            # Said at once, on every rank, in one write (ranks share the launcher's stderr).
            sys.stderr.write(f"stopped: {exc}\n")
            sys.stderr.flush()
            raise
        except BaseException as exc:
            if not isinstance(exc, NonFiniteError | CheckpointWriteError):  # not a stop the run decided on: a crash
                self.parts.tracker.fail()  # (or a second Ctrl-C): the W&B run is marked failed, not finished
            raise
        finally:
            self.close()  # W&B, the files, the process group and the signal handlers, however the run ends

    def start(self) -> None:
        cfg, p = self.cfg, self.parts
        if self.ranks.is_main:
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg, {"plan": self.plan.as_dict()}))
            print(describe(p, self.run_dir), flush=True)
        self.accelerator.wait_for_everyone()  # config.yaml is written before any rank starts training
        p.tracker.start(cfg.tracking, cfg.run.name, p.default_group, self.wandb_run_id,
                        wandb_config(p), self.step if self.resumed else None)
        if cfg.run.record_samples:
            self._samples_file = open(self.run_dir / f"samples-rank{self.rank}.jsonl", "w")
        self.stops.install()
        self.first_step = self.step  # where this process started (after a resume, the checkpoint's step)
        self.step_batches = StepBatches(p.sampler, self.batches, self.plan, self.rank, self.step, cfg.train.steps)
        self.batch_iter = iter(p.loader(self.train_data, self.step_batches, self.collate))
        self.progress = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True,
                             # A bar redrawn with carriage returns is noise in a log file: only on a terminal.
                             disable=not (self.ranks.is_main and cfg.train.progress and sys.stderr.isatty()))
        self.clock.restart(self.step)
        self.loss_sum = torch.zeros((), device=self.accelerator.device)  # since the last log, on the device
        self.targets_since_log = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        self.grad_norm, self.lr = torch.zeros(()), 0.0

    def run_steps(self, count: int) -> None:
        """``count`` optimizer steps, with logging, periodic validation and checkpoints, and agreed stops."""
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
                self.save_checkpoint(background=True)  # (in the background with checkpoint.async_save)
            if self.stops.agreed(self.ranks) and not last:
                if not saved:
                    self.save_checkpoint()
                self.parts.checkpointer.wait()  # the checkpoint is on disk before the run says it stopped
                raise Preempted(self.step, self.stops.signum or signal.SIGTERM)

    # ----------------------------------------------------------------------------------------- step
    def train_step(self) -> None:
        """One optimizer step over one global batch."""
        p, step_plan = self.parts, self.step_batches.step_plan(self.step)
        if self._samples_file:
            indices = sum(self.step_batches.micro_batches(self.step), [])
            self._samples_file.write(f'{{"step": {self.step}, "indices": {indices}}}\n')
        self.lr = lr_at(self.batches.samples_before(self.step + 1), p.peak_lr, p.min_lr, self.cfg.optim.warmup_samples,
                        p.decay_samples)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        # From the second step on AdamW's states exist, and the peak before the update counts them all.
        # Measured on a process's first steps and each log step (reading the peak costs a little on a CPU).
        measure = self.step - self.first_step < 3 or (self.step + 1) % self.cfg.train.log_every == 0
        p.memory.step_begins(count_states=self.step > self.first_step, measure=measure)
        if p.noise is not None:
            p.noise.begin_step()
        step_loss = torch.zeros((), device=self.accelerator.device)
        targets = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        for j in range(step_plan.accumulation):
            self.micro_step, last = j, j == step_plan.accumulation - 1
            batch = to_device(next(self.batch_iter), self.accelerator.device)
            with self.steps.accumulating(not last):
                loss_sum, n_targets = self.forward(self.model, batch)
                self.steps.backward(loss_sum, sync=last)
            if self.cfg.train.debug:  # after every micro-step, so that the message names the one that broke
                check_gradients(self.plain_model, f"at step {self.step + 1}, micro-step {j}")
            if j == 0:
                first_targets = n_targets  # the noise scale's small batch: this rank's first micro-batch
                if p.noise is not None and not last:
                    p.noise.take_small(self.steps.grads())
            step_loss += loss_sum.detach().float()
            targets += n_targets
        global_targets = self.ranks.sum(targets)  # one scalar all-reduce per step
        p.memory.update_begins()
        applied, self.grad_norm = self.steps.step(global_targets, self.step + 1)
        if applied:
            # One micro-step per step: the hook took the local norm (DDP), or, in a ramp step, nobody did.
            if p.noise is not None and (step_plan.accumulation > 1 or self.plan.accumulation == 1):
                p.noise.update(self.grad_norm, first_targets, global_targets, step_plan.global_size)  # on the device
            self.skipped_in_row = 0
            self.loss_sum += step_loss
            self.targets_since_log += global_targets
        else:
            self.skip_step(self.grad_norm)
        self.step += 1

    def forward(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``model(batch)``, held to the model contract; in debug mode, a non-finite loss stops the run."""
        loss_sum, n_targets = check_contract(model(batch))
        if self.cfg.train.debug and not torch.isfinite(loss_sum):
            raise NonFiniteError(f"non-finite loss ({loss_sum.item()}) at step {self.step + 1}, micro-step {self.micro_step}")
        return loss_sum, n_targets

    def skip_step(self, grad_norm: torch.Tensor) -> None:
        """A non-finite gradient: drop the step (no update), or stop, as ``train.on_nonfinite`` says."""
        cfg, step = self.cfg.train, self.step + 1
        if cfg.on_nonfinite == "stop":
            raise NonFiniteError(f"non-finite gradient norm ({grad_norm.item()}) at step {step} (train.on_nonfinite=stop)")
        self.skipped_steps += 1
        self.skipped_in_row += 1
        self.ranks.say(f"warning: step {step}: non-finite gradient norm ({grad_norm.item()}); step skipped "
                       f"({self.skipped_in_row} in a row, {self.skipped_steps} in all)")
        if self.skipped_in_row >= cfg.max_skipped:
            raise NonFiniteError(f"{self.skipped_in_row} steps in a row with a non-finite gradient, up to step {step} "
                                 f"(train.max_skipped={cfg.max_skipped})")

    # ----------------------------------------------------------------------------------------- stops
    def reached_target(self) -> bool:
        """True when the validation at this step is at or below ``train.stop_val_loss``: the run ends here. The
        validation loss is all-reduced, so every rank decides alike."""
        target = self.cfg.train.stop_val_loss
        if target is None or self.last_val_step != self.step or self.last_val_loss is None or self.last_val_loss > target:
            return False
        if not self.stopped_at_target:
            self.ranks.say(f"step {self.step}: val loss {self.last_val_loss:.4f} <= train.stop_val_loss={target}: "
                           f"target reached, finishing the run here")
        self.stopped_at_target = True
        return True

    def save_checkpoint(self, background: bool = False) -> dict | None:
        started = time.perf_counter()
        whole_model_state = self.parts.checkpointer.save(self.training_state(), background)
        self.clock.pause_since(started)
        return whole_model_state

    # ----------------------------------------------------------------------------------------- logs
    def log_train(self) -> None:
        """Read the running sums back from the device (the loop's only other host sync) and log them."""
        p, plan = self.parts, self.plan
        loss_sum = self.ranks.sum(self.loss_sum.clone()).item()
        count = float(self.targets_since_log)
        # NaN when every step since the last log was skipped: there is no loss to report.
        loss = loss_sum / count if count else float("nan")
        since = self.clock.lap_step
        elapsed, steps = self.clock.lap(self.step)
        samples = self.batches.samples_before(self.step)
        speed = speed_record(elapsed, steps, samples - self.batches.samples_before(since), p.tokens_per_sample,
                             plan.world_size, p.flops_per_token, p.peak_flops)
        step_plan = self.step_batches.step_plan(self.step - 1)  # the last step's (a ramp changes it)
        self.parts.tracker.log({
            "step": self.step, "samples": samples, "tokens": samples * p.tokens_per_sample, "loss": loss, "lr": self.lr,
            "grad_norm": float(self.grad_norm), "skipped_steps": self.skipped_steps, **speed,
            "memory_peak_gib": p.memory.peak_so_far() / 2**30, "global_size": step_plan.global_size,
            "micro_size": plan.micro_size, "accumulation": step_plan.accumulation, "world_size": plan.world_size,
            "train_time_s": self.clock.train_time_s,
            **(p.noise.record() if p.noise else dict.fromkeys(NOISE_KEYS)),
        })
        tokens_per_s = speed["tokens_per_s"]
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.ranks.is_main:
            self.progress.write(f"step {self.step:>6}  loss {loss:.4f}  lr {self.lr:.2e}  tokens/s {tokens_per_s:,.0f}")
        self.loss_sum.zero_()
        self.targets_since_log.zero_()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Target-weighted loss over ``train.val_batches`` fixed global batches of the validation split."""
        if self.val_loader is None:  # built once; its workers (if any) stay for the next validation
            micro = validation_micro_batches(self.val_data, self.plan, self.cfg.train.val_batches, self.rank)
            self.val_loader = self.parts.loader(self.val_data, micro, self.collate, persistent=True)
        self.plain_model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.accelerator.device)  # loss, targets
        for batch in self.val_loader:
            loss_sum, n_targets = self.forward(self.plain_model, to_device(batch, self.accelerator.device))
            sums += torch.stack([loss_sum.double(), torch.as_tensor(n_targets, device=sums.device).double()])
        self.plain_model.train()
        loss_sum, count = self.ranks.sum(sums).tolist()
        return loss_sum / count

    def log_validation(self) -> None:
        started = time.perf_counter()
        train_time_s = self.clock.now(self.step)  # the training time up to this step, without this validation
        if self.val_data is None:
            return
        self.last_val_loss, self.last_val_step = self.evaluate(), self.step
        samples = self.batches.samples_before(self.step)
        self.parts.tracker.log({"step": self.step, "samples": samples, "tokens": samples * self.parts.tokens_per_sample,
                  "val_loss": self.last_val_loss, "train_time_s": train_time_s})
        if self.ranks.is_main:
            self.progress.write(f"step {self.step:>6}  val_loss {self.last_val_loss:.4f}")
        self.clock.pause_since(started)

    # ----------------------------------------------------------------------------------------- end
    def finish(self) -> dict:
        """Final validation, weights and summary."""
        p = self.parts
        memory = p.measured_memory()  # before validation and saving add their own peaks
        # A run resumed from its own final checkpoint (killed while writing final/ or the summary, or simply
        # started again) ran no step: its final validation and checkpoint are already there. Every rank knows
        # this from the checkpoint alone, so all of them take the same branch.
        if self.step == self.first_step and self.last_val_step == self.step:
            self.ranks.say(f"step {self.step} was already done and validated; writing the final files only")
            final_weights = p.checkpointer.final_weights()  # a collective under ZeRO
        else:
            if self.step > self.clock.lap_step:  # a run stopped at its target between log steps: its last steps
                self.log_train()                  # count in the loss, the train time and tokens/s too
            if self.last_val_step != self.step:  # (a run stopped at its target has just validated)
                self.log_validation()
                self.reached_target()  # (the last validation may reach it too: then it stopped there as well)
            final_weights = self.save_checkpoint()  # the weights it gathered are the final ones (None: sharded)
        summary = p.summary(self, memory)
        p.tracker.summarise(summary)
        p.checkpointer.write_final(final_weights, summary, self.step, p.save_final)
        self.ranks.say(done_line(summary))
        self.accelerator.wait_for_everyone()
        return summary

    def close(self) -> None:
        """Give back what the run holds: signal handlers, run.dir's lock, files, W&B and the process group.
        Safe to call more than once, and after a start that failed half-way."""
        if self.closed:
            return
        self.closed = True
        self.stops.release()
        self.parts.checkpointer.release()
        for thing in (self.progress, self.parts.tracker, self._samples_file):
            if thing is not None:
                thing.close()
        self.batch_iter = self.val_loader = None  # ends DataLoader workers
        self.parts.accelerator.end_training()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
