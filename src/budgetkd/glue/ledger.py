"""The GLUE grid as independent jobs that every rank takes through the shared file system.

A *job* is one (student, task, batch size, seed) with one learning rate, or a stacked group of
them (:mod:`budgetkd.glue.stacked`). Its per-run files (``runs/<task>/lr…-bs…-seed….json`` and
``….predictions.json``) are the ledger: a job is done when every member's run file is there with
the right fingerprint, whoever wrote it.

Every rank runs :func:`run_jobs` over the same job list, sorted longest first (training examples ×
epochs × members, so MNLI and QQP start first and no rank finishes hours after the others), and
takes the first job that is neither done nor claimed:

- **claim**: ``claims/<task>/<job>.json`` = ``{host, node, pid, rank, token, claimed_at}``, written
  atomically while holding a POSIX lock (``fcntl.lockf``, which NFS supports) on
  ``claims/.lock``; the done-check and the claim happen under the same lock, so a job is never
  started twice by live ranks;
- **heartbeat**: a thread of the owner touches the claim's mtime every ``heartbeat_s``;
- **stale claim**: its owner's process is gone (same *node*, :func:`node_id`: host name, kernel
  boot id and PID namespace, so a container that shares the host name but not the PIDs never
  reads another's live claim as dead; there ``kill(pid, 0)`` fails) or its heartbeat is older
  than ``lease_s`` measured on the file system's own clock (a probe file is
  touched and its mtime read, so the clocks of several nodes never meet); a stale claim is
  replaced, and the job redone from the start (a job writes its run files only when it
  finished, so a dead rank loses its work in flight, never a result, and never leaves half a
  result that could be counted);
- **release**: the owner deletes its claim (only if it is still its own) after writing the run
  files, or when the job raised.

No collective is held open: a rank with nothing left to claim polls the ledger every ``poll_s``
until every job is done (taking over stale claims meanwhile), then returns. Per-job lines go to
a log file; rank 0 shows one progress bar for the whole grid.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from budgetkd.io import atomic_write_text

HEARTBEAT_S = float(os.environ.get("BUDGETKD_GLUE_HEARTBEAT_S", 15.0))
LEASE_S = float(os.environ.get("BUDGETKD_GLUE_LEASE_S", 300.0))
POLL_S = float(os.environ.get("BUDGETKD_GLUE_POLL_S", 2.0))


class Job(Protocol):
    """What :func:`run_jobs` needs of a job (implemented by :class:`budgetkd.glue.pipeline.GlueJob`)."""

    label: str  # human-readable, for the log
    claim_path: Path  # claims/<task>/<name>.json
    members: int  # runs it produces
    units: int  # optimizer steps × members: the ETA's unit of work
    cost: float  # sort key, longest first

    def done(self) -> bool: ...

    def run(self, on_step: Callable[[int, int], None]) -> None: ...

    def measured_seconds(self) -> float | None: ...


def node_id() -> str:
    """Where a PID means this process's PID: ``host/boot id/PID namespace``. Two containers on one
    host name share the boot id (one kernel) but not the PID namespace; two machines cloned with
    one host name differ in boot id. Parts that cannot be read (not Linux) are left empty."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        boot = ""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{boot}/{namespace}"


@dataclass(frozen=True)
class Worker:
    host: str
    pid: int
    rank: int
    world: int
    node: str = ""  # node_id(): the PID namespace ``pid`` lives in

    @classmethod
    def here(cls, rank: int, world: int) -> Worker:
        return cls(socket.gethostname(), os.getpid(), rank, world, node_id())


# ----------------------------------------------------------------------------------------------
# claims


@contextlib.contextmanager
def _claims_lock(claims_root: Path) -> Iterator[None]:
    claims_root.mkdir(parents=True, exist_ok=True)
    with open(claims_root / ".lock", "a+") as handle:
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle.fileno(), fcntl.LOCK_UN)


def fs_now(directory: Path, worker: Worker) -> float:
    """The file system's clock: touch a probe file in ``directory`` and read its mtime."""
    namespace = hashlib.sha256(worker.node.encode()).hexdigest()[:8]
    probe = directory / f".clock-{worker.host}-{namespace}-{worker.pid}"
    probe.touch()
    os.utime(probe, None)
    return probe.stat().st_mtime


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def read_claim(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def claim_is_stale(path: Path, claim: dict | None, worker: Worker, lease_s: float) -> bool:
    """Dead owner in this PID namespace (same :func:`node_id`), unreadable claim, or no heartbeat
    for ``lease_s`` (FS clock). A claim of another node, or without a node (older claims), is
    judged by its heartbeat only: its PID means nothing here."""
    if claim is None:
        return True
    if worker.node and claim.get("node") == worker.node:
        pid = claim.get("pid")
        if not isinstance(pid, int) or not pid_alive(pid):
            return True
        if pid == worker.pid:  # our own, left by a job of this process that is no longer running
            return True
    try:
        age = fs_now(path.parent, worker) - path.stat().st_mtime
    except FileNotFoundError:
        return True
    return age > lease_s


class Claim:
    """A claim held by this process, with its heartbeat thread."""

    def __init__(self, path: Path, token: str, heartbeat_s: float):
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(self.path, None)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        with _claims_lock(self.path.parents[1]):
            current = read_claim(self.path)
            if current is not None and current.get("token") == self.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()


def try_claim(
    job: Job, worker: Worker, *, lease_s: float = LEASE_S, heartbeat_s: float = HEARTBEAT_S, log=None
) -> Claim | None:
    """Claim ``job`` for ``worker`` unless it is done or validly claimed by someone else."""
    path = job.claim_path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _claims_lock(path.parents[1]):
        if job.done():
            return None
        if path.exists():
            existing = read_claim(path)
            if not claim_is_stale(path, existing, worker, lease_s):
                return None
            if log is not None:
                owner = existing or {}
                log(
                    f"taking over stale claim on {job.label} "
                    f"(was host {owner.get('host')} pid {owner.get('pid')} rank {owner.get('rank')})"
                )
        token = uuid.uuid4().hex
        record = {
            "host": worker.host,
            "node": worker.node,
            "pid": worker.pid,
            "rank": worker.rank,
            "token": token,
            "claimed_at": time.time(),
            "job": job.label,
        }
        atomic_write_text(path, json.dumps(record) + "\n")
    return Claim(path, token, heartbeat_s)


# ----------------------------------------------------------------------------------------------
# the progress bar


class GridBar:
    """One bar for the whole grid: runs done / total; the ETA is the remaining optimizer steps
    (× members) times the measured seconds per step of the finished jobs, over the ranks."""

    def __init__(self, jobs: Sequence[Job], world: int, enabled: bool):
        self.world = max(1, world)
        self.total_units = sum(j.units for j in jobs)
        self.done_units = 0
        self.in_flight = 0
        self.seconds = 0.0
        self.measured_units = 0
        self.bar = tqdm(
            total=sum(j.members for j in jobs),
            desc="GLUE",
            unit="run",
            disable=not enabled,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} runs [{elapsed}{postfix}]",
            dynamic_ncols=True,
        )

    def job_done(self, job: Job) -> None:
        self.done_units += job.units
        seconds = job.measured_seconds()
        if seconds is not None and seconds > 0:
            self.seconds += seconds
            self.measured_units += job.units
        self.bar.update(job.members)
        self.show()

    def show(self) -> None:
        if self.measured_units:
            per_unit = self.seconds / self.measured_units
            left = max(0, self.total_units - self.done_units - self.in_flight) * per_unit / self.world
            eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 3600:.0f} h"
            self.bar.set_postfix_str(f"ETA {eta}", refresh=True)
        else:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------------------------
# the loop every rank runs


def run_jobs(
    jobs: Sequence[Job],
    *,
    worker: Worker,
    progress: bool = True,
    log_path: Path | None = None,
    poll_s: float = POLL_S,
    lease_s: float = LEASE_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> dict:
    """Take jobs until every job of ``jobs`` is done (by this rank or any other); return what
    this rank did: ``{"ran": [labels]}``."""
    order = sorted(jobs, key=lambda j: -j.cost)  # stable: grid order among equals
    log_handle = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_handle = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def log(message: str) -> None:
        if log_handle is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            log_handle.write(f"{stamp} {worker.host} rank {worker.rank} pid {worker.pid}: {message}\n")

    bar = GridBar(order, worker.world, enabled=progress and worker.rank == 0)
    finished: set[Path] = set()
    report: dict = {"ran": []}
    last_refresh = [0.0]

    def refresh() -> None:
        last_refresh[0] = time.monotonic()
        for job in order:
            if job.claim_path not in finished and job.done():
                finished.add(job.claim_path)
                bar.job_done(job)

    try:
        log(f"start: {len(order)} jobs, world size {worker.world}")
        while True:
            refresh()
            remaining = [j for j in order if j.claim_path not in finished]
            if not remaining:
                break
            ran = False
            for job in remaining:
                claim = try_claim(job, worker, lease_s=lease_s, heartbeat_s=heartbeat_s, log=log)
                if claim is None:
                    continue
                members = max(1, job.members)

                def on_step(step: int, total: int, job=job, members=members) -> None:
                    bar.in_flight = step * members
                    if time.monotonic() - last_refresh[0] > 5.0:
                        refresh()
                        bar.show()

                log(f"claimed {job.label}")
                started = time.perf_counter()
                try:
                    job.run(on_step)
                except BaseException as exc:
                    log(f"failed {job.label}: {type(exc).__name__}: {exc}")
                    raise
                finally:
                    bar.in_flight = 0
                    claim.release()
                log(f"finished {job.label} in {time.perf_counter() - started:.1f} s")
                report["ran"].append(job.label)
                ran = True
                break
            if not ran:
                time.sleep(poll_s)
        log(f"grid complete: this rank ran {len(report['ran'])} jobs")
    finally:
        bar.close()
        if log_handle is not None:
            log_handle.close()
    return report
