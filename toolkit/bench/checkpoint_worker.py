"""One rank of ``toolkit bench checkpoint`` (launched by toolkit/bench/checkpoint.py, not run by hand).

    accelerate launch ... checkpoint_worker.py --config FILE --out JSON [--repeats N] [--timing STEPS EVERY] key=value ...

Without --timing it measures saves (whole and sharded, --repeats each); with it, the step loop only.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, not toolkit/bench/

from toolkit.config import load_config  # noqa: E402
from toolkit.memory import _peak_resident_bytes, resident_bytes  # noqa: E402
from toolkit.trainer import Trainer  # noqa: E402

WARM_STEPS = 2


def measured_save(trainer: Trainer, fmt: str) -> dict:
    """One synchronous save in ``fmt``: this rank's wall time, peak resident set above the start, own bytes."""
    checkpointer = trainer.parts.checkpointer
    checkpointer.format = fmt
    gc.collect()
    trainer.accelerator.wait_for_everyone()
    before = resident_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again at the resident set now
    started = time.perf_counter()
    trainer.save_checkpoint()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_bytes": max(0, _peak_resident_bytes() - before)}


def own_bytes(trainer: Trainer, fmt: str) -> tuple[int, int]:
    """(the bytes of this rank's part of the checkpoint, the whole state's bytes)."""
    from toolkit import pieces

    c = trainer.parts.checkpointer
    zero_optimizer = c.model.optimizer if c.zero_shards else None
    optimizer = None if c.zero_shards else c.torch_optimizer()
    own, tensors = pieces.local_pieces(c.ordered_params, optimizer, zero_optimizer, c.plain_model, c.ranks.rank,
                                       c.ranks.world_size)
    state = sum(max(1, _numel(shape)) * dtype.itemsize for shape, dtype in tensors.values())
    mine = sum(p.data.numel() * p.data.element_size() for p in own)
    return (mine if fmt == "sharded" else state), state


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def timed_steps(trainer: Trainer, steps: int, every: int, mode: str) -> tuple[float, float]:
    """Seconds per step over ``steps`` steps, saves included (``none``, ``async`` or ``sync``), and the seconds per
    save the step loop spent in the checkpointer (saving, or waiting for the save in flight)."""
    cfg, checkpointer = trainer.cfg, trainer.parts.checkpointer
    cfg.checkpoint.every_steps = 0 if mode == "none" else every
    cfg.checkpoint.async_save = mode == "async"
    checkpointer.format = "sharded"
    blocked = [0.0, 0]
    save = checkpointer.save

    def timed_save(*args, **kwargs):
        started = time.perf_counter()
        try:
            return save(*args, **kwargs)
        finally:
            blocked[0] += time.perf_counter() - started
            blocked[1] += 1

    checkpointer.save = timed_save
    # The timed steps start half-way between two checkpoint steps, so that each save, the last too, has half an
    # interval of steps to be written in before the final wait: the steady state of a long run, not its end.
    trainer.run_steps((every // 2 - trainer.step) % every)
    trainer.accelerator.wait_for_everyone()
    started = time.perf_counter()
    try:
        trainer.run_steps(steps)
        checkpointer.wait()
    finally:
        del checkpointer.save  # the method again
    trainer.accelerator.wait_for_everyone()
    return (time.perf_counter() - started) / steps, blocked[0] / max(1, blocked[1]), checkpointer.background_seconds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--timing", type=int, nargs=2, metavar=("STEPS", "EVERY"))
    args, overrides = parser.parse_known_args(argv)
    steps, every = args.timing or (0, 1)
    modes = ("none", "async", "sync")
    # (+every: the alignment of the first timed run; +1: the timed runs never reach the last step)
    total = WARM_STEPS + args.repeats * len(modes) * steps + every + 1
    cfg = load_config(args.config, [*overrides, "checkpoint.resume=never", "checkpoint.every_steps=0",
                                    "checkpoint.async_save=true", "tracking.wandb=false", "train.progress=false",
                                    "train.val_every=0", f"train.steps={total}", "train.log_every=1000000"])
    trainer = Trainer(cfg)
    try:
        trainer.start()
        trainer.run_steps(WARM_STEPS)
        world, rank = trainer.ranks.world_size, trainer.ranks.rank
        engine = f"zero{cfg.deepspeed.stage}" if cfg.deepspeed.stage is not None else "ddp"
        saves = []
        for _ in range(0 if args.timing else args.repeats):  # a launch measures either saves or the step loop
            for fmt in ("whole", "sharded"):
                measured = measured_save(trainer, fmt)
                mine, state = own_bytes(trainer, fmt)
                everyone = trainer.ranks.gather({**measured, "own_bytes": mine})
                saves.append({"engine": engine, "processes": world, "format": fmt, "state_bytes": state, **everyone[0],
                              "ranks": everyone})
        rows = []
        for fmt in ("whole", "sharded") if saves else ():  # the median save of each format
            mine = sorted((s for s in saves if s["format"] == fmt), key=lambda s: s["seconds"])
            rows.append(mine[len(mine) // 2])
        timing = None
        if args.timing:
            timing = {"engine": engine, "processes": world, "steps": steps, "every": every, **{m: [] for m in modes},
                      **{f"{m}_blocked": [] for m in modes}, "async_written": []}
            for repeat in range(args.repeats):
                for mode in (modes if repeat % 2 == 0 else modes[::-1]):  # a drift in speed favours none of them
                    per_step, blocked, written = timed_steps(trainer, steps, every, mode)
                    timing[mode].append(per_step)
                    timing[f"{mode}_blocked"].append(blocked)
                    if mode == "async":
                        timing["async_written"].append(written)
        if rank == 0:
            Path(args.out).write_text(json.dumps({"saves": rows, "timing": timing}))
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
