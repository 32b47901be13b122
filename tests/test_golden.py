"""The outputs of budgetkd 0.2 (main e867d31, recorded by ``tests/golden/record.py`` before the
schema/stages refactor) against today's. They are identical except for the changes named here:

* config errors: every invalid config is still refused in one line that names the same key; the
  wording is now ``PATH: RULE, got VALUE`` (the texts themselves are pinned in test_experiment);
* plans: the same stages, data, teacher, GLUE and report entries; a pretraining stage's steps,
  tokens and FLOPs now come from the trainer's own meter and step FLOPs (``budgetkd.stages``):
  forwards stop at the depth a loss reads (MiniLM, TinyBERT's last-layer maps), the tokens of a
  prepared dataset are counted (its rows are full: L, not L−1), ``teacher_cost: free`` does not
  charge the teacher's FLOPs, ``amortized`` takes 1/K off every KD budget without a sweep too;
* a calibration's epochs budget trains ⌊E·N/B⌋ full batches (was ⌈E·N/B⌉), so a fresh calibrated
  compare sets a smaller budget and the fingerprint of every student stage trained on it
  (``pretrain:*``, which names the budget) differs; the calibration's own fingerprint does not, so
  a 0.2 directory resumes with its calibration (and its students) as they were;
* ``compare --allow-unfair`` and ``report --allow-unfair`` (issue 20): write a Table 2 whose rows
  differ in a training rule, marked;
* ``glue.unpad`` (default true) and ``glue --padded``: GLUE fine-tunes on packed batches;
* a GLUE stage's ``device_hours``: measured by ``--probe`` (``budgetkd.glue.probe``) or estimated
  from its FLOPs at the tasks' mean lengths (``plan.GLUE_UTILISATION``), no longer the 128-token
  FLOPs at the pretraining rate; new keys ``wall_hours``, ``seconds_by_task``, ``hours_source``
  and the plan's ``glue_throughput`` (its FLOPs, jobs and steps are unchanged);
* ``pretrain --help``: the flags are generated from ``TrainConfig`` (same flags, the field
  descriptions as help); ``budgetkd --help`` lists the new ``schema`` command.

Everything else — resolved shipped configs and stage fingerprints — must be identical: an
experiment directory of 0.2 resumes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
pytestmark = pytest.mark.skipif(
    not (GOLDEN.parents[2] / "shared" / "data").is_dir(), reason="no ../shared/data"
)

import record  # noqa: E402


def golden(name: str):
    return json.loads((GOLDEN / f"{name}.json").read_text())


def as_json(value):
    return json.loads(json.dumps(value, default=str))


def test_every_shipped_config_resolves_as_before():
    """… plus ``glue.unpad: true`` (added since; at its default it is not in a stage fingerprint)."""
    now = as_json(record.shipped_configs())
    now.pop("demo-seeds.yaml")  # shipped since (pretrain_seeds); every other one resolves as in 0.2
    for cfg in now.values():
        assert cfg["glue"].pop("unpad") is True
    assert now == golden("experiments")


def test_stage_fingerprints_are_unchanged_so_old_experiments_resume(tmp_path):
    now, old = record.fingerprints(tmp_path), golden("fingerprints")
    assert set(now) == set(old)
    # the calibrated budget changed (⌊N/B⌋ steps): only the students trained on it differ
    assert now["pretrain:tinybert"] != old["pretrain:tinybert"]
    assert {k: v for k, v in now.items() if k != "pretrain:tinybert"} == {
        k: v for k, v in old.items() if k != "pretrain:tinybert"
    }


def test_every_invalid_config_is_still_refused_naming_its_key():
    now = record.config_errors()
    for case, old in golden("config_errors").items():
        new = now[case]
        assert old is not None and new is not None, case
        assert "\n" not in new
        key = case.split("=", 1)[0].split(".")[-1]
        if key in old:  # a message that named its key still does
            assert key in new, (case, new)


PRICED = ("steps", "tokens", "flops", "flops_per_sequence", "teacher_share", "tokens_per_s", "device_hours",
          "wall_hours", "budget", "what", "epochs")  # fmt: skip


def test_the_plans_have_the_same_stages_and_unchanged_entries_outside_pretraining(tmp_path):
    now = as_json(record.plans(tmp_path))
    for name, old in golden("plans").items():
        new = now[name]
        assert [s["stage"] for s in new["stages"]] == [s["stage"] for s in old["stages"]] or sorted(
            s["stage"] for s in new["stages"]
        ) == sorted(s["stage"] for s in old["stages"]), name
        by_stage = {s["stage"]: s for s in new["stages"]}
        for stage in old["stages"]:
            entry = by_stage[stage["stage"]]
            assert set(stage) <= set(entry), (name, stage["stage"])
            if stage["stage"].startswith(("calibrate", "pretrain:")):
                assert {k: v for k, v in stage.items() if k not in PRICED} == {
                    k: entry[k] for k in stage if k not in PRICED
                }, (name, stage["stage"])
            elif not stage["stage"].startswith("glue:"):
                assert entry == {**entry, **stage}, (name, stage["stage"])
            else:  # GLUE hours: measured by --probe or estimated (module docstring); the rest as before
                assert {k: v for k, v in stage.items() if k != "device_hours"} == {
                    k: entry[k] for k in stage if k != "device_hours"
                }
        for key in (
            "world_size",
            "global_batch",
            "per_process_batch",
            "micro_batch",
            "seq_len",
            "glue_jobs",
            "data",
        ):
            assert new[key] == old[key], (name, key)


def test_no_kd_calibration_of_the_paper_plan_is_priced_as_before(tmp_path):
    """What did not change in the cost model: the calibration's cost per step (full depth, no
    teacher), estimated from the corpus size. What did: its one epoch is ⌊N/B⌋ full batches, not
    ⌈N/B⌉ (issue 20), so it is one step shorter where B does not divide N (as in all three)."""
    now = as_json(record.plans(tmp_path))
    for name in ("paper-6l.yaml", "paper-12l.yaml", "paper-6l-limited.yaml"):
        old = {s["stage"]: s for s in golden("plans")[name]["stages"]}["calibrate"]
        new = {s["stage"]: s for s in now[name]["stages"]}["calibrate"]
        assert new["steps"] == old["steps"] - 1
        assert new["tokens"] * old["steps"] == old["tokens"] * new["steps"]
        assert new["flops"] == pytest.approx(old["flops"] * new["steps"] / old["steps"], rel=1e-12)


def _flags(text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z-]+", text))


def test_help_is_unchanged_but_for_the_generated_pretrain_flags_and_the_schema_command():
    now, old = record.helps(), golden("help")
    assert set(now) == set(old) | {"schema"}
    for command in old:
        if command == "pretrain":  # … and --no-compile: compile is on by default on CUDA (issue 22)
            assert _flags(now[command]) == _flags(old[command]) | {"--no-compile"}
        elif command == "glue":  # … and --padded, the packed batches' way back
            assert now[command].replace("[--padded]", "") != old[command] and _flags(now[command]) == _flags(
                old[command]
            ) | {"--padded"}
        elif command == "demo":  # the same flags; --config's help names demo-seeds too
            assert _flags(now[command]) == _flags(old[command]) and "demo-seeds" in now[command]
        elif command in ("compare", "report"):  # … and --allow-unfair (issue 20)
            assert "--allow-unfair" in now[command] and "--allow-unfair" not in old[command]
            assert _flags(now[command]) == _flags(old[command]) | {"--allow-unfair"}
        elif command == "budgetkd":
            assert now[command].replace("schema", "") != "" and "schema" in now[command]
        else:
            assert now[command] == old[command], command
