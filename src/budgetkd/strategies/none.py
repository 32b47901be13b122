"""No-KD: masked language modelling from scratch (SPEC §2). L = mean over M of −log p_S(y)."""

from __future__ import annotations

from budgetkd.losses import mlm_loss
from budgetkd.strategies.base import StepInputs, Strategy


class NoKD(Strategy):
    name = "none"
    display_name = "No-KD"
    default_lr = 1e-3  # paper, Appendix A.2
    needs_teacher = False
    normalizer = "predicted"
    defaults: dict = {}

    def loss(self, inputs: StepInputs):
        value = mlm_loss(inputs.student_logits, inputs.labels)
        return value, {"mlm": value}
