"""The one registry of GLUE tasks (SPEC §6): files, columns, labels, metrics and the task score.

Label ids follow the ``nyu-mll/glue`` convention on the hub, so a model fine-tuned on the classic
``glue_data`` files and one fine-tuned on the hub copy predict the same ids:

=====  ===================================================  =========================
task   labels (id order)                                    metrics (main first)
=====  ===================================================  =========================
cola   unacceptable, acceptable                             matthews_correlation
sst2   negative, positive                                   accuracy
mrpc   not_equivalent, equivalent                           f1, accuracy
qqp    not_duplicate, duplicate                             accuracy, f1
stsb   regression, score 0–5                                pearson, spearman
mnli   entailment, neutral, contradiction                   accuracy_matched, accuracy_mismatched
qnli   entailment, not_entailment                           accuracy
rte    entailment, not_entailment                           accuracy
=====  ===================================================  =========================

The *task score* (the single number that picks the best configuration and enters the GLUE
average) is the main metric, except for STS-B where it is the mean of Pearson and Spearman
(``score_metrics``). For MNLI it is the matched accuracy; the mismatched accuracy is reported
beside it but does not enter the average. WNLI is excluded, as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from budgetkd.errors import BudgetKDError

Column = str | int  # a header name, or a 0-based index (negative counts from the end)


@dataclass(frozen=True)
class DevSplit:
    """One evaluation split of a task.

    ``metric_suffix`` is appended to every metric computed on this split (MNLI: ``accuracy`` on
    ``dev_matched`` is reported as ``accuracy_matched``). ``primary`` splits must exist; a missing
    secondary split is reported as missing in the results instead of failing the run.
    """

    name: str  # "dev", "dev_matched", ...
    file: str  # file name in the task folder of glue_data
    hub_split: str  # split name in nyu-mll/glue
    metric_suffix: str = ""
    primary: bool = True


@dataclass(frozen=True)
class GlueTask:
    name: str  # registry key and nyu-mll/glue config name ("sst2")
    folder: str  # folder in glue_data ("SST-2")
    text_columns: tuple[Column, ...]  # one or two text columns of the TSV files
    label_column: Column
    hub_text_columns: tuple[str, ...]
    labels: tuple[str, ...] | None  # label names by id; None = regression
    label_aliases: Mapping[str, int] = field(compare=False)  # label strings in the TSV files -> id
    metrics: tuple[str, ...]  # metric names computed on one split, main first
    main_metric: str  # name as reported (suffix included)
    score_metrics: tuple[str, ...]  # the task score is their mean
    dev_splits: tuple[DevSplit, ...] = (DevSplit("dev", "dev.tsv", "validation"),)
    header: bool = True
    train_file: str = "train.tsv"
    display: str = ""  # column title in glue.md
    hub_name: str = field(default="nyu-mll/glue")

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def reported_metrics(self) -> tuple[str, ...]:
        """Every metric name the task reports, over all its dev splits, in display order."""
        return tuple(m + s.metric_suffix for s in self.dev_splits for m in self.metrics)

    def score(self, metrics: Mapping[str, float | None]) -> float | None:
        """The task score: mean of ``score_metrics`` (None if any of them is missing)."""
        values = [metrics.get(name) for name in self.score_metrics]
        if any(v is None for v in values):
            return None
        return sum(values) / len(values)  # type: ignore[arg-type]


def _binary(negative: str, positive: str) -> dict[str, int]:
    return {"0": 0, "1": 1, negative: 0, positive: 1}


_MNLI_LABELS = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola",
            folder="CoLA",
            header=False,  # columns: source, label, original label, sentence
            text_columns=(3,),
            label_column=1,
            hub_text_columns=("sentence",),
            labels=("unacceptable", "acceptable"),
            label_aliases=_binary("unacceptable", "acceptable"),
            metrics=("matthews_correlation",),
            main_metric="matthews_correlation",
            score_metrics=("matthews_correlation",),
            display="CoLA (MCC)",
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            text_columns=("sentence",),
            label_column="label",
            hub_text_columns=("sentence",),
            labels=("negative", "positive"),
            label_aliases=_binary("negative", "positive"),
            metrics=("accuracy",),
            main_metric="accuracy",
            score_metrics=("accuracy",),
            display="SST-2",
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            text_columns=("#1 String", "#2 String"),
            label_column="Quality",
            hub_text_columns=("sentence1", "sentence2"),
            labels=("not_equivalent", "equivalent"),
            label_aliases=_binary("not_equivalent", "equivalent"),
            metrics=("f1", "accuracy"),
            main_metric="f1",
            score_metrics=("f1",),
            display="MRPC (F1)",
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            text_columns=("question1", "question2"),
            label_column="is_duplicate",
            hub_text_columns=("question1", "question2"),
            labels=("not_duplicate", "duplicate"),
            label_aliases=_binary("not_duplicate", "duplicate"),
            metrics=("accuracy", "f1"),
            main_metric="accuracy",
            score_metrics=("accuracy",),
            display="QQP",
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            text_columns=("sentence1", "sentence2"),
            label_column=-1,  # the score is the last column (0-5)
            hub_text_columns=("sentence1", "sentence2"),
            labels=None,
            label_aliases={},
            metrics=("pearson", "spearman"),
            main_metric="pearson",
            score_metrics=("pearson", "spearman"),
            display="STS-B",
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            text_columns=("sentence1", "sentence2"),
            label_column="gold_label",
            hub_text_columns=("premise", "hypothesis"),
            labels=_MNLI_LABELS,
            label_aliases={name: i for i, name in enumerate(_MNLI_LABELS)},
            metrics=("accuracy",),
            main_metric="accuracy_matched",
            score_metrics=("accuracy_matched",),
            dev_splits=(
                DevSplit("dev_matched", "dev_matched.tsv", "validation_matched", "_matched"),
                DevSplit(
                    "dev_mismatched", "dev_mismatched.tsv", "validation_mismatched", "_mismatched", False
                ),
            ),
            display="MNLI-m",
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            text_columns=("question", "sentence"),
            label_column="label",
            hub_text_columns=("question", "sentence"),
            labels=_NLI2,
            label_aliases={name: i for i, name in enumerate(_NLI2)},
            metrics=("accuracy",),
            main_metric="accuracy",
            score_metrics=("accuracy",),
            display="QNLI",
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            text_columns=("sentence1", "sentence2"),
            label_column="label",
            hub_text_columns=("sentence1", "sentence2"),
            labels=_NLI2,
            label_aliases={name: i for i, name in enumerate(_NLI2)},
            metrics=("accuracy",),
            main_metric="accuracy",
            score_metrics=("accuracy",),
            display="RTE",
        ),
    )
}

# Accepted spellings besides the registry keys (folder names, hyphens, case are normalised away).
_ALIASES = {"sts": "stsb", "sst": "sst2", "mnli-m": "mnli", "mnli_m": "mnli"}


def get_task(name: str) -> GlueTask:
    key = name.strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(name.strip().lower(), key)
    if key not in TASKS:
        raise BudgetKDError(f"unknown GLUE task {name!r}; choose from {', '.join(TASKS)} or 'all'")
    return TASKS[key]


def parse_tasks(spec: str | Iterable[str] | None) -> list[GlueTask]:
    """``"all"`` / None -> every task; ``"rte,mrpc"`` or ``["rte", "mrpc"]`` -> those, in the given
    order, duplicates removed."""
    if spec is None:
        return list(TASKS.values())
    names: Sequence[str] = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise BudgetKDError("--tasks is empty; give 'all' or a comma-separated list such as rte,mrpc")
    if len(names) == 1 and names[0].lower() == "all":
        return list(TASKS.values())
    chosen: list[GlueTask] = []
    for name in names:
        task = get_task(name)
        if task not in chosen:
            chosen.append(task)
    return chosen
