"""Several configurations of one task trained together as one stacked model (SPEC §6 recipe).

The configurations of a grid that share a task, a batch size and a seed see the same examples in
the same order (:func:`budgetkd.glue.finetune.epoch_batches` depends only on the seed); they differ
only in the peak learning rate. :func:`fine_tune_stacked` trains K of them at once:

- the K members start from the same weights (``torch.manual_seed(seed)`` then
  ``from_pretrained``, exactly as :func:`~budgetkd.glue.finetune.fine_tune`), held as one flat
  ``[K, N]`` tensor; each parameter is a ``[K, ...]`` view of it;
- one forward and one backward for all members: ``torch.func.vmap`` over
  ``torch.func.functional_call`` of the ordinary ``transformers`` model, batched over the
  parameters only (the batch is shared), so every matrix product becomes one batched product;
  the loss is the sum of the K members' mean losses, so member k's gradient is its own;
- per member, as in the separate recipe: gradient norm clipped to ``max_grad_norm``
  (``g_k ← g_k · min(1, c / (‖g_k‖₂ + 1e-6))``, ``clip_grad_norm_``'s formula), AdamW with
  decoupled weight decay 0.01 except biases and normalisation weights, and its own learning rate
  ``lr_k · f(t)`` with f the linear warm-up (⌈0.06·T⌉ steps) / linear decay schedule; the AdamW
  update (``p ← p·(1 − lr·λ)``; ``m ← β₁m + (1−β₁)g``; ``v ← β₂v + (1−β₂)g²``;
  ``p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)``) is the fused kernel of
  ``torch.optim.AdamW(fused=True)`` on each member's row of the flat tensor: 2K kernels per
  step whatever the model;
- dropout: ``vmap(randomness="different")``, so each member draws its own masks, from the global
  generator seeded with ``seed`` at the start: a stacked group is reproducible run to run. A
  member's masks depend on its position in the group, so the group (its learning rates) is part
  of every member's fingerprint, and stacked and separate runs are different cache entries.

With dropout off, a member equals its separately trained run up to float summation order (batched
versus plain matrix products): tests/test_glue_grid.py checks
every step's loss to 1e-4 (relative) and equal dev predictions.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from budgetkd.glue.finetune import (
    EncodedSplit,
    FineTuneResult,
    PackedClassifier,
    Recipe,
    _autocast,
    batch_maker,
    epoch_batches,
    load_classifier,
    packing_supported,
    parameter_groups,
    schedule_factor,
)
from budgetkd.glue.metrics import compute_metrics
from budgetkd.glue.tasks import GlueTask


class StackedModel:
    """K copies of ``model``'s trainable parameters as views of one ``[K, N]`` tensor, with
    their gradients as views of one ``[K, N]`` gradient tensor (backward accumulates into them
    in place), so clipping and AdamW are whole-tensor operations."""

    def __init__(self, model: torch.nn.Module, k: int, weight_decay: float, packed: bool = False):
        self.model = model
        self.k = k
        # packed batches: the same parameters called through PackedClassifier (names "model.…")
        self.packed = packed
        self.packed_module = PackedClassifier(model) if packed else None
        decay_group, plain_group = parameter_groups(model, weight_decay)
        names = {id(p): n for n, p in model.named_parameters()}
        # Decayed parameters first: member k's decayed ones are then the contiguous row slice
        # flat[k, :decayed] and the rest flat[k, decayed:], one fused AdamW call each.
        named = [(names[id(p)], p) for p in (*decay_group["params"], *plain_group["params"])]
        sizes = [p.numel() for _, p in named]
        total = sum(sizes)
        self.decayed = sum(p.numel() for p in decay_group["params"])
        self.weight_decay = weight_decay
        device, dtype = named[0][1].device, named[0][1].dtype
        self.flat = torch.empty(k, total, device=device, dtype=dtype)
        self.grad = torch.zeros(k, total, device=device, dtype=dtype)
        self.params: dict[str, torch.Tensor] = {}
        offset = 0
        for (name, param), size in zip(named, sizes):
            block = self.flat[:, offset : offset + size]
            block.copy_(param.detach().reshape(1, size).expand(k, size))
            view = block.view(k, *param.shape).detach().requires_grad_(True)
            view.grad = self.grad[:, offset : offset + size].view(k, *param.shape)
            self.params[name] = view
            offset += size
        # Buffers (position ids …) are shared by every member: passed unbatched.
        self.buffers = {n: b for n, b in model.named_buffers()}
        self._grad_ptrs = {n: p.grad.data_ptr() for n, p in self.params.items()}

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        return {n: p[index].detach() for n, p in self.params.items()}

    def check_grads_in_place(self) -> None:
        """Backward must have accumulated into the views of ``self.grad`` (not replaced them)."""
        for name, param in self.params.items():
            if param.grad is None or param.grad.data_ptr() != self._grad_ptrs[name]:
                raise RuntimeError(f"the gradient of {name} was not accumulated in place")

    def forward(self, batch: dict[str, torch.Tensor], randomness: str = "different"):
        """Every member's output for the same ``batch`` (padded, or packed when ``self.packed``):
        ``(loss [K], logits [K, B, C])``."""
        from torch.func import functional_call, vmap

        model, buffers, params = self.model, self.buffers, self.params
        if self.packed:
            model = self.packed_module
            buffers = {f"model.{n}": b for n, b in buffers.items()}
            params = {f"model.{n}": p for n, p in params.items()}

        def one(params, inputs):
            out = functional_call(model, (params, buffers), args=(), kwargs=inputs)
            loss = out.loss if out.loss is not None else out.logits.new_zeros(())
            return loss, out.logits

        with _attention_backend(self.flat.device):
            return vmap(one, in_dims=(0, None), randomness=randomness)(params, batch)


def _attention_backend(device: torch.device):
    """On CPU, scaled-dot-product attention through its math path: the CPU flash kernel has no
    vmap batching rule (vmap would loop over the members), the math path is batched matmuls."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


class StackedAdamW:
    """AdamW over the ``[K, N]`` tensor of a :class:`StackedModel`, one learning rate per member:
    ``torch._fused_adamw_`` (the kernel of ``torch.optim.AdamW(fused=True)``, which the separate
    recipe uses) on member k's two contiguous row slices (decayed, not decayed)."""

    def __init__(self, stacked: StackedModel, betas: tuple[float, float], eps: float):
        self.s = stacked
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.exp_avg = torch.zeros_like(stacked.flat)
        self.exp_avg_sq = torch.zeros_like(stacked.flat)
        # one step counter per slice, as torch.optim keeps one per parameter
        self.state_steps = [
            torch.zeros((), dtype=torch.float32, device=stacked.flat.device) for _ in range(2 * stacked.k)
        ]

    @torch.no_grad()
    def step(self, lrs: list[float]) -> None:
        """One update with member learning rates ``lrs``."""
        s, d = self.s, self.s.decayed
        for member, lr in enumerate(lrs):
            for part, (cut, decay) in enumerate(((slice(0, d), s.weight_decay), (slice(d, None), 0.0))):
                step = self.state_steps[2 * member + part]
                step.add_(1)
                torch._fused_adamw_(
                    [s.flat[member, cut]],
                    [s.grad[member, cut]],
                    [self.exp_avg[member, cut]],
                    [self.exp_avg_sq[member, cut]],
                    [],
                    [step],
                    lr=float(lr),
                    beta1=self.beta1,
                    beta2=self.beta2,
                    weight_decay=decay,
                    eps=self.eps,
                    amsgrad=False,
                    maximize=False,
                )


@torch.no_grad()
def clip_members(stacked: StackedModel, max_norm: float) -> torch.Tensor:
    """Clip each member's gradient to ``max_norm`` (``clip_grad_norm_``'s formula); return the norms."""
    norms = torch.linalg.vector_norm(stacked.grad, dim=1)  # [K]
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
        stacked.grad.mul_(coef.unsqueeze(1))
    return norms


@torch.no_grad()
def predict_stacked(
    stacked: StackedModel,
    split: EncodedSplit,
    task: GlueTask,
    *,
    batch_size,
    device,
    precision,
    max_length=128,
):
    """Every member's predictions in example order (batches sorted by length, as ``predict``)."""
    stacked.model.eval()
    make_batch = batch_maker(split, stacked.packed, max_length)
    order = np.argsort(split.lengths(), kind="stable")
    k = stacked.k
    out = np.zeros((k, len(split)), dtype=np.float64 if task.is_regression else np.int64)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = {kk: v.to(device) for kk, v in make_batch(indices).items() if kk != "labels"}
        with _autocast(device, precision):
            _, logits = stacked.forward(batch, randomness="error")
        logits = logits.float().cpu()
        out[:, indices] = logits[..., 0].numpy() if task.is_regression else logits.argmax(-1).numpy()
    if task.is_regression:
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return [[float(v) for v in row] for row in out]
    return [[int(v) for v in row] for row in out]


def fine_tune_stacked(
    model_dir: str | Path,
    task: GlueTask,
    tokenizer,
    train: EncodedSplit,
    dev: dict[str, EncodedSplit],
    *,
    learning_rates: list[float] | tuple[float, ...],
    batch_size: int,
    seed: int,
    recipe: Recipe,
    device: torch.device,
    precision: str,
    group_by_length: bool = False,
    on_step=None,
    unpad: bool = True,
) -> list[FineTuneResult]:
    """Train the configurations ``learning_rates`` × (``batch_size``, ``seed``) as one stacked
    model; one :class:`FineTuneResult` per learning rate, in order. ``train_seconds`` and
    ``eval_seconds`` are the group's (shared by its members). ``unpad``: packed batches where the
    model supports them, as :func:`~budgetkd.glue.finetune.fine_tune`."""
    k = len(learning_rates)
    torch.manual_seed(seed)
    model = load_classifier(model_dir, task, tokenizer.pad_token_id).to(device)
    packed = unpad and packing_supported(model)
    stacked = StackedModel(model, k, recipe.weight_decay, packed=packed)
    make_batch = batch_maker(train, packed, recipe.max_length)
    optimizer = StackedAdamW(stacked, recipe.adam_betas, recipe.adam_epsilon)
    peaks = [float(lr) for lr in learning_rates]
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    warmup = math.ceil(recipe.warmup_proportion * total_steps)
    generator = torch.Generator().manual_seed(seed)
    lengths = train.lengths()

    started = time.perf_counter()
    model.train()
    step = 0
    step_losses: list[list[float]] = [[] for _ in range(k)]
    epoch_losses: list[list[float | None]] = [[] for _ in range(k)]
    for _epoch in range(recipe.epochs):
        sums = torch.zeros(k, dtype=torch.float64)
        count = 0
        for indices in epoch_batches(len(train), batch_size, generator, lengths, group_by_length):
            batch = {key: v.to(device) for key, v in make_batch(indices).items()}
            stacked.grad.zero_()
            with _autocast(device, precision):
                losses, _ = stacked.forward(batch)
            with warnings.catch_warnings():
                # the views of the flat gradient are strided over the members: fine, and said once
                warnings.filterwarnings("ignore", message=".*gradient layout contract.*")
                losses.float().sum().backward()
            if step == 0:
                stacked.check_grads_in_place()
            clip_members(stacked, recipe.max_grad_norm)
            # the learning rate of this step: LambdaLR's value before its step() call
            factor = schedule_factor(step, warmup, total_steps)
            optimizer.step([lr * factor for lr in peaks])
            step += 1
            values = losses.detach().double().cpu()
            sums += values
            count += 1
            for member in range(k):
                step_losses[member].append(float(values[member]))
            if on_step is not None:
                on_step(step, total_steps)
        for member in range(k):
            mean = float(sums[member]) / count if count else None
            epoch_losses[member].append(mean if mean is not None and math.isfinite(mean) else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    suffixes = {s.name: s.metric_suffix for s in task.dev_splits}
    predictions = {
        name: predict_stacked(
            stacked,
            split,
            task,
            batch_size=recipe.eval_batch_size,
            device=device,
            precision=precision,
            max_length=recipe.max_length,
        )
        for name, split in dev.items()
    }
    eval_seconds = time.perf_counter() - started
    results = []
    for member in range(k):
        metrics: dict[str, float] = {}
        labels: dict[str, list] = {}
        member_predictions: dict[str, list] = {}
        for name, split in dev.items():
            labels[name] = split.labels.tolist()
            member_predictions[name] = predictions[name][member]
            metrics.update(compute_metrics(task, labels[name], member_predictions[name], suffixes[name]))
        results.append(
            FineTuneResult(
                metrics=metrics,
                predictions=member_predictions,
                labels=labels,
                train_examples=len(train),
                train_steps=total_steps,
                final_loss=epoch_losses[member][-1] if epoch_losses[member] else None,
                train_seconds=train_seconds,
                eval_seconds=eval_seconds,
                epoch_losses=epoch_losses[member],
                step_losses=step_losses[member],
                unpadded=packed,
            )
        )
    return results
