"""The packed dataset on disk, its global order, per-rank shards and micro-batches (SPEC §1).

Global order. Sequence number g (0, 1, 2, … counted from the start of training, across epochs)
is the packed sequence ``perm_e[g mod N]`` with e = g div N and ``perm_e`` a permutation drawn from
``numpy.random.default_rng([data_seed, e])``: it depends only on the data seed and the epoch,
never on the strategy, the batch size split or the number of processes.

Optimizer step k consumes the global batch g ∈ [k·B, (k+1)·B). With W processes, rank r takes the
contiguous slice [r·B/W, (r+1)·B/W) of it and cuts that into micro-batches for gradient
accumulation; the masks are drawn for the whole global batch (seeded by step) and sliced the same
way. So one process with micro-batch 2b and two processes with micro-batch b see exactly the same
sequences and masks, and resuming at step k needs no state beyond k.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from budgetkd.data.masking import MaskingConfig, mask_tokens
from budgetkd.errors import BudgetKDError
from budgetkd.io import read_json


class PackedData:
    """A prepared dataset directory (see :mod:`budgetkd.data.prepare`)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        if not self.dir.is_dir():
            raise BudgetKDError(f"data directory not found: {self.dir} (create it with budgetkd prepare)")
        self.meta = read_json(self.dir / "meta.json", "dataset metadata (meta.json)")
        for key in ("seq_len", "vocab_size", "special_ids", "num_train_sequences"):
            if key not in self.meta:
                raise BudgetKDError(f"{self.dir / 'meta.json'} is malformed: missing {key!r}")
        self.seq_len = int(self.meta["seq_len"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.special_ids = self.meta["special_ids"]
        self.train = self._open("train", int(self.meta["num_train_sequences"]))
        self.valid = self._open("valid", int(self.meta.get("num_valid_sequences", 0)))
        if len(self.train) == 0:
            raise BudgetKDError(f"{self.dir / 'train.bin'} holds no sequence")

    def _open(self, split: str, rows: int) -> np.ndarray:
        """The split as a read-only memory map ``[rows, seq_len]``, checked against meta.json."""
        path = self.dir / f"{split}.bin"
        dtype = np.dtype(self.meta.get("dtype", "uint16"))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BudgetKDError(f"dataset file missing: {path}") from None
        if size != rows * self.seq_len * dtype.itemsize:
            raise BudgetKDError(
                f"dataset file {path} is corrupt or truncated: {size} bytes, meta.json promises "
                f"{rows} × {self.seq_len} {dtype.name} values"
            )
        if rows == 0:
            return np.zeros((0, self.seq_len), dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(rows, self.seq_len))

    @property
    def num_train(self) -> int:
        return len(self.train)

    def load_tokenizer(self):
        from budgetkd.data.tokenizer import load_tokenizer

        return load_tokenizer(self.dir / "tokenizer")


@lru_cache(maxsize=4)
def epoch_permutation(num_sequences: int, data_seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a function of (data seed, epoch) only."""
    return np.random.default_rng([data_seed, epoch]).permutation(num_sequences)


def global_indices(num_sequences: int, data_seed: int, start: int, count: int) -> np.ndarray:
    """Dataset rows of global sequence numbers ``start … start+count−1``."""
    numbers = np.arange(start, start + count)
    epochs = numbers // num_sequences
    rows = np.empty(count, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        rows[sel] = epoch_permutation(num_sequences, data_seed, int(epoch))[numbers[sel] % num_sequences]
    return rows


DEFAULT_MAX_MICRO_BATCH = 64


def resolve_micro_batch(batch_size: int, world_size: int, max_micro_batch: int | None = None) -> int:
    """The per-process micro-batch of a global batch ``B`` on ``W`` processes: the largest divisor
    of the per-process batch ``B/W`` that is at most ``max_micro_batch`` (what one device holds;
    default 64). Global batches — hence data, masks and results — do not depend on ``W``: only the
    number of accumulation steps ``B/W/b`` does (SPEC §1). So a config saying "global batch 1024,
    micro-batch at most 256" runs unchanged on 1 (256 × 4 accumulation), 8 (128 × 1) or 16 (64 × 1)
    processes. ``B`` not divisible by ``W`` is refused: ranks would see unequal slices."""
    if batch_size <= 0:
        raise BudgetKDError(f"batch size must be positive, got {batch_size}")
    if world_size <= 0:
        raise BudgetKDError(f"world size must be positive, got {world_size}")
    if max_micro_batch is not None and max_micro_batch <= 0:
        raise BudgetKDError(f"micro-batch size must be positive, got {max_micro_batch}")
    if batch_size % world_size:
        raise BudgetKDError(
            f"batch size {batch_size} is not divisible by the {world_size} processes; choose a global batch "
            f"that is a multiple of the world size"
        )
    per_rank = batch_size // world_size
    limit = min(per_rank, DEFAULT_MAX_MICRO_BATCH if max_micro_batch is None else max_micro_batch)
    return max(d for d in range(1, limit + 1) if per_rank % d == 0)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, L] with masking applied
    attention_mask: torch.Tensor  # [b, L], 1 = real token
    labels: torch.Tensor  # [b, L], −100 where nothing is predicted
    num_tokens: int  # real tokens
    # flat indices (row-major) of the predicted positions, computed here on the host so that the
    # step needs no ``nonzero()`` (a device sync) on the accelerator
    positions: torch.Tensor | None = None

    @property
    def num_predicted(self) -> int:
        if self.positions is not None:
            return int(self.positions.numel())
        return int((self.labels != -100).sum())

    @property
    def padded(self) -> bool:
        """Whether any position is padding (packed pretraining rows have none: the encoder then
        runs without an attention mask)."""
        return self.num_tokens != self.input_ids.numel()


class StepBatches:
    """Produces, for optimizer step k, this rank's micro-batches of the global batch k."""

    def __init__(
        self,
        data: PackedData,
        *,
        batch_size: int,
        micro_batch_size: int,
        data_seed: int,
        mask_seed: int,
        masking: MaskingConfig,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size % world_size:
            raise BudgetKDError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        per_rank = batch_size // world_size
        if micro_batch_size > per_rank:
            raise BudgetKDError(
                f"micro-batch size {micro_batch_size} is larger than the per-process batch {per_rank}"
            )
        if per_rank % micro_batch_size:
            raise BudgetKDError(
                f"per-process batch {per_rank} is not divisible by the micro-batch size {micro_batch_size}"
            )
        self.data = data
        self.batch_size = batch_size
        self.per_rank = per_rank
        self.micro_batch_size = micro_batch_size
        self.data_seed = data_seed
        self.mask_seed = mask_seed
        self.masking = masking
        self.rank = rank
        self.world_size = world_size
        self.pad_id = int(data.special_ids["pad"])

    @property
    def accumulation_steps(self) -> int:
        return self.per_rank // self.micro_batch_size

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masked ids, attention mask, labels) of the whole global batch of ``step``."""
        rows = global_indices(self.data.num_train, self.data_seed, step * self.batch_size, self.batch_size)
        ids = torch.from_numpy(self.data.train[np.sort(rows)][np.argsort(np.argsort(rows))].astype(np.int64))
        attention = (ids != self.pad_id).long()
        generator = torch.Generator().manual_seed(_mix(self.mask_seed, step))
        masked, labels = mask_tokens(ids, attention, self.masking, generator)
        return masked, attention, labels

    def micro_batches(self, step: int) -> list[MicroBatch]:
        masked, attention, labels = self.global_batch(step)
        lo = self.rank * self.per_rank
        out = []
        for start in range(lo, lo + self.per_rank, self.micro_batch_size):
            sl = slice(start, start + self.micro_batch_size)
            positions = (labels[sl].reshape(-1) != -100).nonzero().squeeze(1)
            out.append(MicroBatch(masked[sl], attention[sl], labels[sl], int(attention[sl].sum()), positions))
        return out

    def global_tokens(self, step: int) -> int:
        """Real tokens in the whole global batch (all ranks), without masking work."""
        rows = global_indices(self.data.num_train, self.data_seed, step * self.batch_size, self.batch_size)
        return int((self.data.train[np.sort(rows)] != self.pad_id).sum())


def validation_batches(
    data: PackedData, batch_size: int, masking: MaskingConfig, seed: int, max_sequences: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed masked validation batches: the same masks at every evaluation, so losses compare."""
    valid = data.valid if len(data.valid) else data.train[: max(1, min(len(data.train), 64))]
    if max_sequences is not None:
        valid = valid[:max_sequences]
    pad_id = int(data.special_ids["pad"])
    generator = torch.Generator().manual_seed(_mix(seed, 10_000_019))
    batches = []
    for start in range(0, len(valid), batch_size):
        ids = torch.from_numpy(np.asarray(valid[start : start + batch_size]).astype(np.int64))
        attention = (ids != pad_id).long()
        masked, labels = mask_tokens(ids, attention, masking, generator)
        batches.append((masked, attention, labels))
    return batches


def regroup_batches(
    batches: list[tuple[torch.Tensor, ...]], batch_size: int
) -> list[tuple[torch.Tensor, ...]]:
    """The same rows (and so the same masks) in the same order, cut into batches of
    ``batch_size`` (the last one may be smaller): validation at the training micro-batch's shape,
    which a compiled step has a graph for."""
    if not batches:
        return batches
    columns = [torch.cat(parts) for parts in zip(*batches)]
    starts = range(0, len(columns[0]), batch_size)
    return [tuple(column[start : start + batch_size] for column in columns) for start in starts]


def _mix(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step), well spread (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
