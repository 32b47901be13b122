"""Read a GLUE task from the classic ``glue_data`` layout or from ``nyu-mll/glue`` on the hub.

Local files are read with the ``csv`` module, tab-delimited and ``quoting=csv.QUOTE_NONE`` (GLUE
sentences contain stray double quotes that must stay part of the text), as ``utf-8-sig`` (the
MRPC files start with a byte-order mark). CoLA has no header and is read by column index; the
other tasks by header name; the STS-B score is the last column. Labels are mapped to the
``nyu-mll/glue`` ids of :mod:`budgetkd.glue.tasks`.

A malformed row (too few columns, unknown label, score that is not a number) raises a one-line
:class:`BudgetKDError` naming the file and line. A missing train file or primary dev file is an
error; a missing secondary dev split (MNLI ``dev_mismatched.tsv``) is returned in
``GlueData.missing`` and reported as missing in the results.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from budgetkd.errors import BudgetKDError
from budgetkd.glue.tasks import Column, DevSplit, GlueTask
from budgetkd.io import sha256_file, sha256_json


@dataclass
class GlueSplit:
    """One split of one task: the text columns (one or two lists) and the labels, in file order."""

    name: str  # "train", "dev", "dev_matched", ...
    source: str  # file path or "nyu-mll/glue/<task>:<split>"
    texts: tuple[list[str], ...]
    labels: list[int] | list[float]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices: list[int]) -> GlueSplit:
        return GlueSplit(
            self.name,
            self.source,
            tuple([column[i] for i in indices] for column in self.texts),
            [self.labels[i] for i in indices],
        )


@dataclass
class GlueData:
    task: GlueTask
    train: GlueSplit
    dev: dict[str, GlueSplit]  # present dev splits, by DevSplit.name
    missing: list[DevSplit] = field(default_factory=list)  # absent secondary dev splits
    fingerprint: str = ""  # identity of the data read (file hashes / hub fingerprints)
    source: str = ""

    @property
    def missing_metrics(self) -> list[str]:
        return [m + s.metric_suffix for s in self.missing for m in self.task.metrics]


def load_task(task: GlueTask, *, glue_dir: str | Path | None = None, hub: bool = False) -> GlueData:
    if hub:
        return load_hub(task)
    if glue_dir is None:
        raise BudgetKDError("no GLUE data given: pass --glue-dir PATH (classic glue_data layout) or --hub")
    return load_local(task, glue_dir)


# ----------------------------------------------------------------------------------------------
# classic glue_data layout


def check_glue_dir(glue_dir: str | Path) -> Path:
    path = Path(glue_dir)
    if not path.exists():
        raise BudgetKDError(f"GLUE directory not found: {path}")
    if not path.is_dir():
        raise BudgetKDError(f"GLUE directory {path} is not a directory")
    return path


def check_local_files(task: GlueTask, glue_dir: str | Path) -> Path:
    """The task's folder in ``glue_dir``, after checking (without reading them) that its training
    file and primary dev files exist: cheap enough to run before hours of pretraining."""
    root = check_glue_dir(glue_dir)
    folder = root / task.folder
    if not folder.is_dir():
        raise BudgetKDError(
            f"no {task.folder} folder in GLUE directory {root} (expected {folder / task.train_file})"
        )
    train_path = folder / task.train_file
    if not train_path.is_file():
        raise BudgetKDError(f"GLUE {task.name} training file not found: {train_path}")
    for split in task.dev_splits:
        if split.primary and not (folder / split.file).is_file():
            raise BudgetKDError(f"GLUE {task.name} dev file not found: {folder / split.file}")
    return folder


def load_local(task: GlueTask, glue_dir: str | Path) -> GlueData:
    root = check_glue_dir(glue_dir)
    folder = check_local_files(task, root)
    train_path = folder / task.train_file
    train = read_tsv(task, train_path, "train")
    dev: dict[str, GlueSplit] = {}
    missing: list[DevSplit] = []
    hashes = {"train": sha256_file(train_path)}
    for split in task.dev_splits:
        path = folder / split.file
        if not path.is_file():
            if split.primary:
                raise BudgetKDError(f"GLUE {task.name} dev file not found: {path}")
            missing.append(split)
            continue
        dev[split.name] = read_tsv(task, path, split.name)
        hashes[split.name] = sha256_file(path)
    return GlueData(task, train, dev, missing, sha256_json(hashes), source=str(root))


def _resolve(column: Column, header: dict[str, int] | None, path: Path) -> int:
    if isinstance(column, int):
        return column
    assert header is not None
    if column not in header:
        raise BudgetKDError(
            f"{path} line 1: missing column {column!r} (header has: {', '.join(header) or 'nothing'})"
        )
    return header[column]


def read_tsv(task: GlueTask, path: str | Path, split: str) -> GlueSplit:
    """Parse one GLUE TSV file of ``task`` into a :class:`GlueSplit` (see the module docstring)."""
    path = Path(path)
    texts: tuple[list[str], ...] = tuple([] for _ in task.text_columns)
    labels: list = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header: dict[str, int] | None = None
            if task.header:
                first = next(reader, None)
                if first is None:
                    raise BudgetKDError(f"{path} is empty (expected a header line)")
                header = {name.strip(): i for i, name in enumerate(first)}
            text_idx = [_resolve(c, header, path) for c in task.text_columns]
            label_idx = _resolve(task.label_column, header, path)
            needed = max(i + 1 if i >= 0 else -i for i in [*text_idx, label_idx])
            for row in reader:
                if not row or row == [""]:
                    continue  # blank line
                line = reader.line_num
                if len(row) < needed:
                    raise BudgetKDError(
                        f"{path} line {line}: expected at least {needed} tab-separated columns, found {len(row)}"
                    )
                for column, i in zip(texts, text_idx):
                    column.append(row[i])
                labels.append(_parse_label(task, row[label_idx].strip(), path, line))
    except FileNotFoundError:
        raise BudgetKDError(f"GLUE {task.name} file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise BudgetKDError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise BudgetKDError(f"{path}: malformed TSV ({exc})") from None
    except OSError as exc:
        raise BudgetKDError(f"cannot read {path}: {exc.strerror}") from None
    if not labels:
        raise BudgetKDError(f"{path} has no examples")
    return GlueSplit(split, str(path), texts, labels)


def _parse_label(task: GlueTask, value: str, path: Path, line: int) -> int | float:
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise BudgetKDError(f"{path} line {line}: {task.name} score {value!r} is not a number")
        return score
    label = task.label_aliases.get(value)
    if label is None:
        expected = ", ".join(sorted(task.label_aliases))
        raise BudgetKDError(
            f"{path} line {line}: unknown {task.name} label {value!r} (expected one of {expected})"
        )
    return label


# ----------------------------------------------------------------------------------------------
# nyu-mll/glue on the Hugging Face hub


def load_hub(task: GlueTask) -> GlueData:
    """Load ``nyu-mll/glue`` / ``task.name`` with :func:`datasets.load_dataset` (train + dev)."""
    import datasets

    try:
        dataset = datasets.load_dataset(task.hub_name, task.name)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; all mean "cannot load"
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BudgetKDError(
            f"cannot load {task.hub_name} ({task.name}) from the Hugging Face hub "
            f"({type(exc).__name__}: {reason}); if the hub is unreachable, pass --glue-dir PATH "
            "with a local glue_data copy instead"
        ) from None
    source = f"{task.hub_name}/{task.name}"
    if "train" not in dataset:
        raise BudgetKDError(f"{source} on the hub has no train split")
    train = _hub_split(task, dataset["train"], "train", f"{source}:train")
    dev: dict[str, GlueSplit] = {}
    missing: list[DevSplit] = []
    fingerprints = {"train": getattr(dataset["train"], "_fingerprint", None)}
    for split in task.dev_splits:
        if split.hub_split not in dataset:
            if split.primary:
                raise BudgetKDError(f"{source} on the hub has no {split.hub_split} split")
            missing.append(split)
            continue
        dev[split.name] = _hub_split(
            task, dataset[split.hub_split], split.name, f"{source}:{split.hub_split}"
        )
        fingerprints[split.name] = getattr(dataset[split.hub_split], "_fingerprint", None)
    return GlueData(task, train, dev, missing, sha256_json(fingerprints), source=f"hub:{task.hub_name}")


def _hub_split(task: GlueTask, data, name: str, source: str) -> GlueSplit:
    for column in (*task.hub_text_columns, "label"):
        if column not in data.column_names:
            raise BudgetKDError(f"{source} has no column {column!r} (has: {', '.join(data.column_names)})")
    texts = tuple(list(data[c]) for c in task.hub_text_columns)
    labels = list(data["label"])
    if task.is_regression:
        labels = [float(v) for v in labels]
    else:
        for i, value in enumerate(labels):
            if not 0 <= value < task.num_labels:
                raise BudgetKDError(f"{source} example {i}: label {value} outside 0..{task.num_labels - 1}")
    return GlueSplit(name, source, texts, labels)
