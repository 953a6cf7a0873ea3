"""Count the gradient all-reduces of a real run: launched by tests/test_allreduce.py, not collected by pytest.

    accelerate launch --config_file launch/cpu.yaml tests/probe_allreduce.py key=value ...

Builds the toolkit's Trainer from the overrides, registers a DDP communication hook on its model that
does DDP's own averaging (all-reduce the bucket, divide by the world size) and records, for every call,
the trainer's step and micro-step and the bucket. Then trains as ``train.py`` does and writes
``<run.dir>/allreduce-rank<R>.json`` with the calls and DDP's own list of bucket sizes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.config import load_config  # noqa: E402
from toolkit.trainer import Trainer  # noqa: E402


def main(argv: list[str]) -> int:
    cfg = load_config(None, argv)
    trainer = Trainer(cfg)
    model = trainer.model
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        print(f"probe: expected a DistributedDataParallel model, got {type(model).__name__}", file=sys.stderr)
        return 1
    world = dist.get_world_size()
    calls: list[dict] = []

    # No annotations: DDP checks them against dist.GradBucket / Future, and `from __future__ import
    # annotations` would turn them into strings that fail that check.
    def recording_allreduce(state, bucket):
        calls.append({
            "step": trainer.step,
            "micro_step": trainer.micro_step,
            "bucket": bucket.index(),
            "is_last": bucket.is_last(),
            "numel": bucket.buffer().numel(),
            "bytes": bucket.buffer().numel() * bucket.buffer().element_size(),
        })
        work = dist.all_reduce(bucket.buffer(), async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0].div_(world))

    model.register_comm_hook(None, recording_allreduce)
    grad_elements = sum(p.numel() for p in model.module.parameters() if p.requires_grad)  # tied: once
    trainer.train()  # ends by destroying the process group; the records are already complete

    # DDP's own account of its buckets (bytes each), to count against: the layout of the first step, and
    # the one it rebuilds after the first backward in the order gradients became ready.
    logging_data = model._get_ddp_logging_data()

    def sizes(key: str) -> list[int]:
        return [int(n) for n in str(logging_data.get(key, "")).split(",") if n.strip()]

    buckets = {"first_step": sizes("bucket_sizes"), "rebuilt": sizes("rebuilt_bucket_sizes")}

    out = Path(cfg.run_dir) / f"allreduce-rank{trainer.rank}.json"
    out.write_text(json.dumps({
        "world_size": world,
        "accumulation": trainer.plan.accumulation,
        "steps": trainer.step,
        "grad_elements": grad_elements,
        "bucket_bytes": buckets,
        "calls": calls,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
