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
            ("  = micro batch per process", self.micro_size),
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
