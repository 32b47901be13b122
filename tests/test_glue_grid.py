"""The GLUE grid at the speed of the hardware (issue 12): stacked training of a learning-rate group
against separate runs, length grouping, the file-system ledger of jobs, and ``budgetkd glue``
under ``torchrun --nproc_per_node 3`` (every rank takes jobs; a killed rank's job is redone)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from budgetkd.glue import finetune, ledger
from budgetkd.glue.loading import load_local
from budgetkd.glue.pipeline import plan_glue, run_glue
from budgetkd.glue.stacked import fine_tune_stacked
from budgetkd.glue.tasks import TASKS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB_DIR = SHARED_DATA / "vocab" / "bert-base-uncased"
GLUE_DIR = SHARED_DATA / "glue"
LRS = (1e-4, 3e-4, 1e-3, 3e-3)
# Stated tolerance of a stacked member against its separate run, dropout off: every step's loss
# to 1e-4 relative (measured: ~2e-7; batched vs plain matrix products sum in another order).
STEP_LOSS_RTOL = 1e-4


def _tiny_bert(path: Path, dropout: float) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(VOCAB_DIR), do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    with finetune.quiet_transformers():
        BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    if not (VOCAB_DIR / "vocab.txt").is_file() or not GLUE_DIR.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    root = tmp_path_factory.mktemp("grid-models")
    return {"off": _tiny_bert(root / "off", 0.0), "on": _tiny_bert(root / "on", 0.1)}


@pytest.fixture(scope="module")
def mrpc(models):
    """48 MRPC training pairs (lengths vary: every batch is padded) and 40 dev pairs."""
    tokenizer = finetune.load_tokenizer(models["off"])
    task = TASKS["mrpc"]
    data = load_local(task, GLUE_DIR)
    train = finetune.encode_split(tokenizer, data.train.select(list(range(48))), task, 128)
    dev = {"dev": finetune.encode_split(tokenizer, data.dev["dev"].select(list(range(40))), task, 128)}
    return task, tokenizer, train, dev


def _common(batch_size=16, epochs=2):
    return dict(
        batch_size=batch_size,
        seed=3,
        recipe=finetune.Recipe(epochs=epochs),
        device=torch.device("cpu"),
        precision="fp32",
    )


def test_stacked_members_equal_their_separate_runs_with_dropout_off(models, mrpc):
    task, tokenizer, train, dev = mrpc
    lengths = train.lengths()
    batches = [lengths[i] for i in np.array_split(np.arange(48), 3)]
    assert all(b.min() < b.max() for b in batches)  # padding in every batch
    stacked = fine_tune_stacked(models["off"], task, tokenizer, train, dev, learning_rates=LRS, **_common())
    for lr, member in zip(LRS, stacked):
        alone = finetune.fine_tune(
            models["off"], task, tokenizer, train, dev, learning_rate=lr, progress=False, **_common()
        )
        assert len(member.step_losses) == len(alone.step_losses) == 6
        np.testing.assert_allclose(member.step_losses, alone.step_losses, rtol=STEP_LOSS_RTOL)
        assert member.final_loss == pytest.approx(alone.final_loss, rel=STEP_LOSS_RTOL)
        assert member.predictions == alone.predictions
        assert member.metrics == alone.metrics
    # the members did train apart: the learning rates give different curves
    assert len({round(m.final_loss, 6) for m in stacked}) == len(LRS)


def test_stacked_grid_with_dropout_is_reproducible_and_members_draw_their_own_masks(models, mrpc):
    task, tokenizer, train, dev = mrpc
    same_lr = (1e-3, 1e-3)
    first = fine_tune_stacked(models["on"], task, tokenizer, train, dev, learning_rates=same_lr, **_common())
    again = fine_tune_stacked(models["on"], task, tokenizer, train, dev, learning_rates=same_lr, **_common())
    for a, b in zip(first, again):
        assert a.step_losses == b.step_losses and a.predictions == b.predictions
    # two members with the same learning rate differ only by their dropout masks
    assert first[0].step_losses[0] != first[1].step_losses[0]
    off = fine_tune_stacked(models["off"], task, tokenizer, train, dev, learning_rates=same_lr, **_common())
    assert off[0].step_losses == off[1].step_losses


def test_length_grouping_sorts_windows_and_keeps_every_example_once():
    lengths = np.random.default_rng(0).integers(5, 100, size=1000)
    plain = finetune.epoch_batches(1000, 8, torch.Generator().manual_seed(1))
    grouped = finetune.epoch_batches(1000, 8, torch.Generator().manual_seed(1), lengths, True)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(1000))
    window = finetune.LENGTH_GROUP_BATCHES * 8
    flat_plain, flat_grouped = np.concatenate(plain), np.concatenate(grouped)
    for start in range(0, 1000, window):  # same examples per window, sorted by decreasing length
        assert set(flat_plain[start : start + window]) == set(flat_grouped[start : start + window])
        assert np.all(np.diff(lengths[flat_grouped[start : start + window]]) <= 0)

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)


def test_fingerprint_records_stacking_and_length_grouping(models, tmp_path):
    kwargs = dict(glue_dir=GLUE_DIR, tasks="rte", grid="lr=1e-4:3e-4,bs=16", device="cpu")
    separate = plan_glue(models["off"], tmp_path / "a", stack=False, **kwargs)
    stacked = plan_glue(models["off"], tmp_path / "a", stack=True, **kwargs)
    grouped = plan_glue(models["off"], tmp_path / "a", stack=False, group_by_length=True, **kwargs)
    assert [j.members for j in separate.jobs()] == [1, 1] and [j.members for j in stacked.jobs()] == [2]
    fingerprints = [
        {fp for job in plan.jobs() for _, _, fp, _ in job.runs} for plan in (separate, stacked, grouped)
    ]
    assert len(set.union(*fingerprints)) == 6  # three modes x two runs, all distinct
    inputs = stacked.jobs()[0].runs[0][1]
    assert inputs["mode"] == {"stacked": [1e-4, 3e-4]} and "group_by_length" not in inputs
    assert grouped.jobs()[0].runs[0][1]["group_by_length"] is True
    assert separate.threads == 1  # fixed per job, not the machine's core count
    assert plan_glue(models["off"], tmp_path / "a", stack=None, **kwargs).stack is False  # auto: CUDA only


def test_stacked_run_writes_the_same_per_member_files(models, tmp_path):
    out = tmp_path / "out"
    kwargs = dict(glue_dir=GLUE_DIR, tasks="rte", grid="lr=1e-4:3e-4,bs=16", epochs=1, device="cpu")
    glue = run_glue(
        models["off"], out, max_train_examples=32, max_eval_examples=20, stack=True, progress=False, **kwargs
    )
    for lr in (1e-4, 3e-4):
        record = json.loads((out / "runs" / "rte" / f"lr{lr!r}-bs16-seed1.json").read_text())
        stored = json.loads((out / "runs" / "rte" / f"lr{lr!r}-bs16-seed1.predictions.json").read_text())
        assert record["stacked_with"] == [1e-4, 3e-4] and record["rank"] == 0 and record["cpu_threads"] == 1
        assert record["host"] == socket.gethostname()
        assert stored["fingerprint"] == record["fingerprint"]
        assert len(stored["splits"]["dev"]["predictions"]) == 20
    assert glue["recipe"]["stacked"] is True and not list((out / "claims" / "rte").iterdir())


# ----------------------------------------------------------------------------------------------
# the ledger


class _FakeJob:
    def __init__(self, root: Path, name: str):
        self.label = name
        self.claim_path = root / "claims" / "t" / f"{name}.json"
        self.members, self.units, self.cost = 1, 1, 1.0
        self.finished = False

    def done(self):
        return self.finished

    def run(self, on_step):
        self.finished = True

    def measured_seconds(self):
        return 1.0


def test_claims_respect_live_owners_and_take_over_dead_or_silent_ones(tmp_path):
    me = ledger.Worker.here(rank=0, world=2)
    job = _FakeJob(tmp_path, "a")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        job.claim_path.parent.mkdir(parents=True)
        owner = {"host": me.host, "node": me.node, "pid": alive.pid, "rank": 1, "token": "x"}
        job.claim_path.write_text(json.dumps(owner))
        assert ledger.try_claim(job, me) is None  # a live owner that beats: respected
        assert ledger.try_claim(job, me, lease_s=-1.0) is not None  # silent past its lease: taken
        job.claim_path.write_text(json.dumps({**owner, "pid": dead.pid}))
        claim = ledger.try_claim(job, me)  # owner process gone: taken at once
        assert claim is not None and json.loads(job.claim_path.read_text())["pid"] == os.getpid()
        claim.release()
        assert not job.claim_path.exists()
        job.finished = True
        assert ledger.try_claim(job, me) is None  # done jobs are never claimed
    finally:
        alive.kill()
        alive.wait()


def test_a_live_claim_from_another_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path):
    """Containers on one host name: their PIDs are not ours, so a dead-looking PID proves nothing."""
    me = ledger.Worker.here(rank=0, world=2)
    assert me.node.startswith(f"{me.host}/") and me.node == ledger.node_id()
    job = _FakeJob(tmp_path, "b")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    job.claim_path.parent.mkdir(parents=True)
    boot, namespace = me.node.split("/", 1)[1].split("/", 1)
    elsewhere = {"host": me.host, "pid": dead.pid, "rank": 1, "token": "x"}
    for node in (f"{me.host}/{boot}/pid:[1]", f"{me.host}/another-boot/{namespace}", None):
        owner = elsewhere if node is None else {**elsewhere, "node": node}  # None: an older claim
        job.claim_path.write_text(json.dumps(owner))
        assert ledger.try_claim(job, me) is None  # beating: respected although its PID is dead here
        claim = ledger.try_claim(job, me, lease_s=-1.0)  # silent past its lease: taken
        assert claim is not None and json.loads(job.claim_path.read_text())["node"] == me.node
        claim.release()
    job.claim_path.write_text(json.dumps({**elsewhere, "node": me.node}))
    claim = ledger.try_claim(job, me)  # our own namespace and the PID is gone: taken at once
    assert claim is not None
    claim.release()


def test_run_and_predictions_of_two_executions_never_pass_as_one_run(tmp_path):
    """A job taken over while its first owner still ran: both write; whatever the interleaving, a
    run file is only accepted with the predictions written with it."""
    from budgetkd.glue.search import load_cached_run, load_run_predictions, predictions_path, save_run

    path = tmp_path / "runs" / "rte" / "lr0.0001-bs16-seed1.json"
    path.parent.mkdir(parents=True)

    def execution(score):
        record = {"fingerprint": "fp", "metrics": {"accuracy": score}}
        return record, {"dev": {"labels": [0, 1], "predictions": [int(score > 0.5), 1]}}

    first, second = execution(0.4), execution(0.9)
    save_run(path, *first)
    assert load_cached_run(path, "fp", need_predictions=True)["metrics"] == {"accuracy": 0.4}
    assert load_run_predictions(path, "fp") == first[1]
    # the second execution's predictions land, then the first's run file is written last
    save_run(path, *second)
    second_predictions = predictions_path(path).read_text()
    save_run(path, *first)
    predictions_path(path).write_text(second_predictions)
    assert load_cached_run(path, "fp") is not None  # the metrics alone still read…
    assert load_cached_run(path, "fp", need_predictions=True) is None  # …but the job is not done
    assert load_run_predictions(path, "fp") is None  # and the report takes no mixed predictions
    save_run(path, *second)  # the redo writes a consistent pair
    record = load_cached_run(path, "fp", need_predictions=True)
    assert record["metrics"] == {"accuracy": 0.9} and load_run_predictions(path, "fp") == second[1]
    # run files from before the checksum stay readable
    record.pop("predictions_sha256")
    path.write_text(json.dumps(record))
    assert load_cached_run(path, "fp", need_predictions=True) is not None


def test_run_jobs_waits_for_a_job_claimed_elsewhere(tmp_path):
    """A rank with nothing left to claim polls until the other owner's job is done."""
    import threading

    me = ledger.Worker.here(rank=1, world=2)
    jobs = [_FakeJob(tmp_path, "a"), _FakeJob(tmp_path, "b")]
    jobs[1].claim_path.parent.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        jobs[1].claim_path.write_text(json.dumps({"host": me.host, "pid": sleeper.pid, "token": "y"}))
        threading.Timer(1.0, lambda: setattr(jobs[1], "finished", True)).start()
        started = time.monotonic()
        report = ledger.run_jobs(jobs, worker=me, progress=False, poll_s=0.1, log_path=tmp_path / "log")
        assert report["ran"] == ["a"] and time.monotonic() - started >= 0.9
        assert "claimed a" in (tmp_path / "log").read_text()
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------------------------
# budgetkd glue under torchrun --nproc_per_node 3

GRID_ARGS = ["--tasks", "rte,mrpc", "--grid", "lr=1e-4:1e-3,bs=16:32", "--epochs", "2"]
GRID_ARGS += ["--max-train-examples", "160", "--max-eval-examples", "40", "--device", "cpu", "--no-stack"]
TIMING_KEYS = {"train_seconds", "eval_seconds"}


def _without_timings(glue: dict) -> dict:
    glue = json.loads(json.dumps(glue))
    for entry in glue["tasks"].values():
        for run in entry["runs"]:
            for key in TIMING_KEYS:
                run.pop(key)
    return glue


def _env() -> dict:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {
        **os.environ,
        "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "BUDGETKD_GLUE_POLL_S": "0.2",
    }


def _torchrun(model: Path, out: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "3",
        "--master_port",
        str(port),
    ]
    argv += ["-m", "budgetkd", "glue", str(model), "--out", str(out), "--glue-dir", str(GLUE_DIR), *GRID_ARGS]
    return subprocess.Popen(
        argv + ["--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "runs").glob("*/*.json") if not p.name.endswith(".predictions.json"))


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory) -> dict:
    from budgetkd.cli import main

    out = tmp_path_factory.mktemp("grid-one")
    assert (
        main(
            [
                "glue",
                str(models["on"]),
                "--out",
                str(out),
                "--glue-dir",
                str(GLUE_DIR),
                *GRID_ARGS,
                "--no-progress",
            ]
        )
        == 0
    )
    return json.loads((out / "glue.json").read_text())


def test_three_ranks_share_the_grid_and_match_one_process(models, one_process, tmp_path):
    out = tmp_path / "out"
    proc = _torchrun(models["on"], out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert output.count("GLUE dev:") == 1  # only rank 0 reports
    glue = json.loads((out / "glue.json").read_text())
    assert _without_timings(glue) == _without_timings(one_process)
    records = [json.loads(p.read_text()) for p in _run_files(out)]
    assert len(records) == 8 and {r["rank"] for r in records} == {0, 1, 2}  # every rank ran jobs
    assert {r["cpu_threads"] for r in records} == {1}
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert len(logs) == 3 and all("claimed" in (out / "logs" / name).read_text() for name in logs)


def test_a_killed_rank_s_job_is_redone_once(models, one_process, tmp_path):
    out = tmp_path / "out"
    proc = _torchrun(models["on"], out)
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for path in (out / "claims").glob("*/*.json") if (out / "claims").is_dir() else []:
            claim = ledger.read_claim(path)
            if claim and claim.get("rank") == 1:
                victim = claim
                break
        time.sleep(0.05)
    assert victim is not None, "rank 1 never claimed a job"
    os.kill(victim["pid"], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0  # torchrun tore the group down
    claim_file = out / "claims" / victim["job"].split()[0] / (victim["job"].split()[1] + ".json")
    assert claim_file.exists()  # left behind by the dead rank
    done_before = len(_run_files(out))
    assert done_before < 8

    proc = _torchrun(models["on"], out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    files = _run_files(out)
    assert len(files) == 8  # each job's run file exactly once
    glue = json.loads((out / "glue.json").read_text())
    assert [len(t["runs"]) for t in glue["tasks"].values()] == [4, 4]
    assert _without_timings(glue) == _without_timings(one_process)
    logs = "".join(p.read_text() for p in (out / "logs").iterdir())
    assert "taking over stale claim" in logs
    assert not list((out / "claims").glob("*/*.json"))


def test_one_bar_counts_runs_and_estimates_from_measured_step_times(tmp_path):
    jobs = [_FakeJob(tmp_path, name) for name in "abc"]
    for job in jobs:
        job.members, job.units = 2, 4  # 2 members x 2 steps each
    bar = ledger.GridBar(jobs, world=2, enabled=True)
    try:
        bar.job_done(jobs[0])  # 1.0 s measured for 4 units: 0.25 s per member-step
        assert bar.bar.n == 2 and bar.bar.total == 6
        # 8 units left x 0.25 s / 2 ranks = 1 s
        assert bar.bar.postfix == "ETA 00:00:01"
        bar.in_flight = 4
        bar.show()
        assert bar.bar.postfix == "ETA 00:00:00"
    finally:
        bar.close()
