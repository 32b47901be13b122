"""Sweep arithmetic (SPEC §7a) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from budgetkd.errors import BudgetKDError
from budgetkd.sweep import (
    branch_amount,
    check_sweep_points,
    crossings,
    crossover_with_interval,
    first_crossover,
    kd_budget_amount,
    teacher_charge,
    wsd_cost,
    wsd_learning_rate,
)


def test_wsd_schedule_by_hand():
    # peak 1, warm-up 10, point 100, decay fraction 0.2: decay from 80 to 100
    lr = [wsd_learning_rate(1.0, c, 100.0, 10.0, 0.2) for c in (0, 5, 10, 50, 79.9, 80, 90, 95, 100, 120)]
    assert lr[:3] == [0.0, 0.5, 1.0]
    assert lr[3] == 1.0 and lr[4] == 1.0
    assert lr[5] == pytest.approx(1.0)  # decay starts at its peak: the schedule is continuous
    assert lr[6] == pytest.approx(0.5)
    assert lr[7] == pytest.approx(0.25)
    assert lr[8] == 0.0 and lr[9] == 0.0  # reaches 0 exactly at the budget


def test_points_share_the_trunk_until_they_branch():
    points = [25.0, 50.0, 100.0]
    for c in np.linspace(0, branch_amount(25.0, 0.2), 7):
        rates = {wsd_learning_rate(2.0, c, p, 5.0, 0.2) for p in points}
        assert len(rates) == 1  # one trunk: every point has the same rate before its branch
    assert branch_amount(50.0, 0.2) == 40.0


def test_sweep_cost_is_the_largest_point_plus_each_decay():
    # 5 points 0.25..4 × B with f = 0.2: 4 + 0.2·(0.25+0.5+1+2) = 4.75 B, vs 7.75 B for separate runs
    points = [0.25, 0.5, 1.0, 2.0, 4.0]
    assert wsd_cost(points, 0.2) == pytest.approx(4.75)
    assert wsd_cost(points, 0.2) / max(points) <= 1.3


def test_sweep_points_are_checked():
    assert check_sweep_points([4, 1, 2], warmup=0.5, decay_fraction=0.2) == [1.0, 2.0, 4.0]
    with pytest.raises(BudgetKDError, match="at least two"):
        check_sweep_points([1], 0.0, 0.2)
    with pytest.raises(BudgetKDError, match="distinct"):
        check_sweep_points([1, 1], 0.0, 0.2)
    with pytest.raises(BudgetKDError, match="warm-up"):
        check_sweep_points([1, 2], warmup=0.9, decay_fraction=0.2)


def test_crossover_interpolates_in_log_budget():
    # Δ = +2 at budget 1, -2 at budget 100: the zero is half-way in log space, at 10
    assert first_crossover([1, 100], [2.0, -2.0]) == pytest.approx(10.0)
    # Δ = +3 at 10, -1 at 1000: log10 B* = 1 + 3·2/4 = 2.5
    assert first_crossover([1, 10, 1000], [5.0, 3.0, -1.0]) == pytest.approx(10**2.5)
    found = crossings([1, 10, 100, 1000], [1.0, -1.0, -1.0, 1.0])
    assert [c.direction for c in found] == ["kd_stops_paying", "kd_starts_paying"]
    assert found[0].budget == pytest.approx(math.sqrt(10))
    assert found[1].between == (100.0, 1000.0)
    assert first_crossover([1, 2, 4], [1.0, 0.5, 0.25]) is None
    assert first_crossover([1, 2, 4], [0.0, 0.0, 0.0]) is None  # Δ = 0 throughout: no sign, no crossing
    assert first_crossover([1, 2, 4, 8], [1.0, 0.0, 0.0, -1.0]) == 2.0  # reaches 0 at 2, negative at 8
    assert first_crossover([1, 2, 4], [0.0, 1.0, 2.0]) is None  # starts at 0, then positive


def test_crossover_interval_from_bootstrap_samples():
    budgets = [1.0, 100.0]
    # every resample crosses at 10^(2·a/(a+b)); with a = 2, b ∈ {1, 2, 3}: 10^(4/3), 10, 10^(4/5)
    samples = np.array([[2.0, -1.0], [2.0, -2.0], [2.0, -3.0]] * 10)
    result = crossover_with_interval(budgets, [2.0, -2.0], samples, level=0.9)
    assert result["crossover"] == pytest.approx(10.0)
    assert result["low"] == pytest.approx(10**0.8)
    assert result["high"] == pytest.approx(10 ** (4 / 3))
    assert result["no_crossover_share"] == 0.0


def test_crossover_interval_open_when_resamples_stay_positive():
    samples = np.array([[2.0, -2.0]] * 5 + [[2.0, 1.0]] * 5)  # half the resamples: KD ahead throughout
    result = crossover_with_interval([1.0, 100.0], [2.0, -2.0], samples)
    assert result["high"] is None and result["low"] == pytest.approx(10.0)
    assert result["no_crossover_share"] == 0.5
    none = crossover_with_interval([1.0, 100.0], [1.0, 0.5], np.array([[1.0, 0.5]]))
    assert none["crossover"] is None and none["text"].startswith("no crossover between 1 and 100")


def test_crossover_interval_follows_the_observed_direction():
    budgets = [1.0, 2.0, 4.0]
    # KD starts paying: Δ from −1 to +1 between 1 and 2 crosses at 2^(1/2) = 1.414 (log-linear);
    # half the resamples have KD ahead from the smallest budget on, so their crossover lies *below*
    # the range: the interval is open below and ends at 1.414, not the other way round
    samples = np.array([[-1.0, 1.0, 2.0]] * 5 + [[0.5, 1.0, 2.0]] * 5)
    result = crossover_with_interval(budgets, [-1.0, 1.0, 2.0], samples)
    assert result["direction"] == "kd_starts_paying"
    assert result["crossover"] == pytest.approx(2**0.5)
    assert result["low"] is None and result["high"] == pytest.approx(2**0.5)
    # KD stops paying at 2·2^(1/2) = 2.83 (Δ +1 → −1 between 2 and 4); a resample that first starts
    # paying at 1.414 and then stops at 2.83 contributes 2.83, its crossing in the observed direction
    samples = np.array([[1.0, 1.0, -1.0]] * 5 + [[-1.0, 1.0, -1.0]] * 5)
    result = crossover_with_interval(budgets, [1.0, 1.0, -1.0], samples)
    assert result["direction"] == "kd_stops_paying"
    assert result["low"] == pytest.approx(2 * 2**0.5) and result["high"] == pytest.approx(2 * 2**0.5)
    # KD behind throughout: no crossover; the question is where KD starts paying, and resamples
    # behind throughout have it above the range
    behind = crossover_with_interval(budgets, [-1.0, -2.0, -3.0], np.array([[-1.0, -2.0, -3.0]] * 4))
    assert behind["crossover"] is None and behind["text"].endswith("(KD behind throughout)")
    assert behind["direction"] == "kd_starts_paying"
    assert behind["low"] is None and behind["high"] is None and behind["no_crossover_share"] == 1.0


def _share_crossing(samples: np.ndarray, sign_before: int) -> float:
    """Brute force: the share of resamples whose Δ changes from ``sign_before`` to the other sign
    between two adjacent points (the noise is continuous: no Δ is exactly 0)."""
    signs = np.sign(samples)
    return float(np.mean([any(r[j] == sign_before == -r[j + 1] for j in range(len(r) - 1)) for r in signs]))


@pytest.mark.parametrize("sign", [-1, 1])
def test_without_a_crossover_the_resamples_are_counted_in_the_direction_that_can_still_happen(sign):
    from budgetkd.sweep_report import _crossover_text

    budgets = [1.0, 2.0, 4.0, 8.0]
    deltas = sign * np.array([3.0, 2.0, 1.0, 0.2])  # KD behind (−) or ahead (+) throughout
    samples = deltas + np.random.default_rng(0).normal(0.0, 0.6, (2000, 4))
    result = crossover_with_interval(budgets, deltas, samples)
    # behind throughout: does KD *start* paying inside the range (Δ from < 0 to > 0)?
    # ahead throughout: does it *stop* (Δ from > 0 to < 0)?
    assert result["direction"] == ("kd_starts_paying" if sign < 0 else "kd_stops_paying")
    crossing = _share_crossing(samples, sign)
    assert 1 - result["no_crossover_share"] == pytest.approx(crossing)
    if sign < 0:
        # the figures of the issue: 41 % start paying inside the range; only 4 % would cross the
        # other way, the share the text reported when the direction defaulted to "stops paying"
        assert crossing == pytest.approx(0.4125) and _share_crossing(samples, 1) == pytest.approx(0.037)
    entry = {"points": [{"budget": b} for b in budgets], **result}
    verb = "starts" if sign < 0 else "stops"
    assert _crossover_text(entry, "flops").endswith(
        f"; in {100 * crossing:.0f} % of the bootstrap resamples KD {verb} paying inside it"
    )


def test_teacher_charge_modes():
    assert teacher_charge("inference")["time_s"] == 0.0
    assert teacher_charge("inference")["charge_forward"] is True
    assert teacher_charge("free")["charge_forward"] is False
    charge = teacher_charge("amortized", pretraining={"time_s": 3600.0, "flops": 8e18}, students=4)
    assert charge["time_s"] == 900.0 and charge["flops"] == 2e18
    # the calibrated KD budget: No-KD's minus the per-student charge
    assert kd_budget_amount(14400.0, "time", charge) == 13500.0
    assert kd_budget_amount(1e19, "flops", charge) == pytest.approx(8e18)
    with pytest.raises(BudgetKDError, match="uses up"):
        kd_budget_amount(800.0, "time", charge)
    with pytest.raises(BudgetKDError, match="time or FLOPs"):
        kd_budget_amount(100.0, "steps", charge)
    with pytest.raises(BudgetKDError, match="positive integer"):
        teacher_charge("amortized", pretraining={"time_s": 1.0}, students=0)
    with pytest.raises(BudgetKDError, match="one of"):
        teacher_charge("cheap")


# -- WSD runs: one trunk, branches that continue it ----------------------------------------------
def _run_recording_lrs(config, monkeypatch):
    from budgetkd.train import Pretrainer

    seen: list[float] = []
    original = Pretrainer.train_step

    def recording(self, step, lr):
        seen.append(lr)
        return original(self, step, lr)

    monkeypatch.setattr(Pretrainer, "train_step", recording)
    summary = Pretrainer(config).pretrain()
    monkeypatch.setattr(Pretrainer, "train_step", original)
    # the first call is the uncharged warm-up step (undone), at the first step's rate
    assert seen[0] == seen[1]
    return summary, seen[1:]


def test_wsd_branch_continues_the_trunk_and_pays_prefix_plus_decay(make_config, tmp_path, monkeypatch):
    from budgetkd.data import PackedData

    peak = 1e-3
    common = dict(schedule="wsd", schedule_warmup=2.0, decay_fraction=0.2, lr=peak, num_evals=2)
    # the trunk is the largest point (20 steps); the 10-step point branches at (1 − 0.2)·10 = 8
    trunk_dir = tmp_path / "trunk"
    trunk, trunk_lrs = _run_recording_lrs(
        make_config(trunk_dir, budget="20steps", snapshots=[8.0], **common), monkeypatch
    )
    assert len(trunk_lrs) == 20
    assert trunk_lrs[:3] == [0.0, peak / 2, peak]
    assert trunk_lrs[3:17] == [peak] * 14  # constant until its own decay starts at 16
    assert trunk_lrs[17:] == pytest.approx([0.75 * peak, 0.5 * peak, 0.25 * peak])
    snapshot = trunk_dir / "snapshots" / "at-8.0.pt"
    assert snapshot.is_file() and trunk["schedule"]["snapshots"] == [str(snapshot)]

    branch, branch_lrs = _run_recording_lrs(
        make_config(tmp_path / "b10", budget="10steps", init_from=str(snapshot), **common), monkeypatch
    )
    # the prefix is not trained again: the branch runs its two decay steps only, and its rate
    # falls linearly to 0 at its budget (peak·(10 − c)/2 at c = 8, 9; 0 at c = 10)
    assert branch_lrs == pytest.approx([peak, 0.5 * peak])
    consumed, schedule = branch["consumed"], branch["schedule"]
    assert consumed["steps"] == 10 and schedule["prefix"]["steps"] == 8 and schedule["own"]["steps"] == 2
    # the charged tokens are the prefix's (the trunk's first 8 steps) plus steps 8 and 9 of the data
    from budgetkd.data import MaskingConfig, StepBatches

    data = PackedData(make_config(tmp_path / "x").data)
    masking = MaskingConfig(data.vocab_size, data.special_ids["mask"], tuple(data.special_ids["all"]))
    batches = StepBatches(data, batch_size=8, micro_batch_size=8, data_seed=0, mask_seed=0, masking=masking)
    assert schedule["prefix"]["tokens"] == sum(batches.global_tokens(s) for s in range(8))
    assert schedule["own"]["tokens"] == batches.global_tokens(8) + batches.global_tokens(9)
    assert consumed["tokens"] == schedule["prefix"]["tokens"] + schedule["own"]["tokens"]
    for key in ("time_s", "flops"):
        assert consumed[key] == pytest.approx(schedule["prefix"][key] + schedule["own"][key])
        assert schedule["own"][key] > 0
    # every step of one shape charges the same analytic FLOPs: the branch's two steps cost 2/8 of
    # its prefix's student FLOPs when the masked counts are equal; at least they are of that order
    assert 0.1 < schedule["own"]["flops"] / schedule["prefix"]["flops"] < 0.5
    assert branch["budget_exhausted"] and branch["schedule"]["branched_from"] == str(snapshot)


def test_wsd_branch_matches_a_run_that_never_stopped(make_config, tmp_path, monkeypatch):
    """A branch is the trunk continued: branching at 8 and decaying to 10 gives the same weights
    as one uninterrupted wsd run to 10 with the same warm-up (same data, masks, dropout stream)."""
    common = dict(schedule="wsd", schedule_warmup=2.0, decay_fraction=0.2, lr=1e-3)
    trunk_dir = tmp_path / "trunk"
    _run_recording_lrs(make_config(trunk_dir, budget="20steps", snapshots=[8.0], **common), monkeypatch)
    snapshot = trunk_dir / "snapshots" / "at-8.0.pt"
    _run_recording_lrs(
        make_config(tmp_path / "branch", budget="10steps", init_from=str(snapshot), **common), monkeypatch
    )
    _run_recording_lrs(make_config(tmp_path / "whole", budget="10steps", **common), monkeypatch)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "branch" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_wsd_refusals(make_config, tmp_path):
    from budgetkd.train import pretrain

    with pytest.raises(BudgetKDError, match="need schedule: wsd"):
        pretrain(make_config(tmp_path / "a", snapshots=[1.0]))
    with pytest.raises(BudgetKDError, match="schedule: must be .linear. or .wsd."):
        pretrain(make_config(tmp_path / "b", schedule="cosine"))
    with pytest.raises(BudgetKDError, match="inside the run's budget"):
        pretrain(make_config(tmp_path / "c", schedule="wsd", snapshots=[9.0]))


def test_budget_axis_units_follow_the_sweeps_size():
    from budgetkd.sweep_report import axis_unit

    assert axis_unit("time", 90.0) == ("seconds", 1.0)
    assert axis_unit("time", 1920.0) == ("minutes", 1 / 60)  # 32 min on the axis, not 0.53 h
    assert axis_unit("time", 4 * 3600.0) == ("hours", 1 / 3600)
    assert axis_unit("flops", 1e9) == ("FLOPs", 1.0)


def test_crossover_text_names_direction_unit_and_interval():
    from budgetkd.sweep_report import _crossover_text

    entry = {
        "points": [{"budget": 600.0}, {"budget": 2400.0}],
        "crossover": 1200.0,
        "direction": "kd_stops_paying",
        "low": 900.0,
        "high": None,
        "resamples": 2000,
    }
    assert _crossover_text(entry, "time") == "KD stops paying at 20 minutes (95 % interval 15 minutes – open)"
    none = {
        "points": [{"budget": 1e12}, {"budget": 4e12}],
        "crossover": None,
        "text": "no crossover between 1e+12 and 4e+12 (KD ahead throughout)",
        "no_crossover_share": 0.9,
    }
    assert _crossover_text(none, "flops").endswith(
        "(KD ahead throughout); in 10 % of the bootstrap resamples KD stops paying inside it"
    )


def test_budget_tags_are_short_unless_they_collide():
    from budgetkd.sweep import budget_tags

    assert budget_tags(["3600.0s", "100000000.0tokens"]) == ["3600s", "1e+08tokens"]
    # %g keeps 6 digits: 1000001 and 1000002 tokens would share "1e+06tokens"
    assert budget_tags(["1000001.0tokens", "1000002.0tokens"]) == ["1000001.0tokens", "1000002.0tokens"]


def test_crossover_against_k_by_hand():
    import math

    from budgetkd.sweep_report import crossover_vs_students

    no_kd = [(1.0, 50.0), (4.0, 70.0)]  # No-KD Avg = 50 + 20·log4(c), interpolated in log-budget
    kd = [(1.0, 60.0), (2.0, 62.0), (3.0, 63.0)]  # (own budget, Avg)
    no_kd_at = lambda c: 50 + 20 * math.log(c) / math.log(4)  # noqa: E731
    # K = 4 students share T = 1: each KD point costs own + 0.25
    rows = {r["students"]: r for r in crossover_vs_students(no_kd, kd, 1.0, [1, 4])}
    d = [avg - no_kd_at(own + 0.25) for own, avg in kd]  # +6.78, +0.30, −4.00
    x0, x1 = math.log(2.25), math.log(3.25)
    want = math.exp(x0 + d[1] * (x1 - x0) / (d[1] - d[2]))
    assert rows[4]["crossover"] == pytest.approx(want) and rows[4]["points"] == 3
    # K = 1: costs 2, 3, 4 → Δ 0 (no sign), 62 − 65.85 = −3.85, 63 − 70 = −7: no crossing
    assert rows[1]["crossover"] is None and rows[1]["points"] == 3


# -- the sweep report on a hand-built sweep directory -------------------------------------------
N_DEV = 40
# correct RTE answers out of 40 at budgets 1, 2, 4, 8 (×1e12 FLOPs): Δ = +15, +5, −10, −15 points
SWEEP_CORRECT = {"none": (20, 24, 28, 32), "vanilla": (26, 26, 24, 26)}
SWEEP_POINTS = (1e12, 2e12, 4e12, 8e12)


def _rte(correct: int) -> dict:
    """One seed of RTE predictions right on exactly ``correct`` of the 40 dev examples."""
    labels = np.arange(N_DEV) % 2
    predicted = labels.copy()
    predicted[: N_DEV - correct] = 1 - predicted[: N_DEV - correct]
    return {"rte": {1: {"dev": (labels.tolist(), predicted.tolist())}}}


def _sweep_dir(tmp_path, limited: set = frozenset(), setup: dict | None = None):
    """A finished sweep of No-KD and Vanilla-KD at four FLOPs budgets, written as compare does:
    sweep.json, experiment.json, teacher_cost.json, runs/<id>/summary.json, glue/<id>/ with
    prediction files. ``limited``: the (label, budget) whose run stopped at the data limit."""
    import json

    from test_report import _summary, _write_glue_with_predictions

    out = tmp_path / "sweep-out"
    students = {}
    for label, strategy, display in (("none", "none", "No-KD"), ("vanilla", "vanilla", "Vanilla-KD")):
        for point, correct in zip(SWEEP_POINTS, SWEEP_CORRECT[label]):
            tag = f"{point:g}flops"
            sid = f"{label}@{tag}"
            run = out / "runs" / sid
            run.mkdir(parents=True)
            summary = _summary(strategy, display, 1_000_000, 100.0, 0.0 if strategy == "none" else 1e12)
            summary["stopped_by"] = "data limit" if (label, point) in limited else "budget"
            (run / "summary.json").write_text(json.dumps(summary))
            (out / "glue" / sid).mkdir(parents=True)
            _write_glue_with_predictions(out / "glue" / sid, _rte(correct))
            students[sid] = {
                "label": label,
                "strategy": strategy,
                "tag": tag,
                "budget": f"{point}flops",
                "amount": point,
                "point_amount": point,
                "run": str(run),
            }
    charge = {"mode": "inference", "time_s": 0.0, "flops": 0.0, "charge_forward": True}
    sweep = {
        "schedule": "wsd",
        "decay_fraction": 0.2,
        "currency": "flops",
        "teacher_cost": charge,
        "points": [f"{p:g}flops" for p in SWEEP_POINTS],
        "students": students,
    }
    (out / "sweep.json").write_text(json.dumps(sweep))
    (out / "teacher_cost.json").write_text(json.dumps(charge))
    experiment = {
        "strategies": [{"label": "none", "name": "none"}, {"label": "vanilla", "name": "vanilla"}],
        "teacher_cost": {"mode": "inference"},
        "budget": {"schedule": "wsd", "decay_fraction": 0.2},
        "data_setting": "limited",
        "report": {"bootstrap_samples": 200},
        **(setup or {}),
    }
    (out / "experiment.json").write_text(json.dumps(experiment))
    return out


def _capture_sweep_figures(monkeypatch) -> dict:
    """Replace sweep_report._save by one that keeps each figure (by file name) and writes it too."""
    from budgetkd import sweep_report

    figures: dict = {}
    original = sweep_report._save

    def keep(fig, path):
        figures[path.name] = {
            "titles": [ax.get_title() for ax in fig.axes],
            "legend": [t.get_text() for t in fig.axes[0].get_legend().get_texts()],
            "hollow": [
                list(line.get_xdata())
                for line in fig.axes[0].get_lines()
                if line.get_markerfacecolor() == "white" and len(line.get_xdata())
            ],
            "dashed": [
                list(line.get_xdata()) for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"
            ],
        }
        return original(fig, path)

    monkeypatch.setattr(sweep_report, "_save", keep)
    return figures


def test_the_crossover_leaves_data_limited_points_out_and_says_so(tmp_path, monkeypatch):
    import json

    from budgetkd.sweep_report import write_sweep_report

    # every point: Δ +15 → +5 between 2 and 4 (×1e12), then −10: log B* = log 2 + 5/15·log 2
    whole = _sweep_dir(tmp_path / "a")
    write_sweep_report(whole)
    entry = json.loads((whole / "sweep" / "crossover.json").read_text())["vanilla"]
    assert [p["delta"] for p in entry["points"]] == pytest.approx([15.0, 5.0, -10.0, -15.0])
    assert entry["crossover"] == pytest.approx(2e12 * 2 ** (1 / 3)) and entry["excluded"] == []
    # the KD run at 4e12 stopped at the data limit: its point is left out; between +5 at 2 and
    # −15 at 8 the zero is at log 2 + 5/20·log 4, i.e. 2·√2 = 2.83 (×1e12)
    figures = _capture_sweep_figures(monkeypatch)
    out = _sweep_dir(tmp_path / "b", limited={("vanilla", 4e12)})
    write_sweep_report(out)
    entry = json.loads((out / "sweep" / "crossover.json").read_text())["vanilla"]
    assert entry["crossover"] == pytest.approx(2e12 * 2**0.5) and entry["excluded"] == [4e12]
    assert [p["data_limited"] for p in entry["points"]] == [False, False, True, False]
    md = (out / "sweep.md").read_text()
    assert "left out of the crossover: it is interpolated between the remaining points" in md
    assert "- Vanilla-KD: KD stops paying at 2.83e+12 FLOPs (95 % interval" in md
    assert md.count("; left out (‡, data limit): 4e+12 FLOPs") == 1
    # the per-point table, the Δ table and the plots carry ‡
    point = md.split("## 4e+12flops")[1].split("## ")[0]
    assert "| Vanilla-KD (vanilla@4e+12flops) ‡ | 60.0 | -10.0 [" in point
    assert (
        "‡ Vanilla-KD (vanilla@4e+12flops): stopped by the data limit before its budget was spent." in point
    )
    assert "‡" not in md.split("## 2e+12flops")[1].split("## ")[0]
    assert "| Vanilla-KD | 4e+12 FLOPs ‡ | -10.0 [" in md and "| Vanilla-KD | 8e+12 FLOPs | -15.0 [" in md
    delta_plot, avg_plot = figures["delta_vs_budget.png"], figures["avg_vs_budget.png"]
    limit_entry = "‡ stopped at the data limit (dashed: Δ without them, the crossover's)"
    assert delta_plot["hollow"] == [[4e12]] and limit_entry in delta_plot["legend"]
    assert delta_plot["dashed"] == [[1e12, 2e12, 8e12]]  # the line the crossover is interpolated on
    assert avg_plot["hollow"] == [[4e12]] and "‡ stopped at the data limit" in avg_plot["legend"]
    assert "crosses 0 at 2.83e+12 FLOPs" in " ".join(delta_plot["legend"])


def test_a_data_limited_no_kd_run_marks_the_point_of_every_kd_strategy(tmp_path):
    import json

    from budgetkd.sweep_report import write_sweep_report

    # No-KD stopped early at 2e12 and 4e12: the two points left are +15 at 1, −15 at 8; the zero
    # lies half-way in log-budget, at √8 = 2.83 (×1e12)
    out = _sweep_dir(tmp_path, limited={("none", 2e12), ("none", 4e12)})
    write_sweep_report(out)
    entry = json.loads((out / "sweep" / "crossover.json").read_text())["vanilla"]
    assert entry["excluded"] == [2e12, 4e12]
    assert entry["crossover"] == pytest.approx(8**0.5 * 1e12)
    assert "| No-KD (none@2e+12flops) ‡ | 60.0 | 0 (base) | – |" in (out / "sweep.md").read_text()


def test_every_sweep_delta_names_its_tasks_and_the_setup(tmp_path, monkeypatch):
    figures = _capture_sweep_figures(monkeypatch)
    from budgetkd.sweep_report import write_sweep_report

    setup = {"teacher_cost": {"mode": "free"}, "data_setting": "unlimited"}
    out = _sweep_dir(tmp_path, setup=setup)
    (out / "teacher_cost.json").unlink()  # the config's mode, then
    write_sweep_report(out)
    md = (out / "sweep.md").read_text()
    want = "teacher_cost: free · schedule: wsd (decay fraction 0.2) · data_setting: unlimited"
    assert f"Setup: {want}." in md
    assert "| Strategy | Avg | Δ [95 % CI] | Δ over |" in md
    assert "| Vanilla-KD (vanilla@1e+12flops) | 65.0 | +15.0 [" in md and md.count("] | RTE |") == 8
    # no data-limited run: no table line carries the mark, nothing is left out
    assert not [line for line in md.splitlines() if line.startswith("|") and "‡" in line]
    assert "left out (‡" not in md
    for name in ("delta_vs_budget.png", "avg_vs_budget.png"):
        assert want in figures[name]["titles"][0], name
        assert figures[name]["hollow"] == figures[name]["dashed"] == []
        assert not any("‡ stopped at the data limit" in t for t in figures[name]["legend"])
    # the per-point tables state it as table.md does
    assert f"Setup: {want}." in (out / "sweep" / "table-1e+12flops.md").read_text()


@pytest.mark.parametrize("limited, points", [(frozenset(), 3), ({("vanilla", 4e12)}, 2)])
def test_the_crossover_against_k_leaves_data_limited_points_out(tmp_path, limited, points):
    import json

    from budgetkd.sweep_report import write_sweep_report

    out = _sweep_dir(tmp_path, limited=limited)
    sweep = json.loads((out / "sweep.json").read_text())
    charge = {
        "mode": "amortized",
        "time_s": 0.0,
        "flops": 1e11,
        "students": 4,
        "pretraining": {"flops": 4e11},
    }
    sweep["teacher_cost"] = charge
    (out / "sweep.json").write_text(json.dumps(sweep))
    (out / "teacher_cost.json").write_text(json.dumps(charge))
    write_sweep_report(out)
    rows = json.loads((out / "sweep" / "crossover.json").read_text())["vanilla"]["by_students"]
    # K = 1024: the KD points cost 1, 2, 4, 8 (×1e12) plus 4e11/1024; the last lies beyond No-KD's
    # largest point, so 3 points count, 2 when the ‡ point at 4 is left out
    assert {r["students"]: r["points"] for r in rows}[1024] == points


def test_the_sweep_report_refuses_unfair_rows_unless_allowed_and_then_marks_them(tmp_path):
    """fairness.json names a rule the rows differ in: sweep.md is refused like table.md (one line,
    nothing written); with allow_unfair it is written and says UNFAIR, as every point's table does."""
    import json

    from budgetkd.errors import BudgetKDError
    from budgetkd.sweep_report import write_sweep_report

    out = _sweep_dir(tmp_path)
    rules = {"schedule": "wsd", "warmup": 0.06, "lr_rule": "given", "data_setting": "limited",
             "teacher_cost": "inference"}  # fmt: skip
    fairness = {"rules": {"none": {**rules, "schedule": "linear"}, "vanilla": rules}, "differs": ["schedule"]}
    (out / "fairness.json").write_text(json.dumps(fairness))
    with pytest.raises(BudgetKDError, match="one schedule rule, got none: linear, vanilla: wsd"):
        write_sweep_report(out)
    assert not (out / "sweep.md").exists() and not (out / "sweep").exists()
    write_sweep_report(out, allow_unfair=True)
    mark = "UNFAIR (written with --allow-unfair): the rows differ in schedule (fairness.json)."
    assert mark in (out / "sweep.md").read_text()
    assert all(mark in p.read_text() for p in (out / "sweep").glob("table-*.md"))
