"""The run's checkpoints as the trainer sees them: which one to resume from, restoring it, saving, pruning
and the final weights, with the order of the collectives inside (every rank calls every method).

The files themselves (atomic writes, manifests, verification) are ``toolkit/checkpoint.py``; the rules
about the run directory (one run at a time, same run or not, finished) are ``toolkit/rundir.py``. The
trainer gives its state as a ``checkpoint.TrainingState`` and takes it back the same way.

Two formats (``checkpoint.format``), each resumed by any stage (or DDP) and any world size:

* ``whole``: the model and optimizer states as plain PyTorch saves them, gathered from ZeRO's shards on rank 0
  (12 bytes per parameter of its host memory, and the writers' copies), which writes them alone;
* ``sharded``: every rank writes the pieces it holds, in parallel, and reads back only the pieces it needs
  (toolkit/shards.py, toolkit/pieces.py); nothing is gathered on one rank.

With ``checkpoint.async_save`` the step loop goes on while a checkpoint is written: the states are copied
(staged) on the CPU, and a background thread writes them, agreeing with the other ranks over a process group
of its own. The next save, a stop and the end of the run wait for it first, so at most one staged copy exists.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from toolkit import checkpoint, pieces, rundir, shards, zero
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
        self.last_folder: Path | None = None  # the newest checkpoint of this run (resumed from or written)
        self.background: threading.Thread | None = None  # an asynchronous save in flight
        self.background_error: BaseException | None = None
        self.background_seconds = 0.0  # how long the last asynchronous save took to write
        self.save_group = None  # the process group of asynchronous saves
        self._staging: dict[tuple[str, int], torch.Tensor] = {}  # CPU copies of the pieces, reused by each save

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
        """At the end of the run, however it ends: let a save in flight finish (for a while: on a crash another
        rank may never answer it; a save cut short is put right at the next start), then unlock run.dir."""
        if self.background is not None:
            self.background.join(timeout=RELEASE_WAIT_S)
            self.background = None
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
        self.last_folder = folder
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
            if shards.is_sharded(folder):  # (rank 0 verified it in choose(); each rank reads only what it needs)
                reader = shards.ShardReader(folder)
                pieces.load_weights(model, reader)
                rng, state = checkpoint.load_rng(folder, self.ranks.rank), checkpoint.read_state(folder, verify_first=False)
                return folder, reader, rng, state
            model_state, optimizer_state, rng, state = checkpoint.load(folder, self.ranks.rank)
        except checkpoint.CheckpointError as exc:
            raise ConfigError(f"checkpoint.resume: {exc}") from None
        except ValueError as exc:  # a sharded checkpoint of another model
            raise ConfigError(f"checkpoint.resume: {exc}") from None
        model.load_state_dict(model_state)
        return folder, optimizer_state, rng, state

    def bind(self, model, optimizer, plain_model: torch.nn.Module, ordered_params: list, optimizer_layout,
             deepspeed: bool) -> None:
        """What is saved: the prepared model and optimizer (a DeepSpeed engine's shards or plain ones)."""
        self.model, self.optimizer, self.plain_model = model, optimizer, plain_model
        self.ordered_params, self.optimizer_layout = ordered_params, optimizer_layout
        self.zero_shards = deepspeed and zero.uses_fragments(ordered_params)
        self.format = self.choose_format()
        if self.cfg.checkpoint.async_save and self.ranks.world_size > 1:
            # Its own group, so that the background thread's agreements never interleave with the step loop's
            # collectives; gloo, on the CPU (every rank creates it, in the same order: a collective).
            self.save_group = dist.new_group(backend="gloo")

    def choose_format(self) -> str:
        """``checkpoint.format``, with ``auto`` decided: ``sharded`` when several processes hold a state of
        AUTO_SHARDED_BYTES or more (fp32 weights and AdamW moments, 12 bytes per parameter), where ``whole``
        would hold all of it on rank 0 and write it there alone; ``whole`` below, for one plain file set."""
        chosen = self.cfg.checkpoint.format
        frozen = pieces.frozen_parameters(self.plain_model, self.ordered_params)
        if frozen and any(hasattr(p, "ds_id") for p in self.plain_model.parameters()):
            # ZeRO-3 partitions them without an fp32 copy for this format to write from.
            if chosen == "sharded":
                raise ConfigError(f"checkpoint.format=sharded: the model has parameters the optimizer does not train "
                                  f"({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}), which ZeRO-3 "
                                  f"partitions without an fp32 copy; use checkpoint.format=whole")
            return "whole"
        if chosen != "auto":
            return chosen
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in self.ordered_params)
        return "sharded" if self.ranks.world_size > 1 and 12 * numel >= AUTO_SHARDED_BYTES else "whole"

    def torch_optimizer(self):
        """The torch optimizer under Accelerate's (and DeepSpeed's stage-0) wrappers."""
        inner = self.optimizer
        while hasattr(inner, "optimizer"):
            inner = inner.optimizer
        return inner

    def restore(self, loaded: tuple, accumulation: int) -> checkpoint.TrainingState:
        """After the engine is built: the optimizer state (into ZeRO's shards where DeepSpeed holds it) and this
        rank's RNG. Returns the training state for the trainer to take back."""
        folder, optimizer_state, rng, state = loaded
        sharded = isinstance(optimizer_state, shards.ShardReader)
        if sharded and self.zero_shards:  # only the moments this rank's partitions hold are read
            pieces.load_zero_optimizer_state(self.ordered_params, self.model.optimizer, optimizer_state, self.ranks.rank)
        elif self.zero_shards:
            zero.load_full_optimizer_state(self.ordered_params, self.model.optimizer, optimizer_state)
        else:
            if sharded:  # every rank holds the optimizer whole: read it whole
                optimizer_state = pieces.plain_optimizer_state(optimizer_state, self.optimizer_layout)
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
        finite = all(all_finite(p) for p in self.plain_model.parameters())
        model_state = self.plain_model.state_dict() if main else None
        return model_state, self.optimizer.state_dict() if (with_optimizer and main) else None, finite

    def save(self, state: checkpoint.TrainingState, background: bool = False) -> dict | None:
        """Write a checkpoint at ``state.step`` (after the previous asynchronous one is written); in the background
        with ``background`` (and checkpoint.async_save). Returns the whole model state it wrote (main process,
        format whole, not in the background), else None."""
        self.wait()
        background = background and self.cfg.checkpoint.async_save
        if self.format == "sharded":
            job, model_state = self._sharded_job(state, stage=background), None
        else:
            job, model_state = self._whole_job(state, stage=background)
        folder = checkpoint.step_dir(self.root, state.step)
        if not background:
            job(self.ranks.all_ok, self.ranks.gather)
        else:
            def agree(ok: bool) -> bool:
                return self.ranks.all_ok(ok, self.save_group)

            def gather(value) -> list:
                return self.ranks.gather(value, self.save_group)

            def run() -> None:
                try:
                    # The lowest CPU priority for this thread alone (Linux takes a thread id here): the writer uses
                    # the cycles the step loop leaves (its waits on communication and data) before it slows it.
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
                except (AttributeError, OSError):
                    pass
                started = time.perf_counter()
                try:
                    job(agree, gather)
                except BaseException as exc:  # raised on the step loop's thread by wait()
                    self.background_error = exc
                self.background_seconds = time.perf_counter() - started

            self.background = threading.Thread(target=run, name=f"checkpoint-step-{state.step}", daemon=True)
            self.background.start()
        self.last_folder = folder
        return None if background else model_state

    def wait(self) -> None:
        """Wait for the asynchronous save in flight, if any; raise what it raised (every rank raises: the ranks
        agreed on its failure)."""
        if self.background is not None:
            self.background.join()
            self.background = None
        error, self.background_error = self.background_error, None
        if error is not None:
            raise error

    def _whole_job(self, state: checkpoint.TrainingState, stage: bool):
        """The whole format: the states gathered on rank 0 now (a collective), written by ``job(agree, gather)``."""
        model_state, optimizer_state, finite = self.whole_states(with_optimizer=True)
        if not finite:
            raise NonFiniteError(f"non-finite weights at step {state.step}: not writing a checkpoint")
        rng = checkpoint.rng_state()
        if stage and not self.zero_shards:  # copies, since the step loop goes on updating the tensors in place
            model_state, optimizer_state = _staged(model_state), _staged(optimizer_state)  # (ZeRO's are gathered copies)
        state = copy.deepcopy(state) if stage else state

        def job(agree, gather) -> None:
            checkpoint.save(  # through the module: tests slow it down there
                self.root, state.step, model_state=model_state, optimizer_state=optimizer_state, rng_state=rng,
                state=state, rank=self.ranks.rank, agree=agree, world_size=self.ranks.world_size, gather=gather)
            self._prune(state.step)
        return job, model_state

    def _sharded_job(self, state: checkpoint.TrainingState, stage: bool):
        """The sharded format: this rank's pieces (views, or with ``stage`` CPU copies), written by
        ``job(agree, gather)``: every rank its shard and RNG file, rank 0 the index and state, then the manifest."""
        zero_optimizer = self.model.optimizer if self.zero_shards else None
        optimizer = None if self.zero_shards else self.torch_optimizer()
        own, tensors = pieces.local_pieces(self.ordered_params, optimizer, zero_optimizer, self.plain_model,
                                           self.ranks.rank, self.ranks.world_size)
        finite = all(all_finite(p.data) for p in own if p.tensor.startswith("param/"))
        if not self.ranks.all_ok(finite):
            raise NonFiniteError(f"non-finite weights at step {state.step}: not writing a checkpoint")
        rng = checkpoint.rng_state()
        names = pieces.state_dict_names(self.plain_model, self.ordered_params)
        groups = self._param_groups(zero_optimizer, optimizer)
        step = pieces.optimizer_step(optimizer, zero_optimizer)
        if stage:
            own = [shards.Piece(p.tensor, p.offset, self._stage(p)) for p in own]
            state = copy.deepcopy(state)
        rank = self.ranks.rank

        def job(agree, gather) -> None:
            described = gather(shards.describe(own))
            needed = (sum(length * tensors[t][1].itemsize for rank_pieces in described for t, _, length in rank_pieces)
                      + len(described) * checkpoint.FILE_OVERHEAD * 2 + checkpoint.SMALL_FILES)

            def write_own(tmp: Path) -> dict:
                written = shards.write_shard(tmp, rank, own)
                written[f"rng-rank{rank}.pt"] = checkpoint._save_synced(rng, tmp / f"rng-rank{rank}.pt")
                return written

            def write_main(tmp: Path) -> None:
                index = shards.build_index(tensors, described, names, {"step": step, "param_groups": groups})
                (tmp / shards.INDEX).write_text(json.dumps(index))
                checkpoint.write_state(tmp, state)

            checkpoint.save_collectively(self.root, state.step, rank, agree, gather, needed if rank == 0 else 0,
                                         write_own, write_main)
            self._prune(state.step)
        return job

    def _stage(self, piece: shards.Piece) -> torch.Tensor:
        """A CPU copy of ``piece`` for the background writer, in a buffer kept from the previous save when there
        is one of its size (the pieces are the same at every save): after the first save, staging is a copy,
        without allocating (and touching fresh pages of) a second state. Pinned when the piece is on a GPU, so
        that the copy runs at full speed."""
        key = (piece.tensor, piece.offset)
        buffer = self._staging.get(key)
        if buffer is None or buffer.shape != piece.data.shape or buffer.dtype != piece.data.dtype:
            buffer = torch.empty(piece.data.shape, dtype=piece.data.dtype, pin_memory=piece.data.is_cuda)
            self._staging[key] = buffer
        buffer.copy_(piece.data)
        return buffer

    def _prune(self, step: int) -> None:
        """Remove the checkpoints beyond checkpoint.keep (main process). A failure is said, not raised: the new
        checkpoint is in place, and the other ranks, which do not prune, must not wait for this one."""
        if self.ranks.is_main:
            try:
                checkpoint.prune(self.root, self.cfg.checkpoint.keep, step)
            except OSError as exc:
                print(f"warning: could not remove old checkpoints in {self.root} ({exc}); they stay", flush=True)

    def _param_groups(self, zero_optimizer, optimizer) -> list[dict]:
        """The optimizer's groups as its state dict lists them (numbers, not tensors: they go into JSON)."""
        if zero_optimizer is not None:
            lr = zero_optimizer.optimizer.param_groups[0]["lr"]
            groups = [{**group, "lr": lr} for group in self.optimizer_layout]
        else:
            groups = optimizer.state_dict()["param_groups"]
        return [{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in groups]

    def final_weights(self) -> dict | None:
        """The whole weights for final/ of a run that ran no step (resumed at its end): None when its checkpoint
        is sharded (``write_final`` streams final/ from the shards), else gathered (a collective under ZeRO)."""
        if self.last_folder is not None and shards.is_sharded(self.last_folder):
            return None
        return self.whole_states(with_optimizer=False)[0]

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
                if final_weights is None:  # a sharded checkpoint: final/ is read from its shards, tensor by tensor
                    reader = shards.ShardReader(self.last_folder)
                    if save_final is None:
                        shards.write_model_file(reader, final / "model.safetensors")
                    else:  # the model's own format (save_pretrained) takes a state dict: the weights, whole
                        save_final(final, {name: reader.whole(t) for name, t in reader.model_names().items()})
                else:
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


RELEASE_WAIT_S = 120
"""Seconds a run that ends with an error waits for its asynchronous save in flight."""
AUTO_SHARDED_BYTES = 1 << 30
"""``checkpoint.format=auto`` writes sharded checkpoints from this state size on (12 bytes per parameter: about
90M parameters) when there are several processes."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite, from the smallest and largest (NaN and infinities show there): one pass
    that allocates nothing, where ``isfinite(t).all()`` writes a mask as large as the tensor (20x slower here)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _staged(obj):
    """A CPU copy of the tensors in a nest of dicts and lists (what an asynchronous save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _staged(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_staged(v) for v in obj)
    return obj


def save_safetensors(folder: Path, whole_state: dict) -> None:
    """A plain state dict in safetensors, whole under every ZeRO stage; tied weights are stored as copies."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in whole_state.items()}
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "model.safetensors")
