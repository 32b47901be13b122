"""Readable outputs of a GLUE run: ``glue.md`` and the per-example prediction files."""

from __future__ import annotations

import json
from pathlib import Path

from budgetkd.glue.tasks import TASKS

# Column order of the paper's Table 2 (SPEC §7), STS-B last.
PAPER_ORDER = ("qnli", "sst2", "mnli", "mrpc", "qqp", "rte", "cola", "stsb")


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "missing"
    text = f"{100 * value:.1f}"
    if std is not None:
        text += f" ± {100 * std:.1f}"
    return text


def _lr(value: float) -> str:
    return f"{value:g}"


def render_markdown(glue: dict) -> str:
    """``glue.md``: one summary row as in the paper's table, then every metric of every task."""
    tasks: dict[str, dict] = glue["tasks"]
    order = [name for name in PAPER_ORDER if name in tasks] + [n for n in tasks if n not in PAPER_ORDER]
    several = len(glue.get("seeds", [])) > 1
    grid = glue.get("grid", {})
    lines = [
        "# GLUE dev results",
        "",
        f"- model: `{glue['model']}`",
        f"- data: {glue['data']['description']}",
        f"- grid: lr ∈ {{{', '.join(_lr(v) for v in grid.get('learning_rates', []))}}} × batch ∈ "
        f"{{{', '.join(str(v) for v in grid.get('batch_sizes', []))}}}, {glue['epochs']} epoch{'s' if glue['epochs'] != 1 else ''}, "
        f"seeds {', '.join(str(s) for s in glue.get('seeds', []))}"
        + (
            f", first {glue['max_train_examples']} training examples"
            if glue.get("max_train_examples")
            else ""
        )
        + (f", first {glue['max_eval_examples']} dev examples" if glue.get("max_eval_examples") else ""),
        "- best configuration per task on dev; scores ×100"
        + (" (mean ± standard deviation over seeds)" if several else "")
        + "; Avg = mean of the task scores (STS-B: mean of Pearson and Spearman; MNLI: matched).",
        "",
    ]
    header, row = ["Model"], [f"`{Path(glue['model']).name}`"]
    for name in order:
        entry = tasks[name]
        std = (entry.get("std") or {}).get("score") if several else None
        header.append(TASKS[name].display if name in TASKS else name)
        row.append(_pct(entry.get("score"), std))
        if name == "mnli":
            header.append("MNLI-mm")
            mm_std = (entry.get("std") or {}).get("accuracy_mismatched") if several else None
            row.append(_pct(entry["metrics"].get("accuracy_mismatched"), mm_std))
    header.append("Avg")
    row.append(_pct(glue.get("average")))
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]

    lines += [
        "## Per task",
        "",
        "| Task | Metric | Dev | Best lr | Best batch | Runs |",
        "|---|---|---|---|---|---|",
    ]
    for name in order:
        entry = tasks[name]
        best = entry.get("best") or {}
        for metric, value in entry["metrics"].items():
            std = (entry.get("std") or {}).get(metric) if several else None
            label = metric + (" (main)" if metric == entry["main_metric"] else "")
            lines.append(
                f"| {TASKS[name].folder if name in TASKS else name} | {label} | {_pct(value, std)} | "
                f"{_lr(best['lr']) if best else '–'} | {best.get('batch_size', '–')} | {len(entry['runs'])} |"
            )
    missing = [f"{name}.{m}" for name in order for m in tasks[name].get("missing", [])]
    if missing:
        lines += ["", "Missing (no data): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"


def prediction_lines(labels: list, predictions: list) -> str:
    """JSON lines ``{"index", "label", "prediction"}``; index = 0-based position in the dev split."""
    return "".join(
        json.dumps({"index": i, "label": y, "prediction": p}) + "\n"
        for i, (y, p) in enumerate(zip(labels, predictions))
    )
