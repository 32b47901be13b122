"""One registry of pretraining objectives. A new strategy is one module plus one line here."""

from __future__ import annotations

from budgetkd.errors import BudgetKDError
from budgetkd.strategies.base import StepInputs, Strategy
from budgetkd.strategies.minilm import MiniLM
from budgetkd.strategies.minilmv2 import MiniLMv2
from budgetkd.strategies.none import NoKD
from budgetkd.strategies.tinybert import TinyBERT
from budgetkd.strategies.vanilla import VanillaKD

REGISTRY: dict[str, type[Strategy]] = {
    NoKD.name: NoKD,
    VanillaKD.name: VanillaKD,
    TinyBERT.name: TinyBERT,
    MiniLM.name: MiniLM,
    MiniLMv2.name: MiniLMv2,
}


def get_strategy(name: str) -> type[Strategy]:
    if name not in REGISTRY:
        raise BudgetKDError(f"unknown strategy {name!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "StepInputs", "Strategy", "get_strategy"]
