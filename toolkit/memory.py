"""Memory per device: predicted from the ZeRO paper's accounting, and measured while training.

Prediction (Rajbhandari et al. 2020, section 3 and figure 1). Training with Adam holds, per parameter:
the parameters (``P`` bytes each: 2 in bf16, 4 in fp32), their gradients (``P`` bytes) and the optimizer
states ``K``: an fp32 master copy, momentum and variance (4 + 4 + 4 = 12 bytes). That is the paper's
2Ψ + 2Ψ + 12Ψ in mixed precision. Where the parameters themselves are the fp32 master (plain fp32
training, DDP or DeepSpeed stage 0) there is no separate copy and K = 8; DeepSpeed's ZeRO 1-3 keep
an fp32 copy of their shard even in fp32, so K = 12 there. ZeRO shards over the N data-parallel ranks:

    stage 0 / DDP:  P + P + K        stage 2:  P + (P + K) / N
    stage 1:        P + P + K / N    stage 3:  (P + P + K) / N

Two buffers come on top, both a flat copy of the gradients used to all-reduce them: DDP's buckets (from
2 processes on), and DeepSpeed stage 0's, which flattens up to 5e8 elements at once (a constant in
DeepSpeed, not configurable). ZeRO 1-3 reduce in buckets that the toolkit sizes to the model (hidden²
elements, see ``zero.bucket_sizes``), small enough to leave out. Optimizer offload moves K (and for
stage 2-3 the fp32 gradient shard) into host memory; parameter offload (stage 3) moves P / N too.

Activations of the built-in GPT, per token of the micro-batch, saved for the backward pass: per layer
the two LayerNorm inputs and outputs (4h), q, k and v (3h), the attention output (h) and the MLP's
hidden layer before and after GELU (8h), 16h in all; then the final LayerNorm (2h), and the logits and
their log-softmax (2V), or with the chunked loss (``model.loss_chunk``) one chunk's logits and the loss's
gradients held for the backward pass (see ``activation_bytes``). A rough count: the allocator, temporaries of the backward pass and the
framework's own workspace come on top.

Measured: on CUDA the allocator's peak (``torch.cuda.max_memory_allocated``); on CPU the process's peak
resident set (VmHWM), reset at each step through ``/proc/self/clear_refs`` so that start-up (imports,
building and flattening the model) does not count; both minus what was in use before the model was
built. On CPU the resident set also holds memory that glibc's allocator keeps after a tensor is freed;
``MALLOC_MMAP_THRESHOLD_=65536`` in the environment makes it return large blocks at once (the memory
benchmark and test set it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 1024**3


@dataclass
class MemoryPlan:
    """Predicted bytes per device (and in host memory, for what is offloaded)."""

    mode: str
    params: float
    grads: float
    optimizer: float
    buffers: float  # flat copies of the gradients for the all-reduce (DDP's buckets, DeepSpeed stage 0's)
    activations: float
    host: float  # offloaded states, in host memory

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations

    def summary(self) -> str:
        """One line whose terms add up to the total (GiB)."""
        line = (f"{self.total / GIB:.3f} GiB = {self.model_states / GIB:.3f} model states + "
                f"{self.buffers / GIB:.3f} all-reduce buffers + {self.activations / GIB:.3f} activations")
        return line + (f"; {self.host / GIB:.3f} GiB offloaded to host memory" if self.host else "")

    def as_dict(self) -> dict:
        return {"mode": self.mode, "params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "model_states": self.model_states, "buffers": self.buffers, "activations": self.activations,
                "host": self.host, "total": self.total}


def mode_name(stage: int | None, offload_optimizer: bool = False, offload_params: bool = False) -> str:
    name = "DDP" if stage is None else f"ZeRO-{stage}"
    if offload_optimizer:
        name += " +offload opt"
    if offload_params:
        name += " +offload params"
    return name


def activation_bytes(micro_size: int, seq_len: int, n_layer: int, n_embd: int, vocab_size: int,
                     bytes_per_value: int, loss_chunk: int = 0) -> float:
    """With ``loss_chunk`` (``toolkit/loss.py``) the logits of only one chunk of tokens exist at a time (fp32, and
    their gradient in their place); the loss holds the gradients of the hidden states (one more h per token) and
    of the output weight (vocabulary x width, fp32) from the forward to the backward pass."""
    tokens = micro_size * seq_len
    if loss_chunk <= 0:
        per_token = n_layer * 16 * n_embd + 2 * n_embd + 2 * vocab_size
        return float(tokens * per_token * bytes_per_value)
    per_token = n_layer * 16 * n_embd + 3 * n_embd
    return float(tokens * per_token * bytes_per_value + 4 * (min(tokens, loss_chunk) + n_embd) * vocab_size)


def predict(n_params: int, world_size: int, stage: int | None, *, bf16: bool, activations: float = 0.0,
            offload_optimizer: bool = False, offload_params: bool = False) -> MemoryPlan:
    """Per-device bytes for ``n_params`` trainable parameters (all of them, embeddings included)."""
    psi, n = float(n_params), world_size
    p = 2 if bf16 else 4
    # Mixed precision keeps an fp32 master copy; so does DeepSpeed's ZeRO 1-3 (of its shard) even in
    # fp32. DDP's AdamW in bf16 autocast keeps fp32 parameters, which are their own master copy.
    if stage is None:
        p = 4  # Accelerate's bf16 is autocast: parameters, gradients and AdamW stay fp32
        k = 8
    else:
        k = 12 if (bf16 or stage >= 1) else 8
    params, grads, optimizer, buffers = p * psi, p * psi, k * psi, 0.0
    if stage is None and n > 1:
        buffers = p * psi  # DDP's bucket copy of the gradients
    if stage == 0 and n > 1:
        buffers = p * min(psi, 5e8)  # DeepSpeed's flat all-reduce buffer (MEMORY_OPT_ALLREDUCE_SIZE elements)
    if stage is not None and stage >= 1:
        optimizer /= n
    if stage is not None and stage >= 2:
        grads /= n
    if stage == 3:
        params /= n
    host = 0.0
    if offload_optimizer:
        host += optimizer
        optimizer = 0.0
        if stage is not None and stage >= 2:
            host += 4 * psi / n  # the fp32 gradient shard the CPU optimizer steps on
    if offload_params:
        host += params
        params = 0.0
    return MemoryPlan(mode_name(stage, offload_optimizer, offload_params), params, grads, optimizer, buffers,
                      activations, host)


def table(plans: list[MemoryPlan], n_params: int, world_size: int, note: str = "") -> str:
    rows = [f"memory per device (GiB) for {n_params:,} parameters on {world_size} process(es){note}:",
            f"  {'mode':<37}{'params':>8}{'grads':>8}{'optim':>8}{'states':>8}{'buffers':>8}{'activ':>8}{'total':>8}"
            f"{'host':>8}"]
    for m in plans:
        rows.append(f"  {m.mode:<37}" + "".join(f"{v / GIB:>8.3f}" for v in (
            m.params, m.grads, m.optimizer, m.model_states, m.buffers, m.activations, m.total, m.host)))
    rows.append("  states = params + grads + optim (ZeRO paper); buffers: flat gradient copies for the all-reduce; "
                "host: offloaded to CPU memory")
    return "\n".join(rows)


def predict_for_config(cfg, n_params: int, world_size: int, bf16: bool, stage: int | None,
                       offload_optimizer: bool = False, offload_params: bool = False, plan=None) -> MemoryPlan:
    """``predict`` for this config's built-in model and batch plan (activations of its micro-batch); ``plan``
    when the caller has it (``batch.global_size: full`` needs the data's size to make one)."""
    from toolkit.batch import plan_for_config
    from toolkit.model import shape_from_config

    shape = shape_from_config(cfg)
    plan = plan or plan_for_config(cfg, world_size)
    act = activation_bytes(plan.micro_size, cfg.data.seq_len, shape.n_layer, shape.n_embd, shape.vocab_size,
                           2 if bf16 else 4, cfg.model.loss_chunk)
    return predict(n_params, world_size, stage, bf16=bf16, activations=act, offload_optimizer=offload_optimizer,
                   offload_params=offload_params)


def plans_for_config(cfg, world_size: int, bf16: bool, plan=None) -> tuple[int, list[MemoryPlan]]:
    """The built-in model's parameter count (built on the meta device: no memory, no time) and the
    predicted memory of DDP and every ZeRO stage for this config's batch plan."""
    from toolkit.model import GPT, shape_from_config

    with torch.device("meta"):
        model = GPT(shape_from_config(cfg))
    n_params = sum(p.numel() for p in model.parameters())  # tied weights once
    modes = [(None, False, False), (0, False, False), (1, False, False), (2, False, False), (3, False, False),
             (2, True, False), (3, True, True)]
    ds = cfg.deepspeed
    if (ds.stage, ds.offload_optimizer, ds.offload_params) not in modes:
        modes.append((ds.stage, ds.offload_optimizer, ds.offload_params))
    return n_params, [predict_for_config(cfg, n_params, world_size, bf16, *mode, plan=plan) for mode in modes]


# ------------------------------------------------------------------------------------------ measured
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def resident_bytes() -> int:
    """This process's resident set now (CPU memory); 0 where there is no /proc (macOS)."""
    try:
        return _status_kib("VmRSS") * 1024
    except OSError:
        return 0


def _peak_resident_bytes() -> int:
    """The peak resident set: VmHWM (resettable), or where there is no /proc the process's lifetime peak."""
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class PeakMeter:
    """Peak memory while training, without start-up: the CUDA allocator's peak, or the CPU peak resident set.

    Two peaks: ``states_peak``, over the forward and backward passes of each step up to the optimizer
    update (the moment the ZeRO paper counts: parameters, gradients and optimizer states all alive, plus
    activations), from the second step on (before it, AdamW has no states yet); and ``peak``, over whole
    steps including the update and its temporaries (AdamW's, and the all-gather of updated shards)."""

    def __init__(self, device: torch.device, baseline: int):
        self.device = device
        self.baseline = baseline  # bytes in use before the model was built (CPU: resident set)
        self.states_peak = 0  # bytes, from the baseline's zero
        self.overall_peak = 0
        self.earlier_process_peak = 0  # the whole process's peak in the run's earlier segments (absolute)
        self._count_states = False
        self._measuring = False

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
            except OSError:
                pass  # then the peak includes start-up; still an upper bound

    def peak_now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _peak_resident_bytes()

    def step_begins(self, count_states: bool, measure: bool = True) -> None:
        """Before a step's first forward: close the previous window and open a new one (``measure``), or let the
        window run on over this step (the overall peak still covers it: the high-water mark was not reset)."""
        self._measuring = measure
        if not measure:
            return
        self.overall_peak = max(self.overall_peak, self.peak_now() - self.baseline)
        self.reset_peak()
        self._count_states = count_states

    def update_begins(self) -> None:
        """After the step's last backward, before the optimizer update."""
        if self._count_states and self._measuring:
            self.states_peak = max(self.states_peak, self.peak_now() - self.baseline)

    def peak_so_far(self) -> int:
        """The highest memory in use at any time since training began (absolute, not above the baseline)."""
        return max(self.overall_peak + self.baseline, self.peak_now(), self.earlier_process_peak)

    def snapshot(self) -> list[int]:
        """[peak up to the update, peak with the update (both above the baseline), whole-process peak], bytes:
        what a checkpoint keeps, so that a resumed run's figures cover its earlier segments too."""
        states, overall = self.peaks()
        return [states, overall, self.peak_so_far()]

    def restore(self, states: int, overall: int, process: int) -> None:
        """Take the peaks of the run's earlier segments (from a checkpoint's ``snapshot``)."""
        self.states_peak = max(self.states_peak, int(states))
        self.overall_peak = max(self.overall_peak, int(overall))
        self.earlier_process_peak = max(self.earlier_process_peak, int(process))

    def peaks(self) -> tuple[int, int]:
        """(states_peak, overall peak) in bytes above the baseline."""
        self.overall_peak = max(self.overall_peak, self.peak_now() - self.baseline)
        return self.states_peak, self.overall_peak

    @staticmethod
    def baseline_now(device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.memory_allocated(device)
        return resident_bytes()


def peaks_over_ranks(meter: PeakMeter, setup: str, world_size: int) -> dict:
    """The measured peaks so far, the largest over the ranks (a collective), and the setup they were measured
    in: what a checkpoint keeps (under another setup, a resumed run's peaks would not compare)."""
    measured = torch.tensor([float(v) for v in meter.snapshot()], device=meter.device)
    if world_size > 1:
        torch.distributed.all_reduce(measured, op=torch.distributed.ReduceOp.MAX)
    return {"setup": setup, "bytes": [int(v) for v in measured.tolist()]}


def measured_report(peak_bytes: list[int], plan: MemoryPlan, device_type: str) -> dict:
    """Measured peak per device since training began (the largest over the ranks), next to the prediction."""
    measured = [float(v) for v in peak_bytes]
    return {
        "mode": plan.mode,
        "measured": "cuda_max_allocated" if device_type == "cuda" else "peak_rss",
        # The two training peaks are above what was in use before the model was built, so they compare
        # with the prediction; 0 up to the update when the run had fewer than 2 steps.
        "measured_to_update_gib": measured[0] / 2**30,
        "measured_with_update_gib": measured[1] / 2**30,
        # The whole process (runtime and libraries included), as W&B's memory/peak_gib.
        "process_peak_gib": measured[2] / 2**30,
        "predicted_gib": plan.total / 2**30,
        "predicted_model_states_gib": plan.model_states / 2**30,
        "predicted_buffers_gib": plan.buffers / 2**30,
        "predicted_activations_gib": plan.activations / 2**30,
        "predicted_host_gib": plan.host / 2**30,
    }


def report_line(report: dict, plan: MemoryPlan) -> str:
    return (f"memory per device ({plan.mode}), GiB: predicted {plan.summary()}; measured above the start "
            f"{report['measured_to_update_gib']:.3f} up to the optimizer update, "
            f"{report['measured_with_update_gib']:.3f} with the update; whole process "
            f"{report['process_peak_gib']:.3f}")
