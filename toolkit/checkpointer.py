"""The run's checkpoints as the trainer sees them: which one to resume from, restoring it, saving, pruning
and the final weights, with the order of the collectives inside (every rank calls every method).

The files themselves (atomic writes, manifests, verification) are ``toolkit/checkpoint.py``; the rules
about the run directory (one run at a time, same run or not, finished) are ``toolkit/rundir.py``. The
trainer gives its state as a ``checkpoint.TrainingState`` and takes it back the same way.

Checkpoints are whole: the model and optimizer states as plain PyTorch saves them, gathered from ZeRO's
shards when DeepSpeed holds them, so that any stage (or DDP) and any world size resume any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from toolkit import checkpoint, rundir, zero
from toolkit.collective import Ranks
from toolkit.config import Config, ConfigError
from toolkit.errors import NonFiniteError
from toolkit.tracking import write_json_atomic


class Checkpointer:
    def __init__(self, cfg: Config, ranks: Ranks, global_size: int):
        self.cfg, self.ranks, self.global_size = cfg, ranks, global_size
        self.run_dir = cfg.run_dir
        self.root = self.run_dir / "checkpoints"
        self.lock: rundir.RunLock | None = None

    # ----------------------------------------------------------------------------------------- choosing
    def claim(self, fresh: bool) -> None:
        """Create run.dir and lock it for this run (the main process holds the lock; every rank learns whether
        it got it), then put right what a failed or killed save left behind (or, ``fresh``, empty it)."""
        lock, refusal = rundir.prepare(self.run_dir, warn=print) if self.ranks.is_main else (None, None)
        refusal = self.ranks.from_main(refusal)
        if refusal:
            raise ConfigError(refusal)
        self.lock = lock
        if self.ranks.is_main:  # under the lock, before anything resumes or saves
            if fresh:
                rundir.empty(self.run_dir)
            checkpoint.remove_leftovers(self.root)

    def lock_fds(self) -> tuple[int, ...]:
        """File descriptors a forked helper process must close (the run directory's lock)."""
        fd = self.lock.fileno() if self.lock else None
        return () if fd is None else (fd,)

    def release(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None

    def choose(self) -> Path | None:
        """The checkpoint folder to resume from, as ``checkpoint.resume`` says; None for a fresh start. Refuses a
        config that is not the checkpointed run's (toolkit/rundir.py), and raises AlreadyFinished when the
        run in run.dir is complete. The main process decides; every rank follows its verdict.

        The world size may differ from the checkpoint's: the plan is re-derived for this run and the step
        number fixes the data order and the LR, so the run continues unchanged."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            rundir.check_fresh_start(self.cfg, self.run_dir, checkpoint.list_checkpoints(self.root))
            return None
        folder = Path(resume) if resume != "auto" else self._agree_on_newest()
        if folder is None:
            # A finished run whose checkpoints were deleted: starting again would overwrite its metrics.
            rundir.check_fresh_start(self.cfg, self.run_dir, [])
            return None
        # The main process judges (the others would read the same files) and every rank follows its verdict,
        # so that no rank goes on into a collective that another has left.
        kind, message = self.ranks.from_main(self._judge(folder) if self.ranks.is_main else None)
        if kind == "refused":
            raise ConfigError(message)
        if kind == "finished":
            raise rundir.AlreadyFinished(message)
        if message:
            self.ranks.say(message)
        return folder

    def _judge(self, folder: Path) -> tuple[str, str | None]:
        """("resume", a line to print or None), ("refused", why) or ("finished", the line to print)."""
        cfg, resume = self.cfg, self.cfg.checkpoint.resume
        try:
            state = checkpoint.read_state(folder, verify_first=resume != "auto")  # auto's folder is verified
            note = None
            if resume == "auto":  # this run directory's own run (a path may branch off another run's checkpoint)
                note = rundir.check_same_run(state.config, cfg, state.step, folder, self.run_dir)
            if state.plan["global_size"] != self.global_size:
                raise ConfigError(
                    f"batch.global_size={self.global_size} but checkpoint {folder} was trained with "
                    f"{state.plan['global_size']}; the global batch cannot change within a run"
                )
        except checkpoint.CheckpointError as exc:
            return "refused", f"checkpoint.resume: {exc}"
        except ConfigError as exc:
            return "refused", str(exc)
        summary = (rundir.finished_summary(self.run_dir, state.step, cfg.train.steps, cfg.train.stop_val_loss)
                   if resume == "auto" else None)
        if summary is None:
            return "resume", note
        val = summary.get("val_loss")
        further = ("Lower train.stop_val_loss" if summary.get("stopped_at_target") and state.step < cfg.train.steps
                   else "Raise train.steps")
        return "finished", (f"{self.run_dir} is already finished: {state.step} steps"
                            + (f", val loss {val:.4f}" if isinstance(val, float) else "")
                            + (" (stopped at its target)" if summary.get("stopped_at_target") else "")
                            + f" (summary.json); nothing to do. {further} to train it further, or start "
                              "a new run with run.name=NEW")

    def _agree_on_newest(self) -> Path | None:
        """Rank 0 finds the newest valid checkpoint and tells the others, so that all ranks resume from the same
        one even if their views of the file system differ for a moment."""
        choice: tuple[str, str | None] = ("none", None)
        if self.ranks.is_main:
            found = checkpoint.list_checkpoints(self.root)
            folder = checkpoint.newest_valid(self.root, warn=self.ranks.say)
            if folder is not None:
                choice = ("ok", str(folder))
            elif found:
                choice = ("error", f"none of the {len(found)} checkpoints in {self.root} verifies; "
                                   f"resume from a path (checkpoint.resume=PATH) or use another run.dir")
        kind, folder = self.ranks.from_main(choice)
        if kind == "error":
            raise ConfigError(folder)
        return Path(folder) if kind == "ok" else None

    # ----------------------------------------------------------------------------------------- restoring
    def load_weights(self, model: torch.nn.Module, folder: Path) -> tuple:
        """Load the checkpoint's weights into the plain model, before the engine is built (DeepSpeed builds its
        fp32 shards from them). Returns what ``restore`` needs once the optimizer exists."""
        try:
            model_state, optimizer_state, rng, state = checkpoint.load(folder, self.ranks.rank)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"checkpoint.resume: {exc}") from None
        model.load_state_dict(model_state)
        return folder, optimizer_state, rng, state

    def bind(self, model, optimizer, plain_model: torch.nn.Module, ordered_params: list, optimizer_layout,
             deepspeed: bool) -> None:
        """What is saved: the prepared model and optimizer (a DeepSpeed engine's shards or plain ones)."""
        self.model, self.optimizer, self.plain_model = model, optimizer, plain_model
        self.ordered_params, self.optimizer_layout = ordered_params, optimizer_layout
        self.zero_shards = deepspeed and zero.uses_fragments(ordered_params)

    def restore(self, loaded: tuple, accumulation: int) -> checkpoint.TrainingState:
        """After the engine is built: the optimizer state (into ZeRO's shards where DeepSpeed holds it) and this
        rank's RNG. Returns the training state for the trainer to take back."""
        folder, optimizer_state, rng, state = loaded
        if self.zero_shards:
            zero.load_full_optimizer_state(self.ordered_params, self.model.optimizer, optimizer_state)
        else:
            # The checkpoint's groups carry the kernel flags of the run that wrote it (a CPU run's unfused AdamW);
            # this run keeps its own, and torch places the step counts by them (on the GPU for the fused kernel).
            own = getattr(self.optimizer, "optimizer", self.optimizer).param_groups
            for saved, group in zip(optimizer_state["param_groups"], own, strict=True):
                saved.update({key: group[key] for key in ("fused", "foreach", "capturable") if key in group})
            self.optimizer.load_state_dict(optimizer_state)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            # More ranks than before: this one keeps its seeded generator. The built-in loop draws no random
            # numbers (dropout 0), so this changes nothing unless model.dropout > 0.
            print(f"note: rank {self.ranks.rank} has no RNG state in {folder} (it had {state.plan['world_size']} "
                  f"ranks); keeping the seeded generator", flush=True)
        self.ranks.say(f"resumed from {folder} at step {state.step} (written with {state.plan['world_size']} "
                       f"processes, now {self.ranks.world_size}: accumulation {state.plan['accumulation']} -> {accumulation})")
        return state

    # ----------------------------------------------------------------------------------------- saving
    def whole_states(self, with_optimizer: bool) -> tuple[dict | None, dict | None, bool]:
        """The whole model and optimizer state dicts, as plain PyTorch would save them, on the main process
        (None elsewhere), and whether the weights are finite (the same verdict on every rank). Under ZeRO
        they are gathered from the shards: collectives, so every rank calls this."""
        main = self.ranks.is_main
        if self.zero_shards:
            model_state, finite = zero.full_model_state(self.plain_model, keep=main)
            optimizer_state = (zero.full_optimizer_state(self.ordered_params, self.model.optimizer,
                                                         self.optimizer_layout, keep=main) if with_optimizer else None)
            return model_state if main else None, optimizer_state, finite
        # DDP and stage 0: every rank holds the same whole weights.
        finite = all(bool(torch.isfinite(p).all()) for p in self.plain_model.parameters())
        model_state = self.plain_model.state_dict() if main else None
        return model_state, self.optimizer.state_dict() if (with_optimizer and main) else None, finite

    def save(self, state: checkpoint.TrainingState) -> dict | None:
        """Write a checkpoint at ``state.step``; returns the whole model state it wrote (main process)."""
        model_state, optimizer_state, finite = self.whole_states(with_optimizer=True)
        if not finite:
            raise NonFiniteError(f"non-finite weights at step {state.step}: not writing a checkpoint")
        checkpoint.save(  # through the module: tests slow it down there
            self.root, state.step, model_state=model_state, optimizer_state=optimizer_state,
            rng_state=checkpoint.rng_state(), state=state, rank=self.ranks.rank, agree=self.ranks.all_ok,
            world_size=self.ranks.world_size,
        )
        if self.ranks.is_main:
            checkpoint.prune(self.root, self.cfg.checkpoint.keep, state.step)
        return model_state

    def write_final(self, final_weights: dict | None, summary: dict, step: int, save_final=None) -> None:
        """final/ and summary.json (main process writes; every rank learns the outcome). ``save_final(folder,
        state)`` writes the weights in the model's own format (a HF model's ``save_pretrained``); by default a
        plain state dict in final/model.safetensors. A full disk raises CheckpointWriteError on every rank,
        after removing what was half-written (the final checkpoint, written before, is whole)."""
        failure = None
        if self.ranks.is_main:
            try:
                final = self.run_dir / "final"
                final.mkdir(exist_ok=True)
                (save_final or save_safetensors)(final, final_weights)
                write_json_atomic(self.run_dir / "summary.json", summary)
            except Exception as exc:
                if not checkpoint.is_disk_full(exc):
                    raise
                for tmp in (self.run_dir / "final" / "model.safetensors.tmp", self.run_dir / "summary.json.tmp"):
                    tmp.unlink(missing_ok=True)
                free = shutil.disk_usage(self.run_dir).free / 2**20
                failure = (f"cannot write the final files (final/model.safetensors, summary.json) in {self.run_dir}: the disk is full "
                           f"({free:.1f} MiB free); the final checkpoint step-{step:08d} is intact; free space and "
                           f"run the same command again (it writes the final files only)")
        if not self.ranks.all_ok(failure is None):
            raise checkpoint.CheckpointWriteError(failure or "the final files were not written (rank 0 says why)")


def save_safetensors(folder: Path, whole_state: dict) -> None:
    """A plain state dict in safetensors, whole under every ZeRO stage; tied weights are stored as copies."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in whole_state.items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
