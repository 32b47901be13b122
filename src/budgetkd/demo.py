"""``budgetkd demo``: run the embedded default comparison (``configs/demo.yaml``).

With no paths it reads WikiText-2 and GLUE from the Hugging Face hub; offline, point it at local
copies: ``budgetkd demo --corpus PATH --glue-dir PATH``.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from budgetkd.errors import BudgetKDError

HUB_CORPUS = "hf:wikitext:wikitext-2-raw-v1"
OFFLINE_HINT = (
    "the Hugging Face hub is unreachable; run the demo on local data instead: "
    "budgetkd demo --corpus PATH --glue-dir PATH (e.g. ../shared/data/corpus and ../shared/data/glue)"
)


def demo_config_path() -> Path:
    return Path(str(resources.files("budgetkd") / "configs" / "demo.yaml"))


def _hub_reachable(timeout: float = 10.0) -> bool:
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info("nyu-mll/glue", timeout=timeout)
        return True
    except Exception:
        return False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus", nargs="+", metavar="PATH", help="local corpus files or folders (default: the hub)"
    )
    parser.add_argument("--glue-dir", metavar="PATH", help="classic glue_data folder (default: nyu-mll/glue)")
    parser.add_argument("--out", default="budgetkd-demo", metavar="DIR")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from budgetkd.experiment import compare

    overrides = {}
    overrides["data.inputs"] = [str(Path(p)) for p in args.corpus] if args.corpus else [HUB_CORPUS]
    overrides["glue.dir"] = str(Path(args.glue_dir)) if args.glue_dir else None
    if (not args.corpus or not args.glue_dir) and not _hub_reachable():
        raise BudgetKDError(OFFLINE_HINT)
    compare(
        demo_config_path(), args.out, force=args.force, overrides=overrides, progress=not args.no_progress
    )
    print(f"demo finished: {Path(args.out) / 'table.md'}")
    return 0
