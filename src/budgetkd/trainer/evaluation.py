"""Validation, and when the next evaluation is due (SPEC §3: validation at budget fractions).

Validation runs under the training precision, so it measures the model that trains; the losses
themselves are fp32. Its time is measured and excluded from the budget by ``budgetkd.train``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from budgetkd.budget import Budget, Meter
from budgetkd.losses import mlm_loss
from budgetkd.models import encode, predicted_positions, sparse_mlm_logits
from budgetkd.trainer.step import TeacherRunner, dynamic_count


@torch.no_grad()
def validation_losses(
    module: nn.Module,
    val_batches: Iterable,
    device: torch.device,
    teacher_runner: TeacherRunner | None,
    normalizer: str,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> tuple[float, float | None]:
    """(validation MLM loss, the strategy's loss or None without a teacher), fixed masks.

    Each is a weighted mean over batches: the MLM loss by predicted tokens, the strategy's loss
    by its ``normalizer`` (predicted tokens or attended tokens)."""
    module.eval()
    total_mlm = total_kd = 0.0
    weight_mlm = weight_kd = 0
    for input_ids, attention_mask, labels in val_batches:
        input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
        positions = predicted_positions(labels)
        if len(positions) == 0:
            continue
        with autocast():
            hidden = encode(module.student.bert, input_ids, attention_mask)
            logits = sparse_mlm_logits(module.student, hidden, positions)
        targets = labels.reshape(-1).index_select(0, positions)
        total_mlm += float(mlm_loss(logits, targets)) * len(positions)
        weight_mlm += len(positions)
        if teacher_runner is not None:
            dynamic_count(positions)  # as in training: one compiled graph for every count
            teacher_out, teacher_logits = teacher_runner(input_ids, attention_mask, labels, positions)
            with autocast():
                loss, _ = module(input_ids, attention_mask, labels, teacher_out, teacher_logits, positions)
            n = len(positions) if normalizer == "predicted" else int(attention_mask.sum())
            total_kd += float(loss) * n
            weight_kd += n
    module.train()
    return total_mlm / max(1, weight_mlm), (total_kd / weight_kd if weight_kd else None)


def evaluation_entry(
    meter: Meter, budget: Budget, mlm: float, strategy_loss: float | None, mlm_head_trained: bool
) -> dict:
    """One entry of the run's history: where in the budget, and the validation losses."""
    result = {
        "step": meter.steps,
        "budget_fraction": meter.fraction(budget),
        "tokens": meter.tokens,
        "time_s": meter.time_s,
        "flops": meter.flops,
        "val_mlm_loss": mlm,
        "mlm_head_trained": mlm_head_trained,
    }
    if strategy_loss is not None:
        result["val_loss"] = strategy_loss
    return result


def next_eval_index(next_eval: int, num_evals: int, fraction: float) -> int:
    """The first k ≤ num_evals not yet reached (k / num_evals > fraction), from ``next_eval`` on
    (num_evals + 1 when every one is)."""
    while next_eval <= num_evals and fraction >= next_eval / num_evals:
        next_eval += 1
    return next_eval


def eval_due(meter: Meter, budget: Budget, next_eval: int, num_evals: int) -> bool:
    """A step reached the next evaluation's budget fraction (the final one is the loop's end)."""
    return meter.fraction(budget) >= next_eval / num_evals and not meter.exhausted(budget)
