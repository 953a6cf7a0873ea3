"""A user script for the ``batch.micro_size: auto`` tests: train.py's run, where each rank may get its own
memory limit (``AUTO_LIMITS_GIB``: one number per rank), or, with ``AUTO_SWEEP=1,2,...``, no run: the peak of
one probe step at each of those sizes, measured as the probe measures it, written to ``AUTO_SWEEP_OUT.rank<RANK>``."""

import json
import os
import sys

import torch

from toolkit import Trainer, config_from_argv, run


def sweep(cfg, sizes: list[int]) -> dict[int, int]:
    from toolkit.autobatch import StepProbe, batch_maker, settled_baseline
    from toolkit.data import load_data
    from toolkit.engine import init_process_group
    from toolkit.model import build_model, shape_from_config

    train_data, _ = load_data(cfg, shape_from_config(cfg).vocab_size)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # as the trainer does before its baseline
    cpu = torch.device("cpu")
    init_process_group(cpu)  # as the trainer does before its baseline, under a launcher (and its first collective)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(torch.ones(1))
    baseline = settled_baseline(cpu)
    model = build_model(cfg)
    ddp_buckets = 4 * sum(p.numel() for p in model.parameters()) if torch.distributed.is_initialized() else 0
    probe = StepProbe(model, batch_maker(train_data, None), cpu, False, baseline, extra_bytes=ddp_buckets)
    return {size: probe.peak(size) for size in sizes}


def main() -> None:
    cfg = config_from_argv(sys.argv[1:])
    limits = os.environ.get("AUTO_LIMITS_GIB")
    if limits:
        cfg.batch.memory_limit_gib = float(limits.split(",")[int(os.environ.get("RANK", "0"))])
    if os.environ.get("AUTO_SWEEP"):
        peaks = sweep(cfg, [int(s) for s in os.environ["AUTO_SWEEP"].split(",")])
        with open(f"{os.environ['AUTO_SWEEP_OUT']}.rank{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(peaks, f)
        return
    Trainer(cfg).train()


if __name__ == "__main__":
    sys.exit(run(main))
