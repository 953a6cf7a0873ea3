"""Command-line entries: ``train.py`` (training) and ``toolkit`` (plan, bench, config, plot, sweep, report,
recommend)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

from toolkit import config_doc
from toolkit.batch import FULL, schedule_for_config
from toolkit.config import ConfigError, load_config
from toolkit.stop_signals import catch_early, take_early

EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_DISK_FULL = 4
"""A checkpoint did not fit on the disk: nothing of it was written, the previous one is intact; free space and
run the same command again."""
EXIT_PREEMPTED = 75
"""SIGTERM/SIGUSR1/SIGUSR2: stopped after a step with a checkpoint; run the same command again (EX_TEMPFAIL)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT): stopped after the step in flight with a checkpoint; a second Ctrl-C stops at once."""
BENCH_PARITY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench-parity.yaml"
BENCH_MEMORY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench-memory.yaml"
BENCH_GPU_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench-gpu.yaml"
DEBUG_STEPS = 20
"""Debug mode runs at most this many steps unless train.steps is given on the command line."""

EXIT_MEANINGS = {
    0: "done",
    EXIT_CONFIG: "bad configuration: one line on stderr names the key and what would be valid",
    EXIT_NONFINITE: "a non-finite value stopped the run (debug mode, train.on_nonfinite=stop, or "
                    "train.max_skipped skipped steps in a row)",
    EXIT_DISK_FULL: "the disk filled while writing a checkpoint (the previous checkpoint is intact): free space "
                    "and run again",
    EXIT_PREEMPTED: "preempted (SIGTERM, SIGUSR1 or SIGUSR2): stopped after a step with a checkpoint; run the same command "
                    "again to continue",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): stopped after a step with a checkpoint (a second Ctrl-C stops at once, "
                      "without one); run the same command again to continue",
}
"""What each exit code of train.py means to the person who ran it, as `python train.py --help` lists them
(a test checks that every EXIT_* constant is here)."""


def _error(message: str, code: int) -> int:
    # Under a launcher every rank meets the same error; one line from rank 0 is enough.
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _end_process_group() -> None:
    """A run refused or stopped before the trainer closed leaves its process group: end it quietly."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs, and ends each option's help with its default,
    "(default: 30)", unless the help names it already or there is none to name (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _print_long(text: str) -> None:
    """Print, and stay quiet when the reader went away early (`toolkit config | head`)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


class _HelpConfig(argparse.Action):
    """``--help-config [SECTION]``: print every key (of SECTION) with its type, default and documentation,
    then exit, like ``--help``."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, metavar="SECTION", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            text = config_doc.describe([values] if values else [])
        except ConfigError as exc:
            parser.exit(EXIT_CONFIG, f"error: {exc}\n")
        _print_long(text)
        parser.exit(0)


def _rows(rows: list[tuple[str, str]], indent: int = 2, width: int = 100) -> str:
    """Two columns, the second wrapped under itself."""
    first = max(len(a) for a, _ in rows) + 2
    pad = " " * (indent + first)
    return "\n".join(textwrap.fill(" ".join(b.split()), width, initial_indent=" " * indent + a.ljust(first),
                                   subsequent_indent=pad) for a, b in rows)


def build_train_parser() -> argparse.ArgumentParser:
    """The parser of ``train.py``; its ``--help`` ends with the config sections, the exit codes and the
    files a run writes."""
    epilog = "\n".join([
        "config sections (the top-level keys of a --config file; set any key as section.key=value):",
        _rows(list(config_doc.sections().items())),
        "  Every key with its type, default and documentation: python train.py --help-config [SECTION];",
        "  with the values a run would use: toolkit config [SECTION] [--config FILE] [key=value ...].",
        "",
        "exit codes:",
        _rows([(str(code), EXIT_MEANINGS[code]) for code in sorted(EXIT_MEANINGS)]),
        "  Under accelerate launch these are the ranks' exit codes, which torchrun lists in its failure report.",
        "",
        "where runs are written:",
        "  runs/<run.name>/, or run.dir=DIR; --debug runs go to runs/<run.name>-debug/ (emptied at each debug run)",
        "  unless run.dir is set. Running the same command again continues the run from its newest checkpoint;",
        "  a finished run is left as it is, and a command with another config is refused: use run.name=NEW.",
        _rows([
            ("config.yaml", "the resolved config and the batch plan (loadable again with --config)"),
            ("metrics.jsonl", "one JSON object per log step and per validation (toolkit plot RUN_DIR draws them)"),
            ("summary.json", "the final numbers: loss, val loss, throughput, MFU, memory, noise scale"),
            ("checkpoints/", "the newest checkpoints (checkpoint.keep), resumed from by checkpoint.resume=auto"),
            ("wandb/", "the W&B run's files (offline runs: upload them with `wandb sync`)"),
            ("final/", "the final weights, model.safetensors"),
        ], indent=4),
    ])
    parser = argparse.ArgumentParser(
        prog="train.py", formatter_class=HelpFormatter, epilog=epilog,
        description="Train with a global batch stated once: one process here, or several with\n"
                    "  accelerate launch --config_file launch/cpu.yaml train.py [options] [key=value ...]\n"
                    "(launch/*.yaml: one GPU, 8 GPUs, DeepSpeed ZeRO stages; see the README).")
    parser.add_argument("--config", help="YAML run config (default: configs/tiny.yaml); a run's own config.yaml "
                                         "works too")
    parser.add_argument("--debug", action="store_true",
                        help="one process on the one device, deterministic, stop at the first NaN/Inf, short run")
    parser.add_argument("--help-config", action=_HelpConfig,
                        help="print every config key (of SECTION, e.g. batch, or one key, e.g. batch.global_size) "
                             "with its type, default and documentation, and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. batch.global_size=64 train.steps=20")
    return parser


def check_launch(cfg, world_size: int) -> None:
    """Check a config's batch plan for ``world_size`` processes, and a user's DeepSpeed JSON against the plan,
    without importing the trainer (ConfigError if either fails). ``batch.global_size=full`` needs the data's
    size: the trainer checks that plan once it has the data."""
    plan = None if cfg.batch.global_size == FULL else schedule_for_config(cfg, world_size)[0]
    if cfg.deepspeed.stage is not None and plan:
        from toolkit import zero
        from toolkit.model import shape_from_config

        zero.deepspeed_config(cfg, plan, on_cuda=False, hidden=shape_from_config(cfg).n_embd)


def config_from_args(args: argparse.Namespace, defaults: list[str] | tuple[str, ...] = ()):
    cfg = load_config(args.config, [*defaults, *args.overrides])
    if args.debug:
        cfg.train.debug = True
        if not any(o.startswith("train.steps=") for o in args.overrides):
            cfg.train.steps = min(cfg.train.steps, DEBUG_STEPS)
        if cfg.run.dir is None:  # a debug run never continues (or is refused by) the real run
            cfg.run.name = f"{cfg.run.name}-debug"
    return cfg


def config_from_argv(argv: list[str], defaults: list[str] | tuple[str, ...] = ()):
    """The config a command line gives, read as train.py reads its own: ``[--config FILE] [--debug] [key=value
    ...]`` (``--help`` too), with ``defaults`` (key=value) applied before the command line's overrides. For a
    user's script, so that it takes the same arguments as train.py (and ``toolkit sweep`` and ``toolkit slurm
    submit --script`` can launch it). A bad config raises ConfigError (``toolkit.run`` turns it into exit 2)."""
    return config_from_args(build_train_parser().parse_intermixed_args(argv), defaults)


def train_main(argv: list[str]) -> int:
    parser = build_train_parser()
    args = parser.parse_intermixed_args(argv)  # `train.py key=value --debug key=value` works too

    def train() -> None:
        cfg = config_from_args(args)
        # The plan is checked against the launcher's world size before any process group exists, and the
        # trainer is imported only then, so that a bad config fails in a fraction of a second.
        # (batch.global_size=full needs the data's size: the trainer checks that plan once it has the data.)
        check_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        from toolkit.trainer import Trainer

        # A debug run's own directory starts afresh each time: it checks code, it does not continue.
        Trainer(cfg, fresh_run_dir=args.debug and cfg.run.dir is None).train()

    return run(train)


def run(train) -> int:
    """Call ``train()`` (which builds a config and a Trainer and trains) and return train.py's exit code for how it
    ended: 0 done (or already finished), 2 a bad configuration, 3 a non-finite value, 4 a full disk, 75 preempted,
    130 interrupted; the error in one line on stderr. A user's script ends with ``sys.exit(toolkit.run(main))``
    and behaves as train.py does under any launcher and under Slurm (which requeues exit 75)."""
    catch_early()  # a stop signal during start-up stops the run after its first step (train.py did this on its first line)
    try:
        from toolkit.errors import CheckpointWriteError, NonFiniteError, Preempted
        from toolkit.rundir import AlreadyFinished

        try:
            train()
        except NonFiniteError as exc:
            return _error(str(exc), EXIT_NONFINITE)
        except CheckpointWriteError as exc:  # the same on every rank; rank 0 prints it
            return _error(str(exc), EXIT_DISK_FULL)
        except Preempted as exc:  # the trainer has said so on every rank
            return EXIT_INTERRUPTED if exc.signum == signal.SIGINT else EXIT_PREEMPTED
        except AlreadyFinished as exc:
            if int(os.environ.get("RANK", "0")) == 0:
                print(exc, flush=True)
            return 0
    except ConfigError as exc:
        return _error(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:  # a Ctrl-C before training began, or a second one during it
        if int(os.environ.get("RANK", "0")) == 0:
            print("interrupted (Ctrl-C): stopped at once; the run's checkpoints are as they were (run the same "
                  "command again to continue from the newest)", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        _end_process_group()
        for signum, handler in take_early()[1].items():  # (a run that never reached training)
            signal.signal(signum, handler)
    return 0


def plan_main(args: argparse.Namespace) -> int:
    import torch

    from toolkit import memory

    cfg = load_config(args.config, args.overrides)
    train_samples = None
    if cfg.batch.global_size == FULL:  # the whole training split: its size is known once the data is read
        from toolkit.data import load_data
        from toolkit.model import shape_from_config

        train_samples = len(load_data(cfg, shape_from_config(cfg).vocab_size)[0])
    plan, batches = schedule_for_config(cfg, args.world_size, train_samples)
    # The precision the run would train in: train.precision, or for auto bf16 with CUDA and fp32 without.
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())
    n_params, plans = memory.plans_for_config(cfg, args.world_size, bf16, plan)
    if args.json:
        from toolkit.model import shape_from_config

        shape = shape_from_config(cfg)  # n_params as a run's summary counts it: without position embeddings
        print(json.dumps({**plan.as_dict(), "ramp_sizes": batches.ramp_sizes, "micro_auto": cfg.batch.micro_size == "auto",
                          "n_params": n_params - shape.seq_len * shape.n_embd,
                          "n_params_total": n_params, "precision": "bf16" if bf16 else "fp32",
                          "memory_bytes": [m.as_dict() for m in plans]}, indent=2))
    else:
        print(plan.table())
        if cfg.batch.micro_size == "auto":
            print("batch.micro_size=auto: the run measures the largest micro size that fits before it starts (shown "
                  "here: no accumulation, the largest there is)")
        if batches.ramp_sizes:
            print(batches.describe(plan))
        print(memory.table(plans, n_params, args.world_size, f", {'bf16' if bf16 else 'fp32'}, micro-batch "
                                                              f"{plan.micro_size} x {cfg.data.seq_len} tokens"))
    return 0


def _sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"{flag}={text} must be a comma-separated list of positive numbers, e.g. 16,32,64")
    return sizes


def bench_main(args: argparse.Namespace) -> int:
    from toolkit.bench.parity import parity

    if args.which == "memory":
        from toolkit.bench.memory import memory_bench

        result = memory_bench(args.config or BENCH_MEMORY_CONFIG, args.overrides, processes=args.processes,
                              stages=args.stages)
        print(json.dumps(result, indent=2) if args.json else result["report"])
        return 0
    if args.which == "checkpoint":
        from toolkit.bench.checkpoint import checkpoint_bench

        result = checkpoint_bench(args.config or BENCH_MEMORY_CONFIG, args.overrides,
                                  _sizes(args.world_sizes, "--world-sizes"), (args.engines or "ddp,zero3").split(","),
                                  repeats=args.repeats, steps=args.steps, every=args.every)
        print(json.dumps(result, indent=2) if args.json else result["report"])
        return 0
    if args.which == "gpu":
        from toolkit.bench.gpu import gpu_bench

        cfg = load_config(args.config or BENCH_GPU_CONFIG, args.overrides)
        result = gpu_bench(cfg, _sizes(args.micro, "--micro"), args.modes.split(","), (args.engines or "ddp,zero2").split(","),
                           args.warmup, args.steps, args.auto_share or None, Path(args.out) if args.out else None,
                           args.plain)
        print(json.dumps(result, indent=2) if args.json else result["report"])
        return 0
    cfg = load_config(args.config or BENCH_PARITY_CONFIG, args.overrides)
    if args.which == "tracking":
        from toolkit.bench.tracking import tracking_overhead

        result = tracking_overhead(cfg, steps=args.steps, repeats=args.repeats)
        print(json.dumps(result, indent=2) if args.json else result["report"])
        return 0
    result = parity(cfg, steps=args.steps, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else result["report"])
    return 0


def config_main(args: argparse.Namespace) -> int:
    names = [a for a in args.overrides if "=" not in a]
    overrides = [a for a in args.overrides if "=" in a]
    config_doc.select(names)  # an unknown section is refused before any file is read
    cfg, source = None, ""
    if args.config or overrides:
        cfg = load_config(args.config, overrides)
        source = " + ".join([str(args.config or "configs/tiny.yaml (the default)"), *overrides])
    _print_long(config_doc.describe(names, cfg, source))
    return 0


def plot_main(args: argparse.Namespace) -> int:
    from toolkit.plot import PlotError, plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except PlotError as exc:
        return _error(str(exc), EXIT_CONFIG)
    for path in paths:
        print(path)
    return 0


def sweep_main(args: argparse.Namespace) -> int:
    from toolkit.sweep import run_sweep

    spec = None
    if args.launcher == "slurm":
        from toolkit.slurm import JobSpec

        if args.gpus_per_rank not in (0, 1):
            raise ConfigError(f"--gpus-per-rank={args.gpus_per_rank}: a rank uses one GPU (that of its local rank); "
                              f"give 0 (CPU jobs) or 1")

        spec = JobSpec(gpus_per_node=args.gpus_per_rank, time=args.time, signal_lead_s=args.signal_lead,
                       partition=args.partition, account=args.account, max_requeues=args.max_requeues)
    try:
        return run_sweep(args.sweep_file, out=args.out, dry_run=args.dry_run, slurm_spec=spec)
    except KeyboardInterrupt:  # before the points started (resolving them), or while the report was written
        print("interrupted (Ctrl-C); run the same command again to continue", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def report_main(args: argparse.Namespace) -> int:
    from toolkit.report import write_report

    write_report(Path(args.sweep_dir), say=print, wandb=not args.no_wandb)  # no sweep.json: ConfigError
    return 0


def recommend_main(args: argparse.Namespace) -> int:
    from toolkit.study import format_prediction, predict_from_run

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir} (runs/<run.name>, or a run.dir)")
    prediction = predict_from_run(run_dir)
    _print_long(json.dumps(prediction, indent=2) if args.json else format_prediction(prediction))
    return 0


def slurm_main(args: argparse.Namespace) -> int:
    from toolkit import slurm

    if args.action == "status":
        return slurm.status(Path(args.run_dir), as_json=args.json)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    spec = slurm.JobSpec(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node,
        cpus_per_task=args.cpus_per_task, time=args.time, signal_lead_s=args.signal_lead, partition=args.partition,
        account=args.account, max_requeues=args.max_requeues, job_name=args.job_name, sbatch_args=args.sbatch_arg,
    )
    return slurm.submit(spec, train_args, script=Path(args.script).resolve(), dry_run=args.dry_run)


def add_slurm_parser(command) -> None:
    """``toolkit slurm submit`` and ``toolkit slurm status``."""
    from toolkit.slurm import TRAIN_SCRIPT, JobSpec

    default = JobSpec()
    parser = command("slurm", "submit a training run as a Slurm job (checked first), or show a run's job",
                     slurm_main)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = actions.add_parser("submit", formatter_class=HelpFormatter,
                           help="check the run's config and plan for the job's world size, write the filled-in "
                                "slurm/train.sbatch into the run directory and submit it",
                           description="toolkit slurm submit [options] -- [train.py arguments]\n\nChecks the "
                                       "config, its batch plan for nodes x procs-per-node ranks and the run "
                                       "directory; writes RUN_DIR/slurm/job-<id>.sbatch and submits it. The job's "
                                       "output goes to RUN_DIR/slurm/slurm-<id>.out.")
    s.add_argument("--nodes", type=int, default=default.nodes, help="nodes")
    s.add_argument("--gpus-per-node", type=int, default=default.gpus_per_node, help="GPUs per node (0: a CPU job)")
    s.add_argument("--procs-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per rank (default: the cluster's)")
    s.add_argument("--time", default=default.time, help="time limit (MINUTES, HH:MM:SS, D-HH:MM ...)")
    s.add_argument("--signal-lead", type=int, default=default.signal_lead_s, metavar="SECONDS",
                   help="SIGUSR2 this long before the time limit: the ranks checkpoint and the job requeues itself")
    s.add_argument("--partition", help="partition (default: the cluster's default)")
    s.add_argument("--account", help="account (default: yours)")
    s.add_argument("--max-requeues", type=int, default=default.max_requeues,
                   help="requeue after a preemption at most this often (counted by SLURM_RESTART_COUNT)")
    s.add_argument("--job-name", default=default.job_name, help="job name")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="a further #SBATCH option, e.g. --sbatch-arg=--qos=high (repeatable)")
    s.add_argument("--script", default=str(TRAIN_SCRIPT), help="what every rank runs: train.py, or a script taking "
                                                               "train.py's arguments")
    s.add_argument("--dry-run", action="store_true", help="print the filled-in script; submit nothing")
    s.add_argument("train_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                   help="train.py's arguments: --config FILE and key=value overrides")
    t = actions.add_parser("status", formatter_class=HelpFormatter,
                           help="a run's newest job (state, requeues, run time) and the run's last logged step")
    t.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (runs/<run.name>, or run.dir)")
    t.add_argument("--json", action="store_true", help="print it as JSON")


def build_toolkit_parser() -> argparse.ArgumentParser:
    """The parser of ``toolkit`` and its subcommands; every option's help shows its default."""
    parser = argparse.ArgumentParser(prog="toolkit", description="Global-batch training toolkit.",
                                     formatter_class=HelpFormatter,
                                     epilog="`toolkit COMMAND --help` shows a command's options and their defaults. "
                                            "Training itself: python train.py --help.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, func) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=summary, description=textwrap.fill(summary[0].upper() + summary[1:] + "."),
                           formatter_class=HelpFormatter)
        c.set_defaults(func=func)
        return c

    p = command("plan", "show the batch plan and the predicted memory for a config and a world size, without "
                        "training", plan_main)
    p.add_argument("--config", help="YAML run config (default: configs/tiny.yaml)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="processes to plan for (default: $WORLD_SIZE, else 1)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. batch.micro_size=4")

    b = command("bench", "benchmarks, as ratios against a baseline measured in the same run", bench_main)
    b.add_argument("which", choices=["parity", "memory", "tracking", "gpu", "checkpoint"],
                   help="parity: the toolkit's loop against a plain PyTorch loop; memory: measured against predicted "
                        "memory per device for DDP and ZeRO stages; tracking: W&B and the noise scale on vs off; gpu: "
                        "GPT-2 small on one GPU, the toolkit (eager, compiled, ZeRO-2) against plain compiled PyTorch, "
                        "per micro size, with the chunked loss, host syncs and batch.micro_size=auto; checkpoint: a "
                        "save's time and rank 0's peak memory, whole against sharded, and the step time with "
                        "checkpoint.async_save")
    b.add_argument("--config", help="YAML run config (default: configs/bench-parity.yaml for parity and tracking, "
                                    "configs/bench-memory.yaml for memory and checkpoint, configs/bench-gpu.yaml for gpu)")
    b.add_argument("--processes", type=int, default=2, help="memory: processes per run")
    b.add_argument("--stages", default="ddp,0,1,2,3", help="memory: comma-separated modes (ddp or a ZeRO stage)")
    b.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    b.add_argument("--micro", default="16,32,64,128", help="gpu: micro sizes (the global batch is the largest)")
    b.add_argument("--modes", default="eager,compiled", help="gpu: the toolkit's rows, eager and/or compiled")
    b.add_argument("--engines", help="gpu: ddp (no DeepSpeed) and/or zero1, zero2, zero3, zeroN-offload (default "
                                      "ddp,zero2); checkpoint: ddp and/or zero1, zero2, zero3 (default ddp,zero3)")
    b.add_argument("--world-sizes", default="2,4", help="checkpoint: process counts, one run each per engine")
    b.add_argument("--every", type=int, default=10, help="checkpoint: steps between the timed loop's checkpoints")
    b.add_argument("--plain", default="compiled", help="gpu: the plain loop compiled (the bar) or eager")
    b.add_argument("--warmup", type=int, default=5, help="gpu: untimed steps before each row's timed ones")
    b.add_argument("--auto-share", type=int, default=1440, help="gpu: samples per step for the batch.micro_size=auto "
                                                                "row (many divisors); 0: no auto row")
    b.add_argument("--out", help="gpu: a JSON file rewritten after every row (kept if the bench is cut short)")
    b.add_argument("--repeats", type=int, default=3, help="parity, tracking, checkpoint (also saves per format): "
                                                          "alternating timed runs of each loop")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the bench's config")

    c = command("config", "every config key with its type, default and documentation; with --config or "
                          "overrides, also the values a run would use", config_main)
    c.add_argument("--config", help="YAML run config to resolve (a file from configs/, or a run's config.yaml); "
                                    "default: none, only the typed defaults are shown (with overrides alone: "
                                    "configs/tiny.yaml)")
    c.add_argument("overrides", nargs="*", metavar="SECTION|key=value",
                   help="sections (batch) or keys (batch.global_size) to show, all if none; and dotted overrides")
    c.set_defaults(names_allowed=True)

    g = command("plot", "draw a run's curves from its metrics.jsonl as PNG files (no W&B account needed)",
                plot_main)
    g.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<run.name>, or run.dir)")
    g.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR/plots)")

    s = command("sweep", "run a batch-size study: one real run per point of a grid, resumable, then the report",
                sweep_main)
    s.add_argument("sweep_file", metavar="SWEEP.yaml", help="a sweep file (configs/sweeps/*.yaml; its keys are "
                                                           "documented in toolkit/sweep_file.py)")
    s.add_argument("--out", metavar="DIR", help="the sweep's directory: sweep.json, points/<name>/ (one run "
                                               "directory each), the report (default: sweeps/<name>)")
    s.add_argument("--dry-run", action="store_true",
                   help="print the points (values, steps, micro-batch, accumulation, done/partial/new) and their "
                        "commands (with --launcher slurm: the job arrays' scripts); run nothing")
    s.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: one point at a time on this machine; slurm: the points as Slurm job arrays (one per "
                        "process count, one node per point), waited for here")
    from toolkit.slurm import JobSpec

    slurm_default = JobSpec()
    s.add_argument("--time", default=slurm_default.time, help="slurm: each point's time limit")
    s.add_argument("--signal-lead", type=int, default=slurm_default.signal_lead_s, metavar="SECONDS",
                   help="slurm: SIGUSR2 this long before the time limit (the point checkpoints and requeues)")
    s.add_argument("--partition", help="slurm: partition")
    s.add_argument("--account", help="slurm: account")
    s.add_argument("--gpus-per-rank", type=int, default=0, help="slurm: GPUs per process (0: CPU jobs)")
    s.add_argument("--max-requeues", type=int, default=slurm_default.max_requeues,
                   help="slurm: requeues after preemptions per point, at most")
    s.epilog = "\n".join([
        "Running the same command again skips the finished points and continues an interrupted one from its",
        "checkpoint. Ctrl-C (or SIGTERM) stops the running point after its step with a checkpoint; a second",
        "Ctrl-C stops it at once.",
        "",
        "exit codes:",
        _rows([("0", "every point done; the report is written"),
               ("1", "some points failed (named, with their train.log); the report covers the others"),
               ("2", "a bad sweep file or point (one line naming it); nothing was launched"),
               ("130, 143", "stopped by SIGINT, SIGTERM; run the same command again to continue")]),
    ])

    r = command("report", "write a sweep's report from its points' files: report.md, summary.csv, "
                          "recommendation.json, plots/*.png and a W&B summary run", report_main)
    r.add_argument("sweep_dir", metavar="DIR", help="a sweep directory (the --out of toolkit sweep, default "
                                                   "sweeps/<name>)")
    r.add_argument("--no-wandb", action="store_true", help="write no W&B summary run")

    m = command("recommend", "predict the critical batch from one run's measured gradient noise scale and suggest "
                             "the grid of a sweep around it", recommend_main)
    m.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (runs/<run.name>, or run.dir) whose "
                                                     "metrics.jsonl holds the noise scale")
    m.add_argument("--json", action="store_true", help="print the prediction as JSON")

    add_slurm_parser(command)
    k = command("checkpoint", "work on a run's checkpoints: convert a sharded one to a whole one", checkpoint_main)
    kinds = k.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = kinds.add_parser("convert", formatter_class=HelpFormatter,
                         help="write a sharded checkpoint as a whole one (model.safetensors, optimizer.pt), for export",
                         description="Write a sharded checkpoint (checkpoint.format=sharded) as a whole one: "
                                     "model.safetensors and optimizer.pt as plain PyTorch reads them, with the RNG "
                                     "files, state.json and a manifest. A run resumes from either.")
    v.add_argument("source", metavar="CHECKPOINT", help="a checkpoint folder, RUN_DIR/checkpoints/step-NNNNNNNN, or a "
                                                       "run directory (its newest valid checkpoint)")
    v.add_argument("--to", choices=["whole"], required=True, help="the format to write")
    v.add_argument("--out", metavar="DIR", help="where (default: beside it, step-NNNNNNNN-whole)")
    return parser


def checkpoint_main(args: argparse.Namespace) -> int:
    from toolkit.convert import convert_to_whole

    out = convert_to_whole(Path(args.source), Path(args.out) if args.out else None)
    print(f"wrote {out} (a whole checkpoint; resume from it with checkpoint.resume={out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_toolkit_parser()
    # Overrides may stand before or after options (argparse alone rejects `--config X key=value`).
    args, extra = parser.parse_known_args(argv)
    names_allowed = getattr(args, "names_allowed", False)  # `toolkit config`: bare words are sections
    bad = [a for a in extra if a.startswith("-") or ("=" not in a and not names_allowed)
           or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return args.func(args)
    except ConfigError as exc:
        return _error(str(exc), EXIT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
