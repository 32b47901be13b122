"""Vanilla-KD (Hinton et al. 2015; SPEC §2).

L = w_kd · t² · mean over M of Σ_v −softmax(z_T/t)_v · log_softmax(z_S/t)_v + w_mlm · L_MLM,
defaults t = 1, w_kd = w_mlm = 1 ("equally combined"). Needs the teacher's MLM head.
"""

from __future__ import annotations

from budgetkd.errors import BudgetKDError
from budgetkd.losses import soft_cross_entropy
from budgetkd.strategies.base import StepInputs, Strategy


class VanillaKD(Strategy):
    name = "vanilla"
    display_name = "Vanilla-KD"
    needs_teacher_logits = True
    normalizer = "predicted"
    defaults = {"temperature": 1.0, "kd_weight": 1.0, "mlm_weight": 1.0}

    def __init__(self, options, student_config, teacher_config=None):
        super().__init__(options, student_config, teacher_config)
        if self.option("temperature") <= 0:
            raise BudgetKDError(f"vanilla temperature must be positive, got {self.options['temperature']}")

    def loss(self, inputs: StepInputs):
        kd = soft_cross_entropy(
            inputs.student_logits, inputs.teacher_logits, temperature=self.option("temperature")
        )
        total, parts = self._with_mlm(self.option("kd_weight") * kd, {"kd": kd}, inputs)
        return total, parts
