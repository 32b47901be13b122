"""Fit an MLM head on an encoder-only teacher, so that every strategy can distil from it.

An encoder-only checkpoint (a ``BertModel``, e.g. ``sentence-transformers/all-MiniLM-L6-v2``) has
no logits, which Vanilla-KD needs (SPEC §2). This module gives it the standard BERT prediction
head of ``BertForMaskedLM``::

    logits = E · LayerNorm(GELU(W·h + c)) + b        (BertLMPredictionHead)

with h the frozen encoder's last hidden state at a masked position, E the encoder's own word
embeddings (the decoder is tied to them, as in BERT, so it is not trained either) and W, c, the
LayerNorm and the output bias b the only trainable parameters. They are trained with the MLM
cross-entropy at the masked positions of the prepared data (the same 80/10/10 masking as the
students, SPEC §1), under a budget in any currency (``500steps``, ``90s``, …) with AdamW and the
linear warm-up/decay schedule of :func:`budgetkd.budget.learning_rate`; the encoder runs in eval
mode without gradients, and its weights are checked bit-identical afterwards.

The output bias starts at the log unigram frequencies of the training tokens (add-one smoothed),
so the head starts from the unigram model instead of spending its budget learning frequencies;
its validation loss with a zero transform output (``unigram_val_mlm_loss``) is recorded as the
floor a head must beat to carry anything of the encoder.

The result is a plain ``BertForMaskedLM`` directory (``OUT/model``, loadable with
``AutoModelForMaskedLM``) plus ``OUT/summary.json`` with what the fit consumed (time, FLOPs,
tokens, steps) and its validation MLM losses. That cost is the teacher's preparation: the
experiment records it beside the students' budgets and does not charge it to any student.

FLOPs (flops.py conventions): per step, one forward of the frozen encoder over the batch plus the
head trained at the P predicted positions, counted as 3 × (2·P·D² + 2·P·D·V). The decoder's
weight is frozen, so its weight gradient is never computed and this overstates the head by ≤ ⅓.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from budgetkd import flops
from budgetkd.budget import Budget, Meter, learning_rate
from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_write_json

# Defaults of ``teacher.fit_mlm_head`` (config.py reads them from here).
HEAD_DEFAULTS: dict = {
    "budget": "500steps",
    "lr": 1e-3,
    "batch_size": 32,
    "warmup": 0.06,
    "weight_decay": 0.0,
    "num_evals": 5,
    "eval_sequences": 512,
}
# Sequences read to count unigram frequencies for the bias init: enough for a stable estimate,
# bounded so that a 4-billion-token corpus costs seconds, not minutes.
_UNIGRAM_SEQUENCES = 200_000


@dataclass(frozen=True)
class HeadFitConfig:
    budget: str = HEAD_DEFAULTS["budget"]
    lr: float = HEAD_DEFAULTS["lr"]
    batch_size: int = HEAD_DEFAULTS["batch_size"]
    warmup: float = HEAD_DEFAULTS["warmup"]
    weight_decay: float = HEAD_DEFAULTS["weight_decay"]
    num_evals: int = HEAD_DEFAULTS["num_evals"]
    eval_sequences: int = HEAD_DEFAULTS["eval_sequences"]
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_block(cls, block: dict, **extra) -> HeadFitConfig:
        return cls(**{k: block[k] for k in HEAD_DEFAULTS if k in block}, **extra)


def attach_mlm_head(encoder: nn.Module) -> nn.Module:
    """A ``BertForMaskedLM`` holding ``encoder``'s weights and a freshly initialised head whose
    decoder is tied to the encoder's word embeddings; only the head is trainable."""
    from transformers import BertForMaskedLM

    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    config.architectures = ["BertForMaskedLM"]
    config.tie_word_embeddings = True
    config.is_decoder = False
    model = BertForMaskedLM(config)
    missing, unexpected = model.bert.load_state_dict(encoder.state_dict(), strict=False)
    # A BertModel saved with a pooler carries pooler.* (BertForMaskedLM has none); nothing else
    # may differ, or the "teacher" would not be the checkpoint the user gave.
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise BudgetKDError(
            f"cannot attach an MLM head: encoder weights do not match ({(missing or unexpected)[0]!r})"
        )
    model.tie_weights()
    decoder = model.cls.predictions.decoder
    if decoder.weight.data_ptr() != model.bert.embeddings.word_embeddings.weight.data_ptr():
        raise BudgetKDError("cannot tie the MLM decoder to the teacher's word embeddings")
    model.bert.requires_grad_(False)
    model.bert.eval()
    return model


def trainable_head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Transform dense + LayerNorm and the output bias (the decoder weight is the frozen E)."""
    params = [p for p in model.cls.parameters() if p.requires_grad]
    return list({id(p): p for p in params}.values())


def unigram_log_probs(data, smoothing: float = 1.0) -> torch.Tensor:
    """log p(v) of the non-special tokens of the first training sequences, add-``smoothing``."""
    rows = data.train[: min(len(data.train), _UNIGRAM_SEQUENCES)]
    counts = np.bincount(np.asarray(rows, dtype=np.int64).reshape(-1), minlength=data.vocab_size).astype(
        np.float64
    )
    counts[[int(i) for i in data.special_ids["all"]]] = 0.0
    counts += smoothing
    return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.no_grad()
def validation_mlm_loss(model: nn.Module, batches, device: torch.device, *, bias_only: bool = False) -> float:
    """Mean cross-entropy over the masked positions of the fixed validation batches; with
    ``bias_only`` the logits are the output bias alone (the unigram model)."""
    from budgetkd.losses import mlm_loss
    from budgetkd.models import encode, predicted_positions, sparse_mlm_logits

    total, count = 0.0, 0
    for input_ids, attention_mask, labels in batches:
        positions = predicted_positions(labels)
        if len(positions) == 0:
            continue
        targets = labels.reshape(-1).index_select(0, positions).to(device)
        if bias_only:
            logits = model.cls.predictions.bias.expand(len(positions), -1)
        else:
            hidden = encode(model.bert, input_ids.to(device), attention_mask.to(device))
            logits = sparse_mlm_logits(model, hidden, positions.to(device))
        total += float(mlm_loss(logits, targets)) * len(positions)
        count += len(positions)
    return total / max(1, count)


def _fingerprint(module: nn.Module) -> str:
    from budgetkd.models import weights_fingerprint

    return weights_fingerprint(module)


def fit_mlm_head(teacher: str, data_dir: str | Path, out_dir: str | Path, config: HeadFitConfig) -> dict:
    """Fit the head (see the module docstring), export ``OUT/model`` and ``OUT/summary.json``.

    Returns the summary. A teacher that already has an MLM head gets a new one fitted on its
    encoder (its own head is discarded).
    """
    from budgetkd.data import MaskingConfig, PackedData, StepBatches, validation_batches
    from budgetkd.losses import mlm_loss
    from budgetkd.models import (
        check_vocabulary,
        encode,
        export_student,
        load_teacher,
        predicted_positions,
        sparse_mlm_logits,
    )
    from budgetkd.train import _select_device

    budget = Budget.parse(config.budget)
    if config.batch_size <= 0 or config.num_evals <= 0 or config.eval_sequences <= 0:
        raise BudgetKDError("teacher.fit_mlm_head: batch_size, num_evals and eval_sequences must be positive")
    if not config.lr > 0 or not 0 <= config.warmup < 1:
        raise BudgetKDError("teacher.fit_mlm_head: lr must be positive and warmup lie in [0, 1)")
    out_dir = Path(out_dir)
    device = _select_device(config.device)
    data = PackedData(data_dir)
    tokenizer = data.load_tokenizer()
    loaded = load_teacher(teacher, "cpu")
    check_vocabulary(loaded, tokenizer, teacher)
    if data.seq_len > loaded.config.max_position_embeddings:
        raise BudgetKDError(
            f"seq_len {data.seq_len} exceeds the teacher's {loaded.config.max_position_embeddings} positions"
        )
    encoder = loaded.encoder
    encoder_before = _fingerprint(encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = attach_mlm_head(encoder)
    with torch.no_grad():
        model.cls.predictions.bias.copy_(unigram_log_probs(data))
    model.to(device)
    params = trainable_head_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)

    masking = MaskingConfig(
        vocab_size=data.vocab_size,
        mask_id=int(data.special_ids["mask"]),
        special_ids=tuple(int(i) for i in data.special_ids["all"]),
    )
    batches = StepBatches(
        data,
        batch_size=config.batch_size,
        micro_batch_size=config.batch_size,
        data_seed=config.seed,
        mask_seed=config.seed,
        masking=masking,
    )
    val = validation_batches(data, 64, masking, config.seed, max_sequences=config.eval_sequences)
    shape = flops.EncoderShape.from_config(model.config)
    meter = Meter(num_train_sequences=data.num_train)
    history: list[dict] = []

    def evaluate() -> None:
        started = time.perf_counter()
        model.cls.eval()
        loss = validation_mlm_loss(model, val, device)
        model.cls.train()
        history.append(
            {"step": meter.steps, "tokens": meter.tokens, "time_s": meter.time_s, "val_mlm_loss": loss}
        )
        if config.progress:
            print(f"[teacher head] step {meter.steps}: validation MLM loss {loss:.4f}", flush=True)
        meter.time_excluded_s += time.perf_counter() - started

    unigram_loss = validation_mlm_loss(model, val, device, bias_only=True)
    evaluate()
    next_eval = 1
    flops_encoder = flops_head = 0.0
    model.cls.train()
    while not meter.exhausted(budget):
        started = time.perf_counter()
        (batch,) = batches.micro_batches(meter.steps)
        input_ids, attention_mask, labels = (
            t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels)
        )
        positions = predicted_positions(labels)
        with torch.no_grad():
            hidden = encode(model.bert, input_ids, attention_mask)
        if len(positions):
            lr = learning_rate(config.lr, meter.fraction(budget), config.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            logits = sparse_mlm_logits(model, hidden, positions)
            loss = mlm_loss(logits, labels.reshape(-1).index_select(0, positions))
            if not math.isfinite(loss.item()):
                raise BudgetKDError(f"teacher head: non-finite MLM loss at step {meter.steps}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        step_encoder = flops.encoder_forward(shape, data.seq_len, config.batch_size)
        step_head = flops.training_flops(flops.mlm_head_forward(shape, len(positions)))
        flops_encoder += step_encoder
        flops_head += step_head
        meter.flops_teacher += step_encoder
        meter.flops_student += step_head
        meter.steps += 1
        meter.sequences += config.batch_size
        meter.tokens += batch.num_tokens
        meter.time_s += time.perf_counter() - started
        fraction = meter.fraction(budget)
        while next_eval < config.num_evals and fraction >= next_eval / config.num_evals:
            next_eval += 1
            evaluate()
    evaluate()

    model.to("cpu")
    if _fingerprint(model.bert) != encoder_before:
        raise BudgetKDError("teacher head: the encoder's weights changed while fitting the head (a bug)")
    export_student(model, tokenizer, out_dir / "model")
    summary = {
        "kind": "fitted_mlm_head",
        "source": str(teacher),
        "model": str(out_dir / "model"),
        "finished": True,
        "charged_to_students": False,
        "budget": budget.to_dict(),
        "config": {k: getattr(config, k) for k in (*HEAD_DEFAULTS, "seed")},
        "consumed": {
            "time_s": meter.time_s,
            "time_excluded_s": meter.time_excluded_s,
            "flops": flops_encoder + flops_head,
            "flops_encoder": flops_encoder,
            "flops_head": flops_head,
            "tokens": meter.tokens,
            "sequences": meter.sequences,
            "steps": meter.steps,
            "epochs": meter.epochs,
        },
        "trainable_parameters": sum(p.numel() for p in params),
        "encoder_fingerprint": encoder_before,
        "unigram_val_mlm_loss": unigram_loss,
        "initial_val_mlm_loss": history[0]["val_mlm_loss"],
        "val_mlm_loss": history[-1]["val_mlm_loss"],
        "history": history,
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
