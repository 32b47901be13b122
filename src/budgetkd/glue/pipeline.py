"""``run_glue``: fine-tune one model directory on GLUE with the grid search of SPEC §6.

The work is split in three so that ``compare`` can pool the grids of several students:
:func:`plan_glue` checks the inputs and reads the data (every rank), :func:`run_plans` has every
rank take the jobs of the plans (:mod:`budgetkd.glue.ledger`) until all are done, and
:func:`finish_glue` (rank 0) writes a plan's glue.json from the run files.

Outputs under ``out_dir`` (locked by rank 0 with :func:`budgetkd.io.locked` while running):

- ``runs/<task>/lr<lr>-bs<bs>-seed<seed>.json`` (+ ``.predictions.json``): one per run, the cache
  and the ledger (each records the host, rank and CPU threads that ran it);
- ``claims/<task>/<job>.json``: the claims of jobs in flight (see :mod:`budgetkd.glue.ledger`);
- ``logs/glue-<host>-rank<r>.log``: one line per job claimed / finished / taken over;
- ``glue.json``: the results (schema in :func:`run_glue`'s docstring);
- ``glue.md``: the same as readable tables;
- ``predictions/<task>-<split>.jsonl`` with ``save_predictions``: the dev predictions of the best
  configuration's first seed, one ``{"index", "label", "prediction"}`` per example.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from budgetkd import distributed as dist_utils
from budgetkd.errors import BudgetKDError
from budgetkd.glue import finetune, ledger
from budgetkd.glue.loading import GlueData, check_glue_dir, load_task
from budgetkd.glue.report import prediction_lines, render_markdown
from budgetkd.glue.search import (
    Grid,
    average_score,
    load_cached_run,
    load_run_predictions,
    parse_grid,
    parse_seeds,
    run_name,
    run_path,
    save_run,
    summarize_task,
)
from budgetkd.glue.tasks import GlueTask, parse_tasks
from budgetkd.io import atomic_write_json, atomic_write_text, locked, sha256_file, sha256_json

# --max-train-examples keeps the first N examples of this fixed permutation: the same subset for
# every configuration and seed.
SUBSET_SEED = 0

_WEIGHT_PATTERNS = (
    "*.safetensors",
    "pytorch_model*.bin",
    "*.safetensors.index.json",
    "pytorch_model*.bin.index.json",
)
_FINGERPRINT_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise BudgetKDError(f"model directory not found: {path}")
    if not path.is_dir():
        raise BudgetKDError(f"model path {path} is not a directory (expected a save_pretrained folder)")
    if not (path / "config.json").is_file():
        raise BudgetKDError(f"model directory {path} has no config.json")
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise BudgetKDError(f"model directory {path} has no weights (model.safetensors or pytorch_model.bin)")
    return path


def fingerprint_model_dir(path: Path) -> str:
    """sha256 over the contents of the config, weight and tokenizer files of a model directory."""
    files = {p.name for pattern in _WEIGHT_PATTERNS for p in path.glob(pattern)}
    files |= {name for name in _FINGERPRINT_FILES if (path / name).is_file()}
    return sha256_json({name: sha256_file(path / name) for name in sorted(files)})


def check_same_model(out: Path, model_fp: str) -> None:
    """Refuse an output directory that holds GLUE results (glue.json or run files) of another model:
    they would be overwritten one by one. Results of the same model with another recipe, grid or
    data are a cache and stay reusable (a run file with another fingerprint is recomputed)."""
    glue = _read_json_object(out / "glue.json")
    found = [(out / "glue.json", glue.get("model_fingerprint"), glue.get("model"))] if glue else []
    for path in sorted((out / "runs").glob("*/*.json")) if (out / "runs").is_dir() else []:
        if path.name.endswith(".predictions.json"):
            continue
        record = _read_json_object(path)
        inputs = record.get("fingerprint_inputs") if record else None
        if isinstance(inputs, dict):
            found.append((path, inputs.get("model"), None))
    for path, fingerprint, model in found:
        if fingerprint is not None and fingerprint != model_fp:
            which = f"{model}, " if model else ""
            raise BudgetKDError(
                f"--out {out} holds the GLUE results of another model ({which}{path.relative_to(out)}); "
                "choose another --out"
            )


def _read_json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _positive_or_none(value: int | None, flag: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BudgetKDError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _subset_train(data: GlueData, max_train_examples: int | None):
    train = data.train
    if max_train_examples is None or max_train_examples >= len(train):
        return train
    generator = torch.Generator().manual_seed(SUBSET_SEED)
    order = torch.randperm(len(train), generator=generator)[:max_train_examples].tolist()
    return train.select(order)


# CPU threads of a job when none are asked for: a constant, never the machine's core count or the
# number of ranks, because the thread count changes float reductions and a job's result must not
# depend on where or beside how many others it ran. On CPU, parallelise with ranks instead.
DEFAULT_CPU_THREADS = 1


def resolve_stack(stack: bool | str | None, device: torch.device) -> bool:
    """``auto`` (None): stack on CUDA, where small models are launch-bound; on CPU the step is
    compute-bound and a stacked group measured no faster (benchmarks/README.md)."""
    if stack is None or stack == "auto":
        return device.type == "cuda"
    if isinstance(stack, bool):
        return stack
    raise BudgetKDError(f"glue stack must be true, false or auto, got {stack!r}")


@dataclass
class GluePlan:
    """Everything one student's grid needs, checked and loaded (see :func:`plan_glue`)."""

    model_path: Path
    model_fp: str
    out: Path
    tokenizer: object
    tasks: list[GlueTask]
    data: dict[str, GlueData]
    grid: Grid
    seeds: tuple[int, ...]
    recipe: finetune.Recipe
    device: torch.device
    precision: str
    max_train_examples: int | None
    max_eval_examples: int | None
    save_predictions: bool
    hub: bool
    glue_dir: Path | None
    threads: int | None  # CPU threads per job (None on CUDA)
    stack: bool
    group_by_length: bool
    label: str = ""
    unpad: bool = True  # packed (unpadded) batches; False where the model has no packed path
    _splits: dict = field(default_factory=dict, repr=False)

    def splits(self, task: GlueTask):
        """(train subset, dev splits cut to max_eval_examples) of ``task``, computed once."""
        if task.name not in self._splits:
            data = self.data[task.name]
            dev = {
                name: split.select(list(range(min(len(split), self.max_eval_examples))))
                if self.max_eval_examples
                else split
                for name, split in data.dev.items()
            }
            self._splits[task.name] = (_subset_train(data, self.max_train_examples), dev)
        return self._splits[task.name]

    def member_inputs(self, task: GlueTask, lr: float, bs: int, seed: int, group: tuple[float, ...]) -> dict:
        """Everything that determines one run's result (its fingerprint's inputs)."""
        inputs = {
            "model": self.model_fp,
            "data": self.data[task.name].fingerprint,
            "task": task.name,
            "recipe": self.recipe.as_dict(),
            "lr": lr,
            "batch_size": bs,
            "seed": seed,
            "max_train_examples": self.max_train_examples,
            "max_eval_examples": self.max_eval_examples,
            "subset_seed": SUBSET_SEED,
            "precision": self.precision,
            "cpu_threads": self.threads,
            # a stacked member's numbers (dropout masks, float order) depend on its group
            "mode": {"stacked": list(group)} if len(group) > 1 else "separate",
        }
        if self.group_by_length:  # absent when off: the paper recipe
            inputs["group_by_length"] = True
        if self.unpad:  # absent when padded: padded runs cached before unpadding stay valid
            inputs["unpad"] = finetune.PACKED_VERSION
        return inputs

    def jobs(self) -> list[GlueJob]:
        """One job per (task, batch size, seed) group of learning rates when stacking, else one
        per run."""
        jobs = []
        for task in self.tasks:
            for bs in self.grid.batch_sizes:
                for seed in self.seeds:
                    lrs = self.grid.learning_rates
                    groups = [tuple(lrs)] if self.stack and len(lrs) > 1 else [(lr,) for lr in lrs]
                    jobs.extend(GlueJob(self, task, bs, seed, group) for group in groups)
        return jobs


@dataclass
class GlueJob:
    """One unit of the grid: ``lrs`` (one, or a stacked group) × (task, batch size, seed)."""

    plan: GluePlan
    task: GlueTask
    batch_size: int
    seed: int
    lrs: tuple[float, ...]

    def __post_init__(self) -> None:
        plan, task = self.plan, self.task
        self.members = len(self.lrs)
        self.runs = []
        for lr in self.lrs:
            inputs = plan.member_inputs(task, lr, self.batch_size, self.seed, self.lrs)
            path = run_path(plan.out, task.name, lr, self.batch_size, self.seed)
            self.runs.append((lr, inputs, sha256_json(inputs), path))
        if self.members == 1:
            name = run_name(self.lrs[0], self.batch_size, self.seed)
        else:
            name = f"stack-bs{self.batch_size}-seed{self.seed}-lr" + "_".join(
                repr(float(x)) for x in self.lrs
            )
        self.claim_path = plan.out / "claims" / task.name / f"{name}.json"
        where = f"{plan.label} " if plan.label else ""
        self.label = f"{where}{task.name} {name}"
        n_train = len(plan.splits(task)[0])
        self.units = plan.recipe.epochs * math.ceil(n_train / self.batch_size) * self.members
        self.cost = float(n_train * plan.recipe.epochs * self.members)

    def done(self) -> bool:
        return all(
            load_cached_run(path, fp, need_predictions=True) is not None for _, _, fp, path in self.runs
        )

    def measured_seconds(self) -> float | None:
        record = load_cached_run(self.runs[0][3], self.runs[0][2])
        return None if record is None else record.get("train_seconds")

    def _train(self, train, dev, on_step) -> list[finetune.FineTuneResult]:
        plan, task = self.plan, self.task
        common = dict(
            batch_size=self.batch_size,
            seed=self.seed,
            recipe=plan.recipe,
            device=plan.device,
            precision=plan.precision,
            group_by_length=plan.group_by_length,
            on_step=on_step,
            unpad=plan.unpad,
        )
        if self.members == 1:
            results = [
                finetune.fine_tune(
                    plan.model_path,
                    task,
                    plan.tokenizer,
                    train,
                    dev,
                    learning_rate=self.lrs[0],
                    progress=False,
                    description=self.label,
                    **common,
                )
            ]
        else:
            from budgetkd.glue.stacked import fine_tune_stacked

            results = fine_tune_stacked(
                plan.model_path, task, plan.tokenizer, train, dev, learning_rates=self.lrs, **common
            )
        return results

    def run(self, on_step=None) -> None:
        plan, task = self.plan, self.task
        train, dev = _encoded(plan, task)
        device = plan.device
        previous = torch.get_num_threads()
        try:
            threads = finetune.configure_threads(plan.threads) if device.type == "cpu" else None
            results = self._train(train, dev, on_step)
        finally:
            torch.set_num_threads(previous)  # the caller's setting, e.g. the rest of a test session
        for (lr, inputs, fingerprint, path), result in zip(self.runs, results):
            record = {
                "task": task.name,
                "lr": lr,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "fingerprint": fingerprint,
                "fingerprint_inputs": inputs,
                "metrics": result.metrics,
                "missing": plan.data[task.name].missing_metrics,
                "train_examples": result.train_examples,
                "train_steps": result.train_steps,
                "final_loss": result.final_loss,
                "epoch_losses": result.epoch_losses,
                "train_seconds": round(result.train_seconds, 3),
                "eval_seconds": round(result.eval_seconds, 3),
                "stacked_with": list(self.lrs) if self.members > 1 else None,
                "group_by_length": plan.group_by_length,
                "unpadded": result.unpadded,
                "device": device.type,
                "cpu_threads": threads,
                "precision": plan.precision,
                "host": socket.gethostname(),
                "rank": dist_utils.rank(),
                "pid": os.getpid(),
                "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            predictions = {
                name: {"labels": result.labels[name], "predictions": result.predictions[name]}
                for name in result.predictions
            }
            save_run(path, record, predictions)


# the tokenized splits of the task in hand: a rank's consecutive jobs are often the same task
_ENCODED: dict = {}


def _encoded(plan: GluePlan, task: GlueTask):
    key = (id(plan), task.name)
    if key not in _ENCODED:
        _ENCODED.clear()
        train, dev = plan.splits(task)
        max_length = plan.recipe.max_length
        _ENCODED[key] = (
            finetune.encode_split(plan.tokenizer, train, task, max_length),
            {n: finetune.encode_split(plan.tokenizer, s, task, max_length) for n, s in dev.items()},
        )
    return _ENCODED[key]


def plan_glue(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    glue_dir: str | Path | None = None,
    hub: bool = False,
    tasks: str | Iterable[str] | None = "all",
    grid: str | Grid = "paper",
    epochs: int = 5,
    seeds: str | int | Sequence[int] = (1,),
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    save_predictions: bool = False,
    device: str = "auto",
    threads: int | None = None,
    stack: bool | str | None = None,
    group_by_length: bool = False,
    unpad: bool = True,
    label: str = "",
    lock: contextlib.ExitStack | None = None,
) -> GluePlan:
    """Check every input and read every task's files (before the first hour of training).

    With ``lock`` (rank 0), the output directory's lock is entered on it once the arguments are
    checked, before anything reads the directory; it is held until the caller closes ``lock``."""
    task_list = parse_tasks(tasks)
    grid = parse_grid(grid)
    seed_list = parse_seeds(seeds)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise BudgetKDError(f"--epochs must be a positive integer, got {epochs!r}")
    max_train_examples = _positive_or_none(max_train_examples, "--max-train-examples")
    max_eval_examples = _positive_or_none(max_eval_examples, "--max-eval-examples")
    threads = _positive_or_none(threads, "--threads")
    if hub and glue_dir is not None:
        raise BudgetKDError("give either --glue-dir or --hub, not both")
    if not hub:
        if glue_dir is None:
            raise BudgetKDError(
                "no GLUE data given: pass --glue-dir PATH (classic glue_data layout) or --hub"
            )
        glue_dir = check_glue_dir(glue_dir).resolve()
    model_path = check_model_dir(model_dir).resolve()
    torch_device = finetune.resolve_device(device)
    precision = finetune.precision_for(torch_device)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BudgetKDError(f"--out {out} exists and is not a directory")
    if lock is not None:
        lock.enter_context(locked(out))
    model_fp = fingerprint_model_dir(model_path)
    check_same_model(out, model_fp)
    tokenizer = finetune.load_tokenizer(model_path)
    data = {task.name: load_task(task, glue_dir=glue_dir, hub=hub) for task in task_list}
    cpu_threads = None
    if torch_device.type == "cpu":
        cpu_threads = min(threads or DEFAULT_CPU_THREADS, finetune.available_cpus())
    return GluePlan(
        model_path=model_path,
        model_fp=model_fp,
        out=out,
        tokenizer=tokenizer,
        tasks=task_list,
        data=data,
        grid=grid,
        seeds=seed_list,
        recipe=finetune.Recipe(epochs=epochs),
        device=torch_device,
        precision=precision,
        max_train_examples=max_train_examples,
        max_eval_examples=max_eval_examples,
        save_predictions=bool(save_predictions),
        hub=hub,
        glue_dir=glue_dir,
        threads=cpu_threads,
        stack=resolve_stack(stack, torch_device),
        group_by_length=bool(group_by_length),
        label=label,
        unpad=bool(unpad) and finetune.packing_applies(model_path),
    )


def run_plans(plans: Sequence[GluePlan], *, progress: bool = True) -> dict:
    """Every rank: take the jobs of every plan until all are done (see :mod:`budgetkd.glue.ledger`).
    Ranks come from torchrun's environment; no process group is needed or used."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if dist_utils.launched_by_torchrun() else 1
    worker = ledger.Worker.here(dist_utils.rank(), world)
    jobs = [job for plan in plans for job in plan.jobs()]
    log_path = plans[0].out / "logs" / f"glue-{worker.host}-rank{worker.rank}.log" if plans else None
    return ledger.run_jobs(jobs, worker=worker, progress=progress, log_path=log_path)


def finish_glue(plan: GluePlan) -> dict:
    """Rank 0, once every job is in: glue.json and glue.md of ``plan`` from its run files."""
    results: dict[str, dict] = {}
    for task in plan.tasks:
        train, dev = plan.splits(task)
        records: dict[tuple[float, int, int], dict] = {}
        for job in plan.jobs():
            if job.task is not task:
                continue
            for lr, _, fingerprint, path in job.runs:
                record = load_cached_run(path, fingerprint, need_predictions=True)
                if record is None:
                    raise BudgetKDError(f"GLUE run {path} is missing or stale; run the grid again")
                records[(lr, job.batch_size, job.seed)] = record
        data = plan.data[task.name]
        entry = summarize_task(task, plan.grid, plan.seeds, records, data.missing_metrics)
        entry["train_examples"] = len(train)
        entry["dev_examples"] = {name: len(split) for name, split in dev.items()}
        if plan.save_predictions:
            _write_predictions(plan.out, task, entry, records, plan.seeds[0])
        results[task.name] = entry
    average, average_tasks = average_score(results)
    if plan.hub:
        data_info = {"source": "hub", "dataset": "nyu-mll/glue", "description": "`nyu-mll/glue` (hub)"}
    else:
        data_info = {"source": "glue_dir", "path": str(plan.glue_dir), "description": f"`{plan.glue_dir}`"}
    glue = {
        "model": str(plan.model_path),
        "model_fingerprint": plan.model_fp,
        "data": data_info,
        "recipe": {
            **plan.recipe.as_dict(),
            "precision": plan.precision,
            "device": plan.device.type,
            "cpu_threads": plan.threads,
            "stacked": plan.stack,
            "group_by_length": plan.group_by_length,
            "unpad": plan.unpad,
        },
        "grid": plan.grid.as_dict(),
        "seeds": list(plan.seeds),
        "epochs": plan.recipe.epochs,
        "max_train_examples": plan.max_train_examples,
        "max_eval_examples": plan.max_eval_examples,
        "tasks": results,
        "average": average,
        "average_tasks": average_tasks,
    }
    atomic_write_json(plan.out / "glue.json", glue)
    atomic_write_text(plan.out / "glue.md", render_markdown(glue))
    return glue


def run_glue(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    glue_dir: str | Path | None = None,
    hub: bool = False,
    tasks: str | Iterable[str] | None = "all",
    grid: str | Grid = "paper",
    epochs: int = 5,
    seeds: str | int | Sequence[int] = (1,),
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    save_predictions: bool = False,
    device: str = "auto",
    threads: int | None = None,
    stack: bool | str | None = None,
    group_by_length: bool = False,
    unpad: bool = True,
    progress: bool = True,
) -> dict | None:
    """Fine-tune ``model_dir`` on the GLUE ``tasks`` over ``grid`` × ``seeds``; return glue.json
    (on rank 0; None on the other ranks of a torchrun launch, which only take jobs).

    glue.json::

        {
          "model": "/abs/model_dir", "model_fingerprint": "<sha256>",
          "data": {"source": "glue_dir" | "hub", "path" | "dataset": ..., "description": ...},
          "recipe": {epochs, max_length, weight_decay, warmup_proportion, adam_betas, adam_epsilon,
                     max_grad_norm, eval_batch_size, version, "precision": "fp32" | "bf16",
                     "device": "cpu" | "cuda", "cpu_threads": n | null, "stacked": bool,
                     "group_by_length": bool, "unpad": bool},
          "grid": {"learning_rates": [...], "batch_sizes": [...]}, "seeds": [...], "epochs": 5,
          "max_train_examples": null | N, "max_eval_examples": null | N,
          "tasks": {
            "<task>": {
              "metrics": {"<metric>": value | null, ...},   # best configuration, mean over seeds
              "main_metric": "accuracy", "score_metrics": ["accuracy"], "score": value | null,
              "best": {"lr": 5e-05, "batch_size": 32},
              "std": {"<metric>": sd, ..., "score": sd},      # only with several seeds
              "missing": ["accuracy_mismatched"],            # metrics without data
              "configurations": [{"lr", "batch_size", "metrics", "score", "std"?}, ...],
              "runs": [{"lr", "batch_size", "seed", "metrics", "score", "train_examples",
                        "train_steps", "final_loss", "train_seconds", "eval_seconds"}, ...],
              "train_examples": N, "dev_examples": {"dev": N, ...}
            }, ...
          },
          "average": mean of the task scores | null, "average_tasks": ["rte", ...]
        }

    ``threads``: CPU threads per job (default 1, whatever the number of ranks). ``stack``: train
    the learning rates of a (task, batch size, seed) together (None = auto: on CUDA).
    ``group_by_length``: length-grouped training batches (changes the recipe; off by default).
    ``unpad``: packed batches without padding, training and evaluation (the same batches, loss
    and steps; BERT classifiers; others run padded); False = padded batches.

    Values are fractions ([0, 1], correlations [-1, 1]). The task score is the main metric, except
    STS-B (mean of Pearson and Spearman); MNLI's is the matched accuracy.
    """
    main = dist_utils.rank() == 0
    with contextlib.ExitStack() as lock:
        return _run_one(
            main,
            lock,
            model_dir,
            out_dir,
            glue_dir=glue_dir,
            hub=hub,
            tasks=tasks,
            grid=grid,
            epochs=epochs,
            seeds=seeds,
            max_train_examples=max_train_examples,
            max_eval_examples=max_eval_examples,
            save_predictions=save_predictions,
            device=device,
            threads=threads,
            stack=stack,
            group_by_length=group_by_length,
            unpad=unpad,
            progress=progress,
        )


def _run_one(main: bool, lock: contextlib.ExitStack, model_dir, out_dir, *, progress: bool, **options):
    plan = plan_glue(model_dir, out_dir, lock=lock if main else None, **options)
    run_plans([plan], progress=progress)
    return finish_glue(plan) if main else None


def _write_predictions(out: Path, task: GlueTask, entry: dict, records: dict, seed: int) -> None:
    """The dev predictions of the best configuration's run with ``seed`` (the first seed)."""
    best = entry.get("best")
    if not best:
        return
    path = run_path(out, task.name, best["lr"], best["batch_size"], seed)
    splits = load_run_predictions(path, records[(best["lr"], best["batch_size"], seed)]["fingerprint"])
    if not splits:
        raise BudgetKDError(f"the predictions file beside {path} is missing; delete {path} and run again")
    for split, stored in splits.items():
        atomic_write_text(
            out / "predictions" / f"{task.name}-{split}.jsonl",
            prediction_lines(stored["labels"], stored["predictions"]),
        )
