"""The one check to run when a GPU is lent (issue 22): every CUDA path of budgetkd, and how fast.

Run by ``benchmarks/gpu_check.sh`` (``PYTHONPATH=src``; needs torch, transformers, tokenizers,
numpy — never ``datasets``). Everything is made here: a learnable synthetic "language" (a fixed
random successor grammar: each word has 4 possible next words, drawn Zipf-distributed, taken with
probabilities 0.7/0.15/0.1/0.05, so a model that learns brings the MLM loss far below ln V), a teacher trained on it, and a synthetic classification task.

Each check is time-boxed (SIGALRM, and a global deadline) and appended to ``OUT/gpu_check.json``
(JSON lines: one ``{"check": ..., "status": PASS|FAIL|SKIP|ERROR, "figure": ..., ...}`` per line,
flushed and fsynced when the check ends, so a killed run keeps every check before it). Printed
last: one table, one line per check. Checks (``--cpu``: small shapes; the reference of the
agreement checks is then the CPU in float64 instead of the CPU in fp32):

- ``learn``: the teacher trained for a few hundred steps through the real loop; its validation
  MLM loss must fall well below ln V (ln V − 1);
- ``agree:<strategy>``: the same 20 fp32 steps of every strategy on the device and on the CPU
  (max relative per-step loss difference ≤ ``AGREE_RTOL``; TF32 off for them);
- ``bf16:<strategy>``: bf16 autocast against fp32 on the device (≤ ``BF16_RTOL``; GPU only);
- ``accum``: 4 micro-batches of B/4 against one batch of B (≤ ``ACCUM_RTOL``, losses and weights);
- ``ddp-1-rank``: DDP over a process group of one (gloo on CPU, NCCL on GPU) against plain;
- ``prefetcher``: the background prefetcher (pinned on CUDA) gives the synchronous batches;
- ``resume``: a run killed after a checkpoint and resumed ends with the uninterrupted run's weights
  (real loop, dropout on);
- ``glue``: stacked against separate fine-tuning on a synthetic task (dropout off: per-step
  losses ≤ 1e-4 relative, same predictions), and each one's speed;
- ``throughput:none|minilm``: the real loop at the paper's shape (6L-768 student, batch 256 × 128,
  MiniLM from a 12L-768 teacher; ``--cpu``: tiny): tokens/s, MFU against the measured bf16
  matmul peak and the H200 datasheet (989 TFLOP/s dense bf16), peak memory, the teacher's time
  share, which SDPA kernel ran;
- ``compile:none|minilm``: the real loop with ``compile`` against eager: losses, tokens/s, new
  graphs and graph breaks after the warm-up step (``torch._dynamo`` counters). On CPU the
  ``aot_eager`` backend (no C++ toolchain needed) checks the capture only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA H200 SXM datasheet (dense, no sparsity)
STRATEGIES = ("none", "vanilla", "tinybert", "minilm", "minilmv2")
AGREE_RTOL = 2e-3  # GPU fp32 (TF32 off) vs CPU fp32, per step, over 20 steps of training
AGREE_RTOL_CPU = 1e-4  # CPU fp32 vs CPU float64 (the losses themselves are fp32 either way)
BF16_RTOL = 5e-2
ACCUM_RTOL = 1e-4
SUCCESSORS = 4
SUCCESSOR_P = (0.7, 0.15, 0.1, 0.05)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class CheckTimeout(Exception):
    pass


# -- synthetic data ----------------------------------------------------------------------------
def make_language(
    root: Path, vocab_size: int, seq_len: int, train: int, valid: int, seed: int = 0, padded: bool = True
) -> Path:
    """A prepared dataset (budgetkd layout) of a fixed successor grammar: word w is followed by
        one of ``SUCCESSORS`` fixed words (Zipf-distributed over the vocabulary) with probabilities
    ``SUCCESSOR_P``. Rows are packed full (as ``budgetkd prepare`` packs them) — with ``padded``,
        every 8th is padded after a random length, so both encoder paths run."""
    from budgetkd.data.tokenizer import bert_tokenizer_from_vocab
    from budgetkd.io import atomic_write_json

    words = vocab_size - len(SPECIALS)
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(words)])}
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, words + 1) ** 1.1
    successors = rng.choice(words, size=(words, SUCCESSORS), p=zipf / zipf.sum())
    for split, rows in (("train", train), ("valid", valid)):
        ids = np.zeros((rows, seq_len), dtype=np.uint16)
        lengths = np.where(
            (np.arange(rows) % 8 == 7) & padded, rng.integers(seq_len // 4, seq_len, size=rows), seq_len
        )
        word = rng.integers(0, words, size=rows)
        ids[:, 0] = 2
        for t in range(1, seq_len - 1):
            ids[:, t] = word + len(SPECIALS)
            word = successors[word, rng.choice(SUCCESSORS, size=rows, p=SUCCESSOR_P)]
        ids[:, -1] = 3
        for r in np.flatnonzero(lengths < seq_len):
            ids[r, lengths[r] - 1] = 3
            ids[r, lengths[r] :] = 0
        ids.tofile(data / f"{split}.bin")
    bert_tokenizer_from_vocab(vocab).save_pretrained(str(data / "tokenizer"))
    atomic_write_json(
        data / "meta.json",
        {
            "format_version": 3,
            "fingerprint": f"gpu-check-{vocab_size}-{seq_len}-{seed}",
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "dtype": "uint16",
            "special_ids": {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "all": [0, 1, 2, 3, 4]},
            "num_train_sequences": train,
            "num_valid_sequences": valid,
        },
    )
    return data


def random_model(root: Path, data: Path, arch, name: str, seed: int = 1) -> Path:
    from budgetkd.data import PackedData
    from budgetkd.models import create_student, export_student, resolve_architecture

    packed = PackedData(data)
    model = create_student(
        resolve_architecture(arch), packed.vocab_size, packed.seq_len, packed.special_ids, seed
    )
    export_student(model, packed.load_tokenizer(), root / name)
    return root / name


# -- measurements ------------------------------------------------------------------------------
def matmul_peak(device: torch.device, size: int, dtype: torch.dtype) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def sdpa_kernels(encoder, input_ids, device: torch.device) -> list[str]:
    """Names of the attention kernels one forward of ``encoder`` ran (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast, profile(activities=activities) as prof:
        encoder(input_ids=input_ids)
    keys = {e.key for e in prof.key_averages()}
    wanted = (
        "scaled_dot_product",
        "flash",
        "fmha",
        "efficient_attention",
        "cudnn_attention",
        "attention_math",
    )
    return sorted(k for k in keys if any(w in k.lower() for w in wanted))[:8]


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if len(a) else float("nan")


def max_weight_diff(a: dict, b: dict) -> float:
    return max(
        float((a[k].double().cpu() - b[k].double().cpu()).abs().max()) for k in a if a[k].is_floating_point()
    )


# -- a fixed-step loop over the trainer's own parts ---------------------------------------------
def fixed_steps(
    ctx,
    strategy: str,
    device: torch.device,
    *,
    precision: str = "fp32",
    batch: int | None = None,
    micro: int | None = None,
    ddp: bool = False,
    steps: int = 20,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[float], dict]:
    """``steps`` optimizer steps of ``strategy`` (dropout 0, constant lr, clipping 1.0) through
    ``budgetkd.trainer.step`` — the very forward, loss, backward and update of the loop — with the
    precision chosen here (the loop itself always trains bf16 on CUDA). Returns (per-step losses,
    final student weights)."""
    from budgetkd.data import PackedData
    from budgetkd.models import load_teacher, resolve_architecture
    from budgetkd.strategies import get_strategy
    from budgetkd.train import TrainConfig
    from budgetkd.trainer.setup import build_batches, build_optimizer, build_strategy, build_student
    from budgetkd.trainer.step import TeacherRunner, TrainModule, accumulate_gradients, apply_update

    batch = batch or ctx.small_batch
    cfg = TrainConfig(
        data=str(ctx.small_data), out=str(ctx.work / "unused"), student=ctx.small_student, strategy=strategy,
        teacher=str(ctx.small_teacher), batch_size=batch, micro_batch_size=micro or batch, dropout=0.0, max_grad_norm=1.0,
    )  # fmt: skip
    data = PackedData(ctx.small_data)
    cls = get_strategy(strategy)
    student = build_student(resolve_architecture(ctx.small_student), data, 0, 0.0).to(dtype)
    teacher = load_teacher(str(ctx.small_teacher), device) if cls.needs_teacher else None
    if teacher is not None and dtype != torch.float32:
        teacher.model.to(dtype)
    # the losses are fp32 by design (budgetkd.losses): a float64 reference runs float64 encoders
    strat = build_strategy(cls, {}, 0, student.config, teacher.config if teacher else None)
    batches, _, _ = build_batches(cfg, data, 0, 0, 0, 1)
    module = TrainModule(student, strat).to(device)
    model = module
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            module,
            device_ids=[device.index or 0] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    runner = TeacherRunner(teacher, strat, device, bf16=precision == "bf16") if teacher is not None else None
    optimizer = build_optimizer(module, cfg, 1e-3, device)
    bf16 = precision == "bf16" and device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    losses = []
    for step in range(steps):
        micro_batches = batches.micro_batches(step)
        loss, _, _, _ = accumulate_gradients(
            model, micro_batches, device=device, world_size=1, teacher_runner=runner,
            normalizer=strat.normalizer, autocast=autocast, clock=time.perf_counter,
        )  # fmt: skip
        apply_update(module, optimizer, device, loss, 1.0)
        losses.append(loss)
    return losses, {k: v.detach().clone() for k, v in student.state_dict().items()}


@contextlib.contextmanager
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def pretrain_run(ctx, name: str, **overrides) -> tuple[dict, object]:
    """The real loop (``Pretrainer.pretrain``); returns (summary, the trainer)."""
    from budgetkd.train import Pretrainer, TrainConfig

    values = dict(
        data=str(ctx.small_data), out=str(ctx.work / "runs" / name), student=ctx.small_student,
        budget="20steps", batch_size=ctx.small_batch, num_evals=1, eval_sequences=ctx.small_batch,
        eval_batch_size=ctx.small_batch, checkpoint_interval_s=0.0, device=str(ctx.device), progress=False,
        compile=False,  # eager unless a check asks (compile is on by default on CUDA; check_compile)
    )  # fmt: skip
    values.update(overrides)
    resume = values.pop("_resume", False)
    trainer = Pretrainer(TrainConfig(**values), resume=resume)
    summary = trainer.pretrain()
    return summary, trainer


# -- the checks ----------------------------------------------------------------------------------
def check_learn(ctx) -> dict:
    summary, trainer = pretrain_run(
        ctx, "teacher", student=ctx.teacher_arch, budget=f"{ctx.teacher_steps}steps", lr=3e-3, num_evals=2,
        batch_size=ctx.teacher_batch, dropout=0.0, eval_sequences=64, eval_batch_size=64,
    )  # fmt: skip
    ctx.small_teacher = ctx.work / "runs" / "teacher" / "model"
    first, last = trainer.history[0]["val_mlm_loss"], trainer.history[-1]["val_mlm_loss"]
    uniform = math.log(ctx.small_vocab - len(SPECIALS))
    return {
        "ok": last < uniform - 1.0,
        "figure": f"val MLM {first:.2f} -> {last:.2f} (ln V {uniform:.2f}, need < {uniform - 1:.2f})",
        "val_mlm_first": first, "val_mlm_last": last, "steps": ctx.teacher_steps,
        "tokens_per_s": summary["consumed"]["tokens_per_s"],
    }  # fmt: skip


def check_agree(ctx, strategy: str) -> dict:
    with no_tf32():
        got, _ = fixed_steps(ctx, strategy, ctx.device)
    if ctx.device.type == "cuda":
        ref, _ = fixed_steps(ctx, strategy, torch.device("cpu"))
        tol, against = AGREE_RTOL, "CPU fp32"
    else:
        ref, _ = fixed_steps(ctx, strategy, torch.device("cpu"), dtype=torch.float64)
        tol, against = AGREE_RTOL_CPU, "CPU float64"
    diff = rel_diff(got, ref)
    return {
        "ok": diff <= tol and all(map(math.isfinite, got)),
        "figure": f"max rel diff {diff:.1e} vs {against} (tol {tol:.0e}); loss {got[0]:.3g} -> {got[-1]:.3g}",
        "losses": got, "reference": ref,
    }  # fmt: skip


def check_bf16(ctx, strategy: str) -> dict:
    if ctx.device.type != "cuda":
        return {"skip": "bf16 autocast is the GPU's training precision"}
    bf16, _ = fixed_steps(ctx, strategy, ctx.device, precision="bf16")
    with no_tf32():
        fp32, _ = fixed_steps(ctx, strategy, ctx.device)
    diff = rel_diff(bf16, fp32)
    return {
        "ok": diff <= BF16_RTOL,
        "figure": f"max rel diff {diff:.1e} (tol {BF16_RTOL:.0e})",
        "losses": bf16,
    }


def check_accum(ctx) -> dict:
    b = ctx.small_batch
    with no_tf32():
        whole, w_whole = fixed_steps(ctx, "minilm", ctx.device, batch=b, micro=b)
        split, w_split = fixed_steps(ctx, "minilm", ctx.device, batch=b, micro=b // 4)
        whole_none, _ = fixed_steps(ctx, "none", ctx.device, batch=b, micro=b)
        split_none, _ = fixed_steps(ctx, "none", ctx.device, batch=b, micro=b // 4)
    diff = max(rel_diff(split, whole), rel_diff(split_none, whole_none))
    weights = max_weight_diff(w_split, w_whole)
    return {
        "ok": diff <= ACCUM_RTOL,
        "figure": f"4 x {b // 4} vs 1 x {b}: max rel loss diff {diff:.1e} (tol {ACCUM_RTOL:.0e}), weights {weights:.1e}",
        "max_weight_diff": weights,
    }  # fmt: skip


def check_ddp(ctx) -> dict:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    with no_tf32():
        plain, w_plain = fixed_steps(ctx, "minilm", ctx.device, micro=ctx.small_batch // 2)
        dist.init_process_group(backend=backend, rank=0, world_size=1)
        try:
            wrapped, w_wrapped = fixed_steps(ctx, "minilm", ctx.device, micro=ctx.small_batch // 2, ddp=True)
        finally:
            dist.destroy_process_group()
    diff, weights = rel_diff(wrapped, plain), max_weight_diff(w_wrapped, w_plain)
    return {"ok": diff <= 1e-5, "figure": f"{backend}: max rel loss diff {diff:.1e}, weights {weights:.1e}"}


def check_prefetcher(ctx) -> dict:
    """The background prefetcher (pinned memory on CUDA) hands out exactly the synchronous batches."""
    from budgetkd.data import MaskingConfig, PackedData, StepBatches
    from budgetkd.distributed import Prefetcher

    data = PackedData(ctx.small_data)
    masking = MaskingConfig(vocab_size=data.vocab_size, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    batches = StepBatches(
        data, batch_size=ctx.small_batch, micro_batch_size=ctx.small_batch // 2, data_seed=0, mask_seed=0,
        masking=masking,
    )  # fmt: skip
    pinned = True
    with Prefetcher(batches, start_step=0, pin=ctx.device.type == "cuda") as prefetcher:
        for step in range(6):
            for a, b in zip(prefetcher.get(step), batches.micro_batches(step)):
                for name in ("input_ids", "attention_mask", "labels", "positions"):
                    if not torch.equal(getattr(a, name), getattr(b, name)):
                        return {"ok": False, "figure": f"step {step}: {name} differs"}
                pinned = pinned and (a.input_ids.is_pinned() and a.positions.is_pinned())
    cuda = ctx.device.type == "cuda"
    return {"ok": pinned or not cuda, "figure": f"6 steps equal; pinned {pinned if cuda else 'n/a (CPU)'}"}


def check_resume(ctx) -> dict:
    from budgetkd.train import Pretrainer

    common = dict(student=ctx.small_student, budget="12steps", checkpoint_every_steps=6, dropout=0.1)
    _, whole = pretrain_run(ctx, "uninterrupted", **common)

    class Killed(Exception):
        pass

    original = Pretrainer.save_checkpoint

    def save_then_die(self):
        original(self)
        if self.meter.steps == 6:
            raise Killed

    Pretrainer.save_checkpoint = save_then_die
    try:
        pretrain_run(ctx, "interrupted", **common)
        raise AssertionError("the run was not interrupted")
    except Killed:
        pass
    finally:
        Pretrainer.save_checkpoint = original
    _, resumed = pretrain_run(ctx, "interrupted", _resume=True, **common)
    diff = max_weight_diff(resumed.student.state_dict(), whole.student.state_dict())
    return {
        "ok": diff == 0.0,
        "figure": f"max |w_resumed - w_whole| = {diff:.1e} (need 0)",
        "device": str(ctx.device),
    }


def check_glue(ctx) -> dict:
    from transformers import BertForMaskedLM

    from budgetkd.glue import finetune
    from budgetkd.glue.stacked import fine_tune_stacked
    from budgetkd.glue.tasks import get_task

    model_dir = ctx.work / "glue-model"
    with finetune.quiet_transformers():
        model = BertForMaskedLM.from_pretrained(str(ctx.small_teacher))
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        model.save_pretrained(str(model_dir))
    tokenizer = finetune.load_tokenizer(ctx.small_teacher)
    tokenizer.save_pretrained(str(model_dir))
    tokenizer = finetune.load_tokenizer(model_dir)
    task = get_task("sst2")
    rng = np.random.default_rng(5)
    words = ctx.small_vocab - len(SPECIALS)

    def split(name: str, n: int):
        lengths = rng.integers(6, 24, size=n)
        rows = [rng.integers(len(SPECIALS), ctx.small_vocab, size=k) for k in lengths]
        labels = np.array([int((r < len(SPECIALS) + words // 2).mean() > 0.5) for r in rows], dtype=np.int64)
        ids = [np.concatenate([[2], r, [3]]) for r in rows]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(i) for i in ids], out=offsets[1:])
        flat = np.concatenate(ids).astype(np.int32)
        arrays = {
            "input_ids": flat,
            "token_type_ids": np.zeros_like(flat),
            "attention_mask": np.ones_like(flat),
        }
        pad = {"input_ids": 0, "token_type_ids": 0, "attention_mask": 0}
        return finetune.EncodedSplit(name, arrays, offsets, labels, pad)

    train, dev = split("train", ctx.glue_examples), {"dev": split("dev", 64)}
    lrs = (1e-4, 3e-4, 1e-3, 3e-3)
    common = dict(
        batch_size=16, seed=3, recipe=finetune.Recipe(epochs=2), device=ctx.device, precision="fp32"
    )
    with no_tf32():
        stacked = fine_tune_stacked(model_dir, task, tokenizer, train, dev, learning_rates=lrs, **common)
        separate = [
            finetune.fine_tune(
                model_dir, task, tokenizer, train, dev, learning_rate=lr, progress=False, **common
            )
            for lr in lrs
        ]
    diff = max(rel_diff(m.step_losses, a.step_losses) for m, a in zip(stacked, separate))
    same = all(m.predictions == a.predictions for m, a in zip(stacked, separate))
    t_stacked, t_separate = stacked[0].train_seconds, sum(a.train_seconds for a in separate)
    scores = [round(next(iter(m.metrics.values())), 3) for m in stacked]
    return {
        "ok": diff <= 1e-4 and same,
        "figure": f"loss rel diff {diff:.1e}, same predictions {same}; stacked {t_separate / t_stacked:.2f}x "
        f"faster ({t_stacked:.1f} s vs {t_separate:.1f} s for {len(lrs)} configs); scores {scores}",
        "train_s_stacked": t_stacked, "train_s_separate": t_separate, "metrics": [m.metrics for m in stacked],
    }  # fmt: skip


def check_throughput(ctx, strategy: str) -> dict:
    from budgetkd.models import resolve_architecture  # noqa: F401  (the import chain: no datasets)

    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    teacher = str(ctx.big_teacher) if strategy != "none" else None
    summary, trainer = pretrain_run(
        ctx, f"throughput-{strategy}", data=str(ctx.big_data), student=ctx.big_student, strategy=strategy,
        teacher=teacher, budget=f"{ctx.throughput_steps}steps", batch_size=ctx.big_batch,
        micro_batch_size=ctx.big_batch, eval_sequences=ctx.big_batch, eval_batch_size=ctx.big_batch,
    )  # fmt: skip
    consumed = summary["consumed"]
    achieved = consumed["flops"] / consumed["time_s"]
    mfu = achieved / ctx.peak
    memory = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else float("nan")
    ids = torch.randint(5, ctx.big_vocab, (ctx.big_batch, ctx.big_seq), device=ctx.device)
    kernels = sdpa_kernels(trainer.student.bert, ids, ctx.device)
    out = {
        "tokens_per_s": consumed["tokens_per_s"], "model_flops_per_s": achieved, "mfu_vs_measured_peak": mfu,
        "mfu_vs_h200_datasheet": achieved / H200_BF16_DENSE_PEAK, "peak_memory_gib": memory,
        "time_teacher_share": consumed.get("time_teacher_share"), "flops_teacher_share": consumed.get("flops_teacher_share"),
        "sdpa_kernels": kernels, "steps": consumed["steps"],
    }  # fmt: skip
    goal = {"none": 0.45, "minilm": 0.40}[strategy] if ctx.device.type == "cuda" else 0.0
    out["ok"] = mfu >= goal
    datasheet = f"{achieved / H200_BF16_DENSE_PEAK:.1%} of H200 bf16, " if ctx.device.type == "cuda" else ""
    out["figure"] = (
        f"{consumed['tokens_per_s']:,.0f} tok/s, MFU {mfu:.1%} of measured {'bf16' if datasheet else 'fp32'} "
        f"peak (goal {goal:.0%}), {datasheet}mem {memory:.1f} GiB, "
        f"teacher time {consumed.get('time_teacher_share', 0):.0%}, sdpa {','.join(kernels)[:70] or '?'}"
    )
    return out


def check_compile(ctx, strategy: str) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    teacher = str(ctx.big_teacher) if strategy != "none" else None
    common = dict(
        data=str(ctx.big_data), student=ctx.big_student, strategy=strategy, teacher=teacher, dropout=0.0,
        budget=f"{ctx.compile_steps}steps", batch_size=ctx.big_batch, micro_batch_size=ctx.big_batch,
        eval_sequences=ctx.big_batch, eval_batch_size=ctx.big_batch,
    )  # fmt: skip
    eager, _ = pretrain_run(ctx, f"eager-{strategy}", **common)
    original = torch.compile
    if ctx.device.type != "cuda":  # no inductor C++ toolchain needed: the capture is what is checked
        torch.compile = lambda fn, **kw: original(
            fn, backend="aot_eager", **{k: v for k, v in kw.items() if k != "backend"}
        )
    torch._dynamo.reset()
    counters.clear()
    from budgetkd.train import Pretrainer

    graphs_after_warm_up = {}
    original_step = Pretrainer.train_step

    def counting_step(self, step, lr):
        if step == 1 and not graphs_after_warm_up:
            graphs_after_warm_up.update(counters["stats"])
        return original_step(self, step, lr)

    Pretrainer.train_step = counting_step
    try:
        compiled, _ = pretrain_run(ctx, f"compiled-{strategy}", compile=True, **common)
    finally:
        torch.compile = original
        Pretrainer.train_step = original_step
    graphs = int(counters["stats"].get("unique_graphs", 0))
    new_graphs = graphs - int(graphs_after_warm_up.get("unique_graphs", 0))
    breaks = int(sum(counters["graph_break"].values()))
    diff = rel_diff([compiled["final_val_mlm_loss"] if "final_val_mlm_loss" in compiled else compiled["val_mlm_loss"]],
                    [eager["final_val_mlm_loss"] if "final_val_mlm_loss" in eager else eager["val_mlm_loss"]])  # fmt: skip
    speed = compiled["consumed"]["tokens_per_s"] / eager["consumed"]["tokens_per_s"]
    # the MFU of the default CUDA path (compile on since issue 22), same peak as throughput:*
    mfu = compiled["consumed"]["flops"] / compiled["consumed"]["time_s"] / ctx.peak
    tol = 2e-2 if ctx.device.type == "cuda" else 1e-4
    return {
        "ok": diff <= tol and new_graphs == 0,
        "figure": f"val loss rel diff {diff:.1e} (tol {tol:.0e}), {speed:.2f}x eager tok/s, MFU {mfu:.1%}, "
        f"graphs {graphs} ({new_graphs} after warm-up), graph breaks {breaks}",
        "speedup": speed, "mfu_vs_measured_peak": mfu, "graphs": graphs,
        "recompiles_after_warm_up": new_graphs, "graph_breaks": breaks,
        "graph_break_reasons": list(counters["graph_break"])[:5],
    }  # fmt: skip


# -- running, recording, reporting ----------------------------------------------------------------
class Recorder:
    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _alarm(signum, frame):
    raise CheckTimeout


def run_check(recorder: Recorder, name: str, fn, box_s: float, deadline: float) -> dict:
    box = min(box_s, deadline - time.monotonic())
    started = time.monotonic()
    if box < 1:
        record = {"check": name, "status": "SKIP", "figure": "no time left before the deadline"}
    else:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, box)
        try:
            result = fn()
            if "skip" in result:
                record = {"check": name, "status": "SKIP", "figure": result.pop("skip")}
            else:
                record = {"check": name, "status": "PASS" if result.pop("ok") else "FAIL", **result}
        except CheckTimeout:
            record = {"check": name, "status": "ERROR", "figure": f"timed out after {box:.0f} s"}
        except Exception as exc:  # one failed path must not hide the others' figures
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            record = {"check": name, "status": "ERROR", "figure": f"{type(exc).__name__}: {first}"}
            record["traceback"] = traceback.format_exc()[-3000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    record["wall_s"] = round(time.monotonic() - started, 1)
    recorder.write(record)
    print(f"[{record['wall_s']:6.1f} s] {record['status']:5s} {name}: {record['figure']}", flush=True)
    return record


def table(path: Path) -> str:
    lines = ["", f"{'check':<18} {'result':<6} figure", "-" * 100]
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "check" in r:
            lines.append(f"{r['check']:<18} {r['status']:<6} {r['figure']}")
    return "\n".join(lines)


class Context:
    pass


def setup(args) -> Context:
    ctx = Context()
    ctx.work = args.out / "work"
    shutil.rmtree(ctx.work, ignore_errors=True)
    ctx.work.mkdir(parents=True)
    cpu = args.cpu
    ctx.device = torch.device("cpu" if cpu else "cuda")
    # the small shapes of the correctness checks (both devices run them)
    ctx.small_vocab, ctx.small_seq = (64, 32) if cpu else (512, 64)
    ctx.small_batch = 8 if cpu else 32
    ctx.small_student = {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64} if cpu else {
        "layers": 2, "hidden": 128, "heads": 4, "intermediate": 512}  # fmt: skip
    ctx.teacher_arch = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128} if cpu else {
        "layers": 4, "hidden": 256, "heads": 4, "intermediate": 1024}  # fmt: skip
    ctx.teacher_steps, ctx.teacher_batch = (100, 16) if cpu else (400, 64)
    ctx.small_data = make_language(
        ctx.work / "small", ctx.small_vocab, ctx.small_seq, 2048 if cpu else 16384, 64
    )
    ctx.small_teacher = None  # set by the learn check; a random one if it fails
    # the throughput shapes (the paper's on the GPU)
    ctx.big_vocab, ctx.big_seq, ctx.big_batch = (128, 32, 16) if cpu else (30522, 128, 256)
    ctx.big_student = ctx.small_student if cpu else "bert-6l-768"
    ctx.throughput_steps = 4 if cpu else 20
    ctx.compile_steps = 3 if cpu else 10
    ctx.big_data = make_language(
        ctx.work / "big", ctx.big_vocab, ctx.big_seq, 512 if cpu else 256 * 40, 64, seed=1
    )
    ctx.big_teacher = random_model(
        ctx.work, ctx.big_data, ctx.teacher_arch if cpu else "bert-12l-768", "big-teacher"
    )
    ctx.glue_examples = 48 if cpu else 512
    ctx.peak = matmul_peak(ctx.device, 512 if cpu else 8192, torch.float32 if cpu else torch.bfloat16)
    return ctx


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    parser.add_argument("--cpu", action="store_true", help="CPU, small shapes: rehearse the script")
    parser.add_argument("--deadline-s", type=float, default=450.0, help="stop starting checks after this")
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks (names or prefixes)")
    parser.add_argument("--table", action="store_true", help="print the table of OUT/gpu_check.json and exit")
    args = parser.parse_args(argv)
    path = args.out / "gpu_check.json"
    if args.table:
        print(table(path))
        return 0
    started = time.monotonic()
    deadline = started + args.deadline_s
    args.out.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(path)
    if not args.cpu and not torch.cuda.is_available():
        recorder.write({"check": "cuda", "status": "FAIL", "figure": "CUDA is not available (use --cpu)"})
        print(table(path))
        return 1
    import transformers

    if not args.cpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as budgetkd trains
    if args.cpu:
        torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared machine
    ctx = setup(args)
    recorder.write({
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
            "device": torch.cuda.get_device_name(0) if ctx.device.type == "cuda" else "cpu",
            "measured_peak_flops": ctx.peak, "peak_dtype": "fp32" if args.cpu else "bf16",
            "setup_s": round(time.monotonic() - started, 1), "datasets_imported": sys.modules.get("datasets") is not None,
        }
    })  # fmt: skip
    checks = [("learn", lambda: check_learn(ctx), 90)]
    checks += [(f"agree:{s}", lambda s=s: check_agree(ctx, s), 40) for s in STRATEGIES]
    checks += [(f"bf16:{s}", lambda s=s: check_bf16(ctx, s), 30) for s in ("none", "minilm")]
    checks += [("accum", lambda: check_accum(ctx), 40), ("ddp-1-rank", lambda: check_ddp(ctx), 40)]
    checks += [("prefetcher", lambda: check_prefetcher(ctx), 20), ("resume", lambda: check_resume(ctx), 60)]
    # the throughput shapes last: the correctness checks above are small and fast
    checks += [(f"throughput:{s}", lambda s=s: check_throughput(ctx, s), 75) for s in ("none", "minilm")]
    checks += [("glue", lambda: check_glue(ctx), 60)]
    checks += [(f"compile:{s}", lambda s=s: check_compile(ctx, s), 120) for s in ("none", "minilm")]
    results = []
    for name, fn, box in checks:
        if args.only and not any(name == o or name.startswith(o + ":") for o in args.only):
            continue
        if name != "learn" and ctx.small_teacher is None:
            ctx.small_teacher = random_model(ctx.work, ctx.small_data, ctx.teacher_arch, "small-teacher")
        # the boxes are sized for the GPU; the CPU rehearsal may run on a busy machine
        results.append(run_check(recorder, name, fn, box * (4 if args.cpu else 1), deadline))
    recorder.write({"total_s": round(time.monotonic() - started, 1)})
    shutil.rmtree(ctx.work, ignore_errors=True)
    print(table(path))
    print(f"total {time.monotonic() - started:.0f} s; results in {path}")
    return 0 if all(r["status"] in ("PASS", "SKIP") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
