"""The library API with users' own models and data (issue 12): ``Trainer(cfg, model=..., train_data=...)``.

The users are the scripts in examples/: a custom ``nn.Module`` with a masked loss on a ``TensorDataset``
(examples/custom_model.py), and a Hugging Face GPT-2 built from a config (examples/hf_causal_lm.py, and
``model.source=hf`` through train.py). Each runs for real, as a user starts it: ``python SCRIPT`` or
``accelerate launch ... SCRIPT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, child_env, final_weights, read_jsonl, run, train, train_together
from test_resume_kill import start_and_kill

from toolkit.bench.common import max_rel_diff

CUSTOM = "examples/custom_model.py"
TOL = 1e-5
# Global 16 as 1 x 16, 1 x (4 x 4), 2 x (8 x 1) and 2 x (2 x 4): (processes, micro-batch).
SPLITS = [(1, 16), (1, 4), (2, 8), (2, 2)]
QUIET = ["train.progress=false", "train.precision=fp32", "tracking.wandb=false"]
CUSTOM_JOB = [*QUIET, "batch.global_size=16", "train.steps=40", "train.log_every=5", "train.val_every=0",
              "checkpoint.every_steps=0"]
HF_JOB = [*QUIET, "model.source=hf", "model.hf_config=gpt2", "model.hf_overrides.n_layer=2",
          "model.hf_overrides.n_head=2", "model.hf_overrides.n_embd=64", "model.hf_overrides.n_positions=32",
          "data.source=synthetic", "data.synthetic_tokens=40000", "data.pack=false", "data.seq_len=32",
          "model.vocab_size=256", "batch.global_size=16", "train.steps=15", "train.log_every=5", "train.val_every=0",
          "train.val_batches=1", "checkpoint.every_steps=0"]


def split_runs(tmp_path, job: list[str], script: str) -> dict[tuple[int, int], object]:
    """The job at every split: the two one-process runs side by side, then the two-process ones."""
    dirs = {split: tmp_path / f"p{split[0]}-m{split[1]}" for split in SPLITS}
    jobs = {split: [*job, f"batch.micro_size={split[1]}", f"run.dir={dirs[split]}"] for split in SPLITS}
    train_together([jobs[s] for s in SPLITS if s[0] == 1], script=script)
    for s in SPLITS:
        if s[0] > 1:
            train(jobs[s], processes=s[0], script=script)
    return dirs


def without_key_bias(weights: dict, n_embd: int = 64) -> dict:
    """GPT-2's attention has a key bias (the middle third of c_attn.bias), whose gradient is exactly zero in exact
    arithmetic (softmax ignores a constant added to every score of a row): what it gets is rounding noise, which
    Adam turns into full-size updates that differ between any two splits (the built-in GPT has no such bias,
    toolkit/model.py). Every other weight must agree."""
    out = dict(weights)
    for name, value in weights.items():
        if name.endswith("attn.c_attn.bias"):
            out[name] = torch.cat([value[:n_embd], value[2 * n_embd:]])
    return out


def assert_same_weights(dirs: dict, compare=lambda w: w) -> None:
    reference = compare(final_weights(dirs[SPLITS[0]]))
    for split, folder in dirs.items():
        rel, where = max_rel_diff(compare(final_weights(folder)), reference)
        print(f"{split[0]} process(es) x micro {split[1]}: max rel diff {rel:.2e} ({where})")
        assert rel <= TOL, (split, rel, where)


def test_a_custom_module_with_a_masked_loss_trains_the_same_on_every_split(tmp_path):
    """examples/custom_model.py: a variable number of counted targets per sample, global 16 split four ways."""
    dirs = split_runs(tmp_path, CUSTOM_JOB, CUSTOM)
    assert_same_weights(dirs)
    summary = json.loads((dirs[(2, 2)] / "summary.json").read_text())
    assert summary["model"] == {"class": "MaskedRegressor"} and summary["accumulation"] == 4
    assert summary["final_loss"] < summary["first_loss"] / 2  # it learns
    # The loss a log step reports is the sum over the global batches over their counted targets: the same
    # number on every split (a mean of micro-batch means would differ).
    losses = {s: [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for s, d in dirs.items()}
    for split, values in losses.items():
        assert values == pytest.approx(losses[SPLITS[0]], rel=1e-5), split


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory) -> dict:
    return split_runs(tmp_path_factory.mktemp("hf"), HF_JOB, "train.py")


def test_an_hf_gpt2_from_a_small_config_trains_the_same_on_every_split(hf_runs):
    assert_same_weights(hf_runs, without_key_bias)
    losses = {s: [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for s, d in hf_runs.items()}
    for split, values in losses.items():
        assert values == pytest.approx(losses[SPLITS[0]], rel=1e-5), split
    summary = json.loads((hf_runs[(1, 16)] / "summary.json").read_text())
    assert summary["model"] == {"class": "HFCausalLM"} and summary["flops_per_token"] > 0


def hf_logits_agree(run_dir, script_model=None) -> None:
    """final/ loads with AutoModelForCausalLM.from_pretrained as is and gives the trained model's logits (the
    trained model: the final checkpoint's weights in the toolkit's wrapper)."""
    code = f"""
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
sys.path.insert(0, {str(ROOT)!r})
from toolkit.config import load_config
from toolkit.hf import build_hf_model
run_dir = Path({str(run_dir)!r})
loaded = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
cfg = load_config(run_dir / "config.yaml")
trained = build_hf_model(cfg, cfg.model.hf_overrides.get("vocab_size") or cfg.model.vocab_size)
checkpoint = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
trained.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
x = torch.randint(0, loaded.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = loaded(input_ids=x).logits, trained.eval().model(input_ids=x).logits
print("max abs diff", (a - b).abs().max().item())
assert torch.equal(a, b)
"""
    result = run([sys.executable, "-c", code], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    print(result.stdout.strip())


def test_an_hf_final_folder_loads_with_from_pretrained_and_gives_the_same_logits(hf_runs):
    run_dir = hf_runs[(2, 2)]
    assert sorted(p.name for p in (run_dir / "final").iterdir()) == ["config.json", "generation_config.json",
                                                                     "model.safetensors"]
    hf_logits_agree(run_dir)


def test_the_sweep_example_runs_the_custom_model_at_three_batch_sizes(tmp_path):
    """examples/custom_sweep.yaml as the README shows it (the scripts themselves run in tests/test_readme.py, as
    written, and above at every split)."""
    out = tmp_path / "sweep"
    sweep = run([str(Path(sys.executable).with_name("toolkit")), "sweep", "examples/custom_sweep.yaml", "--out", str(out)],
                timeout=400)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    rows = [json.loads((p / "summary.json").read_text()) for p in sorted((out / "points").iterdir())]
    assert [r["global_size"] for r in rows] == [4, 16, 64]
    assert all(r["stopped_at_target"] for r in rows), rows
    assert (out / "report.md").is_file() and json.loads((out / "recommendation.json").read_text())["target"] == 0.09


def test_a_model_that_returns_a_mean_is_refused_in_one_line(tmp_path):
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'examples')!r})
import custom_model
from toolkit import Trainer, config_from_argv, run

class MeanLoss(custom_model.MaskedRegressor):
    def forward(self, batch):
        loss_sum, n = super().forward(batch)
        return loss_sum / n  # a mean: what the contract refuses

def main():
    cfg = config_from_argv(["run.dir={tmp_path / 'run'}", *custom_model.DEFAULTS])
    return Trainer(cfg, model=MeanLoss, train_data=custom_model.make_data(256, 1)).train()

sys.exit(run(main))
"""
    result = run([sys.executable, "-c", code], timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "model(batch) must return (loss_sum, n_targets)" in lines[0] and "a mean loss?" in lines[0], lines[0]


def test_sigkill_and_resume_with_dataloader_workers_is_bit_identical(tmp_path):
    """Two processes, two DataLoader workers each: killed after a checkpoint, resumed, the same final weights
    bit for bit as the run never stopped (and the same samples at every step)."""
    job = [*CUSTOM_JOB, "train.steps=60", "checkpoint.every_steps=10", "checkpoint.keep=10", "data.workers=2",
           "batch.micro_size=2", "run.record_samples=true"]
    reference = tmp_path / "reference"
    train([*job, f"run.dir={reference}"], processes=2, script=CUSTOM)
    killed = tmp_path / "killed"
    newest, what = start_and_kill([*job, f"run.dir={killed}"], 2, killed, delay=1.0, script=CUSTOM)
    print(what)
    assert newest is not None and newest < 60, what  # killed mid-run, after a checkpoint
    resumed = train([*job, f"run.dir={killed}"], processes=2, script=CUSTOM)
    assert f"at step {newest}" in resumed.stdout
    a, b = final_weights(killed), final_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in b)
    for rank in (0, 1):
        steps = {r["step"]: r["indices"] for r in read_jsonl(reference / f"samples-rank{rank}.jsonl")}
        for r in read_jsonl(killed / f"samples-rank{rank}.jsonl"):  # the resumed segment's record
            assert r["indices"] == steps[r["step"]]


def test_zero2_equals_ddp_with_a_user_model(tmp_path):
    """The user's script unchanged under the DeepSpeed launch file launch/zero2.yaml."""
    job = [*CUSTOM_JOB, "batch.micro_size=2", "train.steps=30"]
    ddp, zero2 = tmp_path / "ddp", tmp_path / "zero2"
    train([*job, f"run.dir={ddp}"], processes=2, script=CUSTOM)
    result = train([*job, f"run.dir={zero2}"], processes=2, script=CUSTOM, launch="zero2.yaml")
    assert "memory predicted per device (ZeRO-2)" in result.stdout, result.stdout[-2000:]
    rel, where = max_rel_diff(final_weights(zero2), final_weights(ddp))
    print(f"ZeRO-2 against DDP: max rel diff {rel:.2e} ({where})")
    assert rel <= TOL


def test_a_user_model_run_is_recorded_in_wandb_offline(tmp_path):
    from test_wandb import history, offline_runs, records

    run_dir = tmp_path / "run"
    train([*CUSTOM_JOB, "tracking.wandb=true", "batch.micro_size=4", "train.steps=10", f"run.dir={run_dir}"],
          script=CUSTOM, env=child_env(wandb=True))
    folders = offline_runs(run_dir)
    assert len(folders) == 1
    recs = records(folders[0])
    config = {}
    for r in recs:
        if r["type"] in ("run", "config"):
            config.update((r["run"]["config"] if r["type"] == "run" else r["config"]).get("update", {}))
    assert config["model_class"] == "MaskedRegressor" and config["plan"]["accumulation"] == 4
    rows = {row["_step_num"]: row for row in history(folders[0])}
    local = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert sorted(rows) == sorted(local) == [5, 10]
    for step, record in local.items():
        assert rows[step]["train/loss"] == pytest.approx(record["loss"], rel=1e-12)
    assert rows[10]["batch/noise_scale"] == pytest.approx(local[10]["noise_scale"], rel=1e-12)


def test_the_step_batches_are_the_samplers_and_workers_keep_their_order():
    """The DataLoader path (workers, in order) gives exactly the micro-batches the sampler chose."""
    from torch.utils.data import TensorDataset

    from toolkit.batch import BatchSchedule, make_plan
    from toolkit.data import GlobalBatchSampler, rank_micro_batches
    from toolkit.loader import StepBatches, make_loader

    data = TensorDataset(torch.arange(100))
    plan = make_plan(16, 4, 2)
    sampler = GlobalBatchSampler(100, 16, seed=3)
    batches = StepBatches(sampler, BatchSchedule(16), plan, rank=1, start=3, end=9)
    expected = [m for step in range(3, 9) for m in rank_micro_batches(sampler.global_batch(step), plan, 1)]
    assert list(batches) == expected and len(batches) == len(expected) == 12
    for workers in (0, 2):
        got = [b[0].tolist() for b in make_loader(data, batches, None, workers, False, 2)]
        assert got == expected, workers


def test_hf_wrapper_sums_what_hf_averages():
    """HFCausalLM's loss is HF's own mean loss times the number of counted tokens (labels -100 excluded)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from toolkit.hf import HFCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=50, n_positions=16, n_layer=1, n_head=2, n_embd=16,
                                                     bos_token_id=0, eos_token_id=0)).eval()  # eval: no dropout
    ids = torch.randint(0, 50, (3, 16))
    labels = ids.clone()
    labels[0, 10:] = -100
    labels[2, 4:] = -100
    loss_sum, n = HFCausalLM(hf)({"input_ids": ids, "labels": labels})
    mean = hf(input_ids=ids, labels=labels).loss
    assert int(n) == 15 + 9 + 3  # the first label of each row is never a target (nothing predicts it)
    torch.testing.assert_close(loss_sum, mean * n, rtol=1e-5, atol=1e-5)



def test_a_user_script_is_what_slurm_jobs_and_slurm_sweeps_run(tmp_path):
    """``toolkit slurm submit --script`` and a sweep file's ``script:`` put the user's script in the job (rendered
    with --dry-run; the job itself runs ``$PYTHON $SCRIPT ARGS`` for any script, tested with train.py in
    tests/test_slurm.py)."""
    toolkit = str(Path(sys.executable).with_name("toolkit"))
    job = run([toolkit, "slurm", "submit", "--nodes", "2", "--script", CUSTOM, "--dry-run", "--",
               f"run.dir={tmp_path / 'job'}", "batch.global_size=16"], timeout=60)
    assert job.returncode == 0, job.stderr[-2000:]
    assert f"SCRIPT={ROOT / CUSTOM}" in job.stdout and "batch.global_size=16" in job.stdout
    sweep = run([toolkit, "sweep", "examples/custom_sweep.yaml", "--launcher", "slurm", "--dry-run", "--out",
                 str(tmp_path / "sweep")], timeout=60)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    assert sweep.stdout.count(f"SCRIPT={ROOT / CUSTOM}") == 1 and "batch.global_size=64" in sweep.stdout


def test_the_contract_check_names_what_was_returned():
    from toolkit.config import ConfigError
    from toolkit.steps import check_contract

    loss = torch.tensor(3.0, requires_grad=True)
    assert check_contract((loss, 4)) == (loss, 4)
    assert check_contract((loss, torch.tensor([5])))[1].shape == ()  # one number, in any shape of one element
    cases = [(loss, "a tensor of shape () (a mean loss?)"), (torch.ones(3), "a tensor of shape (3,)"),
             ((torch.ones(2), 5), "a tuple of 2"), ((loss, torch.tensor([1, 2])), "n_targets is Tensor of shape (2,)"),
             ({"loss": loss}, "a dict")]
    for out, words in cases:
        with pytest.raises(ConfigError) as info:
            check_contract(out)
        assert str(info.value).startswith("model(batch) must return (loss_sum, n_targets)") and words in str(info.value)


def test_workers_do_not_keep_the_run_directory_locked_after_their_parent_is_killed(tmp_path):
    """The OOM killer ends the training process alone: its DataLoader workers (forked, so sharing its open files)
    must not hold run.dir's lock, or the command run again at once is refused as 'in use'."""
    import os
    import signal
    import subprocess
    import time

    import psutil
    from conftest import kill_job, train_cmd
    from test_resume_kill import valid_checkpoints

    from toolkit.rundir import RunLock

    run_dir = tmp_path / "run"
    job = [*CUSTOM_JOB, "train.steps=400", "checkpoint.every_steps=5", "data.workers=2", "batch.micro_size=4",
           f"run.dir={run_dir}"]
    proc = subprocess.Popen(train_cmd(job, 1, CUSTOM), cwd=ROOT, env=child_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not valid_checkpoints(run_dir):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.05)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the training process only: its workers live on for a moment
        proc.wait(timeout=30)
        assert any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        lock = RunLock(run_dir)
        assert lock.acquire() is None  # free at once, though the workers are still there
        lock.release()
    finally:
        kill_job(proc)
