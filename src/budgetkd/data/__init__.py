"""Pretraining data: corpus reading, tokenizers, packing, masking and the step-wise loader.

The names below are imported on first use (PEP 562), so that a process that only tokenizes
(the worker processes of ``budgetkd prepare``) never imports torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "MicroBatch": "budgetkd.data.dataset",
    "PackedData": "budgetkd.data.dataset",
    "StepBatches": "budgetkd.data.dataset",
    "validation_batches": "budgetkd.data.dataset",
    "regroup_batches": "budgetkd.data.dataset",
    "MaskingConfig": "budgetkd.data.masking",
    "mask_tokens": "budgetkd.data.masking",
    "prepare_dataset": "budgetkd.data.prepare",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'budgetkd.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value
