"""The five pretraining strategies (SPEC §2, §4) on real text with the tiny teacher that the
project itself pretrained: training, export, fairness (same data and init), gradients, the
teacher's isolation, TinyBERT projections, refusals, throughput under a time budget, and the
internals capture against what Hugging Face computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    BERT_VOCAB,
    SEQ_LEN,
    STUDENT_ARCH,
    TEACHER_ARCH,
    VOCAB,
    corpus_file,
    load_in_plain_transformers,
    student_from_checkpoint,
)
from safetensors import safe_open
from transformers import BertConfig, BertForMaskedLM

from budgetkd.data import PackedData, StepBatches, prepare_dataset
from budgetkd.errors import BudgetKDError
from budgetkd.models import Capture, CaptureSpec
from budgetkd.strategies import get_strategy
from budgetkd.train import Pretrainer, TeacherRunner, pretrain

STRATEGIES = ("none", "vanilla", "tinybert", "minilm", "minilmv2")
KD = STRATEGIES[1:]


def bert_config(arch: dict, vocab: int = VOCAB) -> BertConfig:
    return BertConfig(
        vocab_size=vocab,
        hidden_size=arch["hidden"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        intermediate_size=arch["intermediate"],
        pad_token_id=0,
    )


def assert_nothing_trained(run_dir) -> None:
    for name in ("model", "checkpoint.pt", "summary.json", "run_config.json"):
        assert not (run_dir / name).exists(), f"{name} was written by a refused run"


def real_inputs(data_dir, rows: int = 4):
    data = PackedData(data_dir)
    valid = np.asarray(data.valid).astype(np.int64)
    ids = torch.from_numpy(np.concatenate([valid[: rows - 1], valid[-1:]]))  # last one padded
    attention = (ids != data.special_ids["pad"]).long()
    assert (attention == 0).any()
    return ids, attention


# ------------------------------------------------------------------------------------------------
# every strategy, end to end
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strategy_runs(make_config, teacher_dir, tmp_path_factory):
    """Each strategy for 3 steps of 8 sequences (micro-batches of 4), recording the data it saw;
    plus No-KD with whole micro-batches, to compare the data order."""
    root = tmp_path_factory.mktemp("strategies")
    runs = {}
    original = StepBatches.micro_batches
    for name, strategy, micro in [(s, s, 4) for s in STRATEGIES] + [("none-micro8", "none", 8)]:
        seen = {}

        def recording(self, step, _seen=seen):
            batches = original(self, step)
            _seen[step] = [(m.input_ids, m.attention_mask, m.labels) for m in batches]
            return batches

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(StepBatches, "micro_batches", recording)
            summary = pretrain(
                make_config(
                    root / name,
                    strategy=strategy,
                    teacher=None if strategy == "none" else str(teacher_dir),
                    micro_batch_size=micro,
                    num_evals=2,
                )
            )
        runs[name] = {"dir": root / name, "summary": summary, "seen": seen}
    return runs


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_on_real_text(strategy_runs, strategy):
    summary = strategy_runs[strategy]["summary"]
    consumed = summary["consumed"]
    assert summary["strategy"] == strategy
    assert summary["lr"] == (1e-3 if strategy == "none" else 5e-4)  # paper defaults (SPEC §4)
    assert consumed["steps"] == 3 and consumed["sequences"] == 24
    assert math.isfinite(summary["val_mlm_loss"])
    if strategy == "none":
        assert consumed["flops_teacher"] == 0 and consumed["flops_teacher_share"] == 0
        assert consumed["time_teacher_s"] == 0 and consumed["time_teacher_share"] == 0
    else:
        assert math.isfinite(summary["val_loss"]) and summary["val_loss"] >= 0
        assert 0 < consumed["flops_teacher_share"] < 1
        assert 0 < consumed["time_teacher_share"] < 1
        assert consumed["flops_teacher"] > 0 and consumed["time_teacher_s"] > 0


def test_exports_load_in_plain_transformers_without_projections(strategy_runs, data_dir, tmp_path):
    ids, attention = real_inputs(data_dir)
    dirs = [strategy_runs[s]["dir"] for s in STRATEGIES]
    logits, report = load_in_plain_transformers([d / "model" for d in dirs], ids, tmp_path / "plain")
    assert report["budgetkd_modules"] == []
    fresh = BertForMaskedLM(bert_config(STUDENT_ARCH))
    fresh_count = sum(p.numel() for p in fresh.parameters())
    fresh_keys = set(fresh.state_dict())
    for strategy, run_dir, got, info in zip(STRATEGIES, dirs, logits, report["models"]):
        assert info["class"] == "BertForMaskedLM", strategy
        assert info["parameters"] == fresh_count, strategy
        with safe_open(str(run_dir / "model" / "model.safetensors"), framework="pt") as handle:
            keys = set(handle.keys())
        assert not any("projection" in k for k in keys), strategy
        assert keys <= fresh_keys, strategy
        model, state = student_from_checkpoint(run_dir, STUDENT_ARCH)
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=attention).logits
        torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-6, atol=1e-6, msg=strategy)
        if strategy == "tinybert":  # D_S 32 ≠ D_T 64: projections were trained, then left out
            assert any("projection" in k for k in state["strategy"])


def test_same_data_and_initial_weights_for_every_strategy(strategy_runs):
    reference = strategy_runs["none"]
    for name, run in strategy_runs.items():
        assert run["summary"]["init_fingerprint"] == reference["summary"]["init_fingerprint"], name
        assert sorted(run["seen"]) == [0, 1, 2], name
        for step in range(3):
            mine, theirs = run["seen"][step], reference["seen"][step]
            for field in range(3):
                a = torch.cat([m[field] for m in mine])
                b = torch.cat([m[field] for m in theirs])
                assert torch.equal(a, b), (name, step, field)
    assert [len(s) for s in strategy_runs["none-micro8"]["seen"].values()] == [1, 1, 1]
    assert [len(s) for s in strategy_runs["none"]["seen"].values()] == [2, 2, 2]


def test_teacher_files_untouched_by_distillation(strategy_runs, teacher_run, teacher_dir):
    teacher_state = torch.load(teacher_run / "checkpoint.pt", weights_only=False)["student"]
    with safe_open(str(teacher_dir / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            exported = handle.get_tensor(key)
            trained = teacher_state[key]  # its vocabulary rows padded to a multiple of 64 in training
            assert torch.equal(exported, trained[: len(exported)]), key
            assert not trained[len(exported) :].any(), key


@pytest.mark.parametrize("strategy", ["vanilla", "minilm", "minilmv2"])
def test_micro_batch_split_does_not_change_kd_training(make_config, teacher_dir, tmp_path, strategy):
    """Losses that are means over predicted tokens (Vanilla-KD) or over real tokens/queries
    (MiniLM, MiniLMv2) combine exactly across micro-batches: micro-batches 2 and 8 of a batch
    of 8 give the same student (dropout off)."""
    for name, micro in (("whole", 8), ("split", 2)):
        config = make_config(
            tmp_path / name,
            strategy=strategy,
            teacher=str(teacher_dir),
            micro_batch_size=micro,
            dropout=0.0,
            warmup=0.0,
        )
        pretrain(config)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["student"]
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["student"]
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=1e-4, atol=2e-5, msg=key)


# ------------------------------------------------------------------------------------------------
# gradients and the teacher's isolation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", KD)
def test_gradients_reach_the_student_and_never_the_teacher(make_config, teacher_dir, tmp_path, strategy):
    trainer = Pretrainer(make_config(tmp_path / "run", strategy=strategy, teacher=str(teacher_dir)))
    trainer.setup()
    teacher = trainer.teacher.model
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.module.student.state_dict().items()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in teacher.parameters())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules()), "the teacher must run in eval mode"

    for step in range(2):
        loss, parts, teacher_seconds, _ = trainer.train_step(step, 1e-3)
        assert math.isfinite(loss) and teacher_seconds > 0
        assert all(p.grad is None for p in teacher.parameters())
        student = trainer.module.student
        grads = {n: p.grad for n, p in student.named_parameters()}
        embedding = grads["bert.embeddings.word_embeddings.weight"]
        query = grads["bert.encoder.layer.0.attention.self.query.weight"]
        assert embedding is not None and float(embedding.abs().sum()) > 0
        assert query is not None and float(query.abs().sum()) > 0
        for name, param in trainer.module.strategy.named_parameters():
            assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    result = trainer.evaluate()
    assert math.isfinite(result["val_mlm_loss"]) and math.isfinite(result["val_loss"])
    after = teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"teacher {key} changed"
    assert not any(m.training for m in teacher.modules())
    assert trainer.module.training, "evaluation must give the student back in train mode"
    changed = [
        k for k, v in trainer.module.student.state_dict().items() if not torch.equal(v, student_before[k])
    ]
    assert changed, "the student did not learn"


# ------------------------------------------------------------------------------------------------
# TinyBERT projections
# ------------------------------------------------------------------------------------------------


def test_tinybert_projection_only_when_hidden_sizes_differ():
    teacher = bert_config(TEACHER_ARCH)
    same = bert_config({**STUDENT_ARCH, "hidden": TEACHER_ARCH["hidden"]})
    smaller = bert_config(STUDENT_ARCH)
    tinybert = get_strategy("tinybert")
    assert list(tinybert({}, same, teacher).parameters()) == []
    forced = list(tinybert({"projection": "always"}, same, teacher).named_parameters())
    assert forced and all("projection" in n for n, _ in forced)
    projected = dict(tinybert({}, smaller, teacher).named_parameters())
    shapes = {tuple(p.shape) for n, p in projected.items() if n.endswith("weight")}
    assert shapes == {(TEACHER_ARCH["hidden"], STUDENT_ARCH["hidden"])}  # D_S → D_T
    with pytest.raises(BudgetKDError, match="projection"):
        tinybert({"projection": "never"}, same, teacher)


def test_tinybert_equal_hidden_run_optimises_only_the_student(make_config, teacher_dir, tmp_path):
    arch = {**STUDENT_ARCH, "hidden": TEACHER_ARCH["hidden"]}
    trainer = Pretrainer(
        make_config(tmp_path / "run", strategy="tinybert", teacher=str(teacher_dir), student=arch)
    )
    trainer.setup()
    assert list(trainer.module.strategy.parameters()) == []
    optimised = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    assert optimised == sum(p.numel() for p in trainer.module.student.parameters())


# ------------------------------------------------------------------------------------------------
# refusals (before any training)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_vocab_data_dir(shared_data, tmp_path_factory):
    """A short book with the real bert-base-uncased vocabulary (30522 entries ≠ the teacher's)."""
    if not BERT_VOCAB.is_file():
        pytest.skip("bert-base-uncased vocab.txt not found")
    out = tmp_path_factory.mktemp("bert-vocab") / "data"
    prepare_dataset(
        [corpus_file("gutenberg/blake-poems.txt")],
        out,
        tokenizer=str(BERT_VOCAB),
        seq_len=SEQ_LEN,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def encoder_only_teacher(teacher_dir, data_dir, tmp_path_factory):
    """The teacher without its MLM head: a plain ``BertModel`` checkpoint (+ the tokenizer)."""
    out = tmp_path_factory.mktemp("encoder-only") / "teacher"
    encoder = BertForMaskedLM.from_pretrained(str(teacher_dir)).bert
    encoder.config.architectures = ["BertModel"]
    encoder.save_pretrained(str(out))
    PackedData(data_dir).load_tokenizer().save_pretrained(str(out))
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not any(k.startswith("cls.") for k in handle.keys())
    return out


TWO_HEADS = {**STUDENT_ARCH, "heads": 2}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy": "vanilla", "data": "other-vocab"}, "vocabulary mismatch"),
        ({"strategy": "vanilla", "data": "bert-vocab"}, "vocabulary mismatch"),
        ({"strategy": "tinybert", "student": TWO_HEADS}, "head counts"),
        ({"strategy": "minilm", "student": TWO_HEADS}, "head counts"),
        ({"strategy": "minilmv2", "strategy_options": {"relation_heads": 3}}, "relation_heads"),
        ({"strategy": "minilmv2", "student": {**STUDENT_ARCH, "hidden": 30, "heads": 3}}, "relation_heads"),
        ({"strategy": "tinybert", "strategy_options": {"layer_map": [[1, -1]]}}, "student layer"),
        ({"strategy": "minilm", "strategy_options": {"layer_map": [[-2, -1]]}}, "student layer"),
        ({"strategy": "minilmv2", "strategy_options": {"layer_map": [[0, 2]]}}, "teacher layer"),
        ({"strategy": "tinybert", "strategy_options": {"layer_map": [[0, -3]]}}, "teacher layer"),
        ({"strategy": "tinybert", "strategy_options": {"layer_map": "last"}}, "layer_map"),
        ({"strategy": "vanilla", "teacher": "encoder-only"}, "encoder-only"),
        ({"strategy": "vanilla", "strategy_options": {"temprature": 2.0}}, "unknown option 'temprature'"),
        ({"strategy": "none", "strategy_options": {"temperature": 2.0}}, "unknown option"),
        ({"strategy": "vanilla", "strategy_options": {"temperature": 0}}, "temperature"),
        ({"strategy": "distill"}, "unknown strategy 'distill'"),
        ({"strategy": "vanilla", "teacher": None}, "needs a teacher"),
    ],
    ids=[
        "vocab-content",
        "vocab-size",
        "tinybert-heads",
        "minilm-heads",
        "minilmv2-relation-heads",
        "minilmv2-auto-relation-heads",
        "layer-beyond-student",
        "negative-layer-beyond-student",
        "layer-beyond-teacher",
        "negative-layer-beyond-teacher",
        "layer-map-not-a-list",
        "vanilla-encoder-only",
        "unknown-option",
        "option-for-none",
        "bad-temperature",
        "unknown-strategy",
        "no-teacher",
    ],
)
def test_refusals_before_training(
    request, make_config, teacher_dir, other_vocab_data_dir, tmp_path, overrides, message
):
    values = {"teacher": str(teacher_dir), **overrides}
    if values.get("data") == "other-vocab":
        values["data"] = str(other_vocab_data_dir)
        meta = PackedData(other_vocab_data_dir)
        assert meta.vocab_size == VOCAB, "same size, other vocabulary: only the content differs"
    elif values.get("data") == "bert-vocab":
        values["data"] = str(request.getfixturevalue("bert_vocab_data_dir"))
    if values.get("teacher") == "encoder-only":
        values["teacher"] = str(request.getfixturevalue("encoder_only_teacher"))
    run = tmp_path / "run"
    with pytest.raises(BudgetKDError, match=message) as caught:
        pretrain(make_config(run, **values))
    assert "\n" not in str(caught.value)
    assert_nothing_trained(run)


@pytest.mark.parametrize("strategy", ["tinybert", "minilm", "minilmv2"])
def test_internals_strategies_accept_an_encoder_only_teacher(
    make_config, encoder_only_teacher, tmp_path, strategy
):
    summary = pretrain(
        make_config(tmp_path / "run", strategy=strategy, teacher=str(encoder_only_teacher), budget="2steps")
    )
    assert summary["consumed"]["steps"] == 2
    assert summary["consumed"]["flops_teacher"] > 0 and math.isfinite(summary["val_loss"])


def test_teacher_may_be_a_budgetkd_run_directory(make_config, teacher_run, tmp_path):
    summary = pretrain(
        make_config(tmp_path / "run", strategy="vanilla", teacher=str(teacher_run), budget="2steps")
    )
    assert summary["consumed"]["steps"] == 2 and summary["consumed"]["flops_teacher"] > 0


# ------------------------------------------------------------------------------------------------
# the teacher's cost under a time budget
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_teacher(data_dir, tmp_path_factory):
    """A teacher much larger than the student (4 × 256 vs 1 × 32); untrained is enough to cost."""
    out = tmp_path_factory.mktemp("big-teacher") / "teacher"
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config({"layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024}))
    model.save_pretrained(str(out))
    PackedData(data_dir).load_tokenizer().save_pretrained(str(out))
    return out


def test_kd_processes_fewer_tokens_than_no_kd_in_the_same_time(make_config, big_teacher, tmp_path):
    budget = 2.0
    no_kd = pretrain(make_config(tmp_path / "none", budget=f"{budget}s"))["consumed"]
    kd = pretrain(
        make_config(tmp_path / "kd", strategy="vanilla", teacher=str(big_teacher), budget=f"{budget}s")
    )["consumed"]
    for consumed in (no_kd, kd):
        assert consumed["time_s"] >= budget
    assert kd["tokens"] < no_kd["tokens"]
    assert kd["tokens_per_s"] < no_kd["tokens_per_s"]
    assert kd["time_teacher_share"] > 0.3 and kd["flops_teacher_share"] > 0.5


# ------------------------------------------------------------------------------------------------
# internals capture vs Hugging Face
# ------------------------------------------------------------------------------------------------


def _count_sdpa(monkeypatch) -> list:
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


def test_capture_records_exactly_what_hugging_face_computes(teacher_dir, data_dir, monkeypatch):
    model = BertForMaskedLM.from_pretrained(str(teacher_dir), attn_implementation="sdpa").eval()
    ids, attention = real_inputs(data_dir)
    layers = model.config.num_hidden_layers
    kinds = frozenset({"q", "k", "v", "hidden"})
    capture = Capture(model.bert, CaptureSpec(True, {i: kinds for i in range(layers)}))
    calls = _count_sdpa(monkeypatch)
    with torch.no_grad():
        out = model.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    assert len(calls) == layers, "attention did not run through SDPA"
    assert model.config._attn_implementation == "sdpa"
    hidden_states = out.hidden_states
    values = capture.values
    torch.testing.assert_close(values["embeddings"], hidden_states[0], rtol=0, atol=0)
    with torch.no_grad():
        for index, layer in enumerate(model.bert.encoder.layer):
            previous = hidden_states[index]
            torch.testing.assert_close(values[("hidden", index)], hidden_states[index + 1], rtol=0, atol=0)
            attention_module = layer.attention.self
            for kind, linear in (
                ("q", attention_module.query),
                ("k", attention_module.key),
                ("v", attention_module.value),
            ):
                torch.testing.assert_close(values[(kind, index)], linear(previous), rtol=0, atol=0)
    torch.testing.assert_close(values[("hidden", layers - 1)], out.last_hidden_state, rtol=0, atol=0)
    capture.remove()
    capture.clear()
    with torch.no_grad():
        model.bert(input_ids=ids, attention_mask=attention)
    assert capture.values == {}, "hooks were not removed"


def test_tinybert_runner_captures_the_teacher_tensors_and_keeps_sdpa(
    make_config, teacher_dir, data_dir, tmp_path, monkeypatch
):
    """The hooks as the training loop installs them (TinyBERT: embeddings, q, k, hidden of the
    last layer): the teacher runner's values equal the HF model's own tensors, and neither model
    is switched away from SDPA."""
    trainer = Pretrainer(make_config(tmp_path / "run", strategy="tinybert", teacher=str(teacher_dir)))
    trainer.setup()
    assert trainer.teacher.model.config._attn_implementation == "sdpa"
    assert trainer.module.student.config._attn_implementation == "sdpa"
    ids, attention = real_inputs(data_dir)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    runner = TeacherRunner(trainer.teacher, trainer.strategy, torch.device("cpu"))
    calls = _count_sdpa(monkeypatch)
    values, logits = runner(ids, attention, labels)
    last = TEACHER_ARCH["layers"] - 1
    assert len(calls) == TEACHER_ARCH["layers"]
    assert logits is None  # TinyBERT needs no teacher logits
    assert set(values) == {"embeddings", ("q", last), ("k", last), ("hidden", last)}
    reference = BertForMaskedLM.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        out = reference.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        layer = reference.bert.encoder.layer[last].attention.self
        expected_q = layer.query(out.hidden_states[last])
        expected_k = layer.key(out.hidden_states[last])
    torch.testing.assert_close(values[("hidden", last)], out.hidden_states[-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values["embeddings"], out.hidden_states[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values[("q", last)], expected_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values[("k", last)], expected_k, rtol=1e-6, atol=1e-6)
    assert not any(v.requires_grad for v in values.values())
    # the student side: one forward of the training module also stays on SDPA
    calls.clear()
    teacher_out, teacher_logits = runner(ids, attention, labels)
    calls.clear()
    loss, parts = trainer.module(ids, attention, labels, teacher_out, teacher_logits)
    assert len(calls) == STUDENT_ARCH["layers"]
    assert {"embd", "att", "hid"} <= set(parts) and math.isfinite(float(loss.detach()))
    assert trainer.module.student.config._attn_implementation == "sdpa"
