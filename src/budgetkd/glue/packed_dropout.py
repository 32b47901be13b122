"""Dropout masks of a packed batch drawn in the padded batch's layout, so that unpadded fine-tuning
is the padded run's training, dropout included (SPEC §6: padding is an implementation detail).

A dropout mask is a draw from the global generator over a tensor of some shape: the padded batch
draws ``[B, L, H]`` masks for the hidden states (embeddings, after each attention and each
feed-forward block) and ``[B, heads, L, L]`` masks for the attention probabilities; the packed
rows ``[R, W]`` of the same examples are other shapes, so by default they would be other draws,
and the two runs would differ as much as two seeds do. Here every site of a packed forward draws
the padded shape's mask instead, from the same generator, in the padded model's order, and
*gathers* it: the token at packed position (r, w), example b at position t of that example, takes
the mask entries of padded position (b, t), and its attention probability towards the token of
example b at position t' takes entry (b, h, t, t'). Every real token then sees exactly the
padded run's mask entries; what the padded run draws for pad positions is drawn and discarded.

Cost: the random draws of the padded batch (the packed run's other work stays unpadded), and the
attention of training steps runs as matrix products, softmax and the gathered mask — what
scaled-dot-product attention with dropout already runs on CPU (its math path).

Where the padded model's masks come from a fused kernel with its own random stream — CUDA
scaled-dot-product attention (flash / memory-efficient) — no other layout can reproduce them, and
the packed batch keeps its own draws (:func:`applies`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "budgetkd_padded_layout"  # registered in transformers' AttentionInterface


@dataclass(frozen=True)
class PaddedLayout:
    """Where each token of packed rows sits in the right-padded ``[B, L]`` batch of the same
    examples (``L`` = the longest example, as :meth:`EncodedSplit.collate` pads).

    ``example`` / ``position`` are ``[R, W]``: the token's example (0 on a row's tail, whose values
    no real token reads) and its position in that example."""

    batch: int
    length: int
    example: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of_packed(cls, segments: torch.Tensor, position_ids: torch.Tensor, batch: int) -> PaddedLayout:
        """From :meth:`EncodedSplit.pack`'s ``segments`` (−1 on tails) and ``position_ids``."""
        return cls(batch, int(position_ids.max()) + 1, segments.clamp(min=0), position_ids)

    def hidden_noise(self, p: float, like: torch.Tensor) -> torch.Tensor:
        """``dropout(ones[B, L, H])`` — the padded batch's mask scaled by 1/(1−p), exactly what
        ``F.dropout`` multiplies the padded hidden states by — gathered to ``[R, W, H]``."""
        noise = F.dropout(like.new_ones(self.batch, self.length, like.shape[-1]), p, True)
        return noise[self.example, self.position]

    def attention_noise(self, p: float, like: torch.Tensor) -> torch.Tensor:
        """The padded ``[B, heads, L, L]`` attention-probability mask (scaled), gathered to the
        packed ``[R, heads, W, W]``: entry (r, h, w, w') = padded (b(w), h, t(w), t(w')). Pairs of
        two examples get some entry: their probability is 0, the entry multiplies nothing."""
        heads = like.shape[1]
        noise = F.dropout(like.new_ones(self.batch, heads, self.length, self.length), p, True)
        rows = self.example[:, :, None]
        queries, keys = self.position[:, :, None], self.position[:, None, :]
        return noise[rows, :, queries, keys].permute(0, 3, 1, 2)  # [R, W, W, h] -> [R, h, W, W]


class LayoutDropout(torch.nn.Module):
    """``nn.Dropout(p)`` for packed hidden states ``[R, W, H]`` with the padded layout's mask."""

    def __init__(self, p: float, layout: PaddedLayout):
        super().__init__()
        self.p = p
        self.layout = layout

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return hidden
        return hidden * self.layout.hidden_noise(self.p, hidden)


def padded_layout_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Attention of packed rows with the padded layout's dropout mask:
    ``softmax(q·kᵀ·s + mask) ⊙ noise · v`` (``mask`` boolean as for SDPA, or additive as for eager;
    ``noise`` from :meth:`PaddedLayout.attention_noise`, the layout carried by ``module.dropout``).
    Returns ``(output [R, W, heads, d], None)``, transformers' attention-interface contract."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (
        query.size(-1) ** -0.5 if scaling is None else scaling
    )
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    layout = getattr(module.dropout, "layout", None)
    if dropout > 0 and layout is not None:
        probs = probs * layout.attention_noise(dropout, probs)
    return torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, padded_layout_attention)


def applies(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the padded run's masks can be reproduced: its model draws every mask with torch's
    dropout op (CPU, where SDPA with dropout runs its math path; or eager attention), and some
    dropout probability of the encoder is non-zero."""
    config = model.config
    reproducible = device.type == "cpu" or config._attn_implementation == "eager"
    rates = (
        getattr(config, "hidden_dropout_prob", 0.0),
        getattr(config, "attention_probs_dropout_prob", 0.0),
    )
    return reproducible and any(float(rate or 0.0) > 0 for rate in rates)


def _sites(bert: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """The encoder's dropout modules, as (owner, attribute): embeddings, and per layer the
    attention probabilities, the attention output and the feed-forward output."""
    sites = [(bert.embeddings, "dropout")]
    for layer in bert.encoder.layer:
        sites += [
            (layer.attention.self, "dropout"),
            (layer.attention.output, "dropout"),
            (layer.output, "dropout"),
        ]
    return sites


@contextlib.contextmanager
def padded_layout_dropout(model: torch.nn.Module, layout: PaddedLayout) -> Iterator[None]:
    """For one forward of ``model`` (a ``BertForSequenceClassification``) on packed rows: every
    encoder dropout draws ``layout``'s padded mask (:class:`LayoutDropout`, and
    :func:`padded_layout_attention` as the attention implementation); restored on exit. The
    classifier's own dropout acts on ``[B, H]`` in both layouts and is left as it is."""
    _register()
    config = model.config
    sites = _sites(model.bert)
    originals = [getattr(owner, name) for owner, name in sites]
    implementation = config._attn_implementation
    try:
        for (owner, name), module in zip(sites, originals):
            replacement = LayoutDropout(module.p, layout)
            replacement.train(module.training)
            setattr(owner, name, replacement)
        config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        config._attn_implementation = implementation
        for (owner, name), module in zip(sites, originals):
            setattr(owner, name, module)
