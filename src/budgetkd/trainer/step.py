"""What trains and one optimizer step of it (SPEC §3, §5).

:class:`TrainModule` is the student plus the strategy's parameters; :class:`TeacherRunner` the
frozen teacher. :func:`accumulate_gradients` runs a step's micro-batches (teacher forward, student
forward, loss, backward), :func:`apply_update` clips, checks and steps the optimizer, and
:func:`run_and_undo` is the uncharged warm-up: one such step, then undone.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable

import torch
from torch import nn

from budgetkd import distributed as dist_utils
from budgetkd.models import Capture, Depth, encode, predicted_positions, sparse_mlm_logits
from budgetkd.strategies import StepInputs, Strategy


class TrainModule(nn.Module):
    """What trains: the student plus the strategy's own parameters (projections). DDP wraps this."""

    def __init__(self, student: nn.Module, strategy: Strategy):
        super().__init__()
        self.student = student
        self.strategy = strategy
        self.capture = Capture(student.bert, strategy.student_spec())
        # the forward stops at the deepest tensor the loss reads (issue 13 item 5); a plain
        # callable, not a submodule, so state-dict names and DDP's parameters stay the student's
        self.depth: Depth = strategy.student_depth()
        self.encode = _encoder(student.bert, self.depth)

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        teacher_out: dict,
        teacher_logits,
        positions: torch.Tensor | None = None,
        padded: bool = True,
    ):
        """The strategy's loss and its components. ``positions``: the flat predicted positions
        (from the data loader; computed here when None — a ``nonzero()``, a host sync on a GPU);
        ``padded=False``: the batch has no padding and the encoder runs without a mask (the
        losses still get ``attention_mask``)."""
        self.capture.clear()
        hidden = self.encode(input_ids, attention_mask if padded else None)
        student_logits, targets = None, labels.new_empty(0)
        if self.strategy.needs_student_logits:  # TinyBERT and MiniLM read no logits: no positions
            if positions is None:
                positions = predicted_positions(labels)
            student_logits = sparse_mlm_logits(self.student, hidden, positions)
            targets = labels.reshape(-1).index_select(0, positions)
        inputs = StepInputs(
            attention_mask=attention_mask,
            labels=targets,
            student=self.capture.values,
            teacher=teacher_out,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
        )
        loss, parts = self.strategy.loss(inputs)
        self.capture.clear()
        return loss, parts


def _encoder(encoder: nn.Module, depth: Depth):
    """``encode`` bound to one encoder and depth (the forward's first part)."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return encode(encoder, input_ids, attention_mask, depth)

    return run


class TeacherRunner:
    """Runs the frozen teacher in eval mode under ``torch.inference_mode`` (bf16 on CUDA) and
    returns the captured internals (and sparse logits) as ordinary tensors."""

    def __init__(self, teacher, strategy: Strategy, device: torch.device, bf16: bool | None = None):
        self.teacher = teacher
        self.strategy = strategy
        self.device = device
        # bf16 on CUDA (the training precision); ``bf16=False`` keeps fp32 (benchmarks/gpu_check.py
        # compares the CPU and the GPU in fp32)
        self.bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
        if self.bf16:
            # The forward runs under bf16 autocast, which re-casts every fp32 weight at every call
            # (its cast cache keeps only tensors that require grad). Casting the Linear layers once
            # gives bitwise the same outputs (autocast casts them to exactly these values) without
            # the per-forward casts, at half their memory. The decoder tied to the word embeddings
            # stays fp32 (casting it would cast the embedding table too), as do LayerNorm and the
            # embeddings, which autocast keeps in fp32.
            tied = teacher.encoder.get_input_embeddings().weight
            for module in teacher.model.modules():
                if isinstance(module, nn.Linear) and module.weight is not tied:
                    module.to(torch.bfloat16)
        self.capture = Capture(teacher.encoder, strategy.teacher_spec())
        self.depth: Depth = strategy.teacher_depth()
        self.encode = _encoder(teacher.encoder, self.depth)

    def __call__(
        self, input_ids, attention_mask, labels, positions: torch.Tensor | None = None, padded: bool = True
    ) -> tuple[dict, torch.Tensor | None]:
        if positions is None and self.strategy.needs_teacher_logits:
            positions = predicted_positions(labels)
        precision = training_precision(self.device) if self.bf16 else contextlib.nullcontext()
        with torch.inference_mode(), precision:
            values, logits = self.forward(input_ids, attention_mask if padded else None, positions)
        # Inference tensors cannot be saved for the student's backward; a clone outside
        # inference mode is an ordinary tensor (and stays detached from any graph).
        values = {key: value.clone() for key, value in values.items()}
        return values, (dynamic_count(logits.clone()) if logits is not None else None)

    def forward(self, input_ids, attention_mask, positions) -> tuple[dict, torch.Tensor | None]:
        """The captured internals and the sparse logits at ``positions`` (when the strategy reads
        them): the unit ``compile`` compiles (``setup.compile_micro_step``)."""
        self.capture.clear()
        hidden = self.encode(input_ids, attention_mask)
        logits = None
        if self.strategy.needs_teacher_logits:
            logits = sparse_mlm_logits(self.teacher.model, hidden, positions)
        values = dict(self.capture.values)
        self.capture.clear()
        return values, logits


def dynamic_count(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Mark dimension 0 (the number of predicted positions P) dynamic for ``torch.compile``: one
    graph for every P rather than a recompilation per distinct count. A no-op until something
    compiled (``torch.compile`` imports ``torch._dynamo``), so eager runs never import it."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None and tensor is not None and tensor.dim() > 0:
        dynamo.maybe_mark_dynamic(tensor, 0)
    return tensor


def training_precision(device: torch.device):
    """The training precision: bf16 autocast on CUDA, fp32 elsewhere (SPEC §5)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _global_counts(micro_batches: list, device: torch.device) -> tuple[float, float]:
    """(predicted tokens, tokens) of the *global* batch, summed over every rank's micro-batches
    (host counts from the data loader: no device read)."""
    counts = torch.tensor(
        [sum(m.num_predicted for m in micro_batches), sum(m.num_tokens for m in micro_batches)],
        dtype=torch.float64,
    )
    counts = dist_utils.all_reduce_sum(counts, device)
    return float(counts[0]), float(counts[1])


def _read_over_ranks(
    total: torch.Tensor, parts: dict[str, torch.Tensor], device: torch.device
) -> tuple[float, dict]:
    """Each rank holds its share of the global mean; the sum over ranks is the global value, for
    the total and for every component alike (issue 13 item 7). One device read per step: the
    values stay on the device (float64) until here."""
    names = sorted(parts)
    totals = torch.stack([total, *(parts[k] for k in names)])
    values = dist_utils.all_reduce_sum(totals, device).tolist()
    return values[0], dict(zip(names, values[1:]))


class _TeacherTimer:
    """Seconds the teacher's forwards took: CUDA events on a GPU (read once, after the step's loss
    is read, so nothing waits for them), the host clock elsewhere."""

    def __init__(self, device: torch.device, clock: Callable[[], float]):
        self.cuda = device.type == "cuda"
        self.clock = clock
        self.seconds = 0.0
        self.events: list = []

    @contextlib.contextmanager
    def timing(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = self.clock()
            yield
            self.seconds += self.clock() - t0

    def total(self) -> float:
        for start, end in self.events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self.events.clear()
        return self.seconds


def accumulate_gradients(
    model: nn.Module,
    micro_batches: list,
    *,
    device: torch.device,
    world_size: int,
    teacher_runner: TeacherRunner | None,
    normalizer: str,
    autocast: Callable[[], contextlib.AbstractContextManager],
    clock: Callable[[], float],
) -> tuple[float, dict, float, float]:
    """Forward and backward over one step's micro-batches. Returns (loss, components, teacher
    seconds, global predicted count).

    Each micro-batch's loss is weighted by its share of the *global* batch (predicted tokens, or
    tokens, per ``normalizer``), so the gradient does not depend on how the batch is cut into
    micro-batches or processes (exact for mean-over-predicted-token losses).

    No host sync inside a micro-step: counts and predicted positions come from the data loader,
    the losses are summed on the device (float64, as the host sum was) and read once at the end,
    the teacher is timed with CUDA events, and a batch without padding runs without a mask."""
    global_predicted, global_tokens = _global_counts(micro_batches, device)
    timer = _TeacherTimer(device, clock)
    total_loss: torch.Tensor | None = None
    parts_sum: dict[str, torch.Tensor] = {}
    for index, micro in enumerate(micro_batches):
        input_ids = micro.input_ids.to(device, non_blocking=True)
        attention_mask = micro.attention_mask.to(device, non_blocking=True)
        labels = micro.labels.to(device, non_blocking=True)
        positions = micro.positions.to(device, non_blocking=True) if micro.positions is not None else None
        dynamic_count(positions)
        padded = micro.padded
        teacher_out, teacher_logits = {}, None
        if teacher_runner is not None:
            with timer.timing():
                teacher_out, teacher_logits = teacher_runner(
                    input_ids, attention_mask, labels, positions, padded
                )
        share = (
            micro.num_predicted / max(1.0, global_predicted)
            if normalizer == "predicted"
            else micro.num_tokens / max(1.0, global_tokens)
        )
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else dist_utils.no_sync(model):
            with autocast():
                loss, parts = model(
                    input_ids, attention_mask, labels, teacher_out, teacher_logits, positions, padded
                )
            # DDP averages gradients over ranks; × world size turns that into the global sum.
            (loss * share * world_size).backward()
        weighted = loss.detach().double() * share
        total_loss = weighted if total_loss is None else total_loss + weighted
        for key, value in parts.items():
            value = torch.as_tensor(value, device=weighted.device).detach().double() * share
            parts_sum[key] = parts_sum[key] + value if key in parts_sum else value
    if total_loss is None:
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
    loss_value, parts_values = _read_over_ranks(total_loss, parts_sum, device)
    return loss_value, parts_values, timer.total(), global_predicted


def grad_norm(module: nn.Module) -> torch.Tensor:
    """‖g‖₂ over every parameter's gradient (0 when there is none), one fused (foreach) norm."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads, foreach=grads[0].device.type == "cuda")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def apply_update(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    loss: float,
    max_grad_norm: float,
) -> bool:
    """Clip (if ``max_grad_norm`` > 0), check the gradients, step the optimizer and clear the
    gradients. Returns whether the update was applied (a non-finite loss or gradient never is).
    The gradient norm (fused over every parameter) is the step's one read of the gradients."""
    finite = math.isfinite(loss)
    if finite:
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
        else:
            norm = grad_norm(module)
        # a finite loss can still back-propagate to non-finite gradients (an overflow):
        # applying them would put NaN weights into the next checkpoint
        finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return finite


def _copy_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    return {
        param: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in entries.items()}
        for param, entries in optimizer.state.items()
    }


@torch.no_grad()
def _restore_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """State that existed is copied back; state created since is zeroed (AdamW's fresh state is
    step 0 with zero moments: the state a first step would have created)."""
    for param, entries in optimizer.state.items():
        before = saved.get(param)
        for key, value in list(entries.items()):
            if torch.is_tensor(value) and before is not None:
                value.copy_(before[key])
            elif torch.is_tensor(value):
                value.zero_()
            elif before is not None:
                entries[key] = before[key]


def run_and_undo(
    module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, one_step: Callable[[], None]
) -> None:
    """Run ``one_step`` (a training step and its update), then undo it: weights and buffers are
    copied back, optimizer state is restored (:func:`_restore_optimizer_state`), learning rates and
    gradients reset, and the RNG streams are left as they were (``fork_rng``)."""
    weights = {key: value.detach().clone() for key, value in module.state_dict().items()}
    saved_state = _copy_optimizer_state(optimizer)
    lrs = [group["lr"] for group in optimizer.param_groups]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        one_step()
    with torch.no_grad():
        module.load_state_dict(weights)
    _restore_optimizer_state(optimizer, saved_state)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
