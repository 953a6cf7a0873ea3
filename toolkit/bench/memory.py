"""``toolkit bench memory``: memory per device measured against the prediction, for DDP and ZeRO 0-3.

Each mode is one real training run (``accelerate launch`` with ``--processes`` ranks, default
``configs/bench-memory.yaml``: 57M parameters, micro-batch 1 x 32 tokens, 3 steps). The run writes its
measured peaks and the prediction into ``summary.json`` (``toolkit/memory.py`` says what each counts);
this command collects them into one table. The runs set ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc
returns freed tensors to the system at once and the CPU's resident set follows the live tensors.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from toolkit.config import ConfigError
from toolkit.processes import free_port, run_tree

ROOT = Path(__file__).resolve().parents[2]  # the repository (toolkit/bench/memory.py)


def run_mode(config: Path, overrides: list[str], mode: str, processes: int, run_dir: Path, timeout: float = 900) -> dict:
    """One training run in ``mode`` (``ddp`` or a ZeRO stage); returns its summary's ``memory`` record."""
    stage = [] if mode == "ddp" else [f"deepspeed.stage={mode}"]
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--config_file", str(ROOT / "launch" / "cpu.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(free_port()), str(ROOT / "train.py"), "--config", str(config), *overrides,
           f"run.dir={run_dir}", "checkpoint.resume=never", *stage]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WORLD_SIZE", None)
    result = run_tree(cmd, timeout, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"memory bench: the {mode} run exited {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())["memory"]


def memory_bench(config: str | os.PathLike, overrides: list[str], processes: int = 2, stages: str = "ddp,0,1,2,3") -> dict:
    modes = [m.strip() for m in stages.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("ddp", "0", "1", "2", "3")]
    if bad or processes < 2:
        raise ConfigError(f"bench memory: --stages takes ddp,0,1,2,3 (got {stages}); --processes must be >= 2 (got {processes})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for mode in modes:
            m = run_mode(Path(config), overrides, mode, processes, Path(tmp) / f"run-{mode}")
            error = (m["predicted_gib"] - m["measured_to_update_gib"]) / m["measured_to_update_gib"]
            rows.append({"mode": m["mode"], "predicted_gib": m["predicted_gib"],
                         "predicted_model_states_gib": m["predicted_model_states_gib"],
                         "measured_gib": m["measured_to_update_gib"], "measured_with_update_gib": m["measured_with_update_gib"],
                         "measured": m["measured"], "relative_error": error})
    lines = [f"memory per device, {processes} processes, config {config} (GiB above the start of the process's "
             f"training; measured: {rows[0]['measured'] if rows else '-'}):",
             f"  {'mode':<10}{'predicted':>11}{'measured':>11}{'error':>9}{'with update':>13}"]
    for r in rows:
        lines.append(f"  {r['mode']:<10}{r['predicted_gib']:>11.3f}{r['measured_gib']:>11.3f}"
                     f"{r['relative_error']:>+9.1%}{r['measured_with_update_gib']:>13.3f}")
    lines.append("  predicted: model states (params + grads + optimizer, ZeRO paper) + all-reduce buffers + "
                 "activations; measured: peak up to the optimizer update, from the second step on")
    return {"processes": processes, "config": str(config), "rows": rows, "report": "\n".join(lines)}
