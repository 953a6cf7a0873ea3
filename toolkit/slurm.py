"""``toolkit slurm submit`` and ``toolkit slurm status``: a training run as a Slurm job.

``submit`` checks the run's config and its batch plan for the job's world size (nodes x processes per node)
and the run directory (a config that differs from the checkpointed run's, a finished run, a job of this run
still queued or running) before anything reaches the queue. It then fills in ``slurm/train.sbatch`` (its
``#SBATCH`` lines and its settings block; the rest is the template as written), writes the result into the
run directory as ``slurm/job-<id>.sbatch``, submits it and records the job in ``slurm/jobs.jsonl``. What
happens inside the job (one srun task per rank, the rendezvous, the requeue after a preemption) is the
template's, commented there.

``status`` reads the newest job of a run directory from Slurm (``scontrol show job``: its state, requeue
count, run time) and the run's own files (the last logged step, the newest checkpoint, the summary).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config import Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "slurm" / "train.sbatch"
TRAIN_SCRIPT = ROOT / "train.py"
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "RESV_DEL_HOLD")
"""Job states in which a job may still train (a second job on the same run directory would collide)."""


@dataclass
class JobSpec:
    """The resources and the preemption policy of one Slurm job (``toolkit slurm submit``'s options)."""

    nodes: int = 1
    """Nodes (--nodes); the world size is nodes x procs_per_node."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 asks for none (a CPU job)."""
    procs_per_node: int | None = None
    """Ranks (srun tasks) per node; default: gpus_per_node, or 1 without GPUs."""
    cpus_per_task: int | None = None
    """CPUs per rank (--cpus-per-task; also OMP_NUM_THREADS); default: the cluster's default (often 1)."""
    time: str = "04:00:00"
    """Time limit, in Slurm's format (MM, HH:MM:SS, D-HH:MM ...)."""
    signal_lead_s: int = 180
    """Seconds before the time limit at which Slurm sends SIGUSR2: one step and a checkpoint must fit in them.
    At least 30 (Slurm looks at time limits every 30 s or so), and at least 60 s short of the limit (Slurm may
    send it up to a minute early: a job signalled while it starts would make one step per allocation)."""
    partition: str | None = None
    """Partition (--partition); default: the cluster's default."""
    account: str | None = None
    """Account (--account); default: the user's default."""
    max_requeues: int = 10
    """The job requeues itself after a preemption at most this often (SLURM_RESTART_COUNT counts them)."""
    job_name: str = "batchkit"
    """Job name (--job-name)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further ``#SBATCH`` options, as given (e.g. ``--qos=high``, ``--exclusive``)."""

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


# ----------------------------------------------------------------------------------------- checking
TIME_FORMATS = (  # Slurm's time-limit formats: minutes, minutes:seconds, hours:minutes:seconds, and with days
    (re.compile(r"(\d+)"), ("m",)),
    (re.compile(r"(\d+):(\d+)"), ("m", "s")),
    (re.compile(r"(\d+):(\d+):(\d+)"), ("h", "m", "s")),
    (re.compile(r"(\d+)-(\d+)"), ("d", "h")),
    (re.compile(r"(\d+)-(\d+):(\d+)"), ("d", "h", "m")),
    (re.compile(r"(\d+)-(\d+):(\d+):(\d+)"), ("d", "h", "m", "s")),
)
UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def time_limit_s(text: str) -> int:
    """Seconds in a Slurm time limit ("90" is 90 minutes, "1:30:00" is 90 minutes, "2-00" is 2 days)."""
    for pattern, units in TIME_FORMATS:
        m = pattern.fullmatch(text.strip())
        if m:
            return sum(int(v) * UNIT_S[u] for v, u in zip(m.groups(), units, strict=True))
    raise ConfigError(f"--time={text!r} is not a Slurm time limit; valid: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                      f"D-HH:MM:SS (e.g. 30, 04:00:00, 1-12)")


def check_spec(spec: JobSpec) -> None:
    """Refuse (ConfigError, naming the option) resources that no job could have."""
    for name in ("nodes", "procs_per_node", "gpus_per_node", "cpus_per_task", "max_requeues", "signal_lead_s"):
        value, least = getattr(spec, name), 0 if name in ("gpus_per_node", "max_requeues", "signal_lead_s") else 1
        if value is not None and value < least:
            raise ConfigError(f"--{name.replace('_', '-')}={value} must be at least {least}")
    limit = time_limit_s(spec.time)
    if spec.signal_lead_s < 30:
        raise ConfigError(f"--signal-lead={spec.signal_lead_s} s is too short: Slurm checks time limits about every "
                          f"30 s, so the signal could come with the limit itself; give at least 30")
    if limit - spec.signal_lead_s < 60:
        raise ConfigError(f"--signal-lead={spec.signal_lead_s} s is not before the time limit --time={spec.time} "
                          f"({limit} s) by a minute or more (Slurm may send the signal up to 60 s early); raise "
                          f"--time or lower --signal-lead")
    if spec.gpus_per_node and spec.procs_per_node and spec.procs_per_node != spec.gpus_per_node:
        raise ConfigError(f"--procs-per-node={spec.procs_per_node} with --gpus-per-node={spec.gpus_per_node}: each "
                          f"rank takes one GPU (the one of its local rank), so they must be equal")


def check_run(train_args: list[str], world_size: int) -> tuple[Config, str | None]:
    """The run's config, checked as ``train.py`` would check it on ``world_size`` ranks, and the run directory
    as a new job would find it (the trainer's own rules: toolkit/rundir.py). Returns (config, None), or (config,
    the line saying the run is already finished). Raises ConfigError for a bad config, a plan that does not
    divide, a ``checkpoint.resume`` that cannot be followed, or a run directory holding another run.

    The newest checkpoint's state.json is read without verifying the checkpoint's checksums (which would
    read gigabytes on the submitting host): the job verifies it, and falls back to an older one if need be."""
    from toolkit import checkpoint, rundir
    from toolkit.batch import schedule_for_config
    from toolkit.cli import build_train_parser, check_launch
    from toolkit.config import load_config

    args = build_train_parser().parse_intermixed_args(train_args)
    if args.debug:
        raise ConfigError("--debug runs one process on one device: run it with python train.py --debug, not as a "
                          "Slurm job")
    cfg = load_config(args.config, args.overrides)
    check_launch(cfg, world_size)
    run_dir, resume = cfg.run_dir, cfg.checkpoint.resume
    found = [path for _, path in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    if resume not in ("auto", "never"):
        if not (Path(resume) / "state.json").is_file():
            raise ConfigError(f"checkpoint.resume={resume}: no checkpoint there (no state.json); give a checkpoint "
                              f"folder (run.dir/checkpoints/step-NNNNNNNN), auto or never")
        return cfg, None
    rundir.check_fresh_start(cfg, run_dir, found)
    if not found:
        return cfg, None
    try:
        state = checkpoint.read_state(found[0], verify_first=False)
    except checkpoint.CheckpointError:
        return cfg, None  # unreadable: the job skips it for an older valid one, or says why it cannot
    rundir.check_same_run(state.config, cfg, state.step, found[0], run_dir)
    if cfg.batch.global_size != "full":
        global_size = schedule_for_config(cfg, world_size)[0].global_size
        if state.plan["global_size"] != global_size:
            raise ConfigError(f"batch.global_size={global_size} but {found[0]} was trained with "
                              f"{state.plan['global_size']}; the global batch cannot change within a run")
    if rundir.finished_summary(run_dir, state.step, cfg.train.steps, cfg.train.stop_val_loss) is None:
        return cfg, None
    return cfg, (f"{run_dir} is already finished: {state.step} steps (summary.json); nothing submitted. Raise "
                 f"train.steps to train it further, or start a new run with run.name=NEW")


# ----------------------------------------------------------------------------------------- the script
def sbatch_options(spec: JobSpec, output: Path, workdir: Path, array: str | None = None) -> list[str]:
    """The job's sbatch options, in the template's order (unquoted: ``sbatch_line`` quotes them for the
    script). In ``output``, ``%j`` (``%A``, ``%a``) are Slurm's; a literal ``%`` of a path is written ``%%``."""
    output_pattern = str(output).replace("%", "%%").replace("%%j", "%j").replace("%%A", "%A").replace("%%a", "%a")
    options = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.ranks_per_node}"]
    if spec.gpus_per_node:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        options.append(f"--cpus-per-task={spec.cpus_per_task}")
    options += [f"--time={spec.time}", f"--signal=USR2@{spec.signal_lead_s}", "--requeue", "--open-mode=append",
                f"--output={output_pattern}", f"--chdir={workdir}"]
    if spec.partition:
        options.append(f"--partition={spec.partition}")
    if spec.account:
        options.append(f"--account={spec.account}")
    if array:
        options.append(f"--array={array}")
    return options + list(spec.sbatch_args)


def sbatch_line(option: str) -> str:
    """``#SBATCH --key=value`` with the value in double quotes when it has a space, a quote or a ``#``."""
    key, eq, value = option.partition("=")
    if eq and any(c in value for c in ' \t"#\''):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {key}{eq}{value}"


def settings_block(spec: JobSpec, script: Path, tasks: list[tuple[list[str], Path | None]]) -> list[str]:
    """The template's settings: the Python, the script, its arguments (one set, or one per array task, each
    with the log file its output goes to) and the requeue cap."""
    lines = [f"PYTHON={shlex.quote(sys.executable)}",
             f"SCRIPT={shlex.quote(str(script))}"]
    if len(tasks) == 1 and tasks[0][1] is None:
        lines.append(f"TRAIN_ARGS=({shlex.join(tasks[0][0])})")
    else:  # a job array: each task runs its own arguments and appends its output to its own log
        lines.append('case "$SLURM_ARRAY_TASK_ID" in')
        for index, (args, log) in enumerate(tasks):
            lines.append(f"    {index}) TRAIN_ARGS=({shlex.join(args)}); exec >>{shlex.quote(str(log))} 2>&1 ;;")
        lines += ['    *) echo "batchkit: no task $SLURM_ARRAY_TASK_ID in this array" >&2; exit 2 ;;', "esac"]
    lines.append(f"MAX_REQUEUES={spec.max_requeues}")
    return lines


def render(spec: JobSpec, tasks: list[tuple[list[str], Path | None]], output: Path, workdir: Path,
           script: Path = TRAIN_SCRIPT, array: str | None = None, template: Path = TEMPLATE) -> str:
    """The template with its ``#SBATCH`` lines and its settings block replaced; everything else as written."""
    out, in_settings, options_written = [], False, False
    for line in template.read_text().splitlines():
        if line.startswith("#SBATCH"):
            if not options_written:
                out += [sbatch_line(option) for option in sbatch_options(spec, output, workdir, array)]
                options_written = True
            continue
        if line.startswith("# ---- settings"):
            in_settings = True
            out.append(line)
            out += settings_block(spec, script, tasks)
            continue
        if line.startswith("# ---- end of settings"):
            in_settings = False
        if not in_settings:
            out.append(line)
    if not options_written or in_settings:
        raise ConfigError(f"{template}: expected #SBATCH lines and a '# ---- settings' ... '# ---- end of settings' block")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------- Slurm's commands
def _slurm_command(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: Slurm's client commands must be on PATH (for a throwaway cluster on "
                          f"this machine: slurm/local_cluster.sh start)")
    return found


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    """A Slurm client command, in a session of its own (a Ctrl-C at the terminal is the caller's to handle,
    not a reason for sbatch to die between submitting and printing the job id)."""
    return subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)


def sbatch(path: Path, options: list[str]) -> str:
    """Submit ``path`` with ``options`` (the script's own #SBATCH options, given again on the command line, where
    they beat any SBATCH_* variable of the user's environment); returns the job id. Raises ConfigError with
    sbatch's own message if it refuses."""
    result = _run([_slurm_command("sbatch"), "--parsable", *options, str(path)])
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit {result.returncode}"
        raise ConfigError(f"sbatch refused {path}: {message}")
    return result.stdout.strip().split(";")[0]


class SlurmUnavailable(ConfigError):
    """scontrol failed for another reason than an unknown job (the controller down or busy)."""


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job`` as one dict per record (JobState, Restarts, RunTime, TimeLimit, NodeList, Reason,
    ExitCode, ArrayTaskId ...); [] when Slurm no longer knows the job. Raises SlurmUnavailable when scontrol
    fails otherwise: a controller that does not answer must not look like a job that ended."""
    result = _run([_slurm_command("scontrol"), "show", "job", "--oneliner", job_id])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return []
        raise SlurmUnavailable(f"scontrol show job {job_id} failed: {' '.join(result.stderr.split()) or result.returncode}")
    return [dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line)) for line in result.stdout.splitlines()
            if line.strip()]


def job_info(job_id: str) -> dict[str, str] | None:
    """The job's record (for an array, its first task's), or None when Slurm no longer knows the job."""
    records = job_records(job_id)
    return records[0] if records else None


def task_ids(spec: str) -> list[str]:
    """The task ids of a record's ``ArrayTaskId``: "3", or for tasks still pending together "0-4,7", "0-9%2"
    (a throttle after the %)."""
    ids = []
    for part in spec.split("%")[0].split(","):
        first, _, last = part.partition("-")
        ids += [str(i) for i in range(int(first), int(last or first) + 1)] if first.isdigit() else [part]
    return ids


def array_states(job_id: str) -> dict[str, str]:
    """State of each task of a job array, from ``scontrol show job``: {task id: state} (tasks that Slurm no
    longer knows are missing)."""
    states = {}
    for fields in job_records(job_id):
        for task in task_ids(fields.get("ArrayTaskId", "")):
            states[task] = fields.get("JobState", "UNKNOWN")
    return states


# ----------------------------------------------------------------------------------------- the commands
def jobs_file(run_dir: Path) -> Path:
    return run_dir / "slurm" / "jobs.jsonl"


def last_job(run_dir: Path) -> dict | None:
    """The newest job submitted for ``run_dir`` (from its slurm/jobs.jsonl), or None."""
    try:
        lines = jobs_file(run_dir).read_text().splitlines()
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


def submit(spec: JobSpec, train_args: list[str], script: Path = TRAIN_SCRIPT, dry_run: bool = False,
           say: Callable[[str], None] = print) -> int:
    """Check, fill in, write and submit one run's job (see the module's docstring). Returns the exit code."""
    check_spec(spec)
    cfg, finished = check_run(train_args, spec.world_size)
    run_dir = cfg.run_dir.resolve()
    if finished:
        say(finished)
        return 0
    output = run_dir / "slurm" / "slurm-%j.out"
    text = render(spec, [(train_args, None)], output, Path.cwd(), script)
    if dry_run:
        say(text.rstrip("\n"))
        return 0
    previous = last_job(run_dir)
    if previous is not None and shutil.which("scontrol"):
        info = job_info(previous["job_id"])
        if info is not None and info.get("JobState") in ACTIVE_STATES:
            raise ConfigError(f"{run_dir} already has job {previous['job_id']} ({info['JobState']}); watch it with "
                              f"toolkit slurm status {cfg.run_dir}, or cancel it with scancel {previous['job_id']}")
    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    pending = run_dir / "slurm" / "job-pending.sbatch"
    pending.write_text(text)
    job_id = sbatch(pending, sbatch_options(spec, output, Path.cwd()))
    path = pending.with_name(f"job-{job_id}.sbatch")
    pending.rename(path)
    record = {"job_id": job_id, "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "sbatch": str(path),
              "output": str(output).replace("%j", job_id), "world_size": spec.world_size,
              "spec": dataclasses.asdict(spec), "train_args": train_args}
    with open(jobs_file(run_dir), "a") as f:
        f.write(json.dumps(record) + "\n")
    say(f"submitted job {job_id}: {spec.nodes} node(s) x {spec.ranks_per_node} rank(s) = world size "
        f"{spec.world_size}, time limit {spec.time}, requeued at most {spec.max_requeues} times\n"
        f"run directory: {cfg.run_dir}\noutput: {record['output']}\nscript: {path}\n"
        f"watch it: toolkit slurm status {cfg.run_dir}")
    return 0


def run_progress(run_dir: Path) -> dict:
    """What the run's own files say: the last logged step and losses, the newest checkpoint, the summary."""
    from toolkit.checkpoint import list_checkpoints

    progress: dict = {"step": None, "loss": None, "val_loss": None, "checkpoint": None, "finished": False}
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            progress["step"] = record.get("step", progress["step"])
            for key in ("loss", "val_loss"):
                if record.get(key) is not None:
                    progress[key] = record[key]
    except (OSError, ValueError):
        pass
    found = list_checkpoints(run_dir / "checkpoints")
    progress["checkpoint"] = found[0][1].name if found else None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        progress["finished"] = summary.get("steps") == progress["step"]
    except (OSError, ValueError):
        pass
    return progress


def status(run_dir: Path, as_json: bool = False, say: Callable[[str], None] = print) -> int:
    """Print the newest job of ``run_dir`` (state, requeues, run time) and the run's progress."""
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir} (runs/<run.name>, or a run.dir)")
    job = last_job(run_dir)
    if job is None:
        raise ConfigError(f"{run_dir} has no Slurm job (no {jobs_file(run_dir)}); submit one with toolkit slurm submit")
    info = job_info(job["job_id"])
    progress = run_progress(run_dir)
    if as_json:
        say(json.dumps({"job": job, "slurm": info, "run": progress}, indent=2))
        return 0
    if info is None:
        state = "no longer known to Slurm (it ended more than MinJobAge ago, or the cluster was restarted)"
    else:
        reason = "" if info.get("Reason") in (None, "None") else f" ({info['Reason']})"
        state = (f"{info.get('JobState')}{reason}, requeued {info.get('Restarts', '0')} times, "
                 f"run time {info.get('RunTime')} of {info.get('TimeLimit')}, nodes {info.get('NodeList')}, "
                 f"exit code {info.get('ExitCode')}")
    losses = "".join(f", {name} {progress[key]:.4f}" for name, key in (("loss", "loss"), ("val loss", "val_loss"))
                     if isinstance(progress[key], float))
    step = "nothing logged yet" if progress["step"] is None else f"step {progress['step']}{losses}"
    say(f"job {job['job_id']} (submitted {job['submitted']}): {state}\n"
        f"run {run_dir}: {'finished, ' if progress['finished'] else ''}{step}; newest checkpoint "
        f"{progress['checkpoint'] or 'none'}\noutput: {job['output']}")
    return 0
