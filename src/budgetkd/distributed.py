"""``torch.distributed`` plumbing for ``torchrun`` launches (gloo on CPU, NCCL on GPU).

Launch: ``torchrun --nproc_per_node N -m budgetkd pretrain …``; across machines add torchrun's
usual rendezvous flags (``--nnodes``, ``--node_rank``, ``--rdzv_backend c10d``,
``--rdzv_endpoint HOST:PORT``). Without torchrun's environment every helper here is a no-op, so
the single-process path has no distributed code in it.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_if_launched(timeout_s: float = 1800.0) -> None:
    """Initialise the default process group when started by torchrun (idempotent)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return (
        dist.get_rank()
        if is_distributed()
        else int(os.environ.get("RANK", 0))
        if launched_by_torchrun()
        else 0
    )


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def wrap_ddp(module: nn.Module, device: torch.device, find_unused: bool = False) -> nn.Module:
    """DDP around what trains (student + projections); the teacher is never wrapped."""
    if not is_distributed():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused)


def no_sync(model: nn.Module):
    """Skip the gradient all-reduce on non-final accumulation micro-steps."""
    inner = getattr(model, "_orig_mod", model)  # through torch.compile
    if hasattr(inner, "no_sync"):
        return inner.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not is_distributed():
        return tensor
    work = tensor.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.cpu()


def broadcast_floats(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values on every rank (the run's clock and stop decision)."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
