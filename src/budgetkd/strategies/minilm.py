"""MiniLM (Wang et al. 2020), last layer as in the paper (SPEC §2).

L = w_at·L_AT + w_vr·L_VR (+ w_mlm·L_MLM, default weight 0), with
L_AT = (1/(H·|real queries|)) Σ_h Σ_t KL(A_T,h,t ‖ A_S,h,t), A = softmax(QKᵀ/√d + key mask), and
L_VR the same for VR = softmax(VVᵀ/√d + key mask), d each model's own head dimension.
Needs H_S = H_T; hidden sizes may differ. Several layer pairs are summed.
"""

from __future__ import annotations

from budgetkd import flops
from budgetkd.losses import attention_kl, split_heads, value_relation_kl
from budgetkd.models import CaptureSpec
from budgetkd.strategies.base import StepInputs, Strategy


class MiniLM(Strategy):
    name = "minilm"
    display_name = "MiniLM"
    needs_head_match = True
    defaults = {"attention_weight": 1.0, "value_weight": 1.0, "mlm_weight": 0.0, "layer_map": None}

    def student_spec(self) -> CaptureSpec:
        return CaptureSpec(False, {s: frozenset({"q", "k", "v"}) for s, _ in self.layer_pairs})

    def teacher_spec(self) -> CaptureSpec:
        return CaptureSpec(False, {t: frozenset({"q", "k", "v"}) for _, t in self.layer_pairs})

    def extra_forward_flops(self, num_sequences: int, seq_len: int) -> tuple[float, float]:
        pairs = len(self.layer_pairs)
        student = 2 * pairs * flops.relation_product(seq_len, self.student_shape.hidden, num_sequences)
        teacher = 2 * pairs * flops.relation_product(seq_len, self.teacher_shape.hidden, num_sequences)
        return student, teacher

    def loss(self, inputs: StepInputs):
        mask, s, t = inputs.attention_mask, inputs.student, inputs.teacher
        hs, ht = self.student_shape.heads, self.teacher_shape.heads
        at = vr = 0.0
        for ls, lt in self.layer_pairs:
            at = at + attention_kl(
                split_heads(s[("q", ls)], hs),
                split_heads(s[("k", ls)], hs),
                split_heads(t[("q", lt)], ht),
                split_heads(t[("k", lt)], ht),
                mask,
            )
            vr = vr + value_relation_kl(split_heads(s[("v", ls)], hs), split_heads(t[("v", lt)], ht), mask)
        total = self.option("attention_weight") * at + self.option("value_weight") * vr
        return self._with_mlm(total, {"at": at, "vr": vr}, inputs)
