"""GLUE fine-tuning and evaluation of any model directory that ``transformers`` can load (SPEC §6).

- :mod:`budgetkd.glue.tasks`: the task registry (files, columns, labels, metrics, task score);
- :mod:`budgetkd.glue.loading`: the classic ``glue_data`` files and ``nyu-mll/glue`` from the hub;
- :mod:`budgetkd.glue.metrics`: scikit-learn / scipy metrics;
- :mod:`budgetkd.glue.finetune`: the one fine-tuning recipe, for one configuration;
- :mod:`budgetkd.glue.search`: the grid, the per-run cache files, best-configuration selection;
- :mod:`budgetkd.glue.pipeline`: :func:`run_glue`, which composes them and writes the outputs;
- :mod:`budgetkd.glue.cli`: the ``budgetkd glue`` command.

``run_glue`` is imported lazily so that building the command-line parser does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_glue"]


def __getattr__(name: str) -> Any:
    if name == "run_glue":
        from budgetkd.glue.pipeline import run_glue

        return run_glue
    raise AttributeError(f"module 'budgetkd.glue' has no attribute {name!r}")
