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
        make_plan(cfg.batch.global_size, cfg.batch.micro_size, int(os.environ.get("WORLD_SIZE", "1")))
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
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg.batch.global_size, cfg.batch.micro_size, args.world_size, cfg.data.seq_len)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.table())
    return 0


def bench_main(args: argparse.Namespace) -> int:
    from toolkit.bench import parity

    cfg = load_config(args.config or BENCH_PARITY_CONFIG, args.overrides)
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
    b.add_argument("which", choices=["parity"], help="parity: the toolkit's loop against a plain PyTorch loop")
    b.add_argument("--config", help="YAML run config (default: configs/bench-parity.yaml)")
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
