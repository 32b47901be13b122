"""Dynamic MLM masking (SPEC §1), drawn from an explicit seeded generator.

Of the non-special real tokens, a fraction ``probability`` (15 %) is selected; of the selected,
80 % become ``[MASK]``, 10 % a random non-special token, 10 % stay unchanged. Labels hold the
original id at selected positions and −100 elsewhere. With ``fixed_count`` every sequence gets
exactly round(probability · non-special tokens) selected positions (static shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskingConfig:
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    fixed_count: bool = False

    def replaceable_ids(self) -> torch.Tensor:
        """Ids a random replacement may take: the vocabulary minus the special tokens."""
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[list(self.special_ids)] = False
        return keep.nonzero().squeeze(1)


def mask_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, config: MaskingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masked input ids, labels) for a batch ``[B, L]``; see the module docstring."""
    special = torch.isin(input_ids, torch.tensor(config.special_ids, dtype=input_ids.dtype))
    candidates = attention_mask.bool() & ~special
    scores = torch.rand(input_ids.shape, generator=generator)
    if config.fixed_count:
        counts = torch.round(candidates.sum(1).float() * config.probability).long()
        scores = torch.where(candidates, scores, torch.full_like(scores, 2.0))
        rank = scores.argsort(dim=1).argsort(dim=1)
        selected = (rank < counts[:, None]) & candidates
    else:
        selected = (scores < config.probability) & candidates
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (action < config.mask_fraction)
    to_random = (
        selected & (action >= config.mask_fraction) & (action < config.mask_fraction + config.random_fraction)
    )
    replaceable = config.replaceable_ids()
    random_ids = replaceable[torch.randint(len(replaceable), input_ids.shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(input_ids, config.mask_id), input_ids)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    return masked, labels
