"""``budgetkd schema``: the JSON Schema of an experiment YAML, generated from the one config
declaration (budgetkd.config). Every shipped config validates against it (checked with the
independent ``jsonschema`` package), the shipped copy beside the configs is current, and the
schema refuses what the loader refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def schema() -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "budgetkd", "schema"], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_every_shipped_config_validates_against_the_schema(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert len(names) == 7
    for name in names:
        text = (CONFIGS / name).read_text()
        assert text.startswith("# yaml-language-server: $schema=experiment.schema.json\n"), name
        jsonschema.validate(yaml.safe_load(text), schema)


def test_the_shipped_schema_file_is_current(schema):
    assert json.loads((CONFIGS / "experiment.schema.json").read_text()) == schema


@pytest.mark.parametrize(
    ("dotted", "value"),
    [("optimizer.warmup", 1.5), ("training.dropout", -0.1), ("optimizer.bacth_size", 8), ("data_setting", "x"),
     ("optimizer.batch_size", 0), ("budget.schedule", "cosine")],
)  # fmt: skip
def test_the_schema_refuses_what_the_loader_refuses(schema, dotted, value):
    from budgetkd.config import validate_experiment
    from budgetkd.errors import BudgetKDError

    config = yaml.safe_load((CONFIGS / "paper-6l.yaml").read_text())
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)
    with pytest.raises(BudgetKDError):
        validate_experiment(config)
