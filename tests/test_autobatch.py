"""``batch.micro_size: auto``: the largest micro-batch under the memory limit, agreed by all ranks, leaving no trace."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import ROOT, child_env, final_weights, report, train

from toolkit.autobatch import OUT_OF_MEMORY, StepProbe, batch_maker, candidates, choose_micro_size, search
from toolkit.collective import Ranks
from toolkit.config import ConfigError, load_config
from toolkit.memory import PeakMeter

SCRIPT = str(ROOT / "tests" / "probe_auto_micro.py")
# A tiny GPT on 256-token samples: each sample adds ~9 MB to a step's peak, far above the CPU's noise (~0.1 MB).
# Dropout: the probe's steps draw random numbers, which the run must not miss.
JOB = ["model.size=tiny", "model.dropout=0.1", "data.seq_len=256", "batch.global_size=48", "batch.memory_margin=0", "train.steps=3",
       "train.val_every=0", "train.val_batches=1", "train.log_every=1", "train.progress=false", "train.precision=fp32"]
SHARE = 24  # samples per rank per step: global 48 over 2 processes
SIZES = [1, 2, 4, 6, 8, 12, 16]  # what the search below probes, and the divisors of 24 around the limits


def test_search_doubles_then_bisects_between_the_last_fit_and_the_first_failure():
    cap, usable = candidates([24])
    assert (cap, usable) == (24, [1, 2, 3, 4, 6, 8, 12, 24])
    tried = []

    def fits_up_to(limit):
        def fits(size):
            tried.append(size)
            return size <= limit
        return fits

    assert search(fits_up_to(13), cap, usable) == (12, 16)
    assert tried == [1, 2, 4, 8, 16, 12]  # doubling to the first failure, then the usable sizes between
    tried.clear()
    assert search(fits_up_to(100), cap, usable) == (24, None) and tried == [1, 2, 4, 8, 16, 24]  # capped at the share
    assert search(fits_up_to(0), cap, usable) == (0, 1)
    # A ramp's shares: the size must divide each of them; a ragged full batch takes any size up to its share.
    assert candidates([24, 8, 4]) == (4, [1, 2, 4])  # (so nothing above 4 is probed)
    assert candidates([7], ragged=True) == (7, [1, 2, 3, 4, 5, 6, 7])


class Normed(torch.nn.Module):
    """A model with a buffer that training changes (a running mean), dropout (it draws random numbers), and an
    out-of-memory error half-way through its forward pass above ``fail_above`` samples."""

    def __init__(self, fail_above: int | None = None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.LayerNorm(32), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(32, 1))
        self.register_buffer("running_mean", torch.zeros(32))
        self.fail_above = fail_above

    def forward(self, batch):
        x, y = batch
        hidden = self.net[1](self.net[0](x))  # (part of the graph exists when the error comes)
        if self.fail_above is not None and len(x) > self.fail_above:
            raise torch.OutOfMemoryError("the device has no room for this micro-batch")
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(hidden.mean(0), alpha=0.1)
        return ((self.net[3](self.net[2](hidden)).squeeze(1) - y) ** 2).sum(), len(y)


def test_a_probe_leaves_weights_buffers_gradients_and_random_numbers_as_they_were(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64))
    model = Normed(fail_above=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cfg = load_config(overrides=["batch.micro_size=auto", "batch.memory_margin=0"])
    cpu = torch.device("cpu")
    found = choose_micro_size(cfg, model, data, None, cpu, False, PeakMeter.baseline_now(cpu), [32], Ranks(0, 1), {})
    assert (found.largest_fit, found.first_fail) == (8, 16)  # 16 ran out of memory, caught, and counted as not fitting
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a probe step changed the model"
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng), "the probe's dropout drew from the run's random numbers"
    probe = StepProbe(model, batch_maker(data, None), cpu, False, PeakMeter.baseline_now(cpu))
    assert probe.peak(4) < OUT_OF_MEMORY and probe.peak(32) == OUT_OF_MEMORY
    probe.close()
    assert not torch.equal(torch.get_rng_state(), rng)  # (the probe does draw: the fork above is what protects)


def test_the_answer_is_cached_per_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    cfg = load_config(overrides=["batch.micro_size=auto", "batch.memory_margin=0"])
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64))
    cpu, ranks = torch.device("cpu"), Ranks(0, 1)

    def choose(fail_above, setup):
        model = Normed(fail_above)
        return choose_micro_size(cfg, model, data, None, cpu, False, PeakMeter.baseline_now(cpu), [24], ranks, setup)

    first = choose(5, {"stage": None})
    assert (first.micro_size, first.largest_fit, first.first_fail, first.cached) == (4, 4, 6, False)
    assert first.peaks_gib[8] is None and first.peaks_gib[4] is not None
    again = choose(5, {"stage": None})
    assert again.cached and again.micro_size == 4
    assert not choose(9, {"stage": 2}).cached  # another setup probes again
    assert set(json.loads((tmp_path / "micro_size.json").read_text())) and "cached" in again.line()


def test_a_limit_that_not_even_one_sample_fits_is_refused_in_one_line():
    cfg = load_config(overrides=["batch.micro_size=auto"])
    data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64))
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="not even one sample per micro-batch fits"):
        choose_micro_size(cfg, Normed(0), data, None, cpu, False, PeakMeter.baseline_now(cpu), [8], Ranks(0, 1), {})
    for bad, field in (("batch.micro_size=big", "batch.micro_size"), ("batch.memory_margin=0.95", "memory_margin"),
                       ("batch.memory_limit_gib=0", "memory_limit_gib")):
        with pytest.raises(ConfigError, match=field):
            load_config(overrides=[bad])


def test_two_ranks_with_different_limits_agree_on_the_smaller_size_and_train_as_that_size_would(request, tmp_path):
    env = {**child_env(), "MALLOC_MMAP_THRESHOLD_": "65536", "TOOLKIT_CACHE_DIR": str(tmp_path / "cache")}
    # The peak of one step at every size, measured as the probe measures it, in 2 processes (the larger of each).
    sweep = tmp_path / "sweep.json"
    train(JOB, processes=2, script=SCRIPT,
          env={**env, "AUTO_SWEEP": ",".join(map(str, SIZES)), "AUTO_SWEEP_OUT": str(sweep)})
    ranks = [json.loads(sweep.with_name(f"sweep.json.rank{r}").read_text()) for r in (0, 1)]
    peaks = {s: max(r[str(s)] for r in ranks) / 2**30 for s in SIZES}
    assert all(peaks[a] < peaks[b] for a, b in itertools.pairwise(SIZES)), peaks
    # Rank 0 could take 12; rank 1's limit lies half-way between the peaks of 6 and 8.
    limits = [(peaks[12] + peaks[16]) / 2, (peaks[6] + peaks[8]) / 2]
    expected = max(s for s in SIZES if SHARE % s == 0 and peaks[s] <= min(limits))
    assert expected == 6  # (3, the only divisor of 24 below 6 not swept, is smaller anyway)

    auto_dir, fixed_dir = tmp_path / "auto", tmp_path / "fixed"
    auto = train([*JOB, f"run.dir={auto_dir}", "batch.micro_size=auto"], processes=2, script=SCRIPT, timeout=300,
                 env={**env, "AUTO_LIMITS_GIB": ",".join(map(str, limits))})
    line = next(x for x in auto.stdout.splitlines() if x.startswith("batch.micro_size=auto"))
    summary = json.loads((auto_dir / "summary.json").read_text())
    assert summary["micro_size"] == expected and summary["accumulation"] == SHARE // expected, line
    found = summary["auto_micro"]
    assert (found["largest_fit"], found["first_fail"]) == (6, 8), line  # 8 failed on rank 1, 6 fit on both
    for size, peak in found["peaks_gib"].items():  # the probe measured what the sweep did (within 4 MiB)
        assert abs(peak - peaks[int(size)]) < 4 / 1024, (size, peak, peaks)
    train([*JOB, f"run.dir={fixed_dir}", f"batch.micro_size={expected}"], processes=2, script=SCRIPT, env=env)
    a, b = final_weights(auto_dir), final_weights(fixed_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "the probe left a trace in the training"
    # The run's own measured peak is the training's, not the probe's last (failed) size's.
    peak = summary["memory"]["measured_with_update_gib"]
    assert peak < peaks[8], (peak, peaks)
    report(request, f"sweep (MiB): {', '.join(f'{s}: {p * 1024:.1f}' for s, p in peaks.items())}; limits (MiB) "
                    f"{limits[0] * 1024:.1f} / {limits[1] * 1024:.1f}\n{line}\nfinal weights equal a micro-{expected} run")
