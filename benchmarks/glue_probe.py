"""The plan's GLUE hours against the GLUE stage they price (issue 21 item 3).

One run: ``compare --dry-run --probe`` of a small experiment with a real GLUE grid (tasks from
``--glue-dir``, the bert-base-uncased vocabulary), then ``compare`` of the same experiment, whose
GLUE stage is timed; ``--repeats`` times, alternating plan and stage so both see the same machine.
Per task the planned seconds (``plan.json``: ``seconds_by_task``) are printed beside the measured
ones (the jobs' ``train_seconds`` + ``eval_seconds`` from their run files, plus the task's share of
the stage's remaining time: tokenization and the ledger), and for the whole stage planned ÷
measured; PASS when every repeat's whole-stage ratio is within ``--tolerance`` (30 %) of 1.

``--clock wall`` (default) is what a user plans with; ``--clock process`` reads the process's CPU
seconds on both sides (jobs run ``glue.threads`` = 1 thread, so on a shared machine it is the time
the work was given). The pretraining stage is 2 steps of the same student (untimed).

Usage::

    python benchmarks/glue_probe.py --glue-dir ../shared/data/glue \\
        --vocab ../shared/data/vocab/bert-base-uncased/vocab.txt \\
        --corpus ../shared/data/corpus/gutenberg/blake-poems.txt \\
        --tasks rte,sst2,mrpc --train-examples 1024 --epochs 2 --repeats 3 --json /tmp/glue_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import budgetkd.glue.probe as probe  # noqa: E402
import budgetkd.plan  # noqa: E402
from budgetkd import experiment  # noqa: E402
from budgetkd.data import prepare_dataset  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def experiment_config(args, data: Path) -> dict:
    layers, hidden = args.student
    return {
        "name": "glue-probe-bench",
        "data": {"prepared": str(data), "seq_len": 64, "tokenizer": str(args.vocab)},
        "student": {"layers": layers, "hidden": hidden, "heads": max(1, hidden // 64), "intermediate": 4 * hidden},
        "strategies": ["none"],
        "budget": {"explicit": "2steps"},
        "optimizer": {"batch_size": 8},
        "training": {"num_evals": 1, "eval_sequences": 8, "device": "cpu"},
        "glue": {"dir": str(args.glue_dir), "tasks": args.tasks.split(","), "epochs": args.epochs,
                 "grid": f"lr={':'.join(['1e-4', '2e-4'][: args.lrs])},bs={args.batch_size}",
                 "max_train_examples": args.train_examples, "max_eval_examples": args.dev_examples,
                 "device": "cpu", "threads": 1},
    }  # fmt: skip


def measured_by_task(run_dir: Path, stage_seconds: float) -> dict[str, float]:
    """Per task: its jobs' recorded train + eval seconds, plus an equal share of what the stage
    spent outside the jobs (tokenization, the ledger, the report rows)."""
    jobs: dict[str, float] = {}
    for path in sorted((run_dir / "glue" / "none" / "runs").glob("*/lr*[0-9].json")):
        record = json.loads(path.read_text())
        jobs[record["task"]] = (
            jobs.get(record["task"], 0.0) + record["train_seconds"] + record["eval_seconds"]
        )
    rest = max(0.0, stage_seconds - sum(jobs.values())) / max(1, len(jobs))
    return {task: s + rest for task, s in jobs.items()}


def one_repeat(config: Path, work: Path, clock: str) -> dict:
    plan = experiment.dry_run(config, work / "dry", probe=True)
    glue = next(s for s in plan["stages"] if s["stage"] == "glue:none")
    original, took = experiment.Experiment.glue_stage, {}

    def timed(self):
        started = CLOCKS[clock]()
        original(self)
        took["s"] = CLOCKS[clock]() - started

    experiment.Experiment.glue_stage = timed
    try:
        experiment.compare(config, work / "run", progress=False)
    finally:
        experiment.Experiment.glue_stage = original
    planned = glue["device_hours"] * 3600
    return {
        "planned_s": planned,
        "measured_s": took["s"],
        "ratio": planned / took["s"],
        "planned_by_task": glue["seconds_by_task"],
        "measured_by_task": measured_by_task(work / "run", took["s"]) if clock == "wall" else None,
        "rates": plan["glue_throughput"]["tasks"],
        "load_after": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--glue-dir", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="a text file for the 2-step pretraining")
    parser.add_argument("--tasks", default="rte,sst2,mrpc")
    parser.add_argument("--student", type=int, nargs=2, default=(2, 128), metavar=("LAYERS", "HIDDEN"))
    parser.add_argument("--train-examples", type=int, default=1024)
    parser.add_argument("--dev-examples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lrs", type=int, choices=(1, 2), default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--tolerance", type=float, default=0.3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    probe.CLOCK, probe.CLOCK_NAME = CLOCKS[args.clock], args.clock
    budgetkd.plan.probe_throughput = lambda *a, **k: {}  # the pretraining probe is not what is measured
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="budgetkd-glue-probe-bench-") as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        prepare_dataset([str(args.corpus)], data, tokenizer=str(args.vocab), seq_len=64,
                        validation_fraction=0.05, progress=False)  # fmt: skip
        config = tmp / "experiment.yaml"
        config.write_text(yaml.safe_dump(experiment_config(args, data)))
        repeats = [one_repeat(config, tmp / f"r{i}", args.clock) for i in range(args.repeats)]

    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}; clock: {args.clock}")
    print("| repeat | task | planned s | measured s | plan / measured |\n|---|---|---:|---:|---:|")
    for i, r in enumerate(repeats):
        for task, planned in r["planned_by_task"].items():
            measured = (r["measured_by_task"] or {}).get(task)
            shown = "—" if measured is None else f"{measured:.2f} | {planned / measured:.2f}"
            print(f"| {i} | {task} | {planned:.2f} | {shown} |")
        print(f"| {i} | **stage** | {r['planned_s']:.2f} | {r['measured_s']:.2f} | {r['ratio']:.2f} |")
    ok = all(abs(r["ratio"] - 1) <= args.tolerance for r in repeats)
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in repeats)
    print(
        f"{'PASS' if ok else 'FAIL'}: whole-stage plan / measured {ratios} (tolerance ±{args.tolerance:.0%})"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": load_before,
                  "repeats": repeats, "pass": ok}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
