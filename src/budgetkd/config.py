"""The experiment configuration of ``budgetkd compare`` (YAML), validated up front.

Every unknown key, wrong type or impossible combination is a one-line :class:`BudgetKDError`
naming the key (``strategies[2].options``, ``budget.calibrate.currency``, …). The result is plain
data with every default filled in; the resolved form is saved beside the experiment's outputs.

Schema (defaults in brackets)::

    name: str                                   [the file's stem]
    seed: int                                   [0]   student init, dropout, data order, masks
    data:
      inputs: [PATH | hf:NAME[:CONFIG][:SPLIT], …]        (required, unless prepared)
      prepared: DIR                             [null] a `budgetkd prepare` output to use as is
                                                (its tokenizer and seq_len are checked first)
      tokenizer: teacher | PATH_OR_HUB_ID | {train: VOCAB_SIZE}   [teacher]
      seq_len: int                              [128]
      validation_fraction: float                [0.01]
    teacher:                                    (required unless every strategy is none)
      path: PATH_OR_HUB_ID                      one of path / pretrain
      fit_mlm_head: null | false | true | {budget [500steps], lr [1e-3], batch_size [32],
                    warmup [0.06], weight_decay [0], num_evals [5], eval_sequences [512]}
                    [null: fitted when the teacher is encoder-only and a strategy needs logits]
      pretrain: {student: ARCH, budget: BUDGET, batch_size: int, lr: float, micro_batch_size: int,
                 dropout: float [null = BERT's 0.1]}
    student: PRESET | {layers, hidden, heads, intermediate}    (required)
    strategies: [none | vanilla | … | {name: …, lr: float, options: {…}}, …]   (required)
    budget:                                     exactly one of calibrate / explicit
      calibrate: {strategy: none, epochs: float [1], currency: time | flops [time]}
      explicit: BUDGET                          e.g. 4h, 2.5e15flops
      sweep: [float, …] | [BUDGET, …]          [none] multiples of that budget, or budgets (these
                                                alone: no calibrate/explicit); needs strategy none
      schedule: linear | wsd                    [linear] wsd: the sweep's points share a trunk
      decay_fraction: float                     [0.2]  wsd: decay over the last fraction
    report: {avg_tasks: paper | all | [task, …] [paper], bootstrap_samples [2000], bootstrap_seed [0]}
    teacher_cost: inference | free | {amortized: {pretraining: BUDGET | auto, students: int}}
                                                [inference] (SPEC §7a)
    data_setting: unlimited | limited           [unlimited]: a KD run never starts a 2nd epoch
    optimizer:
      batch_size [1024] (global), micro_batch_size [null → 64] (the most one device holds; the
      per-process micro-batch is its largest divisor ≤ this, see data.dataset.resolve_micro_batch),
      lr_no_kd [1e-3], lr_kd [5e-4], warmup [0.06],
      weight_decay [0.01], adam_betas [[0.9, 0.98]], adam_eps [1e-6], max_grad_norm [0]
    training: {num_evals [10], eval_sequences [512], dropout [null], fixed_mask_count [false],
               device [auto], checkpoint_interval_s [600], checkpoint_every_steps [0],
               on_nonfinite [stop]}
    glue:
      dir: PATH | null                          [null → the hub, nyu-mll/glue]
      tasks: all | [cola, sst2, …]              [all]
      grid: paper | "lr=…,bs=…"                 [paper]
      epochs: int [5], seeds: [int] [[1]], max_train_examples: int | null [null],
      max_eval_examples: int | null [null], save_predictions: bool [true], device [auto],
      stack: auto | bool [auto] (learning rates trained together; auto = on CUDA),
      group_by_length: bool [false], threads: int | null [null → 1 per job on CPU]
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from budgetkd.budget import Budget
from budgetkd.errors import BudgetKDError
from budgetkd.io import read_yaml

_NUMBER = (int, float)

OPTIMIZER_DEFAULTS = {
    "batch_size": 1024,
    "micro_batch_size": None,
    "lr_no_kd": 1e-3,
    "lr_kd": 5e-4,
    "warmup": 0.06,
    "weight_decay": 0.01,
    "adam_betas": [0.9, 0.98],
    "adam_eps": 1e-6,
    "max_grad_norm": 0.0,
}
TRAINING_DEFAULTS = {
    "num_evals": 10,
    "eval_sequences": 512,
    "dropout": None,
    "fixed_mask_count": False,
    "device": "auto",
    "checkpoint_interval_s": 600.0,
    "checkpoint_every_steps": 0,
    "on_nonfinite": "stop",
}
GLUE_DEFAULTS = {
    "dir": None,
    "tasks": "all",
    "grid": "paper",
    "epochs": 5,
    "seeds": [1],
    "max_train_examples": None,
    "max_eval_examples": None,
    "save_predictions": True,
    "device": "auto",
    "stack": "auto",
    "group_by_length": False,
    "threads": None,
}
DATA_DEFAULTS = {
    "inputs": None,
    "prepared": None,
    "tokenizer": "teacher",
    "seq_len": 128,
    "validation_fraction": 0.01,
}
TOP_KEYS = {
    "name",
    "seed",
    "data",
    "teacher",
    "student",
    "strategies",
    "budget",
    "data_setting",
    "optimizer",
    "training",
    "glue",
    "teacher_cost",
    "report",
}


def _type_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_type_name(k) for k in kind)
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        list: "a list",
        dict: "a mapping",
    }.get(kind, kind.__name__)


def _check(value: Any, kind, key: str, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float, _NUMBER))
    if kind in (float, _NUMBER) and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise BudgetKDError(f"config key {key!r} must be {_type_name(kind)}, got {value!r}")
    return value


def _merge(section: Any, defaults: dict, key: str) -> dict:
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise BudgetKDError(f"config key {key!r} must be a mapping, got {section!r}")
    unknown = set(section) - set(defaults)
    if unknown:
        raise BudgetKDError(f"unknown config key {key}.{sorted(unknown)[0]!r} (known: {', '.join(defaults)})")
    return {**copy.deepcopy(defaults), **section}


def _budget(value: Any, key: str) -> Budget:
    """Parse a budget (a string with a unit; a bare number is refused as unit-less), naming the key."""
    try:
        return Budget.parse(value if isinstance(value, (str, int, float)) else str(value))
    except BudgetKDError as exc:
        raise BudgetKDError(f"config key {key!r}: {exc}") from None


def _fit_mlm_head(block: Any) -> dict | bool | None:
    """``teacher.fit_mlm_head``: null (fit when the teacher is encoder-only and a strategy needs
    logits), false (never), true (always, defaults) or a mapping of :data:`HEAD_DEFAULTS` keys."""
    from budgetkd.teacher_head import HEAD_DEFAULTS

    if block is None or block is False:
        return block
    if block is True:
        block = {}
    block = _merge(block, HEAD_DEFAULTS, "teacher.fit_mlm_head")
    _budget(block["budget"], "teacher.fit_mlm_head.budget")
    block["budget"] = str(block["budget"])
    for key in ("batch_size", "num_evals", "eval_sequences"):
        _check(block[key], int, f"teacher.fit_mlm_head.{key}")
        if block[key] <= 0:
            raise BudgetKDError(f"config key 'teacher.fit_mlm_head.{key}' must be positive")
    for key in ("lr", "warmup", "weight_decay"):
        _check(block[key], float, f"teacher.fit_mlm_head.{key}")
    if not block["lr"] > 0:
        raise BudgetKDError("config key 'teacher.fit_mlm_head.lr' must be positive")
    if not 0 <= block["warmup"] < 1:
        raise BudgetKDError("config key 'teacher.fit_mlm_head.warmup' must lie in [0, 1)")
    return block


def check_teacher_path(path: str, key: str = "teacher.path") -> None:
    """Refuse, before any work, a local teacher that cannot be loaded: a file, or a directory
    without config.json or weights (a budgetkd run directory is accepted through its model/). A
    path that does not exist is left to the teacher stage: it may be a hub id."""
    local = Path(path)
    if not local.exists():
        return
    if not local.is_dir():
        raise BudgetKDError(
            f"config key {key!r}: teacher {path} is a file; give a model directory or a hub id"
        )

    def has_weights(folder: Path) -> bool:
        return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))

    if not has_weights(local) and (local / "model" / "config.json").is_file():
        local = local / "model"  # a budgetkd run directory
    if not (local / "config.json").is_file():
        raise BudgetKDError(f"config key {key!r}: teacher directory {local} has no config.json")
    if not has_weights(local):
        raise BudgetKDError(
            f"config key {key!r}: teacher directory {local} holds no weights (*.safetensors or *.bin)"
        )


def load_experiment(path: str | Path, overrides: dict | None = None) -> dict:
    """Read and validate an experiment YAML; ``overrides`` are merged (dotted keys allowed). A local
    teacher directory and the GLUE files are checked too (existence, not content), so that a
    teacher without weights or a missing GLUE task is refused before the data stage, not hours
    after it."""
    raw = read_yaml(path, "experiment config")
    if not isinstance(raw, dict):
        raise BudgetKDError(f"experiment config {path} must be a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    cfg = validate_experiment(raw, default_name=Path(path).stem)
    if cfg["teacher"] is not None and "path" in cfg["teacher"]:
        check_teacher_path(cfg["teacher"]["path"])
    if cfg["glue"]["dir"] is not None:
        from budgetkd.glue.loading import check_local_files
        from budgetkd.glue.tasks import parse_tasks

        for task in parse_tasks(cfg["glue"]["tasks"]):
            try:
                check_local_files(task, cfg["glue"]["dir"])
            except BudgetKDError as exc:
                raise BudgetKDError(f"config key 'glue.dir': {exc}") from None
    return cfg


def validate_experiment(raw: dict, default_name: str = "experiment") -> dict:
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise BudgetKDError(
            f"unknown config key {sorted(unknown)[0]!r} (known: {', '.join(sorted(TOP_KEYS))})"
        )
    cfg: dict = {
        "name": _check(raw.get("name", default_name), str, "name"),
        "seed": _check(raw.get("seed", 0), int, "seed"),
    }

    # data
    data = _merge(raw.get("data"), DATA_DEFAULTS, "data")
    inputs = data["inputs"]
    _check(data["prepared"], str, "data.prepared", optional=True)
    if inputs is None and data["prepared"] is not None:
        inputs = []  # a dataset prepared once (budgetkd prepare), shared by many experiments
    elif inputs is None:
        raise BudgetKDError(
            "config key 'data.inputs' is required (corpus files, folders or hf:NAME), "
            "or 'data.prepared: DIR' (a budgetkd prepare output)"
        )
    elif data["prepared"] is not None:
        raise BudgetKDError("config keys 'data.inputs' and 'data.prepared' exclude each other; give one")
    if isinstance(inputs, str):
        inputs = [inputs]
    _check(inputs, list, "data.inputs")
    if not inputs and data["prepared"] is None:
        raise BudgetKDError("config key 'data.inputs' must not be empty")
    for i, item in enumerate(inputs):
        _check(item, str, f"data.inputs[{i}]")
    data["inputs"] = inputs
    tok = data["tokenizer"]
    if isinstance(tok, dict):
        if set(tok) != {"train"}:
            raise BudgetKDError(
                "config key 'data.tokenizer' as a mapping takes exactly one key, 'train: VOCAB_SIZE'"
            )
        _check(tok["train"], int, "data.tokenizer.train")
    else:
        _check(tok, str, "data.tokenizer")
    _check(data["seq_len"], int, "data.seq_len")
    _check(data["validation_fraction"], float, "data.validation_fraction")
    cfg["data"] = data

    # student
    if "student" not in raw:
        raise BudgetKDError("config key 'student' is required (a preset such as bert-6l-768, or a mapping)")
    from budgetkd.models import resolve_architecture

    _check(raw["student"], (str, dict), "student")
    resolve_architecture(raw["student"])
    cfg["student"] = raw["student"]

    # strategies
    from budgetkd.strategies import REGISTRY

    strategies = raw.get("strategies")
    if strategies is None:
        raise BudgetKDError("config key 'strategies' is required, e.g. [none, vanilla, tinybert, minilm]")
    _check(strategies, list, "strategies")
    if not strategies:
        raise BudgetKDError("config key 'strategies' must not be empty")
    resolved = []
    for i, entry in enumerate(strategies):
        key = f"strategies[{i}]"
        if isinstance(entry, str):
            entry = {"name": entry}
        _check(entry, dict, key)
        unknown = set(entry) - {"name", "lr", "options", "label"}
        if unknown:
            raise BudgetKDError(
                f"unknown config key {key}.{sorted(unknown)[0]!r} (known: name, lr, options, label)"
            )
        name = _check(entry.get("name"), str, f"{key}.name")
        if name not in REGISTRY:
            raise BudgetKDError(
                f"config key '{key}.name': unknown strategy {name!r}; choose one of {', '.join(REGISTRY)}"
            )
        options = _check(entry.get("options", {}) or {}, dict, f"{key}.options")
        allowed = set(REGISTRY[name].defaults)
        bad = set(options) - allowed
        if bad:
            raise BudgetKDError(
                f"unknown config key {key}.options.{sorted(bad)[0]!r} for strategy {name!r} "
                f"(known: {', '.join(sorted(allowed)) or 'none'})"
            )
        lr = _check(entry.get("lr"), float, f"{key}.lr", optional=True)
        label = _check(entry.get("label", name), str, f"{key}.label")
        resolved.append({"name": name, "label": label, "lr": lr, "options": options})
    labels = [s["label"] for s in resolved]
    if len(set(labels)) != len(labels):
        raise BudgetKDError(
            "config key 'strategies': a strategy appears twice; give repeated ones distinct 'label's"
        )
    cfg["strategies"] = resolved
    needs_teacher = any(REGISTRY[s["name"]].needs_teacher for s in resolved)

    # teacher
    teacher = raw.get("teacher")
    if teacher is None:
        if needs_teacher:
            raise BudgetKDError(
                "config key 'teacher' is required by the KD strategies (path: … or pretrain: …)"
            )
        cfg["teacher"] = None
    else:
        _check(teacher, dict, "teacher")
        unknown = set(teacher) - {"path", "pretrain", "fit_mlm_head"}
        if unknown:
            raise BudgetKDError(
                f"unknown config key teacher.{sorted(unknown)[0]!r} (known: path, pretrain, fit_mlm_head)"
            )
        if ("path" in teacher) == ("pretrain" in teacher):
            raise BudgetKDError("config key 'teacher' needs exactly one of 'path' and 'pretrain'")
        if "pretrain" in teacher and teacher.get("fit_mlm_head") not in (None, False):
            raise BudgetKDError(
                "config key 'teacher.fit_mlm_head' applies to teacher.path only: "
                "a teacher pretrained by budgetkd has its MLM head"
            )
        if "path" in teacher:
            cfg["teacher"] = {
                "path": _check(teacher["path"], str, "teacher.path"),
                "fit_mlm_head": _fit_mlm_head(teacher.get("fit_mlm_head")),
            }
        else:
            block = _merge(
                teacher["pretrain"],
                {
                    "student": None,
                    "budget": None,
                    "batch_size": None,
                    "micro_batch_size": None,
                    "lr": 1e-3,
                    "dropout": None,
                },
                "teacher.pretrain",
            )
            if block["student"] is None or block["budget"] is None:
                raise BudgetKDError("config key 'teacher.pretrain' needs 'student' and 'budget'")
            resolve_architecture(block["student"])
            _budget(block["budget"], "teacher.pretrain.budget")
            _check(block["batch_size"], int, "teacher.pretrain.batch_size", optional=True)
            _check(block["micro_batch_size"], int, "teacher.pretrain.micro_batch_size", optional=True)
            _check(block["lr"], float, "teacher.pretrain.lr")
            _check(block["dropout"], float, "teacher.pretrain.dropout", optional=True)
            cfg["teacher"] = {"pretrain": block}
    if tok == "teacher" and cfg["teacher"] is None:
        raise BudgetKDError(
            "config key 'data.tokenizer' is 'teacher' but there is no teacher; give a path or {train: N}"
        )
    if tok == "teacher" and "pretrain" in (cfg["teacher"] or {}):
        raise BudgetKDError(
            "config key 'data.tokenizer': a teacher trained by budgetkd uses the data's tokenizer; "
            "set data.tokenizer to a path/hub id or {train: VOCAB_SIZE}"
        )

    # budget
    budget = raw.get("budget")
    _check(budget, dict, "budget")
    unknown = set(budget) - {"calibrate", "explicit", "sweep", "schedule", "decay_fraction"}
    if unknown:
        raise BudgetKDError(
            f"unknown config key budget.{sorted(unknown)[0]!r} "
            "(known: calibrate, explicit, sweep, schedule, decay_fraction)"
        )
    listed = budget.get("sweep")
    if (
        "calibrate" not in budget
        and "explicit" not in budget
        and isinstance(listed, list)
        and len(listed) >= 2
        and not any(isinstance(p, _NUMBER) for p in listed)
    ):
        # a sweep of given budgets needs no base budget: the largest point stands for it
        budget = {**budget, "explicit": max(listed, key=lambda p: _budget(p, "budget.sweep").amount)}
    if ("calibrate" in budget) == ("explicit" in budget):
        raise BudgetKDError("config key 'budget' needs exactly one of 'calibrate' and 'explicit'")
    if "calibrate" in budget:
        cal = _merge(
            budget["calibrate"], {"strategy": "none", "epochs": 1.0, "currency": "time"}, "budget.calibrate"
        )
        if cal["strategy"] not in REGISTRY:
            raise BudgetKDError(
                f"config key 'budget.calibrate.strategy': unknown strategy {cal['strategy']!r}"
            )
        if REGISTRY[cal["strategy"]].needs_teacher:
            raise BudgetKDError(
                "config key 'budget.calibrate.strategy' must be a strategy without teacher (none)"
            )
        _check(cal["epochs"], float, "budget.calibrate.epochs")
        if cal["epochs"] <= 0:
            raise BudgetKDError("config key 'budget.calibrate.epochs' must be positive")
        if cal["currency"] not in ("time", "flops"):
            raise BudgetKDError(
                f"config key 'budget.calibrate.currency' must be time or flops, got {cal['currency']!r}"
            )
        cfg["budget"] = {"calibrate": cal}
    else:
        explicit = budget["explicit"]
        _budget(explicit, "budget.explicit")
        cfg["budget"] = {"explicit": str(explicit)}
    cfg["budget"].update(_sweep_settings(budget))
    sweep = cfg["budget"]["sweep"]
    if sweep and sweep["kind"] == "budgets" and "calibrate" in cfg["budget"]:
        raise BudgetKDError(
            "config key 'budget.sweep': a list of budgets goes without budget.calibrate (the "
            "calibration run would be trained and then unused); give multiples of the calibrated budget instead"
        )
    if sweep and not any(s["name"] == "none" for s in cfg["strategies"]):
        raise BudgetKDError(
            "config key 'budget.sweep': a sweep needs the strategy none (every Δ and crossover is against No-KD)"
        )

    setting = raw.get("data_setting", "unlimited")
    if setting not in ("unlimited", "limited"):
        raise BudgetKDError(f"config key 'data_setting' must be unlimited or limited, got {setting!r}")
    cfg["data_setting"] = setting
    sweep = cfg["budget"]["sweep"]
    if setting == "unlimited" and sweep and sweep["kind"] == "multiples" and "calibrate" in cfg["budget"]:
        widest = cfg["budget"]["calibrate"]["epochs"] * max(sweep["points"])
        if widest > 1 + 1e-9:
            raise BudgetKDError(
                f"config key 'budget.sweep': the point {max(sweep['points']):g}× of "
                f"{cfg['budget']['calibrate']['epochs']:g} No-KD epoch(s) needs a second epoch; "
                "set data_setting: limited or keep the multiples ≤ 1"
            )
    cfg["teacher_cost"] = _teacher_cost(raw.get("teacher_cost", "inference"), cfg)
    cfg["report"] = _report_settings(raw.get("report"))
    if setting == "unlimited" and "calibrate" in cfg["budget"] and cfg["budget"]["calibrate"]["epochs"] > 1:
        raise BudgetKDError(
            "config key 'budget.calibrate.epochs' > 1 repeats the data: set data_setting: limited"
        )

    opt = _merge(raw.get("optimizer"), OPTIMIZER_DEFAULTS, "optimizer")
    _check(opt["batch_size"], int, "optimizer.batch_size")
    _check(opt["micro_batch_size"], int, "optimizer.micro_batch_size", optional=True)
    for key in ("lr_no_kd", "lr_kd", "warmup", "weight_decay", "adam_eps", "max_grad_norm"):
        _check(opt[key], float, f"optimizer.{key}")
    _check(opt["adam_betas"], list, "optimizer.adam_betas")
    if len(opt["adam_betas"]) != 2:
        raise BudgetKDError("config key 'optimizer.adam_betas' must be a list of two numbers")
    if opt["batch_size"] <= 0:
        raise BudgetKDError("config key 'optimizer.batch_size' must be positive")
    if opt["micro_batch_size"] is not None and not 0 < opt["micro_batch_size"] <= opt["batch_size"]:
        raise BudgetKDError("config key 'optimizer.micro_batch_size' must lie in 1..batch_size")
    cfg["optimizer"] = opt

    training = _merge(raw.get("training"), TRAINING_DEFAULTS, "training")
    _check(training["num_evals"], int, "training.num_evals")
    _check(training["eval_sequences"], int, "training.eval_sequences")
    _check(training["dropout"], float, "training.dropout", optional=True)
    _check(training["fixed_mask_count"], bool, "training.fixed_mask_count")
    _check(training["device"], str, "training.device")
    _check(training["checkpoint_interval_s"], float, "training.checkpoint_interval_s")
    _check(training["checkpoint_every_steps"], int, "training.checkpoint_every_steps")
    if training["on_nonfinite"] not in ("stop", "skip"):
        raise BudgetKDError("config key 'training.on_nonfinite' must be stop or skip")
    cfg["training"] = training

    glue = _merge(raw.get("glue"), GLUE_DEFAULTS, "glue")
    _check(glue["dir"], str, "glue.dir", optional=True)
    if isinstance(glue["tasks"], list):
        for i, task in enumerate(glue["tasks"]):
            _check(task, str, f"glue.tasks[{i}]")
    else:
        _check(glue["tasks"], str, "glue.tasks")
    _check(glue["grid"], str, "glue.grid")
    _check(glue["epochs"], int, "glue.epochs")
    seeds = glue["seeds"]
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    _check(seeds, list, "glue.seeds")
    for i, seed in enumerate(seeds):
        _check(seed, int, f"glue.seeds[{i}]")
    glue["seeds"] = seeds
    _check(glue["max_train_examples"], int, "glue.max_train_examples", optional=True)
    _check(glue["max_eval_examples"], int, "glue.max_eval_examples", optional=True)
    _check(glue["save_predictions"], bool, "glue.save_predictions")
    if glue["stack"] != "auto":
        _check(glue["stack"], bool, "glue.stack")
    _check(glue["group_by_length"], bool, "glue.group_by_length")
    _check(glue["threads"], int, "glue.threads", optional=True)
    from budgetkd.glue.search import parse_grid
    from budgetkd.glue.tasks import parse_tasks

    parse_grid(glue["grid"])
    parse_tasks(glue["tasks"])
    cfg["glue"] = glue
    return cfg


def _sweep_settings(budget: dict) -> dict:
    """``budget.sweep`` / ``schedule`` / ``decay_fraction`` (SPEC §7a), resolved.

    ``sweep`` is None, or ``{"kind": "multiples", "points": [0.25, …]}`` (of the calibrated or
    explicit budget), or ``{"kind": "budgets", "points": ["1h", …]}`` (one currency).
    """
    from budgetkd.sweep import check_decay_fraction

    schedule = budget.get("schedule", "linear")
    if schedule not in ("linear", "wsd"):
        raise BudgetKDError(f"config key 'budget.schedule' must be linear or wsd, got {schedule!r}")
    fraction = _check(budget.get("decay_fraction", 0.2), float, "budget.decay_fraction")
    try:
        check_decay_fraction(fraction)
    except BudgetKDError as exc:
        raise BudgetKDError(f"config key 'budget.decay_fraction': {exc}") from None
    points = budget.get("sweep")
    sweep = None
    if points is not None:
        _check(points, list, "budget.sweep")
        if len(points) < 2:
            raise BudgetKDError("config key 'budget.sweep' needs at least two points")
        if all(isinstance(p, _NUMBER) and not isinstance(p, bool) for p in points):
            if any(not p > 0 for p in points):
                raise BudgetKDError("config key 'budget.sweep': multiples must be positive")
            values = sorted(float(p) for p in points)
            sweep = {"kind": "multiples", "points": values}
        else:
            parsed = [_budget(p, f"budget.sweep[{i}]") for i, p in enumerate(points)]
            if len({b.currency for b in parsed}) > 1:
                raise BudgetKDError("config key 'budget.sweep': every budget must be in one currency")
            values = [b.exact_text() for b in sorted(parsed, key=lambda b: b.amount)]
            sweep = {"kind": "budgets", "points": values}
        if len(set(sweep["points"])) != len(sweep["points"]):
            raise BudgetKDError("config key 'budget.sweep': the points must be distinct")
    return {"sweep": sweep, "schedule": schedule, "decay_fraction": float(fraction)}


def _teacher_cost(value: Any, cfg: dict) -> dict:
    """``teacher_cost`` (SPEC §7a) as ``{"mode": …}`` plus, for amortized, pretraining and students."""
    if value in ("inference", "free"):
        return {"mode": value}
    if not (isinstance(value, dict) and set(value) == {"amortized"}):
        raise BudgetKDError(
            f"config key 'teacher_cost' must be inference, free or {{amortized: {{pretraining, students}}}}, "
            f"got {value!r}"
        )
    block = _merge(value["amortized"], {"pretraining": "auto", "students": None}, "teacher_cost.amortized")
    students = block["students"]
    if not isinstance(students, int) or isinstance(students, bool) or students < 1:
        raise BudgetKDError("config key 'teacher_cost.amortized.students' must be a positive integer")
    pretraining = block["pretraining"]
    if pretraining == "auto":
        if "pretrain" not in (cfg.get("teacher") or {}):
            raise BudgetKDError(
                "config key 'teacher_cost.amortized.pretraining': auto needs a teacher pretrained by "
                "budgetkd (teacher.pretrain); give the cost of a given teacher as a time or FLOPs budget"
            )
    else:
        parsed = _budget(pretraining, "teacher_cost.amortized.pretraining")
        if parsed.currency not in ("time", "flops"):
            raise BudgetKDError(
                "config key 'teacher_cost.amortized.pretraining' must be a time or FLOPs amount"
            )
        pretraining = parsed.exact_text()
    currency = budget_currency(cfg["budget"])
    if currency not in ("time", "flops"):
        raise BudgetKDError(
            f"config key 'teacher_cost': amortized needs a time or FLOPs budget, not {currency}"
        )
    if pretraining != "auto" and Budget.parse(pretraining).currency != currency:
        # a charge in the other currency would be a charge of 0 in the budget's
        raise BudgetKDError(
            f"config key 'teacher_cost.amortized.pretraining' ({block['pretraining']}) must be in the "
            f"budget's currency, {currency}"
        )
    return {"mode": "amortized", "pretraining": pretraining, "students": students}


def budget_currency(budget: dict) -> str:
    """The currency every student's budget is in: the sweep's budgets', else the calibration's or
    the explicit budget's."""
    sweep = budget.get("sweep")
    if sweep and sweep["kind"] == "budgets":
        return Budget.parse(sweep["points"][0]).currency
    if "calibrate" in budget:
        return budget["calibrate"]["currency"]
    return Budget.parse(budget["explicit"]).currency


def _report_settings(section: Any) -> dict:
    """``report: {avg_tasks: paper | all | [task, …], bootstrap_samples: int, bootstrap_seed: int}``."""
    from budgetkd.report import MIN_BOOTSTRAP_SAMPLES, parse_avg_tasks

    block = _merge(
        section, {"avg_tasks": "paper", "bootstrap_samples": None, "bootstrap_seed": None}, "report"
    )
    try:
        parse_avg_tasks(block["avg_tasks"])
    except BudgetKDError as exc:
        raise BudgetKDError(f"config key 'report.avg_tasks': {exc}") from None
    samples = _check(block["bootstrap_samples"], int, "report.bootstrap_samples", optional=True)
    if samples is not None and samples < MIN_BOOTSTRAP_SAMPLES:
        raise BudgetKDError(f"config key 'report.bootstrap_samples' must be at least {MIN_BOOTSTRAP_SAMPLES}")
    seed = _check(block["bootstrap_seed"], int, "report.bootstrap_seed", optional=True)
    if seed is not None and seed < 0:
        raise BudgetKDError("config key 'report.bootstrap_seed' must be non-negative")
    return block
