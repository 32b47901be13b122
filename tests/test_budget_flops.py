"""Budgets and FLOPs (SPEC §3): parsing, the learning-rate schedule, analytic FLOP counts against
hand counts, and the stopping rule of every currency in real (tiny) pretraining runs."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
from conftest import SEQ_LEN, STUDENT_ARCH, TEACHER_ARCH, VOCAB
from transformers import BertConfig

import budgetkd.train
from budgetkd import flops
from budgetkd.budget import Budget, Meter, learning_rate
from budgetkd.data import PackedData
from budgetkd.errors import BudgetKDError
from budgetkd.strategies import get_strategy
from budgetkd.train import pretrain

# ------------------------------------------------------------------------------------------------
# parsing and schedule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "currency", "amount"),
    [
        ("90s", "time", 90.0),
        ("30m", "time", 1800.0),
        ("4h", "time", 14400.0),
        ("2.5e15flops", "flops", 2.5e15),
        ("3e6tokens", "tokens", 3e6),
        ("500steps", "steps", 500.0),
        ("1epochs", "epochs", 1.0),
        ("0.5epochs", "epochs", 0.5),
    ],
)
def test_budget_parses(text, currency, amount):
    budget = Budget.parse(text)
    assert (budget.currency, budget.amount) == (currency, amount)
    assert Budget.parse(str(budget)) == budget


@pytest.mark.parametrize(
    "text", ["5parsecs", "-3steps", "0steps", "abc", "10", "1.5steps", "", "steps", "0s", "1e999flops", 10]
)
def test_budget_rejects(text):
    with pytest.raises(BudgetKDError):
        Budget.parse(text)


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        (0.0, 0.0),
        (0.03, 0.5e-3),  # half-way through the warm-up
        (0.06, 1e-3),  # peak
        (0.5, 1e-3 * 0.5 / 0.94),  # linear decay from (0.06, peak) to (1, 0)
        (0.53, 0.5e-3),  # half-way through the decay
        (1.0, 0.0),
    ],
)
def test_learning_rate_schedule(p, expected):
    assert learning_rate(1e-3, p, 0.06) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_meter_fraction_and_exhaustion():
    meter = Meter(steps=3, tokens=300, num_train_sequences=10, sequences=5)
    assert meter.fraction(Budget("steps", 6)) == 0.5
    assert not meter.exhausted(Budget("steps", 4))
    assert meter.exhausted(Budget("steps", 3))
    assert meter.exhausted(Budget("tokens", 300))
    assert meter.epochs == 0.5
    assert meter.fraction(Budget("epochs", 0.25)) == 1.0  # clamped


# ------------------------------------------------------------------------------------------------
# analytic FLOPs vs hand counts
# ------------------------------------------------------------------------------------------------

# Tiny config: L = 2 layers, D = 8, I = 16, V = 10, sequence length 4 (one sequence).
# One layer forward:
#   Q, K, V projections  3 · 2·4·8·8  = 1536
#   scores Q·Kᵀ             2·4·4·8   =  256
#   probabilities · V       2·4·4·8   =  256
#   output projection       2·4·8·8   =  512
#   FFN up + down         2 · 2·4·8·16 = 2048
#   total                               = 4608
# MLM head at P = 3 positions: dense 2·3·8·8 = 384, decoder 2·3·8·10 = 480 → 864.
TINY = flops.EncoderShape(layers=2, hidden=8, heads=2, intermediate=16, vocab=10)


def test_layer_forward_hand_count():
    assert flops.layer_forward(TINY, 4) == 4608


def test_encoder_forward_hand_count():
    assert flops.encoder_forward(TINY, 4, num_sequences=1) == 2 * 4608
    assert flops.encoder_forward(TINY, 4, num_sequences=5) == 5 * 2 * 4608
    assert flops.encoder_forward(TINY, 4, num_sequences=5, layers=1) == 5 * 4608


def test_mlm_head_hand_count():
    assert flops.mlm_head_forward(TINY, 3) == 864
    assert flops.mlm_head_forward(TINY, 0) == 0


def test_training_is_three_forwards():
    assert flops.training_flops(4608) == 3 * 4608


def test_shape_from_config():
    config = BertConfig(
        vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
    )
    assert flops.EncoderShape.from_config(config) == TINY


def _bert(layers, hidden, heads, intermediate):
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )


def test_strategy_loss_extras_hand_count():
    """Loss-side products for B = 2 sequences of L = 4, D_S = 8, D_T = 16 (one layer pair):
    a relation X·Xᵀ costs 2·B·L²·D = 2·2·16·D; a projection D_S→D_T over B·L rows 2·8·8·16."""
    student, teacher = _bert(2, 8, 2, 16), _bert(3, 16, 2, 32)
    rel_s, rel_t = 2 * 2 * 16 * 8, 2 * 2 * 16 * 16  # 512, 1024
    proj = 2 * (2 * 4) * 8 * 16  # 2048
    tinybert = get_strategy("tinybert")({}, student, teacher)
    # Q·Kᵀ on each side, plus the embedding and hidden projections on the student side
    assert tinybert.extra_forward_flops(2, 4) == (rel_s + 2 * proj, rel_t)
    minilm = get_strategy("minilm")({}, student, teacher)
    assert minilm.extra_forward_flops(2, 4) == (2 * rel_s, 2 * rel_t)  # Q·Kᵀ and V·Vᵀ
    minilmv2 = get_strategy("minilmv2")({"relation_heads": 2}, student, teacher)
    assert minilmv2.extra_forward_flops(2, 4) == (3 * rel_s, 3 * rel_t)  # Q·Qᵀ, K·Kᵀ, V·Vᵀ
    assert get_strategy("vanilla")({}, student, teacher).extra_forward_flops(2, 4) == (0.0, 0.0)


# Per-step split of a real run (fixed_mask_count: P_k = Σ_i round(0.15 · non-special tokens of
# sequence i) is known in advance). B = 8 sequences of L = 64.
# Student 1 × (D 32, I 64):  layer = 8·64·32² + 4·64·32·64 + 4·64²·32 = 1,572,864
#   forward of the batch 8 · 1,572,864 = 12,582,912; head per prediction 2·32·32 + 2·32·2000 = 130,048
#   charged 3 × (12,582,912 + 130,048·P_k)
# Teacher 2 × (D 64, I 128): layer = 8·64·64² + 4·64·64·128 + 4·64²·64 = 5,242,880
#   forward of the batch 8 · 2 · 5,242,880 = 83,886,080; head per prediction 2·64·64 + 2·64·2000 = 264,192
#   charged 1 × (83,886,080 + 264,192·P_k)      (Vanilla-KD needs teacher logits; no extras)
STUDENT_STEP, STUDENT_PER_PRED = 12_582_912, 130_048
TEACHER_STEP, TEACHER_PER_PRED = 83_886_080, 264_192


def test_hand_counts_of_the_run_shapes():
    assert STUDENT_ARCH == {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64}
    assert TEACHER_ARCH == {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128}
    s = flops.EncoderShape(1, 32, 4, 64, VOCAB)
    t = flops.EncoderShape(2, 64, 4, 128, VOCAB)
    assert flops.encoder_forward(s, SEQ_LEN, 8) == STUDENT_STEP
    assert flops.encoder_forward(t, SEQ_LEN, 8) == TEACHER_STEP
    assert flops.mlm_head_forward(s, 1) == STUDENT_PER_PRED
    assert flops.mlm_head_forward(t, 1) == TEACHER_PER_PRED


def step_rows(data: PackedData, step: int, batch: int, data_seed: int = 0) -> np.ndarray:
    """The packed rows of optimizer step ``step`` (SPEC §1: permutation of (data seed, epoch))."""
    n = data.num_train
    numbers = np.arange(step * batch, (step + 1) * batch)
    return np.stack(
        [
            np.asarray(data.train[np.random.default_rng([data_seed, int(g // n)]).permutation(n)[g % n]])
            for g in numbers
        ]
    ).astype(np.int64)


def step_tokens(data: PackedData, step: int, batch: int) -> int:
    return int((step_rows(data, step, batch) != data.special_ids["pad"]).sum())


def step_predicted(data: PackedData, step: int, batch: int) -> int:
    rows = step_rows(data, step, batch)
    specials = np.isin(rows, data.special_ids["all"]) | (rows == data.special_ids["pad"])
    return sum(round(0.15 * int(n)) for n in (~specials).sum(axis=1))


def test_run_flops_split_student_teacher(make_config, teacher_dir, data_dir, tmp_path):
    steps = 4
    summary = pretrain(
        make_config(
            tmp_path / "run",
            strategy="vanilla",
            teacher=str(teacher_dir),
            budget=f"{steps}steps",
            fixed_mask_count=True,
        )
    )
    data = PackedData(data_dir)
    predicted = [step_predicted(data, k, 8) for k in range(steps)]
    expected_student = sum(3 * (STUDENT_STEP + STUDENT_PER_PRED * p) for p in predicted)
    expected_teacher = sum(TEACHER_STEP + TEACHER_PER_PRED * p for p in predicted)
    consumed = summary["consumed"]
    assert consumed["flops_student"] == pytest.approx(expected_student, rel=1e-12)
    assert consumed["flops_teacher"] == pytest.approx(expected_teacher, rel=1e-12)
    assert consumed["flops"] == pytest.approx(expected_student + expected_teacher, rel=1e-12)
    assert consumed["flops_teacher_share"] == pytest.approx(
        expected_teacher / (expected_student + expected_teacher), rel=1e-9
    )


# ------------------------------------------------------------------------------------------------
# the stopping rule, currency by currency
# ------------------------------------------------------------------------------------------------


def test_steps_budget_stops_after_exactly_n_steps(make_config, tmp_path):
    summary = pretrain(make_config(tmp_path / "run", budget="7steps"))
    assert summary["consumed"]["steps"] == 7
    assert summary["consumed"]["sequences"] == 7 * 8
    assert summary["budget_exhausted"] is True


def test_tokens_budget_stops_on_first_step_reaching_it(make_config, data_dir, tmp_path):
    data = PackedData(data_dir)
    per_step = [step_tokens(data, k, 8) for k in range(10)]
    budget = per_step[0] + per_step[1] + per_step[2] + per_step[3] // 2  # mid-way through step 4
    cumulative = np.cumsum(per_step)
    expected_steps = int(np.argmax(cumulative >= budget)) + 1
    assert expected_steps == 4
    summary = pretrain(make_config(tmp_path / "run", budget=f"{budget}tokens"))
    assert summary["consumed"]["steps"] == expected_steps
    assert summary["consumed"]["tokens"] == cumulative[expected_steps - 1]
    assert (
        summary["consumed"]["tokens"] - per_step[expected_steps - 1] < budget <= summary["consumed"]["tokens"]
    )


def test_flops_budget_stops_on_first_step_reaching_it(make_config, data_dir, tmp_path):
    data = PackedData(data_dir)
    per_step = [3 * (STUDENT_STEP + STUDENT_PER_PRED * step_predicted(data, k, 8)) for k in range(10)]
    cumulative = np.cumsum(per_step)
    budget = float(cumulative[4] - per_step[4] / 3)  # inside step 5
    summary = pretrain(make_config(tmp_path / "run", budget=f"{budget!r}flops", fixed_mask_count=True))
    assert summary["consumed"]["steps"] == 5
    assert summary["consumed"]["flops"] == pytest.approx(float(cumulative[4]), rel=1e-12)
    assert summary["consumed"]["flops_teacher"] == 0.0


@pytest.mark.parametrize("epochs", ["1epochs", "0.5epochs"])
def test_epochs_budget_trains_whole_batches_within_it(make_config, tiny_data_dir, tmp_path, epochs):
    n = PackedData(tiny_data_dir).num_train
    amount = float(epochs.removesuffix("epochs"))
    batch = 16
    expected = math.floor(amount * n / batch)  # ⌊E·N/B⌋ full batches: the data limit's rule
    summary = pretrain(
        make_config(tmp_path / "run", data=str(tiny_data_dir), budget=epochs, batch_size=batch)
    )
    consumed = summary["consumed"]
    assert consumed["steps"] == expected
    assert consumed["epochs"] == pytest.approx(expected * batch / n, rel=1e-12)
    assert consumed["epochs"] <= amount < (expected + 1) * batch / n


def test_max_epochs_data_limit_stops_before_crossing_it(make_config, tiny_data_dir, tmp_path):
    n = PackedData(tiny_data_dir).num_train
    batch = 16
    expected = math.floor(0.5 * n / batch)  # the next step would exceed half an epoch
    # a time budget is not known in advance in steps: the run starts and stops at the data limit
    summary = pretrain(
        make_config(tmp_path / "run", data=str(tiny_data_dir), budget="1h", batch_size=batch, max_epochs=0.5)
    )
    assert summary["consumed"]["steps"] == expected
    assert summary["budget_exhausted"] is False
    assert summary["stopped_by"] == "data limit"
    assert summary["max_epochs"] == 0.5


class FakeClock:
    """``time`` stand-in for budgetkd.train: every perf_counter() call advances 0.25 s."""

    def __init__(self, tick: float = 0.25):
        self.now = 1000.0
        self.tick = tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_stops_on_first_step_reaching_it(make_config, tmp_path, monkeypatch):
    """With a clock that advances a fixed amount per reading, every step is charged the same c;
    the run must stop at the first k with k·c ≥ budget. Evaluations and checkpoints read the
    clock too, but must not be charged: with many of them the charged time stays the same."""
    budget = 1.1
    results = []
    for name, extra in (("plain", {}), ("busy", {"num_evals": 4, "checkpoint_every_steps": 1})):
        clock = FakeClock()
        monkeypatch.setattr(budgetkd.train, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
        summary = pretrain(make_config(tmp_path / name, budget=f"{budget}s", **extra))
        results.append(summary["consumed"])
    plain, busy = results
    steps, charged = plain["steps"], plain["time_s"]
    per_step = charged / steps
    ticks = per_step / 0.25
    assert ticks == pytest.approx(round(ticks)) and round(ticks) >= 1
    assert charged - per_step < budget <= charged
    assert steps == math.ceil(budget / per_step)
    assert (busy["steps"], busy["time_s"]) == (steps, charged), "evaluation/checkpoints were charged"
    assert busy["time_excluded_s"] > plain["time_excluded_s"]


def test_real_time_budget(make_config, tmp_path):
    summary = pretrain(make_config(tmp_path / "run", budget="0.5s"))
    consumed = summary["consumed"]
    assert consumed["time_s"] >= 0.5
    # stops at the first step past the budget: at most one (short) step beyond it
    assert consumed["time_s"] - 0.5 < max(0.5, 5 * consumed["time_s"] / consumed["steps"])
    assert summary["tokens_per_s"] == pytest.approx(consumed["tokens"] / consumed["time_s"])
