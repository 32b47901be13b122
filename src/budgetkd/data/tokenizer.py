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


def train_wordpiece(lines: Iterator[str], vocab_size: int, lowercase: bool = True):
    """Train an uncased BERT WordPiece vocabulary of ``vocab_size`` entries on ``lines``."""
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < 100:
        raise BudgetKDError(f"--train-tokenizer {vocab_size}: a vocabulary needs at least 100 entries")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=lowercase)
    wordpiece.train_from_iterator(
        lines, vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False
    )
    # The trainer orders tokens of equal rank (the initial alphabet) differently from run to run;
    # sorting the learned set makes the ids, and hence the packed data, a function of the corpus.
    learned = sorted(set(wordpiece.get_vocab()) - set(specials))
    return bert_tokenizer_from_vocab({token: i for i, token in enumerate(specials + learned)}, lowercase)


def bert_tokenizer_from_vocab(vocab: dict[str, int] | str, lowercase: bool = True):
    """A ``BertTokenizerFast`` from a WordPiece vocabulary (a token → id mapping or a vocab.txt).

    Built through ``tokenizers`` so that it works alike across transformers 4.x (``vocab_file=``)
    and 5.x (``vocab=``), whose constructors disagree.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(vocab, lowercase=lowercase, strip_accents=lowercase)
    return BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=lowercase)
