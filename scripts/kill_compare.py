#!/usr/bin/env python
"""Acceptance check of issue 7: a ``budgetkd compare`` killed at random moments resumes to the result
of a run never interrupted.

1. ``DIR/a``: ``python -m budgetkd compare CONFIG --out DIR/a``, never interrupted; its duration T
   and the moment each stage started are measured.
2. ``DIR/b``: the same command is started, SIGKILLed after a delay, and started again, until it has
   been killed ``--kills`` times (default five); then it is let finish. The kill moments are drawn
   from a seeded RNG, uniformly over the expected duration T (sorted, so they spread over the whole
   run); each re-run starts at the moment of run a's timeline where the first stage that
   ``DIR/b/state.json`` does not record as finished began, and is killed when it reaches its kill
   moment (at least 0.5 s after its start). An attempt that finishes before its kill (or is killed
   only after its last stage was recorded) interrupted nothing: ``DIR/b`` is rolled back to its
   copy from before the attempt and the delay redrawn uniformly over the duration just measured.
3. Comparison: the GLUE table of ``table.md`` byte for byte; the budget table without its measured
   time columns (charged time, teacher share of time, tokens/s, throughput ratio); the calibrated
   budget; per run (teacher included) every deterministic quantity of ``summary.json`` (steps,
   sequences, tokens, FLOPs, epochs, skipped steps, validation losses) and the student weights of
   ``checkpoint.pt`` bitwise; per strategy the GLUE metrics of every configuration.

Prints PASS or FAIL (with the differences) and exits 0 on PASS, 1 on FAIL. With a time-calibrated
budget the weights legitimately differ; use a steps or FLOPs budget (the default config does).

Usage: ``python scripts/kill_compare.py [--config CONFIG.yaml] [--dir DIR] [--kills 5] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
STAGE_LINE = re.compile(r"^\[compare\] stage (\S+): ")
# budget-table columns measured in seconds: expected to differ between two runs
TIME_COLUMNS = {"Charged time", "Teacher share of time", "Tokens/s", "No-KD/KD throughput"}
DETERMINISTIC = ("steps", "sequences", "tokens", "flops", "flops_student", "flops_teacher", "epochs")


def default_config() -> dict:
    """tests/test_experiment.py's base_config, a little bigger (a run of about 1-2 minutes on 2
    CPU cores), FLOPs-calibrated, with a teacher pretrained by budgetkd and checkpoints every few
    steps so that a killed stage resumes from a checkpoint rather than from scratch."""
    return {
        "name": "kill-compare",
        "seed": 0,
        "data": {
            "inputs": [str(SHARED / "corpus" / "wikitext-2-raw" / "wiki.valid.raw")],
            "tokenizer": {"train": 1000},
        },
        "teacher": {
            "pretrain": {
                "student": {"layers": 2, "hidden": 64, "heads": 4},
                "budget": "60steps",
                "batch_size": 16,
            }
        },
        "student": {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
        "strategies": ["none", "vanilla", "tinybert", "minilm", "minilmv2"],
        "budget": {"calibrate": {"strategy": "none", "epochs": 1.0, "currency": "flops"}},
        "optimizer": {"batch_size": 16},
        # dropout left at BERT's 0.1: a resumed run must restore the RNG exactly
        "training": {"num_evals": 3, "eval_sequences": 32, "checkpoint_every_steps": 4},
        "glue": {
            "dir": str(SHARED / "glue"),
            "tasks": ["rte", "mrpc"],
            "grid": "lr=1e-4:3e-4,bs=16:32",
            "epochs": 1,
            "max_train_examples": 96,
            "max_eval_examples": 64,
        },
    }


def child_env(threads: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "budgetkd", "compare", str(config), "--out", str(out), "--no-progress"]


def run_uninterrupted(config: Path, out: Path, env: dict, log: Path) -> tuple[float, dict[str, float]]:
    """Run to completion; return the duration and the moment (s after start) each stage began."""
    started = time.monotonic()
    stage_start: dict[str, float] = {}
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            command(config, out), env=env, stdout=subprocess.PIPE, stderr=handle, text=True, bufsize=1
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            match = STAGE_LINE.match(line)
            if match:
                stage_start.setdefault(match.group(1), time.monotonic() - started)
        rc = proc.wait()
    duration = time.monotonic() - started
    if rc != 0:
        raise SystemExit(f"FAIL: the uninterrupted run exited with {rc}; see {log}")
    return duration, stage_start


def finished_stages(out: Path) -> set[str]:
    try:
        return set(json.loads((out / "state.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return set()


def timeline_position(duration: float, stage_start: dict[str, float], done: set[str]) -> float:
    """Where, in run a's timeline, a re-run of ``DIR/b`` starts working: the start of the first
    stage that is not finished yet (the report stage is always redone)."""
    pending = [t for stage, t in stage_start.items() if stage not in done or stage == "report"]
    return min(pending, default=duration)


def last_stage_line(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    return next((line for line in reversed(lines) if line.startswith("[compare]")), "(starting up)")


def attempt(config: Path, out: Path, env: dict, delay: float, log: Path) -> tuple[bool, int, float]:
    """Start the command, SIGKILL it after ``delay`` s unless it ends first: (killed, rc, seconds)."""
    started = time.monotonic()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command(config, out), env=env, stdout=handle, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            killed = True
    return killed, rc, time.monotonic() - started


def run_with_kills(
    config: Path, out: Path, env: dict, kills: int, rng: random.Random, duration: float, stages: dict
) -> list[dict]:
    """Kill ``kills`` times (see the module docstring), then finish. Before each attempt ``out`` is
    copied aside; an attempt that ends before its kill is rolled back to that copy and the delay
    redrawn uniformly over the duration just measured, so that every kill interrupts work."""
    events = []
    backup = out.with_name(out.name + ".before-attempt")
    # the kill moments: sorted uniform draws over run a's timeline, so that the kills are spread
    # over the whole run (data, teacher, calibration, every pretraining, GLUE, report)
    points = sorted(rng.uniform(0.0, duration) for _ in range(kills))
    startup = min(stages.values(), default=0.0)  # run a's start-up before its first stage
    for number, point in enumerate(points, start=1):
        restart = timeline_position(duration, stages, finished_stages(out)) - startup
        delay = max(point - restart, 0.5)
        if backup.exists():
            shutil.rmtree(backup)
        if out.exists():
            shutil.copytree(out, backup, symlinks=True)
        for _retry in range(10):
            log = out.parent / f"{out.name}-kill-{number}.log"
            killed, rc, seconds = attempt(config, out, env, delay, log)
            if killed and "report" not in finished_stages(out):
                break
            if not killed and rc != 0:
                raise SystemExit(f"FAIL: attempt {number} exited with {rc}; see {log}")
            # it finished (or was killed only after its last stage): nothing was interrupted
            seconds = min(seconds, delay)
            print(
                f"  attempt {number}: finished within {seconds:.1f} s, before its kill at {delay:.1f} s; "
                "rolled back, delay redrawn over the measured duration",
                flush=True,
            )
            shutil.rmtree(out)
            if backup.exists():
                shutil.copytree(backup, out, symlinks=True)
            delay = rng.uniform(0.0, seconds)
        else:
            raise SystemExit(f"FAIL: attempt {number} could not be killed before it finished")
        where = last_stage_line(log)
        events.append({"attempt": number, "delay_s": round(delay, 2), "during": where})
        print(
            f"  kill {number}: SIGKILL {delay:.1f} s after start (at about {point:.0f} s of run a's "
            f"timeline), last stage line: {where}",
            flush=True,
        )
    if backup.exists():
        shutil.rmtree(backup)
    print("  final attempt: running to completion", flush=True)
    log = out.parent / f"{out.name}-final.log"
    killed, rc, seconds = attempt(config, out, env, 3600.0, log)
    if rc != 0:
        raise SystemExit(f"FAIL: the final re-run exited with {rc}; see {log}")
    print(f"  finished in {seconds:.1f} s", flush=True)
    return events


# -- comparison -------------------------------------------------------------------------------------
def _tables(path: Path) -> tuple[str, list[list[str]]]:
    text = path.read_text()
    glue_part, _, budget_part = text.partition("## Budget accounting")
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in budget_part.splitlines()
        if line.startswith("|")
    ]
    header = rows[0] if rows else []
    keep = [i for i, title in enumerate(header) if title not in TIME_COLUMNS]
    return glue_part, [[row[i] for i in keep] for row in rows if not set("".join(row)) <= set("-:")]


def _student(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)["student"]


def _glue_metrics(path: Path) -> dict:
    glue = json.loads(path.read_text())
    return {
        task: [(r["lr"], r["batch_size"], r["seed"], r["metrics"], r["final_loss"]) for r in entry["runs"]]
        for task, entry in glue["tasks"].items()
    }


def compare_dirs(a: Path, b: Path) -> list[str]:
    import torch

    problems = []
    glue_a, budget_a = _tables(a / "table.md")
    glue_b, budget_b = _tables(b / "table.md")
    if glue_a != glue_b:
        problems.append(f"GLUE table differs:\n--- a\n{glue_a}\n--- b\n{glue_b}")
    if budget_a != budget_b:
        problems.append(f"budget table (time columns excluded) differs:\n{budget_a}\n{budget_b}")
    state_a = json.loads((a / "state.json").read_text())["stages"]
    state_b = json.loads((b / "state.json").read_text())["stages"]
    if set(state_a) != set(state_b):
        problems.append(f"finished stages differ: {sorted(state_a)} vs {sorted(state_b)}")
    budget = lambda stages: stages.get("calibrate", {}).get("result", {}).get("budget")  # noqa: E731
    if budget(state_a) != budget(state_b):
        problems.append(f"calibrated budget differs: {budget(state_a)} vs {budget(state_b)}")
    runs = sorted(p.parent.relative_to(a) for p in a.glob("runs/*/summary.json"))
    if (a / "teacher" / "summary.json").exists():
        runs.insert(0, Path("teacher"))
    for run in runs:
        sa = json.loads((a / run / "summary.json").read_text())
        sb_path = b / run / "summary.json"
        if not sb_path.exists():
            problems.append(f"{run}: no summary.json in b")
            continue
        sb = json.loads(sb_path.read_text())
        for key in DETERMINISTIC:
            if sa["consumed"][key] != sb["consumed"][key]:
                problems.append(f"{run}: consumed {key} {sa['consumed'][key]!r} != {sb['consumed'][key]!r}")
        for key in ("skipped_steps", "val_mlm_loss", "val_loss", "budget", "init_fingerprint"):
            if sa.get(key) != sb.get(key):
                problems.append(f"{run}: {key} {sa.get(key)!r} != {sb.get(key)!r}")
        evals = lambda s: [(e["step"], e["val_mlm_loss"], e.get("val_loss")) for e in s["evaluations"]]  # noqa: E731
        if evals(sa) != evals(sb):
            problems.append(f"{run}: evaluations differ: {evals(sa)} vs {evals(sb)}")
        wa, wb = _student(a / run / "checkpoint.pt"), _student(b / run / "checkpoint.pt")
        differing = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
        if differing or set(wa) != set(wb):
            problems.append(f"{run}: student weights differ ({len(differing)} tensors, e.g. {differing[:3]})")
    for glue in sorted(p.relative_to(a) for p in a.glob("glue/*/glue.json")):
        if not (b / glue).exists():
            problems.append(f"{glue}: missing in b")
        elif _glue_metrics(a / glue) != _glue_metrics(b / glue):
            problems.append(
                f"{glue}: GLUE runs differ: {_glue_metrics(a / glue)} vs {_glue_metrics(b / glue)}"
            )
    return problems


def _time_budget(cfg: dict) -> bool:
    from budgetkd.budget import Budget

    budget = cfg.get("budget") or {}
    if "calibrate" in budget:
        return (budget["calibrate"] or {}).get("currency", "time") == "time"
    return Budget.parse(str(budget.get("explicit"))).currency == "time"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="experiment YAML (default: a small FLOPs-calibrated one)")
    parser.add_argument("--dir", type=Path, help="work directory (default: a new temporary one)")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (0: leave)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    args = parser.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="kill-compare-"))
    for name in ("a", "b"):
        if (work / name).exists():
            shutil.rmtree(work / name)
    work.mkdir(parents=True, exist_ok=True)
    config = work / "experiment.yaml"
    if args.config:
        shutil.copy(args.config, config)
    else:
        if not SHARED.is_dir():
            print(f"FAIL: the default config needs the real data at {SHARED}")
            return 1
        config.write_text(yaml.safe_dump(default_config(), sort_keys=False))
    cfg = yaml.safe_load(config.read_text())
    if _time_budget(cfg):
        print("warning: a time budget: weights and tokens legitimately differ between runs", flush=True)
    env = child_env(args.threads)
    rng = random.Random(args.seed)

    print(f"work directory {work}", flush=True)
    print("run a: uninterrupted", flush=True)
    duration, stages = run_uninterrupted(config, work / "a", env, work / "a.log")
    timeline = ", ".join(f"{stage} @{t:.0f}s" for stage, t in stages.items())
    print(f"  finished in {duration:.1f} s ({timeline})", flush=True)
    print(f"run b: killed {args.kills} times at random moments (seed {args.seed}), then finished", flush=True)
    started = time.monotonic()
    events = run_with_kills(config, work / "b", env, args.kills, rng, duration, stages)
    print(f"  run b took {time.monotonic() - started:.1f} s in all", flush=True)

    problems = compare_dirs(work / "a", work / "b")
    if problems:
        print("FAIL: the interrupted run differs from the uninterrupted one:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    runs = len(list((work / "a").glob("runs/*/checkpoint.pt"))) + (work / "a" / "teacher").is_dir()
    print(
        f"PASS: after {len(events)} SIGKILLs, DIR/b equals DIR/a: GLUE table identical, "
        f"budget table identical but for its time columns, tokens/FLOPs/steps/evaluations of every run "
        f"identical, student weights of all {runs} runs bitwise identical"
    )
    if args.dir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
