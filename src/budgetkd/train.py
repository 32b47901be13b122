"""One pretraining loop for every strategy, single- or multi-process (SPEC §2, §3, §5).

Read it top to bottom: :func:`pretrain` sets up (data, student, teacher, strategy, optimizer,
meter), then loops — fetch the step's micro-batches, teacher forward, student forward, loss,
backward, optimizer step, charge the budget — and finally exports the student and writes
``summary.json``. Everything strategy-specific is behind ``Strategy.loss``.

Run directory::

    RUN_DIR/run_config.json  the resolved run configuration (what produced this run)
    RUN_DIR/checkpoint.pt    student, projections, optimizer, meter, RNG, history (atomic)
    RUN_DIR/model/           the student, ``save_pretrained`` + tokenizer (plain transformers)
    RUN_DIR/summary.json     strategy, budget, consumption in every currency, val losses
    RUN_DIR/tb/              TensorBoard events
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from budgetkd import distributed as dist_utils
from budgetkd import flops
from budgetkd.budget import Budget, Meter, learning_rate
from budgetkd.data import MaskingConfig, PackedData, StepBatches, validation_batches
from budgetkd.data.dataset import resolve_micro_batch
from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_torch_save, atomic_write_json, locked, read_json, sha256_json
from budgetkd.models import (
    Capture,
    Depth,
    check_vocabulary,
    create_student,
    encode,
    export_student,
    load_teacher,
    predicted_positions,
    resolve_architecture,
    set_dropout,
    sparse_mlm_logits,
    weights_fingerprint,
)
from budgetkd.strategies import StepInputs, Strategy, get_strategy
from budgetkd.sweep import check_decay_fraction, wsd_learning_rate

SUMMARY_VERSION = 1


@dataclass
class TrainConfig:
    """Everything that determines a pretraining run. Saved as ``RUN_DIR/run_config.json``."""

    data: str
    out: str
    student: Any = "bert-tiny"
    strategy: str = "none"
    teacher: str | None = None
    budget: str = "300steps"
    batch_size: int = 1024
    micro_batch_size: int | None = None
    lr: float | None = None  # None → the strategy's paper default (1e-3 No-KD, 5e-4 KD)
    warmup: float = 0.06
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    max_grad_norm: float = 0.0  # 0 = no clipping (the paper's recipe does not clip)
    seed: int = 0  # initial weights and dropout
    data_seed: int | None = None  # data order; None → seed
    mask_seed: int | None = None  # masks; None → seed
    dropout: float | None = None  # None → BERT's 0.1
    strategy_options: dict = field(default_factory=dict)
    max_epochs: float | None = None  # data limit: stop before the step that would cross it
    fixed_mask_count: bool = False
    num_evals: int = 10  # validation at budget fractions 1/n, 2/n, …, 1
    eval_sequences: int = 512
    eval_batch_size: int = 64
    checkpoint_interval_s: float = 600.0
    checkpoint_every_steps: int = 0
    on_nonfinite: str = "stop"  # "stop" | "skip"
    device: str = "auto"
    compile: bool = False
    log_every: int = 10
    progress: bool = True
    # Sweeps (SPEC §7a). schedule "wsd": warm-up over ``schedule_warmup`` (an amount of the
    # budget's currency), constant, then linear decay over the last ``decay_fraction`` of
    # ``schedule_point`` (None → the budget). ``snapshots``: amounts at which a copy of the state
    # is kept in RUN_DIR/snapshots/ for branches; ``init_from``: a snapshot this run continues.
    schedule: str = "linear"
    schedule_point: float | None = None
    schedule_warmup: float | None = None
    decay_fraction: float = 0.2
    snapshots: list = field(default_factory=list)
    init_from: str | None = None
    charge_teacher: bool = True  # False: teacher_cost free (SPEC §7a), its forward passes uncharged

    # Fields that may change between a run and its resumption.
    RESUMABLE_CHANGES = ("progress", "device", "log_every", "checkpoint_interval_s", "checkpoint_every_steps")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise BudgetKDError(f"unknown pretraining option {sorted(unknown)[0]!r}")
        values = dict(values)
        if "adam_betas" in values:
            values["adam_betas"] = tuple(values["adam_betas"])
        return cls(**values)

    def resolved(self) -> dict:
        out = asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    def identity(self) -> dict:
        """What determines the run's result: everything but the fields a resumption may change and
        the locations (a moved run directory or dataset stays the same run; the data's content
        fingerprint stands in for its path)."""
        skip = set(self.RESUMABLE_CHANGES) | {"out", "data"}
        return {k: v for k, v in self.resolved().items() if k not in skip}


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse out-of-range options before anything is built: each check is one option's range
    (the budget and strategy names are parsed before this; the WSD schedule is checked against
    the budget after it, in ``Pretrainer.setup``)."""
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise BudgetKDError(f"on_nonfinite must be 'stop' or 'skip', got {cfg.on_nonfinite!r}")
    for name in ("batch_size", "num_evals", "eval_batch_size"):
        if getattr(cfg, name) <= 0:
            raise BudgetKDError(f"{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size <= 0:
        raise BudgetKDError(f"micro-batch-size must be positive, got {cfg.micro_batch_size}")
    if cfg.micro_batch_size is not None and cfg.micro_batch_size > cfg.batch_size:
        raise BudgetKDError(
            f"micro-batch size {cfg.micro_batch_size} is larger than the batch size {cfg.batch_size}"
        )
    if cfg.max_epochs is not None and cfg.max_epochs <= 0:
        raise BudgetKDError(f"max_epochs must be positive, got {cfg.max_epochs}")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise BudgetKDError(f"dropout must lie in [0, 1), got {cfg.dropout}")
    for name in ("seed", "data_seed", "mask_seed"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise BudgetKDError(f"{name.replace('_', '-')} must be a non-negative integer, got {value!r}")
    if not 0 <= cfg.warmup < 1:
        raise BudgetKDError(f"warmup must lie in [0, 1), got {cfg.warmup}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise BudgetKDError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.schedule not in ("linear", "wsd"):
        raise BudgetKDError(f"schedule must be linear or wsd, got {cfg.schedule!r}")
    if cfg.schedule == "linear" and (cfg.snapshots or cfg.init_from):
        raise BudgetKDError("snapshots and branches need schedule: wsd")


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

    def forward(self, input_ids, attention_mask, labels, teacher_out: dict, teacher_logits):
        self.capture.clear()
        hidden = self.encode(input_ids, attention_mask)
        positions = predicted_positions(labels)
        student_logits = (
            sparse_mlm_logits(self.student, hidden, positions) if self.strategy.needs_student_logits else None
        )
        inputs = StepInputs(
            attention_mask=attention_mask,
            labels=labels.reshape(-1).index_select(0, positions),
            student=self.capture.values,
            teacher=teacher_out,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
        )
        loss, parts = self.strategy.loss(inputs)
        self.capture.clear()
        return loss, parts


def _encoder(encoder: nn.Module, depth: Depth):
    """``encode`` bound to one encoder and depth: the unit that ``compile: true`` compiles."""

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode(encoder, input_ids, attention_mask, depth)

    return run


class TeacherRunner:
    """Runs the frozen teacher in eval mode under ``torch.inference_mode`` (bf16 on CUDA) and
    returns the captured internals (and sparse logits) as ordinary tensors."""

    def __init__(self, teacher, strategy: Strategy, device: torch.device):
        self.teacher = teacher
        self.strategy = strategy
        self.device = device
        if device.type == "cuda":
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

    def __call__(self, input_ids, attention_mask, labels) -> tuple[dict, torch.Tensor | None]:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.capture.clear()
        with torch.inference_mode(), autocast:
            hidden = self.encode(input_ids, attention_mask)
            logits = None
            if self.strategy.needs_teacher_logits:
                logits = sparse_mlm_logits(self.teacher.model, hidden, predicted_positions(labels))
        # Inference tensors cannot be saved for the student's backward; a clone outside
        # inference mode is an ordinary tensor (and stays detached from any graph).
        values = {key: value.clone() for key, value in self.capture.values.items()}
        self.capture.clear()
        return values, (logits.clone() if logits is not None else None)


def step_flops(
    strategy: Strategy,
    student_shape: flops.EncoderShape,
    teacher_shape: flops.EncoderShape | None,
    seq_len: int,
    num_sequences: int,
    num_predicted: int,
) -> tuple[float, float]:
    """(student, teacher) FLOPs of one step (SPEC §3), counting only what runs.

    student = 3 · (encoder to its depth + MLM head at P positions if its logits are used + the
    loss's own products); teacher = encoder to its depth + its MLM head if its logits are used +
    the loss's teacher-side products. Depths: ``models.required_depth``; FLOPs: ``flops``.
    """
    depth = strategy.student_depth()
    student_fwd = flops.partial_forward(
        student_shape, seq_len, num_sequences, depth.layers, len(depth.projections)
    )
    if strategy.needs_student_logits:
        student_fwd += flops.mlm_head_forward(student_shape, num_predicted)
    extra_s, extra_t = strategy.extra_forward_flops(num_sequences, seq_len)
    student = flops.training_flops(student_fwd + extra_s)
    teacher = 0.0
    if teacher_shape is not None:
        depth_t = strategy.teacher_depth()
        teacher = (
            flops.partial_forward(
                teacher_shape, seq_len, num_sequences, depth_t.layers, len(depth_t.projections)
            )
            + extra_t
        )
        if strategy.needs_teacher_logits:
            teacher += flops.mlm_head_forward(teacher_shape, num_predicted)
    return student, teacher


def _format_amount(value: float, currency: str) -> str:
    return f"{value:.4g} {currency}"


def dropout_seed(seed: int, rank: int, step: int | None = None) -> int:
    """The seed of one process's dropout stream: a 64-bit hash of (seed, rank[, step]) through
    numpy's ``SeedSequence``, so that every rank draws its own masks (issue 13 item 7) and the
    stream is a function of the run's seed and the rank alone. ``step`` re-derives a stream on a
    resumption with another number of processes (see ``Pretrainer.load_checkpoint``)."""
    import numpy as np

    entropy = [seed, rank] if step is None else [seed, rank, step]
    words = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) >> 1  # < 2⁶³: accepted by torch.manual_seed


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay everything except biases and LayerNorm weights (SPEC §5)."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or param.ndim == 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _select_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_utils.local_rank())
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise BudgetKDError(f"--device {spec}: CUDA is not available on this machine")
    if spec == "cuda":
        return torch.device("cuda", dist_utils.local_rank())
    try:
        return torch.device(spec)
    except RuntimeError:
        raise BudgetKDError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None


# What a run directory may hold before its first checkpoint (a run killed early, or the lock).
_RUN_FILES = {".lock", "run_config.json", "tb", "summary.json", "checkpoint.pt", "model"}


def _is_temporary(name: str) -> bool:
    """What an atomic write or export killed half-way leaves behind (``.checkpoint.pt.k3x9.tmp``,
    ``.summary.json.ab12.tmp``, ``.model.tmp``): never a result, never read, safe to delete."""
    return name.startswith(".") and name.endswith(".tmp")


def _remove_temporaries(run_dir: Path) -> None:
    import shutil

    for path in run_dir.iterdir() if run_dir.is_dir() else []:
        if _is_temporary(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _grad_norm(module: nn.Module) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def _run_state(run_dir: Path) -> str:
    """'new', 'unfinished' (a checkpoint, no summary) or 'finished'."""
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            if read_json(summary).get("finished"):
                return "finished"
        except BudgetKDError:
            pass
    if (run_dir / "checkpoint.pt").exists():
        return "unfinished"
    foreign = (
        [p.name for p in run_dir.iterdir() if p.name not in _RUN_FILES and not _is_temporary(p.name)]
        if run_dir.is_dir()
        else []
    )
    if foreign:
        raise BudgetKDError(
            f"{run_dir} is not empty and holds no budgetkd run (found {sorted(foreign)[0]!r}); choose a new --out"
        )
    return "new"


class Pretrainer:
    """Set-up and loop of one pretraining run; :func:`pretrain` is the entry point."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.out)
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        self.prefetcher: dist_utils.Prefetcher | None = None  # CUDA: set while the loop runs

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        self.budget = Budget.parse(cfg.budget)
        self.strategy_cls = get_strategy(cfg.strategy)
        check_train_config(cfg)
        self._check_schedule()
        if self.strategy_cls.needs_teacher and not cfg.teacher:
            raise BudgetKDError(f"strategy {cfg.strategy!r} needs a teacher: pass --teacher PATH_OR_HUB_ID")
        self.arch = resolve_architecture(cfg.student)
        self.device = _select_device(cfg.device)

        self.data = PackedData(cfg.data)
        self.tokenizer = self.data.load_tokenizer()
        if len(self.tokenizer) != self.data.vocab_size:
            raise BudgetKDError(
                f"the tokenizer in {self.data.dir / 'tokenizer'} has {len(self.tokenizer)} tokens but the data was "
                f"prepared with {self.data.vocab_size}; re-run budgetkd prepare"
            )
        self.seq_len = self.data.seq_len
        self.lr = cfg.lr if cfg.lr is not None else self.strategy_cls.default_lr
        self.data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self.mask_seed = cfg.seed if cfg.mask_seed is None else cfg.mask_seed

        self.student = create_student(
            self.arch, self.data.vocab_size, self.seq_len, self.data.special_ids, cfg.seed
        )
        if cfg.dropout is not None:
            # Pretraining dropout is a property of this run (run_config.json), not of the model:
            # only the modules change. The config keeps BERT's 0.1, so the exported model is
            # fine-tuned with the same dropout whatever the pretraining used (SPEC §4: identical
            # fine-tuning recipe).
            set_dropout(self.student, cfg.dropout)
        if self.seq_len > self.student.config.max_position_embeddings:
            raise BudgetKDError(f"seq_len {self.seq_len} exceeds the student's position embeddings")
        self.init_fingerprint = weights_fingerprint(self.student)

        self.teacher = None
        teacher_config = None
        if self.strategy_cls.needs_teacher:
            self.teacher = load_teacher(cfg.teacher, self.device)
            teacher_config = self.teacher.config
            check_vocabulary(self.teacher, self.tokenizer, cfg.teacher)
            if self.seq_len > teacher_config.max_position_embeddings:
                raise BudgetKDError(
                    f"seq_len {self.seq_len} exceeds the teacher's {teacher_config.max_position_embeddings} positions"
                )
            if self.strategy_cls.needs_teacher_logits and not self.teacher.has_mlm_head:
                raise BudgetKDError(
                    f"strategy {cfg.strategy!r} needs teacher logits, but {cfg.teacher} is an encoder-only "
                    "checkpoint without an MLM head"
                )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)  # projections: seeded, independent of the student init
            self.strategy = self.strategy_cls(cfg.strategy_options, self.student.config, teacher_config)

        masking = MaskingConfig(
            vocab_size=self.data.vocab_size,
            mask_id=int(self.data.special_ids["mask"]),
            special_ids=tuple(int(i) for i in self.data.special_ids["all"]),
            fixed_count=cfg.fixed_mask_count,
        )
        # micro_batch_size is the most one device holds; the per-process micro-batch is resolved
        # from the world size (recorded in run_config.json)
        micro = resolve_micro_batch(cfg.batch_size, self.world_size, cfg.micro_batch_size)
        self.batches = StepBatches(
            self.data,
            batch_size=cfg.batch_size,
            micro_batch_size=micro,
            data_seed=self.data_seed,
            mask_seed=self.mask_seed,
            masking=masking,
            rank=self.rank,
            world_size=self.world_size,
        )
        self.micro_batch_size = micro
        self.val_batches = validation_batches(
            self.data, cfg.eval_batch_size, masking, self.mask_seed, max_sequences=cfg.eval_sequences
        )

        self.student_shape_layers = self.student.config.num_hidden_layers
        self.module = TrainModule(self.student, self.strategy).to(self.device)
        self.model = dist_utils.wrap_ddp(
            self.module,
            self.device,
            # parameters without a gradient (the MLM head when no logits are used, what lies
            # beyond the forward's depth) must be declared, or DDP waits for them forever
            find_unused=not self.strategy.needs_student_logits
            or not self.module.depth.is_full(self.student_shape_layers),
        )
        self.teacher_runner = (
            TeacherRunner(self.teacher, self.strategy, self.device) if self.teacher else None
        )
        if cfg.compile:
            # Compile the encoder forwards (to their depth) in place: state-dict names, hooks and
            # DDP stay as they are. Their inputs have static shapes [micro-batch, L]; the sparse
            # MLM head and the losses see a different number of masked positions every
            # micro-batch and stay eager, so no step pays a recompilation (the uncharged warm-up
            # step, run under the training step's own contexts, compiles what training runs).
            self.module.encode = torch.compile(self.module.encode, dynamic=False)
            if self.teacher_runner is not None:
                self.teacher_runner.encode = torch.compile(self.teacher_runner.encode, dynamic=False)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.module, cfg.weight_decay),
            lr=self.lr,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            # fused kernels on CUDA; the multi-tensor (foreach) path on CPU, several times faster
            # than the per-parameter loop that is PyTorch's CPU default
            **({"fused": True} if self.device.type == "cuda" else {"foreach": True}),
        )
        self.meter = Meter(num_train_sequences=self.data.num_train, charge_teacher=cfg.charge_teacher)
        self.history: list[dict] = []
        self.skipped_steps = 0
        self.next_eval = 1
        self.snapshots_taken: list[float] = []
        self.branch: dict | None = None

        self.student_shape = flops.EncoderShape.from_config(self.student.config)
        self.teacher_shape = flops.EncoderShape.from_config(teacher_config) if teacher_config else None
        self.check_data_limit()

    def check_data_limit(self) -> None:
        """Set the data limit and refuse, before any compute, a budget in a currency known in
        advance (steps, tokens, epochs, FLOPs) that cannot be spent within ``max_epochs`` of data
        (SPEC §1, "unlimited data": such a run would stop at the data limit with its learning rate
        never decayed).

        The loop stops before the step that would cross ``max_epochs``: at most
        S = ⌊max_epochs · N / batch⌋ steps (``self.data_limit_steps``). The one exception is an
        epochs budget of at most ``max_epochs``: it is itself a data limit, and its last step
        reaches past the epoch boundary by less than a batch as every epochs budget does (the
        calibration's "one epoch"). Tokens are bounded by S·batch·L. FLOPs are exact when no MLM
        head runs; with one, the predicted count of those S steps is bounded by
        0.15·T + 6·√(0.15·0.85·T), T = S·batch·L (binomial masking, six standard deviations), so a
        refused budget certainly needs more data, and one just below the bound stops at the data
        limit at run time and says so (``stopped_by: data limit``).
        """
        cfg = self.config
        self.data_limit_steps: int | None = None
        if cfg.max_epochs is None:
            return
        currency, amount = self.budget.currency, self.budget.amount
        if currency == "epochs":
            if amount > cfg.max_epochs * (1 + 1e-12):
                raise BudgetKDError(
                    f"budget {self.budget} needs more than the data limit of {cfg.max_epochs:g} epoch(s) "
                    "(max_epochs; data_setting: unlimited never repeats the corpus) — lower the budget or use "
                    "data_setting: limited"
                )
            return
        max_steps = math.floor(cfg.max_epochs * self.data.num_train / cfg.batch_size + 1e-9)
        self.data_limit_steps = max_steps
        max_tokens = max_steps * cfg.batch_size * self.seq_len
        if currency == "steps":
            capacity = float(max_steps)
        elif currency == "tokens":
            capacity = float(max_tokens)
        elif currency == "flops":
            predicted = 0.15 * max_tokens + 6.0 * math.sqrt(0.15 * 0.85 * max_tokens)
            per_step = self.step_flops(cfg.batch_size, predicted / max(1, max_steps))
            capacity = max_steps * (per_step[0] + per_step[1])
        else:  # time: not known in advance; the loop stops at the data limit and says so
            return
        if amount > capacity * (1 + 1e-9):
            raise BudgetKDError(
                f"budget {self.budget} needs more than the data limit of {cfg.max_epochs:g} epoch(s) "
                f"({self.data.num_train} training sequences in batches of {cfg.batch_size}: at most "
                f"{max_steps} steps, {_format_amount(capacity, currency)}; data_setting: unlimited never repeats "
                "the corpus) — lower the budget or use data_setting: limited"
            )

    # -- the schedule ---------------------------------------------------------------------------
    def _check_schedule(self) -> None:
        cfg = self.config
        if cfg.schedule == "linear":
            return
        check_decay_fraction(cfg.decay_fraction)
        self.schedule_point = float(cfg.schedule_point or self.budget.amount)
        self.schedule_warmup = (
            float(cfg.schedule_warmup) if cfg.schedule_warmup is not None else cfg.warmup * self.budget.amount
        )
        if self.schedule_point < self.budget.amount:
            raise BudgetKDError("a wsd run's schedule point must not lie before its budget")
        if any(not 0 < a <= self.budget.amount for a in cfg.snapshots):
            raise BudgetKDError("every snapshot must lie inside the run's budget")

    def learning_rate(self) -> float:
        """The rate of the next step: SPEC §3's linear schedule over the budget fraction, or WSD
        over the consumed amount (budgetkd.sweep)."""
        if self.config.schedule == "wsd":
            consumed = self.meter.consumed(self.budget.currency)
            return wsd_learning_rate(
                self.lr, consumed, self.schedule_point, self.schedule_warmup, self.config.decay_fraction
            )
        return learning_rate(self.lr, self.meter.fraction(self.budget), self.config.warmup)

    def snapshot_path(self, amount: float) -> Path:
        return self.run_dir / snapshot_file(amount)

    def _take_snapshots(self) -> None:
        """Keep the state at the first step that reaches each snapshot amount (a branch point)."""
        consumed = self.meter.consumed(self.budget.currency)
        for amount in self.config.snapshots:
            if consumed >= amount and amount not in self.snapshots_taken:
                self.snapshots_taken.append(amount)
                started = time.perf_counter()
                rng = self.rng_state()  # collective: every rank takes the snapshot at the same step
                if self.is_main:
                    state = self.state(rng)
                    state["snapshot_of"] = str(self.run_dir)
                    state["prefix"] = self.meter.summary()
                    atomic_torch_save(self.snapshot_path(amount), state)
                self.meter.time_excluded_s += time.perf_counter() - started

    def _branch_from(self, path: str) -> None:
        """Continue a snapshot of another run: same weights, optimizer, meter, RNG and data
        position, so this run's charge is the prefix's plus its own (SPEC §7a)."""
        state = self._read_state(Path(path), "snapshot")
        if state.get("init_fingerprint") != self.init_fingerprint:
            raise BudgetKDError(f"snapshot {path} was trained from other initial weights than this run")
        self.module.student.load_state_dict(state["student"])
        self.module.strategy.load_state_dict(state["strategy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.meter = Meter.from_state_dict(state["meter"])
        self.meter.charge_teacher = self.config.charge_teacher
        if self.meter.exhausted(self.budget):
            raise BudgetKDError(f"snapshot {path} has already consumed this run's budget {self.budget}")
        self.skipped_steps = state["skipped_steps"]
        self.history = [
            {**entry, "budget_fraction": min(1.0, _consumed_at(entry, self) / self.budget.amount)}
            for entry in state["history"]
        ]
        while self.next_eval <= self.config.num_evals and self.meter.fraction(self.budget) >= (
            self.next_eval / self.config.num_evals
        ):
            self.next_eval += 1
        self.branch = {"from": str(path), "of": state.get("snapshot_of"), "prefix": state.get("prefix")}
        self._restore_rng(state)

    # -- FLOPs of one step ------------------------------------------------------------------------
    def step_flops(self, num_sequences: int, num_predicted: int) -> tuple[float, float]:
        """(student, teacher) FLOPs of a step over ``num_sequences`` with ``num_predicted`` masks:
        what runs and nothing else — each encoder to its depth (``Strategy.student_depth`` /
        ``teacher_depth``), the MLM heads only where their logits are used; the student's part
        forward + backward (3×), the teacher's forward only."""
        return step_flops(
            self.strategy, self.student_shape, self.teacher_shape, self.seq_len, num_sequences, num_predicted
        )

    # -- checkpoints ----------------------------------------------------------------------------
    def rng_state(self) -> dict:
        """Every rank's dropout RNG (CPU and CUDA generators), gathered in rank order. Collective.

        Only tensors, numbers and lists, so the checkpoint loads with ``weights_only=True``."""
        cuda = self.device.type == "cuda"
        return {
            "world_size": self.world_size,
            "cpu": dist_utils.gather_tensors(torch.get_rng_state(), self.device),
            "cuda": dist_utils.gather_tensors(torch.cuda.get_rng_state(self.device), self.device)
            if cuda
            else None,
        }

    def state(self, rng: dict | None = None) -> dict:
        """The checkpoint: tensors, numbers, strings, lists and dicts only (issue 13 item 10)."""
        return {
            "version": SUMMARY_VERSION,
            "config": self.config_hash,
            "student": self.module.student.state_dict(),
            "strategy": self.module.strategy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "meter": self.meter.state_dict(),
            "history": self.history,
            "skipped_steps": self.skipped_steps,
            "next_eval": self.next_eval,
            "snapshots_taken": list(self.snapshots_taken),
            "rng": rng if rng is not None else self.rng_state(),
            "init_fingerprint": self.init_fingerprint,
            "branch": self.branch,
        }

    def save_checkpoint(self) -> None:
        """Collective (every rank's RNG is gathered): every rank calls it at the same step."""
        started = time.perf_counter()
        rng = self.rng_state()
        if self.is_main:
            atomic_torch_save(self.run_dir / "checkpoint.pt", self.state(rng))
        self.meter.time_excluded_s += time.perf_counter() - started

    def _read_state(self, path: Path, what: str) -> dict:
        """A checkpoint or snapshot, loaded with ``weights_only``: only tensors and plain containers
        are rebuilt, so a planted pickle cannot run code as the user who resumes (issue 13 item 10)."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError:
            raise BudgetKDError(
                f"{what} {path} holds objects other than tensors, numbers, strings, lists and dicts; "
                "refusing to unpickle it (that could run code) — delete it to restart the run"
            ) from None
        except Exception as exc:
            raise BudgetKDError(f"cannot read {what} {path}: {str(exc).splitlines()[0][:160]}") from None
        if not isinstance(state, dict):
            raise BudgetKDError(f"{what} {path} is not a budgetkd checkpoint")
        return state

    def load_checkpoint(self) -> None:
        state = self._read_state(self.run_dir / "checkpoint.pt", "checkpoint")
        if state.get("config") != self.config_hash:
            raise BudgetKDError(
                f"{self.run_dir} was started with a different configuration; resume with the same options or use a new --out"
            )
        self.module.student.load_state_dict(state["student"])
        self.module.strategy.load_state_dict(state["strategy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.meter = Meter.from_state_dict(state["meter"])
        self.history = state["history"]
        self.skipped_steps = state["skipped_steps"]
        self.next_eval = state["next_eval"]
        self.snapshots_taken = list(state.get("snapshots_taken", []))
        self.branch = state.get("branch")
        self._restore_rng(state)

    def _restore_rng(self, state: dict) -> None:
        """This rank's dropout RNG from the checkpoint. With the same number of processes every
        rank continues its own stream exactly. With another number there is no such stream to
        continue (rank r of W' is no rank of W); rather than refuse a resumption that is otherwise
        exact (data order, masks and gradients do not depend on the process count), each rank's
        stream is re-derived from (seed, rank, step) and a note says so."""
        rng = state.get("rng")
        if rng is None:  # a checkpoint of an earlier version: rank 0's generator only
            rng = {
                "world_size": 1,
                "cpu": [state["rng_cpu"]],
                "cuda": [state["rng_cuda"]] if state.get("rng_cuda") is not None else None,
            }
        if rng["world_size"] == self.world_size:
            torch.set_rng_state(rng["cpu"][self.rank].cpu())
            if rng.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"][self.rank].cpu(), self.device)
            return
        torch.manual_seed(dropout_seed(self.config.seed, self.rank, self.meter.steps))
        if self.is_main:
            print(
                f"budgetkd: note: {self.run_dir} was checkpointed with {rng['world_size']} process(es) and resumes "
                f"with {self.world_size}; dropout streams are re-derived from (seed, rank, step {self.meter.steps})"
            )

    # -- evaluation -----------------------------------------------------------------------------
    @property
    def mlm_head_trained(self) -> bool:
        """Whether the student's MLM head receives gradients: only when its logits enter the loss
        (No-KD, Vanilla-KD, or an MLM weight > 0). Otherwise its validation MLM loss measures an
        untrained head and means nothing (issue 13 item 8)."""
        return bool(self.strategy.needs_student_logits)

    def autocast(self):
        """The training precision: bf16 autocast on CUDA, fp32 elsewhere (SPEC §5). Training and
        validation both run under it, so validation measures the model that trains."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation MLM loss (and the strategy's loss when there is a teacher), fixed masks,
        under the training precision (:meth:`autocast`); the losses themselves are fp32."""
        from budgetkd.losses import mlm_loss

        started = time.perf_counter()
        module = self.module
        module.eval()
        total_mlm = total_kd = 0.0
        weight_mlm = weight_kd = 0
        for input_ids, attention_mask, labels in self.val_batches:
            input_ids, attention_mask, labels = (
                t.to(self.device) for t in (input_ids, attention_mask, labels)
            )
            positions = predicted_positions(labels)
            if len(positions) == 0:
                continue
            with self.autocast():
                hidden = encode(module.student.bert, input_ids, attention_mask)
                logits = sparse_mlm_logits(module.student, hidden, positions)
            targets = labels.reshape(-1).index_select(0, positions)
            total_mlm += float(mlm_loss(logits, targets)) * len(positions)
            weight_mlm += len(positions)
            if self.teacher_runner is not None:
                teacher_out, teacher_logits = self.teacher_runner(input_ids, attention_mask, labels)
                with self.autocast():
                    loss, _ = module(input_ids, attention_mask, labels, teacher_out, teacher_logits)
                n = len(positions) if self.strategy.normalizer == "predicted" else int(attention_mask.sum())
                total_kd += float(loss) * n
                weight_kd += n
        module.train()
        result = {
            "step": self.meter.steps,
            "budget_fraction": self.meter.fraction(self.budget),
            "tokens": self.meter.tokens,
            "time_s": self.meter.time_s,
            "flops": self.meter.flops,
            "val_mlm_loss": total_mlm / max(1, weight_mlm),
            "mlm_head_trained": self.mlm_head_trained,
        }
        if weight_kd:
            result["val_loss"] = total_kd / weight_kd
        self.meter.time_excluded_s += time.perf_counter() - started
        return result

    # -- the loop -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One uncharged optimizer step, run exactly as training runs it and then undone, so that
        no charged step pays a one-time cost (SPEC §3: start-up is excluded; issue 13 item 4).

        It *is* a training step — :meth:`train_step` and :meth:`apply_update`, the very code the
        loop runs: every micro-batch under the same contexts (bf16 autocast on CUDA, the compiled
        encoders, DDP's no_sync and final all-reduce), so kernel selection, compilation (autocast
        state is part of a compiled graph's guards), allocator growth and the optimizer's lazily
        created state all happen here. Then it is undone: weights and buffers are copied back,
        optimizer state created by it is zeroed (AdamW's fresh state is step 0 with zero moments,
        so that is the state a first step would have created) and state that existed is copied
        back, gradients are dropped and the RNG streams are restored — the run's result is
        bit for bit that of a run without warm-up (tested)."""
        started = time.perf_counter()
        weights = {key: value.detach().clone() for key, value in self.module.state_dict().items()}
        saved_state = {
            param: {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in entries.items()}
            for param, entries in self.optimizer.state.items()
        }
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            step = self.meter.steps
            loss, _, _, _ = self.train_step(step, self.learning_rate())
            self.apply_update(loss)
        with torch.no_grad():
            self.module.load_state_dict(weights)
            for param, entries in self.optimizer.state.items():
                before = saved_state.get(param)
                for key, value in list(entries.items()):
                    if torch.is_tensor(value) and before is not None:
                        value.copy_(before[key])
                    elif torch.is_tensor(value):
                        value.zero_()
                    elif before is not None:
                        entries[key] = before[key]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.meter.time_excluded_s += time.perf_counter() - started

    def apply_update(self, loss: float) -> bool:
        """Clip (if configured), check the gradients, step the optimizer and clear the gradients.
        Returns whether the update was applied (a non-finite loss or gradient is never applied)."""
        cfg = self.config
        finite = math.isfinite(loss)
        if finite:
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
            else:
                norm = _grad_norm(self.module)
            # a finite loss can still back-propagate to non-finite gradients (an overflow):
            # applying them would put NaN weights into the next checkpoint
            finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return finite

    def train_step(self, step: int, lr: float) -> tuple[float, dict, float, float]:
        """One optimizer step. Returns (loss, components, teacher seconds, predicted count)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = (
            self.prefetcher.get(step) if self.prefetcher is not None else self.batches.micro_batches(step)
        )
        # Normalisers over the *global* batch, so the gradient does not depend on how the batch
        # is cut into micro-batches or processes (exact for mean-over-predicted-token losses).
        counts = torch.tensor(
            [
                sum(int((m.labels != -100).sum()) for m in micro_batches),
                sum(m.num_tokens for m in micro_batches),
            ],
            dtype=torch.float64,
        )
        counts = dist_utils.all_reduce_sum(counts, self.device)
        global_predicted, global_tokens = float(counts[0]), float(counts[1])
        teacher_seconds = 0.0
        total_loss = 0.0
        parts_sum: dict[str, float] = {}
        for index, micro in enumerate(micro_batches):
            input_ids = micro.input_ids.to(self.device, non_blocking=True)
            attention_mask = micro.attention_mask.to(self.device, non_blocking=True)
            labels = micro.labels.to(self.device, non_blocking=True)
            teacher_out, teacher_logits = {}, None
            if self.teacher_runner is not None:
                t0 = time.perf_counter()
                teacher_out, teacher_logits = self.teacher_runner(input_ids, attention_mask, labels)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                teacher_seconds += time.perf_counter() - t0
            n_pred = int((micro.labels != -100).sum())
            share = (
                n_pred / max(1.0, global_predicted)
                if self.strategy.normalizer == "predicted"
                else micro.num_tokens / max(1.0, global_tokens)
            )
            last = index == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else dist_utils.no_sync(self.model)
            with sync:
                with self.autocast():
                    loss, parts = self.model(input_ids, attention_mask, labels, teacher_out, teacher_logits)
                # DDP averages gradients over ranks; × world size turns that into the global sum.
                (loss * share * self.world_size).backward()
            total_loss += float(loss.detach()) * share
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value.detach()) * share
        # each rank holds its share of the global mean; the sum over ranks is the global value,
        # for the total and for every component alike (issue 13 item 7)
        names = sorted(parts_sum)
        totals = torch.tensor([total_loss, *(parts_sum[k] for k in names)], dtype=torch.float64)
        totals = dist_utils.all_reduce_sum(totals, self.device)
        total_loss = float(totals[0])
        parts_sum = {name: float(value) for name, value in zip(names, totals[1:])}
        return total_loss, parts_sum, teacher_seconds, global_predicted

    def pretrain(self) -> dict:
        cfg = self.config
        self.setup()
        resolved = cfg.resolved()
        self.config_hash = sha256_json(
            {**cfg.identity(), "data_fingerprint": self.data.meta.get("fingerprint")}
        )
        state = _run_state(self.run_dir)
        if state == "finished":
            raise BudgetKDError(f"{self.run_dir} already holds a finished run; choose another --out")
        if state == "unfinished" and not self.resume:
            raise BudgetKDError(f"{self.run_dir} holds an unfinished run; pass --resume to continue it")
        if state == "unfinished":
            self.load_checkpoint()
        elif cfg.init_from:
            self._branch_from(cfg.init_from)
        else:
            torch.manual_seed(dropout_seed(cfg.seed, self.rank))  # this rank's own dropout stream
        if self.is_main:
            atomic_write_json(
                self.run_dir / "run_config.json",
                {
                    **resolved,
                    "resolved": {
                        "lr": self.lr,
                        "data_seed": self.data_seed,
                        "mask_seed": self.mask_seed,
                        "micro_batch_size": self.micro_batch_size,
                        "world_size": self.world_size,
                        "architecture": self.arch.to_dict(),
                        "strategy_options": self.strategy.options,
                        "budget": self.budget.to_dict(),
                        "data_fingerprint": self.data.meta.get("fingerprint"),
                        "init_fingerprint": self.init_fingerprint,
                    },
                    "versions": _versions(),
                },
            )
        writer = _tensorboard(self.run_dir / "tb") if self.is_main else None
        if not self.history:
            self._record_eval(writer)  # the starting point (budget fraction 0), uncharged
        if not self.meter.exhausted(self.budget):
            self.warm_up()
        progress = _progress(self.is_main and cfg.progress, self.budget, self.meter)
        last_checkpoint = time.perf_counter()
        step_flops_cache: dict[int, tuple[float, float]] = {}
        if self.device.type == "cuda":
            # the next steps' micro-batches are gathered, masked and pinned in a background thread
            # (a step's batch is a function of its number only: results do not change)
            self.prefetcher = dist_utils.Prefetcher(self.batches, start_step=self.meter.steps, pin=True)
        try:
            while not self.meter.exhausted(self.budget):
                if self.data_limit_steps is not None and self.meter.steps >= self.data_limit_steps:
                    break  # the next step would cross max_epochs (the data limit, SPEC §1)
                step = self.meter.steps
                lr = self.learning_rate()
                started = time.perf_counter()
                loss, parts, teacher_s, n_pred = self.train_step(step, lr)
                finite = self.apply_update(loss)
                elapsed = time.perf_counter() - started
                # Rank 0's clock is the run's clock: every rank charges the same time and thus
                # takes the same stop decision at the same step (SPEC §3) — and the same
                # checkpoint decision, since a checkpoint gathers every rank's RNG.
                since_checkpoint = time.perf_counter() - last_checkpoint
                elapsed, teacher_s, since_checkpoint = dist_utils.broadcast_floats(
                    [elapsed, teacher_s, since_checkpoint], self.device
                )
                if not finite:
                    if cfg.on_nonfinite == "stop":
                        raise BudgetKDError(
                            f"non-finite loss or gradients (loss {loss}) at step {step}; the last good checkpoint is kept in "
                            f"{self.run_dir} (lower the learning rate, or set on_nonfinite: skip)"
                        )
                    self.skipped_steps += 1
                tokens = self.batches.global_tokens(step)
                key = int(n_pred)
                if key not in step_flops_cache:
                    step_flops_cache[key] = self.step_flops(cfg.batch_size, key)
                f_student, f_teacher = step_flops_cache[key]
                m = self.meter
                m.steps += 1
                m.sequences += cfg.batch_size
                m.tokens += tokens
                m.time_s += elapsed
                m.time_teacher_s += teacher_s
                m.flops_student += f_student
                m.flops_teacher += f_teacher
                progress.update(m)
                if cfg.snapshots:
                    self._take_snapshots()
                if writer is not None and (m.steps % cfg.log_every == 0 or m.steps == 1):
                    writer.add_scalar("train/loss", loss, m.steps)
                    writer.add_scalar("train/lr", lr, m.steps)
                    writer.add_scalar("train/tokens_per_s", m.tokens / max(m.time_s, 1e-9), m.steps)
                    writer.add_scalar("train/budget_fraction", m.fraction(self.budget), m.steps)
                    for name, value in parts.items():
                        writer.add_scalar(f"train/{name}", value, m.steps)
                if m.fraction(self.budget) >= self.next_eval / cfg.num_evals and not m.exhausted(self.budget):
                    self._record_eval(writer)
                due_time = cfg.checkpoint_interval_s > 0 and since_checkpoint >= cfg.checkpoint_interval_s
                due_steps = cfg.checkpoint_every_steps > 0 and m.steps % cfg.checkpoint_every_steps == 0
                if due_time or due_steps:
                    self.save_checkpoint()
                    last_checkpoint = time.perf_counter()
        finally:
            if self.prefetcher is not None:
                self.prefetcher.close()
                self.prefetcher = None
            progress.close()
        self._record_eval(writer, final=True)
        self.save_checkpoint()
        summary = self._summary()
        if self.is_main:
            started = time.perf_counter()
            export_student(self.module.student, self.tokenizer, self.run_dir / "model")
            summary["export_s"] = time.perf_counter() - started
            atomic_write_json(self.run_dir / "summary.json", summary)
        if writer is not None:
            writer.close()
        dist_utils.barrier()
        return summary

    def _record_eval(self, writer, final: bool = False) -> None:
        if (
            final
            and self.history
            and self.history[-1].get("final")
            and self.history[-1]["step"] == self.meter.steps
        ):
            return  # resumed after the final checkpoint (killed during export): already evaluated
        result = self.evaluate()
        result["final"] = final
        self.history.append(result)
        while self.next_eval <= self.config.num_evals and self.meter.fraction(self.budget) >= (
            self.next_eval / self.config.num_evals
        ):
            self.next_eval += 1
        if writer is not None:
            if result["mlm_head_trained"]:  # an untrained head's loss is not plotted as a result
                writer.add_scalar("val/mlm_loss", result["val_mlm_loss"], self.meter.steps)
            if "val_loss" in result:
                writer.add_scalar("val/loss", result["val_loss"], self.meter.steps)
            writer.flush()

    def _summary(self) -> dict:
        final = self.history[-1] if self.history else {}
        consumed = self.meter.summary()
        return {
            "version": SUMMARY_VERSION,
            "finished": True,
            "strategy": self.config.strategy,
            "display_name": self.strategy_cls.display_name,
            "teacher": self.config.teacher,
            "student": self.arch.to_dict(),
            "parameters": sum(p.numel() for p in self.module.student.parameters()),
            "budget": self.budget.to_dict(),
            "budget_exhausted": self.meter.exhausted(self.budget),
            # "data limit": the data ran out first (max_epochs; with unlimited data the end of the
            # first epoch, SPEC §1) — the budget was not spent and the schedule never reached 0
            "stopped_by": "budget" if self.meter.exhausted(self.budget) else "data limit",
            "max_epochs": self.config.max_epochs,
            "mlm_head_trained": self.mlm_head_trained,
            "consumed": consumed,
            # what the budget was charged (teacher_cost free: the teacher's forward passes are not)
            "charged": {
                "teacher_forward": self.meter.charge_teacher,
                "time_s": self.meter.consumed("time"),
                "flops": self.meter.consumed("flops"),
            },
            "tokens_per_s": consumed["tokens_per_s"],
            "val_mlm_loss": final.get("val_mlm_loss"),
            "val_loss": final.get("val_loss"),
            "evaluations": self.history,
            "skipped_steps": self.skipped_steps,
            "lr": self.lr,
            "batch_size": self.config.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "world_size": self.world_size,
            "seed": self.config.seed,
            "data_seed": self.data_seed,
            "init_fingerprint": self.init_fingerprint,
            "data_fingerprint": self.data.meta.get("fingerprint"),
            "device": str(self.device),
            "schedule": self._schedule_summary(),
        }

    def _schedule_summary(self) -> dict:
        cfg = self.config
        if cfg.schedule != "wsd":
            return {"kind": "linear", "warmup": cfg.warmup}
        out = {
            "kind": "wsd",
            "point": self.schedule_point,
            "warmup_amount": self.schedule_warmup,
            "decay_fraction": cfg.decay_fraction,
            "currency": self.budget.currency,
            "snapshots": [str(self.snapshot_path(a)) for a in self.snapshots_taken],
        }
        if self.branch:
            prefix = self.branch.get("prefix") or {}
            own = self.meter.summary()
            out["branched_from"] = self.branch["from"]
            out["prefix"] = prefix
            out["own"] = {
                k: own[k] - prefix.get(k, 0)
                for k in ("time_s", "flops", "flops_student", "flops_teacher", "tokens", "steps", "sequences")
            }
        return out


def pretrain(config: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) one pretraining run and return its summary."""
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BudgetKDError(f"--out {run_dir} exists and is not a directory")
    _run_state(run_dir)  # refuses a foreign, non-empty directory before the lock file is put in it
    with locked(run_dir, enabled=dist_utils.rank() == 0):
        if dist_utils.rank() == 0:
            _remove_temporaries(run_dir)  # left by a process killed in the middle of a write
        return Pretrainer(config, resume=resume).pretrain()


def snapshot_file(amount: float) -> str:
    """A snapshot's file inside its run directory, named by its amount (``repr``: exact)."""
    return f"snapshots/at-{float(amount)!r}.pt"


def _consumed_at(entry: dict, trainer: Pretrainer) -> float:
    """The amount of the run's budget currency consumed at a history entry."""
    currency = trainer.budget.currency
    if currency == "epochs":
        return entry["step"] * trainer.config.batch_size / max(1, trainer.data.num_train)
    return float(entry[{"time": "time_s", "flops": "flops", "tokens": "tokens", "steps": "step"}[currency]])


def _versions() -> dict:
    import transformers

    from budgetkd import __version__

    return {
        "budgetkd": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "pid": os.getpid(),
    }


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency, but never fail a run over logs
        return None
    return SummaryWriter(log_dir=str(path))


class _progress:
    """A tqdm bar in percent of the budget."""

    def __init__(self, enabled: bool, budget: Budget, meter: Meter):
        from tqdm.auto import tqdm

        self.budget = budget
        self.bar = tqdm(
            total=100.0,
            unit="%",
            disable=not enabled,
            desc=f"budget {budget}",
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f}% [{elapsed}<{remaining}{postfix}]",
        )
        self.bar.n = 100.0 * meter.fraction(budget)

    def update(self, meter: Meter) -> None:
        self.bar.n = 100.0 * meter.fraction(self.budget)
        self.bar.set_postfix_str(
            f"step {meter.steps}, {meter.tokens / max(meter.time_s, 1e-9):,.0f} tok/s", refresh=False
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
