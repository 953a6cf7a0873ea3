"""``batch.micro_size: auto``: the largest micro-batch that fits, found before training, with the global batch fixed.

The global batch shapes the optimisation; the micro-batch is how much of it one device computes at once, and
bigger is faster until memory runs out. So the toolkit measures instead of guessing. Before the first step,
on the model as it will train (its precision, its optimizer), every rank runs real steps (forward, backward,
an AdamW step) at growing micro sizes: doubling from 1, then a binary search between the last size that fit
and the first that did not. A size fits when no rank ran out of memory and each rank's measured peak stayed
under its limit less ``batch.memory_margin``. The accumulation then follows: the micro size is lowered to the
largest one that divides this rank's share of the global batch (and of every ramp step), so the global batch
and its math stay exactly as stated, unlike tools that shrink the batch itself (transformers'
``auto_find_batch_size``; Accelerate's ``find_executable_batch_size`` turns a real limit of 100 into 64).

**No rank waits forever.** A probe step is local: the plain model, no DDP, no all-reduce inside, so a rank
that runs out of memory just catches it. Then one all-reduce over a gloo group (``Ranks.all_ok``) tells every
rank whether all of them fit, so all take the same next size and end on the same answer: the smallest rank's
(Composer's auto micro-batching deadlocked when only some ranks ran out, Composer#2117, #3510).

**No trace left.** The probe's optimizer has a learning rate of 0 (AdamW then changes no weight: the update
and the decay are multiplied by it), buffers are put back after each step (a BatchNorm's statistics), the
random number generators are forked around the whole search (dropout), and gradients, optimizer states and
the allocator's cache are freed after it. The run then trains exactly as one started with the chosen size.

**What is measured**: the device's peak memory above what the process held before the model was built: on
CUDA the allocator's peak, where running out of memory is real and caught; on CPU the peak resident set
(``toolkit/memory.py``), where nothing runs out, so ``batch.memory_limit_gib`` (or, unset, the memory available
when the run starts, shared by this machine's processes) is the limit. The probe uses a plain AdamW on the
whole model; under ZeRO the states are sharded and the real run needs less, so the choice errs safe.

The answer is cached per (model, sequence length, device, precision, ZeRO stage, world size, limit ...) in
``$TOOLKIT_CACHE_DIR/micro_size.json`` (default ``~/.cache/toolkit``): a second run of the same setup does
not probe again. Delete the file after changing what a model computes without changing its shape.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from toolkit.collective import Ranks
from toolkit.config import Config, ConfigError
from toolkit.loader import collate_for, to_device
from toolkit.memory import GIB, PeakMeter, resident_bytes
from toolkit.model import optimizer_groups
from toolkit.steps import check_contract

AUTO = "auto"

OUT_OF_MEMORY = 2**62
"""A probe's peak when it ran out of memory (larger than any real one, so the largest over ranks shows it)."""


@dataclass
class AutoMicro:
    """What ``batch.micro_size: auto`` found."""

    micro_size: int
    """The micro size the run uses: the largest that fit and divides this rank's share of the global batch."""
    largest_fit: int
    """The largest size that fit (on every rank)."""
    first_fail: int | None
    """The smallest size that did not fit; None when every size up to the per-rank share fit."""
    limit_gib: float
    """The memory each size had to stay under (the smallest rank's limit, less batch.memory_margin)."""
    peaks_gib: dict[int, float | None] = field(default_factory=dict)
    """Each probed size's measured peak (the largest over the ranks); None: out of memory (or over the limit by
    a prediction, on CPU) on some rank."""
    cached: bool = False
    """Read from the cache instead of probed."""
    seconds: float = 0.0
    """The probe's wall time."""
    left_behind_gib: float | None = None
    """CUDA: memory still allocated after the probe that was not before it (0 when it left nothing behind)."""

    def line(self) -> str:
        source = "cached" if self.cached else "probed " + ", ".join(
            f"{s}: {'no' if p is None else f'{p:.3f} GiB'}" for s, p in sorted(self.peaks_gib.items()))
        failed = f", {self.first_fail} did not" if self.first_fail else ", every size up to the per-rank share fit"
        return (f"batch.micro_size=auto: {self.micro_size} (largest fit {self.largest_fit}{failed}; limit "
                f"{self.limit_gib:.3f} GiB per device; {source})")

    def as_dict(self) -> dict:
        return {**asdict(self), "peaks_gib": {str(k): v for k, v in self.peaks_gib.items()}}


# ------------------------------------------------------------------------------------------ one probe step
def batch_maker(dataset, collate):
    """A function ``size -> micro-batch`` of the first ``size`` samples (cycling through a small dataset)."""
    collate_fn, getitems = collate_for(dataset, collate), getattr(dataset, "__getitems__", None)

    def batch_of(size: int):
        indices = [i % len(dataset) for i in range(size)]
        return collate_fn(getitems(indices) if getitems else [dataset[i] for i in indices])

    return batch_of


class StepProbe:
    """Real training steps of ``model`` at a given micro size, measured, without changing the model."""

    def __init__(self, model: torch.nn.Module, batch_of, device: torch.device, bf16: bool, baseline: int,
                 weight_decay: float = 0.1, extra_bytes: int = 0):
        self.model, self.batch_of, self.device, self.bf16 = model, batch_of, device, bf16
        self.extra_bytes = extra_bytes  # held through each step: what the run adds that the plain model does not
        self.meter = PeakMeter(device, baseline)
        # lr=0: AdamW's update and its weight decay are both multiplied by the learning rate, so no weight
        # changes; its states are made as in training, and the temporaries of its step are measured.
        self.optimizer = torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=0.0,
                                           fused=device.type == "cuda")
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def peak(self, size: int) -> int:
        """Bytes above the baseline at the peak of one step at ``size``; OUT_OF_MEMORY when it ran out."""
        self.release()
        self.meter.reset_peak()
        out_of_memory = False
        try:
            # (filled: on a CPU an untouched allocation takes no memory)
            extra = torch.zeros(self.extra_bytes, dtype=torch.uint8, device=self.device).fill_(1) if self.extra_bytes else None
            batch = to_device(self.batch_of(size), self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss_sum, _ = check_contract(self.model(batch))
            loss_sum.backward()
            del batch, loss_sum
            for p in self.model.parameters():  # (lr 0 times a non-finite gradient would still be non-finite)
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)
            self.optimizer.step()
            peak = self.meter.peak_now() - self.meter.baseline
            del extra
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            out_of_memory = True  # (handled outside the except block, whose traceback holds the step's tensors)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                b.copy_(self.buffers[name])
        self.release()
        return OUT_OF_MEMORY if out_of_memory else peak

    def close(self) -> None:
        """Free the optimizer's states and everything cached; the model keeps its weights and no gradient."""
        self.optimizer.state.clear()
        del self.optimizer
        self.model.zero_grad(set_to_none=True)
        self.release()

    def release(self) -> None:
        release_memory(self.device)


def release_memory(device: torch.device) -> None:
    """Collect garbage and give freed memory back: CUDA's cached blocks, or the heap glibc keeps after a free
    (the resident set would keep it otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


def settled_baseline(device: torch.device) -> int:
    """What the process holds now, once freed memory is given back: the baseline that the probe's peaks are
    measured above (start-up's garbage, freed in the first probe step, would lower them)."""
    release_memory(device)
    return PeakMeter.baseline_now(device)


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: PyTorch's OutOfMemoryError, or a library's (cuBLAS, cuDNN) raised as RuntimeError."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise, and the resident set with it)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------ the search
def candidates(shares: list[int], ragged: bool = False) -> tuple[int, list[int]]:
    """(the largest micro size worth probing, the sizes the plan can use): the divisors of every share (any size
    up to the share for a ``ragged`` full-batch step, whose micro-batches need not be equal)."""
    if ragged:
        return max(shares), list(range(1, max(shares) + 1))
    common = math.gcd(*shares)
    return common, [d for d in range(1, common + 1) if common % d == 0]


def search(fits, cap: int, usable: list[int]) -> tuple[int, int | None]:
    """(largest size that fits, smallest that does not, or None): doubling from 1 up to ``cap``, then a binary
    search between the last fit and the first failure over the sizes in ``usable`` (the plan can only use those;
    a failure of a size that is not one still bounds the search). ``fits(size)`` must be monotone."""
    last_fit, first_fail, size = 0, None, 1
    while True:
        if fits(size):
            last_fit = size
            if size == cap:
                break
            size = min(2 * size, cap)
        else:
            first_fail = size
            break
    if last_fit == 0:
        return 0, first_fail
    if first_fail is not None:
        between = [s for s in usable if last_fit < s < first_fail]
        lo, hi = 0, len(between)  # between[:lo] fit, between[hi:] do not
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(between[mid]):
                last_fit, lo = between[mid], mid + 1
            else:
                first_fail, hi = between[mid], mid
    return last_fit, first_fail


def memory_limit(cfg: Config, device: torch.device, baseline: int) -> int:
    """Bytes a probe step may use above the baseline: batch.memory_limit_gib, else the device's own memory (the
    memory available now on CPU, shared by this machine's processes), less batch.memory_margin."""
    b = cfg.batch
    if b.memory_limit_gib is not None:
        limit = b.memory_limit_gib * GIB
    elif device.type == "cuda":
        limit = torch.cuda.mem_get_info(device)[1] - baseline
    else:
        import psutil

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        limit = psutil.virtual_memory().available / local + resident_bytes() - baseline
    return int(limit * (1 - b.memory_margin))


def choose_micro_size(cfg: Config, model: torch.nn.Module, dataset, collate, device: torch.device, bf16: bool,
                      baseline: int, shares: list[int], ranks: Ranks, setup: dict, ragged: bool = False,
                      extra_bytes: int = 0) -> AutoMicro:
    """The micro size for ``batch.micro_size: auto``; ``shares``: this rank's samples per step (of the full step
    and of every ramp step), which the micro size must divide (``ragged``: only be at most); ``setup``: what else
    the answer depends on (the cache key); ``extra_bytes``: memory the run holds that the plain model does not
    (DDP's gradient buckets). Every rank calls it; they agree through ``ranks``."""
    cap, usable = candidates(shares, ragged)
    limit = memory_limit(cfg, device, baseline)
    key = cache_key(model, cfg, device, bf16, ranks.world_size, shares, {**setup, "extra_bytes": extra_bytes})
    cached = read_cache(key)
    # Every rank takes the cached answer, or none does: a rank on another machine may not have it.
    if ranks.all_ok(cached is not None) and _agreed(ranks, cached.micro_size):
        cached.cached = True
        return cached

    started, allocated = time.perf_counter(), PeakMeter.baseline_now(device)
    probe = StepProbe(model, batch_maker(dataset, collate), device, bf16, baseline, cfg.optim.weight_decay,
                      extra_bytes)
    peaks: dict[int, float | None] = {}
    smallest_limit = -ranks.largest(-limit)

    def fits(size: int) -> bool:
        peak = probe.peak(size) if not _predicted_over(peaks, size, limit, device) else OUT_OF_MEMORY
        ok = ranks.all_ok(peak <= limit)
        worst = ranks.largest(peak)
        peaks[size] = None if worst >= OUT_OF_MEMORY else worst / GIB
        return ok

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout in a probe step draws nothing the run would
        largest_fit, first_fail = search(fits, cap, usable)
    probe.close()
    if largest_fit == 0:
        what = "out of memory" if peaks.get(1) is None else f"{peaks[1]:.3g} GiB"
        advice = ("the probe holds the whole model's AdamW states on one device, which ZeRO does not: set "
                  "batch.micro_size to a number" if cfg.deepspeed.stage is not None else
                  "raise the limit, shard the model states with DeepSpeed (deepspeed.stage) or use a smaller model")
        raise ConfigError(f"batch.micro_size=auto: not even one sample per micro-batch fits in "
                          f"{smallest_limit / GIB:.3g} GiB (batch.memory_limit_gib or the device's memory, less "
                          f"batch.memory_margin={cfg.batch.memory_margin}); one sample measured {what}; {advice}")
    micro = max(s for s in usable if s <= largest_fit)
    left = (PeakMeter.baseline_now(device) - allocated) / GIB if device.type == "cuda" else None
    found = AutoMicro(micro, largest_fit, first_fail, smallest_limit / GIB, peaks, False, time.perf_counter() - started,
                      left)
    write_cache(key, found)
    return found


def _agreed(ranks: Ranks, value: int) -> bool:
    return ranks.largest(value) == -ranks.largest(-value)


def _predicted_over(peaks: dict[int, float | None], size: int, limit: int, device: torch.device) -> bool:
    """On CPU, where running out of memory is not an exception but the system's OOM killer: a size whose peak,
    extrapolated from the last two that were measured, would pass the limit by a quarter is not run at all."""
    measured = sorted((s, p) for s, p in peaks.items() if p is not None)
    if device.type != "cpu" or len(measured) < 2:
        return False
    (s0, p0), (s1, p1) = measured[-2], measured[-1]
    predicted = p1 + (p1 - p0) / (s1 - s0) * (size - s1)
    return predicted * GIB > 1.25 * limit


# ------------------------------------------------------------------------------------------ the cache
def cache_file() -> Path:
    root = os.environ.get("TOOLKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "toolkit"
    return Path(root) / "micro_size.json"


def cache_key(model: torch.nn.Module, cfg: Config, device: torch.device, bf16: bool, world_size: int,
              shares: list[int], setup: dict) -> str:
    """The setup an answer holds for. The limit as set (batch.memory_limit_gib, or the device's total memory; not
    the memory available at the moment, which moves)."""
    if device.type == "cuda":
        device_name, total = torch.cuda.get_device_name(device), torch.cuda.mem_get_info(device)[1]
    else:
        import psutil

        device_name, total = "cpu", psutil.virtual_memory().total // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    limit = cfg.batch.memory_limit_gib * GIB if cfg.batch.memory_limit_gib is not None else total
    layout = hashlib.sha256(repr([(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()]).encode()
                            + repr(model).encode()).hexdigest()[:16]
    return json.dumps({"model": f"{type(model).__name__}:{layout}", "seq_len": cfg.data.seq_len, "device": device_name,
                       "precision": "bf16" if bf16 else "fp32", "world_size": world_size, "limit_mib": int(limit // 2**20),
                       "shares": shares, **setup}, sort_keys=True)


def read_cache(key: str) -> AutoMicro | None:
    try:
        entry = json.loads(cache_file().read_text()).get(key)
        if entry is None:
            return None
        entry["peaks_gib"] = {int(k): v for k, v in entry["peaks_gib"].items()}
        return AutoMicro(**entry)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # no cache, or one this version cannot read: probe


def write_cache(key: str, found: AutoMicro) -> None:
    """Add ``found`` under ``key`` (atomically: processes of other runs may read or write it at the same time)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        entries[key] = {**found.as_dict(), "cached": False}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs the next run a probe
