"""Packing tokenized documents into fixed-length sequences (SPEC §1) and holding out validation.

Each split is one token stream ``doc₁ [SEP] doc₂ [SEP] …`` cut into chunks of ``seq_len − 2``
tokens; every sequence is ``[CLS] chunk [SEP]``, exactly ``seq_len`` long. The last chunk of a
split is shorter: it becomes ``[CLS] chunk [SEP] [PAD] …`` so that no token of any document is
lost. No next-sentence prediction, so no segment structure is needed.
"""

from __future__ import annotations

import numpy as np


def pack_stream(
    documents: list[np.ndarray], seq_len: int, cls_id: int, sep_id: int, pad_id: int
) -> np.ndarray:
    """Pack ``documents`` (1-D id arrays) into an ``[N, seq_len]`` array; see the module docstring."""
    if seq_len < 4:
        raise ValueError("seq_len must be at least 4")
    body = seq_len - 2
    pieces: list[np.ndarray] = []
    sep = np.array([sep_id], dtype=np.int64)
    for doc in documents:
        if len(doc):
            pieces.append(np.asarray(doc, dtype=np.int64))
            pieces.append(sep)
    if not pieces:
        return np.zeros((0, seq_len), dtype=np.int64)
    stream = np.concatenate(pieces)
    # A chunk that would consist only of the final [SEP] carries no text: drop that [SEP].
    if len(stream) % body == 1:
        stream = stream[:-1]
    num_full, rest = divmod(len(stream), body)
    rows = num_full + (1 if rest else 0)
    packed = np.full((rows, seq_len), pad_id, dtype=np.int64)
    packed[:, 0] = cls_id
    if num_full:
        packed[:num_full, 1 : seq_len - 1] = stream[: num_full * body].reshape(num_full, body)
        packed[:num_full, seq_len - 1] = sep_id
    if rest:
        packed[num_full, 1 : 1 + rest] = stream[num_full * body :]
        packed[num_full, 1 + rest] = sep_id
    return packed


def split_validation(
    documents: list[np.ndarray], fraction: float, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold out about ``fraction`` of the tokens as validation: whole documents, chosen in a seeded
    order; when the next document would overshoot the target by far (a long book), a contiguous
    block from its end is taken instead and the rest stays in training.

    Returns (train_documents, validation_documents), train in the original order.
    """
    if fraction <= 0 or not documents:
        return list(documents), []
    total = sum(len(d) for d in documents)
    target = int(round(fraction * total))
    order = np.random.default_rng(seed).permutation(len(documents))
    held: dict[int, np.ndarray] = {}
    kept_prefix: dict[int, np.ndarray] = {}
    taken = 0
    for index in order:
        need = target - taken
        if need <= 0:
            break
        doc = documents[index]
        if len(doc) <= 2 * need or len(doc) == 0:
            held[int(index)] = doc
            taken += len(doc)
        else:
            held[int(index)] = doc[len(doc) - need :]
            kept_prefix[int(index)] = doc[: len(doc) - need]
            taken += need
    train = []
    for index, doc in enumerate(documents):
        if index in kept_prefix:
            train.append(kept_prefix[index])
        elif index not in held:
            train.append(doc)
    validation = [held[i] for i in sorted(held)]
    return train, validation
