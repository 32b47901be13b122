"""The report of a budget sweep (SPEC §7a): Table 2 per budget, Δ and GLUE Avg against the budget,
the crossover budget of every KD strategy with its bootstrap interval, the crossover against the
number of students that share the teacher, and a long-format CSV.

Files written into the experiment directory::

    sweep/table-<tag>.md|csv     Table 2 at each point (the rows of that budget)
    sweep/crossover.json         per KD strategy: Δ per point with its interval, the crossover
    sweep/long.csv               strategy, budget, currency, task, metric, value, seed
    plots/delta_vs_budget.png    Δ of each KD strategy against the budget (log axis), intervals
    plots/avg_vs_budget.png      GLUE Avg against the budget, one line per strategy
    plots/crossover_vs_students.png  (teacher_cost amortized) the crossover against K
    sweep.md                     the setup, Table 2 in brief at every point, Δ at every point, the
                                 crossovers and the plots

Every Δ names the tasks it is over. A point where a run stopped at the data limit (summary
``stopped_by`` other than ``budget``; the KD student's or No-KD's) is marked ‡ in the tables and
drawn hollow in the plots, and is left out of the crossover, which is interpolated between the
remaining points (:func:`usable_crossover`). The teacher-cost mode, schedule and data setting
(:func:`sweep_setup`) head sweep.md and every plot title.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_write_json, atomic_write_text, read_json
from budgetkd.sweep import crossings, crossover_with_interval, no_crossover_text, observed_direction

UNITS = {
    "time": ("hours", 1 / 3600),
    "flops": ("FLOPs", 1.0),
    "tokens": ("tokens", 1.0),
    "steps": ("steps", 1.0),
}


def axis_unit(currency: str, largest: float) -> tuple[str, float]:
    """(unit, scale) for a budget axis: time in hours, or minutes / seconds when the largest point
    is under an hour / two minutes (a laptop sweep reads 2–32 min, not 0.03–0.53 h)."""
    if currency == "time":
        if largest < 120:
            return "seconds", 1.0
        if largest < 3600:
            return "minutes", 1 / 60
    return UNITS.get(currency, (currency, 1.0))


def read_sweep(out: Path) -> dict:
    """``DIR/sweep.json`` as written by ``compare`` (points, students, currency)."""
    path = out / "sweep.json"
    if not path.is_file():
        raise BudgetKDError(f"{out} holds no sweep (no sweep.json)")
    return read_json(path, "sweep record")


def _point_row(out: Path, students: dict, sid: str, seeds: list[int]) -> dict:
    """The table row of student ``sid`` (seed 0's id) at its point: its own run, or with several
    pretraining seeds the row over its runs ``sid~sK`` (report.merge_units)."""
    from budgetkd import report
    from budgetkd.stages import seed_suffix

    def unit(run_id: str) -> dict:
        st = students[run_id]
        return report.collect_row(
            run_id, st["strategy"], Path(st["run"]), out / "glue" / run_id / "glue.json"
        )

    if seeds == [0]:
        return unit(sid)
    present = [k for k in seeds if sid + seed_suffix(k) in students]
    return report.merge_units([unit(sid + seed_suffix(k)) for k in present], present)


def long_rows(out: Path, sweep: dict) -> list[dict]:
    """One row per (student, task, metric, seed) of the best configuration of every task.

    ``budget`` is the point's charged budget, the same for every strategy at a point (the x of the
    plots); ``trained_budget`` is what the student itself trained on: the same, except under
    ``teacher_cost: amortized``, where a KD student trains on the point minus its 1/K share."""
    rows = []
    for sid, student in sweep["students"].items():
        glue_path = out / "glue" / sid / "glue.json"
        if not glue_path.is_file():
            continue
        glue = read_json(glue_path, "GLUE results")
        for task, entry in sorted(glue.get("tasks", {}).items()):
            best = entry.get("best")
            if not best:
                continue
            for run in entry.get("runs", []):
                if run["lr"] != best["lr"] or run["batch_size"] != best["batch_size"]:
                    continue
                for metric, value in run["metrics"].items():
                    rows.append(
                        {
                            "strategy": student["label"],
                            "budget": student["point_amount"],
                            "trained_budget": student["amount"],
                            "currency": sweep["currency"],
                            "point": student["tag"],
                            "task": task,
                            "metric": metric,
                            "value": value,
                            "seed": run["seed"],
                        }
                        | ({"pretrain_seed": student["pretrain_seed"]} if "pretrain_seed" in student else {})
                    )
    return rows


def render_long_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["strategy", "budget", "currency", "point", "task", "metric", "value", "seed", "trained_budget"]
    if any("pretrain_seed" in row for row in rows):  # pretrain_seeds: which run (0 where unmarked)
        fields.append("pretrain_seed")
        rows = [{"pretrain_seed": 0} | row for row in rows]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row[k] is None else row[k]) for k in fields})
    return buffer.getvalue()


def crossover_summary(
    budgets: list[float], deltas: list[float], samples: np.ndarray | None, level: float = 0.95
) -> dict:
    """The crossover of one KD strategy: first sign change of Δ in log-budget, with its interval
    from the bootstrap samples of Δ (one column per point) when there are any."""
    if samples is None or len(samples) == 0:
        found = crossings(budgets, deltas)
        result = {
            "crossover": found[0].budget if found else None,
            "direction": observed_direction(deltas, found),
            "low": None,
            "high": None,
        }
        if not found:
            result["text"] = no_crossover_text(budgets, deltas)
        return result
    return crossover_with_interval(budgets, deltas, samples, level)


def crossover_vs_students(
    no_kd: list[tuple[float, float]], kd: list[tuple[float, float]], pretraining: float, students: list[int]
) -> list[dict]:
    """The crossover against K when each KD student pays 1/K of the teacher's ``pretraining``.

    ``no_kd``/``kd``: (own budget, Avg) per point. A KD student trained on its own budget ``a``
    costs ``a + T/K`` in all; its Δ is its Avg minus No-KD's Avg at that cost, interpolated
    linearly in log-budget between No-KD's points (points outside No-KD's range are left out).
    """
    xs = np.log([b for b, _ in no_kd])
    ys = np.array([a for _, a in no_kd])
    out = []
    for k in students:
        costs, deltas = [], []
        for own, avg in kd:
            cost = own + pretraining / k
            if not xs[0] <= math.log(cost) <= xs[-1]:
                continue
            costs.append(cost)
            deltas.append(avg - float(np.interp(math.log(cost), xs, ys)))
        found = crossings(costs, deltas) if len(costs) >= 2 else []
        out.append({"students": k, "crossover": found[0].budget if found else None, "points": len(costs)})
    return out


def plot_sweep(
    out: Path,
    currency: str,
    curves: dict,
    averages: dict,
    by_students: dict | None,
    avg_tasks: list[str] | None = None,
    setup_line: str | None = None,
) -> list[Path]:
    """Δ against budget with intervals and crossovers; Avg against budget; crossover against K.
    ``avg_tasks``: the column titles the Avg is over, named on the axes; ``setup_line``: the
    teacher-cost mode, schedule and data setting, added to every title. Data-limited points
    (``curve["limited"]``, ``averages[…]["limited"]``) are drawn hollow, with a legend entry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max((max(c["budgets"]) for c in curves.values() if c["budgets"]), default=0.0)
    largest = max([largest] + [v[0] for a in averages.values() for v in a["values"]])
    unit, scale = axis_unit(currency, largest)
    axes = SimpleNamespace(unit=unit, scale=scale, over=f" over {', '.join(avg_tasks)}" if avg_tasks else "",
                           suffix=_setup_suffix(setup_line), colours=plt.rcParams["axes.prop_cycle"].by_key()["color"])  # fmt: skip
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = [_save(_plot_delta(plt, curves, axes), plots / "delta_vs_budget.png")]
    written.append(_save(_plot_avg(plt, averages, axes), plots / "avg_vs_budget.png"))
    if by_students:
        written.append(
            _save(_plot_crossover_k(plt, curves, by_students, axes), plots / "crossover_vs_students.png")
        )
    return written


def _crossover_bar(ax, curve: dict, i: int, colour, scale: float) -> bool:
    """The crossover's 95 % interval as a bar in a strip along the bottom, one row per strategy
    (an open bound runs to the end of the swept range); whether one was drawn."""
    cross = curve["crossover"]
    low_c, high_c = cross.get("low"), cross.get("high")
    if low_c is None and high_c is None:
        return False
    left = (low_c if low_c is not None else min(curve["budgets"])) * scale
    right = (high_c if high_c is not None else max(curve["budgets"])) * scale
    strip = ax.get_xaxis_transform()  # x in data, y in axes fraction
    y = 0.03 + 0.04 * i
    ax.hlines(y, left, right, color=colour, linewidth=4, alpha=0.6, transform=strip)
    ax.plot([cross["crossover"] * scale], [y], marker="|", markersize=10, color=colour, transform=strip)
    return True


def _plot_delta(plt, curves: dict, axes):
    """Δ against the budget: one line per KD strategy, its interval band, ‡ points hollow, the
    crossover dotted with its interval in the bottom strip."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = 0
    for i, curve in enumerate(curves.values()):
        colour = axes.colours[i % len(axes.colours)]
        x = np.array(curve["budgets"]) * axes.scale
        y = np.array(curve["deltas"])
        low = np.array([np.nan if v is None else v for v in curve["low"]], dtype=float)
        high = np.array([np.nan if v is None else v for v in curve["high"]], dtype=float)
        cross = curve["crossover"].get("crossover")
        note = (
            "no crossover in range" if cross is None else f"crosses 0 at {cross * axes.scale:.3g} {axes.unit}"
        )
        ax.plot(x, y, marker="o", color=colour, label=f"{curve['display']} ({note})")
        limited = np.array(curve["limited"], dtype=bool)
        _hollow(ax, x[limited], y[limited], colour)
        if limited.any():  # the line the crossover is interpolated on: the ‡ points left out
            ax.plot(x[~limited], y[~limited], linestyle="--", linewidth=1, color=colour)
        if np.isfinite(low).any():
            ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
        if cross is not None:
            ax.axvline(cross * axes.scale, color=colour, linestyle=":", linewidth=1)
            if _crossover_bar(ax, curve, i, colour, axes.scale):
                bars = max(bars, i + 1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    if bars:  # room below the data for the strip of crossover intervals
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom - (0.04 * bars + 0.03) / (1 - 0.04 * bars - 0.03) * (top - bottom), top)
    ax.set_xscale("log")
    _point_ticks(ax, [b * axes.scale for c in curves.values() for b in c["budgets"]])
    ax.set_xlabel(f"budget ({axes.unit}, log scale)")
    ax.set_ylabel(f"Δ GLUE Avg{axes.over} vs No-KD (points)")
    ax.set_title(
        "Where KD stops paying: Δ against the budget\n"
        "(bands: 95 % intervals of Δ; dotted: crossover; bars at the bottom: its 95 % interval)"
        + axes.suffix,
        fontsize=10,
    )
    _data_limit_legend_entry(
        ax, any(any(c["limited"]) for c in curves.values()), " (dashed: Δ without them, the crossover's)"
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def _plot_avg(plt, averages: dict, axes):
    """GLUE Avg against the budget, one line per strategy, ‡ points hollow."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, points in enumerate(averages.values()):
        colour = axes.colours[i % len(axes.colours)]
        values = sorted(points["values"])
        ax.plot([v[0] * axes.scale for v in values], [v[1] for v in values], marker="o", color=colour,
                label=points["display"])  # fmt: skip
        limited = [(v[0] * axes.scale, v[1]) for v in values if v[0] in points.get("limited", [])]
        _hollow(ax, [a for a, _ in limited], [b for _, b in limited], colour)
    ax.set_xscale("log")
    _point_ticks(ax, [v[0] * axes.scale for a in averages.values() for v in a["values"]])
    ax.set_xlabel(f"budget ({axes.unit}, log scale)")
    ax.set_ylabel(f"GLUE Avg{axes.over} (dev, points)")
    ax.set_title("GLUE Avg against the pretraining budget" + axes.suffix, fontsize=10)
    _data_limit_legend_entry(ax, any(a.get("limited") for a in averages.values()))
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def _plot_crossover_k(plt, curves: dict, by_students: dict, axes):
    """The crossover budget against K, the students sharing the teacher's pretraining."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, rows) in enumerate(by_students.items()):
        pts = [(r["students"], r["crossover"] * axes.scale) for r in rows if r["crossover"] is not None]
        if pts:
            ax.plot(
                *zip(*pts),
                marker="o",
                color=axes.colours[i % len(axes.colours)],
                label=curves[label]["display"],
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("students sharing the teacher's pretraining (K, log scale)")
    ax.set_ylabel(f"crossover budget ({axes.unit}, log scale)")
    ax.set_title(
        "Crossover budget against K (teacher_cost: amortized; ‡ points left out)" + axes.suffix, fontsize=10
    )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _setup_suffix(setup_line: str | None) -> str:
    return f"\n{setup_line}" if setup_line else ""


def _hollow(ax, xs, ys, colour) -> None:
    """Data-limited points: white-filled markers over the line's filled ones."""
    if len(xs):
        ax.plot(
            xs,
            ys,
            linestyle="none",
            marker="o",
            markersize=9,
            markerfacecolor="white",
            markeredgecolor=colour,
            markeredgewidth=1.8,
            zorder=3,
        )


def _data_limit_legend_entry(ax, any_limited: bool, more: str = "") -> None:
    """A legend entry (a hollow black marker) for the data-limited points, when there are any."""
    if any_limited:
        ax.plot(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=9,
            markerfacecolor="white",
            markeredgecolor="black",
            markeredgewidth=1.8,
            label=DATA_LIMIT_LEGEND + more,
        )


def _point_ticks(ax, xs: list[float]) -> None:
    """Ticks at the swept budgets themselves: a sweep spans a decade or two, where a log axis
    alone labels one or two powers of ten and leaves the points unreadable."""
    from matplotlib.ticker import NullFormatter, NullLocator

    values = sorted(set(xs))
    if not values:
        return
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(values, [f"{v:.3g}" for v in values])


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_json(path: Path, payload: dict) -> Path:
    atomic_write_json(path, payload)
    return path


def write_text(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


# -- the whole report -----------------------------------------------------------------------------
STUDENT_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

DATA_LIMIT_LEGEND = "‡ stopped at the data limit"
DATA_LIMIT_NOTE = (
    "‡ = a run stopped at the data limit before its budget was spent (at a point of Δ: the KD "
    "student's or No-KD's). Such points are shown and marked, and left out of the crossover: it is "
    "interpolated between the remaining points."
)


def sweep_setup(out: Path, sweep: dict) -> dict:
    """:func:`budgetkd.report.read_setup`, completed from ``sweep.json`` where the directory's
    config does not record the teacher-cost mode or the schedule."""
    from budgetkd import report

    setup = report.read_setup(out)
    charge = sweep.get("teacher_cost") or {}
    if setup["teacher_cost"] is None and charge.get("mode"):
        setup["teacher_cost"] = charge["mode"]
        setup["students"] = charge.get("students") if charge["mode"] == "amortized" else None
    if setup["schedule"] is None and sweep.get("schedule"):
        setup["schedule"] = sweep["schedule"]
        setup["decay_fraction"] = sweep.get("decay_fraction") if sweep["schedule"] == "wsd" else None
    return setup


def write_sweep_report(out: str | Path, settings=None, allow_unfair: bool = False) -> list[Path]:
    """Every sweep file of a compare directory (module docstring); returns their paths. Refused
    like Table 2 when ``fairness.json``'s rows differ in a training rule, unless ``allow_unfair``
    (then every point's table and sweep.md say so)."""
    from budgetkd import report

    out = Path(out)
    sweep = read_sweep(out)
    settings = settings or report.resolve_settings(out)
    unfair = report.unfair_fields(out, allow_unfair)
    setup = sweep_setup(out, sweep)
    setup_line = report.setup_text(setup)
    currency = sweep["currency"]
    students = sweep["students"]
    seeds = sorted({st.get("pretrain_seed", 0) for st in students.values()})
    teacher_note = report.teacher_preparation_note(
        report.read_teacher_preparation(out), sweep.get("teacher_cost")
    )
    written: list[Path] = []
    averaged: set[str] = set()  # the tasks some Avg is over
    curves: dict[str, dict] = {}
    averages: dict[str, dict] = {}
    sections = _header_lines(setup_line, len(seeds))
    if unfair:
        sections[2:2] = [f"**{report.unfair_text(unfair)}.**", ""]
    for tag in sweep["points"]:
        ids = [sid for sid, st in students.items() if st["tag"] == tag and not st.get("pretrain_seed")]
        rows = [_point_row(out, students, sid, seeds) for sid in ids]
        data = {"rows": rows, "setup": setup}
        table = report.build_table(data, settings)
        table["unfair"] = unfair
        averaged.update(k for trow in table["rows"] for k in trow["avg_tasks"])
        budgets = report.budget_rows(data, sweep.get("teacher_cost"))
        point = students[ids[0]]["point_amount"]
        markdown = report.render_markdown(table, budgets, teacher_note)
        written.append(write_text(out / "sweep" / f"table-{tag}.md", markdown))
        written.append(write_text(out / "sweep" / f"table-{tag}.csv", report.render_csv(table)))
        sections += [f"## {tag}: {point:g} {currency}", "", *_compact_table(table)]
        _add_point(rows, table, point, students, settings, curves, averages)
    crossover = _crossover_record(curves, currency)
    by_students = _by_students(sweep, students, currency, curves, averages)
    for label, rows_k in (by_students or {}).items():
        crossover[label]["by_students"] = rows_k
    written.append(write_json(out / "sweep" / "crossover.json", crossover))
    written.append(write_text(out / "sweep" / "long.csv", render_long_csv(long_rows(out, sweep))))
    avg_titles = [c.title for c in report.ALL_COLUMNS if c.key in averaged]
    written += plot_sweep(out, currency, curves, averages, by_students, avg_titles, setup_line)
    sections += _closing_lines(crossover, currency, bool(by_students))
    written.append(write_text(out / "sweep.md", "\n".join(sections)))
    return written


def _header_lines(setup_line: str, seeds: int) -> list[str]:
    lines = ["# Budget sweep: KD against pretraining from scratch at every budget", ""]
    lines += [f"Setup: {setup_line}.", "", DATA_LIMIT_NOTE, ""]
    if seeds > 1:
        lines += [
            f"Pretraining seeds: {seeds} runs per strategy and point; every Avg and Δ is the mean over "
            "them, and every Δ and crossover interval is over pretraining seeds, fine-tuning seeds and dev "
            "examples (the two-level bootstrap of table.md; paired across points on the pretraining-seed index).",
            "",
        ]
    return lines


def _add_point(rows, table, point: float, students: dict, settings, curves: dict, averages: dict) -> None:
    """One sweep point's rows into ``averages`` (Avg per strategy label) and ``curves`` (Δ per KD
    label, with its bootstrap samples for the crossover); ‡ when the row or No-KD is data-limited."""
    from budgetkd import report

    base = next((r for r in rows if r["strategy"] == "none"), None)
    base_limited = any(t["data_limited"] for t in table["rows"] if t["is_base"])
    seeded = any(r.get("units") for r in rows)  # pretrain_seeds: the two-level bootstrap
    resample = report.hierarchical_bootstrap if seeded else report.paired_bootstrap
    boot = resample(rows, [report.COLUMN_BY_KEY[k] for k in table["avg_tasks"]], settings)
    rng = np.random.default_rng(settings.bootstrap_seed)
    for row, trow in zip(rows, table["rows"]):
        label = students[row["label"]]["label"]
        entry = averages.setdefault(label, {"display": _display(trow), "values": [], "limited": []})
        if trow["avg"] is not None:
            entry["values"].append((point, 100 * trow["avg"], students[row["label"]]["amount"]))
            if trow["data_limited"]:
                entry["limited"].append(point)
        if base is None or row is base or trow["delta"] is None:
            continue
        samples, kind = report.delta_samples(row, base, trow["delta_tasks"], boot, settings, rng)
        curve = curves.setdefault(label, _new_curve(_display(trow), kind))
        low, high = trow["delta_ci95"] or (None, None)
        curve["budgets"].append(point)
        curve["deltas"].append(100 * trow["delta"])
        curve["low"].append(None if low is None else 100 * low)
        curve["high"].append(None if high is None else 100 * high)
        curve["samples"].append(None if samples is None else 100 * np.asarray(samples))
        curve["limited"].append(trow["data_limited"] or base_limited)
        curve["tasks"].append(list(trow["delta_tasks"]))


def _crossover_record(curves: dict, currency: str) -> dict:
    """crossover.json: per KD label its points (Δ, interval, ‡, tasks) and its crossover; the
    curves' bootstrap samples are consumed here."""
    crossover = {}
    for label, curve in curves.items():
        curve["crossover"] = usable_crossover(curve, curve.pop("samples"))
        columns = zip(
            curve["budgets"], curve["deltas"], curve["low"], curve["high"], curve["limited"], curve["tasks"]
        )
        crossover[label] = {
            "display": curve["display"],
            "currency": currency,
            "points": [
                {"budget": b, "delta": d, "low": lo, "high": hi, "data_limited": lim, "tasks": tasks}
                for b, d, lo, hi, lim, tasks in columns
            ],
            "interval": curve["kind"],
            **curve["crossover"],
        }
    return crossover


def _closing_lines(crossover: dict, currency: str, by_students: bool) -> list[str]:
    lines = ["## Δ at every point (KD − No-KD, GLUE points)", "", *_delta_table(crossover, currency)]
    lines += ["## Crossover (where Δ crosses 0, interpolated in log-budget; ‡ points left out)", ""]
    lines += [f"- {entry['display']}: {_crossover_text(entry, currency)}" for entry in crossover.values()]
    lines += [
        "",
        "![Δ against budget](plots/delta_vs_budget.png)",
        "",
        "![Avg against budget](plots/avg_vs_budget.png)",
        "",
    ]
    if by_students:
        lines += ["![Crossover against K](plots/crossover_vs_students.png)", ""]
    return lines


def _new_curve(display: str, kind: str | None) -> dict:
    """Δ of one KD strategy, point by point: budget, Δ, interval, bootstrap samples, whether the
    point is data-limited (‡) and the tasks its Δ is over."""
    keys = ("budgets", "deltas", "low", "high", "samples", "limited", "tasks")
    return {"display": display, "kind": kind, **{k: [] for k in keys}}


def usable_crossover(curve: dict, samples: list) -> dict:
    """The crossover (:func:`crossover_summary`) over the points that are not data-limited: a ‡
    point's Δ is not that of its budget, so it is left out of the interpolation. ``excluded``:
    the budgets left out. Fewer than two points left: no crossover, and the text says why."""
    keep = [i for i, limited in enumerate(curve["limited"]) if not limited]
    excluded = [b for b, limited in zip(curve["budgets"], curve["limited"]) if limited]
    budgets = [curve["budgets"][i] for i in keep]
    deltas = [curve["deltas"][i] for i in keep]
    if len(keep) < 2:
        return {
            "crossover": None,
            "direction": observed_direction(deltas, []),
            "low": None,
            "high": None,
            "excluded": excluded,
            "text": f"no crossover computed: {len(keep)} point(s) not data-limited, 2 needed",
        }
    kept = [samples[i] for i in keep]
    matrix = None
    if all(s is not None for s in kept) and len({len(s) for s in kept}) == 1:
        matrix = np.stack(kept, axis=1)  # [resamples, points]: paired across points
    return {**crossover_summary(budgets, deltas, matrix), "excluded": excluded}


def _by_students(sweep: dict, students: dict, currency: str, curves: dict, averages: dict) -> dict | None:
    """The crossover against K (teacher_cost amortized), over the points that are not data-limited."""
    charge = sweep.get("teacher_cost") or {}
    if charge.get("mode") != "amortized" or "none" not in {s["strategy"] for s in students.values()}:
        return None
    key = {"time": "time_s", "flops": "flops"}[currency]
    total = (charge.get("pretraining") or {}).get(key)
    no_kd_label = next(s["label"] for s in students.values() if s["strategy"] == "none")
    no_kd_avg = averages.get(no_kd_label, {"values": [], "limited": []})
    no_kd = [(b, a) for b, a, _ in sorted(no_kd_avg["values"]) if b not in no_kd_avg["limited"]]
    if not total or len(no_kd) < 2:
        return None
    by_students = {}
    for label in curves:
        entry = averages[label]
        own = [(amount, a) for b, a, amount in sorted(entry["values"]) if b not in entry["limited"]]
        by_students[label] = crossover_vs_students(no_kd, own, total, list(STUDENT_COUNTS))
    return by_students


def _display(trow: dict) -> str:
    return trow["display"].split(" (")[0]


def _task_titles(keys) -> str:
    from budgetkd.report import COLUMN_BY_KEY

    return ", ".join(COLUMN_BY_KEY[k].title for k in keys) or "–"


def _compact_table(table: dict) -> list[str]:
    """Avg and Δ of every row at one point, ‡ on data-limited rows, the tasks of each Δ."""
    from budgetkd.report import MARK_DATA_LIMIT, fmt_strategy

    lines = ["| Strategy | Avg | Δ [95 % CI] | Δ over |", "|---|---:|---:|---|"]
    for row in table["rows"]:
        avg = "–" if row["avg"] is None else f"{100 * row['avg']:.1f}"
        if row["delta"] is None:
            delta = "–" if not row["is_base"] else "0 (base)"
        else:
            delta = f"{100 * row['delta']:+.1f}"
            if row["delta_ci95"]:
                delta += f" [{100 * row['delta_ci95'][0]:+.1f}, {100 * row['delta_ci95'][1]:+.1f}]"
        tasks = _task_titles(row["delta_tasks"]) if row["delta"] is not None else "–"
        lines.append(f"| {fmt_strategy(row)} | {avg} | {delta} | {tasks} |")
    notes = [
        f"{MARK_DATA_LIMIT} {row['display']}: stopped by the {row['stopped_by']} before its budget was spent."
        for row in table["rows"]
        if row["data_limited"]
    ]
    return lines + [""] + [line for note in notes for line in (note, "")]


def _budget_format(currency: str, budgets: list[float]):
    unit, scale = axis_unit(currency, max(budgets, default=0.0))
    return lambda v: f"{v * scale:.3g} {unit}"


def _delta_table(crossover: dict, currency: str) -> list[str]:
    """One line per (KD strategy, point): Δ with its interval, ‡ on data-limited points, its tasks."""
    from budgetkd.report import MARK_DATA_LIMIT

    fmt = _budget_format(currency, [p["budget"] for e in crossover.values() for p in e["points"]])
    lines = ["| Strategy | Budget | Δ [95 % CI] | Δ over |", "|---|---:|---:|---|"]
    for entry in crossover.values():
        for p in entry["points"]:
            budget = fmt(p["budget"]) + (f" {MARK_DATA_LIMIT}" if p["data_limited"] else "")
            delta = f"{p['delta']:+.1f}"
            if p["low"] is not None and p["high"] is not None:
                delta += f" [{p['low']:+.1f}, {p['high']:+.1f}]"
            lines.append(f"| {entry['display']} | {budget} | {delta} | {_task_titles(p['tasks'])} |")
    return lines + [""]


def _crossover_text(entry: dict, currency: str) -> str:
    """``KD stops paying at 1.2e+13 FLOPs (95 % interval 8e+12 – open)``, or the no-crossover text
    with how many resamples did cross inside the range; then the ‡ points left out, if any."""
    fmt = _budget_format(currency, [p["budget"] for p in entry.get("points", [])])
    excluded = entry.get("excluded") or []
    left_out = f"; left out (‡, data limit): {', '.join(fmt(b) for b in excluded)}" if excluded else ""
    if entry.get("crossover") is None:
        text = entry.get("text", "no crossover in the swept range")
        share = entry.get("no_crossover_share")
        if share is not None and share < 1:
            verb = "start" if entry.get("direction") == "kd_starts_paying" else "stop"
            text += f"; in {100 * (1 - share):.0f} % of the bootstrap resamples KD {verb}s paying inside it"
        return text + left_out
    verb = "starts" if entry.get("direction") == "kd_starts_paying" else "stops"
    text = f"KD {verb} paying at {fmt(entry['crossover'])}"
    if entry.get("low") is not None or entry.get("high") is not None or entry.get("resamples"):
        low = "open" if entry.get("low") is None else fmt(entry["low"])
        high = "open" if entry.get("high") is None else fmt(entry["high"])
        text += f" (95 % interval {low} – {high})"
    return text + left_out
