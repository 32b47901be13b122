"""Issue 13, training side: what is charged is what runs, the warm-up is a training step undone,
"unlimited data" binds every strategy, validation measures the model that trains, and resuming
runs no one's code. (Distributed RNG and loss components: tests/test_distributed.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SEQ_LEN, VOCAB, single_thread
from test_cli_errors import assert_one_line_error
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig

from budgetkd import flops
from budgetkd.cli import main
from budgetkd.data import MaskingConfig, PackedData, mask_tokens
from budgetkd.errors import BudgetKDError
from budgetkd.models import (
    Capture,
    CaptureSpec,
    Depth,
    Teacher,
    create_student,
    encode,
    load_teacher,
    resolve_architecture,
)
from budgetkd.strategies import get_strategy
from budgetkd.train import (
    Pretrainer,
    TeacherRunner,
    TrainModule,
    _encoder,
    dropout_seed,
    pretrain,
    step_flops,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


def _bert(layers, hidden, heads, intermediate, vocab=VOCAB):
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
    )


# ------------------------------------------------------------------------------------------------
# item 5: forwards stop where the loss stops reading; FLOPs count what runs
# ------------------------------------------------------------------------------------------------

QKV = frozenset({"q", "k", "v"})


@pytest.mark.parametrize(
    ("name", "options", "student", "teacher"),
    [
        ("none", {}, Depth(3), None),
        ("vanilla", {}, Depth(3), Depth(4)),
        # last ↔ last, no MLM term: the layers below, then only the last layer's Q/K/V
        ("minilm", {}, Depth(2, QKV), Depth(3, QKV)),
        ("minilm", {"mlm_weight": 1.0}, Depth(3), Depth(3, QKV)),  # the MLM head needs the output
        ("minilm", {"layer_map": [[0, 0], [1, 2]]}, Depth(1, QKV), Depth(2, QKV)),
        ("minilmv2", {"relation_heads": 2}, Depth(2, QKV), Depth(3, QKV)),
        (
            "minilmv2",
            {"relation_heads": 2, "relations": ["q", "k"]},
            Depth(2, frozenset("qk")),
            Depth(3, frozenset("qk")),
        ),
        ("tinybert", {}, Depth(3), Depth(4)),  # the mapped layer's output: the whole layer
        ("tinybert", {"layer_map": [[0, 1]]}, Depth(1), Depth(2)),  # nothing above the mapped layer
    ],
)
def test_each_strategy_runs_its_encoders_only_as_deep_as_its_loss_reads(name, options, student, teacher):
    strategy = get_strategy(name)(options, _bert(3, 8, 2, 16), _bert(4, 16, 2, 32))
    assert strategy.student_depth() == student
    if teacher is not None:
        assert strategy.teacher_depth() == teacher


def test_partial_forward_captures_what_the_full_one_does_and_skips_the_rest():
    """Depth(1, QKV) on a 2-layer encoder: the embeddings, layer 0 and layer 1's Q/K/V equal the
    full forward's bit for bit, and layer 1's attention, output, FFN never run."""
    torch.manual_seed(0)
    model = create_student(
        resolve_architecture({"layers": 2, "hidden": 16, "heads": 2}), 50, 8, {"pad": 0}, 0
    )
    bert = model.bert.eval()
    ids = torch.randint(4, 50, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    spec = CaptureSpec(True, {0: frozenset({"q", "hidden"}), 1: QKV})
    capture = Capture(bert, spec)
    encode(bert, ids, mask)
    full = dict(capture.values)
    calls = []
    last = bert.encoder.layer[1]
    for module in (last.attention.output, last.intermediate, last.output, model.cls):
        module.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    capture.clear()
    encode(bert, ids, mask, Depth(1, QKV))
    assert calls == []
    assert set(capture.values) == set(full)
    for key, value in full.items():
        assert torch.equal(capture.values[key], value), key


def _masked_batch(data_dir, rows=6, seed=0):
    data = PackedData(data_dir)
    ids = torch.from_numpy(np.asarray(data.valid[:rows]).astype(np.int64))
    attention = (ids != data.special_ids["pad"]).long()
    attention[-1, -10:] = 0  # a padded row: key masks matter
    config = MaskingConfig(data.vocab_size, data.special_ids["mask"], tuple(data.special_ids["all"]))
    masked, labels = mask_tokens(ids, attention, config, torch.Generator().manual_seed(seed))
    return masked, attention, labels


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("minilm", {}),
        ("minilm", {"layer_map": [[0, 0]]}),
        ("minilmv2", {}),
        ("minilmv2", {"relations": ["k", "v"]}),
        ("tinybert", {"layer_map": [[0, 1]]}),
    ],
)
def test_partial_forward_gives_the_full_forwards_loss_and_gradients(name, options, teacher_dir, data_dir):
    """Same objective, less work: loss and every gradient equal those of the full forward."""
    data = PackedData(data_dir)
    teacher = load_teacher(str(teacher_dir))
    arch = resolve_architecture({"layers": 2, "hidden": 32, "heads": 4, "intermediate": 64})
    student = create_student(arch, data.vocab_size, SEQ_LEN, data.special_ids, seed=0).eval()  # no dropout
    strategy = get_strategy(name)(options, student.config, teacher.config)
    module = TrainModule(student, strategy)
    assert not module.depth.is_full(2)
    runner = TeacherRunner(teacher, strategy, torch.device("cpu"))
    masked, attention, labels = _masked_batch(data_dir)
    teacher_out, teacher_logits = runner(masked, attention, labels)

    def loss_and_grads():
        module.zero_grad(set_to_none=True)
        loss, _ = module(masked, attention, labels, teacher_out, teacher_logits)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    partial_loss, partial_grads = loss_and_grads()
    module.encode = _encoder(student.bert, Depth(2))  # the full forward
    full_loss, full_grads = loss_and_grads()
    torch.testing.assert_close(partial_loss, full_loss, rtol=1e-6, atol=1e-7)
    assert set(partial_grads) == set(full_grads)
    for key in full_grads:
        torch.testing.assert_close(partial_grads[key], full_grads[key], rtol=1e-5, atol=1e-7, msg=key)


def test_minilm_step_flops_hand_count():
    """B = 2 sequences of L = 6; student 3 × (D 8, I 16), teacher 2 × (D 16, I 32), last ↔ last.

    Student layer 8·6·8² + 4·6·8·16 + 4·6²·8 = 3072 + 3072 + 1152 = 7296 per sequence. It runs 2
    whole layers (2·2·7296 = 29,184) and the last layer's Q, K, V (3·2·6·8² per sequence:
    4,608); the relations Q·Kᵀ and V·Vᵀ cost 2·2·6²·8 each (2,304): forward 36,096, charged ×3
    = 108,288. Teacher layer 8·6·16² + 4·6·16·32 + 4·6²·16 = 26,880: 1 whole layer (53,760), its
    last Q/K/V (3·2·2·6·16² = 18,432), relations 2·(2·2·6²·16) = 4,608: 76,800. No MLM head runs.
    (The full forwards charged before: student 3·(3·2·7296 + 2304) = 138,240, teacher 112,128.)"""
    student, teacher = _bert(3, 8, 2, 16, vocab=50), _bert(2, 16, 2, 32, vocab=50)
    strategy = get_strategy("minilm")({}, student, teacher)
    shapes = flops.EncoderShape.from_config(student), flops.EncoderShape.from_config(teacher)
    assert step_flops(strategy, *shapes, 6, 2, num_predicted=3) == (108_288, 76_800)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("none", {}),
        ("vanilla", {}),
        ("minilm", {}),
        ("minilm", {"mlm_weight": 1.0}),
        ("minilm", {"layer_map": [[1, 0]]}),
        ("minilmv2", {"relation_heads": 2}),
        ("minilmv2", {"relation_heads": 2, "relations": ["q", "k"]}),
        ("tinybert", {}),
        ("tinybert", {"layer_map": [[0, 0]]}),
        ("tinybert", {"layer_map": [[0, 0], [2, 1]], "projection": "always"}),
    ],
)
def test_step_flops_equal_what_pytorchs_flop_counter_sees(name, options):
    """An independent count: torch.utils.flop_counter over one micro-step (teacher forward,
    student forward, loss, backward) sees exactly the matrix-product FLOPs ``step_flops``
    charges, for every strategy and layer map (eager attention, so the counter sees the
    attention products; it does not count fused CPU attention kernels)."""
    torch.manual_seed(0)
    special = {"pad": 0, "all": [0, 1, 2, 3]}
    vocab, length, batch = 50, 6, 2
    student = create_student(
        resolve_architecture({"layers": 3, "hidden": 8, "heads": 2, "intermediate": 16}),
        vocab,
        length,
        special,
        0,
    )
    teacher_model = create_student(
        resolve_architecture({"layers": 2, "hidden": 16, "heads": 2, "intermediate": 32}),
        vocab,
        length,
        special,
        1,
    )
    teacher_model.eval().requires_grad_(False)
    for model in (student, teacher_model):
        model.set_attn_implementation("eager")
    teacher = Teacher(model=teacher_model, has_mlm_head=True, source="random", config=teacher_model.config)
    strategy = get_strategy(name)(options, student.config, teacher.config)
    module = TrainModule(student, strategy)
    runner = TeacherRunner(teacher, strategy, torch.device("cpu")) if strategy.needs_teacher else None
    ids = torch.randint(4, vocab, (batch, length))
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, -2:] = 0
    labels = torch.full((batch, length), -100)
    labels[0, 1], labels[1, 2], labels[0, 3] = 5, 7, 9
    with FlopCounterMode(display=False) as counter:
        teacher_out, teacher_logits = runner(ids, attention, labels) if runner else ({}, None)
        loss, _ = module(ids, attention, labels, teacher_out, teacher_logits)
        loss.backward()
    shapes = (
        flops.EncoderShape.from_config(student.config),
        (flops.EncoderShape.from_config(teacher.config) if strategy.needs_teacher else None),
    )
    s, t = step_flops(strategy, *shapes, length, batch, num_predicted=3)
    assert counter.get_total_flops() == s + t


# ------------------------------------------------------------------------------------------------
# item 4: the warm-up is one training step, run as training runs it, then undone
# ------------------------------------------------------------------------------------------------


def _state(trainer):
    weights = {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}
    return weights, torch.get_rng_state().clone()


def test_warm_up_is_one_training_step_undone_bit_for_bit(make_config, teacher_dir, tmp_path, monkeypatch):
    config = make_config(
        tmp_path / "run",
        strategy="tinybert",
        teacher=str(teacher_dir),
        dropout=0.1,
        micro_batch_size=4,
        strategy_options={"projection": "always"},  # projections: strategy parameters and their state
    )
    trainer = Pretrainer(config)
    trainer.setup()
    torch.manual_seed(dropout_seed(0, 0))
    weights, rng = _state(trainer)
    calls = []
    for name in ("train_step", "apply_update", "autocast"):
        original = getattr(trainer, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(trainer, name, spy)
    trainer.warm_up()
    # the training step's own code: both micro-batches under the training precision, one update
    assert calls == ["train_step", "autocast", "autocast", "apply_update"]
    after_weights, after_rng = _state(trainer)
    assert torch.equal(rng, after_rng)
    for key, value in weights.items():
        assert torch.equal(after_weights[key], value), key
    assert all(p.grad is None for p in trainer.module.parameters())
    # the optimizer's lazy state exists (no charged step creates it) and equals a fresh state
    created = {id(p) for p in trainer.optimizer.state}
    assert created
    for state in trainer.optimizer.state.values():
        assert all(float(v.abs().max()) == 0.0 for v in state.values())
    assert trainer.meter.steps == 0 and trainer.meter.time_s == 0.0

    # from here, a step gives exactly what the same step gives without any warm-up
    def one_step(t):
        loss, *_ = t.train_step(0, 1e-3)
        t.apply_update(loss)
        return {k: v.detach().clone() for k, v in t.module.state_dict().items()}

    warmed = one_step(trainer)
    assert {id(p) for p in trainer.optimizer.state} == created  # the charged step created nothing
    fresh = Pretrainer(copy.deepcopy(config))
    fresh.setup()
    torch.manual_seed(dropout_seed(0, 0))
    cold = one_step(fresh)
    for key in cold:
        assert torch.equal(warmed[key], cold[key]), key


# ------------------------------------------------------------------------------------------------
# item 6: "unlimited data" binds every strategy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "fits", "too_much"),
    [
        ("steps", "11steps", "12steps"),
        ("epochs", "1epochs", "1.01epochs"),
        ("tokens", None, None),
        ("flops", None, None),
    ],
)
def test_budget_needing_a_second_epoch_is_refused_before_training(
    currency, fits, too_much, make_config, tiny_data_dir, tmp_path
):
    """190 training sequences in batches of 16: within one epoch at most 11 steps (12 would read
    192 sequences), 11·16·64 tokens; an epochs budget of 1 is one epoch."""
    n = PackedData(tiny_data_dir).num_train
    assert n // 16 == 11
    if currency == "tokens":
        fits, too_much = f"{11 * 16 * SEQ_LEN}tokens", f"{11 * 16 * SEQ_LEN + 1}tokens"
    if currency == "flops":
        probe = Pretrainer(make_config(tmp_path / "probe", data=str(tiny_data_dir), batch_size=16))
        probe.setup()
        encoder_only, _ = probe.step_flops(16, 0)  # No-KD without its MLM head's share: 11 fit
        every_token, _ = probe.step_flops(16, 16 * SEQ_LEN)  # every token predicted: 11 do not
        fits, too_much = f"{11 * encoder_only!r}flops", f"{11 * every_token!r}flops"
    for budget, refused in ((fits, False), (too_much, True)):
        trainer = Pretrainer(
            make_config(
                tmp_path / budget, data=str(tiny_data_dir), batch_size=16, budget=budget, max_epochs=1.0
            )
        )
        if refused:
            with pytest.raises(BudgetKDError, match="needs more than the data limit of 1 epoch"):
                trainer.setup()
        else:
            trainer.setup()


def test_refusal_is_one_line_and_exit_2_before_anything_is_written(tiny_data_dir, tmp_path, capfd):
    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(tiny_data_dir), "--out", str(out), "--budget", "100steps"]
    rc = main([*argv, "--batch-size", "16", "--max-epochs", "1", "--no-progress"])
    captured = capfd.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, "needs more than the data limit of 1 epoch")
    assert not (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()


def test_epochs_budget_of_one_epoch_runs_to_its_end_under_the_data_limit(
    make_config, tiny_data_dir, tmp_path
):
    """The calibration's one epoch: N = 190 training sequences in batches of 16 → ⌊190/16⌋ = 11
    full batches (one rule with the data limit, SPEC §1: a 12th step would read 2 sequences of a
    second epoch), stopped by the budget, not by the data limit."""
    assert PackedData(tiny_data_dir).num_train == 190
    summary = pretrain(
        make_config(
            tmp_path / "run", data=str(tiny_data_dir), batch_size=16, budget="1epochs", max_epochs=1.0
        )
    )
    assert summary["consumed"]["steps"] == 11
    assert summary["consumed"]["sequences"] == 176 <= 190
    assert summary["stopped_by"] == "budget" and summary["budget_exhausted"] is True
    assert summary["budget"]["text"] == "11steps" and summary["budget_requested"]["text"] == "1epochs"


def _captured_stages(tmp_path, monkeypatch, config: dict) -> dict:
    """Run ``compare`` up to the first stage after the teacher; return the TrainConfigs seen."""
    import yaml

    from budgetkd.experiment import Experiment, compare

    seen = {}
    original = Experiment._pretrain

    class Stop(Exception):
        pass

    def capture(self, train_config, stage):
        if stage == "teacher":
            return original(self, train_config, stage)
        seen[stage] = train_config
        raise Stop

    monkeypatch.setattr(Experiment, "_pretrain", capture)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(Stop):
        compare(path, tmp_path / "out", progress=False)
    return seen


def _experiment_config(shared: Path) -> dict:
    return {
        "name": "ci",
        "seed": 0,
        "data": {
            "inputs": [str(shared / "corpus" / "gutenberg" / "blake-poems.txt")],
            "tokenizer": {"train": 500},
        },
        "teacher": {
            "pretrain": {
                "student": {"layers": 1, "hidden": 32, "heads": 4},
                "budget": "2steps",
                "batch_size": 8,
                "dropout": 0.0,
            }
        },
        "student": {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
        "strategies": ["none", "minilm"],
        "budget": {"explicit": "3steps"},
        "data_setting": "unlimited",
        "optimizer": {"batch_size": 8},
        "training": {"num_evals": 1, "eval_sequences": 16, "dropout": 0.0},
        "glue": {"dir": str(shared / "glue"), "tasks": ["rte"], "grid": "lr=1e-4,bs=32", "epochs": 1},
    }


def test_unlimited_data_binds_no_kd_like_the_kd_strategies(shared_data, tmp_path, monkeypatch):
    """An explicit budget in the unlimited setting: No-KD gets the one-epoch data limit too, and
    the teacher stage gets teacher.pretrain.dropout (item 9)."""
    config = _experiment_config(shared_data)
    seen = _captured_stages(tmp_path, monkeypatch, config)
    assert seen["pretrain:none"].max_epochs == 1.0
    run_config = json.loads((tmp_path / "out" / "teacher" / "run_config.json").read_text())
    assert run_config["dropout"] == 0.0


def test_calibration_in_the_unlimited_setting_is_bound_too(shared_data, tmp_path, monkeypatch):
    config = _experiment_config(shared_data)
    config["budget"] = {"calibrate": {"strategy": "none", "epochs": 1, "currency": "flops"}}
    seen = _captured_stages(tmp_path, monkeypatch, config)
    assert seen["calibrate"].max_epochs == 1.0


# ------------------------------------------------------------------------------------------------
# item 8: validation under the training precision; an untrained MLM head is said to be one
# ------------------------------------------------------------------------------------------------


def test_validation_runs_under_the_training_precision(make_config, teacher_dir, tmp_path, monkeypatch):
    trainer = Pretrainer(make_config(tmp_path / "run", strategy="minilm", teacher=str(teacher_dir)))
    trainer.setup()
    entered = []
    original = trainer.autocast

    def spy():
        entered.append(torch.is_grad_enabled())
        return original()

    monkeypatch.setattr(trainer, "autocast", spy)
    trainer.evaluate()
    batches = sum(1 for _, _, labels in trainer.val_batches if (labels != -100).any())
    assert len(entered) == 2 * batches  # the MLM loss and the strategy's loss, every batch
    assert not any(entered)  # and without gradients


@pytest.mark.parametrize(
    ("strategy", "trained"), [("none", True), ("vanilla", True), ("minilm", False), ("tinybert", False)]
)
def test_summary_says_whether_the_mlm_head_was_trained(strategy, trained, make_config, teacher_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    teacher = {"teacher": str(teacher_dir)} if strategy != "none" else {}
    summary = pretrain(make_config(tmp_path / "run", strategy=strategy, budget="1steps", **teacher))
    assert summary["mlm_head_trained"] is trained
    assert summary["evaluations"] and all(e["mlm_head_trained"] is trained for e in summary["evaluations"])
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert ("val/mlm_loss" in events.Tags()["scalars"]) is trained


# ------------------------------------------------------------------------------------------------
# item 9: the smaller ones
# ------------------------------------------------------------------------------------------------


def test_negative_budget_is_refused_with_the_budgets_own_message(data_dir, tmp_path, capfd):
    rc = main(
        [
            "pretrain",
            "--data",
            str(data_dir),
            "--out",
            str(tmp_path / "run"),
            "--budget",
            "-3steps",
            "--no-progress",
        ]
    )
    captured = capfd.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, "malformed budget '-3steps'")


def test_encoder_only_teacher_loads_without_transformers_load_report(tmp_path, capfd):
    from transformers import BertModel

    BertModel(_bert(1, 16, 2, 32, vocab=50)).save_pretrained(str(tmp_path / "encoder"))  # with a pooler
    capfd.readouterr()
    teacher = load_teacher(str(tmp_path / "encoder"))
    captured = capfd.readouterr()
    assert not teacher.has_mlm_head
    assert "UNEXPECTED" not in captured.out + captured.err and "pooler" not in captured.out + captured.err


def test_teacher_pretrain_accepts_dropout_and_refuses_a_bad_one():
    from budgetkd.config import validate_experiment

    config = {
        "name": "x",
        "data": {"inputs": ["a.txt"], "tokenizer": {"train": 500}},
        "teacher": {"pretrain": {"student": "bert-tiny", "budget": "2steps", "dropout": 0.0}},
        "student": "bert-tiny",
        "strategies": ["none", "minilm"],
        "budget": {"explicit": "3steps"},
    }
    assert validate_experiment(copy.deepcopy(config))["teacher"]["pretrain"]["dropout"] == 0.0
    config["teacher"]["pretrain"]["dropout"] = "high"
    with pytest.raises(BudgetKDError, match="teacher.pretrain.dropout"):
        validate_experiment(config)


def test_the_paper_12_layer_student_has_bert_large_heads():
    """configs/paper-12l.yaml distils BERT-large (16 heads) with TinyBERT and MiniLM, which need
    equal head counts: its student is bert-12l-1024 (16 heads), not BERT-base's 12-head shape."""
    import yaml

    from budgetkd.models import PRESETS

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "configs" / "paper-12l.yaml").read_text())
    assert config["student"] == "bert-12l-1024"
    assert PRESETS["bert-12l-1024"][0] == 12 and PRESETS["bert-12l-1024"][2] == 16
    bert_large = _bert(24, 1024, 16, 4096, vocab=30522)
    for name in ("tinybert", "minilm"):
        get_strategy(name)({}, _bert(*PRESETS["bert-12l-1024"], vocab=30522), bert_large)
        with pytest.raises(BudgetKDError, match="equal head counts"):
            get_strategy(name)({}, _bert(*PRESETS["bert-12l-768"], vocab=30522), bert_large)


# ------------------------------------------------------------------------------------------------
# item 10: resuming runs no one's code
# ------------------------------------------------------------------------------------------------


class _Planted:
    """A pickle that, when loaded, writes a marker file — any code could run there."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_checkpoint_holds_only_what_weights_only_loading_accepts(make_config, teacher_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(
        make_config(
            run, strategy="tinybert", teacher=str(teacher_dir), strategy_options={"projection": "always"}
        )
    )
    state = torch.load(run / "checkpoint.pt", weights_only=True)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))

    assert plain(state)


def test_planted_pickle_is_refused_and_never_runs(make_config, tmp_path, capfd):
    run = tmp_path / "run"
    config = make_config(run, budget="4steps")

    class Stop(Exception):
        pass

    import budgetkd.train as train_mod

    original = train_mod.Pretrainer.train_step

    def crash_at_two(self, step, lr):
        if step == 2:
            raise Stop
        return original(self, step, lr)

    train_mod.Pretrainer.train_step = crash_at_two
    try:
        with pytest.raises(Stop):
            pretrain(replace_checkpoint_every(config))
    finally:
        train_mod.Pretrainer.train_step = original
    marker = tmp_path / "marker.txt"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["history"].append(_Planted(marker))
    torch.save(state, run / "checkpoint.pt")  # what anyone who can write the run directory could do
    import yaml

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(replace_checkpoint_every(config).resolved()))
    capfd.readouterr()
    rc = main(["pretrain", "--config", str(tmp_path / "run.yaml"), "--resume"])
    captured = capfd.readouterr()
    assert_one_line_error(rc, captured.out, captured.err, "refusing to unpickle")
    assert not marker.exists()


def replace_checkpoint_every(config):
    config = copy.deepcopy(config)
    config.checkpoint_every_steps = 1
    return config
