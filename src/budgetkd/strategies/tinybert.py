"""TinyBERT (Jiao et al. 2020), last layer only as in the paper (SPEC §2).

L = w_e·L_embd + w_a·L_att + w_h·L_hid (+ w_mlm·L_MLM, default weight 0), with

* L_embd = mean over real tokens and D_T of (E_S W_e − E_T)², E the embedding-layer output;
* L_att  = (1/H) Σ_h mean over valid (query, key) pairs of (A_S,h − A_T,h)², A = QKᵀ/√d the
  unnormalised scores of the mapped layers (needs H_S = H_T);
* L_hid  = mean over real tokens and D_T of (H_S W_h − H_T)², H the mapped layer output.

W_e and W_h are linear maps D_S → D_T created when the hidden sizes differ (or always with
``projection: always``); they train with the student and are never exported. With several
layer pairs, L_att and L_hid are summed over the pairs.
"""

from __future__ import annotations

from torch import nn

from budgetkd import flops
from budgetkd.errors import BudgetKDError
from budgetkd.losses import attention_score_mse, hidden_mse, split_heads
from budgetkd.models import CaptureSpec
from budgetkd.strategies.base import StepInputs, Strategy


class TinyBERT(Strategy):
    name = "tinybert"
    display_name = "TinyBERT"
    needs_head_match = True
    defaults = {
        "embedding_weight": 1.0,
        "attention_weight": 1.0,
        "hidden_weight": 1.0,
        "mlm_weight": 0.0,
        "projection": "auto",
        "layer_map": None,
    }

    def __init__(self, options, student_config, teacher_config=None):
        super().__init__(options, student_config, teacher_config)
        policy = self.options["projection"]
        if policy not in ("auto", "always"):
            raise BudgetKDError(f"tinybert projection must be 'auto' or 'always', got {policy!r}")
        d_s, d_t = self.student_shape.hidden, self.teacher_shape.hidden
        self.use_projection = policy == "always" or d_s != d_t
        if self.use_projection:
            self.embedding_projection = nn.Linear(d_s, d_t)
            self.hidden_projections = nn.ModuleList(nn.Linear(d_s, d_t) for _ in self.layer_pairs)

    def student_spec(self) -> CaptureSpec:
        return CaptureSpec(True, {s: frozenset({"q", "k", "hidden"}) for s, _ in self.layer_pairs})

    def teacher_spec(self) -> CaptureSpec:
        return CaptureSpec(True, {t: frozenset({"q", "k", "hidden"}) for _, t in self.layer_pairs})

    def extra_forward_flops(self, num_sequences: int, seq_len: int) -> tuple[float, float]:
        d_s, d_t = self.student_shape.hidden, self.teacher_shape.hidden
        pairs = len(self.layer_pairs)
        student = pairs * flops.relation_product(seq_len, d_s, num_sequences)
        if self.use_projection:
            student += (1 + pairs) * flops.linear(num_sequences * seq_len, d_s, d_t)
        teacher = pairs * flops.relation_product(seq_len, d_t, num_sequences)
        return student, teacher

    def loss(self, inputs: StepInputs):
        mask, s, t = inputs.attention_mask, inputs.student, inputs.teacher
        heads_s, heads_t = self.student_shape.heads, self.teacher_shape.heads
        parts = {
            "embd": hidden_mse(
                s["embeddings"],
                t["embeddings"],
                mask,
                projection=self.embedding_projection if self.use_projection else None,
            )
        }
        att = hid = 0.0
        for index, (ls, lt) in enumerate(self.layer_pairs):
            att = att + attention_score_mse(
                split_heads(s[("q", ls)], heads_s),
                split_heads(s[("k", ls)], heads_s),
                split_heads(t[("q", lt)], heads_t),
                split_heads(t[("k", lt)], heads_t),
                mask,
            )
            hid = hid + hidden_mse(
                s[("hidden", ls)],
                t[("hidden", lt)],
                mask,
                projection=self.hidden_projections[index] if self.use_projection else None,
            )
        parts["att"], parts["hid"] = att, hid
        total = (
            self.option("embedding_weight") * parts["embd"]
            + self.option("attention_weight") * att
            + self.option("hidden_weight") * hid
        )
        return self._with_mlm(total, parts, inputs)
