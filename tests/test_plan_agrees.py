"""The dry-run plan and the run agree: for small compares (calibrated; a steps budget with a
sweep; ``teacher_cost: free``; ``amortized`` without a sweep; unlimited data) every pretraining
stage's planned steps, tokens and FLOPs equal what the run then consumed (``summary.json``).
Both come from ``budgetkd.stages`` and the trainer's meter; the plan counts the prepared data's
rows and, with ``fixed_mask_count``, their masks, so its figures are exact, and says so.

The late refusals of 0.2 (issue 19) come before any stage here, in one line, within seconds."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA, TEACHER_ARCH

from budgetkd.cli import main
from budgetkd.experiment import compare, dry_run


class StopBeforeGlue(Exception):
    pass


def _config(data: Path, teacher: Path, **changes) -> dict:
    config = {
        "name": "agree",
        "data": {"prepared": str(data), "tokenizer": str(data / "tokenizer"), "seq_len": 64},
        "teacher": {"path": str(teacher)},
        "student": {"layers": 1, "hidden": 32, "heads": TEACHER_ARCH["heads"], "intermediate": 64},
        "strategies": ["none", "tinybert", "minilm"],
        "optimizer": {"batch_size": 8},
        "training": {"num_evals": 1, "eval_sequences": 8, "device": "cpu", "fixed_mask_count": True,
                     "checkpoint_interval_s": 0},
        "glue": {"dir": str(SHARED_DATA / "glue"), "tasks": ["rte"], "grid": "lr=1e-4,bs=8", "epochs": 1,
                 "max_train_examples": 8, "max_eval_examples": 8},
    }  # fmt: skip
    config.update(changes)
    return config


CASES = {
    "calibrated": {"budget": {"calibrate": {"epochs": 0.5, "currency": "flops"}}},
    "steps-sweep": {"budget": {"explicit": "6steps", "sweep": [0.5, 1, 2]}, "data_setting": "limited"},
    "free": {"budget": {"explicit": "3e8flops"}, "teacher_cost": "free"},
    "amortized": {
        "budget": {"explicit": "3e8flops"},
        "teacher_cost": {"amortized": {"pretraining": "4e8flops", "students": 4}},
    },
    "unlimited-tokens": {"budget": {"explicit": "5000tokens"}},
}


def _plan_then_run(config: dict, tmp_path: Path, monkeypatch) -> dict:
    """The dry-run plan of ``config``, then the compare itself, stopped before GLUE."""
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()):
        plan = dry_run(path, out)
    from budgetkd.glue import pipeline

    monkeypatch.setattr(pipeline, "plan_glue", lambda *a, **k: (_ for _ in ()).throw(StopBeforeGlue()))
    with pytest.raises(StopBeforeGlue), contextlib.redirect_stdout(io.StringIO()):
        compare(path, out, progress=False)
    return plan


@pytest.mark.parametrize("case", list(CASES))
def test_the_plan_is_what_the_run_consumes(case, tmp_path, tiny_data_dir, teacher_dir, monkeypatch):
    plan = _plan_then_run(_config(tiny_data_dir, teacher_dir, **CASES[case]), tmp_path, monkeypatch)
    runs = [s for s in plan["stages"] if s["stage"].startswith(("calibrate", "pretrain:"))]
    assert runs and all(s["exact"] for s in runs), [s["stage"] for s in runs if not s["exact"]]
    for stage in runs:
        consumed = json.loads((Path(stage["dir"]) / "summary.json").read_text())["consumed"]
        flops = stage.get("point_flops", stage["flops"])
        assert (stage["steps"], stage["tokens"], flops) == (
            consumed["steps"],
            consumed["tokens"],
            consumed["flops"],
        ), stage["stage"]


def test_free_charges_no_teacher_flops_in_the_plan(tiny_data_dir, teacher_dir, tmp_path):
    """``teacher_cost: free``: a KD run buys as many steps as its student FLOPs allow."""
    plans = {}
    for mode in ("inference", "free"):
        path = tmp_path / f"{mode}.yaml"
        path.write_text(
            yaml.safe_dump(_config(tiny_data_dir, teacher_dir, **{**CASES["free"], "teacher_cost": mode}))
        )
        with contextlib.redirect_stdout(io.StringIO()):
            plans[mode] = {s["stage"]: s for s in dry_run(path, tmp_path / f"out-{mode}")["stages"]}
    assert plans["free"]["pretrain:none"]["steps"] == plans["inference"]["pretrain:none"]["steps"]
    assert plans["free"]["pretrain:tinybert"]["steps"] > plans["inference"]["pretrain:tinybert"]["steps"]


def _refused(tmp_path, config: dict, fragment: str, capfd) -> None:
    """Refused in one line, exit 2, and --out left as it was (no lock file, no directory)."""
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["compare", str(path), "--out", str(out), "--no-progress"])
    _, err = capfd.readouterr()
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("budgetkd: error: "), err
    assert fragment in err, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"optimizer": {"batch_size": 8, "warmup": 1.5}}, "optimizer.warmup: must be ≥ 0 and < 1, got 1.5"),
        ({"training": {"dropout": 1.5}}, "training.dropout: must be ≥ 0 and < 1, got 1.5"),
        # an explicit budget beyond the data limit: the trainer refused it when its stage began
        ({"budget": {"explicit": "1e12flops"}}, "needs more than the data limit"),
        ({"budget": {"explicit": "500steps"}}, "needs more than the data limit"),
        # an amortized charge that uses up the whole budget (refused after calibration in 0.2)
        ({"budget": {"explicit": "3e8flops"},
          "teacher_cost": {"amortized": {"pretraining": "2e9flops", "students": 2}}}, "uses up the whole budget"),
        ({"budget": {"calibrate": {"epochs": 0.5, "currency": "flops"}},
          "teacher_cost": {"amortized": {"pretraining": "2e9flops", "students": 2}}}, "uses up the whole budget"),
        # Vanilla-KD needs teacher logits, and fit_mlm_head: false forbids fitting them
        ({"strategies": ["none", "vanilla"], "budget": {"explicit": "4steps"}}, "needs teacher logits"),
    ],
)  # fmt: skip
def test_late_refusals_come_before_any_stage(
    change, fragment, tmp_path, tiny_data_dir, teacher_dir, capfd, request
):
    teacher = teacher_dir
    if "needs teacher logits" in fragment:
        teacher = request.getfixturevalue("encoder_only_teacher")
    config = _config(tiny_data_dir, teacher, **{"budget": {"explicit": "4steps"}, **change})
    if "needs teacher logits" in fragment:
        config["teacher"]["fit_mlm_head"] = False
    if "training" in change:
        config["training"] = {**_config(tiny_data_dir, teacher)["training"], **change["training"]}
    _refused(tmp_path, config, fragment, capfd)


@pytest.fixture(scope="module")
def encoder_only_teacher(teacher_dir, tmp_path_factory) -> Path:
    """The test teacher saved as a plain BertModel (no MLM head)."""
    from transformers import AutoTokenizer, BertModel

    out = tmp_path_factory.mktemp("encoder-only")
    BertModel.from_pretrained(str(teacher_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(out)
    return out


def test_the_x1_point_of_a_calibrated_sweep_trains_the_calibrations_steps(
    tmp_path, tiny_data_dir, teacher_dir, monkeypatch
):
    """One data rule (issue 20, item 2): the calibration's one epoch of N = 190 sequences in
    batches of 8 is ⌊190/8⌋ = 23 full batches, so No-KD's x1 point of a WSD FLOP sweep (its own
    trunk, charged the calibration's FLOPs) trains exactly those 23 steps under unlimited data —
    with ⌈190/8⌉ = 24 calibration steps it was refused ("at most 23 steps")."""
    budget = {"calibrate": {"epochs": 1, "currency": "flops"}, "sweep": [0.5, 1], "schedule": "wsd"}
    config = _config(tiny_data_dir, teacher_dir, budget=budget, strategies=["none", "tinybert"])
    plan = _plan_then_run(config, tmp_path, monkeypatch)
    stages = {s["stage"]: s for s in plan["stages"]}
    summary = {
        name: json.loads((Path(stages[name]["dir"]) / "summary.json").read_text())
        for name in ("calibrate", "pretrain:none@x1")
    }
    assert stages["calibrate"]["steps"] == stages["pretrain:none@x1"]["steps"] == 23
    assert summary["calibrate"]["consumed"]["steps"] == summary["pretrain:none@x1"]["consumed"]["steps"] == 23
    assert summary["pretrain:none@x1"]["stopped_by"] == "budget"
