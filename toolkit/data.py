"""Corpora and the global-batch sampler.

A corpus is a list of samples; sample i holds ``seq_len + 1`` token slots: inputs ``x = s[:-1]`` and
targets ``y = s[1:]``, where padding targets are ``IGNORE`` (-100) and count for nothing in the loss.

The sampler decides which samples global step k uses from the seed and the epoch alone. A process
and a micro-step only choose which slice of that global batch they compute, so changing the number
of processes, the micro-batch or the accumulation never changes the data a step sees.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.batch import FULL, BatchPlan
from toolkit.config import Config, ConfigError

IGNORE = -100
"""Target value excluded from the loss (PyTorch's cross_entropy ignore_index)."""


class Samples:
    """Fixed-length samples cut from a token stream.

    ``starts[i]`` and ``lengths[i]`` locate sample i in ``stream``; a length below ``seq_len + 1`` is a
    document's last chunk, padded on the fly (only with data.pack=false).
    """

    def __init__(self, stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seq_len: int):
        self.stream = stream
        self.starts = starts.astype(np.int64)
        self.lengths = lengths.astype(np.int64)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def tokens_per_sample(self) -> int:
        """Token positions per sample: what throughput counts (padding included, as the GPU computes it)."""
        return self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole micro-batch in one call (the DataLoader uses this instead of one ``dataset[i]`` per sample)."""
        return self.batch(indices)

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``__getitems__`` already made the micro-batch: nothing to collate."""
        return batch

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, both ``[len(indices), seq_len]`` int64."""
        width = self.seq_len + 1
        tokens = np.zeros((len(indices), width), dtype=np.int64)
        targets_valid = np.zeros((len(indices), self.seq_len), dtype=bool)
        for row, i in enumerate(indices):
            start, length = self.starts[i], self.lengths[i]
            tokens[row, :length] = self.stream[start : start + length]
            targets_valid[row, : length - 1] = True
        tokens = torch.from_numpy(tokens)
        x = tokens[:, :-1].contiguous()
        y = tokens[:, 1:].clone()
        y[~torch.from_numpy(targets_valid)] = IGNORE
        return x, y

    def valid_targets(self, indices: list[int]) -> int:
        """Number of targets that count in the loss, known without running the model."""
        return int((self.lengths[np.asarray(indices, dtype=np.int64)] - 1).sum())


def packed(stream: np.ndarray, seq_len: int) -> Samples:
    """Non-overlapping windows of seq_len + 1 tokens with stride seq_len (each target used once)."""
    count = (len(stream) - 1) // seq_len
    starts = np.arange(count, dtype=np.int64) * seq_len
    return Samples(stream, starts, np.full(count, seq_len + 1), seq_len)


def chunked(stream: np.ndarray, doc_bounds: list[tuple[int, int]], seq_len: int) -> Samples:
    """One document chunk per sample: each document cut into pieces of up to seq_len + 1 tokens.

    Consecutive chunks overlap by one token (stride seq_len), as packed windows do, so every target of
    a document is trained exactly once."""
    width = seq_len + 1
    starts, lengths = [], []
    for begin, end in doc_bounds:
        for start in range(begin, end - 1, seq_len):  # end - 1: a chunk needs 2 tokens to have a target
            starts.append(start)
            lengths.append(min(width, end - start))
    return Samples(stream, np.array(starts), np.array(lengths), seq_len)


def stdlib_files() -> list[Path]:
    """This Python's standard-library ``.py`` files, sorted by relative path (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _concat(docs: list[bytes]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    bounds, offset = [], 0
    for doc in docs:
        bounds.append((offset, offset + len(doc)))
        offset += len(doc)
    stream = np.frombuffer(b"".join(docs), dtype=np.uint8) if docs else np.zeros(0, np.uint8)
    return stream, bounds


def _from_documents(docs: list[bytes], seq_len: int, pack: bool) -> Samples:
    stream, bounds = _concat(docs)
    return packed(stream, seq_len) if pack else chunked(stream, bounds, seq_len)


def load_stdlib(cfg: Config) -> tuple[Samples, Samples]:
    """Train and validation samples from the standard library: every k-th file is held out."""
    every = max(2, round(1 / cfg.data.val_fraction))
    train_docs, val_docs, total = [], [], 0
    for index, path in enumerate(stdlib_files()):
        if total >= cfg.data.max_bytes:
            break
        text = path.read_bytes()
        total += len(text)
        (val_docs if index % every == 0 else train_docs).append(text)
    if not train_docs or not val_docs:
        raise ConfigError(f"data.source=stdlib: found too few .py files under {sysconfig.get_paths()['stdlib']}")
    return (
        _from_documents(train_docs, cfg.data.seq_len, cfg.data.pack),
        _from_documents(val_docs, cfg.data.seq_len, cfg.data.pack),
    )


def _token_file(path: str) -> np.ndarray:
    size = Path(path).stat().st_size
    if size < 4 or size % 2:
        raise ConfigError(f"data.path: {path} is not a uint16 token file ({size} bytes; need an even size >= 4)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_tokens(cfg: Config) -> tuple[Samples, Samples]:
    """nanoGPT-style token files (flat uint16), memory-mapped; never read whole."""
    train = _token_file(cfg.data.path)
    if cfg.data.val_path:
        val = _token_file(cfg.data.val_path)
    else:
        cut = int(len(train) * (1 - cfg.data.val_fraction))
        train, val = train[:cut], train[cut:]
    return packed(train, cfg.data.seq_len), packed(val, cfg.data.seq_len)


def load_synthetic(cfg: Config, vocab_size: int) -> tuple[Samples, Samples]:
    """Random tokens from the seed (for benchmarks); unpacked, documents of random length."""
    rng = np.random.default_rng(cfg.seed)
    stream = rng.integers(0, vocab_size, cfg.data.synthetic_tokens, dtype=np.int64).astype(np.uint16)
    cut = int(len(stream) * (1 - cfg.data.val_fraction))
    if cfg.data.pack:
        return packed(stream[:cut], cfg.data.seq_len), packed(stream[cut:], cfg.data.seq_len)
    bounds, offset = [], 0
    while offset < len(stream):
        length = int(rng.integers(2, 2 * cfg.data.seq_len + 2))
        bounds.append((offset, min(offset + length, len(stream))))
        offset += length
    train = [(b, e) for b, e in bounds if e <= cut]
    val = [(b, e) for b, e in bounds if b >= cut]
    return chunked(stream, train, cfg.data.seq_len), chunked(stream, val, cfg.data.seq_len)


def check_token_ids(samples: Samples, vocab_size: int, path: str, prefix: int = 1 << 20) -> None:
    """Token ids beyond the vocabulary would crash the embedding (a device-side assert on CUDA).
    Only a fixed prefix is scanned: the same on every rank, and cheap for a file of billions of tokens."""
    largest = int(np.max(samples.stream[:prefix])) if len(samples.stream) else 0
    if largest >= vocab_size:
        raise ConfigError(
            f"data.path: {path} holds token id {largest}, beyond model.vocab_size={vocab_size}; "
            f"set model.vocab_size to at least {largest + 1}"
        )


def load_data(cfg: Config, vocab_size: int) -> tuple[Samples, Samples]:
    if cfg.data.source == "stdlib":
        train, val = load_stdlib(cfg)
    elif cfg.data.source == "tokens":
        train, val = load_tokens(cfg)
        check_token_ids(train, vocab_size, cfg.data.path)
        check_token_ids(val, vocab_size, cfg.data.val_path or cfg.data.path)
    else:
        train, val = load_synthetic(cfg, vocab_size)
    if cfg.batch.global_size != FULL and len(train) < cfg.batch.global_size:
        raise ConfigError(
            f"data: the training split has {len(train)} samples of data.seq_len={cfg.data.seq_len}, fewer than "
            f"batch.global_size={cfg.batch.global_size}; use a smaller global size or more data"
        )
    if len(val) == 0:
        raise ConfigError("data: the validation split is empty; raise data.val_fraction or give data.val_path")
    return train, val


@dataclass
class GlobalBatchSampler:
    """Which samples each optimizer step uses: a function of the seed and the samples consumed only.

    The training samples are read as one endless stream of epochs. Epoch e is a permutation of all
    samples drawn from a generator seeded with ``(seed, e)``, of which the first ``len // global_size``
    whole global batches are used (the remainder is dropped, so no sample repeats within an epoch). A
    step takes the next ``size`` samples of the stream: step k of a run without a batch ramp is
    ``epoch = k // steps_per_epoch``. The sampler keeps no position of its own: the samples consumed
    (a function of the step) are the position, which makes resuming exact.
    """

    num_samples: int
    global_size: int
    seed: int

    def __post_init__(self):
        self.steps_per_epoch = self.num_samples // self.global_size
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"batch.global_size={self.global_size} is larger than the dataset ({self.num_samples} samples)"
            )
        self.epoch_length = self.steps_per_epoch * self.global_size  # samples of an epoch that are used
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            # SeedSequence mixes (seed, epoch) so that seed s, epoch 1 is not seed s + 1, epoch 0.
            epoch_seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(epoch_seed)
            self._epoch, self._order = epoch, torch.randperm(self.num_samples, generator=generator)
        return self._order

    def take(self, start: int, count: int) -> list[int]:
        """The sample indices at positions ``start .. start + count - 1`` of the stream (a batch-size ramp's
        step may run over the end of an epoch into the next)."""
        indices: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.epoch_length)
            taken = min(count, self.epoch_length - offset)
            indices += self._permutation(epoch)[offset : offset + taken].tolist()
            start, count = start + taken, count - taken
        return indices

    def global_batch(self, step: int) -> list[int]:
        """The ``global_size`` sample indices of optimizer step ``step`` (0-based) of a run without a ramp."""
        return self.take(step * self.global_size, self.global_size)


def rank_micro_batches(global_batch: list[int], plan: BatchPlan, rank: int) -> list[list[int]]:
    """The slice of a global batch that ``rank`` computes, cut into ``plan.accumulation`` micro-batches.

    The batch is cut into ``accumulation x world`` contiguous pieces of equal size (``micro_size`` each when
    the batch is ``micro x accumulation x world``; otherwise, a full batch that does not divide, sizes differing
    by at most one) and rank r takes pieces ``r * accumulation ..``: a contiguous block, so each rank's reads
    stay contiguous. Any disjoint split gives the same gradient.
    """
    pieces = plan.accumulation * plan.world_size
    cuts = [len(global_batch) * i // pieces for i in range(pieces + 1)]
    mine = range(rank * plan.accumulation, (rank + 1) * plan.accumulation)
    return [global_batch[cuts[i] : cuts[i + 1]] for i in mine]


def validation_batches(val: Samples, plan: BatchPlan, count: int) -> list[list[int]]:
    """``count`` fixed global batches of the validation split (in order, wrapping around)."""
    return [[(b * plan.global_size + i) % len(val) for i in range(plan.global_size)] for b in range(count)]
