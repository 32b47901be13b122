"""Fine-tune one configuration (task, learning rate, batch size, seed) and evaluate it (SPEC §6).

The recipe, identical for every model (no per-model cases):

- ``AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=...)`` (problem type
  ``regression`` with one output for STS-B), created right after ``torch.manual_seed(seed)``, so
  the classifier head is seeded; the pretrained weights are the only thing that differs between
  models.
- Inputs: the model's own tokenizer, sentence pairs truncated ``longest_first`` to 128 tokens,
  padded per batch to the longest sequence (the equivalent of ``DataCollatorWithPadding``) or,
  by default, the same batch *unpadded*: its examples packed into rows of ≤ 128 tokens with
  attention blocked per example (:class:`PackedClassifier`; same logits, loss and gradients up to
  float summation order, dropout included: the hidden states' masks are drawn in the padded
  batch's shape and gathered, and attention with dropout runs in the padded layout,
  :mod:`budgetkd.glue.packed_dropout`, except under CUDA's fused attention kernels; BERT
  classifiers, others run padded).
- AdamW (β = (0.9, 0.999), ε = 1e-8, the ``transformers`` defaults), weight decay 0.01 on every
  parameter except biases and normalisation-layer weights; gradient norm clipped to 1.0.
- Learning rate: linear warm-up over the first ⌈0.06·T⌉ steps to the peak, linear decay to 0 at
  step T = epochs · ⌈n_train / batch⌉ (``get_linear_schedule_with_warmup``).
- Training order: a ``torch.Generator`` seeded with ``seed`` shuffles each epoch
  (:func:`epoch_batches`); with ``group_by_length`` (off in the paper recipe) each window of 50
  batches of that shuffle is sorted by length before it is cut into batches (HF's
  ``group_by_length``), so a batch pads little.
- bf16 autocast on CUDA (when supported), fp32 on CPU.
- The configuration's score is the dev score after the last epoch (no early stopping).

This module never writes files; :mod:`budgetkd.glue.pipeline` owns the side effects.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from budgetkd.errors import BudgetKDError
from budgetkd.glue import packed_dropout
from budgetkd.glue.loading import GlueSplit
from budgetkd.glue.metrics import compute_metrics
from budgetkd.glue.tasks import GlueTask

# Bump when the recipe's code changes in a way that changes results: invalidates cached runs.
RECIPE_VERSION = 1
# The packed path's own version, in unpadded runs' fingerprints (padded runs' stay valid): 2 draws
# the dropout masks in the padded layout (packed_dropout), where version 1 drew them packed.
PACKED_VERSION = 2


@dataclass(frozen=True)
class Recipe:
    epochs: int = 5
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_proportion: float = 0.06
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    eval_batch_size: int = 64
    version: int = RECIPE_VERSION

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------------------------
# device, threads, quiet loading


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BudgetKDError("--device cuda requested but no CUDA device is available")
        return torch.device("cuda")
    raise BudgetKDError(f"unknown --device {device!r}; choose auto, cpu or cuda")


def precision_for(device: torch.device) -> str:
    """``bf16`` autocast on CUDA when the GPU supports it, ``fp32`` otherwise (always on CPU)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_threads(requested: int | None = None) -> int:
    """Set ``torch.set_num_threads(requested)`` (capped by the usable CPUs); with None, leave
    PyTorch's default. Never adapted to the machine's load: the thread count changes the order of
    floating-point reductions, and a cached grid must give the same numbers on every re-run."""
    if requested is not None:
        threads = max(1, min(requested, available_cpus()))
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence the per-load report ("newly initialized: classifier.weight ...") and weight-loading
    progress bars, which would repeat for every configuration; restore the settings afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError/...
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BudgetKDError(
            f"cannot load a tokenizer from {model_dir}: {type(exc).__name__}: {reason}"
        ) from None
    if tokenizer.pad_token is None:
        # Generic fallback for tokenizers without a padding token (GPT-style): pad with EOS.
        if tokenizer.eos_token is None:
            raise BudgetKDError(f"the tokenizer of {model_dir} has neither a padding nor an end token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(
    model_dir: str | Path,
    task: GlueTask,
    pad_token_id: int | None = None,
    attn_implementation: str | None = None,
):
    from transformers import AutoModelForSequenceClassification

    kwargs: dict = {"num_labels": task.num_labels, "ignore_mismatched_sizes": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    else:
        kwargs["problem_type"] = "single_label_classification"
        kwargs["id2label"] = dict(enumerate(task.labels))
        kwargs["label2id"] = {name: i for i, name in enumerate(task.labels)}
    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kwargs)
    except Exception as exc:  # noqa: BLE001
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BudgetKDError(
            f"cannot load {model_dir} as a sequence classifier: {type(exc).__name__}: {reason}"
        ) from None
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


# ----------------------------------------------------------------------------------------------
# tokenized data, stored flat (one int32 array per input key + offsets) to stay small for the
# full 400k-example MNLI/QQP


@dataclass
class EncodedSplit:
    name: str
    arrays: dict[str, np.ndarray]  # key -> concatenated values of every example
    offsets: np.ndarray  # example i spans [offsets[i], offsets[i + 1])
    labels: np.ndarray  # int64 class ids or float32 scores
    pad_values: dict[str, int] = field(default_factory=dict)
    padding_side: str = "right"

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def collate(self, indices: list[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Pad the examples at ``indices`` to the longest one; add ``labels``."""
        starts, ends = self.offsets[indices], self.offsets[np.asarray(indices) + 1]
        width = int((ends - starts).max())
        batch: dict[str, torch.Tensor] = {}
        for key, values in self.arrays.items():
            out = np.full((len(starts), width), self.pad_values.get(key, 0), dtype=np.int64)
            for row, (s, e) in enumerate(zip(starts, ends)):
                if self.padding_side == "left":
                    out[row, width - (e - s) :] = values[s:e]
                else:
                    out[row, : e - s] = values[s:e]
            batch[key] = torch.from_numpy(out)
        batch["labels"] = torch.from_numpy(self.labels[indices])
        return batch

    def pack(self, indices: list[int] | np.ndarray, capacity: int) -> dict[str, torch.Tensor]:
        """The examples at ``indices`` packed into rows of at most ``capacity`` tokens (first fit,
        longest first), for :class:`PackedClassifier`: the same batch as :meth:`collate`, without
        its padding.

        Keys: every input array (``input_ids``, ``token_type_ids`` … per token, as the example has
        them; the rows' tails hold the pad values), ``position_ids`` (0, 1, … restarting at each
        example), ``segments`` ([R, W]: the batch position of the example a token belongs to, −1
        on a row's tail), ``cls_index`` ([B]: example b's first token in the flattened [R·W]
        rows, in the order of ``indices``) and ``labels``. The attention mask is built from
        ``segments`` on the device (:func:`block_diagonal_mask`)."""
        indices = np.asarray(indices)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        lengths = ends - starts
        capacity = max(int(capacity), int(lengths.max()))
        fills: list[int] = []
        row_of = np.empty(len(indices), dtype=np.int64)
        column_of = np.empty(len(indices), dtype=np.int64)
        for example in np.argsort(-lengths, kind="stable"):
            need = int(lengths[example])
            row = next((r for r, fill in enumerate(fills) if fill + need <= capacity), len(fills))
            if row == len(fills):
                fills.append(0)
            row_of[example], column_of[example] = row, fills[row]
            fills[row] += need
        rows, width = len(fills), max(fills)
        # flat destination of every token: row · W + column + position within the example
        token_positions = np.concatenate([np.arange(n) for n in lengths])
        example_of_token = np.repeat(np.arange(len(indices)), lengths)
        destination = (row_of * width + column_of)[example_of_token] + token_positions
        source = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
        batch: dict[str, torch.Tensor] = {}
        for key, values in self.arrays.items():
            if key == "attention_mask":
                continue
            out = np.full(rows * width, self.pad_values.get(key, 0), dtype=np.int64)
            out[destination] = values[source]
            batch[key] = torch.from_numpy(out.reshape(rows, width))
        positions = np.zeros(rows * width, dtype=np.int64)
        positions[destination] = token_positions
        segments = np.full(rows * width, -1, dtype=np.int64)
        segments[destination] = example_of_token
        batch["position_ids"] = torch.from_numpy(positions.reshape(rows, width))
        batch["segments"] = torch.from_numpy(segments.reshape(rows, width))
        batch["cls_index"] = torch.from_numpy(row_of * width + column_of)
        batch["labels"] = torch.from_numpy(self.labels[indices])
        return batch


def encode_split(
    tokenizer, split: GlueSplit, task: GlueTask, max_length: int, chunk: int = 8192
) -> EncodedSplit:
    """Tokenize a split once (shared by every configuration and seed of the task)."""
    pieces: dict[str, list[np.ndarray]] = {}
    lengths: list[np.ndarray] = []
    for start in range(0, len(split), chunk):
        texts = [column[start : start + chunk] for column in split.texts]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        keys = [k for k in encoded.keys() if k != "attention_mask"] + ["attention_mask"]
        for key in keys:
            rows = encoded[key]
            pieces.setdefault(key, []).append(np.fromiter((t for r in rows for t in r), dtype=np.int32))
        lengths.append(np.fromiter((len(r) for r in encoded["input_ids"]), dtype=np.int64))
    all_lengths = np.concatenate(lengths)
    offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    pad_values = {
        "input_ids": int(tokenizer.pad_token_id),
        "token_type_ids": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        "attention_mask": 0,
        "special_tokens_mask": 1,
    }
    label_dtype = np.float32 if task.is_regression else np.int64
    return EncodedSplit(
        name=split.name,
        arrays={k: np.concatenate(v) for k, v in pieces.items()},
        offsets=offsets,
        labels=np.asarray(split.labels, dtype=label_dtype),
        pad_values=pad_values,
        padding_side=getattr(tokenizer, "padding_side", "right") or "right",
    )


# ----------------------------------------------------------------------------------------------
# unpadded (packed) batches


def packing_supported(model: torch.nn.Module) -> bool:
    """Whether :class:`PackedClassifier` computes ``model``'s own function: a BERT sequence
    classifier (``BertForSequenceClassification``: absolute position embeddings, [CLS] pooler,
    dropout, linear head) with SDPA or eager attention, single-label or regression. Other models
    train padded."""
    config = getattr(model, "config", None)
    return (
        type(model).__name__ == "BertForSequenceClassification"
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and getattr(config, "problem_type", None) in ("regression", "single_label_classification")
    )


def packing_applies(model_dir: str | Path) -> bool:
    """Whether the classifier loaded from ``model_dir`` will take the packed path: a BERT
    (``model_type`` "bert" in config.json; see :func:`packing_supported`)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "bert"


def block_diagonal_mask(segments: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The attention mask of packed rows, ``[R, 1, W, W]``: token i may attend to token j of its row
    iff both belong to the same example (``segments`` equal); a row's tail (−1) attends to itself
    only, so no softmax row is empty. Boolean (True = attend) for SDPA, additive (0 / dtype min)
    for eager attention (:func:`packed_dropout.attention_mask`)."""
    allowed = (segments.unsqueeze(-1) == segments.unsqueeze(-2)).unsqueeze(1)
    return packed_dropout.attention_mask(allowed, attn_implementation, dtype)


def sequence_classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``BertForSequenceClassification``'s loss, verbatim: MSE of the squeezed scores (regression),
    else cross-entropy; both the mean over the batch's examples."""
    if config.problem_type == "regression":
        return torch.nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
    return torch.nn.functional.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))


class PackedClassifier(torch.nn.Module):
    """A BERT sequence classifier applied to a batch packed by :meth:`EncodedSplit.pack`: the same
    function of each example as the padded batch, without computing the padding.

    The encoder runs on the packed rows with :func:`block_diagonal_mask` (attention never crosses
    an example), positions restarting at each example and each token's own token type, so every
    real token's hidden state is the one it has in the padded batch (a padded example's pad tokens
    are masked keys there: they change nothing either). The pooler, dropout and head read each
    example's own [CLS] (``cls_index``), in batch order, so logits are ``[B, C]`` as padded, and
    the loss is the model's own (:func:`sequence_classification_loss`, mean over examples).
    In training, every dropout mask is the padded batch's: the hidden states' drawn in its shape
    and gathered, attention run in its layout (:mod:`budgetkd.glue.packed_dropout`), wherever the
    padded model's masks are reproducible (CPU; eager attention): the packed run is then the
    padded run, dropout included."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, segments, cls_index, token_type_ids=None, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        model = self.model
        base = model.bert
        mask = block_diagonal_mask(
            segments, model.config._attn_implementation, base.embeddings.word_embeddings.weight.dtype
        )
        masks = contextlib.nullcontext()
        if model.training and packed_dropout.applies(model, input_ids.device):
            layout = packed_dropout.PaddedLayout.of_packed(segments, position_ids, cls_index)
            masks = packed_dropout.padded_layout_dropout(model, layout)
        with masks:
            hidden = base(
                input_ids=input_ids,
                attention_mask=mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                return_dict=True,
            ).last_hidden_state
        first = hidden.flatten(0, 1).index_select(0, cls_index)  # [B, D], example order
        logits = model.classifier(model.dropout(base.pooler(first.unsqueeze(1))))
        loss = None if labels is None else sequence_classification_loss(model.config, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def batch_maker(split: EncodedSplit, packed: bool, max_length: int):
    """``indices -> batch``: :meth:`EncodedSplit.pack` (rows of ``max_length`` tokens) or
    :meth:`EncodedSplit.collate`."""
    if packed:
        return lambda indices: split.pack(indices, max_length)
    return split.collate


# ----------------------------------------------------------------------------------------------
# training and evaluation


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay everything except biases and the weights of normalisation layers."""
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        kind = type(module).__name__.lower()
        is_norm = isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm) or "norm" in kind
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if is_norm or name == "bias" or name.endswith("_bias"):
                no_decay.add(full)
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, recipe: Recipe, learning_rate: float) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; the fused kernel where this torch has it (the same update,
    several times faster on CPU than the per-parameter loop that is the CPU default)."""
    groups = parameter_groups(model, recipe.weight_decay)
    kwargs = {"lr": learning_rate, "betas": recipe.adam_betas, "eps": recipe.adam_epsilon}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


@dataclass
class FineTuneResult:
    metrics: dict[str, float]  # over every present dev split, suffixed names
    predictions: dict[str, list]  # dev split name -> prediction per example (class id or score)
    labels: dict[str, list]  # dev split name -> gold label per example
    train_examples: int
    train_steps: int
    final_loss: float | None  # mean training loss of the last epoch
    train_seconds: float
    eval_seconds: float
    epoch_losses: list[float | None] = field(default_factory=list)  # mean training loss per epoch
    step_losses: list[float] = field(default_factory=list)  # every step's loss (not stored)
    unpadded: bool = False  # trained and evaluated on packed batches (PackedClassifier)


# Window of HF's LengthGroupedSampler: sort 50 batches' worth of the shuffle at a time.
LENGTH_GROUP_BATCHES = 50


def epoch_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    lengths: np.ndarray | None = None,
    group_by_length: bool = False,
) -> list[np.ndarray]:
    """One epoch's batches of example indices: a permutation drawn from ``generator``, cut into
    consecutive batches of ``batch_size`` (the last one shorter). With ``group_by_length`` each
    window of ``LENGTH_GROUP_BATCHES · batch_size`` examples of the permutation is first sorted by
    decreasing length (stable), as HF's ``LengthGroupedSampler`` does."""
    permutation = torch.randperm(n, generator=generator).numpy()
    if group_by_length:
        if lengths is None:
            raise ValueError("group_by_length needs the example lengths")
        window = LENGTH_GROUP_BATCHES * batch_size
        pieces = []
        for start in range(0, n, window):
            chunk = permutation[start : start + window]
            pieces.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
        permutation = np.concatenate(pieces)
    return [permutation[start : start + batch_size] for start in range(0, n, batch_size)]


def schedule_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based), exactly
    ``get_linear_schedule_with_warmup``'s: ``step / W`` during warm-up, then ``(T - step) / (T - W)``
    down to 0 (SPEC §6: W = ⌈0.06·T⌉)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(
    model,
    split: EncodedSplit,
    task: GlueTask,
    *,
    batch_size: int,
    device,
    precision: str,
    packed: bool = False,
    max_length: int = 128,
) -> list:
    """Predictions in example order; batches sorted by length to waste little on padding.
    ``packed``: ``model`` is a :class:`PackedClassifier` and the batches are packed."""
    model.eval()
    order = np.argsort(split.lengths(), kind="stable")
    out = np.zeros(len(split), dtype=np.float64 if task.is_regression else np.int64)
    make_batch = batch_maker(split, packed, max_length)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in make_batch(indices).items() if k != "labels"}
        with _autocast(device, precision):
            logits = model(**batch).logits
        logits = logits.float().cpu()
        out[indices] = logits[:, 0].numpy() if task.is_regression else logits.argmax(-1).numpy()
    if task.is_regression:
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return [float(v) for v in out]
    return [int(v) for v in out]


def fine_tune(
    model_dir: str | Path,
    task: GlueTask,
    tokenizer,
    train: EncodedSplit,
    dev: dict[str, EncodedSplit],
    *,
    learning_rate: float,
    batch_size: int,
    seed: int,
    recipe: Recipe,
    device: torch.device,
    precision: str,
    progress: bool = True,
    description: str = "",
    group_by_length: bool = False,
    on_step=None,
    unpad: bool = True,
) -> FineTuneResult:
    """Train one configuration for ``recipe.epochs`` epochs and evaluate on every dev split.

    ``unpad``: train and evaluate on packed batches (:class:`PackedClassifier`; the same batches,
    order, loss and steps as padded) where the model supports it (:func:`packing_supported`),
    padded otherwise; ``result.unpadded`` says which ran.
    ``on_step(done, total)`` is called after every optimizer step (progress reporting)."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    model = load_classifier(model_dir, task, tokenizer.pad_token_id).to(device)
    packed = unpad and packing_supported(model)
    net = PackedClassifier(model) if packed else model
    make_batch = batch_maker(train, packed, recipe.max_length)
    optimizer = make_optimizer(model, recipe, learning_rate)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(recipe.warmup_proportion * total_steps), total_steps
    )
    generator = torch.Generator().manual_seed(seed)

    started = time.perf_counter()
    model.train()
    final_loss: float | None = None
    epoch_losses: list[float | None] = []
    step_losses: list[float] = []
    lengths = train.lengths()
    with tqdm(total=total_steps, desc=description, unit="step", leave=False, disable=not progress) as bar:
        for _epoch in range(recipe.epochs):
            loss_sum, loss_count = 0.0, 0
            for indices in epoch_batches(len(train), batch_size, generator, lengths, group_by_length):
                batch = {k: v.to(device) for k, v in make_batch(indices).items()}
                with _autocast(device, precision):
                    loss = net(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(float(loss.detach()))
                loss_sum += step_losses[-1]
                loss_count += 1
                bar.update(1)
                if on_step is not None:
                    on_step(len(step_losses), total_steps)
                if loss_count % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}")
            final_loss = loss_sum / loss_count if loss_count else None
            epoch_losses.append(final_loss if final_loss is None or math.isfinite(final_loss) else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    metrics: dict[str, float] = {}
    predictions: dict[str, list] = {}
    labels: dict[str, list] = {}
    suffixes = {s.name: s.metric_suffix for s in task.dev_splits}
    for name, split in dev.items():
        predictions[name] = predict(
            net,
            split,
            task,
            batch_size=recipe.eval_batch_size,
            device=device,
            precision=precision,
            packed=packed,
            max_length=recipe.max_length,
        )
        labels[name] = split.labels.tolist()
        metrics.update(compute_metrics(task, labels[name], predictions[name], suffixes[name]))
    eval_seconds = time.perf_counter() - started
    if final_loss is not None and not math.isfinite(final_loss):
        final_loss = None
    del model, net, optimizer
    return FineTuneResult(
        unpadded=packed,
        metrics=metrics,
        predictions=predictions,
        labels=labels,
        train_examples=len(train),
        train_steps=total_steps,
        final_loss=final_loss,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        epoch_losses=epoch_losses,
        step_losses=step_losses,
    )
