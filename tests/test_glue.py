"""GLUE loading on the real files, one-line errors, and fine-tuning end to end with a tiny BERT."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import pytest

from budgetkd.errors import BudgetKDError
from budgetkd.glue import cli as glue_cli
from budgetkd.glue import finetune
from budgetkd.glue.loading import load_hub, load_local, load_task, read_tsv
from budgetkd.glue.metrics import compute_metrics
from budgetkd.glue.pipeline import run_glue
from budgetkd.glue.tasks import TASKS
from budgetkd.io import DirectoryLock

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB_DIR = SHARED_DATA / "vocab" / "bert-base-uncased"

# (train rows, dev rows) of /work/shared/data/glue, as in its README
ROW_COUNTS = {
    "cola": (8551, 1043),
    "sst2": (67349, 872),
    "mrpc": (3668, 408),
    "stsb": (5749, 1500),
    "rte": (2490, 277),
    "qnli": (8999, 1000),
    "qqp": (8999, 1000),
    "mnli": (8999, 1000),
}


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = SHARED_DATA / "glue"
    if not path.is_dir():
        pytest.skip(f"local GLUE data not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 1-layer, 32-hidden BERT with the real uncased vocabulary (random weights)."""
    if not (VOCAB_DIR / "vocab.txt").is_file():
        pytest.skip(f"BERT vocabulary not found at {VOCAB_DIR}")
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    # from_pretrained on the folder: in transformers 5, BertTokenizerFast(vocab_file=...) ignores the
    # file and builds a 5-token vocabulary.
    tokenizer = BertTokenizerFast.from_pretrained(str(VOCAB_DIR), do_lower_case=True)
    assert len(tokenizer) == 30522
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with finetune.quiet_transformers():
        BertForMaskedLM(config).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# loading the real files


@pytest.mark.parametrize("name", list(ROW_COUNTS))
def test_local_loader_reads_every_row_with_valid_labels(glue_dir, name):
    task = TASKS[name]
    data = load_local(task, glue_dir)
    primary = task.dev_splits[0].name
    assert (len(data.train), len(data.dev[primary])) == ROW_COUNTS[name]
    for split in (data.train, data.dev[primary]):
        assert len(split.texts) == len(task.text_columns)
        assert all(len(column) == len(split) for column in split.texts)
        assert all(isinstance(text, str) for text in split.texts[0][:100])
        assert sum(bool(text.strip()) for text in split.texts[0]) > 0.99 * len(split)
        if task.is_regression:
            assert all(0.0 <= score <= 5.0 for score in split.labels)
            assert len(set(split.labels)) > 50
        else:
            # every class appears, none dominates completely, all ids in range
            counts = [split.labels.count(i) for i in range(task.num_labels)]
            assert sum(counts) == len(split)
            assert min(counts) > 0.1 * len(split) / task.num_labels, counts


def test_label_ids_follow_the_nyu_mll_glue_convention(glue_dir):
    rte = load_local(TASKS["rte"], glue_dir)
    # RTE/train.tsv line 2: "No Weapons of Mass Destruction Found in Iraq Yet." -> not_entailment
    assert rte.train.texts[0][0].startswith("No Weapons of Mass Destruction")
    assert rte.train.labels[0] == TASKS["rte"].labels.index("not_entailment") == 1
    mnli = load_local(TASKS["mnli"], glue_dir)
    assert mnli.train.labels[0] == 0  # first MNLI train row: entailment
    cola = load_local(TASKS["cola"], glue_dir)
    assert cola.train.texts[0][0].startswith("Our friends won't buy this analysis")
    assert cola.train.labels[0] == 1  # acceptable


def test_mrpc_byte_order_mark_and_stray_quotes_survive(glue_dir):
    data = load_local(TASKS["mrpc"], glue_dir)
    # the header starts with a BOM; it must not break the "Quality" column, nor show in the text
    assert not data.dev.get("dev").texts[0][0].startswith("\ufeff")
    # the first dev pair's second sentence opens a quote it never closes: kept verbatim
    assert data.dev["dev"].texts[1][0].startswith('"The foodservice pie business')
    assert data.dev["dev"].labels[0] == 1


def test_mnli_missing_mismatched_dev_is_reported_not_raised(glue_dir):
    data = load_local(TASKS["mnli"], glue_dir)
    assert list(data.dev) == ["dev_matched"]
    assert [s.name for s in data.missing] == ["dev_mismatched"]
    assert data.missing_metrics == ["accuracy_mismatched"]


def test_data_fingerprint_depends_on_the_files(glue_dir, tmp_path):
    copy = tmp_path / "glue" / "RTE"
    shutil.copytree(glue_dir / "RTE", copy)
    original = load_local(TASKS["rte"], glue_dir).fingerprint
    assert load_local(TASKS["rte"], tmp_path / "glue").fingerprint == original
    os.chmod(copy / "dev.tsv", 0o644)
    with open(copy / "dev.tsv", "a", encoding="utf-8") as handle:
        handle.write("277\ta\tb\tentailment\n")
    assert load_local(TASKS["rte"], tmp_path / "glue").fingerprint != original


# ----------------------------------------------------------------------------------------------
# malformed and missing files


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_column_names_file_and_header(tmp_path):
    path = _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\n0\ta\tb\n")
    with pytest.raises(BudgetKDError) as info:
        read_tsv(TASKS["rte"], path, "train")
    message = str(info.value)
    assert str(path) in message and "line 1" in message and "missing column 'label'" in message
    assert "\n" not in message


def test_row_with_too_few_columns_names_its_line(tmp_path):
    path = _write(
        tmp_path / "RTE" / "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tonly one sentence\n",
    )
    with pytest.raises(
        BudgetKDError, match=r"train\.tsv line 3: expected at least 4 tab-separated columns, found 2"
    ):
        read_tsv(TASKS["rte"], path, "train")


def test_unknown_label_names_file_line_and_value(tmp_path):
    path = _write(
        tmp_path / "RTE" / "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tneutral\n",
    )
    with pytest.raises(BudgetKDError, match=r"dev\.tsv line 3: unknown rte label 'neutral'"):
        read_tsv(TASKS["rte"], path, "dev")


def test_headerless_cola_with_bad_label(tmp_path):
    path = _write(tmp_path / "CoLA" / "train.tsv", "gj04\t1\t\tFine.\ngj04\t2\t\tNot fine.\n")
    with pytest.raises(BudgetKDError, match=r"train\.tsv line 2: unknown cola label '2'"):
        read_tsv(TASKS["cola"], path, "train")


def test_stsb_score_must_be_a_number(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = _write(tmp_path / "STS-B" / "dev.tsv", header + "0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n")
    with pytest.raises(BudgetKDError, match=r"dev\.tsv line 2: stsb score 'five' is not a number"):
        read_tsv(TASKS["stsb"], path, "dev")


def test_stray_quotes_do_not_swallow_lines(tmp_path):
    path = _write(
        tmp_path / "SST-2" / "dev.tsv",
        'sentence\tlabel\n"an unclosed quote\t1\nsecond " line\t0\n',
    )
    split = read_tsv(TASKS["sst2"], path, "dev")
    assert split.texts[0] == ['"an unclosed quote', 'second " line']
    assert split.labels == [1, 0]


def test_missing_glue_dir_task_folder_and_files(tmp_path):
    with pytest.raises(BudgetKDError, match="GLUE directory not found: .*nowhere"):
        load_local(TASKS["rte"], tmp_path / "nowhere")
    with pytest.raises(BudgetKDError, match="no RTE folder in GLUE directory"):
        load_local(TASKS["rte"], tmp_path)
    _write(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(BudgetKDError, match=r"rte training file not found: .*RTE/train\.tsv"):
        load_local(TASKS["rte"], tmp_path)
    shutil.move(tmp_path / "RTE" / "dev.tsv", tmp_path / "RTE" / "train.tsv")
    with pytest.raises(BudgetKDError, match=r"rte dev file not found: .*RTE/dev\.tsv"):
        load_local(TASKS["rte"], tmp_path)
    with pytest.raises(BudgetKDError, match="--glue-dir PATH"):
        load_task(TASKS["rte"])


# ----------------------------------------------------------------------------------------------
# nyu-mll/glue through datasets.load_dataset (the hub itself is unreachable here)


def test_hub_unreachable_is_one_line_suggesting_glue_dir(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(BudgetKDError) as info:
        load_hub(TASKS["rte"])
    message = str(info.value)
    assert "Hugging Face hub" in message and "--glue-dir" in message and "Couldn't reach" in message
    assert "\n" not in message


def test_hub_loader_maps_splits_columns_and_reports_missing(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        split = datasets.Dataset.from_dict(
            {
                "premise": ["p1", "p2", "p3"],
                "hypothesis": ["h1", "h2", "h3"],
                "label": [0, 1, 2],
                "idx": [0, 1, 2],
            }
        )
        return datasets.DatasetDict({"train": split, "validation_matched": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_hub(TASKS["mnli"])
    assert calls == [("nyu-mll/glue", "mnli")]
    assert data.train.texts == (["p1", "p2", "p3"], ["h1", "h2", "h3"])
    assert data.train.labels == [0, 1, 2]
    assert list(data.dev) == ["dev_matched"]
    assert data.missing_metrics == ["accuracy_mismatched"]


# ----------------------------------------------------------------------------------------------
# bad input to run_glue


def test_run_glue_rejects_bad_input_with_the_culprit(tiny_model, glue_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BudgetKDError, match="model directory not found: .*no-model"):
        run_glue(tmp_path / "no-model", out, glue_dir=glue_dir, tasks="rte")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    shutil.copy(tiny_model / "config.json", empty / "config.json")
    with pytest.raises(BudgetKDError, match="has no weights"):
        run_glue(empty, out, glue_dir=glue_dir, tasks="rte")
    with pytest.raises(BudgetKDError, match="unknown GLUE task 'wnli'"):
        run_glue(tiny_model, out, glue_dir=glue_dir, tasks="rte,wnli")
    with pytest.raises(BudgetKDError, match="malformed --grid"):
        run_glue(tiny_model, out, glue_dir=glue_dir, tasks="rte", grid="lr=5e-5")
    with pytest.raises(BudgetKDError, match="GLUE directory not found"):
        run_glue(tiny_model, out, glue_dir=tmp_path / "no-glue", tasks="rte")
    with pytest.raises(BudgetKDError, match="--glue-dir PATH .* or --hub"):
        run_glue(tiny_model, out, tasks="rte")
    with pytest.raises(BudgetKDError, match="not both"):
        run_glue(tiny_model, out, glue_dir=glue_dir, hub=True, tasks="rte")
    with pytest.raises(BudgetKDError, match="--max-train-examples must be a positive integer"):
        run_glue(tiny_model, out, glue_dir=glue_dir, tasks="rte", max_train_examples=0)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BudgetKDError, match="exists and is not a directory"):
        run_glue(tiny_model, tmp_path / "a-file", glue_dir=glue_dir, tasks="rte")
    assert not (out / "glue.json").exists()


def test_output_directory_is_locked_while_running(tiny_model, glue_dir, tmp_path):
    with (
        DirectoryLock(tmp_path / "out"),
        pytest.raises(BudgetKDError, match="in use by another budgetkd process"),
    ):
        run_glue(tiny_model, tmp_path / "out", glue_dir=glue_dir, tasks="rte", grid="lr=5e-5,bs=32")


# ----------------------------------------------------------------------------------------------
# fine-tuning end to end (tiny model, 64 training examples, 1 epoch)

SMALL = {"grid": "lr=1e-4,bs=32", "epochs": 1, "max_train_examples": 64}


@pytest.fixture(scope="module")
def rte_run(tiny_model, glue_dir, tmp_path_factory) -> Path:
    """``budgetkd glue`` through the argparse part: RTE, one configuration, full dev set."""
    out = tmp_path_factory.mktemp("glue-rte")
    parser = argparse.ArgumentParser()
    glue_cli.add_arguments(parser)
    args = parser.parse_args(
        [str(tiny_model), "--out", str(out), "--glue-dir", str(glue_dir), "--tasks", "rte"]
        + ["--grid", SMALL["grid"], "--epochs", "1", "--max-train-examples", "64", "--save-predictions"]
        + ["--device", "cpu", "--no-progress"]
    )
    assert glue_cli.run(args) == 0
    return out


def test_finetuned_rte_has_valid_score_and_recomputable_predictions(rte_run, tiny_model):
    glue = json.loads((rte_run / "glue.json").read_text())
    assert glue["model"] == str(tiny_model.resolve())
    rte = glue["tasks"]["rte"]
    assert rte["main_metric"] == "accuracy"
    assert 0.0 <= rte["metrics"]["accuracy"] <= 1.0
    assert rte["score"] == rte["metrics"]["accuracy"]
    assert rte["best"] == {"lr": 1e-4, "batch_size": 32}
    assert rte["missing"] == [] and "std" not in rte
    assert rte["train_examples"] == 64 and rte["dev_examples"] == {"dev": 277}
    assert [(r["lr"], r["batch_size"], r["seed"]) for r in rte["runs"]] == [(1e-4, 32, 1)]
    assert rte["runs"][0]["train_steps"] == 2
    assert glue["average"] == rte["score"] and glue["average_tasks"] == ["rte"]
    assert glue["recipe"]["precision"] == "fp32" and glue["recipe"]["warmup_proportion"] == 0.06

    lines = (rte_run / "predictions" / "rte-dev.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["index"] for r in rows] == list(range(277))
    assert {r["prediction"] for r in rows} <= {0, 1}
    recomputed = compute_metrics(TASKS["rte"], [r["label"] for r in rows], [r["prediction"] for r in rows])
    assert recomputed == rte["metrics"]

    run_file = rte_run / "runs" / "rte" / "lr0.0001-bs32-seed1.json"
    record = json.loads(run_file.read_text())
    assert record["metrics"] == rte["metrics"] and len(record["fingerprint"]) == 64
    assert "| RTE | accuracy (main) |" in (rte_run / "glue.md").read_text()


def test_rerun_skips_finished_configurations(rte_run, tiny_model, glue_dir, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(rte_run, out)
    run_file = out / "runs" / "rte" / "lr0.0001-bs32-seed1.json"
    mtime = run_file.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished configuration was trained again")

    monkeypatch.setattr(finetune, "fine_tune", must_not_train)
    glue = run_glue(
        tiny_model, out, glue_dir=glue_dir, tasks="rte", save_predictions=True, progress=False, **SMALL
    )
    assert run_file.stat().st_mtime_ns == mtime
    before = json.loads((rte_run / "glue.json").read_text())
    assert glue["tasks"]["rte"]["metrics"] == before["tasks"]["rte"]["metrics"]
    assert (out / "predictions" / "rte-dev.jsonl").read_text() == (
        rte_run / "predictions" / "rte-dev.jsonl"
    ).read_text()


def test_changed_fingerprint_or_corrupt_run_file_is_recomputed(
    rte_run, tiny_model, glue_dir, tmp_path, monkeypatch
):
    out = tmp_path / "copy"
    shutil.copytree(rte_run, out)
    trained = []

    def record_call(*args, **kwargs):
        trained.append(kwargs["recipe"].epochs)
        raise KeyboardInterrupt  # stop right there: the call is what we wanted to see

    monkeypatch.setattr(finetune, "fine_tune", record_call)
    with pytest.raises(KeyboardInterrupt):  # a different recipe (2 epochs) does not reuse the 1-epoch run
        run_glue(tiny_model, out, glue_dir=glue_dir, tasks="rte", progress=False, **{**SMALL, "epochs": 2})
    assert trained == [2]
    run_file = out / "runs" / "rte" / "lr0.0001-bs32-seed1.json"
    run_file.write_text('{"fingerprint": "trunc')  # e.g. edited by hand
    with pytest.raises(KeyboardInterrupt):
        run_glue(tiny_model, out, glue_dir=glue_dir, tasks="rte", progress=False, **SMALL)
    assert trained == [2, 1]


def test_regression_multiple_seeds_and_missing_mnli_mismatched(tiny_model, glue_dir, tmp_path):
    glue = run_glue(
        tiny_model,
        tmp_path / "out",
        glue_dir=glue_dir,
        tasks="stsb,mnli",
        grid="lr=1e-4,bs=16",
        epochs=1,
        seeds="1,2",
        max_train_examples=32,
        max_eval_examples=40,
        save_predictions=True,
        device="cpu",
        progress=False,
    )
    stsb, mnli = glue["tasks"]["stsb"], glue["tasks"]["mnli"]
    assert stsb["score"] == pytest.approx((stsb["metrics"]["pearson"] + stsb["metrics"]["spearman"]) / 2)
    assert set(stsb["std"]) == {"pearson", "spearman", "score"}
    assert [r["seed"] for r in stsb["runs"]] == [1, 2]
    assert mnli["metrics"]["accuracy_mismatched"] is None
    assert mnli["missing"] == ["accuracy_mismatched"]
    assert mnli["score"] == mnli["metrics"]["accuracy_matched"]
    assert glue["average"] == pytest.approx((stsb["score"] + mnli["score"]) / 2)

    rows = [
        json.loads(x) for x in (tmp_path / "out" / "predictions" / "stsb-dev.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 40 and all(isinstance(r["prediction"], float) for r in rows)
    first_seed = next(r for r in stsb["runs"] if r["seed"] == 1)
    recomputed = compute_metrics(TASKS["stsb"], [r["label"] for r in rows], [r["prediction"] for r in rows])
    assert recomputed == pytest.approx(first_seed["metrics"])
    assert (tmp_path / "out" / "predictions" / "mnli-dev_matched.jsonl").exists()
    assert not (tmp_path / "out" / "predictions" / "mnli-dev_mismatched.jsonl").exists()
    markdown = (tmp_path / "out" / "glue.md").read_text()
    assert "MNLI-mm" in markdown and "missing" in markdown and "±" in markdown


def test_same_seed_gives_the_same_result(tiny_model, glue_dir, tmp_path):
    kwargs = {"glue_dir": glue_dir, "tasks": "rte", "max_eval_examples": 50, "progress": False, **SMALL}
    first = run_glue(tiny_model, tmp_path / "a", **kwargs)
    second = run_glue(tiny_model, tmp_path / "b", **kwargs)
    assert first["tasks"]["rte"]["runs"][0]["final_loss"] == second["tasks"]["rte"]["runs"][0]["final_loss"]
    a = (tmp_path / "a" / "runs" / "rte" / "lr0.0001-bs32-seed1.predictions.json").read_text()
    b = (tmp_path / "b" / "runs" / "rte" / "lr0.0001-bs32-seed1.predictions.json").read_text()
    assert a == b


def test_parameter_groups_exempt_biases_and_layer_norms(tiny_model):
    model = finetune.load_classifier(tiny_model, TASKS["rte"])
    decay, plain = finetune.parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "bert.embeddings.LayerNorm.weight" in plain_names
    assert "classifier.bias" in plain_names
    assert "classifier.weight" in decay_names
    assert "bert.embeddings.word_embeddings.weight" in decay_names
    assert all(n.endswith("bias") or "LayerNorm" in n for n in plain_names)
    assert len(plain_names) + len(decay_names) == len(names)


def test_cli_main_turns_errors_into_exit_code_2(tmp_path, capsys):
    assert (
        glue_cli.main([str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--glue-dir", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("budgetkd: error: model directory not found") and err.count("\n") == 1


def test_max_train_examples_is_a_fixed_shuffled_subset(glue_dir):
    from budgetkd.glue.pipeline import _subset_train

    data = load_local(TASKS["sst2"], glue_dir)
    first = _subset_train(data, 100)
    again = _subset_train(data, 100)
    assert len(first) == 100 and first.texts == again.texts and first.labels == again.labels
    assert first.texts[0] != data.train.texts[0][:100]  # shuffled, not the head of the file
    assert set(first.texts[0]) <= set(data.train.texts[0])
    assert _subset_train(data, 10**9) is data.train


def test_thread_count_is_what_was_asked_and_never_follows_the_load():
    import torch

    before = torch.get_num_threads()
    try:
        assert finetune.configure_threads(None) == before  # the default is left alone
        assert finetune.configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert finetune.configure_threads(10_000) == finetune.available_cpus()
    finally:
        torch.set_num_threads(before)
