"""``toolkit bench checkpoint``: what a save costs, ``whole`` against ``sharded``, and what ``async_save`` costs
the step loop.

For each engine (``ddp``, ``zero1``-``zero3``) and process count, one real multi-process run (``accelerate
launch``, gloo on the CPU; default ``configs/bench-memory.yaml``, 57M parameters, a global batch of one sample per
process) trains two steps, so that AdamW has its moments, then saves in each format in turn (``--repeats`` times
each, alternating). Each rank measures its save's wall time and its peak resident set above the one before the
save (the high-water mark is reset through ``/proc/self/clear_refs`` just before); the table gives rank 0's,
beside the bytes of its own shard and of the whole state (fp32 weights and two AdamW moments, 12 bytes per
parameter).

A last launch (the first engine and process count) times the step loop: ``--steps`` steps without checkpoints,
with a sharded checkpoint every ``--every`` steps written in the background (``checkpoint.async_save``), and the
same written synchronously, alternating ``--repeats`` times (the order flipping each repeat); the mean step time
of each, saves included, and its ratio to the run without checkpoints of the same repeat (the median of these
paired ratios). The timed steps start half-way between two checkpoint steps, so that the last save, too, has
half an interval to be written in before the run's final wait (as in the steady state of a long run); the report
also gives the seconds the step loop was held per save and how long a background save took to write.

The runs that measure saves set ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensors to the
system at once and the resident set follows the live tensors; the timing run does not (every allocation would
fault its pages in afresh, and the step loop would measure the kernel).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from toolkit.config import ConfigError
from toolkit.processes import free_port, run_tree

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("checkpoint_worker.py")
ENGINES = ("ddp", "zero1", "zero2", "zero3")


def launch(config: Path, overrides: list[str], engine: str, processes: int, out: Path, repeats: int,
           timing: tuple[int, int] | None, timeout: float = 1800) -> dict:
    """One multi-process run of the worker; returns what rank 0 wrote to ``out``."""
    stage = [] if engine == "ddp" else [f"deepspeed.stage={engine[-1]}"]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), str(WORKER), "--config", str(config), "--out", str(out),
           "--repeats", str(repeats), *(["--timing", str(timing[0]), str(timing[1])] if timing else []),
           *overrides, *stage]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if timing is None:  # (memory: freed tensors go back to the system at once; not for timing, where every
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # allocation would then fault its pages in afresh)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WORLD_SIZE", None)
    result = run_tree(cmd, timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"checkpoint bench: the {engine} run on {processes} processes exited {result.returncode}:\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def checkpoint_bench(config: str | os.PathLike, overrides: list[str], processes: list[int], engines: list[str],
                     repeats: int = 2, steps: int = 30, every: int = 10) -> dict:
    bad = [e for e in engines if e not in ENGINES]
    if bad or not processes or min(processes) < 1 or repeats < 1 or steps < every or every < 1:
        raise ConfigError(f"bench checkpoint: --engines takes {','.join(ENGINES)} (got {','.join(engines)}); "
                          f"--processes >= 1, --repeats >= 1 and --steps >= --every >= 1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp:
        def one(engine: str, count: int, timed: tuple[int, int] | None) -> dict:
            name = f"{engine}-{count}{'-timing' if timed else ''}"
            # One sample per rank per step (a user's batch.global_size still wins): the global batch must divide
            # over every process count, and the save's cost does not depend on it.
            run = [f"batch.global_size={count}", *overrides, f"run.dir={Path(tmp) / f'run-{name}'}"]
            return launch(Path(config), run, engine, count, Path(tmp) / f"{name}.json", repeats, timed)

        for engine in engines:
            for count in processes:
                rows += one(engine, count, None)["saves"]
        timing = one(engines[0], processes[0], (steps, every))["timing"]
    return {"config": str(config), "rows": rows, "timing": timing, "report": report(config, rows, timing)}


def report(config, rows: list[dict], timing: dict | None) -> str:
    mib = 2**20
    lines = [f"checkpoint saves, rank 0 (config {config}; peak: resident set above the one before the save):",
             f"  {'engine':<7}{'procs':>6}{'format':>9}{'save s':>9}{'peak MiB':>10}{'own part MiB':>14}{'state MiB':>11}"]
    for r in rows:
        lines.append(f"  {r['engine']:<7}{r['processes']:>6}{r['format']:>9}{r['seconds']:>9.2f}{r['peak_bytes'] / mib:>10.1f}"
                     f"{r['own_bytes'] / mib:>14.1f}{r['state_bytes'] / mib:>11.1f}")
    if timing:
        lines.append(f"step time, {timing['engine']} on {timing['processes']} processes, sharded checkpoint every "
                     f"{timing['every']} steps ({timing['steps']} steps x {len(timing['none'])} runs each; medians):")
        for key, label in (("none", "no checkpoints"), ("async", "async_save"), ("sync", "synchronous")):
            ratios = [t / base for t, base in zip(timing[key], timing["none"], strict=True)]  # paired, per repeat
            blocked = "" if key == "none" else f"; the loop held {statistics.median(timing[key + '_blocked']):.2f} s per save"
            if key == "async" and timing.get("async_written"):
                blocked += f", written in {statistics.median(timing['async_written']):.2f} s"
            lines.append(f"  {label:<16}{statistics.median(timing[key]) * 1000:>9.1f} ms/step   x{statistics.median(ratios):.3f} "
                         f"(per repeat: {' '.join(f'{r:.3f}' for r in ratios)}){blocked}")
    return "\n".join(lines)
