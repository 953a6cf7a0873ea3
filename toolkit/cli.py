"""Command-line entries: ``train.py`` (training) and ``toolkit`` (plan, bench)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from toolkit.batch import make_plan
from toolkit.config import ConfigError, load_config

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
"""SIGTERM/SIGUSR1: stopped after a step with a checkpoint; run the same command again (EX_TEMPFAIL)."""
BENCH_PARITY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench-parity.yaml"
BENCH_MEMORY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench-memory.yaml"
DEBUG_STEPS = 20
"""Debug mode runs at most this many steps unless train.steps is given on the command line."""


def _error(message: str, code: int) -> int:
    # Under a launcher every rank meets the same error; one line from rank 0 is enough.
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="Train with a global batch stated once.")
    parser.add_argument("--config", help="YAML run config (default: configs/tiny.yaml)")
    parser.add_argument("--debug", action="store_true",
                        help="one process on the one device, deterministic, stop at the first NaN/Inf, short run")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch.global_size=64 train.steps=20")
    args = parser.parse_intermixed_args(argv)  # `train.py key=value --debug key=value` works too
    try:
        cfg = load_config(args.config, args.overrides)
        if args.debug:
            cfg.train.debug = True
            if not any(o.startswith("train.steps=") for o in args.overrides):
                cfg.train.steps = min(cfg.train.steps, DEBUG_STEPS)
        # The plan is checked against the launcher's world size before any process group exists, and the
        # trainer is imported only then, so that a bad config fails in a fraction of a second.
        plan = make_plan(cfg.batch.global_size, cfg.batch.micro_size, int(os.environ.get("WORLD_SIZE", "1")))
        if cfg.deepspeed.stage is not None:  # a user's DeepSpeed JSON that disagrees with the plan fails here
            from toolkit import zero
            from toolkit.model import shape_from_config

            zero.deepspeed_config(cfg, plan, on_cuda=False, hidden=shape_from_config(cfg).n_embd)
        from toolkit.trainer import NonFiniteError, Preempted, Trainer

        try:
            Trainer(cfg).train()
        except NonFiniteError as exc:
            return _error(str(exc), EXIT_NONFINITE)
        except Preempted:  # the trainer has said so on every rank
            return EXIT_PREEMPTED
    except ConfigError as exc:
        return _error(str(exc), EXIT_CONFIG)
    return 0


def plan_main(args: argparse.Namespace) -> int:
    import torch

    from toolkit import memory

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg.batch.global_size, cfg.batch.micro_size, args.world_size, cfg.data.seq_len)
    # The precision the run would train in: train.precision, or for auto bf16 with CUDA and fp32 without.
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
    n_params, plans = memory.plans_for_config(cfg, args.world_size, bf16)
    if args.json:
        print(json.dumps({**plan.as_dict(), "n_params": n_params, "precision": "bf16" if bf16 else "fp32",
                          "memory_bytes": [m.as_dict() for m in plans]}, indent=2))
    else:
        print(plan.table())
        print(memory.table(plans, n_params, args.world_size, f", {'bf16' if bf16 else 'fp32'}, micro-batch "
                                                              f"{plan.micro_size} x {cfg.data.seq_len} tokens"))
    return 0


def bench_main(args: argparse.Namespace) -> int:
    from toolkit.bench import parity

    if args.which == "memory":
        from toolkit.bench_memory import memory_bench

        result = memory_bench(args.config or BENCH_MEMORY_CONFIG, args.overrides, processes=args.processes,
                              stages=args.stages)
        print(json.dumps(result, indent=2) if args.json else result["report"])
        return 0
    cfg = load_config(args.config or BENCH_PARITY_CONFIG, args.overrides)
    if args.which == "tracking":
        from toolkit.bench import tracking_overhead

        result = tracking_overhead(cfg, steps=args.steps, repeats=args.repeats)
        print(json.dumps(result, indent=2) if args.json else result["report"])
        return 0
    result = parity(cfg, steps=args.steps, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else result["report"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="toolkit", description="Global-batch training toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show the batch plan for a config and a world size, without training")
    p.add_argument("--config", help="YAML run config (default: configs/tiny.yaml)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch.micro_size=4")
    p.set_defaults(func=plan_main)

    b = sub.add_parser("bench", help="benchmarks, as ratios against a baseline measured in the same run")
    b.add_argument("which", choices=["parity", "memory", "tracking"],
                   help="parity: the toolkit's loop against a plain PyTorch loop; memory: measured against predicted "
                        "memory per device for DDP and ZeRO stages; tracking: W&B and the noise scale on vs off")
    b.add_argument("--config", help="YAML run config (default: configs/bench-parity.yaml, configs/bench-memory.yaml)")
    b.add_argument("--processes", type=int, default=2, help="memory: processes per run")
    b.add_argument("--stages", default="ddp,0,1,2,3", help="memory: comma-separated modes (ddp or a ZeRO stage)")
    b.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    b.add_argument("--repeats", type=int, default=3, help="alternating timed runs of each loop")
    b.add_argument("--json", action="store_true")
    b.add_argument("overrides", nargs="*")
    b.set_defaults(func=bench_main)

    # Overrides may stand before or after options (argparse alone rejects `--config X key=value`).
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if a.startswith("-") or "=" not in a]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return args.func(args)
    except ConfigError as exc:
        return _error(str(exc), EXIT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
