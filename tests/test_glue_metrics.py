"""GLUE metrics against hand-computed values, the task registry, and --grid/--tasks/--seeds parsing."""

from __future__ import annotations

import math

import pytest

from budgetkd.errors import BudgetKDError
from budgetkd.glue.metrics import accuracy, compute_metrics, f1, matthews_correlation, pearson, spearman
from budgetkd.glue.search import PAPER_GRID, Grid, parse_grid, parse_seeds, summarize_task
from budgetkd.glue.tasks import TASKS, get_task, parse_tasks

# Confusion matrix used below: TP = 3, TN = 2, FP = 1, FN = 1 (7 examples).
LABELS = [1, 1, 1, 1, 0, 0, 0]
PREDS = [1, 1, 1, 0, 1, 0, 0]


def test_accuracy_is_fraction_correct():
    assert accuracy(LABELS, PREDS) == pytest.approx(5 / 7)


def test_mcc_of_small_confusion_matches_hand_computation():
    # MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (6 − 1) / sqrt(4·4·3·3) = 5/12
    assert matthews_correlation(LABELS, PREDS) == pytest.approx(5 / 12)


def test_f1_of_small_example_matches_hand_computation():
    # precision = TP/(TP+FP) = 3/4, recall = TP/(TP+FN) = 3/4, F1 = 3/4
    assert f1(LABELS, PREDS) == pytest.approx(0.75)
    # TP = 2, FP = 1, FN = 2: precision 2/3, recall 1/2, F1 = 2·(1/3)/(7/6) = 4/7
    assert f1([1, 1, 1, 1, 0], [1, 1, 0, 0, 1]) == pytest.approx(4 / 7)


def test_f1_without_positive_predictions_is_zero_not_a_warning():
    assert f1([1, 0, 1], [0, 0, 0]) == 0.0


def test_pearson_and_spearman_match_hand_computation():
    # x = 1..4, y = 1,3,2,4: deviations (−1.5, −.5, .5, 1.5) and (−1.5, .5, −.5, 1.5);
    # Σ dx·dy = 2.25 − .25 − .25 + 2.25 = 4, Σ dx² = Σ dy² = 5, r = 4/5. Ranks equal values: ρ = 4/5.
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # monotone but not linear: Spearman 1, Pearson below 1
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99


def test_undefined_correlations_count_as_zero():
    assert pearson([1.0, 2.0, 3.0], [2.5, 2.5, 2.5]) == 0.0
    assert spearman([1.0, 2.0, 3.0], [2.5, 2.5, 2.5]) == 0.0
    assert matthews_correlation([0, 1, 1], [1, 1, 1]) == 0.0


def test_compute_metrics_names_metrics_per_split():
    assert compute_metrics(TASKS["mnli"], [0, 1, 2], [0, 1, 1], "_matched") == {
        "accuracy_matched": pytest.approx(2 / 3)
    }
    assert set(compute_metrics(TASKS["mrpc"], LABELS, PREDS)) == {"f1", "accuracy"}
    assert set(compute_metrics(TASKS["qqp"], LABELS, PREDS)) == {"accuracy", "f1"}
    assert set(compute_metrics(TASKS["stsb"], [0.0, 2.5, 5.0], [1.0, 2.0, 4.0])) == {"pearson", "spearman"}


def test_registry_main_metrics_and_task_scores():
    main = {name: task.main_metric for name, task in TASKS.items()}
    assert main == {
        "cola": "matthews_correlation",
        "sst2": "accuracy",
        "mrpc": "f1",
        "qqp": "accuracy",
        "stsb": "pearson",
        "mnli": "accuracy_matched",
        "qnli": "accuracy",
        "rte": "accuracy",
    }
    assert TASKS["stsb"].score({"pearson": 0.8, "spearman": 0.6}) == pytest.approx(0.7)
    assert TASKS["mnli"].score({"accuracy_matched": 0.7, "accuracy_mismatched": None}) == 0.7
    assert TASKS["mnli"].reported_metrics == ("accuracy_matched", "accuracy_mismatched")
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert TASKS["rte"].labels == ("entailment", "not_entailment")


def test_parse_tasks_all_subset_aliases_and_unknown():
    assert [t.name for t in parse_tasks("all")] == list(TASKS)
    assert [t.name for t in parse_tasks("rte, MRPC,rte")] == ["rte", "mrpc"]
    assert [t.name for t in parse_tasks(["SST-2", "STS-B", "CoLA"])] == ["sst2", "stsb", "cola"]
    assert get_task("mnli-m").name == "mnli"
    with pytest.raises(BudgetKDError, match="unknown GLUE task 'wnli'"):
        parse_tasks("rte,wnli")
    with pytest.raises(BudgetKDError, match="empty"):
        parse_tasks(" , ")


def test_grid_paper_is_two_batch_sizes_times_four_learning_rates():
    grid = parse_grid("paper")
    assert grid == PAPER_GRID
    assert grid.batch_sizes == (16, 32)
    assert grid.learning_rates == (1e-5, 3e-5, 5e-5, 8e-5)
    assert len(grid.configurations()) == 8


def test_grid_single_configuration():
    grid = parse_grid("lr=5e-5,bs=32")
    assert grid == Grid((5e-5,), (32,))
    assert grid.configurations() == [(5e-5, 32)]


def test_grid_value_lists_separated_by_colons():
    grid = parse_grid("lr=1e-5:3e-5, bs=16:32")
    assert grid.learning_rates == (1e-5, 3e-5)
    assert grid.batch_sizes == (16, 32)
    assert grid.configurations() == [(1e-5, 16), (3e-5, 16), (1e-5, 32), (3e-5, 32)]
    assert parse_grid("batch_size=8,learning_rate=1e-4:1e-4").configurations() == [(1e-4, 8)]


@pytest.mark.parametrize(
    "spec, culprit",
    [
        ("lr=5e-5", "no bs= given"),
        ("bs=32", "no lr= given"),
        ("lr=abc,bs=32", "'abc' is not a number"),
        ("lr=5e-5,bs=3.5", "'3.5' is not an integer"),
        ("lr=-1e-5,bs=32", "must be a positive"),
        ("lr=5e-5,bs=0", "must be positive"),
        ("lr=5e-5,bs=32,wd=0.1", "unknown key 'wd'"),
        ("lr=5e-5,lr=1e-5,bs=32", "lr given twice"),
        ("lr=1e-5::3e-5,bs=32", "empty value"),
        ("fast", "'fast' is not key=value"),
        ("", "is not key=value"),
    ],
)
def test_malformed_grid_is_a_one_line_error_naming_the_problem(spec, culprit):
    with pytest.raises(BudgetKDError, match="malformed --grid") as info:
        parse_grid(spec)
    assert culprit in str(info.value)
    assert "\n" not in str(info.value)


def test_parse_seeds():
    assert parse_seeds("1") == (1,)
    assert parse_seeds("1, 2,3,2") == (1, 2, 3)
    assert parse_seeds([4, 5]) == (4, 5)
    assert parse_seeds(7) == (7,)
    with pytest.raises(BudgetKDError, match="'x' is not an integer"):
        parse_seeds("1,x")
    with pytest.raises(BudgetKDError, match="empty"):
        parse_seeds("")


def _record(metrics):
    return {"metrics": metrics, "train_examples": 10}


def test_summary_picks_best_configuration_by_mean_score_over_seeds():
    task = TASKS["stsb"]
    grid = Grid((1e-5, 3e-5), (16,))
    records = {  # binary fractions, so that the tie below is exact
        (1e-5, 16, 1): _record({"pearson": 0.50, "spearman": 0.25}),  # score 0.375
        (1e-5, 16, 2): _record({"pearson": 0.75, "spearman": 0.50}),  # score 0.625, mean 0.5
        (3e-5, 16, 1): _record({"pearson": 0.50, "spearman": 0.50}),
        (3e-5, 16, 2): _record({"pearson": 0.50, "spearman": 0.50}),  # mean score 0.5: a tie
    }
    entry = summarize_task(task, grid, (1, 2), records)
    assert entry["best"] == {"lr": 1e-5, "batch_size": 16}  # ties keep the earlier configuration
    assert entry["metrics"] == {"pearson": 0.625, "spearman": 0.375}
    assert entry["score"] == 0.5
    # sample standard deviation over the two seeds: |a − b| / sqrt(2)
    assert entry["std"]["pearson"] == pytest.approx(0.25 / math.sqrt(2))
    assert entry["std"]["score"] == pytest.approx(0.25 / math.sqrt(2))
    assert len(entry["runs"]) == 4 and len(entry["configurations"]) == 2
    records[(3e-5, 16, 2)] = _record({"pearson": 0.9, "spearman": 0.9})
    assert summarize_task(task, grid, (1, 2), records)["best"] == {"lr": 3e-5, "batch_size": 16}
