"""Unpadded GLUE fine-tuning: a packed batch (examples in rows of ≤ 128 tokens, attention blocked
per example, positions restarting, each example's own [CLS]) computes the padded batch's logits,
loss and gradients — with dropout too, its masks drawn in the padded layout and gathered — so a
fine-tuning run gives the padded run's dev predictions."""

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


def _tiny_bert(path: Path, dropout: float, attention_dropout: float | None = None) -> Path:
    """2-layer, 32-hidden BERT with the real uncased vocabulary (random weights)."""
    if not (VOCAB_DIR / "vocab.txt").is_file() or not GLUE_DIR.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(VOCAB_DIR), do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout if attention_dropout is None else attention_dropout,
    )
    torch.manual_seed(0)
    with finetune.quiet_transformers():
        BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Dropout off."""
    return _tiny_bert(tmp_path_factory.mktemp("unpad-bert"), 0.0)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory) -> Path:
    """BERT's dropout 0.1 (hidden and attention probabilities)."""
    return _tiny_bert(tmp_path_factory.mktemp("unpad-bert-dropout"), 0.1)


@pytest.fixture(params=[0.0, 0.1], ids=["no-dropout", "dropout"])
def any_model_dir(request) -> Path:
    return request.getfixturevalue("dropout_model_dir" if request.param else "model_dir")


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
    torch.manual_seed(11)  # the same generator state for both layouts: the dropout masks' source
    out = net(**batch)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters()], allow_unused=True)
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize(
    ("task_name", "attn"),
    [("sst2", "sdpa"), ("rte", "sdpa"), ("mrpc", "sdpa"), ("stsb", "sdpa"), ("mrpc", "eager")],
)
def test_packed_batch_has_the_padded_batch_s_logits_loss_and_gradients(any_model_dir, task_name, attn):
    model_dir = any_model_dir
    task, tokenizer, train, _ = _encoded(model_dir, task_name, 48, 1)
    torch.manual_seed(1)
    model = finetune.load_classifier(model_dir, task, tokenizer.pad_token_id, attn_implementation=attn)
    assert finetune.packing_supported(model)
    model.train()  # with dropout: the padded layout's masks (packed_dropout), same seed before each
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
def test_unpadded_fine_tuning_gives_the_padded_run_s_dev_predictions(any_model_dir, task_name):
    model_dir = any_model_dir
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


def test_stacked_unpadded_members_equal_the_padded_stacked_group(any_model_dir):
    model_dir = any_model_dir
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


def test_padded_layout_gathers_each_token_s_padded_mask_entries():
    """Two examples of 3 and 2 tokens packed into one row of 5 (plus a tail of 1): the packed
    token (0, 3) is example 1's position 0, so it takes the padded mask's row (1, 0). Drawn from
    the same generator state as ``F.dropout`` on the padded [2, 3, ·] tensor."""
    from budgetkd.glue.packed_dropout import PaddedLayout

    segments = torch.tensor([[0, 0, 0, 1, 1, -1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    layout = PaddedLayout.of_packed(segments, positions, cls_index=torch.tensor([0, 3]))
    assert (layout.batch, layout.length, layout.rows, layout.width) == (2, 3, 1, 6)
    assert layout.to_packed.tolist() == [0, 1, 2, 3, 4, 0]  # b·3 + t; the tail reads (0, 0)
    assert layout.to_padded.tolist() == [0, 1, 2, 3, 4, 3]  # the pad (1, 2) reads example 1's [CLS]
    assert layout.valid.tolist() == [[True, True, True], [True, True, False]]
    like = torch.zeros(1, 6, 8)
    torch.manual_seed(4)
    padded = torch.nn.functional.dropout(torch.ones(2, 3, 8), 0.5, True)
    torch.manual_seed(4)
    packed = layout.hidden_noise(0.5, like)
    assert packed.shape == (1, 6, 8) and set(padded.unique().tolist()) == {0.0, 2.0}
    for w, (b, t) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        assert torch.equal(packed[0, w], padded[b, t])


def test_padded_layout_moves_attention_inputs_to_the_padded_batch_and_back():
    """``padded`` puts packed [R, heads, W, d] at padded [B, heads, L, d] (a pad position holds
    its example's first token: a masked key); ``packed`` takes [B, L, heads, d] back; the key
    mask is the padded batch's, None when no example is padded (as transformers passes it)."""
    from budgetkd.glue.packed_dropout import PaddedLayout

    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, -1, -1, -1, -1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    layout = PaddedLayout.of_packed(segments, positions, cls_index=torch.tensor([0, 3, 6]))
    x = torch.arange(2 * 6, dtype=torch.float32).view(2, 6, 1, 1).expand(2, 6, 2, 3)  # value = flat index
    padded = layout.padded(x.transpose(1, 2))  # as attention receives it: [R, heads, W, d]
    assert padded.shape == (3, 2, 3, 3)
    assert padded[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 4, 3], [6, 7, 6]]
    back = layout.packed(padded.transpose(1, 2))  # attention's output layout: [B, L, heads, d]
    real = segments.flatten() >= 0
    assert torch.equal(back.flatten(0, 1)[real], x.flatten(0, 1)[real])
    mask = layout.key_mask("sdpa", torch.float32)
    assert mask.shape == (3, 1, 3, 3) and mask[1, 0, 0].tolist() == [True, True, False]
    additive = layout.key_mask("eager", torch.float32)
    assert additive[2, 0, 1].tolist() == [0.0, 0.0, torch.finfo(torch.float32).min]
    unpadded = PaddedLayout.of_packed(segments[:1, :3], positions[:1, :3], cls_index=torch.tensor([0]))
    assert unpadded.key_mask("sdpa", torch.float32) is None


def test_dropout_on_hidden_states_only_or_attention_only_is_the_padded_run_s(tmp_path):
    """One site without dropout: attention without dropout runs packed (nothing to draw), the
    hidden states' masks still come from the padded layout; and the other way round."""
    for hidden, attention in ((0.1, 0.0), (0.0, 0.1)):
        model_dir = _tiny_bert(tmp_path / f"h{hidden}-a{attention}", hidden, attention)
        task, tokenizer, train, _ = _encoded(model_dir, "mrpc", 48, 1)
        model = finetune.load_classifier(model_dir, task, tokenizer.pad_token_id)
        model.train()
        indices = np.arange(7, 39)
        padded = _logits_loss_grads(model, model, train.collate(indices))[0]
        packed = _logits_loss_grads(finetune.PackedClassifier(model), model, train.pack(indices, 128))[0]
        torch.testing.assert_close(packed, padded, atol=LOGIT_ATOL, rtol=0)


def test_without_the_padded_layout_s_masks_the_packed_batch_is_another_draw(dropout_model_dir, monkeypatch):
    """What the equality tests above rule out: packed rows drawing their own masks (the layout
    off) give other logits than the padded batch from the same generator state."""
    from budgetkd.glue import packed_dropout

    task, tokenizer, train, _ = _encoded(dropout_model_dir, "mrpc", 48, 1)
    torch.manual_seed(1)
    model = finetune.load_classifier(dropout_model_dir, task, tokenizer.pad_token_id)
    model.train()
    net, indices = finetune.PackedClassifier(model), np.arange(7, 39)
    padded = _logits_loss_grads(model, model, train.collate(indices))[0]
    same = _logits_loss_grads(net, model, train.pack(indices, 128))[0]
    monkeypatch.setattr(packed_dropout, "applies", lambda model, device: False)
    own = _logits_loss_grads(net, model, train.pack(indices, 128))[0]
    torch.testing.assert_close(same, padded, atol=LOGIT_ATOL, rtol=0)
    assert float((own - padded).abs().max()) > 100 * LOGIT_ATOL


def test_the_padded_layout_s_modules_are_restored_after_each_forward(dropout_model_dir):
    from budgetkd.glue import packed_dropout

    task, tokenizer, train, _ = _encoded(dropout_model_dir, "sst2", 16, 1)
    model = finetune.load_classifier(dropout_model_dir, task, tokenizer.pad_token_id)
    model.train()
    before = [type(m).__name__ for m in model.modules()]
    batch = train.pack(np.arange(8), 128)
    finetune.PackedClassifier(model)(**batch).loss.backward()
    layout = packed_dropout.PaddedLayout.of_packed(
        batch["segments"], batch["position_ids"], batch["cls_index"]
    )
    with pytest.raises(RuntimeError), packed_dropout.padded_layout_dropout(model, layout):
        assert model.config._attn_implementation == packed_dropout.ATTENTION_NAME
        assert "LayoutDropout" in [type(m).__name__ for m in model.modules()]
        raise RuntimeError("a failing step")
    assert [type(m).__name__ for m in model.modules()] == before
    assert model.config._attn_implementation == "sdpa" and "LayoutDropout" not in before
    assert packed_dropout._CURRENT.get() is None


def test_the_padded_layout_applies_where_the_padded_masks_are_reproducible(model_dir, dropout_model_dir):
    """CPU (SDPA with dropout runs its math path there) and eager attention anywhere; not CUDA's
    fused SDPA kernels (their own random stream), and not without dropout (nothing to draw)."""
    from budgetkd.glue import packed_dropout

    task = TASKS["sst2"]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    sdpa = finetune.load_classifier(dropout_model_dir, task)
    eager = finetune.load_classifier(dropout_model_dir, task, attn_implementation="eager")
    assert packed_dropout.applies(sdpa, cpu) and not packed_dropout.applies(sdpa, cuda)
    assert packed_dropout.applies(eager, cuda)
    assert not packed_dropout.applies(finetune.load_classifier(model_dir, task), cpu)


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
