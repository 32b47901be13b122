"""``pretrain_seeds``: one pretraining run per seed for every strategy (and sweep point), the plan
pricing them, and Δ's interval from the two-level bootstrap (pretraining runs, then fine-tuning
seeds, then dev examples), checked against an enumeration and by a coverage simulation."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SHARED_DATA

from budgetkd import report, stages
from budgetkd.budget import Budget
from budgetkd.config import validate_experiment
from budgetkd.errors import BudgetKDError
from budgetkd.glue import bootstrap

BASE = {
    "name": "seeds",
    "data": {"inputs": ["corpus.txt"], "tokenizer": {"train": 1000}},
    "student": {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
    "teacher": {"path": "teacher"},
    "strategies": ["none", "minilm"],
    "budget": {"explicit": "1e12flops"},
}


def _cfg(**changes) -> dict:
    return validate_experiment(copy.deepcopy(BASE) | changes)


CHARGE = {"mode": "inference", "charge_forward": True}


# -- the config and the stages ------------------------------------------------------------------
def test_default_pretrain_seeds_change_no_record_and_no_run():
    default, explicit = _cfg(), _cfg(pretrain_seeds=[0])
    assert "pretrain_seeds" not in default and default == explicit  # experiment.json as before
    budget = Budget.parse("1e12flops")
    runs = stages.student_runs(default, Path("out"), budget, CHARGE)
    assert [r.id for r in runs] == ["none", "minilm"] and runs[1].seed == 0
    identity = stages.run_train_config(default, Path("d"), runs[1], "t", CHARGE).identity()
    assert identity["seed"] == 0  # no seed override: the TrainConfig (its fingerprint) as before
    assert stages.student_ids(default) == ["none", "minilm"]


def test_three_pretrain_seeds_derive_one_run_per_seed():
    cfg = _cfg(pretrain_seeds=[0, 1, 2], seed=5)
    assert cfg["pretrain_seeds"] == [0, 1, 2]
    assert stages.student_ids(cfg) == ["none", "minilm", "none~s1", "minilm~s1", "none~s2", "minilm~s2"]
    runs = stages.student_runs(cfg, Path("out"), Budget.parse("1e12flops"), CHARGE)
    assert [r.id for r in runs] == ["none", "minilm", "none~s1", "minilm~s1", "none~s2", "minilm~s2"]
    seeds = {r.id: stages.run_train_config(cfg, Path("d"), r, "t", CHARGE).seed for r in runs}
    assert seeds == {"none": 5, "minilm": 5, "none~s1": 6, "minilm~s1": 6, "none~s2": 7, "minilm~s2": 7}
    assert runs[3].run_dir == Path("out/runs/minilm~s1")
    assert stages.base_id("minilm@x2~s1") == ("minilm@x2", 1) and stages.base_id("minilm") == ("minilm", 0)
    forced = stages.expand_forced(cfg, ["pretrain:minilm"])
    assert {"pretrain:minilm~s1", "glue:minilm~s2"} <= forced and "pretrain:none~s1" not in forced


def test_with_a_calibration_the_other_seeds_train_no_kd_at_the_budget():
    cfg = _cfg(pretrain_seeds=[0, 1], budget={"calibrate": {"strategy": "none", "epochs": 0.5}})
    runs = stages.student_runs(cfg, Path("out"), Budget.parse("60s"), CHARGE)
    assert [(r.id, r.budget.exact_text()) for r in runs] == [
        ("minilm", "60.0s"), ("none~s1", "60.0s"), ("minilm~s1", "60.0s"),
    ]  # fmt: skip
    assert "pretrain:none" not in stages.stage_ids(cfg) and "pretrain:none~s1" in stages.stage_ids(cfg)


def test_with_wsd_every_seed_has_its_own_trunk():
    cfg = _cfg(pretrain_seeds=[0, 1], budget={"sweep": ["1e12flops", "2e12flops"], "schedule": "wsd"})
    runs = {r.id: r for r in stages.student_runs(cfg, Path("out"), None, CHARGE)}
    assert runs["minilm@2e+12flops~s1"].trunk and runs["minilm@2e+12flops"].trunk
    branch = runs["minilm@1e+12flops~s1"]
    assert Path(branch.schedule["init_from"]).parent.parent == Path("out/runs/minilm@2e+12flops~s1")


@pytest.mark.parametrize("seeds", [[1, 2], [0, 0], []])
def test_pretrain_seeds_hold_zero_once(seeds):
    with pytest.raises(BudgetKDError, match="pretrain_seeds"):
        _cfg(pretrain_seeds=seeds)


# -- the two-level bootstrap --------------------------------------------------------------------
def _naive(per_run, pretrain, finetune):
    out = []
    for r in range(len(pretrain)):
        slots = []
        for p, j in enumerate(pretrain[r]):
            drawn = finetune(p, per_run[j].shape[1])[r]
            slots.append(np.mean([per_run[j][r, s] for s in drawn]))
        out.append(np.mean(slots))
    return np.array(out)


def test_hierarchical_scores_equal_the_explicit_loop():
    rng = np.random.default_rng(0)
    per_run = [rng.random((50, 3)) for _ in range(4)]
    pretrain = rng.integers(0, 4, (50, 4))
    draws = {p: rng.integers(0, 3, (50, 3)) for p in range(4)}
    got = bootstrap.hierarchical_scores(per_run, pretrain, lambda p, s: draws[p])
    np.testing.assert_allclose(got, _naive(per_run, pretrain, lambda p, s: draws[p]))


# 2 pretraining runs × 2 fine-tuning seeds × 3 dev examples, two rows: 0/1 correctness per example
CORRECT = {
    "A": [[[1, 1, 0], [1, 0, 0]], [[1, 1, 1], [0, 1, 1]]],
    "B": [[[0, 1, 0], [0, 0, 0]], [[1, 0, 0], [0, 1, 0]]],
}


def _enumerated_delta_distribution() -> np.ndarray:
    """Δ = A − B over every equally likely resample: the runs drawn (2²), each slot's seeds (2² per
    slot), the examples (3³) — the same draws for both rows."""
    c = {row: np.asarray(v, dtype=float) for row, v in CORRECT.items()}
    values = []
    seed_draws = list(itertools.product(range(2), repeat=2))
    for runs in itertools.product(range(2), repeat=2):
        for seeds in itertools.product(seed_draws, repeat=2):
            for examples in itertools.product(range(3), repeat=3):
                ex = list(examples)
                score = {
                    row: np.mean(
                        [np.mean([m[j, s][ex].mean() for s in seeds[p]]) for p, j in enumerate(runs)]
                    )
                    for row, m in c.items()
                }
                values.append(score["A"] - score["B"])
    return np.array(values)


def test_the_two_level_bootstrap_has_the_enumerated_distribution():
    exact = _enumerated_delta_distribution()
    samples, seed = 40_000, 7
    labels = np.ones(3, dtype=int)
    rows = {
        f"{row}{j}": [(labels, np.asarray(s)) for s in runs[j]]  # prediction 1 ⇔ correct
        for row, runs in CORRECT.items()
        for j in range(2)
    }
    per_seed = report.column_seed_scores(0, ("accuracy",), rows, samples, seed)
    pretrain = report.pretrain_draws(seed, samples, 2)
    draws = lambda p, s: report.finetune_draws(seed, 0, p, samples, s)  # noqa: E731
    delta = bootstrap.hierarchical_scores([per_seed["A0"], per_seed["A1"]], pretrain, draws) - (
        bootstrap.hierarchical_scores([per_seed["B0"], per_seed["B1"]], pretrain, draws)
    )
    assert len(exact) == 4 * 16 * 27
    assert abs(delta.mean() - exact.mean()) < 4 * exact.std() / np.sqrt(samples)
    assert delta.var() == pytest.approx(exact.var(), rel=0.04)
    for q in (10, 50, 90):  # and its quantiles
        assert abs(np.percentile(delta, q) - np.percentile(exact, q)) <= 1 / 9 + 1e-9


def _simulated_interval(correct: dict, samples: int, seed: int, factor: float) -> tuple[float, float]:
    n = len(correct["A"][0][0])
    weights = bootstrap.resample_counts(np.random.default_rng([seed, 0]), n, samples)
    runs = len(correct["A"])
    pretrain = report.pretrain_draws(seed, samples, runs)
    every = np.tile(np.arange(runs), (samples, 1))
    draws = lambda p, s: report.finetune_draws(seed, 0, p, samples, s)  # noqa: E731
    score = {}
    for row, by_run in correct.items():
        per_run = [np.stack([weights @ c / n for c in seeds], axis=1) for seeds in by_run]
        score[row] = bootstrap.inflated(
            bootstrap.hierarchical_scores(per_run, pretrain, draws),
            bootstrap.hierarchical_scores(per_run, every, draws), factor,
        )  # fmt: skip
    low, high = np.percentile(score["A"] - score["B"], [2.5, 97.5])
    return float(low), float(high)


def _coverage(runs: int, factor: float, sims: int = 200, delta: float = 0.03) -> tuple[float, float]:
    """Rows A (Δ = +3 points) and B, each with ``runs`` pretraining runs (effect sd 10 points:
    the dominating term), 2 fine-tuning seeds (sd 1 point), 300 fresh dev examples per study."""
    rng = np.random.default_rng(123)
    hits, widths = 0, []
    for k in range(sims):
        difficulty = rng.uniform(0.4, 0.6, 300)
        correct = {}
        for row, shift in (("A", delta), ("B", 0.0)):
            correct[row] = []
            for _ in range(runs):
                p = difficulty + shift + rng.normal(0, 0.10)
                correct[row].append(
                    [
                        (rng.random(300) < np.clip(p + rng.normal(0, 0.01), 0, 1)).astype(float)
                        for _ in range(2)
                    ]
                )
        low, high = _simulated_interval(correct, 1000, k, factor)
        hits += low <= delta <= high
        widths.append(high - low)
    return hits / sims, float(np.mean(widths))


def test_the_interval_covers_a_known_delta_when_pretraining_noise_dominates():
    """3 pretraining runs: the small-sample widening of the pretraining level brings the 95 %
    interval to ≥ 93 % coverage (measured: 98.5 %, mean width 0.65 in accuracy units);
    the plain percentile interval covered about 80 % (width 0.25)."""
    coverage, width = _coverage(3, bootstrap.pretrain_inflation(3))
    assert coverage >= 0.93, (coverage, width)
    plain, plain_width = _coverage(3, 1.0, sims=100)
    assert plain < coverage and plain_width < width


def test_pretrain_inflation_values():
    assert bootstrap.pretrain_inflation(1) == 1.0
    assert bootstrap.pretrain_inflation(3) == pytest.approx(2.689, abs=1e-3)
    assert bootstrap.pretrain_inflation(10) == pytest.approx(1.217, abs=1e-3)


# -- the plan and a tiny compare ----------------------------------------------------------------
def _dry_run_plan(tmp_path: Path, config: dict) -> dict:
    from budgetkd.cli import main

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--dry-run"]) == 0
    return json.loads((out / "plan.json").read_text())


def test_the_plan_prices_every_pretraining_seed(tmp_path, teacher_dir, tiny_data_dir, capsys):
    from conftest import SEQ_LEN
    from test_plan import _experiment

    def pretraining(seeds):
        config = _experiment(teacher_dir, data={"prepared": str(tiny_data_dir), "seq_len": SEQ_LEN})
        config |= {
            "budget": {"explicit": "3steps"},
            "strategies": ["none", "minilm"],
            "pretrain_seeds": seeds,
        }
        plan = _dry_run_plan(tmp_path / str(len(seeds)), config)
        return {s["stage"]: s for s in plan["stages"] if s["stage"].startswith(("pretrain:", "glue:"))}

    one, three = pretraining([0]), pretraining([0, 1, 2])
    assert list(one) == ["pretrain:none", "pretrain:minilm", "glue:none", "glue:minilm"]
    assert {k for k in three if k.startswith("pretrain:")} == {
        f"pretrain:{label}{suffix}" for label in ("none", "minilm") for suffix in ("", "~s1", "~s2")
    }
    steps = lambda stages_: sum(s["steps"] for k, s in stages_.items() if k.startswith("pretrain:"))  # noqa: E731
    flops = lambda stages_: sum(s["flops"] for k, s in stages_.items() if k.startswith("pretrain:"))  # noqa: E731
    assert steps(one) == 2 * 3 and steps(three) == 3 * steps(one)
    assert flops(three) == pytest.approx(3 * flops(one), rel=2e-2)
    assert sum(1 for k in three if k.startswith("glue:")) == 6


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not available")
def test_a_tiny_compare_with_two_pretraining_seeds(tmp_path):
    """No-KD and MiniLM, pretrain_seeds [0, 1]: four runs, four GLUE stages, one row each in Table
    2 with the two-level interval (the run at seed 0 keeps today's directory)."""
    from test_experiment import base_config

    from budgetkd.cli import main

    config = base_config() | {"strategies": ["none", "minilm"], "pretrain_seeds": [0, 1]}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    summaries = {sid: json.loads((out / "runs" / sid / "summary.json").read_text()) for sid in
                 ("none", "minilm", "none~s1", "minilm~s1")}  # fmt: skip
    assert summaries["none~s1"]["init_fingerprint"] != summaries["none"]["init_fingerprint"]
    assert summaries["minilm~s1"]["init_fingerprint"] == summaries["none~s1"]["init_fingerprint"]
    assert float(summaries["none~s1"]["budget"]["amount"]) == pytest.approx(
        summaries["none"]["consumed"]["flops"]
    )
    assert all((out / "glue" / sid / "glue.json").is_file() for sid in summaries)
    assert json.loads((out / "experiment.json").read_text())["pretrain_seeds"] == [0, 1]
    table = (out / "table.md").read_text()
    assert "~s1" not in table and "interval over pretraining seeds, fine-tuning seeds and dev" in table
    fairness = json.loads((out / "fairness.json").read_text())
    assert fairness["ok"] and set(fairness["init_fingerprint"]) == {"0", "1"}
    built = report.build_table(report.collect(out))
    minilm = next(r for r in built["rows"] if r["label"] == "minilm")
    assert minilm["interval"] == report.INTERVAL_PRETRAIN and minilm["pretrain_runs"] == 2
    low, high = minilm["delta_ci95"]
    assert low <= minilm["delta"] <= high


def test_the_sweep_report_merges_each_points_pretraining_runs(tmp_path, monkeypatch):
    """A sweep written with pretrain_seeds [0, 1, 2]: every point's row is the mean over its three
    runs (here ±2 of 40 RTE examples around seed 0, so the mean is seed 0's) and its Δ interval,
    from the two-level bootstrap, is wider than with seed 0 alone."""
    import re

    from test_report import _write_glue_with_predictions
    from test_sweep import SWEEP_CORRECT, SWEEP_POINTS, _capture_sweep_figures, _rte, _sweep_dir

    from budgetkd.sweep_report import write_sweep_report

    _capture_sweep_figures(monkeypatch)
    pattern = re.compile(
        r"\| Vanilla-KD \(vanilla@1e\+12flops\) \| 65\.0 \| \+15\.0 \[([+-][\d.]+), ([+-][\d.]+)\]"
    )

    def width(out: Path) -> float:
        write_sweep_report(out)
        low, high = map(float, pattern.search((out / "sweep.md").read_text()).groups())
        return high - low

    one = width(_sweep_dir(tmp_path / "one"))
    out = _sweep_dir(tmp_path / "three")
    sweep = json.loads((out / "sweep.json").read_text())
    for seed, shift in ((1, 2), (2, -2)):
        for label in ("none", "vanilla"):
            for point, correct in zip(SWEEP_POINTS, SWEEP_CORRECT[label]):
                sid = f"{label}@{point:g}flops"
                new = f"{sid}~s{seed}"
                run = out / "runs" / new
                run.mkdir(parents=True)
                (run / "summary.json").write_text((out / "runs" / sid / "summary.json").read_text())
                (out / "glue" / new).mkdir(parents=True)
                _write_glue_with_predictions(out / "glue" / new, _rte(correct + shift))
                sweep["students"][new] = sweep["students"][sid] | {"run": str(run), "pretrain_seed": seed}
    (out / "sweep.json").write_text(json.dumps(sweep))
    experiment = json.loads((out / "experiment.json").read_text()) | {"pretrain_seeds": [0, 1, 2]}
    (out / "experiment.json").write_text(json.dumps(experiment))
    three = width(out)
    assert three > one
    assert "interval over pretraining seeds" in (out / "sweep" / "table-1e+12flops.md").read_text()
    assert "Pretraining seeds: 3 runs per strategy and point" in (out / "sweep.md").read_text()
    assert "pretrain_seed" in (out / "sweep" / "long.csv").read_text().splitlines()[0]
