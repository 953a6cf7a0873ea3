"""Feeding a rank its micro-batches through a standard ``torch.utils.data.DataLoader``.

The global-batch sampler (``toolkit/data.py``) decides which samples step k uses from the seed and the
samples consumed; ``StepBatches`` turns that into the stream of this rank's micro-batches, step after
step, from the step the run starts at. A ``DataLoader`` with that as its ``batch_sampler`` then loads
them with worker processes, pinned memory and prefetching, so that loading overlaps compute, while the
order stays a function of the seed and the step only: a resumed run builds a new loader at its step and
sees exactly the micro-batches the uninterrupted run saw, with any number of workers (each micro-batch
is one worker's whole task, and the DataLoader hands them back in order).

Any map-style dataset works (``len`` and ``dataset[i]``, e.g. a ``TensorDataset`` or an HF
``datasets.Dataset``); a dataset with ``__getitems__(indices)`` gets each micro-batch in one call.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.dataloader import default_collate

from toolkit.batch import BatchPlan, BatchSchedule, make_plan
from toolkit.data import GlobalBatchSampler, rank_micro_batches, validation_batches


class StepBatches(Sampler[list[int]]):
    """This rank's micro-batches (lists of dataset indices) of steps ``start .. end - 1``, in order."""

    def __init__(self, sampler: GlobalBatchSampler, batches: BatchSchedule, plan: BatchPlan, rank: int,
                 start: int, end: int):
        self.sampler, self.batches, self.plan, self.rank = sampler, batches, plan, rank
        self.start, self.end = start, end

    def step_plan(self, step: int) -> BatchPlan:
        """Step ``step``'s plan: the run's, or a batch ramp's smaller step (same micro-batch, less accumulation)."""
        size = self.batches.size(step)
        if size == self.plan.global_size:
            return self.plan
        return make_plan(size, self.plan.micro_size, self.plan.world_size, self.plan.seq_len)

    def micro_batches(self, step: int) -> list[list[int]]:
        """The indices this rank computes at ``step``, one list per micro-step."""
        size = self.batches.size(step)
        global_batch = self.sampler.take(self.batches.samples_before(step), size)
        return rank_micro_batches(global_batch, self.step_plan(step), self.rank)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.end):
            yield from self.micro_batches(step)

    def __len__(self) -> int:
        return sum(self.step_plan(step).accumulation for step in range(self.start, self.end))


def collate_for(dataset, collate: Callable | None) -> Callable:
    """The user's collate; else the dataset's own (the built-in corpora build whole micro-batches in
    ``__getitems__``); else PyTorch's default."""
    if collate is not None:
        return collate
    return getattr(dataset, "collate", None) or default_collate


class InProcessLoader:
    """What a DataLoader without workers and pinned memory does (``dataset.__getitems__`` or ``dataset[i]`` per
    sample, then the collate function), without its per-batch bookkeeping, which costs a small model a few
    per cent of its step."""

    def __init__(self, dataset, batch_sampler, collate: Callable):
        self.dataset, self.batch_sampler, self.collate = dataset, batch_sampler, collate
        self.getitems = getattr(dataset, "__getitems__", None)

    def __iter__(self):
        for indices in self.batch_sampler:
            samples = self.getitems(indices) if self.getitems else [self.dataset[i] for i in indices]
            yield self.collate(samples)


def make_loader(dataset, batch_sampler, collate: Callable | None, workers: int, pin_memory: bool,
                prefetch_factor: int, persistent: bool = False, seed: int = 0, close_fds: tuple[int, ...] = ()):
    """A ``DataLoader`` over ``batch_sampler`` (``InProcessLoader`` when it would load in this process anyway).

    Its own generator, seeded with ``seed``: a DataLoader iterator otherwise draws its workers' base seed from
    the global RNG, and a resumed run (which builds its loaders again after restoring that RNG) would then
    draw numbers the uninterrupted run did not. Randomness *inside* workers (augmentation) is seeded per
    worker, not per sample, so it is not part of the exact-resume guarantee. Workers ignore stop signals (the
    training process stops after a step, with a checkpoint; a worker ended by Ctrl-C or a scheduler's SIGTERM
    would make the next batch fail instead) and close ``close_fds`` (the run directory's lock, which a forked
    worker would otherwise hold after its parent was killed)."""
    if workers == 0 and not pin_memory:
        return InProcessLoader(dataset, batch_sampler, collate_for(dataset, collate))
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate_for(dataset, collate),
        num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=persistent and workers > 0, generator=torch.Generator().manual_seed(seed),
        worker_init_fn=functools.partial(start_worker, close_fds=close_fds),
    )


def start_worker(worker_id: int, close_fds: tuple[int, ...] = ()) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def validation_micro_batches(val_data, plan: BatchPlan, count: int, rank: int) -> list[list[int]]:
    """This rank's micro-batches of ``count`` fixed global batches of the validation split."""
    return [indices for global_batch in validation_batches(val_data, plan, count)
            for indices in rank_micro_batches(global_batch, plan, rank)]


def to_device(batch, device: torch.device):
    """A batch (tensor, or tuples, lists and dicts of them) on ``device``; asynchronous from pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, Mapping):  # a dict, or an HF BatchEncoding
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
