"""Dropout of a packed batch drawn in the padded batch's layout, so that unpadded fine-tuning is
the padded run's training, dropout included (SPEC §6: padding is an implementation detail).

A dropout mask is a draw from the global generator over a tensor of some shape: the padded batch
draws ``[B, L, H]`` masks for the hidden states (embeddings, after each attention and each
feed-forward block) and ``[B, heads, L, L]`` masks for the attention probabilities; the packed
rows ``[R, W]`` of the same examples are other shapes, so by default they would be other draws,
and the two runs would differ as much as two seeds do. Here, during one packed training forward:

- every hidden-state dropout draws the padded ``[B, L, H]`` mask (same generator, same order) and
  *gathers* it: the token at packed position (r, w), example b's position t, takes the mask row
  of padded position (b, t) (:class:`LayoutDropout`);
- attention runs in the padded layout: queries, keys and values are gathered into ``[B, heads,
  L, d]``, the model's own attention function (SDPA or eager, with its dropout) runs on them with
  the padded batch's key mask, and the output is gathered back to the packed rows
  (:func:`padded_layout_attention`). Its dropout mask is the padded run's, bit for bit (its
  probabilities up to the float rounding of the projections, which ran on packed rows).

Every real token then sees exactly the padded run's mask entries; what the padded run draws for
pad positions is drawn and discarded. Cost: the padded batch's random draws and attention (what
the padded run pays for them), two row gathers per layer; the linear layers, embeddings, layer
norms and the feed-forward blocks (most of a step) stay unpadded.

Where the padded model's masks come from a fused kernel with its own random stream — CUDA
scaled-dot-product attention (flash / memory-efficient) — nothing gains by the padded layout, and
the packed batch keeps its own draws (:func:`applies`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "budgetkd_padded_layout"  # registered in transformers' AttentionInterface
# The packed forward in progress (set by padded_layout_dropout): its layout, and the model's own
# attention implementation and function; a context variable, so threads never see each other's.
_CURRENT: ContextVar[tuple[PaddedLayout, str, Callable] | None] = ContextVar("padded_layout", default=None)


def attention_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``allowed`` (True = may attend) as the attention function wants it: boolean for SDPA,
    additive (0 / dtype min) for eager attention, which adds the mask to the scores."""
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@dataclass(frozen=True)
class PaddedLayout:
    """Where each token of packed rows ``[R, W]`` sits in the right-padded ``[B, L]`` batch of the
    same examples (``L`` = the longest example, as :meth:`EncodedSplit.collate` pads), as flat
    indices for ``index_select``:

    - ``to_packed`` ``[R·W]``: the padded position ``b·L + t`` of each packed token (a row's tail
      takes 0: no real token reads a tail);
    - ``to_padded`` ``[B·L]``: the packed position of each padded one (a pad position takes its
      example's first token: a pad is a masked key, and its query's output is never gathered back);
    - ``valid`` ``[B, L]``: ``t < len(b)``, the padded batch's attention mask; ``padding``:
      whether any example is shorter than ``L`` (read once, not once per layer)."""

    rows: int
    width: int
    batch: int
    length: int
    to_packed: torch.Tensor
    to_padded: torch.Tensor
    valid: torch.Tensor
    padding: bool

    @classmethod
    def of_packed(
        cls, segments: torch.Tensor, position_ids: torch.Tensor, cls_index: torch.Tensor
    ) -> PaddedLayout:
        """From :meth:`EncodedSplit.pack`'s ``segments`` (−1 on tails), ``position_ids`` and
        ``cls_index`` (example b's first token, flat)."""
        rows, width = segments.shape
        batch = cls_index.numel()
        real = segments.flatten() >= 0
        example, position = segments.flatten().clamp(min=0), position_ids.flatten()
        lengths = torch.bincount(example[real], minlength=batch)
        length = int(lengths.max())
        to_packed = torch.where(real, example * length + position, 0)
        to_padded = cls_index.repeat_interleave(length)
        to_padded[to_packed[real]] = torch.arange(rows * width, device=segments.device)[real]
        valid = torch.arange(length, device=segments.device) < lengths[:, None]
        padding = bool((lengths < length).any())
        return cls(rows, width, batch, length, to_packed, to_padded, valid, padding)

    def hidden_noise(self, p: float, like: torch.Tensor) -> torch.Tensor:
        """The padded batch's ``[B, L, H]`` mask scaled by 1/(1−p), gathered to ``[R, W, H]``.
        On CPU drawn as ``F.dropout`` draws its noise there (``empty_like(x).bernoulli_(1 − p)
        .div_(1 − p)``, then ``x · noise``), without a tensor of ones to drop (the tests hold it to
        ``F.dropout``'s mask); elsewhere (CUDA's fused dropout kernel, eager attention) as
        ``F.dropout(ones[B, L, H])``, whose mask is a function of the shape and the generator."""
        hidden = like.shape[-1]
        if like.device.type == "cpu":
            noise = like.new_empty(self.batch * self.length, hidden).bernoulli_(1 - p).div_(1 - p)
        else:
            noise = F.dropout(like.new_ones(self.batch, self.length, hidden), p, True).view(-1, hidden)
        return noise.index_select(0, self.to_packed).view(self.rows, self.width, hidden)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``[R, heads, W, d]`` (as attention receives them) → padded ``[B, heads, L, d]``,
        with the strides the padded model's own projections give."""
        heads, dim = x.shape[1], x.shape[3]
        flat = x.transpose(1, 2).reshape(self.rows * self.width, heads, dim)
        return flat.index_select(0, self.to_padded).view(self.batch, self.length, heads, dim).transpose(1, 2)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """Attention output, padded ``[B, L, heads, d]`` → packed ``[R, W, heads, d]``."""
        flat = x.reshape(self.batch * self.length, *x.shape[2:])
        return flat.index_select(0, self.to_packed).view(self.rows, self.width, *x.shape[2:])

    def key_mask(self, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The padded batch's ``[B, 1, L, L]`` mask as its model builds it (None without padding,
        as transformers skips an all-ones mask)."""
        if not self.padding:
            return None
        allowed = self.valid[:, None, None, :].expand(self.batch, 1, self.length, self.length)
        return attention_mask(allowed, attn_implementation, dtype)


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
    dropout: float = 0.0,
    **kwargs,
):
    """Attention of packed rows computed in the padded layout: the model's own attention function
    on ``layout.padded(q, k, v)`` with the padded key mask and ``dropout``, gathered back. Without
    attention dropout there is nothing to reproduce: the packed rows run as they are, with their
    block-diagonal ``attention_mask``. Returns ``(output [R, W, heads, d], None)``, transformers'
    attention-interface contract."""
    layout, implementation, attend = _CURRENT.get()
    if dropout == 0:
        return attend(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    mask = layout.key_mask(implementation, query.dtype)
    padded = [layout.padded(x) for x in (query, key, value)]
    output, _ = attend(module, *padded, mask, dropout=dropout, **kwargs)
    return layout.packed(output), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, padded_layout_attention)


def _attention_function(implementation: str) -> Callable:
    """What ``BertSelfAttention`` would call for ``implementation``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


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
    """The encoder's hidden-state dropout modules, as (owner, attribute): embeddings, and per
    layer the attention output and the feed-forward output."""
    sites = [(bert.embeddings, "dropout")]
    for layer in bert.encoder.layer:
        sites += [(layer.attention.output, "dropout"), (layer.output, "dropout")]
    return sites


@contextlib.contextmanager
def padded_layout_dropout(model: torch.nn.Module, layout: PaddedLayout) -> Iterator[None]:
    """For one forward of ``model`` (a ``BertForSequenceClassification``) on packed rows: every
    hidden-state dropout draws ``layout``'s padded mask (:class:`LayoutDropout`), and attention
    runs in the padded layout (:func:`padded_layout_attention`); restored on exit. The
    classifier's own dropout acts on ``[B, H]`` in both layouts and is left as it is."""
    _register()
    config = model.config
    sites = _sites(model.bert)
    originals = [getattr(owner, name) for owner, name in sites]
    implementation = config._attn_implementation
    token = _CURRENT.set((layout, implementation, _attention_function(implementation)))
    try:
        for (owner, name), module in zip(sites, originals):
            replacement = LayoutDropout(module.p, layout)
            replacement.train(module.training)
            setattr(owner, name, replacement)
        config._attn_implementation = ATTENTION_NAME
        yield
    finally:
        config._attn_implementation = implementation
        _CURRENT.reset(token)
        for (owner, name), module in zip(sites, originals):
            setattr(owner, name, module)
