"""GLUE metrics on many bootstrap resamples of a dev set at once (SPEC §7).

A bootstrap resample of ``n`` dev examples is a multiset: example ``i`` drawn ``w_i`` times, with
``Σ_i w_i = n``. A metric of the resample is the metric of the pairs (label, prediction) repeated
``w_i`` times, so every GLUE metric is a function of weighted sums over the *original* examples.
With the counts of ``R`` resamples as a matrix ``W`` [R, n], each weighted sum is one matrix
product ``W @ x``: no resample is ever materialised, and ``R`` resamples cost a few BLAS calls.

The functions mirror :mod:`budgetkd.glue.metrics` (scikit-learn / scipy) exactly, conventions
included — F1 of class 1 with ``zero_division=0``; a correlation that is undefined because one
side is constant counts as 0.0 — and the tests check them against those libraries on explicit
resamples. They exist because calling scikit-learn once per resample (thousands of times per
task and row) takes minutes where this takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Resamples are processed in blocks of about this many counts (512 kB of float64): a block's
# temporaries stay in cache instead of faulting in fresh pages (measured ~4x faster than 32 MB
# blocks on the STS-B correlations), and QQP's 40k dev examples never need an [R, 40k] matrix.
# The numbers do not depend on it: numpy draws the same indices in blocks as in one call.
BLOCK_ENTRIES = 65_536


def block_size(n: int) -> int:
    """Resamples per block for a dev set of ``n`` examples."""
    return max(1, BLOCK_ENTRIES // max(1, n))


def resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """Counts [resamples, n] (float64): ``W[r, i]`` = how often resample ``r`` drew example ``i``
    when drawing ``n`` indices uniformly with replacement; every row sums to ``n``."""
    indices = rng.integers(0, n, size=(resamples, n))
    offsets = (np.arange(resamples) * n)[:, None]
    return (
        np.bincount((indices + offsets).ravel(), minlength=resamples * n)
        .reshape(resamples, n)
        .astype(np.float64)
    )


def counts_from_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """The counts matrix of explicit index resamples [R, k] (used by the tests)."""
    indices = np.asarray(indices)
    offsets = (np.arange(len(indices)) * n)[:, None]
    return (
        np.bincount((indices + offsets).ravel(), minlength=len(indices) * n).reshape(-1, n).astype(np.float64)
    )


def accuracy(weights: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Σ_i w_i [y_i = p_i] / Σ_i w_i."""
    correct = (np.asarray(labels) == np.asarray(predictions)).astype(np.float64)
    return (weights @ correct) / weights.sum(axis=1)


def f1(weights: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Binary F1 of class 1: 2·TP / (2·TP + FP + FN), 0 where the denominator is 0."""
    y, p = np.asarray(labels) == 1, np.asarray(predictions) == 1
    tp = weights @ (y & p).astype(np.float64)
    fp = weights @ (~y & p).astype(np.float64)
    fn = weights @ (y & ~p).astype(np.float64)
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def matthews_correlation(weights: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Multi-class MCC from the confusion counts (scikit-learn's formula):
    (c·s − Σ_k t_k p_k) / √((s² − Σ_k p_k²)(s² − Σ_k t_k²)), c = correct, s = total, t_k / p_k =
    true / predicted count of class k; 0 where the denominator is 0."""
    y, p = np.asarray(labels), np.asarray(predictions)
    classes = np.unique(np.concatenate([y, p]))
    true_counts = weights @ (y[:, None] == classes[None, :]).astype(np.float64)  # [R, K]
    pred_counts = weights @ (p[:, None] == classes[None, :]).astype(np.float64)
    correct = weights @ (y == p).astype(np.float64)
    total = weights.sum(axis=1)
    cov_yp = correct * total - (true_counts * pred_counts).sum(axis=1)
    cov_pp = total**2 - (pred_counts**2).sum(axis=1)
    cov_yy = total**2 - (true_counts**2).sum(axis=1)
    denominator = cov_pp * cov_yy
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, cov_yp / np.sqrt(safe), 0.0)


def _sort_structure(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The weight-independent part of ranking ``values``: the sort order, the start of each run
    of equal values in it (None when all values differ) and each example's run index."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.empty(len(values), dtype=np.int64)
    group[order] = np.cumsum(new) - 1
    return order, (None if new.all() else np.flatnonzero(new)), group


def _tie_groups(
    values: np.ndarray, weights: np.ndarray, structure: tuple | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the distinct values of ``values`` in increasing order: the weight of each in every
    resample G [R, K], each example's group [n] and whether a resample is constant [R]."""
    order, starts, group = structure or _sort_structure(values)
    group_weights = weights[:, order]
    if starts is not None:
        group_weights = np.add.reduceat(group_weights, starts, axis=1)
    constant = group_weights.max(axis=1) >= weights.sum(axis=1)
    return group_weights, group, constant


def _weighted_sum(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ_i w_ri · v_i per resample r; ``values`` is [n] (one per example) or [R, n]."""
    return weights @ values if values.ndim == 1 else np.einsum("rn,rn->r", weights, values)


def _weighted_correlation(
    weights: np.ndarray, x: np.ndarray, z: np.ndarray, constant: np.ndarray
) -> np.ndarray:
    """Pearson's r of x and z under the weights of each resample (0 where ``constant``)."""
    total = weights.sum(axis=1)
    mean_x = _weighted_sum(weights, x) / total
    mean_z = _weighted_sum(weights, z) / total
    var_x = _weighted_sum(weights, x * x) / total - mean_x**2
    var_z = _weighted_sum(weights, z * z) / total - mean_z**2
    cov = _weighted_sum(weights, x * z) / total - mean_x * mean_z
    denominator = np.sqrt(np.clip(var_x, 0, None) * np.clip(var_z, 0, None))
    ok = ~constant & (denominator > 0)
    return np.clip(np.divide(cov, denominator, out=np.zeros_like(cov), where=ok), -1.0, 1.0)


class RankCache:
    """Work shared between calls on the same arrays: the sort of each array (for every block of
    resamples) and its ranks under the current block (the dev labels, shared by every row)."""

    def __init__(self) -> None:
        self._structure: dict[int, tuple] = {}
        self._ranks: dict[int, tuple] = {}
        self._weights: np.ndarray | None = None

    def ranks(self, values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if weights is not self._weights:  # a new block (the reference keeps ids from being reused)
            self._ranks, self._weights = {}, weights
        key = id(values)
        if key not in self._structure or self._structure[key][0] is not values:
            self._structure[key] = (values, _sort_structure(values))
        if key not in self._ranks:
            self._ranks[key] = _ranks(values, weights, self._structure[key][1])
        return self._ranks[key]


def _ranks(
    values: np.ndarray, weights: np.ndarray, structure: tuple | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based, ties averaged as scipy's ``rankdata``) of every example within
    each resample [R, n], and whether a resample is constant [R]. A value drawn G times after
    L smaller draws occupies ranks L+1 … L+G, so each copy has rank L + (G + 1) / 2."""
    group_weights, group, constant = _tie_groups(values, weights, structure)
    below = np.cumsum(group_weights, axis=1) - group_weights
    return (below + (group_weights + 1) / 2)[:, group], constant


def _ranked(values: np.ndarray, weights: np.ndarray, cache: RankCache | None):
    return cache.ranks(values, weights) if cache is not None else _ranks(values, weights)


def pearson(weights: np.ndarray, labels, predictions, cache: RankCache | None = None) -> np.ndarray:
    """Pearson's r of the resampled pairs; 0 where labels or predictions are constant."""
    x = np.asarray(labels, dtype=np.float64)
    z = np.asarray(predictions, dtype=np.float64)
    constant = _ranked(x, weights, cache)[1] | _ranked(z, weights, cache)[1]
    # centre on the full-sample means first: the moments then cancel far less
    return _weighted_correlation(weights, x - x.mean(), z - z.mean(), constant)


def spearman(weights: np.ndarray, labels, predictions, cache: RankCache | None = None) -> np.ndarray:
    """Spearman's ρ: Pearson's r of the within-resample average ranks; 0 where one side is constant."""
    rank_y, constant_y = _ranked(np.asarray(labels, dtype=np.float64), weights, cache)
    rank_p, constant_p = _ranked(np.asarray(predictions, dtype=np.float64), weights, cache)
    return _weighted_correlation(weights, rank_y, rank_p, constant_y | constant_p)


# Same names as budgetkd.glue.metrics.METRICS.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearman": spearman,
}


_USE_CACHE = frozenset({"pearson", "spearman"})


def score(
    metrics: tuple[str, ...], weights: np.ndarray, labels, predictions, cache: RankCache | None = None
) -> np.ndarray:
    """The task score of every resample: the mean of ``metrics`` (STS-B: Pearson and Spearman).
    ``cache``: a :class:`RankCache` shared by the calls on one dev set (optional)."""
    return np.mean(
        [
            METRICS[m](weights, labels, predictions, cache)
            if m in _USE_CACHE
            else METRICS[m](weights, labels, predictions)
            for m in metrics
        ],
        axis=0,
    )


# -- the two-level (hierarchical) bootstrap over pretraining runs ------------------------------
def hierarchical_scores(
    per_run: list[np.ndarray], pretrain: np.ndarray, finetune: Callable[[int, int], np.ndarray]
) -> np.ndarray:
    """One row's task score in each resample when it has P pretraining runs [R].

    ``per_run[j]``: [R, S] the score of fine-tuning seed s of pretraining run j on resample r's dev
    examples (the same example weights for every run and row). ``pretrain`` [R, P]: the pretraining
    runs drawn with replacement in each resample (slot p draws run ``pretrain[r, p]``);
    ``finetune(p, S)`` [R, S]: the fine-tuning seeds drawn with replacement for slot p. Resample r
    is mean_p mean_s per_run[pretrain[r, p]][r, finetune(p, S)[r, s]]: runs, then the seeds of each
    drawn run, then the examples. Rows given the same ``pretrain`` and ``finetune`` are paired on
    all three levels."""
    samples = len(pretrain)
    total = np.zeros(samples)
    rows = np.arange(samples)
    for slot in range(pretrain.shape[1]):
        values = np.stack(
            [
                matrix[:, 0]
                if matrix.shape[1] == 1
                else np.take_along_axis(matrix, finetune(slot, matrix.shape[1]), axis=1).mean(axis=1)
                for matrix in per_run
            ]
        )  # [P, R]: every run's value under this slot's seed draw
        total += values[pretrain[:, slot], rows]
    return total / pretrain.shape[1]


def pretrain_inflation(runs: int) -> float:
    """The small-sample factor on the pretraining level of the two-level bootstrap:
    t_{.975, P−1} / z_{.975} · √(P / (P − 1)) (2.69 for P = 3, 1.58 for 5, 1.22 for 10). A
    bootstrap over P units has variance (P − 1)/P · s²/P and normal tails where Student's t with
    P − 1 degrees of freedom belongs; the plain percentile interval covered 80 % at P = 3 in the
    simulation of tests/test_pretrain_seeds.py, this one ≥ 95 %. 1 for a single run."""
    if runs < 2:
        return 1.0
    from scipy.stats import norm, t

    return float(t.ppf(0.975, runs - 1) / norm.ppf(0.975) * np.sqrt(runs / (runs - 1)))


def inflated(drawn: np.ndarray, fixed: np.ndarray, factor: float) -> np.ndarray:
    """``fixed + factor · (drawn − fixed)``: ``drawn`` the resamples with the pretraining runs drawn,
    ``fixed`` the same resamples with every run taken once (only the lower levels resampled); the
    pretraining level's share of each resample is widened by ``factor``."""
    return fixed + factor * (drawn - fixed)
