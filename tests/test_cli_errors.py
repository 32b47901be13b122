"""User errors on the command line: each exits with status 2 and exactly one stderr line
``budgetkd: error: …`` naming the culprit, never a traceback, and writes no half-made output.
Rows cover every command (prepare, pretrain, glue, compare, report); where the output directory
already holds results (a finished run, a finished experiment, GLUE results of another model, a
foreign folder), its files' bytes and modification times are compared before and after.

Every case runs in-process through ``budgetkd.cli.main`` (captured at the file-descriptor level,
so library loggers and C code are caught too); one row per command also runs as a real
``python -m budgetkd`` subprocess to check the entry point's exit status.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BERT_VOCAB, SHARED_DATA, corpus_file, subprocess_env

from budgetkd.cli import main

GLUE_DIR = SHARED_DATA / "glue"
RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


class ExtraStderrLines(AssertionError):
    """The right one-line error came last, but other lines (progress bars, logs) came before it."""


class ResultsModified(AssertionError):
    """A refused command changed files in a directory that holds earlier results."""


def tiny_experiment() -> dict:
    """A complete ``compare`` in a few seconds: No-KD only, 2 steps, RTE on 8 examples."""
    return {
        "name": "tiny",
        "data": {
            "inputs": [corpus_file("gutenberg/blake-poems.txt")],
            "tokenizer": {"train": 300},
            "seq_len": 32,
            "validation_fraction": 0.1,
        },
        "student": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
        "strategies": ["none"],
        "budget": {"explicit": "2steps"},
        "optimizer": {"batch_size": 4},
        "training": {"num_evals": 1, "eval_sequences": 8, "device": "cpu"},
        "glue": {
            "dir": str(GLUE_DIR),
            "tasks": ["rte"],
            "grid": "lr=1e-4,bs=8",
            "epochs": 1,
            "max_train_examples": 8,
            "max_eval_examples": 8,
            "save_predictions": False,
            "device": "cpu",
        },
    }


def _changed(config: dict, dotted: str, value) -> dict:
    config = json.loads(json.dumps(config))
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return config


def _rte_dir(root: Path, name: str, train_lines: list[str]) -> Path:
    """A classic glue_data folder holding only RTE: the given train.tsv lines, a valid dev.tsv."""
    folder = root / name / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("".join(train_lines))
    shutil.copy(GLUE_DIR / "RTE" / "dev.tsv", folder / "dev.tsv")
    return root / name


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir, tiny_data_dir, other_vocab_data_dir, teacher_run, make_config) -> dict:
    root = tmp_path_factory.mktemp("cli-inputs")
    (root / "empty.txt").write_bytes(b"")
    # a PNG header and chunk: NUL bytes, not text
    (root / "image.txt").write_bytes(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256))
    )
    (root / "latin1.txt").write_bytes(
        "Caf\u00e9 au lait, d\u00e9j\u00e0 vu.\nNa\u00efve.\n".encode("latin-1")
    )
    (root / "text.txt").write_text("A line of ordinary text.\nAnother one.\n" * 50, encoding="utf-8")
    teacher = root / "teacher-without-weights"
    teacher.mkdir()
    (teacher / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 2000})
    )
    (root / "bad.yaml").write_text("budget: [1steps\nstudent: {\n")
    (root / "typo.yaml").write_text("batchsize: 8\n")
    truncated = root / "truncated-data"
    shutil.copytree(tiny_data_dir, truncated)
    with open(truncated / "train.bin", "r+b") as handle:
        handle.truncate(1000)
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a dataset")
    (root / "bad.jsonl").write_text('{"text": "a fine line"}\nnot json\n')
    (root / "notext.jsonl").write_text('{"body": "no text field"}\n')
    (root / "a-file").write_text("I am a file, not a directory\n")
    corrupt = root / "corrupt-run"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    made = {
        "root": root,
        "data": data_dir,
        "truncated": truncated,
        "foreign": foreign,
        "teacher": teacher,
        "corrupt": corrupt,
        "finished": teacher_run,
        "model": teacher_run / "model",
        "other_vocab_data": other_vocab_data_dir,
    }
    made.update(_pretrain_inputs(root, tiny_data_dir, teacher_run, make_config))
    if GLUE_DIR.is_dir():
        made.update(_glue_inputs(root, teacher_run / "model"))
        made.update(_compare_inputs(root, made))
    made.update(_report_inputs(root))
    return made


def _pretrain_inputs(root: Path, tiny_data_dir: Path, teacher_run: Path, make_config) -> dict:
    from budgetkd.data import prepare_dataset
    from budgetkd.data.tokenizer import load_tokenizer
    from budgetkd.train import pretrain

    # the data's tokenizer folder replaced by another one (30522 entries, the data has 2000)
    mismatched = root / "mismatched-tokenizer-data"
    shutil.copytree(tiny_data_dir, mismatched)
    shutil.rmtree(mismatched / "tokenizer")
    load_tokenizer(BERT_VOCAB).save_pretrained(str(mismatched / "tokenizer"))
    # sequences of 1024 tokens for a teacher with 512 positions
    long_data = root / "seq-len-1024"
    prepare_dataset(
        [corpus_file("gutenberg/blake-poems.txt")],
        long_data,
        tokenizer=str(teacher_run / "model"),
        seq_len=1024,
        validation_fraction=0.05,
        progress=False,
    )
    # an unfinished run (a checkpoint, no summary) of another configuration than _pretrain's
    unfinished = root / "unfinished-run"
    pretrain(make_config(unfinished, budget="2steps", checkpoint_every_steps=1))
    (unfinished / "summary.json").unlink()
    return {"mismatched_tokenizer": mismatched, "long_data": long_data, "unfinished": unfinished}


def _glue_inputs(root: Path, model: Path) -> dict:
    from transformers import AutoConfig, BertForMaskedLM

    from budgetkd.glue.finetune import quiet_transformers
    from budgetkd.glue.pipeline import run_glue

    lines = (GLUE_DIR / "RTE" / "train.tsv").read_text().splitlines(keepends=True)[1:20]
    missing_column = _rte_dir(
        root,
        "glue-missing-column",
        ["index\tsentence1\tlabel\n"] + ["\t".join(line.split("\t")[::2]) for line in lines],
    )
    bad = lines[:2] + ["\t".join(lines[2].split("\t")[:3] + ["maybe\n"])] + lines[3:]
    bad_label = _rte_dir(root, "glue-bad-label", [RTE_HEADER, *bad])
    (root / "empty-glue").mkdir()
    # GLUE results of the teacher model, and another model (other weights, same tokenizer)
    finished_glue = root / "finished-glue"
    small = {"grid": "lr=1e-4,bs=8", "epochs": 1, "max_train_examples": 8, "max_eval_examples": 8}
    run_glue(model, finished_glue, glue_dir=GLUE_DIR, tasks="rte", device="cpu", progress=False, **small)
    other_model = root / "other-model"
    shutil.copytree(model, other_model)
    for weights in other_model.glob("*.safetensors"):
        weights.unlink()
    with quiet_transformers():
        BertForMaskedLM(AutoConfig.from_pretrained(model)).save_pretrained(other_model)
    return {
        "glue_missing_column": missing_column,
        "glue_bad_label": bad_label,
        "finished_glue": finished_glue,
        "other_model": other_model,
    }


def _compare_inputs(root: Path, made: dict) -> dict:
    from budgetkd.experiment import compare

    base = tiny_experiment()
    configs = {
        "valid": base,
        "unknown-key": {**base, "optimiser": {"batch_size": 4}},
        "wrong-type": _changed(base, "optimizer.batch_size", "four"),
        "zero-budget": _changed(base, "budget.explicit", "0steps"),
        "negative-budget": _changed(base, "budget.explicit", "-2steps"),
        "unit-less-budget": _changed(base, "budget.explicit", 100),
        "missing-corpus": _changed(base, "data.inputs", [str(root / "no-corpus.txt")]),
        "teacher-without-weights": {
            **base,
            "strategies": ["none", "vanilla"],
            "teacher": {"path": str(made["teacher"])},
        },
        "micro-batch": _changed(base, "optimizer.micro_batch_size", 8),
        "missing-glue-dir": _changed(base, "glue.dir", str(root / "no-glue")),
        "glue-without-task": _changed(base, "glue.dir", str(root / "empty-glue")),
        # only the seed differs: the finished data stage's fingerprint does not match
        "other-seed": {**base, "seed": 1},
        # valid up to the GLUE stage, whose training file has a bad label
        "bad-glue-file": _changed(base, "glue.dir", str(made["glue_bad_label"])),
    }
    paths = {}
    for name, config in configs.items():
        paths[name] = root / "experiments" / f"{name}.yaml"
        paths[name].parent.mkdir(exist_ok=True)
        paths[name].write_text(yaml.safe_dump(config))
    finished = root / "finished-compare"
    compare(paths["valid"], finished, progress=False)
    assert (finished / "table.md").exists()
    foreign = root / "foreign-for-compare"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes, not an experiment")
    return {"experiments": paths, "finished_compare": finished, "foreign_for_compare": foreign}


def _report_inputs(root: Path) -> dict:
    """Compare directories with one broken file each (the rest well formed)."""
    summary = {
        "strategy": "none",
        "display_name": "No-KD",
        "consumed": {
            "time_s": 1.0,
            "time_teacher_s": 0.0,
            "flops": 1e9,
            "flops_student": 1e9,
            "flops_teacher": 0.0,
            "flops_teacher_share": 0.0,
            "time_teacher_share": 0.0,
            "tokens": 1000,
            "epochs": 0.1,
            "steps": 2,
            "tokens_per_s": 1000.0,
        },
        "evaluations": [],
    }
    broken = {
        "report-bad-summary": {"runs/none/summary.json": '{"strategy": "none", "consumed": {'},
        "report-summary-without-consumed": {
            "runs/none/summary.json": '{"strategy": "none", "finished": true}'
        },
        "report-bad-experiment": {"experiment.json": '{"strategies": "none"}'},
        "report-bad-glue": {"glue/none/glue.json": '{"tasks": {"rte": {"best": 3, "runs": "x"}}}'},
    }
    made = {}
    for name, files in broken.items():
        folder = root / name
        contents = {
            "experiment.json": json.dumps({"strategies": [{"label": "none", "name": "none"}]}),
            "runs/none/summary.json": json.dumps(summary),
            **files,
        }
        for relative, text in contents.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_text(text)
        made[name] = folder
    return made


def _pretrain(inputs, out, *extra):
    return [
        "pretrain",
        "--data",
        str(inputs["data"]),
        "--out",
        str(out),
        "--budget",
        "1steps",
        "--no-progress",
        *extra,
    ]


def _prepare(inputs, out, *files, tokenizer=("--train-tokenizer", "200")):
    return ["prepare", "--input", *map(str, files), "--out", str(out), *tokenizer, "--no-progress"]


def _glue(inputs, out, *extra, model=None, glue_dir=GLUE_DIR):
    argv = ["glue", str(model or inputs["model"]), "--out", str(out)]
    if glue_dir is not None:
        argv += ["--glue-dir", str(glue_dir)]
    argv += ["--tasks", "rte", "--grid", "lr=1e-4,bs=8", "--epochs", "1", "--max-train-examples", "8"]
    return [*argv, "--max-eval-examples", "8", "--device", "cpu", "--no-progress", *extra]


def _compare(inputs, out, name, *extra):
    return ["compare", str(inputs["experiments"][name]), "--out", str(out), "--no-progress", *extra]


# id → (argv builder(inputs, out), a fragment the message must contain)
CASES = {
    "missing-input": (lambda i, o: _prepare(i, o, i["root"] / "nope.txt"), "nope.txt"),
    "empty-corpus": (lambda i, o: _prepare(i, o, i["root"] / "empty.txt"), "empty"),
    "empty-corpus-given-tokenizer": (
        lambda i, o: _prepare(i, o, i["root"] / "empty.txt", tokenizer=("--tokenizer", str(BERT_VOCAB))),
        "empty",
    ),
    "binary-file": (lambda i, o: _prepare(i, o, i["root"] / "image.txt"), "image.txt"),
    "non-utf8": (lambda i, o: _prepare(i, o, i["root"] / "latin1.txt"), "UTF-8"),
    "non-utf8-among-good-files": (
        lambda i, o: _prepare(i, o, i["root"] / "text.txt", i["root"] / "latin1.txt"),
        "latin1.txt",
    ),
    "tiny-vocabulary": (
        lambda i, o: _prepare(i, o, i["root"] / "text.txt", tokenizer=("--train-tokenizer", "10")),
        "100",
    ),
    "foreign-out-dir": (lambda i, o: _prepare(i, i["foreign"], i["root"] / "text.txt"), "foreign"),
    "unknown-preset": (lambda i, o: _pretrain(i, o, "--student", "bert-huge"), "bert-huge"),
    "malformed-budget": (
        lambda i, o: [*_pretrain(i, o)[:-3], "--budget", "5parsecs", "--no-progress"],
        "5parsecs",
    ),
    "budget-without-unit": (lambda i, o: [*_pretrain(i, o)[:-3], "--budget", "10", "--no-progress"], "'10'"),
    "unknown-strategy": (lambda i, o: _pretrain(i, o, "--strategy", "distill"), "distill"),
    "teacher-without-weights": (
        lambda i, o: _pretrain(i, o, "--strategy", "vanilla", "--teacher", str(i["teacher"])),
        "weights",
    ),
    "micro-batch-larger-than-batch": (
        lambda i, o: _pretrain(i, o, "--batch-size", "4", "--micro-batch-size", "8"),
        "micro-batch",
    ),
    "missing-data-dir": (
        lambda i, o: ["pretrain", "--data", str(i["root"] / "no-data"), "--out", str(o), "--no-progress"],
        "no-data",
    ),
    "truncated-data": (
        lambda i, o: ["pretrain", "--data", str(i["truncated"]), "--out", str(o), "--no-progress"],
        "train.bin",
    ),
    "malformed-yaml-config": (
        lambda i, o: ["pretrain", "--config", str(i["root"] / "bad.yaml"), "--out", str(o)],
        "bad.yaml",
    ),
    "unknown-config-key": (
        lambda i, o: [
            "pretrain",
            "--config",
            str(i["root"] / "typo.yaml"),
            "--data",
            str(i["data"]),
            "--out",
            str(o),
        ],
        "batchsize",
    ),
    "set-without-value": (lambda i, o: _pretrain(i, o, "--set", "temperature"), "KEY=VALUE"),
    "unknown-strategy-option": (
        lambda i, o: _pretrain(i, o, "--strategy", "none", "--set", "temperature=2"),
        "temperature",
    ),
    "malformed-jsonl": (lambda i, o: _prepare(i, o, i["root"] / "bad.jsonl"), "line 2"),
    "jsonl-without-text": (lambda i, o: _prepare(i, o, i["root"] / "notext.jsonl"), "'text'"),
    "corrupt-checkpoint": (
        lambda i, o: [*_pretrain(i, i["corrupt"]), "--resume"],
        "checkpoint",
    ),
    "finished-run-dir": (lambda i, o: _pretrain(i, i["finished"]), "finished"),
    "negative-warmup": (lambda i, o: _pretrain(i, o, "--warmup", "-0.1"), "warmup"),
}

# Cases that once crashed with a traceback (now fixed in src/, kept as regressions).
CASES.update(
    {
        "dropout-out-of-range": (lambda i, o: _pretrain(i, o, "--dropout", "1.5"), "dropout"),
        "negative-seed": (lambda i, o: _pretrain(i, o, "--seed", "-1"), "seed"),
        "negative-data-seed": (lambda i, o: _pretrain(i, o, "--data-seed", "-3"), "seed"),
        "negative-prepare-seed": (
            lambda i, o: [*_prepare(i, o, i["root"] / "text.txt"), "--seed", "-1"],
            "seed",
        ),
        "unknown-device": (lambda i, o: _pretrain(i, o, "--device", "gpu0"), "gpu0"),
        "prepare-out-is-a-file": (
            lambda i, o: _prepare(i, i["root"] / "a-file", i["root"] / "text.txt"),
            "a-file",
        ),
        "pretrain-out-is-a-file": (lambda i, o: _pretrain(i, i["root"] / "a-file"), "a-file"),
        "pretrain-out-is-a-foreign-dir": (lambda i, o: _pretrain(i, i["foreign"]), "foreign"),
    }
)


# Rows added for issue 7: the other commands, and inputs that do not fit together.
CASES.update(
    {
        # pretrain: data, tokenizer and teacher that do not fit together; runs that exist
        "teacher-vocabulary-mismatch": (
            lambda i, o: [
                *_pretrain(i, o, "--strategy", "vanilla", "--teacher", str(i["model"])),
                "--data",
                str(i["other_vocab_data"]),
            ],
            "vocabulary mismatch",
        ),
        "tokenizer-does-not-match-data": (
            lambda i, o: [
                "pretrain",
                "--data",
                str(i["mismatched_tokenizer"]),
                "--out",
                str(o),
                "--no-progress",
            ],
            "re-run budgetkd prepare",
        ),
        "seq-len-beyond-teacher-positions": (
            lambda i, o: [
                "pretrain",
                "--data",
                str(i["long_data"]),
                "--out",
                str(o),
                "--strategy",
                "vanilla",
                "--teacher",
                str(i["model"]),
                "--budget",
                "1steps",
                "--no-progress",
            ],
            "seq_len 1024 exceeds the teacher's 512 positions",
        ),
        "unfinished-run-without-resume": (lambda i, o: _pretrain(i, i["unfinished"]), "--resume"),
        "resume-with-another-configuration": (
            lambda i, o: _pretrain(i, i["unfinished"], "--resume"),
            "different configuration",
        ),
        # glue
        "glue-missing-model-dir": (lambda i, o: _glue(i, o, model=i["root"] / "no-model"), "no-model"),
        "glue-model-without-weights": (lambda i, o: _glue(i, o, model=i["teacher"]), "no weights"),
        "glue-unknown-task": (lambda i, o: _glue(i, o, "--tasks", "rte,wnli"), "'wnli'"),
        "glue-malformed-grid": (lambda i, o: _glue(i, o, "--grid", "lr=5e-5"), "malformed --grid"),
        "glue-file-missing-a-column": (
            lambda i, o: _glue(i, o, glue_dir=i["glue_missing_column"]),
            "missing column 'sentence2'",
        ),
        "glue-file-with-a-bad-label": (
            lambda i, o: _glue(i, o, glue_dir=i["glue_bad_label"]),
            "line 4: unknown rte label 'maybe'",
        ),
        "glue-missing-glue-dir": (lambda i, o: _glue(i, o, glue_dir=i["root"] / "no-glue"), "no-glue"),
        "glue-dir-without-the-task": (lambda i, o: _glue(i, o, glue_dir=i["root"] / "empty-glue"), "RTE"),
        "glue-no-data-source": (lambda i, o: _glue(i, o, glue_dir=None), "--glue-dir"),
        "glue-out-is-a-file": (lambda i, o: _glue(i, i["root"] / "a-file"), "a-file"),
        "glue-out-holds-another-models-results": (
            lambda i, o: _glue(i, i["finished_glue"], model=i["other_model"]),
            "another model",
        ),
        # compare
        "compare-malformed-yaml": (
            lambda i, o: ["compare", str(i["root"] / "bad.yaml"), "--out", str(o)],
            "bad.yaml line",
        ),
        "compare-missing-config": (
            lambda i, o: ["compare", str(i["root"] / "nope.yaml"), "--out", str(o)],
            "nope.yaml",
        ),
        "compare-unknown-key": (lambda i, o: _compare(i, o, "unknown-key"), "optimiser: unknown config key"),
        "compare-wrong-type": (
            lambda i, o: _compare(i, o, "wrong-type"),
            "optimizer.batch_size: must be an integer",
        ),
        "compare-zero-budget": (lambda i, o: _compare(i, o, "zero-budget"), "'budget.explicit'"),
        "compare-negative-budget": (lambda i, o: _compare(i, o, "negative-budget"), "'-2steps'"),
        "compare-unit-less-budget": (lambda i, o: _compare(i, o, "unit-less-budget"), "100 has no unit"),
        "compare-missing-corpus-file": (lambda i, o: _compare(i, o, "missing-corpus"), "no-corpus.txt"),
        "compare-teacher-without-weights": (
            lambda i, o: _compare(i, o, "teacher-without-weights"),
            "teacher-without-weights holds no weights",
        ),
        "compare-micro-batch-larger-than-batch": (
            lambda i, o: _compare(i, o, "micro-batch"),
            "optimizer.micro_batch_size: must lie in 1..batch_size",
        ),
        "compare-missing-glue-dir": (lambda i, o: _compare(i, o, "missing-glue-dir"), "no-glue"),
        "compare-glue-dir-without-the-task": (lambda i, o: _compare(i, o, "glue-without-task"), "RTE"),
        "compare-unknown-force-stage": (
            lambda i, o: _compare(i, o, "valid", "--force", "pretrain:bogus"),
            "pretrain:bogus",
        ),
        "compare-out-is-a-file": (lambda i, o: _compare(i, i["root"] / "a-file", "valid"), "a-file"),
        "compare-out-holds-a-different-finished-experiment": (
            lambda i, o: _compare(i, i["finished_compare"], "other-seed"),
            "finished stage 'data' changed",
        ),
        "compare-out-is-a-foreign-dir": (
            lambda i, o: _compare(i, i["foreign_for_compare"], "bad-glue-file"),
            "foreign-for-compare",
        ),
        # report
        "report-missing-dir": (lambda i, o: ["report", str(i["root"] / "no-report")], "no-report"),
        "report-not-a-compare-dir": (lambda i, o: ["report", str(i["data"])], "holds no compare results"),
        "report-malformed-summary": (
            lambda i, o: ["report", str(i["report-bad-summary"])],
            "summary.json is not valid JSON",
        ),
        "report-summary-without-consumption": (
            lambda i, o: ["report", str(i["report-summary-without-consumed"])],
            "summary.json is malformed: no 'consumed'",
        ),
        "report-malformed-experiment-record": (
            lambda i, o: ["report", str(i["report-bad-experiment"])],
            "experiment.json is malformed",
        ),
        "report-malformed-glue-results": (
            lambda i, o: ["report", str(i["report-bad-glue"])],
            "glue.json is malformed",
        ),
    }
)

# Rows whose target directory already holds something: it must come out byte- and mtime-identical
# (the lock file excepted: it records the last holder's pid).
UNTOUCHED = {
    "foreign-out-dir": "foreign",
    "pretrain-out-is-a-foreign-dir": "foreign",
    "corrupt-checkpoint": "corrupt",
    "finished-run-dir": "finished",
    "unfinished-run-without-resume": "unfinished",
    "resume-with-another-configuration": "unfinished",
    "glue-out-holds-another-models-results": "finished_glue",
    "compare-out-holds-a-different-finished-experiment": "finished_compare",
    "compare-out-is-a-foreign-dir": "foreign_for_compare",
    "report-not-a-compare-dir": "data",
    "report-malformed-summary": "report-bad-summary",
    "report-summary-without-consumption": "report-summary-without-consumed",
    "report-malformed-experiment-record": "report-bad-experiment",
    "report-malformed-glue-results": "report-bad-glue",
}


def snapshot(directory: Path) -> dict:
    return {
        p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def assert_one_line_error(rc: int, out: str, err: str, fragment: str) -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("budgetkd: error: "), err
    assert fragment in lines[-1], err
    if len(lines) != 1:
        raise ExtraStderrLines(f"{len(lines)} lines on stderr, expected one:\n{err}")


def assert_no_output_written(out_dir: Path) -> None:
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]
    assert not leftovers, f"temporary output left behind: {leftovers}"
    for name in ("meta.json", "train.bin", "model", "checkpoint.pt", "summary.json", "run_config.json"):
        assert not (out_dir / name).exists(), f"{name} written despite the error"


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_in_process(case, inputs, tmp_path, capfd):
    if case.startswith(("glue-", "compare-")) and "finished_glue" not in inputs:
        pytest.skip(f"local GLUE data not found at {GLUE_DIR}")
    build, fragment = CASES[case]
    out_dir = tmp_path / "out"
    guarded = inputs[UNTOUCHED[case]] if case in UNTOUCHED else None
    before = snapshot(guarded) if guarded is not None else None
    capfd.readouterr()
    rc = main(build(inputs, out_dir))
    out, err = capfd.readouterr()
    assert_one_line_error(rc, out, err, fragment)
    assert_no_output_written(out_dir)
    if guarded is not None:
        after = snapshot(guarded)
        if after != before:
            changed = sorted(str(k) for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise ResultsModified(f"{guarded}: {', '.join(changed)} modified, added or removed")
    if case == "foreign-out-dir":
        assert sorted(p.name for p in inputs["foreign"].iterdir()) == ["mine.txt"]


# One row per command through the real entry point (``python -m budgetkd``), run concurrently.
SUBPROCESS_CASES = [
    "missing-input",
    "unknown-preset",
    "glue-missing-model-dir",
    "compare-unknown-key",
    "report-missing-dir",
]


def test_cli_errors_through_the_entry_point(inputs, tmp_path):
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-m", "budgetkd", *CASES[case][0](inputs, tmp_path / case)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for case in SUBPROCESS_CASES
    }
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert_one_line_error(proc.returncode, out, err, CASES[case][1])
