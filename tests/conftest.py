"""Shared helpers: run the real entry points in subprocesses, on free ports, with timeouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from toolkit.processes import alive, descendants, free_port, kill_tree  # noqa: F401  (tests import them from here)

ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE = Path(tempfile.mkdtemp(prefix="toolkit-test-cache-"))
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
    env.setdefault("TOOLKIT_CACHE_DIR", str(TEST_CACHE))  # batch.micro_size=auto's answers: not in the user's home
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


def train_together(jobs: list[list[str]], timeout: float = 240, check: bool = True,
                   script: str = "train.py") -> list[subprocess.CompletedProcess]:
    """Independent one-process runs (lists of overrides) at the same time: each uses one core (one OMP thread),
    so two of them take the wall time of one on a 2-core machine. Only for runs whose test times nothing."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda overrides: train(overrides, timeout=timeout, check=check, script=script), jobs))


def final_weights(run_dir: Path) -> dict:
    """The final weights a run wrote (``run.dir/final/model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------- the default job

# The acceptance limit on a 2-core machine for the default job (tests/test_train_run.py); BATCHKIT_ACCEPT_TIMEOUT
# raises it on a shared or slower machine.
ACCEPT_TIMEOUT = float(os.environ.get("BATCHKIT_ACCEPT_TIMEOUT", "180"))


def report(request, message: str) -> None:
    """A line on the terminal even with output captured (and in the captured output, for failures)."""
    print(message)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(message)


def run_default_job(request, run_dir: Path, processes: int, wandb: bool = False) -> dict:
    """The default job (configs/tiny.yaml, nothing but run.dir set), as a user's shell starts it: one process
    (``python train.py``) gets the shell's thread settings rather than the one OMP thread of every other child
    here, so torch uses the machine's cores as it does for a user (on 2 cores 1.4x faster; the same losses to
    ~1e-5); two processes get one thread each, as torchrun gives them. ``wandb``: W&B on, offline
    (no API key), as for a user without an account; otherwise disabled."""
    env = child_env(wandb=wandb)
    if processes == 1:
        if "OMP_NUM_THREADS" in os.environ:
            env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        else:
            env.pop("OMP_NUM_THREADS")
    started = time.perf_counter()
    result = train([f"run.dir={run_dir}"], processes=processes, timeout=ACCEPT_TIMEOUT, env=env)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    report(request, f"default job, {processes} process(es){', W&B offline' if wandb else ''}: wall {wall:.1f} s "
                    f"(limit {ACCEPT_TIMEOUT:.0f} s), first loss {summary.get('first_loss'):.4f}, final loss "
                    f"{summary['final_loss']:.4f}, val loss {summary['val_loss']:.4f}, "
                    f"{summary['tokens_per_s']:,.0f} tokens/s")
    return {"dir": run_dir, "wall": wall, "stdout": result.stdout, "stderr": result.stderr, "summary": summary,
            "processes": processes, "wandb": wandb}


@pytest.fixture(scope="session")
def default_job_two_processes(request, tmp_path_factory) -> dict:
    """The default job on two gloo processes with W&B offline, run once for the whole session: one of the
    acceptance runs of tests/test_train_run.py, and the W&B run that tests/test_wandb.py reads back."""
    return run_default_job(request, tmp_path_factory.mktemp("default-2proc") / "run", 2, wandb=True)


# ----------------------------------------------------------------------------------------- runs shared by files


def fresh_child_env() -> dict:
    """child_env() without the settings the toolkit makes for DeepSpeed (DS_ACCELERATOR, LOCAL_SIZE): a value
    inherited from this process (set by an in-process run of another test) would hide what the toolkit itself
    does (tests/test_output.py)."""
    env = child_env()
    for key in ("DS_ACCELERATOR", "LOCAL_SIZE"):
        env.pop(key, None)
    return env


# The DeepSpeed equivalence job (tests/test_deepspeed.py): global 8 = micro 2 x accumulation 2 x 2 processes.
ZERO_JOB = [*small_job(8, 5), "batch.micro_size=2", "checkpoint.every_steps=0"]


@pytest.fixture(scope="session")
def ddp_two_processes(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """ZERO_JOB under plain DDP on 2 processes, with its samples recorded: the reference of tests/test_deepspeed.py
    and the 2x2x2 split of tests/test_invariance.py (the same run: recording samples changes no number)."""
    run_dir = tmp_path_factory.mktemp("ddp-2x2x2") / "run"
    return run_dir, train([*ZERO_JOB, "run.record_samples=true", f"run.dir={run_dir}"], processes=2)


@pytest.fixture(scope="session")
def zero3_offload_two_processes(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """ZERO_JOB through launch/zero3-offload.yaml (ZeRO-3, optimizer and parameters offloaded) on 2 processes,
    started as from a fresh shell (fresh_child_env): tests/test_deepspeed.py compares its numbers with DDP's,
    tests/test_output.py counts the lines it prints."""
    run_dir = tmp_path_factory.mktemp("zero3-offload") / "run"
    result = train([*ZERO_JOB, f"run.dir={run_dir}"], processes=2, launch="zero3-offload.yaml", env=fresh_child_env())
    return run_dir, result


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank below it (torchrun starts ranks in sessions of their own)."""
    print(f"SIGKILL to {kill_tree(proc)} processes")
