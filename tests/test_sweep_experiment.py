"""Budget sweeps through ``budgetkd compare`` (SPEC §7a): a tiny three-point WSD sweep to its plots,
crossover JSON and long CSV, killed mid-sweep and resumed to the same numbers; the teacher_cost
modes and the KD budgets they imply."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
from test_experiment import base_config

from budgetkd.config import validate_experiment
from budgetkd.errors import BudgetKDError
from budgetkd.experiment import compare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not available")


def sweep_config(**changes) -> dict:
    """``test_experiment``'s tiny compare, as a three-point wsd sweep of No-KD and MiniLM."""
    config = base_config()
    config["name"] = "sweep-ci"
    config["strategies"] = ["none", "minilm"]
    # FLOPs: deterministic budgets, so a resumed sweep must equal an uninterrupted one
    config["budget"] = {
        "calibrate": {"strategy": "none", "epochs": 0.2, "currency": "flops"},
        "sweep": [0.25, 0.5, 1],
        "schedule": "wsd",
        "decay_fraction": 0.5,
    }
    config["training"] = {"num_evals": 1, "eval_sequences": 16, "dropout": 0.0, "checkpoint_every_steps": 1}
    config["glue"]["max_eval_examples"] = 48
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        node = config
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return config


def _write(tmp_path: Path, config: dict) -> Path:
    import yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _results(out: Path) -> dict:
    summaries = {
        p.parent.name: json.loads(p.read_text())["consumed"]
        for p in sorted((out / "runs").glob("*/summary.json"))
    }
    for consumed in summaries.values():
        for key in (
            "time_s",
            "time_teacher_s",
            "time_student_s",
            "time_excluded_s",
            "time_teacher_share",
            "tokens_per_s",
        ):
            consumed.pop(key)
    crossover = json.loads((out / "sweep" / "crossover.json").read_text())
    return {"runs": summaries, "crossover": crossover, "long": (out / "sweep" / "long.csv").read_text()}


def test_sweep_runs_to_its_report_and_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    config_path = _write(tmp_path, sweep_config())
    whole = tmp_path / "whole"
    compare(config_path, whole, progress=False)
    # the plan and what the sweep costs come first, before any stage
    printed = capsys.readouterr().out
    assert printed.index("plan of experiment") < printed.index("stage data")
    assert "sweep: 3 points (x0.25, x0.5, x1), schedule wsd" in printed
    assert json.loads((whole / "plan.json").read_text())["sweep"]["points"]
    # every strategy at every point; with wsd the largest point is the trunk and keeps snapshots
    sweep = json.loads((whole / "sweep.json").read_text())
    assert sorted(sweep["students"]) == sorted(
        f"{s}@x{m}" for s in ("none", "minilm") for m in ("0.25", "0.5", "1")
    )
    for label in ("none", "minilm"):
        trunk = json.loads((whole / "runs" / f"{label}@x1" / "summary.json").read_text())
        assert len(trunk["schedule"]["snapshots"]) == 2
        for tag in ("0.25", "0.5"):
            branch = json.loads((whole / "runs" / f"{label}@x{tag}" / "summary.json").read_text())
            schedule = branch["schedule"]
            assert schedule["branched_from"].startswith(str(whole / "runs" / f"{label}@x1" / "snapshots"))
            for key in ("flops", "tokens", "steps"):
                assert branch["consumed"][key] == pytest.approx(
                    schedule["prefix"][key] + schedule["own"][key]
                )
            assert branch["budget_exhausted"]
    # the report: a table per point, the crossover JSON, the long CSV and the plots
    for tag in ("x0.25", "x0.5", "x1"):
        assert (whole / "sweep" / f"table-{tag}.md").is_file()
    crossover = json.loads((whole / "sweep" / "crossover.json").read_text())
    assert set(crossover) == {"minilm"}
    # the rules compared are the sweep points' (all WSD); the linear calibration only set the budget
    fairness = json.loads((whole / "fairness.json").read_text())
    assert set(fairness["rules"]) == set(sweep["students"]) and fairness["differs"] == []
    assert {r["schedule"] for r in fairness["rules"].values()} == {"wsd"}
    assert [p["budget"] for p in crossover["minilm"]["points"]] == sorted(
        s["point_amount"] for s in sweep["students"].values() if s["label"] == "minilm"
    )
    assert "crossover" in crossover["minilm"] and crossover["minilm"]["interval"] == "examples"
    with open(whole / "sweep" / "long.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["strategy"] for r in rows} == {"none", "minilm"} and {r["task"] for r in rows} == {"rte"}
    assert len(rows) == 6 and {r["currency"] for r in rows} == {"flops"}
    assert len({(r["point"], r["budget"]) for r in rows}) == 3  # one budget per point, both strategies
    for name in ("delta_vs_budget.png", "avg_vs_budget.png"):
        assert (whole / "plots" / name).stat().st_size > 10_000
    assert "Crossover" in (whole / "sweep.md").read_text()

    # killed inside a branch of the KD strategy, then re-run: the same numbers
    from budgetkd.train import Pretrainer

    original = Pretrainer.train_step
    calls = {"n": 0}

    def dying(self, step, lr):
        if "minilm@x0.5" in str(self.run_dir):
            calls["n"] += 1
            if calls["n"] == 3:  # the warm-up step, one charged step (checkpointed), then killed
                raise KeyboardInterrupt("killed")
        return original(self, step, lr)

    monkeypatch.setattr(Pretrainer, "train_step", dying)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        compare(config_path, killed, progress=False)
    assert not (killed / "runs" / "minilm@x0.5" / "summary.json").exists()
    assert (killed / "runs" / "minilm@x0.5" / "checkpoint.pt").exists()
    monkeypatch.setattr(Pretrainer, "train_step", original)
    compare(config_path, killed, progress=False)
    assert _results(killed)["runs"] == _results(whole)["runs"]
    assert _results(killed)["long"] == _results(whole)["long"]
    assert _results(killed)["crossover"] == _results(whole)["crossover"]


def test_teacher_cost_modes_set_the_kd_budget(tmp_path):
    budget = "4e9flops"
    results = {}
    for mode in ("inference", "free", {"amortized": {"pretraining": "auto", "students": 8}}):
        config = sweep_config(
            **{"budget": {"explicit": budget}, "teacher_cost": mode, "glue.max_eval_examples": 16}
        )
        config["glue"]["max_train_examples"] = 16
        name = mode if isinstance(mode, str) else "amortized"
        out = tmp_path / name
        compare(_write(tmp_path, config), out, progress=False)
        results[name] = {
            label: json.loads((out / "runs" / label / "summary.json").read_text())
            for label in ("none", "minilm")
        }
        results[name]["charge"] = json.loads((out / "teacher_cost.json").read_text())
        results[name]["teacher"] = json.loads((out / "teacher" / "summary.json").read_text())["consumed"]
        with open(out / "budget.csv", newline="") as handle:
            results[name]["table"] = {r["label"]: r for r in csv.DictReader(handle)}
    amount = 4e9
    # inference (the paper): the KD run pays its teacher's forward passes inside the budget
    inference = results["inference"]["minilm"]
    assert inference["budget"]["amount"] == amount
    assert inference["consumed"]["flops"] >= amount
    assert (
        inference["consumed"]["flops"] - inference["consumed"]["flops"] / inference["consumed"]["steps"]
        < amount
    )
    # free: only the student's compute is charged, so the KD run takes more steps for the same budget
    free = results["free"]["minilm"]
    assert free["consumed"]["flops_student"] >= amount
    assert free["consumed"]["flops"] > amount and free["consumed"]["steps"] > inference["consumed"]["steps"]
    # amortized over K = 8 students: the KD budget is No-KD's minus 1/8 of the teacher's pretraining
    amortized = results["amortized"]
    teacher_flops = amortized["teacher"]["flops"]
    assert amortized["charge"]["flops"] == pytest.approx(teacher_flops / 8)
    assert amortized["minilm"]["budget"]["amount"] == pytest.approx(amount - teacher_flops / 8)
    assert amortized["none"]["budget"]["amount"] == amount  # No-KD pays nothing for a teacher
    # the table: every row is charged the one budget (to within its last step), whatever the mode
    for name, result in results.items():
        for label in ("none", "minilm"):
            step = result[label]["consumed"]["flops"] / result[label]["consumed"]["steps"]
            charged = float(result["table"][label]["charged_flops"])
            assert amount <= charged < amount + step, (name, label)
        kd = result["table"]["minilm"]
        want = {
            "inference": result["minilm"]["consumed"]["flops_teacher"],
            "free": 0.0,
            "amortized": result["minilm"]["consumed"]["flops_teacher"] + teacher_flops / 8,
        }[name]
        assert float(kd["teacher_charged_flops"]) == pytest.approx(want), name
    # the teacher's cost never changes what No-KD does
    for mode in ("free", "amortized"):
        for key in ("flops", "tokens", "steps"):
            assert results[mode]["none"]["consumed"][key] == results["inference"]["none"]["consumed"][key]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budget.sweep": [1]}, "at least two points"),
        ({"budget.sweep": [0.5, 0.5]}, "distinct"),
        ({"budget.sweep": [0.5, 10]}, "needs a second epoch"),
        ({"budget.sweep": ["1h", "1e9flops"]}, "one currency"),
        ({"budget.schedule": "cosine"}, "budget.schedule: must be 'linear' or 'wsd'"),
        ({"budget.decay_fraction": 0}, "budget.decay_fraction: must be > 0 and ≤ 1"),
        ({"teacher_cost": "cheap"}, "teacher_cost"),
        ({"teacher_cost": {"amortized": {"students": 0}}}, "teacher_cost.amortized.students: must be > 0"),
        ({"teacher_cost": {"amortized": {"pretraining": "10steps", "students": 2}}}, "time or FLOPs"),
        # a charge in hours against a FLOPs budget would be a charge of 0 FLOPs
        ({"teacher_cost": {"amortized": {"pretraining": "1h", "students": 2}}}, "budget's currency, flops"),
        ({"budget.sweep": ["1e9flops", "2e9flops"]}, "goes without budget.calibrate"),
        ({"strategies": ["minilm"], "budget.calibrate.strategy": "none"}, "needs the strategy none"),
    ],
)
def test_sweep_config_errors(changes, message):
    with pytest.raises(BudgetKDError, match=message):
        validate_experiment(sweep_config(**changes))


def test_report_settings_in_the_config():
    cfg = validate_experiment(
        sweep_config(**{"report": {"avg_tasks": ["rte", "stsb"], "bootstrap_samples": 500}})
    )
    assert cfg["report"]["avg_tasks"] == ["rte", "stsb"] and cfg["report"]["bootstrap_samples"] == 500
    for bad, message in (
        ({"avg_tasks": ["wnli"]}, "report.avg_tasks"),
        ({"bootstrap_samples": 5}, "must be ≥ 100"),
        ({"bogus": 1}, "report.bogus: unknown config key"),
    ):
        with pytest.raises(BudgetKDError, match=message):
            validate_experiment(sweep_config(report=bad))


def test_wsd_sweep_on_four_ranks_gives_the_one_process_sweep(tmp_path):
    """The sweep path at cluster shape: ``torchrun --nproc_per_node 4 … compare`` on the tiny
    WSD sweep. Every rank trains the trunk and its snapshots, every branch restarts from the
    snapshot on every rank, and the result is the one-process sweep: the same steps, tokens and
    FLOPs per point and per part (prefix / own), the same snapshots, the No-KD students within
    float tolerance, the same long CSV. (The teacher is pretrained without dropout: dropout masks
    are drawn per process.)"""
    import torch
    from safetensors.torch import load_file
    from test_cluster import torchrun

    config = sweep_config(**{"teacher.pretrain.dropout": 0.0, "training.checkpoint_every_steps": 0})
    path = _write(tmp_path, config)
    output = torchrun(
        4, ["-m", "budgetkd", "compare", str(path), "--out", str(tmp_path / "four"), "--no-progress"]
    )
    compare(path, tmp_path / "one", progress=False)
    sweep = json.loads((tmp_path / "one" / "sweep.json").read_text())
    for name in sweep["students"]:
        four, one = (
            json.loads((tmp_path / out / "runs" / name / "summary.json").read_text())
            for out in ("four", "one")
        )
        assert (four["world_size"], one["world_size"]) == (4, 1)
        for key in ("steps", "sequences", "tokens", "flops", "flops_teacher"):
            assert four["consumed"][key] == one["consumed"][key], (name, key)
        for part in ("prefix", "own"):
            if part in one["schedule"]:
                assert four["schedule"][part]["flops"] == one["schedule"][part]["flops"], (name, part)
        assert [Path(s).name for s in four["schedule"].get("snapshots", [])] == [
            Path(s).name for s in one["schedule"].get("snapshots", [])
        ]
    for name in ("none@x0.25", "none@x1"):
        four, one = (
            load_file(str(tmp_path / out / "runs" / name / "model" / "model.safetensors"))
            for out in ("four", "one")
        )
        for key in one:
            torch.testing.assert_close(
                four[key], one[key], rtol=1e-4, atol=5e-6, msg=lambda m, k=key: f"{k}: {m}"
            )
    assert (tmp_path / "four" / "sweep" / "long.csv").read_text() == (
        tmp_path / "one" / "sweep" / "long.csv"
    ).read_text()
    assert "Traceback" not in output


def test_a_sweep_of_given_budgets_needs_no_base_and_keeps_every_digit():
    config = sweep_config()
    config["budget"] = {"sweep": ["2469134s", "1234567s"], "schedule": "wsd"}
    cfg = validate_experiment(config)
    assert cfg["budget"]["sweep"] == {"kind": "budgets", "points": ["1234567.0s", "2469134.0s"]}
    assert cfg["budget"]["explicit"] == "2469134s"  # the largest point stands for the base budget
    config["budget"] = {"sweep": ["1000001tokens", "1000002tokens"]}  # distinct beyond %g's 6 digits
    assert validate_experiment(config)["budget"]["sweep"]["points"] == ["1000001.0tokens", "1000002.0tokens"]


def test_a_sweep_beyond_the_data_limit_is_refused_before_any_stage(tmp_path):
    # unlimited data: every run stops at one epoch; wiki.valid.raw holds ~0.25 M tokens
    config = sweep_config(**{"data_setting": "unlimited"})
    config["budget"] = {"sweep": ["1e5tokens", "1e8tokens"], "schedule": "wsd"}
    out = tmp_path / "out"
    with pytest.raises(
        BudgetKDError, match=r"none@1e\+08tokens needs \d+\.\d+ epochs of the corpus \(estimated\)"
    ):
        compare(_write(tmp_path, config), out, progress=False)
    assert not (out / "data").exists() and not (out / "state.json").exists()
    from budgetkd.experiment import dry_run

    with pytest.raises(BudgetKDError, match="epochs of the corpus"):  # the dry run says the same
        dry_run(_write(tmp_path, config), tmp_path / "plan-only")


def test_a_branch_without_its_snapshot_says_why(tmp_path):
    from budgetkd.experiment import _check_branch_point

    trunk = tmp_path / "runs" / "none@1e+08tokens"
    (trunk / "snapshots").mkdir(parents=True)
    from budgetkd.stages import StudentRun

    start = {"init_from": str(trunk / "snapshots" / "at-80000.0.pt")}
    entry = StudentRun("none@1e+05tokens", {"name": "none"}, False, None, None, tmp_path, start)
    with pytest.raises(BudgetKDError, match="which its trunk none@1e\\+08tokens never wrote"):
        _check_branch_point(entry)
    (trunk / "summary.json").write_text(json.dumps({"stopped_by": "data limit", "consumed": {"epochs": 1.0}}))
    with pytest.raises(BudgetKDError, match="stopped at the data limit"):
        _check_branch_point(entry)
    (trunk / "snapshots" / "at-80000.0.pt").write_bytes(b"")
    _check_branch_point(entry)  # there: fine
    _check_branch_point(StudentRun("none@x1", {"name": "none"}, False, None, None, tmp_path))  # not a branch


def test_the_plan_takes_the_amortized_share_off_each_kd_point(tmp_path):
    from budgetkd.experiment import dry_run

    config = sweep_config(**{"teacher_cost": {"amortized": {"pretraining": "2e9flops", "students": 2}}})
    config["budget"] = {"sweep": ["4e9flops", "8e9flops"], "schedule": "linear"}
    plan = dry_run(_write(tmp_path, config), tmp_path / "p")
    stages = {s["stage"]: s for s in plan["stages"]}
    for tag, point in (("4e+09flops", 4e9), ("8e+09flops", 8e9)):
        none, kd = stages[f"pretrain:none@{tag}"], stages[f"pretrain:minilm@{tag}"]
        # whole steps of a run that stops at the first step reaching its budget: ⌈B / (fps · batch)⌉
        batch = config["optimizer"]["batch_size"]
        assert none["steps"] == math.ceil(point / (none["flops_per_sequence"] * batch))
        assert kd["steps"] == math.ceil((point - 1e9) / (kd["flops_per_sequence"] * batch))  # 1/2 of 2e9 off


def test_wsd_without_a_sweep_is_refused_when_calibrated(tmp_path, capfd):
    """Issue 20, item 1: calibrated and without a sweep, the No-KD row is the calibration run
    (linear schedule) while the KD rows would train WSD — refused at config load, exit 2, one line,
    nothing written. WSD with a sweep, or with an explicit budget (every row WSD), is accepted."""
    from test_cli_errors import assert_one_line_error

    from budgetkd.cli import main

    config = sweep_config()
    del config["budget"]["sweep"]
    out = tmp_path / "out"
    rc = main(["compare", str(_write(tmp_path, config)), "--out", str(out), "--dry-run"])
    captured = capfd.readouterr()
    assert_one_line_error(
        rc,
        captured.out,
        captured.err,
        "budget.schedule: must be linear with budget.calibrate and no budget.sweep",
    )
    assert captured.err.rstrip().endswith("got 'wsd'")
    assert not out.exists()
    assert validate_experiment(sweep_config())["budget"]["schedule"] == "wsd"
    explicit = sweep_config(**{"budget": {"explicit": "1e9flops", "schedule": "wsd"}})
    assert validate_experiment(explicit)["budget"]["schedule"] == "wsd"
