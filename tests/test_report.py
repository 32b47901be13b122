"""The report (the paper's Table 2) from a fixture of run outputs, against hand-computed numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from budgetkd.cli import main
from budgetkd.report import build_table, collect, write_report


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
        "none": ("none", "No-KD", 4_000_000, 100.0, 0.0, {"rte": [0.60], "mrpc": [0.80], "cola": [0.30]}),
        "vanilla": (
            "vanilla",
            "Vanilla-KD",
            2_000_000,
            100.0,
            2e12,
            {"rte": [0.62], "mrpc": [0.79], "cola": [0.25]},
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
    # TinyBERT has no CoLA: Avg over its two tasks (0.66 + 0.84) / 2 = 0.75, CoLA shown as missing.
    assert rows["tinybert"]["avg"] == pytest.approx(0.75)
    assert "cola" not in rows["tinybert"]["cells"]
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
        "Strategy", "Total tokens", "QNLI", "SST-2", "MNLI", "MRPC-F1", "QQP", "RTE", "CoLA-MCC", "Avg", "Δ",
    ]  # fmt: skip
    vanilla_line = next(line for line in md.splitlines() if line.startswith("| Vanilla-KD"))
    assert "| 2.0M |" in vanilla_line and "| 55.3 |" in vanilla_line and "| -1.3 |" in vanilla_line
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
    assert "± 2.0" in (compare_dir / "table.md").read_text()


def test_report_command_and_its_errors(compare_dir: Path, tmp_path: Path, capsys):
    assert main(["report", str(compare_dir)]) == 0
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetkd: error:")
