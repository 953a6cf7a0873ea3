"""``toolkit bench tracking``: the toolkit's loop with W&B tracking and the gradient noise scale on, against
the same loop with both off (``tracking_overhead``; ``toolkit/bench/parity.py`` has the loop it times)."""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from toolkit.batch import make_plan
from toolkit.bench.common import max_rel_diff
from toolkit.bench.parity import WARMUP_STEPS, toolkit_run
from toolkit.config import Config, ConfigError


def tracking_overhead(cfg: Config, steps: int = 30, repeats: int = 3) -> dict:
    """``toolkit bench tracking``: the toolkit's loop with W&B tracking and the gradient noise scale on,
    against the same loop with both off, alternating as ``parity`` does. W&B runs in whatever mode it
    would (offline without an API key; its files go to a temporary run.dir)."""
    if steps < 1 or repeats < 1:
        raise ConfigError(f"--steps={steps} and --repeats={repeats} must be at least 1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench tracking runs one process; start it with `toolkit bench tracking`, not a launcher")
    base = copy.deepcopy(cfg)
    base.train.val_every, base.train.progress, base.train.debug, base.run.record_samples = 0, False, False, False
    variants = {"on": copy.deepcopy(base), "off": copy.deepcopy(base)}
    variants["on"].tracking.wandb, variants["on"].tracking.noise_scale = True, True
    variants["off"].tracking.wandb, variants["off"].tracking.noise_scale = False, False
    if base.batch.micro_size == "auto":
        raise ConfigError("the bench times a fixed micro-batch: set batch.micro_size to a number, not auto")
    plan = make_plan(base.batch.global_size, base.batch.micro_size, 1, base.data.seq_len)
    tokens = steps * plan.tokens_per_step
    speed: dict[str, list[float]] = {"on": [], "off": []}
    weights_of: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="toolkit-bench-tracking-"))
    try:
        for name in ("on", "off"):  # warm-up of each
            toolkit_run(variants[name], min(steps, WARMUP_STEPS), tmp / f"warmup-{name}")
        for r in range(repeats):
            for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
                seconds, _, weights, _ = toolkit_run(variants[name], steps, tmp / f"{name}-{r}")
                speed[name].append(tokens / seconds)
                weights_of[name] = weights
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = statistics.median(speed["on"]) / statistics.median(speed["off"])
    same = max_rel_diff(weights_of["on"], weights_of["off"])[0]
    report = "\n".join([
        f"bench tracking: {base.model.size} model, global {plan.global_size} = micro {plan.micro_size} x accumulation "
        f"{plan.accumulation}, {steps} steps per run, {repeats} repeats, log every {base.train.log_every} steps",
        f"tracking on  (W&B + noise scale) tokens/s per run: {'  '.join(f'{v:,.0f}' for v in speed['on'])}",
        f"tracking off                     tokens/s per run: {'  '.join(f'{v:,.0f}' for v in speed['off'])}",
        f"final weights on vs off: max rel diff {same:.2e} (tracking must not change the training)",
        f"tracking ratio (on / off tokens/s, medians): {ratio:.3f}",
    ])
    return {"on_tokens_per_s": speed["on"], "off_tokens_per_s": speed["off"], "ratio": ratio,
            "weights_max_rel_diff": same, "report": report}
