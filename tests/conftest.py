"""Session fixtures shared by the end-to-end tests: real data prepared once, a tiny teacher
pretrained once with the project's own pretraining, and a factory of small run configurations.

The real corpus lives beside the checkout (``../shared/data`` from the repository root); it is
read in place, never copied. Every test that needs it skips cleanly when it is absent.

Everything is sized for a 2-core machine: WordPiece of 2000 entries, sequences of 64 tokens, a
teacher of 2 × 64 trained for 20 steps of 16 sequences, students of 1 × 32.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = SHARED_DATA / "corpus"
BERT_VOCAB = SHARED_DATA / "vocab" / "bert-base-uncased" / "vocab.txt"

# A small but real subset: two Gutenberg books and the WikiText-2 validation articles.
MAIN_INPUTS = (
    "gutenberg/shakespeare-macbeth.txt",
    "gutenberg/blake-poems.txt",
    "wikitext-2-raw/wiki.valid.raw",
)
SEQ_LEN = 64
VOCAB = 2000
VALIDATION_FRACTION = 0.05

TEACHER_ARCH = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128}
TEACHER_STEPS = 20
TEACHER_BATCH = 16
# Students: smaller than the teacher, same head count (TinyBERT/MiniLM need equal heads).
STUDENT_ARCH = {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64}


def corpus_file(relative: str) -> str:
    return str(CORPUS / relative)


def subprocess_env() -> dict:
    """Environment for child Python processes: one intra-op thread, no tokenizer thread pool."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a small shared machine the thread
    pool's synchronisation makes them many times slower under contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def _single_thread_in_our_modules(request):
    """Every test module runs with one intra-op thread: the models are tiny, and the suite runs one
    pytest-xdist worker per core (README), so more threads would only contend."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (CORPUS.is_dir() and all((CORPUS / f).is_file() for f in MAIN_INPUTS)):
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("budgetkd-session")


@pytest.fixture(scope="session")
def main_inputs(shared_data) -> list[str]:
    return [corpus_file(f) for f in MAIN_INPUTS]


@pytest.fixture(scope="session")
def data_dir(main_inputs, session_dir) -> Path:
    """The main prepared dataset, built through the CLI exactly as a user would."""
    from budgetkd.cli import main

    out = session_dir / "data"
    argv = ["prepare", "--input", *main_inputs, "--out", str(out), "--train-tokenizer", str(VOCAB)]
    argv += ["--seq-len", str(SEQ_LEN), "--validation-fraction", str(VALIDATION_FRACTION), "--no-progress"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def data_meta(data_dir) -> dict:
    return json.loads((data_dir / "meta.json").read_text())


@pytest.fixture(scope="session")
def tiny_data_dir(data_dir, shared_data, session_dir) -> Path:
    """One short book with the main tokenizer: 190 training sequences, so an epoch is a few steps."""
    from budgetkd.data import prepare_dataset

    out = session_dir / "tiny-data"
    prepare_dataset(
        [corpus_file("gutenberg/blake-poems.txt")],
        out,
        tokenizer=str(data_dir / "tokenizer"),
        seq_len=SEQ_LEN,
        validation_fraction=VALIDATION_FRACTION,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def other_vocab_data_dir(shared_data, session_dir) -> Path:
    """Another text with its own WordPiece of the same size: same vocab_size, other vocabulary."""
    from budgetkd.data import prepare_dataset

    out = session_dir / "other-vocab-data"
    prepare_dataset(
        [corpus_file("gutenberg/shakespeare-caesar.txt")],
        out,
        train_tokenizer=VOCAB,
        seq_len=SEQ_LEN,
        validation_fraction=VALIDATION_FRACTION,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def make_config(data_dir):
    """A factory of small :class:`TrainConfig` objects (overridable keyword by keyword)."""
    from budgetkd.train import TrainConfig

    def factory(out, **overrides):
        values = dict(
            data=str(data_dir),
            out=str(out),
            student=dict(STUDENT_ARCH),
            budget="3steps",
            batch_size=8,
            num_evals=1,
            eval_sequences=16,
            eval_batch_size=16,
            checkpoint_interval_s=0.0,
            log_every=1000,
            progress=False,
        )
        values.update(overrides)
        return TrainConfig(**values)

    return factory


@pytest.fixture(scope="session")
def teacher_run(data_dir, session_dir, make_config) -> Path:
    """A tiny teacher pretrained (No-KD) with the project's own pretraining; returns its run dir."""
    from budgetkd.train import pretrain

    out = session_dir / "teacher-run"
    config = make_config(
        out,
        student=dict(TEACHER_ARCH),
        budget=f"{TEACHER_STEPS}steps",
        batch_size=TEACHER_BATCH,
        lr=3e-3,
        num_evals=2,
        eval_sequences=64,
        eval_batch_size=64,
    )
    with single_thread():
        pretrain(config)
    return out


@pytest.fixture(scope="session")
def teacher_dir(teacher_run) -> Path:
    """The teacher's exported model (plain ``save_pretrained`` + tokenizer)."""
    return teacher_run / "model"


PLAIN_TRANSFORMERS_SCRIPT = r"""
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

torch.set_num_threads(1)
ids = torch.from_numpy(np.load(sys.argv[1]))
report = []
for index, model_dir in enumerate(sys.argv[3:]):
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    model.eval()
    attention = (ids != model.config.pad_token_id).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    np.save(f"{sys.argv[2]}/logits-{index}.npy", logits.numpy())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report.append(
        {
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "encoded": tokenizer("the king of scotland")["input_ids"],
        }
    )
loaded = sorted(name for name in sys.modules if name.split(".")[0] == "budgetkd")
print(json.dumps({"models": report, "budgetkd_modules": loaded}))
"""


def load_in_plain_transformers(model_dirs, input_ids, work_dir: Path) -> tuple[list, dict]:
    """Load each exported model with ``AutoModelForMaskedLM`` in a fresh Python that never
    imports budgetkd; return the logits for ``input_ids`` [B, L] (padding = pad id) and a report."""
    import subprocess
    import sys

    import numpy as np

    work_dir.mkdir(parents=True, exist_ok=True)
    ids_path = work_dir / "ids.npy"
    np.save(ids_path, np.asarray(input_ids, dtype=np.int64))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            PLAIN_TRANSFORMERS_SCRIPT,
            str(ids_path),
            str(work_dir),
            *map(str, model_dirs),
        ],
        cwd=work_dir,
        env={k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    logits = [np.load(work_dir / f"logits-{i}.npy") for i in range(len(model_dirs))]
    return logits, report


def student_from_checkpoint(run_dir: Path, arch: dict, vocab_size: int = VOCAB):
    """A fresh ``BertForMaskedLM`` of ``arch`` holding the student state of RUN/checkpoint.pt."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=arch["hidden"],
        num_hidden_layers=arch["layers"],
        num_attention_heads=arch["heads"],
        intermediate_size=arch["intermediate"],
        pad_token_id=0,
    )
    model = BertForMaskedLM(config)
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
    # training holds the vocabulary rows padded to a multiple of 64 (models.VOCAB_MULTIPLE); the
    # extra rows are zero and never trained: the tokenizer's rows are the model
    vocab_rows = ("word_embeddings.weight", "predictions.bias", "decoder.weight", "decoder.bias")
    student = {
        key: value[:vocab_size] if key.endswith(vocab_rows) else value
        for key, value in state["student"].items()
    }
    model.load_state_dict(student, strict=True)
    model.eval()
    return model, state
