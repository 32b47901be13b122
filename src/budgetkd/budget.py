"""Compute budgets (SPEC §3): currencies, the meter that charges every training step, and the
learning-rate schedule as a function of the budget fraction consumed.

A budget is one quantity in one currency:

==========  =======================================================  ==================
currency    what is counted                                          CLI spelling
==========  =======================================================  ==================
time        wall-clock seconds inside training steps                 ``90s`` ``30m`` ``4h``
flops       analytic FLOPs (student fwd+bwd, teacher fwd, extras)    ``2.5e15flops``
tokens      real (non-padding) input tokens of the student           ``3e6tokens``
steps       optimizer steps                                          ``500steps``
epochs      packed sequences / sequences in the training split       ``1epochs``
==========  =======================================================  ==================

Every run records all five whatever its currency. A run stops on the first optimizer step after
which the consumed amount reaches the budget (``consumed >= amount``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from budgetkd.errors import BudgetKDError

CURRENCIES = ("time", "flops", "tokens", "steps", "epochs")

_UNITS = {
    "s": ("time", 1.0),
    "sec": ("time", 1.0),
    "m": ("time", 60.0),
    "min": ("time", 60.0),
    "h": ("time", 3600.0),
    "flops": ("flops", 1.0),
    "flop": ("flops", 1.0),
    "tokens": ("tokens", 1.0),
    "token": ("tokens", 1.0),
    "steps": ("steps", 1.0),
    "step": ("steps", 1.0),
    "epochs": ("epochs", 1.0),
    "epoch": ("epochs", 1.0),
}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """``amount`` of ``currency`` (seconds for time)."""

    currency: str
    amount: float

    def __post_init__(self) -> None:
        if self.currency not in CURRENCIES:
            raise BudgetKDError(
                f"unknown budget currency {self.currency!r}; expected one of {', '.join(CURRENCIES)}"
            )
        if not (math.isfinite(self.amount) and self.amount > 0):
            raise BudgetKDError(f"budget must be a positive finite amount, got {self.amount!r}")
        if self.currency == "steps" and self.amount != int(self.amount):
            raise BudgetKDError(f"a steps budget must be a whole number, got {self.amount!r}")

    @classmethod
    def parse(cls, text: str | int | float) -> Budget:
        """Parse ``90s``, ``30m``, ``4h``, ``2.5e15flops``, ``3e6tokens``, ``500steps``, ``1epochs``."""
        if isinstance(text, Budget):
            return text
        if not isinstance(text, str):
            raise BudgetKDError(
                f"budget {text!r} has no unit; write e.g. 90s, 30m, 4h, 2.5e15flops, 3e6tokens, 500steps, 1epochs"
            )
        match = _BUDGET_RE.match(text)
        if not match:
            raise BudgetKDError(
                f"malformed budget {text!r}; write a positive number with a unit: "
                "90s, 30m, 4h, 2.5e15flops, 3e6tokens, 500steps, 1epochs"
            )
        number, unit = match.groups()
        if unit.lower() not in _UNITS:
            raise BudgetKDError(
                f"unknown budget unit {unit!r} in {text!r}; use s, m, h, flops, tokens, steps or epochs"
            )
        currency, scale = _UNITS[unit.lower()]
        return cls(currency, float(number) * scale)

    def __str__(self) -> str:
        if self.currency == "time":
            return f"{self.amount:g}s"
        return f"{self.amount:g}{self.currency}"

    def exact_text(self) -> str:
        """The budget as text without rounding (``repr`` of the amount: ``1234567.0s``,
        ``3e+16flops``), for budgets that are stored and parsed again (``str`` keeps 6 digits)."""
        unit = {"time": "s"}.get(self.currency, self.currency)
        amount = int(self.amount) if self.currency == "steps" else self.amount
        return f"{amount!r}{unit}"

    def to_dict(self) -> dict:
        return {"currency": self.currency, "amount": self.amount, "text": str(self)}


@dataclass
class Meter:
    """Everything a run has consumed so far, in all five currencies.

    ``flops_student`` counts student forward+backward and the strategy's loss extras;
    ``flops_teacher`` the teacher forward. ``time_s`` is charged training time only (SPEC §3:
    data waiting, teacher, student, losses, optimizer, all-reduce); ``time_teacher_s`` the part
    of it spent in the teacher forward. Evaluation and checkpointing go to ``time_excluded_s``.
    """

    steps: int = 0
    sequences: int = 0
    tokens: int = 0
    time_s: float = 0.0
    time_teacher_s: float = 0.0
    time_excluded_s: float = 0.0
    flops_student: float = 0.0
    flops_teacher: float = 0.0
    num_train_sequences: int = 1
    extra: dict = field(default_factory=dict)
    # SPEC §7a teacher_cost: free → the teacher's forward passes are not charged to the budget
    # (they are still recorded: time_teacher_s, flops_teacher)
    charge_teacher: bool = True

    @property
    def flops(self) -> float:
        return self.flops_student + self.flops_teacher

    @property
    def epochs(self) -> float:
        return self.sequences / max(1, self.num_train_sequences)

    def consumed(self, currency: str) -> float:
        """The amount charged to the budget in ``currency``."""
        return {
            "time": self.time_s if self.charge_teacher else self.time_s - self.time_teacher_s,
            "flops": self.flops if self.charge_teacher else self.flops_student,
            "tokens": float(self.tokens),
            "steps": float(self.steps),
            "epochs": self.epochs,
        }[currency]

    def fraction(self, budget: Budget) -> float:
        """Budget fraction p ∈ [0, 1] consumed so far."""
        return min(1.0, self.consumed(budget.currency) / budget.amount)

    def exhausted(self, budget: Budget) -> bool:
        return self.consumed(budget.currency) >= budget.amount

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Meter:
        return cls(**state)

    def summary(self) -> dict:
        """The five currencies plus the student/teacher split and throughput."""
        tokens_per_s = self.tokens / self.time_s if self.time_s > 0 else 0.0
        return {
            "time_s": self.time_s,
            "time_teacher_s": self.time_teacher_s,
            "time_student_s": self.time_s - self.time_teacher_s,
            "time_excluded_s": self.time_excluded_s,
            "flops": self.flops,
            "flops_student": self.flops_student,
            "flops_teacher": self.flops_teacher,
            "flops_teacher_share": self.flops_teacher / self.flops if self.flops > 0 else 0.0,
            "time_teacher_share": self.time_teacher_s / self.time_s if self.time_s > 0 else 0.0,
            "tokens": self.tokens,
            "sequences": self.sequences,
            "steps": self.steps,
            "epochs": self.epochs,
            "tokens_per_s": tokens_per_s,
        }


def learning_rate(peak_lr: float, budget_fraction: float, warmup: float = 0.06) -> float:
    """SPEC §3: linear warm-up to ``peak_lr`` over p ∈ [0, warmup], then linear decay to 0 at p = 1.

    lr(p) = peak · p / warmup            for p < warmup
    lr(p) = peak · (1 − p) / (1 − warmup)  otherwise
    """
    p = min(max(budget_fraction, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return peak_lr * p / warmup
    if warmup >= 1.0:
        return peak_lr
    return peak_lr * max(0.0, 1.0 - p) / (1.0 - warmup)


def full_batches(epochs: float, num_train: int, batch_size: int) -> int:
    """⌊epochs · N / B⌋: the full batches that fit in ``epochs`` of N sequences — the one data rule
    of every run (SPEC §1): the data limit of ``max_epochs`` and the length of an epochs budget."""
    return math.floor(epochs * num_train / batch_size + 1e-9)


def in_steps(budget: Budget, num_train: int, batch_size: int) -> Budget:
    """An epochs budget as the steps it trains, ⌊E · N / B⌋ full batches (the calibration's "one
    epoch" reads no sequence of a second one); any other budget unchanged."""
    if budget.currency != "epochs":
        return budget
    steps = full_batches(budget.amount, num_train, batch_size)
    if steps < 1:
        raise BudgetKDError(
            f"budget {budget} is less than one full batch ({num_train} training sequences in batches of "
            f"{batch_size})"
        )
    return Budget("steps", float(steps))
