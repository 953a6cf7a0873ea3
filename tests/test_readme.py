"""The README's commands, run as written and in the order shown, on a fresh copy of the project: what a
new user does first (issue 9). Training commands get a small ``train.steps`` appended (a later override
wins), benchmarks ``--steps 2 --repeats 1``; launch files that need GPUs are checked through their plan
(tests/test_first_hour.py::test_every_launch_file_runs_the_shipped_configs)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import yaml
from conftest import PYTHON, ROOT, child_env, run

README = ROOT / "README.md"
RUNNABLE = ("python train.py", "python examples/", "toolkit ", "accelerate launch", "OMP_NUM_THREADS=1 toolkit ")


def readme_commands() -> list[str]:
    """The commands of the README's ```bash blocks and of its launch-modes table, in the README's order.
    An install line counts from its last ``&&`` (the install itself is what CI does); the test command is
    left out (it is this suite)."""
    text = README.read_text()
    found: list[tuple[int, str]] = []
    for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
        for line in block.group(1).splitlines():
            command = line.split("  #")[0].strip().split("&&")[-1].strip()
            if command.startswith(RUNNABLE):
                found.append((block.start(), command))
    for row in re.finditer(r"^\|.*\|$", text, re.M):  # table rows: their commands in backticks
        for command in re.finditer(r"`((?:python train\.py|accelerate launch)[^`]*)`", row.group(0)):
            found.append((row.start() + command.start(), command.group(1)))
    return [command for _, command in sorted(found)]


def fresh_copy(dest: Path) -> Path:
    """The project's files as a clone has them (tracked, and new files git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def test_the_readme_commands_run_as_written_in_order(tmp_path):
    commands = readme_commands()
    assert commands[0] == "python train.py", commands  # the default job comes first
    assert any("--debug" in c for c in commands) and any(c.startswith("toolkit plot") for c in commands)
    assert any(c.startswith("toolkit sweep configs/sweeps/") for c in commands)
    assert "python examples/custom_model.py" in commands and "python examples/hf_causal_lm.py" in commands
    clone = fresh_copy(tmp_path / "clone")
    # The README's token-file recipe, with random GPT-2-sized ids standing in for a tokenizer's.
    np.random.default_rng(0).integers(0, 50257, 200_000).astype(np.uint16).tofile(clone / "train.bin")
    env = child_env(wandb=True)  # offline: no API key here
    env["PATH"] = f"{Path(PYTHON).parent}{os.pathsep}{env['PATH']}"
    ran = []
    for command in commands:
        words = shlex.split(command)
        if words[0].startswith("OMP_NUM_THREADS="):
            env_one = {**env, "OMP_NUM_THREADS": words[0].split("=")[1]}
            words = words[1:]
        else:
            env_one = env
        if words[0] == "accelerate":
            launch = clone / words[words.index("--config_file") + 1]
            processes = yaml.safe_load(launch.read_text())["num_processes"]
            if launch.name != "cpu.yaml":  # GPUs: the plan for its process count, as the run would make it
                config = words[words.index("--config") + 1] if "--config" in words else "configs/tiny.yaml"
                words = ["toolkit", "plan", "--config", config, "--world-size", str(processes)]
            else:
                words = [*words, "train.steps=2"]
        elif words[0] == "python" and (words[1] == "train.py" or words[1].startswith("examples/")):
            words = [PYTHON, *words[1:], "train.steps=2"]
        elif words[:3] == ["toolkit", "bench", "gpu"]:
            # GPU only (refused here, in one line): its options are checked; its rows run shrunk on this CPU in
            # tests/test_bench.py::test_the_gpu_bench_runs_its_rows_end_to_end_on_a_cpu.
            words = [*words, "--help"]
        elif words[:2] == ["toolkit", "bench"]:
            words = [*words, "--steps", "2", "--repeats", "1"]
        elif words[:3] == ["toolkit", "slurm", "submit"]:
            # No Slurm here: the job is checked and its script printed, as submit does before sbatch (real jobs
            # on a real local cluster are tests/test_slurm.py's).
            words = [*words[:3], "--dry-run", *words[3:]]
        elif words[:3] == ["toolkit", "slurm", "status"]:
            words = [*words[:3], "--help"]  # a job's status needs a job: tests/test_slurm.py reads real ones
        elif words[:2] == ["toolkit", "sweep"]:
            # The whole study takes minutes (`toolkit sweep` itself is run by tests/test_sweep.py): here every
            # point of the shipped sweep file is resolved and checked, as the sweep does before it starts.
            words = [*words, "--dry-run"]
        result = run(words, timeout=300, cwd=clone, env=env_one)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stdout + result.stderr, command
        ran.append(command)
    print("\n".join(ran))
    # The default job wrote its run; the later commands each wrote their own or said why not.
    assert (clone / "runs" / "tiny" / "summary.json").is_file()
    assert (clone / "runs" / "tiny-debug" / "summary.json").is_file()
    assert (clone / "runs" / "tiny-b64" / "summary.json").is_file()
    assert (clone / "runs" / "my-tokens" / "summary.json").is_file()
    two = json.loads((clone / "runs" / "tiny-2proc" / "summary.json").read_text())
    assert two["world_size"] == 2 and two["accumulation"] == 4
    assert sorted(p.name for p in (clone / "runs" / "tiny" / "plots").iterdir())[:1] == ["loss.png"]
