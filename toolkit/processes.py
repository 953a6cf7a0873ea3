"""Starting and stopping launcher process trees (``accelerate launch`` -> torchrun -> ranks).

torchrun (torch.distributed.elastic) starts every worker with ``start_new_session=True``, so killing the
launcher's process group alone leaves the ranks running. ``kill_tree`` stops the whole tree first (so
that nothing spawns or exits in between), then kills every process group in it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil


def free_port() -> int:
    """A TCP port that is free on this host now (for a launcher's rendezvous or a process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it; just ``[pid]`` when ``pid`` is gone."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    return [pid, *(child.pid for child in children)]


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # also psutil.ZombieProcess, its subclass
        return False


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGKILL ``proc``, its process group and every process group below it; wait until all are gone.
    Returns how many processes there were."""
    tree = descendants(proc.pid)
    groups = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in tree):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes still alive after SIGKILL: {[p for p in tree if alive(p)]}")
        time.sleep(0.05)
    return len(tree)


def run_tree(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a launcher in its own session, capture its output; on timeout kill the whole tree and raise
    ``subprocess.TimeoutExpired`` (with the output so far)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
