"""Analytic FLOP counts for BERT encoders (SPEC §3, currency ``flops``). The one place they live.

Conventions (the usual ones of Kaplan et al. 2020 and the Chinchilla appendix):

* a multiply-add is 2 FLOPs; a matrix product [a×b]·[b×c] costs 2·a·b·c;
* only matrix products are counted: embeddings lookups, LayerNorm, softmax, GELU, dropout and
  the optimizer are ignored (they are < 2 % of the total for BERT shapes);
* the backward pass costs twice the forward pass, so training costs 3× forward;
* compute is charged on the padded length L of the batch, since padded positions are computed.

Forward FLOPs of one sequence of length L through one encoder layer (hidden D, FFN width I):

    Q, K, V projections       3 · 2·L·D·D
    scores Q·Kᵀ (all heads)   2·L·L·D
    probabilities · V         2·L·L·D
    attention output proj     2·L·D·D
    feed-forward              2·L·D·I + 2·L·I·D
    --------------------------------------------
    layer_forward(L)        = 8·L·D² + 4·L·D·I + 4·L²·D

Time is not proportional to these FLOPs across teacher and student. The count charges a
teacher-forward FLOP like a student-training FLOP; ``benchmarks/throughput.py`` measures how well
that holds. On a 2-core CPU (2×128 student, 4×256 teacher) the KD/No-KD time ratio is within 15 %
of the FLOP ratio without dropout (−8 … +12 %), but 20–34 % below it with BERT's dropout 0.1:
dropout is student-only (the teacher runs in eval mode) and costs no FLOPs, yet a third of the
student's step there (Bernoulli sampling, and attention dropout keeps SDPA off its fused kernel).
The relation softmaxes and KL terms of MiniLM/MiniLMv2 are not counted either. The currency stays
analytic and hardware-independent on purpose; the time currency is the one that equalises time.

A forward runs only as deep as its loss needs (``models.required_depth``): MiniLM and MiniLMv2
with last-layer mapping and no MLM term run the layers below the mapped one, then only its Q/K/V
projections; layers above the deepest mapped one never run. Only what runs is counted.

The MLM head is applied only at the P predicted positions (sparse prediction, SPEC §2):

    transform dense           2·P·D·D
    decoder to vocabulary     2·P·D·V
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderShape:
    """What the FLOP count of a BERT needs to know."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> EncoderShape:
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


def layer_forward(shape: EncoderShape, seq_len: int) -> float:
    """Forward FLOPs of one encoder layer for one sequence: 8·L·D² + 4·L·D·I + 4·L²·D."""
    d, i, length = shape.hidden, shape.intermediate, seq_len
    return 8.0 * length * d * d + 4.0 * length * d * i + 4.0 * length * length * d


def encoder_forward(
    shape: EncoderShape, seq_len: int, num_sequences: int, layers: int | None = None
) -> float:
    """Forward FLOPs of ``layers`` (default: all) encoder layers over ``num_sequences`` sequences."""
    n_layers = shape.layers if layers is None else layers
    return float(num_sequences) * n_layers * layer_forward(shape, seq_len)


def partial_forward(
    shape: EncoderShape, seq_len: int, num_sequences: int, layers: int, projections: int = 0
) -> float:
    """Forward FLOPs of a forward stopped early (``models.Depth``): ``layers`` complete layers,
    then ``projections`` of the next layer's Q/K/V projections, 2·L·D² each per sequence."""
    d = shape.hidden
    return encoder_forward(shape, seq_len, num_sequences, layers) + float(num_sequences) * projections * (
        2.0 * seq_len * d * d
    )


def mlm_head_forward(shape: EncoderShape, num_predicted: int) -> float:
    """Forward FLOPs of the MLM head at ``num_predicted`` positions: 2·P·D² + 2·P·D·V."""
    d = shape.hidden
    return 2.0 * num_predicted * d * d + 2.0 * num_predicted * d * shape.vocab


def relation_product(seq_len: int, width: int, num_sequences: int) -> float:
    """FLOPs of one L×L relation X·Xᵀ (or Q·Kᵀ) over all heads: 2·L²·width per sequence."""
    return 2.0 * num_sequences * seq_len * seq_len * width


def linear(rows: int, d_in: int, d_out: int) -> float:
    """FLOPs of a dense projection of ``rows`` vectors: 2·rows·d_in·d_out."""
    return 2.0 * rows * d_in * d_out


def training_flops(forward: float) -> float:
    """Forward + backward = 3 × forward."""
    return 3.0 * forward
