"""Packing tokenized documents into fixed-length sequences (SPEC §1) and holding out validation.

Each split is one token stream ``doc₁ [SEP] doc₂ [SEP] …`` cut into chunks of ``seq_len − 2``
tokens; every sequence is ``[CLS] chunk [SEP]``, exactly ``seq_len`` long. The last chunk of a
split is shorter: it becomes ``[CLS] chunk [SEP] [PAD] …`` so that no token of any document is
lost. No next-sentence prediction, so no segment structure is needed.

:class:`PackWriter` does this as a stream straight into a file (memory independent of the corpus
size); :func:`pack_stream` is the same packing into an in-memory array.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

import numpy as np


class PackWriter:
    """Streams documents into packed rows of ``seq_len`` tokens, written to ``sink`` as raw
    ``dtype`` values (row-major), or kept in memory when ``sink`` is None."""

    def __init__(
        self,
        seq_len: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        dtype=np.int64,
        sink: BinaryIO | None = None,
    ):
        if seq_len < 4:
            raise ValueError("seq_len must be at least 4")
        self.seq_len, self.body = seq_len, seq_len - 2
        self.cls_id, self.sep_id, self.pad_id = cls_id, sep_id, pad_id
        self.dtype = np.dtype(dtype)
        self.sink = sink
        self.rows = 0
        self.real_tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._kept: list[np.ndarray] = []

    def add(self, document: np.ndarray) -> None:
        """Append one document (followed by its boundary [SEP]); empty documents are skipped."""
        if len(document) == 0:
            return
        self._pending.append(np.asarray(document, dtype=np.int64))
        self._pending.append(np.array([self.sep_id], dtype=np.int64))
        self._pending_len += len(document) + 1
        # Keep one extra token back: a stream ending exactly on a row boundary + its final [SEP]
        # must not produce a row made of that [SEP] alone (see finish).
        if self._pending_len > self.body * 64:
            self._flush(final=False)

    def _emit(self, rows: np.ndarray) -> None:
        self.rows += len(rows)
        self.real_tokens += int((rows != self.pad_id).sum())
        rows = rows.astype(self.dtype, copy=False)
        if self.sink is not None:
            self.sink.write(rows.tobytes())
        else:
            self._kept.append(rows)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.int64)
        if final and len(stream) % self.body == 1:
            stream = stream[:-1]  # a row holding only the last boundary [SEP] carries no text
        num_full = len(stream) // self.body
        if not final and num_full * self.body >= len(stream):
            num_full -= 1  # hold the tail back so that `final` can still see it
        if num_full > 0:
            rows = np.full((num_full, self.seq_len), self.pad_id, dtype=np.int64)
            rows[:, 0] = self.cls_id
            rows[:, 1:-1] = stream[: num_full * self.body].reshape(num_full, self.body)
            rows[:, -1] = self.sep_id
            self._emit(rows)
        rest = stream[max(num_full, 0) * self.body :]
        if final and len(rest):
            row = np.full((1, self.seq_len), self.pad_id, dtype=np.int64)
            row[0, 0] = self.cls_id
            row[0, 1 : 1 + len(rest)] = rest
            row[0, 1 + len(rest)] = self.sep_id
            self._emit(row)
            rest = rest[:0]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)

    def finish(self) -> np.ndarray | None:
        """Write the last (padded) row; return the rows when kept in memory."""
        self._flush(final=True)
        if self.sink is None:
            if not self._kept:
                return np.zeros((0, self.seq_len), dtype=self.dtype)
            return np.concatenate(self._kept)
        return None


def pack_stream(
    documents: Iterable[np.ndarray], seq_len: int, cls_id: int, sep_id: int, pad_id: int
) -> np.ndarray:
    """Pack ``documents`` (1-D id arrays) into an ``[N, seq_len]`` array; see the module docstring."""
    writer = PackWriter(seq_len, cls_id, sep_id, pad_id)
    for document in documents:
        writer.add(document)
    return writer.finish()


def plan_validation(
    lengths: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None
) -> dict[int, tuple[int, int]]:
    """Which tokens to hold out: ``{document index: (start, end)}`` covering about ``fraction``
    of all tokens — and of each group's tokens (``groups``: e.g. the input file or dataset of each
    document), so that the validation split mirrors the corpus mixture instead of whichever
    source a few random documents came from.

    Within a group, whole documents are taken in a seeded order; when the next document would
    overshoot the remaining target by more than 2× (a long book), only a contiguous block from its
    end is held out and the rest stays in training. Needs only the lengths, so it runs before
    packing.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if fraction <= 0 or len(lengths) == 0:
        return {}
    groups = np.zeros(len(lengths), dtype=np.int64) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    held: dict[int, tuple[int, int]] = {}
    for group in np.unique(groups):
        members = np.flatnonzero(groups == group)
        target = int(round(fraction * int(lengths[members].sum())))
        taken = 0
        for index in members[rng.permutation(len(members))]:
            need = target - taken
            if need <= 0:
                break
            length = int(lengths[index])
            if length <= 2 * need:
                held[int(index)] = (0, length)
                taken += length
            else:
                held[int(index)] = (length - need, length)
                taken += need
    return held


def split_validation(
    documents: list[np.ndarray], fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train documents, validation documents) per :func:`plan_validation`, train in order."""
    plan = plan_validation(np.array([len(d) for d in documents], dtype=np.int64), fraction, seed, groups)
    train, validation = [], []
    for index, doc in enumerate(documents):
        if index in plan:
            start, end = plan[index]
            if start > 0:
                train.append(doc[:start])
            validation.append(doc[start:end])
        else:
            train.append(doc)
    return train, validation
