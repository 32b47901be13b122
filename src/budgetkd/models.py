"""BERT students and teachers: presets, creation, loading, internals capture, sparse MLM, export.

Everything here is a plain Hugging Face ``BertForMaskedLM`` (or ``BertModel`` for encoder-only
teachers); budgetkd adds no layers to the model, so what it exports loads in plain transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from budgetkd.errors import BudgetKDError
from budgetkd.io import read_yaml

# name → (layers, hidden, heads, intermediate)
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "bert-tiny": (2, 128, 2, 512),
    "bert-mini": (4, 256, 4, 1024),
    "bert-small": (4, 512, 8, 2048),
    "bert-medium": (8, 512, 8, 2048),
    "bert-6l-768": (6, 768, 12, 3072),  # the paper's 6-layer student (BERT₆, teacher BERT-base)
    # The paper's 12-layer student (BERT₁₂, teacher BERT-large) is given only as "12 layers". We use
    # BERT-large's width and 16 heads (bert-12l-1024, configs/paper-12l.yaml): TinyBERT and MiniLM
    # compare attention head by head and need H_S = H_T, which a 12-head student of BERT-large
    # (H_T = 16) cannot meet. bert-12l-768 is BERT-base's shape, a 12-layer student for 12-head
    # teachers, not the paper's.
    "bert-12l-768": (12, 768, 12, 3072),
    "bert-12l-1024": (12, 1024, 16, 4096),  # the paper's 12-layer student (BERT₁₂)
}
_ARCH_KEYS = {"layers", "hidden", "heads", "intermediate"}


@dataclass(frozen=True)
class Architecture:
    layers: int
    hidden: int
    heads: int
    intermediate: int
    name: str = "custom"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "intermediate": self.intermediate,
        }


def resolve_architecture(spec: str | dict) -> Architecture:
    """A preset name, a YAML/JSON file, or a dict with layers, hidden, heads[, intermediate]."""
    if isinstance(spec, str):
        if spec in PRESETS:
            return Architecture(*PRESETS[spec], name=spec)
        if spec.lstrip().startswith("{"):  # an inline YAML/JSON mapping
            import yaml

            try:
                return resolve_architecture(yaml.safe_load(spec))
            except yaml.YAMLError:
                raise BudgetKDError(
                    f"student architecture {spec!r} is not a valid YAML/JSON mapping"
                ) from None
        path = Path(spec)
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
            data = read_yaml(path, "student architecture file")
            if not isinstance(data, dict):
                raise BudgetKDError(
                    f"student architecture file {path} must hold a mapping (layers, hidden, heads)"
                )
            arch = resolve_architecture(data)
            return Architecture(arch.layers, arch.hidden, arch.heads, arch.intermediate, name=path.stem)
        raise BudgetKDError(
            f"unknown student preset {spec!r}; known presets: {', '.join(PRESETS)} (or a YAML file)"
        )
    if not isinstance(spec, dict):
        raise BudgetKDError(
            f"student architecture must be a preset name or a mapping, got {type(spec).__name__}"
        )
    unknown = set(spec) - _ARCH_KEYS - {"name"}
    if unknown:
        raise BudgetKDError(
            f"unknown student architecture key {sorted(unknown)[0]!r}; expected {sorted(_ARCH_KEYS)}"
        )
    missing = {"layers", "hidden", "heads"} - set(spec)
    if missing:
        raise BudgetKDError(f"student architecture lacks {sorted(missing)[0]!r}")
    values = {}
    for key in ("layers", "hidden", "heads", "intermediate"):
        if key in spec:
            value = spec[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BudgetKDError(f"student architecture {key!r} must be a positive integer, got {value!r}")
            values[key] = value
    if values["hidden"] % values["heads"]:
        raise BudgetKDError(
            f"student hidden size {values['hidden']} is not divisible by {values['heads']} heads"
        )
    return Architecture(
        values["layers"],
        values["hidden"],
        values["heads"],
        values.get("intermediate", 4 * values["hidden"]),
        name=str(spec.get("name", "custom")),
    )


def student_config(arch: Architecture, vocab_size: int, seq_len: int, special_ids: dict):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        intermediate_size=arch.intermediate,
        max_position_embeddings=max(512, seq_len),
        type_vocab_size=2,
        pad_token_id=int(special_ids.get("pad", 0)),
        attn_implementation="sdpa",
    )


def create_student(arch: Architecture, vocab_size: int, seq_len: int, special_ids: dict, seed: int):
    """A freshly initialised ``BertForMaskedLM``; same seed ⇒ bit-identical weights (SPEC §4)."""
    from transformers import BertForMaskedLM

    config = student_config(arch, vocab_size, seq_len, special_ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(config)
    return model


# The student's word embeddings (and the decoder tied to them) hold a multiple of this many rows:
# the MLM head's GEMM [P, D] × [D, V] and the dense embedding gradient then have an aligned
# output dimension (30,522 → 30,528 for BERT's vocabulary), which GPU matrix kernels need for their
# fastest tiles (nanoGPT's 50,257 → 50,304). The extra rows start at zero, no token id reaches
# them, and every logit is sliced back to the tokenizer's vocabulary before a loss reads it
# (:func:`sparse_mlm_logits`), so they never receive a gradient and stay zero: the losses are those
# of the unpadded model. ``config.vocab_size`` stays the tokenizer's size; the export drops them.
VOCAB_MULTIPLE = 64


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``⌈V / multiple⌉ · multiple``."""
    return -(-vocab_size // multiple) * multiple


def pad_vocabulary(model: nn.Module, multiple: int = VOCAB_MULTIPLE) -> None:
    """Grow a ``BertForMaskedLM``'s word embeddings, tied decoder and decoder bias in place to
    :func:`padded_vocab_size` rows with zeros (the same Parameter objects: ties, optimizer
    references and state-dict names stay). The first V rows, and so the seeded initial weights,
    are unchanged."""
    vocab = model.config.vocab_size
    target = padded_vocab_size(vocab, multiple)
    _resize_vocab_rows(model, target)


def _vocab_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The distinct parameters with one row per token: word embeddings, decoder weight and bias."""
    head = model.cls.predictions
    candidates = [model.bert.embeddings.word_embeddings.weight, head.decoder.weight, head.bias]
    if head.decoder.bias is not None:
        candidates.append(head.decoder.bias)
    unique: list[nn.Parameter] = []
    for param in candidates:
        if all(param is not seen for seen in unique):
            unique.append(param)
    return unique


def _resize_vocab_rows(model: nn.Module, rows: int) -> None:
    for param in _vocab_parameters(model):
        current = param.data
        if current.shape[0] == rows:
            continue
        if current.shape[0] > rows:
            param.data = current[:rows]
        else:
            grown = current.new_zeros((rows, *current.shape[1:]))
            grown[: current.shape[0]] = current
            param.data = grown
    model.bert.embeddings.word_embeddings.num_embeddings = rows
    model.cls.predictions.decoder.out_features = rows


@contextmanager
def tokenizer_vocabulary(model: nn.Module):
    """Within the block the model's vocabulary rows are the tokenizer's V (views of the padded
    tensors, nothing copied); after it, the padded rows are back. For ``save_pretrained``."""
    vocab = model.config.vocab_size
    params = _vocab_parameters(model)
    full = [param.data for param in params]
    if all(data.shape[0] == vocab for data in full):
        yield
        return
    rows = full[0].shape[0]
    _resize_vocab_rows(model, vocab)
    try:
        yield
    finally:
        for param, data in zip(params, full):
            param.data = data
        model.bert.embeddings.word_embeddings.num_embeddings = rows
        model.cls.predictions.decoder.out_features = rows


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of ``model`` to ``p`` at run time, leaving its config alone.

    ``nn.Dropout`` modules cover the embeddings, hidden states and (transformers 5) the attention
    probabilities, whose SDPA call reads ``module.dropout.p``; transformers 4's SDPA attention
    reads a ``dropout_prob`` attribute copied from the config at construction instead.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "dropout_prob", None), float):
            module.dropout_prob = p


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(str(tuple(data.shape)).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


@dataclass
class Teacher:
    model: nn.Module  # BertForMaskedLM or BertModel, eval mode, frozen
    has_mlm_head: bool
    source: str
    config: object = field(repr=False, default=None)

    @property
    def encoder(self) -> nn.Module:
        return self.model.bert if self.has_mlm_head else self.model


def _checkpoint_tensor_names(path: Path) -> set[str] | None:
    """Names of the tensors in a local checkpoint directory (None if it cannot be inspected)."""
    names: set[str] = set()
    index_files = list(path.glob("*.index.json"))
    for index in index_files:
        names |= set(json.loads(index.read_text())["weight_map"])
    if names:
        return names
    safetensors_files = list(path.glob("*.safetensors"))
    if safetensors_files:
        from safetensors import safe_open

        for file in safetensors_files:
            with safe_open(str(file), framework="pt") as handle:
                names |= set(handle.keys())
        return names
    return None


@contextmanager
def _no_progress_bars():
    """transformers 5 draws progress bars on stderr when it loads or saves weights; budgetkd has its
    own (``--no-progress``), and an error must stay the only stderr line."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _quiet_loading():
    """No progress bars and no load report: transformers prints a table of every checkpoint tensor
    the model does not use (a BERT checkpoint's pooler and NSP head, loaded as an encoder-only or
    MLM teacher) — expected, and the console keeps to budgetkd's own lines. What matters in that
    report (weights the model lacks) :func:`load_teacher` says itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with _no_progress_bars():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_teacher(name_or_path: str, device: torch.device | str = "cpu") -> Teacher:
    """Load any HF BERT checkpoint as a frozen, eval-mode teacher.

    A ``BertForMaskedLM`` checkpoint keeps its MLM head (logits available); an encoder-only
    ``BertModel`` checkpoint is loaded as such and strategies that need logits refuse it.
    """
    from transformers import AutoConfig, BertForMaskedLM, BertModel

    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise BudgetKDError(f"teacher {name_or_path} is a file; give a model directory or a hub id")
    if path.is_dir():
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if (path / "model" / "config.json").exists() and not has_weights:
            path = path / "model"  # a budgetkd run directory
        if not (path / "config.json").exists():
            raise BudgetKDError(f"teacher directory {path} has no config.json")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise BudgetKDError(f"teacher directory {path} holds no weights (*.safetensors or *.bin)")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BudgetKDError(f"cannot load teacher {name_or_path}: {first[:200]}") from None
    if config.model_type != "bert":
        raise BudgetKDError(
            f"teacher {name_or_path} is a {config.model_type!r} model; a BERT checkpoint is needed"
        )
    names = _checkpoint_tensor_names(path) if path.is_dir() else None
    architectures = set(config.architectures or [])
    if names is not None:
        has_head = any(n.startswith("cls.predictions") for n in names)
    else:
        has_head = bool(architectures & {"BertForMaskedLM", "BertForPreTraining"}) or not architectures
    try:
        with _quiet_loading():
            if has_head:
                model, info = BertForMaskedLM.from_pretrained(
                    str(path), attn_implementation="sdpa", output_loading_info=True
                )
            else:
                model, info = BertModel.from_pretrained(
                    str(path), attn_implementation="sdpa", add_pooling_layer=False, output_loading_info=True
                )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BudgetKDError(f"cannot load teacher {name_or_path}: {first[:200]}") from None
    missing = sorted((info or {}).get("missing_keys") or [])
    if missing:
        print(
            f"budgetkd: note: teacher {name_or_path} lacks {len(missing)} weight(s) of its model "
            f"(e.g. {missing[0]!r}); transformers initialised them randomly"
        )
    model.eval()
    model.requires_grad_(False)
    model.to(device)
    return Teacher(model=model, has_mlm_head=has_head, source=str(name_or_path), config=model.config)


def check_vocabulary(teacher: Teacher, tokenizer, teacher_source: str) -> None:
    """Refuse a teacher whose vocabulary differs from the data's tokenizer."""
    vocab_size = len(tokenizer)
    if teacher.config.vocab_size != vocab_size:
        raise BudgetKDError(
            f"vocabulary mismatch: teacher {teacher_source} has {teacher.config.vocab_size} tokens, "
            f"the data's tokenizer {vocab_size}; prepare the data with --tokenizer {teacher_source}"
        )
    path = Path(teacher_source)
    if path.is_dir():
        for candidate in (path, path / "model"):
            if (candidate / "vocab.txt").exists() or (candidate / "tokenizer.json").exists():
                from budgetkd.data.tokenizer import load_tokenizer

                if load_tokenizer(candidate).get_vocab() != tokenizer.get_vocab():
                    raise BudgetKDError(
                        f"vocabulary mismatch: teacher {teacher_source} uses a different tokenizer than the data; "
                        f"prepare the data with --tokenizer {candidate}"
                    )
                break


# ---------------------------------------------------------------------------------------------
# Internals capture
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureSpec:
    """What to record during a forward pass: the embedding output and, per layer index, any of
    ``q``, ``k``, ``v`` (the raw projection outputs [B, L, D]) and ``hidden`` (the layer output)."""

    embeddings: bool = False
    layers: dict[int, frozenset[str]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not self.embeddings and not self.layers


class Capture:
    """Forward hooks that record the tensors named by a :class:`CaptureSpec`.

    Hooks sit on the query/key/value ``nn.Linear`` modules and on the layer outputs of the mapped
    layers only, so every layer keeps the fused SDPA attention path and no attention
    probabilities are ever requested from the library. Results are in ``capture.values``, keyed
    ``"embeddings"`` or ``(kind, layer)``.
    """

    def __init__(self, encoder: nn.Module, spec: CaptureSpec):
        self.values: dict = {}
        self._handles = []
        if spec.embeddings:
            self._hook(encoder.embeddings, "embeddings")
        layers = encoder.encoder.layer
        for index, kinds in spec.layers.items():
            layer = layers[index]
            attention = layer.attention.self
            for kind, module in (("q", attention.query), ("k", attention.key), ("v", attention.value)):
                if kind in kinds:
                    self._hook(module, (kind, index))
            if "hidden" in kinds:
                self._hook(layer, ("hidden", index))

    def _hook(self, module: nn.Module, key) -> None:
        def hook(_module, _inputs, output):
            self.values[key] = output[0] if isinstance(output, tuple) else output

        self._handles.append(module.register_forward_hook(hook))

    def clear(self) -> None:
        self.values = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def check_layer(index: int, num_layers: int, who: str) -> int:
    """Normalise a (possibly negative) layer index, refusing one outside the model."""
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise BudgetKDError(f"layer map refers to {who} layer {index}, but the {who} has {num_layers} layers")
    return resolved


# ---------------------------------------------------------------------------------------------
# Sparse MLM head
# ---------------------------------------------------------------------------------------------


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions with a label (≠ −100), in row-major order."""
    return (labels.reshape(-1) != -100).nonzero().squeeze(1)


def sparse_mlm_logits(mlm_model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The MLM head applied only at ``positions`` of ``hidden`` [B, L, D] → logits [P, V].

    Same values as the dense head at those rows, at P/(B·L) of the head's cost (SPEC §2). A
    student's padded vocabulary rows (:data:`VOCAB_MULTIPLE`) never reach a loss: V is
    ``config.vocab_size``, the tokenizer's. On CUDA the decoder runs over all padded rows (the
    aligned GEMM is the point of padding) and its output is sliced; elsewhere it runs over the
    first V rows of the weight (a view), since slicing [P, V_pad] logits would copy them.
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    head = mlm_model.cls.predictions
    vocab = mlm_model.config.vocab_size
    if head.decoder.out_features == vocab:
        return mlm_model.cls(flat)
    if flat.is_cuda:
        return mlm_model.cls(flat)[:, :vocab]
    bias = head.decoder.bias[:vocab] if head.decoder.bias is not None else None
    return nn.functional.linear(head.transform(flat), head.decoder.weight[:vocab], bias)


@dataclass(frozen=True)
class Depth:
    """How far a forward pass must go: ``layers`` complete encoder layers, then only the
    projections ``projections`` (a subset of q, k, v) of the next layer (issue 13 item 5: what the
    loss never reads is not computed). ``Depth(num_layers)`` is the full encoder."""

    layers: int
    projections: frozenset[str] = frozenset()

    def is_full(self, num_layers: int) -> bool:
        return self.layers >= num_layers and not self.projections


def required_depth(spec: CaptureSpec, num_layers: int, needs_output: bool) -> Depth:
    """The shallowest forward that still produces everything ``spec`` captures (and the last hidden
    state when ``needs_output``, e.g. for the MLM head). A layer whose output (``hidden``) is
    needed runs whole; when only the deepest layer's Q/K/V are needed, the layers below it run
    whole and that layer computes just those projections (no attention, output or FFN)."""
    if needs_output or not spec.layers:
        return Depth(num_layers if needs_output else 0)
    deepest = max(spec.layers)
    kinds = spec.layers[deepest]
    if "hidden" in kinds:
        return Depth(deepest + 1)
    return Depth(deepest, frozenset(kinds) & {"q", "k", "v"})


_PROJECTIONS = {"q": "query", "k": "key", "v": "value"}


def encode(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: Depth | None = None
) -> torch.Tensor:
    """Last hidden states [B, L, D] of a ``BertModel`` — or, with a partial ``depth``, the hidden
    states after ``depth.layers`` layers, having run only ``depth.projections`` of the next one
    (their values reach the caller through a :class:`Capture`'s hooks).

    The partial path calls the library's own modules in the library's order (embeddings, the
    bidirectional attention mask BertModel builds, then each ``BertLayer``), so every captured
    tensor equals the full forward's (tested: ``test_partial_forward_captures_what_the_full_one_does``).
    """
    layers = encoder.encoder.layer
    if depth is None or depth.is_full(len(layers)):
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    from transformers.masking_utils import create_bidirectional_mask

    hidden = encoder.embeddings(input_ids=input_ids)
    # positional: the embeddings' keyword is ``input_embeds`` in transformers 5.0, ``inputs_embeds``
    # later; the order (config, embeddings, mask) is the same in every 5.x
    mask = create_bidirectional_mask(encoder.config, hidden, attention_mask)
    for layer in layers[: depth.layers]:
        hidden = layer(hidden, mask)
    if depth.projections:
        attention = layers[depth.layers].attention.self
        for kind in sorted(depth.projections):
            getattr(attention, _PROJECTIONS[kind])(hidden)  # recorded by the capture hook
    return hidden


@contextmanager
def eval_mode(modules: Iterable[nn.Module]):
    modules = list(modules)
    states = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, state in zip(modules, states):
            m.train(state)


def export_student(model: nn.Module, tokenizer, out_dir: str | Path) -> None:
    """Write the student with ``save_pretrained`` plus its tokenizer, at the tokenizer's vocabulary
    (padded rows dropped; projections are not part of the model and are never exported)."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with _no_progress_bars(), tokenizer_vocabulary(model):
        model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    from budgetkd.io import replace_dir

    replace_dir(tmp, out_dir)
