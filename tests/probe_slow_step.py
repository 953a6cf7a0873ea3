"""train.py whose every optimizer step sleeps ``SLOW_STEP_S`` seconds first (default 0.25) in a Slurm job's
first allocation (``SLURM_RESTART_COUNT`` unset or 0): launched as the Slurm tests' script (toolkit slurm
submit --script), not collected.

    SLOW_STEP_S=0.25 python tests/probe_slow_step.py key=value ...

It stretches a run over wall-clock time without using the CPU, so that a time limit or an outside requeue
lands mid-run while other jobs share the two cores; a requeued allocation then trains at full speed and
finishes before its own time limit. The sleep changes no number: the same config trains to the same
weights as train.py.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.stop_signals import catch_early  # noqa: E402

catch_early()  # as train.py does, before the heavy imports

from toolkit.cli import train_main  # noqa: E402
from toolkit.trainer import Trainer  # noqa: E402

SLOW_STEP_S = float(os.environ.get("SLOW_STEP_S", "0.25")) if os.environ.get("SLURM_RESTART_COUNT", "0") == "0" else 0.0
step = Trainer.train_step


def slow_step(self, *args, **kwargs):
    time.sleep(SLOW_STEP_S)
    return step(self, *args, **kwargs)


Trainer.train_step = slow_step

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
