"""The signals that stop a run after its step with a checkpoint, and those that arrive before training.

A scheduler may signal a rank at any moment, also while it is still starting (importing torch, loading the
data, joining the process group, reading a checkpoint): a Slurm time-limit signal lands there when the
job's start-up is slow, an outside ``scontrol requeue`` when it is early. Python's default for SIGTERM,
SIGUSR1 and SIGUSR2 ends the process at once, and its exit status (128 + the signal) would then not say
"preempted". ``catch_early`` therefore notes them from the first line of ``train.py`` on; the trainer takes
the noted signal over when it installs its own handlers, so the run stops after its first step with a
checkpoint and exits 75 like any preempted run. A second signal before that ends the process as the
default would (a start-up that hangs can still be stopped).
"""

from __future__ import annotations

import os
import signal
import sys

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""A scheduler's stop: SIGTERM (preemption, the time limit, torchrun's forwarding), SIGUSR1, and SIGUSR2, which
slurm/train.sbatch asks for before a time limit (NCCL may claim SIGUSR1)."""
STOP_SIGNALS = (*PREEMPT_SIGNALS, signal.SIGINT)
"""Signals the trainer stops on after the step in flight (a Ctrl-C too; a second one stops at once)."""

_noted: list[int] = []
_replaced: dict[int, object] = {}  # the handlers catch_early replaced, for the trainer to put back at its end


def _note(signum, frame) -> None:
    if _noted:  # a second one: end as the default action would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    _noted.append(signum)


def catch_early() -> None:
    """Note SIGTERM/SIGUSR1/SIGUSR2 until the trainer's own handlers take over (main thread only)."""
    for signum in PREEMPT_SIGNALS:
        previous = signal.signal(signum, _note)
        if previous is not _note:
            _replaced.setdefault(signum, previous)


def take_early() -> tuple[int | None, dict[int, object]]:
    """For the trainer, once its own handlers are in place: the first stop signal noted before training began
    (None if none) and the handlers catch_early replaced (to restore when the run ends); both are forgotten
    here, so a second run in the same process starts clean."""
    noted = _noted[0] if _noted else None
    replaced = dict(_replaced)
    _noted.clear()
    _replaced.clear()
    return noted, replaced


class StopSignals:
    """The trainer's handlers for STOP_SIGNALS while it trains. A signal is only noted: the step in flight
    finishes, then all ranks agree to stop together (``agreed``), write a checkpoint and exit 75 (130 for
    Ctrl-C). A second Ctrl-C stops at once (the newest checkpoint stays; a save cut short is put right at the
    next start). A signal noted by ``catch_early`` before training began counts as the first."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.signum: int | None = None  # the first stop signal, this rank's or (after ``agreed``) another's
        self._interrupted = False
        self._previous: dict = {}

    def install(self) -> None:
        self._previous = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
        early, replaced = take_early()
        self._previous.update(replaced)  # at the end, the handlers from before train.py noted signals
        if early is not None and self.signum is None:  # a stop signal came while this process started
            self.signum = early

    def release(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self._interrupted:
            raise KeyboardInterrupt  # a second Ctrl-C; under `accelerate launch` it arrives as torchrun's SIGTERM
        self._interrupted = signum == signal.SIGINT  # this rank's own (another rank's arrives through agreed())
        if self.signum is None:
            self.signum = signum  # the first one names the stop (and the exit code)
        if signum == signal.SIGINT and self.is_main:
            print("Ctrl-C: stopping after the step in flight, with a checkpoint (Ctrl-C again stops at once)",
                  file=sys.stderr, flush=True)

    def agreed(self, ranks) -> bool:
        """True on every rank if a stop signal reached any rank (a one-number all-reduce per step, on the CPU)."""
        signum = ranks.largest(self.signum or 0)
        if signum and self.signum is None:
            self.signum = signum  # another rank's signal
        return bool(signum)
