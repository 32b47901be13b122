"""Tests of budgetkd.losses against the mathematics of SPEC §2, not against the code itself.

Every reference below (``naive_*``) is written with explicit Python loops over batch, heads,
queries and keys and ``math.exp``/``math.log`` on Python floats (double precision), following the
formulas of SPEC §2 literally.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from budgetkd import losses
from budgetkd.errors import BudgetKDError
from budgetkd.losses import (
    attention_kl,
    attention_score_mse,
    hidden_mse,
    mlm_loss,
    relation_heads_default,
    relation_kl,
    soft_cross_entropy,
    split_heads,
    value_relation_kl,
)

B, H, L = 2, 2, 5
LENGTHS = (5, 3)
D_S, D_T = 3, 4  # head dims (student, teacher)
HUGE = 1e30


# ------------------------------------------------------------------------------------------------
# fixtures and naive references
# ------------------------------------------------------------------------------------------------


def make_mask(lengths=LENGTHS, length=L) -> torch.Tensor:
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return mask


def rand(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def pad_with(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    """Copy of x ([B,L,D] or [B,H,L,d]) with every padded token's vector set to ``value``."""
    x = x.detach().clone()
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if not mask[b, i]:
                if x.dim() == 3:
                    x[b, i, :] = value
                else:
                    x[b, :, i, :] = value
    return x


def real_positions(mask, b):
    return [i for i in range(mask.shape[1]) if int(mask[b, i]) == 1]


def naive_scores(q, k, b, h):
    """Dict (i, j) -> q_i·k_j / sqrt(d) as Python floats, for one batch row and head."""
    qd, kd = q[b, h].double().tolist(), k[b, h].double().tolist()
    d = len(qd[0])
    return [
        [sum(qd[i][c] * kd[j][c] for c in range(d)) / math.sqrt(d) for j in range(len(kd))]
        for i in range(len(qd))
    ]


def naive_softmax_row(scores_row, keys):
    mx = max(scores_row[j] for j in keys)
    exps = {j: math.exp(scores_row[j] - mx) for j in keys}
    z = sum(exps.values())
    return {j: exps[j] / z for j in keys}


def naive_kl_loss(sq, sk, tq, tk, mask):
    """(1/(H·|real queries|)) Σ_h Σ_{t real} Σ_{j real} P_T (log P_T − log P_S)."""
    total, n_queries = 0.0, 0
    n_heads = sq.shape[1]
    for b in range(sq.shape[0]):
        keys = real_positions(mask, b)
        n_queries += len(keys)
        for h in range(n_heads):
            s_sc, t_sc = naive_scores(sq, sk, b, h), naive_scores(tq, tk, b, h)
            for i in keys:
                ps, pt = naive_softmax_row(s_sc[i], keys), naive_softmax_row(t_sc[i], keys)
                for j in keys:
                    total += pt[j] * (math.log(pt[j]) - math.log(ps[j]))
    return total / (n_heads * n_queries)


def naive_attention_score_mse(sq, sk, tq, tk, mask):
    per_head = []
    for h in range(sq.shape[1]):
        err, pairs = 0.0, 0
        for b in range(sq.shape[0]):
            keys = real_positions(mask, b)
            s_sc, t_sc = naive_scores(sq, sk, b, h), naive_scores(tq, tk, b, h)
            for i in keys:
                for j in keys:
                    err += (s_sc[i][j] - t_sc[i][j]) ** 2
                    pairs += 1
        per_head.append(err / pairs)  # mean over valid pairs of this head
    return sum(per_head) / len(per_head)  # (1/H) Σ_h


def naive_hidden_mse(hs, ht, mask, weight=None, bias=None):
    hs_l, ht_l = hs.double().tolist(), ht.double().tolist()
    w = weight.double().tolist() if weight is not None else None
    bb = bias.double().tolist() if bias is not None else None
    err, count = 0.0, 0
    d_t = len(ht_l[0][0])
    for b in range(len(hs_l)):
        for i in real_positions(mask, b):
            x = hs_l[b][i]
            if w is not None:
                x = [sum(w[o][c] * x[c] for c in range(len(x))) + (bb[o] if bb else 0.0) for o in range(d_t)]
            for o in range(d_t):
                err += (x[o] - ht_l[b][i][o]) ** 2
                count += 1
    return err / count


def naive_soft_ce(zs, zt, t):
    zs_l, zt_l = zs.double().tolist(), zt.double().tolist()
    total = 0.0
    for rs, rt in zip(zs_l, zt_l):
        ms, mt = max(rs), max(rt)
        lse_s = ms / t + math.log(sum(math.exp(v / t - ms / t) for v in rs))
        zt_sum = sum(math.exp(v / t - mt / t) for v in rt)
        for vs, vt in zip(rs, rt):
            p = math.exp(vt / t - mt / t) / zt_sum
            total += -p * (vs / t - lse_s)
    return t * t * total / len(zs_l)


def naive_mlm(logits, labels):
    total, n = 0.0, 0
    for row, y in zip(logits.double().tolist(), labels.tolist()):
        if y == -100:
            continue
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        total += lse - row[y]
        n += 1
    return total / n


def naive_split(x, r):
    """[B,L,D] -> [B,R,L,D/R] by explicit index copying (head h = columns h*dr .. (h+1)*dr-1)."""
    b_, l_, d = x.shape
    dr = d // r
    out = torch.zeros(b_, r, l_, dr, dtype=x.dtype)
    for b in range(b_):
        for h in range(r):
            for i in range(l_):
                for c in range(dr):
                    out[b, h, i, c] = x[b, i, h * dr + c]
    return out


@pytest.fixture
def qk():
    """Student q,k [2,2,5,3]; teacher q,k [2,2,5,4]; mask with lengths 5 and 3."""
    return (
        rand(B, H, L, D_S, seed=1),
        rand(B, H, L, D_S, seed=2),
        rand(B, H, L, D_T, seed=3),
        rand(B, H, L, D_T, seed=4),
        make_mask(),
    )


def close(actual: torch.Tensor, expected: float, rel=1e-5, abs_=1e-6):
    assert actual.dtype == torch.float32
    assert actual.dim() == 0
    assert actual.item() == pytest.approx(expected, rel=rel, abs=abs_)


# ------------------------------------------------------------------------------------------------
# mlm_loss
# ------------------------------------------------------------------------------------------------


def test_mlm_loss_hand_computed_with_ignored_label():
    # row 0: logits (0,0,0), label 1 → p = 1/3 → −log p = ln 3
    # row 1: logits (ln 2,0,0), label 0 → p = 2/(2+1+1) = 1/2 → ln 2
    # row 2: label −100 → ignored (its huge logits must not matter)
    # mean over the 2 predicted positions = (ln 3 + ln 2) / 2 = ln(6)/2
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [1e4, -1e4, 0.0]])
    labels = torch.tensor([1, 0, -100])
    close(mlm_loss(logits, labels), math.log(6.0) / 2)
    # a mean over all 3 rows (ignored included) would differ
    assert math.log(6.0) / 2 != pytest.approx(math.log(6.0) / 3)


def test_mlm_loss_matches_naive_and_dense_equals_sparse():
    logits = rand(7, 11, seed=5, scale=3.0)
    labels = torch.tensor([3, -100, 0, 10, -100, -100, 5])
    close(mlm_loss(logits, labels), naive_mlm(logits, labels))
    keep = labels != -100
    torch.testing.assert_close(mlm_loss(logits, labels), mlm_loss(logits[keep], labels[keep]))


def test_mlm_loss_no_predicted_position_is_zero_not_nan():
    logits = rand(3, 4, seed=6).requires_grad_()
    out = mlm_loss(logits, torch.full((3,), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------------
# soft_cross_entropy
# ------------------------------------------------------------------------------------------------


def test_soft_cross_entropy_hand_computed():
    # token 0: teacher (0,0,0) → P = (1/3,1/3,1/3); student (0,0,0) → log Q = −ln 3 each
    #          Σ_v −P log Q = 3 · (1/3) · ln 3 = ln 3
    # token 1: teacher = student = (ln 2, 0, 0) → P = Q = (1/2, 1/4, 1/4)
    #          Σ_v −P log Q = ½ ln 2 + ¼ · 2 ln 2 + ¼ · 2 ln 2 = 1.5 ln 2
    # mean over the 2 tokens (sum over the vocabulary!) = (ln 3 + 1.5 ln 2) / 2
    zs = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    zt = zs.clone()
    expected = (math.log(3.0) + 1.5 * math.log(2.0)) / 2
    close(soft_cross_entropy(zs, zt), expected)
    # the defect of SPEC §8 (mean over the vocabulary as well) would give expected / 3
    assert soft_cross_entropy(zs, zt).item() != pytest.approx(expected / 3, rel=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_soft_cross_entropy_matches_naive_with_temperature(temperature):
    zs, zt = rand(6, 9, seed=7, scale=2.0), rand(6, 9, seed=8, scale=2.0)
    expected = naive_soft_ce(zs, zt, temperature)
    close(soft_cross_entropy(zs, zt, temperature=temperature), expected)
    if temperature != 1.0:
        # without the t² factor the value would be off by t²
        assert expected / temperature**2 != pytest.approx(expected, rel=1e-3)


def test_soft_cross_entropy_t2_factor_explicit():
    zs, zt = rand(4, 5, seed=9), rand(4, 5, seed=10)
    t = 2.0
    p = torch.softmax(zt.double() / t, -1)
    no_factor = -(p * torch.log_softmax(zs.double() / t, -1)).sum(-1).mean().item()
    close(soft_cross_entropy(zs, zt, temperature=t), 4.0 * no_factor)


def test_soft_cross_entropy_gradients_and_teacher_untouched():
    zs = rand(4, 5, seed=11).requires_grad_()
    zt = rand(4, 5, seed=12)
    soft_cross_entropy(zs, zt, 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert not zt.requires_grad and zt.grad is None
    # a teacher that *does* require grad still gets none (it is detached inside)
    zt2 = rand(4, 5, seed=12).requires_grad_()
    zs2 = rand(4, 5, seed=11).requires_grad_()
    soft_cross_entropy(zs2, zt2).backward()
    assert zt2.grad is None


def test_soft_cross_entropy_shape_mismatch_refused():
    with pytest.raises(ValueError):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


# ------------------------------------------------------------------------------------------------
# attention_score_mse
# ------------------------------------------------------------------------------------------------


def test_attention_score_mse_matches_naive(qk):
    sq, sk, tq, tk, mask = qk
    close(attention_score_mse(sq, sk, tq, tk, mask), naive_attention_score_mse(sq, sk, tq, tk, mask))


def test_attention_score_mse_hand_computed():
    # B=1, H=1, L=2 with the second token padded, d_S=1, d_T=4.
    # student: q0 = 2, k0 = 3 → A_S = 6 / √1 = 6
    # teacher: q0 = k0 = (1,1,1,1) → A_T = 4 / √4 = 2
    # only the pair (0,0) is valid → (6 − 2)² / (H · 1) = 16
    sq = torch.tensor([[[[2.0], [50.0]]]])
    sk = torch.tensor([[[[3.0], [-70.0]]]])
    tq = torch.ones(1, 1, 2, 4)
    tk = torch.ones(1, 1, 2, 4)
    mask = torch.tensor([[1, 0]])
    close(attention_score_mse(sq, sk, tq, tk, mask), 16.0)


def test_attention_score_mse_zero_when_equal(qk):
    sq, sk, _, _, mask = qk
    assert attention_score_mse(sq, sk, sq.clone(), sk.clone(), mask).item() == 0.0


def test_attention_score_mse_padding_invariance(qk):
    sq, sk, tq, tk, mask = qk
    ref = attention_score_mse(sq, sk, tq, tk, mask)
    args = [pad_with(x, mask, HUGE).requires_grad_(i < 2) for i, x in enumerate((sq, sk, tq, tk))]
    out = attention_score_mse(*args, mask)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert torch.isfinite(args[0].grad).all() and torch.isfinite(args[1].grad).all()
    # padded positions receive no gradient
    assert args[0].grad[1, :, 3:].abs().sum() == 0


def test_attention_score_mse_gradients(qk):
    sq, sk, tq, tk, mask = (x.clone() for x in qk)
    sq.requires_grad_()
    sk.requires_grad_()
    attention_score_mse(sq, sk, tq, tk, mask).backward()
    assert sq.grad.abs().sum() > 0 and sk.grad.abs().sum() > 0
    assert not tq.requires_grad and tq.grad is None and tk.grad is None


def test_attention_score_mse_head_mismatch(qk):
    sq, sk, _, _, mask = qk
    tq, tk = rand(B, 3, L, D_T, seed=13), rand(B, 3, L, D_T, seed=14)
    with pytest.raises(ValueError, match="heads"):
        attention_score_mse(sq, sk, tq, tk, mask)


# ------------------------------------------------------------------------------------------------
# hidden_mse
# ------------------------------------------------------------------------------------------------


def test_hidden_mse_matches_naive_without_projection():
    hs, ht, mask = rand(B, L, 4, seed=15), rand(B, L, 4, seed=16), make_mask()
    close(hidden_mse(hs, ht, mask), naive_hidden_mse(hs, ht, mask))


def test_hidden_mse_matches_naive_with_projection_and_gradients():
    torch.manual_seed(0)
    proj = nn.Linear(3, 5)
    hs = rand(B, L, 3, seed=17).requires_grad_()
    ht = rand(B, L, 5, seed=18)
    mask = make_mask()
    out = hidden_mse(hs, ht, mask, projection=proj)
    close(out, naive_hidden_mse(hs.detach(), ht, mask, proj.weight.detach(), proj.bias.detach()))
    out.backward()
    assert hs.grad.abs().sum() > 0
    assert proj.weight.grad.abs().sum() > 0 and proj.bias.grad.abs().sum() > 0
    assert hs.grad[1, 3:].abs().sum() == 0  # padding gets no gradient
    assert ht.grad is None and not ht.requires_grad


def test_hidden_mse_hand_computed():
    # one real token (second one padded): diff = (1, −2, 0, 3) → Σ² = 14, mean over D_T=4 → 3.5
    hs = torch.tensor([[[1.0, 0.0, 2.0, 3.0], [9.0, 9.0, 9.0, 9.0]]])
    ht = torch.tensor([[[0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    close(hidden_mse(hs, ht, torch.tensor([[1, 0]])), 3.5)


def test_hidden_mse_zero_when_equal_and_padding_invariance():
    hs, mask = rand(B, L, 4, seed=19), make_mask()
    assert hidden_mse(hs, hs.clone(), mask).item() == 0.0
    proj = nn.Linear(4, 6)
    ht = rand(B, L, 6, seed=20)
    ref = hidden_mse(hs, ht, mask, projection=proj)
    hs_pad = pad_with(hs, mask, HUGE).requires_grad_()
    out = hidden_mse(hs_pad, pad_with(ht, mask, -HUGE), mask, projection=proj)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert torch.isfinite(hs_pad.grad).all() and torch.isfinite(proj.weight.grad).all()


def test_hidden_mse_requires_projection_when_sizes_differ():
    with pytest.raises(ValueError, match="projection"):
        hidden_mse(torch.zeros(B, L, 3), torch.zeros(B, L, 4), make_mask())
    with pytest.raises(ValueError):
        hidden_mse(torch.zeros(B, L, 3), torch.zeros(B, L, 4), make_mask(), projection=nn.Linear(3, 5))


# ------------------------------------------------------------------------------------------------
# attention_kl / value_relation_kl / relation_kl
# ------------------------------------------------------------------------------------------------


def test_attention_kl_matches_naive(qk):
    sq, sk, tq, tk, mask = qk
    close(attention_kl(sq, sk, tq, tk, mask), naive_kl_loss(sq, sk, tq, tk, mask))


def test_attention_kl_hand_computed():
    # B=1, H=1, L=3, last token padded, d=1 for both; queries are 1, keys (0, ln 2, <pad>).
    # teacher keys (0, ln 2) → scores (0, ln 2) → P_T = (1/3, 2/3); student keys (0, 0) → Q = (½, ½)
    # KL per real query = ⅓ ln(⅔) + ⅔ ln(4/3); both real queries identical → mean over 2 queries
    ln2 = math.log(2.0)
    sq = torch.tensor([[[[1.0], [1.0], [7.0]]]])
    sk = torch.tensor([[[[0.0], [0.0], [100.0]]]])
    tq = torch.tensor([[[[1.0], [1.0], [-3.0]]]])
    tk = torch.tensor([[[[0.0], [ln2], [100.0]]]])
    expected = (1 / 3) * math.log(2 / 3) + (2 / 3) * math.log(4 / 3)
    close(attention_kl(sq, sk, tq, tk, torch.tensor([[1, 1, 0]])), expected)


def test_attention_kl_direction_is_teacher_to_student(qk):
    sq, sk, tq, tk, mask = qk
    forward = naive_kl_loss(sq, sk, tq, tk, mask)
    reverse = naive_kl_loss(tq, tk, sq, sk, mask)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the direction is observable …
    close(attention_kl(sq, sk, tq, tk, mask), forward)  # … and the loss uses KL(T ‖ S)


def test_attention_kl_normalisation_is_per_real_query(qk):
    # dividing by H·L·B (padding included) instead of H·|real queries| would differ
    sq, sk, tq, tk, mask = qk
    got = attention_kl(sq, sk, tq, tk, mask).item()
    per_all = naive_kl_loss(sq, sk, tq, tk, mask) * sum(LENGTHS) / (B * L)
    assert got != pytest.approx(per_all, rel=1e-3)


def test_attention_kl_zero_when_equal_and_padding_invariance(qk):
    sq, sk, tq, tk, mask = qk
    assert abs(attention_kl(sq, sk, sq.clone(), sk.clone(), mask).item()) < 1e-6
    ref = attention_kl(sq, sk, tq, tk, mask)
    args = [pad_with(x, mask, HUGE).requires_grad_(i < 2) for i, x in enumerate((sq, sk, tq, tk))]
    out = attention_kl(*args, mask)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert torch.isfinite(args[0].grad).all() and torch.isfinite(args[1].grad).all()
    assert args[1].grad[1, :, 3:].abs().sum() == 0  # padded keys get no gradient


def test_attention_kl_gradients_and_head_mismatch(qk):
    sq, sk, tq, tk, mask = (x.clone() for x in qk)
    sq.requires_grad_()
    sk.requires_grad_()
    attention_kl(sq, sk, tq, tk, mask).backward()
    assert sq.grad.abs().sum() > 0 and sk.grad.abs().sum() > 0
    assert tq.grad is None and not tq.requires_grad
    with pytest.raises(ValueError, match="heads"):
        attention_kl(sq, sk, rand(B, 1, L, D_T, seed=1), rand(B, 1, L, D_T, seed=2), mask)


def test_value_relation_kl_matches_naive(qk):
    sv, _, tv, _, mask = qk
    expected = naive_kl_loss(sv, sv, tv, tv, mask)
    close(value_relation_kl(sv, tv, mask), expected)
    assert abs(value_relation_kl(sv, sv.clone(), mask).item()) < 1e-6
    ref = value_relation_kl(sv, tv, mask)
    torch.testing.assert_close(
        value_relation_kl(pad_with(sv, mask, HUGE), pad_with(tv, mask, -HUGE), mask), ref
    )
    with pytest.raises(ValueError):
        value_relation_kl(sv, rand(B, 3, L, D_T, seed=3), mask)


def test_split_heads_layout_and_errors():
    x = rand(B, L, 6, seed=21)
    torch.testing.assert_close(split_heads(x, 3), naive_split(x, 3))
    with pytest.raises(ValueError):
        split_heads(x, 4)


def test_relation_kl_matches_naive_with_different_hidden_sizes():
    xs, xt, mask = rand(B, L, 6, seed=22), rand(B, L, 8, seed=23), make_mask()
    r = 2  # d_r = 3 for the student, 4 for the teacher
    xs_h, xt_h = naive_split(xs, r), naive_split(xt, r)
    close(relation_kl(xs, xt, mask, r), naive_kl_loss(xs_h, xs_h, xt_h, xt_h, mask))
    # R is a real parameter: another split gives another value
    assert relation_kl(xs, xt, mask, 1).item() != pytest.approx(relation_kl(xs, xt, mask, 2).item(), rel=1e-3)


def test_relation_kl_zero_padding_gradients_and_errors():
    xs, xt, mask = rand(B, L, 6, seed=24), rand(B, L, 8, seed=25), make_mask()
    assert abs(relation_kl(xs, xs.clone(), mask, 3).item()) < 1e-6
    ref = relation_kl(xs, xt, mask, 2)
    xs_pad = pad_with(xs, mask, HUGE).requires_grad_()
    out = relation_kl(xs_pad, pad_with(xt, mask, HUGE), mask, 2)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert torch.isfinite(xs_pad.grad).all() and xs_pad.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divide"):
        relation_kl(xs, xt, mask, 4)  # divides 8, not 6
    with pytest.raises(ValueError, match="divide"):
        relation_kl(xs, xt, mask, 3)  # divides 6, not 8


def test_relation_heads_default():
    assert relation_heads_default(384, 768, 12) == 48
    assert relation_heads_default(312, 768, 12) == 12  # 48 ∤ 312, 12 | both
    assert relation_heads_default(96, 192, 3, preferred=48) == 48
    with pytest.raises(ValueError):
        relation_heads_default(100, 768, 12)


def test_config_errors_are_budgetkd_errors():
    with pytest.raises(BudgetKDError):
        relation_heads_default(100, 768, 12)
    assert issubclass(losses.LossConfigError, ValueError)


# ------------------------------------------------------------------------------------------------
# teacher tensors from inference mode; precision
# ------------------------------------------------------------------------------------------------


def test_teacher_requiring_grad_gets_no_gradient(qk):
    sq, sk, tq, tk = (x.clone().requires_grad_() for x in qk[:4])
    mask = qk[4]
    hs, ht = rand(B, L, 8, seed=38).requires_grad_(), rand(B, L, 8, seed=39).requires_grad_()
    zs, zt = rand(6, 9, seed=40).requires_grad_(), rand(6, 9, seed=41).requires_grad_()
    total = (
        attention_score_mse(sq, sk, tq, tk, mask)
        + attention_kl(sq, sk, tq, tk, mask)
        + value_relation_kl(sq, tq, mask)
        + hidden_mse(hs, ht, mask)
        + relation_kl(hs, ht, mask, 2)
        + soft_cross_entropy(zs, zt)
    )
    total.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (sq, sk, hs, zs))
    assert tq.grad is None and tk.grad is None and ht.grad is None and zt.grad is None


@pytest.mark.parametrize("clone", [True, False])
def test_teacher_from_inference_mode(qk, clone):
    sq, sk, tq, tk, mask = qk
    with torch.inference_mode():
        t_tensors = [x * 1.0 for x in (tq, tk, rand(B, L, 8, seed=26), rand(6, 9, seed=27))]
    assert all(x.is_inference() for x in t_tensors)
    if clone:
        t_tensors = [x.clone() for x in t_tensors]
    tq_i, tk_i, th_i, tz_i = t_tensors
    s = [x.clone().requires_grad_() for x in (sq, sk)]
    hs = rand(B, L, 8, seed=28).requires_grad_()
    zs = rand(6, 9, seed=29).requires_grad_()
    total = (
        attention_score_mse(*s, tq_i, tk_i, mask)
        + attention_kl(*s, tq_i, tk_i, mask)
        + value_relation_kl(s[0], tq_i, mask)
        + hidden_mse(hs, th_i, mask, projection=nn.Linear(8, 8))
        + relation_kl(hs, th_i, mask, 2)
        + soft_cross_entropy(zs, tz_i, 2.0)
    )
    total.backward()
    assert all(x.grad.abs().sum() > 0 for x in (*s, hs, zs))
    torch.testing.assert_close(attention_kl(sq, sk, tq_i, tk_i, mask), attention_kl(sq, sk, tq, tk, mask))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_fp32(qk, dtype):
    sq, sk, tq, tk, mask = (x.to(dtype) if x.is_floating_point() else x for x in qk)
    # exact reference: the fp32 maths on the same (rounded) values; loose one: the fp32 inputs
    for fn in (attention_score_mse, attention_kl):
        out = fn(sq, sk, tq, tk, mask)
        assert out.dtype == torch.float32
        close(out, naive_score_or_kl(fn, sq, sk, tq, tk, mask), rel=1e-5)
        close(out, fn(*qk).item(), rel=5e-2, abs_=1e-3)
    zs, zt = rand(6, 9, seed=30).to(dtype), rand(6, 9, seed=31).to(dtype)
    out = soft_cross_entropy(zs, zt, 2.0)
    assert out.dtype == torch.float32
    close(out, naive_soft_ce(zs.float(), zt.float(), 2.0))
    hs, ht = rand(B, L, 4, seed=32).to(dtype), rand(B, L, 4, seed=33).to(dtype)
    out = hidden_mse(hs, ht, mask)
    assert out.dtype == torch.float32
    close(out, naive_hidden_mse(hs.float(), ht.float(), mask))


def naive_score_or_kl(fn, *args):
    return (naive_attention_score_mse if fn is attention_score_mse else naive_kl_loss)(*args)


def test_fp16_values_that_overflow_fp16_sums_give_finite_losses():
    # q·k = 16 · 100 · 100 = 160000 > 65504 (fp16 max): an fp16 matmul would give inf
    mask = make_mask()
    sq = torch.full((B, H, L, 16), 100.0, dtype=torch.float16)
    sk = torch.full((B, H, L, 16), 100.0, dtype=torch.float16)
    tq = rand(B, H, L, 16, seed=34).half()
    tk = rand(B, H, L, 16, seed=35).half()
    assert torch.isinf(torch.matmul(sq, sk.transpose(-1, -2))).any()  # the overflow is real …
    mse = attention_score_mse(sq, sk, tq, tk, mask)
    kl = attention_kl(sq, sk, tq, tk, mask)
    assert torch.isfinite(mse) and torch.isfinite(kl)  # … and the losses avoid it
    close(mse, naive_attention_score_mse(sq, sk, tq, tk, mask), rel=1e-5)
    # logits whose fp16 sum of squares / exps would overflow
    zs = torch.tensor([[6e4, -6e4, 0.0], [3e4, 3e4, -6e4]], dtype=torch.float16)
    zt = torch.tensor([[6e4, 0.0, -6e4], [0.0, 6e4, 6e4]], dtype=torch.float16)
    assert torch.isfinite(soft_cross_entropy(zs, zt))
    assert torch.isfinite(mlm_loss(zs, torch.tensor([1, 2])))
    hs = torch.full((B, L, 4), 6e4, dtype=torch.float16)
    out = hidden_mse(hs, -hs, mask)
    assert torch.isfinite(out)
    close(out, (1.2e5) ** 2, rel=1e-6)


def test_autocast_does_not_lower_precision(qk):
    sq, sk, tq, tk, mask = qk
    ref = attention_kl(sq, sk, tq, tk, mask)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = attention_kl(sq, sk, tq, tk, mask)
        proj_out = hidden_mse(
            rand(B, L, 3, seed=36), rand(B, L, 4, seed=37), mask, projection=nn.Linear(3, 4)
        )
    assert out.dtype == torch.float32 and proj_out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
