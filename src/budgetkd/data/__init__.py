"""Pretraining data: corpus reading, tokenizers, packing, masking and the step-wise loader."""

from budgetkd.data.dataset import MicroBatch, PackedData, StepBatches, validation_batches
from budgetkd.data.masking import MaskingConfig, mask_tokens
from budgetkd.data.prepare import prepare_dataset

__all__ = [
    "MaskingConfig",
    "MicroBatch",
    "PackedData",
    "StepBatches",
    "mask_tokens",
    "prepare_dataset",
    "validation_batches",
]
