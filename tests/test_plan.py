"""The plan of ``compare --dry-run`` and the checks that refuse a doomed run before compute.

Every refusal is driven through the real CLI (``budgetkd.cli.main``) with the stages' entry
points replaced by a tripwire: the test asserts the one-line message, exit 2, that the tripwire
never fired (no data preparation, no weight load, no training) and that ``--out`` holds no run.
A valid configuration through the same harness does reach the tripwire, so the harness can fail.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import SEQ_LEN, corpus_file

from budgetkd.errors import BudgetKDError

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
TRIPWIRE = "TRIPWIRE: compute started"


def _experiment(teacher_dir: Path, **changes) -> dict:
    config = {
        "name": "plan",
        "data": {
            "inputs": [corpus_file("gutenberg/blake-poems.txt")],
            "tokenizer": "teacher",
            "seq_len": SEQ_LEN,
            "validation_fraction": 0.1,
        },
        "teacher": {"path": str(teacher_dir)},
        "student": {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
        "strategies": ["none", "vanilla", "tinybert", "minilm"],
        "budget": {"explicit": "2steps"},
        "optimizer": {"batch_size": 8},
        "training": {"num_evals": 1, "eval_sequences": 8, "device": "cpu"},
        "glue": {
            "dir": str(GLUE_DIR),
            "tasks": ["rte"],
            "grid": "lr=1e-4:2e-4,bs=8",
            "epochs": 1,
            "max_train_examples": 8,
            "max_eval_examples": 8,
            "device": "cpu",
        },
    }
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return config


@pytest.fixture
def tripwire(monkeypatch):
    """Replace every entry point of compute (data preparation, weight loads, training)."""
    import budgetkd.data
    import budgetkd.models
    import budgetkd.train

    def boom(*args, **kwargs):
        raise BudgetKDError(TRIPWIRE)

    monkeypatch.setattr(budgetkd.data, "prepare_dataset", boom, raising=False)
    monkeypatch.setattr(budgetkd.train, "pretrain", boom)
    monkeypatch.setattr(budgetkd.models, "load_teacher", boom)
    monkeypatch.setattr(budgetkd.train, "load_teacher", boom)


def _refused(tmp_path, capsys, config: dict, fragment: str, *extra, out: Path | None = None) -> str:
    from budgetkd.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = out or tmp_path / "out"
    capsys.readouterr()
    started = time.perf_counter()
    code = main(["compare", str(path), "--out", str(out), "--no-progress", *extra])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert TRIPWIRE not in err, "the check came only after compute started"
    assert fragment in err, err
    assert elapsed < 30, f"refused after {elapsed:.0f} s"
    if out.is_dir():
        held = {p.name for p in out.iterdir()} - {".lock", "plan.json"}
        assert not held & {"state.json", "runs", "data", "experiment.json", "glue"}, held
    return err


@pytest.fixture(scope="module")
def encoder_only_teacher(teacher_dir, tmp_path_factory) -> Path:
    """The session teacher without its MLM head (a BertModel checkpoint) and its tokenizer."""
    from transformers import BertForMaskedLM

    out = tmp_path_factory.mktemp("encoder-only") / "teacher"
    model = BertForMaskedLM.from_pretrained(str(teacher_dir))
    model.bert.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (teacher_dir / name).exists():
            shutil.copy(teacher_dir / name, out / name)
    return out


def test_the_harness_reaches_compute_with_a_valid_config(tmp_path, capsys, teacher_dir, tripwire):
    from budgetkd.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(_experiment(teacher_dir)))
    code = main(["compare", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2 and TRIPWIRE in capsys.readouterr().err


def test_refuses_logits_strategy_with_encoder_only_teacher_and_no_head_fitting(
    tmp_path, capsys, encoder_only_teacher, tripwire, monkeypatch
):
    """``teacher.fit_mlm_head: false`` (issue 14's key, read with .get) and an encoder-only
    teacher: Vanilla-KD cannot have teacher logits."""
    import budgetkd.experiment as experiment

    original = experiment.load_experiment

    def with_no_head_fitting(path, overrides=None):
        cfg = original(path, overrides)
        cfg["teacher"]["fit_mlm_head"] = False
        return cfg

    monkeypatch.setattr(experiment, "load_experiment", with_no_head_fitting)
    config = _experiment(encoder_only_teacher, strategies=["none", "vanilla"])
    _refused(tmp_path, capsys, config, "strategy 'vanilla' needs teacher logits")


def test_encoder_only_teacher_is_fine_for_strategies_without_logits(
    tmp_path, capsys, encoder_only_teacher, tripwire
):
    from budgetkd.cli import main

    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(_experiment(encoder_only_teacher, strategies=["none", "minilm"])))
    assert main(["compare", str(path), "--out", str(tmp_path / "out")]) == 2
    assert TRIPWIRE in capsys.readouterr().err


def test_refuses_unequal_head_counts(tmp_path, capsys, teacher_dir, tripwire):
    config = _experiment(teacher_dir, student={"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64})
    _refused(tmp_path, capsys, config, "needs equal head counts: student has 2, teacher 4")


def test_refuses_a_vocabulary_of_another_size(tmp_path, capsys, teacher_dir, tripwire):
    from conftest import BERT_VOCAB

    config = _experiment(teacher_dir, data__tokenizer=str(BERT_VOCAB))
    _refused(tmp_path, capsys, config, "has 2000 tokens, the data's tokenizer")


def test_refuses_another_vocabulary_of_the_same_size(
    tmp_path, capsys, teacher_dir, other_vocab_data_dir, tripwire
):
    config = _experiment(teacher_dir, data__tokenizer=str(other_vocab_data_dir / "tokenizer"))
    _refused(tmp_path, capsys, config, "uses a different tokenizer than the data")


def test_refuses_seq_len_beyond_the_teachers_positions(tmp_path, capsys, teacher_dir, tripwire):
    config = _experiment(teacher_dir, data__seq_len=1024)
    _refused(tmp_path, capsys, config, "1024 exceeds the teacher's 512 positions")


def test_refuses_a_layer_map_out_of_range(tmp_path, capsys, teacher_dir, tripwire):
    config = _experiment(
        teacher_dir, strategies=["none", {"name": "tinybert", "options": {"layer_map": [[0, 5]]}}]
    )
    _refused(tmp_path, capsys, config, "teacher layer 5, but the teacher has 2 layers")


def test_refuses_unknown_strategy_options(tmp_path, capsys, teacher_dir, tripwire):
    config = _experiment(teacher_dir, strategies=["none", {"name": "minilm", "options": {"temprature": 2}}])
    _refused(tmp_path, capsys, config, "'temprature'")


def test_refuses_a_batch_the_world_size_does_not_divide(tmp_path, capsys, teacher_dir, tripwire, monkeypatch):
    import budgetkd.experiment as experiment

    monkeypatch.setattr(experiment.dist_utils, "world_size", lambda: 3)  # as under torchrun -n 3
    _refused(tmp_path, capsys, _experiment(teacher_dir), "batch size 8 is not divisible by the 3 processes")
    _refused(tmp_path, capsys, _experiment(teacher_dir), "not divisible", "--dry-run", "--world-size", "3")


def test_refuses_a_micro_batch_larger_than_the_batch(tmp_path, capsys, teacher_dir, tripwire):
    config = _experiment(teacher_dir, optimizer={"batch_size": 8, "micro_batch_size": 16})
    _refused(tmp_path, capsys, config, "optimizer.micro_batch_size: must lie in 1..batch_size")


def test_refuses_a_glue_dir_without_a_requested_task(tmp_path, capsys, teacher_dir, tripwire):
    glue = tmp_path / "glue"
    shutil.copytree(GLUE_DIR / "RTE", glue / "RTE")
    config = _experiment(teacher_dir, glue__dir=str(glue), glue__tasks=["rte", "cola"])
    _refused(tmp_path, capsys, config, "no CoLA folder")


def test_refuses_a_glue_dir_without_a_requested_split(tmp_path, capsys, teacher_dir, tripwire):
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    shutil.copy(GLUE_DIR / "RTE" / "train.tsv", glue / "RTE" / "train.tsv")
    config = _experiment(teacher_dir, glue__dir=str(glue))
    _refused(tmp_path, capsys, config, "rte dev file not found")


def test_refuses_an_output_directory_that_cannot_be_written(tmp_path, capsys, teacher_dir, tripwire):
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "out"
    _refused(tmp_path, capsys, _experiment(teacher_dir), "cannot be created", out=out)


def test_refuses_a_prepared_dataset_of_another_seq_len(
    tmp_path, capsys, teacher_dir, tiny_data_dir, tripwire
):
    config = _experiment(teacher_dir, data={"prepared": str(tiny_data_dir), "seq_len": 128})
    _refused(tmp_path, capsys, config, f"has sequences of {SEQ_LEN} tokens")


def test_pretrain_refuses_unequal_heads_before_loading_the_teacher(
    tmp_path, capsys, data_dir, teacher_dir, tripwire
):
    from budgetkd.cli import main

    out = tmp_path / "run"
    argv = ["pretrain", "--data", str(data_dir), "--out", str(out), "--strategy", "tinybert"]
    argv += ["--teacher", str(teacher_dir), "--student", '{"layers": 1, "hidden": 32, "heads": 2}']
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "equal head counts" in err and TRIPWIRE not in err and len(err.splitlines()) == 1
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def test_plan_counts_steps_flops_and_glue_jobs(tmp_path, capsys, teacher_dir, tiny_data_dir):
    """Against hand-computed values: the calibration epoch in steps, No-KD FLOPs per sequence
    3·(L·(8LD²… per layer) + MLM head at 15 % of L−2 positions), GLUE jobs and their steps."""
    from budgetkd.cli import main

    meta = json.loads((tiny_data_dir / "meta.json").read_text())
    config = _experiment(
        teacher_dir,
        data={"prepared": str(tiny_data_dir), "seq_len": SEQ_LEN},
        budget={"calibrate": {"strategy": "none", "epochs": 1, "currency": "flops"}},
    )
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--dry-run", "--world-size", "2"]) == 0
    text = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert set(p.name for p in out.iterdir()) == {"plan.json"}, "a dry run writes only its plan"
    assert plan["world_size"] == 2 and plan["per_process_batch"] == 4 and plan["micro_batch"] == 4
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == [
        "data", "teacher", "calibrate", "pretrain:vanilla", "pretrain:tinybert", "pretrain:minilm",
        "glue:none", "glue:vanilla", "glue:tinybert", "glue:minilm", "report",
    ]  # fmt: skip
    n = meta["num_train_sequences"]
    assert n == 190 and stages["calibrate"]["steps"] == 23  # ⌊190/8⌋ full batches, not ⌈⌉ = 24
    L, D, F, V, layers = SEQ_LEN, 32, 64, meta["vocab_size"], 1  # F: feed-forward width
    P = 0.15 * (L - 2)
    per_sequence = 3 * (
        layers * (8 * L * D * D + 4 * L * D * F + 4 * L * L * D) + 2 * P * D * D + 2 * P * D * V
    )
    assert stages["calibrate"]["flops_per_sequence"] == pytest.approx(per_sequence)
    # the plan counts the prepared rows' real tokens and maskable positions (the formula's L − 2 is
    # the upper bound of a full row without a document boundary)
    assert stages["calibrate"]["flops"] == pytest.approx(23 * 8 * per_sequence, rel=2e-2)
    # FLOP currency: every KD strategy gets the calibration's FLOPs (up to one step)
    for label in ("vanilla", "tinybert", "minilm"):
        got = stages[f"pretrain:{label}"]
        assert got["teacher_share"] > 0
        assert (
            stages["calibrate"]["flops"]
            <= got["flops"]
            < stages["calibrate"]["flops"] + 8 * got["flops_per_sequence"]
        )
    # GLUE: 1 task × 2 learning rates × 1 seed, 8 examples at batch 8 for 1 epoch = 1 step each
    assert stages["glue:none"]["jobs"] == 2 and stages["glue:none"]["steps"] == 2
    glue_flops = 2 * (3 * 8 + 8) * layers * (8 * 128 * D * D + 4 * 128 * D * F + 4 * 128 * 128 * D)
    assert stages["glue:none"]["flops"] == pytest.approx(glue_flops)
    assert "calibrate" in text and "device-h" in text


def test_dry_run_offline_notes_the_hub_and_prints_the_paper_plan(tmp_path, capsys, monkeypatch):
    """configs/paper-6l.yaml with the hub unreachable: the plan, FLOPs, one note per hub item."""
    import budgetkd.plan as plan_mod
    from budgetkd.cli import main

    monkeypatch.setattr(plan_mod, "hub_reachable", lambda timeout_s=3.0: False)
    config = Path(__file__).resolve().parents[1] / "configs" / "paper-6l.yaml"
    code = main(["compare", str(config), "--out", str(tmp_path / "p"), "--dry-run", "--world-size", "8",
                 "--assume-tokens-per-s", "3e5"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert "micro-batch 128 × 1" in captured.out  # 1024 / 8 processes, device maximum 256
    notes = [line for line in captured.out.splitlines() if line.startswith("note:")]
    assert any("bert-base-uncased" in n and "unreachable" in n for n in notes)
    assert any("hf:wikimedia/wikipedia" in n and "unreachable" in n for n in notes)
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["total"]["flops"] > 1e18 and plan["total"]["device_hours"] > 0
    # the calibration epoch at 3e5 tokens/s: 4.6 B tokens ≈ 4.3 h
    calibrate = next(s for s in plan["stages"] if s["stage"] == "calibrate")
    assert calibrate["wall_hours"] == pytest.approx(calibrate["tokens"] / 3e5 / 3600)


def test_probe_measures_every_strategy(tmp_path, capsys, teacher_dir, tiny_data_dir):
    from budgetkd.cli import main

    config = _experiment(
        teacher_dir, data={"prepared": str(tiny_data_dir), "seq_len": SEQ_LEN}, strategies=["none", "minilm"]
    )
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["compare", str(path), "--out", str(tmp_path / "out"), "--dry-run", "--probe"]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert set(plan["throughput"]["tokens_per_s"]) == {"none", "minilm"}
    assert all(v > 0 for v in plan["throughput"]["tokens_per_s"].values())
    assert plan["total"]["device_hours"] is not None


# ---------------------------------------------------------------------------------------------
# The data stage under torchrun: waiting without a collective
# ---------------------------------------------------------------------------------------------


def test_waiting_rank_returns_when_the_stage_is_recorded(tmp_path):
    from budgetkd.experiment import wait_for_stage

    def finish():
        time.sleep(0.2)
        (tmp_path / "state.json").write_text(
            json.dumps({"stages": {"data": {"fingerprint": "abc", "finished_at": time.time()}}})
        )

    thread = threading.Thread(target=finish)
    thread.start()
    wait_for_stage(tmp_path, "data", "abc", tmp_path / "failed.json", poll_s=0.05)
    thread.join()


def test_waiting_rank_raises_rank_zeros_error_and_ignores_stale_records(tmp_path, monkeypatch):
    from budgetkd.experiment import launch_id, wait_for_stage

    monkeypatch.setenv("MASTER_PORT", "12345")
    (tmp_path / "state.json").write_text(
        json.dumps({"stages": {"data": {"fingerprint": "abc", "finished_at": 1.0}}})  # a forced, old one
    )
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({"launch": "an earlier launch", "error": "old failure"}))

    def fail():
        time.sleep(0.2)
        failed.write_text(json.dumps({"launch": launch_id(), "error": "cannot load hub dataset hf:x"}))

    thread = threading.Thread(target=fail)
    thread.start()
    with pytest.raises(BudgetKDError, match="rank 0 failed in stage data: cannot load hub dataset hf:x"):
        wait_for_stage(tmp_path, "data", "abc", failed, newer_than=time.time() - 1, poll_s=0.05)
    thread.join()
