"""SLURM on a real cluster: slurm/local_cluster.sh starts munge, slurmctld and two slurmd nodes on this
machine (n1, n2), and the jobs below are real ``toolkit slurm submit`` submissions.

The jobs of the module run at the same time (each sleeps through its steps, see tests/probe_slow_step.py,
so they stretch over wall-clock time without taking the two cores from each other):

* ``plain``: 2 nodes x 1 rank, no interruption: its weights equal a local 2-process run's.
* ``timelimit``: 2 nodes x 1 rank, a 1-minute time limit with SIGUSR2 40 s before it: it checkpoints,
  requeues itself, resumes and finishes bit-identical to the local run, in one W&B run.
* ``requeued``: 2 nodes x 1 rank, requeued from outside with ``scontrol requeue`` mid-run (as a scheduler
  preempts): it resumes and finishes bit-identical.
* ``capped``: 1 rank, time-limited as above but ``--max-requeues 0``: it checkpoints and is not requeued.
* ``failing``: a run-time failure (a non-finite loss with ``train.on_nonfinite=stop``): its one-line error
  is in its output file, the job fails and is never requeued.
* a 2-point sweep with ``--launcher slurm`` (one job array), collected into its report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, child_env, final_weights, kill_job, read_jsonl, run, small_job, train
from test_sweep import write_sweep

TOOLKIT = str(Path(PYTHON).with_name("toolkit"))
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
PROBE = ROOT / "tests" / "probe_slow_step.py"
STEPS = 200
# The equivalence job (tests/conftest.py::small_job) with 2 micro-batches per rank and a checkpoint every
# 20 steps; under tests/probe_slow_step.py a first allocation's 200 steps take over 100 s of wall-clock time
# (0.5 s of sleep each), a requeued allocation's a few seconds. The time-limited jobs get 2 minutes and the
# signal 60 s before the end, which Slurm sends at its next time-limit check (about every 30 s; it may be up
# to 60 s early): measured here 65-70 s into a first allocation, and 15-20 s into a requeued one, whose
# clock starts at its allocation, ~10 s before its script. So a first allocation is always interrupted,
# and a requeued one must finish within seconds, hence the sleep only in the first.
CONFIG = [*small_job(16, STEPS), "batch.micro_size=4", "train.log_every=5", "checkpoint.every_steps=20"]
WAIT_S = 420


# ----------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster():
    """The local cluster's environment (SLURM_CONF). A cluster that runs already (slurm/local_cluster.sh start
    by hand, in its default folder) is used as it is; otherwise one is started in a scratch folder of its own
    and stopped (and removed) at the end. The folder is under /tmp, not pytest's tmp_path: munged runs as the
    munge user, which cannot enter pytest's private folders."""
    env = dict(os.environ)
    running = subprocess.run(["bash", str(CLUSTER), "status"], env=env, capture_output=True, text=True).returncode == 0
    scratch = None
    if not running:
        scratch = tempfile.mkdtemp(prefix="batchkit-slurm-", dir="/tmp")
        env["BATCHKIT_SLURM_DIR"] = scratch
        started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=600)
        assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    conf = subprocess.run(["bash", str(CLUSTER), "env"], env=env, capture_output=True, text=True, check=True).stdout
    yield {"SLURM_CONF": re.search(r"SLURM_CONF=(\S+)", conf).group(1)}
    if scratch is not None:
        stopped = subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        shutil.rmtree(scratch, ignore_errors=True)


def slurm_env(cluster: dict, wandb: bool = False, slow: float = 0.0) -> dict:
    return {**child_env(wandb=wandb), **cluster, "SLOW_STEP_S": str(slow),
            **({"WANDB_MODE": "offline"} if wandb else {})}


def submit(cluster: dict, options: list[str], train_args: list[str], cwd: Path, wandb: bool = False,
           slow: float = 0.0) -> str:
    """``toolkit slurm submit OPTIONS -- TRAIN_ARGS``; returns the job id."""
    result = run([TOOLKIT, "slurm", "submit", *options, "--script", str(PROBE), "--", *train_args], 60, cwd=cwd,
                 env=slurm_env(cluster, wandb, slow))
    assert result.returncode == 0, result.stderr + result.stdout
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def job(cluster: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env={**os.environ, **cluster},
                         capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}


def wait_for_end(cluster: dict, job_id: str, deadline: float) -> dict[str, str]:
    while time.monotonic() < deadline:
        info = job(cluster, job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(2)
    subprocess.run(["scancel", job_id], env={**os.environ, **cluster})
    pytest.fail(f"job {job_id} did not end in time: {job(cluster, job_id)}")


def output(run_dir: Path, job_id: str) -> str:
    return (run_dir / "slurm" / f"slurm-{job_id}.out").read_text()


# ----------------------------------------------------------------------------------------- the jobs
@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submit every job of the module, run the local reference meanwhile, requeue one job from outside, and
    wait for all of them. Returns {name: (run_dir, job id, final scontrol record)} and the reference's dir."""
    base = tmp_path_factory.mktemp("slurm-jobs")
    dirs = {name: base / name for name in ("timelimit", "capped", "requeued", "failing")}
    dirs["plain"] = base / "plain run"  # a space in the paths of its script, its output and its run
    ids = {}
    # The time-limited jobs first: their clocks run from their start.
    ids["timelimit"] = submit(cluster, ["--nodes", "2", "--time", "2", "--signal-lead", "60"],
                              [*CONFIG, f"run.dir={dirs['timelimit']}", "tracking.wandb=true"], base, wandb=True,
                              slow=0.5)
    ids["capped"] = submit(cluster, ["--time", "2", "--signal-lead", "60", "--max-requeues", "0"],
                           [*CONFIG, f"run.dir={dirs['capped']}"], base, slow=0.5)
    ids["requeued"] = submit(cluster, ["--nodes", "2", "--time", "10"], [*CONFIG, f"run.dir={dirs['requeued']}"],
                             base, slow=0.5)
    ids["plain"] = submit(cluster, ["--nodes", "2"], [*CONFIG, f"run.dir={dirs['plain']}"], base)
    ids["failing"] = submit(cluster, [], [*CONFIG, "optim.lr=1e4", "train.on_nonfinite=stop",
                                          f"run.dir={dirs['failing']}"], base)
    # A 2-point sweep as a job array, waited for by `toolkit sweep --launcher slurm` meanwhile.
    sweep_file = write_sweep(base, "{batch.global_size: [8, 16]}", budget="{samples: 1600}", name="slurm")
    sweep_cmd = [TOOLKIT, "sweep", str(sweep_file), "--out", str(base / "sweep"), "--launcher", "slurm"]
    sweep_log = open(base / "sweep.log", "w")
    sweep = subprocess.Popen(sweep_cmd, cwd=base, env=slurm_env(cluster), stdout=sweep_log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    reference = base / "reference"
    train([*CONFIG, f"run.dir={reference}"], processes=2, timeout=240)

    # Preempt "requeued" from outside once it is well into its run (as a scheduler would).
    deadline = time.monotonic() + WAIT_S
    metrics = dirs["requeued"] / "metrics.jsonl"
    while not (metrics.is_file() and any(r["step"] >= 40 for r in read_jsonl(metrics))):
        assert time.monotonic() < deadline, f"job {ids['requeued']} logged no step 40: {job(cluster, ids['requeued'])}"
        time.sleep(1)
    requeue = subprocess.run(["scontrol", "requeue", ids["requeued"]], env={**os.environ, **cluster},
                             capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr

    ended = {name: wait_for_end(cluster, job_id, deadline) for name, job_id in ids.items()}
    try:
        sweep.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if sweep.poll() is None:
            kill_job(sweep)
        sweep_log.close()
    for name, job_id in ids.items():  # the timeline of every job, for the log of a failing test
        print(f"\n== {name} (job {job_id}, {ended[name].get('JobState')}):\n" + "\n".join(
            line for line in output(dirs[name], job_id).splitlines() if line.startswith(("batchkit:", "stopped",
                                                                                          "resumed", "done", "error"))))
    runs = {name: (dirs[name], ids[name], ended[name]) for name in ids}
    runs["sweep"] = (base / "sweep", sweep_cmd, {"returncode": sweep.returncode, "log": (base / "sweep.log").read_text()})
    return runs, reference


def assert_weights(run_dir: Path, reference: Path, rtol: float = 0.0) -> None:
    ours, ref = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == ref.keys()
    for key in ref:
        if rtol == 0.0:
            assert ours[key].equal(ref[key]), key
        else:
            scale = ref[key].abs().max().clamp_min(1e-12)
            assert ((ours[key] - ref[key]).abs().max() / scale).item() <= rtol, key


def test_two_node_job_equals_a_local_two_process_run(jobs):
    runs, reference = jobs
    run_dir, job_id, info = runs["plain"]
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", info
    text = output(run_dir, job_id)
    assert "2 node(s) (n[1-2]), 2 ranks" in text and "x processes (world size)            2" in text
    script = (run_dir / "slurm" / f"job-{job_id}.sbatch").read_text()  # as sbatch reads it when resubmitted by hand
    assert f'#SBATCH --output="{run_dir}/slurm/slurm-%j.out"' in script
    assert_weights(run_dir, reference, rtol=1e-5)


def test_time_limit_signal_checkpoints_requeues_and_resumes_bit_identical(jobs, cluster):
    runs, reference = jobs
    run_dir, job_id, info = runs["timelimit"]
    text = output(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, (info, text)
    # The timeline: the signal stopped the ranks after a step with a checkpoint, the job requeued itself,
    # the next allocation resumed from that step, and the run ended.
    # (every rank says it stopped: one line per rank)
    stopped = sorted({int(s) for s in re.findall(r"stopped: preempted by SIGUSR2: stopped after step (\d+)", text)})
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert stopped and resumed[:len(stopped)] == stopped, text
    assert text.count("batchkit: preempted, checkpoint written; requeueing job") == len(stopped), text
    assert text.index("requeueing job") < text.index("start 2 (requeued 1 times)") < text.index(f"done: {STEPS} steps")
    assert_weights(run_dir, reference)
    # One W&B run across the allocations: one offline folder per allocation, all of the same run id.
    runs_on_disk = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs_on_disk) == len(stopped) + 1, runs_on_disk
    ids = {p.name.rsplit("-", 1)[1] for p in runs_on_disk}
    assert ids == {json.loads((run_dir / "summary.json").read_text())["wandb_run_id"]}
    # toolkit slurm status: the state, the requeue count and the run's last step.
    status = run([TOOLKIT, "slurm", "status", str(run_dir)], 60, env=slurm_env(cluster))
    assert status.returncode == 0, status.stderr
    assert f"job {job_id}" in status.stdout and "COMPLETED" in status.stdout, status.stdout
    assert f"requeued {info['Restarts']} times" in status.stdout and f"finished, step {STEPS}" in status.stdout


def test_outside_requeue_resumes_bit_identical(jobs):
    runs, reference = jobs
    run_dir, job_id, info = runs["requeued"]
    text = output(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    stopped = sorted(set(re.findall(r"stopped: preempted by SIGTERM: stopped after step (\d+)", text)))
    assert len(stopped) == 1 and int(stopped[0]) >= 40, text
    assert f"resumed from {run_dir / 'checkpoints'}/step-{int(stopped[0]):08d} at step {stopped[0]}" in text
    assert_weights(run_dir, reference)


def test_max_requeues_stops_a_job_that_keeps_being_preempted(jobs):
    runs, _ = jobs
    run_dir, job_id, info = runs["capped"]
    text = output(run_dir, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "75:0", (info, text)
    step = int(re.search(r"stopped: preempted by SIGUSR2: stopped after step (\d+)", text).group(1))
    assert "batchkit: preempted, not requeued: restarted 0 times already (MAX_REQUEUES=0)" in text
    assert (run_dir / "checkpoints" / f"step-{step:08d}").is_dir()  # the work so far is kept


def test_a_run_time_failure_is_one_line_and_never_requeued(jobs):
    runs, _ = jobs
    run_dir, job_id, info = runs["failing"]
    text = output(run_dir, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "3:0", (info, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite" in errors[0], text
    assert "batchkit: training exited 3" in text and "requeue" not in text.split("batchkit: training exited")[1]


def test_a_sweep_runs_as_a_job_array_and_is_collected_like_local_points(jobs, cluster):
    runs, _ = jobs
    out, cmd, result = runs["sweep"]
    assert result["returncode"] == 0, result["log"]
    arrays = read_jsonl(out / "slurm" / "jobs.jsonl")
    assert [a["points"] for a in arrays] == [["b08", "b16"]], arrays  # one array, both points
    for name in ("b08", "b16"):
        point = out / "points" / name
        assert json.loads((point / "summary.json").read_text())["steps"] > 0
        assert f"batchkit: job {arrays[0]['job_id']}_" in (point / "train.log").read_text()  # its output is its log
    report = (out / "report.md").read_text()
    assert "b08" in report and "b16" in report, report
    # The same command again: the points are done, nothing is submitted.
    again = run(cmd, 120, cwd=out.parent, env=slurm_env(cluster))
    assert again.returncode == 0 and again.stdout.count("not run again") == 2, again.stdout + again.stderr
    assert len(read_jsonl(out / "slurm" / "jobs.jsonl")) == 1


# ----------------------------------------------------------------------------------------- before the queue
def test_a_bad_config_never_reaches_the_queue(cluster, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], env={**os.environ, **cluster}, capture_output=True,
                            text=True).stdout.split()
    result = run([TOOLKIT, "slurm", "submit", "--nodes", "3", "--", *CONFIG, f"run.dir={tmp_path / 'r'}"], 60,
                 cwd=tmp_path, env=slurm_env(cluster))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: batch.global_size=16 is not a multiple"), lines
    assert "3 processes" in lines[0] or "x 3 =" in lines[0], lines
    assert not (tmp_path / "r").exists()  # nothing written
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env={**os.environ, **cluster}, capture_output=True,
                           text=True).stdout.split()
    assert set(after) <= set(before)  # nothing submitted


def dry_run(nodes: int, gpus: int) -> str:
    result = run([TOOLKIT, "slurm", "submit", "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--time",
                  "12:00:00", "--partition", "gpu", "--account", "proj", "--dry-run", "--", "--config",
                  str(ROOT / "configs" / "gpt2-small.yaml"), "batch.micro_size=4"], 60, env=child_env())
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("nodes", [1, 16])
def test_sbatch_renders_for_eight_gpus_per_node(nodes):
    script = dry_run(nodes, 8)
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S*))?", script, re.M))
    assert options["nodes"] == str(nodes) and options["ntasks-per-node"] == "8" and options["gpus-per-node"] == "8"
    assert options["time"] == "12:00:00" and options["partition"] == "gpu" and options["account"] == "proj"
    assert options["signal"] == "USR2@180" and "requeue" in options and options["open-mode"] == "append"
    assert options["output"].endswith("runs/gpt2-small/slurm/slurm-%j.out")
    # one srun task per rank, each with its rank, local rank and world size from Slurm's variables
    srun = re.search(r"^srun (.*\n)+?.*rank \"\$PYTHON\"", script, re.M).group(0)
    assert "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in srun
    # a step's CPUs are not the job's since Slurm 22.05; every rank sees all the node's GPUs of the job
    assert '--cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"' in srun and "${SLURM_GPUS_ON_NODE:+--gpu-bind=none}" in srun
    # the rendezvous: the first node's address, a port from the job id
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "export MASTER_PORT=$((10000 + ${SLURM_JOB_ID} % 20000))" in script
    assert re.search(r'^\s+if ! scontrol requeue "\$job"; then', script, re.M)
    assert f"TRAIN_ARGS=(--config {ROOT / 'configs' / 'gpt2-small.yaml'} batch.micro_size=4)" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash


def test_sbatch_rendezvous_and_requeue_cap_as_bash_runs_them(tmp_path):
    """The script's own logic run by bash with Slurm's variables and stand-ins for scontrol and srun: the
    address and port, the ranks' variables, and the requeue decision for exits 75 and 3."""
    script = dry_run(2, 0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/bash\ncase "$1 $2" in\n"show hostnames") echo n7; echo n8;;\n'
                                      '"show node") echo "NodeName=n7 Arch=x86_64 NodeAddr=10.1.2.7 NodeHostName=n7";;\n'
                                      f'requeue*) echo "requeue $2" >> {tmp_path}/requeued;;\nesac\n')
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [ "$1" != bash ]; do shift; done  # srun\'s options\nfor p in 0 1; do '
                                  'SLURM_PROCID=$p SLURM_LOCALID=0 SLURM_NTASKS=2 "$@"; done\n'
                                  f'exit $(cat {tmp_path}/exit)\n')
    (bin_dir / "python").write_text(f'#!/bin/bash\nenv > {tmp_path}/env-$RANK\n')  # instead of training
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "n[7-8]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2"}
    script = re.sub(r"^PYTHON=.*$", f"PYTHON={bin_dir / 'python'}", script, flags=re.M)
    for code, restarts, requeued in (("75", "0", True), ("75", "10", False), ("3", "0", False)):
        (tmp_path / "exit").write_text(code)
        (tmp_path / "requeued").unlink(missing_ok=True)
        result = subprocess.run(["bash", "-c", script], env={**env, "SLURM_RESTART_COUNT": restarts},
                                capture_output=True, text=True)
        assert result.returncode == int(code), result.stderr
        assert (tmp_path / "requeued").is_file() == requeued, (code, restarts, result.stdout)
        if requeued:
            assert (tmp_path / "requeued").read_text() == "requeue 123456\n"
    rank1 = dict(line.split("=", 1) for line in (tmp_path / "env-1").read_text().splitlines() if "=" in line)
    assert rank1["RANK"] == "1" and rank1["WORLD_SIZE"] == "2" and rank1["LOCAL_RANK"] == "0"
    assert rank1["MASTER_ADDR"] == "10.1.2.7" and rank1["MASTER_PORT"] == str(10000 + 123456 % 20000)
    assert rank1["CUDA_VISIBLE_DEVICES"] == ""  # a CPU job takes no GPU


def test_bad_job_options_are_refused_in_one_line(tmp_path):
    for options, expected in ((["--time", "soon"], "--time='soon' is not a Slurm time limit"),
                              (["--time", "2", "--signal-lead", "90"], "--signal-lead=90 s is not before the time "
                                                                         "limit --time=2 (120 s) by a minute"),
                              (["--signal-lead", "10"], "--signal-lead=10 s is too short"),
                              (["--gpus-per-node", "4", "--procs-per-node", "2"], "must be equal"),
                              (["--nodes", "0"], "--nodes=0 must be at least 1")):
        result = run([TOOLKIT, "slurm", "submit", *options, "--dry-run", "--", *CONFIG], 60, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            result.stderr.strip().splitlines()[0]] and expected in result.stderr, (options, result.stderr)



def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return bool(int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16) >> (signum - 1) & 1)


def test_a_stop_signal_during_start_up_stops_after_the_first_step(tmp_path):
    """SIGUSR2 while train.py is still importing and loading (a time-limit signal to a job that starts late)
    does not kill it: it stops after its first step with a checkpoint and exits 75 (preempted), so that the
    job requeues; the same command then finishes the run."""
    overrides = [*small_job(16, 3), f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([PYTHON, "train.py", *overrides], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not catches(proc.pid, signal.SIGUSR2):  # train.py's first lines (not yet torch) note it
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # well before training
        proc.send_signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out + err
    assert "preempted by SIGUSR2: stopped after step 1 with a checkpoint" in err, err
    assert (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()
    assert "resumed from" in train(overrides).stdout
