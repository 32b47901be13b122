"""``run_glue``: fine-tune one model directory on GLUE with the grid search of SPEC §6.

Outputs under ``out_dir`` (locked with :func:`budgetkd.io.locked` while running):

- ``runs/<task>/lr<lr>-bs<bs>-seed<seed>.json`` (+ ``.predictions.json``): one per run, the cache;
- ``glue.json``: the results (schema in :func:`run_glue`'s docstring);
- ``glue.md``: the same as readable tables;
- ``predictions/<task>-<split>.jsonl`` with ``save_predictions``: the dev predictions of the best
  configuration's first seed, one ``{"index", "label", "prediction"}`` per example.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from budgetkd.errors import BudgetKDError
from budgetkd.glue import finetune
from budgetkd.glue.loading import GlueData, check_glue_dir, load_task
from budgetkd.glue.report import prediction_lines, render_markdown
from budgetkd.glue.search import (
    Grid,
    average_score,
    load_cached_run,
    load_run_predictions,
    parse_grid,
    parse_seeds,
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
    progress: bool = True,
) -> dict:
    """Fine-tune ``model_dir`` on the GLUE ``tasks`` over ``grid`` × ``seeds``; return glue.json.

    glue.json::

        {
          "model": "/abs/model_dir", "model_fingerprint": "<sha256>",
          "data": {"source": "glue_dir" | "hub", "path" | "dataset": ..., "description": ...},
          "recipe": {epochs, max_length, weight_decay, warmup_proportion, adam_betas, adam_epsilon,
                     max_grad_norm, eval_batch_size, version, "precision": "fp32" | "bf16",
                     "device": "cpu" | "cuda"},
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

    ``threads``: CPU threads for training; None = PyTorch's default.

    Values are fractions ([0, 1], correlations [-1, 1]). The task score is the main metric, except
    STS-B (mean of Pearson and Spearman); MNLI's is the matched accuracy.
    """
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
    recipe = finetune.Recipe(epochs=epochs)

    with locked(out):
        model_fp = fingerprint_model_dir(model_path)
        check_same_model(out, model_fp)
        tokenizer = finetune.load_tokenizer(model_path)
        # Read (and so validate) every task's files before the first hour of training.
        all_data = {task.name: load_task(task, glue_dir=glue_dir, hub=hub) for task in task_list}
        configurations = grid.configurations()
        total = len(task_list) * len(configurations) * len(seed_list)
        results: dict[str, dict] = {}
        with tqdm(total=total, desc="GLUE", unit="run", disable=not progress) as bar:
            for task in task_list:
                results[task.name] = _run_task(
                    task,
                    all_data.pop(task.name),
                    model_path=model_path,
                    model_fp=model_fp,
                    tokenizer=tokenizer,
                    out=out,
                    grid=grid,
                    seeds=seed_list,
                    recipe=recipe,
                    device=torch_device,
                    precision=precision,
                    max_train_examples=max_train_examples,
                    max_eval_examples=max_eval_examples,
                    need_predictions=save_predictions,
                    threads=threads,
                    progress=progress,
                    bar=bar,
                )
        average, average_tasks = average_score(results)
        if hub:
            data_info = {"source": "hub", "dataset": "nyu-mll/glue", "description": "`nyu-mll/glue` (hub)"}
        else:
            data_info = {"source": "glue_dir", "path": str(glue_dir), "description": f"`{glue_dir}`"}
        glue = {
            "model": str(model_path),
            "model_fingerprint": model_fp,
            "data": data_info,
            "recipe": {**recipe.as_dict(), "precision": precision, "device": torch_device.type},
            "grid": grid.as_dict(),
            "seeds": list(seed_list),
            "epochs": epochs,
            "max_train_examples": max_train_examples,
            "max_eval_examples": max_eval_examples,
            "tasks": results,
            "average": average,
            "average_tasks": average_tasks,
        }
        atomic_write_json(out / "glue.json", glue)
        atomic_write_text(out / "glue.md", render_markdown(glue))
    return glue


def _run_task(
    task: GlueTask,
    data: GlueData,
    *,
    model_path: Path,
    model_fp: str,
    tokenizer,
    out: Path,
    grid: Grid,
    seeds: tuple[int, ...],
    recipe: finetune.Recipe,
    device: torch.device,
    precision: str,
    max_train_examples: int | None,
    max_eval_examples: int | None,
    need_predictions: bool,
    threads: int | None,
    progress: bool,
    bar,
) -> dict:
    train_split = _subset_train(data, max_train_examples)
    dev_splits = {
        name: split.select(list(range(min(len(split), max_eval_examples)))) if max_eval_examples else split
        for name, split in data.dev.items()
    }
    encoded: tuple | None = None  # tokenized lazily: a fully cached task never tokenizes
    records: dict[tuple[float, int, int], dict] = {}
    for lr, bs in grid.configurations():
        for seed in seeds:
            inputs = {
                "model": model_fp,
                "data": data.fingerprint,
                "task": task.name,
                "recipe": recipe.as_dict(),
                "lr": lr,
                "batch_size": bs,
                "seed": seed,
                "max_train_examples": max_train_examples,
                "max_eval_examples": max_eval_examples,
                "subset_seed": SUBSET_SEED,
                "precision": precision,
            }
            fingerprint = sha256_json(inputs)
            path = run_path(out, task.name, lr, bs, seed)
            label = f"{task.name} lr={lr:g} bs={bs} seed={seed}"
            bar.set_postfix_str(label)
            record = load_cached_run(
                path, fingerprint, need_predictions=need_predictions and seed == seeds[0]
            )
            if record is None:
                if encoded is None:
                    encoded = (
                        finetune.encode_split(tokenizer, train_split, task, recipe.max_length),
                        {
                            n: finetune.encode_split(tokenizer, s, task, recipe.max_length)
                            for n, s in dev_splits.items()
                        },
                    )
                used_threads = finetune.configure_threads(threads) if device.type == "cpu" else None
                result = finetune.fine_tune(
                    model_path,
                    task,
                    tokenizer,
                    encoded[0],
                    encoded[1],
                    learning_rate=lr,
                    batch_size=bs,
                    seed=seed,
                    recipe=recipe,
                    device=device,
                    precision=precision,
                    progress=progress,
                    description=label,
                )
                record = {
                    "task": task.name,
                    "lr": lr,
                    "batch_size": bs,
                    "seed": seed,
                    "fingerprint": fingerprint,
                    "fingerprint_inputs": inputs,
                    "metrics": result.metrics,
                    "missing": data.missing_metrics,
                    "train_examples": result.train_examples,
                    "train_steps": result.train_steps,
                    "final_loss": result.final_loss,
                    "train_seconds": round(result.train_seconds, 3),
                    "eval_seconds": round(result.eval_seconds, 3),
                    "device": device.type,
                    "cpu_threads": used_threads,
                    "precision": precision,
                    "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
                predictions = {
                    name: {"labels": result.labels[name], "predictions": result.predictions[name]}
                    for name in result.predictions
                }
                save_run(path, record, predictions)
                status = f"{record['train_seconds']:.1f} s"
            else:
                status = "cached"
            records[(lr, bs, seed)] = record
            bar.update(1)
            if progress:
                shown = ", ".join(f"{k}={v:.4f}" for k, v in record["metrics"].items())
                tqdm.write(f"{label}: {shown} ({status})")
    entry = summarize_task(task, grid, seeds, records, data.missing_metrics)
    entry["train_examples"] = len(train_split)
    entry["dev_examples"] = {name: len(split) for name, split in dev_splits.items()}
    if need_predictions:
        _write_predictions(out, task, entry, records, seeds[0])
    return entry


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
