"""The training step against losses recorded from the code before its host syncs were removed
(issue 22 item 3): 20 steps of every strategy on CPU, total loss and every component within 1e-6
and within 1e-6 relative (the MiniLM losses of a random teacher are ~1e-3). Record with
``PYTHONPATH=src python tests/golden/steps.py`` (only when a change is *meant* to move them)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("budgetkd_golden_steps", GOLDEN / "steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.record(tmp_path_factory.mktemp("golden-steps"))


@pytest.mark.parametrize("strategy", ["none", "vanilla", "tinybert", "minilm", "minilmv2"])
def test_step_losses_equal_the_recorded_ones(recorded, strategy):
    golden = json.loads((GOLDEN / "steps.json").read_text())["steps"][strategy]
    got = recorded[strategy]
    assert len(got) == len(golden) == 20
    for index, (new, old) in enumerate(zip(got, golden)):
        assert _close(new["loss"], old["loss"]), (index, new["loss"], old["loss"])
        assert sorted(new["parts"]) == sorted(old["parts"])
        for key, value in old["parts"].items():
            assert _close(new["parts"][key], value), (index, key, new["parts"][key], value)


def _close(new: float, old: float) -> bool:
    return abs(new - old) <= 1e-6 and abs(new - old) <= 1e-6 * abs(old)
