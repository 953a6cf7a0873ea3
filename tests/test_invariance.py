"""The global batch decides the math; the split over processes, micro-batches and accumulation does not.

Four real runs of the same job (fixed seed, ``data.pack=false`` so that samples carry different
numbers of valid targets) split the global batch of 8 four ways:

    processes x micro x accumulation:  1 x 8 x 1,  1 x 2 x 4,  2 x 2 x 2,  2 x 4 x 1

and must end with the same weights (fp32, max relative difference <= 1e-5, defined in ``toolkit.bench.common.max_rel_diff``),
the same losses and the same samples at every step. An in-process gradient check shows that the classic
normalisation (mean of per-micro-batch means) would *not* be split-invariant on the same data.

The data is ``data.source=synthetic`` (random tokens in documents of random length) rather than the
stdlib corpus: with ``data.pack=false`` only a document's last chunk is short, and the stdlib's
documents are long, so at seq_len 32 about 0.1% of stdlib samples are shorter than a full window and a
global batch of 8 is nearly always all-full, which would make the normalisation comparison vacuous.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import ZERO_JOB, final_weights, read_jsonl, small_job, train, train_together

from toolkit.bench.common import max_rel_diff

GLOBAL = 8
STEPS = 5
TOL = 1e-5
# The default optimizer settings (AdamW, linear warmup over optim.warmup_samples=1600), so the learning
# rate in these 5 steps is small (1.5e-5 .. 7.5e-5). Adam turns the rounding noise of near-zero gradient
# elements into steps of the learning rate's size; at the full rate from step 1 (optim.warmup_samples=0)
# that measured 3.9e-5 in blocks.0.mlp.0.weight after 5 steps, with the warmup ~1e-6.
COMMON = [*small_job(GLOBAL, STEPS), "run.record_samples=true"]
# name -> (processes, micro size); accumulation = GLOBAL / (micro x processes)
SPLITS = {
    "1x8x1": (1, 8),
    "1x2x4": (1, 2),
    "2x2x2": (2, 2),
    "2x4x1": (2, 4),
    "1x4x2": (1, 4),
}
REFERENCE = "1x8x1"


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tensor work on one thread: on a busy 2-core machine two spinning threads run it 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config():
    from toolkit.config import load_config

    return load_config(None, COMMON)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ddp_two_processes) -> dict[str, Path]:
    """The runs, once per module: split name -> run directory. The one-process runs go at the same time (one
    core each), then the two-process runs one after the other. 2x2x2 is conftest.py's DDP run of the same job
    (made once for the session: tests/test_deepspeed.py's reference)."""
    root = tmp_path_factory.mktemp("invariance")
    dirs = {name: root / name for name in SPLITS}
    assert set(COMMON) <= {*ZERO_JOB, "run.record_samples=true"} and "batch.micro_size=2" in ZERO_JOB  # the same job
    dirs["2x2x2"] = ddp_two_processes[0]
    single = [name for name, (processes, _) in SPLITS.items() if processes == 1]
    started = time.perf_counter()
    train_together([[*COMMON, f"batch.micro_size={SPLITS[name][1]}", f"run.dir={dirs[name]}"] for name in single])
    print(f"runs {', '.join(single)}, together: {time.perf_counter() - started:.1f} s")
    for name, (processes, micro) in SPLITS.items():
        if processes == 1 or name == "2x2x2":
            continue
        started = time.perf_counter()
        train([*COMMON, f"batch.micro_size={micro}", f"run.dir={dirs[name]}"], processes=processes)
        print(f"run {name}: {time.perf_counter() - started:.1f} s")
    return dirs





def test_runs_used_the_splits_asked_for(runs):
    for name, (processes, micro) in SPLITS.items():
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert (summary["world_size"], summary["micro_size"], summary["accumulation"], summary["global_size"]) == (
            processes, micro, GLOBAL // (micro * processes), GLOBAL
        ), name
        assert summary["steps"] == STEPS
        assert len(list(runs[name].glob("samples-rank*.jsonl"))) == processes


def test_final_weights_agree_across_splits(runs):
    from toolkit.model import build_model

    ref = final_weights(runs[REFERENCE])
    init = {k: v.detach().clone() for k, v in build_model(config()).state_dict().items()}
    assert init.keys() == ref.keys()

    # The weights moved: every tensor changed, and by far more than the splits disagree.
    moved = {k: (ref[k] - init[k]).abs().max().item() for k in ref}
    for name, update in moved.items():
        assert update > 0, f"{name} did not change in {STEPS} steps"
    rel_update, worst_name = max_rel_diff(ref, init)
    print(f"largest update relative to init: {rel_update:.3e} ({worst_name})")
    assert rel_update > 100 * TOL

    for name in SPLITS:
        if name == REFERENCE:
            continue
        other = final_weights(runs[name])
        rel, where = max_rel_diff(other, ref)
        # The same difference measured against what training changed in each tensor (scale-free).
        vs_update = max((other[k] - ref[k]).abs().max().item() / moved[k] for k in ref)
        print(f"{name} vs {REFERENCE}: max relative difference {rel:.3e} ({where}); "
              f"largest difference / update {vs_update:.3e}")
        assert rel <= TOL, f"{name} differs from {REFERENCE} by {rel:.3e} in {where}"
        assert vs_update <= 1e-2, f"{name}: the difference is {vs_update:.3e} of the training update"


def test_losses_and_gradient_norms_agree_across_splits(runs):
    """Per step, the logged loss and pre-clip gradient norm. Adam and clipping largely hide a gradient's
    scale from the weights; the norm shows it directly (e.g. a rank forgetting the world-size factor)."""
    logs = {}
    for name in SPLITS:
        records = [r for r in read_jsonl(runs[name] / "metrics.jsonl") if "loss" in r]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1)), name
        logs[name] = records
    print("grad_norm per step:", {name: [round(r["grad_norm"], 6) for r in rs] for name, rs in logs.items()})
    for name, records in logs.items():
        for a, b in zip(records, logs[REFERENCE], strict=True):
            assert b["grad_norm"] > 0
            for key in ("loss", "grad_norm"):
                assert abs(a[key] - b[key]) <= TOL * abs(b[key]), f"{name} step {a['step']}: {key} {a[key]} vs {b[key]}"


@pytest.mark.parametrize("a, b", [("1x2x4", "2x2x2"), ("1x4x2", "2x4x1")])
def test_noise_scale_does_not_depend_on_the_split(runs, a, b):
    """The noise scale's small batch is rank 0's first micro-batch: samples 0-1 of each global batch in
    1x2x4 and 2x2x2 (one process, or two before DDP's all-reduce), samples 0-3 in 1x4x2 and 2x4x1 (where,
    with one micro-step, the norm is taken in DDP's communication hook). Same small and big batches, so
    the same estimate, whatever the number of processes and micro-steps around them."""
    def noise(name):
        records = [r for r in read_jsonl(runs[name] / "metrics.jsonl") if "loss" in r]
        return [(r["noise_grad_sq"], r["noise_trace"]) for r in records], [r["noise_scale"] for r in records]

    (terms_a, scale_a), (terms_b, scale_b) = noise(a), noise(b)
    print(f"|G|^2, tr(Sigma) per step, {a}: {terms_a}; {b}: {terms_b}")
    # Compared term by term: in 5 steps the |G|^2 estimate can still be negative, and then B_simple is None.
    assert len(terms_a) == STEPS and all(t is not None for pair in terms_a + terms_b for t in pair)
    for (g_a, t_a), (g_b, t_b) in zip(terms_a, terms_b, strict=True):
        assert t_a == pytest.approx(t_b, rel=1e-4) and t_a > 0
        assert g_a == pytest.approx(g_b, rel=1e-3, abs=1e-4 * abs(t_a))  # a difference of two larger numbers
    assert [x is None for x in scale_a] == [x is None for x in scale_b]
    # One batch size only (1 process, accumulation 1): no estimate at all.
    assert all(r.get("noise_scale") is None for r in read_jsonl(runs[REFERENCE] / "metrics.jsonl"))


def test_data_order_is_the_same_for_every_split(runs):
    """Each step computes exactly the sampler's global batch, split as rank_micro_batches says."""
    from toolkit.batch import make_plan
    from toolkit.data import GlobalBatchSampler, load_data, rank_micro_batches

    cfg = config()
    train_data, _ = load_data(cfg, 256)
    sampler = GlobalBatchSampler(len(train_data), GLOBAL, cfg.seed)
    assert STEPS * GLOBAL <= len(train_data), "the run must stay within one epoch"
    expected_steps = [sampler.global_batch(k) for k in range(STEPS)]

    unions = {}
    for name, (processes, micro) in SPLITS.items():
        plan = make_plan(GLOBAL, micro, processes)
        per_rank = []
        for rank in range(processes):
            records = read_jsonl(runs[name] / f"samples-rank{rank}.jsonl")
            assert [r["step"] for r in records] == list(range(STEPS)), f"{name} rank {rank}"
            per_rank.append([r["indices"] for r in records])
            for k, record in enumerate(records):
                assert record["indices"] == sum(rank_micro_batches(expected_steps[k], plan, rank), []), (
                    f"{name} rank {rank} step {k}"
                )
        steps = []
        for k in range(STEPS):
            together = [i for rank in range(processes) for i in per_rank[rank][k]]
            assert len(together) == GLOBAL, f"{name} step {k}: {len(together)} samples"
            assert len(set(together)) == GLOBAL, f"{name} step {k}: a sample computed twice: {together}"
            steps.append(sorted(together))
        run_indices = [i for step in steps for i in step]
        assert len(set(run_indices)) == len(run_indices), f"{name}: a sample repeats within the epoch"
        unions[name] = steps

    for name, steps in unions.items():
        assert steps == unions[REFERENCE], f"{name} computed other samples than {REFERENCE}"
    assert unions[REFERENCE] == [sorted(b) for b in expected_steps]


@pytest.mark.parametrize("num_samples,global_size,seed", [(103, 8, 0), (64, 16, 5), (1, 1, 1)])
def test_sampler_covers_an_epoch_without_repeats(num_samples, global_size, seed):
    from toolkit.data import GlobalBatchSampler

    sampler = GlobalBatchSampler(num_samples, global_size, seed)
    per_epoch = num_samples // global_size
    assert sampler.steps_per_epoch == per_epoch
    for epoch in range(2):
        seen = []
        for k in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            batch = sampler.global_batch(k)
            assert len(batch) == global_size
            seen += batch
        assert len(set(seen)) == len(seen) == per_epoch * global_size, f"epoch {epoch}"
        assert all(0 <= i < num_samples for i in seen)
    # A fresh sampler (a resumed run) gives the same batches: the step is the only position.
    again = GlobalBatchSampler(num_samples, global_size, seed)
    assert [again.global_batch(k) for k in reversed(range(2 * per_epoch))] == [
        sampler.global_batch(k) for k in reversed(range(2 * per_epoch))
    ]


def test_sampler_covers_the_real_training_split():
    from toolkit.data import GlobalBatchSampler, load_data

    cfg = config()
    train_data, _ = load_data(cfg, 256)
    sampler = GlobalBatchSampler(len(train_data), GLOBAL, cfg.seed)
    epoch = [i for k in range(sampler.steps_per_epoch) for i in sampler.global_batch(k)]
    assert len(epoch) == len(set(epoch)) == sampler.steps_per_epoch * GLOBAL
    assert len(train_data) - len(epoch) < GLOBAL  # only the remainder is dropped
    next_epoch = [i for k in range(sampler.steps_per_epoch, 2 * sampler.steps_per_epoch)
                  for i in sampler.global_batch(k)]
    assert len(set(next_epoch)) == len(next_epoch)
    assert next_epoch != epoch  # a new permutation


# ------------------------------------------------------------------------------ the classic bug, in process
def _step0_gradients(micro: int, normalise: str) -> dict[str, torch.Tensor]:
    """Gradient of step 0 on one process with ``GLOBAL / micro`` micro-batches of size ``micro``.

    ``normalise="global"``: each micro-batch's summed loss / valid targets of the whole global batch
    (the toolkit's rule). ``"micro-mean"``: each micro-batch's mean over its own valid targets, divided by
    the accumulation steps (the classic bug).
    """
    from toolkit.batch import make_plan
    from toolkit.data import GlobalBatchSampler, load_data, rank_micro_batches
    from toolkit.model import build_model

    cfg = config()
    model = build_model(cfg)
    data, _ = load_data(cfg, model.shape.vocab_size)
    plan = make_plan(GLOBAL, micro, 1, cfg.data.seq_len)
    global_batch = GlobalBatchSampler(len(data), GLOBAL, cfg.seed).global_batch(0)
    total_valid = data.valid_targets(global_batch)
    for indices in rank_micro_batches(global_batch, plan, 0):
        x, y = data.batch(indices)
        loss_sum, _ = model((x, y))
        if normalise == "global":
            loss = loss_sum / total_valid
        else:
            loss = loss_sum / data.valid_targets(indices) / plan.accumulation
        loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def test_global_batch_has_uneven_valid_targets():
    """Without this the classic-bug comparison (and the invariance runs) would be vacuous."""
    from toolkit.batch import make_plan
    from toolkit.data import GlobalBatchSampler, load_data, rank_micro_batches

    cfg = config()
    data, _ = load_data(cfg, 256)
    sampler = GlobalBatchSampler(len(data), GLOBAL, cfg.seed)
    plan = make_plan(GLOBAL, 2, 1)
    for k in range(STEPS):
        batch = sampler.global_batch(k)
        per_sample = [data.valid_targets([i]) for i in batch]
        per_micro = [data.valid_targets(m) for m in rank_micro_batches(batch, plan, 0)]
        print(f"step {k}: valid targets per sample {per_sample}, per micro-batch of 2 {per_micro}")
        assert len(set(per_sample)) > 1
        assert len(set(per_micro)) > 1


def test_classic_bug_is_not_split_invariant():
    ours_whole, ours_split = _step0_gradients(8, "global"), _step0_gradients(2, "global")
    bug_whole, bug_split = _step0_gradients(8, "micro-mean"), _step0_gradients(2, "micro-mean")

    ours, ours_where = max_rel_diff(ours_split, ours_whole)
    bug, bug_where = max_rel_diff(bug_split, bug_whole)
    norm = torch.cat([g.flatten() for g in bug_whole.values()]).norm()
    bug_norm = torch.cat([(bug_split[k] - bug_whole[k]).flatten() for k in bug_whole]).norm() / norm
    print(f"step-0 gradient, micro 2 x accumulation 4 vs micro 8 x 1: "
          f"sum / global valid targets: max relative difference {ours:.3e} ({ours_where}); "
          f"mean of micro-batch means: {bug:.3e} ({bug_where}), relative L2 {bug_norm:.3e}")
    # With one micro-batch both rules are the same computation.
    assert max_rel_diff(bug_whole, ours_whole)[0] == 0.0
    assert ours <= 5e-6
    assert bug > 1e-3
    assert bug > 100 * ours
