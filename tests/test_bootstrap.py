"""The vectorized bootstrap metrics against scikit-learn / scipy (via budgetkd.glue.metrics) on
explicit resamples, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

from budgetkd.glue import bootstrap
from budgetkd.glue import metrics as reference


def _check(name: str, labels, predictions, indices) -> None:
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    weights = bootstrap.counts_from_indices(indices, len(labels))
    expected = [reference.METRICS[name](labels[i], predictions[i]) for i in indices]
    got = bootstrap.METRICS[name](weights, labels, predictions)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_metric_equals_the_library_on_random_resamples(seed):
    rng = np.random.default_rng(seed)
    n = 60
    indices = rng.integers(0, n, size=(80, n))
    binary = rng.integers(0, 2, n)
    noisy = np.where(rng.random(n) < 0.7, binary, 1 - binary)
    three = rng.integers(0, 3, n)
    three_predicted = np.where(rng.random(n) < 0.5, three, rng.integers(0, 3, n))
    scores = np.round(rng.random(n) * 5, 1)  # STS-B-like labels with many ties
    predicted = scores + rng.normal(0, 1.0, n)
    predicted[:15] = predicted[0]  # tied predictions too
    _check("accuracy", three, three_predicted, indices)
    _check("f1", binary, noisy, indices)
    _check("matthews_correlation", binary, noisy, indices)
    _check("matthews_correlation", three, three_predicted, indices)  # multi-class (MNLI-like)
    _check("pearson", scores, predicted, indices)
    _check("spearman", scores, predicted, indices)


def test_degenerate_resamples_follow_the_library_conventions():
    # resamples of 3 examples: many are constant on one side (correlations 0, MCC 0)
    labels = np.array([0, 1, 1])
    predictions = np.array([1, 1, 0])
    indices = np.array([[0, 0, 0], [1, 2, 1], [0, 1, 2], [2, 2, 2], [1, 1, 0]])
    for name in ("accuracy", "f1", "matthews_correlation", "pearson", "spearman"):
        _check(name, labels, predictions, indices)
    # F1 with no positive label and no positive prediction: 0 (zero_division=0)
    _check("f1", np.zeros(4, int), np.zeros(4, int), np.array([[0, 1, 2, 3], [3, 3, 3, 3]]))
    # a model predicting one score everywhere: Pearson and Spearman are 0, not NaN
    flat = np.full(5, 2.5)
    _check("pearson", np.arange(5.0), flat, np.array([[0, 1, 2, 3, 4], [4, 3, 3, 0, 1]]))
    _check("spearman", np.arange(5.0), flat, np.array([[0, 1, 2, 3, 4], [4, 3, 3, 0, 1]]))
    # a perfect predictor: exactly 1 on every resample that is not constant
    weights = bootstrap.counts_from_indices(np.array([[0, 1, 2, 3], [0, 0, 3, 3]]), 4)
    np.testing.assert_allclose(bootstrap.pearson(weights, np.arange(4.0), 2 * np.arange(4.0) + 1), [1, 1])


def test_resample_counts_are_the_counts_of_uniform_index_draws():
    n, resamples = 7, 500
    counts = bootstrap.resample_counts(np.random.default_rng(3), n, resamples)
    indices = np.random.default_rng(3).integers(0, n, size=(resamples, n))
    np.testing.assert_array_equal(counts, bootstrap.counts_from_indices(indices, n))
    assert counts.shape == (resamples, n) and (counts.sum(axis=1) == n).all()
    # each example is drawn once per resample on average
    assert counts.mean() == pytest.approx(1.0)


def test_score_averages_the_task_metrics():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    predictions = np.array([0.1, 0.9, 2.5, 2.4, 5.0])
    weights = bootstrap.counts_from_indices(np.array([[0, 1, 2, 3, 4], [0, 1, 1, 3, 4]]), 5)
    expected = [
        (reference.pearson(labels[i], predictions[i]) + reference.spearman(labels[i], predictions[i])) / 2
        for i in ([0, 1, 2, 3, 4], [0, 1, 1, 3, 4])
    ]
    np.testing.assert_allclose(
        bootstrap.score(("pearson", "spearman"), weights, labels, predictions), expected
    )


def test_the_rank_cache_changes_nothing():
    rng = np.random.default_rng(4)
    labels = np.round(rng.random(40) * 5, 1)
    cache = bootstrap.RankCache()
    for _ in range(3):  # blocks of weights; the cache must notice each new block
        weights = bootstrap.resample_counts(rng, 40, 30)
        for noise in (0.5, 2.0):
            predictions = labels + rng.normal(0, noise, 40)
            for name in ("pearson", "spearman"):
                np.testing.assert_array_equal(
                    bootstrap.METRICS[name](weights, labels, predictions, cache),
                    bootstrap.METRICS[name](weights, labels, predictions),
                )
