"""Typed run configuration: dataclasses with a docstring under every field.

A run is configured by a YAML file (``--config FILE``, default ``configs/tiny.yaml``) merged over
these defaults, then by dotted overrides from the command line (``batch.global_size=64``).
OmegaConf does the parsing, merging and type checking; this module turns its exceptions into one
readable line (``ConfigError``) and adds the checks that types alone cannot express.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


class ConfigError(ValueError):
    """A configuration the toolkit refuses. Its message is one line naming the key and what is valid."""


@dataclass
class RunConfig:
    name: str = "tiny"
    """Name of the run; the default run directory is ``runs/<name>``."""

    dir: str | None = None
    """Run directory for config.yaml, metrics.jsonl, summary.json and final/. Default: ``runs/<run.name>``."""

    record_samples: bool = False
    """Write ``samples-rank<R>.jsonl``: the dataset indices each rank computed at each optimizer step.
    Used by the data-order tests; off by default because it writes a line per step per rank."""


@dataclass
class RampConfig:
    start: int | None = None
    """Global batch size of the first step; null (the default): no ramp. In the spirit of Megatron-LM's
    ``--rampup-batch-size START INCREMENT SAMPLES``: the batch grows from ``start`` by ``increment`` in even
    steps of consumed samples, reaching batch.global_size after ``samples`` samples. Every size must be a
    multiple of batch.micro_size x world size (the accumulation follows the ramp)."""

    increment: int | None = None
    """Samples added to the global batch at each stage of the ramp; must divide global_size - start."""

    samples: int = 0
    """Training samples over which the batch ramps up to batch.global_size."""


@dataclass
class BatchConfig:
    global_size: int | str = 32
    """Samples per optimizer step, summed over all processes and micro-steps. The number that shapes the
    optimisation; everything below is a hardware detail derived from it. ``full``: the whole training split
    every step (full-batch gradient descent, through accumulation)."""

    micro_size: int | str | None = None
    """Samples per process per forward/backward. Unset: global_size / world_size (no accumulation; under a
    ramp the largest size that divides every ramp step). The accumulation steps are global_size /
    (micro_size * world_size) and must be a whole number (``full`` is cut into near-equal micro-batches of at
    most micro_size when the split's size does not divide). ``auto``: the largest size that fits in memory,
    measured by real steps before training (``toolkit/autobatch.py``), lowered to one that divides each
    process's share of the global batch; the global batch stays as stated."""

    memory_limit_gib: float | None = None
    """With micro_size=auto: the memory (GiB) one process's model may use per device: the measured peak above
    what the process held before the model was built. Unset: the device's memory (on CPU, the memory available
    when the run starts, shared by the machine's processes)."""

    memory_margin: float = 0.05
    """With micro_size=auto: the fraction of the memory limit kept free (the allocator's fragmentation, a longer
    validation batch ...). 0 to 0.9."""

    ramp: RampConfig = field(default_factory=RampConfig)
    """A batch-size warmup (see batch.ramp.start)."""


@dataclass
class DataConfig:
    source: str = "stdlib"
    """Where samples come from: ``stdlib`` (this Python's standard-library source, as bytes, vocabulary
    256), ``tokens`` (a nanoGPT-style ``.bin`` of uint16 token ids at ``data.path``) or ``synthetic``
    (random tokens, for benchmarks)."""

    path: str | None = None
    """Token file for ``source: tokens`` (a flat array of uint16 ids, memory-mapped)."""

    val_path: str | None = None
    """Validation token file for ``source: tokens``. Unset: the last ``val_fraction`` of ``path``."""

    seq_len: int = 128
    """Tokens per sample fed to the model (each sample holds seq_len + 1 tokens: inputs and shifted targets)."""

    pack: bool = True
    """True: cut one contiguous token stream into seq_len windows (every target is valid).
    False: one document chunk per sample, padded; padding is excluded from the loss, so samples carry
    different numbers of valid targets (only for ``stdlib`` and ``synthetic``)."""

    val_fraction: float = 0.05
    """Share of files (stdlib) or tokens (tokens, synthetic) held out for validation, in (0, 0.5]."""

    max_bytes: int = 4_000_000
    """stdlib: read files in sorted order until this many bytes; bounds start-up time and memory."""

    synthetic_tokens: int = 1_000_000
    """synthetic: length of the random token stream."""

    workers: int = 0
    """DataLoader worker processes per rank that load the next micro-batches while the model computes. 0
    loads in the training process (enough for the built-in in-memory corpora); raise it for data that takes
    time to read or decode. The data order does not depend on it, and a resume stays exact."""

    pin_memory: bool = True
    """On CUDA, load batches into pinned host memory so that the copy to the GPU is asynchronous."""

    prefetch_factor: int = 2
    """With data.workers > 0: micro-batches each worker loads ahead."""


@dataclass
class ModelConfig:
    source: str = "builtin"
    """``builtin``: the toolkit's GPT (the fields below). ``hf``: a Hugging Face ``transformers`` causal LM
    from ``model.hf_config``, wrapped to the toolkit's model contract. (A model passed to ``Trainer(cfg,
    model=...)`` in Python replaces both.)"""

    hf_config: str | None = None
    """With source=hf: a ``transformers`` model type (``gpt2``, ``llama`` ...: fresh weights from its default
    config, no download) or a local folder with a ``config.json`` (and weights, with hf_pretrained)."""

    hf_pretrained: bool = False
    """With source=hf and a folder in hf_config: start from the folder's weights (``from_pretrained``)
    instead of fresh ones drawn from the seed (``from_config``)."""

    hf_overrides: dict[str, Any] = field(default_factory=dict)
    """With source=hf: config attributes set over hf_config's (``model.hf_overrides.n_layer=2``). The
    vocabulary follows the data unless set here."""

    size: str = "tiny"
    """Preset: ``nano`` (0.1M parameters, for tests), ``tiny`` (0.8M, the CPU default), ``small`` (3.2M) or
    ``gpt2-small`` (124M).
    The fields below override the preset when set."""

    n_layer: int | None = None
    """Transformer blocks. Unset: from the preset."""

    n_head: int | None = None
    """Attention heads per block. Unset: from the preset."""

    n_embd: int | None = None
    """Width of the residual stream; must be divisible by n_head. Unset: from the preset."""

    vocab_size: int | None = None
    """Vocabulary size. Unset: 256 for stdlib bytes, 50304 for token files and synthetic data."""

    dropout: float = 0.0
    """Dropout probability. Zero by default: dropout draws per-rank random numbers, so the same global
    batch split differently would not give the same gradient."""

    compile: bool = False
    """Wrap the model in ``torch.compile`` (worth it on GPU, slow to start on CPU)."""

    loss_chunk: int = 4096
    """Tokens per chunk of the built-in GPT's output layer and cross-entropy: the logits of at most this many
    tokens exist at a time (``toolkit/loss.py``), instead of the whole micro-batch's, which is what limits the
    micro-batch of a model with a large vocabulary. 0: in one piece (``F.cross_entropy`` over all logits)."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate (AdamW), reached at the end of warmup."""

    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""

    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to biases, norms)."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    warmup_samples: int = 1600
    """Linear warmup length in samples (not steps), so changing the GPU count changes nothing."""

    decay_samples: int | None = None
    """Cosine decay ends after this many samples. Unset: the samples of train.steps steps."""

    schedule: str = "cosine"
    """``cosine``: warmup, then cosine decay to min_lr. ``constant``: warmup, then the peak LR to the end
    (what a batch-size study uses, so that steps-to-target compares like with like at every batch size)."""

    lr_scaling: str = "none"
    """How the peak LR (and min_lr) follows the global batch: ``none``, ``linear`` (lr x B / B_ref, Goyal et
    al. 2017, for SGD) or ``sqrt`` (lr x sqrt(B / B_ref), Malladi et al. 2022, for Adam), where B_ref is
    optim.reference_batch. Under a ramp, B is batch.global_size (the size after the ramp)."""

    reference_batch: int | None = None
    """The global batch (samples) at which optim.lr was tuned; required by lr_scaling linear or sqrt."""


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps to run."""

    log_every: int = 10
    """Optimizer steps between log lines (the loss is read back from the device only then)."""

    val_every: int = 100
    """Optimizer steps between validations; 0 validates only at the end."""

    val_batches: int = 4
    """Global batches of the validation split per validation."""

    device: str = "auto"
    """``auto`` (CUDA if present, else CPU with gloo), ``cuda`` or ``cpu``."""

    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``fp32`` or ``bf16``."""

    debug: bool = False
    """Single-device debug mode: one process, deterministic algorithms, every loss and gradient checked
    for NaN/Inf (stops at the first with step, micro-step and parameter). Set by ``train.py --debug``."""

    on_nonfinite: str = "skip"
    """What a step whose gradient norm is NaN/Inf does: ``skip`` drops the whole step on every rank (no
    optimizer update; counted and logged as skipped_steps), ``stop`` exits with code 3 naming the step.
    The gradient is all-reduced before the check, so every rank sees the same value and decides alike."""

    max_skipped: int = 5
    """With on_nonfinite=skip: stop (exit 3) after this many skipped steps in a row."""

    stop_val_loss: float | None = None
    """Stop after the first validation whose loss is at or below this value (a batch-size study's target):
    the run finishes there as if train.steps had been reached (summary.json says stopped_at_target)."""

    progress: bool = True
    """Show a tqdm progress bar on the main process when stderr is a terminal (log lines are printed
    either way)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Optimizer steps between checkpoints; 0 writes one only at the end. The end of a run always writes one."""

    keep: int = 2
    """How many of the newest checkpoints to keep in ``run.dir/checkpoints``."""

    format: str = "auto"
    """``whole``: rank 0 gathers the model and optimizer states and writes them alone (model.safetensors and
    optimizer.pt, readable by plain PyTorch). ``sharded``: every rank writes the part it holds, in parallel, and
    reads back only the part it needs; nothing is gathered on one rank (``toolkit checkpoint convert`` makes a
    whole copy). ``auto``: sharded with several processes and a state of 1 GiB or more (about 90M parameters),
    whole below. Either format resumes on any number of processes and any ZeRO stage."""

    async_save: bool = False
    """Write checkpoints in the background while training goes on (the states are first copied on the CPU); the
    next checkpoint, a stop and the end of the run wait for it. A kill during the write leaves the previous
    checkpoint as the newest valid one. (``async`` itself is a Python keyword, so the key is ``async_save``.)"""

    resume: str = "auto"
    """``auto``: continue from the newest valid checkpoint of run.dir, if any. ``never``: start fresh (refused
    when run.dir already has checkpoints, so nothing is overwritten by mistake). A path: resume from
    that checkpoint folder."""


@dataclass
class TrackingConfig:
    wandb: bool = True
    """Log to Weights & Biases through Accelerate's tracker (main process only). Without an API key, or
    with WANDB_MODE=offline, the run is recorded offline under run.dir/wandb (upload it later with the
    ``wandb sync`` command the run prints); with a key but no network it falls back to offline at once."""

    project: str = "batchkit"
    """W&B project."""

    group: str | None = None
    """W&B group. Default: ``<model.size>-<data.source>-seq<data.seq_len>``, so that the runs of one
    scaling study (same model and data, different batch sizes and GPU counts) are grouped together."""

    tags: list[str] = field(default_factory=list)
    """W&B tags."""

    noise_scale: bool = True
    """Estimate the gradient noise scale B_simple every step from the gradient norms the step already
    has (McCandlish et al. 2018, appendix A). Needs two batch sizes: a micro-batch on one rank and the
    global batch, so more than one micro-batch per step overall (accumulation > 1 or world size > 1)."""

    noise_scale_decay: float = 0.95
    """EMA decay of the noise scale's two estimates, per step (0.95: about the last 20 steps count)."""


@dataclass
class DeepSpeedConfig:
    stage: int | None = None
    """ZeRO stage. Unset (null): plain DDP through Accelerate. 0, 1, 2 or 3: DeepSpeed with that stage
    (0: DeepSpeed's data parallelism without sharding; 1: optimizer states sharded over the processes;
    2: also gradients; 3: also parameters). When unset and the run is started with a DeepSpeed launch
    file (``launch/zero*.yaml``), the launch file's stage is taken."""

    offload_optimizer: bool = False
    """ZeRO 1-3: keep the optimizer states and fp32 master weights in CPU memory and run the optimizer
    step there (ZeRO-Offload). Saves device memory, costs host-device traffic every step."""

    offload_params: bool = False
    """ZeRO-3 only: keep the parameters in CPU memory between uses (ZeRO-Infinity's CPU offload)."""

    config_file: str | None = None
    """A DeepSpeed JSON to start from (communication buckets, overlap, ...). The toolkit writes the batch
    fields (train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps) from the
    batch plan; the file may leave them out or set them to "auto", and a value that disagrees with the
    plan is refused. It may not define an optimizer or scheduler (they come from ``optim``)."""


@dataclass
class Config:
    seed: int = 1337
    """Seeds model initialisation and the data order (together with the epoch)."""

    run: RunConfig = field(default_factory=RunConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name


CHOICES = {
    "data.source": ("stdlib", "tokens", "synthetic"),
    "model.size": ("nano", "tiny", "small", "gpt2-small"),
    "model.source": ("builtin", "hf"),
    "train.device": ("auto", "cuda", "cpu"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.on_nonfinite": ("skip", "stop"),
    "checkpoint.format": ("auto", "whole", "sharded"),
    "optim.schedule": ("cosine", "constant"),
    "optim.lr_scaling": ("none", "linear", "sqrt"),
}


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_class(dotted: str):
    """The dataclass that holds the key ``dotted`` (``batch.foo`` -> BatchConfig), or None."""
    cls = Config
    for part in dotted.split(".")[:-1]:
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names or not dataclasses.is_dataclass(names[part].default_factory):
            return None
        cls = names[part].default_factory
    return cls


def _one_line(exc: OmegaConfBaseException, origin: str, fallback_key: str = "?") -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or fallback_key
    if isinstance(exc, ConfigKeyError):
        cls = _section_class(key)
        valid = ", ".join(_field_names(cls)) if cls else ", ".join(_field_names(Config))
        return ConfigError(f"unknown config key '{key}' in {origin}; valid keys here: {valid}")
    first = str(exc).splitlines()[0]
    return ConfigError(f"bad value for '{key}' in {origin}: {first}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, type-checked, then validated. Raises ConfigError."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass --config FILE with a YAML file from configs/)")
    schema = OmegaConf.structured(Config)
    try:
        from_file = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several types
        raise ConfigError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    # A run's own config.yaml carries the batch plan it ran with; the plan is derived (and re-derived
    # for the current world size), so it is dropped here rather than refused as an unknown key.
    if isinstance(from_file, DictConfig) and "plan" in from_file:
        from_file.pop("plan")
    try:
        merged = OmegaConf.merge(schema, from_file)
    except OmegaConfBaseException as exc:
        raise _one_line(exc, str(path)) from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. batch.global_size=64)")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _one_line(exc, "the command line overrides", item.split("=", 1)[0]) from None
    cfg: Config = OmegaConf.to_object(merged)
    apply_deepspeed_launch(cfg, os.environ)
    validate(cfg)
    return cfg


def apply_deepspeed_launch(cfg: Config, env) -> None:
    """Take the DeepSpeed settings of an Accelerate launch file (``accelerate launch --config_file
    launch/zero2.yaml`` passes them as ACCELERATE_DEEPSPEED_* variables) where the run config leaves them
    unset; a run config that says otherwise is refused, naming both values, rather than silently overruled."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    ds = cfg.deepspeed
    launched_stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # Accelerate's own default is 2
    if ds.stage is None:
        ds.stage = launched_stage
    elif ds.stage != launched_stage:
        raise ConfigError(f"deepspeed.stage={ds.stage} but the launch file says zero_stage: {launched_stage}; "
                          f"drop one of them or make them agree")
    for key, variable in (("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE"),
                          ("offload_params", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")):
        device = env.get(variable, "none").lower()
        _require(device in ("none", "cpu"), f"the launch file's {variable[len('ACCELERATE_DEEPSPEED_'):].lower()}: "
                                            f"{device} is not supported; use none or cpu")
        if device == "cpu":
            setattr(ds, key, True)
    launched_clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "none").lower()
    if launched_clip not in ("none", "auto") and float(launched_clip) != cfg.optim.grad_clip:
        raise ConfigError(f"the launch file's gradient_clipping: {launched_clip} disagrees with optim.grad_clip="
                          f"{cfg.optim.grad_clip}; remove it from the launch file or set optim.grad_clip")
    launched_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if launched_file.lower() != "none":
        _require(ds.config_file in (None, launched_file),
                 f"deepspeed.config_file={ds.config_file} but the launch file names {launched_file}; drop one of them")
        ds.config_file = launched_file


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks that types cannot express. Batch divisibility is checked by the batch plan."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _require(value in choices, f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    _require(cfg.train.steps > 0, f"train.steps={cfg.train.steps} must be a positive number of optimizer steps")
    _require(cfg.train.log_every > 0, f"train.log_every={cfg.train.log_every} must be >= 1")
    _require(cfg.train.val_every >= 0, f"train.val_every={cfg.train.val_every} must be >= 0 (0: only at the end)")
    _require(cfg.train.max_skipped >= 1, f"train.max_skipped={cfg.train.max_skipped} must be >= 1")
    _require(cfg.train.val_batches > 0, f"train.val_batches={cfg.train.val_batches} must be >= 1")
    size = cfg.batch.global_size
    _require(size == "full" or (isinstance(size, int) and size > 0),
             f"batch.global_size={size} must be a positive number of samples, or full (the whole training split)")
    ramp = cfg.batch.ramp
    _require(ramp.start is None or (ramp.increment is not None and ramp.samples > 0),
             f"batch.ramp.start={ramp.start} needs batch.ramp.increment and batch.ramp.samples (> 0) too")
    # The ramp against global_size, micro_size and the world size is checked by toolkit/batch.py.
    _require(ramp.start is None or cfg.deepspeed.stage is None,
             "batch.ramp is not supported with DeepSpeed yet (it fixes the accumulation steps when it starts); "
             "use plain DDP (deepspeed.stage=null) for a batch-size ramp")
    o = cfg.optim
    _require(o.lr_scaling == "none" or (o.reference_batch is not None and o.reference_batch > 0),
             f"optim.lr_scaling={o.lr_scaling} needs optim.reference_batch: the global batch at which optim.lr was tuned")
    micro = cfg.batch.micro_size
    _require(micro is None or micro == "auto" or (isinstance(micro, int) and micro > 0),
             f"batch.micro_size={micro} must be a positive number of samples, or auto (the largest that fits)")
    limit = cfg.batch.memory_limit_gib
    _require(limit is None or limit > 0, f"batch.memory_limit_gib={limit} must be a positive number of GiB")
    _require(0 <= cfg.batch.memory_margin <= 0.9, f"batch.memory_margin={cfg.batch.memory_margin} must be in [0, 0.9]")
    # micro_size against global_size and the world size is checked by the batch plan (toolkit/batch.py).
    _require(cfg.data.seq_len > 1, f"data.seq_len={cfg.data.seq_len} must be at least 2")
    _require(0 < cfg.data.val_fraction <= 0.5, f"data.val_fraction={cfg.data.val_fraction} must be in (0, 0.5]")
    _require(cfg.data.max_bytes > 0, f"data.max_bytes={cfg.data.max_bytes} must be positive")
    _require(
        cfg.data.synthetic_tokens >= 16,
        f"data.synthetic_tokens={cfg.data.synthetic_tokens} must be at least 16 (it is the synthetic stream's length)",
    )
    if cfg.data.source == "tokens":
        _require(cfg.data.path is not None, "data.path is required with data.source=tokens (a .bin of uint16 token ids)")
        _require(Path(cfg.data.path).is_file(), f"data.path: file not found: {cfg.data.path}")
        _require(
            cfg.data.val_path is None or Path(cfg.data.val_path).is_file(),
            f"data.val_path: file not found: {cfg.data.val_path}",
        )
        _require(cfg.data.pack, "data.pack=false needs document boundaries; use it with data.source=stdlib or synthetic")
    else:
        for key in ("path", "val_path"):
            value = getattr(cfg.data, key)
            _require(value is None, f"data.{key}={value} is only read with data.source=tokens (data.source={cfg.data.source})")
    _require(cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be >= 0 (0: load in the training process)")
    _require(cfg.data.prefetch_factor >= 1, f"data.prefetch_factor={cfg.data.prefetch_factor} must be >= 1")
    m = cfg.model
    _require(m.source != "hf" or m.hf_config, "model.source=hf needs model.hf_config: a transformers model type "
             "(e.g. gpt2) or a local folder with a config.json")
    _require(not m.hf_pretrained or (m.hf_config and Path(m.hf_config).is_dir()),
             f"model.hf_pretrained=true needs model.hf_config to be a local folder with weights (got {m.hf_config})")
    _require(m.source == "hf" or (m.hf_config is None and not m.hf_overrides and not m.hf_pretrained),
             "model.hf_config, model.hf_overrides and model.hf_pretrained are only read with model.source=hf")
    _require(0 <= cfg.model.dropout < 1, f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    _require(cfg.model.loss_chunk >= 0, f"model.loss_chunk={cfg.model.loss_chunk} must be a number of tokens >= 0 "
             f"(0: the loss in one piece)")
    for name in ("n_layer", "n_head", "n_embd", "vocab_size"):
        value = getattr(cfg.model, name)
        _require(value is None or value > 0, f"model.{name}={value} must be positive")
    _require(cfg.checkpoint.every_steps >= 0, f"checkpoint.every_steps={cfg.checkpoint.every_steps} must be >= 0")
    _require(cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1")
    resume = cfg.checkpoint.resume
    _require(
        resume in ("auto", "never") or Path(resume).is_dir(),
        f"checkpoint.resume={resume!r}: choose auto, never, or the path of a checkpoint folder (step-NNNNNNNN)",
    )
    _require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive")
    _require(0 <= cfg.optim.min_lr <= cfg.optim.lr, f"optim.min_lr={cfg.optim.min_lr} must be in [0, optim.lr]")
    for key in ("beta1", "beta2"):
        value = getattr(cfg.optim, key)
        _require(0 <= value < 1, f"optim.{key}={value} must be in [0, 1)")
    _require(cfg.optim.eps > 0, f"optim.eps={cfg.optim.eps} must be positive")
    _require(cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay} must be >= 0")
    _require(cfg.optim.warmup_samples >= 0, f"optim.warmup_samples={cfg.optim.warmup_samples} must be >= 0")
    _require(cfg.optim.grad_clip >= 0, f"optim.grad_clip={cfg.optim.grad_clip} must be >= 0 (0 disables clipping)")
    _require(
        cfg.optim.decay_samples is None or cfg.optim.decay_samples > 0,
        f"optim.decay_samples={cfg.optim.decay_samples} must be positive",
    )
    _require(0 <= cfg.tracking.noise_scale_decay < 1,
             f"tracking.noise_scale_decay={cfg.tracking.noise_scale_decay} must be in [0, 1)")
    ds = cfg.deepspeed
    _require(ds.stage in (None, 0, 1, 2, 3), f"deepspeed.stage={ds.stage} is not valid; choose 0, 1, 2, 3 or null (plain DDP)")
    _require(not ds.offload_optimizer or (ds.stage or 0) >= 1,
             f"deepspeed.offload_optimizer=true needs ZeRO stage 1, 2 or 3 (deepspeed.stage={ds.stage})")
    _require(not ds.offload_params or ds.stage == 3,
             f"deepspeed.offload_params=true needs deepspeed.stage=3 (deepspeed.stage={ds.stage})")
    _require(ds.config_file is None or Path(ds.config_file).is_file(),
             f"deepspeed.config_file: file not found: {ds.config_file}")
    _require(ds.config_file is None or ds.stage is not None,
             "deepspeed.config_file is only read with DeepSpeed; set deepspeed.stage (0-3) too")


def to_yaml(cfg: Config, extra: dict | None = None) -> str:
    """The resolved config as YAML, with extra top-level sections (the batch plan) appended."""
    data = dataclasses.asdict(cfg)
    if extra:
        data.update(extra)
    return OmegaConf.to_yaml(OmegaConf.create(data))
