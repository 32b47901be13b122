"""Acceptance of the report on a finished ``budgetkd compare`` directory (real data, tiny models):
Avg over the paper's tasks present (STS-B beside it), and a paired-bootstrap interval for every Δ
from the single GLUE seed, computed from the prediction files the GLUE stage wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from test_experiment import SHARED, base_config

from budgetkd.cli import main

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not available")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("compare-report")
    config = base_config()
    config["strategies"] = ["none", "tinybert"]
    config["glue"] = {**config["glue"], "tasks": ["rte", "cola", "stsb"], "max_eval_examples": 64}
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path), "--out", str(tmp / "out"), "--no-progress"]) == 0
    return tmp / "out"


def test_report_of_a_finished_compare_directory(finished: Path):
    assert main(["report", str(finished)]) == 0
    with open(finished / "table.csv") as handle:
        rows = {r["label"]: r for r in csv.DictReader(handle)}
    glue = {
        label: json.loads((finished / "glue" / label / "glue.json").read_text())["tasks"]
        for label in ("none", "tinybert")
    }
    for label, tasks in glue.items():
        # Avg = mean of RTE and CoLA-MCC, the paper's tasks present; STS-B is a column beside it
        assert rows[label]["avg_tasks"] == "rte;cola"
        expected = 100 * (tasks["rte"]["score"] + tasks["cola"]["score"]) / 2
        assert float(rows[label]["avg"]) == pytest.approx(expected, abs=1e-3)
        assert float(rows[label]["stsb"]) == pytest.approx(100 * tasks["stsb"]["score"], abs=1e-3)
    tinybert = rows["tinybert"]
    assert tinybert["delta_interval"] == "examples" and tinybert["delta_tasks"] == "rte;cola"
    low, delta, high = (float(tinybert[k]) for k in ("delta_low", "delta", "delta_high"))
    assert low <= delta <= high
    md = (finished / "table.md").read_text()
    assert "paired bootstrap interval: 2000 resamples" in md and "examples only (one fine-tuning seed)" in md
    # TinyBERT trains with MLM weight 0: its validation MLM loss is not tabulated
    with open(finished / "budget.csv") as handle:
        budget = {r["label"]: r for r in csv.DictReader(handle)}
    assert budget["tinybert"]["val_mlm_loss"] == "" and float(budget["none"]["val_mlm_loss"]) > 0
