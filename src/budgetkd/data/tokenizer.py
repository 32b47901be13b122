"""Tokenizers: a teacher's fast HF tokenizer, or a BERT WordPiece trained on the corpus (SPEC §1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from budgetkd.errors import BudgetKDError


def load_tokenizer(name_or_path: str | Path):
    """A fast tokenizer from a local directory, a ``vocab.txt`` file, or a hub id."""
    from transformers import AutoTokenizer

    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".txt":
        return bert_tokenizer_from_vocab(str(path), lowercase=True)
    if path.is_dir() and not any(
        (path / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    ):
        raise BudgetKDError(
            f"tokenizer directory {path} holds no tokenizer.json, vocab.txt or tokenizer_config.json"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), use_fast=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BudgetKDError(f"cannot load tokenizer {name_or_path}: {first[:200]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise BudgetKDError(f"tokenizer {name_or_path} has no fast (Rust) implementation")
    for attr in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tokenizer, attr) is None:
            raise BudgetKDError(
                f"tokenizer {name_or_path} lacks a {attr.removesuffix('_id')}; a BERT tokenizer is needed"
            )
    return tokenizer


def train_wordpiece(lines: Iterator[str], vocab_size: int, lowercase: bool = True, min_frequency: int = 2):
    """Train an uncased BERT WordPiece vocabulary of ``vocab_size`` entries on ``lines``.

    The algorithm is the one of the ``tokenizers`` WordPiece trainer (BERT normalisation and
    pre-tokenisation, then greedy merges of the most frequent adjacent pair of word pieces, a
    continuation piece marked ``##``), written out here because that trainer breaks ties between
    equally frequent pairs in hash-map order, so the same corpus gave a different vocabulary on
    every run. Here ties go to the lexicographically smallest pair and the vocabulary is a
    function of the corpus (SPEC §1: the data, its order and its masks are reproducible).
    """
    if vocab_size < 100:
        raise BudgetKDError(f"--train-tokenizer {vocab_size}: a vocabulary needs at least 100 entries")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return bert_tokenizer_from_vocab(
        {
            token: i
            for i, token in enumerate(
                specials + wordpiece_merges(lines, vocab_size - len(specials), lowercase, min_frequency)
            )
        },
        lowercase,
    )


def wordpiece_merges(
    lines: Iterator[str], budget: int, lowercase: bool = True, min_frequency: int = 2
) -> list[str]:
    """The learned pieces (alphabet first, then merges in order), at most ``budget`` of them."""
    import heapq
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase, lowercase=lowercase
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    words = sorted(counts)  # a fixed order: everything below is then deterministic
    freqs = [counts[w] for w in words]
    pieces = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
    alphabet = sorted({p for word in pieces for p in word})
    vocab = alphabet[:budget]
    known = set(vocab)

    pair_counts: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for index, (word, freq) in enumerate(zip(pieces, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where.setdefault(pair, set()).add(index)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < budget and heap:
        negative, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative:
            continue  # stale entry: its count changed since it was pushed
        if -negative < min_frequency:
            break
        left, right = pair
        merged = left + right[2:] if right.startswith("##") else left + right
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed: Counter[tuple[str, str]] = Counter()
        for index in sorted(where.pop(pair, ())):
            word, freq = pieces[index], freqs[index]
            for old in zip(word, word[1:]):
                changed[old] -= freq
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            pieces[index] = out
            for new in zip(out, out[1:]):
                changed[new] += freq
                where.setdefault(new, set()).add(index)
        for changed_pair, delta in changed.items():
            if delta == 0:
                continue
            pair_counts[changed_pair] += delta
            if pair_counts[changed_pair] <= 0:
                del pair_counts[changed_pair]
            else:
                heapq.heappush(heap, (-pair_counts[changed_pair], changed_pair))
        pair_counts.pop(pair, None)
    return vocab


def bert_tokenizer_from_vocab(vocab: dict[str, int] | str, lowercase: bool = True):
    """A ``BertTokenizerFast`` from a WordPiece vocabulary (a token → id mapping or a vocab.txt).

    Built through ``tokenizers`` so that it works alike across transformers 4.x (``vocab_file=``)
    and 5.x (``vocab=``), whose constructors disagree.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(vocab, lowercase=lowercase, strip_accents=lowercase)
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=lowercase)
