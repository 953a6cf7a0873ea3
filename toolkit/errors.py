"""How a run can end other than done, as exceptions that every rank raises together. This module imports
nothing heavy, so that ``toolkit.run`` can tell them apart without importing torch first (a bad config
fails in a fraction of a second)."""

from __future__ import annotations

import signal


class NonFiniteError(RuntimeError):
    """A NaN or Inf that stops the run, naming the step (and in debug mode the micro-step and parameter)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint that could not be written (a full disk): raised on every rank together, the message in
    one line on rank 0 (naming the free space, the size needed and the checkpoint that is still intact)."""


class Preempted(Exception):
    """SIGTERM, SIGUSR1, SIGUSR2 or a Ctrl-C (SIGINT) reached a rank: all ranks stopped after the same step and
    wrote a checkpoint."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"preempted by {signal.Signals(signum).name}"
        super().__init__(f"{what}: stopped after step {step} with a checkpoint; run the same command again to continue")
