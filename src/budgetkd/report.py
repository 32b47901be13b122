"""``budgetkd report DIR``: the paper's Table 2 from a compare directory (SPEC §7).

Reads ``DIR/experiment.json``, ``DIR/runs/<label>/summary.json`` and ``DIR/glue/<label>/glue.json``
and writes:

* ``table.md``, ``table.csv``, ``table.tex`` — one row per strategy: total tokens processed, QNLI,
  SST-2, MNLI, MRPC-F1, QQP, RTE, CoLA-MCC (STS-B when present), Avg and Δ = Avg − Avg(No-KD);
  scores ×100; a task that was not evaluated is shown as "–" and left out of Avg; with several
  GLUE seeds each cell is mean ± std and Δ comes with a bootstrap 95 % interval;
* ``budget.csv`` (and a second table in ``table.md``) — charged time, FLOPs with the teacher's
  share, tokens, epochs, tokens/s and the No-KD/KD throughput ratio;
* ``plots/glue_scores.png``, ``plots/val_loss.png``, ``plots/tokens.png``.

Avg is the plain mean of the row's task scores; the task score is the one glue.json reports
(MRPC F1, CoLA MCC, MNLI matched accuracy, STS-B mean of Pearson and Spearman, else accuracy).
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np

from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_write_bytes, atomic_write_text, read_json

# (glue task key, column title) in the paper's order; STS-B is appended when present.
COLUMNS = [
    ("qnli", "QNLI"),
    ("sst2", "SST-2"),
    ("mnli", "MNLI"),
    ("mrpc", "MRPC-F1"),
    ("qqp", "QQP"),
    ("rte", "RTE"),
    ("cola", "CoLA-MCC"),
]
OPTIONAL_COLUMNS = [("stsb", "STS-B")]
BOOTSTRAP_SAMPLES = 2000


def _task_seed_scores(task_entry: dict) -> list[float]:
    """Per-seed scores of the best configuration of one task (one value with a single seed)."""
    best = task_entry.get("best") or {}
    runs = [
        r
        for r in task_entry.get("runs", [])
        if r.get("lr") == best.get("lr")
        and r.get("batch_size") == best.get("batch_size")
        and r.get("score") is not None
    ]
    if runs:
        return [float(r["score"]) for r in runs]
    score = task_entry.get("score")
    return [] if score is None else [float(score)]


# What the tables read from a run's summary.json (``consumed``) — checked up front, so that a
# malformed file is a one-line error naming it rather than a traceback half-way through writing.
_CONSUMED_KEYS = (
    "time_s",
    "flops",
    "flops_teacher_share",
    "time_teacher_share",
    "tokens",
    "epochs",
    "tokens_per_s",
)


def _malformed(what: str, path: Path, why: str) -> BudgetKDError:
    return BudgetKDError(f"{what} {path} is malformed: {why}")


def _read_experiment(path: Path) -> list[tuple[str, str]]:
    experiment = read_json(path, "experiment record")
    strategies = experiment.get("strategies") if isinstance(experiment, dict) else None
    if not isinstance(strategies, list) or not strategies:
        raise _malformed("experiment record", path, "no 'strategies' list")
    entries = []
    for i, strategy in enumerate(strategies):
        if not (
            isinstance(strategy, dict)
            and isinstance(strategy.get("label"), str)
            and isinstance(strategy.get("name"), str)
        ):
            raise _malformed("experiment record", path, f"strategies[{i}] lacks a 'label' or 'name'")
        entries.append((strategy["label"], strategy["name"]))
    return entries


def _read_summary(path: Path) -> dict:
    summary = read_json(path, "run summary")
    if not isinstance(summary, dict):
        raise _malformed("run summary", path, "not a JSON object")
    consumed = summary.get("consumed")
    if not isinstance(consumed, dict):
        raise _malformed("run summary", path, "no 'consumed' object")
    for key in _CONSUMED_KEYS:
        if not isinstance(consumed.get(key), (int, float)) or isinstance(consumed.get(key), bool):
            raise _malformed("run summary", path, f"'consumed.{key}' is not a number")
    if not isinstance(summary.get("strategy", ""), str):
        raise _malformed("run summary", path, "'strategy' is not a string")
    evaluations = summary.get("evaluations") or []
    if not isinstance(evaluations, list) or not all(
        isinstance(e, dict) and "budget_fraction" in e and "val_mlm_loss" in e for e in evaluations
    ):
        raise _malformed("run summary", path, "'evaluations' is not a list of evaluations")
    return summary


def _read_glue_scores(path: Path) -> dict[str, list[float]]:
    glue = read_json(path, "GLUE results")
    tasks = glue.get("tasks") if isinstance(glue, dict) else None
    if not isinstance(tasks, dict):
        raise _malformed("GLUE results", path, "no 'tasks' object")
    scores = {}
    for task, entry in tasks.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("runs", []), list):
            raise _malformed("GLUE results", path, f"task {task!r} is not a GLUE task entry")
        try:
            values = _task_seed_scores(entry)
        except (AttributeError, TypeError, ValueError):
            raise _malformed("GLUE results", path, f"task {task!r} has malformed runs or scores") from None
        if values:
            scores[task] = values
    return scores


def collect(out: Path) -> dict:
    """Gather the rows of a compare directory into plain data (also used by the tests)."""
    experiment_path = out / "experiment.json"
    if experiment_path.exists():
        entries = _read_experiment(experiment_path)
    else:
        runs = sorted(p.parent.name for p in (out / "runs").glob("*/summary.json"))
        if not runs:
            raise BudgetKDError(
                f"{out} holds no compare results (no experiment.json, no runs/*/summary.json)"
            )
        entries = [
            (label, _read_summary(out / "runs" / label / "summary.json").get("strategy", label))
            for label in runs
        ]
    rows = []
    for label, name in entries:
        summary_path = out / "runs" / label / "summary.json"
        summary = _read_summary(summary_path) if summary_path.exists() else None
        glue_path = out / "glue" / label / "glue.json"
        scores = _read_glue_scores(glue_path) if glue_path.exists() else {}
        display = summary.get("display_name", label) if summary else label
        if summary and label != name:
            display = f"{display} ({label})"
        rows.append(
            {"label": label, "strategy": name, "display": display, "summary": summary, "scores": scores}
        )
    return {"rows": rows}


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    present = {task for row in rows for task in row["scores"]}
    return COLUMNS + [c for c in OPTIONAL_COLUMNS if c[0] in present]


def _row_average(row: dict, columns) -> float | None:
    values = [float(np.mean(row["scores"][t])) for t, _ in columns if t in row["scores"]]
    return float(np.mean(values)) if values else None


def _bootstrap_delta(row: dict, base: dict, columns, rng: np.random.Generator) -> tuple[float, float] | None:
    """95 % bootstrap interval of Δ = Avg(row) − Avg(base), resampling seeds per task and row."""
    tasks = [t for t, _ in columns if t in row["scores"] and t in base["scores"]]
    if not tasks or all(len(row["scores"][t]) < 2 and len(base["scores"][t]) < 2 for t in tasks):
        return None
    samples = np.zeros(BOOTSTRAP_SAMPLES)
    for task in tasks:
        a, b = np.asarray(row["scores"][task]), np.asarray(base["scores"][task])
        samples += rng.choice(a, (BOOTSTRAP_SAMPLES, len(a))).mean(1) - rng.choice(
            b, (BOOTSTRAP_SAMPLES, len(b))
        ).mean(1)
    samples /= len(tasks)
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def build_table(data: dict) -> dict:
    """Numbers of Table 2: per row the tokens, per-task mean/std, Avg, Δ and its interval."""
    rows = data["rows"]
    columns = _columns(rows)
    base = next((r for r in rows if r["strategy"] == "none"), None)
    base_avg = _row_average(base, columns) if base else None
    rng = np.random.default_rng(0)
    table = []
    for row in rows:
        cells = {}
        for task, _ in columns:
            values = row["scores"].get(task)
            if values:
                cells[task] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                    "n": len(values),
                }
        avg = _row_average(row, columns)
        is_base = row is base
        delta = None if (is_base or avg is None or base_avg is None) else avg - base_avg
        interval = (
            None if is_base or base is None or delta is None else _bootstrap_delta(row, base, columns, rng)
        )
        summary = row["summary"] or {}
        table.append(
            {
                "label": row["label"],
                "strategy": row["strategy"],
                "display": row["display"],
                "tokens": (summary.get("consumed") or {}).get("tokens"),
                "cells": cells,
                "avg": avg,
                "delta": delta,
                "delta_ci95": interval,
                "is_base": is_base,
            }
        )
    return {"columns": columns, "rows": table}


def _fmt_tokens(tokens) -> str:
    if tokens is None:
        return "–"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.1f}{unit}"
    return str(tokens)


def _fmt_cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    text = f"{100 * cell['mean']:.1f}"
    if cell["std"] is not None:
        text += f" ± {100 * cell['std']:.1f}"
    return text


def _fmt_delta(row: dict) -> str:
    if row["is_base"]:
        return "–"
    if row["delta"] is None:
        return "n/a"
    text = f"{100 * row['delta']:+.1f}"
    if row["delta_ci95"] is not None:
        low, high = row["delta_ci95"]
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return text


def render_markdown(table: dict, budget_rows: list[dict]) -> str:
    titles = ["Strategy", "Total tokens"] + [title for _, title in table["columns"]] + ["Avg", "Δ"]
    lines = ["# Knowledge distillation vs. pretraining from scratch under one compute budget", ""]
    lines += ["| " + " | ".join(titles) + " |", "|" + "|".join(["---"] + ["---:"] * (len(titles) - 1)) + "|"]
    for row in table["rows"]:
        cells = [row["display"], _fmt_tokens(row["tokens"])]
        cells += [_fmt_cell(row["cells"].get(task)) for task, _ in table["columns"]]
        cells += ["–" if row["avg"] is None else f"{100 * row['avg']:.1f}", _fmt_delta(row)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "GLUE dev scores ×100 (MRPC F1, CoLA MCC, MNLI matched accuracy, STS-B mean of Pearson and Spearman, "
        "else accuracy); – = not evaluated (left out of Avg). Δ = Avg − Avg(No-KD)"
        + (
            ", with a bootstrap 95 % interval over GLUE seeds"
            if any(r["delta_ci95"] for r in table["rows"])
            else ""
        )
        + ".",
        "",
        "## Budget accounting",
        "",
        "| Strategy | Charged time | FLOPs | Teacher share of FLOPs | Teacher share of time | Tokens | Epochs "
        "| Tokens/s | No-KD/KD throughput |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in budget_rows:
        ratio = "–" if b["throughput_ratio"] is None else f"{b['throughput_ratio']:.2f}×"
        lines.append(
            f"| {b['display']} | {b['time_s']:.1f} s | {b['flops']:.3g} | {100 * b['flops_teacher_share']:.1f} % "
            f"| {100 * b['time_teacher_share']:.1f} % | {_fmt_tokens(b['tokens'])} | {b['epochs']:.3f} "
            f"| {b['tokens_per_s']:,.0f} | {ratio} |"
        )
    lines += ["", "![GLUE scores](plots/glue_scores.png)", "", "![Validation loss](plots/val_loss.png)", ""]
    lines += ["![Tokens processed](plots/tokens.png)", ""]
    return "\n".join(lines)


def render_csv(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["strategy", "label", "tokens"]
    for task, _ in table["columns"]:
        header += [task, f"{task}_std"]
    writer.writerow(header + ["avg", "delta", "delta_ci95_low", "delta_ci95_high"])
    for row in table["rows"]:
        line = [row["display"], row["label"], row["tokens"]]
        for task, _ in table["columns"]:
            cell = row["cells"].get(task)
            line += [
                None if cell is None else round(100 * cell["mean"], 4),
                None if cell is None or cell["std"] is None else round(100 * cell["std"], 4),
            ]
        ci = row["delta_ci95"] or (None, None)
        line += [
            None if row["avg"] is None else round(100 * row["avg"], 4),
            None if row["delta"] is None else round(100 * row["delta"], 4),
            None if ci[0] is None else round(100 * ci[0], 4),
            None if ci[1] is None else round(100 * ci[1], 4),
        ]
        writer.writerow(["" if v is None else v for v in line])
    return buffer.getvalue()


def _tex_escape(text: str) -> str:
    return text.replace("&", r"\&").replace("%", r"\%").replace("_", r"\_").replace("#", r"\#")


def render_tex(table: dict) -> str:
    n = len(table["columns"])
    lines = [
        r"\begin{tabular}{l r " + "r " * n + "r r}",
        r"\toprule",
        " & ".join(
            ["Strategy", "Tokens"] + [_tex_escape(t) for _, t in table["columns"]] + ["Avg", r"$\Delta$"]
        )
        + r" \\",
        r"\midrule",
    ]
    for row in table["rows"]:
        cells = [_tex_escape(row["display"]), _fmt_tokens(row["tokens"])]
        cells += [_fmt_cell(row["cells"].get(task)).replace("±", r"$\pm$") for task, _ in table["columns"]]
        cells += [
            "–" if row["avg"] is None else f"{100 * row['avg']:.1f}",
            _fmt_delta(row).replace("–", "--"),
        ]
        lines.append(" & ".join(c.replace("–", "--") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def budget_rows(data: dict) -> list[dict]:
    rows = [r for r in data["rows"] if r["summary"]]
    base = next((r for r in rows if r["strategy"] == "none"), None)
    base_tps = base["summary"]["consumed"]["tokens_per_s"] if base else None
    out = []
    for row in rows:
        consumed = row["summary"]["consumed"]
        tps = consumed["tokens_per_s"]
        ratio = None if (base_tps is None or row is base or not tps) else base_tps / tps
        out.append({"display": row["display"], "label": row["label"], **consumed, "throughput_ratio": ratio})
    return out


def render_budget_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    keys = [
        "label",
        "time_s",
        "time_teacher_s",
        "flops",
        "flops_student",
        "flops_teacher",
        "flops_teacher_share",
        "tokens",
        "epochs",
        "steps",
        "tokens_per_s",
        "throughput_ratio",
    ]
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def _save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot(out: Path, data: dict, table: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    paths = []
    rows = table["rows"]
    # one colour per strategy, the same in every plot
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {row["label"]: palette[i % len(palette)] for i, row in enumerate(rows)}

    # GLUE score per task and strategy
    tasks = [(t, title) for t, title in table["columns"] if any(t in r["cells"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * (len(tasks) + 1)), 4))
    width = 0.8 / max(1, len(rows))
    positions = np.arange(len(tasks) + 1)
    for i, row in enumerate(rows):
        values = [100 * row["cells"][t]["mean"] if t in row["cells"] else np.nan for t, _ in tasks]
        errors = [100 * (row["cells"][t]["std"] or 0) if t in row["cells"] else 0 for t, _ in tasks]
        values.append(np.nan if row["avg"] is None else 100 * row["avg"])
        errors.append(0)
        ax.bar(
            positions + i * width,
            values,
            width,
            yerr=errors,
            label=row["display"],
            color=colour[row["label"]],
        )
    ax.set_xticks(positions + width * (len(rows) - 1) / 2, [title for _, title in tasks] + ["Avg"])
    ax.set_ylabel("dev score ×100")
    ax.set_title("GLUE dev score per task and strategy")
    ax.legend(fontsize=8)
    paths.append(plots / "glue_scores.png")
    _save_figure(fig, paths[-1])
    plt.close(fig)

    # validation losses against budget fraction
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in data["rows"]:
        evaluations = (row["summary"] or {}).get("evaluations") or []
        if not evaluations:
            continue
        x = [e["budget_fraction"] for e in evaluations]
        style = {"marker": "o", "label": row["display"], "color": colour[row["label"]]}
        axes[0].plot(x, [e["val_mlm_loss"] for e in evaluations], **style)
        kd = [(e["budget_fraction"], e["val_loss"]) for e in evaluations if e.get("val_loss") is not None]
        if kd and row["strategy"] != "none":
            axes[1].plot([a for a, _ in kd], [b for _, b in kd], **style)
    fig.suptitle("Validation loss against the fraction of the budget consumed")
    axes[0].set_title("MLM loss (student's MLM head)")
    axes[1].set_title("KD loss (each strategy's own objective)")
    kd_values = [v for line in axes[1].get_lines() for v in line.get_ydata() if v > 0]
    if kd_values and max(kd_values) / min(kd_values) > 20:
        axes[1].set_yscale("log")  # objectives of different strategies differ by orders of magnitude
    for ax in axes:
        ax.set_xlabel("budget fraction consumed")
        ax.set_xlim(-0.02, 1.02)
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0].set_ylabel("nats per predicted token")
    axes[1].set_ylabel("loss")
    paths.append(plots / "val_loss.png")
    _save_figure(fig, paths[-1])
    plt.close(fig)

    # tokens processed
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [r["display"] for r in rows]
    tokens = [(r["tokens"] or 0) / 1e6 for r in rows]
    bars = ax.bar(labels, tokens, color=[colour[r["label"]] for r in rows])
    ax.bar_label(bars, fmt="%.2fM", fontsize=8)
    ax.set_ylabel("tokens processed (millions)")
    ax.set_title("Tokens processed per strategy under the same budget")
    ax.tick_params(axis="x", labelrotation=20)
    paths.append(plots / "tokens.png")
    _save_figure(fig, paths[-1])
    plt.close(fig)
    return paths


def write_report(out: str | Path) -> list[Path]:
    """Write every report file of a compare directory; return their paths."""
    out = Path(out)
    if not out.is_dir():
        raise BudgetKDError(f"report directory not found: {out}")
    data = collect(out)
    table = build_table(data)
    budgets = budget_rows(data)
    written = []
    for name, text in (
        ("table.md", render_markdown(table, budgets)),
        ("table.csv", render_csv(table)),
        ("table.tex", render_tex(table)),
        ("budget.csv", render_budget_csv(budgets)),
    ):
        atomic_write_text(out / name, text)
        written.append(out / name)
    written += plot(out, data, table)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="a budgetkd compare output directory")


def run(args: argparse.Namespace) -> int:
    paths = write_report(args.dir)
    print("\n".join(str(p) for p in paths))
    return 0
