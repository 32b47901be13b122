"""Issue 7: killed runs resume with exact budget accounting, checkpoints are never half-written,
non-finite losses stop (or skip) cleanly, and one process writes an output directory at a time.

Kills are real: ``python -m budgetkd …`` (or a small ``python -c`` harness around
``budgetkd.cli.main`` that slows down or holds a chosen function) is started as a subprocess and
sent SIGKILL at a chosen point (after k checkpoints, in the middle of a checkpoint write, after some
GLUE configurations finished); the resumption then runs in-process through ``budgetkd.cli.main``
and is compared with an uninterrupted run of the same configuration. Everything is sized for a
2-core machine: a 1 × 32 student, batches of 8 sequences of 64 tokens, checkpoints every step.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA, STUDENT_ARCH, single_thread, subprocess_env

from budgetkd.cli import main
from budgetkd.train import Pretrainer, TrainModule

GLUE_DIR = SHARED_DATA / "glue"
MEASURED = ("steps", "sequences", "tokens", "flops", "flops_student", "flops_teacher", "epochs")

# The harness: ``python -c HARNESS ARGV…`` runs ``budgetkd.cli.main(ARGV)`` after optional patches:
#   BUDGETKD_SLOW_SAVE_AT=N  the N-th torch.save writes half of its bytes, touches BUDGETKD_MARKER
#                            and sleeps (the parent SIGKILLs it there: a kill mid-write);
#   BUDGETKD_HOLD=a,b,…      each of "pretrain", "glue", "compare" is run in its own thread with the
#                            command line in BUDGETKD_ARGV_<name> (JSON) and blocks inside its output
#                            directory's lock, after touching BUDGETKD_MARKER_<name>.
HARNESS = r"""
import io, json, os, sys, threading, time
from pathlib import Path

import torch


def hold(marker):
    Path(marker).touch()
    time.sleep(600)


slow_at = int(os.environ.get("BUDGETKD_SLOW_SAVE_AT", "0"))
if slow_at:
    real_save, calls = torch.save, [0]

    def slow_save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != slow_at:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(f, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            os.fsync(handle.fileno())
        hold(os.environ["BUDGETKD_MARKER"])

    torch.save = slow_save

from budgetkd.cli import main

held = [name for name in os.environ.get("BUDGETKD_HOLD", "").split(",") if name]
if held:
    import budgetkd.experiment
    import budgetkd.glue.pipeline
    import budgetkd.train

    def holding(name, original):
        def patched(*args, **kwargs):
            hold(os.environ["BUDGETKD_MARKER_" + name])
            return original(*args, **kwargs)

        return patched

    # each runs inside its command's lock on --out
    budgetkd.train.Pretrainer.setup = holding("pretrain", budgetkd.train.Pretrainer.setup)
    pipeline = budgetkd.glue.pipeline
    pipeline.fingerprint_model_dir = holding("glue", pipeline.fingerprint_model_dir)
    budgetkd.experiment.Experiment.run = holding("compare", budgetkd.experiment.Experiment.run)
    threads = [
        threading.Thread(target=main, args=(json.loads(os.environ["BUDGETKD_ARGV_" + name]),), daemon=True)
        for name in held
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sys.exit(0)
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Same thread count as the subprocesses (OMP_NUM_THREADS=1): bitwise comparable results."""
    with single_thread():
        yield


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def run_values(data_dir: Path, out: Path, **overrides) -> dict:
    values = dict(
        data=str(data_dir),
        out=str(out),
        student=dict(STUDENT_ARCH),
        budget="60steps",
        batch_size=8,
        num_evals=3,
        eval_sequences=16,
        eval_batch_size=16,
        checkpoint_interval_s=0.0,
        checkpoint_every_steps=1,
        log_every=1000,
        progress=False,
    )
    values.update(overrides)
    return values


def write_config(path: Path, values: dict) -> list[str]:
    """The values as a run YAML; returns the ``pretrain`` command line that runs it."""
    path.write_text(yaml.safe_dump(values))
    return ["pretrain", "--config", str(path)]


def start(argv: list[str], cwd: Path, harness: bool = False, **env) -> subprocess.Popen:
    program = ["-c", HARNESS] if harness else ["-m", "budgetkd"]
    return subprocess.Popen(
        [sys.executable, *program, *argv],
        env={**subprocess_env(), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )


def kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()``; fail if it ended (or never got there) first."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(
                    f"ended (rc {proc.returncode}) before {what}: {proc.stderr.read().decode()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} after {timeout:.0f} s")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, f"ended before the kill, {what}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def load_checkpoint(run: Path) -> dict | None:
    path = run / "checkpoint.pt"
    return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def checkpoint_steps(run: Path) -> int:
    state = load_checkpoint(run)
    return -1 if state is None else state["meter"]["steps"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def evaluations(run_summary: dict) -> list[tuple]:
    return [(e["step"], e["val_mlm_loss"], e.get("val_loss"), e["final"]) for e in run_summary["evaluations"]]


def assert_same_result(run: Path, reference: Path) -> None:
    """Bitwise-equal student weights, equal consumption in every deterministic currency, equal
    validation history."""
    got, want = load_checkpoint(run), load_checkpoint(reference)
    assert set(got["student"]) == set(want["student"])
    for key, value in want["student"].items():
        assert torch.equal(got["student"][key], value), key
    a, b = summary(run), summary(reference)
    for key in MEASURED:
        assert a["consumed"][key] == b["consumed"][key], key
    assert evaluations(a) == evaluations(b)
    assert a["skipped_steps"] == b["skipped_steps"] == 0


def temporaries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------
# SIGKILL during steps: steps, tokens and FLOPs budgets resume to the uninterrupted weights
# ------------------------------------------------------------------------------------------------

# (currency, budget, strategy, kill after this many checkpointed steps); about 60 steps each
KILLS = [
    ("steps", "60steps", "none", 3),
    ("tokens", "30720tokens", "none", 25),  # 512 real tokens per step of 8 × 64
    ("flops", "1e10flops", "vanilla", 45),  # ≈ 1.69e8 FLOPs per vanilla step with the tiny teacher
]


@pytest.mark.parametrize(("currency", "budget", "strategy", "kill_after"), KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_mid_run_resumes_to_the_uninterrupted_weights(
    currency, budget, strategy, kill_after, data_dir, teacher_dir, tmp_path
):
    teacher = {"teacher": str(teacher_dir)} if strategy != "none" else {}
    values = run_values(data_dir, tmp_path / "killed", budget=budget, strategy=strategy, **teacher)
    argv = write_config(tmp_path / "run.yaml", values)
    proc = start(argv, tmp_path)
    killed = tmp_path / "killed"
    kill_when(proc, lambda: checkpoint_steps(killed) >= kill_after, f"{kill_after} checkpointed steps")
    assert not (killed / "summary.json").exists()
    at_kill = checkpoint_steps(killed)
    assert kill_after <= at_kill < 60

    assert main([*argv, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(write_config(tmp_path / "reference.yaml", {**values, "out": str(reference)})) == 0
    assert_same_result(killed, reference)
    assert summary(reference)["consumed"]["steps"] > at_kill
    assert summary(killed)["budget"]["currency"] == currency


# ------------------------------------------------------------------------------------------------
# SIGKILL with a time budget: the charged time continues from the checkpoint
# ------------------------------------------------------------------------------------------------


def test_sigkill_with_a_time_budget_charges_every_second_once(data_dir, tmp_path, monkeypatch):
    budget_s = 2.5
    run = tmp_path / "killed"
    argv = write_config(tmp_path / "run.yaml", run_values(data_dir, run, budget=f"{budget_s}s", num_evals=1))
    proc = start(argv, tmp_path)

    def charged_a_second() -> bool:
        state = load_checkpoint(run)
        return state is not None and state["meter"]["time_s"] >= 1.0

    kill_when(proc, charged_a_second, "a checkpoint with 1 s charged")
    at_kill = load_checkpoint(run)["meter"]
    assert 1.0 <= at_kill["time_s"] < budget_s and not (run / "summary.json").exists()

    loaded, steps = [], []
    original_load, original_step = Pretrainer.load_checkpoint, Pretrainer.train_step

    def recording_load(self):
        original_load(self)
        loaded.append(self.meter.state_dict())

    def timed_step(self, step, lr):
        started = time.perf_counter()
        result = original_step(self, step, lr)
        steps.append((step, started, time.perf_counter()))
        return result

    monkeypatch.setattr(Pretrainer, "load_checkpoint", recording_load)
    monkeypatch.setattr(Pretrainer, "train_step", timed_step)
    assert main([*argv, "--resume"]) == 0
    final = summary(run)["consumed"]

    # the resumed meter starts exactly where the checkpoint stopped: nothing lost, nothing twice
    assert loaded == [at_kill]
    # the first call is the uncharged warm-up: the resumed step itself, run and undone
    warm_up, *steps = steps
    assert warm_up[0] == at_kill["steps"]
    assert [s for s, _, _ in steps] == list(range(at_kill["steps"], final["steps"]))
    assert final["time_s"] >= at_kill["time_s"]
    charged_after = final["time_s"] - at_kill["time_s"]
    inside_steps = sum(end - begin for _, begin, end in steps)  # a lower bound of what is charged
    wall = steps[-1][2] - steps[0][1]  # an upper bound: steps plus what lies between them
    assert inside_steps <= charged_after <= wall, (inside_steps, charged_after, wall)
    assert final["time_s"] >= budget_s and summary(run)["budget_exhausted"]


# ------------------------------------------------------------------------------------------------
# SIGKILL in the middle of a checkpoint write
# ------------------------------------------------------------------------------------------------

CHECKPOINT_WRITES = [
    pytest.param(1, id="first-checkpoint"),
    pytest.param(3, id="third-checkpoint"),
]


@pytest.mark.parametrize("write", CHECKPOINT_WRITES)
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(write, data_dir, tmp_path):
    """The ``write``-th checkpoint write stops half-way (the harness's slow torch.save) and the run
    is SIGKILLed there: checkpoint.pt is absent (first write) or the previous complete one, the
    half-written temporary is never taken for it, and the run resumes to the uninterrupted result."""
    run = tmp_path / "killed"
    values = run_values(data_dir, run, budget="6steps", num_evals=1)
    argv = write_config(tmp_path / "run.yaml", values)
    marker = tmp_path / "in-the-middle-of-a-write"
    proc = start(argv, tmp_path, harness=True, BUDGETKD_SLOW_SAVE_AT=str(write), BUDGETKD_MARKER=str(marker))
    kill_when(proc, marker.exists, "the slow checkpoint write")

    half = [run / name for name in temporaries(run)]
    assert len(half) == 1 and half[0].name.startswith(".checkpoint.pt.")
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises on a truncated file
        torch.load(half[0], weights_only=False)
    assert checkpoint_steps(run) == (write - 1 if write > 1 else -1)  # -1: no checkpoint.pt at all
    assert not (run / "summary.json").exists()

    assert main([*argv, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(write_config(tmp_path / "reference.yaml", {**values, "out": str(reference)})) == 0
    assert_same_result(run, reference)
    if write == 1:  # the fix of the bug above also removes the stale temporary (one checkpoint's size)
        assert temporaries(run) == []


# ------------------------------------------------------------------------------------------------
# SIGKILL during GLUE: finished configurations are kept, the result equals an uninterrupted run
# ------------------------------------------------------------------------------------------------


def _glue_argv(model: Path, out: Path) -> list[str]:
    return [
        "glue",
        str(model),
        "--out",
        str(out),
        "--glue-dir",
        str(GLUE_DIR),
        "--tasks",
        "rte",
        "--grid",
        "lr=1e-4:2e-4:3e-4,bs=8:16",
        "--epochs",
        "1",
        "--max-train-examples",
        "16",
        "--max-eval-examples",
        "16",
        "--device",
        "cpu",
        "--no-progress",
    ]


def _run_files(out: Path) -> dict[str, int]:
    folder = out / "runs" / "rte"
    if not folder.is_dir():
        return {}
    return {
        p.name: p.stat().st_mtime_ns
        for p in folder.glob("lr*.json")
        if not p.name.endswith(".predictions.json")
    }


def _glue_runs(out: Path) -> list[tuple]:
    glue = json.loads((out / "glue.json").read_text())
    runs = glue["tasks"]["rte"]["runs"]
    return [
        (r["lr"], r["batch_size"], r["seed"], r["metrics"], r["final_loss"], r["train_steps"]) for r in runs
    ]


def test_sigkill_during_glue_keeps_finished_configurations(teacher_dir, tmp_path):
    if not GLUE_DIR.is_dir():
        pytest.skip(f"local GLUE data not found at {GLUE_DIR}")
    out = tmp_path / "killed"
    proc = start(_glue_argv(teacher_dir, out), tmp_path)
    kill_when(proc, lambda: len(_run_files(out)) >= 2, "two finished GLUE configurations")
    kept = _run_files(out)
    assert 2 <= len(kept) < 6 and not (out / "glue.json").exists()

    assert main(_glue_argv(teacher_dir, out)) == 0
    after = _run_files(out)
    assert len(after) == 6
    assert {name: after[name] for name in kept} == kept, "a finished configuration was trained again"
    reference = tmp_path / "reference"
    assert main(_glue_argv(teacher_dir, reference)) == 0
    assert _glue_runs(out) == _glue_runs(reference)


# ------------------------------------------------------------------------------------------------
# SIGKILL of compare, twice (pretraining, then GLUE), and re-running it
# ------------------------------------------------------------------------------------------------


def _experiment(teacher_dir: Path) -> dict:
    return {
        "name": "killed",
        "data": {
            "inputs": [str(SHARED_DATA / "corpus" / "gutenberg" / "blake-poems.txt")],
            "tokenizer": str(teacher_dir),
            "seq_len": 64,
        },
        "teacher": {"path": str(teacher_dir)},
        "student": dict(STUDENT_ARCH),
        "strategies": ["none", "vanilla"],
        "budget": {"explicit": "40steps"},
        "optimizer": {"batch_size": 8},
        "training": {"num_evals": 2, "eval_sequences": 16, "checkpoint_every_steps": 1, "device": "cpu"},
        "glue": {
            "dir": str(GLUE_DIR),
            "tasks": ["rte"],
            "grid": "lr=1e-4:2e-4:3e-4,bs=8",
            "epochs": 1,
            "max_train_examples": 16,
            "max_eval_examples": 16,
            "device": "cpu",
        },
    }


def test_sigkilled_compare_reruns_to_the_uninterrupted_table(teacher_dir, tmp_path):
    if not GLUE_DIR.is_dir():
        pytest.skip(f"local GLUE data not found at {GLUE_DIR}")
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(_experiment(teacher_dir)))
    out, reference = tmp_path / "killed", tmp_path / "reference"
    argv = ["compare", str(config), "--out", str(out), "--no-progress"]

    kill_when(
        start(argv, tmp_path), lambda: checkpoint_steps(out / "runs" / "vanilla") >= 10, "vanilla step 10"
    )
    assert not (out / "runs" / "vanilla" / "summary.json").exists()
    glue_runs = out / "glue" / "vanilla" / "runs" / "rte"
    kill_when(
        start(argv, tmp_path), lambda: len(list(glue_runs.glob("lr*-seed1.json"))) >= 1, "vanilla's GLUE"
    )
    assert not (out / "glue" / "vanilla" / "glue.json").exists()
    assert main(argv) == 0
    assert main(["compare", str(config), "--out", str(reference), "--no-progress"]) == 0

    def glue_table(path: Path) -> str:
        return (path / "table.md").read_text().split("## Budget accounting")[0]

    assert glue_table(out) == glue_table(reference)
    for label in ("none", "vanilla"):
        assert_same_result(out / "runs" / label, reference / "runs" / label)
        assert _glue_runs(out / "glue" / label) == _glue_runs(reference / "glue" / label)


def test_compare_killed_during_a_forced_stage_redoes_it_on_a_plain_rerun(teacher_dir, tmp_path):
    if not GLUE_DIR.is_dir():
        pytest.skip(f"local GLUE data not found at {GLUE_DIR}")
    config = tmp_path / "experiment.yaml"
    config.write_text(
        yaml.safe_dump({**_experiment(teacher_dir), "strategies": ["none"], "budget": {"explicit": "4steps"}})
    )
    out = tmp_path / "out"
    argv = ["compare", str(config), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    table = (out / "table.md").read_text()
    glue = out / "glue" / "none"

    def redoing() -> bool:  # the old results are deleted and the first new configuration is written
        return not (glue / "glue.json").exists() and any((glue / "runs" / "rte").glob("lr*-seed1.json"))

    # --force pretrain:none redoes the pretraining, then (downstream) GLUE: killed in the GLUE redo
    kill_when(start([*argv, "--force", "pretrain:none"], tmp_path), redoing, "the forced GLUE stage")
    assert main(argv) == 0
    assert (glue / "glue.json").exists()
    assert (out / "table.md").read_text().split("## Budget")[0] == table.split("## Budget")[0]


# ------------------------------------------------------------------------------------------------
# non-finite losses
# ------------------------------------------------------------------------------------------------

POISONED_STEP = 3


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.fixture
def poison(monkeypatch):
    """``poison("loss")`` makes the loss of optimizer step POISONED_STEP NaN; ``poison("gradient")``
    keeps that loss finite but makes its gradients NaN. Warm-up and evaluation are untouched."""
    current = {"step": None}
    original_step, original_forward = Pretrainer.train_step, TrainModule.forward

    def apply(kind: str) -> dict:
        def train_step(self, step, lr):
            current["step"] = step
            try:
                return original_step(self, step, lr)
            finally:
                current["step"] = None

        def forward(self, *args, **kwargs):
            loss, parts = original_forward(self, *args, **kwargs)
            if current["step"] == POISONED_STEP:
                loss = loss * float("nan") if kind == "loss" else _NanGradient.apply(loss)
            return loss, parts

        monkeypatch.setattr(Pretrainer, "train_step", train_step)
        monkeypatch.setattr(TrainModule, "forward", forward)
        return current

    return apply


def _weights_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "kind",
    [
        "loss",
        "gradient",
    ],
)
def test_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(kind, poison, data_dir, tmp_path, capfd):
    poison(kind)
    run = tmp_path / "run"
    argv = write_config(tmp_path / "run.yaml", run_values(data_dir, run, budget="8steps", num_evals=1))
    capfd.readouterr()
    assert main(argv) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("budgetkd: error: non-finite"), err
    assert f"at step {POISONED_STEP}" in err[0] and "on_nonfinite: skip" in err[0]
    state = load_checkpoint(run)
    assert state["meter"]["steps"] == POISONED_STEP  # steps 0 … POISONED_STEP-1, all good
    assert _weights_finite(state)
    assert not (run / "summary.json").exists() and not (run / "model").exists()


@pytest.mark.parametrize("kind", ["loss"])
def test_nonfinite_step_is_skipped_and_counted_with_on_nonfinite_skip(kind, poison, data_dir, tmp_path):
    poison(kind)
    run = tmp_path / "run"
    argv = write_config(tmp_path / "run.yaml", run_values(data_dir, run, budget="8steps", num_evals=1))
    saved: dict[int, dict] = {}
    original_save = Pretrainer.save_checkpoint

    def recording_save(self):
        original_save(self)
        saved[self.meter.steps] = {k: v.clone() for k, v in self.module.student.state_dict().items()}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pretrainer, "save_checkpoint", recording_save)
        assert main([*argv, "--on-nonfinite", "skip"]) == 0
    result = summary(run)
    assert result["skipped_steps"] == 1
    assert result["consumed"]["steps"] == 8  # the skipped batch is charged: its time was spent
    assert math.isfinite(result["val_mlm_loss"]) and _weights_finite(load_checkpoint(run))
    # the poisoned step changed nothing; the steps around it did
    for key, value in saved[POISONED_STEP].items():
        assert torch.equal(saved[POISONED_STEP + 1][key], value), key
    assert any(not torch.equal(saved[POISONED_STEP][k], v) for k, v in saved[POISONED_STEP + 2].items())


# ------------------------------------------------------------------------------------------------
# one writer per output directory
# ------------------------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict:
    return {
        p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_a_second_process_on_the_same_out_is_refused(data_dir, teacher_dir, tmp_path):
    """A holder process sits inside the lock of a pretrain, a glue and a compare output directory
    (three threads); a second ``python -m budgetkd`` on each directory refuses in one line."""
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(
        yaml.safe_dump(
            {
                "data": {"inputs": [str(SHARED_DATA / "corpus" / "gutenberg" / "blake-poems.txt")]},
                "teacher": {"path": str(teacher_dir)},
                "student": dict(STUDENT_ARCH),
                "strategies": ["none", "vanilla"],
                "budget": {"explicit": "2steps"},
                "optimizer": {"batch_size": 8},
                "glue": {"dir": str(GLUE_DIR), "tasks": ["rte"], "grid": "lr=1e-4,bs=8", "epochs": 1},
            }
        )
    )
    commands = {
        "pretrain": write_config(tmp_path / "run.yaml", run_values(data_dir, tmp_path / "pretrain-out")),
        "glue": _glue_argv(teacher_dir, tmp_path / "glue-out"),
        "compare": ["compare", str(experiment), "--out", str(tmp_path / "compare-out"), "--no-progress"],
    }
    outs = {name: tmp_path / f"{name}-out" for name in commands}
    markers = {name: tmp_path / f"holding-{name}" for name in commands}
    env = {f"BUDGETKD_ARGV_{name}": json.dumps(argv) for name, argv in commands.items()}
    env.update({f"BUDGETKD_MARKER_{name}": str(path) for name, path in markers.items()})
    holder = start([], tmp_path, harness=True, BUDGETKD_HOLD=",".join(commands), **env)
    try:
        deadline = time.monotonic() + 120
        while not all(m.exists() for m in markers.values()):
            assert holder.poll() is None, holder.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the holder never got its locks"
            time.sleep(0.05)
        before = {name: _snapshot(out) for name, out in outs.items()}
        contenders = {name: start(argv, tmp_path) for name, argv in commands.items()}
        for name, proc in contenders.items():
            _, err = proc.communicate(timeout=300)
            lines = err.decode().strip().splitlines()
            assert proc.returncode == 2, (name, lines)
            assert len(lines) == 1 and lines[0].startswith("budgetkd: error: "), (name, lines)
            assert str(outs[name]) in lines[0] and "in use by another budgetkd process" in lines[0]
            assert _snapshot(outs[name]) == before[name], f"{name}: the refused process wrote"
        assert holder.poll() is None, "the holder let go of its locks"
    finally:
        holder.kill()
        holder.wait()
        holder.stderr.close()
