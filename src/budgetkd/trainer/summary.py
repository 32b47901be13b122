"""What a run reports: summary.json and run_config.json contents, TensorBoard scalars and the
progress bar. The dictionaries are built here; ``budgetkd.train`` writes them.

``run`` below is the ``budgetkd.train.Pretrainer`` after set-up (this module sits below it and
reads its attributes only).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from budgetkd.budget import Budget, Meter
from budgetkd.models import tokenizer_vocabulary
from budgetkd.trainer import SUMMARY_VERSION


def run_config(run: Any, resolved: dict) -> dict:
    """run_config.json: the configuration as given (``resolved``), what set-up resolved from it,
    and the versions that ran it — the run directory alone tells what produced it."""
    return {
        **resolved,
        "resolved": {
            "lr": run.lr,
            "data_seed": run.data_seed,
            "mask_seed": run.mask_seed,
            "micro_batch_size": run.micro_batch_size,
            "world_size": run.world_size,
            "architecture": run.arch.to_dict(),
            "strategy_options": run.strategy.options,
            "budget": run.budget.to_dict(),
            "data_fingerprint": run.data.meta.get("fingerprint"),
            "init_fingerprint": run.init_fingerprint,
        },
        "versions": _versions(),
    }


def training_rules(config: Any) -> dict:
    """The rules a row of Table 2 must share with every other (SPEC §4, issue 20): schedule,
    warm-up fraction, peak learning-rate rule and data setting (``fairness.json`` compares them)."""
    return {
        "schedule": config.schedule,
        "warmup": config.warmup,
        "lr_rule": "strategy default" if config.lr is None else "given",
        "data_setting": "limited"
        if config.max_epochs is None
        else f"unlimited ({config.max_epochs:g} epoch)",
    }


def exported_parameters(student) -> int:
    """The student's parameters as exported: at the tokenizer's vocabulary, not the padded one."""
    with tokenizer_vocabulary(student):
        return sum(p.numel() for p in student.parameters())


def run_summary(run: Any) -> dict:
    """summary.json: strategy, budget, consumption in every currency, validation losses."""
    final = run.history[-1] if run.history else {}
    meter, budget = run.meter, run.budget
    consumed = meter.summary()
    return {
        "version": SUMMARY_VERSION,
        "finished": True,
        "strategy": run.config.strategy,
        "display_name": run.strategy_cls.display_name,
        "teacher": run.config.teacher,
        "student": run.arch.to_dict(),
        "parameters": exported_parameters(run.module.student),
        "budget": budget.to_dict(),
        # as configured: an epochs budget trains ⌊E·N/B⌋ full batches, recorded above as steps
        "budget_requested": getattr(run, "budget_requested", budget).to_dict(),
        "budget_exhausted": meter.exhausted(budget),
        # "data limit": the data ran out first (max_epochs; with unlimited data the end of the
        # first epoch, SPEC §1) — the budget was not spent and the schedule never reached 0
        "stopped_by": "budget" if meter.exhausted(budget) else "data limit",
        "max_epochs": run.config.max_epochs,
        "training_rules": training_rules(run.config),
        "mlm_head_trained": run.mlm_head_trained,
        "consumed": consumed,
        # what the budget was charged (teacher_cost free: the teacher's forward passes are not)
        "charged": {
            "teacher_forward": meter.charge_teacher,
            "time_s": meter.consumed("time"),
            "flops": meter.consumed("flops"),
        },
        "tokens_per_s": consumed["tokens_per_s"],
        "val_mlm_loss": final.get("val_mlm_loss"),
        "val_loss": final.get("val_loss"),
        "evaluations": run.history,
        "skipped_steps": run.skipped_steps,
        "lr": run.lr,
        "batch_size": run.config.batch_size,
        "micro_batch_size": run.micro_batch_size,
        "world_size": run.world_size,
        "seed": run.config.seed,
        "data_seed": run.data_seed,
        "init_fingerprint": run.init_fingerprint,
        "data_fingerprint": run.data.meta.get("fingerprint"),
        "device": str(run.device),
        "schedule": schedule_summary(run),
    }


_OWN_KEYS = ("time_s", "flops", "flops_student", "flops_teacher", "tokens", "steps", "sequences")


def schedule_summary(run: Any) -> dict:
    """The learning-rate schedule; for a WSD branch also its prefix (the snapshot's consumption)
    and its own consumption (the total minus the prefix)."""
    cfg = run.config
    if run.wsd is None:
        return {"kind": "linear", "warmup": cfg.warmup}
    out = {
        "kind": "wsd",
        "point": run.wsd.point,
        "warmup_amount": run.wsd.warmup_amount,
        "decay_fraction": cfg.decay_fraction,
        "currency": run.budget.currency,
        "snapshots": [str(run.snapshot_path(a)) for a in run.snapshots_taken],
    }
    if run.branch:
        prefix = run.branch.get("prefix") or {}
        own = run.meter.summary()
        out["branched_from"] = run.branch["from"]
        out["prefix"] = prefix
        out["own"] = {k: own[k] - prefix.get(k, 0) for k in _OWN_KEYS}
    return out


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


def log_step(writer, meter: Meter, budget: Budget, loss: float, lr: float, parts: dict[str, float]) -> None:
    """A training step's scalars: loss, learning rate, throughput, budget fraction, components."""
    writer.add_scalar("train/loss", loss, meter.steps)
    writer.add_scalar("train/lr", lr, meter.steps)
    writer.add_scalar("train/tokens_per_s", meter.tokens / max(meter.time_s, 1e-9), meter.steps)
    writer.add_scalar("train/budget_fraction", meter.fraction(budget), meter.steps)
    for name, value in parts.items():
        writer.add_scalar(f"train/{name}", value, meter.steps)


def log_evaluation(writer, result: dict, step: int) -> None:
    """An evaluation's scalars (an untrained head's MLM loss is not plotted as a result)."""
    if result["mlm_head_trained"]:
        writer.add_scalar("val/mlm_loss", result["val_mlm_loss"], step)
    if "val_loss" in result:
        writer.add_scalar("val/loss", result["val_loss"], step)
    writer.flush()


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
