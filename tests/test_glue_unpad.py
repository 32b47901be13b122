"""Unpadded GLUE fine-tuning: a packed batch (examples in rows of ≤ 128 tokens, attention blocked
per example, positions restarting, each example's own [CLS]) computes the padded batch's logits,
loss and gradients, so a fine-tuning run gives the padded run's dev predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from budgetkd.glue import finetune
from budgetkd.glue.loading import load_local
from budgetkd.glue.stacked import fine_tune_stacked
from budgetkd.glue.tasks import TASKS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB_DIR = SHARED_DATA / "vocab" / "bert-base-uncased"
GLUE_DIR = SHARED_DATA / "glue"
# Stated tolerances (fp32, CPU), packed against padded; measured ≈ 3e-8 (logits) and ≈ 1e-7
# (gradients relative to the gradient's norm): the same sums in another order.
LOGIT_ATOL = 1e-5
GRAD_RTOL = 1e-5
STEP_LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """2-layer, 32-hidden BERT, dropout off, the real uncased vocabulary (random weights)."""
    if not (VOCAB_DIR / "vocab.txt").is_file() or not GLUE_DIR.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path = tmp_path_factory.mktemp("unpad-bert")
    tokenizer = BertTokenizerFast.from_pretrained(str(VOCAB_DIR), do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    with finetune.quiet_transformers():
        BertForMaskedLM(config).save_pretrained(path)
    return path


def _encoded(model_dir, task_name: str, n_train: int, n_dev: int):
    tokenizer = finetune.load_tokenizer(model_dir)
    task = TASKS[task_name]
    data = load_local(task, GLUE_DIR)
    train = finetune.encode_split(tokenizer, data.train.select(list(range(n_train))), task, 128)
    dev = {"dev": finetune.encode_split(tokenizer, data.dev["dev"].select(list(range(n_dev))), task, 128)}
    return task, tokenizer, train, dev


def test_pack_restarts_positions_keeps_token_types_and_points_at_each_cls(model_dir):
    task, tokenizer, train, _ = _encoded(model_dir, "mrpc", 32, 1)
    indices = np.array([5, 3, 30, 0, 17, 9, 21, 11, 2, 28])
    packed = train.pack(indices, 128)
    padded = train.collate(indices)
    rows, width = packed["input_ids"].shape
    assert width <= 128 and rows < len(indices)  # pairs of ~50 tokens: two or more per row
    flat = {k: v.flatten() for k, v in packed.items() if v.dim() == 2}
    for b, length in enumerate(train.lengths()[indices]):
        start = int(packed["cls_index"][b])
        span = slice(start, start + int(length))
        assert flat["input_ids"][start] == tokenizer.cls_token_id
        assert torch.equal(flat["input_ids"][span], padded["input_ids"][b, :length])
        assert torch.equal(flat["token_type_ids"][span], padded["token_type_ids"][b, :length])
        assert torch.equal(flat["position_ids"][span], torch.arange(length))
        assert torch.all(flat["segments"][span] == b)
    # every token of the batch once, nothing else but the rows' tails
    assert int((flat["segments"] >= 0).sum()) == int(train.lengths()[indices].sum())
    assert torch.equal(packed["labels"], padded["labels"])


def _logits_loss_grads(net, model, batch):
    out = net(**batch)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize(
    ("task_name", "attn"),
    [("sst2", "sdpa"), ("rte", "sdpa"), ("mrpc", "sdpa"), ("stsb", "sdpa"), ("mrpc", "eager")],
)
def test_packed_batch_has_the_padded_batch_s_logits_loss_and_gradients(model_dir, task_name, attn):
    task, tokenizer, train, _ = _encoded(model_dir, task_name, 48, 1)
    torch.manual_seed(1)
    model = finetune.load_classifier(model_dir, task, tokenizer.pad_token_id, attn_implementation=attn)
    assert finetune.packing_supported(model)
    model.train()  # dropout is 0: train mode is deterministic and is what training runs
    net = finetune.PackedClassifier(model)
    indices = np.arange(7, 39)  # 32 examples of varied lengths
    if task_name != "sst2":
        assert "token_type_ids" in train.arrays
    padded = _logits_loss_grads(model, model, train.collate(indices))
    packed_batch = train.pack(indices, 128)
    assert packed_batch["input_ids"].numel() < train.collate(indices)["input_ids"].numel()
    packed = _logits_loss_grads(net, model, packed_batch)
    torch.testing.assert_close(packed[0], padded[0], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(packed[1], padded[1], atol=LOGIT_ATOL, rtol=0)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in padded[2] if g is not None))
    for (name, _), a, b in zip(model.named_parameters(), padded[2], packed[2]):
        if a is None:
            assert b is None, name
            continue
        # relative to the whole gradient: some entries are exactly 0 in exact arithmetic (the key
        # bias: softmax ignores a constant per row) and float noise in either layout
        assert float((a - b).abs().max()) <= GRAD_RTOL * float(total), name


@pytest.mark.parametrize("task_name", ["sst2", "stsb"])
def test_unpadded_fine_tuning_gives_the_padded_run_s_dev_predictions(model_dir, task_name):
    task, tokenizer, train, dev = _encoded(model_dir, task_name, 96, 64)
    common = dict(
        learning_rate=3e-4,
        batch_size=16,
        seed=2,
        recipe=finetune.Recipe(epochs=2),
        device=torch.device("cpu"),
        precision="fp32",
        progress=False,
    )
    padded = finetune.fine_tune(model_dir, task, tokenizer, train, dev, unpad=False, **common)
    unpadded = finetune.fine_tune(model_dir, task, tokenizer, train, dev, **common)  # the default
    assert unpadded.unpadded and not padded.unpadded
    np.testing.assert_allclose(unpadded.step_losses, padded.step_losses, rtol=STEP_LOSS_RTOL)
    # every step's loss equal pins the trajectory; the regression scores pin the final model
    # (a random 32-wide BERT's argmax is often one class after two epochs)
    if task.is_regression:  # scores, different per example: equal up to float order
        scores, reference = np.array(unpadded.predictions["dev"]), np.array(padded.predictions["dev"])
        spread = float(np.std(reference))
        assert spread > 1e-6
        np.testing.assert_allclose(scores, reference, atol=0.01 * spread, rtol=0)
    else:
        assert unpadded.predictions == padded.predictions
        assert unpadded.metrics == padded.metrics


def test_stacked_unpadded_members_equal_the_padded_stacked_group(model_dir):
    task, tokenizer, train, dev = _encoded(model_dir, "mrpc", 48, 32)
    common = dict(
        learning_rates=(3e-4, 1e-3),
        batch_size=16,
        seed=3,
        recipe=finetune.Recipe(epochs=1),
        device=torch.device("cpu"),
        precision="fp32",
    )
    padded = fine_tune_stacked(model_dir, task, tokenizer, train, dev, unpad=False, **common)
    unpadded = fine_tune_stacked(model_dir, task, tokenizer, train, dev, **common)
    for a, b in zip(padded, unpadded):
        assert b.unpadded and not a.unpadded
        np.testing.assert_allclose(b.step_losses, a.step_losses, rtol=STEP_LOSS_RTOL)
        assert b.predictions == a.predictions


def test_models_without_a_packed_path_train_padded(model_dir, tmp_path):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    assert finetune.packing_applies(model_dir)
    other = tmp_path / "distil"
    config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    with finetune.quiet_transformers():
        DistilBertForMaskedLM(config).save_pretrained(other)
    tokenizer = finetune.load_tokenizer(model_dir)
    tokenizer.save_pretrained(other)
    assert not finetune.packing_applies(other)
    task, _, train, dev = _encoded(model_dir, "rte", 16, 8)
    model = finetune.load_classifier(other, task, tokenizer.pad_token_id)
    assert not finetune.packing_supported(model)
    result = finetune.fine_tune(
        other,
        task,
        tokenizer,
        train,
        dev,
        learning_rate=1e-3,
        batch_size=8,
        seed=1,
        recipe=finetune.Recipe(epochs=1),
        device=torch.device("cpu"),
        precision="fp32",
        progress=False,
    )
    assert not result.unpadded and len(result.predictions["dev"]) == 8
