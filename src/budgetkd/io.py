"""File helpers shared by every command: atomic writes, JSON/YAML reading with one-line errors,
an exclusive lock per output directory, and content fingerprints.

Every file a run produces is written to a temporary name in the same directory and renamed into
place (``os.replace`` is atomic on POSIX), so a process killed at any moment leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from budgetkd.errors import BudgetKDError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once, at import (single-threaded)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def _atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` for the caller to fill; on success it is fsynced, given
    the mode a plain ``open`` would have (``mkstemp`` makes it 0600) and renamed onto ``path``;
    on any failure it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    with _atomic_target(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` through a temporary file and a rename."""
    import torch

    with _atomic_target(path) as tmp:
        torch.save(obj, tmp)


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing an older one.

    The old directory is first renamed aside, so at every instant either the old or the new
    complete directory exists under ``final_dir`` or its ``.old`` sibling (which readers accept).
    """
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON, turning a missing or malformed file into a one-line :class:`BudgetKDError`."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise BudgetKDError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BudgetKDError(f"{what} {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise BudgetKDError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Read YAML (or JSON), with one-line errors naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BudgetKDError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise BudgetKDError(f"{what} {path} is a directory, expected a YAML file") from None
    except UnicodeDecodeError:
        raise BudgetKDError(f"{what} {path} is not UTF-8 text") from None
    except OSError as exc:
        raise BudgetKDError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BudgetKDError(f"{what} {path}{where}: malformed YAML ({problem})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class DirectoryLock:
    """An exclusive, advisory lock on an output directory (``DIR/.lock``, ``flock``).

    A second process that tries to write the same directory gets a clear error instead of
    interleaving its files with the first one. The kernel releases the lock when the holder dies,
    so a SIGKILLed run never leaves a stale lock behind.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._handle = None
        self._created: list[Path] = []  # what acquire made (removed again if nothing else came)

    def acquire(self) -> DirectoryLock:
        missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        lock_file = self.directory / ".lock"
        had_lock = lock_file.exists()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise BudgetKDError(f"{self.directory} exists and is not a directory") from None
        handle = open(self.directory / ".lock", "a+")  # noqa: SIM115 - held for the lock's life
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise BudgetKDError(
                    f"{self.directory} is in use by another budgetkd process; wait for it or choose another --out"
                ) from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        self._created = ([] if had_lock else [lock_file]) + missing
        return self

    def release(self) -> None:
        """Unlock; a lock file (and directories) that this lock created in a directory where
        nothing else was written are removed, so a refused run leaves no trace (still locked
        while it is deleted: no other process can hold it then)."""
        if self._handle is not None:
            with contextlib.suppress(OSError):
                if self._created and self._created[0].name == ".lock":
                    if [p.name for p in self.directory.iterdir()] == [".lock"]:
                        self._created[0].unlink()
                for folder in (
                    self._created[1:] if self._created and self._created[0].name == ".lock" else self._created
                ):
                    folder.rmdir()  # only when empty
                fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(directory: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold :class:`DirectoryLock` on ``directory`` for the ``with`` block (no-op if disabled)."""
    if not enabled:
        yield
        return
    with DirectoryLock(directory):
        yield
