"""GLUE fine-tuning throughput, side by side: the HF ``Trainer`` against budgetkd, one
configuration at a time and a learning-rate group trained together (stacked); and the grid wall
time of one small task with 1 process against N gloo ranks.

Rows (same model, task subset, epochs, batch size, thread count; training examples/s per
configuration trained)
-------------------------------------------------------------------------------------------------
trainer_pad128   ``transformers.Trainer`` as ``run_glue.py`` uses it: every example padded to
                 128 tokens (``pad_to_max_length``), ``default_data_collator``
trainer_dynamic  ``Trainer`` with ``DataCollatorWithPadding`` (pad per batch), the stronger anchor
budgetkd         ``budgetkd.glue.finetune.fine_tune`` padded (``unpad=False``): one configuration
budgetkd_stacked ``budgetkd.glue.stacked.fine_tune_stacked`` padded: ``--configs`` learning rates at
                 once, examples/s = configs × examples × epochs / time
budgetkd_grouped ``fine_tune`` padded with ``group_by_length`` (not the paper recipe; for scale)
budgetkd_unpadded ``fine_tune`` unpadded (the default): the same batches packed into rows of
                 ≤ 128 tokens, attention blocked per example; on CPU with the padded batch's
                 dropout masks (``budgetkd.glue.packed_dropout``)
budgetkd_stacked_unpadded ``fine_tune_stacked`` unpadded

Every row trains ``--epochs`` over the same first ``--examples`` training examples (a fixed
shuffle), AdamW, linear schedule with 6 % warm-up, weight decay 0.01, clipping 1.0; the time is the
training loop only (Trainer: ``trainer.train()``; budgetkd: its ``train_seconds``). Rows run
interleaved ``--repeats`` times (the machine may be shared); the median is reported, with the
load average before and after.

``--clock process`` reads the process's CPU seconds instead (``time.process_time``; the rows run
one thread, so on a loaded machine this is the time the row was actually given): Trainer around
``trainer.train()``, budgetkd around the whole ``fine_tune`` call (the classifier's load and the
32-example dev pass included, against budgetkd). Every row records both clocks' samples
(``wall_samples``, ``process_samples``); ``examples_per_s``, ``samples`` and the speed-ups use
``--clock`` (``report["clock"]``).

Grid (``--grid-ranks 4``): ``budgetkd glue`` on ``--grid-task`` with the paper grid (8
configurations, ``--no-stack``), 1 process against ``torchrun --nproc_per_node N`` (gloo, one
thread per rank): wall time, speed-up, and efficiency = speed-up ÷ min(N, usable cores), the
linear speed-up in jobs per core.

Usage::

    python benchmarks/glue_throughput.py --glue-dir ../shared/data/glue --tasks sst2,mrpc \\
        --examples 1000 --batch-size 32 --epochs 1 --repeats 2 --grid-ranks 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

from budgetkd.glue import finetune  # noqa: E402
from budgetkd.glue.loading import load_local  # noqa: E402
from budgetkd.glue.pipeline import _subset_train  # noqa: E402
from budgetkd.glue.stacked import fine_tune_stacked  # noqa: E402
from budgetkd.glue.tasks import TASKS  # noqa: E402

LEARNING_RATES = (1e-5, 3e-5, 5e-5, 8e-5)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def make_model(path: Path, vocab_dir: Path, layers: int, hidden: int) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(vocab_dir), do_lower_case=True)
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
    )
    torch.manual_seed(0)
    with finetune.quiet_transformers():
        BertForMaskedLM(config).save_pretrained(path)
    return path


def trainer_row(
    model_dir: Path, task, split, *, pad128: bool, batch_size: int, epochs: int, work: Path
) -> float:
    """(wall, process CPU) seconds of ``trainer.train()``."""
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator

    tokenizer = finetune.load_tokenizer(model_dir)
    padding = {"padding": "max_length", "max_length": 128} if pad128 else {"max_length": 128}
    encoded = tokenizer(*split.texts, truncation=True, **padding)
    columns = {k: list(v) for k, v in encoded.items()}
    columns["labels"] = list(split.labels)
    dataset = datasets.Dataset.from_dict(columns)
    steps = epochs * math.ceil(len(split) / batch_size)
    args = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=batch_size,
        num_train_epochs=epochs,
        learning_rate=LEARNING_RATES[0],
        weight_decay=0.01,
        warmup_steps=math.ceil(0.06 * steps),
        max_grad_norm=1.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        seed=1,
    )
    torch.manual_seed(1)
    model = finetune.load_classifier(model_dir, task, tokenizer.pad_token_id)
    collator = default_data_collator if pad128 else DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    started, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - started, time.process_time() - cpu


def measure(args, task_name: str, model_dir: Path, work: Path) -> dict:
    task = TASKS[task_name]
    data = load_local(task, args.glue_dir)
    split = _subset_train(data, args.examples)
    tokenizer = finetune.load_tokenizer(model_dir)
    train = finetune.encode_split(tokenizer, split, task, 128)
    dev = {"dev": finetune.encode_split(tokenizer, data.dev["dev"].select(list(range(32))), task, 128)}
    recipe = finetune.Recipe(epochs=args.epochs)
    device = finetune.resolve_device(args.device)
    precision = finetune.precision_for(device)
    common = dict(batch_size=args.batch_size, seed=1, recipe=recipe, device=device, precision=precision)
    lrs = LEARNING_RATES[: args.configs]
    n = len(split) * args.epochs

    def budgetkd(grouped=False, unpad=False):
        cpu = time.process_time()
        result = finetune.fine_tune(
            model_dir,
            task,
            tokenizer,
            train,
            dev,
            learning_rate=lrs[0],
            progress=False,
            group_by_length=grouped,
            unpad=unpad,
            **common,
        )
        return n / result.train_seconds, n / (time.process_time() - cpu)

    def stacked(unpad=False):
        cpu = time.process_time()
        results = fine_tune_stacked(
            model_dir, task, tokenizer, train, dev, learning_rates=lrs, unpad=unpad, **common
        )
        return len(lrs) * n / results[0].train_seconds, len(lrs) * n / (time.process_time() - cpu)

    def trainer(pad128):
        wall, cpu = trainer_row(
            model_dir, task, split, pad128=pad128, batch_size=args.batch_size, epochs=args.epochs, work=work
        )
        return n / wall, n / cpu

    rows = {
        "trainer_pad128": lambda: trainer(True),
        "trainer_dynamic": lambda: trainer(False),
        "budgetkd": budgetkd,
        "budgetkd_stacked": stacked,
        "budgetkd_grouped": lambda: budgetkd(grouped=True),
        "budgetkd_unpadded": lambda: budgetkd(unpad=True),
        "budgetkd_stacked_unpadded": lambda: stacked(unpad=True),
    }
    rows = {k: v for k, v in rows.items() if k in args.rows}
    samples: dict[str, list[float]] = {k: [] for k in rows}
    clocks: dict[str, dict[str, list[float]]] = {k: {"wall": [], "process": []} for k in rows}
    for repeat in range(args.repeats):
        for name, fn in rows.items():  # interleaved: a load spike hits every row alike
            wall, process = fn()
            clocks[name]["wall"].append(wall)
            clocks[name]["process"].append(process)
            value = wall if args.clock == "wall" else process
            samples[name].append(value)
            print(
                f"  {task_name} repeat {repeat + 1} {name}: {wall:.1f} examples/s wall, "
                f"{process:.1f} per CPU second (load {load()})",
                flush=True,
            )
    out = {}
    lengths = train.lengths()
    for name, values in samples.items():
        median = statistics.median(values)
        row = {
            "examples_per_s": median,
            "samples": values,
            "wall_samples": clocks[name]["wall"],
            "process_samples": clocks[name]["process"],
        }
        for anchor, key in (
            ("trainer_pad128", "speedup_vs_trainer_pad128"),
            ("trainer_dynamic", "speedup_vs_trainer_dynamic"),
        ):
            if anchor in samples:
                row[key] = median / statistics.median(samples[anchor])
        out[name] = row
    return {"rows": out, "mean_tokens": float(np.mean(lengths)), "examples": len(split)}


def grid_wall_time(args, model_dir: Path, work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = [
        "glue",
        str(model_dir),
        "--glue-dir",
        str(args.glue_dir),
        "--tasks",
        args.grid_task,
        "--grid",
        "paper",
        "--epochs",
        "1",
        "--max-train-examples",
        str(args.grid_examples),
        "--max-eval-examples",
        "100",
        "--device",
        "cpu",
        "--no-stack",
        "--no-progress",
    ]
    results: dict[str, list[float]] = {"1": [], str(args.grid_ranks): []}
    for repeat in range(args.repeats):
        for ranks in (1, args.grid_ranks):
            out = work / f"grid-{ranks}-{repeat}"
            if ranks == 1:
                argv = [sys.executable, "-m", "budgetkd", *common, "--out", str(out)]
            else:
                argv = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    str(ranks),
                    "-m",
                    "budgetkd",
                    *common,
                    "--out",
                    str(out),
                ]
            started = time.perf_counter()
            subprocess.run(argv, env=env, check=True, capture_output=True)
            seconds = time.perf_counter() - started
            results[str(ranks)].append(seconds)
            print(f"  grid {args.grid_task} {ranks} rank(s): {seconds:.1f} s (load {load()})", flush=True)
    one, many = statistics.median(results["1"]), statistics.median(results[str(args.grid_ranks)])
    cores = finetune.available_cpus()
    linear = min(args.grid_ranks, cores)
    return {
        "task": args.grid_task,
        "jobs": 8,
        "ranks": args.grid_ranks,
        "cores": cores,
        "seconds_1": one,
        "seconds_n": many,
        "samples": results,
        "speedup": one / many,
        "linear_speedup": linear,
        "efficiency": one / many / linear,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", type=Path, default=HERE.parents[1] / "shared" / "data" / "glue")
    parser.add_argument(
        "--vocab-dir", type=Path, default=HERE.parents[1] / "shared" / "data" / "vocab" / "bert-base-uncased"
    )
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--configs", type=int, default=4, help="learning rates in the stacked group")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every row")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="what examples/s divides by: wall seconds, or the process's CPU seconds (a loaded machine)",
    )
    parser.add_argument(
        "--rows",
        default="trainer_pad128,trainer_dynamic,budgetkd,budgetkd_stacked,budgetkd_grouped,"
        "budgetkd_unpadded,budgetkd_stacked_unpadded",
    )
    parser.add_argument("--grid-ranks", type=int, default=0, help="also time the grid with 1 vs N ranks")
    parser.add_argument("--grid-task", default="rte")
    parser.add_argument("--grid-examples", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.rows = args.rows.split(",")
    torch.set_num_threads(args.threads)
    report = {
        "load_before": load(),
        "threads": args.threads,
        "model": {"layers": args.layers, "hidden": args.hidden},
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "configs": args.configs,
        "clock": args.clock,
        "tasks": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_model(work / "model", args.vocab_dir, args.layers, args.hidden)
        for task in filter(None, args.tasks.split(",")):  # --tasks '' : only the grid
            report["tasks"][task] = measure(args, task, model_dir, work)
        if args.grid_ranks:
            report["grid"] = grid_wall_time(args, model_dir, work)
    report["load_after"] = load()

    print(
        f"\nexamples/s ({args.clock} clock) per configuration trained ({args.layers} x {args.hidden}, batch {args.batch_size}, "
        f"{args.epochs} epoch(s), {args.threads} thread(s); load {report['load_before']} -> {report['load_after']})"
    )
    print(f"{'task':6} {'row':26} {'examples/s':>11} {'vs pad128':>10} {'vs dynamic':>11}")
    for task, result in report["tasks"].items():
        for name, row in result["rows"].items():
            print(
                f"{task:6} {name:26} {row['examples_per_s']:11.1f} {row.get('speedup_vs_trainer_pad128', float('nan')):10.2f} "
                f"{row.get('speedup_vs_trainer_dynamic', float('nan')):11.2f}"
            )
    if "grid" in report:
        g = report["grid"]
        print(
            f"grid {g['task']} ({g['jobs']} jobs): 1 process {g['seconds_1']:.1f} s, {g['ranks']} ranks "
            f"{g['seconds_n']:.1f} s: speed-up {g['speedup']:.2f} (linear on {g['cores']} cores: "
            f"{g['linear_speedup']}), efficiency {g['efficiency']:.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
