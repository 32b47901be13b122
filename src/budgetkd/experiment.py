"""``budgetkd compare CONFIG --out DIR``: the study's experiment as resumable stages (SPEC §3, §4).

Stages, in order (each records completion in ``DIR/state.json``)::

    data               corpus → DIR/data (budgetkd prepare)
    teacher            the given checkpoint (checked), or DIR/teacher pretrained by budgetkd; an
                       encoder-only checkpoint gets an MLM head fitted → DIR/teacher (its cost is
                       the teacher's preparation, DIR/teacher/summary.json, charged to no student)
    calibrate          No-KD for the calibration epochs → DIR/runs/<label>; its charged time
                       (or FLOPs) becomes the budget of every other strategy
    pretrain:<label>   every other strategy at that budget → DIR/runs/<label>
    glue:<label>       GLUE for every student → DIR/glue/<label>
    report             DIR/table.{md,csv,tex}, DIR/budget.md, DIR/plots/*.png

Re-running the command resumes: a finished stage is never redone; a killed pretraining stage
continues from its checkpoint; a killed GLUE stage keeps its finished configurations. Each stage
stores a fingerprint of the configuration it depends on (and of its upstream stages); changing it
for a finished stage is refused unless ``--force STAGE`` (which also redoes everything downstream).

Fairness (SPEC §4) is enforced, not promised: every student must start from bit-identical weights
(same init fingerprint), see the same data (same data fingerprint and data-order seed) with the
same optimizer and schedule shape; ``DIR/fairness.json`` records the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path

from budgetkd import distributed as dist_utils
from budgetkd import stages
from budgetkd.budget import Budget
from budgetkd.config import load_experiment
from budgetkd.errors import BudgetKDError
from budgetkd.io import DirectoryLock, atomic_write_json, read_json, sha256_json

STATE_VERSION = 1
# glue config keys added later, with their defaults (see the GLUE stage's fingerprint)
_GLUE_LATER_KEYS = {"stack": "auto", "group_by_length": False, "threads": None, "unpad": True}


class StageBook:
    """``DIR/state.json``: which stages finished, with what configuration fingerprint and result."""

    def __init__(self, out: Path):
        self.path = out / "state.json"
        self.state = (
            read_json(self.path, "experiment state") if self.path.exists() else {"version": STATE_VERSION}
        )
        self.state.setdefault("stages", {})

    def done(self, stage: str, fingerprint: str, forced: set[str]) -> dict | None:
        entry = self.state["stages"].get(stage)
        if entry is None:
            return None
        if stage in forced:
            return None
        if entry["fingerprint"] != fingerprint:
            raise BudgetKDError(
                f"the configuration of finished stage {stage!r} changed; revert it, use another --out, "
                f"or pass --force {stage} to redo it (and what depends on it)"
            )
        return entry["result"]

    def finish(self, stage: str, fingerprint: str, result: dict) -> None:
        self.state["stages"][stage] = {
            "fingerprint": fingerprint,
            "result": result,
            "finished_at": time.time(),
        }
        atomic_write_json(self.path, self.state)

    def forget(self, stage: str) -> None:
        if self.state["stages"].pop(stage, None) is not None:
            atomic_write_json(self.path, self.state)


DATA_FAILED_MARKER = ".data-stage-failed.json"


def launch_id() -> str:
    """What tells this torchrun launch from an earlier one (same on every rank of a launch)."""
    import os

    return ":".join(
        os.environ.get(key, "")
        for key in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    )


def wait_for_stage(
    out: Path, stage: str, fingerprint: str, failed: Path, *, newer_than: float = 0.0, poll_s: float = 2.0
) -> None:
    """Block until ``stage`` is recorded finished with ``fingerprint`` in ``out/state.json``
    (written atomically by rank 0), or raise rank 0's error from the ``failed`` marker of this
    launch. No collective, hence no timeout: preparing 5 B tokens may take hours. ``newer_than``
    (a time): ignore an older record (a forced stage that rank 0 has yet to forget)."""
    state = out / "state.json"
    me = launch_id()
    while True:
        if state.exists():
            try:
                entry = read_json(state, "experiment state").get("stages", {}).get(stage)
            except BudgetKDError:
                entry = None  # being replaced right now: read it again
            if (
                entry is not None
                and entry.get("fingerprint") == fingerprint
                and entry.get("finished_at", 0.0) >= newer_than
            ):
                return
        if failed.exists():
            try:
                record = read_json(failed, "failure marker")
            except BudgetKDError:
                record = {}
            if record.get("launch") == me:
                raise BudgetKDError(f"rank 0 failed in stage {stage}: {record.get('error')}")
        time.sleep(poll_s)


class Experiment:
    """The stages of one experiment, run in order (module docstring). Which runs exist, their
    budgets and their TrainConfigs come from :mod:`budgetkd.stages` — the same derivation the
    dry-run plan prices."""

    def __init__(
        self,
        cfg: dict,
        out: Path,
        force: list[str] | None = None,
        progress: bool = True,
        allow_unfair: bool = False,
    ):
        self.cfg = cfg
        self.allow_unfair = allow_unfair
        self.out = out
        self.progress = progress
        self.is_main = dist_utils.rank() == 0
        self.started = time.time()
        self.forced = stages.expand_forced(cfg, list(force or []))
        self.labels = [s["label"] for s in cfg["strategies"]]
        self.student_ids = stages.student_ids(cfg)
        # a dataset prepared once (data.prepared) is used in place; otherwise DIR/data
        prepared = cfg["data"].get("prepared")
        self.data_dir = Path(prepared) if prepared else out / "data"
        self.summaries: dict[str, dict] = {}
        self.student_runs: dict[str, Path] = {}
        self.fp: dict[str, str] = {}  # upstream fingerprints: data, teacher, budget
        self.teacher_path: str | None = None
        self.budget: str | None = None

    def run(self) -> dict:
        """The stage list, in order; every rank runs the training stages and takes GLUE jobs,
        rank 0 writes the report."""
        self.book = self._open()
        self.data_stage()
        self.teacher_stage()
        self.calibrate_stage()
        self.pretrain_stages()
        fairness = self._check_fairness(self.summaries)
        self.glue_stage()
        if not self.is_main:
            return {}
        return self.report_stage(fairness)

    # -- helpers --------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"[compare] {message}", flush=True)

    def _open(self) -> StageBook:
        """``DIR/state.json``; forced stages are forgotten and their outputs deleted before any
        work (killed midway, a plain re-run redoes them instead of trusting outputs that are gone)."""
        self.out.mkdir(parents=True, exist_ok=True)
        book = StageBook(self.out)
        if self.is_main:
            for stage in sorted(self.forced):
                book.forget(stage)
                for path in self._stage_outputs(stage):
                    if path.exists():
                        shutil.rmtree(path)
            # The record of a finished experiment is replaced only once this configuration has
            # passed every stage's fingerprint check (just before the report), never by a refused one.
            if not (self.out / "experiment.json").exists():
                atomic_write_json(self.out / "experiment.json", self.cfg)
        return book

    def _stage_outputs(self, stage: str) -> list[Path]:
        kind, _, label = stage.partition(":")
        if kind in ("data", "teacher"):
            return [self.out / kind]
        if kind == "pretrain" and label:
            return [self.out / "runs" / label]
        if kind == "glue" and label:
            return [self.out / "glue" / label]
        return []

    def _pretrain(self, config, stage: str) -> dict:
        """Run or resume one pretraining run directory; a finished one is read back."""
        from budgetkd.train import pretrain

        run_dir = Path(config.out)
        summary_path = run_dir / "summary.json"
        if stage in self.forced and self.is_main and run_dir.exists():
            shutil.rmtree(run_dir)
        dist_utils.barrier()
        if summary_path.exists():
            summary = read_json(summary_path, "run summary")
            if summary.get("finished"):
                return summary
        resume = (run_dir / "checkpoint.pt").exists()
        if resume:
            self._say(f"{stage}: resuming {run_dir}")
        return pretrain(config, resume=resume)

    # -- data -----------------------------------------------------------------------------------
    def data_stage(self) -> None:
        data_cfg = self.cfg["data"]
        if data_cfg.get("prepared"):
            # prepared once, shared: its tokenizer and seq_len were checked by the preflight; its
            # content fingerprint stands for the data (a moved directory is the same data)
            meta = read_json(self.data_dir / "meta.json", "dataset metadata (meta.json)")
            fp = sha256_json({"prepared": meta["fingerprint"], "seed": self.cfg["seed"]})
            if self.book.done("data", fp, self.forced) is None and self.is_main:
                self._say(f"stage data: using the prepared dataset {self.data_dir}")
                result = {"fingerprint": meta["fingerprint"], "sequences": meta["num_train_sequences"]}
                self.book.finish("data", fp, result)
        else:
            tokenizer, train_vocab = self._tokenizer()
            fp = sha256_json({"data": data_cfg, "tokenizer": tokenizer, "seed": self.cfg["seed"]})
            if self.book.done("data", fp, self.forced) is None:
                self._prepare_data(data_cfg, tokenizer, train_vocab, fp, self.book)
        self.fp["data"] = fp
        self.book = StageBook(self.out)

    def _tokenizer(self) -> tuple[str | None, int | None]:
        """(tokenizer path or hub id, vocabulary size to train) of the data stage."""
        tokenizer = self.cfg["data"]["tokenizer"]
        if isinstance(tokenizer, dict):
            return None, tokenizer["train"]
        if tokenizer == "teacher":
            return self.cfg["teacher"]["path"], None
        return tokenizer, None

    def _prepare_data(self, data_cfg: dict, tokenizer, train_vocab, fp_data: str, book: StageBook) -> None:
        """Rank 0 prepares the corpus (with every core); under torchrun the other ranks poll for
        the finished stage instead of waiting in a collective, whose timeout (30 min) a corpus
        of billions of tokens outlasts. A failure on rank 0 is written to a marker file that the
        others turn into the same one-line error."""
        from budgetkd.data import prepare_dataset

        self._say("stage data: preparing the corpus")
        marker = self.out / DATA_FAILED_MARKER
        if not self.is_main:
            # a forced stage's old record may still be there: only one finished by this launch counts
            newer = self.started - 60.0 if "data" in self.forced else 0.0
            wait_for_stage(self.out, "data", fp_data, marker, newer_than=newer)
            return
        marker.unlink(missing_ok=True)
        if "data" in self.forced and (self.out / "data").exists():
            shutil.rmtree(self.out / "data")
        try:
            meta = prepare_dataset(
                data_cfg["inputs"], self.out / "data", tokenizer=tokenizer, train_tokenizer=train_vocab,
                seq_len=data_cfg["seq_len"], validation_fraction=data_cfg["validation_fraction"],
                seed=self.cfg["seed"], progress=self.progress,
            )  # fmt: skip
        except BaseException as exc:
            if dist_utils.world_size() > 1 or dist_utils.launched_by_torchrun():
                atomic_write_json(marker, {"launch": launch_id(), "error": str(exc) or type(exc).__name__})
            raise
        book.finish(
            "data", fp_data, {"fingerprint": meta["fingerprint"], "sequences": meta["num_train_sequences"]}
        )

    # -- teacher --------------------------------------------------------------------------------
    def teacher_stage(self) -> None:
        teacher_cfg = self.cfg["teacher"]
        if teacher_cfg is None:
            self.fp["teacher"] = "none"
            return
        fit = self._head_fit_block(teacher_cfg)
        # Without a head to fit the fingerprint is the one of a plain path (older experiments
        # resume); a fitted head's settings, and the decision to fit one, are part of it.
        fp = sha256_json(
            {
                "teacher": {k: v for k, v in teacher_cfg.items() if k != "fit_mlm_head"},
                "data": self.fp["data"],
            }
            if fit is None
            else {"teacher": teacher_cfg, "fit_mlm_head": fit, "data": self.fp["data"]}
        )
        result = self.book.done("teacher", fp, self.forced)
        if result is None:
            if "path" in teacher_cfg and fit is not None:
                result = self._fit_teacher_head(teacher_cfg["path"], fit)
            elif "path" in teacher_cfg:
                self._say(f"stage teacher: checking {teacher_cfg['path']}")
                self._check_teacher_logits(teacher_cfg)
                result = {"path": teacher_cfg["path"]}
            else:
                block = teacher_cfg["pretrain"]
                self._say(f"stage teacher: pretraining a {block['student']} teacher for {block['budget']}")
                config = stages.teacher_train_config(self.cfg, self.data_dir, self.out, self.progress)
                summary = self._pretrain(config, "teacher")
                result = {
                    "path": str(self.out / "teacher" / "model"),
                    "val_mlm_loss": summary["val_mlm_loss"],
                }
            if self.is_main:
                self.book.finish("teacher", fp, result)
        self.fp["teacher"] = fp
        self.teacher_path = result["path"]

    # -- calibration ----------------------------------------------------------------------------
    def calibrate_stage(self) -> None:
        """No-KD for the calibration epochs; its charged time (or FLOPs) becomes every budget."""
        cal = self.cfg["budget"].get("calibrate")
        if cal is None:
            self.budget = self.cfg["budget"]["explicit"]
            self.fp["budget"] = sha256_json({"explicit": self.budget})
            return
        strategy = stages.calibration(self.cfg)
        config = stages.calibration_train_config(self.cfg, self.data_dir, self.out, self.progress)
        fp = sha256_json({"train": config.identity(), "data": self.fp["data"], "calibrate": cal})
        result = self.book.done("calibrate", fp, self.forced)
        if result is None:
            self._say(f"stage calibrate: {strategy['name']} for {cal['epochs']:g} epoch(s) sets the budget")
            consumed = self._pretrain(config, "calibrate")["consumed"]
            amount = consumed["time_s"] if cal["currency"] == "time" else consumed["flops"]
            budget = f"{amount!r}s" if cal["currency"] == "time" else f"{amount!r}flops"
            result = {"budget": budget, "run": str(Path(config.out)), "label": strategy["label"]}
            if self.is_main:
                self.book.finish("calibrate", fp, result)
        self.budget = result["budget"]
        self.summaries[result["label"]] = read_json(Path(result["run"]) / "summary.json", "run summary")
        self.fp["budget"] = fp
        self._say(f"budget: {self.budget} (calibrated on {cal['epochs']:g} epoch(s) of {cal['strategy']})")

    # -- pretraining of every other strategy (in a sweep: every strategy at every point) ----------
    def pretrain_stages(self) -> None:
        charge = self._teacher_charge()
        runs = stages.student_runs(self.cfg, self.out, Budget.parse(self.budget), charge)
        for run in runs:
            if run.reuse:
                self.summaries[run.id] = self.summaries[run.reuse]
                continue
            config = stages.run_train_config(
                self.cfg, self.data_dir, run, self.teacher_path, charge, self.progress
            )
            fp = sha256_json(
                {"train": config.identity(), "budget": self.fp["budget"], "teacher": self.fp["teacher"],
                 "data": self.fp["data"]}
            )  # fmt: skip
            result = self.book.done(run.stage, fp, self.forced)
            if result is None:
                self._say(f"stage {run.stage}: {run.strategy['name']} for {run.budget.exact_text()}")
                _check_branch_point(run)
                self._pretrain(config, run.stage)
                result = {"run": str(run.run_dir)}
                if self.is_main:
                    self.book.finish(run.stage, fp, result)
            self.summaries[run.id] = read_json(Path(result["run"]) / "summary.json", "run summary")
        self.student_runs = {r.id: r.run_dir for r in runs}
        if self.cfg["budget"].get("sweep") and self.is_main:
            self._write_sweep_record(runs, charge)

    def _teacher_charge(self) -> dict:
        """What each KD student pays for the teacher beyond its steps; written to teacher_cost.json."""
        pretraining = None
        spec = self.cfg["teacher_cost"]
        if spec["mode"] == "amortized" and spec["pretraining"] == "auto":
            consumed = read_json(self.out / "teacher" / "summary.json", "teacher run summary")["consumed"]
            pretraining = {"time_s": consumed["time_s"], "flops": consumed["flops"], "source": "auto"}
        charge = stages.teacher_charge(self.cfg, pretraining)
        if self.is_main:
            atomic_write_json(self.out / "teacher_cost.json", charge)
        return charge

    def _write_sweep_record(self, runs: list[stages.StudentRun], charge: dict) -> None:
        """``DIR/sweep.json``: every point of every strategy, for the sweep report."""
        record = {
            "schedule": self.cfg["budget"]["schedule"],
            "decay_fraction": self.cfg["budget"]["decay_fraction"],
            "currency": runs[0].budget.currency,
            "teacher_cost": charge,
            "points": [tag for tag, _ in stages.sweep_points(self.cfg, None)],
            "students": {
                r.id: {
                    "label": r.strategy["label"], "strategy": r.strategy["name"],
                    "tag": stages.base_id(r.id)[0].split("@", 1)[1], **({"pretrain_seed": r.seed} if r.seed else {}),
                    "budget": r.budget.exact_text(), "amount": r.budget.amount, "point_amount": r.point,
                    "run": str(r.run_dir), "schedule": {k: v for k, v in r.schedule.items() if k != "snapshots"},
                }
                for r in runs
            },
        }  # fmt: skip
        atomic_write_json(self.out / "sweep.json", record)

    # -- GLUE -----------------------------------------------------------------------------------
    def glue_stage(self) -> None:
        """Every rank takes jobs (student × task × configuration group × seed) through the files
        of the ledger (budgetkd.glue.ledger); no collective is held open during the hours of GLUE:
        after one barrier (rank 0 has deleted forced outputs) the process group is closed, and
        rank 0 waits for the last job by polling the run files."""
        dist_utils.barrier()
        dist_utils.destroy()
        self.book = StageBook(self.out)  # rank 0's view, re-read after the barrier
        glue_cfg = self.cfg["glue"]
        # keys added after the first release count only when set, so finished stages stay finished
        identity = {
            k: v for k, v in glue_cfg.items() if k not in _GLUE_LATER_KEYS or v != _GLUE_LATER_KEYS[k]
        }
        pending = []
        for sid in self.student_ids:
            summary = self.summaries[sid]
            fp = sha256_json(
                {"glue": identity, "model": summary["init_fingerprint"], "run": summary["consumed"]}
            )
            if self.book.done(f"glue:{sid}", fp, self.forced if self.is_main else set()) is None:
                pending.append((sid, f"glue:{sid}", fp))
        if pending:
            self._run_glue(pending)

    def _run_glue(self, pending: list[tuple[str, str, str]]) -> None:
        from budgetkd.glue.pipeline import finish_glue, plan_glue, run_plans

        glue_cfg = self.cfg["glue"]
        with contextlib.ExitStack() as lock:
            plans = []
            for sid, stage, _ in pending:
                run_dir = self.student_runs.get(sid, self.out / "runs" / sid)
                self._say(f"stage {stage}: fine-tuning {run_dir / 'model'}")
                plans.append(
                    plan_glue(
                        run_dir / "model", self.out / "glue" / sid, glue_dir=glue_cfg["dir"],
                        hub=glue_cfg["dir"] is None, tasks=glue_cfg["tasks"], grid=glue_cfg["grid"],
                        epochs=glue_cfg["epochs"], seeds=glue_cfg["seeds"],
                        max_train_examples=glue_cfg["max_train_examples"],
                        max_eval_examples=glue_cfg["max_eval_examples"], save_predictions=glue_cfg["save_predictions"],
                        device=glue_cfg["device"], threads=glue_cfg["threads"],
                        stack=None if glue_cfg["stack"] == "auto" else glue_cfg["stack"],
                        group_by_length=glue_cfg["group_by_length"], unpad=glue_cfg["unpad"], label=sid, lock=lock if self.is_main else None,
                    )
                )  # fmt: skip
            run_plans(plans, progress=self.progress)
            if self.is_main:
                for plan, (_, stage, fp) in zip(plans, pending):
                    glue = finish_glue(plan)
                    self.book.finish(
                        stage, fp, {"glue": str(plan.out / "glue.json"), "average": glue.get("average")}
                    )

    # -- report ---------------------------------------------------------------------------------
    def report_stage(self, fairness: dict) -> dict:
        from budgetkd.report import write_report

        self._say("stage report: writing tables and plots")
        atomic_write_json(self.out / "experiment.json", self.cfg)
        sweep = bool(self.cfg["budget"].get("sweep"))
        if sweep:
            from budgetkd.sweep_report import write_sweep_report

            paths = write_sweep_report(self.out, allow_unfair=self.allow_unfair)
        else:
            paths = write_report(self.out, allow_unfair=self.allow_unfair)
        self.book.finish("report", sha256_json({"time": time.time()}), {"files": [str(p) for p in paths]})
        atomic_write_json(self.out / "fairness.json", fairness)
        self._say(f"done: {self.out / ('sweep.md' if sweep else 'table.md')}")
        return {"fairness": fairness, "report": [str(p) for p in paths]}

    # -- the teacher's MLM head ------------------------------------------------------------------
    def _needs_logits(self) -> list[str]:
        from budgetkd.strategies import REGISTRY

        return [s["label"] for s in self.cfg["strategies"] if REGISTRY[s["name"]].needs_teacher_logits]

    def _head_fit_block(self, teacher_cfg: dict) -> dict | None:
        """The ``fit_mlm_head`` settings to apply, or None when no head is fitted: null fits one
        when a strategy needs logits and the teacher is encoder-only (read from its checkpoint)."""
        from budgetkd.teacher_head import HEAD_DEFAULTS

        block = teacher_cfg.get("fit_mlm_head")
        if "path" not in teacher_cfg or block is False:
            return None
        if isinstance(block, dict):
            return block
        if not self._needs_logits():
            return None
        from budgetkd.models import load_teacher

        if load_teacher(teacher_cfg["path"]).has_mlm_head:
            return None
        return dict(HEAD_DEFAULTS)

    def _check_teacher_logits(self, teacher_cfg: dict) -> None:
        """An encoder-only teacher with ``fit_mlm_head: false`` is refused here, before any
        student trains, when a strategy needs its logits."""
        from budgetkd.models import load_teacher

        teacher = load_teacher(teacher_cfg["path"])
        needing = self._needs_logits()
        if needing and not teacher.has_mlm_head:
            raise BudgetKDError(
                f"strategy {needing[0]!r} needs teacher logits, but {teacher_cfg['path']} is an encoder-only "
                "checkpoint and teacher.fit_mlm_head is false; remove it (a head is then fitted) or drop "
                f"{needing[0]!r}"
            )

    def _fit_teacher_head(self, path: str, block: dict) -> dict:
        """Fit an MLM head on the frozen encoder → DIR/teacher/model, DIR/teacher/summary.json.

        Its cost is the teacher's preparation: recorded here and in the summary, charged to no
        student. Rank 0 fits it (a few minutes; the encoder is frozen, so there is nothing to
        data-parallelise worth a collective) while the other ranks wait at the barrier.
        """
        from budgetkd.teacher_head import HeadFitConfig, fit_mlm_head

        out = self.out / "teacher"
        self._say(
            f"stage teacher: fitting an MLM head on {path} for {block['budget']} (not charged to students)"
        )
        if self.is_main:
            if out.exists():
                shutil.rmtree(out)  # a killed fit restarts: it is short and has no checkpoint
            config = HeadFitConfig.from_block(
                block,
                seed=self.cfg["seed"] + 2000,
                device=self.cfg["training"]["device"],
                progress=self.progress,
            )
            summary = fit_mlm_head(path, self.data_dir, out, config)
            self._say(
                f"teacher head: validation MLM loss {summary['initial_val_mlm_loss']:.3f} → "
                f"{summary['val_mlm_loss']:.3f} (unigram {summary['unigram_val_mlm_loss']:.3f}) in "
                f"{summary['consumed']['steps']} steps, {summary['consumed']['time_s']:.0f}s"
            )
        dist_utils.barrier()
        summary = read_json(out / "summary.json", "teacher head summary")
        return {
            "path": str(out / "model"),
            "source": path,
            "fitted_mlm_head": True,
            "summary": str(out / "summary.json"),
            "val_mlm_loss": summary["val_mlm_loss"],
            "unigram_val_mlm_loss": summary["unigram_val_mlm_loss"],
            "preparation": summary["consumed"],
            "charged_to_students": False,
        }

    def _check_fairness(self, summaries: dict[str, dict]) -> dict:
        """SPEC §4: identical initial weights, data, data order and schedule shape, or refuse; and
        each row's training rules (``fairness_rules``), whose differences the report refuses."""
        checks = {}
        seeds = sorted({stages.base_id(label)[1] for label in summaries})  # pretrain_seeds: per seed
        for key in ("init_fingerprint", "data_fingerprint", "data_seed", "batch_size", "world_size"):
            per_seed = key in ("init_fingerprint", "data_seed")  # the others: equal across seeds too
            for seed in seeds if per_seed else [None]:
                values = {label: s.get(key) for label, s in summaries.items()
                          if seed is None or stages.base_id(label)[1] == seed}  # fmt: skip
                if len(set(map(str, values.values()))) > 1:
                    raise BudgetKDError(f"fairness violated: {key} differs between strategies ({values})")
                first = next(iter(values.values()), None)
                checks[key] = (
                    first if seed is None or len(seeds) == 1 else {**checks.get(key, {}), seed: first}
                )
        checks["peak_lr"] = {label: s.get("lr") for label, s in summaries.items()}
        checks["budget"] = {label: s["budget"]["text"] for label, s in summaries.items()}
        rows = summaries
        if self.cfg["budget"].get(
            "sweep"
        ):  # the rows are the sweep points; the calibration only sets the budget
            rows = {label: s for label, s in summaries.items() if label in self.student_runs}
        checks.update(fairness_rules(rows, self.cfg["teacher_cost"]["mode"]))
        checks["ok"] = not checks["differs"]
        if self.is_main:
            atomic_write_json(self.out / "fairness.json", checks)
        return checks


RULES = ("schedule", "warmup", "lr_rule", "data_setting", "teacher_cost")


def fairness_rules(summaries: dict[str, dict], teacher_cost: str) -> dict:
    """Each row's schedule, warm-up, peak-LR rule, data setting and teacher-cost mode, and the
    ones that differ between rows: ``{"rules": {label: {…}}, "differs": [field, …]}``. A field
    a summary does not record (a run of budgetkd ≤ 0.2) is None, and counts as differing only
    against a recorded value."""
    rules = {
        label: {
            **{k: (s.get("training_rules") or {}).get(k) for k in RULES[:-1]},
            "teacher_cost": teacher_cost,
        }
        for label, s in summaries.items()
    }
    differs = [k for k in RULES if len({json.dumps(r[k]) for r in rules.values()}) > 1]
    return {"rules": rules, "differs": differs}


def _check_branch_point(run: stages.StudentRun) -> None:
    """A wsd branch needs its trunk's snapshot; a trunk that stopped at the data limit (a time
    budget under data_setting: unlimited) may never have reached it: say so, not "cannot read"."""
    start = run.schedule.get("init_from")
    if not start or Path(start).is_file():
        return
    trunk = Path(start).parent.parent
    summary_path = trunk / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path, "run summary")
        if summary.get("stopped_by") == "data limit":
            raise BudgetKDError(
                f"sweep point {run.id} branches from {start}, but its trunk {trunk.name} stopped at the "
                f"data limit (data_setting: unlimited, {summary['consumed']['epochs']:.2f} epoch) before "
                "reaching it; lower the largest point or set data_setting: limited"
            )
    raise BudgetKDError(
        f"sweep point {run.id} branches from {start}, which its trunk {trunk.name} never wrote"
    )


def compare(
    config_path: str | Path,
    out: str | Path,
    *,
    force: list[str] | None = None,
    overrides=None,
    progress: bool = True,
    allow_unfair: bool = False,
) -> dict:
    cfg = load_experiment(config_path, overrides)
    out = Path(out)
    _refuse_foreign(out)
    # Fail before compute: every check that configs, tokenizers and file listings allow, on
    # every rank (each refuses the same way), before any stage writes anything — the dry run's
    # checks and its plan, which refuses what the data limit or the teacher's charge forbids.
    plan = _checked_plan(cfg, out, force)
    # every rank has looked at --out before rank 0 writes into it (its lock, experiment.json's
    # temp file): otherwise a slower rank can take rank 0's first files for a foreign directory
    dist_utils.barrier()
    lock = DirectoryLock(out) if dist_utils.rank() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None and cfg["budget"].get("sweep"):
            from budgetkd.plan import render_plan, write_plan

            print(render_plan(plan), flush=True)
            write_plan(plan, out / "plan.json")
        return Experiment(cfg, out, force=force, progress=progress, allow_unfair=allow_unfair).run()
    finally:
        if lock is not None:
            lock.release()


def _checked_plan(cfg: dict, out: Path, force: list[str] | None) -> dict:
    """The preflight and the plan, built on every rank (each refuses alike), before anything is
    written: a refused compare leaves --out as it was."""
    from budgetkd.plan import build_plan, check_fits_data, preflight

    stages.expand_forced(cfg, list(force or []))  # an unknown --force stage
    resolved = preflight(cfg, out, dist_utils.world_size())
    if dist_utils.rank() == 0:
        for note in resolved.notes:
            print(f"[compare] note: {note}", flush=True)
    plan = build_plan(cfg, out, resolved)
    check_fits_data(plan, resolved.data.exact)
    return plan


def _ours(name: str) -> bool:
    """What a budgetkd process leaves in a fresh --out before experiment.json exists: its lock, a
    dry-run's plan, the write check of ``plan.check_output_dir`` (another rank's, in flight) and
    the temp files of ``io.atomic_write``."""
    return (
        name in (".lock", "plan.json")
        or name.startswith(".budgetkd-write-check-")
        or (name.startswith(".") and name.endswith(".tmp"))
    )


def _refuse_foreign(out: Path) -> None:
    """An existing --out must be empty, a budgetkd experiment, or hold only a dry-run's plan."""
    if out.is_dir() and not any((out / name).exists() for name in ("state.json", "experiment.json")):
        foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
        if foreign:
            raise BudgetKDError(
                f"--out {out} is not empty and holds no budgetkd experiment (found {foreign[0]!r}); "
                "choose a new --out"
            )


def dry_run(
    config_path: str | Path,
    out: str | Path,
    *,
    world_size: int | None = None,
    probe: bool = False,
    assume_tokens_per_s: float | None = None,
    as_json: bool = False,
    overrides=None,
) -> dict:
    """``compare --dry-run``: the checks, then the plan printed and written to ``DIR/plan.json``
    (nothing else is written; no stage runs). ``world_size``: of the launch planned for
    (default: this launch's)."""
    import json
    import os

    from budgetkd.glue.probe import probe_glue
    from budgetkd.plan import build_plan, preflight, probe_throughput, render_plan, write_plan

    cfg = load_experiment(config_path, overrides)
    out = Path(out)
    _refuse_foreign(out)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if dist_utils.launched_by_torchrun() else 1
    if assume_tokens_per_s is not None and not assume_tokens_per_s > 0:
        raise BudgetKDError(f"--assume-tokens-per-s must be positive, got {assume_tokens_per_s}")
    resolved = preflight(cfg, out, world_size)
    measured = probe_throughput(cfg, out, resolved) if probe else None
    glue_rates = probe_glue(cfg, resolved) if probe else None
    plan = build_plan(cfg, out, resolved, tokens_per_s=measured, assumed_tokens_per_s=assume_tokens_per_s,
                      glue_rates=glue_rates)  # fmt: skip
    if dist_utils.rank() == 0:
        print(json.dumps(plan, indent=1, default=str) if as_json else render_plan(plan), flush=True)
        write_plan(plan, out / "plan.json")
    from budgetkd.plan import check_fits_data

    check_fits_data(plan, resolved.data.exact)  # what compare would refuse, the dry run refuses too
    return plan


# -- CLI ------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="redo a finished stage (data, teacher, calibrate, pretrain[:LABEL], glue[:LABEL], report, all)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything, print the plan with its cost (and write DIR/plan.json); run nothing",
    )
    parser.add_argument(
        "--probe",
        action="store_true",
        help="with --dry-run: measure tokens/s with a few uncharged steps each",
    )
    parser.add_argument(
        "--assume-tokens-per-s",
        type=float,
        metavar="N",
        help="with --dry-run: No-KD tokens/s of the whole launch, for the hours of the plan",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        metavar="N",
        help="with --dry-run: plan for N processes (default: this launch)",
    )
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--allow-unfair",
        action="store_true",
        help="write Table 2 even if its rows differ in schedule, warm-up, peak-LR rule, data setting or "
        "teacher-cost mode (fairness.json); the table then says so",
    )


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        if args.world_size is not None and args.world_size <= 0:
            raise BudgetKDError(f"--world-size must be positive, got {args.world_size}")
        dry_run(
            args.config,
            args.out,
            world_size=args.world_size,
            probe=args.probe,
            assume_tokens_per_s=args.assume_tokens_per_s,
            as_json=args.json,
        )
        return 0
    for flag in ("probe", "assume_tokens_per_s", "world_size", "json"):
        if getattr(args, flag) not in (None, False):
            raise BudgetKDError(f"--{flag.replace('_', '-')} goes with --dry-run")
    dist_utils.init_if_launched()
    try:
        compare(
            args.config,
            args.out,
            force=args.force,
            progress=not args.no_progress,
            allow_unfair=args.allow_unfair,
        )
    finally:
        dist_utils.destroy()
    return 0
