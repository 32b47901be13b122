"""The CUDA paths CPU tests cannot reach, and throughput at the paper's shapes, on one GPU.

Run by ``benchmarks/gpu_check.sh`` (``PYTHONPATH=src``, no ``datasets`` needed: the data and
the teacher are synthetic — random token ids with a generated 30,522-entry WordPiece vocabulary,
and a BERT-base-shaped teacher with random weights; speed does not depend on their content).

Checks, each one line in ``OUT/gpu_check.json`` (``ok``, figures, or the error's first line):

1. ``pretrain:<strategy>`` — budgetkd's real loop on CUDA (bf16 autocast for teacher and
   student, the background prefetcher with pinned memory, fused AdamW) at the paper's shapes:
   6L-768 student, BERT-base teacher, micro-batch 128, seq_len 128; tokens/s, achieved
   model FLOP/s (the run's own analytic count ÷ charged time) and MFU against the measured
   bf16 matrix-multiply peak of this GPU (and the H200's dense bf16 datasheet peak, 989 TFLOP/s);
2. ``compile`` — the same No-KD run with ``compile=True``;
3. ``ddp-1-rank`` — a process group of one rank (NCCL) with DDP wrapping forced on, so that
   ``wrap_ddp``/``no_sync``/all-reduce/broadcast run as under torchrun;
4. ``prefetcher`` — pinned, prefetched micro-batches equal the synchronous ones.

``--tiny``: CPU and tiny shapes, to check the script itself anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
import torch

H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA H200 SXM datasheet (dense, no sparsity)


def make_data(root: Path, vocab_size: int, seq_len: int, sequences: int) -> Path:
    """A prepared dataset (budgetkd layout) of random ids and a generated WordPiece vocabulary."""
    from budgetkd.data.tokenizer import bert_tokenizer_from_vocab
    from budgetkd.io import atomic_write_json

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tokenizer = bert_tokenizer_from_vocab(vocab)
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, rows in (("train", sequences), ("valid", 64)):
        ids = rng.integers(len(specials), vocab_size, size=(rows, seq_len), dtype=np.uint16)
        ids[:, 0], ids[:, -1] = 2, 3
        ids.tofile(data / f"{split}.bin")
    tokenizer.save_pretrained(str(data / "tokenizer"))
    atomic_write_json(
        data / "meta.json",
        {
            "format_version": 3,
            "fingerprint": "synthetic",
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "dtype": "uint16",
            "special_ids": {"cls": 2, "sep": 3, "pad": 0, "mask": 4, "all": [0, 1, 2, 3, 4]},
            "num_train_sequences": sequences,
            "num_valid_sequences": 64,
        },
    )
    return data


def make_teacher(root: Path, data: Path, arch: dict, seq_len: int) -> Path:
    from budgetkd.data import PackedData
    from budgetkd.models import create_student, export_student, resolve_architecture

    packed = PackedData(data)
    model = create_student(resolve_architecture(arch), packed.vocab_size, seq_len, packed.special_ids, seed=1)
    export_student(model, packed.load_tokenizer(), root / "teacher")
    return root / "teacher"


def bf16_peak(device: torch.device, size: int = 8192) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def run_pretrain(root: Path, name: str, args, peak: float, **overrides) -> dict:
    from budgetkd.train import TrainConfig, pretrain

    values = dict(
        data=str(args.data),
        out=str(root / "runs" / name),
        student=args.student,
        budget=f"{args.steps}steps",
        batch_size=args.batch,
        micro_batch_size=args.batch,
        num_evals=1,
        eval_sequences=64,
        checkpoint_interval_s=0.0,
        device=args.device,
        progress=False,
    )
    values.update(overrides)
    summary = pretrain(TrainConfig(**values))
    consumed = summary["consumed"]
    achieved = consumed["flops"] / consumed["time_s"]
    return {
        "tokens_per_s": consumed["tokens_per_s"],
        "charged_s": consumed["time_s"],
        "steps": consumed["steps"],
        "model_flops_per_s": achieved,
        "mfu_vs_measured_bf16_peak": achieved / peak if peak == peak else None,
        "mfu_vs_h200_datasheet": achieved / H200_BF16_DENSE_PEAK,
        "teacher_flops_share": consumed.get("flops_teacher_share"),
        "device": summary["device"],
        "val_mlm_loss": summary["val_mlm_loss"],
    }


def check_ddp_one_rank(root: Path, args, peak: float) -> dict:
    """DDP with a group of one: the trainer's multi-process path, forced on."""
    import torch.distributed as dist

    from budgetkd import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    original = distributed.is_distributed
    distributed.is_distributed = lambda: dist.is_initialized()  # a group of one counts here
    try:
        return {
            "backend": backend,
            **run_pretrain(root, "ddp", args, peak, strategy="minilm", teacher=str(args.teacher)),
        }
    finally:
        distributed.is_distributed = original
        dist.destroy_process_group()


def check_prefetcher(args) -> dict:
    from budgetkd.data import MaskingConfig, PackedData, StepBatches
    from budgetkd.distributed import Prefetcher

    data = PackedData(args.data)
    masking = MaskingConfig(vocab_size=data.vocab_size, mask_id=4, special_ids=(0, 1, 2, 3, 4))
    batches = StepBatches(
        data,
        batch_size=args.batch,
        micro_batch_size=args.batch // 2,
        data_seed=0,
        mask_seed=0,
        masking=masking,
    )
    with Prefetcher(batches, start_step=0, pin=True) as prefetcher:
        for step in range(4):
            got, want = prefetcher.get(step), batches.micro_batches(step)
            for a, b in zip(got, want):
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
                if torch.cuda.is_available():
                    assert a.input_ids.is_pinned(), "the prefetched batch is not pinned"
    return {"equal": True, "pinned": torch.cuda.is_available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check")))
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny shapes: check the script")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--only", nargs="*", default=None, help="run only these checks")
    parser.add_argument(
        "--keep-work", action="store_true", help="keep OUT/work (data, teacher) for throughput.py"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        args.device, args.batch, seq_len, vocab, sequences = "cpu", 8, 32, 1000, 256
        args.student = {"layers": 1, "hidden": 32, "heads": 4, "intermediate": 64}
        teacher_arch = {"layers": 2, "hidden": 64, "heads": 4, "intermediate": 128}
        args.steps = args.steps or 2
    else:
        args.device, args.batch, seq_len, vocab, sequences = "cuda", 128, 128, 30522, 128 * 64
        args.student = "bert-6l-768"
        teacher_arch = "bert-12l-768"  # BERT-base shape
        args.steps = args.steps or 20
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    results: dict = {
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "shapes": {
            "student": args.student,
            "teacher": teacher_arch,
            "micro_batch": args.batch,
            "seq_len": seq_len,
        },
        "checks": {},
    }
    started = time.perf_counter()
    args.data = make_data(work, vocab, seq_len, sequences)
    args.teacher = make_teacher(work, args.data, teacher_arch, seq_len)
    peak = bf16_peak(torch.device(args.device))
    results["measured_bf16_matmul_peak"] = peak
    checks = {
        "pretrain:none": lambda: run_pretrain(work, "none", args, peak, strategy="none"),
        "pretrain:vanilla": lambda: run_pretrain(work, "vanilla", args, peak, strategy="vanilla", teacher=str(args.teacher)),
        "pretrain:minilm": lambda: run_pretrain(work, "minilm", args, peak, strategy="minilm", teacher=str(args.teacher)),
        "pretrain:tinybert": lambda: run_pretrain(work, "tinybert", args, peak, strategy="tinybert", teacher=str(args.teacher)),
        "prefetcher": lambda: check_prefetcher(args),
        "ddp-1-rank": lambda: check_ddp_one_rank(work, args, peak),
        "compile": lambda: run_pretrain(work, "compile", args, peak, strategy="none", compile=True),
    }  # fmt: skip
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **check()}
        except Exception as exc:  # one failed path must not hide the others' figures
            result = {
                "ok": False,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
            }
            (args.out / f"{name.replace(':', '-')}.traceback.txt").write_text(traceback.format_exc())
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        results["checks"][name] = result
        print(f"{name}: {json.dumps(result)}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    results["total_s"] = round(time.perf_counter() - started, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        shutil.rmtree(work / "runs", ignore_errors=True)
    print(f"done in {results['total_s']} s; figures in {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
