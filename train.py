"""Train a model on a global batch stated once.

    python train.py                                   # the default job (configs/tiny.yaml), one process
    python train.py --config configs/tiny.yaml batch.global_size=64 train.steps=50 run.name=b64
    python train.py --debug                           # one device, deterministic, NaN/Inf checks
    accelerate launch --config_file launch/cpu.yaml train.py   # 2 processes on a CPU-only machine
    python train.py --help                            # config sections, exit codes, where runs go

Exit codes: 0 done, 2 bad configuration (one line on stderr), 3 a non-finite value stopped the run,
4 the disk filled while writing a checkpoint, 75 preempted, 130 interrupted (Ctrl-C).
"""

import sys

from toolkit.stop_signals import catch_early

catch_early()  # first of all: a scheduler's SIGTERM/SIGUSR1/SIGUSR2 during start-up becomes a clean stop (exit 75)

from toolkit.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
