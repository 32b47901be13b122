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
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_write_json, atomic_write_text, read_json
from budgetkd.sweep import crossings, crossover_with_interval

UNITS = {
    "time": ("hours", 1 / 3600),
    "flops": ("FLOPs", 1.0),
    "tokens": ("tokens", 1.0),
    "steps": ("steps", 1.0),
}


def read_sweep(out: Path) -> dict:
    """``DIR/sweep.json`` as written by ``compare`` (points, students, currency)."""
    path = out / "sweep.json"
    if not path.is_file():
        raise BudgetKDError(f"{out} holds no sweep (no sweep.json)")
    return read_json(path, "sweep record")


def long_rows(out: Path, sweep: dict) -> list[dict]:
    """One row per (student, task, metric, seed) of the best configuration of every task."""
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
                            "budget": student["amount"],
                            "currency": sweep["currency"],
                            "point": student["tag"],
                            "task": task,
                            "metric": metric,
                            "value": value,
                            "seed": run["seed"],
                        }
                    )
    return rows


def render_long_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    fields = ["strategy", "budget", "currency", "point", "task", "metric", "value", "seed"]
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
        result = {"crossover": found[0].budget if found else None, "low": None, "high": None}
        if not found:
            result["text"] = f"no crossover between {min(budgets):g} and {max(budgets):g}"
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
    out: Path, currency: str, curves: dict, averages: dict, by_students: dict | None
) -> list[Path]:
    """Δ against budget with intervals and crossovers; Avg against budget; crossover against K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit, scale = UNITS.get(currency, (currency, 1.0))
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, curve in enumerate(curves.values()):
        colour = colours[i % len(colours)]
        x = np.array(curve["budgets"]) * scale
        y = np.array(curve["deltas"])
        low = np.array([np.nan if v is None else v for v in curve["low"]], dtype=float)
        high = np.array([np.nan if v is None else v for v in curve["high"]], dtype=float)
        ax.plot(x, y, marker="o", color=colour, label=curve["display"])
        if np.isfinite(low).any():
            ax.fill_between(x, low, high, color=colour, alpha=0.15, linewidth=0)
        cross = curve["crossover"].get("crossover")
        if cross is not None:
            ax.axvline(cross * scale, color=colour, linestyle=":", linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"budget ({unit}, log scale)")
    ax.set_ylabel("Δ GLUE Avg vs No-KD (points)")
    ax.set_title(
        "Where KD stops paying: Δ against the budget (95 % intervals, crossovers dotted)", fontsize=10
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, plots / "delta_vs_budget.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, points in enumerate(averages.values()):
        xs = [b * scale for b, _ in points["values"]]
        ax.plot(
            xs,
            [a for _, a in points["values"]],
            marker="o",
            color=colours[i % len(colours)],
            label=points["display"],
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"budget ({unit}, log scale)")
    ax.set_ylabel("GLUE Avg (dev, points)")
    ax.set_title("GLUE Avg against the pretraining budget", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, plots / "avg_vs_budget.png"))

    if by_students:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (label, rows) in enumerate(by_students.items()):
            pts = [(r["students"], r["crossover"] * scale) for r in rows if r["crossover"] is not None]
            if pts:
                ax.plot(
                    *zip(*pts), marker="o", color=colours[i % len(colours)], label=curves[label]["display"]
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("students sharing the teacher's pretraining (K, log scale)")
        ax.set_ylabel(f"crossover budget ({unit}, log scale)")
        ax.set_title("Crossover budget against K (teacher_cost: amortized)", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, plots / "crossover_vs_students.png"))
    return written


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
