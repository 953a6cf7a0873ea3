"""The batch plan: global = micro x accumulation x world.

The user states ``batch.global_size`` (samples per optimizer step) and optionally
``batch.micro_size`` (samples per process per forward/backward). The world size comes from the
launcher. This module derives the accumulation steps and refuses combinations that do not divide,
listing the nearest ones that do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from toolkit.config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    global_size: int
    """Samples per optimizer step, over all processes and micro-steps."""
    micro_size: int
    """Samples per process per forward/backward."""
    accumulation: int
    """Micro-steps per optimizer step on each process."""
    world_size: int
    """Number of data-parallel processes."""
    seq_len: int
    """Tokens per sample (for token counts)."""
    ragged: bool = False
    """A full-batch step whose size is not a multiple of micro x world: its micro-batches differ in size by at
    most one sample, none above ``micro_size`` (see ``make_full_plan``)."""

    @property
    def per_rank(self) -> int:
        """Samples one process computes per optimizer step."""
        return self.micro_size * self.accumulation

    @property
    def tokens_per_step(self) -> int:
        """Token positions per optimizer step (valid targets may be fewer with data.pack=false)."""
        return self.global_size * self.seq_len

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_step": self.tokens_per_step}

    def table(self) -> str:
        """A small table for the start of a run and for ``toolkit plan``."""
        rows = [
            ("global batch (samples)", self.global_size),
            ("  = micro batch per process" + (" (at most)" if self.ragged else ""), self.micro_size),
            ("  x accumulation steps", self.accumulation),
            ("  x processes (world size)", self.world_size),
            ("tokens per optimizer step", self.tokens_per_step),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value:>10,}" for name, value in rows)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_plan(global_size: int, micro_size: int | None, world_size: int, seq_len: int = 1) -> BatchPlan:
    """Derive the plan or raise ConfigError naming valid global and micro sizes."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1")
    if global_size < 1:
        raise ConfigError(f"batch.global_size={global_size} must be a positive number of samples")
    if micro_size is None:
        if global_size % world_size:
            lower = global_size - global_size % world_size
            near = [g for g in (lower, lower + world_size) if g > 0]
            raise ConfigError(
                f"batch.global_size={global_size} does not divide over {world_size} processes; "
                f"valid global sizes nearby: {', '.join(map(str, near))}"
            )
        micro_size = global_size // world_size
    if micro_size < 1:
        raise ConfigError(f"batch.micro_size={micro_size} must be a positive number of samples")
    if micro_size > global_size:
        raise ConfigError(
            f"batch.micro_size={micro_size} is larger than batch.global_size={global_size}; "
            f"use a micro size of at most {global_size // world_size or 1}"
        )
    step = micro_size * world_size
    if global_size % step:
        lower = global_size - global_size % step
        near = [g for g in (lower, lower + step) if g > 0]
        micros = [m for m in _divisors(global_size // world_size)] if global_size % world_size == 0 else []
        hint = (
            f"valid micro sizes for global {global_size} on {world_size} processes: {', '.join(map(str, micros))}"
            if micros
            else f"global {global_size} does not divide over {world_size} processes at all"
        )
        raise ConfigError(
            f"batch.global_size={global_size} is not a multiple of batch.micro_size x world size = "
            f"{micro_size} x {world_size} = {step}; valid global sizes nearby: {', '.join(map(str, near))}; {hint}"
        )
    return BatchPlan(global_size, micro_size, global_size // step, world_size, seq_len)


# ----------------------------------------------------------------------------------------- full batch
FULL = "full"
"""``batch.global_size: full``: every step's global batch is the whole training split (full-batch gradient
descent, reached through accumulation)."""


def global_size_of(cfg, train_samples: int | None = None) -> int:
    """The global batch in samples: ``batch.global_size``, or for ``full`` the training split's size
    (``train_samples``, which only loading the data tells)."""
    size = cfg.batch.global_size
    if size != FULL:
        return int(size)
    if train_samples is None:
        raise ConfigError("batch.global_size=full needs the training split's size (load the data first)")
    return train_samples


def make_full_plan(train_samples: int, micro_size: int | None, world_size: int, seq_len: int = 1) -> BatchPlan:
    """The plan of a full-batch step. When the split's size is not a multiple of micro x world, the step is
    cut into ``accumulation x world`` contiguous micro-batches whose sizes differ by at most one (none above
    ``micro_size``); the loss is normalised by the whole batch's valid targets, so the gradient is still
    exactly the full batch's."""
    if micro_size is None:
        micro_size = -(-train_samples // world_size)
    try:
        return make_plan(train_samples, micro_size, world_size, seq_len)
    except ConfigError:
        pass
    accumulation = -(-train_samples // (micro_size * world_size))
    if train_samples < accumulation * world_size:
        raise ConfigError(f"batch.global_size=full: the training split ({train_samples} samples) is too small for "
                          f"{world_size} processes with batch.micro_size={micro_size}")
    return BatchPlan(train_samples, micro_size, accumulation, world_size, seq_len, ragged=True)


def plan_for_config(cfg, world_size: int, train_samples: int | None = None, micro_size: int | None = None) -> BatchPlan:
    """The batch plan of a run's full-size steps (after any ramp): ``make_plan`` from the config. ``micro_size``:
    what ``batch.micro_size: auto`` chose (without it, auto plans as if unset: the largest micro size there is)."""
    micro = micro_size or (None if cfg.batch.micro_size == "auto" else cfg.batch.micro_size)
    if cfg.batch.global_size == FULL:
        return make_full_plan(global_size_of(cfg, train_samples), micro, world_size, cfg.data.seq_len)
    if micro is None and cfg.batch.ramp.start is not None:
        micro = ramp_micro_default(cfg, world_size)
    return make_plan(int(cfg.batch.global_size), micro, world_size, cfg.data.seq_len)


# ----------------------------------------------------------------------------------------- LR rules
LR_RULES = ("none", "linear", "sqrt")


def scaled_lr(lr: float, global_size: int, reference: int | None, rule: str) -> float:
    """``lr`` tuned at ``reference`` samples per step, moved to ``global_size`` by ``rule``: ``linear``
    (Goyal et al. 2017, for SGD: lr x B/B_ref), ``sqrt`` (Malladi et al. 2022, for Adam: lr x sqrt(B/B_ref))
    or ``none``."""
    if rule == "none":
        return lr
    ratio = global_size / reference
    return lr * (ratio if rule == "linear" else ratio**0.5)


def peak_lrs(cfg, global_size: int) -> tuple[float, float]:
    """(peak LR, minimum LR) after ``optim.lr_scaling``; a constant schedule's minimum is its peak."""
    o = cfg.optim
    peak = scaled_lr(o.lr, global_size, o.reference_batch, o.lr_scaling)
    minimum = peak if o.schedule == "constant" else scaled_lr(o.min_lr, global_size, o.reference_batch, o.lr_scaling)
    return peak, minimum


# ----------------------------------------------------------------------------------------- batch ramp
def ramp_micro_default(cfg, world_size: int) -> int:
    """``batch.micro_size`` left unset under a ramp: the largest micro-batch that divides every ramp size."""
    from math import gcd

    common = gcd(cfg.batch.ramp.start, cfg.batch.ramp.increment)
    if common % world_size:
        raise ConfigError(f"batch.ramp: start {cfg.batch.ramp.start} and increment {cfg.batch.ramp.increment} do not "
                          f"divide over {world_size} processes; set batch.micro_size")
    return common // world_size


class BatchSchedule:
    """The global batch size of every step, and the samples consumed before it: a function of the step alone.

    Without a ramp every step has ``global_size`` samples. With ``batch.ramp`` (Megatron-LM's
    ``--rampup-batch-size start increment samples``) the size starts at ``start`` and grows by ``increment``
    each time another ``samples / n_increments`` samples have been consumed, reaching ``global_size`` after
    ``samples`` samples. The sizes are worked out once from step 0, so a resumed run sees the same ones.
    """

    def __init__(self, global_size: int, ramp_start: int | None = None, ramp_increment: int | None = None,
                 ramp_samples: int = 0):
        self.global_size = global_size
        self.ramp = (ramp_start, ramp_increment, ramp_samples)
        self.ramp_sizes: list[int] = []  # the size of each step of the ramp (steps 0 .. len - 1)
        if ramp_start is not None:
            increments = (global_size - ramp_start) // ramp_increment
            consumed = 0
            while True:
                # integer arithmetic: floor(consumed / (ramp_samples / increments)), as Megatron-LM computes it
                size = min(global_size, ramp_start + consumed * increments // ramp_samples * ramp_increment)
                if size >= global_size:
                    break
                self.ramp_sizes.append(size)
                consumed += size
        self.ramp_ends = [0]  # samples consumed before each ramp step, and after the last one
        for size in self.ramp_sizes:
            self.ramp_ends.append(self.ramp_ends[-1] + size)

    def describe(self, plan: BatchPlan) -> str:
        """The ramp in one line, as a run's start and ``toolkit plan`` print it ("" without a ramp)."""
        if not self.ramp_sizes:
            return ""
        start, increment, samples = self.ramp
        per_micro_step = plan.micro_size * plan.world_size
        return (f"batch ramp: {start} -> {self.global_size} by {increment} over {samples:,} samples: "
                f"{len(self.ramp_sizes)} steps of {start} to {self.ramp_sizes[-1]} samples, accumulation "
                f"{self.ramp_sizes[0] // per_micro_step} to {plan.accumulation}")

    def size(self, step: int) -> int:
        """Global batch size of step ``step`` (0-based)."""
        return self.ramp_sizes[step] if step < len(self.ramp_sizes) else self.global_size

    def samples_before(self, step: int) -> int:
        """Training samples consumed by steps 0 .. step - 1."""
        ramp = len(self.ramp_sizes)
        if step <= ramp:
            return self.ramp_ends[step]
        return self.ramp_ends[-1] + (step - ramp) * self.global_size

    def steps_for_samples(self, samples: int) -> int:
        """The fewest steps that consume at least ``samples`` samples."""
        step = 0
        while step < len(self.ramp_sizes) and self.ramp_ends[step] < samples:
            step += 1
        if self.samples_before(step) >= samples:
            return step
        return step + -(-(samples - self.samples_before(step)) // self.global_size)


def schedule_for_config(cfg, world_size: int, train_samples: int | None = None,
                        micro_size: int | None = None) -> tuple[BatchPlan, BatchSchedule]:
    """The full-size plan and the batch schedule, with ``batch.ramp`` checked against the plan: every ramp
    size must be a multiple of micro x world, so each ramp step is whole micro-batches on every process."""
    plan = plan_for_config(cfg, world_size, train_samples, micro_size)
    ramp = cfg.batch.ramp
    if ramp.start is None:
        return plan, BatchSchedule(plan.global_size)
    if cfg.batch.global_size == FULL:
        raise ConfigError("batch.ramp cannot be combined with batch.global_size=full; set a number of samples")
    step = plan.micro_size * plan.world_size
    if not 0 < ramp.start < plan.global_size:
        raise ConfigError(f"batch.ramp.start={ramp.start} must be between 1 and batch.global_size={plan.global_size} "
                          f"(exclusive)")
    if ramp.increment is None or ramp.increment < 1 or (plan.global_size - ramp.start) % ramp.increment:
        raise ConfigError(f"batch.ramp.increment={ramp.increment} must be positive and divide batch.global_size - "
                          f"batch.ramp.start = {plan.global_size - ramp.start}")
    if ramp.samples < 1:
        raise ConfigError(f"batch.ramp.samples={ramp.samples} must be a positive number of samples")
    for key, value in (("start", ramp.start), ("increment", ramp.increment)):
        if value % step:
            raise ConfigError(f"batch.ramp.{key}={value} is not a multiple of batch.micro_size x world size = "
                              f"{plan.micro_size} x {plan.world_size} = {step}, so a ramp step would not be whole "
                              f"micro-batches; make it a multiple of {step}")
    return plan, BatchSchedule(plan.global_size, ramp.start, ramp.increment, ramp.samples)


def steps_for_samples(cfg, samples: int, train_samples: int | None = None, world_size: int = 1) -> int:
    """Optimizer steps a config needs to consume at least ``samples`` training samples (ramp aware; the world
    size only matters to the checks). ``train_samples``: the training split's size, for ``global_size: full``."""
    return schedule_for_config(cfg, world_size, train_samples)[1].steps_for_samples(samples)
