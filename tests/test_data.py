"""Pretraining data (SPEC §1): packing, the validation split, prepare's reuse/refusal, masking
statistics and the data order — checked against hand-written expectations, binomial statistics
and independent re-computations (re-tokenising the corpus, numpy permutations), never against
the code's own output."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SEQ_LEN, VALIDATION_FRACTION, VOCAB

from budgetkd.data import MaskingConfig, PackedData, StepBatches, mask_tokens, prepare_dataset
from budgetkd.data.packing import PackWriter, pack_stream, split_validation
from budgetkd.errors import BudgetKDError

CLS, SEP, PAD = 2, 3, 0  # hand-made ids; real ids come from meta.json


# ------------------------------------------------------------------------------------------------
# helpers (independent of budgetkd)
# ------------------------------------------------------------------------------------------------


def check_rows_and_unpack(packed: np.ndarray, seq_len: int, cls: int, sep: int, pad: int) -> list[int]:
    """Assert the packing invariants and return the token stream the rows carry.

    Every row: exactly ``seq_len`` ids, ``[CLS]`` first, ``[SEP]`` as last real token, padding
    only at the tail and only in the last row. The stream is each row without its ``[CLS]``,
    its closing ``[SEP]`` and its padding, concatenated.
    """
    assert packed.ndim == 2 and packed.shape[1] == seq_len
    stream: list[int] = []
    for number, row in enumerate(np.asarray(packed).tolist()):
        assert len(row) == seq_len
        assert row[0] == cls, f"row {number} does not start with [CLS]"
        real = len(row)
        while real and row[real - 1] == pad:
            real -= 1
        assert pad not in row[:real], f"row {number}: padding inside the row"
        if real < seq_len:
            assert number == len(packed) - 1, f"row {number} is padded but is not the last row"
        assert row[real - 1] == sep, f"row {number} does not end with [SEP]"
        assert cls not in row[1:real], f"row {number}: [CLS] inside the row"
        stream.extend(row[1 : real - 1])
    return stream


def split_at(stream: list[int], sep: int) -> list[list[int]]:
    docs, current = [], []
    for token in stream:
        if token == sep:
            docs.append(current)
            current = []
        else:
            current.append(token)
    if current:
        docs.append(current)
    return docs


def find_block(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Index of ``needle`` as a contiguous block of ``haystack`` (int32 arrays), or −1."""
    hay, pin = haystack.astype(np.int32).tobytes(), needle.astype(np.int32).tobytes()
    start = hay.find(pin)
    while start != -1 and start % 4:
        start = hay.find(pin, start + 1)
    return -1 if start == -1 else start // 4


def expected_count(n: int) -> set[int]:
    """round(0.15·n); at an exact .5 tie either neighbour is a correct rounding."""
    x = Fraction(3 * n, 20)
    if x.denominator == 2:
        return {math.floor(x), math.ceil(x)}
    return {round(x)}


# ------------------------------------------------------------------------------------------------
# packing and the validation split on hand-made documents
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("docs", "seq_len", "expected"),
    [
        # stream 10 11 12 S 13 14 S 15 [S dropped: it would be a chunk of its own]; body 4
        (
            [[10, 11, 12], [13, 14], [15]],
            6,
            [[CLS, 10, 11, 12, SEP, SEP], [CLS, 13, 14, SEP, 15, SEP]],
        ),
        # stream 10 11 12 13 14 S (6 tokens): one full chunk of 4, the rest padded
        ([[10, 11, 12, 13, 14]], 6, [[CLS, 10, 11, 12, 13, SEP], [CLS, 14, SEP, SEP, PAD, PAD]]),
        # an empty document contributes nothing (not even a separator); stream 10 S 11 S, body 6
        ([[10], [], [11]], 8, [[CLS, 10, SEP, 11, SEP, SEP, PAD, PAD]]),
        # stream 10 11 S 12 S (5 tokens) fills exactly one body of 5
        ([[10, 11], [12]], 7, [[CLS, 10, 11, SEP, 12, SEP, SEP]]),
    ],
)
def test_pack_stream_hand_counted(docs, seq_len, expected):
    packed = pack_stream([np.array(d, dtype=np.int64) for d in docs], seq_len, CLS, SEP, PAD)
    assert packed.tolist() == expected


@pytest.mark.parametrize("seq_len", [4, 5, 8, 16, 64])
@pytest.mark.parametrize(("seed", "num_docs"), [(0, 25), (1, 25), (2, 400), (3, 400)])
def test_pack_stream_invariants_and_no_token_lost(seq_len, seed, num_docs):
    """Many documents make the writer flush full rows while it streams (more than 64 rows)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 3 * seq_len, size=num_docs)
    docs = [rng.integers(10, 500, size=n) for n in lengths]
    packed = pack_stream(docs, seq_len, CLS, SEP, PAD)
    stream = check_rows_and_unpack(packed, seq_len, CLS, SEP, PAD)
    # The documents come back, in order, each followed by [SEP] (the very last one may be dropped).
    non_empty = [d.tolist() for d in docs if len(d)]
    assert split_at(stream, SEP) == non_empty
    # Streaming into a file gives the same rows, as raw values of the requested dtype.
    sink = io.BytesIO()
    writer = PackWriter(seq_len, CLS, SEP, PAD, dtype=np.uint16, sink=sink)
    for doc in docs:
        writer.add(doc)
    writer.finish()
    assert writer.rows == len(packed) and writer.real_tokens == int((packed != PAD).sum())
    assert np.array_equal(np.frombuffer(sink.getvalue(), dtype=np.uint16).reshape(-1, seq_len), packed)
    # Same thing as a multiset of the non-special tokens.
    body = np.concatenate([np.asarray(d) for d in non_empty])
    assert sorted(t for t in packed.ravel().tolist() if t not in (CLS, SEP, PAD)) == sorted(body.tolist())
    # The row count is the minimum: ceil(stream / (seq_len − 2)).
    assert len(packed) == math.ceil(len(stream) / (seq_len - 2))


@pytest.mark.parametrize(
    ("length", "rows"), [(399, 100), (400, 100), (401, 101), (402, 101), (4 * 64 + 3, 65)]
)
def test_pack_stream_long_document_row_count(length, rows):
    """seq_len 6 (body 4), one document of n tokens: stream n+1 tokens with its [SEP]; a row
    holding only that final [SEP] is not made, so rows = ceil(n / 4) … unless n ≡ 0 mod 4
    where the [SEP] alone would overflow: n=399 → 100, n=400 → 100 (SEP dropped), n=401 → 101."""
    doc = np.arange(10, 10 + length)
    packed = pack_stream([doc], 6, CLS, SEP, PAD)
    assert len(packed) == rows
    stream = check_rows_and_unpack(packed, 6, CLS, SEP, PAD)
    assert split_at(stream, SEP) == [doc.tolist()]


def test_pack_stream_no_documents():
    assert pack_stream([], 8, CLS, SEP, PAD).shape == (0, 8)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.3])
def test_split_validation_holds_whole_documents_or_a_contiguous_block(fraction):
    rng = np.random.default_rng(3)
    # distinct tokens everywhere so that blocks can be matched unambiguously
    tokens = rng.permutation(200_000) + 10
    lengths = [int(x) for x in rng.integers(1, 4000, size=30)] + [60_000]  # one long "book"
    docs, start = [], 0
    for n in lengths:
        docs.append(tokens[start : start + n])
        start += n
    total = sum(lengths)
    train, valid = split_validation(docs, fraction, seed=11)
    # Walk the original documents in order: each is whole in train, whole in validation, or a
    # train prefix followed by a validation suffix (one contiguous block taken from its end).
    ti = vi = 0
    for doc in docs:
        if ti < len(train) and np.array_equal(train[ti], doc[: len(train[ti])]):
            if len(train[ti]) == len(doc):
                ti += 1
                continue
            assert vi < len(valid) and np.array_equal(valid[vi], doc[len(train[ti]) :])
            ti += 1
            vi += 1
        else:
            assert vi < len(valid) and np.array_equal(valid[vi], doc), "a document was lost or cut up"
            vi += 1
    assert ti == len(train) and vi == len(valid)
    held = sum(len(v) for v in valid)
    target = round(fraction * total)
    assert target <= held <= 2 * target
    assert sum(len(t) for t in train) + held == total


def test_split_validation_zero_fraction_keeps_everything():
    docs = [np.arange(5), np.arange(7)]
    train, valid = split_validation(docs, 0.0, seed=0)
    assert valid == [] and [d.tolist() for d in train] == [d.tolist() for d in docs]


# ------------------------------------------------------------------------------------------------
# the prepared real data
# ------------------------------------------------------------------------------------------------


def tokenize_corpus_independently(tokenizer_dir: Path, inputs: list[str]) -> np.ndarray:
    """All non-empty stripped lines of every input file, tokenised one by one, concatenated."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids: list[int] = []
    for path in inputs:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
        lines = [line for line in lines if line]
        for encoded in tokenizer(lines, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
    return np.asarray(ids, dtype=np.int64)


def read_split(data_dir: Path, meta: dict, split: str) -> np.ndarray:
    """A split as documented in prepare.py: raw row-major ``meta['dtype']`` values, no header."""
    raw = np.fromfile(data_dir / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
    rows = meta[f"num_{split}_sequences"]
    assert raw.size == rows * meta["seq_len"], f"{split}.bin does not hold {rows} rows"
    return raw.reshape(rows, meta["seq_len"]).astype(np.int64)


def test_prepared_data_layout_and_meta(data_dir, data_meta):
    assert data_meta["seq_len"] == SEQ_LEN
    assert data_meta["vocab_size"] == VOCAB
    assert data_meta["dtype"] == "uint16"  # a 2000-entry vocabulary fits
    train = read_split(data_dir, data_meta, "train")
    valid = read_split(data_dir, data_meta, "valid")
    assert len(train) > 1000 and len(valid) > 0
    data = PackedData(data_dir)
    assert np.array_equal(np.asarray(data.train), train) and np.array_equal(np.asarray(data.valid), valid)
    ids = data_meta["special_ids"]
    assert data_meta["num_train_tokens"] == int((np.asarray(train) != ids["pad"]).sum())
    assert data_meta["num_valid_tokens"] == int((np.asarray(valid) != ids["pad"]).sum())
    tokenizer = json.loads((data_dir / "tokenizer" / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    assert len(vocab) == VOCAB
    for name, token in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]")):
        assert vocab[token] == ids[name]


def test_prepared_real_data_loses_no_token(data_dir, data_meta, main_inputs):
    """Packed train + validation streams are exactly the tokenised corpus: the train documents
    in order, the validation documents as contiguous blocks cut out of it."""
    ids = data_meta["special_ids"]
    corpus = tokenize_corpus_independently(data_dir / "tokenizer", main_inputs)
    assert data_meta["num_document_tokens"] == len(corpus)

    streams = {}
    for split in ("train", "valid"):
        packed = read_split(data_dir, data_meta, split)
        streams[split] = check_rows_and_unpack(packed, SEQ_LEN, ids["cls"], ids["sep"], ids["pad"])
    train_docs = [np.asarray(d) for d in split_at(streams["train"], ids["sep"])]
    valid_docs = [np.asarray(d) for d in split_at(streams["valid"], ids["sep"])]
    assert sum(map(len, train_docs)) + sum(map(len, valid_docs)) == len(corpus)

    # multiset equality of all non-special tokens
    packed_tokens = np.concatenate(train_docs + valid_docs)
    assert np.array_equal(np.bincount(packed_tokens, minlength=VOCAB), np.bincount(corpus, minlength=VOCAB))

    # validation: contiguous blocks of the corpus; what remains is the train stream, in order
    keep = np.ones(len(corpus), dtype=bool)
    for block in valid_docs:
        at = find_block(corpus, block)
        assert at >= 0, "a validation document is not a contiguous block of the corpus"
        assert keep[at : at + len(block)].all()
        keep[at : at + len(block)] = False
    assert np.array_equal(corpus[keep], np.concatenate(train_docs))

    held = sum(map(len, valid_docs))
    assert VALIDATION_FRACTION * len(corpus) - 1 <= held <= 2 * VALIDATION_FRACTION * len(corpus) + 1


def _snapshot(directory: Path) -> dict:
    return {
        p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_prepare_reuses_same_inputs_and_refuses_others(data_dir, data_meta, main_inputs):
    before = _snapshot(data_dir)
    options = dict(train_tokenizer=VOCAB, seq_len=SEQ_LEN, validation_fraction=VALIDATION_FRACTION)
    again = prepare_dataset(main_inputs, data_dir, progress=False, **options)
    assert again["fingerprint"] == data_meta["fingerprint"]
    assert _snapshot(data_dir) == before, "re-running prepare rewrote the dataset"
    with pytest.raises(BudgetKDError, match="other inputs"):
        prepare_dataset(main_inputs[:2], data_dir, progress=False, **options)
    with pytest.raises(BudgetKDError, match="other inputs"):
        prepare_dataset(main_inputs, data_dir, progress=False, **{**options, "seq_len": 2 * SEQ_LEN})
    assert _snapshot(data_dir) == before


def test_prepare_with_a_trained_tokenizer_is_deterministic(main_inputs, tmp_path):
    """The same corpus prepared three times gives the same vocabulary and the same ids, bytes
    for bytes — so data re-prepared from the same text matches a teacher trained on it."""
    inputs = main_inputs[:2]  # two books
    outputs = []
    for name in ("first", "second", "third"):
        meta = prepare_dataset(
            inputs, tmp_path / name, train_tokenizer=VOCAB, seq_len=SEQ_LEN, progress=False
        )
        vocab = json.loads((tmp_path / name / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
        outputs.append((meta["fingerprint"], vocab, (tmp_path / name / "train.bin").read_bytes()))
    assert outputs[0][0] == outputs[1][0] == outputs[2][0]  # prepare claims they are the same data
    assert sorted(outputs[0][1]) == sorted(outputs[1][1]) == sorted(outputs[2][1]), (
        "learned token sets differ"
    )
    assert outputs[0][1] == outputs[1][1] == outputs[2][1]
    assert outputs[0][2] == outputs[1][2] == outputs[2][2]


def test_prepare_with_a_given_tokenizer_is_deterministic(data_dir, main_inputs, tmp_path):
    """With a fixed tokenizer (the teacher's), preparing twice gives identical bytes."""
    for name in ("first", "second"):
        prepare_dataset(
            main_inputs[:2],
            tmp_path / name,
            tokenizer=str(data_dir / "tokenizer"),
            seq_len=SEQ_LEN,
            progress=False,
        )
    for split in ("train.bin", "valid.bin", "meta.json"):
        first, second = (tmp_path / n / split for n in ("first", "second"))
        if split == "meta.json":
            a, b = json.loads(first.read_text()), json.loads(second.read_text())
            a.pop("prepare_seconds"), b.pop("prepare_seconds")
            assert a == b
        else:
            assert first.read_bytes() == second.read_bytes()


def test_prepare_refuses_a_foreign_non_empty_directory(main_inputs, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(BudgetKDError, match="not a budgetkd dataset"):
        prepare_dataset(main_inputs[:1], tmp_path, train_tokenizer=200, seq_len=SEQ_LEN, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# masking on real data
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_batch(data_dir):
    data = PackedData(data_dir)
    ids = torch.from_numpy(np.asarray(data.train[:2000]).astype(np.int64))
    # include the padded last rows of both splits
    tail = torch.from_numpy(np.asarray(np.concatenate([data.train[-1:], data.valid[-1:]])).astype(np.int64))
    ids = torch.cat([ids, tail])
    special = data.special_ids
    attention = (ids != special["pad"]).long()
    assert (attention == 0).any()
    config = MaskingConfig(
        vocab_size=data.vocab_size, mask_id=special["mask"], special_ids=tuple(special["all"])
    )
    return ids, attention, config


def _z(observed: float, p: float, n: int) -> float:
    """How many binomial standard deviations ``observed`` (a proportion of n) lies from p."""
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


def test_masking_statistics_on_real_data(real_batch):
    ids, attention, config = real_batch
    masked, labels = mask_tokens(ids, attention, config, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(config.special_ids))
    candidates = attention.bool() & ~special
    selected = labels != -100
    n = int(candidates.sum())
    k = int(selected.sum())
    assert n > 100_000
    # Never a special token or padding; labels are the original ids.
    assert not (selected & ~candidates).any()
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    # With n ≈ 1.2e5 candidates the selected fraction has binomial std sqrt(.15·.85/n) ≈ 0.001;
    # 5 std (two-sided p ≈ 6e-7) is ±0.005, tight enough to catch 14 % or 16 %.
    assert _z(k / n, 0.15, n) < 5
    # Of the k ≈ 1.8e4 selected: 80 % [MASK], 10 % a random non-special id, 10 % unchanged
    # (a random draw equal to the original, probability 1/R, also looks unchanged).
    r = len(config.replaceable_ids())
    is_mask = selected & (masked == config.mask_id)
    unchanged = selected & (masked == ids)
    random = selected & ~is_mask & ~unchanged
    assert _z(int(is_mask.sum()) / k, 0.8, k) < 5
    assert _z(int(random.sum()) / k, 0.1 * (1 - 1 / r), k) < 5
    assert _z(int(unchanged.sum()) / k, 0.1 + 0.1 / r, k) < 5
    assert not torch.isin(masked[random], torch.tensor(config.special_ids)).any()
    assert int(masked[random].max()) < config.vocab_size


def test_fixed_count_masks_exactly_round_15_percent_per_sequence(real_batch):
    ids, attention, config = real_batch
    fixed = dataclasses.replace(config, fixed_count=True)
    masked, labels = mask_tokens(ids, attention, fixed, torch.Generator().manual_seed(5))
    special = torch.isin(ids, torch.tensor(config.special_ids))
    candidates = attention.bool() & ~special
    selected = labels != -100
    assert not (selected & ~candidates).any()
    for row in range(len(ids)):
        n = int(candidates[row].sum())
        assert int(selected[row].sum()) in expected_count(n), f"row {row}: {n} candidates"
    k = int(selected.sum())
    assert _z(int((selected & (masked == config.mask_id)).sum()) / k, 0.8, k) < 5


def test_same_seed_same_masks_other_seed_other_masks(real_batch):
    ids, attention, config = real_batch
    ids, attention = ids[:64], attention[:64]
    a = mask_tokens(ids, attention, config, torch.Generator().manual_seed(3))
    b = mask_tokens(ids, attention, config, torch.Generator().manual_seed(3))
    c = mask_tokens(ids, attention, config, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# ------------------------------------------------------------------------------------------------
# data order, micro-batches and ranks
# ------------------------------------------------------------------------------------------------


def _batches(data, **kwargs) -> StepBatches:
    special = data.special_ids
    masking = MaskingConfig(
        vocab_size=data.vocab_size,
        mask_id=special["mask"],
        special_ids=tuple(special["all"]),
        fixed_count=kwargs.pop("fixed_count", False),
    )
    values = dict(batch_size=16, micro_batch_size=16, data_seed=7, mask_seed=1, masking=masking)
    values.update(kwargs)
    return StepBatches(data, **values)


def _unmasked(micro_batches) -> torch.Tensor:
    ids = torch.cat([m.input_ids for m in micro_batches])
    labels = torch.cat([m.labels for m in micro_batches])
    return torch.where(labels != -100, labels, ids)


def test_data_order_is_a_function_of_data_seed_and_epoch_only(tiny_data_dir):
    """Sequence g of the run is row perm_e[g mod N], perm_e = default_rng([data_seed, e]) —
    whatever the micro-batch size or the mask seed; epochs get fresh permutations."""
    data = PackedData(tiny_data_dir)
    n = data.num_train
    assert 100 < n < 300
    batch = 16
    steps = n // batch + 3  # crosses the first epoch boundary
    a = _batches(data, micro_batch_size=4, mask_seed=1)
    b = _batches(data, micro_batch_size=16, mask_seed=99)
    train = torch.from_numpy(np.asarray(data.train).astype(np.int64))
    for step in range(steps):
        numbers = np.arange(step * batch, (step + 1) * batch)
        rows = [np.random.default_rng([7, int(g // n)]).permutation(n)[g % n] for g in numbers]
        expected = train[rows]
        got_a, got_b = _unmasked(a.micro_batches(step)), _unmasked(b.micro_batches(step))
        assert torch.equal(got_a, expected), f"step {step}"
        assert torch.equal(got_b, expected), f"step {step}"
        assert a.global_tokens(step) == int((expected != data.special_ids["pad"]).sum())
    perm0 = np.random.default_rng([7, 0]).permutation(n)
    perm1 = np.random.default_rng([7, 1]).permutation(n)
    assert not np.array_equal(perm0, perm1)
    other_seed = _batches(data, data_seed=8)
    assert not torch.equal(_unmasked(other_seed.micro_batches(0)), _unmasked(a.micro_batches(0)))


def test_masks_depend_on_mask_seed_and_step_not_on_micro_batch_size(data_dir):
    data = PackedData(data_dir)
    a = _batches(data, micro_batch_size=4)
    b = _batches(data, micro_batch_size=8)
    for step in (0, 5):
        ma, mb = a.micro_batches(step), b.micro_batches(step)
        assert [len(m.input_ids) for m in ma] == [4] * 4
        assert [len(m.input_ids) for m in mb] == [8] * 2
        for field in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(
                torch.cat([getattr(m, field) for m in ma]), torch.cat([getattr(m, field) for m in mb])
            )
    assert not torch.equal(a.micro_batches(0)[0].labels, a.micro_batches(1)[0].labels)
    c = _batches(data, micro_batch_size=4, mask_seed=2)
    assert torch.equal(_unmasked(c.micro_batches(0)), _unmasked(a.micro_batches(0)))
    assert not torch.equal(
        torch.cat([m.labels for m in c.micro_batches(0)]), torch.cat([m.labels for m in ma])
    )


@pytest.mark.parametrize(("world", "micro"), [(2, 4), (2, 8), (4, 2), (4, 4)])
def test_rank_micro_batches_are_slices_of_the_single_process_global_batch(data_dir, world, micro):
    data = PackedData(data_dir)
    single = _batches(data, micro_batch_size=16)
    per_rank = 16 // world
    for step in (0, 3):
        whole = single.micro_batches(step)
        assert len(whole) == 1
        whole = whole[0]
        for rank in range(world):
            mine = _batches(data, micro_batch_size=micro, rank=rank, world_size=world).micro_batches(step)
            assert len(mine) == per_rank // micro
            sl = slice(rank * per_rank, (rank + 1) * per_rank)
            for field in ("input_ids", "attention_mask", "labels"):
                got = torch.cat([getattr(m, field) for m in mine])
                assert torch.equal(got, getattr(whole, field)[sl]), (field, rank)
            assert sum(m.num_tokens for m in mine) == int(whole.attention_mask[sl].sum())


def test_step_batches_refuse_impossible_splits(data_dir):
    data = PackedData(data_dir)
    with pytest.raises(BudgetKDError):
        _batches(data, micro_batch_size=32)
    with pytest.raises(BudgetKDError):
        _batches(data, micro_batch_size=5)
    with pytest.raises(BudgetKDError):
        _batches(data, world_size=3)


def test_wordpiece_merges_by_hand():
    """low ×3, lower ×1, newest ×2 (min frequency 2). Start: l ##o ##w | l ##o ##w ##e ##r |
    n ##e ##w ##e ##s ##t. Pair counts: (l,##o)=4, (##o,##w)=4 → the tie goes to the smaller pair
    ("##o" < "l"): ##ow; then (l,##ow)=4: low; then five pairs of 2, smallest (##e,##s): ##es;
    then (##e,##w): ##ew; then (##es,##t): ##est; (##ew,##est): ##ewest; (n,##ewest): newest;
    every pair left occurs once (< 2), so training stops."""
    from budgetkd.data.tokenizer import wordpiece_merges

    lines = ["low low low", "lower", "newest newest"]
    alphabet = ["##e", "##o", "##r", "##s", "##t", "##w", "l", "n"]
    merges = ["##ow", "low", "##es", "##ew", "##est", "##ewest", "newest"]
    assert wordpiece_merges(iter(lines), budget=100) == alphabet + merges
    assert wordpiece_merges(iter(lines), budget=10) == alphabet + merges[:2]
    assert wordpiece_merges(iter(["Héllo"]), budget=100) == ["##e", "##l", "##o", "h"]  # BERT normalisation


def test_validation_takes_its_share_from_every_input():
    """Two inputs, 4 long and 200 short documents: each gives ≈ 5 % of its own tokens, so the
    validation split mirrors the mixture instead of one randomly favoured source."""
    from budgetkd.data.packing import plan_validation

    lengths = np.array([50_000] * 4 + [500] * 200)
    groups = np.array([0] * 4 + [1] * 200)
    plan = plan_validation(lengths, 0.05, seed=3, groups=groups)
    held = {g: sum(end - start for i, (start, end) in plan.items() if groups[i] == g) for g in (0, 1)}
    assert held[0] == 10_000  # 5 % of 200,000 as one contiguous block of a long document
    assert 5_000 - 500 < held[1] <= 5_000 + 500  # whole 500-token documents
    assert all(end == lengths[index] for index, (_, end) in plan.items())  # whole, or a block at the end


def test_regrouped_validation_batches_hold_the_same_rows_and_masks():
    """A compiled run evaluates at the micro-batch's shape: the validation rows, masked as drawn
    at ``eval_batch_size``, regrouped in order (7 + 7 + 3 rows → 4, 4, 4, 4, 1)."""
    from budgetkd.data import regroup_batches

    rows = torch.arange(17 * 5).reshape(17, 5)
    batches = [(rows[i : i + 7], rows[i : i + 7] % 2, -rows[i : i + 7]) for i in range(0, 17, 7)]
    regrouped = regroup_batches(batches, 4)
    assert [len(b[0]) for b in regrouped] == [4, 4, 4, 4, 1]
    for column in range(3):
        assert torch.equal(torch.cat([b[column] for b in regrouped]), torch.cat([b[column] for b in batches]))
    assert regroup_batches([], 4) == []
