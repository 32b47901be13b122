"""The configuration of budgetkd, declared once: the experiment of ``budgetkd compare`` (YAML) and
the :class:`TrainConfig` of one pretraining run.

Every field below carries its type, range, default and a one-line description. From this one
declaration come the YAML loader (:func:`load_experiment`, whose errors are one line naming the
field path and the rule: ``optimizer.warmup: must be ≥ 0 and < 1, got 1.5``), every range check
(the trainer checks nothing again), the ``budgetkd pretrain`` flags and their help
(``cli.py`` reads :class:`TrainConfig`), the resolved configuration saved beside every run and
experiment, and ``budgetkd schema`` (the JSON Schema that editors use to complete and check
experiment YAML).

The resolved experiment is plain data (:meth:`ExperimentConfig.resolved`) with every default
filled in, in the same form as budgetkd 0.2 wrote it (integers stay integers: fingerprints of
finished stages depend on it, so an existing experiment directory resumes).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from budgetkd.budget import Budget
from budgetkd.errors import BudgetKDError
from budgetkd.io import read_yaml

# -- shared field types: each range is written here once ----------------------------------------
Number = int | float  # kept as written: 1 stays 1 (a stage fingerprint hashes it)
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveNumber = Annotated[Number, Field(gt=0)]
NonNegativeNumber = Annotated[Number, Field(ge=0)]
Fraction01 = Annotated[Number, Field(ge=0, lt=1)]  # warm-up share, dropout
LearningRate = Annotated[Number, Field(gt=0)]
BudgetText = Annotated[
    str, Field(description="a number with a unit: 90s, 30m, 4h, 2.5e15flops, 3e6tokens, 500steps, 1epochs")
]


class Section(BaseModel):
    """A mapping of the config: unknown keys are refused, types are checked without coercion
    (``"5"`` is not an integer, ``true`` is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


def _budget(value: Any, key: str) -> Budget:
    """Parse a budget (a string with a unit; a bare number is refused as unit-less), naming the key."""
    try:
        return Budget.parse(value if isinstance(value, str | int | float) else str(value))
    except BudgetKDError as exc:
        raise BudgetKDError(f"config key {key!r}: {exc}") from None


# -- data, student, strategies ----------------------------------------------------------------
class TrainTokenizer(Section):
    train: PositiveInt = Field(description="train an uncased WordPiece of this vocabulary size on the corpus")


class DataConfig(Section):
    inputs: list[str] | str | None = Field(
        None, description="corpus files, folders or hf:NAME[:CONFIG][:SPLIT] (required unless prepared)"
    )
    prepared: str | None = Field(
        None, description="a `budgetkd prepare` output used as is (tokenizer and seq_len checked)"
    )
    tokenizer: str | TrainTokenizer = Field(
        "teacher", description="teacher (the teacher's), a path or hub id, or {train: VOCAB_SIZE}"
    )
    seq_len: Annotated[int, Field(ge=4)] = Field(
        128, description="tokens per packed sequence ([CLS] … [SEP])"
    )
    validation_fraction: Annotated[Number, Field(gt=0, lt=1)] = Field(
        0.01, description="documents held out for validation"
    )

    @model_validator(mode="after")
    def _inputs(self) -> DataConfig:
        if self.inputs is None and self.prepared is None:
            raise BudgetKDError(
                "config key 'data.inputs' is required (corpus files, folders or hf:NAME), "
                "or 'data.prepared: DIR' (a budgetkd prepare output)"
            )
        if self.inputs is not None and self.prepared is not None:
            raise BudgetKDError("config keys 'data.inputs' and 'data.prepared' exclude each other; give one")
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if self.inputs is None:
            self.inputs = []  # a dataset prepared once (budgetkd prepare), shared by many experiments
        elif not self.inputs:
            raise BudgetKDError("config key 'data.inputs' must not be empty")
        return self


class StrategyEntry(Section):
    name: str = Field(description="none, vanilla, tinybert, minilm or minilmv2")
    label: str | None = Field(
        None, description="the row's name (default: name); repeated strategies need distinct labels"
    )
    lr: LearningRate | None = Field(
        None, description="peak learning rate (default: optimizer.lr_kd or lr_no_kd)"
    )
    options: dict[str, Any] | None = Field(
        None, description="the strategy's options (temperature, layer_map, …)"
    )

    @model_validator(mode="after")
    def _known(self) -> StrategyEntry:
        from budgetkd.strategies import REGISTRY

        if self.name not in REGISTRY:
            raise ValueError(f"unknown strategy {self.name!r}; choose one of {', '.join(REGISTRY)}")
        self.options = self.options or {}
        bad = set(self.options) - set(REGISTRY[self.name].defaults)
        if bad:
            known = ", ".join(sorted(REGISTRY[self.name].defaults)) or "none"
            raise ValueError(f"unknown option {sorted(bad)[0]!r} for strategy {self.name!r} (known: {known})")
        self.label = self.label if self.label is not None else self.name
        return self

    @property
    def needs_teacher(self) -> bool:
        from budgetkd.strategies import REGISTRY

        return REGISTRY[self.name].needs_teacher


# -- teacher ------------------------------------------------------------------------------------
class HeadFit(Section):
    """An MLM head fitted on an encoder-only teacher (the teacher's preparation, charged to no student)."""

    budget: BudgetText = "500steps"
    lr: LearningRate = 1e-3
    batch_size: PositiveInt = 32
    warmup: Fraction01 = 0.06
    weight_decay: NonNegativeNumber = 0.0
    num_evals: PositiveInt = 5
    eval_sequences: PositiveInt = 512

    @field_validator("budget")
    @classmethod
    def _parse(cls, value: str) -> str:
        _budget(value, "teacher.fit_mlm_head.budget")
        return value


class TeacherPretrain(Section):
    student: str | dict[str, Any] = Field(
        description="the teacher's architecture: a preset or {layers, hidden, heads, intermediate}"
    )
    budget: BudgetText
    batch_size: PositiveInt | None = Field(None, description="default: optimizer.batch_size")
    micro_batch_size: PositiveInt | None = None
    lr: LearningRate = 1e-3
    dropout: Fraction01 | None = Field(None, description="null: BERT's 0.1")

    @field_validator("student")
    @classmethod
    def _arch(cls, value):
        from budgetkd.models import resolve_architecture

        resolve_architecture(value)
        return value

    @field_validator("budget")
    @classmethod
    def _parse(cls, value: str) -> str:
        _budget(value, "teacher.pretrain.budget")
        return value


class TeacherConfig(Section):
    path: str | None = Field(
        None, description="a BertForMaskedLM / BertModel directory, a budgetkd run directory or a hub id"
    )
    pretrain: TeacherPretrain | None = Field(None, description="or: a teacher pretrained by budgetkd first")
    fit_mlm_head: bool | HeadFit | None = Field(
        None,
        description="null: fitted when the teacher is encoder-only and a strategy needs logits; false: never",
    )

    @model_validator(mode="before")
    @classmethod
    def _head_true(cls, data):
        if isinstance(data, dict) and ("path" in data) == ("pretrain" in data):
            raise BudgetKDError("config key 'teacher' needs exactly one of 'path' and 'pretrain'")
        if isinstance(data, dict) and data.get("fit_mlm_head") is True:
            data = {**data, "fit_mlm_head": {}}
        return data

    @model_validator(mode="after")
    def _one(self) -> TeacherConfig:
        if self.pretrain is not None and self.fit_mlm_head not in (None, False):
            raise BudgetKDError(
                "config key 'teacher.fit_mlm_head' applies to teacher.path only: "
                "a teacher pretrained by budgetkd has its MLM head"
            )
        return self

    def resolved(self) -> dict:
        if self.path is not None:
            head = self.fit_mlm_head
            return {
                "path": self.path,
                "fit_mlm_head": head.model_dump() if isinstance(head, HeadFit) else head,
            }
        return {"pretrain": self.pretrain.model_dump()}


# -- budget -------------------------------------------------------------------------------------
class Calibrate(Section):
    strategy: str = Field("none", description="a strategy without teacher, trained to set every other budget")
    epochs: PositiveNumber = Field(1.0, description="epochs of the calibration run")
    currency: Literal["time", "flops"] = Field(
        "time", description="what of its consumption becomes the budget"
    )

    @field_validator("strategy")
    @classmethod
    def _no_teacher(cls, value: str) -> str:
        from budgetkd.strategies import REGISTRY

        if value not in REGISTRY:
            raise BudgetKDError(f"config key 'budget.calibrate.strategy': unknown strategy {value!r}")
        if REGISTRY[value].needs_teacher:
            raise BudgetKDError(
                "config key 'budget.calibrate.strategy' must be a strategy without teacher (none)"
            )
        return value


class BudgetConfig(Section):
    calibrate: Calibrate | None = Field(None, description="one of calibrate / explicit")
    explicit: BudgetText | None = None
    sweep: list[Number | str] | None = Field(
        None,
        description="multiples of that budget, or budgets of one currency (these alone: no calibrate/explicit)",
    )
    schedule: Literal["linear", "wsd"] = Field("linear", description="wsd: a sweep's points share a trunk")
    decay_fraction: Annotated[Number, Field(gt=0, le=1)] = Field(
        0.2, description="wsd: decay over the last fraction"
    )

    @model_validator(mode="before")
    @classmethod
    def _base_of_listed_budgets(cls, data):
        """A sweep of given budgets needs no base budget: the largest point stands for it."""
        if not isinstance(data, dict):
            return data
        listed = data.get("sweep")
        if (
            "calibrate" not in data
            and "explicit" not in data
            and isinstance(listed, list)
            and len(listed) >= 2
            and not any(isinstance(p, int | float) for p in listed)
        ):
            data = {**data, "explicit": max(listed, key=lambda p: _budget(p, "budget.sweep").amount)}
        return data

    @field_validator("explicit", mode="before")
    @classmethod
    def _parse(cls, value):
        if value is not None:
            _budget(value, "budget.explicit")
        return value

    @model_validator(mode="after")
    def _one(self) -> BudgetConfig:
        if (self.calibrate is None) == (self.explicit is None):
            raise BudgetKDError("config key 'budget' needs exactly one of 'calibrate' and 'explicit'")
        if self.schedule == "wsd" and self.calibrate is not None and self.sweep is None:
            # the calibration run is the No-KD row and trains SPEC §3's linear schedule: the KD
            # rows under WSD would be compared across two schedules (SPEC §4)
            raise BudgetKDError(
                "budget.schedule: must be linear with budget.calibrate and no budget.sweep (the "
                "calibration run is the No-KD row, trained with the linear schedule), got 'wsd'"
            )
        if (
            self.sweep is not None
            and self.calibrate is not None
            and self.sweep_settings()["kind"] == "budgets"
        ):
            raise BudgetKDError(
                "config key 'budget.sweep': a list of budgets goes without budget.calibrate (the "
                "calibration run would be trained and then unused); give multiples of the calibrated budget instead"
            )
        return self

    def sweep_settings(self) -> dict | None:
        """None, ``{"kind": "multiples", "points": [0.25, …]}`` (of the calibrated or explicit
        budget) or ``{"kind": "budgets", "points": ["1h", …]}`` (one currency), sorted."""
        points = self.sweep
        if points is None:
            return None
        if len(points) < 2:
            raise BudgetKDError("config key 'budget.sweep' needs at least two points")
        if all(isinstance(p, int | float) for p in points):
            if any(not p > 0 for p in points):
                raise BudgetKDError("config key 'budget.sweep': multiples must be positive")
            sweep = {"kind": "multiples", "points": sorted(float(p) for p in points)}
        else:
            parsed = [_budget(p, f"budget.sweep[{i}]") for i, p in enumerate(points)]
            if len({b.currency for b in parsed}) > 1:
                raise BudgetKDError("config key 'budget.sweep': every budget must be in one currency")
            sweep = {
                "kind": "budgets",
                "points": [b.exact_text() for b in sorted(parsed, key=lambda b: b.amount)],
            }
        if len(set(sweep["points"])) != len(sweep["points"]):
            raise BudgetKDError("config key 'budget.sweep': the points must be distinct")
        return sweep

    def resolved(self) -> dict:
        base = (
            {"calibrate": self.calibrate.model_dump()} if self.calibrate else {"explicit": str(self.explicit)}
        )
        return base | {
            "sweep": self.sweep_settings(),
            "schedule": self.schedule,
            "decay_fraction": float(self.decay_fraction),
        }


class Amortized(Section):
    pretraining: str = Field(
        "auto", description="the teacher's pretraining cost (a time or FLOPs budget), or auto"
    )
    students: PositiveInt = Field(description="how many students share that cost (K)")


class AmortizedCost(Section):
    amortized: Amortized


# -- optimizer, training, glue, report ---------------------------------------------------------
class OptimizerConfig(Section):
    batch_size: PositiveInt = Field(1024, description="global batch (all processes)")
    micro_batch_size: PositiveInt | None = Field(None, description="the most one device holds (null: 64)")
    lr_no_kd: LearningRate = Field(1e-3, description="peak learning rate of strategies without teacher")
    lr_kd: LearningRate = Field(5e-4, description="peak learning rate of KD strategies")
    warmup: Fraction01 = Field(0.06, description="warm-up share of the budget")
    weight_decay: NonNegativeNumber = 0.01
    adam_betas: list[Annotated[Number, Field(ge=0, lt=1)]] = Field([0.9, 0.98], min_length=2, max_length=2)
    adam_eps: PositiveNumber = 1e-6
    max_grad_norm: NonNegativeNumber = Field(0.0, description="0: no clipping (the paper's recipe)")

    @model_validator(mode="after")
    def _micro(self) -> OptimizerConfig:
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise BudgetKDError(
                f"optimizer.micro_batch_size: must lie in 1..batch_size ({self.batch_size}), got {self.micro_batch_size}"
            )
        return self


class TrainingConfig(Section):
    num_evals: PositiveInt = Field(10, description="validations at budget fractions 1/n … 1")
    eval_sequences: PositiveInt = Field(512, description="validation sequences")
    dropout: Fraction01 | None = Field(None, description="pretraining dropout (null: BERT's 0.1)")
    fixed_mask_count: bool = Field(False, description="every sequence gets round(15 % of its tokens) masks")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool | None = Field(
        None, description="torch.compile the micro-step (null: on with CUDA, off elsewhere)"
    )
    checkpoint_interval_s: NonNegativeNumber = Field(
        600.0, description="checkpoint every so many seconds (0: off)"
    )
    checkpoint_every_steps: NonNegativeInt = Field(0, description="checkpoint every so many steps (0: off)")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a non-finite loss stops the run or skips the step"
    )


class GlueConfig(Section):
    dir: str | None = Field(None, description="classic glue_data folder (null: nyu-mll/glue from the hub)")
    tasks: str | list[str] = Field(
        "all", description="all, or a list of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte"
    )
    grid: str = Field("paper", description='paper, or "lr=…,bs=…"')
    epochs: PositiveInt = 5
    seeds: list[int] | int = Field([1], description="fine-tuning seeds")
    max_train_examples: PositiveInt | None = None
    max_eval_examples: PositiveInt | None = None
    save_predictions: bool = True
    device: str = "auto"
    stack: Literal["auto"] | bool = Field(
        "auto", description="learning rates trained together (auto: on CUDA)"
    )
    group_by_length: bool = False
    unpad: bool = Field(
        True, description="pack each batch's examples without padding (same mathematics); false: padded"
    )
    threads: PositiveInt | None = Field(None, description="threads per job (null: 1 per job on CPU)")

    @model_validator(mode="after")
    def _parse(self) -> GlueConfig:
        from budgetkd.glue.search import parse_grid
        from budgetkd.glue.tasks import parse_tasks

        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        parse_grid(self.grid)
        parse_tasks(self.tasks)
        return self


class ReportConfig(Section):
    avg_tasks: str | list[str] = Field("paper", description="paper, all, or a list of tasks")
    bootstrap_samples: Annotated[int, Field(ge=100)] | None = Field(
        None, description="bootstrap resamples (null: 2000)"
    )
    bootstrap_seed: NonNegativeInt | None = None

    @field_validator("avg_tasks")
    @classmethod
    def _tasks(cls, value):
        from budgetkd.report import parse_avg_tasks

        try:
            parse_avg_tasks(value)
        except BudgetKDError as exc:
            raise BudgetKDError(f"config key 'report.avg_tasks': {exc}") from None
        return value


# -- the experiment -----------------------------------------------------------------------------
class ExperimentConfig(Section):
    """``budgetkd compare CONFIG.yaml``: one experiment (SPEC §3, §4, §7a)."""

    name: str = Field("experiment", description="the experiment's name (default: the file's stem)")
    seed: NonNegativeInt = Field(0, description="student init, dropout, data order, masks")
    pretrain_seeds: Annotated[list[NonNegativeInt], Field(min_length=1)] = Field(
        [0],
        description="every strategy (and sweep point) is pretrained once per entry, at seed + entry "
        "(student init, data order, masks, dropout); 0 is the run named as without seeds, others get ~sK",
    )
    data: DataConfig
    teacher: TeacherConfig | None = Field(None, description="required unless every strategy is none")
    student: str | dict[str, Any] = Field(
        description="a preset (bert-6l-768, …) or {layers, hidden, heads, intermediate}"
    )
    strategies: Annotated[list[str | StrategyEntry], Field(min_length=1)] = Field(
        description="none, vanilla, tinybert, minilm, minilmv2, or {name, label, lr, options}"
    )
    budget: BudgetConfig
    data_setting: Literal["unlimited", "limited"] = Field(
        "unlimited", description="unlimited: no run ever starts a second epoch (SPEC §1)"
    )
    teacher_cost: Literal["inference", "free"] | AmortizedCost = Field("inference", description="SPEC §7a")
    report: ReportConfig = Field(default_factory=ReportConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    glue: GlueConfig = Field(default_factory=GlueConfig)

    @model_validator(mode="before")
    @classmethod
    def _required(cls, data):
        if not isinstance(data, dict):
            return data
        if "student" not in data:
            raise BudgetKDError(
                "config key 'student' is required (a preset such as bert-6l-768, or a mapping)"
            )
        if data.get("strategies") is None:
            raise BudgetKDError("config key 'strategies' is required, e.g. [none, vanilla, tinybert, minilm]")
        if not isinstance(data.get("budget"), dict):
            raise BudgetKDError(f"config key 'budget' must be a mapping, got {data.get('budget')!r}")
        return data

    @field_validator("student")
    @classmethod
    def _arch(cls, value):
        from budgetkd.models import resolve_architecture

        resolve_architecture(value)
        return value

    @field_validator("strategies", mode="before")
    @classmethod
    def _names(cls, entries):
        """``none`` is short for ``{name: none}``."""
        return (
            [{"name": e} if isinstance(e, str) else e for e in entries]
            if isinstance(entries, list)
            else entries
        )

    @field_validator("strategies")
    @classmethod
    def _entries(cls, entries: list) -> list[StrategyEntry]:
        labels = [e.label for e in entries]
        if len(set(labels)) != len(labels):
            raise BudgetKDError(
                "config key 'strategies': a strategy appears twice; give repeated ones distinct 'label's"
            )
        return entries

    @field_validator("pretrain_seeds")
    @classmethod
    def _pretrain_seeds(cls, seeds: list[int]) -> list[int]:
        if 0 not in seeds or len(set(seeds)) != len(seeds):
            raise BudgetKDError(
                f"config key 'pretrain_seeds' must hold 0 (the calibration's run) and distinct offsets, got {seeds}"
            )
        return seeds

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        self._check_teacher()
        self._check_sweep()
        self._check_data_limit()
        return self

    def _check_teacher(self) -> None:
        tok = self.data.tokenizer
        if self.teacher is None and any(s.needs_teacher for s in self.strategies):
            raise BudgetKDError(
                "config key 'teacher' is required by the KD strategies (path: … or pretrain: …)"
            )
        if tok == "teacher" and self.teacher is None:
            raise BudgetKDError(
                "config key 'data.tokenizer' is 'teacher' but there is no teacher; give a path or {train: N}"
            )
        if tok == "teacher" and self.teacher.pretrain is not None:
            raise BudgetKDError(
                "config key 'data.tokenizer': a teacher trained by budgetkd uses the data's tokenizer; "
                "set data.tokenizer to a path/hub id or {train: VOCAB_SIZE}"
            )

    def _check_sweep(self) -> None:
        sweep = self.budget.sweep_settings()
        if sweep and not any(s.name == "none" for s in self.strategies):
            raise BudgetKDError(
                "config key 'budget.sweep': a sweep needs the strategy none (every Δ and crossover is against No-KD)"
            )

    def _check_data_limit(self) -> None:
        """SPEC §1: under unlimited data no run may need a second epoch (known from the config alone
        for a calibration and its multiples)."""
        cal, sweep = self.budget.calibrate, self.budget.sweep_settings()
        if self.data_setting != "unlimited" or cal is None:
            return
        if sweep and sweep["kind"] == "multiples" and cal.epochs * max(sweep["points"]) > 1 + 1e-9:
            raise BudgetKDError(
                f"config key 'budget.sweep': the point {max(sweep['points']):g}× of "
                f"{cal.epochs:g} No-KD epoch(s) needs a second epoch; "
                "set data_setting: limited or keep the multiples ≤ 1"
            )
        if cal.epochs > 1:
            raise BudgetKDError(
                "config key 'budget.calibrate.epochs' > 1 repeats the data: set data_setting: limited"
            )

    def resolved(self) -> dict:
        """Plain data with every default filled in: what ``DIR/experiment.json`` holds."""
        return {
            "name": self.name,
            "seed": self.seed,
            "data": self.data.model_dump() | {"tokenizer": _dump(self.data.tokenizer)},
            "student": copy.deepcopy(self.student),
            "strategies": [s.model_dump() for s in self.strategies],
            "teacher": None if self.teacher is None else self.teacher.resolved(),
            "budget": self.budget.resolved(),
            "data_setting": self.data_setting,
            "teacher_cost": _teacher_cost(self),
            "report": self.report.model_dump(),
            "optimizer": self.optimizer.model_dump(),
            # compile at its default (null) is not recorded: experiment.json as before issue 22
            "training": self.training.model_dump(
                exclude={"compile"} if self.training.compile is None else None
            ),
            "glue": self.glue.model_dump(),
        } | ({"pretrain_seeds": list(self.pretrain_seeds)} if self.pretrain_seeds != [0] else {})
        # at its default pretrain_seeds is not recorded: experiment.json (and what resumes) unchanged


def _dump(value):
    return value.model_dump() if isinstance(value, BaseModel) else value


def _teacher_cost(cfg: ExperimentConfig) -> dict:
    """``teacher_cost`` (SPEC §7a) as ``{"mode": …}`` plus, for amortized, pretraining and students."""
    value = cfg.teacher_cost
    if isinstance(value, str):
        return {"mode": value}
    block = value.amortized
    pretraining = block.pretraining
    currency = budget_currency(cfg.budget.resolved())
    if pretraining == "auto":
        if cfg.teacher is None or cfg.teacher.pretrain is None:
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
    if currency not in ("time", "flops"):
        raise BudgetKDError(
            f"config key 'teacher_cost': amortized needs a time or FLOPs budget, not {currency}"
        )
    if pretraining != "auto" and Budget.parse(pretraining).currency != currency:
        # a charge in the other currency would be a charge of 0 in the budget's
        raise BudgetKDError(
            f"config key 'teacher_cost.amortized.pretraining' ({block.pretraining}) must be in the "
            f"budget's currency, {currency}"
        )
    return {"mode": "amortized", "pretraining": pretraining, "students": block.students}


def budget_currency(budget: dict) -> str:
    """The currency every student's budget is in: the sweep's budgets', else the calibration's or
    the explicit budget's."""
    sweep = budget.get("sweep")
    if sweep and sweep["kind"] == "budgets":
        return Budget.parse(sweep["points"][0]).currency
    if "calibrate" in budget:
        return budget["calibrate"]["currency"]
    return Budget.parse(budget["explicit"]).currency


# -- one pretraining run ------------------------------------------------------------------------
class TrainConfig(BaseModel):
    """Everything that determines a pretraining run. Saved as ``RUN_DIR/run_config.json``.

    The fields marked ``cli`` are the ``budgetkd pretrain`` flags (``--batch-size`` for
    ``batch_size``), generated from this declaration with their description as help."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    data: str = Field(description="a `budgetkd prepare` output", json_schema_extra={"cli": "DATA_DIR"})
    out: str = Field(description="the run directory", json_schema_extra={"cli": "RUN_DIR"})
    student: str | dict[str, Any] = Field(
        "bert-tiny",
        description="bert-tiny, bert-mini, bert-small, bert-6l-768, … or YAML",
        json_schema_extra={"cli": "PRESET|FILE"},
    )
    strategy: str = Field(
        "none", description="none, vanilla, tinybert, minilm, minilmv2", json_schema_extra={"cli": "S"}
    )
    teacher: str | None = Field(
        None, description="the teacher (KD strategies)", json_schema_extra={"cli": "PATH_OR_HUB_ID"}
    )
    budget: BudgetText = Field("300steps", json_schema_extra={"cli": "BUDGET"})
    batch_size: PositiveInt = Field(
        1024, description="global batch (all processes)", json_schema_extra={"cli": "N"}
    )
    micro_batch_size: PositiveInt | None = Field(
        None, description="the most one device holds (default 64)", json_schema_extra={"cli": "N"}
    )
    lr: LearningRate | None = Field(
        None, description="peak learning rate (default: 1e-3 No-KD, 5e-4 KD)", json_schema_extra={"cli": "LR"}
    )
    warmup: Fraction01 = Field(
        0.06, description="warm-up share of the budget", json_schema_extra={"cli": "F"}
    )
    weight_decay: NonNegativeNumber = 0.01
    adam_betas: tuple[Annotated[Number, Field(ge=0, lt=1)], Annotated[Number, Field(ge=0, lt=1)]] = (
        0.9,
        0.98,
    )
    adam_eps: PositiveNumber = 1e-6
    max_grad_norm: NonNegativeNumber = Field(
        0.0, description="clip gradients to this norm (0: no clipping)", json_schema_extra={"cli": "X"}
    )
    seed: NonNegativeInt = Field(0, description="initial weights and dropout", json_schema_extra={"cli": "N"})
    data_seed: NonNegativeInt | None = Field(
        None, description="data order (default: seed)", json_schema_extra={"cli": "N"}
    )
    mask_seed: NonNegativeInt | None = Field(None, description="masks (default: seed)")
    dropout: Fraction01 | None = Field(
        None, description="pretraining dropout (default: BERT's 0.1)", json_schema_extra={"cli": "P"}
    )
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    max_epochs: PositiveNumber | None = Field(
        None,
        description="data limit: never start a step beyond this many epochs",
        json_schema_extra={"cli": "E"},
    )
    fixed_mask_count: bool = False
    num_evals: PositiveInt = Field(
        10, description="validations at budget fractions 1/n … 1", json_schema_extra={"cli": "N"}
    )
    eval_sequences: PositiveInt = 512
    eval_batch_size: PositiveInt = 64
    checkpoint_interval_s: NonNegativeNumber = 600.0
    checkpoint_every_steps: NonNegativeInt = Field(
        0, description="also checkpoint every N steps (0: off)", json_schema_extra={"cli": "N"}
    )
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a non-finite loss stops the run or skips the step",
        json_schema_extra={"cli": "MODE"},
    )
    device: str = Field("auto", description="auto, cpu, cuda", json_schema_extra={"cli": "DEVICE"})
    compile: bool | None = Field(
        None,
        description="torch.compile the whole micro-step (encoders, sparse MLM head, losses); "
        "default: on with CUDA, off elsewhere",
        json_schema_extra={"cli": "flag"},
    )
    log_every: PositiveInt = 10
    progress: bool = True
    # Sweeps (SPEC §7a). schedule "wsd": warm-up over ``schedule_warmup`` (an amount of the
    # budget's currency), constant, then linear decay over the last ``decay_fraction`` of
    # ``schedule_point`` (None → the budget). ``snapshots``: amounts at which a copy of the state
    # is kept in RUN_DIR/snapshots/ for branches; ``init_from``: a snapshot this run continues.
    schedule: Literal["linear", "wsd"] = "linear"
    schedule_point: PositiveNumber | None = None
    schedule_warmup: NonNegativeNumber | None = None
    decay_fraction: Annotated[Number, Field(gt=0, le=1)] = 0.2
    snapshots: list[PositiveNumber] = Field(default_factory=list)
    init_from: str | None = None
    charge_teacher: bool = True  # False: teacher_cost free (SPEC §7a), its forward passes uncharged

    # Fields that may change between a run and its resumption.
    RESUMABLE_CHANGES: ClassVar[tuple] = (
        "progress", "device", "compile", "log_every", "checkpoint_interval_s", "checkpoint_every_steps",
    )  # fmt: skip

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise BudgetKDError(describe_error(type(self), exc)) from None

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _tuple(cls, value):
        return tuple(value) if isinstance(value, list) else value

    @field_validator("budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        Budget.parse(value)
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        from budgetkd.strategies import get_strategy

        get_strategy(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        from budgetkd.strategies import get_strategy

        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise BudgetKDError(
                f"micro-batch size {self.micro_batch_size} is larger than the batch size {self.batch_size}"
            )
        if self.schedule == "linear" and (self.snapshots or self.init_from):
            raise BudgetKDError("snapshots and branches need schedule: wsd")
        if get_strategy(self.strategy).needs_teacher and not self.teacher:
            raise BudgetKDError(f"strategy {self.strategy!r} needs a teacher: pass --teacher PATH_OR_HUB_ID")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        if not isinstance(values, dict):
            raise BudgetKDError(f"pretraining options must be a mapping, got {values!r}")
        return cls(**values)

    def resolved(self) -> dict:
        out = self.model_dump()
        out["adam_betas"] = list(self.adam_betas)
        return out

    def identity(self) -> dict:
        """What determines the run's result: everything but the fields a resumption may change and
        the locations (a moved run directory or dataset stays the same run; the data's content
        fingerprint stands in for its path)."""
        skip = set(self.RESUMABLE_CHANGES) | {"out", "data"}
        identity = {k: v for k, v in self.resolved().items() if k not in skip}
        # ``compile`` became an execution choice like ``device`` (on by default on CUDA; the same
        # mathematics, float rounding apart): the identities — and so the stage fingerprints —
        # written before kept ``compile: false``, and a finished stage must stay finished
        identity["compile"] = False
        return identity


def cli_fields() -> dict[str, tuple[str, Any]]:
    """The ``budgetkd pretrain`` flags: TrainConfig field → (metavar, FieldInfo)."""
    return {
        name: (info.json_schema_extra["cli"], info)
        for name, info in TrainConfig.model_fields.items()
        if isinstance(info.json_schema_extra, dict) and "cli" in info.json_schema_extra
    }


# -- errors: one line naming the field and the rule --------------------------------------------
_TYPE_WORDS = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true/false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "none_required": "null",
}
_NUMERIC = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _path(loc: tuple) -> str:
    """('strategies', 1, 'lr') → strategies[1].lr; union-member tags ('str', 'list[str]',
    'StrategyEntry', 'function-after[…]') are not keys and are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (
            part.isidentifier()
            and part.islower()
            and part not in ("str", "int", "float", "bool", "dict", "list")
        ):
            out += f".{part}" if out else part
    return out


def _range_text(constraints: dict) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return " and ".join(f"{words[k]} {v:g}" for k, v in constraints.items())


def _field_constraints(model: type[BaseModel], loc: tuple) -> dict:
    """The numeric bounds declared on the field at ``loc`` (for 'must be ≥ 0 and < 1')."""
    import annotated_types as at

    info = None
    for part in loc:
        if isinstance(part, str) and part in getattr(model, "model_fields", {}):
            info = model.model_fields[part]
            nested = [
                a for a in _flat_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            model = nested[0] if nested else model
    out: dict = {}
    if info is None:
        return out
    for meta in list(info.metadata) + [
        m for a in _flat_args(info.annotation) for m in getattr(a, "__metadata__", ())
    ]:
        for kind, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
            if isinstance(meta, cls):
                out[kind] = getattr(meta, kind)
        for inner in getattr(meta, "metadata", ()):
            for kind, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
                if isinstance(inner, cls):
                    out[kind] = getattr(inner, kind)
    return out


def _flat_args(annotation) -> list:
    from typing import get_args

    out, todo = [], [annotation]
    while todo:
        item = todo.pop()
        out.append(item)
        todo.extend(get_args(item))
    return out


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, str) and part in getattr(model, "model_fields", {}):
            nested = [
                a
                for a in _flat_args(model.model_fields[part].annotation)
                if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            if nested:
                model = nested[0]
    return list(getattr(model, "model_fields", {}))


def describe_error(model: type[BaseModel], error: ValidationError) -> str:
    """The first problem of ``error`` as one line: ``PATH: RULE, got VALUE``."""
    errors = error.errors(include_url=False)
    # a union (``str | StrategyEntry``) reports every member: a type mismatch of one member says
    # less than what another member found inside the value
    specific = [e for e in errors if e["type"] not in _TYPE_WORDS]
    if specific:  # within the first field that failed, the deepest finding (a union's member)
        top = _path(specific[0]["loc"][:1])
        first = max((e for e in specific if _path(e["loc"][:1]) == top), key=lambda e: len(_path(e["loc"])))
    else:
        first = max(errors, key=lambda e: len(_path(e["loc"])))
    path = _path(first["loc"])
    group = [e for e in errors if _path(e["loc"]) == path]
    kinds = {e["type"] for e in group}
    got = first.get("input")
    if "missing" in kinds:
        return f"{path}: is required"
    if "extra_forbidden" in kinds:
        return f"{path}: unknown config key (known: {', '.join(_known_keys(model, first['loc']))})"
    if kinds & _NUMERIC:
        bounds = _field_constraints(model, first["loc"]) or first.get("ctx", {})
        return f"{path}: must be {_range_text(bounds)}, got {got!r}"
    if "literal_error" in kinds and len(kinds) == 1:
        return f"{path}: must be {first['ctx']['expected']}, got {got!r}"
    if "too_short" in kinds:
        least = first.get("ctx", {}).get("min_length", 1)
        return (
            f"{path}: must not be empty"
            if least == 1
            else f"{path}: must have at least {least} items, got {got!r}"
        )
    if "too_long" in kinds:
        return f"{path}: must have at most {first.get('ctx', {}).get('max_length')} items, got {got!r}"
    if "value_error" in kinds:
        return f"{path}: {first['msg'].removeprefix('Value error, ')}"
    words = []
    for e in group:
        word = _TYPE_WORDS.get(e["type"]) or (
            " or ".join(repr(x) for x in [e["ctx"]["expected"]]) if e["type"] == "literal_error" else None
        )
        if word and word not in words:
            words.append(word)
    if "an integer" in words and "a number" in words:
        words.remove("an integer")  # int | float: a number
    if words:
        return f"{path}: must be {' or '.join(words)}, got {got!r}"
    return f"{path}: {first['msg']}, got {got!r}"


def parse_model(model: type[BaseModel], values: Any, what: str = "config"):
    """``model(**values)``, every validation problem as a one-line :class:`BudgetKDError`."""
    if not isinstance(values, dict):
        raise BudgetKDError(f"{what} must be a mapping, got {values!r}")
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BudgetKDError(describe_error(model, exc)) from None


# -- loading --------------------------------------------------------------------------------------
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


def validate_experiment(raw: dict, default_name: str = "experiment") -> dict:
    """The resolved experiment (plain data) of a raw mapping, or a one-line error."""
    if not isinstance(raw, dict):
        raise BudgetKDError("experiment config must be a mapping at the top level")
    raw = {"name": default_name, **raw}
    return parse_model(ExperimentConfig, raw).resolved()


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


def json_schema() -> dict:
    """The JSON Schema of an experiment YAML (``budgetkd schema``), bounds as standard keywords."""
    schema = ExperimentConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "budgetkd experiment"
    return _standard_bounds(schema)


def _standard_bounds(node):
    """pydantic writes bounds of a union as ge/gt/le/lt: the JSON Schema keywords are these."""
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    if isinstance(node, dict):
        return {names.get(k, k): _standard_bounds(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_standard_bounds(v) for v in node]
    return node


__all__ = [
    "ExperimentConfig",
    "TrainConfig",
    "budget_currency",
    "check_teacher_path",
    "cli_fields",
    "json_schema",
    "load_experiment",
    "parse_model",
    "validate_experiment",
]
