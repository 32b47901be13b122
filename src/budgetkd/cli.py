"""The ``budgetkd`` command line. Every :class:`BudgetKDError` becomes ``budgetkd: error: …`` on
one line and exit status 2; argparse usage errors also exit 2."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from budgetkd.errors import BudgetKDError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# -- prepare ------------------------------------------------------------------------------------
def _add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="text files or folders (.txt/.raw/.jsonl) and hub datasets hf:NAME[:CONFIG][:SPLIT]",
    )
    parser.add_argument("--out", required=True, metavar="DATA_DIR")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--tokenizer", metavar="PATH_OR_HUB_ID", help="the teacher's tokenizer (dir, vocab.txt or hub id)"
    )
    group.add_argument(
        "--train-tokenizer",
        type=_positive_int,
        metavar="VOCAB_SIZE",
        help="train an uncased WordPiece of this size on the corpus",
    )
    parser.add_argument("--seq-len", type=_positive_int, default=128)
    parser.add_argument("--validation-fraction", type=_float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="tokenizing processes (default: every available core; the output does not depend on it)",
    )
    parser.add_argument("--no-progress", action="store_true")


def _run_prepare(args: argparse.Namespace) -> int:
    from budgetkd.data import prepare_dataset

    meta = prepare_dataset(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        train_tokenizer=args.train_tokenizer,
        seq_len=args.seq_len,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        progress=not args.no_progress,
        workers=args.workers,
    )
    print(
        f"prepared {args.out}: {meta['num_documents']} documents, {meta['num_train_sequences']} train / "
        f"{meta['num_valid_sequences']} validation sequences of {meta['seq_len']} tokens, vocabulary {meta['vocab_size']}"
    )
    return 0


# -- pretrain -----------------------------------------------------------------------------------
_PRETRAIN_FLAGS = {
    # flag dest → TrainConfig field
    "data": "data",
    "out": "out",
    "student": "student",
    "strategy": "strategy",
    "teacher": "teacher",
    "budget": "budget",
    "batch_size": "batch_size",
    "micro_batch_size": "micro_batch_size",
    "lr": "lr",
    "warmup": "warmup",
    "seed": "seed",
    "data_seed": "data_seed",
    "max_epochs": "max_epochs",
    "device": "device",
    "num_evals": "num_evals",
    "checkpoint_every_steps": "checkpoint_every_steps",
    "on_nonfinite": "on_nonfinite",
    "dropout": "dropout",
    "max_grad_norm": "max_grad_norm",
}


def _add_pretrain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="RUN.yaml", help="YAML with any TrainConfig field; flags override it"
    )
    parser.add_argument("--data", metavar="DATA_DIR")
    parser.add_argument("--out", metavar="RUN_DIR")
    parser.add_argument(
        "--student", metavar="PRESET|FILE", help="bert-tiny, bert-mini, bert-small, bert-6l-768, … or YAML"
    )
    parser.add_argument("--strategy", help="none, vanilla, tinybert, minilm, minilmv2")
    parser.add_argument("--teacher", metavar="PATH_OR_HUB_ID")
    parser.add_argument("--budget", help="90s, 30m, 4h, 2.5e15flops, 3e6tokens, 500steps, 1epochs")
    parser.add_argument("--batch-size", type=_positive_int)
    parser.add_argument("--micro-batch-size", type=_positive_int)
    parser.add_argument("--lr", type=_float, help="peak learning rate (default: 1e-3 No-KD, 5e-4 KD)")
    parser.add_argument("--warmup", type=_float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-seed", type=int)
    parser.add_argument(
        "--max-epochs", type=_float, help="data limit: never start a step beyond this many epochs"
    )
    parser.add_argument("--dropout", type=_float)
    parser.add_argument("--max-grad-norm", type=_float)
    parser.add_argument("--num-evals", type=_positive_int)
    parser.add_argument("--checkpoint-every-steps", type=int)
    parser.add_argument("--on-nonfinite", choices=["stop", "skip"])
    parser.add_argument("--device", help="auto, cpu, cuda")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option, e.g. --set temperature=2 --set layer_map=[[-1,-1]] (YAML values)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (GPU)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    parser.add_argument("--no-progress", action="store_true")


def build_train_config(args: argparse.Namespace):
    import yaml

    from budgetkd.io import read_yaml
    from budgetkd.train import TrainConfig

    values: dict = {}
    if args.config:
        loaded = read_yaml(args.config, "run config")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise BudgetKDError(f"run config {args.config} must be a mapping of options")
        values.update(loaded)
    for dest, field_name in _PRETRAIN_FLAGS.items():
        value = getattr(args, dest)
        if value is not None:
            values[field_name] = value
    options = dict(values.get("strategy_options") or {})
    for item in args.set:
        if "=" not in item:
            raise BudgetKDError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise BudgetKDError(f"--set {item!r}: the value is not valid YAML") from None
    if options:
        values["strategy_options"] = options
    if args.compile:
        values["compile"] = True
    if args.no_progress:
        values["progress"] = False
    for required in ("data", "out"):
        if not values.get(required):
            raise BudgetKDError(f"--{required} is required (or set {required!r} in --config)")
    try:
        return TrainConfig.from_dict(values)
    except TypeError as exc:
        raise BudgetKDError(f"bad pretraining option: {exc}") from None


def _run_pretrain(args: argparse.Namespace) -> int:
    from budgetkd import distributed
    from budgetkd.plan import check_pretrain
    from budgetkd.train import pretrain

    config = build_train_config(args)
    distributed.init_if_launched()
    try:
        check_pretrain(config)  # configs and headers only: refused in seconds, before any weight load
        summary = pretrain(config, resume=args.resume)
    finally:
        distributed.destroy()
    if distributed.rank() == 0:
        consumed = summary["consumed"]
        loss = summary.get("val_mlm_loss")
        print(
            f"{summary['display_name']}: {consumed['steps']} steps, {consumed['tokens']:,} tokens, "
            f"{consumed['time_s']:.1f}s charged, {consumed['flops']:.3g} FLOPs "
            f"(teacher {100 * consumed['flops_teacher_share']:.0f}%), {consumed['tokens_per_s']:,.0f} tokens/s, "
            f"val_mlm_loss {loss:.3f}; model in {Path(config.out) / 'model'}"
        )
    return 0


# -- glue, compare, report, demo (their modules own their arguments) ------------------------------
def _lazy(module: str) -> tuple[Callable, Callable]:
    def add(parser: argparse.ArgumentParser) -> None:
        __import__(module, fromlist=["add_arguments"]).add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        return __import__(module, fromlist=["run"]).run(args)

    return add, run


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "prepare": ("tokenize and pack a corpus into training data", _add_prepare, _run_prepare),
    "pretrain": ("pretrain a student with one strategy under a budget", _add_pretrain, _run_pretrain),
    "glue": ("fine-tune and evaluate a model on GLUE", *_lazy("budgetkd.glue.cli")),
    "compare": ("run the whole comparison from one YAML", *_lazy("budgetkd.experiment")),
    "report": ("write the comparison table and plots of a compare directory", *_lazy("budgetkd.report")),
    "demo": ("run the embedded demo comparison (configs/demo.yaml)", *_lazy("budgetkd.demo")),
}


def build_parser() -> argparse.ArgumentParser:
    from budgetkd import __version__

    parser = argparse.ArgumentParser(prog="budgetkd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"budgetkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, _run) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--budget -3steps`` → ``--budget=-3steps``: argparse takes a value that starts with ``-``
    and is not a plain number for an option and answers "expected one argument"; attached, the
    value reaches its own check, which refuses it with its own message (a negative budget, a
    negative learning rate written ``-1e-3``)."""
    out: list[str] = []
    for token in argv:
        if out and _NEGATIVE.match(token) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


_NEGATIVE = re.compile(r"^-\.?[0-9]")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return int(COMMANDS[args.command][2](args) or 0)
    except BudgetKDError as exc:
        print(f"budgetkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "budgetkd: interrupted; re-run the same command (with --resume for pretrain) to continue",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
