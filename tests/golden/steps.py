"""Per-step losses of the training step, recorded from the code before a change to the step and
compared after it (tests/test_step_golden.py; issue 22 item 3: "on CPU the new step equals the old").

    PYTHONPATH=src python tests/golden/steps.py      # rewrite tests/golden/steps.json

Self-contained and offline (no shared corpus): a synthetic dataset (a fixed random Markov chain
over 60 word ids, every fourth row padded after a random length, so both the padded and the
unpadded paths run), a random-weight 2 × 64 teacher, and for every strategy 20 optimizer steps of
a 1 × 32 student through the real loop (``Pretrainer.pretrain``), batch 8 in two micro-batches of
4, dropout 0.1 — with gradient clipping for some strategies and without for the others. The
total loss and every component of every step are recorded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
STRATEGIES = ("none", "vanilla", "tinybert", "minilm", "minilmv2")
CLIP = {"none": 1.0, "vanilla": 0.0, "tinybert": 1.0, "minilm": 0.0, "minilmv2": 1.0}
SEQ_LEN, VOCAB, STEPS = 32, 64, 20
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_data(root: Path) -> Path:
    from budgetkd.data.tokenizer import bert_tokenizer_from_vocab
    from budgetkd.io import atomic_write_json

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))])}
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(22)
    words = VOCAB - len(SPECIALS)
    transition = rng.dirichlet(np.full(words, 0.1), size=words)
    counts = {"train": 96, "valid": 16}
    for split, rows in counts.items():
        ids = np.zeros((rows, SEQ_LEN), dtype=np.uint16)
        for r in range(rows):
            length = SEQ_LEN if r % 4 else int(rng.integers(8, SEQ_LEN))
            word = int(rng.integers(words))
            seq = [2]
            for _ in range(length - 2):
                seq.append(word + len(SPECIALS))
                word = int(rng.choice(words, p=transition[word]))
            seq.append(3)
            ids[r, : len(seq)] = seq
        ids.tofile(data / f"{split}.bin")
    bert_tokenizer_from_vocab(vocab).save_pretrained(str(data / "tokenizer"))
    atomic_write_json(
        data / "meta.json",
        {
            "format_version": 3,
            "fingerprint": "golden-steps",
            "vocab_size": VOCAB,
            "seq_len": SEQ_LEN,
            "dtype": "uint16",
            "special_ids": {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "all": [0, 1, 2, 3, 4]},
            "num_train_sequences": counts["train"],
            "num_valid_sequences": counts["valid"],
        },
    )
    return data


def make_teacher(root: Path, data: Path) -> Path:
    from budgetkd.data import PackedData
    from budgetkd.models import create_student, export_student, resolve_architecture

    packed = PackedData(data)
    arch = resolve_architecture({"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128})
    model = create_student(arch, packed.vocab_size, SEQ_LEN, packed.special_ids, seed=7)
    export_student(model, packed.load_tokenizer(), root / "teacher")
    return root / "teacher"


def run_steps(root: Path, data: Path, teacher: Path, strategy: str) -> list[dict]:
    """The loss and components of each of STEPS optimizer steps of one strategy."""
    from budgetkd.train import Pretrainer, TrainConfig

    config = TrainConfig(
        data=str(data),
        out=str(root / f"run-{strategy}"),
        student={"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64},
        strategy=strategy,
        teacher=str(teacher) if strategy != "none" else None,
        budget=f"{STEPS}steps",
        batch_size=8,
        micro_batch_size=4,
        max_grad_norm=CLIP[strategy],
        lr=3e-3,
        num_evals=1,
        eval_sequences=8,
        eval_batch_size=8,
        checkpoint_interval_s=0.0,
        log_every=1000,
        device="cpu",
        progress=False,
    )
    steps: list[dict] = []
    trainer = Pretrainer(config)
    original = trainer.apply_update

    def recording_update(loss, _trainer=trainer):
        steps.append({"loss": loss, "parts": dict(_trainer._last_parts)})
        return original(loss)

    train_step = trainer.train_step

    def recording_step(step, lr):
        out = train_step(step, lr)
        trainer._last_parts = out[1]
        return out

    trainer.train_step = recording_step
    trainer.apply_update = recording_update
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.pretrain()
    finally:
        torch.set_num_threads(previous)
    return steps[1:]  # the first is the uncharged warm-up step (undone)


def record(root: Path) -> dict:
    data = make_data(root)
    teacher = make_teacher(root, data)
    return {s: run_steps(root, data, teacher, s) for s in STRATEGIES}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = record(Path(tmp))
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    out = {"recorded_at_commit": commit.strip(), "steps": result}
    (HERE / "steps.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {HERE / 'steps.json'}", file=sys.stderr)
