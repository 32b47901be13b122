"""GLUE metrics (SPEC §6), computed by scikit-learn and scipy, never by hand.

Every value is a plain float fraction: accuracy and F1 in [0, 1], Matthews correlation, Pearson
and Spearman in [-1, 1]. F1 is the binary F1 of the positive class (id 1: equivalent/duplicate).
A correlation that is undefined because one side is constant (a model that predicts one class or
one score everywhere) counts as 0.0, the value scikit-learn's ``matthews_corrcoef`` already gives
in that case; this keeps glue.json valid JSON (no NaN) and scores such a model as uninformative.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from budgetkd.glue.tasks import GlueTask


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    return float(accuracy_score(labels, predictions))


def f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    return float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0.0))


def matthews_correlation(labels: Sequence[int], predictions: Sequence[int]) -> float:
    return _finite(matthews_corrcoef(labels, predictions))


def _correlation(fn: Callable, labels: Sequence[float], predictions: Sequence[float]) -> float:
    x = np.asarray(labels, dtype=np.float64)
    y = np.asarray(predictions, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(fn(x, y)[0])


def pearson(labels: Sequence[float], predictions: Sequence[float]) -> float:
    return _correlation(pearsonr, labels, predictions)


def spearman(labels: Sequence[float], predictions: Sequence[float]) -> float:
    return _correlation(spearmanr, labels, predictions)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(
    task: GlueTask, labels: Sequence[int | float], predictions: Sequence[int | float], suffix: str = ""
) -> dict[str, float]:
    """The task's metrics on one split, named with the split's suffix (``accuracy_matched``)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if len(labels) == 0:
        raise ValueError(f"no examples to evaluate for {task.name}")
    return {name + suffix: METRICS[name](labels, predictions) for name in task.metrics}
