"""The checkpoint's contents, and restoring a run from a checkpoint or a snapshot (SPEC §3, §7a).

A checkpoint holds tensors, numbers, strings, lists and dicts only, so that it loads with
``weights_only=True`` (issue 13 item 10). Every rank's dropout RNG is gathered into it
(:func:`gather_rng`, collective) and each rank continues its own stream on resumption
(:func:`restore_rng`). Writing the files is ``budgetkd.train``'s job.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from budgetkd import distributed as dist_utils
from budgetkd.budget import Meter
from budgetkd.errors import BudgetKDError
from budgetkd.trainer import SUMMARY_VERSION


def dropout_seed(seed: int, rank: int, step: int | None = None) -> int:
    """The seed of one process's dropout stream: a 64-bit hash of (seed, rank[, step]) through
    numpy's ``SeedSequence``, so that every rank draws its own masks (issue 13 item 7) and the
    stream is a function of the run's seed and the rank alone. ``step`` re-derives a stream on a
    resumption with another number of processes (see :func:`restore_rng`)."""
    import numpy as np

    entropy = [seed, rank] if step is None else [seed, rank, step]
    words = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) >> 1  # < 2⁶³: accepted by torch.manual_seed


def snapshot_file(amount: float) -> str:
    """A snapshot's file inside its run directory, named by its amount (``repr``: exact)."""
    return f"snapshots/at-{float(amount)!r}.pt"


def gather_rng(device: torch.device, world_size: int) -> dict:
    """Every rank's dropout RNG (CPU and CUDA generators), gathered in rank order. Collective.

    Only tensors, numbers and lists, so the checkpoint loads with ``weights_only=True``."""
    cuda = device.type == "cuda"
    return {
        "world_size": world_size,
        "cpu": dist_utils.gather_tensors(torch.get_rng_state(), device),
        "cuda": dist_utils.gather_tensors(torch.cuda.get_rng_state(device), device) if cuda else None,
    }


def checkpoint_state(
    *,
    config_hash: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    meter: Meter,
    history: list[dict],
    skipped_steps: int,
    next_eval: int,
    snapshots_taken: list[float],
    rng: dict,
    init_fingerprint: str,
    branch: dict | None,
) -> dict:
    """The checkpoint: tensors, numbers, strings, lists and dicts only (issue 13 item 10)."""
    return {
        "version": SUMMARY_VERSION,
        "config": config_hash,
        "student": module.student.state_dict(),
        "strategy": module.strategy.state_dict(),
        "optimizer": optimizer.state_dict(),
        "meter": meter.state_dict(),
        "history": history,
        "skipped_steps": skipped_steps,
        "next_eval": next_eval,
        "snapshots_taken": list(snapshots_taken),
        "rng": rng,
        "init_fingerprint": init_fingerprint,
        "branch": branch,
    }


def read_state(path: Path, what: str, device: torch.device) -> dict:
    """A checkpoint or snapshot, loaded with ``weights_only``: only tensors and plain containers
    are rebuilt, so a planted pickle cannot run code as the user who resumes (issue 13 item 10)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
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


def restore_training(state: dict, module: nn.Module, optimizer: torch.optim.Optimizer) -> Meter:
    """Load the student, the strategy's parameters and the optimizer; return the saved meter."""
    try:
        module.student.load_state_dict(state["student"])
        module.strategy.load_state_dict(state["strategy"])
    except RuntimeError as exc:  # shapes of another architecture, or of a version before padding
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise BudgetKDError(
            f"the checkpoint does not fit this run's model ({detail[:160]}); it was written by another "
            "configuration or budgetkd version — start the run again (--force) or resume it with that version"
        ) from None
    optimizer.load_state_dict(state["optimizer"])
    return Meter.from_state_dict(state["meter"])


def restore_rng(
    state: dict, *, rank: int, world_size: int, device: torch.device, seed: int, step: int
) -> int | None:
    """This rank's dropout RNG from the checkpoint. With the same number of processes every
    rank continues its own stream exactly; returns None. With another number there is no such
    stream to continue (rank r of W' is no rank of W); rather than refuse a resumption that is
    otherwise exact (data order, masks and gradients do not depend on the process count), each
    rank's stream is re-derived from (seed, rank, step); returns the checkpoint's process count."""
    rng = state.get("rng")
    if rng is None:  # a checkpoint of an earlier version: rank 0's generator only
        rng = {
            "world_size": 1,
            "cpu": [state["rng_cpu"]],
            "cuda": [state["rng_cuda"]] if state.get("rng_cuda") is not None else None,
        }
    if rng["world_size"] == world_size:
        torch.set_rng_state(rng["cpu"][rank].cpu())
        if rng.get("cuda") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"][rank].cpu(), device)
        return None
    torch.manual_seed(dropout_seed(seed, rank, step))
    return rng["world_size"]


def consumed_at(entry: dict, currency: str, batch_size: int, num_train: int) -> float:
    """The amount of a budget currency consumed at a history entry."""
    if currency == "epochs":
        return entry["step"] * batch_size / max(1, num_train)
    return float(entry[{"time": "time_s", "flops": "flops", "tokens": "tokens", "steps": "step"}[currency]])


def check_snapshot(state: dict, path: str, init_fingerprint: str) -> None:
    """A branch continues a snapshot of a run trained from the same initial weights."""
    if state.get("init_fingerprint") != init_fingerprint:
        raise BudgetKDError(f"snapshot {path} was trained from other initial weights than this run")


def rebased_history(
    history: list[dict], consumed: Callable[[dict], float], budget_amount: float
) -> list[dict]:
    """A snapshot's evaluations with their budget fraction re-expressed in this run's budget."""
    return [{**entry, "budget_fraction": min(1.0, consumed(entry) / budget_amount)} for entry in history]
