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
def _flag_value(text: str):
    """A flag's value as YAML reads it (``8`` → 8, ``1e-3`` → 0.001, ``none`` → 'none'); the
    schema (:class:`budgetkd.config.TrainConfig`) then checks type and range in one line."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _add_pretrain(parser: argparse.ArgumentParser) -> None:
    """The flags are :func:`budgetkd.config.cli_fields`: one per TrainConfig field marked ``cli``,
    with the field's description as help (no hand-mapped flags)."""
    from budgetkd.config import cli_fields

    parser.add_argument(
        "--config", metavar="RUN.yaml", help="YAML with any TrainConfig field; flags override it"
    )
    for name, (metavar, info) in cli_fields().items():
        flag = "--" + name.replace("_", "-")
        if metavar == "flag":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=info.description
            )
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        help_text = (info.description or "") + (f" (default: {default})" if default is not None else "")
        parser.add_argument(
            flag, dest=name, metavar=metavar, type=_flag_value, help=help_text.strip() or None
        )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option, e.g. --set temperature=2 --set layer_map=[[-1,-1]] (YAML values)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    parser.add_argument("--no-progress", action="store_true")


def build_train_config(args: argparse.Namespace):
    import yaml

    from budgetkd.config import TrainConfig, cli_fields
    from budgetkd.io import read_yaml

    values: dict = {}
    if args.config:
        loaded = read_yaml(args.config, "run config")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise BudgetKDError(f"run config {args.config} must be a mapping of options")
        values.update(loaded)
    for name in cli_fields():
        value = getattr(args, name)
        if value is not None:
            values[name] = str(value) if name in _TEXT_FIELDS else value
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
    if args.no_progress:
        values["progress"] = False
    for required in ("data", "out"):
        if not values.get(required):
            raise BudgetKDError(f"--{required} is required (or set {required!r} in --config)")
    return TrainConfig.from_dict(values)


# flags whose value is text even when it reads as a number (a data directory named 2024)
_TEXT_FIELDS = {"data", "out", "student", "strategy", "teacher", "budget", "device"}


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


# -- schema -------------------------------------------------------------------------------------
def _add_schema(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE", help="write it to FILE (default: standard output)")


def _run_schema(args: argparse.Namespace) -> int:
    import json

    from budgetkd.config import json_schema
    from budgetkd.io import atomic_write_text

    text = json.dumps(json_schema(), indent=1) + "\n"
    if args.out:
        atomic_write_text(Path(args.out), text)
    else:
        print(text, end="")
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
    "schema": ("print the JSON Schema of an experiment YAML (for editors)", _add_schema, _run_schema),
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
