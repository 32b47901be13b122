"""The contract every pretraining objective implements (SPEC §2).

A strategy says what it needs (a teacher, teacher logits, which internals of which layers), owns
its trainable extras (e.g. TinyBERT's projections, trained with the student and never exported),
and turns one micro-batch's captured tensors into a loss. It never touches files, the optimizer
or the budget: ``budgetkd.train`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from budgetkd.errors import BudgetKDError
from budgetkd.flops import EncoderShape
from budgetkd.models import CaptureSpec, Depth, check_layer, required_depth


@dataclass
class StepInputs:
    """What a strategy's loss sees for one micro-batch.

    ``student``/``teacher`` hold captured internals keyed ``"embeddings"`` or ``(kind, layer)``;
    logits are sparse (rows = predicted positions, in row-major order) and ``labels`` their
    targets; ``attention_mask`` is [B, L] with 1 = real token.
    """

    attention_mask: torch.Tensor
    labels: torch.Tensor
    student: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None


class Strategy(nn.Module):
    """Base class. Subclasses set the class attributes and implement :meth:`loss`."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    default_lr: ClassVar[float] = 5e-4  # paper: 5e-4 for the KD strategies
    needs_teacher: ClassVar[bool] = True
    needs_teacher_logits: ClassVar[bool] = False
    needs_head_match: ClassVar[bool] = False
    #: how micro-batch losses combine into the global batch's: "predicted" (mean over masked
    #: tokens) or "tokens" (mean over real tokens)
    normalizer: ClassVar[str] = "tokens"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: dict | None, student_config, teacher_config=None):
        super().__init__()
        options = dict(options or {})
        unknown = set(options) - set(self.defaults)
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise BudgetKDError(
                f"unknown option {sorted(unknown)[0]!r} for strategy {self.name!r} (known: {known})"
            )
        self.options = {**self.defaults, **options}
        self.student_shape = EncoderShape.from_config(student_config)
        self.teacher_shape = EncoderShape.from_config(teacher_config) if teacher_config is not None else None
        if self.needs_teacher and teacher_config is None:
            raise BudgetKDError(f"strategy {self.name!r} needs a teacher: pass --teacher PATH_OR_HUB_ID")
        if self.needs_head_match and student_config.num_attention_heads != teacher_config.num_attention_heads:
            raise BudgetKDError(
                f"strategy {self.name!r} compares attention head by head and needs equal head counts: "
                f"student has {student_config.num_attention_heads}, teacher {teacher_config.num_attention_heads}"
            )
        self.layer_pairs = self._layer_pairs(self.options.get("layer_map")) if self.needs_teacher else []

    # -- configuration helpers ------------------------------------------------------------------
    def _layer_pairs(self, layer_map) -> list[tuple[int, int]]:
        """Resolve ``layer_map`` (a list of [student_layer, teacher_layer]; default last ↔ last)."""
        layer_map = [[-1, -1]] if layer_map is None else layer_map
        if not isinstance(layer_map, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) for i in p)
            for p in layer_map
        ):
            raise BudgetKDError(
                f"layer_map must be a list of [student_layer, teacher_layer] pairs, got {layer_map!r}"
            )
        return [
            (
                check_layer(s, self.student_shape.layers, "student"),
                check_layer(t, self.teacher_shape.layers, "teacher"),
            )
            for s, t in layer_map
        ]

    def option(self, key: str, kind: type = float):
        value = self.options[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise BudgetKDError(
                f"option {key!r} of strategy {self.name!r} must be {kind.__name__}, got {value!r}"
            )
        return value

    # -- what the strategy needs ----------------------------------------------------------------
    @property
    def mlm_weight(self) -> float:
        return float(self.options.get("mlm_weight", 1.0))

    @property
    def needs_student_logits(self) -> bool:
        return self.mlm_weight > 0 or self.needs_teacher_logits

    def student_spec(self) -> CaptureSpec:
        return CaptureSpec()

    def teacher_spec(self) -> CaptureSpec:
        return CaptureSpec()

    def student_depth(self) -> Depth:
        """How far the student's forward must run: to the end when its MLM head is used, else to
        the deepest tensor :meth:`student_spec` captures (``models.required_depth``)."""
        return required_depth(self.student_spec(), self.student_shape.layers, self.needs_student_logits)

    def teacher_depth(self) -> Depth:
        """How far the teacher's forward must run (to the end when its logits are used)."""
        return required_depth(self.teacher_spec(), self.teacher_shape.layers, self.needs_teacher_logits)

    def extra_forward_flops(self, num_sequences: int, seq_len: int) -> tuple[float, float]:
        """(student-side, teacher-side) forward FLOPs of the loss's own products (flops.py
        conventions); the student side is charged 3× (it is differentiated), the teacher side 1×."""
        return 0.0, 0.0

    def loss(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, named components) for one micro-batch."""
        raise NotImplementedError

    # -- shared pieces --------------------------------------------------------------------------
    def _with_mlm(self, total: torch.Tensor, parts: dict, inputs: StepInputs):
        if self.mlm_weight > 0:
            from budgetkd.losses import mlm_loss

            parts["mlm"] = mlm_loss(inputs.student_logits, inputs.labels)
            total = total + self.mlm_weight * parts["mlm"]
        return total, parts
