"""The pretraining loop end to end on real text (SPEC §2, §3, §4): sparse vs dense MLM, loss
falls, determinism, resumption (exception and SIGKILL), the exported model in plain
transformers, the run directory (summary, TensorBoard, refusals)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from conftest import (
    STUDENT_ARCH,
    VOCAB,
    load_in_plain_transformers,
    student_from_checkpoint,
    subprocess_env,
)
from safetensors.torch import load_file

from budgetkd.data import MaskingConfig, PackedData, mask_tokens
from budgetkd.errors import BudgetKDError
from budgetkd.losses import mlm_loss
from budgetkd.models import encode, predicted_positions, sparse_mlm_logits
from budgetkd.train import Pretrainer, TrainConfig, pretrain


def exported_weights(run_dir) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def real_batch(data_dir, rows: int = 8, seed: int = 0):
    """``rows`` validation sequences (the last one padded) with 15 % masks."""
    data = PackedData(data_dir)
    valid = np.asarray(data.valid).astype(np.int64)
    ids = torch.from_numpy(np.concatenate([valid[: rows - 1], valid[-1:]]))
    attention = (ids != data.special_ids["pad"]).long()
    config = MaskingConfig(data.vocab_size, data.special_ids["mask"], tuple(data.special_ids["all"]))
    masked, labels = mask_tokens(ids, attention, config, torch.Generator().manual_seed(seed))
    return ids, masked, attention, labels


# ------------------------------------------------------------------------------------------------
# sparse prediction
# ------------------------------------------------------------------------------------------------


def test_sparse_mlm_head_equals_dense_head(teacher_dir, data_dir):
    """HF's dense BertForMaskedLM loss (head on every position, CE over labels ≠ −100) equals
    the sparse path: head only at predicted positions + budgetkd.losses.mlm_loss."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(str(teacher_dir))
    model.eval()
    _, masked, attention, labels = real_batch(data_dir)
    assert (attention == 0).any() and int((labels != -100).sum()) > 20
    with torch.no_grad():
        dense = model(input_ids=masked, attention_mask=attention, labels=labels)
        hidden = encode(model.bert, masked, attention)
        positions = predicted_positions(labels)
        sparse_logits = sparse_mlm_logits(model, hidden, positions)
        sparse_loss = mlm_loss(sparse_logits, labels.reshape(-1)[positions])
    assert sparse_logits.shape == (int((labels != -100).sum()), VOCAB)
    dense_rows = dense.logits.reshape(-1, VOCAB)[labels.reshape(-1) != -100]
    torch.testing.assert_close(sparse_logits, dense_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_loss, dense.loss, rtol=1e-6, atol=1e-6)
    # and against the definition: mean over predicted tokens of −log softmax(z)_y, in float64
    logp = torch.log_softmax(dense_rows.double(), dim=-1)
    targets = labels.reshape(-1)[labels.reshape(-1) != -100]
    by_hand = -logp[torch.arange(len(targets)), targets].mean()
    assert float(sparse_loss) == pytest.approx(float(by_hand), rel=1e-5)


def test_padded_vocabulary_changes_no_logit_no_gradient_and_no_export(tmp_path):
    """The student's vocabulary rows are padded to a multiple of 64 (30,522 → 30,528): the seeded
    initial rows are unchanged, the ties hold, the logits equal the unpadded model's, the extra
    rows get exactly zero gradient and stay zero through AdamW with weight decay, and the export
    has the tokenizer's 30,522 rows and the unpadded model's exact weights."""
    from transformers import BertForMaskedLM

    from budgetkd.models import (
        create_student,
        export_student,
        pad_vocabulary,
        padded_vocab_size,
        resolve_architecture,
        weights_fingerprint,
    )

    assert (padded_vocab_size(30522), padded_vocab_size(64), padded_vocab_size(65)) == (30528, 64, 128)
    arch = resolve_architecture("bert-tiny")
    plain = create_student(arch, 30522, 64, {"pad": 0}, seed=5).eval()
    padded = create_student(arch, 30522, 64, {"pad": 0}, seed=5).eval()
    pad_vocabulary(padded)
    embeddings = padded.bert.embeddings.word_embeddings.weight
    head = padded.cls.predictions
    assert embeddings.shape == (30528, 128) and head.bias.shape == (30528,)
    assert head.decoder.weight is embeddings and head.decoder.bias is head.bias
    assert padded.config.vocab_size == 30522
    assert torch.equal(embeddings[:30522], plain.bert.embeddings.word_embeddings.weight)
    assert not embeddings[30522:].any()

    ids = torch.randint(0, 30522, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([0, 7, 19, 30])
    targets = torch.tensor([5, 17, 2000, 30521])
    logits = sparse_mlm_logits(padded, encode(padded.bert, ids, None), positions)
    reference = sparse_mlm_logits(plain, encode(plain.bert, ids, None), positions)
    assert logits.shape == reference.shape == (4, 30522)
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)

    optimizer = torch.optim.AdamW(padded.parameters(), lr=1e-2, weight_decay=0.1)
    mlm_loss(logits, targets).backward()
    assert embeddings.grad[:30522].abs().sum() > 0
    assert not embeddings.grad[30522:].any() and not head.bias.grad[30522:].any()
    optimizer.step()
    assert not embeddings[30522:].any() and not head.bias[30522:].any()

    fresh = create_student(arch, 30522, 64, {"pad": 0}, seed=5)
    unpadded_fingerprint = weights_fingerprint(fresh)
    pad_vocabulary(fresh)

    class NoTokenizer:
        def save_pretrained(self, path):
            pass

    export_student(fresh, NoTokenizer(), tmp_path / "model")
    assert fresh.bert.embeddings.word_embeddings.weight.shape[0] == 30528  # padded again after the save
    exported = BertForMaskedLM.from_pretrained(str(tmp_path / "model"))
    assert exported.config.vocab_size == 30522
    assert exported.bert.embeddings.word_embeddings.weight.shape == (30522, 128)
    assert weights_fingerprint(exported) == unpadded_fingerprint


def test_a_checkpoint_of_unpadded_weights_is_refused_in_one_line():
    """A checkpoint written before the vocabulary was padded (30,522 rows) does not load into
    today's student (30,528): a BudgetKDError naming the shapes, not a RuntimeError's traceback."""
    from types import SimpleNamespace

    from budgetkd.models import create_student, pad_vocabulary, resolve_architecture
    from budgetkd.trainer.checkpoint import restore_training

    arch = resolve_architecture("bert-tiny")
    old = create_student(arch, 30522, 64, {"pad": 0}, seed=0)
    new = create_student(arch, 30522, 64, {"pad": 0}, seed=0)
    pad_vocabulary(new)
    state = {"student": old.state_dict(), "strategy": {}, "optimizer": {}, "meter": {}}
    module = SimpleNamespace(student=new, strategy=torch.nn.Module())
    with pytest.raises(BudgetKDError, match=r"does not fit this run's model .*30522.*another configuration"):
        restore_training(state, module, optimizer=None)


def test_compile_is_on_by_default_on_cuda_only_and_never_changes_a_fingerprint(make_config, tmp_path):
    """``compile`` unset compiles on CUDA and not elsewhere; it is an execution choice like
    ``device``: a resumption may change it, and the run's identity (the stage fingerprints)
    holds ``compile: false`` whatever it is, as every identity written before did."""
    from budgetkd.trainer.setup import compiles

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert (compiles(None, cpu), compiles(None, cuda)) == (False, True)
    assert (compiles(True, cpu), compiles(False, cuda)) == (True, False)
    identities = [make_config(tmp_path / "run", compile=value).identity() for value in (None, True, False)]
    assert all(identity["compile"] is False for identity in identities)
    assert identities[0] == identities[1] == identities[2]
    assert "compile" in TrainConfig.RESUMABLE_CHANGES


# ------------------------------------------------------------------------------------------------
# learning, determinism
# ------------------------------------------------------------------------------------------------


def test_loss_falls_on_real_text(make_config, data_dir, tmp_path):
    from transformers import BertForMaskedLM

    summary = pretrain(
        make_config(
            tmp_path / "run", budget="50steps", batch_size=16, lr=5e-3, num_evals=2, eval_sequences=64
        )
    )
    # Initial loss, measured on the same validation masks with the untrained initial weights.
    config = BertForMaskedLM.from_pretrained(str(tmp_path / "run" / "model")).config
    torch.manual_seed(0)
    fresh = BertForMaskedLM(config).eval()
    from budgetkd.data import validation_batches

    data = PackedData(data_dir)
    masking = MaskingConfig(data.vocab_size, data.special_ids["mask"], tuple(data.special_ids["all"]))
    total = count = 0.0
    with torch.no_grad():
        for masked, attention, labels in validation_batches(data, 16, masking, 0, max_sequences=64):
            out = fresh(input_ids=masked, attention_mask=attention, labels=labels)
            n = int((labels != -100).sum())
            total += float(out.loss) * n
            count += n
    initial = total / count
    assert abs(initial - math.log(VOCAB)) < 0.3, "an untrained BERT predicts ≈ uniformly"
    final = summary["val_mlm_loss"]
    assert final < initial - 0.7, (initial, final)
    losses = [e["val_mlm_loss"] for e in summary["evaluations"]]
    assert losses == sorted(losses, reverse=True)


def test_same_seed_identical_weights_other_seed_different(make_config, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = pretrain(make_config(tmp_path / name, budget="4steps", seed=seed))
    a, b, c = (exported_weights(tmp_path / n) for n in "abc")
    assert_same_weights(a, b)
    assert runs["a"]["init_fingerprint"] == runs["b"]["init_fingerprint"] != runs["c"]["init_fingerprint"]
    assert a.keys() == c.keys()
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert runs["a"]["val_mlm_loss"] == runs["b"]["val_mlm_loss"]


def test_micro_batch_split_does_not_change_training(make_config, tmp_path):
    """Gradient accumulation normalises by the global batch: micro-batches 2 and 8 of a batch of
    8 give the same weights (dropout off so that both draw no random numbers)."""
    for name, micro in (("whole", 8), ("split", 2)):
        pretrain(
            make_config(tmp_path / name, budget="3steps", micro_batch_size=micro, dropout=0.0, warmup=0.0)
        )
    whole, split = exported_weights(tmp_path / "whole"), exported_weights(tmp_path / "split")
    assert whole.keys() == split.keys()
    for key in whole:
        torch.testing.assert_close(whole[key], split[key], rtol=1e-4, atol=2e-5, msg=key)


def test_pretraining_dropout_applies_to_training_but_not_to_the_exported_config(make_config, tmp_path):
    """``dropout`` changes every dropout of the student while it trains (train-mode forwards are
    then deterministic), but the exported config keeps BERT's 0.1 so that GLUE fine-tunes every
    student with the same dropout whatever its pretraining used (SPEC §4)."""
    import json

    trainer = Pretrainer(make_config(tmp_path / "probe", dropout=0.0))
    trainer.setup()
    student = trainer.module.student
    student.train()
    ids = torch.randint(5, VOCAB, (2, 16))
    mask = torch.ones_like(ids)
    first, second = (encode(student.bert, ids, mask) for _ in range(2))
    assert torch.equal(first, second)
    default = Pretrainer(make_config(tmp_path / "default"))
    default.setup()
    default.module.student.train()
    a, b = (encode(default.module.student.bert, ids, mask) for _ in range(2))
    assert not torch.equal(a, b)  # BERT's 0.1: two train-mode forwards differ

    pretrain(make_config(tmp_path / "run", budget="1steps", dropout=0.0))
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == 0.1
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["dropout"] == 0.0


def test_default_micro_batch_accepts_any_batch_size(make_config, tmp_path):
    summary = pretrain(make_config(tmp_path / "run", budget="1steps", batch_size=80))
    assert summary["consumed"]["sequences"] == 80
    assert 80 % summary["micro_batch_size"] == 0 and summary["micro_batch_size"] <= 64


def test_optimizer_follows_the_paper_recipe(make_config, tmp_path):
    """SPEC §5: AdamW β = (0.9, 0.98), ε = 1e-6, weight decay 0.01 except biases and LayerNorm;
    peak learning rate 1e-3 for No-KD by default."""
    trainer = Pretrainer(make_config(tmp_path / "run"))
    trainer.setup()
    optimizer = trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    decayed, not_decayed = set(), set()
    for group in optimizer.param_groups:
        assert tuple(group["betas"]) == (0.9, 0.98) and group["eps"] == 1e-6
        target = decayed if group["weight_decay"] == 0.01 else not_decayed
        assert group["weight_decay"] in (0.0, 0.01)
        target.update(names[id(p)] for p in group["params"])
    everything = set(names.values())
    assert decayed | not_decayed == everything and not decayed & not_decayed
    for name in everything:
        exempt = name.endswith(".bias") or "LayerNorm" in name
        assert (name in not_decayed) == exempt, name
    assert trainer.lr == 1e-3


# ------------------------------------------------------------------------------------------------
# resumption
# ------------------------------------------------------------------------------------------------

MEASURED = ("steps", "sequences", "tokens", "flops", "flops_student", "flops_teacher", "epochs")


def test_resume_after_an_exception_gives_the_same_weights(make_config, tmp_path, monkeypatch):
    steps, crash_at = 6, 3
    reference = pretrain(make_config(tmp_path / "a", budget=f"{steps}steps", num_evals=3))

    config = make_config(tmp_path / "b", budget=f"{steps}steps", num_evals=3, checkpoint_every_steps=1)
    original = Pretrainer.train_step

    def crashing(self, step, lr):
        if step == crash_at:
            raise RuntimeError("simulated crash")
        return original(self, step, lr)

    with monkeypatch.context() as patch:
        patch.setattr(Pretrainer, "train_step", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain(config)
    run = tmp_path / "b"
    assert not (run / "summary.json").exists() and not (run / "model").exists()
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert state["meter"]["steps"] == crash_at

    # an unfinished run needs --resume; a changed configuration is refused
    with pytest.raises(BudgetKDError, match="--resume"):
        pretrain(config)
    with pytest.raises(BudgetKDError, match="different configuration"):
        pretrain(
            make_config(run, budget=f"{steps}steps", num_evals=3, checkpoint_every_steps=1, lr=2e-3),
            resume=True,
        )

    resumed = pretrain(config, resume=True)
    assert_same_weights(exported_weights(tmp_path / "a"), exported_weights(run))
    for key in MEASURED:
        assert resumed["consumed"][key] == reference["consumed"][key], key
    assert resumed["val_mlm_loss"] == reference["val_mlm_loss"]
    assert [e["step"] for e in resumed["evaluations"]] == [e["step"] for e in reference["evaluations"]]


def test_resume_after_a_crash_during_export(make_config, tmp_path, monkeypatch):
    """Killed after the final checkpoint, while exporting: resuming only exports (no extra step,
    no second final evaluation) and gives the uninterrupted run's result."""
    import budgetkd.train

    reference = pretrain(make_config(tmp_path / "a", budget="4steps", num_evals=2))
    config = make_config(tmp_path / "b", budget="4steps", num_evals=2)

    def crashing_export(*args, **kwargs):
        raise RuntimeError("simulated crash during export")

    with monkeypatch.context() as patch:
        patch.setattr(budgetkd.train, "export_student", crashing_export)
        with pytest.raises(RuntimeError, match="during export"):
            pretrain(config)
    assert not (tmp_path / "b" / "summary.json").exists()
    resumed = pretrain(config, resume=True)
    assert_same_weights(exported_weights(tmp_path / "a"), exported_weights(tmp_path / "b"))
    for key in MEASURED:
        assert resumed["consumed"][key] == reference["consumed"][key], key
    assert [(e["step"], e["final"]) for e in resumed["evaluations"]] == [
        (e["step"], e["final"]) for e in reference["evaluations"]
    ]


def test_resume_after_sigkill_gives_the_same_weights(data_dir, tmp_path):
    """A real ``python -m budgetkd pretrain`` killed with SIGKILL mid-run, then resumed."""
    values = dict(
        data=str(data_dir),
        out=str(tmp_path / "killed"),
        student=dict(STUDENT_ARCH),
        budget="150steps",
        batch_size=4,
        num_evals=2,
        eval_sequences=16,
        eval_batch_size=16,
        checkpoint_interval_s=0.0,
        log_every=1000,
        progress=False,
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(values))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "budgetkd",
            "pretrain",
            "--config",
            str(config_file),
            "--checkpoint-every-steps",
            "1",
        ],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "summary.json").exists(), "the run finished before it was killed"
    done_before_kill = torch.load(checkpoint, weights_only=False)["meter"]["steps"]
    assert 1 <= done_before_kill < 150

    resumed = pretrain(TrainConfig.from_dict({**values, "checkpoint_every_steps": 1}), resume=True)
    reference = pretrain(TrainConfig.from_dict({**values, "out": str(tmp_path / "reference")}))
    assert_same_weights(exported_weights(tmp_path / "reference"), exported_weights(tmp_path / "killed"))
    for key in MEASURED:
        assert resumed["consumed"][key] == reference["consumed"][key], key


# ------------------------------------------------------------------------------------------------
# the run directory
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(make_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    summary = pretrain(make_config(run, budget="5steps", num_evals=2, log_every=1))
    return run, summary


def test_exported_model_loads_in_plain_transformers(finished_run, data_dir, tmp_path):
    run, _ = finished_run
    ids, _, _, _ = real_batch(data_dir, rows=4)
    (logits,), report = load_in_plain_transformers([run / "model"], ids, tmp_path / "plain")
    assert report["budgetkd_modules"] == []
    assert report["models"][0]["class"] == "BertForMaskedLM"
    model, _ = student_from_checkpoint(run, STUDENT_ARCH)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-6, atol=1e-6)
    # the exported tokenizer is the data's tokenizer
    data_tokenizer = PackedData(data_dir).load_tokenizer()
    assert report["models"][0]["encoded"] == data_tokenizer("the king of scotland")["input_ids"]


def test_summary_and_tensorboard(finished_run, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, summary = finished_run
    on_disk = yaml.safe_load((run / "summary.json").read_text())
    assert on_disk["strategy"] == "none"
    assert on_disk["budget"]["currency"] == "steps" and on_disk["budget"]["amount"] == 5
    consumed = on_disk["consumed"]
    for key in ("time_s", "flops", "tokens", "steps", "epochs"):
        assert isinstance(consumed[key], (int, float)) and consumed[key] > 0, key
    assert consumed["steps"] == 5 and consumed["sequences"] == 40
    assert consumed["epochs"] == pytest.approx(40 / PackedData(data_dir).num_train, rel=1e-12)
    assert on_disk["tokens_per_s"] == pytest.approx(consumed["tokens"] / consumed["time_s"])
    assert math.isfinite(on_disk["val_mlm_loss"]) and on_disk["val_mlm_loss"] > 0
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(run / "tb"))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/mlm_loss"} <= set(scalars)
    assert accumulator.Scalars("val/mlm_loss")[-1].value == pytest.approx(on_disk["val_mlm_loss"], rel=1e-6)
    # the loop follows the schedule of the budget fraction p = k/5 before step k (SPEC §3):
    # warm-up to 1e-3 over p < 0.06 (so 0 at p = 0), then linear decay (1 − p)/0.94
    logged = [(e.step, e.value) for e in accumulator.Scalars("train/lr")]
    expected = [(1, 0.0)] + [(k + 1, 1e-3 * (1 - k / 5) / 0.94) for k in range(1, 5)]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    for (_, got), (_, want) in zip(logged, expected):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


def _snapshot(directory):
    return {
        p.relative_to(directory): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_run_directory_in_use_is_refused(make_config, tmp_path):
    from budgetkd.io import DirectoryLock

    run = tmp_path / "run"
    with DirectoryLock(run), pytest.raises(BudgetKDError, match="in use"):
        pretrain(make_config(run))
    assert not (run / "run_config.json").exists() and not (run / "checkpoint.pt").exists()


def test_finished_run_is_refused_without_modification(finished_run, make_config):
    run, _ = finished_run
    before = _snapshot(run)
    for resume in (False, True):
        with pytest.raises(BudgetKDError, match="finished"):
            pretrain(make_config(run, budget="5steps", num_evals=2), resume=resume)
    assert _snapshot(run) == before
