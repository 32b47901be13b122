"""``budgetkd compare``: config validation, an end-to-end run on real data, stage resume."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from budgetkd.cli import main
from budgetkd.config import validate_experiment
from budgetkd.errors import BudgetKDError
from budgetkd.experiment import compare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not available")


def base_config() -> dict:
    return {
        "name": "ci",
        "seed": 0,
        "data": {
            "inputs": [str(SHARED / "corpus" / "wikitext-2-raw" / "wiki.valid.raw")],
            "tokenizer": {"train": 1000},
        },
        "teacher": {
            "pretrain": {
                "student": {"layers": 2, "hidden": 64, "heads": 4},
                "budget": "6steps",
                "batch_size": 16,
            }
        },
        "student": {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
        "strategies": ["none", "vanilla", "tinybert", "minilm", "minilmv2"],
        # FLOPs: deterministic budgets, so a resumed run must equal an uninterrupted one
        "budget": {"calibrate": {"strategy": "none", "epochs": 0.05, "currency": "flops"}},
        "optimizer": {"batch_size": 16},
        "training": {"num_evals": 2, "eval_sequences": 32, "dropout": 0.0},
        "glue": {
            "dir": str(SHARED / "glue"),
            "tasks": ["rte"],
            "grid": "lr=1e-4,bs=32",
            "epochs": 1,
            "max_train_examples": 32,
            "max_eval_examples": 32,
        },
    }


def _with(config: dict, dotted: str, value) -> dict:
    config = copy.deepcopy(config)
    node = config
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()


@pytest.mark.parametrize(
    ("dotted", "value", "message"),
    [
        ("bogus", 1, "bogus: unknown config key"),
        ("data.bogus", 1, "data.bogus: unknown config key"),
        ("data.inputs", _DELETE, "'data.inputs' is required"),
        ("data.inputs", [], "'data.inputs' must not be empty"),
        ("data.seq_len", "long", "data.seq_len: must be an integer, got 'long'"),
        (
            "data.tokenizer",
            {"train": 10, "extra": 1},
            "data.tokenizer.extra: unknown config key (known: train)",
        ),
        ("student", _DELETE, "'student' is required"),
        ("student", "bert-huge", "unknown student preset"),
        ("strategies", _DELETE, "'strategies' is required"),
        ("strategies", [], "strategies: must not be empty"),
        ("strategies", ["none", "distilbert"], "strategies[1]: unknown strategy 'distilbert'"),
        (
            "strategies",
            ["none", {"name": "vanilla", "options": {"temprature": 2}}],
            "strategies[1]: unknown option 'temprature'",
        ),
        ("strategies", ["none", {"name": "vanilla", "bogus": 1}], "strategies[1].bogus: unknown config key"),
        ("strategies", ["none", "none"], "appears twice"),
        ("strategies", ["none", {"name": "vanilla", "lr": "fast"}], "strategies[1].lr: must be a number"),
        ("teacher", _DELETE, "'teacher' is required"),
        ("teacher", {"path": "x", "pretrain": {}}, "exactly one of 'path' and 'pretrain'"),
        ("teacher.pretrain", {"student": "bert-mini"}, "teacher.pretrain.budget: is required"),
        ("teacher.pretrain", {"student": "bert-mini", "budget": "5parsecs"}, "unknown budget unit"),
        ("budget", _DELETE, "'budget' must be a mapping"),
        ("budget", {"explicit": "1h", "calibrate": {}}, "exactly one of 'calibrate' and 'explicit'"),
        ("budget", {"explicit": "-3steps"}, "malformed budget"),
        (
            "budget.calibrate.currency",
            "tokens",
            "budget.calibrate.currency: must be 'time' or 'flops', got 'tokens'",
        ),
        ("budget.calibrate.epochs", 3, "set data_setting: limited"),
        ("budget.calibrate.strategy", "vanilla", "without teacher"),
        ("data_setting", "infinite", "data_setting: must be 'unlimited' or 'limited'"),
        ("optimizer.batch_size", 0, "optimizer.batch_size: must be > 0, got 0"),
        ("optimizer.micro_batch_size", 64, "optimizer.micro_batch_size: must lie in 1..batch_size"),
        ("optimizer.lr_kd", "5e-4x", "optimizer.lr_kd: must be a number, got '5e-4x'"),
        ("training.on_nonfinite", "ignore", "training.on_nonfinite: must be 'stop' or 'skip'"),
        ("training.dropout", True, "training.dropout: must be a number, got True"),
        ("glue.tasks", ["rte", "wnli"], "wnli"),
        ("glue.grid", "lr=abc", "grid"),
        ("glue.seeds", ["one"], "glue.seeds[0]: must be an integer"),
        # ranges, declared once in the schema (they used to pass here and fail in the trainer)
        ("optimizer.warmup", 1.5, "optimizer.warmup: must be ≥ 0 and < 1, got 1.5"),
        ("training.dropout", 1.5, "training.dropout: must be ≥ 0 and < 1, got 1.5"),
        ("optimizer.adam_betas", [0.9], "optimizer.adam_betas: must have at least 2 items"),
        ("optimizer.adam_betas", [0.9, 1.2], "optimizer.adam_betas[1]: must be ≥ 0 and < 1, got 1.2"),
        ("data.validation_fraction", 0, "data.validation_fraction: must be > 0 and < 1, got 0"),
        ("glue.epochs", 0, "glue.epochs: must be > 0, got 0"),
        ("training.checkpoint_every_steps", -1, "training.checkpoint_every_steps: must be ≥ 0, got -1"),
        ("seed", -1, "seed: must be ≥ 0, got -1"),
        ("budget.decay_fraction", 0, "budget.decay_fraction: must be > 0 and ≤ 1, got 0"),
    ],
)
def test_every_config_error_is_one_line_naming_the_key(dotted, value, message):
    with pytest.raises(BudgetKDError) as info:
        validate_experiment(_with(base_config(), dotted, value))
    text = str(info.value)
    assert "\n" not in text
    assert message in text


def test_tokenizer_teacher_needs_a_given_teacher():
    config = _with(base_config(), "data.tokenizer", "teacher")
    with pytest.raises(BudgetKDError, match="trained by budgetkd uses the data's tokenizer"):
        validate_experiment(config)


def test_defaults_are_filled_in():
    cfg = validate_experiment(base_config())
    assert cfg["data_setting"] == "unlimited"
    assert cfg["optimizer"]["lr_no_kd"] == 1e-3 and cfg["optimizer"]["lr_kd"] == 5e-4
    assert cfg["optimizer"]["adam_betas"] == [0.9, 0.98] and cfg["optimizer"]["warmup"] == 0.06
    assert [s["name"] for s in cfg["strategies"]] == ["none", "vanilla", "tinybert", "minilm", "minilmv2"]


def test_shipped_configs_validate():
    from budgetkd.config import load_experiment

    configs = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in configs.glob("*.yaml"))
    assert names == [
        "demo-seeds.yaml",
        "demo-self-teacher.yaml",
        "demo-sweep.yaml",
        "demo.yaml",
        "paper-12l.yaml",
        "paper-6l-limited.yaml",
        "paper-6l.yaml",
    ]
    for name in names:
        cfg = load_experiment(configs / name)
        assert cfg["strategies"][0]["name"] == "none"
    assert load_experiment(configs / "paper-6l.yaml")["optimizer"]["batch_size"] == 1024


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    config_path = _write(tmp, base_config())
    out = tmp / "out"
    assert main(["compare", str(config_path), "--out", str(out), "--no-progress"]) == 0
    return config_path, out


def test_end_to_end_compare_writes_the_table_and_enforces_fairness(finished):
    _, out = finished
    table = (out / "table.md").read_text()
    for display in ("No-KD", "Vanilla-KD", "TinyBERT", "MiniLM", "MiniLMv2"):
        assert f"| {display} |" in table
    fairness = json.loads((out / "fairness.json").read_text())
    assert fairness["ok"] is True and fairness["differs"] == []
    assert set(fairness["rules"]) == {"none", "vanilla", "tinybert", "minilm", "minilmv2"}
    assert {json.dumps(r, sort_keys=True) for r in fairness["rules"].values()} == {
        json.dumps(fairness["rules"]["none"], sort_keys=True)
    }
    assert fairness["rules"]["none"]["schedule"] == "linear"
    assert fairness["rules"]["none"]["teacher_cost"] == "inference"
    summaries = {
        label: json.loads((out / "runs" / label / "summary.json").read_text())
        for label in ("none", "vanilla", "tinybert", "minilm", "minilmv2")
    }
    assert len({s["init_fingerprint"] for s in summaries.values()}) == 1
    assert len({s["data_fingerprint"] for s in summaries.values()}) == 1
    budget = float(summaries["vanilla"]["budget"]["amount"])
    assert budget == pytest.approx(summaries["none"]["consumed"]["flops"])
    for label in ("vanilla", "tinybert", "minilm", "minilmv2"):
        consumed = summaries[label]["consumed"]
        assert consumed["flops"] >= budget  # stopped by the calibrated budget …
        assert consumed["tokens"] < summaries["none"]["consumed"]["tokens"]  # … with fewer tokens
        assert consumed["flops_teacher"] > 0
    for name in ("glue_scores.png", "val_loss.png", "tokens.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_rerun_skips_every_finished_stage(finished, monkeypatch):
    config_path, out = finished

    def boom(*args, **kwargs):
        raise AssertionError("a finished stage was redone")

    monkeypatch.setattr("budgetkd.train.pretrain", boom)
    monkeypatch.setattr("budgetkd.glue.run_glue", boom)
    monkeypatch.setattr("budgetkd.data.prepare_dataset", boom)
    compare(config_path, out, progress=False)


def test_changed_config_of_a_finished_stage_is_refused_unless_forced(finished, tmp_path):
    config_path, out = finished
    changed = _write(
        tmp_path, _with(base_config(), "strategies.1", {"name": "vanilla", "options": {"temperature": 2.0}})
    )
    with pytest.raises(BudgetKDError, match=r"stage 'pretrain:vanilla' changed.*--force pretrain:vanilla"):
        compare(changed, out, progress=False)
    with pytest.raises(BudgetKDError, match="no such stage"):
        compare(config_path, out, force=["pretrain:bogus"], progress=False)


def test_killed_pretraining_stage_resumes_to_the_same_weights(finished, tmp_path, monkeypatch):
    """A copy of the finished experiment rolled back to before the MiniLM stage is re-run and
    'killed' (an exception out of the training step) after two checkpointed steps; re-running
    resumes from the checkpoint, never redoes the finished stages, and ends with the weights of
    the uninterrupted run (FLOPs budget: deterministic)."""
    import torch

    from budgetkd.train import Pretrainer

    _, out = finished
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir)
    state = json.loads((copy_dir / "state.json").read_text())
    for stage in ("pretrain:minilm", "glue:minilm", "report"):
        state["stages"].pop(stage)
    (copy_dir / "state.json").write_text(json.dumps(state))
    shutil.rmtree(copy_dir / "runs" / "minilm")
    shutil.rmtree(copy_dir / "glue" / "minilm")
    config_path = _write(tmp_path, _with(base_config(), "training.checkpoint_every_steps", 1))

    original_step = Pretrainer.train_step

    def killed_after_two_steps(self, step, lr):
        if step == 2 and self.config.strategy == "minilm":
            raise KeyboardInterrupt("killed")
        return original_step(self, step, lr)

    monkeypatch.setattr(Pretrainer, "train_step", killed_after_two_steps)
    with pytest.raises(KeyboardInterrupt):
        compare(config_path, copy_dir, progress=False)
    run = copy_dir / "runs" / "minilm"
    assert (run / "checkpoint.pt").exists() and not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["meter"]["steps"] == 2

    monkeypatch.setattr(Pretrainer, "train_step", original_step)
    monkeypatch.setattr("budgetkd.data.prepare_dataset", lambda *a, **k: pytest.fail("data stage redone"))
    compare(config_path, copy_dir, progress=False)
    first = torch.load(out / "runs" / "minilm" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)
    assert resumed["meter"]["steps"] == first["meter"]["steps"] > 2
    for key, value in first["student"].items():
        assert torch.equal(value, resumed["student"][key]), key
    # the GLUE table is identical; the budget table below it differs only in measured seconds
    main_table = lambda path: path.read_text().split("## Budget accounting")[0]  # noqa: E731
    assert main_table(copy_dir / "table.md") == main_table(out / "table.md")


def test_the_teacher_stage_checkpoints_like_every_other_stage(tmp_path, monkeypatch):
    """training.checkpoint_interval_s / checkpoint_every_steps reach the teacher's pretraining,
    often the longest stage, as they reach the calibration and KD runs."""
    from budgetkd.experiment import Experiment

    class Stop(Exception):
        pass

    seen = {}

    def capture(self, config, stage):
        seen[stage] = config
        raise Stop

    monkeypatch.setattr(Experiment, "_pretrain", capture)
    config = _with(base_config(), "training.checkpoint_every_steps", 3)
    config = _with(config, "training.checkpoint_interval_s", 42.0)
    with pytest.raises(Stop):
        compare(_write(tmp_path, config), tmp_path / "out", progress=False)
    teacher = seen["teacher"]
    assert (teacher.checkpoint_every_steps, teacher.checkpoint_interval_s) == (3, 42.0)


def test_foreign_output_directories_are_refused_and_our_own_leftovers_are_not(tmp_path):
    from budgetkd.experiment import _refuse_foreign

    out = tmp_path / "out"
    _refuse_foreign(out)  # absent: fine
    out.mkdir()
    for name in (".lock", "plan.json", ".budgetkd-write-check-x1y2", ".experiment.json.abc.tmp"):
        (out / name).write_text("")
    _refuse_foreign(out)  # what budgetkd ranks leave before experiment.json: fine
    (out / "thesis.tex").write_text("")
    with pytest.raises(BudgetKDError, match="not empty and holds no budgetkd experiment.*thesis.tex"):
        _refuse_foreign(out)
    (out / "experiment.json").write_text("{}")
    _refuse_foreign(out)  # an experiment: resumed, whatever else lies beside it
