"""Multi-process pretraining (torchrun, gloo on CPU) against the single-process reference.

One ``torchrun --nproc_per_node 2`` launch of this very file (``--worker``) runs, on 2 CPU
processes sharing one gloo group:

1. ``steps-none`` — No-KD, 3 steps, global batch 16, micro-batch 4 per rank (2 accumulation
   micro-steps, the first under ``no_sync``), dropout 0;
2. ``steps-minilm`` — the same with MiniLM and a (random) teacher: the teacher runs per rank, the
   MLM head receives no gradient (DDP's ``find_unused_parameters`` path);
3. ``time`` — No-KD under a ``2s`` budget through the real CLI (``budgetkd.cli.main``), with
   rank 1's clock running 3× fast, so that without the rank-0 clock broadcast rank 1 would stop
   long before rank 0.

Each rank writes ``report-rank{r}.json`` (outside the run directories): per run, the steps and
charged time *its own* meter recorded, a fingerprint of its final student weights, and every
call it made to the functions through which budgetkd writes files (recorded, not executed, on
ranks > 0). The tests then compare with one process at micro-batch 8 (same global batch), check
that both ranks stopped on the same step, and that only rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BOOK = SHARED_DATA / "corpus" / "gutenberg" / "blake-poems.txt"

SEQ_LEN = 64
VOCAB = 1000
BATCH = 16
MICRO_DDP = 4  # per rank, 2 ranks …
MICRO_SINGLE = 8  # … equals one process at 2 × 4
STEPS = 3
STUDENT = {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}
TEACHER = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128}
TIME_BUDGET = "2s"
CLOCK_SKEW = 3.0  # rank 1's clock runs this much faster in the ``time`` run
EXPECTED_RUN_FILES = {"run_config.json", "checkpoint.pt", "model", "summary.json", "tb"}
STEPS_RUNS = {"steps-none": "none", "steps-minilm": "minilm"}
DROPOUT = 0.1  # the ``dropout`` runs: per-rank dropout streams, checkpointed and resumed
CRASH_STEP = 2


def _run_config(data: Path, out: Path, **overrides) -> dict:
    values = dict(
        data=str(data),
        out=str(out),
        student=dict(STUDENT),
        strategy="none",
        budget=f"{STEPS}steps",
        batch_size=BATCH,
        micro_batch_size=MICRO_SINGLE,
        lr=1e-3,
        warmup=0.0,  # a real update from the first step on
        dropout=0.0,  # dropout streams are per process: no dropout, so results can match
        num_evals=1,
        eval_sequences=16,
        eval_batch_size=16,
        checkpoint_interval_s=0.0,
        log_every=1,
        progress=False,
    )
    values.update(overrides)
    return values


def _steps_config(data: Path, out: Path, strategy: str, teacher: Path, micro: int) -> dict:
    extra = {"teacher": str(teacher)} if strategy != "none" else {}
    return _run_config(data, out, strategy=strategy, micro_batch_size=micro, **extra)


# ---------------------------------------------------------------------------------------------
# The worker: ``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE --worker DATA TEACHER WORK``
# ---------------------------------------------------------------------------------------------


def _worker(data: Path, teacher: Path, work: Path) -> None:
    import types

    import yaml

    import budgetkd.train as train_mod
    from budgetkd import distributed
    from budgetkd.cli import main as cli_main
    from budgetkd.models import weights_fingerprint

    distributed.init_if_launched(timeout_s=60)  # a desynchronised collective fails, never hangs long
    rank, world = distributed.rank(), distributed.world_size()
    assert world == 2, f"expected 2 processes, got {world}"

    # Record every call to budgetkd's file writers; on ranks > 0 record it *instead of* writing.
    writes: list[str] = []
    for name in ("atomic_write_json", "atomic_torch_save", "export_student", "_tensorboard"):
        original = getattr(train_mod, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            writes.append(f"{_name}({args[2] if _name == 'export_student' else args[0]})")
            if rank == 0:
                return _original(*args, **kwargs)
            return None

        setattr(train_mod, name, spy)

    trainers = []

    class Recording(train_mod.Pretrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    train_mod.Pretrainer = Recording  # pretrain() (and the CLI through it) build this one

    report: dict = {"rank": rank, "world_size": world, "runs": {}}

    def record(name: str, summary: dict | None) -> None:
        trainer = trainers[-1]
        report["runs"][name] = {
            "steps": trainer.meter.steps,
            "time_s": trainer.meter.time_s,
            "tokens": trainer.meter.tokens,
            "fingerprint": weights_fingerprint(trainer.module.student),
            "summary_steps": None if summary is None else summary["consumed"]["steps"],
            "micro_batch_size": trainer.micro_batch_size,
            "accumulation": trainer.batches.accumulation_steps,
        }

    for name, strategy in STEPS_RUNS.items():
        config = train_mod.TrainConfig(**_steps_config(data, work / name, strategy, teacher, MICRO_DDP))
        record(name, train_mod.pretrain(config))

    # With dropout: uninterrupted, and crashed after CRASH_STEP steps then resumed (issue 13 item 7).
    import hashlib
    import shutil

    import torch

    def dropout_config(out: Path):
        values = _run_config(data, out, micro_batch_size=MICRO_DDP, dropout=DROPOUT, checkpoint_every_steps=1)
        return train_mod.TrainConfig(**values)

    record("dropout", train_mod.pretrain(dropout_config(work / "dropout")))
    report["runs"]["dropout"]["rng"] = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    original_step = train_mod.Pretrainer.train_step

    class Crash(Exception):
        pass

    def crashing(self, step, lr):
        if step == CRASH_STEP:
            raise Crash
        return original_step(self, step, lr)

    train_mod.Pretrainer.train_step = crashing
    try:
        train_mod.pretrain(dropout_config(work / "dropout-resumed"))
        raise AssertionError("the crash did not happen")
    except Crash:
        pass
    finally:
        train_mod.Pretrainer.train_step = original_step
    if rank == 0:  # for the test's one-process resumption of a two-process checkpoint
        shutil.copytree(work / "dropout-resumed", work / "dropout-crashed")
    distributed.barrier()
    record("dropout-resumed", train_mod.pretrain(dropout_config(work / "dropout-resumed"), resume=True))

    # The time-budget run through the real CLI, rank 1 with a clock running CLOCK_SKEW× fast.
    if rank == 1:
        assert isinstance(train_mod.time, types.ModuleType), "train.py no longer uses time.perf_counter"

        class FastClock:
            def __getattr__(self, attr):
                return getattr(time, attr)

            @staticmethod
            def perf_counter():
                return CLOCK_SKEW * time.perf_counter()

        train_mod.time = FastClock()
    values = _run_config(data, work / "time", budget=TIME_BUDGET, micro_batch_size=MICRO_DDP)
    config_path = work / f"time-config-rank{rank}.yaml"
    config_path.write_text(yaml.safe_dump(values))
    code = cli_main(["pretrain", "--config", str(config_path)])  # ends with destroy_process_group
    assert code == 0, f"budgetkd pretrain exited with {code} on rank {rank}"
    record("time", None)

    report["writes"] = writes
    (work / f"report-rank{rank}.json").write_text(json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------
# Fixtures (the launch happens once per module)
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """A tiny real dataset (one short book), and a random teacher sharing its tokenizer."""
    if not BOOK.is_file():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    from budgetkd.data import PackedData, prepare_dataset
    from budgetkd.models import create_student, export_student, resolve_architecture

    root = tmp_path_factory.mktemp("distributed")
    data = root / "data"
    prepare_dataset(
        [str(BOOK)], data, train_tokenizer=VOCAB, seq_len=SEQ_LEN, validation_fraction=0.05, progress=False
    )
    packed = PackedData(data)
    teacher = create_student(
        resolve_architecture(TEACHER), packed.vocab_size, SEQ_LEN, packed.special_ids, seed=123
    )
    export_student(teacher, packed.load_tokenizer(), root / "teacher")
    return {"root": root, "data": data, "teacher": root / "teacher"}


def _torchrun(args: list[str], timeout: float = 240) -> str:
    """``torchrun --nproc_per_node 2 ARGS`` on CPU (gloo); fails the test unless it exits 0."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its two workers, nothing else
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s:\n{output[-4000:]}")
    assert process.returncode == 0, f"torchrun failed (exit {process.returncode}):\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def ddp(prepared) -> dict:
    """Launch this file's worker under torchrun with 2 CPU processes; return both reports."""
    work = prepared["root"] / "ddp"
    work.mkdir()
    output = _torchrun([__file__, "--worker", str(prepared["data"]), str(prepared["teacher"]), str(work)])
    reports = [json.loads((work / f"report-rank{r}.json").read_text()) for r in range(2)]
    return {"work": work, "reports": reports, "output": output}


@pytest.fixture(scope="module")
def single(prepared) -> dict:
    """The single-process references: micro-batch 8 = 2 ranks × 4, same global batch."""
    from budgetkd.train import TrainConfig, pretrain

    assert "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1
    out = {}
    for name, strategy in STEPS_RUNS.items():
        run = prepared["root"] / f"single-{name}"
        config = TrainConfig(
            **_steps_config(prepared["data"], run, strategy, prepared["teacher"], MICRO_SINGLE)
        )
        out[name] = {"dir": run, "summary": pretrain(config)}
    return out


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _initial_weights(prepared) -> dict:
    from budgetkd.data import PackedData
    from budgetkd.models import create_student, resolve_architecture

    packed = PackedData(prepared["data"])
    model = create_student(
        resolve_architecture(STUDENT), packed.vocab_size, SEQ_LEN, packed.special_ids, seed=0
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STEPS_RUNS))
def test_two_processes_match_one_process_with_twice_the_micro_batch(prepared, ddp, single, name):
    import torch

    for report in ddp["reports"]:
        run = report["runs"][name]
        assert run["steps"] == STEPS and run["micro_batch_size"] == MICRO_DDP and run["accumulation"] == 2
    ddp_summary = json.loads((ddp["work"] / name / "summary.json").read_text())
    ref_summary = single[name]["summary"]
    assert ddp_summary["world_size"] == 2 and ref_summary["world_size"] == 1
    assert ddp_summary["init_fingerprint"] == ref_summary["init_fingerprint"]
    for key in ("steps", "tokens", "sequences", "flops"):
        assert ddp_summary["consumed"][key] == ref_summary["consumed"][key], key

    initial = _initial_weights(prepared)
    got = _weights(ddp["work"] / name / "model")
    want = _weights(single[name]["dir"] / "model")
    assert set(got) == set(want)
    moved = max(float((want[k] - initial[k]).abs().max()) for k in want if k in initial)
    assert moved > 1e-3, "the reference did not train; the comparison would be vacuous"
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-4, atol=5e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
        if key in initial and torch.equal(want[key], initial[key]):
            # no gradient in one process (e.g. the MLM head under MiniLM): none under DDP either
            assert torch.equal(got[key], initial[key]), f"{key} changed under DDP but not in one process"
    assert ddp_summary["val_mlm_loss"] == pytest.approx(ref_summary["val_mlm_loss"], rel=1e-4, abs=1e-5)


def test_ranks_hold_identical_weights(ddp):
    rank0, rank1 = ddp["reports"]
    for name in (*STEPS_RUNS, "time"):
        assert rank0["runs"][name]["fingerprint"] == rank1["runs"][name]["fingerprint"], name


def test_time_budget_all_ranks_stop_on_the_same_step(ddp):
    rank0, rank1 = (r["runs"]["time"] for r in ddp["reports"])
    summary = json.loads((ddp["work"] / "time" / "summary.json").read_text())
    assert summary["budget"]["currency"] == "time" and summary["budget_exhausted"]
    steps = summary["consumed"]["steps"]
    # rank 1's own clock ran 3× fast: left alone it would have stopped after ~1/3 of the steps
    assert steps >= 4, "too few steps to tell whether rank 1 followed rank 0's clock"
    assert rank0["steps"] == rank1["steps"] == steps
    assert rank0["time_s"] == rank1["time_s"] == summary["consumed"]["time_s"]
    assert summary["consumed"]["time_s"] >= 2.0
    assert rank0["tokens"] == rank1["tokens"] == summary["consumed"]["tokens"]


def _scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_rank_draws_its_own_dropout_and_the_checkpoint_keeps_every_ranks_rng(ddp):
    import hashlib

    import torch

    from budgetkd.train import dropout_seed

    state = torch.load(ddp["work"] / "dropout" / "checkpoint.pt", weights_only=True)
    rng = state["rng"]
    assert rng["world_size"] == 2 and len(rng["cpu"]) == 2
    assert not torch.equal(rng["cpu"][0], rng["cpu"][1]), "both ranks drew the same dropout masks"
    for r, report in enumerate(ddp["reports"]):  # each rank's own final state, in rank order
        assert hashlib.sha256(rng["cpu"][r].numpy().tobytes()).hexdigest() == report["runs"]["dropout"]["rng"]
    assert len({dropout_seed(0, 0), dropout_seed(0, 1), dropout_seed(1, 0)}) == 3


def test_a_resumed_two_process_run_continues_every_ranks_dropout_stream(ddp):
    rank0, rank1 = ddp["reports"]
    for report in (rank0, rank1):
        assert report["runs"]["dropout-resumed"]["steps"] == STEPS
        # bit for bit the uninterrupted run: rank 1 continued rank 1's stream, not rank 0's
        assert report["runs"]["dropout-resumed"]["fingerprint"] == report["runs"]["dropout"]["fingerprint"]


def test_resuming_with_another_number_of_processes_re_derives_the_streams(ddp, capsys):
    from budgetkd.train import TrainConfig, pretrain

    run = ddp["work"] / "dropout-crashed"
    values = json.loads((run / "run_config.json").read_text())
    values = {k: v for k, v in values.items() if k not in ("resolved", "versions")}
    values["out"] = str(run)
    capsys.readouterr()
    summary = pretrain(TrainConfig.from_dict(values), resume=True)
    out = capsys.readouterr().out
    assert "checkpointed with 2 process(es) and resumes with 1" in out
    assert summary["consumed"]["steps"] == STEPS and summary["world_size"] == 1


def test_logged_loss_components_are_summed_over_ranks_like_the_total(ddp):
    """No-KD's one component is its loss: on every logged step the two must be equal (before,
    each rank's component was its own share, ≈ 1/2 of the total on rank 0)."""
    scalars = _scalars(ddp["work"] / "dropout")
    assert len(scalars["train/loss"]) == STEPS
    for (step, loss), (step_mlm, mlm) in zip(scalars["train/loss"], scalars["train/mlm"]):
        assert step == step_mlm and mlm == pytest.approx(loss, rel=1e-6)


def test_only_rank_zero_writes(ddp):
    rank0, rank1 = ddp["reports"]
    assert rank1["writes"] == [], f"rank 1 tried to write: {rank1['writes']}"
    assert any(w.startswith("export_student") for w in rank0["writes"])
    for name in (*STEPS_RUNS, "time"):
        run_dir = ddp["work"] / name
        names = {p.name for p in run_dir.iterdir()} - {".lock"}
        assert names == EXPECTED_RUN_FILES, f"{name}: {sorted(names)}"
        events = list((run_dir / "tb").iterdir())
        assert len(events) == 1, f"{name}: {events}"
    # the exported student loads in plain transformers
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(str(ddp["work"] / "time" / "model"))
    assert model.config.num_hidden_layers == STUDENT["layers"]


# ---------------------------------------------------------------------------------------------
# The background prefetcher (single process)
# ---------------------------------------------------------------------------------------------


def _step_batches(prepared, **overrides):
    from budgetkd.data import MaskingConfig, PackedData, StepBatches

    packed = PackedData(prepared["data"])
    masking = MaskingConfig(
        vocab_size=packed.vocab_size,
        mask_id=int(packed.special_ids["mask"]),
        special_ids=tuple(int(i) for i in packed.special_ids["all"]),
    )
    values = dict(batch_size=8, micro_batch_size=4, data_seed=0, mask_seed=0, masking=masking)
    values.update(overrides)
    return StepBatches(packed, **values)


def _same(a, b) -> bool:
    import torch

    return len(a) == len(b) and all(
        torch.equal(x.input_ids, y.input_ids)
        and torch.equal(x.attention_mask, y.attention_mask)
        and torch.equal(x.labels, y.labels)
        and x.num_tokens == y.num_tokens
        for x, y in zip(a, b)
    )


def test_prefetcher_returns_exactly_the_synchronous_batches(prepared):
    import torch

    from budgetkd.distributed import Prefetcher

    batches = _step_batches(prepared, rank=1, world_size=2)
    state = torch.get_rng_state()
    with Prefetcher(batches, start_step=5, pin=True) as prefetcher:  # pin is a no-op without CUDA
        for step in (5, 6, 7, 8):
            assert _same(prefetcher.get(step), batches.micro_batches(step))
        assert _same(prefetcher.get(2), batches.micro_batches(2))  # out of order: restarts there
        assert _same(prefetcher.get(3), batches.micro_batches(3))
    assert torch.equal(torch.get_rng_state(), state), "the prefetcher touched the global RNG"
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.get(4)


def test_prefetcher_reraises_errors_in_the_caller(prepared):
    from budgetkd.distributed import Prefetcher

    class Failing:
        def micro_batches(self, step):
            if step == 1:
                raise ValueError("broken step 1")
            return [step]

    prefetcher = Prefetcher(Failing(), start_step=0)
    assert prefetcher.get(0) == [0]
    with pytest.raises(ValueError, match="broken step 1"):
        prefetcher.get(1)
    prefetcher.close()


def test_compare_under_torchrun_matches_one_process(tmp_path):
    """``torchrun … -m budgetkd compare`` runs the pretraining stages on both ranks and the rest
    on rank 0, and reaches the single-process experiment: same budget, steps, tokens and FLOPs
    per strategy (FLOP-calibrated, deterministic), the same No-KD student within float
    tolerance, one table. (The KD students see a teacher pretrained with dropout, whose masks
    depend on the process count, so only their consumption is compared.)"""
    import torch
    import yaml

    from budgetkd.cli import main

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    config = {
        "name": "ddp",
        "data": {"inputs": [str(BOOK)], "tokenizer": {"train": VOCAB}, "seq_len": SEQ_LEN},
        "teacher": {"pretrain": {"student": TEACHER, "budget": "4steps", "batch_size": 16}},
        "student": STUDENT,
        "strategies": ["none", "minilm"],
        "budget": {"calibrate": {"strategy": "none", "epochs": 0.2, "currency": "flops"}},
        "optimizer": {"batch_size": 16},
        "training": {"num_evals": 1, "eval_sequences": 16, "dropout": 0.0},
        "glue": {
            "dir": str(SHARED_DATA / "glue"),
            "tasks": ["rte"],
            "grid": "lr=1e-4,bs=16",
            "epochs": 1,
            "max_train_examples": 16,
            "max_eval_examples": 16,
        },
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    _torchrun(["-m", "budgetkd", "compare", str(path), "--out", str(tmp_path / "ddp"), "--no-progress"])
    assert main(["compare", str(path), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    for label in ("none", "minilm"):
        got, want = (
            json.loads((tmp_path / out / "runs" / label / "summary.json").read_text())
            for out in ("ddp", "one")
        )
        assert (got["world_size"], want["world_size"]) == (2, 1)
        for key in ("steps", "sequences", "tokens", "flops", "flops_teacher"):
            assert got["consumed"][key] == want["consumed"][key], (label, key)
        assert got["init_fingerprint"] == want["init_fingerprint"]
    got, want = (_weights(tmp_path / out / "runs" / "none" / "model") for out in ("ddp", "one"))
    for key in want:
        torch.testing.assert_close(
            got[key], want[key], rtol=1e-4, atol=5e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
    assert json.loads((tmp_path / "ddp" / "fairness.json").read_text())["ok"] is True
    table = (tmp_path / "ddp" / "table.md").read_text()
    assert "| No-KD |" in table and "| MiniLM |" in table


def test_helpers_are_no_ops_without_torchrun(monkeypatch):
    import torch

    from budgetkd import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched_by_torchrun()
    distributed.init_if_launched()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(module, torch.device("cpu")) is module
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert distributed.all_reduce_sum(x, torch.device("cpu")) is x
    assert distributed.broadcast_floats([1.5], torch.device("cpu")) == [1.5]
    gathered = distributed.gather_tensors(x, torch.device("cpu"))
    assert len(gathered) == 1 and torch.equal(gathered[0], x)
    with distributed.no_sync(module):
        pass
    distributed.barrier()


if __name__ == "__main__" and "--worker" in sys.argv:
    index = sys.argv.index("--worker")
    _worker(*(Path(p) for p in sys.argv[index + 1 : index + 4]))
