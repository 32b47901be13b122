"""Tokenizing chunks of documents, in this process or in a pool of worker processes.

A *chunk* is a list of documents (each a list of lines). :func:`encode_chunk` turns it into one
flat int32 array of token ids and the length of each document, with the Rust tokenizer's batch
encode and no per-token Python loop. ``budgetkd prepare`` feeds chunks in corpus order to a
process pool and writes the results back in that same order, so the output is byte-identical
whatever the number of workers (each chunk's result is a pure function of the chunk).

This module imports only numpy and ``tokenizers`` (not torch, transformers or datasets): a
spawned worker starts in a fraction of a second.
"""

from __future__ import annotations

import os
from itertools import chain

import numpy as np

_TOKENIZER = None  # the worker's tokenizer, set once by init_worker


def backend_json(tokenizer) -> str:
    """The serialised Rust tokenizer behind a HF fast tokenizer, without truncation or padding
    (``tokenizer(lines, add_special_tokens=False)`` applies none either)."""
    backend = tokenizer.backend_tokenizer
    from tokenizers import Tokenizer

    clone = Tokenizer.from_str(backend.to_str())
    clone.no_truncation()
    clone.no_padding()
    return clone.to_str()


def init_worker(tokenizer_json: str, threads: bool) -> None:
    """Pool initialiser: build the tokenizer once per worker. ``threads=False`` keeps each
    worker's encode single-threaded (the pool is the parallelism; no oversubscription)."""
    global _TOKENIZER
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOKENIZER = Tokenizer.from_str(tokenizer_json)


def encode_chunk(documents: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [Σ tokens], document lengths int64 [len(documents)]) of one chunk; the ids of
    a document are those of its lines, concatenated, without special tokens."""
    lines = [line for doc in documents for line in doc]
    if not lines:
        return np.zeros(0, dtype=np.int32), np.zeros(len(documents), dtype=np.int64)
    # encode_batch_fast (tokenizers ≥ 0.21) skips the offsets, which are not needed here
    encode = getattr(_TOKENIZER, "encode_batch_fast", _TOKENIZER.encode_batch)
    ids = [e.ids for e in encode(lines, add_special_tokens=False)]
    line_lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(line_lengths.sum()))
    bounds = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])])  # line index per doc
    tokens_before = np.concatenate([[0], np.cumsum(line_lengths)])
    return flat, (tokens_before[bounds[1:]] - tokens_before[bounds[:-1]]).astype(np.int64)
