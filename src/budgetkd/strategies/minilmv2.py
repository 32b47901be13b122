"""MiniLMv2 (Wang et al. 2021; beyond the paper, SPEC §2): multi-head self-attention relations.

For X ∈ {Q, K, V} of the mapped layer (concatenated over heads, re-split into R relation heads
of size d_r = D/R for each model): relation = softmax(X_r X_rᵀ/√d_r + key mask) and
L = Σ_X (1/(R·|real queries|)) Σ_r Σ_t KL(rel_T ‖ rel_S) (+ w_mlm·L_MLM, default 0).
R defaults to 48 when it divides both hidden sizes, else the teacher's head count. Head counts
of student and teacher may differ.
"""

from __future__ import annotations

from budgetkd import flops
from budgetkd.errors import BudgetKDError
from budgetkd.losses import relation_heads_default, relation_kl
from budgetkd.models import CaptureSpec
from budgetkd.strategies.base import StepInputs, Strategy


class MiniLMv2(Strategy):
    name = "minilmv2"
    display_name = "MiniLMv2"
    defaults = {"relation_heads": "auto", "relations": ["q", "k", "v"], "mlm_weight": 0.0, "layer_map": None}

    def __init__(self, options, student_config, teacher_config=None):
        super().__init__(options, student_config, teacher_config)
        d_s, d_t = self.student_shape.hidden, self.teacher_shape.hidden
        heads = self.options["relation_heads"]
        if heads == "auto":
            try:
                heads = relation_heads_default(d_s, d_t, self.teacher_shape.heads)
            except ValueError:
                raise BudgetKDError(
                    f"minilmv2: neither 48 nor the teacher's {self.teacher_shape.heads} heads divide both hidden "
                    f"sizes ({d_s}, {d_t}); set relation_heads"
                ) from None
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0 or d_s % heads or d_t % heads:
            raise BudgetKDError(
                f"minilmv2 relation_heads {heads!r} must divide both hidden sizes (student {d_s}, teacher {d_t})"
            )
        self.relation_heads = heads
        relations = self.options["relations"]
        if not isinstance(relations, list) or not relations or set(relations) - {"q", "k", "v"}:
            raise BudgetKDError(
                f"minilmv2 relations must be a non-empty list drawn from q, k, v; got {relations!r}"
            )
        self.relations = list(dict.fromkeys(relations))

    def student_spec(self) -> CaptureSpec:
        return CaptureSpec(False, {s: frozenset(self.relations) for s, _ in self.layer_pairs})

    def teacher_spec(self) -> CaptureSpec:
        return CaptureSpec(False, {t: frozenset(self.relations) for _, t in self.layer_pairs})

    def extra_forward_flops(self, num_sequences: int, seq_len: int) -> tuple[float, float]:
        n = len(self.relations) * len(self.layer_pairs)
        student = n * flops.relation_product(seq_len, self.student_shape.hidden, num_sequences)
        teacher = n * flops.relation_product(seq_len, self.teacher_shape.hidden, num_sequences)
        return student, teacher

    def loss(self, inputs: StepInputs):
        mask, s, t = inputs.attention_mask, inputs.student, inputs.teacher
        parts = {}
        total = 0.0
        for kind in self.relations:
            value = 0.0
            for ls, lt in self.layer_pairs:
                value = value + relation_kl(s[(kind, ls)], t[(kind, lt)], mask, self.relation_heads)
            parts[f"{kind}{kind}"] = value
            total = total + value
        return self._with_mlm(total, parts, inputs)
