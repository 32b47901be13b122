"""``budgetkd report DIR``: the paper's Table 2 from a compare directory (SPEC §7).

Reads ``DIR/experiment.json``, ``DIR/runs/<label>/{summary,run_config}.json``,
``DIR/glue/<label>/glue.json`` and the per-run prediction files beside it, and writes:

* ``table.md``, ``table.csv``, ``table.tex`` — one row per strategy: total tokens processed, the
  Avg tasks (default the paper's seven: QNLI, SST-2, MNLI-m, MRPC-F1, QQP, RTE, CoLA-MCC), Avg,
  Δ = Avg − Avg(No-KD) with its 95 % interval, then the tasks shown beside the average (MNLI-mm,
  STS-B = mean of Pearson and Spearman); scores ×100, "–" = not evaluated; with several GLUE seeds
  each cell is mean ± sample std over seeds;
* ``budget.csv`` (and a second table in ``table.md``) — what each row was charged in time and
  FLOPs and what of it was the teacher's, under the experiment's ``teacher_cost``
  (:func:`charged_amounts`), the teacher's share of what ran, tokens, epochs, tokens/s, the
  No-KD/KD throughput ratio and the final validation MLM loss (only where the student's MLM head
  trains);
* ``plots/glue_scores.png``, ``plots/val_loss.png``, ``plots/tokens.png``.

Avg of a row is the plain mean of its scores on the Avg tasks it has. Δ of a row is computed over
the Avg tasks that both it and No-KD have: Δ = mean_{t∈T}(s_row,t) − mean_{t∈T}(s_NoKD,t); a row
whose Avg or Δ is over fewer tasks than the table's Avg is marked (†) and a note names its tasks.

The interval of Δ is a paired bootstrap (SPEC §7): every row was evaluated on the same dev
examples, so each of ``bootstrap_samples`` resamples draws, per task, n example indices with
replacement — the same indices for every row — and recomputes each task's own metric on them
(:mod:`budgetkd.glue.bootstrap`); with several fine-tuning seeds a resample also draws each row's
seeds with replacement and averages the task over them — one draw per row and task, shared by
the splits of a task (MNLI-m and MNLI-mm are two dev sets scored on the same fine-tuned models).
Δ of the resample is then formed as above, and the interval is the 2.5th–97.5th percentile of
those Δ. The example indices of the task in column c come from
``numpy.random.default_rng([bootstrap_seed, c])``, the seed draws of a row from
``default_rng([bootstrap_seed, c_task, crc32(label)])`` with c_task the column of the task's
first split, so the table is deterministic. Rows without prediction files fall back to a bootstrap over seeds (several seeds)
or no interval.

With several pretraining seeds (``pretrain_seeds`` in experiment.json) a row stands for its runs
``runs/LABEL~sK`` (:func:`merge_units`): its scores are the mean over them, and Δ's interval is
the two-level bootstrap of :func:`hierarchical_bootstrap` (pretraining runs from
``default_rng([bootstrap_seed, PRETRAIN_DRAW_KEY])``, then each slot's fine-tuning seeds, then the
dev examples, all shared by the rows), its pretraining level widened for the few runs.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from budgetkd.errors import BudgetKDError
from budgetkd.glue import bootstrap
from budgetkd.glue.search import load_run_predictions, run_path
from budgetkd.io import atomic_write_bytes, atomic_write_text, read_json


@dataclass(frozen=True)
class ScoreColumn:
    """One score of the table: task ``task``'s metrics ``metrics`` on dev split ``split``."""

    key: str  # column key in table.csv and in the avg_tasks setting
    title: str
    task: str  # GLUE task key (glue.json, runs/<task>/)
    split: str  # dev split holding its predictions
    metrics: tuple[str, ...]  # budgetkd.glue.metrics names, averaged into the score
    reported: tuple[str, ...]  # the same metrics as glue.json names them (split suffix added)


# The paper's Table 2, in its order (SPEC §7).
PAPER_COLUMNS = (
    ScoreColumn("qnli", "QNLI", "qnli", "dev", ("accuracy",), ("accuracy",)),
    ScoreColumn("sst2", "SST-2", "sst2", "dev", ("accuracy",), ("accuracy",)),
    ScoreColumn("mnli", "MNLI-m", "mnli", "dev_matched", ("accuracy",), ("accuracy_matched",)),
    ScoreColumn("mrpc", "MRPC-F1", "mrpc", "dev", ("f1",), ("f1",)),
    ScoreColumn("qqp", "QQP", "qqp", "dev", ("accuracy",), ("accuracy",)),
    ScoreColumn("rte", "RTE", "rte", "dev", ("accuracy",), ("accuracy",)),
    ScoreColumn("cola", "CoLA-MCC", "cola", "dev", ("matthews_correlation",), ("matthews_correlation",)),
)
# Shown beside the average; they enter Avg only when the avg_tasks setting names them.
EXTRA_COLUMNS = (
    ScoreColumn("mnli_mm", "MNLI-mm", "mnli", "dev_mismatched", ("accuracy",), ("accuracy_mismatched",)),
    ScoreColumn("stsb", "STS-B", "stsb", "dev", ("pearson", "spearman"), ("pearson", "spearman")),
)
ALL_COLUMNS = PAPER_COLUMNS + EXTRA_COLUMNS
COLUMN_BY_KEY = {c.key: c for c in ALL_COLUMNS}
PAPER_AVG_TASKS = tuple(c.key for c in PAPER_COLUMNS)
_COLUMN_ALIASES = {
    "mnli-m": "mnli",
    "mnli_m": "mnli",
    "mnlim": "mnli",
    "mnli-mm": "mnli_mm",
    "mnlimm": "mnli_mm",
    "sst-2": "sst2",
    "sts-b": "stsb",
    "mrpc-f1": "mrpc",
    "cola-mcc": "cola",
}

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
MIN_BOOTSTRAP_SAMPLES = 100  # fewer leave the 2.5th / 97.5th percentiles to two or three draws

# Strategies whose KD term trains the student's logits (Strategy.needs_teacher_logits; a test keeps
# the two equal). Kept here so that the report does not import torch to read one flag.
LOGIT_DISTILLING_STRATEGIES = frozenset({"vanilla"})

INTERVAL_EXAMPLES = "examples"
INTERVAL_SEEDS_EXAMPLES = "seeds x examples"
INTERVAL_SEEDS = "seeds"
INTERVAL_PRETRAIN = "pretraining seeds x seeds x examples"  # the two-level bootstrap
INTERVAL_PRETRAIN_ONLY = "pretraining seeds"  # no prediction files: over the runs' means
PRETRAIN_DRAW_KEY = 1_000_003  # default_rng([bootstrap_seed, this]): the pretraining-run draws
FINETUNE_DRAW_KEY = 1_000_033  # default_rng([bootstrap_seed, c_task, this, slot]): a slot's seed draws

MARK_FEWER_TASKS = "†"
MARK_DATA_LIMIT = "‡"


@dataclass(frozen=True)
class ReportSettings:
    """What the report computes beyond the data: which tasks enter Avg, and the bootstrap."""

    avg_tasks: tuple[str, ...] = PAPER_AVG_TASKS
    bootstrap_samples: int = BOOTSTRAP_SAMPLES
    bootstrap_seed: int = BOOTSTRAP_SEED


def parse_avg_tasks(spec) -> tuple[str, ...]:
    """``paper`` (the seven of Table 2) | ``all`` (also MNLI-mm, STS-B) | ``rte,mrpc,stsb`` | a list."""
    if isinstance(spec, str):
        names = [n.strip() for n in spec.split(",") if n.strip()]
    elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
        names = [n.strip() for n in spec]
    else:
        raise BudgetKDError(f"avg_tasks must be 'paper', 'all' or a list of task names, got {spec!r}")
    if len(names) == 1 and names[0].lower() in ("paper", "all"):
        return PAPER_AVG_TASKS if names[0].lower() == "paper" else tuple(COLUMN_BY_KEY)
    keys: list[str] = []
    for name in names:
        key = _COLUMN_ALIASES.get(name.lower(), name.lower())
        if key not in COLUMN_BY_KEY:
            raise BudgetKDError(
                f"avg_tasks: unknown task {name!r}; choose from {', '.join(COLUMN_BY_KEY)}, 'paper' or 'all'"
            )
        if key not in keys:
            keys.append(key)
    if not keys:
        raise BudgetKDError("avg_tasks is empty; give 'paper', 'all' or task names such as rte,mrpc")
    return tuple(keys)


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BudgetKDError(f"{what} must be an integer ≥ {minimum}, got {value!r}")
    return value


def resolve_settings(
    out: Path, *, avg_tasks=None, bootstrap_samples: int | None = None, bootstrap_seed: int | None = None
) -> ReportSettings:
    """Settings from the arguments, else the experiment config's ``report`` mapping (read from
    ``DIR/experiment.json``; absent or partial is fine), else the defaults."""
    stored: dict = {}
    experiment_path = out / "experiment.json"
    if experiment_path.exists():
        experiment = read_json(experiment_path, "experiment record")
        section = experiment.get("report") if isinstance(experiment, dict) else None
        if section is not None and not isinstance(section, dict):
            raise _malformed("experiment record", experiment_path, "'report' is not a mapping")
        stored = section or {}
    tasks = avg_tasks if avg_tasks is not None else stored.get("avg_tasks", "paper")
    samples = bootstrap_samples if bootstrap_samples is not None else stored.get("bootstrap_samples")
    seed = bootstrap_seed if bootstrap_seed is not None else stored.get("bootstrap_seed")
    return ReportSettings(
        avg_tasks=parse_avg_tasks(tasks),
        bootstrap_samples=BOOTSTRAP_SAMPLES
        if samples is None
        else _positive_int(samples, "bootstrap_samples", MIN_BOOTSTRAP_SAMPLES),
        bootstrap_seed=BOOTSTRAP_SEED if seed is None else _positive_int(seed, "bootstrap_seed", 0),
    )


# What the tables read from a run's summary.json (``consumed``) — checked up front, so that a
# malformed file is a one-line error naming it rather than a traceback half-way through writing.
_CONSUMED_KEYS = (
    "time_s",
    "flops",
    "flops_teacher_share",
    "time_teacher_share",
    "tokens",
    "epochs",
    "tokens_per_s",
)


def _malformed(what: str, path: Path, why: str) -> BudgetKDError:
    return BudgetKDError(f"{what} {path} is malformed: {why}")


def _read_experiment(path: Path) -> list[tuple[str, str]]:
    experiment = read_json(path, "experiment record")
    strategies = experiment.get("strategies") if isinstance(experiment, dict) else None
    if not isinstance(strategies, list) or not strategies:
        raise _malformed("experiment record", path, "no 'strategies' list")
    entries = []
    for i, strategy in enumerate(strategies):
        if not (
            isinstance(strategy, dict)
            and isinstance(strategy.get("label"), str)
            and isinstance(strategy.get("name"), str)
        ):
            raise _malformed("experiment record", path, f"strategies[{i}] lacks a 'label' or 'name'")
        entries.append((strategy["label"], strategy["name"]))
    return entries


def _read_summary(path: Path) -> dict:
    summary = read_json(path, "run summary")
    if not isinstance(summary, dict):
        raise _malformed("run summary", path, "not a JSON object")
    consumed = summary.get("consumed")
    if not isinstance(consumed, dict):
        raise _malformed("run summary", path, "no 'consumed' object")
    for key in _CONSUMED_KEYS:
        if not isinstance(consumed.get(key), (int, float)) or isinstance(consumed.get(key), bool):
            raise _malformed("run summary", path, f"'consumed.{key}' is not a number")
    if not isinstance(summary.get("strategy", ""), str):
        raise _malformed("run summary", path, "'strategy' is not a string")
    evaluations = summary.get("evaluations") or []
    if not isinstance(evaluations, list) or not all(
        isinstance(e, dict) and "budget_fraction" in e and "val_mlm_loss" in e for e in evaluations
    ):
        raise _malformed("run summary", path, "'evaluations' is not a list of evaluations")
    return summary


def _strategy_options(run_dir: Path) -> dict | None:
    """The resolved strategy options (defaults filled in) that ``run_config.json`` records."""
    path = run_dir / "run_config.json"
    if not path.exists():
        return None
    config = read_json(path, "run configuration")
    resolved = config.get("resolved") if isinstance(config, dict) else None
    options = resolved.get("strategy_options") if isinstance(resolved, dict) else None
    return options if isinstance(options, dict) else None


def mlm_head_trained(strategy: str, summary: dict | None, options: dict | None) -> bool:
    """Whether the student's MLM head (its logits) is trained, i.e. whether its validation MLM
    loss measures anything: No-KD's objective is the MLM loss; a KD strategy trains the head
    when its MLM weight is > 0 or its KD term is on the logits (Vanilla-KD). TinyBERT, MiniLM and
    MiniLMv2 with their default MLM weight 0 never touch it."""
    if summary is not None and isinstance(summary.get("mlm_head_trained"), bool):
        return summary["mlm_head_trained"]  # recorded by the run itself, when it does
    if strategy == "none" or strategy in LOGIT_DISTILLING_STRATEGIES:
        return True
    if options is None:  # a run directory without run_config.json: the strategy's defaults
        from budgetkd.strategies import REGISTRY

        cls = REGISTRY.get(strategy)
        if cls is None:
            return True
        options = cls.defaults
    weight = options.get("mlm_weight", 1.0)
    return not isinstance(weight, (int, float)) or float(weight) > 0


def _best_runs(entry: dict) -> list[dict]:
    best = entry.get("best") or {}
    return [
        r
        for r in entry.get("runs", [])
        if isinstance(r, dict)
        and r.get("lr") == best.get("lr")
        and r.get("batch_size") == best.get("batch_size")
    ]


def _column_seed_values(entry: dict, column: ScoreColumn) -> tuple[list[float], list]:
    """Per-seed scores of the best configuration in one column (and the seeds they belong to)."""
    primary = column.key == column.task
    values, seeds = [], []
    for run in _best_runs(entry):
        metrics = run.get("metrics")
        if isinstance(metrics, dict) and all(metrics.get(m) is not None for m in column.reported):
            values.append(float(np.mean([float(metrics[m]) for m in column.reported])))
        elif primary and run.get("score") is not None and not isinstance(metrics, dict):
            values.append(float(run["score"]))
        else:
            continue
        seeds.append(run.get("seed"))
    if values:
        return values, seeds
    # no per-run records: the task entry's own value (one number)
    metrics = entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}
    if all(metrics.get(m) is not None for m in column.reported):
        return [float(np.mean([float(metrics[m]) for m in column.reported]))], [None]
    if primary and entry.get("score") is not None:
        return [float(entry["score"])], [None]
    return [], []


def _read_glue(path: Path) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Per column the per-seed scores, and the glue.json task entries (for the predictions)."""
    glue = read_json(path, "GLUE results")
    tasks = glue.get("tasks") if isinstance(glue, dict) else None
    if not isinstance(tasks, dict):
        raise _malformed("GLUE results", path, "no 'tasks' object")
    scores: dict[str, list[float]] = {}
    for task, entry in tasks.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("runs", []), list):
            raise _malformed("GLUE results", path, f"task {task!r} is not a GLUE task entry")
        for column in ALL_COLUMNS:
            if column.task != task:
                continue
            try:
                values, _ = _column_seed_values(entry, column)
            except (AttributeError, TypeError, ValueError):
                raise _malformed(
                    "GLUE results", path, f"task {task!r} has malformed runs or scores"
                ) from None
            if values:
                scores[column.key] = values
    return scores, tasks


def collect_row(label: str, name: str, run_dir: Path, glue_path: Path) -> dict:
    """One row of the table: a student's run directory and its GLUE results (either may be absent)."""
    summary_path = run_dir / "summary.json"
    summary = _read_summary(summary_path) if summary_path.exists() else None
    scores, glue_tasks = _read_glue(glue_path) if glue_path.exists() else ({}, {})
    display = summary.get("display_name", label) if summary else label
    if summary and label != name:
        display = f"{display} ({label})"
    return {
        "label": label,
        "strategy": name,
        "display": display,
        "summary": summary,
        "scores": scores,
        "glue_dir": glue_path.parent,
        "glue_tasks": glue_tasks,
        "mlm_head_trained": mlm_head_trained(name, summary, _strategy_options(run_dir)),
    }


def collect(out: Path) -> dict:
    """Gather the rows of a compare directory into plain data (also used by the tests)."""
    experiment_path = out / "experiment.json"
    if experiment_path.exists():
        entries = _read_experiment(experiment_path)
    else:
        runs = sorted(p.parent.name for p in (out / "runs").glob("*/summary.json"))
        if not runs:
            raise BudgetKDError(
                f"{out} holds no compare results (no experiment.json, no runs/*/summary.json)"
            )
        entries = [
            (label, _read_summary(out / "runs" / label / "summary.json").get("strategy", label))
            for label in runs
        ]
    seeds = _pretrain_seeds(out)
    rows = [
        collect_row(label, name, out / "runs" / label, out / "glue" / label / "glue.json")
        if seeds == [0]
        else seeded_row(label, name, out, seeds)
        for label, name in entries
    ]
    return {"rows": rows, "setup": read_setup(out)}


def _pretrain_seeds(out: Path) -> list[int]:
    """The experiment's pretraining seeds (experiment.json records them only when not [0])."""
    from budgetkd.stages import pretrain_seeds

    experiment = _optional_json(out / "experiment.json", "experiment record") or {}
    return pretrain_seeds(experiment)


def seeded_row(label: str, name: str, out: Path, seeds: list[int]) -> dict:
    """One row over several pretraining runs (``pretrain_seeds``): :func:`merge_units` of the rows
    of its runs ``runs/LABEL~sK``."""
    from budgetkd.stages import seed_suffix

    return merge_units(
        [
            collect_row(sid, name, out / "runs" / sid, out / "glue" / sid / "glue.json")
            for sid in (label + seed_suffix(seed) for seed in seeds)
        ],
        seeds,
    )


def merge_units(units: list[dict], seeds: list[int]) -> dict:
    """One row from the rows of its pretraining runs (seed 0 first): its ``units`` are the runs
    with GLUE results (seed 0 always), its scores per column the runs' means over their
    fine-tuning seeds (so a cell is the mean over pretraining runs ± their sd); the label, tokens
    and the budget table are seed 0's run's."""
    units = [u | {"pretrain_seed": k} for u, k in zip(units, seeds) if u["scores"] or k == 0]
    row = dict(units[0])
    keys = [k for k in units[0]["scores"] if all(k in u["scores"] for u in units)]
    row["scores"] = {k: [float(np.mean(u["scores"][k])) for u in units] for k in keys}
    row["units"] = units
    return row


def read_setup(out: Path) -> dict:
    """What the comparison ran under (SPEC §7a), from DIR/teacher_cost.json and DIR/experiment.json
    (the resolved config): ``teacher_cost`` (the mode charged; teacher_cost.json first, else
    ``teacher_cost.mode``), ``students`` (K, amortized only), ``schedule`` (``budget.schedule``),
    ``decay_fraction`` (wsd only), ``data_setting``; None where the directory does not record it."""
    experiment = _optional_json(out / "experiment.json", "experiment record") or {}
    charge = read_teacher_charge(out) or {}
    spec = experiment.get("teacher_cost") if isinstance(experiment.get("teacher_cost"), dict) else {}
    budget = experiment.get("budget") if isinstance(experiment.get("budget"), dict) else {}
    mode = charge.get("mode") or spec.get("mode")
    schedule = budget.get("schedule")
    return {
        "teacher_cost": mode,
        "students": (charge.get("students") or spec.get("students")) if mode == "amortized" else None,
        "schedule": schedule,
        "decay_fraction": budget.get("decay_fraction") if schedule == "wsd" else None,
        "data_setting": experiment.get("data_setting"),
    }


NOT_RECORDED = "not recorded"


def setup_text(setup: dict | None) -> str:
    """``teacher_cost: amortized (K = 4) · schedule: wsd (decay fraction 0.2) · data_setting:
    unlimited`` — one line for the notes, captions and plot titles."""
    setup = setup or {}
    # the budget accounting (charged_amounts) reads an unrecorded mode as the paper's
    cost = setup.get("teacher_cost") or f"{NOT_RECORDED}, counted as inference"
    if setup.get("students"):
        cost += f" (K = {setup['students']})"
    schedule = setup.get("schedule") or NOT_RECORDED
    if setup.get("decay_fraction") is not None:
        schedule += f" (decay fraction {setup['decay_fraction']:g})"
    data = setup.get("data_setting") or NOT_RECORDED
    return f"teacher_cost: {cost} · schedule: {schedule} · data_setting: {data}"


# ----------------------------------------------------------------------------------------------
# the paired bootstrap


def _task_predictions(row: dict, task: str) -> list[tuple[object, dict]] | None:
    """(seed, {split: {"labels", "predictions"}}) of every seed of the best configuration, or
    None when any of them has no (matching) prediction file."""
    entry = row["glue_tasks"].get(task)
    if not isinstance(entry, dict):
        return None
    runs = [r for r in _best_runs(entry) if r.get("score") is not None]
    if not runs:
        return None
    found = []
    for run in runs:
        try:
            path = run_path(row["glue_dir"], task, float(run["lr"]), int(run["batch_size"]), int(run["seed"]))
        except (KeyError, TypeError, ValueError):
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        splits = load_run_predictions(path, record.get("fingerprint")) if isinstance(record, dict) else None
        if not isinstance(splits, dict):
            return None
        found.append((run["seed"], splits))
    return found


def _column_predictions(
    row: dict, column: ScoreColumn, cache: dict
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """[(labels, predictions)] per seed on the column's split, or None."""
    key = (row["label"], column.task)
    if key not in cache:
        cache[key] = _task_predictions(row, column.task)
    runs = cache[key]
    if runs is None:
        return None
    pairs = []
    for _, splits in runs:
        stored = splits.get(column.split)
        if not isinstance(stored, dict) or len(stored.get("labels", [])) != len(
            stored.get("predictions", [])
        ):
            return None
        if not stored["labels"]:
            return None
        pairs.append((np.asarray(stored["labels"]), np.asarray(stored["predictions"])))
    return pairs


def task_index(column: ScoreColumn) -> int:
    """The index (in ALL_COLUMNS) of the column that carries the task's name: the key of its seed
    draws, the same for every split of one task (MNLI-mm draws as MNLI-m)."""
    return ALL_COLUMNS.index(COLUMN_BY_KEY[column.task])


def seed_draws(seed: int, task: int, label: str, samples: int, seeds: int) -> np.ndarray:
    """Seed indices [samples, seeds] drawn with replacement for one row and task:
    ``default_rng([seed, task, crc32(label)]).integers(0, seeds, (samples, seeds))``."""
    rng = np.random.default_rng([seed, task, zlib.crc32(label.encode())])
    return rng.integers(0, seeds, size=(samples, seeds))


def column_seed_scores(
    column_index: int, metrics: tuple[str, ...], rows: dict[str, list], samples: int, seed: int
) -> dict[str, np.ndarray]:
    """Per row [samples, S]: each fine-tuning seed's score on the example resamples of
    ``default_rng([seed, column_index])`` (the same resamples for every row)."""
    n = len(next(iter(rows.values()))[0][0])
    rng = np.random.default_rng([seed, column_index])
    per_seed = {label: np.empty((samples, len(runs))) for label, runs in rows.items()}
    labels = next(iter(rows.values()))[0][0]  # the same dev labels for every row and seed
    step = bootstrap.block_size(n)
    cache = bootstrap.RankCache()  # the sort of each array, the labels' ranks once per block
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        weights = bootstrap.resample_counts(rng, n, stop - start)
        for label, runs in rows.items():
            for s, (_, predictions) in enumerate(runs):
                per_seed[label][start:stop, s] = bootstrap.score(metrics, weights, labels, predictions, cache)
    return per_seed


def bootstrap_column(
    column_index: int,
    metrics: tuple[str, ...],
    rows: dict[str, list[tuple[np.ndarray, np.ndarray]]],
    samples: int,
    seed: int,
    seed_index: int | None = None,
) -> dict[str, np.ndarray]:
    """Task scores [samples] of every row on the same example resamples of one dev set.

    ``rows``: label → [(labels, predictions)] per fine-tuning seed, all on the same examples
    (the same labels: checked by the caller).
    Example resamples come from ``default_rng([seed, column_index])``; with S > 1 seeds a row's
    resample r averages S seeds drawn with replacement (:func:`seed_draws` keyed by
    ``seed_index``, default ``column_index``; the report passes :func:`task_index`, so that the
    splits of one task, scored on one fine-tuned model per seed, share the draw), each scored on
    resample r's examples.
    """
    per_seed = column_seed_scores(column_index, metrics, rows, samples, seed)
    result = {}
    for label, matrix in per_seed.items():
        if matrix.shape[1] == 1:
            result[label] = matrix[:, 0]
        else:
            task = column_index if seed_index is None else seed_index
            drawn = seed_draws(seed, task, label, samples, matrix.shape[1])
            result[label] = np.take_along_axis(matrix, drawn, axis=1).mean(axis=1)
    return result


def _check_same_examples(column: ScoreColumn, found: dict[str, list], rows_by_label: dict) -> None:
    reference_label, reference_runs = next(iter(found.items()))
    reference = reference_runs[0][0]
    for label, runs in found.items():
        for labels, _ in runs:
            if labels.shape != reference.shape or not np.array_equal(labels, reference):
                raise BudgetKDError(
                    f"the {column.task} {column.split} predictions of {label!r} (in "
                    f"{rows_by_label[label]['glue_dir']}) are not on the same dev examples as those of "
                    f"{reference_label!r}: Δ and its interval need every row evaluated on the same data; "
                    f"redo the GLUE stage of one of them (budgetkd compare --force glue:LABEL)"
                )


def paired_bootstrap(rows: list[dict], columns: list[ScoreColumn], settings: ReportSettings) -> dict:
    """{(label, column key): task scores [samples]} for every row and column with predictions."""
    cache: dict = {}
    scores: dict[tuple[str, str], np.ndarray] = {}
    rows_by_label = {r["label"]: r for r in rows}
    for column in columns:
        found = {}
        for row in rows:
            if column.key in row["scores"]:
                pairs = _column_predictions(row, column, cache)
                if pairs is not None:
                    found[row["label"]] = pairs
        if not found:
            continue
        _check_same_examples(column, found, rows_by_label)
        index = ALL_COLUMNS.index(column)
        for label, values in bootstrap_column(
            index,
            column.metrics,
            found,
            settings.bootstrap_samples,
            settings.bootstrap_seed,
            task_index(column),
        ).items():
            scores[(label, column.key)] = values
    return scores


def pretrain_draws(seed: int, samples: int, runs: int) -> np.ndarray:
    """The pretraining runs of every resample [samples, runs], drawn with replacement, shared by
    every row and task: ``default_rng([seed, PRETRAIN_DRAW_KEY]).integers(0, runs, …)``."""
    return np.random.default_rng([seed, PRETRAIN_DRAW_KEY]).integers(0, runs, size=(samples, runs))


def finetune_draws(seed: int, task: int, slot: int, samples: int, seeds: int) -> np.ndarray:
    """The fine-tuning seeds of pretraining slot ``slot`` [samples, seeds], shared by every row and
    by the splits of one task (MNLI-m/-mm): ``default_rng([seed, task, FINETUNE_DRAW_KEY, slot])``."""
    rng = np.random.default_rng([seed, task, FINETUNE_DRAW_KEY, slot])
    return rng.integers(0, seeds, size=(samples, seeds))


def hierarchical_bootstrap(rows: list[dict], columns: list[ScoreColumn], settings: ReportSettings) -> dict:
    """{(label, column key): task scores [samples]} of the rows over several pretraining runs
    (``units``), by the two-level bootstrap (:func:`budgetkd.glue.bootstrap.hierarchical_scores`):
    resample the pretraining runs, then each drawn run's fine-tuning seeds, then the dev examples.
    Rows pair on all three: the same pretraining-seed indices (run j of every row is its seed-j
    run), the same seed draws per slot and task, the same examples. Rows with another number of
    runs than the most common one get no such interval. The pretraining level's share of every
    resample is widened by :func:`~budgetkd.glue.bootstrap.pretrain_inflation` (few runs)."""
    counts = [len(r.get("units") or [r]) for r in rows]
    runs = max(set(counts), key=counts.count)
    samples, seed = settings.bootstrap_samples, settings.bootstrap_seed
    pretrain = pretrain_draws(seed, samples, runs)
    every_run = np.tile(np.arange(runs), (samples, 1))  # the lower levels only
    factor = bootstrap.pretrain_inflation(runs)
    units = {r["label"]: r.get("units") or [r] for r, n in zip(rows, counts) if n == runs}
    cache: dict = {}
    scores: dict[tuple[str, str], np.ndarray] = {}
    for column in columns:
        found = {}
        for row_units in units.values():
            pairs = [
                _column_predictions(u, column, cache) if column.key in u["scores"] else None
                for u in row_units
            ]
            if all(p is not None for p in pairs):
                found |= {u["label"]: p for u, p in zip(row_units, pairs)}
        if not found:
            continue
        _check_same_examples(column, found, {u["label"]: u for us in units.values() for u in us})
        per_seed = column_seed_scores(ALL_COLUMNS.index(column), column.metrics, found, samples, seed)
        task = task_index(column)
        for label, row_units in units.items():
            if all(u["label"] in per_seed for u in row_units):
                per_run = [per_seed[u["label"]] for u in row_units]
                draws = lambda slot, n, task=task: finetune_draws(seed, task, slot, samples, n)  # noqa: E731
                scores[(label, column.key)] = bootstrap.inflated(
                    bootstrap.hierarchical_scores(per_run, pretrain, draws),
                    bootstrap.hierarchical_scores(per_run, every_run, draws), factor,
                )  # fmt: skip
    return scores


def _seed_bootstrap(row: dict, base: dict, tasks: list[str], samples: int, rng: np.random.Generator):
    """Without prediction files: Δ resampled over the seeds of each task, per row (the old interval).

    Δ_r = mean_t (mean_s a_t[i_r,s] − mean_s b_t[j_r,s]), seed indices i_r (the row) and j_r (the
    base) drawn with replacement per task; the splits of one task (MNLI-m, MNLI-mm) share the draw,
    their scores coming from the same fine-tuned models."""
    if all(len(row["scores"][t]) < 2 and len(base["scores"][t]) < 2 for t in tasks):
        return None
    draws: dict[tuple, np.ndarray] = {}
    total = np.zeros(samples)
    for key in tasks:
        task = COLUMN_BY_KEY[key].task
        sides = []
        for who in (row, base):
            values = np.asarray(who["scores"][key])
            draw = (who["label"], task, len(values))
            if draw not in draws:
                draws[draw] = rng.integers(0, len(values), size=(samples, len(values)))
            sides.append(values[draws[draw]].mean(axis=1))
        total += sides[0] - sides[1]
    return total / len(tasks)


# ----------------------------------------------------------------------------------------------
# the table


def _mean_over(row: dict, keys: list[str]) -> float | None:
    values = [float(np.mean(row["scores"][k])) for k in keys if k in row["scores"]]
    return float(np.mean(values)) if values else None


def _interval(row, base, common, boot, settings, rng) -> tuple[tuple[float, float] | None, str | None]:
    samples, kind = delta_samples(row, base, common, boot, settings, rng)
    if samples is None:
        return None, None
    low, high = np.percentile(samples, [2.5, 97.5])
    return (float(low), float(high)), kind


def delta_samples(row, base, common, boot, settings, rng) -> tuple[np.ndarray | None, str | None]:
    """Bootstrap samples of Δ (row − base, averaged over the ``common`` tasks) and their kind.

    With prediction files the resample r of every task uses the same dev examples for every row
    (and, through the seeded RNG, in every report): the samples of two budgets are paired too."""
    seeded = bool(row.get("units")) and bool(base.get("units"))
    if all((r["label"], k) in boot for r in (row, base) for k in common):
        samples = np.mean([boot[(row["label"], k)] - boot[(base["label"], k)] for k in common], axis=0)
        several = any(len(r["scores"][k]) > 1 for r in (row, base) for k in common)
        kind = INTERVAL_PRETRAIN if seeded else INTERVAL_SEEDS_EXAMPLES if several else INTERVAL_EXAMPLES
    else:
        samples = _seed_bootstrap(row, base, common, settings.bootstrap_samples, rng)
        kind = INTERVAL_PRETRAIN_ONLY if seeded else INTERVAL_SEEDS
    if samples is None:
        return None, None
    return samples, kind


def _table_columns(rows: list[dict], settings: ReportSettings) -> tuple[list[str], list, list]:
    """(Avg task keys present, Avg columns shown, extra columns shown): the paper's columns are
    always shown (as "–" when nobody has them), the others only when some row has them."""
    present = {key for row in rows for key in row["scores"]}
    avg_keys = [c.key for c in ALL_COLUMNS if c.key in settings.avg_tasks and c.key in present]
    avg_columns = [
        c for c in ALL_COLUMNS if c.key in settings.avg_tasks and (c in PAPER_COLUMNS or c.key in present)
    ]
    extra_columns = [c for c in ALL_COLUMNS if c.key not in settings.avg_tasks and c.key in present]
    return avg_keys, avg_columns, extra_columns


def _row_cells(row: dict, columns: list, boot: dict) -> dict:
    """Per column with scores: mean, sample sd (ddof 1; None for one value), count, and the score's
    own 95 % percentile interval from the report's bootstrap resamples (``ci95``: the same
    resamples as Δ's — examples, fine-tuning seeds, pretraining runs as the row has them; None for
    a column without prediction files or outside the Avg)."""
    cells = {}
    for column in columns:
        values = row["scores"].get(column.key)
        if values:
            drawn = boot.get((row["label"], column.key))
            cells[column.key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "n": len(values),
                "ci95": None if drawn is None else tuple(float(v) for v in np.percentile(drawn, [2.5, 97.5])),
            }
    return cells


def _table_row(row: dict, base: dict | None, avg_keys: list[str], columns: list, boot, settings, rng) -> dict:
    """One row of Table 2: Δ = mean over the tasks both rows have of (row − No-KD), its interval."""
    row_avg_tasks = [k for k in avg_keys if k in row["scores"]]
    is_base = row is base
    delta = interval = kind = None
    delta_tasks: list[str] = []
    if base is not None and not is_base:
        delta_tasks = [k for k in row_avg_tasks if k in base["scores"]]
        if delta_tasks:
            delta = _mean_over(row, delta_tasks) - _mean_over(base, delta_tasks)
            interval, kind = _interval(row, base, delta_tasks, boot, settings, rng)
    fewer = row_avg_tasks != avg_keys or (delta is not None and delta_tasks != avg_keys)
    summary = row["summary"] or {}
    stopped_by = summary.get("stopped_by")
    return {
        "label": row["label"],
        "strategy": row["strategy"],
        "display": row["display"],
        "tokens": (summary.get("consumed") or {}).get("tokens"),
        "stopped_by": stopped_by if isinstance(stopped_by, str) else None,
        "data_limited": isinstance(stopped_by, str) and stopped_by != "budget",
        "cells": _row_cells(row, columns, boot),
        "avg": _mean_over(row, row_avg_tasks),
        "avg_tasks": row_avg_tasks,
        "delta": delta,
        "delta_tasks": delta_tasks,
        "delta_ci95": interval,
        "interval": kind,
        "fewer_tasks": fewer and bool(row_avg_tasks),
        "is_base": is_base,
        "pretrain_runs": len(row["units"]) if row.get("units") else None,
    }


def build_table(data: dict, settings: ReportSettings | None = None) -> dict:
    """Numbers of Table 2: per row the tokens, per-task mean/std, Avg, Δ and its interval (paired
    bootstrap over dev examples and fine-tuning seeds, or hierarchical with pretraining seeds)."""
    settings = settings or ReportSettings()
    rows = data["rows"]
    avg_keys, avg_columns, extra_columns = _table_columns(rows, settings)
    base = next((r for r in rows if r["strategy"] == "none"), None)
    avg_used = [COLUMN_BY_KEY[k] for k in avg_keys]
    seeded = any(r.get("units") for r in rows)
    bootstrap_fn = hierarchical_bootstrap if seeded else paired_bootstrap
    boot = bootstrap_fn(rows, avg_used, settings) if base is not None else {}
    rng = np.random.default_rng(settings.bootstrap_seed)
    columns = avg_columns + extra_columns
    return {
        "columns": columns,
        "avg_columns": avg_columns,
        "extra_columns": extra_columns,
        "avg_tasks": avg_keys,
        "settings": settings,
        "setup": data.get("setup") or {},
        "has_base": base is not None,
        "rows": [_table_row(row, base, avg_keys, columns, boot, settings, rng) for row in rows],
    }


def _fmt_tokens(tokens) -> str:
    if tokens is None:
        return "–"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.1f}{unit}"
    return str(tokens)


def _fmt_cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    text = f"{100 * cell['mean']:.1f}"
    if cell["std"] is not None:
        text += f" ± {100 * cell['std']:.1f}"
    return text


def _fmt_avg(row: dict) -> str:
    if row["avg"] is None:
        return "–"
    return f"{100 * row['avg']:.1f}" + (MARK_FEWER_TASKS if row["fewer_tasks"] else "")


def _fmt_delta(row: dict) -> str:
    if row["is_base"]:
        return "–"
    if row["delta"] is None:
        return "n/a"
    text = f"{100 * row['delta']:+.1f}"
    if row["delta_ci95"] is not None:
        low, high = row["delta_ci95"]
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return text + (MARK_FEWER_TASKS if row["fewer_tasks"] else "")


def fmt_strategy(row: dict) -> str:
    """The strategy cell: its display name, ‡ when its run stopped at the data limit."""
    return row["display"] + (f" {MARK_DATA_LIMIT}" if row["data_limited"] else "")


def _titles(keys) -> str:
    return ", ".join(COLUMN_BY_KEY[k].title for k in keys) or "none"


def delta_tasks_text(rows: list[dict]) -> str:
    """``Δ = Avg − Avg(No-KD) over RTE, MRPC-F1 (…)``: the task set of every Δ, named once when
    all share it, else row by row."""
    with_delta = [r for r in rows if r["delta"] is not None]
    sets = {tuple(r["delta_tasks"]) for r in with_delta}
    text = "Δ = Avg − Avg(No-KD) over the Avg tasks both rows have"
    if len(sets) == 1:
        return f"{text}: {_titles(next(iter(sets)))}"
    if sets:
        return f"{text} — " + "; ".join(f"{r['display']}: {_titles(r['delta_tasks'])}" for r in with_delta)
    return text


def table_notes(table: dict) -> list[str]:
    """The sentences under the table: what Avg is over, what the interval is, the marks."""
    settings: ReportSettings = table["settings"]
    setting = (
        "the paper's seven"
        if settings.avg_tasks == PAPER_AVG_TASKS
        else ", ".join(COLUMN_BY_KEY[k].title for k in settings.avg_tasks)
    )
    notes = [
        *([unfair_text(table["unfair"]) + "."] if table.get("unfair") else []),
        f"Setup: {setup_text(table.get('setup'))}.",
        "GLUE dev scores ×100 (MRPC F1, CoLA MCC, MNLI-m/-mm matched/mismatched accuracy, STS-B mean of "
        "Pearson and Spearman, else accuracy); – = not evaluated.",
        f"Avg = mean over {_titles(table['avg_tasks'])} (avg_tasks: {setting}, those present; set with "
        "`budgetkd report DIR --avg-tasks …` or `report: {avg_tasks: […]}` in the experiment config)"
        + (
            f"; {_titles(c.key for c in table['extra_columns'])} shown beside it, not averaged."
            if table["extra_columns"]
            else "."
        ),
    ]
    shown = {c.key for c in table["columns"]}
    if any("mnli" in r["cells"] for r in table["rows"]) and "mnli_mm" not in shown:
        notes.append("MNLI-mm: no row has a mismatched dev split evaluated (no dev_mismatched data).")
    if not table["has_base"]:
        notes.append("No No-KD row, so no Δ.")
        return notes
    return notes + [_delta_note(table), *_row_marks(table)]


def _delta_note(table: dict) -> str:
    """What Δ is over and what its interval resamples (one sentence)."""
    settings: ReportSettings = table["settings"]
    rows = table["rows"]
    kinds = {r["interval"] for r in rows if r["interval"]}
    text = delta_tasks_text(rows)
    if kinds & {INTERVAL_EXAMPLES, INTERVAL_SEEDS_EXAMPLES}:
        text += (
            f"; [low, high] = 95 % paired bootstrap interval: {settings.bootstrap_samples} resamples of "
            "each task's dev examples, the same indices for both rows, each task's own metric recomputed "
            "on them and averaged over the Δ tasks"
        )
        if INTERVAL_SEEDS_EXAMPLES in kinds:
            text += (
                "; resampled over seeds × examples (each resample also draws every row's fine-tuning seeds)"
            )
        if INTERVAL_EXAMPLES in kinds:
            text += (
                "; resampled over examples only (one fine-tuning seed)"
                if INTERVAL_SEEDS_EXAMPLES not in kinds
                else "; over examples only where a row has one seed"
            )
        text += f"; bootstrap RNG seed {settings.bootstrap_seed}"
    if kinds & {INTERVAL_PRETRAIN, INTERVAL_PRETRAIN_ONLY}:
        text += _pretrain_interval_text(table, kinds)
    if INTERVAL_SEEDS in kinds:
        which = ", ".join(r["display"] for r in rows if r["interval"] == INTERVAL_SEEDS)
        text += f"; {which}: no prediction files, interval resampled over fine-tuning seeds only"
    missing = [
        r["display"] for r in rows if not r["is_base"] and r["delta"] is not None and not r["interval"]
    ]
    if missing:
        text += f"; no interval for {', '.join(missing)} (one seed and no prediction files)"
    return text + "."


def _row_marks(table: dict) -> list[str]:
    """The footnotes of the marked rows: fewer Avg/Δ tasks, stopped by the data limit."""
    notes = []
    for row in table["rows"]:
        if row["fewer_tasks"]:
            lacks = [k for k in table["avg_tasks"] if k not in row["avg_tasks"]]
            text = f"{MARK_FEWER_TASKS} {row['display']}: Avg over {_titles(row['avg_tasks'])}"
            if lacks:
                text += f" (no {_titles(lacks)})"
            if not row["is_base"] and row["delta"] is not None:
                text += f"; Δ over {_titles(row['delta_tasks'])}"
            notes.append(text + ".")
    for row in table["rows"]:
        if row["data_limited"]:
            notes.append(
                f"{MARK_DATA_LIMIT} {row['display']}: stopped by the {row['stopped_by']} before its budget "
                "was spent."
            )
    return notes


def _pretrain_interval_text(table: dict, kinds: set) -> str:
    """What the interval covers when the rows have several pretraining runs (pretrain_seeds)."""
    settings: ReportSettings = table["settings"]
    runs = max(r.get("pretrain_runs") or 1 for r in table["rows"])
    text = (
        f"; {runs} pretraining runs per row (pretrain_seeds): every score is the mean over them, a cell's "
        "± the sd over the runs (each run's mean over its fine-tuning seeds)"
    )
    if INTERVAL_PRETRAIN in kinds:
        text += (
            f"; [low, high] = 95 % two-level paired bootstrap, interval over pretraining seeds, fine-tuning "
            f"seeds and dev examples: each of {settings.bootstrap_samples} resamples draws {runs} pretraining "
            "runs with replacement, then each drawn run's fine-tuning seeds, then each task's dev examples; "
            "rows pair on the pretraining-seed index, the fine-tuning seed draw and the dev examples; "
            f"the pretraining level's share of each resample widened ×{bootstrap.pretrain_inflation(runs):.2f} "
            f"(t with {runs - 1} df over z, √(P/(P−1)): few runs); "
            f"bootstrap RNG seed {settings.bootstrap_seed}"
        )
    if INTERVAL_PRETRAIN_ONLY in kinds:
        text += "; without prediction files: interval over pretraining seeds only (the runs' means)"
    return text


def render_markdown(table: dict, budget_rows: list[dict], teacher_note: str | None = None) -> str:
    avg_titles = [c.title for c in table["avg_columns"]]
    extra_titles = [c.title for c in table["extra_columns"]]
    titles = ["Strategy", "Total tokens", *avg_titles, "Avg", "Δ [95 % CI]", *extra_titles]
    lines = ["# Knowledge distillation vs. pretraining from scratch under one compute budget", ""]
    lines += ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
    for row in table["rows"]:
        cells = [fmt_strategy(row), _fmt_tokens(row["tokens"])]
        cells += [_fmt_cell(row["cells"].get(c.key)) for c in table["avg_columns"]]
        cells += [_fmt_avg(row), _fmt_delta(row)]
        cells += [_fmt_cell(row["cells"].get(c.key)) for c in table["extra_columns"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for note in table_notes(table):
        lines += [note, ""]
    untrained = [b["display"] for b in budget_rows if not b["mlm_head_trained"]]
    lines += [
        "## Budget accounting",
        "",
        "| Strategy | Charged time | Charged FLOPs | Teacher charged | Teacher share of FLOPs "
        "| Teacher share of time | Tokens | Epochs | Tokens/s | No-KD/KD throughput | Val MLM loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in budget_rows:
        ratio = "–" if b["throughput_ratio"] is None else f"{b['throughput_ratio']:.2f}×"
        loss = "—" if b["val_mlm_loss"] is None else f"{b['val_mlm_loss']:.3f}"
        lines.append(
            f"| {b['display']} | {b['charged_time_s']:.1f} s | {b['charged_flops']:.3g} "
            f"| {b['teacher_charged_time_s']:.1f} s, {b['teacher_charged_flops']:.3g} FLOPs "
            f"| {100 * b['flops_teacher_share']:.1f} % | {100 * b['time_teacher_share']:.1f} % "
            f"| {_fmt_tokens(b['tokens'])} | {b['epochs']:.3f} | {b['tokens_per_s']:,.0f} | {ratio} | {loss} |"
        )
    lines += ["", _charge_note(budget_rows), ""]
    if teacher_note:
        lines += [teacher_note, ""]
    if untrained:
        lines += [
            f"— : {', '.join(untrained)} train with MLM weight 0, so the student's MLM head is never trained "
            "and its validation MLM loss measures nothing (not shown here nor plotted).",
            "",
        ]
    lines += ["![GLUE scores](plots/glue_scores.png)", "", "![Validation loss](plots/val_loss.png)", ""]
    lines += ["![Tokens processed](plots/tokens.png)", ""]
    return "\n".join(lines)


def _optional_json(path: Path, what: str) -> dict | None:
    """A JSON file that may be absent (None); a malformed one is a one-line error."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _malformed(what, path, str(exc)) from None


def read_teacher_preparation(out: Path) -> dict | None:
    """DIR/teacher/summary.json: the teacher budgetkd prepared (pretrained, or fitted an MLM head
    on), or None when the teacher was used as given."""
    return _optional_json(out / "teacher" / "summary.json", "teacher summary")


def teacher_preparation_note(summary: dict | None, charge: dict | None) -> str | None:
    """One line on what preparing the teacher cost (SPEC §7a: reported, charged to no student
    unless teacher_cost is amortized)."""
    if not summary or "consumed" not in summary:
        return None
    c = summary["consumed"]
    amortized = (charge or {}).get("mode") == "amortized"
    charged = (
        f"each KD row is charged 1/{charge.get('students')} of the teacher's pretraining (teacher_cost: amortized)"
        if amortized
        else "charged to no student"
    )
    cost = f"{c['steps']:,} steps, {c['time_s']:.1f} s, {c['flops']:.3g} FLOPs, {_fmt_tokens(c['tokens'])} tokens"
    if summary.get("kind") == "fitted_mlm_head":
        losses = ""
        if summary.get("initial_val_mlm_loss") is not None and summary.get("val_mlm_loss") is not None:
            losses = (
                f"; validation MLM loss {summary['initial_val_mlm_loss']:.3f} → {summary['val_mlm_loss']:.3f}"
            )
            if summary.get("unigram_val_mlm_loss") is not None:
                losses += f" (unigram {summary['unigram_val_mlm_loss']:.3f})"
        return (
            f"Teacher preparation — an MLM head fitted on {summary.get('source')}: {cost}{losses}; {charged}."
        )
    loss = (
        "" if summary.get("val_mlm_loss") is None else f"; validation MLM loss {summary['val_mlm_loss']:.3f}"
    )
    return f"Teacher preparation — pretrained by budgetkd: {cost}{loss}; {charged}."


def _charge_note(budget_rows: list[dict]) -> str:
    """What "charged" means under the experiment's teacher_cost (SPEC §7a)."""
    mode = budget_rows[0]["teacher_cost"] if budget_rows else "inference"
    shares = "Teacher share of FLOPs / time: the teacher's part of what ran, charged or not."
    if mode == "free":
        return (
            "teacher_cost: free — only the student's compute is charged; the teacher's forward "
            f"passes are recorded, not charged. {shares}"
        )
    if mode == "amortized":
        return (
            "teacher_cost: amortized — each KD row is charged the teacher's forward passes plus 1/K "
            f"of the teacher's pretraining (teacher_cost.json), taken off its budget. {shares}"
        )
    return f"teacher_cost: inference (the paper) — the teacher's forward passes are charged to the KD rows. {shares}"


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 4)


def render_csv(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["strategy", "label", "tokens", "stopped_by"]
    for column in table["columns"]:
        header += [column.key, f"{column.key}_std"]
    header += ["avg", "avg_tasks", "delta", "delta_low", "delta_high", "delta_tasks", "delta_interval"]
    header += ["teacher_cost", "schedule", "data_setting", "unfair"]
    setup = table.get("setup") or {}
    writer.writerow(header)
    for row in table["rows"]:
        line = [row["display"], row["label"], row["tokens"], row["stopped_by"]]
        for column in table["columns"]:
            cell = row["cells"].get(column.key)
            line += [_pct(cell and cell["mean"]), _pct(cell and cell["std"])]
        low, high = row["delta_ci95"] or (None, None)
        line += [
            _pct(row["avg"]),
            ";".join(row["avg_tasks"]),
            _pct(row["delta"]),
            _pct(low),
            _pct(high),
            ";".join(row["delta_tasks"]),
            row["interval"],
            setup.get("teacher_cost"),
            setup.get("schedule"),
            setup.get("data_setting"),
            ";".join(table.get("unfair") or []),
        ]
        writer.writerow(["" if v is None else v for v in line])
    return buffer.getvalue()


def _tex_escape(text: str) -> str:
    text = text.replace("&", r"\&").replace("%", r"\%").replace("_", r"\_").replace("#", r"\#")
    return (
        text.replace("±", r"$\pm$")
        .replace(MARK_FEWER_TASKS, r"$^\dagger$")
        .replace(MARK_DATA_LIMIT, r"$^\ddagger$")
        .replace("Δ", r"$\Delta$")
        .replace("–", "--")
        .replace("·", r"$\cdot$")
    )


def render_tex(table: dict) -> str:
    avg, extra = table["avg_columns"], table["extra_columns"]
    caption = "Knowledge distillation vs. pretraining from scratch under one compute budget; "
    if table.get("unfair"):
        caption = unfair_text(table["unfair"]) + "; " + caption
    lines = [
        r"\begin{table}",
        r"\centering",
        r"\caption{" + _tex_escape(caption + setup_text(table.get("setup"))) + "}",
        r"\begin{tabular}{l r " + "r " * len(avg) + "r r" + " r" * len(extra) + "}",
        r"\toprule",
        " & ".join(
            ["Strategy", "Tokens", *(_tex_escape(c.title) for c in avg), "Avg", r"$\Delta$"]
            + [_tex_escape(c.title) for c in extra]
        )
        + r" \\",
        r"\midrule",
    ]
    for row in table["rows"]:
        cells = [fmt_strategy(row), _fmt_tokens(row["tokens"])]
        cells += [_fmt_cell(row["cells"].get(c.key)) for c in avg]
        cells += [_fmt_avg(row), _fmt_delta(row)]
        cells += [_fmt_cell(row["cells"].get(c.key)) for c in extra]
        lines.append(" & ".join(_tex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    lines += ["% " + note.replace("\n", " ") for note in table_notes(table)]
    return "\n".join(lines) + "\n"


def _final_val_mlm_loss(summary: dict) -> float | None:
    value = summary.get("val_mlm_loss")
    if value is None and summary.get("evaluations"):
        value = summary["evaluations"][-1].get("val_mlm_loss")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def charged_amounts(strategy: str, summary: dict, charge: dict | None) -> dict:
    """What a row was charged (SPEC §7a ``teacher_cost``), in seconds and FLOPs.

    charged = run − teacher forward passes (``free`` only) + amortized share (KD rows, ``amortized``)
    teacher charged = teacher forward passes (unless ``free``) + amortized share

    ``charge`` is DIR/teacher_cost.json (absent: the paper's ``inference``); whether a run charged its
    teacher's forward passes is recorded in its summary (``charged.teacher_forward``)."""
    consumed = summary["consumed"]
    mode = (charge or {}).get("mode", "inference")
    forward = (summary.get("charged") or {}).get("teacher_forward", mode != "free")
    kd = strategy != "none"
    share_t = float((charge or {}).get("time_s", 0.0)) if kd else 0.0
    share_f = float((charge or {}).get("flops", 0.0)) if kd else 0.0
    teacher_t = consumed["time_teacher_s"] if forward else 0.0
    teacher_f = consumed["flops_teacher"] if forward else 0.0
    return {
        "teacher_cost": mode,
        "charged_time_s": consumed["time_s"] - consumed["time_teacher_s"] + teacher_t + share_t,
        "charged_flops": consumed["flops"] - consumed["flops_teacher"] + teacher_f + share_f,
        "teacher_charged_time_s": teacher_t + share_t,
        "teacher_charged_flops": teacher_f + share_f,
    }


def read_teacher_charge(out: Path) -> dict | None:
    """DIR/teacher_cost.json (written by compare), or None."""
    return _optional_json(out / "teacher_cost.json", "teacher cost")


def budget_rows(data: dict, charge: dict | None = None) -> list[dict]:
    """One row per run: its consumption, what it was charged (:func:`charged_amounts`), the
    No-KD/KD throughput ratio and the final validation MLM loss."""
    rows = [r for r in data["rows"] if r["summary"]]
    base = next((r for r in rows if r["strategy"] == "none"), None)
    base_tps = base["summary"]["consumed"]["tokens_per_s"] if base else None
    out = []
    for row in rows:
        consumed = row["summary"]["consumed"]
        tps = consumed["tokens_per_s"]
        ratio = None if (base_tps is None or row is base or not tps) else base_tps / tps
        trained = row["mlm_head_trained"]
        out.append(
            {
                "display": row["display"],
                "label": row["label"],
                **consumed,
                **charged_amounts(row["strategy"], row["summary"], charge),
                "throughput_ratio": ratio,
                "stopped_by": row["summary"].get("stopped_by"),
                "mlm_head_trained": trained,
                "val_mlm_loss": _final_val_mlm_loss(row["summary"]) if trained else None,
            }
        )
    return out


def render_budget_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    keys = [
        "label",
        "teacher_cost",
        "charged_time_s",
        "charged_flops",
        "teacher_charged_time_s",
        "teacher_charged_flops",
        "time_s",
        "time_teacher_s",
        "flops",
        "flops_student",
        "flops_teacher",
        "flops_teacher_share",
        "tokens",
        "epochs",
        "steps",
        "tokens_per_s",
        "throughput_ratio",
        "stopped_by",
        "mlm_head_trained",
        "val_mlm_loss",
    ]
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot(out: Path, data: dict, table: dict) -> list[Path]:
    """plots/glue_scores.png, plots/val_loss.png and plots/tokens.png; one colour per strategy,
    the same in every plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {row["label"]: palette[i % len(palette)] for i, row in enumerate(table["rows"])}
    setup = setup_text(table.get("setup"))
    paths = []
    for name, draw in (("glue_scores", _plot_scores), ("val_loss", _plot_val_loss), ("tokens", _plot_tokens)):
        fig = draw(plt, data, table, colour, setup)
        paths.append(out / "plots" / f"{name}.png")
        _save_figure(fig, paths[-1])
        plt.close(fig)
    return paths


def _avg_error(row: dict) -> tuple[float, float]:
    """The Avg bar's error bar: the 95 % interval of Δ drawn around the Avg (Δ − low below,
    high − Δ above: the interval of the row's Avg with the No-KD row's held fixed), ×100."""
    if row["avg"] is not None and row["delta"] is not None and row["delta_ci95"] is not None:
        low, high = row["delta_ci95"]
        return 100 * (row["delta"] - low), 100 * (high - row["delta"])
    return 0.0, 0.0


def _cell_error(cell: dict | None) -> tuple[float, float]:
    """A task bar's error bar, ×100: the score's 95 % bootstrap interval where the table has one,
    else ± its sd over fine-tuning seeds (0 for one seed)."""
    if cell is None:
        return 0.0, 0.0
    if cell.get("ci95") is not None:
        low, high = cell["ci95"]
        return 100 * max(0.0, cell["mean"] - low), 100 * max(0.0, high - cell["mean"])
    return 100 * (cell["std"] or 0), 100 * (cell["std"] or 0)


def _plot_scores(plt, data: dict, table: dict, colour: dict, setup: str):
    """GLUE score per task and strategy; error bars: a task's 95 % bootstrap interval
    (:func:`_cell_error`; ± sd over seeds without prediction files), on every non-base row's Avg
    bar its Δ interval (:func:`_avg_error`)."""
    rows = table["rows"]
    tasks = [c for c in table["columns"] if any(c.key in r["cells"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * (len(tasks) + 1)), 4))
    width = 0.8 / max(1, len(rows))
    positions = np.arange(len(tasks) + 1)
    for i, row in enumerate(rows):
        values = [100 * row["cells"][c.key]["mean"] if c.key in row["cells"] else np.nan for c in tasks]
        errors = [_cell_error(row["cells"].get(c.key)) for c in tasks] + [_avg_error(row)]
        values.append(np.nan if row["avg"] is None else 100 * row["avg"])
        yerr = [[e[0] for e in errors], [e[1] for e in errors]]
        ax.bar(positions + i * width, values, width, yerr=yerr, capsize=2,
               label=row["display"], color=colour[row["label"]])  # fmt: skip
    ax.set_xticks(positions + width * (len(rows) - 1) / 2, [c.title for c in tasks] + ["Avg"])
    ax.set_ylabel("dev score ×100")
    ax.set_title(
        "GLUE dev score per task and strategy (bars: 95 % bootstrap interval of the score, ± sd over "
        f"seeds without predictions; Avg: 95 % paired-bootstrap interval of Δ)\n{setup}",
        fontsize=9,
    )
    # beside the axes, not over the bars (inside, it hid the tallest ones)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return fig


def _plot_val_loss(plt, data: dict, table: dict, colour: dict, setup: str):
    """Validation losses against the budget fraction; the MLM loss only where the MLM head trains."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    untrained = []
    for row in data["rows"]:
        evaluations = (row["summary"] or {}).get("evaluations") or []
        if not evaluations:
            continue
        x = [e["budget_fraction"] for e in evaluations]
        style = {"marker": "o", "label": row["display"], "color": colour[row["label"]]}
        if row["mlm_head_trained"]:
            axes[0].plot(x, [e["val_mlm_loss"] for e in evaluations], **style)
        else:
            untrained.append(row["display"])
        kd = [(e["budget_fraction"], e["val_loss"]) for e in evaluations if e.get("val_loss") is not None]
        if kd and row["strategy"] != "none":
            axes[1].plot([a for a, _ in kd], [b for _, b in kd], **style)
    fig.suptitle(f"Validation loss against the fraction of the budget consumed\n{setup}", fontsize=11)
    axes[0].set_title("MLM loss (students whose MLM head trains)")
    if untrained:
        axes[0].text(0.02, 0.02, "not shown (MLM weight 0, head never trained):\n" + ", ".join(untrained),
                     transform=axes[0].transAxes, fontsize=7, va="bottom")  # fmt: skip
    axes[1].set_title("KD loss (each strategy's own objective)")
    kd_values = [v for line in axes[1].get_lines() for v in line.get_ydata() if v > 0]
    if kd_values and max(kd_values) / min(kd_values) > 20:
        axes[1].set_yscale("log")  # objectives of different strategies differ by orders of magnitude
    for ax in axes:
        ax.set_xlabel("budget fraction consumed")
        ax.set_xlim(-0.02, 1.02)
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("nats per predicted token")
    axes[1].set_ylabel("loss")
    return fig


def _plot_tokens(plt, data: dict, table: dict, colour: dict, setup: str):
    """Tokens processed per strategy under the same budget."""
    rows = table["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar([r["display"] for r in rows], [(r["tokens"] or 0) / 1e6 for r in rows],
                  color=[colour[r["label"]] for r in rows])  # fmt: skip
    ax.bar_label(bars, fmt="%.2fM", fontsize=8)
    ax.set_ylabel("tokens processed (millions)")
    ax.set_title(f"Tokens processed per strategy under the same budget\n{setup}", fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)
    return fig


def unfair_text(fields: list[str]) -> str:
    return f"UNFAIR (written with --allow-unfair): the rows differ in {', '.join(fields)} (fairness.json)"


def unfair_fields(out: Path, allow_unfair: bool) -> list[str] | None:
    """The training rules (schedule, warm-up, peak-LR rule, data setting, teacher-cost mode) in
    which ``fairness.json``'s rows differ; refuse them unless ``allow_unfair`` (SPEC §4)."""
    path = out / "fairness.json"
    if not path.is_file():
        return None
    fairness = read_json(path, "fairness record")
    differs = list(fairness.get("differs") or [])
    if differs and not allow_unfair:
        rules = fairness.get("rules") or {}
        first = differs[0]
        values = ", ".join(f"{label}: {r.get(first)}" for label, r in rules.items())
        raise BudgetKDError(
            f"fairness.json: every row of Table 2 must train under one {first} rule, got {values} "
            f"(differing: {', '.join(differs)}); pass --allow-unfair to write it marked unfair"
        )
    return differs or None


def write_report(
    out: str | Path,
    *,
    avg_tasks=None,
    bootstrap_samples: int | None = None,
    bootstrap_seed: int | None = None,
    allow_unfair: bool = False,
) -> list[Path]:
    """Write every report file of a compare directory; return their paths. Settings not given
    come from the experiment config's ``report`` mapping, else the defaults (:func:`resolve_settings`)."""
    out = Path(out)
    if not out.is_dir():
        raise BudgetKDError(f"report directory not found: {out}")
    settings = resolve_settings(
        out, avg_tasks=avg_tasks, bootstrap_samples=bootstrap_samples, bootstrap_seed=bootstrap_seed
    )
    unfair = unfair_fields(out, allow_unfair)
    data = collect(out)
    table = build_table(data, settings)
    table["unfair"] = unfair
    charge = read_teacher_charge(out)
    budgets = budget_rows(data, charge)
    note = teacher_preparation_note(read_teacher_preparation(out), charge)
    written = []
    for name, text in (
        ("table.md", render_markdown(table, budgets, note)),
        ("table.csv", render_csv(table)),
        ("table.tex", render_tex(table)),
        ("budget.csv", render_budget_csv(budgets)),
    ):
        atomic_write_text(out / name, text)
        written.append(out / name)
    written += plot(out, data, table)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a budgetkd compare output directory")
    parser.add_argument(
        "--avg-tasks",
        metavar="TASKS",
        help="tasks averaged into Avg and Δ: 'paper' (default: QNLI, SST-2, MNLI-m, MRPC-F1, QQP, RTE, "
        "CoLA-MCC), 'all' (also MNLI-mm, STS-B) or a list such as rte,mrpc,stsb",
    )
    parser.add_argument(
        "--bootstrap-samples",
        type=int,
        metavar="N",
        help=f"resamples of the paired bootstrap interval of Δ (default {BOOTSTRAP_SAMPLES})",
    )
    parser.add_argument(
        "--bootstrap-seed",
        type=int,
        metavar="S",
        help=f"seed of the bootstrap RNG (default {BOOTSTRAP_SEED})",
    )
    parser.add_argument(
        "--allow-unfair",
        action="store_true",
        help="write Table 2 even if its rows differ in schedule, warm-up, peak-LR rule, data setting or "
        "teacher-cost mode (fairness.json); the table then says so",
    )


def run(args: argparse.Namespace) -> int:
    paths = write_report(
        args.dir,
        avg_tasks=args.avg_tasks,
        bootstrap_samples=args.bootstrap_samples,
        bootstrap_seed=args.bootstrap_seed,
        allow_unfair=args.allow_unfair,
    )
    print("\n".join(str(p) for p in paths))
    return 0
