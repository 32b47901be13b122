"""Building what a run trains with: device, data, student, teacher checks, strategy, batches,
the trained module (DDP-wrapped, optionally compiled) and the optimizer (SPEC §2, §5).

Each builder checks what it builds and raises :class:`BudgetKDError` before any compute.
"""

from __future__ import annotations

import torch
from torch import nn

from budgetkd import distributed as dist_utils
from budgetkd.data import MaskingConfig, PackedData, StepBatches, regroup_batches, validation_batches
from budgetkd.data.dataset import resolve_micro_batch
from budgetkd.errors import BudgetKDError
from budgetkd.models import check_vocabulary, create_student, pad_vocabulary, set_dropout
from budgetkd.strategies import Strategy
from budgetkd.trainer.step import TeacherRunner, TrainModule


def _select_device(spec: str) -> torch.device:
    """``auto`` (this process's GPU, else the CPU), ``cpu``, ``cuda`` (this process's GPU) or ``cuda:N``."""
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


def open_data(path: str):
    """The prepared data and its tokenizer, which must be the one the data was prepared with."""
    data = PackedData(path)
    tokenizer = data.load_tokenizer()
    if len(tokenizer) != data.vocab_size:
        raise BudgetKDError(
            f"the tokenizer in {data.dir / 'tokenizer'} has {len(tokenizer)} tokens but the data was "
            f"prepared with {data.vocab_size}; re-run budgetkd prepare"
        )
    return data, tokenizer


def build_student(arch, data: PackedData, seed: int, dropout: float | None) -> nn.Module:
    """A freshly initialised student (seeded by ``seed``) for the data's vocabulary and length,
    its vocabulary rows padded to a multiple of 64 (``models.VOCAB_MULTIPLE``)."""
    student = create_student(arch, data.vocab_size, data.seq_len, data.special_ids, seed)
    pad_vocabulary(student)  # aligned GEMMs on a GPU; the losses and the export see V (models.py)
    if dropout is not None:
        # Pretraining dropout is a property of this run (run_config.json), not of the model:
        # only the modules change. The config keeps BERT's 0.1, so the exported model is
        # fine-tuned with the same dropout whatever the pretraining used (SPEC §4: identical
        # fine-tuning recipe).
        set_dropout(student, dropout)
    if data.seq_len > student.config.max_position_embeddings:
        raise BudgetKDError(f"seq_len {data.seq_len} exceeds the student's position embeddings")
    return student


def check_teacher(
    teacher, tokenizer, seq_len: int, strategy_cls: type[Strategy], name: str, spec: str
) -> None:
    """The teacher shares the data's vocabulary, covers its length and has what the strategy reads."""
    check_vocabulary(teacher, tokenizer, spec)
    if seq_len > teacher.config.max_position_embeddings:
        raise BudgetKDError(
            f"seq_len {seq_len} exceeds the teacher's {teacher.config.max_position_embeddings} positions"
        )
    if strategy_cls.needs_teacher_logits and not teacher.has_mlm_head:
        raise BudgetKDError(
            f"strategy {name!r} needs teacher logits, but {spec} is an encoder-only checkpoint without an MLM head"
        )


def build_strategy(strategy_cls: type[Strategy], options: dict, seed: int, student_config, teacher_config):
    """The strategy, its projections seeded by seed + 1: independent of the student's init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return strategy_cls(options, student_config, teacher_config)


def compiles(compile: bool | None, device: torch.device) -> bool:
    """The ``compile`` field resolved: None (the default) compiles on CUDA only."""
    return device.type == "cuda" if compile is None else bool(compile)


def build_batches(
    cfg,
    data: PackedData,
    data_seed: int,
    mask_seed: int,
    rank: int,
    world_size: int,
    compiled: bool = False,
):
    """(training batches, validation batches, per-process micro-batch size). ``micro_batch_size``
    is the most one device holds; the per-process micro-batch is resolved from the world size.
    ``compiled``: the validation rows (masks drawn as always, ``eval_batch_size`` at a time) are
    regrouped at the micro-batch size, the shape the compiled step has a graph for."""
    masking = MaskingConfig(
        vocab_size=data.vocab_size,
        mask_id=int(data.special_ids["mask"]),
        special_ids=tuple(int(i) for i in data.special_ids["all"]),
        fixed_count=cfg.fixed_mask_count,
    )
    micro = resolve_micro_batch(cfg.batch_size, world_size, cfg.micro_batch_size)
    batches = StepBatches(
        data,
        batch_size=cfg.batch_size,
        micro_batch_size=micro,
        data_seed=data_seed,
        mask_seed=mask_seed,
        masking=masking,
        rank=rank,
        world_size=world_size,
    )
    val = validation_batches(data, cfg.eval_batch_size, masking, mask_seed, max_sequences=cfg.eval_sequences)
    return batches, regroup_batches(val, micro) if compiled else val, micro


def build_module(student: nn.Module, strategy: Strategy, teacher, device: torch.device, compiled: bool):
    """(TrainModule, the module the loop calls — DDP-wrapped under torchrun —, TeacherRunner or None);
    ``compiled``: :func:`compile_micro_step`."""
    if device.type == "cuda":
        # TF32 for what still runs in fp32 on the GPU (outside bf16 autocast: the losses' fp32
        # products, fp32 matmuls a user adds); a process-wide setting, CUDA only — CPU untouched
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module = TrainModule(student, strategy).to(device)
    model = dist_utils.wrap_ddp(
        module,
        device,
        # parameters without a gradient (the MLM head when no logits are used, what lies
        # beyond the forward's depth) must be declared, or DDP waits for them forever
        find_unused=not strategy.needs_student_logits
        or not module.depth.is_full(student.config.num_hidden_layers),
    )
    runner = TeacherRunner(teacher, strategy, device) if teacher else None
    if compiled:
        compile_micro_step(module, runner)
    return module, model, runner


def compile_micro_step(module: TrainModule, runner: TeacherRunner | None) -> None:
    """``torch.compile`` the whole micro-step's forward in place: the student's encoder (to its
    depth), sparse MLM head and the strategy's loss as one graph, and the teacher's encoder and
    head as another; the backward follows from the student's graph. State-dict names, hooks and
    DDP stay as they are (DDP calls the module, whose ``forward`` is the compiled one).

    Shapes are static — [micro-batch, L] — except the number of predicted positions P, which
    differs between micro-batches: the loop marks it dynamic (``step.dynamic_count``), so one
    graph serves every P and no charged step recompiles (the uncharged warm-up step, run under
    the training step's own contexts, compiles what training runs). Validation runs at the
    micro-batch size (``build_batches``) in eval mode: one more graph, compiled at the first
    evaluation, whose time is excluded from the budget."""
    module.forward = torch.compile(module.forward)
    if runner is not None:
        runner.forward = torch.compile(runner.forward)


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


def build_optimizer(module: nn.Module, cfg, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`_param_groups`: fused kernels on CUDA; the multi-tensor (foreach) path on
    CPU, several times faster than the per-parameter loop that is PyTorch's CPU default."""
    return torch.optim.AdamW(
        _param_groups(module, cfg.weight_decay),
        lr=lr,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        **({"fused": True} if device.type == "cuda" else {"foreach": True}),
    )
