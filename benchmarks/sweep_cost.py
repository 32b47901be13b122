"""What a budget sweep costs with ``schedule: wsd`` against separate linear-decay runs, and how far
the WSD points' Δ lie from the separately trained points' (issue 15, "Measured, not asserted").

Runs the embedded ``demo-sweep`` config (all-MiniLM-L6-v2 teacher, 4 × 192 student, SST-2) on
../shared/data twice with ``budgetkd compare`` — once with the paper's linear schedule (every point
its own run), once with WSD (one trunk per strategy, the other points branch from its snapshots) —
and prints, per strategy, the charged FLOPs and time of the whole sweep as a multiple
of its largest point, and the Δ of every KD point under both schedules side by side.

    python benchmarks/sweep_cost.py --out /tmp/sweep-bench [--points 0.25 0.5 1 2 4]

Charged cost of a WSD sweep = the trunk's consumption + every branch's own part (its decay);
of a linear sweep = the sum of its runs. FLOPs are deterministic; time depends on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def overrides(schedule: str, points: list[float], strategies: list[str]) -> dict:
    """The embedded ``demo-sweep`` config on ../shared/data with the packaged teacher, under
    ``schedule``: the same teacher (its head fit is deterministic), data, students and GLUE recipe."""
    from budgetkd.demo import packaged_teacher

    return {
        "name": f"sweep-{schedule}",
        "data.inputs": [str(SHARED / "corpus")],
        "glue.dir": str(SHARED / "glue"),
        "teacher.path": str(packaged_teacher()[0]),
        "strategies": strategies,
        "budget.sweep": points,
        "budget.schedule": schedule,
    }


def charged(out: Path) -> dict[str, dict]:
    """Per strategy: the charged FLOPs/time of the sweep and of its largest point."""
    sweep = json.loads((out / "sweep.json").read_text())
    totals: dict[str, dict] = {}
    for student in sweep["students"].values():
        summary = json.loads((Path(student["run"]) / "summary.json").read_text())
        schedule = summary.get("schedule") or {}
        paid = schedule.get("own") or summary["consumed"]  # a branch pays only its own part
        entry = totals.setdefault(
            student["label"], {"flops": 0.0, "time_s": 0.0, "largest": None, "points": 0}
        )
        entry["flops"] += paid["flops"]
        entry["time_s"] += paid["time_s"]
        entry["points"] += 1
        if entry["largest"] is None or student["point_amount"] > entry["largest"]["point"]:
            entry["largest"] = {
                "point": student["point_amount"],
                **{k: summary["consumed"][k] for k in ("flops", "time_s")},
            }
    for entry in totals.values():
        entry["flops_vs_largest"] = entry["flops"] / entry["largest"]["flops"]
        entry["time_vs_largest"] = entry["time_s"] / entry["largest"]["time_s"]
    return totals


def averages(out: Path) -> dict[str, dict[str, float]]:
    """GLUE Avg per strategy label and point tag, from sweep/table-<tag>.csv."""
    import csv

    sweep = json.loads((out / "sweep.json").read_text())
    table: dict[str, dict[str, float]] = {}
    for tag in sweep["points"]:
        with open(out / "sweep" / f"table-{tag}.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                label = sweep["students"][row["label"]]["label"]
                table.setdefault(label, {})[tag] = float(row["avg"]) if row["avg"] else float("nan")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--points", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4])
    parser.add_argument("--strategies", nargs="+", default=["none", "minilmv2"])
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from budgetkd.demo import demo_config_path
    from budgetkd.experiment import compare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, wall, avgs = {}, {}, {}
    for schedule in ("linear", "wsd"):
        started = time.perf_counter()
        compare(
            demo_config_path("demo-sweep"),
            out / schedule,
            overrides=overrides(schedule, args.points, args.strategies),
            progress=False,
        )  # a finished sweep resumes in seconds: rerun the script to reprint its figures
        timing = out / schedule / "bench_wall.json"
        if not timing.is_file():
            timing.write_text(json.dumps({"wall_s": time.perf_counter() - started}))
        wall[schedule] = json.loads(timing.read_text())["wall_s"]
        crossover = json.loads((out / schedule / "sweep" / "crossover.json").read_text())
        results[schedule] = {"charged": charged(out / schedule), "crossover": crossover}
        avgs[schedule] = averages(out / schedule)
    print(
        f"demo-sweep: points {args.points} × 0.2 No-KD epoch (FLOPs), {' '.join(args.strategies)}, "
        "all-MiniLM-L6-v2 teacher, 4 × 192 student, SST-2 4000 train / full dev"
    )
    print(
        "wall-clock of each whole compare (data, head fit, pretraining, GLUE): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items())
    )
    print(f"{'strategy':<10} {'schedule':<8} {'FLOPs / largest':>16} {'time / largest':>15}")
    for schedule, result in results.items():
        for label, entry in result["charged"].items():
            print(
                f"{label:<10} {schedule:<8} {entry['flops_vs_largest']:>16.3f} {entry['time_vs_largest']:>15.3f}"
            )
    print(
        f"\n{'KD point':<12} {'Δ linear':>10} {'Δ wsd':>10} {'wsd − linear':>13}  (GLUE Avg points, 95 % CI in crossover.json)"
    )
    gaps = []
    for label in results["linear"]["crossover"]:
        lin = results["linear"]["crossover"][label]["points"]
        wsd = results["wsd"]["crossover"][label]["points"]
        for a, b in zip(lin, wsd):
            gaps.append(b["delta"] - a["delta"])
            print(f"{label}@{a['budget']:.3g} {a['delta']:>+10.2f} {b['delta']:>+10.2f} {gaps[-1]:>+13.2f}")
        for schedule in ("linear", "wsd"):
            c = results[schedule]["crossover"][label]
            print(
                f"  crossover ({schedule}): {c.get('crossover')} [{c.get('low')}, {c.get('high')}] {c.get('text', '')}"
            )
    print(
        f"\n{'point':<7} "
        + " ".join(
            f"{f'{lab} {sch}':>16}" for sch in results if sch in ("linear", "wsd") for lab in avgs[sch]
        )
        + "   (GLUE Avg, dev)"
    )
    for tag in avgs["linear"][next(iter(avgs["linear"]))]:
        print(
            f"{tag:<7} "
            + " ".join(
                f"{avgs[sch][lab].get(tag, float('nan')):>16.1f}"
                for sch in ("linear", "wsd")
                for lab in avgs[sch]
            )
        )
    results["avg"] = avgs
    results["wall_s"] = wall
    results["mean_abs_delta_gap"] = sum(abs(g) for g in gaps) / max(1, len(gaps))
    print(f"\nmean |Δ_wsd − Δ_linear| = {results['mean_abs_delta_gap']:.2f} points")
    (out / "sweep_cost.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
