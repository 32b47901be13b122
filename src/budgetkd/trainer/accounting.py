"""What a step costs and what the budget allows (SPEC §1, §3, §7a).

:func:`step_flops` counts a step's FLOPs, :class:`StepFlopsCache` remembers them by predicted
count, :func:`check_data_limit` refuses a budget the data cannot pay for, :func:`charge_step`
charges one step to the meter, and :func:`wsd_schedule` / :class:`WSDSchedule` are the
warm-up–stable–decay learning rate (the linear one is ``budget.learning_rate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from budgetkd import flops
from budgetkd.budget import Budget, Meter, full_batches
from budgetkd.errors import BudgetKDError
from budgetkd.strategies import Strategy
from budgetkd.sweep import check_decay_fraction, wsd_learning_rate


def step_flops(
    strategy: Strategy,
    student_shape: flops.EncoderShape,
    teacher_shape: flops.EncoderShape | None,
    seq_len: int,
    num_sequences: int,
    num_predicted: int,
) -> tuple[float, float]:
    """(student, teacher) FLOPs of one step (SPEC §3), counting only what runs.

    student = 3 · (encoder to its depth + MLM head at P positions if its logits are used + the
    loss's own products); teacher = encoder to its depth + its MLM head if its logits are used +
    the loss's teacher-side products. Depths: ``models.required_depth``; FLOPs: ``flops``.
    """
    depth = strategy.student_depth()
    student_fwd = flops.partial_forward(
        student_shape, seq_len, num_sequences, depth.layers, len(depth.projections)
    )
    if strategy.needs_student_logits:
        student_fwd += flops.mlm_head_forward(student_shape, num_predicted)
    extra_s, extra_t = strategy.extra_forward_flops(num_sequences, seq_len)
    student = flops.training_flops(student_fwd + extra_s)
    teacher = 0.0
    if teacher_shape is not None:
        depth_t = strategy.teacher_depth()
        teacher = (
            flops.partial_forward(
                teacher_shape, seq_len, num_sequences, depth_t.layers, len(depth_t.projections)
            )
            + extra_t
        )
        if strategy.needs_teacher_logits:
            teacher += flops.mlm_head_forward(teacher_shape, num_predicted)
    return student, teacher


class StepFlopsCache:
    """A step's (student, teacher) FLOPs by its predicted count: with the batch size fixed, the
    count is the only thing that varies from step to step."""

    def __init__(self, flops_of: Callable[[int, int], tuple[float, float]], batch_size: int):
        self.flops_of = flops_of  # (num_sequences, num_predicted) → (student, teacher)
        self.batch_size = batch_size
        self.known: dict[int, tuple[float, float]] = {}

    def __call__(self, num_predicted: float) -> tuple[float, float]:
        key = int(num_predicted)
        if key not in self.known:
            self.known[key] = self.flops_of(self.batch_size, key)
        return self.known[key]


def _format_amount(value: float, currency: str) -> str:
    return f"{value:.4g} {currency}"


def _data_limit_error(budget: Budget, max_epochs: float, detail: str) -> BudgetKDError:
    return BudgetKDError(
        f"budget {budget} needs more than the data limit of {max_epochs:g} epoch(s) {detail}— lower the budget "
        "or use data_setting: limited"
    )


def check_data_limit(
    budget: Budget,
    max_epochs: float | None,
    num_train: int,
    batch_size: int,
    seq_len: int,
    flops_of: Callable[[int, float], tuple[float, float]],
) -> int | None:
    """The data limit in steps (None: none, or an epochs budget), after refusing, before any
    compute, a budget in a currency known in advance (steps, tokens, epochs, FLOPs) that cannot be
    spent within ``max_epochs`` of data (SPEC §1, "unlimited data": such a run would stop at the
    data limit with its learning rate never decayed).

    The loop stops before the step that would cross ``max_epochs``: at most
    S = ⌊max_epochs · N / batch⌋ steps. An epochs budget E ≤ ``max_epochs`` is itself a data limit:
    the trainer runs it as ⌊E · N / batch⌋ full batches (``budget.in_steps``), the same rule, so the
    calibration's "one epoch" reads no sequence of a second one. Tokens are
    bounded by S·batch·L. FLOPs are exact when no MLM head runs; with one, the predicted count of
    those S steps is bounded by 0.15·T + 6·√(0.15·0.85·T), T = S·batch·L (binomial masking, six
    standard deviations), so a refused budget certainly needs more data, and one just below the
    bound stops at the data limit at run time and says so (``stopped_by: data limit``).
    ``flops_of(num_sequences, num_predicted)`` is a step's (student, teacher) FLOPs.
    """
    if max_epochs is None:
        return None
    currency, amount = budget.currency, budget.amount
    if currency == "epochs":
        if amount > max_epochs * (1 + 1e-12):
            raise _data_limit_error(
                budget, max_epochs, "(max_epochs; data_setting: unlimited never repeats the corpus) "
            )
        return None
    max_steps = full_batches(max_epochs, num_train, batch_size)
    max_tokens = max_steps * batch_size * seq_len
    if currency == "steps":
        capacity = float(max_steps)
    elif currency == "tokens":
        capacity = float(max_tokens)
    elif currency == "flops":
        predicted = 0.15 * max_tokens + 6.0 * math.sqrt(0.15 * 0.85 * max_tokens)
        per_step = flops_of(batch_size, predicted / max(1, max_steps))
        capacity = max_steps * (per_step[0] + per_step[1])
    else:  # time: not known in advance; the loop stops at the data limit and says so
        return max_steps
    if amount > capacity * (1 + 1e-9):
        raise _data_limit_error(
            budget,
            max_epochs,
            f"({num_train} training sequences in batches of {batch_size}: at most {max_steps} steps, "
            f"{_format_amount(capacity, currency)}; data_setting: unlimited never repeats the corpus) ",
        )
    return max_steps


def charge_step(
    meter: Meter,
    *,
    sequences: int,
    tokens: int,
    time_s: float,
    time_teacher_s: float,
    step_flops: tuple[float, float],
) -> None:
    """Charge one step to the meter: one step, its sequences and tokens, its wall-clock time (and
    the teacher's part of it) and its (student, teacher) FLOPs (SPEC §3)."""
    meter.steps += 1
    meter.sequences += sequences
    meter.tokens += tokens
    meter.time_s += time_s
    meter.time_teacher_s += time_teacher_s
    meter.flops_student += step_flops[0]
    meter.flops_teacher += step_flops[1]


@dataclass(frozen=True)
class WSDSchedule:
    """Warm-up over ``warmup_amount``, constant, then linear decay over the last
    ``decay_fraction`` of ``point`` — amounts of the budget's currency (budgetkd.sweep)."""

    point: float
    warmup_amount: float
    decay_fraction: float

    def rate(self, peak_lr: float, consumed: float) -> float:
        return wsd_learning_rate(peak_lr, consumed, self.point, self.warmup_amount, self.decay_fraction)


def wsd_schedule(
    budget: Budget,
    schedule_point: float | None,
    schedule_warmup: float | None,
    warmup: float,
    decay_fraction: float,
    snapshots: Sequence[float],
) -> WSDSchedule:
    """A WSD run's schedule, checked against its budget: the point defaults to the budget and may
    not lie before it, the warm-up defaults to ``warmup`` · budget, every snapshot lies inside
    the budget (SPEC §7a)."""
    check_decay_fraction(decay_fraction)
    point = float(schedule_point or budget.amount)
    warmup_amount = float(schedule_warmup) if schedule_warmup is not None else warmup * budget.amount
    if point < budget.amount:
        raise BudgetKDError("a wsd run's schedule point must not lie before its budget")
    if any(not 0 < a <= budget.amount for a in snapshots):
        raise BudgetKDError("every snapshot must lie inside the run's budget")
    return WSDSchedule(point, warmup_amount, decay_fraction)
