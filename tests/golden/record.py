"""Golden outputs of budgetkd, recorded before a refactor and compared after it (tests/test_golden.py).

    python tests/golden/record.py            # rewrite tests/golden/*.json from the current code

What is recorded (all offline, a few seconds, no training):

* ``experiments.json``: the resolved experiment (``load_experiment``) of every shipped config;
* ``config_errors.json``: the one-line error of every invalid config of
  ``tests/test_experiment.py``'s parametrised list (key path and text);
* ``plans.json``: ``compare --dry-run`` of the paper configs (offline, 8 processes, an assumed
  throughput) and of small test configs on a prepared dataset — every stage's steps, tokens, FLOPs;
* ``fingerprints.json``: the stage fingerprints (data, teacher, calibrate, pretrain) of a tiny
  compare that trains nothing but the calibration (FLOP budgets: deterministic);
* ``help.json``: ``--help`` of every command.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["COLUMNS"] = "100"


def shipped_configs() -> dict:
    from budgetkd.config import load_experiment

    return {p.name: load_experiment(p) for p in sorted((ROOT / "configs").glob("*.yaml"))}


def config_errors() -> dict:
    import test_experiment as te

    from budgetkd.config import validate_experiment
    from budgetkd.errors import BudgetKDError

    marks = te.test_every_config_error_is_one_line_naming_the_key.pytestmark
    cases = next(m for m in marks if m.name == "parametrize").args[1]
    out = {}
    for dotted, value, _fragment in cases:
        key = f"{dotted}={'<deleted>' if value is te._DELETE else json.dumps(value)}"
        try:
            validate_experiment(te._with(te.base_config(), dotted, value))
            out[key] = None
        except BudgetKDError as exc:
            out[key] = str(exc)
    return out


def _normalise(value, out: str):
    """Paths of the temporary output directory and of ../shared replaced by placeholders."""
    text = json.dumps(value, default=str).replace(out, "<OUT>").replace(str(SHARED), "<SHARED>")
    return json.loads(text)


def plans(tmp: Path) -> dict:
    from budgetkd.experiment import dry_run

    result = {}
    for name in ("paper-6l.yaml", "paper-12l.yaml", "paper-6l-limited.yaml"):
        out = tmp / name
        with contextlib.redirect_stdout(io.StringIO()):
            plan = dry_run(ROOT / "configs" / name, out, world_size=8, assume_tokens_per_s=3e5)
        result[name] = _normalise(plan, str(out))
    for name, config in small_configs(tmp).items():
        out = tmp / f"small-{name}"
        with contextlib.redirect_stdout(io.StringIO()):
            plan = dry_run(config, out, world_size=1, assume_tokens_per_s=1e4)
        result[name] = json.loads(json.dumps(_normalise(plan, str(out))).replace(str(tmp), "<TMP>"))
    return result


def small_configs(tmp: Path) -> dict[str, Path]:
    """Small compares on one prepared dataset (explicit, calibrated, sweep, teacher_cost modes)."""
    import yaml

    data = prepared_data(tmp)
    base = {
        "data": {"prepared": str(data), "tokenizer": {"train": 300}, "seq_len": 32},
        "teacher": {"pretrain": {"student": {"layers": 2, "hidden": 32, "heads": 4}, "budget": "4steps",
                                 "batch_size": 8}},
        "student": {"layers": 1, "hidden": 16, "heads": 4, "intermediate": 32},
        "strategies": ["none", "tinybert", "minilm"],
        "optimizer": {"batch_size": 8},
        "training": {"num_evals": 1, "eval_sequences": 8, "device": "cpu", "fixed_mask_count": True},
        "glue": {"dir": str(SHARED / "glue"), "tasks": ["rte"], "grid": "lr=1e-4,bs=8", "epochs": 1,
                 "max_train_examples": 8, "max_eval_examples": 8},
    }  # fmt: skip
    variants = {
        "explicit-steps": {"budget": {"explicit": "5steps"}},
        "explicit-flops": {"budget": {"explicit": "2e8flops"}},
        "calibrated-flops": {"budget": {"calibrate": {"epochs": 0.5, "currency": "flops"}}},
        "calibrated-time": {"budget": {"calibrate": {"epochs": 0.5, "currency": "time"}}},
        "sweep-steps": {"budget": {"explicit": "7steps", "sweep": [0.5, 1, 2]}, "data_setting": "limited"},
        "sweep-wsd-flops": {
            "budget": {"explicit": "3e9flops", "sweep": [0.5, 1], "schedule": "wsd"},
            "data_setting": "limited",
        },
        "free-flops": {"budget": {"explicit": "1e8flops"}, "teacher_cost": "free"},
        "amortized-flops": {
            "budget": {"explicit": "2e8flops"},
            "teacher_cost": {"amortized": {"pretraining": "1e8flops", "students": 4}},
        },
    }
    paths = {}
    for name, change in variants.items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **base, **change}))
        paths[name] = path
    return paths


def prepared_data(tmp: Path) -> Path:
    from conftest import corpus_file

    from budgetkd.data import prepare_dataset

    out = tmp / "data"
    if not (out / "meta.json").exists():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            prepare_dataset([corpus_file("gutenberg/blake-poems.txt")], out, train_tokenizer=300, seq_len=32,
                            validation_fraction=0.1, seed=0, progress=False)  # fmt: skip
    return out


def fingerprints(tmp: Path) -> dict:
    """A compare killed right after its pretraining: the fingerprints written so far. A student's
    fingerprint names its teacher's path, so the experiment lives at one fixed place."""
    import shutil
    import tempfile

    import yaml

    from budgetkd import experiment

    tmp = Path(tempfile.gettempdir()) / "budgetkd-golden-fingerprints"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    config = yaml.safe_load(small_configs(tmp)["calibrated-flops"].read_text())
    config["strategies"] = ["none", "tinybert"]
    path = tmp / "fingerprints.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp / "fp-out"

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    from budgetkd.glue import pipeline

    original = pipeline.plan_glue
    pipeline.plan_glue = stop
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            experiment.compare(path, out, progress=False)
    except Stop:
        pass
    finally:
        pipeline.plan_glue = original
    state = json.loads((out / "state.json").read_text())
    return {stage: entry["fingerprint"] for stage, entry in sorted(state["stages"].items())}


def helps() -> dict:
    from budgetkd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {"budgetkd": parser.format_help()} | {
        name: p.format_help() for name, p in sorted(sub.choices.items())
    }


def record_all(tmp: Path) -> dict:
    return {
        "experiments": shipped_configs(),
        "config_errors": config_errors(),
        "plans": plans(tmp),
        "fingerprints": fingerprints(tmp),
        "help": helps(),
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, value in record_all(Path(tmp)).items():
            (HERE / f"{name}.json").write_text(
                json.dumps(value, indent=1, sort_keys=True, default=str) + "\n"
            )
            print(f"wrote {HERE / (name + '.json')}")
