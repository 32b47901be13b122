"""The paper's launch at CPU scale: micro-batches resolved from the world size, a data stage
whose output does not depend on the number of cores, and ``configs/paper-6l.yaml`` (only its
sizes overridden) under ``torchrun --nproc_per_node 4`` reaching the one-process table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import SEQ_LEN, corpus_file

from budgetkd.errors import BudgetKDError

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"


# ---------------------------------------------------------------------------------------------
# micro-batch resolution
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "world", "maximum", "expected"),
    [
        (1024, 1, 256, 256),  # 4 accumulation steps
        (1024, 2, 256, 256),
        (1024, 4, 256, 256),
        (1024, 8, 256, 128),  # the README's launch: no longer refused
        (1024, 16, 256, 64),
        (1024, 8, None, 64),  # default maximum 64
        (96, 1, 64, 48),  # largest divisor of 96 that is ≤ 64
        (12, 3, 3, 2),  # per process 4, at most 3 → 2
    ],
)
def test_micro_batch_is_the_largest_divisor_of_the_per_process_batch(batch, world, maximum, expected):
    from budgetkd.data.dataset import resolve_micro_batch

    assert resolve_micro_batch(batch, world, maximum) == expected


def test_micro_batch_refuses_a_batch_the_world_size_does_not_divide():
    from budgetkd.data.dataset import resolve_micro_batch

    with pytest.raises(BudgetKDError, match="batch size 1024 is not divisible by the 3 processes"):
        resolve_micro_batch(1024, 3, 256)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resolved_micro_batches_make_the_same_global_batch(data_dir, world):
    """Whatever the world size, the ranks' resolved micro-batches, concatenated, are the
    one-process global batch (sequences, masks, labels): gradient accumulation adds up to it."""
    import torch

    from budgetkd.data import MaskingConfig, PackedData, StepBatches
    from budgetkd.data.dataset import resolve_micro_batch

    data = PackedData(data_dir)
    masking = MaskingConfig(
        vocab_size=data.vocab_size,
        mask_id=int(data.special_ids["mask"]),
        special_ids=tuple(int(i) for i in data.special_ids["all"]),
    )
    values = dict(batch_size=32, data_seed=3, mask_seed=4, masking=masking)
    reference = StepBatches(data, micro_batch_size=resolve_micro_batch(32, 1, 12), **values)
    micro = resolve_micro_batch(32, world, 12)
    assert micro == {1: 8, 2: 8, 4: 8}[world]
    for step in (0, 5):
        parts = [
            StepBatches(data, micro_batch_size=micro, rank=r, world_size=world, **values).micro_batches(step)
            for r in range(world)
        ]
        got = [m for rank_parts in parts for m in rank_parts]
        want = reference.micro_batches(step)
        assert len(got) == 32 // micro and len(want) == 32 // 8
        for name in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(
                torch.cat([getattr(m, name) for m in got]), torch.cat([getattr(m, name) for m in want])
            )


def test_pretrain_records_the_resolved_micro_batch(make_config, tmp_path):
    from budgetkd.train import pretrain

    summary = pretrain(make_config(tmp_path / "run", budget="1steps", batch_size=8, micro_batch_size=6))
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["micro_batch_size"] == 6  # what the user said: the device maximum
    assert recorded["resolved"]["micro_batch_size"] == 4 == summary["micro_batch_size"]


# ---------------------------------------------------------------------------------------------
# prepare with all cores
# ---------------------------------------------------------------------------------------------


def test_prepare_output_does_not_depend_on_the_number_of_workers(
    main_inputs, data_dir, tmp_path, monkeypatch
):
    """1 worker (in process) and 2 workers (a process pool over small chunks, so that both
    really work): byte-identical arrays and the same metadata, fingerprint included."""
    import budgetkd.data.prepare as prepare_mod

    monkeypatch.setattr(prepare_mod, "_CHUNK_LINES", 300)  # many chunks: the pool is used
    metas = {}
    for workers in (1, 2):
        metas[workers] = prepare_mod.prepare_dataset(
            main_inputs,
            tmp_path / f"w{workers}",
            tokenizer=str(data_dir / "tokenizer"),
            seq_len=SEQ_LEN,
            validation_fraction=0.05,
            progress=False,
            workers=workers,
        )
    for split in ("train.bin", "valid.bin"):
        assert (tmp_path / "w1" / split).read_bytes() == (tmp_path / "w2" / split).read_bytes(), split
    for meta in metas.values():
        meta.pop("prepare_seconds")
    assert metas[1] == metas[2]
    # and the same tokens as the session's dataset, prepared with the default settings
    reference = json.loads((data_dir / "meta.json").read_text())
    assert metas[2]["num_document_tokens"] == reference["num_document_tokens"]


def test_encode_chunk_equals_the_tokenizers_own_batch_encode(data_dir):
    import numpy as np

    from budgetkd.data import encode
    from budgetkd.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_dir / "tokenizer")
    documents = [["The king of Scotland.", "A second line"], ["Another document, one line."], ["x"]]
    encode.init_worker(encode.backend_json(tokenizer), threads=False)
    flat, lengths = encode.encode_chunk(documents)
    want = [
        [t for line in doc for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
        for doc in documents
    ]
    assert lengths.tolist() == [len(w) for w in want]
    assert flat.tolist() == [t for w in want for t in w] and flat.dtype == np.int32


def test_prepare_streams_hub_datasets(monkeypatch, tmp_path, data_dir):
    """``datasets.load_dataset(..., streaming=True)``: rows are consumed as an iterator."""
    import datasets

    from budgetkd.data.corpus import read_hub_documents

    calls = {}

    class Rows:
        def __iter__(self):
            for i in range(2500):
                yield {"text": f"sentence number {i}"}

    def fake(name, config=None, split=None, streaming=False):
        calls.update(name=name, streaming=streaming)
        return Rows()

    monkeypatch.setattr(datasets, "load_dataset", fake)
    docs = list(read_hub_documents("hf:bookcorpus/bookcorpus:plain_text:train"))
    assert calls == {"name": "bookcorpus/bookcorpus", "streaming": True}
    assert [len(d) for d in docs] == [1000, 1000, 500]


# ---------------------------------------------------------------------------------------------
# configs/paper-6l.yaml on 4 gloo ranks
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> str:
    """``torchrun --nproc_per_node NPROC ARGS`` on CPU (gloo); fails the test unless it exits 0."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and its workers, nothing else
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s:\n{output[-4000:]}")
    assert process.returncode == 0, f"torchrun failed (exit {process.returncode}):\n{output[-6000:]}"
    return output


def paper_config_at_cpu_scale(teacher_dir: Path) -> dict:
    """configs/paper-6l.yaml with only sizes overridden: a local teacher, a tiny student with
    the teacher's head count, one local book, a short calibration, two GLUE tasks on a two-point
    grid. Two overrides are not sizes, and are what makes two launches comparable at all: the
    calibration is in FLOPs (a time budget gives another step count on every run), and dropout
    is 0 (dropout masks are drawn per process)."""
    config = yaml.safe_load((ROOT / "configs" / "paper-6l.yaml").read_text())
    config["data"].update(
        inputs=[corpus_file("gutenberg/blake-poems.txt")], seq_len=SEQ_LEN, validation_fraction=0.05
    )
    config["teacher"] = {"path": str(teacher_dir)}
    config["student"] = {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64}
    config["budget"]["calibrate"].update(epochs=0.2, currency="flops")
    config["optimizer"].update(batch_size=16, micro_batch_size=8)
    config["training"].update(
        num_evals=1, eval_sequences=16, dropout=0.0, checkpoint_interval_s=0, device="cpu"
    )
    config["glue"].update(
        dir=str(GLUE_DIR),
        tasks=["rte", "mrpc"],
        grid="lr=1e-4:3e-4,bs=8",
        epochs=1,
        max_train_examples=16,
        max_eval_examples=16,
        save_predictions=False,
        device="cpu",
    )
    return config


def test_paper_config_on_four_ranks_gives_the_one_process_table(tmp_path, teacher_dir):
    from budgetkd.cli import main

    if not GLUE_DIR.is_dir():
        pytest.skip("../shared/data is not available")
    config = paper_config_at_cpu_scale(teacher_dir)
    assert config["strategies"] == ["none", "vanilla", "minilm", "tinybert"]  # the paper's, unchanged
    path = tmp_path / "paper-6l-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    output = torchrun(
        4, ["-m", "budgetkd", "compare", str(path), "--out", str(tmp_path / "four"), "--no-progress"]
    )
    assert main(["compare", str(path), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    for label in config["strategies"]:
        four, one = (
            json.loads((tmp_path / out / "runs" / label / "run_config.json").read_text())["resolved"]
            for out in ("four", "one")
        )
        assert (four["world_size"], four["micro_batch_size"]) == (4, 4)  # 16 / 4 processes
        assert (one["world_size"], one["micro_batch_size"]) == (1, 8)  # 2 accumulation steps
    table_four = (tmp_path / "four" / "table.csv").read_text()
    assert table_four == (tmp_path / "one" / "table.csv").read_text()
    assert "MiniLM" in table_four and "TinyBERT" in table_four, table_four
    assert "Traceback" not in output
