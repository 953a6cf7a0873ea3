"""End to end: the default job (one process and two gloo processes), debug mode, NaN/Inf detection.

The acceptance runs are the *default* job (configs/tiny.yaml, 300 steps), only redirected into a
temporary run directory; each must finish within ACCEPT_TIMEOUT seconds (180, the acceptance limit on a
2-core machine; BATCHKIT_ACCEPT_TIMEOUT raises it on a shared or slower machine). Their wall times are
written to the terminal. Each runs as a user's shell starts it (conftest.run_default_job: one process uses the
machine's cores, two processes one thread each). The two-process run records W&B offline, as a user's run
without an API key does; it is made once for the session (conftest.py), and tests/test_wandb.py reads its W&B run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ACCEPT_TIMEOUT, final_weights, read_jsonl, report, run_default_job, train_together

from toolkit.config import load_config
from toolkit.schedule import lr_at

METRIC_KEYS = {"step", "samples", "tokens", "loss", "lr", "tokens_per_s"}
SUMMARY_KEYS = {"steps", "samples", "tokens", "final_loss", "val_loss", "world_size", "micro_size", "accumulation",
                "global_size", "tokens_per_s"}

# A few seconds per run: nano model, bytes vocabulary, a small synthetic stream.
NANO = ["model.size=nano", "model.vocab_size=256", "data.source=synthetic", "data.synthetic_tokens=20000",
        "data.seq_len=32", "data.pack=false", "batch.global_size=8", "batch.micro_size=4", "train.log_every=5",
        "train.val_batches=1", "train.progress=false"]


# ----------------------------------------------------------------------------------------- acceptance


@pytest.fixture(scope="module")
def default_one(request, tmp_path_factory):
    return run_default_job(request, tmp_path_factory.mktemp("default-1proc") / "run", 1)


@pytest.fixture(scope="module")
def default_two(default_job_two_processes):
    return default_job_two_processes  # conftest.py: W&B offline, shared with tests/test_wandb.py


def check_default_run(job: dict) -> None:
    run_dir, processes = job["dir"], job["processes"]
    assert job["wall"] < ACCEPT_TIMEOUT
    assert "Traceback" not in job["stderr"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "checkpoints", "config.yaml", "final", "metrics.jsonl", "summary.json", *(["wandb"] * job["wandb"])]
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step-00000200", "step-00000300"]
    assert "global batch (samples)" in job["stdout"] and "done: 300 steps" in job["stdout"]

    # config.yaml: the resolved config with the batch plan.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["plan"] == {"global_size": 32, "micro_size": 4, "accumulation": 8 // processes,
                              "world_size": processes, "seq_len": 128, "ragged": False, "tokens_per_step": 4096}
    assert config["batch"] == {"global_size": 32, "micro_size": 4, "memory_limit_gib": None, "memory_margin": 0.05,
                               "ramp": {"start": None, "increment": None, "samples": 0}}
    assert config["run"]["dir"] == str(run_dir) and config["train"]["steps"] == 300

    # metrics.jsonl: one object per logged step (every 20), plus validation lines (every 100 and at the end).
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert all({"step", "samples"} <= r.keys() for r in records)
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(20, 301, 20))
    for r in logged:
        assert METRIC_KEYS <= r.keys(), r
        assert r["samples"] == 32 * r["step"] and r["tokens"] == 4096 * r["step"]
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["lr"] == pytest.approx(lr_at(r["samples"], 3e-3, 3e-4, 1600, 9600))
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [100, 200, 300]

    # summary.json
    s = job["summary"]
    assert SUMMARY_KEYS <= s.keys()
    assert (s["steps"], s["samples"], s["tokens"]) == (300, 9600, 1_228_800)
    assert (s["world_size"], s["micro_size"], s["accumulation"], s["global_size"]) == (processes, 4, 8 // processes, 32)
    assert s["tokens_per_s"] > 0
    assert s["final_loss"] == logged[-1]["loss"] and s["val_loss"] == vals[-1]["val_loss"]

    # The loss falls: well below the first logged loss, and the validation loss beats a uniform guess.
    assert s["final_loss"] < 0.8 * logged[0]["loss"], (logged[0]["loss"], s["final_loss"])
    assert math.isfinite(s["val_loss"]) and s["val_loss"] < math.log(256)


def check_final_weights(job: dict) -> None:
    """final/model.safetensors is a plain state dict for toolkit.model.GPT, and it is the final model."""
    from toolkit.batch import make_plan
    from toolkit.data import load_stdlib, validation_batches
    from toolkit.model import GPT, GPTShape

    s = job["summary"]
    state = final_weights(job["dir"])
    model = GPT(GPTShape(**s["model"]))
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert model.lm_head.weight is model.tok_emb.weight
    assert torch.equal(state["lm_head.weight"], state["tok_emb.weight"])

    # Recompute the final validation loss from the saved weights.
    cfg = load_config()
    _, val = load_stdlib(cfg)
    plan = make_plan(32, 4, 1)
    loss_sum, valid = 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in validation_batches(val, plan, cfg.train.val_batches):
            x, y = val.batch(batch)
            loss_sum += model((x, y))[0].item()
            valid += val.valid_targets(batch)
    assert loss_sum / valid == pytest.approx(s["val_loss"], rel=1e-4)


def test_default_job_one_process(default_one):
    check_default_run(default_one)
    check_final_weights(default_one)


def test_default_job_two_processes(default_two):
    check_default_run(default_two)
    check_final_weights(default_two)


def test_one_and_two_processes_train_the_same(request, default_one, default_two):
    """Same data, same init, same math: the first logged losses agree closely; the ends stay close."""
    one, two = (read_jsonl(job["dir"] / "metrics.jsonl") for job in (default_one, default_two))
    first_one, first_two = (next(r["loss"] for r in recs if "loss" in r) for recs in (one, two))
    report(request, f"1 vs 2 processes: first loss {first_one:.6f} vs {first_two:.6f}; final loss "
                    f"{default_one['summary']['final_loss']:.6f} vs {default_two['summary']['final_loss']:.6f}")
    assert first_two == pytest.approx(first_one, abs=1e-3)
    assert default_two["summary"]["final_loss"] == pytest.approx(default_one["summary"]["final_loss"], abs=0.05)


# ----------------------------------------------------------------------------------------- debug mode
DEBUG_RUNS = {  # name -> overrides after --debug
    "a": [*NANO],
    "b": [*NANO],  # the same command again
    "explicit-steps": [*NANO, "train.steps=23"],
    "nan": [*NANO, "optim.lr=1e30"],
}


@pytest.fixture(scope="module")
def debug_runs(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """The debug-mode runs of the tests below, independent one-process runs made at the same time (one core
    each): name -> (run directory, completed process)."""
    root = tmp_path_factory.mktemp("debug")
    names = list(DEBUG_RUNS)
    results = train_together([["--debug", *DEBUG_RUNS[name], f"run.dir={root / name}"] for name in names],
                             timeout=120, check=False)
    return {name: (root / name, result) for name, result in zip(names, results, strict=True)}


def succeeded(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def test_debug_mode_deterministic_and_short(debug_runs):
    runs = [debug_runs["a"][0], debug_runs["b"][0]]  # the same command twice
    for name in ("a", "b"):
        succeeded(debug_runs[name][1])
        assert "(DistributedType.NO)" in debug_runs[name][1].stdout  # one process
    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 20  # tiny.yaml says 300; --debug caps it at 20
        assert summary["world_size"] == 1
    a, b = final_weights(runs[0]), final_weights(runs[1])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between two debug runs"
    assert read_jsonl(runs[0] / "metrics.jsonl") != [] and [
        r["loss"] for r in read_jsonl(runs[0] / "metrics.jsonl") if "loss" in r
    ] == [r["loss"] for r in read_jsonl(runs[1] / "metrics.jsonl") if "loss" in r]


def test_debug_mode_explicit_steps(debug_runs):
    run_dir, result = debug_runs["explicit-steps"]
    succeeded(result)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 23


def test_debug_mode_stops_at_nan_with_exit_3(debug_runs):
    run_dir, result = debug_runs["nan"]
    assert result.returncode == 3, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "non-finite" in errors[0] and "step" in errors[0] and "micro-step" in errors[0], errors[0]
    assert not (run_dir / "summary.json").exists()


# ----------------------------------------------------------------------------------------- in-process


@pytest.fixture
def clean_state(monkeypatch):
    """In-process trainers: reset Accelerate's singletons and torch's deterministic mode around each test."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # debug mode sets it; restored afterwards
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.use_deterministic_algorithms(False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread, as the subprocesses get (OMP_NUM_THREADS=1)
    reset()
    yield reset
    reset()
    torch.set_num_threads(threads)


def make_trainer(tmp_path: Path, *overrides: str, debug: bool = False):
    from toolkit.trainer import Trainer

    cfg = load_config(None, [*NANO, f"run.dir={tmp_path}", *overrides])
    cfg.train.debug = debug
    return Trainer(cfg)


def close(trainer) -> None:
    trainer.close()


def first_step_error(trainer) -> str:
    """Run one optimizer step that must stop with NonFiniteError; return its message."""
    from toolkit.trainer import NonFiniteError

    trainer.start()
    try:
        with pytest.raises(NonFiniteError) as info:
            trainer.run_steps(1)
    finally:
        close(trainer)
    print(info.value)
    return str(info.value)


def test_nan_gradient_names_the_parameter(tmp_path, clean_state):
    trainer = make_trainer(tmp_path, debug=True)
    assert torch.are_deterministic_algorithms_enabled()
    name = "blocks.1.mlp.0.weight"
    param = trainer.accelerator.unwrap_model(trainer.model).get_parameter(name)
    param.register_hook(lambda g: g * float("nan"))
    message = first_step_error(trainer)
    assert f"'{name}'" in message and "step 1" in message and "micro-step" in message
    assert trainer.step == 0  # the optimizer step never ran


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_outside_debug_mode_a_nan_gradient_skips_the_step(tmp_path, clean_state, grad_clip):
    """No per-micro-step checks outside debug mode; the all-reduced gradient norm decides: the step is
    skipped (train.on_nonfinite=skip, the default), the weights keep their values and the run goes on."""
    trainer = make_trainer(tmp_path, f"optim.grad_clip={grad_clip}")
    param = trainer.plain_model.get_parameter("blocks.0.attn.qkv.weight")
    before = {k: v.detach().clone() for k, v in trainer.plain_model.state_dict().items()}
    handle = param.register_hook(lambda g: g * float("nan"))
    trainer.start()
    try:
        trainer.run_steps(1)
        after_skip = {k: v.detach().clone() for k, v in trainer.plain_model.state_dict().items()}
        handle.remove()
        trainer.run_steps(1)
    finally:
        close(trainer)
    assert trainer.step == 2 and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], after_skip[k]) for k in before)
    assert not torch.equal(param.detach(), before["blocks.0.attn.qkv.weight"])  # the next step trained
    assert torch.isfinite(param).all()


def test_lr_follows_samples_whatever_the_split(tmp_path, clean_state):
    """The lr each optimizer step uses depends on samples done only, not on micro batch or global batch."""
    lrs: dict[tuple[int, int], dict[int, float]] = {}
    for global_size, micro, steps in ((8, 1, 6), (8, 4, 6), (8, 8, 6), (16, 4, 3)):
        clean_state()
        trainer = make_trainer(tmp_path / f"{global_size}-{micro}", f"batch.global_size={global_size}",
                               f"batch.micro_size={micro}", "optim.warmup_samples=24", "optim.decay_samples=64",
                               "train.steps=6")
        trainer.start()
        seen = {}
        try:
            for _ in range(steps):
                trainer.run_steps(1)
                seen[trainer.step * global_size] = trainer.lr
                assert trainer.optimizer.param_groups[0]["lr"] == trainer.lr
        finally:
            close(trainer)
        lrs[(global_size, micro)] = seen
    reference = lrs[(8, 1)]
    assert reference == {s: lr_at(s, 3e-3, 3e-4, 24, 64) for s in range(8, 49, 8)}
    assert lrs[(8, 4)] == reference and lrs[(8, 8)] == reference
    assert lrs[(16, 4)] == {s: reference[s] for s in (16, 32, 48)}


def test_nan_gradient_names_the_micro_step_that_made_it(tmp_path, clean_state):
    """Debug mode checks after every micro-step: a NaN made by the second backward names micro-step 1."""
    trainer = make_trainer(tmp_path, "batch.global_size=8", "batch.micro_size=2", debug=True)
    assert trainer.plan.accumulation == 4
    calls = []

    def nan_on_second_backward(grad):
        calls.append(trainer.micro_step)
        return grad * float("nan") if len(calls) == 2 else grad

    trainer.plain_model.get_parameter("blocks.0.mlp.2.weight").register_hook(nan_on_second_backward)
    message = first_step_error(trainer)
    assert calls == [0, 1]  # stopped right after the micro-step that made the NaN
    assert "'blocks.0.mlp.2.weight'" in message and "step 1, micro-step 1" in message
