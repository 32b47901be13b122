"""benchmarks/throughput.py: its checks against hand-made rows, and one tiny run of the script
end to end (every row, two dropout settings) so that the benchmark cannot silently rot. Speed
itself is never asserted here (the figures are the benchmark's output, not a test)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import STUDENT_ARCH

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("budgetkd_throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratios_and_checks_from_hand_made_rows(bench):
    # hf 1000 tok/s; none 2500 tok/s at 10 GFLOP/step; minilm 1000 tok/s at 26 GFLOP/step, of which
    # 15 are the teacher's; vanilla 500 tok/s at 30 GFLOP/step.
    rows = {
        "hf": {
            "row": "hf",
            "tokens_per_s": 1000.0,
            "achieved_flops_per_s": 4e9,
            "model_flops_per_step": 12e9,
        },
        "none": {
            "row": "none",
            "tokens_per_s": 2500.0,
            "achieved_flops_per_s": 5e9,
            "model_flops_per_step": 10e9,
        },
        "minilm": {
            "row": "minilm",
            "tokens_per_s": 1000.0,
            "achieved_flops_per_s": 6e9,
            "model_flops_per_step": 26e9,
            "teacher_flops_per_step": 15e9,
            "teacher_flops_per_s": 10e9,
        },
        "vanilla": {
            "row": "vanilla",
            "tokens_per_s": 500.0,
            "achieved_flops_per_s": 6e9,
            "model_flops_per_step": 30e9,
        },
    }
    bench.finish(rows, peak=10e9)
    assert rows["none"]["speedup_vs_hf"] == pytest.approx(2.5)
    assert rows["minilm"]["kd_slowdown_measured"] == pytest.approx(2.5)
    assert rows["minilm"]["kd_slowdown_flops"] == pytest.approx(2.6)
    assert rows["minilm"]["kd_ratio_error"] == pytest.approx(2.5 / 2.6 - 1)
    assert rows["minilm"]["utilisation"] == pytest.approx(0.6)
    # adjusted: student 11 GFLOP at 5 GFLOP/s + teacher 15 GFLOP at 10 GFLOP/s, over 10/5 → 1.85
    assert rows["minilm"]["kd_slowdown_teacher_adjusted"] == pytest.approx((11 / 5 + 15 / 10) / 2)
    assert rows["vanilla"]["kd_ratio_error"] == pytest.approx(5.0 / 3.0 - 1)
    results = {c["check"]: c for c in bench.checks(rows, min_speedup=2.0, kd_tolerance=0.15)}
    assert results["none vs hf"]["ok"] and results["minilm slowdown vs FLOPs"]["ok"]
    assert not results["vanilla slowdown vs FLOPs"]["ok"]  # +66.7 % off its FLOP prediction
    assert not bench.checks(rows, min_speedup=3.0, kd_tolerance=0.15)[0]["ok"]
    text = bench.format_checks(list(results.values()))
    assert "PASS  none vs hf: 2.50x" in text and "FAIL  vanilla slowdown vs FLOPs: +66.7%" in text


def test_full_forward_rows_put_the_speed_up_beside_its_flop_prediction(bench):
    """minilm-full: 800 tok/s at 30 GFLOP/step; minilm: 1000 tok/s at 26 GFLOP/step → measured
    speed-up 1.25, predicted 30/26 = 1.154, error +8.3 %."""
    rows = {
        "none": {
            "row": "none",
            "tokens_per_s": 2500.0,
            "achieved_flops_per_s": 5e9,
            "model_flops_per_step": 10e9,
        },
        "minilm-full": {
            "row": "minilm-full",
            "tokens_per_s": 800.0,
            "achieved_flops_per_s": 6e9,
            "model_flops_per_step": 30e9,
        },
        "minilm": {
            "row": "minilm",
            "tokens_per_s": 1000.0,
            "achieved_flops_per_s": 6e9,
            "model_flops_per_step": 26e9,
        },
    }
    bench.finish(rows, peak=10e9)
    assert rows["minilm"]["speedup_vs_full"] == pytest.approx(1.25)
    assert rows["minilm"]["speedup_full_flops"] == pytest.approx(30 / 26)
    assert rows["minilm"]["speedup_error"] == pytest.approx(1.25 / (30 / 26) - 1)
    assert rows["minilm-full"]["kd_slowdown_flops"] == pytest.approx(3.0)  # a KD row of its own
    results = {c["check"]: c for c in bench.checks(rows, min_speedup=2.0, kd_tolerance=0.15)}
    assert results["minilm speed-up over full forwards vs FLOPs"]["ok"]
    assert "vs full" in bench.format_table(rows, 10e9)


def test_full_forwards_are_the_old_forwards_and_are_undone(bench):
    from transformers import BertConfig

    from budgetkd.models import Depth
    from budgetkd.strategies import get_strategy

    def config(layers, hidden):
        return BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2)

    strategy = get_strategy("minilm")({}, config(3, 8), config(4, 16))
    with bench.full_forwards():
        assert (strategy.student_depth(), strategy.teacher_depth()) == (Depth(3), Depth(4))
    assert strategy.student_depth() == Depth(2, frozenset("qkv"))


@pytest.mark.slow
def test_the_script_runs_every_row_at_two_dropout_settings(bench, data_dir, teacher_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = [
        "--data", str(data_dir),
        "--student", json.dumps(STUDENT_ARCH),
        "--teacher", str(teacher_dir),
        "--batch-size", "4",
        "--steps", "2",
        "--warmup-steps", "1",
        "--dropout", "0.1", "0",
        "--matmul-size", "128",
        "--eval-sequences", "4",
        "--max-other-cores", "1000",  # never wait for, or throw away, a step on a busy test machine
        "--quiet-wait-s", "0",
        "--json", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert [s["dropout"] for s in result["by_dropout"]] == [0.1, 0.0]
    assert result["rows"] == result["by_dropout"][0]["rows"]
    for setting in result["by_dropout"]:
        rows = setting["rows"]
        assert list(rows) == ["hf", "none", "vanilla", "tinybert", "minilm", "minilmv2"]
        for name, row in rows.items():
            assert row["steps_timed"] == 2 and row["tokens_per_s"] > 0, name
            assert math.isfinite(row["utilisation"]) and row["speedup_vs_hf"] > 0
        for name in ("vanilla", "tinybert", "minilm", "minilmv2"):
            # a KD step does the No-KD student's work plus the teacher's: predicted ratio > 1
            assert rows[name]["kd_slowdown_flops"] > 1.0
            assert rows[name]["flops_teacher_share"] > 0
        assert [c["check"] for c in setting["checks"]][0] == "none vs hf"
        assert len(setting["checks"]) == 5
    printed = capsys.readouterr().out
    assert "student dropout 0.1 (every row)" in printed and "student dropout 0 (every row)" in printed


GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_mode_runs_every_check_without_datasets(tmp_path):
    """benchmarks/gpu_check.py --cpu (the rehearsal of the GPU check, small shapes) in a fresh
    Python where ``import datasets`` fails, as on the GPU machine: every check PASSes or SKIPs,
    each result is one JSON line, and the table is printed last."""
    import subprocess
    import sys

    from conftest import subprocess_env

    blocked = (
        "import runpy, sys; sys.modules['datasets'] = None; "
        f"sys.argv = ['gpu_check.py', '--cpu', '--deadline-s', '1500', '--out', {str(tmp_path)!r}]; "
        f"runpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')"
    )
    env = {**subprocess_env(), "PYTHONPATH": str(GPU_CHECK.parents[1] / "src")}
    proc = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.json").read_text().splitlines()]
    assert records[0]["environment"]["datasets_imported"] is False
    checks = {r["check"]: r for r in records if "check" in r}
    assert {"learn", "accum", "ddp-1-rank", "resume", "glue", "throughput:minilm", "compile:minilm"} <= set(
        checks
    )
    assert all(f"agree:{s}" in checks for s in ("none", "vanilla", "tinybert", "minilm", "minilmv2"))
    assert {r["status"] for r in checks.values()} <= {"PASS", "SKIP"}, [
        (n, r["figure"]) for n, r in checks.items() if r["status"] not in ("PASS", "SKIP")
    ]
    assert checks["bf16:none"]["status"] == "SKIP"  # a GPU-only check says so
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("total") and any(line.startswith("compile:minilm") for line in tail[-5:])
