"""Time of the report's paired bootstrap of Δ (SPEC §7): the vectorized resample counts of
``budgetkd.glue.bootstrap`` against what a user would otherwise write — scikit-learn / scipy
(``budgetkd.glue.metrics``) called once per resample, task and row.

Synthetic predictions (about 70 % right) on dev sets of the given sizes (default: those of
../shared/data/glue; ``--sizes paper`` for the full GLUE dev sets), one fine-tuning seed, five
rows. The library loop is timed on ``--reference-resamples`` resamples and scaled to
``--resamples``; both compute the same numbers (tests/test_report.py checks this exactly).
Times are CPU seconds of this process (time.process_time), steadier than wall time on a shared machine.

    python benchmarks/report_bootstrap.py [--resamples 2000] [--rows 5] [--sizes shared|paper]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from budgetkd.glue.metrics import METRICS
from budgetkd.report import ALL_COLUMNS, bootstrap_column

SIZES = {
    # column key: dev examples
    "shared": {
        "qnli": 1000,
        "sst2": 872,
        "mnli": 1000,
        "mrpc": 408,
        "qqp": 1000,
        "rte": 277,
        "cola": 1043,
        "stsb": 1500,
    },
    "paper": {
        "qnli": 5463,
        "sst2": 872,
        "mnli": 9815,
        "mrpc": 408,
        "qqp": 40430,
        "rte": 277,
        "cola": 1043,
        "stsb": 1500,
    },
}


def synthetic(column, n: int, rows: int, rng) -> dict:
    if column.key == "stsb":
        labels = np.round(rng.random(n) * 5, 1)
        return {f"row{r}": [(labels, labels + rng.normal(0, 1.5, n))] for r in range(rows)}
    classes = 3 if column.task == "mnli" else 2
    labels = rng.integers(0, classes, n)
    return {
        f"row{r}": [(labels, np.where(rng.random(n) < 0.7, labels, rng.integers(0, classes, n)))]
        for r in range(rows)
    }


def library_loop(column, runs: dict, resamples: int, rng) -> float:
    start = time.process_time()
    n = len(next(iter(runs.values()))[0][0])
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        for pairs in runs.values():
            labels, predictions = pairs[0]
            np.mean([METRICS[m](labels[index], predictions[index]) for m in column.metrics])
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--reference-resamples", type=int, default=50)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--sizes", choices=sorted(SIZES), default="shared")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'task':8} {'n':>6} {'vectorized CPU s':>17} {'library CPU s (scaled)':>23} {'ratio':>8}")
    total_fast = total_slow = 0.0
    for index, column in enumerate(ALL_COLUMNS):
        if column.key not in SIZES[args.sizes]:
            continue
        n = SIZES[args.sizes][column.key]
        runs = synthetic(column, n, args.rows, rng)
        start = time.process_time()
        bootstrap_column(index, column.metrics, runs, args.resamples, 0)
        fast = time.process_time() - start
        slow = (
            library_loop(column, runs, args.reference_resamples, rng)
            * args.resamples
            / args.reference_resamples
        )
        total_fast, total_slow = total_fast + fast, total_slow + slow
        print(f"{column.key:8} {n:>6} {fast:>17.3f} {slow:>23.1f} {slow / fast:>7.0f}×")
    print(f"{'all':8} {'':>6} {total_fast:>17.3f} {total_slow:>23.1f} {total_slow / total_fast:>7.0f}×")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
