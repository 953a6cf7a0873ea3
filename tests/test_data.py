"""Corpora (stdlib bytes, token files, synthetic), the global-batch sampler, rank slicing, the lr schedule."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.batch import make_plan
from toolkit.config import ConfigError, load_config
from toolkit.data import (
    IGNORE,
    GlobalBatchSampler,
    load_data,
    load_stdlib,
    load_synthetic,
    load_tokens,
    rank_micro_batches,
    stdlib_files,
    validation_batches,
)
from toolkit.schedule import lr_at

MAX_BYTES = 600_000  # enough files for the tests, read in well under a second


def stdlib_cfg(*overrides: str):
    return load_config(None, [f"data.max_bytes={MAX_BYTES}", "data.seq_len=64", *overrides])


# ----------------------------------------------------------------------------------------- stdlib


def test_stdlib_corpus_is_deterministic():
    files = stdlib_files()
    assert files == stdlib_files()
    assert len(files) > 100
    root = Path(sysconfig.get_paths()["stdlib"])
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)

    cfg = stdlib_cfg()
    train_a, val_a = load_stdlib(cfg)
    train_b, val_b = load_stdlib(cfg)
    assert bytes(train_a.stream) == bytes(train_b.stream)
    assert bytes(val_a.stream) == bytes(val_b.stream)
    assert np.array_equal(train_a.starts, train_b.starts) and np.array_equal(val_a.starts, val_b.starts)
    assert len(val_a) > 0 and len(train_a) > 5 * len(val_a)
    x_a, y_a = train_a.batch([0, 5, len(train_a) - 1])
    x_b, y_b = train_b.batch([0, 5, len(train_b) - 1])
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)


def test_stdlib_train_and_val_files_are_disjoint():
    cfg = stdlib_cfg("data.max_bytes=2000000")  # enough files for several held-out ones
    train, val = load_stdlib(cfg)
    train_bytes, val_bytes = bytes(train.stream), bytes(val.stream)

    # The files read (sorted order, until max_bytes), with their contents.
    contents, total = [], 0
    for path in stdlib_files():
        if total >= cfg.data.max_bytes:
            break
        contents.append(path.read_bytes())
        total += len(contents[-1])
    assert len(train_bytes) + len(val_bytes) == total  # every file read lands in exactly one split

    # A file whose content is unique (and long enough not to occur by chance) is in exactly one split.
    counts: dict[bytes, int] = {}
    for c in contents:
        counts[c] = counts.get(c, 0) + 1
    unique = [c for c in contents if counts[c] == 1 and len(c) > 2000]
    assert len(unique) > 40
    in_val = 0
    for c in unique:
        t, v = c in train_bytes, c in val_bytes
        assert t != v, "a file is in both splits or in neither"
        in_val += v
    assert 1 < in_val < len(unique) / 4


def test_packed_windows_all_valid_and_stride_seq_len():
    train, _ = load_stdlib(stdlib_cfg("data.pack=true"))
    L = train.seq_len
    assert L == 64
    assert np.all(np.diff(train.starts) == L)
    assert np.all(train.lengths == L + 1)
    indices = list(range(10))
    x, y = train.batch(indices)
    assert x.shape == y.shape == (10, L) and x.dtype == y.dtype == torch.int64
    assert not (y == IGNORE).any()
    assert train.valid_targets(indices) == 10 * L
    stream = torch.from_numpy(np.asarray(train.stream, dtype=np.int64))
    for i in indices:
        assert torch.equal(x[i], stream[i * L : i * L + L])
        assert torch.equal(y[i], stream[i * L + 1 : i * L + L + 1])  # targets are inputs shifted by one
    for i in indices[:-1]:
        assert y[i, -1] == x[i + 1, 0]  # consecutive windows share one token: stride seq_len, no gap


def test_unpacked_padding_is_ignored_and_counted():
    train, val = load_stdlib(stdlib_cfg("data.pack=false"))
    L = train.seq_len
    indices = list(range(len(train)))
    x, y = train.batch(indices)
    valid = y != IGNORE
    assert train.valid_targets(indices) == int(valid.sum())
    per_sample = valid.sum(dim=1)
    assert len(set(per_sample.tolist())) > 3, "samples should carry different numbers of valid targets"
    assert per_sample.min() >= 1 and per_sample.max() == L
    assert (per_sample < L).any()
    for row in torch.nonzero(per_sample < L).flatten().tolist() + list(range(100)):
        n = int(per_sample[row])
        assert valid[row, :n].all() and not valid[row, n:].any()  # padding only at the end
        assert (x[row, n + 1 :] == 0).all()
    short = int(torch.nonzero(per_sample < L)[0])
    for i in (0, short, len(train) - 1):
        assert train.valid_targets([i]) == int((train.batch([i])[1] != IGNORE).sum())
    vx, vy = val.batch([0, 1, 2])
    assert val.valid_targets([0, 1, 2]) == int((vy != IGNORE).sum())


# ----------------------------------------------------------------------------------------- token files


def write_tokens(path: Path, ids: np.ndarray) -> None:
    ids.astype(np.uint16).tofile(path)


def test_token_file_samples_are_memmapped_and_exact(tmp_path):
    ids = (np.arange(2000, dtype=np.int64) * 7919 + 13) % 65536  # uses the whole uint16 range
    path = tmp_path / "train.bin"
    write_tokens(path, ids)
    cfg = load_config(None, ["data.source=tokens", f"data.path={path}", "data.seq_len=16", "data.val_fraction=0.1"])
    train, val = load_tokens(cfg)
    assert isinstance(train.stream, np.memmap) and isinstance(val.stream, np.memmap)

    cut = int(len(ids) * 0.9)
    assert len(train) == (cut - 1) // 16 and len(val) == (len(ids) - cut - 1) // 16
    x, y = train.batch([0, 3, len(train) - 1])
    for row, i in enumerate([0, 3, len(train) - 1]):
        assert x[row].tolist() == ids[i * 16 : i * 16 + 16].tolist()
        assert y[row].tolist() == ids[i * 16 + 1 : i * 16 + 17].tolist()
    vx, vy = val.batch([0, 1])
    assert vx[0].tolist() == ids[cut : cut + 16].tolist()
    assert vy[1].tolist() == ids[cut + 17 : cut + 33].tolist()
    assert int(x.max()) > 60000  # ids above int16 survive


def test_token_file_with_val_path(tmp_path):
    train_ids = np.arange(1000) % 50304
    val_ids = 50000 + np.arange(300)
    write_tokens(tmp_path / "train.bin", train_ids)
    write_tokens(tmp_path / "val.bin", val_ids)
    cfg = load_config(None, ["data.source=tokens", f"data.path={tmp_path / 'train.bin'}",
                             f"data.val_path={tmp_path / 'val.bin'}", "data.seq_len=10", "batch.global_size=8",
                             "batch.micro_size=null"])
    train, val = load_data(cfg, vocab_size=50304)
    assert len(train) == 999 // 10  # the whole train file, nothing held out
    assert len(val) == 299 // 10
    x, _ = val.batch([2])
    assert x[0].tolist() == val_ids[20:30].tolist()
    x, y = train.batch([len(train) - 1])
    assert y[0, -1].item() == train_ids[(len(train) - 1) * 10 + 10]


def test_token_file_odd_size_is_a_config_error(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x01\x02\x03")
    cfg = load_config(None, ["data.source=tokens", f"data.path={path}"])
    with pytest.raises(ConfigError, match="uint16"):
        load_tokens(cfg)


def test_too_little_data_for_the_global_batch(tmp_path):
    path = tmp_path / "small.bin"
    write_tokens(path, np.arange(200))
    cfg = load_config(None, ["data.source=tokens", f"data.path={path}", "data.seq_len=16", "batch.global_size=32",
                             "batch.micro_size=null"])
    with pytest.raises(ConfigError, match="batch.global_size=32"):
        load_data(cfg, vocab_size=256)


# ----------------------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("pack", [True, False])
def test_synthetic_is_deterministic_by_seed(pack):
    overrides = ["data.source=synthetic", "data.synthetic_tokens=20000", "data.seq_len=32", f"data.pack={pack}"]
    a_train, a_val = load_synthetic(load_config(None, ["seed=5", *overrides]), 1000)
    b_train, b_val = load_synthetic(load_config(None, ["seed=5", *overrides]), 1000)
    c_train, _ = load_synthetic(load_config(None, ["seed=6", *overrides]), 1000)
    idx = list(range(min(len(a_train), 50)))
    assert np.array_equal(a_train.stream, b_train.stream) and np.array_equal(a_train.starts, b_train.starts)
    assert torch.equal(a_train.batch(idx)[1], b_train.batch(idx)[1])
    assert torch.equal(a_val.batch([0])[0], b_val.batch([0])[0])
    assert not np.array_equal(a_train.stream, c_train.stream)
    assert int(a_train.stream.max()) < 1000
    if not pack:
        counts = {a_train.valid_targets([i]) for i in idx}
        assert len(counts) > 3


# ----------------------------------------------------------------------------------------- sampler


def test_sampler_depends_only_on_seed_and_epoch():
    n, g = 1000, 32
    a = GlobalBatchSampler(n, g, seed=7)
    steps = a.steps_per_epoch
    assert steps == n // g == 31

    epoch0 = [a.global_batch(k) for k in range(steps)]
    flat = sum(epoch0, [])
    assert all(len(b) == g for b in epoch0)
    assert len(set(flat)) == len(flat) == steps * g  # no repeats within an epoch
    assert all(0 <= i < n for i in flat)

    epoch1 = [a.global_batch(k) for k in range(steps, 2 * steps)]
    assert epoch1 != epoch0 and epoch1[0] != epoch0[0]
    assert len(set(sum(epoch1, []))) == steps * g

    # Same seed, any query order or history: the same indices for step k.
    b = GlobalBatchSampler(n, g, seed=7)
    for k in (45, 3, 2 * steps + 1, 3, 0, 45, 2 * steps + 1):
        expected = (epoch0 + epoch1)[k] if k < 2 * steps else a.global_batch(k)
        assert b.global_batch(k) == expected
    # Different seed, different order.
    c = GlobalBatchSampler(n, g, seed=8)
    assert c.global_batch(0) != epoch0[0]
    assert [c.global_batch(k) for k in range(steps)] != epoch0


def test_sampler_refuses_global_larger_than_data():
    with pytest.raises(ConfigError, match="larger than the dataset"):
        GlobalBatchSampler(10, 32, seed=0)


@pytest.mark.parametrize("global_size, micro, world", [
    (24, 24, 1), (24, 8, 1), (24, 4, 2), (24, 2, 3), (24, 6, 4), (24, 12, 2), (24, 1, 6), (24, 1, 1), (24, 3, 8),
])
def test_rank_micro_batches_partition_the_global_batch(global_size, micro, world):
    plan = make_plan(global_size, micro, world)
    global_batch = GlobalBatchSampler(500, global_size, seed=3).global_batch(4)
    pieces = []
    for rank in range(world):
        micro_batches = rank_micro_batches(global_batch, plan, rank)
        assert len(micro_batches) == plan.accumulation
        assert all(len(m) == plan.micro_size for m in micro_batches)
        pieces.extend(micro_batches)
    flat = sum(pieces, [])
    assert len(flat) == len(set(flat)) == global_size  # disjoint
    assert flat == global_batch  # union is the global batch (in order: contiguous blocks per rank)


def test_validation_batches_are_fixed():
    plan = make_plan(8, 4, 1)
    first = validation_batches(range(20), plan, 3)
    assert first == validation_batches(range(20), plan, 3)
    assert first[0] == list(range(8)) and first[2] == [16, 17, 18, 19, 0, 1, 2, 3]


# ----------------------------------------------------------------------------------------- schedule


def test_lr_warmup_cosine_and_floor():
    peak, low, warm, decay = 3e-3, 3e-4, 1600, 9600
    assert lr_at(0, peak, low, warm, decay) == 0.0
    assert lr_at(400, peak, low, warm, decay) == pytest.approx(peak / 4)
    assert lr_at(800, peak, low, warm, decay) == pytest.approx(peak / 2)
    assert lr_at(1600, peak, low, warm, decay) == pytest.approx(peak)
    mid = (warm + decay) // 2
    assert lr_at(mid, peak, low, warm, decay) == pytest.approx((peak + low) / 2)
    quarter = warm + (decay - warm) // 4
    assert lr_at(quarter, peak, low, warm, decay) == pytest.approx(low + 0.5 * (1 + math.cos(math.pi / 4)) * (peak - low))
    assert lr_at(decay, peak, low, warm, decay) == pytest.approx(low)
    assert lr_at(10 * decay, peak, low, warm, decay) == low
    after = [lr_at(s, peak, low, warm, decay) for s in range(warm, decay + 1, 32)]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))
    before = [lr_at(s, peak, low, warm, decay) for s in range(0, warm + 1, 32)]
    assert all(a < b for a, b in zip(before, before[1:], strict=False))
    assert lr_at(0, peak, low, 0, decay) == pytest.approx(peak)  # no warmup


def test_lr_is_counted_in_samples_whatever_the_split():
    """The trainer asks for lr_at((step + 1) * global_size): the same samples give the same lr, whatever the
    global batch, micro batch or world size that got there."""
    peak, low, warm = 1e-3, 1e-4, 1000
    decay = 8 * 1024
    for samples in (256, 512, 1024, 4096, 8192):
        values = set()
        for g in (8, 16, 32, 64, 128, 256):
            step = samples // g - 1  # the step that ends at `samples`
            values.add(lr_at((step + 1) * g, peak, low, warm, decay))
        assert len(values) == 1
    # Schedules stated in samples: doubling the global batch halves the steps to the same lr.
    assert lr_at(20 * 32, peak, low, warm, decay) == lr_at(10 * 64, peak, low, warm, decay)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    path = tmp_path / "big_ids.bin"
    write_tokens(path, np.arange(3000) % 300)  # ids up to 299
    cfg = load_config(None, ["data.source=tokens", f"data.path={path}", "data.seq_len=16", "batch.global_size=8"])
    with pytest.raises(ConfigError, match=r"token id 299, beyond model.vocab_size=256.*at least 300"):
        load_data(cfg, vocab_size=256)
    train, _ = load_data(cfg, vocab_size=300)
    assert len(train) > 0
