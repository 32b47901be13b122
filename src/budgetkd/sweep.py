"""Budget sweeps (SPEC §7a): the warmup-stable-decay schedule, the crossover budget where a KD
strategy stops paying, and the teacher's cost charged to a KD student.

Pure functions: no files, no config. The experiment composes them.

WSD (Hägele et al. 2024). A sweep trains every strategy at points ``B_1 < … < B_n`` of one
currency. With ``schedule: wsd`` one trunk run trains at the peak rate after a warm-up of fixed
length ``W`` (the same for every point, so that the points share it) up to the largest point; the
point ``B_i`` branches from the trunk at ``(1 − f)·B_i`` and decays linearly to 0 at ``B_i``::

    lr_i(c) = peak · c / W                      c < W
    lr_i(c) = peak                              W ≤ c < (1 − f)·B_i
    lr_i(c) = peak · (B_i − c) / (f · B_i)      (1 − f)·B_i ≤ c ≤ B_i

``c`` is the amount consumed so far in the sweep's currency; a branch continues the trunk's meter,
so its charged cost is its prefix plus its own decay in every currency.

Crossover. Δ(B) = Avg_KD(B) − Avg_NoKD(B). Between two adjacent points whose Δ has opposite signs
the crossover is the zero of the straight line through (log B_j, Δ_j) and (log B_{j+1}, Δ_{j+1})::

    log B* = log B_j + Δ_j · (log B_{j+1} − log B_j) / (Δ_j − Δ_{j+1})
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from budgetkd.errors import BudgetKDError

DEFAULT_DECAY_FRACTION = 0.2


# -- the schedule ---------------------------------------------------------------------------------
def check_decay_fraction(decay_fraction: float) -> float:
    if not (isinstance(decay_fraction, int | float) and 0.0 < decay_fraction <= 1.0):
        raise BudgetKDError(f"schedule decay fraction must be in (0, 1], got {decay_fraction!r}")
    return float(decay_fraction)


def wsd_learning_rate(
    peak_lr: float, consumed: float, point: float, warmup: float, decay_fraction: float
) -> float:
    """The learning rate of sweep point ``point`` after ``consumed`` (same currency; formula above).

    ``warmup`` is the warm-up length W in that currency, shared by every point.
    """
    if consumed >= point:
        return 0.0
    decay_start = (1.0 - decay_fraction) * point
    if consumed >= decay_start:
        return peak_lr * (point - consumed) / (decay_fraction * point)
    if warmup > 0 and consumed < warmup:
        return peak_lr * consumed / warmup
    return peak_lr


def branch_amount(point: float, decay_fraction: float) -> float:
    """Where point ``point`` leaves the shared trunk: (1 − f)·B."""
    return (1.0 - decay_fraction) * point


def check_sweep_points(points: Sequence[float], warmup: float, decay_fraction: float) -> list[float]:
    """Sorted, distinct, positive points whose decay never starts inside the shared warm-up."""
    values = sorted(float(p) for p in points)
    if len(values) < 2:
        raise BudgetKDError("a sweep needs at least two budgets")
    if any(not (math.isfinite(p) and p > 0) for p in values):
        raise BudgetKDError(f"sweep budgets must be positive and finite, got {list(points)!r}")
    if len(set(values)) != len(values):
        raise BudgetKDError(f"sweep budgets must be distinct, got {list(points)!r}")
    smallest = branch_amount(values[0], decay_fraction)
    if warmup > smallest:
        raise BudgetKDError(
            f"the warm-up ({warmup:g}) ends after the smallest point starts to decay ({smallest:g}); "
            "shorten the warm-up or drop the smallest budget"
        )
    return values


def budget_tags(texts: Sequence[str]) -> list[str]:
    """Tags (run-directory suffixes) of a sweep's given budgets: the short form (``1e+08tokens``,
    ``3600s``) unless two points share it, then the exact text of each."""
    from budgetkd.budget import Budget

    short = [str(Budget.parse(t)) for t in texts]
    return short if len(set(short)) == len(short) else list(texts)


def wsd_cost(points: Sequence[float], decay_fraction: float) -> float:
    """Charged amount of a whole WSD sweep: the trunk up to the largest point plus every other
    point's decay, ``B_n + Σ_{i<n} f·B_i`` (what the separate runs would cost: ``Σ B_i``)."""
    values = sorted(points)
    return values[-1] + sum(decay_fraction * p for p in values[:-1])


# -- the crossover --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Crossing:
    budget: float
    direction: str  # "kd_stops_paying" (Δ goes from > 0 to < 0) or "kd_starts_paying"
    between: tuple[float, float]


def crossings(budgets: Sequence[float], deltas: Sequence[float]) -> list[Crossing]:
    """Every sign change of Δ between budgets, interpolated in log-budget (module doc).

    Points where Δ is exactly 0 carry no sign: a change of sign across them is a crossing at the
    first such point; Δ = 0 throughout has none. ``budgets`` must be increasing.
    """
    b = np.asarray(budgets, dtype=float)
    d = np.asarray(deltas, dtype=float)
    if b.shape != d.shape or b.ndim != 1:
        raise BudgetKDError("crossover needs one Δ per budget")
    if np.any(np.diff(b) <= 0):
        raise BudgetKDError("crossover needs increasing budgets")
    signed = [j for j in range(len(d)) if d[j] != 0.0]
    found: list[Crossing] = []
    for j, k in zip(signed, signed[1:]):
        d0, d1 = d[j], d[k]
        if d0 * d1 > 0:
            continue
        if k > j + 1:  # zeros in between: Δ reaches 0 at the first of them
            found.append(Crossing(float(b[j + 1]), _direction(d0, d1), (float(b[j]), float(b[k]))))
            continue
        x0, x1 = math.log(b[j]), math.log(b[k])
        x = x0 + d0 * (x1 - x0) / (d0 - d1)
        found.append(Crossing(math.exp(x), _direction(d0, d1), (float(b[j]), float(b[k]))))
    return found


def _direction(before: float, after: float) -> str:
    return "kd_stops_paying" if before > after else "kd_starts_paying"


def observed_direction(deltas: Sequence[float], found: Sequence[Crossing]) -> str:
    """The direction a crossover is sought in: that of the observed first crossing; when Δ never
    changes sign, the one that can still happen: "kd_starts_paying" when KD is behind throughout
    (every non-zero Δ < 0), else "kd_stops_paying" (KD ahead throughout, or Δ = 0 throughout)."""
    if found:
        return found[0].direction
    return "kd_starts_paying" if any(float(d) < 0 for d in deltas) else "kd_stops_paying"


def first_crossover(budgets: Sequence[float], deltas: Sequence[float]) -> float | None:
    """The smallest budget at which Δ crosses 0, or None."""
    found = crossings(budgets, deltas)
    return found[0].budget if found else None


def crossover_with_interval(
    budgets: Sequence[float], deltas: Sequence[float], delta_samples: np.ndarray, level: float = 0.95
) -> dict:
    """The crossover of the observed Δ and a percentile interval from bootstrap samples.

    ``delta_samples``: shape (resamples, points), Δ of each bootstrap resample at every point (the
    same resampled dev examples at every point). The interval is of the crossover *in the observed
    direction* (:func:`observed_direction`): that of the observed first crossing; when Δ never
    changes sign, where KD starts paying if it is behind throughout, where it stops paying if it is
    ahead throughout. Each resample contributes its first
    crossing in that direction; one without such a crossing lies beyond the range, on the side its
    Δ says: for "stops paying", above the largest budget when its Δ there is still > 0, else below
    the smallest; for "starts paying", below the smallest budget when its Δ there is already > 0,
    else above the largest. The interval is the percentile interval of the log crossover over all
    resamples; a bound that falls beyond the range is open (None).
    """
    samples = np.asarray(delta_samples, dtype=float)
    if samples.ndim != 2 or samples.shape[1] != len(budgets):
        raise BudgetKDError("bootstrap samples must have one column per budget")
    lo_b, hi_b = float(min(budgets)), float(max(budgets))
    observed = crossings(budgets, deltas)
    direction = observed_direction(deltas, observed)

    def log_crossover(row) -> float:
        found = [c for c in crossings(budgets, row) if c.direction == direction]
        if found:
            return math.log(found[0].budget)
        if direction == "kd_stops_paying":
            return math.inf if row[-1] > 0 else -math.inf
        return -math.inf if row[0] > 0 else math.inf

    values = np.array([log_crossover(row) for row in samples])
    tail = (1.0 - level) / 2.0
    low, high = (
        np.quantile(values, [tail, 1.0 - tail], method="inverted_cdf") if len(values) else (np.nan, np.nan)
    )
    estimate = observed[0].budget if observed else None
    result = {
        "crossover": estimate,
        "direction": direction,
        "low": float(math.exp(low)) if np.isfinite(low) else None,
        "high": float(math.exp(high)) if np.isfinite(high) else None,
        "level": level,
        "resamples": int(samples.shape[0]),
        "no_crossover_share": float(np.mean(~np.isfinite(values))) if len(values) else None,
        "range": [lo_b, hi_b],
    }
    if estimate is None:
        result["text"] = no_crossover_text(budgets, deltas)
    return result


def no_crossover_text(budgets: Sequence[float], deltas: Sequence[float]) -> str:
    side = "KD ahead" if float(np.mean(deltas)) > 0 else "KD behind"
    return f"no crossover between {min(budgets):g} and {max(budgets):g} ({side} throughout)"


# -- the teacher's cost ---------------------------------------------------------------------------
TEACHER_COST_MODES = ("inference", "free", "amortized")


def teacher_charge(mode: str, *, pretraining: dict | None = None, students: int | None = None) -> dict:
    """What each KD student pays for the teacher beyond its own steps, in time (s) and FLOPs.

    - ``inference`` (the paper): the teacher's forward passes are charged inside every step; no
      extra charge.
    - ``free``: the teacher's forward passes are not charged either (a flag for the meter) and no
      extra charge.
    - ``amortized``: the teacher's own pretraining, ``pretraining = {"time_s", "flops"}``, shared by
      ``students`` KD students: each pays 1/K of it, on top of the forward passes.
    """
    if mode not in TEACHER_COST_MODES:
        raise BudgetKDError(f"teacher_cost must be one of {', '.join(TEACHER_COST_MODES)}, got {mode!r}")
    if mode != "amortized":
        return {"mode": mode, "time_s": 0.0, "flops": 0.0, "charge_forward": mode == "inference"}
    if not isinstance(students, int) or isinstance(students, bool) or students < 1:
        raise BudgetKDError(f"teacher_cost amortized needs students: a positive integer, got {students!r}")
    if not pretraining or not any(k in pretraining for k in ("time_s", "flops")):
        raise BudgetKDError("teacher_cost amortized needs the teacher's pretraining cost (time or FLOPs)")
    return {
        "mode": mode,
        "time_s": float(pretraining.get("time_s", 0.0)) / students,
        "flops": float(pretraining.get("flops", 0.0)) / students,
        "charge_forward": True,
        "students": students,
    }


def kd_budget_amount(no_kd_amount: float, currency: str, charge: dict) -> float:
    """The calibrated KD budget: No-KD's budget minus the per-student teacher charge (SPEC §7a)."""
    key = {"time": "time_s", "flops": "flops"}.get(currency)
    if key is None:
        if charge["time_s"] or charge["flops"]:
            raise BudgetKDError(f"an amortized teacher charge needs a time or FLOPs budget, not {currency}")
        return no_kd_amount
    remaining = no_kd_amount - charge[key]
    if remaining <= 0:
        raise BudgetKDError(
            f"the teacher's amortized charge ({charge[key]:g} {currency}) uses up the whole budget "
            f"({no_kd_amount:g}); raise the number of students or the budget"
        )
    return remaining
