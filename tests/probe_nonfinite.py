"""Inject a non-finite loss on one rank at one step: launched by tests/test_faults.py, not collected.

    accelerate launch --config_file launch/cpu.yaml tests/probe_nonfinite.py STEP RANK key=value ...

Builds the toolkit's Trainer, makes the model's summed loss NaN in the first micro-step of optimizer step
STEP (1-based) on rank RANK only, trains as ``train.py`` does, and writes
``<run.dir>/nonfinite-rank<R>.json``: whether this rank's weights changed during step STEP, and the
trainer's skipped-step count. Exits like train.py (3 when the run stops on the non-finite value).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.cli import EXIT_NONFINITE  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.trainer import NonFiniteError, Trainer  # noqa: E402


def main(argv: list[str]) -> int:
    bad_step, bad_rank = int(argv[0]), int(argv[1])
    cfg = load_config(None, argv[2:])
    trainer = Trainer(cfg)
    model = trainer.plain_model
    forward = model.forward

    def poisoned_forward(batch):
        loss, n_targets = forward(batch)
        if trainer.step + 1 == bad_step and trainer.rank == bad_rank and trainer.micro_step == 0:
            return loss * float("nan"), n_targets
        return loss, n_targets

    model.forward = poisoned_forward  # DDP calls module(...), which finds this instance attribute
    record: dict = {"rank": trainer.rank}
    train_step = trainer.train_step

    def observed_train_step():
        if trainer.step + 1 != bad_step:
            return train_step()
        before = [p.detach().clone() for p in model.parameters()]
        try:
            train_step()
        finally:
            record["weights_changed_by_bad_step"] = any(
                not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
            record["skipped_steps"] = trainer.skipped_steps

    trainer.train_step = observed_train_step
    out = cfg.run_dir / f"nonfinite-rank{trainer.rank}.json"
    try:
        trainer.train()
    except NonFiniteError as exc:
        record["stopped"] = str(exc)
        out.write_text(json.dumps(record))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    out.write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
