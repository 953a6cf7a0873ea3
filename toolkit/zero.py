"""DeepSpeed ZeRO: its config written from the batch plan, and whole (unsharded) model and optimizer
states for checkpoints and final weights.

Whole states are what ``checkpoint.format=whole`` writes: the fp32 weights and the AdamW moments of every
parameter gathered into exactly what a plain PyTorch AdamW would save (``optimizer.pt``), so that a run can
resume on another number of processes, another stage, or plain DDP, without a conversion step (DeepSpeed's
universal checkpoint needs its ``ds_to_universal`` script run in between). The cost is that rank 0 holds the
whole state in CPU memory while writing it (12 bytes per parameter and the copies of the writers), which is
fine for the models a single node trains; beyond that, ``checkpoint.format=sharded`` writes each rank's own
fragments (toolkit/pieces.py) and resumes as freely.

Gathering and restoring use DeepSpeed's tensor-fragment API (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state`` and their ``set`` twins), which knows where each parameter's slice lives
for every stage. All of these are collectives: every rank must call them, in the same order.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from toolkit.batch import BatchPlan
from toolkit.config import Config, ConfigError

BATCH_FIELDS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def enabled(cfg: Config) -> bool:
    return cfg.deepspeed.stage is not None


def read_user_config(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed.config_file: cannot read {path} as JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config_file: {path} must hold a JSON object")
    return data


def bucket_sizes(hidden: int) -> dict:
    """Communication buffer sizes (in elements) scaled to the model, as Hugging Face's Trainer fills
    DeepSpeed's "auto" values: DeepSpeed's defaults (5e8 elements, 2 GB in fp32) are sized for models of
    billions of parameters, and a bucket larger than the model holds every gradient at once, so ZeRO-2
    would save nothing over ZeRO-1 and stage 0 would hold a second copy of the gradients. Larger values
    (set in deepspeed.config_file) trade memory for fewer, larger messages."""
    block = 12 * hidden * hidden  # the parameters of one transformer block
    return {"reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "stage3_param_persistence_threshold": 10 * hidden,
            # ZeRO-3 keeps a gathered parameter until this many others were used since (1e9 by default:
            # every parameter stays whole from its forward to its backward, and ZeRO-3 saves nothing then).
            "stage3_max_live_parameters": block, "stage3_max_reuse_distance": block}


def deepspeed_config(cfg: Config, plan: BatchPlan, on_cuda: bool, hidden: int) -> dict:
    """The DeepSpeed config dict: the user's file (if any) with the batch fields, the stage, offload and
    clipping written from the run config. A user value that disagrees is refused, naming both."""
    ds = cfg.deepspeed
    user = read_user_config(ds.config_file) if ds.config_file else {}
    origin = ds.config_file
    planned = {"train_batch_size": plan.global_size, "train_micro_batch_size_per_gpu": plan.micro_size,
               "gradient_accumulation_steps": plan.accumulation}
    for key, value in planned.items():
        theirs = user.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise ConfigError(
                f"{origin}: {key}={theirs} disagrees with the batch plan's {value} (global {plan.global_size} = "
                f"micro {plan.micro_size} x accumulation {plan.accumulation} x world {plan.world_size}); "
                f"remove it or set it to \"auto\": the toolkit writes it from batch.*"
            )
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"{origin}: remove the '{key}' section; the toolkit builds AdamW and its LR schedule "
                              f"from optim.* so that DDP and every ZeRO stage train the same way")
    zero = dict(user.get("zero_optimization", {}))
    if zero.get("stage", ds.stage) != ds.stage:
        raise ConfigError(f"{origin}: zero_optimization.stage={zero['stage']} disagrees with deepspeed.stage={ds.stage}")
    theirs_clip = user.get("gradient_clipping", "auto")
    if theirs_clip != "auto" and float(theirs_clip) != cfg.optim.grad_clip:
        raise ConfigError(f"{origin}: gradient_clipping={theirs_clip} disagrees with optim.grad_clip={cfg.optim.grad_clip}")

    zero["stage"] = ds.stage
    for key, value in bucket_sizes(hidden).items():
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    config = {
        **user,
        **planned,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # The toolkit hands DeepSpeed a torch AdamW so that every stage runs the same update as DDP.
        # DeepSpeed refuses a client optimizer with offload unless told that this is on purpose.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": user.get("steps_per_print", 10**9),  # the toolkit logs; DeepSpeed stays quiet
    }
    return config


def cache_numa_topology() -> None:
    """Make DeepSpeed's CPU accelerator look up the NUMA layout once per process instead of at every
    gradient bucket.

    ``CPU_Accelerator.device_count()`` (called by ZeRO-3 for every bucket it reduce-scatters) runs
    ``numactl --hardware`` in a subprocess unless ``LOCAL_SIZE`` is set. Starting a subprocess enters
    ``warnings.catch_warnings()`` (``os.get_exec_path``), which resets every module's record of the
    warnings already shown, so a warning raised at every bucket is printed at every bucket: a 10-step
    ZeRO-3-offload run of the default job on 2 CPU processes printed torch's ``all_gather_into_tensor`` /
    ``reduce_scatter_tensor`` FutureWarnings 3,306 times. Once the layout is cached, Python's default
    filter shows each warning once per process again (and no process is forked per bucket).

    ``LOCAL_SIZE`` (what DeepSpeed's own launcher sets) is not the fix: with ``LOCAL_SIZE`` equal to the
    world size DeepSpeed's shared-memory all-reduce creates a 66 MiB /dev/shm segment per rank that it
    never unlinks. The NUMA layout does not change while a process runs, so the cached answer is the
    same one DeepSpeed would compute each time.
    """
    from deepspeed.utils import numa

    if not hasattr(numa.get_numa_cores, "cache_info"):  # idempotent: several runs in one process
        numa.get_numa_cores = functools.cache(numa.get_numa_cores)
    # Asked now, before DeepSpeed's first collective raises its first warning: the one subprocess left
    # would otherwise reset the record of it at the first gradient bucket, and it would show twice.
    numa.get_numa_cores()


# ------------------------------------------------------------------------------------------ whole states
def uses_fragments(params: list[torch.nn.Parameter]) -> bool:
    """True when DeepSpeed holds the fp32 weights and optimizer states in shards (ZeRO 1-3, or its bf16
    optimizer); False for stage 0 in fp32, where the client AdamW holds them whole on every rank."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params)


def full_model_state(model: torch.nn.Module, keep: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """The whole fp32 state dict (kept on the rank where ``keep``; a collective, every rank calls it) and
    whether all of it is finite (the same answer on every rank). Tied weights appear under each of
    their names, as in ``state_dict()``."""
    from deepspeed.utils import safe_get_full_fp32_param

    whole, finite = {}, True
    for name, p in model.named_parameters(remove_duplicate=False):
        value = safe_get_full_fp32_param(p)
        value = (value if value is not None else p.detach()).to("cpu", torch.float32)
        finite = finite and bool(torch.isfinite(value).all())
        if keep:
            whole[name] = value.clone()
    if keep:  # the buffers a state_dict holds (non-persistent ones, such as rotary tables, are rebuilt by the model)
        persistent = model.state_dict().keys()
        whole.update({name: b.detach().to("cpu").clone() for name, b in model.named_buffers() if name in persistent})
    return whole, finite


def remember_groups(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The AdamW groups as a plain state dict describes them (hyperparameters and parameter indices),
    noted before DeepSpeed replaces each group's parameters with its flat shards."""
    layout, start = [], 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        layout.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + count))})
        start += count
    return layout


def full_optimizer_state(params: list[torch.nn.Parameter], zero_optimizer, layout: list[dict], keep: bool) -> dict | None:
    """A plain ``torch.optim.AdamW.state_dict()`` for ``params`` (the model's parameters in the order of
    the optimizer's groups; ``layout`` from ``remember_groups``), gathered from ZeRO's shards and kept on
    the rank where ``keep`` (a collective: every rank calls it; the others get None)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = zero_optimizer.optimizer  # the torch AdamW that DeepSpeed steps on its flat shards
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    state = {}
    if steps:  # no state before the first step, as in torch
        relink_fragments(zero_optimizer)
        step = torch.as_tensor(steps[0]).detach().to("cpu", torch.float32)  # (DeepSpeed's CPU Adam counts in an int)
        for index, p in enumerate(params):
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ADAM_STATES}
            if keep:
                state[index] = {"step": step.clone(), **{k: v.to("cpu", torch.float32).clone() for k, v in moments.items()}}
    if not keep:
        return None
    lr = inner.param_groups[0]["lr"]
    return {"state": state, "param_groups": [{**group, "lr": lr} for group in layout]}


def relink_fragments(zero_optimizer) -> None:
    """ZeRO 1-2 (and DeepSpeed's bf16 optimizer) link each parameter's view of the optimizer states once,
    right after the first group's first step; the groups stepped later (here: AdamW's no-decay group)
    have no states yet at that moment and stay unlinked (DeepSpeed 0.19.8). Link them all again."""
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()


def load_full_optimizer_state(params: list[torch.nn.Parameter], zero_optimizer, saved: dict) -> None:
    """Put a plain AdamW state dict (saved in any mode, on any number of processes) into ZeRO's shards.

    DeepSpeed creates the optimizer states lazily at the first step, so they are created here first,
    as torch's AdamW would (zeros and the step count), and DeepSpeed links its fragments to them."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if not saved["state"]:
        return  # saved before any step: nothing to restore
    create_optimizer_states(zero_optimizer, next(iter(saved["state"].values()))["step"])
    for index, p in enumerate(params):
        for key in ADAM_STATES:
            safe_set_full_optimizer_state(p, saved["state"][index][key], key)


def create_optimizer_states(zero_optimizer, step: torch.Tensor) -> None:
    """Create the states of the optimizer DeepSpeed steps on its flat shards, as torch's AdamW would at its first
    step (zeros and the step count ``step``), and link DeepSpeed's fragments to them, so that a checkpoint's
    moments can be put in (DeepSpeed creates them lazily, at the first step)."""
    inner = zero_optimizer.optimizer
    step = step.detach().to("cpu", torch.float32)
    int_step = type(inner).__name__ == "DeepSpeedCPUAdam"  # it counts steps in a Python int, torch's AdamW in a tensor
    for group in inner.param_groups:
        # torch's fused and capturable AdamW read the step count on the parameters' device, the others on the CPU.
        on_device = group.get("fused") or group.get("capturable")
        for flat in group["params"]:
            count = int(step.item()) if int_step else step.to(flat.device, copy=True) if on_device else step.clone()
            inner.state[flat] = {"step": count,
                                 **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in ADAM_STATES}}
    relink_fragments(zero_optimizer)
