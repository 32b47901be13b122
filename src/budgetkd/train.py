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
from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_torch_save, atomic_write_json, locked, read_json, sha256_json
from budgetkd.models import (
    Capture,
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


class TrainModule(nn.Module):
    """What trains: the student plus the strategy's own parameters (projections). DDP wraps this."""

    def __init__(self, student: nn.Module, strategy: Strategy):
        super().__init__()
        self.student = student
        self.strategy = strategy
        self.capture = Capture(student.bert, strategy.student_spec())

    def forward(self, input_ids, attention_mask, labels, teacher_out: dict, teacher_logits):
        self.capture.clear()
        hidden = encode(self.student.bert, input_ids, attention_mask)
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

    def __call__(self, input_ids, attention_mask, labels) -> tuple[dict, torch.Tensor | None]:
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda"
            else contextlib.nullcontext()
        )
        self.capture.clear()
        with torch.inference_mode(), autocast:
            hidden = encode(self.teacher.encoder, input_ids, attention_mask)
            logits = None
            if self.strategy.needs_teacher_logits:
                logits = sparse_mlm_logits(self.teacher.model, hidden, predicted_positions(labels))
        # Inference tensors cannot be saved for the student's backward; a clone outside
        # inference mode is an ordinary tensor (and stays detached from any graph).
        values = {key: value.clone() for key, value in self.capture.values.items()}
        self.capture.clear()
        return values, (logits.clone() if logits is not None else None)


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
        per_rank = cfg.batch_size // self.world_size
        # default micro-batch: the largest divisor of the per-process batch up to 64
        micro = cfg.micro_batch_size or max(
            d for d in range(1, min(max(per_rank, 1), 64) + 1) if per_rank % d == 0
        )
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
            # parameters without a gradient (the MLM head when no logits are used, layers above
            # the deepest mapped one) must be declared, or DDP waits for them forever
            find_unused=not self.strategy.needs_student_logits
            or any(s != self.student_shape_layers - 1 for s, _ in self.strategy.layer_pairs),
        )
        if cfg.compile:
            # Compile the encoders in place (state-dict names, hooks and DDP stay as they are).
            # Their inputs have static shapes [micro-batch, L]; the sparse MLM head and the losses
            # see a different number of masked positions every micro-batch and stay eager, so no
            # step pays a recompilation (the uncharged warm-up step compiles what training runs).
            self.module.student.bert.compile(dynamic=False)
            if self.teacher is not None:
                self.teacher.encoder.compile(dynamic=False)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.module, cfg.weight_decay),
            lr=self.lr,
            betas=tuple(cfg.adam_betas),
            eps=cfg.adam_eps,
            # fused kernels on CUDA; the multi-tensor (foreach) path on CPU, several times faster
            # than the per-parameter loop that is PyTorch's CPU default
            **({"fused": True} if self.device.type == "cuda" else {"foreach": True}),
        )
        self.teacher_runner = (
            TeacherRunner(self.teacher, self.strategy, self.device) if self.teacher else None
        )
        self.meter = Meter(num_train_sequences=self.data.num_train, charge_teacher=cfg.charge_teacher)
        self.history: list[dict] = []
        self.skipped_steps = 0
        self.next_eval = 1
        self.snapshots_taken: list[float] = []
        self.branch: dict | None = None

        self.student_shape = flops.EncoderShape.from_config(self.student.config)
        self.teacher_shape = flops.EncoderShape.from_config(teacher_config) if teacher_config else None

    # -- the schedule ---------------------------------------------------------------------------
    def _check_schedule(self) -> None:
        cfg = self.config
        if cfg.schedule not in ("linear", "wsd"):
            raise BudgetKDError(f"schedule must be linear or wsd, got {cfg.schedule!r}")
        if cfg.schedule == "linear":
            if cfg.snapshots or cfg.init_from:
                raise BudgetKDError("snapshots and branches need schedule: wsd")
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
                if self.is_main:
                    started = time.perf_counter()
                    state = self.state()
                    state["snapshot_of"] = str(self.run_dir)
                    state["prefix"] = self.meter.summary()
                    atomic_torch_save(self.snapshot_path(amount), state)
                    self.meter.time_excluded_s += time.perf_counter() - started

    def _branch_from(self, path: str) -> None:
        """Continue a snapshot of another run: same weights, optimizer, meter, RNG and data
        position, so this run's charge is the prefix's plus its own (SPEC §7a)."""
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise BudgetKDError(f"cannot read snapshot {path}: {str(exc).splitlines()[0][:160]}") from None
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
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)

    # -- FLOPs of one step ------------------------------------------------------------------------
    def step_flops(self, num_sequences: int, num_predicted: int) -> tuple[float, float]:
        """(student, teacher) FLOPs of a step over ``num_sequences`` with ``num_predicted`` masks."""
        seq_len = self.seq_len
        student_fwd = flops.encoder_forward(self.student_shape, seq_len, num_sequences)
        if self.strategy.needs_student_logits:
            student_fwd += flops.mlm_head_forward(self.student_shape, num_predicted)
        extra_s, extra_t = self.strategy.extra_forward_flops(num_sequences, seq_len)
        student = flops.training_flops(student_fwd + extra_s)
        teacher = 0.0
        if self.teacher_shape is not None:
            teacher = flops.encoder_forward(self.teacher_shape, seq_len, num_sequences) + extra_t
            if self.strategy.needs_teacher_logits:
                teacher += flops.mlm_head_forward(self.teacher_shape, num_predicted)
        return student, teacher

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict:
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
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "init_fingerprint": self.init_fingerprint,
            "branch": self.branch,
        }

    def save_checkpoint(self) -> None:
        if self.is_main:
            started = time.perf_counter()
            atomic_torch_save(self.run_dir / "checkpoint.pt", self.state())
            self.meter.time_excluded_s += time.perf_counter() - started

    def load_checkpoint(self) -> None:
        path = self.run_dir / "checkpoint.pt"
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise BudgetKDError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0][:160]}") from None
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
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation MLM loss (and the strategy's loss when there is a teacher), fixed masks."""
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
            hidden = encode(module.student.bert, input_ids, attention_mask)
            logits = sparse_mlm_logits(module.student, hidden, positions)
            targets = labels.reshape(-1).index_select(0, positions)
            total_mlm += float(mlm_loss(logits, targets)) * len(positions)
            weight_mlm += len(positions)
            if self.teacher_runner is not None:
                teacher_out, teacher_logits = self.teacher_runner(input_ids, attention_mask, labels)
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
        }
        if weight_kd:
            result["val_loss"] = total_kd / weight_kd
        self.meter.time_excluded_s += time.perf_counter() - started
        return result

    # -- the loop -------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """One uncharged forward and backward of the first micro-batch (teacher included), so that
        one-time start-up costs (kernel selection, allocator growth, lazy initialisation) are not
        billed to the first step (SPEC §3: start-up is excluded). RNG state and gradients are
        restored, so the run's result is unchanged."""
        started = time.perf_counter()
        micro = self.batches.micro_batches(self.meter.steps)[0]
        input_ids, attention_mask, labels = (
            t.to(self.device) for t in (micro.input_ids, micro.attention_mask, micro.labels)
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            teacher_out, teacher_logits = {}, None
            if self.teacher_runner is not None:
                teacher_out, teacher_logits = self.teacher_runner(input_ids, attention_mask, labels)
            with dist_utils.no_sync(self.model):
                loss, _ = self.model(input_ids, attention_mask, labels, teacher_out, teacher_logits)
                loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.meter.time_excluded_s += time.perf_counter() - started

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
            autocast = (
                torch.autocast("cuda", dtype=torch.bfloat16)
                if self.device.type == "cuda"
                else contextlib.nullcontext()
            )
            with sync:
                with autocast:
                    loss, parts = self.model(input_ids, attention_mask, labels, teacher_out, teacher_logits)
                # DDP averages gradients over ranks; × world size turns that into the global sum.
                (loss * share * self.world_size).backward()
            total_loss += float(loss.detach()) * share
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value.detach()) * share
        totals = torch.tensor([total_loss], dtype=torch.float64)
        total_loss = float(dist_utils.all_reduce_sum(totals, self.device)[0])
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
            torch.manual_seed(cfg.seed)  # dropout stream
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
                if cfg.max_epochs is not None:
                    next_sequences = self.meter.sequences + cfg.batch_size
                    if next_sequences / self.data.num_train > cfg.max_epochs + 1e-12:
                        break
                step = self.meter.steps
                lr = self.learning_rate()
                started = time.perf_counter()
                loss, parts, teacher_s, n_pred = self.train_step(step, lr)
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
                elapsed = time.perf_counter() - started
                # Rank 0's clock is the run's clock: every rank charges the same time and thus
                # takes the same stop decision at the same step (SPEC §3).
                elapsed, teacher_s = dist_utils.broadcast_floats([elapsed, teacher_s], self.device)
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
                now = time.perf_counter()
                due_time = (
                    cfg.checkpoint_interval_s > 0 and now - last_checkpoint >= cfg.checkpoint_interval_s
                )
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
            "stopped_by": "budget" if self.meter.exhausted(self.budget) else "data limit (max_epochs)",
            "consumed": consumed,
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
