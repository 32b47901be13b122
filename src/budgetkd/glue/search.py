"""Grid search bookkeeping (SPEC §6): the grid, one cached result file per run, best configuration.

A *configuration* is (learning rate, batch size); a *run* is a configuration with one seed. Each
finished run is stored in ``DIR/runs/<task>/lr<lr>-bs<bs>-seed<seed>.json`` together with the
fingerprint of everything that determines its result (model weights and tokenizer, data, recipe,
epochs, subset sizes, precision). A later call reuses a run file whose fingerprint matches and
recomputes one whose fingerprint differs, so an interrupted search loses at most the run in flight.

Selection: for each configuration, every metric is averaged over the seeds (standard deviation:
sample standard deviation, n − 1, when there are several seeds); the configuration with the
highest mean task score wins (ties: the earlier one in grid order); its mean metrics are the task's
metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgetkd.errors import BudgetKDError
from budgetkd.glue.tasks import GlueTask
from budgetkd.io import atomic_write_json, atomic_write_text

PAPER_LEARNING_RATES = (1e-5, 3e-5, 5e-5, 8e-5)
PAPER_BATCH_SIZES = (16, 32)

_GRID_HELP = "expected 'paper', 'lr=5e-5,bs=32' or lists separated by ':' such as 'lr=1e-5:3e-5,bs=16:32'"
_GRID_KEYS = {"lr": "lr", "learning_rate": "lr", "bs": "bs", "batch_size": "bs"}


@dataclass(frozen=True)
class Grid:
    learning_rates: tuple[float, ...]
    batch_sizes: tuple[int, ...]

    def configurations(self) -> list[tuple[float, int]]:
        """(learning rate, batch size) pairs, batch size outer, in the order given."""
        return [(lr, bs) for bs in self.batch_sizes for lr in self.learning_rates]

    def as_dict(self) -> dict:
        return {"learning_rates": list(self.learning_rates), "batch_sizes": list(self.batch_sizes)}


PAPER_GRID = Grid(PAPER_LEARNING_RATES, PAPER_BATCH_SIZES)


def parse_grid(spec: str | Grid) -> Grid:
    """``paper`` | ``lr=5e-5,bs=32`` | ``lr=1e-5:3e-5,bs=16:32`` -> :class:`Grid`."""
    if isinstance(spec, Grid):
        return spec
    text = str(spec).strip()
    if text.lower() == "paper":
        return PAPER_GRID

    def bad(why: str) -> BudgetKDError:
        return BudgetKDError(f"malformed --grid {spec!r}: {why}; {_GRID_HELP}")

    values: dict[str, list[str]] = {}
    for part in text.split(","):
        key, sep, raw = part.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise bad(f"{part.strip()!r} is not key=value")
        if key not in _GRID_KEYS:
            raise bad(f"unknown key {key!r} (use lr and bs)")
        key = _GRID_KEYS[key]
        if key in values:
            raise bad(f"{key} given twice")
        items = [v.strip() for v in raw.split(":")]
        if not items or any(not v for v in items):
            raise bad(f"empty value for {key}")
        values[key] = items
    for key in ("lr", "bs"):
        if key not in values:
            raise bad(f"no {key}= given")
    learning_rates: list[float] = []
    for item in values["lr"]:
        try:
            lr = float(item)
        except ValueError:
            raise bad(f"learning rate {item!r} is not a number") from None
        if not math.isfinite(lr) or lr <= 0:
            raise bad(f"learning rate {item!r} must be a positive number")
        if lr not in learning_rates:
            learning_rates.append(lr)
    batch_sizes: list[int] = []
    for item in values["bs"]:
        try:
            bs = int(item)
        except ValueError:
            raise bad(f"batch size {item!r} is not an integer") from None
        if bs <= 0:
            raise bad(f"batch size {item!r} must be positive")
        if bs not in batch_sizes:
            batch_sizes.append(bs)
    return Grid(tuple(learning_rates), tuple(batch_sizes))


def parse_seeds(spec: str | int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(spec, int):
        items: list = [spec]
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    seeds: list[int] = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise BudgetKDError(
                f"malformed --seeds: {item!r} is not an integer (e.g. --seeds 1,2,3)"
            ) from None
        if seed < 0:
            raise BudgetKDError(f"malformed --seeds: {seed} is negative")
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise BudgetKDError("--seeds is empty; give at least one seed, e.g. --seeds 1")
    return tuple(seeds)


# ----------------------------------------------------------------------------------------------
# run files


def run_name(lr: float, batch_size: int, seed: int) -> str:
    """``lr5e-05-bs32-seed1``: ``repr`` of the float, so distinct learning rates never share a file."""
    return f"lr{float(lr)!r}-bs{batch_size}-seed{seed}"


def run_path(out_dir: Path, task: str, lr: float, batch_size: int, seed: int) -> Path:
    return out_dir / "runs" / task / f"{run_name(lr, batch_size, seed)}.json"


def predictions_path(run_file: Path) -> Path:
    return run_file.with_name(run_file.stem + ".predictions.json")


def load_cached_run(path: Path, fingerprint: str, *, need_predictions: bool = False) -> dict | None:
    """The stored run if it finished with this ``fingerprint`` (and has its predictions file when
    needed, the one written with it); None means "run it (again)". An unreadable or foreign file
    is simply recomputed."""
    record = _read_json_or_none(path)
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint:
        return None
    if not isinstance(record.get("metrics"), dict):
        return None
    if need_predictions and load_run_predictions(path, fingerprint, record) is None:
        return None
    return record


def load_run_predictions(path: Path, fingerprint: str, record: dict | None = None) -> dict | None:
    """The dev predictions stored beside the run file ``path``, or None when missing, foreign or
    not the ones written with the run file: a run file records the sha256 of its predictions
    file (:func:`save_run`), so metrics and predictions of two executions of one job (a claim
    taken over while its owner still ran) never pass as one run. Run files from before the
    checksum are taken as they are."""
    try:
        data = predictions_path(path).read_bytes()
        stored = json.loads(data)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("fingerprint") != fingerprint:
        return None
    if record is None:
        record = _read_json_or_none(path)
    expected = record.get("predictions_sha256") if isinstance(record, dict) else None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        return None
    return stored.get("splits")


def save_run(path: Path, record: dict, predictions: dict[str, dict[str, list]]) -> None:
    """Predictions first, then the run file, which records their sha256 and is the "finished"
    marker: the pair is one unit (:func:`load_run_predictions` refuses a run file whose
    predictions file was since replaced by another execution's)."""
    payload = {"fingerprint": record["fingerprint"], "splits": predictions}
    text = json.dumps(payload, separators=(",", ":")) + "\n"
    record = {**record, "predictions_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    atomic_write_text(predictions_path(path), text)
    atomic_write_json(path, record)


def _read_json_or_none(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# aggregation


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return statistics.fmean(values)  # type: ignore[arg-type]


def _std(values: list[float | None]) -> float | None:
    if len(values) < 2 or any(v is None for v in values):
        return None
    return statistics.stdev(values)  # type: ignore[arg-type]


def summarize_task(
    task: GlueTask,
    grid: Grid,
    seeds: Sequence[int],
    records: dict[tuple[float, int, int], dict],
    missing_metrics: Sequence[str] = (),
) -> dict:
    """The ``tasks.<name>`` entry of glue.json from the run records of one task."""
    names = task.reported_metrics
    several = len(seeds) > 1
    configurations = []
    runs = []
    for lr, bs in grid.configurations():
        per_seed = [records[(lr, bs, seed)] for seed in seeds]
        config: dict[str, Any] = {
            "lr": lr,
            "batch_size": bs,
            "metrics": {m: _mean([r["metrics"].get(m) for r in per_seed]) for m in names},
        }
        config["score"] = task.score(config["metrics"])
        if several:
            config["std"] = {m: _std([r["metrics"].get(m) for r in per_seed]) for m in names}
            config["std"]["score"] = _std([task.score(r["metrics"]) for r in per_seed])
        configurations.append(config)
        for seed, record in zip(seeds, per_seed):
            runs.append(
                {
                    "lr": lr,
                    "batch_size": bs,
                    "seed": seed,
                    "metrics": {m: record["metrics"].get(m) for m in names},
                    "score": task.score(record["metrics"]),
                    "train_examples": record.get("train_examples"),
                    "train_steps": record.get("train_steps"),
                    "final_loss": record.get("final_loss"),
                    "train_seconds": record.get("train_seconds"),
                    "eval_seconds": record.get("eval_seconds"),
                }
            )
    scored = [c for c in configurations if c["score"] is not None]
    best = max(scored, key=lambda c: c["score"]) if scored else None  # max keeps the first of ties
    entry: dict[str, Any] = {
        "metrics": dict(best["metrics"]) if best else dict.fromkeys(names),
        "main_metric": task.main_metric,
        "score_metrics": list(task.score_metrics),
        "score": best["score"] if best else None,
        "best": {"lr": best["lr"], "batch_size": best["batch_size"]} if best else None,
    }
    if several:
        entry["std"] = dict(best["std"]) if best else None
    entry["missing"] = [m for m in names if entry["metrics"].get(m) is None or m in missing_metrics]
    entry["configurations"] = configurations
    entry["runs"] = runs
    return entry


def average_score(tasks: dict[str, dict]) -> tuple[float | None, list[str]]:
    """Mean of the task scores over the tasks that have one, and the list of those tasks."""
    included = [name for name, entry in tasks.items() if entry.get("score") is not None]
    if not included:
        return None, []
    return statistics.fmean(tasks[name]["score"] for name in included), included
