"""The experiment's plan and the checks that refuse a doomed run before any compute.

``budgetkd compare CONFIG --out DIR --dry-run`` resolves the whole experiment and prints it
(:func:`build_plan`, :func:`render_plan`; also written to ``DIR/plan.json``): every stage in
order with its run directory, each strategy's budget (or how it will be calibrated), the world
size, the per-process batch and micro-batch, the GLUE jobs and their optimizer steps, and an
estimated cost per stage — analytic FLOPs (:mod:`budgetkd.flops`, SPEC §3) and device-hours at
a throughput measured by ``--probe`` or given by ``--assume-tokens-per-s``.

:func:`preflight` runs the checks of the plan at the start of every real ``compare`` (and
``pretrain``, :func:`check_pretrain`), before any stage writes anything. It reads configs
(``config.json``), tokenizers, ``meta.json`` of prepared data, safetensors headers and file
listings — never a full weight load or a pass over the data. Each problem is one
:class:`BudgetKDError` line. Whatever it cannot know offline (a hub id, a hub dataset) becomes a
one-line note, and the plan goes on with the shapes of well-known checkpoints.

Cost model (stated in the printed plan, per packed sequence of length L, P = 15 % of L masked):

* student  = 3 · (encoder_forward(L) + mlm_head_forward(P) if the student's logits are used
  + the strategy's own products);
* teacher  = encoder_forward(L) + mlm_head_forward(P) if logits are needed + its products;
* time: at the probe's (or the given) tokens/s; a strategy not probed runs at the No-KD rate
  scaled by the FLOP ratio (time ∝ FLOPs: ``benchmarks/throughput.py`` measures how well that
  holds); W processes run W× the one-process rate;
* GLUE FLOPs: 3 · encoder_forward(128) per training example per epoch plus one forward per dev
  example per epoch — an upper bound (real GLUE sentences are shorter than 128);
* GLUE hours: with ``--probe``, measured (:mod:`budgetkd.glue.probe`: a few uncharged fine-tuning
  steps and one evaluation batch per task shape, on the run's device, examples/s per task ×
  examples × epochs × configurations × seeds, plus each job's fixed cost and the tokenization);
  without it, an estimate from the FLOPs at the tasks' mean lengths and a stated share of the
  No-KD pretraining FLOP rate (:func:`_estimated_glue_seconds`). The plan says which.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from budgetkd import flops
from budgetkd.budget import in_steps
from budgetkd.errors import BudgetKDError

MASK_PROBABILITY = 0.15  # MaskingConfig's default (SPEC §1)
GLUE_MAX_LENGTH = 128  # the paper's fine-tuning maximum sequence length
# The GLUE estimate without --probe (:func:`_estimated_glue_seconds`): the share of the No-KD
# pretraining FLOP rate that fine-tuning reaches on the device type (its FLOPs counted at the
# tasks' mean lengths), and a job's fixed seconds (the classifier's load, the optimizer, warm-up).
# CPU: the probe on a loaded 2-core machine measured 1.3-2.8 (SST-2, MRPC, QNLI; a 4 x 192
# student, one thread per job against pretraining on both cores); 1 is kept. CUDA: what puts the
# paper's padded recipe (mean + 2 sd lengths) at its reported ~50 GPU-hours per 6-layer student
# for configs/paper-6l.yaml at 4e5 tokens/s. Both are calibrated guesses, printed as such.
GLUE_UTILISATION = {"cpu": 1.0, "cuda": 0.032}
GLUE_JOB_OVERHEAD_S = {"cpu": 1.0, "cuda": 5.0}
GLUE_CALIBRATION = {
    "cpu": "calibrated by --probe on a 2-core CPU",
    "cuda": "calibrated on the paper's ~50 GPU-hours per padded 6-layer student",
}

# Shapes of well-known hub checkpoints, used when the hub cannot be reached (the plan says so).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    name: {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072, "vocab": vocab}
    for name, vocab in (
        ("bert-base-uncased", 30522),
        ("google-bert/bert-base-uncased", 30522),
        ("bert-base-cased", 28996),
        ("google-bert/bert-base-cased", 28996),
    )
} | {
    name: {"layers": 24, "hidden": 1024, "heads": 16, "intermediate": 4096, "vocab": vocab}
    for name, vocab in (
        ("bert-large-uncased", 30522),
        ("google-bert/bert-large-uncased", 30522),
        ("bert-large-cased", 28996),
        ("google-bert/bert-large-cased", 28996),
    )
}
for _shape in KNOWN_MODELS.values():
    _shape.update(max_positions=512, mlm_head=True)

# BERT WordPiece tokens of one epoch of the paper's corpora: Table 2 gives 4.6 B tokens for one
# No-KD epoch of Wikipedia + BookCorpus; BookCorpus (74 M sentences) is about 1 B of them.
KNOWN_DATASET_TOKENS = {
    "wikimedia/wikipedia": 3.6e9,
    "wikipedia": 3.6e9,
    "bookcorpus/bookcorpus": 1.0e9,
    "bookcorpus": 1.0e9,
}
BYTES_PER_TOKEN = 4.3  # English text per BERT WordPiece token (an estimate for unprepared files)

# Training-set sizes of nyu-mll/glue (the hub copy), for a plan without the files.
GLUE_HUB_TRAIN_SIZES = {
    "cola": 8551,
    "sst2": 67349,
    "mrpc": 3668,
    "qqp": 363846,
    "stsb": 5749,
    "mnli": 392702,
    "qnli": 104743,
    "rte": 2490,
}
GLUE_HUB_DEV_SIZES = {
    "cola": 1043,
    "sst2": 872,
    "mrpc": 408,
    "qqp": 40430,
    "stsb": 1500,
    "mnli": 9815 + 9832,
    "qnli": 5463,
    "rte": 277,
}


# ---------------------------------------------------------------------------------------------
# What can be known without compute
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (and offline
    mode is not forced). Asked once: the libraries' own retries take half a minute offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE"):
        return False
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class ModelInfo:
    """What the checks and the cost model need of a BERT, read from its config.json."""

    source: str  # the path or hub id
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    has_mlm_head: bool
    origin: str  # "local", "hub", "hub cache", "assumed (…)", "pretrained by budgetkd"

    @property
    def shape(self) -> flops.EncoderShape:
        return flops.EncoderShape(self.layers, self.hidden, self.heads, self.intermediate, self.vocab)

    def bert_config(self):
        """The attributes of a ``BertConfig`` that strategies read (a plain namespace: no
        transformers import, which is not thread-safe while another thread imports it)."""
        from types import SimpleNamespace

        return SimpleNamespace(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:160]


def _local_model_dir(path: Path) -> Path:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights and (path / "model" / "config.json").is_file():
        return path / "model"  # a budgetkd run directory
    return path


def teacher_info(source: str, notes: list[str]) -> ModelInfo | None:
    """The teacher's shape and whether it has an MLM head, from config.json and the tensor names
    of its safetensors headers (a local directory), or the hub's config.json; ``None`` (and a
    note) when nothing is known."""
    from transformers import AutoConfig

    from budgetkd.config import check_teacher_path

    path = Path(source)
    if path.exists():
        check_teacher_path(source, "teacher.path")
        local = _local_model_dir(path)
        try:
            config = AutoConfig.from_pretrained(str(local))
        except Exception as exc:
            raise BudgetKDError(
                f"cannot read teacher config {local / 'config.json'}: {_first_line(exc)}"
            ) from None
        from budgetkd.models import _checkpoint_tensor_names

        names = _checkpoint_tensor_names(local)
        if names is not None:
            has_head = any(n.startswith("cls.predictions") for n in names)
        else:
            has_head = bool(set(config.architectures or []) & {"BertForMaskedLM", "BertForPreTraining"})
        origin = "local"
    else:
        online = hub_reachable()
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=not online)
            origin = "hub" if online else "hub cache"
        except Exception as exc:
            known = KNOWN_MODELS.get(source)
            why = "the hub is unreachable here" if not online else _first_line(exc)
            if known is None:
                notes.append(f"teacher {source}: {why}; its checks are skipped and its cost unknown")
                return None
            notes.append(f"teacher {source}: {why}; its checks use the known {source} shape")
            shape = {k: v for k, v in known.items() if k != "mlm_head"}
            return ModelInfo(
                source=source, origin="assumed (known shape)", has_mlm_head=bool(known["mlm_head"]), **shape
            )
        architectures = set(config.architectures or [])
        has_head = bool(architectures & {"BertForMaskedLM", "BertForPreTraining"}) or not architectures
    if config.model_type != "bert":
        raise BudgetKDError(f"teacher {source} is a {config.model_type!r} model; a BERT checkpoint is needed")
    return ModelInfo(
        source=source,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        max_positions=config.max_position_embeddings,
        has_mlm_head=has_head,
        origin=origin,
    )


@dataclass
class TokenizerInfo:
    vocab: int | None
    vocabulary: dict | None  # token → id, when the tokenizer could be loaded
    source: str


def tokenizer_info(
    spec: str | None, train_vocab: int | None, prepared: Path | None, notes: list[str]
) -> TokenizerInfo:
    """The data's tokenizer: of a prepared dataset, a trained WordPiece (size only), or a local
    path / hub id (loaded: a tokenizer is small)."""
    from budgetkd.data.tokenizer import load_tokenizer

    if prepared is not None:
        tokenizer = load_tokenizer(prepared / "tokenizer")
        return TokenizerInfo(len(tokenizer), tokenizer.get_vocab(), str(prepared / "tokenizer"))
    if train_vocab is not None:
        return TokenizerInfo(train_vocab, None, f"WordPiece trained on the corpus ({train_vocab})")
    if Path(str(spec)).exists():
        tokenizer = load_tokenizer(spec)
        return TokenizerInfo(len(tokenizer), tokenizer.get_vocab(), str(spec))
    if not hub_reachable():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
            return TokenizerInfo(len(tokenizer), tokenizer.get_vocab(), f"{spec} (hub cache)")
        except Exception:
            known = KNOWN_MODELS.get(str(spec))
            notes.append(
                f"tokenizer {spec}: the hub is unreachable here; "
                + (
                    f"assuming its known vocabulary of {known['vocab']}"
                    if known
                    else "its vocabulary is unknown"
                )
            )
            return TokenizerInfo(known["vocab"] if known else None, None, f"{spec} (assumed)")
    tokenizer = load_tokenizer(spec)
    return TokenizerInfo(len(tokenizer), tokenizer.get_vocab(), str(spec))


@dataclass
class DataInfo:
    train_sequences: float | None  # packed training sequences (exact when prepared, else an estimate)
    exact: bool
    what: str  # how it was obtained
    prepared: Path | None = None  # a ready dataset (data.prepared or DIR/data)
    meta: dict | None = None


def data_info(cfg: dict, out: Path, notes: list[str]) -> DataInfo:
    """Packed training sequences of the corpus: exact from a prepared dataset's meta.json, else
    estimated from the local files' sizes and the known sizes of hub datasets."""
    from budgetkd.io import read_json

    data = cfg["data"]
    seq_len = data["seq_len"]
    candidates = [Path(data["prepared"])] if data.get("prepared") else [out / "data"]
    for candidate in candidates:
        if (candidate / "meta.json").is_file():
            meta = read_json(candidate / "meta.json", "dataset metadata (meta.json)")
            return DataInfo(
                float(meta["num_train_sequences"]), True, f"prepared in {candidate}", candidate, meta
            )
    if data.get("prepared"):
        raise BudgetKDError(
            f"config key 'data.prepared': {data['prepared']} holds no prepared dataset (meta.json); "
            "create it with budgetkd prepare"
        )
    tokens = 0.0
    unknown = []
    for item in data["inputs"]:
        if item.startswith("hf:"):
            from budgetkd.data.corpus import parse_hf_spec

            name, _config, _split = parse_hf_spec(item)
            known = KNOWN_DATASET_TOKENS.get(name)
            if known is None:
                unknown.append(item)
            else:
                tokens += known
            continue
        path = Path(item)
        if not path.exists():
            raise BudgetKDError(f"config key 'data.inputs': input not found: {item}")
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        tokens += sum(p.stat().st_size for p in files) / BYTES_PER_TOKEN
    hub = [i for i in data["inputs"] if i.startswith("hf:")]
    if hub and not hub_reachable():
        notes.append(f"hub datasets {', '.join(hub)}: the hub is unreachable here; the data stage needs it")
    if unknown:
        notes.append(f"the size of {', '.join(unknown)} is unknown: the cost of its epochs is not estimated")
        return DataInfo(None, False, "unknown")
    return DataInfo(tokens / (seq_len - 1), False, "estimated from file sizes and known corpus sizes")


def check_output_dir(out: Path) -> None:
    """Refuse an output directory that cannot be written: a file, under a file, or in a folder
    where a file cannot be created (tried, not inferred from permission bits: root ignores them)."""
    if out.exists() and not out.is_dir():
        raise BudgetKDError(f"--out {out} is a file, not a directory")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise BudgetKDError(f"--out {out} cannot be created: {probe_dir} is a file")
    try:
        handle, name = tempfile.mkstemp(prefix=".budgetkd-write-check-", dir=probe_dir)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise BudgetKDError(
            f"--out {out} is not writable: cannot create a file in {probe_dir} ({exc.strerror})"
        ) from None


def _examples(path: Path, header: bool) -> int:
    """Non-empty lines of a TSV file, minus its header line (a listing-level count, no parsing)."""
    with open(path, "rb") as handle:
        count = sum(1 for line in handle if line.strip())
    return count - (1 if header else 0)


def glue_sizes(cfg: dict) -> dict[str, tuple[int, int, str]]:
    """task → (training examples, dev examples, where the counts come from): line counts of the
    local files (minus the header), else the hub copy's known sizes; capped by
    ``max_train_examples`` / ``max_eval_examples``."""
    from budgetkd.glue.loading import check_local_files
    from budgetkd.glue.tasks import parse_tasks

    glue = cfg["glue"]
    out = {}
    for task in parse_tasks(glue["tasks"]):
        if glue["dir"] is not None:
            try:
                folder = check_local_files(task, glue["dir"])
            except BudgetKDError as exc:
                raise BudgetKDError(f"config key 'glue.dir': {exc}") from None

            train = _examples(folder / task.train_file, task.header)
            dev = sum(
                _examples(folder / s.file, task.header)
                for s in task.dev_splits
                if (folder / s.file).is_file()
            )
            where = "local files"
        else:
            train, dev, where = GLUE_HUB_TRAIN_SIZES[task.name], GLUE_HUB_DEV_SIZES[task.name], "hub sizes"
        if glue["max_train_examples"] is not None:
            train = min(train, glue["max_train_examples"])
        if glue["max_eval_examples"] is not None:
            dev = min(dev, glue["max_eval_examples"] * len(task.dev_splits))
        out[task.name] = (train, dev, where)
    return out


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """What :func:`preflight` found; :func:`build_plan` turns it into the plan."""

    world_size: int
    per_rank_batch: int
    micro_batch: int
    teacher: ModelInfo | None
    tokenizer: TokenizerInfo
    data: DataInfo
    student: ModelInfo
    strategies: dict[str, Any]  # label → strategy instance (built from configs only)
    teacher_pretrain_micro: int | None = None
    notes: list[str] = field(default_factory=list)


def check_teacher_for(
    strategy_cls, label: str, teacher: ModelInfo, teacher_cfg: dict, seq_len: int, vocab: int | None
) -> None:
    """The checks of one KD strategy against the teacher (configs only)."""
    if (
        strategy_cls.needs_teacher_logits
        and not teacher.has_mlm_head
        and teacher_cfg.get("fit_mlm_head") is False
    ):
        raise BudgetKDError(
            f"strategy {label!r} needs teacher logits, but {teacher.source} is an encoder-only checkpoint "
            "without an MLM head and teacher.fit_mlm_head is false"
        )


def preflight(cfg: dict, out: Path, world_size: int, *, check_out: bool = True) -> Resolved:
    """Every check that needs no compute (module docstring); the first failure is raised."""
    notes: list[str] = []
    if check_out:
        check_output_dir(out)
    micro = _micro_batch(cfg["optimizer"]["batch_size"], world_size, cfg["optimizer"]["micro_batch_size"],
                         "optimizer.batch_size")  # fmt: skip
    data = data_info(cfg, out, notes)
    seq_len = cfg["data"]["seq_len"]
    if data.meta is not None and int(data.meta["seq_len"]) != seq_len:
        raise BudgetKDError(
            f"config key 'data.seq_len' is {seq_len}, but the prepared dataset {data.prepared} has sequences of "
            f"{data.meta['seq_len']} tokens; set data.seq_len: {data.meta['seq_len']} or prepare the data again"
        )
    tokenizer = _tokenizer_of(cfg, data, notes)
    teacher, teacher_micro = _teacher_of(cfg, tokenizer, world_size, notes)
    from budgetkd.models import resolve_architecture

    student_vocab = tokenizer.vocab or (teacher.vocab if teacher else 30522)
    student = _student_info(resolve_architecture(cfg["student"]), student_vocab, seq_len)
    strategies = _strategies_of(cfg, student, teacher, tokenizer.vocab)
    if cfg["glue"]["dir"] is not None:
        glue_sizes(cfg)  # the local GLUE files: every requested task and split
    return Resolved(
        world_size=world_size, per_rank_batch=cfg["optimizer"]["batch_size"] // world_size, micro_batch=micro,
        teacher=teacher, tokenizer=tokenizer, data=data, student=student, strategies=strategies,
        teacher_pretrain_micro=teacher_micro, notes=notes,
    )  # fmt: skip


def _micro_batch(batch: int, world_size: int, most: int | None, key: str) -> int:
    from budgetkd.data.dataset import resolve_micro_batch

    try:
        return resolve_micro_batch(batch, world_size, most)
    except BudgetKDError as exc:
        raise BudgetKDError(f"config key {key!r}: {exc}") from None


def _tokenizer_of(cfg: dict, data: DataInfo, notes: list[str]) -> TokenizerInfo:
    """The data's tokenizer (the teacher's, a given one, or one to train), checked against a
    prepared dataset."""
    data_cfg, teacher_cfg = cfg["data"], cfg["teacher"]
    tok = data_cfg["tokenizer"]
    train_vocab = tok["train"] if isinstance(tok, dict) else None
    spec = teacher_cfg["path"] if tok == "teacher" else (None if isinstance(tok, dict) else tok)
    tokenizer = tokenizer_info(spec, train_vocab, data.prepared, notes)
    if data.prepared is not None and data_cfg.get("prepared"):
        _check_prepared_tokenizer(tok, tokenizer, data.prepared)
    return tokenizer


def _teacher_of(cfg: dict, tokenizer: TokenizerInfo, world_size: int, notes: list[str]):
    """(the teacher's shape or None, the micro-batch of a teacher budgetkd pretrains), checked
    against the data's vocabulary and sequence length."""
    from budgetkd.models import resolve_architecture

    teacher_cfg, seq_len, vocab = cfg["teacher"], cfg["data"]["seq_len"], tokenizer.vocab
    if teacher_cfg is None:
        return None, None
    if "pretrain" in teacher_cfg:
        block = teacher_cfg["pretrain"]
        arch = resolve_architecture(block["student"])
        teacher = ModelInfo(
            source="teacher pretrained by budgetkd", layers=arch.layers, hidden=arch.hidden, heads=arch.heads,
            intermediate=arch.intermediate, vocab=vocab or 30522, max_positions=max(512, seq_len),
            has_mlm_head=True, origin="pretrained by budgetkd",
        )  # fmt: skip
        batch = block["batch_size"] or cfg["optimizer"]["batch_size"]
        return teacher, _micro_batch(
            batch, world_size, block["micro_batch_size"], "teacher.pretrain.batch_size"
        )
    teacher = teacher_info(teacher_cfg["path"], notes)
    if teacher is None:
        return None, None
    if vocab is not None and teacher.vocab != vocab:
        raise BudgetKDError(
            f"vocabulary mismatch: teacher {teacher.source} has {teacher.vocab} tokens, the data's tokenizer "
            f"({tokenizer.source}) {vocab}; set data.tokenizer: teacher"
        )
    if tokenizer.vocabulary is not None and teacher.origin == "local":
        _check_same_vocabulary(Path(teacher.source), tokenizer)
    if seq_len > teacher.max_positions:
        raise BudgetKDError(
            f"config key 'data.seq_len': {seq_len} exceeds the teacher's {teacher.max_positions} positions "
            f"({teacher.source})"
        )
    return teacher, None


def _strategies_of(cfg: dict, student: ModelInfo, teacher: ModelInfo | None, vocab) -> dict:
    """Every strategy built from the configs alone (options, head counts, layer maps checked);
    a KD strategy whose teacher is unknown offline is left out (noted)."""
    import torch

    from budgetkd.strategies import REGISTRY

    s_config = student.bert_config()
    t_config = teacher.bert_config() if teacher is not None else None
    strategies = {}
    for index, entry in enumerate(cfg["strategies"]):
        cls = REGISTRY[entry["name"]]
        if cls.needs_teacher and teacher is None:
            continue  # the teacher is unknown offline: noted above
        if cls.needs_teacher:
            check_teacher_for(cls, entry["label"], teacher, cfg["teacher"], cfg["data"]["seq_len"], vocab)
        try:
            with torch.random.fork_rng(devices=[]):  # the projections it creates draw random numbers
                strategies[entry["label"]] = cls(
                    entry["options"], s_config, t_config if cls.needs_teacher else None
                )
        except BudgetKDError as exc:
            raise BudgetKDError(f"config key 'strategies[{index}]' ({entry['label']}): {exc}") from None
    return strategies


def _check_prepared_tokenizer(tok, tokenizer: TokenizerInfo, prepared: Path) -> None:
    """A prepared dataset must have been made with the tokenizer the config names."""
    from budgetkd.data.tokenizer import load_tokenizer

    if isinstance(tok, dict) and tokenizer.vocab != tok["train"]:
        raise BudgetKDError(
            f"config key 'data.prepared': {prepared} has a vocabulary of {tokenizer.vocab}, "
            f"data.tokenizer asks for a trained WordPiece of {tok['train']}"
        )
    if isinstance(tok, str) and tok != "teacher" and Path(tok).exists():
        if load_tokenizer(tok).get_vocab() != tokenizer.vocabulary:
            raise BudgetKDError(
                f"config key 'data.prepared': {prepared} was tokenized with another tokenizer than {tok}"
            )


def _check_same_vocabulary(teacher_dir: Path, tokenizer: TokenizerInfo) -> None:
    """Same size is not enough: a local teacher that ships its tokenizer must ship this one."""
    from budgetkd.data.tokenizer import load_tokenizer

    local = _local_model_dir(teacher_dir)
    for candidate in (local, teacher_dir):
        if (candidate / "vocab.txt").exists() or (candidate / "tokenizer.json").exists():
            if load_tokenizer(candidate).get_vocab() != tokenizer.vocabulary:
                raise BudgetKDError(
                    f"vocabulary mismatch: teacher {teacher_dir} uses a different tokenizer than the data "
                    f"({tokenizer.source}); set data.tokenizer: teacher"
                )
            return


def _student_info(arch, vocab: int, seq_len: int) -> ModelInfo:
    """The student budgetkd creates (``models.student_config``: positions max(512, seq_len))."""
    return ModelInfo(
        source=arch.name,
        layers=arch.layers,
        hidden=arch.hidden,
        heads=arch.heads,
        intermediate=arch.intermediate,
        vocab=vocab,
        max_positions=max(512, seq_len),
        has_mlm_head=True,
        origin="created",
    )


def check_pretrain(config) -> None:
    """The checks of :func:`preflight` for one ``budgetkd pretrain`` run (a :class:`TrainConfig`),
    before its data is opened or its teacher loaded: batch against world size, the strategy's
    options, head counts and layer map against the teacher's config.json, vocabulary, positions."""
    import torch

    from budgetkd import distributed
    from budgetkd.data.dataset import resolve_micro_batch
    from budgetkd.io import read_json
    from budgetkd.models import resolve_architecture
    from budgetkd.strategies import get_strategy

    resolve_micro_batch(config.batch_size, distributed.world_size(), config.micro_batch_size)
    cls = get_strategy(config.strategy)
    meta_path = Path(config.data) / "meta.json"
    if not meta_path.is_file():
        return  # the trainer names the missing dataset
    meta = read_json(meta_path, "dataset metadata (meta.json)")
    arch = resolve_architecture(config.student)
    s_config = _student_info(arch, int(meta["vocab_size"]), int(meta["seq_len"])).bert_config()
    t_config = None
    if cls.needs_teacher and config.teacher:
        notes: list[str] = []
        teacher = teacher_info(config.teacher, notes)
        if teacher is None:
            return
        if teacher.vocab != int(meta["vocab_size"]):
            raise BudgetKDError(
                f"vocabulary mismatch: teacher {config.teacher} has {teacher.vocab} tokens, the data's tokenizer "
                f"{meta['vocab_size']}; prepare the data with --tokenizer {config.teacher}"
            )
        if int(meta["seq_len"]) > teacher.max_positions:
            raise BudgetKDError(
                f"seq_len {meta['seq_len']} exceeds the teacher's {teacher.max_positions} positions"
            )
        t_config = teacher.bert_config()
        if cls.needs_teacher_logits and not teacher.has_mlm_head:
            raise BudgetKDError(
                f"strategy {config.strategy!r} needs teacher logits, but {config.teacher} is an encoder-only "
                "checkpoint without an MLM head"
            )
    if cls.needs_teacher and t_config is None:
        return
    with torch.random.fork_rng(devices=[]):
        cls(config.strategy_options, s_config, t_config)


# ---------------------------------------------------------------------------------------------
# The cost model
# ---------------------------------------------------------------------------------------------


def sequence_flops(
    student: ModelInfo, teacher: ModelInfo | None, strategy, seq_len: int
) -> tuple[float, float]:
    """(student, teacher) training FLOPs of one packed sequence of ``seq_len`` tokens (module
    docstring), from :mod:`budgetkd.flops`."""
    predicted = MASK_PROBABILITY * (seq_len - 2)
    s_shape = student.shape
    student_fwd = flops.encoder_forward(s_shape, seq_len, 1)
    if strategy.needs_student_logits:
        student_fwd += flops.mlm_head_forward(s_shape, predicted)
    extra_s, extra_t = strategy.extra_forward_flops(1, seq_len)
    teacher_flops = 0.0
    if strategy.needs_teacher and teacher is not None:
        teacher_flops = flops.encoder_forward(teacher.shape, seq_len, 1) + extra_t
        if strategy.needs_teacher_logits:
            teacher_flops += flops.mlm_head_forward(teacher.shape, predicted)
    return flops.training_flops(student_fwd + extra_s), teacher_flops


# ---------------------------------------------------------------------------------------------
# What each pretraining run consumes (the plan's numbers, from budgetkd.stages: the run's own
# derivation and the trainer's own meter)
# ---------------------------------------------------------------------------------------------
EXACT_PLAN_ROWS = 4_000_000  # rows a plan reads to count every step exactly (≈ 0.5 B tokens at L=128)


class StepCosts:
    """(tokens, student FLOPs, teacher FLOPs) of optimizer step k of one strategy.

    With the prepared data the step's rows are known (the data order is a function of the seed):
    its real tokens are counted, and with ``fixed_mask_count`` its masked positions too, so the
    figures are the run's own. Otherwise (data not prepared yet, or random masks) a step has
    B·(L−1) tokens and 15 % of B·(L−2) masked positions: an estimate."""

    def __init__(
        self, cfg: dict, resolved: Resolved, strategy, batch: int, rows_budget: int = EXACT_PLAN_ROWS
    ):
        from budgetkd.train import step_flops

        self.strategy, self.batch = strategy, batch
        self.seq_len = cfg["data"]["seq_len"]
        self.fixed = cfg["training"]["fixed_mask_count"]
        self.seed = cfg["seed"]
        self.meta = resolved.data.meta
        self.data_dir = resolved.data.prepared
        self.student, self.teacher = resolved.student.shape, None
        if strategy.needs_teacher and resolved.teacher is not None:
            self.teacher = resolved.teacher.shape
        self._flops = lambda predicted: step_flops(
            strategy, self.student, self.teacher, self.seq_len, batch, predicted
        )
        self.rows_budget = rows_budget
        self._data = None
        self._perm: dict[int, Any] = {}
        self._cache: dict[int, tuple[float, float, float]] = {}

    def per_sequence(self) -> tuple[float, float]:
        """(student, teacher) FLOPs of one sequence at 15 % of L−2 masked positions."""
        from budgetkd.train import step_flops

        return step_flops(
            self.strategy, self.student, self.teacher, self.seq_len, 1, MASK_PROBABILITY * (self.seq_len - 2)
        )

    def exact_for(self, steps: int) -> bool:
        """Whether the first ``steps`` steps are counted exactly (prepared data, few enough rows to
        read, and masked counts that do not depend on random draws — or do not matter)."""
        masks_matter = self.strategy.needs_student_logits or self.strategy.needs_teacher_logits
        return (
            self.meta is not None
            and steps * self.batch <= self.rows_budget
            and (self.fixed or not masks_matter)
        )

    def __call__(self, step: int) -> tuple[float, float, float]:
        if self.meta is None or (step + 1) * self.batch > self.rows_budget:
            if -1 not in self._cache:
                self._cache[-1] = self._estimated()
            return self._cache[-1]
        if step not in self._cache:
            self._cache[step] = self._counted(step)
        return self._cache[step]

    def _estimated(self) -> tuple[float, float, float]:
        predicted = MASK_PROBABILITY * (self.seq_len - 2) * self.batch
        return (float(self.batch * (self.seq_len - 1)), *self._flops(predicted))

    def _counted(self, step: int) -> tuple[float, float, float]:
        import numpy as np

        rows = self._data_rows(step)
        pad, special = self._special()
        real = rows != pad
        candidates = (real & ~np.isin(rows, special)).sum(1)
        if self.fixed:
            predicted = float(np.round(candidates.astype(np.float32) * np.float32(MASK_PROBABILITY)).sum())
        else:
            predicted = MASK_PROBABILITY * float(candidates.sum())
        return (float(real.sum()), *self._flops(int(predicted) if self.fixed else predicted))

    def _special(self):
        ids = self.meta["special_ids"]
        return int(ids["pad"]), [int(i) for i in ids["all"]]

    def _data_rows(self, step: int):
        """The rows of step ``step``: global sequences k·B … k·B+B−1 in the seeded epoch orders."""
        import numpy as np

        from budgetkd.data import PackedData
        from budgetkd.data.dataset import epoch_permutation

        if self._data is None:
            self._data = PackedData(self.data_dir)
        n = self._data.num_train
        numbers = np.arange(step * self.batch, (step + 1) * self.batch)
        out = np.empty(len(numbers), dtype=np.int64)
        for epoch in np.unique(numbers // n):
            if int(epoch) not in self._perm:
                self._perm[int(epoch)] = epoch_permutation(n, self.seed, int(epoch))
            sel = numbers // n == epoch
            out[sel] = self._perm[int(epoch)][numbers[sel] % n]
        return np.asarray(self._data.train[np.sort(out)])


def _consumption(
    run_budget,
    costs: StepCosts,
    cfg: dict,
    n_train,
    *,
    charge_teacher: bool,
    rate,
    tokens_per_seq,
    whole_batches: bool = True,
):
    """What a run of ``run_budget`` consumes: the trainer's meter over the known step costs, or
    for a time budget the steps that the throughput buys (an estimate)."""
    from budgetkd import stages

    batch = cfg["optimizer"]["batch_size"]
    limit = (
        None
        if n_train is None
        else stages.data_limit_steps(run_budget, stages.max_epochs(cfg), int(n_train), batch)
    )
    if run_budget.currency == "time":
        if rate is None:
            return None
        per_step = batch * tokens_per_seq / rate
        steps = math.ceil(run_budget.amount / per_step - 1e-9)
        capped = limit is not None and steps > limit
        needed = steps * batch
        steps = min(steps, limit) if capped else steps
        tokens, fs, ft = costs._estimated()
        return stages.Consumption(
            steps,
            steps * batch,
            steps * tokens,
            steps * (fs + ft),
            steps * fs,
            steps * ft,
            capped,
            False,
            needed,
        )
    if run_budget.currency == "epochs" and n_train is None:
        return None
    if whole_batches:  # the trainer's rule: an epochs budget trains ⌊E·N/B⌋ full batches
        run_budget = in_steps(run_budget, int(n_train), batch)
    consumption = stages.simulate_consumption(
        run_budget,
        batch,
        costs,
        num_train=int(n_train or 1),
        data_limit_steps=limit,
        charge_teacher=charge_teacher,
    )
    consumption.exact = costs.exact_for(consumption.steps)
    return consumption


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600.0


def build_plan(
    cfg: dict,
    out: Path,
    resolved: Resolved,
    *,
    tokens_per_s: dict[str, float] | None = None,
    assumed_tokens_per_s: float | None = None,
    glue_rates: dict | None = None,
) -> dict:
    """The plan as plain data (what ``DIR/plan.json`` holds): the stages of
    :func:`budgetkd.stages.stage_ids`, each with its estimate. ``tokens_per_s``: measured by the
    probe per strategy label, for one process; ``assumed_tokens_per_s``: the No-KD rate of the
    whole launch (all processes); ``glue_rates``: the GLUE task shapes measured by
    :func:`budgetkd.glue.probe.probe_glue`, else the GLUE hours are estimated. Refuses (as the run would, before it) a budget that the data
    limit or an amortized teacher charge makes impossible."""
    rates, rate_source = _rates(cfg, resolved, tokens_per_s, assumed_tokens_per_s)
    stages_ = [_data_entry(cfg, out, resolved), *_teacher_entry(cfg, out, resolved)]
    pretraining, students, sweep_summary = _pretraining_entries(cfg, out, resolved, rates)
    glue_jobs, glue_entries = _glue_entries(cfg, out, resolved, students, rates, glue_rates)
    stages_ += pretraining + glue_entries
    stages_.append({"stage": "report", "dir": str(out), "what": "table.{md,csv,tex}, budget.md, plots/", "flops": 0.0,
                    "device_hours": 0.0})  # fmt: skip
    record = _plan_record(cfg, out, resolved, stages_, glue_jobs, sweep_summary, rates, rate_source)
    record["glue_throughput"] = glue_rates
    return record


def _plan_record(cfg, out, resolved, stages_, glue_jobs, sweep_summary, rates, rate_source) -> dict:
    known_hours = [s.get("device_hours") for s in stages_]
    return {
        "version": 1,
        "name": cfg["name"],
        "out": str(out),
        "world_size": resolved.world_size,
        "global_batch": cfg["optimizer"]["batch_size"],
        "per_process_batch": resolved.per_rank_batch,
        "micro_batch": resolved.micro_batch,
        "accumulation_steps": resolved.per_rank_batch // resolved.micro_batch,
        "max_micro_batch": cfg["optimizer"]["micro_batch_size"],
        "seq_len": cfg["data"]["seq_len"],
        "student": resolved.student.__dict__ | {"source": str(resolved.student.source)},
        "teacher": None if resolved.teacher is None else resolved.teacher.__dict__,
        "tokenizer": {"source": resolved.tokenizer.source, "vocab": resolved.tokenizer.vocab},
        "data": {"train_sequences": resolved.data.train_sequences, "exact": resolved.data.exact,
                 "how": resolved.data.what},
        "throughput": {"source": rate_source, "tokens_per_s": rates},
        "stages": stages_,
        "glue_jobs": glue_jobs,
        "sweep": sweep_summary,
        "total": {"flops": sum(s["flops"] for s in stages_ if s.get("flops") is not None),
                  "device_hours": None if any(h is None for h in known_hours) else sum(known_hours),
                  "flops_complete": all(s.get("flops") is not None for s in stages_)},
        "notes": resolved.notes,
    }  # fmt: skip


def _rates(cfg, resolved, tokens_per_s, assumed_tokens_per_s) -> tuple[dict, str | None]:
    """Tokens/s of the launch per strategy label: probed (× world size), or the assumed No-KD
    rate; a strategy not measured runs at the reference rate scaled by its FLOPs per sequence."""
    labels = [s["label"] for s in cfg["strategies"]]
    per_seq = {label: sum(_costs(cfg, resolved, label).per_sequence()) for label in resolved.strategies}
    none_label = next((s["label"] for s in cfg["strategies"] if s["name"] == "none"), None)
    rates: dict[str, float | None] = {}
    source = None
    if tokens_per_s:
        source = "probe on this machine (one process) × world size"
        rates = {
            label: tokens_per_s[label] * resolved.world_size for label in labels if label in tokens_per_s
        }
    elif assumed_tokens_per_s is not None:
        source = "--assume-tokens-per-s (No-KD, whole launch); others scaled by their FLOPs"
        rates = {none_label or labels[0]: assumed_tokens_per_s}
    if rates:
        reference = none_label if none_label in rates else next(iter(rates))
        for label in labels:
            if label not in rates and label in per_seq and per_seq.get(reference):
                rates[label] = rates[reference] * per_seq[reference] / per_seq[label]
    return rates, source


def _costs(cfg: dict, resolved: Resolved, label: str) -> StepCosts:
    key = (id(cfg), label)
    if key not in _COSTS:
        _COSTS.clear() if len(_COSTS) > 64 else None
        _COSTS[key] = StepCosts(cfg, resolved, resolved.strategies[label], cfg["optimizer"]["batch_size"])
    return _COSTS[key]


_COSTS: dict = {}


def _data_entry(cfg, out, resolved) -> dict:
    seq_len = cfg["data"]["seq_len"]
    return {
        "stage": "data",
        "dir": str(resolved.data.prepared or (out / "data")),
        "what": (
            f"use the prepared dataset ({resolved.data.what})"
            if resolved.data.prepared is not None
            else f"prepare {len(cfg['data']['inputs'])} input(s) with {resolved.tokenizer.source}, seq_len {seq_len}"
        ),
        "train_sequences": resolved.data.train_sequences,
        "train_sequences_exact": resolved.data.exact,
        "flops": 0.0,
        "device_hours": 0.0,
    }


def _teacher_entry(cfg, out, resolved) -> list[dict]:
    teacher_cfg = cfg["teacher"]
    if teacher_cfg is None:
        return []
    if "path" in teacher_cfg:
        t = resolved.teacher
        shape = "unknown shape" if t is None else f"{t.layers}L-{t.hidden}H-{t.heads}A, vocab {t.vocab}"
        head = "" if t is None else (", MLM head" if t.has_mlm_head else ", encoder-only")
        what = f"check {teacher_cfg['path']} ({shape}{head}; {t.origin if t else 'unreachable'})"
        return [
            {"stage": "teacher", "dir": teacher_cfg["path"], "what": what, "flops": 0.0, "device_hours": 0.0}
        ]
    block = teacher_cfg["pretrain"]
    what = (f"pretrain a {block['student']} teacher for {block['budget']} "
            f"(micro-batch {resolved.teacher_pretrain_micro} per process)")  # fmt: skip
    return [
        {"stage": "teacher", "dir": str(out / "teacher"), "what": what, "flops": None, "device_hours": None}
    ]


def _pretraining_entries(cfg, out, resolved, rates) -> tuple[list[dict], list[str], dict | None]:
    """The calibration (if any) and every student run of :func:`budgetkd.stages.student_runs`,
    at the budget the calibration is estimated to set; the ids of the students fine-tuned."""
    from budgetkd import stages
    from budgetkd.budget import Budget

    entries = []
    cal = stages.calibration(cfg)
    base, budget_text = None, None
    if cal is not None:
        entry, base, budget_text = _calibration_entry(cfg, out, resolved, rates, cal)
        entries.append(entry)
    else:
        base, budget_text = Budget.parse(cfg["budget"]["explicit"]), f"explicit: {cfg['budget']['explicit']}"
    charge = stages.teacher_charge(cfg)
    runs = stages.student_runs(cfg, out, base, charge)
    for run in runs:
        if run.reuse or run.strategy["label"] not in resolved.strategies:
            continue
        entries.append(_run_entry(cfg, resolved, rates, run, charge, cal, budget_text))
    for run in runs:  # a KD strategy whose teacher is unknown offline: listed, not priced
        if run.strategy["label"] not in resolved.strategies:
            entries.append(_unpriced_entry(run))
    students = stages.student_ids(cfg)
    return entries, students, _sweep_summary(cfg, base) if cfg["budget"].get("sweep") else None


def _calibration_entry(cfg, out, resolved, rates, cal):
    """The calibration run and the budget it is estimated to set (its FLOPs, or its time at the
    throughput: unknown without one)."""
    from budgetkd import stages
    from budgetkd.budget import Budget

    spec = cfg["budget"]["calibrate"]
    label = cal["label"]
    if label not in resolved.strategies:
        resolved.strategies[label] = _strategy_instance(cal, resolved)
    costs = _costs(cfg, resolved, label)
    n_train = resolved.data.train_sequences
    tps = cfg["data"]["seq_len"] - 1
    used = _consumption(stages.calibration_budget(cfg), costs, cfg, n_train, charge_teacher=True,
                        rate=rates.get(label), tokens_per_seq=tps)  # fmt: skip
    seconds = None if used is None or rates.get(label) is None else used.tokens / rates[label]
    amount = seconds if spec["currency"] == "time" else (None if used is None else used.flops)
    estimate = (
        f" ≈ {seconds / 3600:.3g} h" if spec["currency"] == "time" and seconds is not None
        else f" ≈ {used.flops:.3g} FLOPs" if spec["currency"] == "flops" and used is not None else ""
    )  # fmt: skip
    text = f"calibrated: {spec['epochs']:g} epoch(s) of {spec['strategy']} → its {spec['currency']}{estimate}"
    entry = _entry(cfg, resolved, "calibrate", out / "runs" / label, cal, text, used, seconds, costs)
    base = None if amount is None else Budget(spec["currency"], amount)
    return entry, base, text


def _strategy_instance(entry: dict, resolved: Resolved):
    from budgetkd.strategies import REGISTRY

    return REGISTRY[entry["name"]](entry["options"], resolved.student.bert_config())


def _run_entry(cfg, resolved, rates, run, charge, cal, budget_text) -> dict:
    """One student run: what it consumes (its whole point, a WSD branch's prefix included) and
    what this stage itself pays (a branch: only its decay)."""
    label = run.strategy["label"]
    costs = _costs(cfg, resolved, label)
    used = None
    if run.budget is not None:
        used = _consumption(run.budget, costs, cfg, resolved.data.train_sequences,
                            charge_teacher=not run.kd or charge["charge_forward"], rate=rates.get(label),
                            tokens_per_seq=cfg["data"]["seq_len"] - 1,
                            whole_batches=run.schedule.get("schedule", "linear") != "wsd")  # fmt: skip
    seconds = None if used is None or rates.get(label) is None else used.tokens / rates[label]
    if (
        run.budget is not None
        and run.budget.currency == "time"
        and used is not None
        and not used.stops_at_data_limit
    ):
        seconds = run.budget.amount if not run.kd or charge["charge_forward"] else seconds
    text = _budget_text(cfg, run, cal, budget_text)
    entry = _entry(cfg, resolved, run.stage, run.run_dir, run.strategy, text, used, seconds, costs)
    paid = cfg["budget"]["decay_fraction"] if run.branch else 1.0
    for key in ("flops", "device_hours", "wall_hours"):
        if entry.get(key) is not None:
            entry[key] *= paid
    entry["point_flops"] = None if used is None else used.flops
    entry["charged_budget"] = None if run.budget is None else run.budget.exact_text()
    entry["currency"] = None if run.budget is None else run.budget.currency
    return entry


def _budget_text(cfg, run, cal, budget_text) -> str:
    if not cfg["budget"].get("sweep"):
        return budget_text if cal is None else f"the calibrated {cfg['budget']['calibrate']['currency']}"
    tag = run.id.split("@", 1)[1]
    wsd = cfg["budget"]["schedule"] == "wsd"
    return tag + (" (wsd trunk)" if wsd and run.trunk else " (wsd branch: decay only)" if wsd else "")


def _entry(cfg, resolved, stage, run_dir, strategy, text, used, seconds, costs) -> dict:
    world = resolved.world_size
    fs, ft = costs.per_sequence()
    return {
        "stage": stage,
        "dir": str(run_dir),
        "strategy": strategy["name"],
        "budget": text,
        "steps": None if used is None else used.steps,
        "tokens": None if used is None else used.tokens,
        "flops_per_sequence": fs + ft,
        "teacher_share": None if fs + ft == 0 else ft / (fs + ft),
        "flops": None if used is None else used.flops,
        "tokens_per_s": None if seconds is None or not used else used.tokens / seconds,
        "device_hours": None if seconds is None else seconds * world / 3600.0,
        "wall_hours": _hours(seconds),
        "stops_at_data_limit": bool(used is not None and used.stops_at_data_limit),
        # what the budget needs (beyond one epoch: the data limit stops it there)
        "epochs": None if used is None or not resolved.data.train_sequences
        else (used.needed_sequences or used.sequences) / resolved.data.train_sequences,
        "exact": bool(used is not None and used.exact),
        "what": "",
    }  # fmt: skip


def _unpriced_entry(run) -> dict:
    return {"stage": run.stage, "dir": str(run.run_dir), "strategy": run.strategy["name"], "budget": "–",
            "steps": None, "tokens": None, "flops_per_sequence": None, "teacher_share": None, "flops": None,
            "tokens_per_s": None, "device_hours": None, "wall_hours": None, "stops_at_data_limit": False,
            "epochs": None, "exact": False, "what": "skipped: its teacher is unknown"}  # fmt: skip


def _sweep_summary(cfg, base) -> dict:
    """What each strategy's sweep charges against its largest point, and against separate runs."""
    from budgetkd import stages
    from budgetkd.sweep import wsd_cost

    budget_cfg = cfg["budget"]
    points = stages.sweep_points(cfg, base)
    known = [b.amount for _, b in points if b is not None]
    schedule, fraction = budget_cfg["schedule"], budget_cfg["decay_fraction"]
    complete = len(known) == len(points)
    return {
        "schedule": schedule,
        "decay_fraction": fraction,
        "points": [tag for tag, _ in points],
        "currency": next((b.currency for _, b in points if b is not None), None),
        "students": len(stages.student_ids(cfg)),
        "cost_vs_largest": (wsd_cost(known, fraction) if schedule == "wsd" else sum(known)) / max(known) if complete else None,
        "separate_runs_vs_largest": sum(known) / max(known) if complete else None,
    }  # fmt: skip


def _glue_entries(cfg, out, resolved, students, rates, glue_rates=None) -> tuple[list[dict], list[dict]]:
    """Every GLUE job of one student (tasks × grid × seeds) and one stage per student, its hours
    from the probe's measured rates (``glue_rates``) or else estimated (:func:`_glue_seconds`)."""
    from budgetkd.glue.search import parse_grid

    glue_cfg = cfg["glue"]
    grid = parse_grid(glue_cfg["grid"]).configurations()
    sizes = glue_sizes(cfg)
    s_shape = resolved.student.shape
    jobs = []
    for task, (n_train_glue, n_dev, where) in sizes.items():
        for lr, bs in grid:
            for seed in glue_cfg["seeds"]:
                steps = glue_cfg["epochs"] * math.ceil(n_train_glue / bs)
                job_flops = glue_cfg["epochs"] * (
                    flops.training_flops(flops.encoder_forward(s_shape, GLUE_MAX_LENGTH, n_train_glue))
                    + flops.encoder_forward(s_shape, GLUE_MAX_LENGTH, n_dev)
                )
                jobs.append({"task": task, "lr": lr, "batch_size": bs, "seed": seed, "train_examples": n_train_glue,
                             "dev_examples": n_dev, "sizes_from": where, "steps": steps, "flops": job_flops})  # fmt: skip
    per_student = sum(j["flops"] for j in jobs)
    seconds, by_task, source = _glue_seconds(cfg, resolved, jobs, rates, glue_rates)
    what = (f"{len(sizes)} task(s) × {len(grid)} configuration(s) × {len(glue_cfg['seeds'])} seed(s) "
            f"= {len(jobs)} fine-tuning jobs, {sum(j['steps'] for j in jobs):,} optimizer steps")  # fmt: skip
    entries = [
        {"stage": f"glue:{sid}", "dir": str(out / "glue" / sid), "what": what, "jobs": len(jobs),
         "steps": sum(j["steps"] for j in jobs), "flops": per_student, "device_hours": _hours(seconds),
         "wall_hours": None if seconds is None else seconds / resolved.world_size / 3600.0,
         "seconds_by_task": by_task, "hours_source": source}
        for sid in students
    ]  # fmt: skip
    return jobs, entries


def _glue_seconds(cfg, resolved, jobs, rates, glue_rates) -> tuple[float | None, dict, str]:
    """Device-seconds of one student's GLUE grid (each job on one device): per job, from the rates
    the probe measured for its task shape (:func:`budgetkd.glue.probe.job_seconds`, plus the
    task's tokenization once); a task the probe did not measure, by :func:`_estimated_glue_seconds`."""
    from budgetkd.glue.probe import encode_seconds, job_seconds

    measured = (glue_rates or {}).get("tasks", {})
    epochs = cfg["glue"]["epochs"]
    by_task: dict[str, float | None] = {}
    for job in jobs:
        task, rate = job["task"], measured.get(job["task"])
        if rate is None:
            s = _estimated_glue_seconds(cfg, resolved, job, rates)
        else:
            s = job_seconds(rate, epochs, job["train_examples"], job["dev_examples"], job["batch_size"])
            if task not in by_task:
                s += encode_seconds(rate, job["train_examples"], job["dev_examples"])
        by_task[task] = None if s is None or by_task.get(task, 0.0) is None else by_task.get(task, 0.0) + s
    known = [v for v in by_task.values() if v is not None]
    total = sum(known) if len(known) == len(by_task) else None
    return total, by_task, _glue_source(cfg, resolved, glue_rates, set(by_task), rates)


def _glue_source(cfg, resolved, glue_rates, tasks: set, rates) -> str:
    """Where the GLUE hours come from, in words (printed and in plan.json)."""
    measured = (glue_rates or {}).get("tasks", {})
    parts = [
        f"{_rate_text(r['train_examples_per_s'])} ex/s train, {r['eval_examples_per_s']:,.0f} ex/s eval for {task}"
        for task, r in measured.items() if task in tasks
    ]  # fmt: skip
    if parts:
        g = glue_rates
        threads = "" if g["threads"] is None else f", {g['threads']} thread(s)"
        how = (f"{g['device']}{threads}, {'unpadded' if g['unpadded'] else 'padded'}, {g['clock']} clock, "
               f"{next(iter(measured.values()))['examples']}")  # fmt: skip
        parts = [f"measured by --probe on this machine ({how}): " + ", ".join(parts)]
    rest = sorted(tasks - set(measured))
    if rest:
        device = _glue_device(cfg)
        if _glue_flop_rate(cfg, resolved, rates) is None:
            parts.append(
                f"{', '.join(rest)}: not estimated (give --probe, or --assume-tokens-per-s for an estimate)"
            )
        else:
            lengths = "mean lengths" if cfg["glue"]["unpad"] else "mean + 2 sd lengths (padded batches)"
            parts.append(
                f"{', '.join(rest)}: an estimate, not a measurement: the fine-tuning FLOPs at the tasks' {lengths} "
                f"at {GLUE_UTILISATION[device]:g} × the No-KD pretraining FLOP rate on {device} plus "
                f"{GLUE_JOB_OVERHEAD_S[device]:g} s per job ({GLUE_CALIBRATION[device]}); --probe measures it"
            )
    return "; ".join(parts)


def _rate_text(by_batch: dict) -> str:
    return " / ".join(
        f"{v:,.0f}" + (f" (bs {bs})" if len(by_batch) > 1 else "") for bs, v in by_batch.items()
    )


def _glue_device(cfg) -> str:
    from budgetkd.glue.finetune import resolve_device

    try:
        return resolve_device(cfg["glue"]["device"]).type
    except BudgetKDError:
        return "cuda"  # asked for CUDA on a machine without it: planned for the launch's GPUs


def _estimated_glue_seconds(cfg, resolved, job, rates) -> float | None:
    """One run of the grid without a measurement: its FLOPs at the task's mean WordPiece lengths
    (``glue.probe.TASK_LENGTHS``; padded batches: at the mean + 2 standard deviations, about a
    batch's longest) over the No-KD pretraining FLOP rate × ``GLUE_UTILISATION``, plus
    ``GLUE_JOB_OVERHEAD_S``. A calibrated guess (the constants say on what), not a measurement."""
    from budgetkd.glue.probe import TASK_LENGTHS

    rate = _glue_flop_rate(cfg, resolved, rates)
    if rate is None:
        return None
    (train_mean, train_std), (dev_mean, dev_std) = TASK_LENGTHS.get(job["task"], ((40.0, 20.0), (40.0, 20.0)))
    if not cfg["glue"]["unpad"]:
        train_mean, dev_mean = train_mean + 2 * train_std, dev_mean + 2 * dev_std
    shape = resolved.student.shape
    work = cfg["glue"]["epochs"] * flops.training_flops(
        flops.encoder_forward(shape, min(train_mean, GLUE_MAX_LENGTH), job["train_examples"])
    ) + flops.encoder_forward(shape, min(dev_mean, GLUE_MAX_LENGTH), job["dev_examples"])
    device = _glue_device(cfg)
    return work / (rate * GLUE_UTILISATION[device]) + GLUE_JOB_OVERHEAD_S[device]


def _glue_flop_rate(cfg, resolved, rates) -> float | None:
    """FLOP/s of one device pretraining No-KD (the reference of the GLUE estimate)."""
    none_label = next((s["label"] for s in cfg["strategies"] if s["name"] == "none"), None)
    reference = none_label if none_label in rates else (next(iter(rates)) if rates else None)
    if reference is None or reference not in resolved.strategies:
        return None
    per_seq = sum(_costs(cfg, resolved, reference).per_sequence())
    return rates[reference] / (cfg["data"]["seq_len"] - 1) * per_seq / resolved.world_size


def check_fits_data(plan: dict, data_exact: bool) -> None:
    """Refuse, before any stage, a run that the data limit cuts short (SPEC §1, ``data_setting:
    unlimited`` stops every run at one epoch): a budget in steps, tokens, epochs or FLOPs that
    cannot be spent within it — the trainer would refuse it when its stage starts, hours later —
    and any sweep point beyond it (its trunk would stop undecayed, its branches lack snapshots).
    With an estimated corpus size only a run clearly beyond it (> 5 %) is refused."""
    for stage in plan["stages"]:
        epochs = stage.get("epochs")
        if not stage.get("stops_at_data_limit") or epochs is None:
            continue
        name = stage["stage"].split(":", 1)[-1]
        if "@" in name and (data_exact or epochs > 1.05):
            raise BudgetKDError(
                f"config key 'budget.sweep': {name} needs {epochs:.2f} epochs of "
                f"the corpus{'' if data_exact else ' (estimated)'}, but data_setting: unlimited stops every "
                "run at one; lower the largest point or set data_setting: limited"
            )
        if "@" not in name and stage.get("exact") and stage.get("currency") not in (None, "time"):
            raise BudgetKDError(
                f"{stage['stage']}: budget {stage['charged_budget']} needs more than the data limit of 1 epoch "
                f"({plan['data']['train_sequences']:,.0f} training sequences in batches of {plan['global_batch']}: "
                f"{stage['steps']} steps; data_setting: unlimited never repeats the corpus) — lower the budget "
                "or use data_setting: limited"
            )


def probe_throughput(cfg: dict, out: Path, resolved: Resolved, steps: int = 3) -> dict[str, float]:
    """Tokens/s of each strategy on this machine, one process: ``steps`` charged steps (after
    the trainer's uncharged warm-up step) at the per-process batch and micro-batch of the
    launch, in a temporary directory, charged to nothing. Needs the prepared data and a teacher
    that can be loaded."""
    import shutil

    from budgetkd import stages
    from budgetkd.strategies import REGISTRY
    from budgetkd.train import pretrain

    if resolved.data.prepared is None:
        raise BudgetKDError(
            "--probe needs the prepared data (budgetkd prepare, then data.prepared: DIR, or a finished data stage "
            "in --out); or give --assume-tokens-per-s"
        )
    teacher = None
    if cfg["teacher"] is not None:
        teacher = cfg["teacher"].get("path") or str(out / "teacher" / "model")
    rates: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="budgetkd-probe-"))
    try:
        for entry in cfg["strategies"]:
            kd = REGISTRY[entry["name"]].needs_teacher
            if kd and (teacher is None or not (Path(teacher).exists() or resolved.teacher is not None)):
                continue
            # the experiment's own run of this strategy, at this launch's per-process batch
            config = stages.train_config(
                cfg, resolved.data.prepared, entry, budget=f"{steps}steps", out=work / entry["label"],
                teacher=teacher, progress=False, batch_size=resolved.per_rank_batch,
                micro_batch_size=resolved.micro_batch, max_epochs=None, num_evals=1, eval_sequences=8,
                checkpoint_interval_s=0.0, checkpoint_every_steps=0,
            )  # fmt: skip
            try:
                summary = pretrain(config)
            except BudgetKDError as exc:
                resolved.notes.append(f"probe of {entry['label']} failed: {exc}")
                continue
            rates[entry["label"]] = float(summary["consumed"]["tokens_per_s"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rates


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def _num(value, fmt: str = ".3g", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


def render_plan(plan: dict) -> str:
    """The plan as the text ``--dry-run`` prints."""
    lines = [f"plan of experiment {plan['name']!r} → {plan['out']}"]
    lines.append(
        f"  launch: {plan['world_size']} process(es); global batch {plan['global_batch']} = "
        f"{plan['world_size']} × {plan['per_process_batch']} per process = micro-batch {plan['micro_batch']} × "
        f"{plan['accumulation_steps']} accumulation step(s) (device maximum {plan['max_micro_batch'] or 'default 64'}); "
        f"seq_len {plan['seq_len']}"
    )
    s, t = plan["student"], plan["teacher"]
    lines.append(
        f"  student: {s['source']} ({s['layers']}L-{s['hidden']}H-{s['heads']}A, vocab {s['vocab']})"
    )
    if t is not None:
        lines.append(
            f"  teacher: {t['source']} ({t['layers']}L-{t['hidden']}H-{t['heads']}A, vocab {t['vocab']}, "
            f"{'MLM head' if t['has_mlm_head'] else 'encoder-only'}; {t['origin']})"
        )
    d = plan["data"]
    lines.append(
        f"  data: {_num(d['train_sequences'], ',.0f')} training sequences "
        f"({'exact' if d['exact'] else 'estimate'}: {d['how']})"
    )
    return "\n".join(lines + _render_body(plan))


def _render_body(plan: dict) -> list[str]:
    """Throughput, the stages with their cost, the sweep, the total and the notes."""
    lines = []
    th = plan["throughput"]
    lines.append(
        "  throughput: "
        + (
            ", ".join(f"{k} {v:,.0f} tok/s" for k, v in th["tokens_per_s"].items() if v)
            + f" ({th['source']})"
            if th["tokens_per_s"]
            else "not measured (give --probe or --assume-tokens-per-s for hours)"
        )
    )
    glue = next((s for s in plan["stages"] if s["stage"].startswith("glue:")), None)
    if glue is not None and glue.get("hours_source"):
        lines.append(f"  GLUE hours: {glue['hours_source']}")
    lines.append("  stages:")
    lines += _render_stages(plan["stages"])
    return lines + _render_totals(plan)


def _render_stages(stages_: list[dict]) -> list[str]:
    lines = []
    for st in stages_:
        cost = f"{_num(st.get('flops'))} FLOPs, {_num(st.get('device_hours'), '.3g')} device-h"
        detail = st.get("what") or ""
        if st["stage"].startswith(("calibrate", "pretrain:")):
            detail = (
                f"{st['strategy']}: {st['budget']}; {_num(st['steps'], ',.0f')} steps, "
                f"{_num(st['tokens'], '.3g')} tokens, {_num(st['flops_per_sequence'])} FLOPs/sequence "
                f"(teacher {_num(None if st['teacher_share'] is None else 100 * st['teacher_share'], '.0f')} %)"
                + ("; stops at the data limit (1 epoch)" if st.get("stops_at_data_limit") else "")
                + (f"; {st['what']}" if st.get("what") else "")
            )
        lines.append(f"    {st['stage']:<18} {st['dir']}")
        lines.append(f"    {'':<18} {detail}")
        lines.append(f"    {'':<18} cost: {cost}")
    return lines


def _render_totals(plan: dict) -> list[str]:
    lines = []
    sweep = plan.get("sweep")
    if sweep:
        ratio = sweep["cost_vs_largest"]
        lines.append(
            f"  sweep: {len(sweep['points'])} points ({', '.join(sweep['points'])}), schedule {sweep['schedule']}"
            + (f" (decay over the last {sweep['decay_fraction']:g})" if sweep["schedule"] == "wsd" else "")
            + f", {sweep['students']} students"
            + (
                f"; each strategy's sweep costs {ratio:.2f}× its largest point "
                f"(separate runs: {sweep['separate_runs_vs_largest']:.2f}×)"
                if ratio is not None
                else ""
            )
        )
    total = plan["total"]
    lines.append(
        f"  total: {_num(total['flops'])} FLOPs{'' if total['flops_complete'] else ' (of the stages estimated)'}, "
        f"{_num(total['device_hours'], '.3g')} device-hours"
    )
    lines.append(
        "  (FLOPs: budgetkd.flops, 15 % of positions predicted; GLUE FLOPs at length 128 are an upper bound; "
        "pretraining hours at the throughput above, others scaled by FLOPs; GLUE hours as said above)"
    )
    for note in plan["notes"]:
        lines.append(f"note: {note}")
    return lines


def write_plan(plan: dict, path: Path) -> None:
    from budgetkd.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(json.dumps(plan, default=str)))
