"""``toolkit bench parity``: the toolkit's training loop timed against a plain PyTorch loop.

Modelled on Lightning's parity tests (``tests/parity_pytorch``): one process builds the same model
from the seed, the same data and the same global batches, and times

* the toolkit: ``Trainer(cfg)``, ``start()``, then ``run_steps(steps)`` (only ``run_steps`` is timed;
  it logs every ``train.log_every`` steps as a user sees it, with the progress bar and validation off);
* a plain PyTorch loop, written out below: AdamW over the same parameter groups, the same learning-rate
  schedule, the same micro-batches, ``loss_sum, _ = model((x, y))``, ``backward``, the gradients
  divided by the global batch's number of targets, ``clip_grad_norm_``, ``step``, ``zero_grad``, the loss read back at the same cadence.

The two alternate ``repeats`` times after one short untimed warm-up of each, the order of a pair flipping
every repeat (toolkit, plain, plain, toolkit, toolkit, plain, ...) so that a drift in the machine's speed
favours neither. The report gives the median tokens/s of each and their ratio (toolkit / plain; 1 or more
means the toolkit costs nothing), and checks that the loops did the same math: every timed run starts from
the same initial weights, so after the same steps all final weights must agree (and the logged losses too).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from toolkit.batch import BatchPlan, make_plan, peak_lrs
from toolkit.bench.common import _log_step, _sync, _weights, max_rel_diff
from toolkit.config import Config, ConfigError
from toolkit.data import GlobalBatchSampler, Samples, load_data, rank_micro_batches
from toolkit.engine import mixed_precision, wants_cpu
from toolkit.model import build_model, num_params, optimizer_groups, shape_from_config
from toolkit.schedule import lr_at

WARMUP_STEPS = 5
"""Optimizer steps of the untimed warm-up run of each loop (at most ``steps``)."""

NOISY_SPREAD = 1.10
"""When the fastest run of a loop is more than this many times its slowest, the report says so."""


# ------------------------------------------------------------------------------------------ the loops
def toolkit_run(cfg: Config, steps: int, run_dir: Path) -> tuple[float, float, dict[str, torch.Tensor], list[float]]:
    """``Trainer(cfg).start()`` then timed ``run_steps(steps)``: wall and CPU seconds, final weights, logged
    losses."""
    from accelerate.state import AcceleratorState, GradientState

    from toolkit.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.run.dir = str(run_dir)
    cfg.train.steps = steps
    # The trainer prints its plan and one line per log step; the bench keeps them out of its report
    # (they are still formatted and written, to a buffer instead of the terminal).
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg)
        trainer.start()
        device = trainer.accelerator.device
        gc.collect()
        _sync(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.run_steps(steps)
        _sync(device)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    weights = _weights(trainer.accelerator.unwrap_model(trainer.model))
    losses = [r["loss"] for r in trainer.parts.tracker.history if "loss" in r]
    # Not trainer.finish(): it validates and saves weights. Close what the run holds (files, W&B, lock, signal
    # handlers) and forget Accelerate's process-wide state so that the next Trainer starts as the first did.
    trainer.close()
    del trainer
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return elapsed, cpu, weights, losses


def plain_run(
    cfg: Config, steps: int, data: Samples, plan: BatchPlan, device: torch.device, timed_from: int = 0
) -> tuple[float, float, dict[str, torch.Tensor], list[float]]:
    """The same training written in plain PyTorch: wall and CPU seconds (of the steps from ``timed_from`` on: the
    ones before warm up compilation and the allocator), final weights, logged losses."""
    o = cfg.optim
    model = build_model(cfg).to(device)
    optimizer = torch.optim.AdamW(  # fused on CUDA, as nanoGPT's (and the toolkit's)
        optimizer_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        fused=True if device.type == "cuda" else None,
    )
    if cfg.model.compile:
        model = torch.compile(model)
    bf16 = mixed_precision(cfg, device.type == "cpu") == "bf16"
    sampler = GlobalBatchSampler(len(data), plan.global_size, cfg.seed)
    decay_samples = o.decay_samples or steps * plan.global_size
    peak, minimum = peak_lrs(cfg, plan.global_size)  # optim.lr_scaling and optim.schedule, as the trainer applies them
    loss_sum, valid_since_log, losses = torch.zeros((), device=device), 0, []

    gc.collect()
    _sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(steps):
        if step == timed_from and step > 0:
            _sync(device)
            started, cpu_started = time.perf_counter(), time.process_time()
        global_batch = sampler.global_batch(step)
        valid_targets = data.valid_targets(global_batch)
        lr = lr_at((step + 1) * plan.global_size, peak, minimum, o.warmup_samples, decay_samples)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for indices in rank_micro_batches(global_batch, plan, 0):
            x, y = data.batch(indices)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model((x, y))
            loss.backward()  # the sum; divided by the global batch's count below, once
            loss_sum += loss.detach().float()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, torch.tensor(1.0 / valid_targets, device=device))
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        valid_since_log += valid_targets
        if _log_step(step + 1, steps, cfg.train.log_every):
            losses.append(loss_sum.item() / valid_since_log)
            loss_sum.zero_()
            valid_since_log = 0
    _sync(device)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return elapsed, cpu, _weights(model), losses


# ------------------------------------------------------------------------------------------ the bench
def parity(cfg: Config, steps: int = 30, repeats: int = 3) -> dict:
    """Time the toolkit's loop against a plain PyTorch loop on one process; see the module docstring."""
    if steps < 1:
        raise ConfigError(f"--steps={steps} must be at least 1")
    if repeats < 1:
        raise ConfigError(f"--repeats={repeats} must be at least 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench parity runs one process; start it with `toolkit bench parity`, not a launcher")
    cfg = copy.deepcopy(cfg)
    # The plain loop neither logs to W&B nor estimates the noise scale; `toolkit bench tracking` times those.
    cfg.tracking.wandb, cfg.tracking.noise_scale = False, False
    cfg.train.val_every = 0  # no validation inside run_steps (and finish() is never called)
    cfg.train.progress = False
    cfg.train.debug = False
    cfg.run.record_samples = False

    if cfg.batch.global_size == "full" or cfg.batch.ramp.start is not None:
        raise ConfigError("bench parity times fixed-size global batches: set batch.global_size to a number of samples "
                          "and leave batch.ramp unset")
    if cfg.batch.micro_size == "auto":
        raise ConfigError("the bench times a fixed micro-batch: set batch.micro_size to a number, not auto")
    plan = make_plan(cfg.batch.global_size, cfg.batch.micro_size, 1, cfg.data.seq_len)
    shape = shape_from_config(cfg)
    data, _ = load_data(cfg, shape.vocab_size)
    device = torch.device("cpu") if wants_cpu(cfg) else torch.device("cuda", torch.cuda.current_device())
    tokens = steps * plan.tokens_per_step

    tmp = Path(tempfile.mkdtemp(prefix="toolkit-bench-parity-"))
    try:
        warmup = min(steps, WARMUP_STEPS)
        toolkit_run(cfg, warmup, tmp / "warmup")
        plain_run(cfg, warmup, data, plan, device)
        speed: dict[str, list[float]] = {"toolkit": [], "plain": []}
        cpu_s: dict[str, list[float]] = {"toolkit": [], "plain": []}
        reference, diffs, loss_diffs = None, [], []
        for r in range(repeats):
            # The order flips every repeat (toolkit, plain, plain, toolkit, ...): a machine that speeds up
            # or slows down during the bench then does not favour the loop that always runs second.
            for loop in ("toolkit", "plain") if r % 2 == 0 else ("plain", "toolkit"):
                if loop == "toolkit":
                    seconds, cpu, weights, losses = toolkit_run(cfg, steps, tmp / f"toolkit-{r}")
                else:
                    seconds, cpu, weights, losses = plain_run(cfg, steps, data, plan, device)
                speed[loop].append(tokens / seconds)
                cpu_s[loop].append(cpu)
                if reference is None:  # the first run; every later one, of either loop, must end on these
                    reference, reference_losses = weights, losses
                    continue
                diffs.append(max_rel_diff(weights, reference)[0])
                loss_diffs.append(max(abs(a - b) for a, b in zip(losses, reference_losses, strict=True)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    (toolkit_tps, plain_tps), (toolkit_cpu, plain_cpu) = speed.values(), cpu_s.values()
    median_toolkit, median_plain = statistics.median(toolkit_tps), statistics.median(plain_tps)
    result = {
        "toolkit_tokens_per_s": toolkit_tps,
        "plain_tokens_per_s": plain_tps,
        "median_toolkit_tokens_per_s": median_toolkit,
        "median_plain_tokens_per_s": median_plain,
        "ratio": median_toolkit / median_plain,
        # toolkit / plain of each repeat: the two runs of a repeat ran next to each other in time.
        "pair_ratios": [t / p for t, p in zip(toolkit_tps, plain_tps, strict=True)],
        "median_pair_ratio": statistics.median(t / p for t, p in zip(toolkit_tps, plain_tps, strict=True)),
        # CPU seconds of this process per run (all threads). On a machine shared with other jobs the wall
        # clock is noisy; with one torch thread the CPU time is a steadier second opinion.
        "toolkit_cpu_s": toolkit_cpu,
        "plain_cpu_s": plain_cpu,
        "cpu_ratio": statistics.median(plain_cpu) / statistics.median(toolkit_cpu),
        # max/min over the runs of each loop: how much the machine moved the clock during the bench.
        "toolkit_spread": max(toolkit_tps) / min(toolkit_tps),
        "plain_spread": max(plain_tps) / min(plain_tps),
        "weights_max_rel_diff": max(diffs),
        "weights_identical": max(diffs) == 0.0,
        "loss_max_abs_diff": max(loss_diffs),
        "config": {
            "model_size": cfg.model.size,
            "n_layer": shape.n_layer,
            "n_head": shape.n_head,
            "n_embd": shape.n_embd,
            "vocab_size": shape.vocab_size,
            "n_params": num_params(build_model(cfg)),
            "global_size": plan.global_size,
            "micro_size": plan.micro_size,
            "accumulation": plan.accumulation,
            "seq_len": plan.seq_len,
            "tokens_per_step": plan.tokens_per_step,
            "steps": steps,
            "warmup_steps": warmup,
            "repeats": repeats,
            "log_every": cfg.train.log_every,
            "data_source": cfg.data.source,
            "device": str(device),
            "precision": "bf16" if mixed_precision(cfg, device.type == "cpu") == "bf16" else "fp32",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    result["report"] = _report(result)
    return result


def _report(r: dict) -> str:
    c = r["config"]
    spread = max(r["toolkit_spread"], r["plain_spread"])
    noise = [] if spread <= NOISY_SPREAD else [
        f"note: runs of the same loop differ by up to {spread - 1:.0%}: the machine was busy and the ratio is "
        f"only as good as that; use more --repeats (or OMP_NUM_THREADS=1 on a shared CPU)"
    ]

    def runs(values: list[float]) -> str:
        return "  ".join(f"{v:,.0f}" for v in values)

    same = "bitwise identical" if r["weights_identical"] else f"max rel diff {r['weights_max_rel_diff']:.2e}"
    return "\n".join([
        f"bench parity: model {c['model_size']} ({c['n_params']:,} parameters, {c['n_layer']} layers x "
        f"{c['n_embd']}), {c['data_source']} data, seq_len {c['seq_len']}",
        f"  global batch {c['global_size']} = micro {c['micro_size']} x accumulation {c['accumulation']} "
        f"x 1 process; {c['steps']} steps per run, {c['repeats']} repeats (order flipped each time) after a "
        f"{c['warmup_steps']}-step warm-up",
        f"  device {c['device']}, {c['precision']}, torch {c['torch']} with {c['torch_threads']} threads",
        f"toolkit tokens/s per run: {runs(r['toolkit_tokens_per_s'])}  (median {r['median_toolkit_tokens_per_s']:,.0f})",
        f"plain   tokens/s per run: {runs(r['plain_tokens_per_s'])}  (median {r['median_plain_tokens_per_s']:,.0f})",
        f"toolkit / plain per repeat: {'  '.join(f'{x:.2f}' for x in r['pair_ratios'])}  (median "
        f"{r['median_pair_ratio']:.3f})",
        f"CPU-time ratio (plain / toolkit CPU seconds per run, medians): {r['cpu_ratio']:.2f}",
        f"final weights of all runs: {same}; logged losses max abs diff {r['loss_max_abs_diff']:.2e}",
        *noise,
        f"parity ratio (toolkit / plain PyTorch tokens/s): {r['ratio']:.2f}",
    ])
