"""The report (the paper's Table 2) from a fixture of run outputs, against hand-computed numbers."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from budgetkd.cli import main
from budgetkd.errors import BudgetKDError
from budgetkd.glue.metrics import compute_metrics
from budgetkd.glue.search import Grid, run_path, save_run, summarize_task
from budgetkd.glue.tasks import TASKS
from budgetkd.report import (
    ALL_COLUMNS,
    COLUMN_BY_KEY,
    LOGIT_DISTILLING_STRATEGIES,
    PAPER_AVG_TASKS,
    ReportSettings,
    build_table,
    collect,
    mlm_head_trained,
    resolve_settings,
    write_report,
)


def _summary(strategy: str, display: str, tokens: int, time_s: float, flops_teacher: float) -> dict:
    flops_student = 1e12
    return {
        "finished": True,
        "strategy": strategy,
        "display_name": display,
        "budget": {"text": "100s"},
        "consumed": {
            "time_s": time_s,
            "time_teacher_s": 0.5 * time_s if flops_teacher else 0.0,
            "time_excluded_s": 1.0,
            "flops": flops_student + flops_teacher,
            "flops_student": flops_student,
            "flops_teacher": flops_teacher,
            "flops_teacher_share": flops_teacher / (flops_student + flops_teacher),
            "time_teacher_share": 0.5 if flops_teacher else 0.0,
            "tokens": tokens,
            "sequences": tokens // 128,
            "steps": 10,
            "epochs": 0.5,
            "tokens_per_s": tokens / time_s,
        },
        "evaluations": [
            {"budget_fraction": 0.5, "val_mlm_loss": 7.0, "val_loss": 3.0 if flops_teacher else None},
            {"budget_fraction": 1.0, "val_mlm_loss": 6.0, "val_loss": 2.0 if flops_teacher else None},
        ],
    }


def _glue(scores: dict[str, list[float]]) -> dict:
    """A glue.json with one configuration whose per-seed scores are given."""
    tasks = {}
    for task, values in scores.items():
        runs = [{"lr": 5e-5, "batch_size": 32, "seed": i + 1, "score": v} for i, v in enumerate(values)]
        runs.append({"lr": 1e-5, "batch_size": 16, "seed": 1, "score": 0.0})  # a worse configuration
        tasks[task] = {
            "score": sum(values) / len(values),
            "best": {"lr": 5e-5, "batch_size": 32},
            "runs": runs,
        }
    return {"tasks": tasks}


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    rows = {
        # label: (strategy, display, tokens, time, teacher flops, {task: per-seed scores})
        "none": (
            "none",
            "No-KD",
            4_000_000,
            100.0,
            0.0,
            {"rte": [0.60], "mrpc": [0.80], "cola": [0.30], "stsb": [0.90]},
        ),
        "vanilla": (
            "vanilla",
            "Vanilla-KD",
            2_000_000,
            100.0,
            2e12,
            {"rte": [0.62], "mrpc": [0.79], "cola": [0.25], "stsb": [0.10]},
        ),
        "tinybert": ("tinybert", "TinyBERT", 2_500_000, 101.0, 1.5e12, {"rte": [0.66], "mrpc": [0.84]}),
    }
    (tmp_path / "experiment.json").write_text(
        json.dumps({"strategies": [{"label": k, "name": v[0]} for k, v in rows.items()]})
    )
    for label, (strategy, display, tokens, time_s, teacher, scores) in rows.items():
        (tmp_path / "runs" / label).mkdir(parents=True)
        (tmp_path / "runs" / label / "summary.json").write_text(
            json.dumps(_summary(strategy, display, tokens, time_s, teacher))
        )
        (tmp_path / "glue" / label).mkdir(parents=True)
        (tmp_path / "glue" / label / "glue.json").write_text(json.dumps(_glue(scores)))
    return tmp_path


def test_averages_and_deltas_match_hand_computation(compare_dir: Path):
    table = build_table(collect(compare_dir))
    rows = {r["label"]: r for r in table["rows"]}
    # No-KD: (0.60 + 0.80 + 0.30) / 3 = 0.5666…; Vanilla: (0.62 + 0.79 + 0.25) / 3 = 0.5533…
    assert rows["none"]["avg"] == pytest.approx(1.70 / 3)
    assert rows["vanilla"]["avg"] == pytest.approx(1.66 / 3)
    assert rows["vanilla"]["delta"] == pytest.approx(-0.04 / 3)
    # STS-B is shown but stays out of Avg (the paper's seven only)
    assert rows["none"]["cells"]["stsb"]["mean"] == pytest.approx(0.90)
    assert rows["none"]["avg_tasks"] == ["mrpc", "rte", "cola"]
    # TinyBERT has no CoLA: Avg over its two tasks (0.66 + 0.84) / 2 = 0.75, CoLA shown as missing,
    # and Δ over the tasks both rows have: (0.66 + 0.84) / 2 − (0.60 + 0.80) / 2 = +0.05 — not the
    # 0.75 − 0.567 = +0.18 that the missing task alone would give.
    assert rows["tinybert"]["avg"] == pytest.approx(0.75)
    assert "cola" not in rows["tinybert"]["cells"]
    assert rows["tinybert"]["delta"] == pytest.approx(0.05)
    assert rows["tinybert"]["delta_tasks"] == ["mrpc", "rte"]
    assert rows["tinybert"]["fewer_tasks"] and not rows["vanilla"]["fewer_tasks"]
    assert rows["none"]["delta"] is None and rows["none"]["is_base"]
    # the worse configuration (score 0.0) never enters: the best configuration's seeds only
    assert rows["none"]["cells"]["rte"]["mean"] == pytest.approx(0.60)


def test_written_files_and_their_numbers(compare_dir: Path):
    paths = write_report(compare_dir)
    names = {p.name for p in paths}
    assert {
        "table.md",
        "table.csv",
        "table.tex",
        "budget.csv",
        "glue_scores.png",
        "val_loss.png",
        "tokens.png",
    } <= names
    for path in paths:
        assert path.stat().st_size > 0
    with open(compare_dir / "table.csv") as handle:
        rows = {r["label"]: r for r in csv.DictReader(handle)}
    assert float(rows["vanilla"]["avg"]) == pytest.approx(100 * 1.66 / 3, abs=1e-3)
    assert float(rows["vanilla"]["delta"]) == pytest.approx(-100 * 0.04 / 3, abs=1e-3)
    assert rows["tinybert"]["cola"] == ""
    md = (compare_dir / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Strategy | Total tokens"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Strategy", "Total tokens", "QNLI", "SST-2", "MNLI-m", "MRPC-F1", "QQP", "RTE", "CoLA-MCC", "Avg",
        "Δ [95 % CI]", "STS-B",
    ]  # fmt: skip
    vanilla_line = next(line for line in md.splitlines() if line.startswith("| Vanilla-KD"))
    assert "| 2.0M |" in vanilla_line and "| 55.3 |" in vanilla_line and "| -1.3 |" in vanilla_line
    assert vanilla_line.endswith("| 10.0 |")  # STS-B after Δ
    tinybert_line = next(line for line in md.splitlines() if line.startswith("| TinyBERT"))
    assert "| 75.0† | +5.0† |" in tinybert_line
    assert "† TinyBERT: Avg over MRPC-F1, RTE (no CoLA-MCC); Δ over MRPC-F1, RTE." in md
    assert "Avg = mean over MRPC-F1, RTE, CoLA-MCC (avg_tasks: the paper's seven" in md
    assert "STS-B shown beside it, not averaged" in md
    # every Δ names its task set: two sets here, so row by row
    assert (
        "Δ = Avg − Avg(No-KD) over the Avg tasks both rows have — Vanilla-KD: MRPC-F1, RTE, CoLA-MCC; "
        "TinyBERT: MRPC-F1, RTE;" in md
    )
    assert float(rows["tinybert"]["delta"]) == pytest.approx(5.0, abs=1e-3)
    assert rows["tinybert"]["delta_tasks"] == "mrpc;rte"
    assert float(rows["none"]["stsb"]) == pytest.approx(90.0)
    # budget: No-KD/KD throughput ratio = (4e6/100) / (2e6/100) = 2.00
    with open(compare_dir / "budget.csv") as handle:
        budget = {r["label"]: r for r in csv.DictReader(handle)}
    assert float(budget["vanilla"]["throughput_ratio"]) == pytest.approx(2.0)
    assert float(budget["vanilla"]["flops_teacher_share"]) == pytest.approx(2 / 3)
    assert budget["none"]["throughput_ratio"] == ""
    assert r"\toprule" in (compare_dir / "table.tex").read_text()


def test_several_seeds_give_mean_std_and_a_bootstrap_interval(compare_dir: Path):
    (compare_dir / "glue" / "none" / "glue.json").write_text(json.dumps(_glue({"rte": [0.60, 0.62, 0.58]})))
    (compare_dir / "glue" / "vanilla" / "glue.json").write_text(
        json.dumps(_glue({"rte": [0.70, 0.72, 0.68]}))
    )
    table = build_table(collect(compare_dir))
    rows = {r["label"]: r for r in table["rows"]}
    cell = rows["none"]["cells"]["rte"]
    assert cell["mean"] == pytest.approx(0.60) and cell["std"] == pytest.approx(0.02)  # sample std
    assert rows["vanilla"]["delta"] == pytest.approx(0.10)
    low, high = rows["vanilla"]["delta_ci95"]
    # every resample of the seeds gives a Δ between 0.06 and 0.14; the interval holds 0.10
    assert 0.06 - 1e-9 <= low <= 0.10 <= high <= 0.14 + 1e-9
    write_report(compare_dir)
    assert rows["vanilla"]["interval"] == "seeds"  # no prediction files here: seeds only, and said so
    md = (compare_dir / "table.md").read_text()
    assert "± 2.0" in md
    assert "Vanilla-KD, TinyBERT: no prediction files, interval resampled over fine-tuning seeds only" in md


def test_report_command_and_its_errors(compare_dir: Path, tmp_path: Path, capsys):
    assert main(["report", str(compare_dir)]) == 0
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetkd: error:")


# ----------------------------------------------------------------------------------------------
# the paired bootstrap, from prediction files written by the GLUE code itself

LR, BS = 5e-5, 32


def _write_glue_with_predictions(glue_dir: Path, predictions: dict) -> None:
    """``predictions``: task → seed → split → (labels, predictions). Run files, prediction files
    and glue.json are written by budgetkd.glue's own functions, the metrics by scikit-learn/scipy."""
    grid = Grid((LR,), (BS,))
    seeds = sorted({seed for per_seed in predictions.values() for seed in per_seed})
    tasks = {}
    for name, per_seed in predictions.items():
        task = TASKS[name]
        records = {}
        for seed, splits in per_seed.items():
            metrics = {}
            for split in task.dev_splits:
                if split.name in splits:
                    labels, predicted = splits[split.name]
                    metrics.update(compute_metrics(task, labels, predicted, split.metric_suffix))
            record = {"fingerprint": f"{glue_dir.name}-{name}-{seed}", "metrics": metrics}
            stored = {s: {"labels": list(y), "predictions": list(p)} for s, (y, p) in splits.items()}
            save_run(run_path(glue_dir, name, LR, BS, seed), record, stored)
            records[(LR, BS, seed)] = record
        tasks[name] = summarize_task(task, grid, sorted(per_seed), records)
    (glue_dir / "glue.json").write_text(json.dumps({"tasks": tasks, "seeds": seeds}))


def _make_dir(tmp_path: Path, rows: dict, summaries: dict | None = None) -> Path:
    """rows: label → (strategy, display, glue predictions); a summary per row as in _summary."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "experiment.json").write_text(
        json.dumps({"strategies": [{"label": k, "name": v[0]} for k, v in rows.items()]})
    )
    for label, (strategy, display, predictions) in rows.items():
        run_dir = tmp_path / "runs" / label
        run_dir.mkdir(parents=True)
        summary = (summaries or {}).get(label) or _summary(strategy, display, 1_000_000, 100.0, 1e12)
        (run_dir / "summary.json").write_text(json.dumps(summary))
        (tmp_path / "glue" / label).mkdir(parents=True)
        _write_glue_with_predictions(tmp_path / "glue" / label, predictions)
    return tmp_path


def _noisy(rng, labels, correct: float):
    """Predictions equal to the labels with probability ``correct``, else another class."""
    labels = np.asarray(labels)
    return np.where(rng.random(len(labels)) < correct, labels, 1 - labels)


def _predictions(seed: int, quality: float, with_cola: bool = True, seeds=(1,)) -> dict:
    """RTE (accuracy), MRPC (F1), CoLA (MCC), STS-B; the same dev labels for every row."""
    truth = np.random.default_rng(100)
    rte, mrpc, cola = truth.integers(0, 2, 40), truth.integers(0, 2, 30), truth.integers(0, 2, 50)
    stsb = np.round(truth.random(30) * 5, 1)
    out: dict = {"rte": {}, "mrpc": {}, "stsb": {}}
    if with_cola:
        out["cola"] = {}
    for s in seeds:
        rng = np.random.default_rng([seed, s])
        out["rte"][s] = {"dev": (rte.tolist(), _noisy(rng, rte, quality).tolist())}
        out["mrpc"][s] = {"dev": (mrpc.tolist(), _noisy(rng, mrpc, quality).tolist())}
        out["stsb"][s] = {"dev": (stsb.tolist(), (stsb + rng.normal(0, 3 * (1 - quality), 30)).tolist())}
        if with_cola:
            out["cola"][s] = {"dev": (cola.tolist(), _noisy(rng, cola, quality).tolist())}
    return out


def _brute_force_interval(
    rows: dict, base: str, label: str, tasks: list[str], samples: int, seed: int, shared_seeds: bool = True
):
    """The documented bootstrap written out with explicit index resamples and the library metrics.
    ``shared_seeds``: a row's seed draw is keyed by the task (the column of its first split), so
    MNLI-m and MNLI-mm share it; False: keyed by each column, as before the fix."""
    deltas = np.zeros(samples)
    for key in tasks:
        column = COLUMN_BY_KEY[key]
        task = TASKS[column.task]
        index = ALL_COLUMNS.index(column)
        seed_key = [c.key for c in ALL_COLUMNS].index(column.task) if shared_seeds else index
        first = rows[base][2][column.task]
        n = len(next(iter(first.values()))[column.split][0])
        indices = np.random.default_rng([seed, index]).integers(0, n, size=(samples, n))
        side = {}
        for who in (label, base):
            per_seed = rows[who][2][column.task]
            matrix = np.empty((samples, len(per_seed)))
            for s, (_, splits) in enumerate(sorted(per_seed.items())):
                y, p = (np.asarray(v) for v in splits[column.split])
                for r, i in enumerate(indices):
                    values = compute_metrics(task, y[i], p[i])
                    matrix[r, s] = np.mean([values[m] for m in column.metrics])
            if matrix.shape[1] > 1:
                rng = np.random.default_rng([seed, seed_key, zlib.crc32(who.encode())])
                drawn = rng.integers(0, matrix.shape[1], size=matrix.shape)
                matrix = np.take_along_axis(matrix, drawn, axis=1)
            side[who] = matrix.mean(axis=1)
        deltas += side[label] - side[base]
    return tuple(np.percentile(deltas / len(tasks), [2.5, 97.5]))


def test_one_seed_gives_a_paired_bootstrap_interval_equal_to_the_brute_force_one(tmp_path: Path):
    rows = {
        "none": ("none", "No-KD", _predictions(1, 0.6)),
        "vanilla": ("vanilla", "Vanilla-KD", _predictions(2, 0.75)),
        "tinybert": ("tinybert", "TinyBERT", _predictions(3, 0.7, with_cola=False)),
    }
    out = _make_dir(tmp_path, rows)
    settings = ReportSettings(bootstrap_samples=60, bootstrap_seed=5)  # few: the reference is slow
    table = {r["label"]: r for r in build_table(collect(out), settings)["rows"]}
    for label, tasks in (("vanilla", ["mrpc", "rte", "cola"]), ("tinybert", ["mrpc", "rte"])):
        row = table[label]
        assert row["interval"] == "examples" and row["delta_tasks"] == tasks
        expected = _brute_force_interval(rows, "none", label, tasks, 60, 5)
        assert row["delta_ci95"] == pytest.approx(expected, abs=1e-12)
        low, high = row["delta_ci95"]
        assert low < row["delta"] < high
    write_report(out, bootstrap_samples=200, bootstrap_seed=5)
    md = (out / "table.md").read_text()
    assert "95 % paired bootstrap interval: 200 resamples" in md
    table = {
        r["label"]: r
        for r in build_table(collect(out), ReportSettings(bootstrap_samples=200, bootstrap_seed=5))["rows"]
    }
    assert "resampled over examples only (one fine-tuning seed); bootstrap RNG seed 5." in md
    with open(out / "table.csv") as handle:
        csv_rows = {r["label"]: r for r in csv.DictReader(handle)}
    assert csv_rows["vanilla"]["delta_interval"] == "examples"
    assert float(csv_rows["vanilla"]["delta_low"]) == pytest.approx(
        100 * table["vanilla"]["delta_ci95"][0], abs=1e-3
    )
    # deterministic: the same directory and settings give the same table, byte for byte
    first = (out / "table.csv").read_bytes()
    write_report(out, bootstrap_samples=200, bootstrap_seed=5)
    assert (out / "table.csv").read_bytes() == first


def _accuracy_task(labels, predicted) -> dict:
    return {1: {"dev": (list(labels), list(predicted))}}


def test_hand_computed_bootstrap_cases(tmp_path: Path):
    # RTE: No-KD wrong on all 4 examples, the student right on all: every resample has Δ_RTE = 1.
    # MRPC: identical predictions: Δ_MRPC = 0 on every resample. Δ = (1 + 0) / 2 = 0.5 exactly.
    labels = [0, 1, 1, 0]
    wrong = [1, 0, 0, 1]
    mrpc = ([0, 1, 1, 0, 1], [0, 1, 0, 0, 1])
    rows = {
        "none": ("none", "No-KD", {"rte": _accuracy_task(labels, wrong), "mrpc": {1: {"dev": mrpc}}}),
        "vanilla": (
            "vanilla",
            "Vanilla-KD",
            {"rte": _accuracy_task(labels, labels), "mrpc": {1: {"dev": mrpc}}},
        ),
        "same": ("minilm", "MiniLM", {"rte": _accuracy_task(labels, wrong), "mrpc": {1: {"dev": mrpc}}}),
    }
    table = {r["label"]: r for r in build_table(collect(_make_dir(tmp_path / "a", rows)))["rows"]}
    assert table["vanilla"]["delta"] == pytest.approx(0.5)
    assert table["vanilla"]["delta_ci95"] == pytest.approx((0.5, 0.5))
    # identical predictions: Δ = 0 and the interval is [0, 0]
    assert table["same"]["delta"] == 0 and table["same"]["delta_ci95"] == (0.0, 0.0)

    # Two examples, the student right on the first only, No-KD on none: a resample's Δ is the
    # share of draws of example 0, i.e. 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1.
    rows = {
        "none": ("none", "No-KD", {"rte": _accuracy_task([0, 1], [1, 0])}),
        "vanilla": ("vanilla", "Vanilla-KD", {"rte": _accuracy_task([0, 1], [0, 0])}),
    }
    table = {r["label"]: r for r in build_table(collect(_make_dir(tmp_path / "b", rows)))["rows"]}
    assert table["vanilla"]["delta"] == pytest.approx(0.5)
    assert table["vanilla"]["delta_ci95"] == pytest.approx((0.0, 1.0))


def test_several_seeds_resample_seeds_and_examples(tmp_path: Path):
    rows = {
        "none": ("none", "No-KD", _predictions(1, 0.6, seeds=(1, 2))),
        "vanilla": ("vanilla", "Vanilla-KD", _predictions(2, 0.75, seeds=(1, 2, 3))),
    }
    out = _make_dir(tmp_path, rows)
    table = {r["label"]: r for r in build_table(collect(out), ReportSettings(bootstrap_samples=40))["rows"]}
    row = table["vanilla"]
    assert row["interval"] == "seeds x examples"
    assert row["cells"]["rte"]["n"] == 3 and row["cells"]["rte"]["std"] is not None
    assert row["delta_ci95"] == pytest.approx(
        _brute_force_interval(rows, "none", "vanilla", ["mrpc", "rte", "cola"], 40, 0), abs=1e-12
    )
    write_report(out)
    md = (out / "table.md").read_text()
    assert "resampled over seeds × examples" in md
    # one Δ, one task set, named
    assert "Δ = Avg − Avg(No-KD) over the Avg tasks both rows have: MRPC-F1, RTE, CoLA-MCC; [low" in md


def _mnli_predictions(seed: int, qualities) -> dict:
    """MNLI matched (40 examples) and mismatched (36), 3 classes, one fine-tuned model per seed
    scored on both: seed s is right with probability ``qualities[s − 1]`` on either split."""
    truth = np.random.default_rng(101)
    splits = {"dev_matched": truth.integers(0, 3, 40), "dev_mismatched": truth.integers(0, 3, 36)}
    out: dict = {"mnli": {}}
    for s, quality in enumerate(qualities, start=1):
        rng = np.random.default_rng([seed, s])
        out["mnli"][s] = {
            name: (y.tolist(), np.where(rng.random(len(y)) < quality, y, (y + 1) % 3).tolist())
            for name, y in splits.items()
        }
    return out


def test_mnli_matched_and_mismatched_share_each_rows_seed_draw(tmp_path: Path):
    # the seeds differ a lot and alike on both splits (one model per seed): drawing the splits'
    # seeds independently would average that variation away and narrow the interval
    rows = {
        "none": ("none", "No-KD", _mnli_predictions(1, (0.5, 0.6, 0.7))),
        "vanilla": ("vanilla", "Vanilla-KD", _mnli_predictions(2, (0.35, 0.7, 0.95))),
    }
    out = _make_dir(tmp_path, rows)
    settings = ReportSettings(avg_tasks=("mnli", "mnli_mm"), bootstrap_samples=60, bootstrap_seed=3)
    row = {r["label"]: r for r in build_table(collect(out), settings)["rows"]}["vanilla"]
    assert row["delta_tasks"] == ["mnli", "mnli_mm"] and row["interval"] == "seeds x examples"
    tasks = ["mnli", "mnli_mm"]
    shared = _brute_force_interval(rows, "none", "vanilla", tasks, 60, 3)
    independent = _brute_force_interval(rows, "none", "vanilla", tasks, 60, 3, shared_seeds=False)
    assert row["delta_ci95"] == pytest.approx(shared, abs=1e-12)
    assert row["delta_ci95"] != pytest.approx(independent, abs=1e-3)
    width = lambda interval: interval[1] - interval[0]  # noqa: E731
    assert width(shared) > 1.2 * width(independent)


def test_the_seed_only_interval_shares_the_seed_draw_of_mnli_m_and_mm(compare_dir: Path):
    # no prediction files, three seeds: seed s scores 0.5 + 0.1·s on both splits for the student,
    # 0.5 for No-KD. Shared draw: Δ_r = mean of the drawn student scores − 0.5, the same on both
    # splits, so Δ = that of MNLI-m alone, resample by resample.
    def glue(values):
        runs = [
            {
                "lr": 5e-5,
                "batch_size": 32,
                "seed": s,
                "metrics": {"accuracy_matched": v, "accuracy_mismatched": v},
            }
            for s, v in enumerate(values, start=1)
        ]
        return {"tasks": {"mnli": {"best": {"lr": 5e-5, "batch_size": 32}, "runs": runs}}}

    (compare_dir / "glue" / "none" / "glue.json").write_text(json.dumps(glue([0.5, 0.5, 0.5])))
    (compare_dir / "glue" / "vanilla" / "glue.json").write_text(json.dumps(glue([0.6, 0.7, 0.8])))
    both = ReportSettings(avg_tasks=("mnli", "mnli_mm"), bootstrap_samples=400)
    alone = ReportSettings(avg_tasks=("mnli",), bootstrap_samples=400)
    rows = {
        name: {r["label"]: r for r in build_table(collect(compare_dir), settings)["rows"]}
        for name, settings in (("both", both), ("alone", alone))
    }
    assert rows["both"]["vanilla"]["interval"] == "seeds"
    assert rows["both"]["vanilla"]["delta_ci95"] == pytest.approx(rows["alone"]["vanilla"]["delta_ci95"])
    # and that interval is the percentile interval of the mean of 3 draws from {0.1, 0.2, 0.3}
    draws = np.random.default_rng(0).integers(0, 3, size=(400, 3))
    expected = np.percentile(np.array([0.1, 0.2, 0.3])[draws].mean(axis=1), [2.5, 97.5])
    assert rows["alone"]["vanilla"]["delta_ci95"] == pytest.approx(tuple(expected))


def test_avg_tasks_setting_from_the_command_line_and_the_experiment_config(tmp_path: Path, capsys):
    rows = {
        "none": ("none", "No-KD", _predictions(1, 0.6)),
        "vanilla": ("vanilla", "Vanilla-KD", _predictions(2, 0.75)),
    }
    out = _make_dir(tmp_path, rows)
    scores = {r["label"]: r for r in collect(out)["rows"]}["none"]["scores"]
    assert main(["report", str(out), "--avg-tasks", "rte,sts-b", "--bootstrap-samples", "100"]) == 0
    with open(out / "table.csv") as handle:
        none = {r["label"]: r for r in csv.DictReader(handle)}["none"]
    assert none["avg_tasks"] == "rte;stsb"
    assert float(none["avg"]) == pytest.approx(100 * (scores["rte"][0] + scores["stsb"][0]) / 2, abs=1e-3)
    assert "Avg = mean over RTE, STS-B (avg_tasks: RTE, STS-B" in (out / "table.md").read_text()
    # the experiment config's report mapping, read from experiment.json
    experiment = json.loads((out / "experiment.json").read_text())
    (out / "experiment.json").write_text(json.dumps({**experiment, "report": {"avg_tasks": ["mrpc"]}}))
    assert resolve_settings(out).avg_tasks == ("mrpc",)
    assert resolve_settings(out, avg_tasks="paper").avg_tasks == PAPER_AVG_TASKS  # the command line wins
    # bad settings: one line, exit 2
    capsys.readouterr()
    assert main(["report", str(out), "--avg-tasks", "rte,wnli"]) == 2
    assert main(["report", str(out), "--bootstrap-samples", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown task 'wnli'" in err[0] and "bootstrap_samples" in err[1]


def test_rows_on_other_dev_examples_are_refused(tmp_path: Path):
    other = _predictions(2, 0.75)
    labels, predicted = other["rte"][1]["dev"]
    other["rte"][1]["dev"] = (labels[:-1], predicted[:-1])
    rows = {"none": ("none", "No-KD", _predictions(1, 0.6)), "vanilla": ("vanilla", "Vanilla-KD", other)}
    with pytest.raises(BudgetKDError, match="not on the same dev examples"):
        build_table(collect(_make_dir(tmp_path, rows)))


def _tinybert_run_config(run_dir: Path, options: dict) -> None:
    (run_dir / "run_config.json").write_text(json.dumps({"resolved": {"strategy_options": options}}))


def test_untrained_mlm_heads_are_not_tabulated_and_data_limited_runs_are_marked(compare_dir: Path):
    _tinybert_run_config(compare_dir / "runs" / "tinybert", {"mlm_weight": 0.0, "embedding_weight": 1.0})
    summary_path = compare_dir / "runs" / "vanilla" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["stopped_by"] = "data limit (max_epochs)"
    summary_path.write_text(json.dumps(summary))
    write_report(compare_dir)
    with open(compare_dir / "budget.csv") as handle:
        budget = {r["label"]: r for r in csv.DictReader(handle)}
    assert budget["tinybert"]["val_mlm_loss"] == "" and budget["tinybert"]["mlm_head_trained"] == "False"
    assert float(budget["vanilla"]["val_mlm_loss"]) == pytest.approx(6.0)
    md = (compare_dir / "table.md").read_text()
    tinybert_budget = [line for line in md.splitlines() if line.startswith("| TinyBERT")][-1]
    assert tinybert_budget.endswith("| — |")
    assert "— : TinyBERT train with MLM weight 0" in md
    assert "| Vanilla-KD ‡ |" in md
    assert "‡ Vanilla-KD: stopped by the data limit (max_epochs) before its budget was spent." in md
    with open(compare_dir / "table.csv") as handle:
        table = {r["label"]: r for r in csv.DictReader(handle)}
    assert table["vanilla"]["stopped_by"] == "data limit (max_epochs)"


def test_which_students_train_their_mlm_head():
    from budgetkd.strategies import REGISTRY

    # the report's copy of Strategy.needs_teacher_logits (kept so that it never imports torch)
    assert LOGIT_DISTILLING_STRATEGIES == {n for n, cls in REGISTRY.items() if cls.needs_teacher_logits}
    assert mlm_head_trained("none", None, {})
    assert mlm_head_trained("vanilla", None, {"mlm_weight": 0.0})  # its KD term trains the logits
    assert not mlm_head_trained("tinybert", None, {"mlm_weight": 0.0})
    assert mlm_head_trained("tinybert", None, {"mlm_weight": 0.5})
    for name in ("tinybert", "minilm", "minilmv2"):  # no run_config.json: the strategy's defaults
        assert not mlm_head_trained(name, None, None)
    assert mlm_head_trained("minilm", {"mlm_head_trained": True}, {"mlm_weight": 0.0})  # the run's own word


@pytest.mark.parametrize(
    "charge, want_vanilla, want_none",
    [
        # inference (also: no teacher_cost.json): the run's whole consumption; teacher = its forwards
        (None, (100.0, 3e12, 50.0, 2e12), (100.0, 1e12, 0.0, 0.0)),
        (
            {"mode": "inference", "time_s": 0.0, "flops": 0.0},
            (100.0, 3e12, 50.0, 2e12),
            (100.0, 1e12, 0.0, 0.0),
        ),
        # free: the teacher's 50 s and 2e12 FLOPs are recorded but not charged
        ({"mode": "free", "time_s": 0.0, "flops": 0.0}, (50.0, 1e12, 0.0, 0.0), (100.0, 1e12, 0.0, 0.0)),
        # amortized 1/K: 7 s and 5e11 FLOPs on top of the forwards, for KD rows only
        (
            {"mode": "amortized", "time_s": 7.0, "flops": 5e11, "students": 4},
            (107.0, 3.5e12, 57.0, 2.5e12),
            (100.0, 1e12, 0.0, 0.0),
        ),
    ],
)
def test_charged_amounts_per_teacher_cost_mode(compare_dir: Path, charge, want_vanilla, want_none):
    from budgetkd.report import budget_rows

    rows = {b["label"]: b for b in budget_rows(collect(compare_dir), charge)}
    for label, want in (("vanilla", want_vanilla), ("none", want_none)):
        b = rows[label]
        got = (
            b["charged_time_s"],
            b["charged_flops"],
            b["teacher_charged_time_s"],
            b["teacher_charged_flops"],
        )
        assert got == pytest.approx(want), label


def test_the_budget_table_shows_each_rows_charge(compare_dir: Path):
    charge = {"mode": "amortized", "time_s": 7.0, "flops": 5e11, "students": 4}
    (compare_dir / "teacher_cost.json").write_text(json.dumps(charge))
    write_report(compare_dir)
    text = (compare_dir / "table.md").read_text().split("## Budget accounting")[1]
    vanilla = next(line for line in text.splitlines() if line.startswith("| Vanilla-KD |"))
    assert vanilla.startswith("| Vanilla-KD | 107.0 s | 3.5e+12 | 57.0 s, 2.5e+12 FLOPs |"), vanilla
    assert "teacher_cost: amortized" in text
    with open(compare_dir / "budget.csv", newline="") as handle:
        rows = {r["label"]: r for r in csv.DictReader(handle)}
    assert float(rows["vanilla"]["teacher_charged_flops"]) == pytest.approx(2.5e12)
    assert float(rows["none"]["charged_time_s"]) == pytest.approx(100.0)
    assert rows["none"]["teacher_cost"] == "amortized"


def test_the_teachers_preparation_is_reported_not_charged(compare_dir: Path):
    (compare_dir / "teacher").mkdir()
    head_fit = {
        "kind": "fitted_mlm_head",
        "source": "all-MiniLM-L6-v2",
        "consumed": {"steps": 80, "time_s": 55.04, "flops": 1.08e13, "tokens": 327_680},
        "initial_val_mlm_loss": 7.62,
        "val_mlm_loss": 6.855,
        "unigram_val_mlm_loss": 6.983,
    }
    (compare_dir / "teacher" / "summary.json").write_text(json.dumps(head_fit))
    write_report(compare_dir)
    text = (compare_dir / "table.md").read_text()
    assert (
        "Teacher preparation — an MLM head fitted on all-MiniLM-L6-v2: 80 steps, 55.0 s, 1.08e+13 FLOPs, "
        "327.7K tokens; validation MLM loss 7.620 → 6.855 (unigram 6.983); charged to no student." in text
    )
    # a teacher budgetkd pretrained, amortized over K = 4 students
    pretrained = {
        "consumed": {"steps": 600, "time_s": 580.0, "flops": 2e15, "tokens": 2_457_600},
        "val_mlm_loss": 6.57,
    }
    (compare_dir / "teacher" / "summary.json").write_text(json.dumps(pretrained))
    (compare_dir / "teacher_cost.json").write_text(
        json.dumps({"mode": "amortized", "time_s": 145.0, "flops": 5e14, "students": 4})
    )
    write_report(compare_dir)
    assert (
        "Teacher preparation — pretrained by budgetkd: 600 steps, 580.0 s, 2e+15 FLOPs, 2.5M tokens; "
        "validation MLM loss 6.570; each KD row is charged 1/4 of the teacher's pretraining"
        in (compare_dir / "table.md").read_text()
    )


def _capture_figure_texts(monkeypatch, module, saver: str) -> dict:
    """Replace ``module.<saver>(fig, path)`` by one that records each figure's titles by file name."""
    texts: dict = {}

    def capture(fig, path, *args, **kwargs):
        titles = [fig._suptitle.get_text()] if fig._suptitle is not None else []
        texts[Path(path).name] = titles + [ax.get_title() for ax in fig.axes]
        return path

    monkeypatch.setattr(module, saver, capture)
    return texts


def test_teacher_cost_schedule_and_data_setting_are_stated_everywhere(compare_dir: Path, monkeypatch):
    from budgetkd import report

    experiment = json.loads((compare_dir / "experiment.json").read_text())
    experiment.update(
        teacher_cost={"mode": "amortized", "pretraining": "auto", "students": 4},
        budget={"explicit": "100s", "sweep": None, "schedule": "wsd", "decay_fraction": 0.25},
        data_setting="limited",
    )
    (compare_dir / "experiment.json").write_text(json.dumps(experiment))
    charge = {"mode": "amortized", "time_s": 7.0, "flops": 5e11, "students": 4}
    (compare_dir / "teacher_cost.json").write_text(json.dumps(charge))
    texts = _capture_figure_texts(monkeypatch, report, "_save_figure")
    write_report(compare_dir)
    want = "teacher_cost: amortized (K = 4) · schedule: wsd (decay fraction 0.25) · data_setting: limited"
    assert f"Setup: {want}." in (compare_dir / "table.md").read_text()
    with open(compare_dir / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["teacher_cost"], r["schedule"], r["data_setting"]) for r in rows} == {
        ("amortized", "wsd", "limited")
    }
    tex = (compare_dir / "table.tex").read_text()
    caption = next(line for line in tex.splitlines() if line.startswith(r"\caption{"))
    assert caption.endswith(
        r"teacher\_cost: amortized (K = 4) $\cdot$ schedule: wsd (decay fraction 0.25) $\cdot$ "
        r"data\_setting: limited}"
    )
    assert tex.startswith(r"\begin{table}") and tex.index(r"\end{tabular}") < tex.index(r"\end{table}")
    assert set(texts) == {"glue_scores.png", "val_loss.png", "tokens.png"}
    for name, titles in texts.items():
        assert any(want in t for t in titles), name
    # teacher_cost.json wins over the config (it is what was charged); linear has no decay fraction
    (compare_dir / "teacher_cost.json").write_text(json.dumps({"mode": "free", "time_s": 0.0, "flops": 0.0}))
    experiment["budget"]["schedule"] = "linear"
    (compare_dir / "experiment.json").write_text(json.dumps(experiment))
    assert report.setup_text(report.read_setup(compare_dir)) == (
        "teacher_cost: free · schedule: linear · data_setting: limited"
    )


def test_a_directory_that_records_no_setup_says_so(compare_dir: Path):
    from budgetkd import report

    write_report(compare_dir)
    assert (
        "Setup: teacher_cost: not recorded, counted as inference · schedule: not recorded · "
        "data_setting: not recorded." in (compare_dir / "table.md").read_text()
    )
    with open(compare_dir / "table.csv") as handle:
        row = next(csv.DictReader(handle))
    assert (row["teacher_cost"], row["schedule"], row["data_setting"]) == ("", "", "")
    assert report.read_setup(compare_dir)["teacher_cost"] is None


def test_a_malformed_teacher_cost_file_is_a_one_line_error(compare_dir: Path):
    (compare_dir / "teacher_cost.json").write_text("{not json")
    with pytest.raises(BudgetKDError, match="teacher cost"):
        write_report(compare_dir)


def test_the_glue_plot_draws_the_table_s_intervals_as_error_bars(tmp_path: Path, monkeypatch):
    """Per task: the score's 95 % bootstrap interval (the cell's ci95), or ± the seeds' sd for a
    column outside the Avg; on each non-base Avg bar: Δ's paired-bootstrap interval, Δ − low below
    and high − Δ above the Avg."""
    import budgetkd.report as report

    rows = {
        "none": ("none", "No-KD", _predictions(1, 0.6, seeds=(1, 2))),
        "vanilla": ("vanilla", "Vanilla-KD", _predictions(2, 0.75, seeds=(1, 2))),
        "tinybert": ("tinybert", "TinyBERT", _predictions(3, 0.7, with_cola=False)),
    }
    out = _make_dir(tmp_path, rows)
    figures = {}
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.setdefault(path.name, fig))
    settings = ReportSettings(bootstrap_samples=100, bootstrap_seed=2)
    write_report(out, bootstrap_samples=100, bootstrap_seed=2)
    table = build_table(collect(out), settings)
    ax = figures["glue_scores.png"].axes[0]
    tasks = [c for c in table["columns"] if any(c.key in r["cells"] for r in table["rows"])]
    from matplotlib.container import BarContainer

    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == len(table["rows"])
    checked = with_interval = with_sd = 0
    for row, bars in zip(table["rows"], containers):
        segments = bars.errorbar.lines[2][0].get_segments()  # one vertical segment per bar
        assert len(segments) == len(tasks) + 1
        for column, segment, patch in zip(tasks, segments, bars.patches):
            cell = row["cells"].get(column.key)
            if cell is None:
                continue
            if column.key in table["avg_tasks"]:  # the score's own bootstrap interval
                low, high = cell["ci95"]
                assert segment[0][1] == pytest.approx(100 * min(low, cell["mean"]))
                assert segment[1][1] == pytest.approx(100 * max(high, cell["mean"]))
                with_interval += 1
            else:  # outside the Avg (STS-B here): no resamples, ± the seeds' sd
                assert cell["ci95"] is None
                sd = 100 * (cell["std"] or 0)
                assert segment[0][1] == pytest.approx(100 * cell["mean"] - sd)
                assert segment[1][1] == pytest.approx(100 * cell["mean"] + sd)
                with_sd += 1
            assert patch.get_height() == pytest.approx(100 * cell["mean"])
        low, high = segments[-1][0][1], segments[-1][1][1]
        if row["is_base"]:
            assert low == high == pytest.approx(100 * row["avg"])
            continue
        interval_low, interval_high = row["delta_ci95"]
        assert low == pytest.approx(100 * (row["avg"] - row["delta"] + interval_low))
        assert high == pytest.approx(100 * (row["avg"] - row["delta"] + interval_high))
        assert low < 100 * row["avg"] < high
        checked += 1
    assert checked == 2 and with_interval == 8 and with_sd == 3


def _summary_with_rules(
    schedule="linear", warmup=0.06, lr_rule="strategy default", data="unlimited (1 epoch)"
):
    rules = {"schedule": schedule, "warmup": warmup, "lr_rule": lr_rule, "data_setting": data}
    return {"training_rules": rules}


def test_fairness_records_each_rows_rules_and_names_the_differing_ones():
    """Issue 20, item 1: No-KD linear at warm-up 0.06, MiniLM WSD at warm-up 0.1 (same LR rule
    and data) → exactly schedule and warmup differ; teacher_cost is the experiment's one mode."""
    from budgetkd.experiment import fairness_rules

    summaries = {"none": _summary_with_rules(), "minilm": _summary_with_rules("wsd", 0.1)}
    got = fairness_rules(summaries, "free")
    assert got["differs"] == ["schedule", "warmup"]
    assert got["rules"]["none"] == {
        "schedule": "linear", "warmup": 0.06, "lr_rule": "strategy default",
        "data_setting": "unlimited (1 epoch)", "teacher_cost": "free",
    }  # fmt: skip
    assert got["rules"]["minilm"]["schedule"] == "wsd" and got["rules"]["minilm"]["teacher_cost"] == "free"
    same = fairness_rules({"none": _summary_with_rules(), "minilm": _summary_with_rules()}, "inference")
    assert same["differs"] == []
    # a summary of budgetkd ≤ 0.2 records no rules: None, which differs from a recorded value
    old = fairness_rules({"none": {}, "minilm": _summary_with_rules()}, "inference")
    assert old["differs"] == ["schedule", "warmup", "lr_rule", "data_setting"]


def test_the_report_refuses_an_unfair_table_unless_allowed_and_then_marks_it(compare_dir: Path, capfd):
    from test_cli_errors import assert_one_line_error

    from budgetkd.cli import main

    fairness = {
        "rules": {
            "none": {"schedule": "linear", "warmup": 0.06, "lr_rule": "strategy default",
                     "data_setting": "limited", "teacher_cost": "inference"},
            "vanilla": {"schedule": "wsd", "warmup": 0.06, "lr_rule": "given",
                        "data_setting": "limited", "teacher_cost": "inference"},
        },
        "differs": ["schedule", "lr_rule"],
        "ok": False,
    }  # fmt: skip
    (compare_dir / "fairness.json").write_text(json.dumps(fairness))
    rc = main(["report", str(compare_dir)])
    captured = capfd.readouterr()
    assert_one_line_error(
        rc,
        captured.out,
        captured.err,
        "fairness.json: every row of Table 2 must train under one schedule rule",
    )
    assert "got none: linear, vanilla: wsd" in captured.err and "--allow-unfair" in captured.err
    assert not (compare_dir / "table.md").exists()
    assert main(["report", str(compare_dir), "--allow-unfair"]) == 0
    mark = "UNFAIR (written with --allow-unfair): the rows differ in schedule, lr_rule (fairness.json)"
    assert mark + "." in (compare_dir / "table.md").read_text()
    caption = next(
        line for line in (compare_dir / "table.tex").read_text().splitlines() if line.startswith(r"\caption{")
    )
    assert caption.startswith(
        r"\caption{UNFAIR (written with --allow-unfair): the rows differ in schedule, lr\_rule"
    )
    with open(compare_dir / "table.csv") as handle:
        assert {r["unfair"] for r in csv.DictReader(handle)} == {"schedule;lr_rule"}
    # a fair record (or none, as in 0.2) writes an unmarked table
    (compare_dir / "fairness.json").write_text(json.dumps({**fairness, "differs": [], "ok": True}))
    assert main(["report", str(compare_dir)]) == 0
    assert "UNFAIR" not in (compare_dir / "table.md").read_text()
    with open(compare_dir / "table.csv") as handle:
        assert {r["unfair"] for r in csv.DictReader(handle)} == {""}


def test_each_score_carries_its_own_bootstrap_interval_and_the_plot_draws_it(tmp_path: Path):
    """A cell's ci95 is the 2.5/97.5 percentiles of the row's RTE accuracy over the report's index
    resamples (written out here by hand), and its width is the binomial one, 2·1.96·√(p(1−p)/n),
    within 15 %; the GLUE plot's error bar is that interval around the mean (±sd without one)."""
    from budgetkd.report import _cell_error

    n, right = 400, 280  # accuracy 0.7
    labels = np.arange(n) % 2
    predicted = labels.copy()
    predicted[right:] = 1 - predicted[right:]
    rows = {
        "none": ("none", "No-KD", {"rte": _accuracy_task(labels.tolist(), predicted.tolist())}),
        "vanilla": ("vanilla", "Vanilla-KD", {"rte": _accuracy_task(labels.tolist(), labels.tolist())}),
    }
    out = _make_dir(tmp_path, rows)
    samples, seed = 300, 3
    table = {r["label"]: r for r in build_table(collect(out), ReportSettings(bootstrap_samples=samples,
                                                                             bootstrap_seed=seed))["rows"]}  # fmt: skip
    cell = table["none"]["cells"]["rte"]
    index = ALL_COLUMNS.index(COLUMN_BY_KEY["rte"])
    draws = np.random.default_rng([seed, index]).integers(0, n, size=(samples, n))
    by_hand = np.percentile((labels[draws] == predicted[draws]).mean(axis=1), [2.5, 97.5])
    assert cell["ci95"] == pytest.approx(tuple(by_hand), abs=1e-12)
    assert cell["ci95"][1] - cell["ci95"][0] == pytest.approx(2 * 1.96 * np.sqrt(0.7 * 0.3 / n), rel=0.15)
    assert cell["ci95"][0] < cell["mean"] == 0.7 < cell["ci95"][1]
    low, high = cell["ci95"]
    assert _cell_error(cell) == pytest.approx((100 * (0.7 - low), 100 * (high - 0.7)))
    assert _cell_error({"mean": 0.5, "std": 0.02, "n": 3, "ci95": None}) == pytest.approx((2.0, 2.0))
    assert _cell_error(None) == (0.0, 0.0)
