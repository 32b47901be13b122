"""``budgetkd prepare``: corpus → tokenizer → packed, memory-mapped training data.

Output directory layout::

    DATA_DIR/meta.json       counts, seq_len, dtype, special ids, input fingerprint
    DATA_DIR/train.bin       [num_train_sequences, seq_len] token ids, raw ``dtype`` (uint16 for
                             vocabularies up to 65,535, else int32), row-major: np.memmap
    DATA_DIR/valid.bin       [num_valid_sequences, seq_len], the held-out split
    DATA_DIR/tokenizer/      the tokenizer, saved with ``save_pretrained``

The directory is written under a temporary name and renamed into place, so an interrupted
``prepare`` never leaves a half-written dataset. Re-running with the same inputs and options
finds the same fingerprint and reuses the result.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections import deque
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from budgetkd.data.corpus import Source, iter_documents, resolve_sources, training_text_iterator
from budgetkd.data.packing import PackWriter, plan_validation
from budgetkd.data.tokenizer import load_tokenizer, train_wordpiece
from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_write_json, read_json, replace_dir, sha256_file, sha256_json

FORMAT_VERSION = 3
_CHUNK_LINES = 2048  # lines per tokenization chunk (≈ 100–300 kB of text)


def _tokenizer_fingerprint(tokenizer_spec: str | None, train_vocab: int | None) -> str:
    if train_vocab is not None:
        return f"train-wordpiece:{train_vocab}"
    path = Path(str(tokenizer_spec))
    if path.is_file():
        return "file:" + sha256_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return "dir:" + sha256_json({p.name: sha256_file(p) for p in files})
    return "hub:" + str(tokenizer_spec)


def dataset_fingerprint(
    sources: list[Source],
    tokenizer_spec: str | None,
    train_vocab: int | None,
    seq_len: int,
    fraction: float,
    seed: int,
) -> str:
    return sha256_json(
        {
            "format": FORMAT_VERSION,
            "inputs": [(s.kind, s.fingerprint) for s in sources],
            "tokenizer": _tokenizer_fingerprint(tokenizer_spec, train_vocab),
            "seq_len": seq_len,
            "validation_fraction": fraction,
            "seed": seed,
        }
    )


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a Slurm allocation)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _chunks(sources: list[Source]):
    """(source index, documents) chunks of about ``_CHUNK_LINES`` lines, in corpus order."""
    for source_index, source in enumerate(sources):
        chunk: list[list[str]] = []
        lines = 0
        for doc in iter_documents([source]):
            chunk.append(doc)
            lines += len(doc)
            if lines >= _CHUNK_LINES:
                yield source_index, chunk
                chunk, lines = [], 0
        if chunk:
            yield source_index, chunk


def _encode_documents(
    tokenizer, sources: list[Source], sink, progress: bool, workers: int = 1
) -> tuple[np.ndarray, np.ndarray, float]:
    """Tokenize every document and append its ids to ``sink`` as int32, in corpus order; return
    (document lengths, index of the input each document came from, seconds spent).

    Documents are read in this process and tokenized in chunks (:mod:`budgetkd.data.encode`) —
    here, or by ``workers`` spawned processes when there is more than one chunk. At most
    ``2·workers + 2`` chunks are in flight and results are written in submission order, so
    memory stays bounded by a few chunks and the bytes written do not depend on ``workers``."""
    from budgetkd.data import encode

    tokenizer_json = encode.backend_json(tokenizer)
    lengths: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    bar = tqdm(desc="tokenizing", unit="tok", unit_scale=True, disable=not progress)
    started = time.perf_counter()

    def write(source_index: int, result) -> None:
        flat, doc_lengths = result
        sink.write(flat.tobytes())
        lengths.append(doc_lengths)
        groups.append(np.full(len(doc_lengths), source_index, dtype=np.int64))
        bar.update(len(flat))

    pool = None
    pending: deque = deque()
    chunks = _chunks(sources)
    try:
        first = next(chunks, None)
        second = next(chunks, None) if first is not None else None
        if second is None or workers <= 1:
            # one process: the Rust tokenizer may use its own threads (TOKENIZERS_PARALLELISM)
            encode.init_worker(tokenizer_json, threads=True)
            for source_index, chunk in chain([c for c in (first, second) if c is not None], chunks):
                write(source_index, encode.encode_chunk(chunk))
        else:
            # fork where there is one (as DataLoader and datasets.map do): workers start at once and
            # need no importable __main__; init_worker turns the forked child's tokenizer threads
            # off, since the parent's Rust thread pool does not survive a fork
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = context.Pool(workers, initializer=encode.init_worker, initargs=(tokenizer_json, False))
            for source_index, chunk in chain([first, second], chunks):
                pending.append((source_index, pool.apply_async(encode.encode_chunk, (chunk,))))
                while len(pending) > 2 * workers + 1:
                    index, result = pending.popleft()
                    write(index, result.get())
            while pending:
                index, result = pending.popleft()
                write(index, result.get())
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    elapsed = time.perf_counter() - started
    if not lengths:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), elapsed
    return np.concatenate(lengths), np.concatenate(groups), elapsed


def prepare_dataset(
    inputs: list[str],
    out_dir: str | Path,
    *,
    tokenizer: str | None = None,
    train_tokenizer: int | None = None,
    seq_len: int = 128,
    validation_fraction: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Build (or reuse) a packed dataset in ``out_dir``; return its ``meta.json`` content.

    ``workers``: tokenizing processes (default: every available core); the output does not depend
    on it."""
    if (tokenizer is None) == (train_tokenizer is None):
        raise BudgetKDError("give exactly one of --tokenizer PATH_OR_HUB_ID and --train-tokenizer VOCAB_SIZE")
    if not 8 <= seq_len <= 8192:
        raise BudgetKDError(f"--seq-len {seq_len} is out of range (8..8192)")
    if not 0.0 <= validation_fraction < 0.5:
        raise BudgetKDError(f"--validation-fraction {validation_fraction} must lie in [0, 0.5)")
    if not isinstance(seed, int) or seed < 0:
        raise BudgetKDError(f"--seed must be a non-negative integer, got {seed!r}")
    if workers is not None and workers < 1:
        raise BudgetKDError(f"--workers must be at least 1, got {workers}")
    workers = available_cores() if workers is None else workers
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BudgetKDError(f"--out {out_dir} is a file, not a directory")
    sources = resolve_sources(inputs)
    fingerprint = dataset_fingerprint(sources, tokenizer, train_tokenizer, seq_len, validation_fraction, seed)

    meta_path = out_dir / "meta.json"
    if meta_path.exists():
        meta = read_json(meta_path, "dataset metadata")
        if meta.get("fingerprint") == fingerprint and (out_dir / "train.bin").exists():
            return meta
        raise BudgetKDError(
            f"{out_dir} already holds a prepared dataset from other inputs or options; choose another --out"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BudgetKDError(f"{out_dir} exists and is not a budgetkd dataset; choose an empty or new --out")

    started = time.perf_counter()
    if train_tokenizer is not None:
        tok = train_wordpiece(training_text_iterator(sources), train_tokenizer)
    else:
        tok = load_tokenizer(tokenizer)
    ids = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id}
    vocab_size = len(tok)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        # Pass 1: tokens of every document into one flat int32 file (the corpus never sits in memory).
        with open(tmp / "documents.tmp", "wb") as sink:
            lengths, groups, encode_s = _encode_documents(tok, sources, sink, progress, workers)
        if progress:
            print(
                f"tokenized {int(lengths.sum()):,} tokens in {encode_s:.1f} s "
                f"({lengths.sum() / max(encode_s, 1e-9):,.0f} tokens/s, {workers} worker(s))",
                flush=True,
            )
        if len(lengths) == 0 or int(lengths.sum()) == 0:
            raise BudgetKDError(f"the corpus is empty: no text found in {', '.join(inputs)}")
        # Pass 2: hold out validation (needs lengths only), then pack both splits as streams.
        plan = plan_validation(lengths, validation_fraction, seed, groups)
        tokens = np.memmap(tmp / "documents.tmp", dtype=np.int32, mode="r")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        counts = {"train": 0, "valid": 0}
        with open(tmp / "train.bin", "wb") as train_sink, open(tmp / "valid.bin", "wb") as valid_sink:
            writers = {
                "train": PackWriter(seq_len, ids["cls"], ids["sep"], ids["pad"], dtype, train_sink),
                "valid": PackWriter(seq_len, ids["cls"], ids["sep"], ids["pad"], dtype, valid_sink),
            }
            for index in tqdm(range(len(lengths)), desc="packing", unit="doc", disable=not progress):
                doc = tokens[offsets[index] : offsets[index + 1]]
                if index in plan:
                    start, end = plan[index]
                    if start > 0:
                        writers["train"].add(doc[:start])
                        counts["train"] += 1
                    writers["valid"].add(doc[start:end])
                    counts["valid"] += 1
                elif len(doc):
                    writers["train"].add(doc)
                    counts["train"] += 1
            for writer in writers.values():
                writer.finish()
        del tokens
        os.unlink(tmp / "documents.tmp")
        if writers["train"].rows == 0:
            raise BudgetKDError(
                "the corpus is too small: no training sequence left after holding out validation"
            )
        tok.save_pretrained(str(tmp / "tokenizer"))
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "inputs": [s.name for s in sources],
            "tokenizer": tokenizer if tokenizer is not None else f"trained WordPiece ({train_tokenizer})",
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "dtype": np.dtype(dtype).name,
            "special_ids": {**ids, "mask": tok.mask_token_id, "all": sorted(set(tok.all_special_ids))},
            "validation_fraction": validation_fraction,
            "seed": seed,
            "num_documents": int((lengths > 0).sum()),
            "num_train_documents": counts["train"],
            "num_valid_documents": counts["valid"],
            "num_train_sequences": writers["train"].rows,
            "num_valid_sequences": writers["valid"].rows,
            "num_train_tokens": writers["train"].real_tokens,
            "num_valid_tokens": writers["valid"].real_tokens,
            "num_document_tokens": int(lengths.sum()),
            "prepare_seconds": round(time.perf_counter() - started, 2),
        }
        atomic_write_json(tmp / "meta.json", meta)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
