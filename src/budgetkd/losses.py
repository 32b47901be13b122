"""Distillation and pretraining objectives (SPEC §2), as pure functions.

Every function here

* computes in fp32: inputs are cast with ``.float()`` and autocast is switched off inside, so
  bf16/fp16 activations never produce the fp16 overflows listed in SPEC §8;
* honours the padding mask ``m`` (``[B, L]``, 1 = real token) exactly: padded positions never
  contribute, whatever values they hold (they are zeroed before any product, so even huge values
  give no ``inf``/``NaN`` in the value or the gradients);
* returns a scalar fp32 tensor that backpropagates to the student inputs (and to an optional
  projection); teacher inputs are detached, so the teacher never receives gradients. Teacher
  tensors may come from ``torch.inference_mode`` (used as-is or ``.clone()``d outside it);
* uses batched tensor operations only (no Python loops over batch, heads or positions).

Shapes: ``B`` batch, ``L`` sequence length, ``H`` heads, ``d`` head dim, ``D`` hidden size, ``V``
vocabulary, ``N`` number of predicted (masked) positions. Means are pooled over the whole batch
("mean over X" = sum over X divided by ``|X|``); an empty X gives 0 (with a graph), never NaN.

Shape and configuration problems raise :class:`LossConfigError`, which is both a ``ValueError``
and a :class:`budgetkd.errors.BudgetKDError` (so the CLI prints it as a one-line message).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from budgetkd.errors import BudgetKDError

__all__ = [
    "LossConfigError",
    "attention_kl",
    "attention_score_mse",
    "hidden_mse",
    "mlm_loss",
    "relation_heads_default",
    "relation_kl",
    "soft_cross_entropy",
    "split_heads",
    "value_relation_kl",
]

IGNORE_INDEX = -100
_NEG = torch.finfo(torch.float32).min  # finite "minus infinity" for masked keys


class LossConfigError(BudgetKDError, ValueError):
    """Inputs that a loss refuses: head-count or hidden-size mismatch, bad shapes, bad split."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _no_autocast(x: torch.Tensor):
    """Context that disables autocast for ``x``'s device so the maths below stays in fp32."""
    if x.device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _mask_bool(attention_mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise LossConfigError(
            f"attention_mask must have shape [B, L] = [{batch}, {length}], got {tuple(attention_mask.shape)}"
        )
    return attention_mask.bool()


def _check_4d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise LossConfigError(f"{name} must have shape [B, H, L, d], got {tuple(x.shape)}")


def _zero_padded_tokens(x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 with every padded token's vector set to 0.

    ``token_mask`` is ``[B, L]`` (bool); ``x`` is ``[B, L, D]`` or ``[B, H, L, d]``. ``torch.where``
    (not a multiplication) so that huge or non-finite padding never leaks into values or grads.
    """
    x = x.float()
    if x.dim() == 3:
        m = token_mask[:, :, None]
    else:
        m = token_mask[:, None, :, None]
    return torch.where(m, x, x.new_zeros(()))


def _scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``Q Kᵀ / √d`` for ``[B, H, L, d]`` inputs → ``[B, H, L, L]``, d = the inputs' head dim."""
    return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])


def _masked_log_softmax(scores: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """log softmax over keys of ``scores + key mask``; padded keys get a large finite negative."""
    scores = scores.masked_fill(~key_mask[:, None, None, :], _NEG)
    return torch.log_softmax(scores, dim=-1)


def _relation_kl_from_scores(
    student_scores: torch.Tensor, teacher_scores: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """(1/(H·|real queries|)) Σ_h Σ_{t real} KL(softmax(T_h,t + mask) ‖ softmax(S_h,t + mask))."""
    log_p_t = _masked_log_softmax(teacher_scores, token_mask)
    log_p_s = _masked_log_softmax(student_scores, token_mask)
    p_t = log_p_t.exp()  # exactly 0 at padded keys
    kl = p_t * (log_p_t - log_p_s)
    valid = token_mask[:, None, :, None] & token_mask[:, None, None, :]  # [B, 1, L, L]
    kl = torch.where(valid, kl, kl.new_zeros(()))
    heads = student_scores.shape[1]
    n_queries = token_mask.sum().clamp_min(1)
    return kl.sum() / (heads * n_queries)


def _prepare_pair(
    student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], attention_mask: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Validate ``[B,H,L,d]`` student/teacher tensors (H must match) and zero their padding."""
    for i, x in enumerate(student):
        _check_4d(f"student input {i}", x)
    for i, x in enumerate(teacher):
        _check_4d(f"teacher input {i}", x)
    b, h_s, length, _ = student[0].shape
    h_t = teacher[0].shape[1]
    if h_s != h_t:
        raise LossConfigError(
            f"this loss requires the same number of attention heads in student and teacher "
            f"(SPEC §2), got student H={h_s} and teacher H={h_t}"
        )
    for x in (*student, *teacher):
        if x.shape[0] != b or x.shape[1] != h_s or x.shape[2] != length:
            raise LossConfigError(
                f"student and teacher tensors must share [B, H, L] = [{b}, {h_s}, {length}], "
                f"got {tuple(x.shape)}"
            )
    for group in (student, teacher):
        d = group[0].shape[-1]
        if any(x.shape[-1] != d for x in group):
            raise LossConfigError("queries and keys of one model must have the same head dim")
    mask = _mask_bool(attention_mask, b, length)
    s = [_zero_padded_tokens(x, mask) for x in student]
    t = [_zero_padded_tokens(x.detach(), mask) for x in teacher]
    return s, t, mask


# --------------------------------------------------------------------------------------------
# public helpers
# --------------------------------------------------------------------------------------------


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Split the last dimension into heads: ``[B, L, D] → [B, num_heads, L, D/num_heads]``.

    Head ``h`` holds columns ``h·D/H … (h+1)·D/H − 1`` (the usual multi-head layout). Raises
    :class:`LossConfigError` (a ``ValueError``) if ``num_heads`` does not divide ``D``.
    """
    if x.dim() != 3:
        raise LossConfigError(f"split_heads expects [B, L, D], got {tuple(x.shape)}")
    b, length, dim = x.shape
    if num_heads <= 0 or dim % num_heads != 0:
        raise LossConfigError(f"{num_heads} heads do not divide the hidden size {dim}")
    return x.reshape(b, length, num_heads, dim // num_heads).transpose(1, 2)


def relation_heads_default(
    student_hidden: int, teacher_hidden: int, teacher_heads: int, preferred: int = 48
) -> int:
    """Default number R of MiniLMv2 relation heads (SPEC §2).

    ``preferred`` (48) when it divides both hidden sizes, else the teacher's head count when that
    divides both, else :class:`LossConfigError` (a ``ValueError``).
    """
    for r in (preferred, teacher_heads):
        if r > 0 and student_hidden % r == 0 and teacher_hidden % r == 0:
            return r
    raise LossConfigError(
        f"no default number of relation heads: neither {preferred} nor the teacher's head count "
        f"{teacher_heads} divides both hidden sizes {student_hidden} and {teacher_hidden}; "
        f"set the number of relation heads explicitly"
    )


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-language-model loss (SPEC §2, No-KD).

    ``L_MLM = mean over M of −log p_S(y)``, ``p_S = softmax(logits)`` over the vocabulary.

    Args:
        logits: ``[N, V]`` student logits (sparse: only predicted positions; or dense, flattened).
        labels: ``[N]`` target ids; positions labelled ``-100`` are not in M and are ignored, so
            dense logits with ``-100`` at unmasked positions give the same value as sparse ones.

    Returns:
        fp32 scalar; 0 when no position is predicted.
    """
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise LossConfigError(
            f"mlm_loss expects logits [N, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    with _no_autocast(logits):
        total = F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum().clamp_min(1)
        return total / count


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Vanilla-KD prediction loss (SPEC §2; SPEC §8: sum, not mean, over the vocabulary).

    ``L_pred = t² · mean over N of Σ_v −softmax(z_T/t)_v · log_softmax(z_S/t)_v``

    Args:
        student_logits: ``[N, V]`` student logits at the predicted positions.
        teacher_logits: ``[N, V]`` teacher logits at the same positions (detached).
        temperature: ``t > 0``.

    Returns:
        fp32 scalar; 0 when ``N = 0``.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise LossConfigError(
            f"soft_cross_entropy expects student and teacher logits of the same shape [N, V], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)} (shared vocabulary required)"
        )
    if not temperature > 0:
        raise LossConfigError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    with _no_autocast(student_logits):
        log_q = torch.log_softmax(student_logits.float() / t, dim=-1)
        p = torch.softmax(teacher_logits.detach().float() / t, dim=-1)
        total = -(p * log_q).sum()
        n = max(student_logits.shape[0], 1)
        return (t * t) * total / n


def attention_score_mse(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """TinyBERT attention loss on *unnormalized* scores (SPEC §2).

    ``A = Q Kᵀ / √d`` with each model's own head dim d;
    ``L_att = (1/H) Σ_h mean over valid (query, key) pairs of (A_S,h − A_T,h)²``, a pair being
    valid when both query and key are real tokens, i.e.
    ``Σ_{b,h,valid (i,j)} (A_S − A_T)² / (H · Σ_b n_b²)`` with ``n_b`` the real length of row b.

    Args:
        student_q, student_k: ``[B, H, L, d_S]``.
        teacher_q, teacher_k: ``[B, H, L, d_T]`` (detached); ``d_T`` may differ from ``d_S``.
        attention_mask: ``[B, L]``, 1 = real token.

    Raises:
        LossConfigError (ValueError): when the head counts differ, or shapes do not line up.
    """
    (sq, sk), (tq, tk), mask = _prepare_pair((student_q, student_k), (teacher_q, teacher_k), attention_mask)
    with _no_autocast(sq):
        diff = _scaled_scores(sq, sk) - _scaled_scores(tq, tk)
        valid = mask[:, None, :, None] & mask[:, None, None, :]
        sq_err = torch.where(valid, diff * diff, diff.new_zeros(()))
        lengths = mask.sum(dim=1)
        n_pairs = (lengths * lengths).sum().clamp_min(1)
        return sq_err.sum() / (sq.shape[1] * n_pairs)


def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """TinyBERT embedding / hidden-state loss (SPEC §2).

    ``L = mean over real tokens and D_T of (H_S W − H_T)²``, i.e.
    ``Σ_{real (b,l)} ‖W(H_S[b,l]) − H_T[b,l]‖² / (|real tokens| · D_T)``.

    Args:
        student_hidden: ``[B, L, D_S]``.
        teacher_hidden: ``[B, L, D_T]`` (detached).
        attention_mask: ``[B, L]``, 1 = real token.
        projection: optional callable (e.g. ``nn.Linear(D_S, D_T)``) applied to the student
            states (in fp32, autocast off); identity when ``None``.

    Raises:
        LossConfigError (ValueError): ``D_S ≠ D_T`` without a projection, a projection whose output
        is not ``D_T`` wide, or mismatched ``[B, L]``.
    """
    if student_hidden.dim() != 3 or teacher_hidden.dim() != 3:
        raise LossConfigError(
            f"hidden_mse expects [B, L, D] inputs, got {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if student_hidden.shape[:2] != teacher_hidden.shape[:2]:
        raise LossConfigError(
            f"student and teacher states must share [B, L], got {tuple(student_hidden.shape)} "
            f"and {tuple(teacher_hidden.shape)}"
        )
    d_s, d_t = student_hidden.shape[-1], teacher_hidden.shape[-1]
    if projection is None and d_s != d_t:
        raise LossConfigError(
            f"student hidden size {d_s} differs from the teacher's {d_t}: a projection D_S → D_T is required"
        )
    mask = _mask_bool(attention_mask, student_hidden.shape[0], student_hidden.shape[1])
    with _no_autocast(student_hidden):
        hs = _zero_padded_tokens(student_hidden, mask)
        ht = _zero_padded_tokens(teacher_hidden.detach(), mask)
        if projection is not None:
            hs = projection(hs).float()
            if hs.shape != ht.shape:
                raise LossConfigError(
                    f"the projection maps the student states to {tuple(hs.shape)}, expected {tuple(ht.shape)}"
                )
        diff = hs - ht
        sq_err = torch.where(mask[:, :, None], diff * diff, diff.new_zeros(()))
        n_tokens = mask.sum().clamp_min(1)
        return sq_err.sum() / (n_tokens * d_t)


def attention_kl(
    student_q: torch.Tensor,
    student_k: torch.Tensor,
    teacher_q: torch.Tensor,
    teacher_k: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """MiniLM self-attention distribution transfer (SPEC §2).

    ``A = softmax(Q Kᵀ/√d + key mask)`` (padded keys get probability 0, d = each model's head dim);
    ``L_AT = (1/(H·|real queries|)) Σ_h Σ_{t real query} KL(A_T,h,t ‖ A_S,h,t)`` with
    ``KL(P‖Q) = Σ_j P_j (log P_j − log Q_j)`` computed from log-softmax; padded keys contribute 0.

    Args:
        student_q, student_k: ``[B, H, L, d_S]``.
        teacher_q, teacher_k: ``[B, H, L, d_T]`` (detached).
        attention_mask: ``[B, L]``, 1 = real token.

    Raises:
        LossConfigError (ValueError): when the head counts differ, or shapes do not line up.
    """
    (sq, sk), (tq, tk), mask = _prepare_pair((student_q, student_k), (teacher_q, teacher_k), attention_mask)
    with _no_autocast(sq):
        return _relation_kl_from_scores(_scaled_scores(sq, sk), _scaled_scores(tq, tk), mask)


def value_relation_kl(
    student_v: torch.Tensor, teacher_v: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """MiniLM value-relation transfer (SPEC §2).

    ``VR = softmax(V Vᵀ/√d + key mask)``, d the head dim of the model at hand;
    ``L_VR = (1/(H·|real queries|)) Σ_h Σ_{t real query} KL(VR_T,h,t ‖ VR_S,h,t)``.

    Args:
        student_v: ``[B, H, L, d_S]``.
        teacher_v: ``[B, H, L, d_T]`` (detached).
        attention_mask: ``[B, L]``, 1 = real token.

    Raises:
        LossConfigError (ValueError): when the head counts differ, or shapes do not line up.
    """
    (sv,), (tv,), mask = _prepare_pair((student_v,), (teacher_v,), attention_mask)
    with _no_autocast(sv):
        return _relation_kl_from_scores(_scaled_scores(sv, sv), _scaled_scores(tv, tv), mask)


def relation_kl(
    student_x: torch.Tensor,
    teacher_x: torch.Tensor,
    attention_mask: torch.Tensor,
    num_relation_heads: int,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation transfer for one of Q, K or V (SPEC §2).

    ``X`` (the raw projection output, heads concatenated, ``[B, L, D]``) of each model is re-split
    into R relation heads of size ``d_r = D/R`` (:func:`split_heads`);
    ``Rel = softmax(X_r X_rᵀ/√d_r + key mask)``;
    ``L = (1/(R·|real queries|)) Σ_r Σ_{t real query} KL(Rel_T,r,t ‖ Rel_S,r,t)``.
    The strategy sums this over X ∈ {Q, K, V}. Head counts of the two models may differ.

    Args:
        student_x: ``[B, L, D_S]``.
        teacher_x: ``[B, L, D_T]`` (detached).
        attention_mask: ``[B, L]``, 1 = real token.
        num_relation_heads: R; must divide both ``D_S`` and ``D_T``.

    Raises:
        LossConfigError (ValueError): when R does not divide ``D_S`` or ``D_T``, or shapes differ.
    """
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise LossConfigError(
            f"relation_kl expects [B, L, D] inputs sharing [B, L], got {tuple(student_x.shape)} "
            f"and {tuple(teacher_x.shape)}"
        )
    r = num_relation_heads
    for who, dim in (("student", student_x.shape[-1]), ("teacher", teacher_x.shape[-1])):
        if r <= 0 or dim % r != 0:
            raise LossConfigError(f"{r} relation heads do not divide the {who} hidden size {dim}")
    return value_relation_kl(split_heads(student_x, r), split_heads(teacher_x, r), attention_mask)
