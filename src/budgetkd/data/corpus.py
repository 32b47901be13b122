"""Reading a pretraining corpus into documents.

Inputs are text files or folders (searched recursively for ``.txt``, ``.raw`` and ``.jsonl``) and
Hugging Face datasets written ``hf:NAME[:CONFIG][:SPLIT]``.

What a document is:
* a ``.txt``/``.raw`` file is one document, except that WikiText-style top-level headings
  (a line `` = Title = ``) start a new document, so a WikiText dump becomes its articles;
* each line of a ``.jsonl`` file is one document (its ``text`` field);
* each row of a hub dataset is one document (its ``text`` field), except WikiText, whose rows are
  lines and which is re-split on its headings like the raw files, and BookCorpus, whose rows are
  sentences without book boundaries and are grouped 1000 at a time.

Documents are yielded as lists of lines (the tokenizer encodes lines in batches).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from budgetkd.errors import BudgetKDError

TEXT_SUFFIXES = (".txt", ".raw", ".jsonl")
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")
_LINES_PER_BOOKCORPUS_DOCUMENT = 1000


@dataclass(frozen=True)
class Source:
    """One input: a local file or a hub dataset spec."""

    kind: str  # "file" | "hf"
    name: str  # path, or the hub spec
    fingerprint: str


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][:SPLIT]`` → (name, config, split); split defaults to ``train``."""
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise BudgetKDError(f"malformed hub dataset {spec!r}; write hf:NAME[:CONFIG][:SPLIT]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def resolve_sources(inputs: list[str]) -> list[Source]:
    """Expand folders, check every input exists and is readable; fingerprint each file."""
    if not inputs:
        raise BudgetKDError("no --input given")
    sources: list[Source] = []
    for item in inputs:
        if item.startswith("hf:"):
            parse_hf_spec(item)
            sources.append(Source("hf", item, hashlib.sha256(item.encode()).hexdigest()))
            continue
        path = Path(item)
        if not path.exists():
            raise BudgetKDError(f"input not found: {item}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise BudgetKDError(f"input folder {item} holds no .txt, .raw or .jsonl file")
        else:
            files = [path]
        for file in files:
            sources.append(Source("file", str(file), _file_fingerprint(file)))
    return sources


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise BudgetKDError(f"cannot read input {path}: {exc.strerror}") from None
    return digest.hexdigest()


def _check_text(path: Path, data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise BudgetKDError(f"input {path} looks like a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BudgetKDError(f"input {path} is not UTF-8 text (byte {exc.start})") from None


def split_wiki_articles(lines: list[str]) -> list[list[str]]:
    """Split lines into documents at WikiText top-level headings; no heading → one document."""
    documents: list[list[str]] = []
    current: list[str] = []
    for line in lines:
        if _WIKI_TITLE.match(line) and current:
            documents.append(current)
            current = []
        current.append(line)
    if current:
        documents.append(current)
    return documents


def _clean(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if line.strip()]


def read_file_documents(path: Path) -> Iterator[list[str]]:
    data = path.read_bytes()
    text = _check_text(path, data)
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise BudgetKDError(f"{path} line {number}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BudgetKDError(f"{path} line {number}: expected an object with a string 'text' field")
            doc = _clean(record["text"].splitlines())
            if doc:
                yield doc
        return
    for doc in split_wiki_articles(text.splitlines()):
        doc = _clean(doc)
        if doc:
            yield doc


def iter_wiki_articles(lines: Iterable[str]) -> Iterator[list[str]]:
    """:func:`split_wiki_articles` as a stream: one article in memory at a time."""
    current: list[str] = []
    for line in lines:
        if _WIKI_TITLE.match(line) and current:
            yield current
            current = []
        current.append(line)
    if current:
        yield current


def read_hub_documents(spec: str) -> Iterator[list[str]]:
    """Stream a hub dataset through ``datasets`` (``streaming=True``: rows are read as they are
    needed, never the whole dataset in memory or on disk); unreachable hub → one-line error."""
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = iter(dataset)
        first = next(rows, None)
    except Exception as exc:  # the hub raises many different types when offline
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BudgetKDError(
            f"cannot load hub dataset {spec} ({first_line[:160]}); without hub access pass local files with --input PATH"
        ) from None
    if first is None:
        return
    if "text" not in first:
        raise BudgetKDError(f"hub dataset {spec} has no 'text' column (columns: {', '.join(first)})")
    texts = (row["text"] for row in chain([first], rows))
    if "wikitext" in name:
        # rows are lines: articles are re-split on their headings, as for the raw files
        for article in iter_wiki_articles(texts):
            doc = _clean(article)
            if doc:
                yield doc
        return
    if "bookcorpus" in name:
        # One sentence per row and no book boundaries: consecutive rows form the documents.
        lines: list[str] = []
        for text in texts:
            lines.extend(_clean(text.splitlines()))
            if len(lines) >= _LINES_PER_BOOKCORPUS_DOCUMENT:
                yield lines
                lines = []
        if lines:
            yield lines
        return
    for text in texts:
        doc = _clean(text.splitlines())
        if doc:
            yield doc


def iter_documents(sources: list[Source]) -> Iterator[list[str]]:
    for source in sources:
        if source.kind == "hf":
            yield from read_hub_documents(source.name)
        else:
            yield from read_file_documents(Path(source.name))


def training_text_iterator(sources: list[Source]) -> Iterator[str]:
    """Lines of every document, for training a WordPiece vocabulary."""
    for doc in iter_documents(sources):
        yield from doc
