"""budgetkd: is knowledge distillation worth its cost? Pretrain BERT students with and without a
teacher under the same compute budget, fine-tune them on GLUE with one recipe, and compare."""

from budgetkd.errors import BudgetKDError

__all__ = ["BudgetKDError", "__version__"]
__version__ = "0.1.0"
