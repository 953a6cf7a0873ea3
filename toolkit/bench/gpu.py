"""``toolkit bench gpu``: GPT-2 small on one GPU, the toolkit against a plain compiled PyTorch loop, in one process.

The command to run whenever a GPU is available. One process, one run, one table:

* **plain**: the loop of ``toolkit bench parity`` (``toolkit/bench/parity.py``), compiled, bf16 autocast, fused
  AdamW: what a careful user writes by hand (nanoGPT's loop);
* **toolkit**: ``Trainer(cfg)``, eager and compiled, without DeepSpeed and under ZeRO-2;

each at micro sizes 16, 32, 64 and 128 with the global batch fixed (the largest micro size: smaller ones
accumulate, so every row does the same math per step). A row warms up (compilation, the allocator) for
``--warmup`` steps, then times ``--steps`` steps: tokens/s, MFU (6N + attention FLOPs per token over the
device's bf16 peak), the allocator's peak, and toolkit / plain at the same micro size. A row that runs out of
memory says so. Then:

* **the loss in one piece**: the toolkit with ``model.loss_chunk=0`` (``F.cross_entropy`` over all logits) at
  one micro size, against the chunked default (the peak it saves);
* **host syncs**: the toolkit's step under ``torch.cuda.set_sync_debug_mode``, counted per step;
* **auto**: ``batch.micro_size: auto`` with a per-GPU share of ``--auto-share`` samples (many divisors): its
  choice, the probe's time and what it left allocated, and the largest micro size that really fits, found by
  probing every size between the choice and the first failure (auto's choice / that size: at least 0.9).

Results go to the terminal as a table and, with ``--out FILE``, to a JSON file that is rewritten after every row
(a command cut short by a time limit keeps what it measured).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from toolkit.batch import make_plan
from toolkit.bench.common import _sync
from toolkit.config import Config, ConfigError
from toolkit.data import load_data
from toolkit.engine import run_device
from toolkit.memory import GIB
from toolkit.metrics import mfu, peak_flops
from toolkit.model import build_model, flops_per_token, num_params, shape_from_config


def _reset(device: torch.device) -> None:
    """Forget the previous row: compiled code, cached blocks, the peak."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def _row_cfg(cfg: Config, micro: int, compile_: bool, stage: int | None, steps: int, loss_chunk: int | None = None,
             micro_size=None, offload: bool = False) -> Config:
    c = copy.deepcopy(cfg)
    c.batch.micro_size = micro_size or micro
    c.model.compile = compile_
    c.deepspeed.stage = stage
    c.deepspeed.offload_optimizer = offload
    c.train.steps = steps
    if loss_chunk is not None:
        c.model.loss_chunk = loss_chunk
    return c


def plain_row(cfg: Config, data, micro: int, warmup: int, steps: int, device: torch.device, compile_: bool) -> dict:
    """The plain loop: warm-up steps, then the timed ones (one loop, so the same compiled code)."""
    from toolkit.bench.parity import plain_run

    plan = make_plan(cfg.batch.global_size, micro, 1, cfg.data.seq_len)
    c = _row_cfg(cfg, micro, compile_, None, warmup + steps)
    elapsed, _, _, _ = plain_run(c, warmup + steps, data, plan, device, timed_from=warmup)
    return {"seconds": elapsed, "tokens": steps * plan.tokens_per_step}


def toolkit_row(cfg: Config, warmup: int, steps: int, run_dir: Path, count_syncs: int = 0) -> dict:
    """``Trainer(cfg)``: ``run_steps(warmup)``, then ``run_steps(steps)`` timed; then, with ``count_syncs``, that
    many more steps under CUDA's sync debug mode, counting the host syncs."""
    from accelerate.state import AcceleratorState, GradientState

    from toolkit.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.run.dir = str(run_dir)
    cfg.train.steps = warmup + steps + count_syncs
    result = {}
    # A DeepSpeed row leaves its marks in the environment (Accelerate's ACCELERATE_USE_DEEPSPEED, the one-process
    # RANK/WORLD_SIZE/MASTER_* the toolkit sets): the next row would build a DeepSpeed Accelerator from them.
    environment = dict(os.environ)
    with contextlib.redirect_stdout(io.StringIO()):
        started = time.perf_counter()
        trainer = Trainer(cfg)
        result["start_s"] = time.perf_counter() - started
        try:
            trainer.start()
            device = trainer.accelerator.device
            trainer.run_steps(warmup)
            _sync(device)
            started = time.perf_counter()
            trainer.run_steps(steps)
            _sync(device)
            result["seconds"] = time.perf_counter() - started
            result["tokens"] = steps * trainer.plan.tokens_per_step
            if count_syncs and device.type == "cuda":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        trainer.run_steps(count_syncs)
                        _sync(device)
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
                result["host_syncs_per_step"] = len(syncs) / count_syncs
            result["auto_micro"] = trainer.parts.auto_micro.as_dict() if trainer.parts.auto_micro else None
            result["micro_size"], result["accumulation"] = trainer.plan.micro_size, trainer.plan.accumulation
        finally:
            trainer.close()
            del trainer
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            _forget_deepspeed_groups()
            os.environ.clear()
            os.environ.update(environment)
    return result


def _forget_deepspeed_groups() -> None:
    """The trainer ends its process group when it closes; DeepSpeed keeps the groups it made from it in module
    globals, and the next engine in this process would use them. Forget them (DeepSpeed makes them again)."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if isinstance(value, dict) and name.startswith("_") and name.upper() == name:
            value.clear()
        elif isinstance(value, torch.distributed.ProcessGroup) or name == "mesh_device":
            setattr(groups, name, None)


def _attempt(fn, device: torch.device) -> dict:
    """A row, or ``{"error": "out of memory"}`` when it did not fit."""
    _reset(device)
    try:
        row = fn()
    except torch.OutOfMemoryError:
        row = {"error": "out of memory"}
    _sync(device)
    row["peak_gib"] = _peak(device)
    _reset(device)
    return row


def largest_fitting(cfg: Config, device: torch.device, low: int, high: int) -> int:
    """The largest micro size in [low, high) whose real step (forward, backward, AdamW) fits: a binary search over
    every integer, as ``batch.micro_size: auto`` searches over the usable ones only."""
    from toolkit.autobatch import StepProbe, batch_maker, memory_limit, settled_baseline

    data, _ = load_data(cfg, shape_from_config(cfg).vocab_size)
    baseline = settled_baseline(device)
    model = build_model(cfg).to(device)
    probe = StepProbe(model, batch_maker(data, None), device, device.type == "cuda", baseline, cfg.optim.weight_decay)
    limit = memory_limit(cfg, device, baseline)  # as batch.micro_size=auto's
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if probe.peak(mid) <= limit else (low, mid)
    probe.close()
    del model, probe
    return low


def gpu_bench(cfg: Config, micros: list[int], modes: list[str], engines: list[str], warmup: int, steps: int,
              auto_share: int | None, json_path: Path | None = None, plain_mode: str = "compiled") -> dict:
    if plain_mode not in ("eager", "compiled"):
        raise ConfigError(f"--plain={plain_mode}: choose eager or compiled")
    if not set(modes) <= {"eager", "compiled"}:
        raise ConfigError(f"--modes={','.join(modes)}: choose from eager, compiled")
    known = {"ddp", *(f"zero{n}{tail}" for n in (1, 2, 3) for tail in ("", "-offload"))}
    if not set(engines) <= known:
        raise ConfigError(f"--engines={','.join(engines)}: choose from ddp, zero1, zero2, zero3 (zeroN-offload: with the "
                          f"optimizer states in host memory, stepped by DeepSpeed's CPU Adam)")
    device = run_device(cfg)
    if device.type == "cpu" and cfg.train.device != "cpu":
        raise ConfigError("bench gpu needs a CUDA device (or train.device=cpu, to try the bench itself on a CPU)")
    cfg = copy.deepcopy(cfg)
    cfg.batch.global_size = max(micros)
    shape = shape_from_config(cfg)
    model = build_model(cfg)
    n_params = num_params(model)
    per_token = flops_per_token(shape, n_params)
    del model
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name, "bf16") if device.type == "cuda" else None
    result = {"device": device_name, "torch": torch.__version__, "n_params": n_params, "flops_per_token": per_token,
              "peak_flops": peak, "global_size": cfg.batch.global_size, "seq_len": cfg.data.seq_len,
              "warmup_steps": warmup, "steps": steps, "rows": []}
    tmp = Path(tempfile.mkdtemp(prefix="toolkit-bench-gpu-"))

    def save() -> None:
        result["report"] = report(result)
        if json_path is not None:
            json_path.write_text(json.dumps(result, indent=1))

    def add(name: str, micro: int, row: dict, **extra) -> dict:
        row = {"name": name, "micro_size": micro, **extra, **row}
        if "seconds" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
            row["mfu"] = mfu(row["tokens_per_s"], per_token, peak)
        result["rows"].append(row)
        save()
        return row

    try:
        data, _ = load_data(cfg, shape.vocab_size)
        plain = {}
        for micro in micros:
            plain[micro] = add(f"plain {plain_mode}", micro, _attempt(
                lambda m=micro: plain_row(cfg, data, m, warmup, steps, device, plain_mode == "compiled"), device))
        # The DeepSpeed rows last: DeepSpeed sets this process's distributed environment up for itself.
        for engine in sorted(engines, key=lambda e: e != "ddp"):
            stage = None if engine == "ddp" else int(engine.removeprefix("zero").removesuffix("-offload"))
            offload = engine.endswith("-offload")
            for mode in modes:
                for micro in micros:
                    c = _row_cfg(cfg, micro, mode == "compiled", stage, warmup + steps, offload=offload)
                    row = _attempt(lambda c=c, d=tmp / f"{engine}-{mode}-{micro}": toolkit_row(c, warmup, steps, d),
                                   device)
                    base = plain[micro].get("tokens_per_s")
                    label = "1 GPU" if stage is None else f"ZeRO-{stage}" + (" offload" if offload else "")
                    row = add(f"toolkit {mode} {label}", micro, row)
                    if base and "tokens_per_s" in row:
                        row["vs_plain"] = row["tokens_per_s"] / base
                        save()
        # The loss in one piece, at the second micro size, eager: what the chunked loss saves.
        micro = micros[min(1, len(micros) - 1)]
        for chunk in (0, cfg.model.loss_chunk):
            c = _row_cfg(cfg, micro, False, None, warmup + steps, loss_chunk=chunk)
            add(f"toolkit eager, loss_chunk={chunk}", micro,
                _attempt(lambda c=c, d=tmp / f"chunk-{chunk}": toolkit_row(c, warmup, steps, d), device))
        # Host syncs per step, on the compiled 1-GPU toolkit at the same micro size.
        c = _row_cfg(cfg, micro, "compiled" in modes, None, warmup + steps + 4)
        add("toolkit host syncs", micro, _attempt(lambda: toolkit_row(c, warmup, steps, tmp / "syncs", 4), device))
        if auto_share:
            c = _row_cfg(cfg, auto_share, False, None, 2, micro_size="auto")
            c.batch.global_size = auto_share
            row = add("toolkit eager, micro auto", 0, _attempt(lambda: toolkit_row(c, 1, 1, tmp / "auto"), device),
                      share=auto_share)
            found = row.get("auto_micro")
            if found:
                top = found["first_fail"] or found["largest_fit"] + 1
                c.batch.micro_size = found["micro_size"]
                largest = _attempt(lambda: {"largest": largest_fitting(c, device, found["largest_fit"], top)}, device)
                row["largest_fitting"] = largest.get("largest")
                if row["largest_fitting"]:
                    row["auto_vs_largest"] = found["micro_size"] / row["largest_fitting"]
                save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save()
    return result


def report(r: dict) -> str:
    lines = [f"bench gpu: {r['device']}, torch {r['torch']}; GPT model {r['n_params'] / 1e6:.0f}M parameters, "
             f"{r['seq_len']} tokens per sample, global batch {r['global_size']} samples; {r['warmup_steps']} warm-up "
             f"+ {r['steps']} timed steps per row",
             f"{'row':<34} {'micro':>5} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'vs plain':>8}"]
    for row in r["rows"]:
        if row["name"] == "toolkit eager, micro auto" and row.get("auto_micro"):
            a = row["auto_micro"]
            largest = row.get("largest_fitting")
            lines.append(f"auto: micro {a['micro_size']} (accumulation {row.get('accumulation')}) of a per-GPU share of "
                         f"{row.get('share')} samples; "
                         f"largest usable fit {a['largest_fit']}, first failure {a['first_fail']}; largest fitting size "
                         f"{largest} (auto / largest {row.get('auto_vs_largest', float('nan')):.2f}); probe "
                         f"{a.get('seconds', float('nan')):.1f} s, left allocated {a.get('left_behind_gib')} GiB")
            continue
        if row["name"] == "toolkit host syncs":
            lines.append(f"host syncs per toolkit step: {row.get('host_syncs_per_step', 'not measured')}")
            continue
        if "error" in row:
            lines.append(f"{row['name']:<34} {row['micro_size']:>5} {row['error']}")
            continue
        mfu_text = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
        peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
        ratio = f"{row['vs_plain']:.3f}" if row.get("vs_plain") is not None else ""
        lines.append(f"{row['name']:<34} {row['micro_size']:>5} {row['tokens_per_s']:>10,.0f} {mfu_text:>6} {peak:>8} "
                     f"{ratio:>8}")
    return "\n".join(lines)
