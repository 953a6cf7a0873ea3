"""Shared helpers: run the real entry points in subprocesses, on free ports, with timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def run(cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (torchrun's children too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            kill_job(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_cmd(overrides: list[str], processes: int = 1, script: str = "train.py") -> list[str]:
    """``python train.py ...`` for one process, ``accelerate launch --config_file launch/cpu.yaml`` for more."""
    if processes == 1:
        return [PYTHON, script, *overrides]
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / "cpu.yaml"), "--num_processes",
            str(processes), "--main_process_port", str(free_port()), script, *overrides]


def train(overrides: list[str], processes: int = 1, timeout: float = 240, check: bool = True,
          script: str = "train.py") -> subprocess.CompletedProcess:
    result = run(train_cmd(overrides, processes, script), timeout)
    if check and result.returncode != 0:
        pytest.fail(f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def final_weights(run_dir: Path) -> dict:
    """The final weights a run wrote (``run.dir/final/model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group *and* the ranks.

    torchrun (torch.distributed.elastic) starts every worker with ``start_new_session=True``, so
    ``os.killpg`` of the launcher's group alone leaves the ranks running: they go on training and write
    checkpoints into run.dir while the resumed run starts. Stop the whole tree first (so that nothing
    spawns or exits in between), then kill every process group in it."""
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
    print(f"SIGKILL to {len(tree)} processes in {len(groups)} process groups")
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, f"processes still alive after SIGKILL: {[p for p in tree if alive(p)]}"
        time.sleep(0.05)
