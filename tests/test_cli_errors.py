"""User errors on the command line: each exits with status 2 and exactly one stderr line
``budgetkd: error: …`` naming the culprit, never a traceback, and writes no half-made output.

Every case runs in-process through ``budgetkd.cli.main`` (captured at the file-descriptor level,
so library loggers and C code are caught too); a few also run as a real ``python -m budgetkd``
subprocess to check the entry point's exit status.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import BERT_VOCAB

from budgetkd.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir, tiny_data_dir, teacher_run) -> dict:
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
    return {
        "root": root,
        "data": data_dir,
        "truncated": truncated,
        "foreign": foreign,
        "teacher": teacher,
        "corrupt": corrupt,
        "finished": teacher_run,
    }


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


def assert_one_line_error(rc: int, out: str, err: str, fragment: str) -> None:
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("budgetkd: error: "), err
    assert fragment in lines[0], err


def assert_no_output_written(out_dir: Path) -> None:
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]
    assert not leftovers, f"temporary output left behind: {leftovers}"
    for name in ("meta.json", "train.bin", "model", "checkpoint.pt", "summary.json", "run_config.json"):
        assert not (out_dir / name).exists(), f"{name} written despite the error"


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_in_process(case, inputs, tmp_path, capfd):
    build, fragment = CASES[case]
    out_dir = tmp_path / "out"
    capfd.readouterr()
    rc = main(build(inputs, out_dir))
    out, err = capfd.readouterr()
    assert_one_line_error(rc, out, err, fragment)
    assert_no_output_written(out_dir)
    if case == "foreign-out-dir":
        assert sorted(p.name for p in inputs["foreign"].iterdir()) == ["mine.txt"]
