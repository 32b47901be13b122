"""What an experiment trains, derived once from its resolved config (one source of truth).

``compare`` runs it and ``compare --dry-run`` prices it, both from these functions, so the plan
and the run cannot disagree about which runs exist, their budgets, their schedules, their
``TrainConfig`` or how many steps a budget buys:

* :func:`calibration` — the run that sets the budget (or None);
* :func:`student_runs` — every other pretraining run (a sweep: one per strategy and point; WSD: a
  trunk per strategy and branches from its snapshots), with its charged budget;
* :func:`train_config` — the only place a :class:`~budgetkd.config.TrainConfig` is assembled from
  an experiment (students, calibration, the probe); :func:`teacher_train_config` for a teacher
  pretrained by budgetkd;
* :func:`stage_ids` and :func:`expand_forced` — the stage list and what ``--force`` redoes;
* :func:`simulate_consumption` — the steps, tokens and FLOPs a budget buys, by running the meter
  of the trainer over the steps' known costs (the plan's numbers; exact when every step's cost
  is known: prepared data, and FLOPs that do not depend on random masks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from budgetkd.budget import Budget, Meter, full_batches
from budgetkd.config import TrainConfig
from budgetkd.errors import BudgetKDError

ORDER = ("data", "teacher", "calibrate", "pretrain", "glue", "report")


# -- the runs ------------------------------------------------------------------------------------
@dataclass
class StudentRun:
    """One pretraining run of the experiment (a strategy, in a sweep at one point)."""

    id: str  # the strategy's label, or label@tag in a sweep
    strategy: dict  # the resolved strategy entry
    kd: bool
    budget: Budget | None  # what this run trains on (the charged budget); None: not known yet
    point: float | None  # the sweep point's nominal amount (= budget's unless amortized)
    run_dir: Path
    schedule: dict = field(default_factory=dict)  # TrainConfig's schedule fields
    reuse: str | None = None  # the calibration run stands for this point (linear sweep, x1)
    seed: int = 0  # the pretraining seed's offset (pretrain_seeds): the run trains at cfg seed + this

    @property
    def stage(self) -> str:
        return f"pretrain:{self.id}"

    @property
    def trunk(self) -> bool:
        return bool(self.schedule.get("snapshots"))

    @property
    def branch(self) -> bool:
        return bool(self.schedule.get("init_from"))


def kd_strategy(entry: dict) -> bool:
    from budgetkd.strategies import REGISTRY

    return REGISTRY[entry["name"]].needs_teacher


def max_epochs(cfg: dict) -> float | None:
    """SPEC §1: under unlimited data every run, the calibration included, stops within one epoch."""
    return 1.0 if cfg["data_setting"] == "unlimited" else None


def calibration(cfg: dict) -> dict | None:
    """The calibration run's strategy entry (the experiment's own row when it lists that strategy),
    or None for an explicit budget."""
    cal = cfg["budget"].get("calibrate")
    if cal is None:
        return None
    own = next((s for s in cfg["strategies"] if s["name"] == cal["strategy"]), None)
    return own or {"name": cal["strategy"], "label": cal["strategy"], "lr": None, "options": {}}


def calibration_budget(cfg: dict) -> Budget:
    return Budget("epochs", float(cfg["budget"]["calibrate"]["epochs"]))


def sweep_points(cfg: dict, base: Budget | None) -> list[tuple[str, Budget | None]]:
    """(tag, budget) of every sweep point, smallest first; tags are known from the config alone.
    A multiple of a steps budget is rounded to the nearest whole step (at least 1)."""
    sweep = cfg["budget"]["sweep"]
    if sweep["kind"] == "budgets":
        from budgetkd.sweep import budget_tags

        return [(tag, Budget.parse(text)) for tag, text in zip(budget_tags(sweep["points"]), sweep["points"])]
    points = []
    for multiple in sweep["points"]:
        if base is None:
            points.append((f"x{multiple:g}", None))
            continue
        amount = base.amount * multiple
        if base.currency == "steps":
            amount = float(max(1, round(amount)))
        points.append((f"x{multiple:g}", Budget(base.currency, amount)))
    return points


def pretrain_seeds(cfg: dict) -> list[int]:
    """The pretraining seeds' offsets, 0 first (``pretrain_seeds``; absent: [0], the paper)."""
    seeds = cfg.get("pretrain_seeds") or [0]
    return [0] + [k for k in seeds if k != 0]


def seed_suffix(seed: int) -> str:
    """What a run id and directory of pretraining seed ``seed`` carry: nothing for 0, else ``~sK``."""
    return f"~s{seed}" if seed else ""


def base_id(sid: str) -> tuple[str, int]:
    """(the id without its pretraining-seed suffix, the seed): ``MiniLM@x2~s1`` → (``MiniLM@x2``, 1)."""
    head, sep, tail = sid.rpartition("~s")
    return (head, int(tail)) if sep and tail.isdigit() else (sid, 0)


def student_ids(cfg: dict) -> list[str]:
    """Every student that is fine-tuned: the labels, or in a sweep every label@tag; with several
    pretraining seeds each again per seed (``~sK``, seed 0 first and unsuffixed)."""
    labels = [s["label"] for s in cfg["strategies"]]
    ids = labels
    if cfg["budget"].get("sweep"):
        tags = [tag for tag, _ in sweep_points(cfg, None)]
        ids = [f"{label}@{tag}" for label in labels for tag in tags]
    return [sid + seed_suffix(k) for k in pretrain_seeds(cfg) for sid in ids]


def teacher_charge(cfg: dict, pretraining: dict | None = None) -> dict:
    """What each KD student pays for the teacher beyond its steps (SPEC §7a). ``pretraining``:
    the teacher's measured cost (``amortized: {pretraining: auto}``); a given cost is read from
    the config. ``auto`` without a measurement (the plan, before the teacher trained) charges
    nothing extra and says so (``"pending": True``)."""
    from budgetkd.sweep import teacher_charge as charge_of

    spec = cfg["teacher_cost"]
    if spec["mode"] == "amortized" and spec["pretraining"] != "auto":
        given = Budget.parse(spec["pretraining"])
        pretraining = {{"time": "time_s", "flops": "flops"}[given.currency]: given.amount}
    if spec["mode"] == "amortized" and pretraining is None:
        charge = charge_of("inference")
        return charge | {"mode": "amortized", "pending": True, "pretraining": None}
    charge = charge_of(spec["mode"], pretraining=pretraining, students=spec.get("students"))
    charge["pretraining"] = pretraining
    return charge


def charged_budget(budget: Budget | None, kd: bool, charge: dict) -> Budget | None:
    """A KD student's budget: the point minus its share of the teacher (amortized), refused when
    the share uses it all up."""
    from budgetkd.sweep import kd_budget_amount

    if budget is None or not kd or charge["mode"] != "amortized":
        return budget
    return Budget(budget.currency, kd_budget_amount(budget.amount, budget.currency, charge))


def student_runs(cfg: dict, out: Path, base: Budget | None, charge: dict) -> list[StudentRun]:
    """Every pretraining run after the calibration, in order: one per strategy (the calibration
    strategy's row is the calibration run itself), or in a sweep one per strategy and point. With
    ``schedule: wsd`` a strategy's largest point is its trunk (it keeps snapshots where the smaller
    points branch off) and the other points continue a snapshot. ``base``: the budget (None when
    it is not known yet: a calibration not run and not estimated). Each further pretraining seed
    repeats them all (its own WSD trunks) under ids and directories suffixed ``~sK``; there the
    calibration strategy trains at the calibrated budget like every other row."""
    runs = []
    for seed in pretrain_seeds(cfg):
        runs += _seed_runs(cfg, out, base, charge, seed)
    return runs


def _seed_runs(cfg: dict, out: Path, base: Budget | None, charge: dict, seed: int) -> list[StudentRun]:
    """:func:`student_runs` of one pretraining seed."""
    cal = calibration(cfg)
    skip = cal["label"] if cal is not None and seed == 0 else None
    runs = out / "runs"
    suffix = seed_suffix(seed)
    if not cfg["budget"].get("sweep"):
        schedule = cfg["budget"]["schedule"]
        options = (
            {"schedule": "wsd", "decay_fraction": cfg["budget"]["decay_fraction"]}
            if schedule == "wsd"
            else {}
        )
        return [
            StudentRun(s["label"] + suffix, s, kd_strategy(s), charged_budget(base, kd_strategy(s), charge),
                       base.amount if base else None, runs / (s["label"] + suffix), dict(options), seed=seed)
            for s in cfg["strategies"] if s["label"] != skip
        ]  # fmt: skip
    out_runs: list[StudentRun] = []
    for strategy in cfg["strategies"]:
        out_runs += _sweep_runs(cfg, strategy, sweep_points(cfg, base), charge, runs, skip, seed)
    return out_runs


def _sweep_runs(cfg, strategy, points, charge, runs: Path, calibration_label, seed=0) -> list[StudentRun]:
    """One strategy's sweep: linear (independent points; x1 of the calibration strategy is the
    calibration run) or WSD (a trunk at the largest point, branches from its snapshots)."""
    from budgetkd.sweep import branch_amount, check_sweep_points

    label, kd = strategy["label"], kd_strategy(strategy)
    fraction = cfg["budget"]["decay_fraction"]
    charged = [(tag, charged_budget(b, kd, charge), b) for tag, b in points]

    def run(tag, budget, nominal, schedule=None, reuse=None) -> StudentRun:
        sid = f"{label}@{tag}" + seed_suffix(seed)
        point = nominal.amount if nominal is not None else None
        return StudentRun(
            sid, strategy, kd, budget, point, runs / (reuse or sid), schedule or {}, reuse, seed
        )

    if cfg["budget"]["schedule"] == "linear":
        return [
            run(tag, b, n, reuse=label if label == calibration_label and tag == "x1" else None)
            for tag, b, n in charged
        ]
    if any(b is None for _, b, _ in charged):  # a calibration not known yet: shapes only
        return [run(tag, None, None, {"schedule": "wsd"}) for tag, _, _ in charged]
    amounts = [b.amount for _, b, _ in charged]
    warmup = cfg["optimizer"]["warmup"] * amounts[0]  # one warm-up for all points: the smallest's
    check_sweep_points(amounts, warmup, fraction)
    wsd = {"schedule": "wsd", "schedule_warmup": warmup, "decay_fraction": fraction}
    snapshots = [branch_amount(a, fraction) for a in amounts[:-1]]
    trunk_tag, trunk_budget, trunk_nominal = charged[-1]
    trunk = run(trunk_tag, trunk_budget, trunk_nominal, {**wsd, "snapshots": snapshots})
    branches = [
        run(tag, b, n, {**wsd, "init_from": str(snapshot_path(trunk.run_dir, at))})
        for (tag, b, n), at in zip(charged[:-1], snapshots)
    ]
    return [trunk, *branches]


def snapshot_path(run_dir: Path, amount: float) -> Path:
    """Where a wsd trunk keeps its state at ``amount`` (the trainer's own naming rule)."""
    from budgetkd.train import snapshot_file

    return run_dir / snapshot_file(amount)


# -- TrainConfig --------------------------------------------------------------------------------
def train_config(cfg: dict, data_dir: Path, strategy: dict, *, budget: str, out: Path,
                 teacher: str | None, progress: bool = True, **overrides) -> TrainConfig:  # fmt: skip
    """The run of ``strategy`` in this experiment: optimizer and training sections, the
    strategy's learning rate (its own, else lr_kd / lr_no_kd), the data limit of the data
    setting. ``overrides``: schedule fields, charge_teacher, or the probe's batch."""
    opt, training = cfg["optimizer"], cfg["training"]
    kd = kd_strategy(strategy)
    lr = strategy["lr"] if strategy["lr"] is not None else (opt["lr_kd"] if kd else opt["lr_no_kd"])
    values = {
        "data": str(data_dir), "out": str(out), "student": cfg["student"], "strategy": strategy["name"],
        "teacher": teacher if kd else None, "budget": budget, "batch_size": opt["batch_size"],
        "micro_batch_size": opt["micro_batch_size"], "lr": lr, "warmup": opt["warmup"],
        "weight_decay": opt["weight_decay"], "adam_betas": tuple(opt["adam_betas"]), "adam_eps": opt["adam_eps"],
        "max_grad_norm": opt["max_grad_norm"], "seed": cfg["seed"], "dropout": training["dropout"],
        "strategy_options": strategy["options"], "max_epochs": max_epochs(cfg),
        "fixed_mask_count": training["fixed_mask_count"], "num_evals": training["num_evals"],
        "eval_sequences": training["eval_sequences"], "checkpoint_interval_s": training["checkpoint_interval_s"],
        "checkpoint_every_steps": training["checkpoint_every_steps"], "on_nonfinite": training["on_nonfinite"],
        "device": training["device"], "compile": training.get("compile"), "progress": progress,
    }  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def run_train_config(cfg: dict, data_dir: Path, run: StudentRun, teacher: str | None, charge: dict,
                     progress: bool = True) -> TrainConfig:  # fmt: skip
    """A student run's TrainConfig: its budget, schedule, and whether the teacher's forward
    passes are charged (``teacher_cost: free``: not)."""
    seed = {"seed": cfg["seed"] + run.seed} if run.seed else {}  # seed 0: the TrainConfig as before
    return train_config(
        cfg, data_dir, run.strategy, budget=run.budget.exact_text(), out=run.run_dir, teacher=teacher,
        progress=progress, **run.schedule, **seed, charge_teacher=not run.kd or charge["charge_forward"],
    )  # fmt: skip


def calibration_train_config(cfg: dict, data_dir: Path, out: Path, progress: bool = True) -> TrainConfig:
    strategy = calibration(cfg)
    budget = f"{cfg['budget']['calibrate']['epochs']}epochs"
    return train_config(cfg, data_dir, strategy, budget=budget, out=out / "runs" / strategy["label"],
                        teacher=None, progress=progress)  # fmt: skip


def teacher_train_config(cfg: dict, data_dir: Path, out: Path, progress: bool = True) -> TrainConfig:
    """``teacher: {pretrain: …}``: No-KD with the teacher's own architecture, budget and rate."""
    block, opt, training = cfg["teacher"]["pretrain"], cfg["optimizer"], cfg["training"]
    return TrainConfig(
        data=str(data_dir), out=str(out / "teacher"), student=block["student"], strategy="none",
        budget=str(block["budget"]), batch_size=block["batch_size"] or opt["batch_size"],
        micro_batch_size=block["micro_batch_size"], lr=block["lr"], dropout=block["dropout"],
        seed=cfg["seed"] + 1000, num_evals=training["num_evals"], eval_sequences=training["eval_sequences"],
        # the teacher is often the longest stage: checkpoint it like the others
        checkpoint_interval_s=training["checkpoint_interval_s"],
        checkpoint_every_steps=training["checkpoint_every_steps"], device=training["device"],
        compile=training.get("compile"), progress=progress,
    )  # fmt: skip


# -- the stage list and --force ----------------------------------------------------------------
def stage_ids(cfg: dict) -> list[str]:
    """The stages of the experiment, in order."""
    ids = ["data"] + (["teacher"] if cfg["teacher"] is not None else [])
    if calibration(cfg) is not None:
        ids.append("calibrate")
    cal_label = calibration(cfg)["label"] if calibration(cfg) else None
    ids += [f"pretrain:{sid}" for sid in student_ids(cfg) if sid != cal_label]
    ids += [f"glue:{sid}" for sid in student_ids(cfg)]
    return ids + ["report"]


def expand_forced(cfg: dict, force: list[str]) -> set[str]:
    """``--force STAGE`` redoes STAGE and everything downstream of it. ``pretrain`` / ``glue``
    alone mean every such stage; a strategy's label stands for all its sweep points; with wsd the
    points of one strategy share a trunk, so redoing one point redoes them all."""
    labels = [s["label"] for s in cfg["strategies"]]
    ids = student_ids(cfg)
    valid = {"data", "teacher", "calibrate", "report"} | {
        f"{k}:{x}" for k in ("pretrain", "glue") for x in labels + ids
    }
    for stage in force:
        if stage not in valid and stage not in ("pretrain", "glue", "all"):
            raise BudgetKDError(
                f"--force {stage}: no such stage (stages: {', '.join(sorted(valid))}, pretrain, glue, all)"
            )
    forced = set(force) | (set(ORDER) if "all" in force else set())
    kinds = [s.split(":")[0] for s in forced if s.split(":")[0] in ORDER]
    for kind in ORDER[min(map(ORDER.index, kinds)) + 1 :] if kinds else ():
        forced |= {f"{kind}:{x}" for x in labels} if kind in ("pretrain", "glue") else {kind}
    forced |= {f"glue:{x}" for x in labels if f"pretrain:{x}" in forced}
    for kind in ("pretrain", "glue"):
        if kind in forced:
            forced |= {f"{kind}:{x}" for x in labels}
    if "calibrate" in forced:
        forced |= {f"{kind}:{x}" for kind in ("pretrain", "glue") for x in labels}
    wsd = cfg["budget"].get("schedule") == "wsd"
    for sid in ids:
        label = base_id(sid)[0].split("@")[0]
        if sid == label:
            continue
        if f"pretrain:{label}" in forced or (wsd and any(f.startswith(f"pretrain:{label}@") for f in forced)):
            forced |= {f"pretrain:{sid}", f"glue:{sid}"}
        if f"pretrain:{sid}" in forced or f"glue:{label}" in forced:
            forced.add(f"glue:{sid}")
    return forced


# -- what a budget buys --------------------------------------------------------------------------
@dataclass
class Consumption:
    """What a run will consume: its steps, tokens and FLOPs, whether it stops at the data limit,
    and whether the figures are exact (every step's cost known) or an estimate."""

    steps: int
    sequences: int
    tokens: float
    flops: float
    flops_student: float
    flops_teacher: float
    stops_at_data_limit: bool
    exact: bool
    needed_sequences: float | None = None  # stopped at the data limit: what the budget would need


def simulate_consumption(
    budget: Budget,
    batch_size: int,
    step_cost: Callable[[int], tuple[float, float, float]],
    *,
    num_train: int,
    data_limit_steps: int | None,
    charge_teacher: bool = True,
    exact: bool = True,
    start: Meter | None = None,
    max_steps: int = 10_000_000,
) -> Consumption:
    """Run the trainer's meter over the steps without training: step k costs ``step_cost(k) =
    (tokens, student FLOPs, teacher FLOPs)``; the run stops on the first step after which the
    budget is reached (``Meter.exhausted``), or before the step that would cross the data limit —
    the trainer's own rule, summed in the trainer's order. Not for time budgets (their steps are
    known only at run time)."""
    if budget.currency == "time":
        raise BudgetKDError("a time budget's steps are known only when it runs")
    meter = Meter(num_train_sequences=num_train, charge_teacher=charge_teacher)
    if start is not None:
        meter = Meter.from_state_dict(start.state_dict())
    stopped = False
    while not meter.exhausted(budget):
        if data_limit_steps is not None and meter.steps >= data_limit_steps:
            stopped = True
            break
        if meter.steps >= max_steps:
            raise BudgetKDError(f"budget {budget} needs more than {max_steps:,} steps")
        tokens, f_student, f_teacher = step_cost(meter.steps)
        meter.steps += 1
        meter.sequences += batch_size
        meter.tokens += tokens
        meter.flops_student += f_student
        meter.flops_teacher += f_teacher
    needed = None
    if stopped and meter.consumed(budget.currency) > 0:  # at the average cost of the steps taken
        needed = math.ceil(meter.steps * budget.amount / meter.consumed(budget.currency)) * batch_size
    return Consumption(
        meter.steps, meter.sequences, float(meter.tokens), meter.flops, meter.flops_student,
        meter.flops_teacher, stopped, exact, needed,
    )  # fmt: skip


def data_limit_steps(
    budget: Budget, max_epochs_: float | None, num_train: int, batch_size: int
) -> int | None:
    """The trainer's data limit in steps (``Pretrainer.check_data_limit``): at most
    ⌊max_epochs · N / B⌋ full batches (SPEC §1); an epochs budget within the limit is its own limit."""
    if max_epochs_ is None or budget.currency == "epochs":
        return None
    return full_batches(max_epochs_, num_train, batch_size)
