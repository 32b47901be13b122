"""``torch.distributed`` plumbing for ``torchrun`` launches (gloo on CPU, NCCL on GPU), and the
background prefetcher of a step's micro-batches.

Launch: ``torchrun --nproc_per_node N -m budgetkd pretrain …``; across machines add torchrun's
usual rendezvous flags (``--nnodes``, ``--node_rank``, ``--rdzv_backend c10d``,
``--rdzv_endpoint HOST:PORT``). Without torchrun's environment every helper here is a no-op, so
the single-process path has no distributed code in it.

What a multi-process run does (SPEC §1, §3):

* DDP wraps only what trains (student + the strategy's projections); every rank loads its own
  frozen teacher, which is never wrapped and never communicates;
* every rank takes its contiguous slice of the same global batch (``StepBatches``), so W
  processes with micro-batch b see exactly the sequences and masks of one process with
  micro-batch W·b, and the gradient is the same up to float summation order;
* gradients are all-reduced once per optimizer step (``no_sync`` on the other micro-steps);
* rank 0's clock is broadcast every step, so all ranks charge the same time and stop on the
  same step; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_if_launched(timeout_s: float = 1800.0) -> None:
    """Initialise the default process group when started by torchrun (idempotent).

    On a machine with CUDA the group gets NCCL for CUDA tensors *and* gloo for CPU tensors, so a
    ``--device cpu`` run (or any CPU-side collective) still works there; without CUDA, gloo.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        if local_rank() < torch.cuda.device_count():  # more CPU ranks than GPUs: --device cpu
            torch.cuda.set_device(local_rank())
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
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
    """DDP around what trains (student + projections); the teacher is never wrapped.

    No buffer sync in forward (``forward_sync_buffers=False``, formerly ``broadcast_buffers``): a
    BERT's only buffers are the constant ``position_ids`` / ``token_type_ids`` tables, identical on
    every rank, so re-broadcasting them before each synchronised forward (DDP's default) is a
    collective per optimizer step that buys nothing.
    """
    if not is_distributed():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # torch ≥ 2.13 names it forward_sync_buffers (and warns about the old name)
    arguments = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in arguments
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        module, device_ids=device_ids, find_unused_parameters=find_unused, **no_buffer_sync
    )


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


def gather_tensors(tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all ranks), on CPU, in rank order; a
    one-element list without torchrun. Collective: every rank must call it."""
    if not is_distributed():
        return [tensor.cpu()]
    work = tensor.to(device)
    out = [torch.empty_like(work) for _ in range(world_size())]
    dist.all_gather(out, work)
    return [t.cpu() for t in out]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Background data loading
# ---------------------------------------------------------------------------------------------


class Prefetcher:
    """Prepares the micro-batches of the next steps in a background thread.

    ``get(step)`` returns exactly ``batches.micro_batches(step)`` (a step's batch is a pure
    function of the step number: order from the data seed, masks from a generator seeded by the
    step; no global RNG is touched), so results are unchanged; only the memory-map gather and the
    masking of step k+1 overlap the compute of step k. With ``pin=True`` (CUDA) the tensors are
    page-locked, so ``.to(device, non_blocking=True)`` is a true asynchronous copy.

    Steps are expected in increasing order (the training loop's); asking for another step than
    the one prepared (a resume, a skipped step) restarts the producer there. Errors raised while
    preparing a step are re-raised by ``get`` in the caller's thread. Time spent blocked in
    ``get`` is "waiting for data", which the budget charges (SPEC §3).

    Use::

        prefetcher = Prefetcher(self.batches, start_step=self.meter.steps, pin=device.type == "cuda")
        try:
            ... micro_batches = prefetcher.get(step) ...
        finally:
            prefetcher.close()
    """

    def __init__(self, batches, start_step: int = 0, *, pin: bool = False, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.batches = batches
        self.pin = bool(pin) and torch.cuda.is_available()
        self.depth = depth
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._next = start_step
        self._start(start_step)

    def _start(self, step: int) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._produce,
            args=(step, self._queue, self._stop),
            name="budgetkd-prefetch",
            daemon=True,
        )
        self._thread.start()

    def _produce(self, step: int, out: queue.Queue, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                item = (step, self._prepare(step), None)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = (step, None, exc)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def _prepare(self, step: int):
        micro_batches = self.batches.micro_batches(step)
        if self.pin:
            for micro in micro_batches:
                micro.input_ids = micro.input_ids.pin_memory()
                micro.attention_mask = micro.attention_mask.pin_memory()
                micro.labels = micro.labels.pin_memory()
                if micro.positions is not None:
                    micro.positions = micro.positions.pin_memory()
        return micro_batches

    def get(self, step: int):
        """The micro-batches of ``step`` (see the class docstring)."""
        if self._thread is None:
            raise RuntimeError("the prefetcher is closed")
        if step != self._next:
            self._restart(step)
        while True:
            try:
                got_step, micro_batches, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():  # died without reporting (cannot happen normally)
                    self._restart(step)
        if got_step != step:  # defensive: never hand out another step's batch
            self._restart(step)
            return self.get(step)
        if error is not None:
            self.close()
            raise error
        self._next = step + 1
        return micro_batches

    def _restart(self, step: int) -> None:
        self._shutdown()
        self._next = step
        self._start(step)

    def _shutdown(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5.0)
        self._thread = None

    def close(self) -> None:
        """Stop the producer thread (idempotent)."""
        self._shutdown()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
