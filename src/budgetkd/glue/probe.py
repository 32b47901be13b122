"""What one GLUE job costs on this machine, measured before the run (``compare --dry-run --probe``).

For every task shape of the experiment — each task (single sentence or pair) at each batch size of
the grid, the recipe's maximum length, packed (unpadded) or padded as ``glue.unpad`` says, stacked
as ``glue.stack`` resolves on ``glue.device``, with ``glue.threads`` CPU threads — a freshly
initialised student of the experiment's architecture is fine-tuned for ``steps`` + 1 optimizer
steps and evaluated on one evaluation batch, by the run's own code
(:func:`budgetkd.glue.finetune.fine_tune`, or :func:`~budgetkd.glue.stacked.fine_tune_stacked`),
charged to nothing and written nowhere that lasts (a temporary directory). The examples are real:
a random sample of the task's training and dev files when ``glue.dir`` holds them, tokenized with
the experiment's tokenizer; otherwise (the hub, which a dry run does not download) synthetic ones
whose lengths follow :data:`TASK_LENGTHS` (a log-normal with the mean and spread of the real
split's WordPiece lengths, measured on the GLUE files with the bert-base-uncased vocabulary),
and the record says which.

Per task shape, from the clock read after every optimizer step (the step timings of the run's
``on_step`` callback; CUDA synchronised):

* ``train_examples_per_s``: examples trained per second in the steady state (steps 2 … n+1, per
  configuration: a stacked group of k learning rates counts k × its examples);
* ``eval_examples_per_s``: dev examples predicted per second (the evaluation batch, per
  configuration);
* ``job_overhead_s``: what a job pays beyond its steps and its evaluation (the classifier's load,
  the optimizer's set-up, the first step's warm-up), per configuration;
* ``encode_examples_per_s``: tokenization, which the run pays once per task and student.

:func:`job_seconds` turns them into the seconds of one run of the grid.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from budgetkd.errors import BudgetKDError

# WordPiece tokens per example (mean, standard deviation; [CLS]/[SEP] included, truncated to 128)
# of the GLUE files in ../shared/data/glue with the bert-base-uncased vocabulary: (train, dev).
# MNLI, QNLI and QQP there are random subsets of the real training sets.
TASK_LENGTHS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "cola": ((11.3, 4.1), (11.7, 4.8)),
    "sst2": ((13.3, 9.5), (25.2, 10.4)),
    "mrpc": ((53.2, 13.0), (53.2, 12.6)),
    "qqp": ((30.8, 12.7), (30.2, 12.9)),
    "stsb": ((27.8, 14.3), (31.5, 14.2)),
    "mnli": ((40.2, 18.5), (39.1, 18.2)),
    "qnli": ((49.3, 17.2), (48.7, 16.0)),
    "rte": ((67.1, 33.0), (64.6, 32.4)),
}

# The clock of every measurement (a test on a shared machine may read CPU seconds instead).
CLOCK = time.perf_counter
CLOCK_NAME = "wall"
MAX_STEPS = 64  # measured steps of one shape at most


def settings(cfg: dict) -> SimpleNamespace:
    """How the GLUE stage will run, as :func:`budgetkd.glue.pipeline.plan_glue` resolves it."""
    from budgetkd.glue import finetune
    from budgetkd.glue.pipeline import DEFAULT_CPU_THREADS, resolve_stack
    from budgetkd.glue.search import parse_grid

    glue = cfg["glue"]
    device = finetune.resolve_device(glue["device"])
    threads = None
    if device.type == "cpu":
        threads = min(glue["threads"] or DEFAULT_CPU_THREADS, finetune.available_cpus())
    grid = parse_grid(glue["grid"])
    stack = resolve_stack(None if glue["stack"] == "auto" else glue["stack"], device)
    members = len(grid.learning_rates) if stack and len(grid.learning_rates) > 1 else 1
    return SimpleNamespace(device=device, precision=finetune.precision_for(device), threads=threads,
                           grid=grid, members=members, unpad=bool(glue["unpad"]),
                           recipe=finetune.Recipe(epochs=1))  # fmt: skip


def synthetic_split(task, n: int, which: int, vocab: int, max_length: int, rng: np.random.Generator):
    """``n`` examples of ``task`` with log-normal lengths of :data:`TASK_LENGTHS` (``which``: 0
    train, 1 dev), random token ids, a [CLS]-like first token, two segments for a pair task."""
    from budgetkd.glue.finetune import EncodedSplit

    mean, std = TASK_LENGTHS.get(task.name, ((40.0, 20.0), (40.0, 20.0)))[which]
    sigma2 = math.log(1.0 + (std / mean) ** 2)
    lengths = np.clip(
        np.round(rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)), 3, max_length
    )
    lengths = lengths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(min(1000, vocab - 1), vocab, int(offsets[-1]))
    ids[offsets[:-1]] = min(101, vocab - 1)
    types = np.zeros_like(ids)
    if len(task.text_columns) == 2:
        for start, length in zip(offsets[:-1], lengths):
            types[start + length // 2 : start + length] = 1
    labels = rng.random(n) * 5 if task.is_regression else rng.integers(0, task.num_labels, n)
    arrays = {"input_ids": ids, "token_type_ids": types, "attention_mask": np.ones_like(ids)}
    return EncodedSplit("synthetic", {k: v.astype(np.int32) for k, v in arrays.items()}, offsets,
                        labels.astype(np.float32 if task.is_regression else np.int64),
                        {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0})  # fmt: skip


def _student(cfg: dict, resolved, tokenizer, work: Path) -> Path:
    """A freshly initialised student of the experiment (its architecture, vocabulary, positions)."""
    from budgetkd.glue.finetune import quiet_transformers
    from budgetkd.models import create_student, resolve_architecture

    pad = 0 if tokenizer is None else int(tokenizer.pad_token_id)
    model = create_student(resolve_architecture(cfg["student"]), resolved.student.vocab, cfg["data"]["seq_len"],
                           {"pad": pad}, seed=cfg["seed"])  # fmt: skip
    with quiet_transformers():
        model.save_pretrained(str(work / "student"), safe_serialization=True)
    return work / "student"


def _tokenizer(resolved):
    from budgetkd.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(resolved.tokenizer.source)
    except BudgetKDError:
        return None


def _samples(cfg: dict, task, tokenizer, n_train: int, n_dev: int, run) -> tuple:
    """(train sample, dev sample, encode examples/s or None, where the examples came from)."""
    from budgetkd.glue.finetune import encode_split
    from budgetkd.glue.loading import check_local_files, load_local

    glue_dir, max_length = cfg["glue"]["dir"], run.recipe.max_length
    rng = np.random.default_rng(0)
    if glue_dir is not None and tokenizer is not None:
        with _quiet_failure():
            check_local_files(task, glue_dir)
            data = load_local(task, glue_dir)
            dev_split = data.dev[task.dev_splits[0].name]
            train = data.train.select(rng.permutation(len(data.train))[:n_train].tolist())
            dev = dev_split.select(rng.permutation(len(dev_split))[:n_dev].tolist())
            started = CLOCK()
            encoded = (
                encode_split(tokenizer, train, task, max_length),
                encode_split(tokenizer, dev, task, max_length),
            )
            seconds = CLOCK() - started
            return (*encoded, (len(train) + len(dev)) / max(seconds, 1e-9), f"real examples of {glue_dir}")
    vocab = len(tokenizer) if tokenizer is not None else 30522
    return (synthetic_split(task, n_train, 0, vocab, max_length, rng),
            synthetic_split(task, n_dev, 1, vocab, max_length, rng), None,
            "synthetic examples (log-normal lengths of TASK_LENGTHS)")  # fmt: skip


class _quiet_failure:
    """A task whose files cannot be read falls back to synthetic examples (the checks of the plan
    have already refused a glue.dir without the task)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, BudgetKDError | OSError | ValueError)


def measure_shape(model_dir: Path, task, tokenizer, train, dev, batch_size: int, run) -> dict:
    """One task shape: ``len(train) // batch_size`` optimizer steps and one evaluation batch."""
    from budgetkd.glue import finetune

    stamps: list[float] = []

    def on_step(done, total):
        if run.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(CLOCK())

    common = dict(batch_size=batch_size, seed=1, recipe=run.recipe, device=run.device, precision=run.precision,
                  on_step=on_step, unpad=run.unpad)  # fmt: skip
    holder = tokenizer if tokenizer is not None else SimpleNamespace(pad_token_id=0)
    previous = torch.get_num_threads()
    try:
        finetune.configure_threads(run.threads) if run.threads else None
        started = CLOCK()
        if run.members > 1:
            from budgetkd.glue.stacked import fine_tune_stacked

            lrs = run.grid.learning_rates
            fine_tune_stacked(model_dir, task, holder, train, {"dev": dev}, learning_rates=lrs, **common)
        else:
            finetune.fine_tune(model_dir, task, holder, train, {"dev": dev}, learning_rate=1e-4, progress=False,
                               **common)  # fmt: skip
        ended = CLOCK()
    finally:
        torch.set_num_threads(previous)
    if len(stamps) < 2:
        raise BudgetKDError(
            f"the GLUE probe of {task.name} needs at least 2 training steps at batch {batch_size}"
        )
    step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    k = run.members
    return {
        "train_examples_per_s": k * batch_size / max(step, 1e-9),
        "eval_examples_per_s": k * len(dev) / max(ended - stamps[-1], 1e-9),
        "job_overhead_s": max(0.0, (stamps[0] - started) - step) / k,
        "step_s": step,
    }


def probe_glue(cfg: dict, resolved, steps: int = 8, min_seconds: float = 2.0) -> dict:
    """Every task shape of the experiment's GLUE stage on this machine (module docstring): the
    plan's ``glue_throughput`` record. A shape whose ``steps`` steps took less than
    ``min_seconds`` is measured again over as many steps as fill it (at most 64): the rate of a
    small model is otherwise a few milliseconds of a shared machine."""
    from budgetkd.glue.tasks import parse_tasks

    run = settings(cfg)
    tokenizer = _tokenizer(resolved)
    work = Path(tempfile.mkdtemp(prefix="budgetkd-glue-probe-"))
    tasks: dict[str, dict] = {}
    try:
        model_dir = _student(cfg, resolved, tokenizer, work)
        for task in parse_tasks(cfg["glue"]["tasks"]):
            try:
                tasks[task.name] = _probe_task(cfg, task, tokenizer, model_dir, run, steps, min_seconds)
            except (BudgetKDError, RuntimeError) as exc:  # CUDA out of memory is a RuntimeError
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                resolved.notes.append(f"GLUE probe of {task.name} failed ({first}); its hours are estimated")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "source": "measured by --probe on this machine",
        "device": run.device.type,
        "precision": run.precision,
        "threads": run.threads,
        "unpadded": run.unpad,
        "stacked_members": run.members,
        "clock": CLOCK_NAME,
        "steps": steps,
        "tasks": tasks,
    }


def _probe_task(cfg, task, tokenizer, model_dir, run, steps: int, min_seconds: float) -> dict:
    """Every batch size of the grid on ``task``: ``steps`` steps, or as many as fill ``min_seconds``."""
    biggest = max(run.grid.batch_sizes)
    train, dev, encode_rate, where = _samples(
        cfg, task, tokenizer, (MAX_STEPS + 1) * biggest, run.recipe.eval_batch_size, run
    )
    shapes = {}
    for bs in run.grid.batch_sizes:
        n = min(steps, MAX_STEPS)
        shape = measure_shape(model_dir, task, tokenizer, _head(train, (n + 1) * bs), dev, bs, run)
        more = min(MAX_STEPS, math.ceil(min_seconds / max(shape["step_s"], 1e-9)))
        if more > n:
            shape = measure_shape(model_dir, task, tokenizer, _head(train, (more + 1) * bs), dev, bs, run)
        shapes[str(bs)] = shape
    return _task_record(shapes, encode_rate, where, train, dev)


def _head(split, n: int):
    """The first ``n`` examples of an encoded split (all of them if it has fewer)."""
    from budgetkd.glue.finetune import EncodedSplit

    n = min(n, len(split))
    end = int(split.offsets[n])
    return EncodedSplit(split.name, {k: v[:end] for k, v in split.arrays.items()}, split.offsets[: n + 1],
                        split.labels[:n], split.pad_values, split.padding_side)  # fmt: skip


def _task_record(shapes: dict, encode_rate, where: str, train, dev) -> dict:
    return {
        "examples": where,
        "mean_tokens": {"train": float(train.lengths().mean()), "dev": float(dev.lengths().mean())},
        "train_examples_per_s": {bs: s["train_examples_per_s"] for bs, s in shapes.items()},
        "eval_examples_per_s": float(np.median([s["eval_examples_per_s"] for s in shapes.values()])),
        "job_overhead_s": {bs: s["job_overhead_s"] for bs, s in shapes.items()},
        "encode_examples_per_s": encode_rate,
    }


def job_seconds(rates: dict, epochs: int, n_train: int, n_dev: int, batch_size: int) -> float:
    """Seconds of one run of the grid (one configuration, one seed) from a task's probe record:
    its training epochs, its evaluation and its share of the job's fixed cost."""
    bs = str(batch_size)
    return (
        epochs * n_train / rates["train_examples_per_s"][bs]
        + n_dev / rates["eval_examples_per_s"]
        + rates["job_overhead_s"][bs]
    )


def encode_seconds(rates: dict, n_train: int, n_dev: int) -> float:
    """Seconds to tokenize a task's splits (once per student); 0 when not measured (synthetic)."""
    rate = rates.get("encode_examples_per_s")
    return 0.0 if not rate else (n_train + n_dev) / rate
