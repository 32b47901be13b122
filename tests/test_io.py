"""budgetkd.io: atomic writes replace whole files, leave nothing behind on failure, and give
results the permissions of an ordinary file (not mkstemp's private 0600)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from budgetkd.io import atomic_torch_save, atomic_write_json, atomic_write_text, read_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_have_an_ordinary_files_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "b.json", {"k": 1})
    atomic_torch_save(tmp_path / "c.pt", {"t": torch.ones(2)})
    for name in ("a.txt", "b.json", "c.pt"):
        assert _mode(tmp_path / name) == _mode(plain), name  # what open() gives under this umask


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert read_json(target) == {"v": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "checkpoint.pt"
    atomic_torch_save(target, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save(target, {"bad": Unpicklable()})
    assert torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
