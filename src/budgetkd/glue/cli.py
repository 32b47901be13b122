"""``budgetkd glue MODEL_DIR --out DIR ...``: the argparse part of the GLUE command.

Under ``torchrun --nproc_per_node N -m budgetkd glue ...`` (or across nodes sharing ``--out``)
every rank takes jobs of the grid until none are left; rank 0 writes glue.json.

The main CLI calls :func:`add_arguments` on its ``glue`` sub-parser and :func:`run` with the parsed
namespace; :class:`~budgetkd.errors.BudgetKDError` propagates to it (one-line message, exit 2).
``python -m budgetkd.glue.cli`` runs the command on its own.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from budgetkd.errors import BudgetKDError

TASK_NAMES = "cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", metavar="MODEL_DIR", help="a save_pretrained directory (weights + tokenizer)"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (locked while running)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--glue-dir", metavar="PATH", help="classic glue_data folder (CoLA/, SST-2/, ...)")
    source.add_argument("--hub", action="store_true", help="load nyu-mll/glue with datasets.load_dataset")
    parser.add_argument("--tasks", default="all", help=f"'all' or a comma-separated subset of {TASK_NAMES}")
    parser.add_argument(
        "--grid",
        default="paper",
        help="'paper' (bs 16,32 x lr 1e-5,3e-5,5e-5,8e-5), 'lr=5e-5,bs=32' or lists 'lr=1e-5:3e-5,bs=16:32'",
    )
    parser.add_argument(
        "--epochs", type=int, default=5, help="fine-tuning epochs per configuration (default 5)"
    )
    parser.add_argument("--seeds", default="1", help="comma-separated seeds, e.g. 1,2,3 (default 1)")
    parser.add_argument(
        "--max-train-examples",
        type=int,
        metavar="N",
        help="train on the first N examples of a fixed shuffle (same subset for every configuration)",
    )
    parser.add_argument(
        "--max-eval-examples", type=int, metavar="N", help="evaluate on the first N dev examples"
    )
    parser.add_argument(
        "--save-predictions",
        action="store_true",
        help="write the best configuration's dev predictions to DIR/predictions/<task>-<split>.jsonl",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads per job (default 1, whatever the number of ranks: the thread count changes "
        "the float results; on CPU run more ranks instead, torchrun --nproc_per_node $(nproc))",
    )
    stack = parser.add_mutually_exclusive_group()
    stack.add_argument(
        "--stack",
        dest="stack",
        action="store_true",
        default=None,
        help="train the learning rates of each (task, batch size, seed) together as one stacked model "
        "(default: on CUDA only, where it is faster)",
    )
    stack.add_argument("--no-stack", dest="stack", action="store_false", help="one configuration at a time")
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="length-grouped training batches (less padding; changes the recipe, so off by default)",
    )
    parser.add_argument(
        "--padded",
        action="store_true",
        help="padded batches instead of packed ones (the same mathematics; packing is faster)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from budgetkd.glue.pipeline import run_glue

    glue = run_glue(
        args.model_dir,
        args.out,
        glue_dir=args.glue_dir,
        hub=args.hub,
        tasks=args.tasks,
        grid=args.grid,
        epochs=args.epochs,
        seeds=args.seeds,
        max_train_examples=args.max_train_examples,
        max_eval_examples=args.max_eval_examples,
        save_predictions=args.save_predictions,
        device=args.device,
        threads=getattr(args, "threads", None),
        stack=getattr(args, "stack", None),
        group_by_length=getattr(args, "group_by_length", False),
        unpad=not getattr(args, "padded", False),
        progress=getattr(args, "progress", True),
    )
    if glue is None:  # a rank > 0 of a torchrun launch: it took jobs, rank 0 reports
        return 0
    scores = ", ".join(
        f"{name} {100 * entry['score']:.1f}" if entry["score"] is not None else f"{name} missing"
        for name, entry in glue["tasks"].items()
    )
    average = "missing" if glue["average"] is None else f"{100 * glue['average']:.1f}"
    print(f"GLUE dev: {scores}; average {average} -> {args.out}/glue.json, glue.md")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="budgetkd glue", description="Fine-tune and evaluate a model on GLUE."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except BudgetKDError as exc:
        print(f"budgetkd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
