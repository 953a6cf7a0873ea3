"""batchkit: state the global batch once; train it on one CPU, one GPU, N GPUs or a Slurm cluster with the same math.

The library API (see README, "Your own model and data")::

    from toolkit import Trainer, config_from_argv, run

    def main():
        cfg = config_from_argv(sys.argv[1:])   # [--config FILE] key=value ..., as train.py reads them
        return Trainer(cfg, model=MyModel(), train_data=train_set, val_data=val_set).train()

    sys.exit(run(main))   # train.py's exit codes: 0 done, 2 bad config, 3 non-finite, 4 disk full, 75 preempted

The names are imported on first use, so that ``toolkit`` commands that never train start quickly.
"""

__all__ = ["Trainer", "load_config", "config_from_argv", "run", "HFCausalLM"]


def __getattr__(name: str):
    if name == "Trainer":
        from toolkit.trainer import Trainer

        return Trainer
    if name == "load_config":
        from toolkit.config import load_config

        return load_config
    if name in ("run", "config_from_argv"):
        from toolkit import cli

        return getattr(cli, name)
    if name == "HFCausalLM":
        from toolkit.hf import HFCausalLM

        return HFCausalLM
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
