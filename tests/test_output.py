"""What a run prints: its plan, its log lines and real warnings, each warning once per process.

Before the fix a 10-step ZeRO-3-offload run of the default job on 2 CPU processes printed 6,629 lines,
6,612 of them two torch ``FutureWarning``s (``all_gather_into_tensor`` / ``reduce_scatter_tensor`` are
deprecated; 2 lines each) over and over: DeepSpeed's CPU accelerator ran ``numactl`` in a subprocess at
every gradient bucket, and every subprocess start resets Python's record of the warnings already shown
(``zero.cache_numa_topology``). Every DeepSpeed run also printed Accelerate's "Gradient accumulation
steps mismatch" line, and every CPU run, plain ones included, DeepSpeed's "Setting accelerator to CPU"
warning. After the fix that run prints 24 lines.

Each test runs real processes: a short ZeRO-3-offload run of 2 processes through its launch file (a
nano model, 5 steps: the run tests/test_deepspeed.py compares with DDP, made once for the session in conftest.py)
and a plain one-process run."""

from __future__ import annotations

import collections
import re

from conftest import fresh_child_env, small_job, train

# A log line of the trainer ("step      3  loss ..."), the only kind of line that may repeat freely.
LOG_LINE = re.compile(r"^step\s+\d+\s")
# A warning as Python's warnings module prints it: "path:line: SomeWarning: message".
WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")
# Each line that is not a log line may appear at most this many times per process: a warning's source
# line ("  return func(*args, **kwargs)") is printed under each distinct warning that comes from there.
MAX_REPEATS_PER_PROCESS = 2
MISMATCH = "Gradient accumulation steps mismatch"  # Accelerate, when its accumulation differs from DeepSpeed's
GUESSED = "Setting accelerator to CPU"  # DeepSpeed, when it has to guess its accelerator (no CUDA here)


def lines_of(result) -> list[str]:
    return (result.stdout + result.stderr).splitlines()


def check_output(lines: list[str], processes: int, max_lines: int, launcher_guesses: int = 0) -> None:
    """``launcher_guesses``: "Setting accelerator to CPU" lines allowed from the launcher process itself."""
    text = "\n".join(lines)
    assert MISMATCH not in text, f"{MISMATCH!r} printed:\n{text[-3000:]}"
    guessed = text.count(GUESSED)
    assert guessed <= launcher_guesses, f"{GUESSED!r} printed {guessed} times:\n{text[-3000:]}"
    counts = collections.Counter(line for line in lines if line.strip() and not LOG_LINE.match(line))
    warnings = {line: n for line, n in counts.items() if WARNING_LINE.match(line)}
    repeated_warnings = {line: n for line, n in warnings.items() if n > processes}
    assert not repeated_warnings, f"warnings printed more than once per process: {repeated_warnings}"
    repeated = {line: n for line, n in counts.items() if n > MAX_REPEATS_PER_PROCESS * processes}
    assert not repeated, f"lines repeated: {repeated}"
    assert len(lines) <= max_lines, f"{len(lines)} lines printed (at most {max_lines}):\n{text[-3000:]}"


def test_zero3_offload_output(zero3_offload_two_processes):
    """ZeRO-3 with CPU offload, 2 processes, through launch/zero3-offload.yaml, started from a fresh environment
    (conftest.fresh_child_env: the children's environment without the settings the fix makes)."""
    _, result = zero3_offload_two_processes
    lines = lines_of(result)
    print(f"{len(lines)} lines:\n" + "\n".join(lines))
    future = [line for line in lines if "FutureWarning" in line and "all_gather_into_tensor" in line]
    assert len(future) <= 2, f"the all_gather_into_tensor FutureWarning {len(future)} times for 2 processes"
    # The plan (7 lines), model, device, memory, 5 log lines, validation, done, and each of the few
    # third-party notices once per process: 28 lines. Before the fix the all_gather_into_tensor warning
    # alone was printed 88 times.
    # `accelerate launch` with a DeepSpeed launch file imports deepspeed in the launcher process itself
    # (for a constant of deepspeed.launcher.runner), before any toolkit code runs: that process may say
    # "Setting accelerator to CPU" once; the ranks must not.
    check_output(lines, processes=2, max_lines=40, launcher_guesses=1)


def test_plain_output(tmp_path):
    """One process without a launcher or DeepSpeed: nothing but the toolkit's own lines."""
    result = train([*small_job(8, 3), "batch.micro_size=4", "checkpoint.every_steps=0", "train.log_every=1",
                    f"run.dir={tmp_path / 'run'}"], env=fresh_child_env())
    lines = lines_of(result)
    print(f"{len(lines)} lines:\n" + "\n".join(lines))
    check_output(lines, processes=1, max_lines=20)
    assert not [line for line in lines if WARNING_LINE.match(line)], "a warning in a plain run"

