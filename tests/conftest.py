"""Shared helpers: run the real entry points in subprocesses, on free ports, with timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.processes import alive, descendants, free_port, kill_tree  # noqa: F401  (tests import them from here)

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(PYTHON).with_name("accelerate"))


def small_job(global_size: int, steps: int) -> list[str]:
    """The equivalence tests' job: a nano GPT in fp32 on synthetic documents of random length, unpacked
    (so samples carry different numbers of valid targets), 32 tokens per sample, a log line every step,
    no validation until the end."""
    return [
        "seed=1337",
        "model.size=nano",
        "model.vocab_size=256",
        "data.source=synthetic",
        "data.synthetic_tokens=40000",
        "data.pack=false",
        "data.seq_len=32",
        f"batch.global_size={global_size}",
        f"train.steps={steps}",
        "train.val_every=0",
        "train.val_batches=1",
        "train.log_every=1",
        "train.progress=false",
        "train.precision=fp32",
    ]


def child_env(wandb: bool = False) -> dict:
    """The environment of a child run: one OMP thread (two spinning threads per rank on 2 cores run 20x
    slower), and W&B off unless the test is about W&B (then offline: no API key, files under run.dir)."""
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # Every WANDB_* of this process goes, WANDB_SERVICE above all: wandb.init in the test process (the
    # tracking bench) sets it, and a child that inherits it shares that process's W&B service, where a
    # killed child's run id then stays "in use".
    for key in [k for k in env if k.startswith("WANDB_")]:
        env.pop(key)
    if not wandb:
        env["WANDB_MODE"] = "disabled"
    return env


def run(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (torchrun's children too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
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


def train_cmd(overrides: list[str], processes: int = 1, script: str = "train.py", launch: str | None = None) -> list[str]:
    """``python train.py ...`` for one process, ``accelerate launch --config_file launch/cpu.yaml`` for more
    (or the launch file ``launch``, e.g. ``zero2.yaml``, for any number)."""
    if processes == 1 and launch is None:
        return [PYTHON, script, *overrides]
    return [ACCELERATE, "launch", "--config_file", str(ROOT / "launch" / (launch or "cpu.yaml")), "--num_processes",
            str(processes), "--main_process_port", str(free_port()), script, *overrides]


def train(overrides: list[str], processes: int = 1, timeout: float = 240, check: bool = True,
          script: str = "train.py", launch: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    result = run(train_cmd(overrides, processes, script, launch), timeout, env=env)
    if check and result.returncode != 0:
        pytest.fail(f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


def final_weights(run_dir: Path) -> dict:
    """The final weights a run wrote (``run.dir/final/model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank below it (torchrun starts ranks in sessions of their own)."""
    print(f"SIGKILL to {kill_tree(proc)} processes")
