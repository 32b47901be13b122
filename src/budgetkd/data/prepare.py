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

import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from budgetkd.data.corpus import Source, iter_documents, resolve_sources, training_text_iterator
from budgetkd.data.packing import PackWriter, plan_validation
from budgetkd.data.tokenizer import load_tokenizer, train_wordpiece
from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_write_json, read_json, replace_dir, sha256_file, sha256_json

FORMAT_VERSION = 3
_ENCODE_BATCH_LINES = 2048


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


def _encode_documents(tokenizer, sources: list[Source], sink, progress: bool) -> tuple[list[int], list[int]]:
    """Tokenize every document (lines encoded in large batches by the Rust tokenizer) and append
    its ids to ``sink`` as int32; return the document lengths and the index of the input each
    document came from. Memory stays bounded by a batch."""
    lengths: list[int] = []
    groups: list[int] = []
    pending_lines: list[str] = []
    pending_doc_sizes: list[int] = []

    def flush() -> None:
        if not pending_lines:
            return
        encoded = tokenizer(pending_lines, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        start = 0
        for size in pending_doc_sizes:
            ids = np.fromiter(
                (token for line in encoded[start : start + size] for token in line), dtype=np.int32
            )
            sink.write(ids.tobytes())
            lengths.append(len(ids))
            start += size
        pending_lines.clear()
        pending_doc_sizes.clear()

    bar = tqdm(desc="tokenizing documents", unit="doc", disable=not progress)
    for source_index, source in enumerate(sources):
        for doc in iter_documents([source]):
            pending_lines.extend(doc)
            pending_doc_sizes.append(len(doc))
            groups.append(source_index)
            bar.update(1)
            if len(pending_lines) >= _ENCODE_BATCH_LINES:
                flush()
    flush()
    bar.close()
    return lengths, groups


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
) -> dict:
    """Build (or reuse) a packed dataset in ``out_dir``; return its ``meta.json`` content."""
    if (tokenizer is None) == (train_tokenizer is None):
        raise BudgetKDError("give exactly one of --tokenizer PATH_OR_HUB_ID and --train-tokenizer VOCAB_SIZE")
    if not 8 <= seq_len <= 8192:
        raise BudgetKDError(f"--seq-len {seq_len} is out of range (8..8192)")
    if not 0.0 <= validation_fraction < 0.5:
        raise BudgetKDError(f"--validation-fraction {validation_fraction} must lie in [0, 0.5)")
    if not isinstance(seed, int) or seed < 0:
        raise BudgetKDError(f"--seed must be a non-negative integer, got {seed!r}")
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
            lengths, groups = _encode_documents(tok, sources, sink, progress)
            lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0 or int(lengths.sum()) == 0:
            raise BudgetKDError(f"the corpus is empty: no text found in {', '.join(inputs)}")
        # Pass 2: hold out validation (needs lengths only), then pack both splits as streams.
        plan = plan_validation(lengths, validation_fraction, seed, np.asarray(groups))
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
