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
import shutil
import time
from pathlib import Path

from budgetkd import distributed as dist_utils
from budgetkd.budget import Budget
from budgetkd.config import load_experiment
from budgetkd.errors import BudgetKDError
from budgetkd.io import DirectoryLock, atomic_write_json, read_json, sha256_json

STATE_VERSION = 1
# glue config keys added later, with their defaults (see the GLUE stage's fingerprint)
_GLUE_LATER_KEYS = {"stack": "auto", "group_by_length": False, "threads": None}


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
    def __init__(self, cfg: dict, out: Path, force: list[str] | None = None, progress: bool = True):
        self.cfg = cfg
        self.out = out
        self.progress = progress
        self.is_main = dist_utils.rank() == 0
        self.started = time.time()
        self.forced = set(force or [])
        self.labels = [s["label"] for s in cfg["strategies"]]
        self.student_ids = list(self.labels)
        self.student_runs: dict[str, Path] = {}
        sweep_ids = self._sweep_ids()
        # a dataset prepared once (data.prepared) is used in place; otherwise DIR/data
        prepared = cfg["data"].get("prepared")
        self.data_dir = Path(prepared) if prepared else out / "data"
        valid = (
            {"data", "teacher", "calibrate", "report"}
            | {f"pretrain:{x}" for x in self.labels + sweep_ids}
            | {f"glue:{x}" for x in self.labels + sweep_ids}
        )
        for stage in self.forced:
            if stage not in valid and stage not in ("pretrain", "glue", "all"):
                raise BudgetKDError(
                    f"--force {stage}: no such stage (stages: {', '.join(sorted(valid))}, pretrain, glue, all)"
                )
        self._expand_forced()

    def _expand_forced(self) -> None:
        """Forcing a stage forces everything downstream of it."""
        order = ["data", "teacher", "calibrate", "pretrain", "glue", "report"]
        forced = set(self.forced)
        if "all" in forced:
            forced |= set(order)
        earliest = min(
            (order.index(s.split(":")[0]) for s in forced if s.split(":")[0] in order), default=None
        )
        if earliest is not None:
            for stage in order[earliest + 1 :]:
                if stage in ("pretrain", "glue"):
                    forced |= {f"{stage}:{x}" for x in self.labels}
                else:
                    forced.add(stage)
        for label in self.labels:
            if f"pretrain:{label}" in forced:
                forced.add(f"glue:{label}")
        if "pretrain" in forced:
            forced |= {f"pretrain:{x}" for x in self.labels}
        if "glue" in forced:
            forced |= {f"glue:{x}" for x in self.labels}
        if "calibrate" in forced:
            forced |= {f"pretrain:{x}" for x in self.labels} | {f"glue:{x}" for x in self.labels}
        # a sweep: a strategy's label stands for all its points; with wsd the points of one
        # strategy share a trunk, so redoing one point redoes them all
        wsd = self.cfg["budget"].get("schedule") == "wsd"
        for sid in self._sweep_ids():
            label = sid.split("@")[0]
            points_forced = wsd and any(f.startswith(f"pretrain:{label}@") for f in forced)
            if f"pretrain:{label}" in forced or points_forced:
                forced |= {f"pretrain:{sid}", f"glue:{sid}"}
            if f"pretrain:{sid}" in forced or f"glue:{label}" in forced:
                forced.add(f"glue:{sid}")
        self.forced = forced

    # -- helpers --------------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        if self.is_main:
            print(f"[compare] {message}", flush=True)

    def _train_config(
        self, *, strategy: dict, budget: str, out: Path, teacher: str | None, max_epochs, **extra
    ):
        from budgetkd.strategies import REGISTRY
        from budgetkd.train import TrainConfig

        opt, training = self.cfg["optimizer"], self.cfg["training"]
        kd = REGISTRY[strategy["name"]].needs_teacher
        lr = strategy["lr"] if strategy["lr"] is not None else (opt["lr_kd"] if kd else opt["lr_no_kd"])
        return TrainConfig(
            data=str(self.data_dir),
            out=str(out),
            student=self.cfg["student"],
            strategy=strategy["name"],
            teacher=teacher if kd else None,
            budget=budget,
            batch_size=opt["batch_size"],
            micro_batch_size=opt["micro_batch_size"],
            lr=lr,
            warmup=opt["warmup"],
            weight_decay=opt["weight_decay"],
            adam_betas=tuple(opt["adam_betas"]),
            adam_eps=opt["adam_eps"],
            max_grad_norm=opt["max_grad_norm"],
            seed=self.cfg["seed"],
            dropout=training["dropout"],
            strategy_options=strategy["options"],
            max_epochs=max_epochs,
            fixed_mask_count=training["fixed_mask_count"],
            num_evals=training["num_evals"],
            eval_sequences=training["eval_sequences"],
            checkpoint_interval_s=training["checkpoint_interval_s"],
            checkpoint_every_steps=training["checkpoint_every_steps"],
            on_nonfinite=training["on_nonfinite"],
            device=training["device"],
            progress=self.progress,
            **extra,
        )

    # -- sweeps and the teacher's cost (SPEC §7a) -------------------------------------------------
    def _sweep_points(self, base: Budget | None) -> list[tuple[str, Budget]]:
        """(tag, budget) of every sweep point, smallest first; tags are known from the config alone."""
        sweep = self.cfg["budget"]["sweep"]
        if sweep["kind"] == "budgets":
            from budgetkd.sweep import budget_tags

            return [
                (tag, Budget.parse(text)) for tag, text in zip(budget_tags(sweep["points"]), sweep["points"])
            ]
        points = []
        for multiple in sweep["points"]:
            tag = f"x{multiple:g}"
            if base is None:
                points.append((tag, None))
                continue
            amount = base.amount * multiple
            if base.currency == "steps":
                amount = float(max(1, round(amount)))
            points.append((tag, Budget(base.currency, amount)))
        return points

    def _sweep_ids(self) -> list[str]:
        if not self.cfg["budget"].get("sweep"):
            return []
        tags = [tag for tag, _ in self._sweep_points(None)]
        return [f"{label}@{tag}" for label in self.labels for tag in tags]

    def _teacher_charge(self, book: StageBook) -> dict:
        """What each KD student pays for the teacher beyond its steps; written to teacher_cost.json."""
        from budgetkd.sweep import teacher_charge

        spec = self.cfg["teacher_cost"]
        pretraining = None
        if spec["mode"] == "amortized":
            if spec["pretraining"] == "auto":
                consumed = read_json(self.out / "teacher" / "summary.json", "teacher run summary")["consumed"]
                pretraining = {"time_s": consumed["time_s"], "flops": consumed["flops"], "source": "auto"}
            else:
                given = Budget.parse(spec["pretraining"])
                pretraining = {{"time": "time_s", "flops": "flops"}[given.currency]: given.amount}
        charge = teacher_charge(spec["mode"], pretraining=pretraining, students=spec.get("students"))
        charge["pretraining"] = pretraining
        if self.is_main:
            atomic_write_json(self.out / "teacher_cost.json", charge)
        return charge

    def _write_sweep_record(self, students: list[dict], charge: dict) -> None:
        """``DIR/sweep.json``: every point of every strategy, for the sweep report."""
        record = {
            "schedule": self.cfg["budget"]["schedule"],
            "decay_fraction": self.cfg["budget"]["decay_fraction"],
            "currency": Budget.parse(students[0]["budget"]).currency,
            "teacher_cost": charge,
            "points": [tag for tag, _ in self._sweep_points(None)],
            "students": {
                e["id"]: {
                    "label": e["strategy"]["label"],
                    "strategy": e["strategy"]["name"],
                    "tag": e["id"].split("@", 1)[1],
                    "budget": e["budget"],
                    "amount": Budget.parse(e["budget"]).amount,
                    "point_amount": e["point"],
                    "run": str(e["run"]),
                    "schedule": {k: v for k, v in e["schedule"].items() if k != "snapshots"},
                }
                for e in students
            },
        }
        atomic_write_json(self.out / "sweep.json", record)

    def _charged_budget(self, budget: Budget, kd: bool, charge: dict) -> Budget:
        from budgetkd.sweep import kd_budget_amount

        if not kd or charge["mode"] != "amortized":
            return budget
        return Budget(budget.currency, kd_budget_amount(budget.amount, budget.currency, charge))

    def _students(self, budget: str, calibration_label: str | None, charge: dict) -> list[dict]:
        """Every pretraining run still to do after calibration: one per strategy, or in a sweep one per
        strategy and point. With ``schedule: wsd`` a strategy's largest point is its trunk (it keeps
        snapshots where the smaller points branch off) and the other points continue a snapshot."""
        from budgetkd.strategies import REGISTRY
        from budgetkd.sweep import branch_amount, check_sweep_points

        cfg = self.cfg
        base = Budget.parse(budget)
        schedule, fraction = cfg["budget"]["schedule"], cfg["budget"]["decay_fraction"]
        runs = self.out / "runs"
        entries: list[dict] = []

        def entry(strategy, sid, point_budget, schedule_options, reuse=None, point=None):
            return {
                "id": sid,
                "strategy": strategy,
                "point": (point or point_budget).amount,
                "budget": point_budget.exact_text(),
                "run": runs / (reuse or sid),
                "schedule": schedule_options,
                "reuse": reuse,
            }

        if not cfg["budget"]["sweep"]:
            for strategy in cfg["strategies"]:
                if strategy["label"] == calibration_label:
                    continue
                kd = REGISTRY[strategy["name"]].needs_teacher
                options = {"schedule": schedule, "decay_fraction": fraction} if schedule == "wsd" else {}
                entries.append(
                    entry(strategy, strategy["label"], self._charged_budget(base, kd, charge), options)
                )
            return entries
        points = self._sweep_points(base)
        for strategy in cfg["strategies"]:
            label = strategy["label"]
            kd = REGISTRY[strategy["name"]].needs_teacher
            charged = [(tag, self._charged_budget(b, kd, charge)) for tag, b in points]
            nominal = dict(points)
            if schedule == "linear":
                for tag, point in charged:
                    # the calibration run is this strategy at exactly 1× the budget: reuse it
                    reuse = label if label == calibration_label and tag == "x1" else None
                    entries.append(entry(strategy, f"{label}@{tag}", point, {}, reuse, nominal[tag]))
                continue
            amounts = [b.amount for _, b in charged]
            warmup = cfg["optimizer"]["warmup"] * amounts[0]  # one warm-up for all points: the smallest's
            check_sweep_points(amounts, warmup, fraction)
            wsd = {"schedule": "wsd", "schedule_warmup": warmup, "decay_fraction": fraction}
            trunk_tag, trunk_budget = charged[-1]
            trunk_id = f"{label}@{trunk_tag}"
            snapshots = [branch_amount(a, fraction) for a in amounts[:-1]]
            entries.append(
                entry(
                    strategy,
                    trunk_id,
                    trunk_budget,
                    {**wsd, "snapshots": snapshots},
                    None,
                    nominal[trunk_tag],
                )
            )
            for (tag, point), at in zip(charged[:-1], snapshots):
                start = snapshot_path(runs / trunk_id, at)
                options = {**wsd, "init_from": str(start)}
                entries.append(entry(strategy, f"{label}@{tag}", point, options, None, nominal[tag]))
        return entries

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

    def _stage_outputs(self, stage: str) -> list[Path]:
        kind, _, label = stage.partition(":")
        if kind in ("data", "teacher"):
            return [self.out / kind]
        if kind == "pretrain" and label:
            return [self.out / "runs" / label]
        if kind == "glue" and label:
            return [self.out / "glue" / label]
        return []

    def _prepare_data(self, data_cfg: dict, tokenizer, train_vocab, fp_data: str, book: StageBook) -> None:
        """Rank 0 prepares the corpus (with every core); under torchrun the other ranks poll for
        the finished stage instead of waiting in a collective, whose timeout (30 min) a corpus
        of billions of tokens outlasts. A failure on rank 0 is written to a marker file that the
        others turn into the same one-line error."""
        from budgetkd.data import prepare_dataset

        self._say("stage data: preparing the corpus")
        marker = self.out / DATA_FAILED_MARKER
        if self.is_main:
            marker.unlink(missing_ok=True)
            if "data" in self.forced and (self.out / "data").exists():
                shutil.rmtree(self.out / "data")
            try:
                meta = prepare_dataset(
                    data_cfg["inputs"],
                    self.out / "data",
                    tokenizer=tokenizer,
                    train_tokenizer=train_vocab,
                    seq_len=data_cfg["seq_len"],
                    validation_fraction=data_cfg["validation_fraction"],
                    seed=self.cfg["seed"],
                    progress=self.progress,
                )
            except BaseException as exc:
                if dist_utils.world_size() > 1 or dist_utils.launched_by_torchrun():
                    atomic_write_json(
                        marker, {"launch": launch_id(), "error": str(exc) or type(exc).__name__}
                    )
                raise
            book.finish(
                "data",
                fp_data,
                {"fingerprint": meta["fingerprint"], "sequences": meta["num_train_sequences"]},
            )
        else:
            # a forced stage's old record may still be there: only one finished by this launch counts
            newer = self.started - 60.0 if "data" in self.forced else 0.0
            wait_for_stage(self.out, "data", fp_data, marker, newer_than=newer)

    # -- stages ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        book = StageBook(self.out)
        if self.is_main:
            # Forced stages are forgotten and their outputs deleted before any work: killed midway,
            # a plain re-run redoes them instead of trusting outputs that are gone or stale.
            for stage in sorted(self.forced):
                book.forget(stage)
                for path in self._stage_outputs(stage):
                    if path.exists():
                        shutil.rmtree(path)
            # The record of a finished experiment is replaced only once this configuration has
            # passed every stage's fingerprint check (just before the report), never by a refused one.
            if not (self.out / "experiment.json").exists():
                atomic_write_json(self.out / "experiment.json", cfg)

        # data ----------------------------------------------------------------------------------
        data_cfg = cfg["data"]
        teacher_cfg = cfg["teacher"]
        tokenizer = data_cfg["tokenizer"]
        train_vocab = None
        if isinstance(tokenizer, dict):
            train_vocab, tokenizer = tokenizer["train"], None
        elif tokenizer == "teacher":
            tokenizer = teacher_cfg["path"]
        if data_cfg.get("prepared"):
            # prepared once, shared: its tokenizer and seq_len were checked by the preflight; its
            # content fingerprint stands for the data (a moved directory is the same data)
            from budgetkd.io import read_json as _read

            meta = _read(self.data_dir / "meta.json", "dataset metadata (meta.json)")
            fp_data = sha256_json({"prepared": meta["fingerprint"], "seed": cfg["seed"]})
            if book.done("data", fp_data, self.forced) is None and self.is_main:
                self._say(f"stage data: using the prepared dataset {self.data_dir}")
                book.finish(
                    "data",
                    fp_data,
                    {"fingerprint": meta["fingerprint"], "sequences": meta["num_train_sequences"]},
                )
        else:
            fp_data = sha256_json({"data": data_cfg, "tokenizer": tokenizer, "seed": cfg["seed"]})
            if book.done("data", fp_data, self.forced) is None:
                self._prepare_data(data_cfg, tokenizer, train_vocab, fp_data, book)
        book = StageBook(self.out)

        # teacher -------------------------------------------------------------------------------
        teacher_path = None
        if teacher_cfg is not None:
            fit = self._head_fit_block(teacher_cfg)
            # Without a head to fit the fingerprint is the one of a plain path (older experiments
            # resume); a fitted head's settings, and the decision to fit one, are part of it.
            fp_teacher = sha256_json(
                {"teacher": {k: v for k, v in teacher_cfg.items() if k != "fit_mlm_head"}, "data": fp_data}
                if fit is None
                else {"teacher": teacher_cfg, "fit_mlm_head": fit, "data": fp_data}
            )
            result = book.done("teacher", fp_teacher, self.forced)
            if result is None:
                if "path" in teacher_cfg and fit is not None:
                    result = self._fit_teacher_head(teacher_cfg["path"], fit)
                elif "path" in teacher_cfg:
                    self._say(f"stage teacher: checking {teacher_cfg['path']}")
                    self._check_teacher_logits(teacher_cfg)
                    result = {"path": teacher_cfg["path"]}
                else:
                    from budgetkd.train import TrainConfig

                    block = teacher_cfg["pretrain"]
                    self._say(
                        f"stage teacher: pretraining a {block['student']} teacher for {block['budget']}"
                    )
                    opt = cfg["optimizer"]
                    config = TrainConfig(
                        data=str(self.data_dir),
                        out=str(self.out / "teacher"),
                        student=block["student"],
                        strategy="none",
                        budget=str(block["budget"]),
                        batch_size=block["batch_size"] or opt["batch_size"],
                        micro_batch_size=block["micro_batch_size"],
                        lr=block["lr"],
                        dropout=block["dropout"],
                        seed=cfg["seed"] + 1000,
                        num_evals=cfg["training"]["num_evals"],
                        eval_sequences=cfg["training"]["eval_sequences"],
                        # the teacher is often the longest stage: checkpoint it like the others
                        checkpoint_interval_s=cfg["training"]["checkpoint_interval_s"],
                        checkpoint_every_steps=cfg["training"]["checkpoint_every_steps"],
                        device=cfg["training"]["device"],
                        progress=self.progress,
                    )
                    summary = self._pretrain(config, "teacher")
                    result = {
                        "path": str(self.out / "teacher" / "model"),
                        "val_mlm_loss": summary["val_mlm_loss"],
                    }
                if self.is_main:
                    book.finish("teacher", fp_teacher, result)
            teacher_path = result["path"]
        else:
            fp_teacher = "none"

        # calibration ---------------------------------------------------------------------------
        budget_cfg = cfg["budget"]
        # "unlimited data" binds every strategy alike, No-KD included (SPEC §1)
        max_epochs = 1.0 if cfg["data_setting"] == "unlimited" else None
        by_label = {s["label"]: s for s in cfg["strategies"]}
        summaries: dict[str, dict] = {}
        calibration_label = None
        if "calibrate" in budget_cfg:
            cal = budget_cfg["calibrate"]
            calibration_label = next(
                (s["label"] for s in cfg["strategies"] if s["name"] == cal["strategy"]), None
            )
            strategy = (
                by_label[calibration_label]
                if calibration_label
                else {"name": cal["strategy"], "label": cal["strategy"], "lr": None, "options": {}}
            )
            label = strategy["label"]
            config = self._train_config(
                strategy=strategy,
                budget=f"{cal['epochs']}epochs",
                out=self.out / "runs" / label,
                teacher=None,
                max_epochs=max_epochs,
            )
            fp_cal = sha256_json({"train": config.identity(), "data": fp_data, "calibrate": cal})
            result = book.done("calibrate", fp_cal, self.forced)
            if result is None:
                self._say(
                    f"stage calibrate: {strategy['name']} for {cal['epochs']:g} epoch(s) sets the budget"
                )
                summary = self._pretrain(config, "calibrate")
                consumed = summary["consumed"]
                amount = consumed["time_s"] if cal["currency"] == "time" else consumed["flops"]
                budget = f"{amount!r}s" if cal["currency"] == "time" else f"{amount!r}flops"
                result = {"budget": budget, "run": str(self.out / "runs" / label), "label": label}
                if self.is_main:
                    book.finish("calibrate", fp_cal, result)
            budget = result["budget"]
            summaries[result["label"]] = read_json(Path(result["run"]) / "summary.json", "run summary")
            fp_budget = fp_cal
            self._say(f"budget: {budget} (calibrated on {cal['epochs']:g} epoch(s) of {cal['strategy']})")
        else:
            budget = budget_cfg["explicit"]
            fp_budget = sha256_json({"explicit": budget})

        # pretraining of every other strategy (and, in a sweep, every strategy at every point) --
        charge = self._teacher_charge(book)
        students = self._students(budget, calibration_label, charge)
        for entry in students:
            if entry["reuse"]:
                summaries[entry["id"]] = summaries[entry["reuse"]]
                continue
            strategy, label = entry["strategy"], entry["id"]
            from budgetkd.strategies import REGISTRY

            kd = REGISTRY[strategy["name"]].needs_teacher
            config = self._train_config(
                strategy=strategy,
                budget=entry["budget"],
                out=entry["run"],
                teacher=teacher_path,
                max_epochs=max_epochs,
                **entry["schedule"],
                charge_teacher=not kd or charge["charge_forward"],
            )
            stage = f"pretrain:{label}"
            fp = sha256_json(
                {"train": config.identity(), "budget": fp_budget, "teacher": fp_teacher, "data": fp_data}
            )
            result = book.done(stage, fp, self.forced)
            if result is None:
                self._say(f"stage {stage}: {strategy['name']} for {entry['budget']}")
                _check_branch_point(entry)
                summary = self._pretrain(config, stage)
                result = {"run": str(entry["run"])}
                if self.is_main:
                    book.finish(stage, fp, result)
            summaries[label] = read_json(Path(result["run"]) / "summary.json", "run summary")
        self.student_runs = {e["id"]: Path(e["run"]) for e in students}
        if cfg["budget"].get("sweep") and self.is_main:
            self._write_sweep_record(students, charge)
        self.student_ids = [e["id"] for e in students] if cfg["budget"].get("sweep") else self.labels

        fairness = self._check_fairness(summaries)

        # GLUE ----------------------------------------------------------------------------------
        # Every rank takes jobs (student × task × configuration group × seed) through the files
        # of the ledger (budgetkd.glue.ledger); no collective is held open during the hours of
        # GLUE: after one barrier (rank 0 has deleted forced outputs) the process group is closed,
        # and rank 0 waits for the last job by polling the run files.
        dist_utils.barrier()
        dist_utils.destroy()
        book = StageBook(self.out)  # rank 0's view, re-read after the barrier
        glue_cfg = cfg["glue"]
        # keys added after the first release count only when set, so finished stages stay finished
        glue_identity = {
            k: v for k, v in glue_cfg.items() if k not in _GLUE_LATER_KEYS or v != _GLUE_LATER_KEYS[k]
        }
        pending = []
        for label in self.student_ids:
            stage = f"glue:{label}"
            summary = summaries[label]
            fp = sha256_json(
                {"glue": glue_identity, "model": summary["init_fingerprint"], "run": summary["consumed"]}
            )
            if book.done(stage, fp, self.forced if self.is_main else set()) is None:
                pending.append((label, stage, fp))
        if pending:
            from budgetkd.glue.pipeline import finish_glue, plan_glue, run_plans

            with contextlib.ExitStack() as lock:
                plans = []
                for label, stage, _ in pending:
                    run_dir = self.student_runs.get(label, self.out / "runs" / label)
                    self._say(f"stage {stage}: fine-tuning {run_dir / 'model'}")
                    plans.append(
                        plan_glue(
                            run_dir / "model",
                            self.out / "glue" / label,
                            glue_dir=glue_cfg["dir"],
                            hub=glue_cfg["dir"] is None,
                            tasks=glue_cfg["tasks"],
                            grid=glue_cfg["grid"],
                            epochs=glue_cfg["epochs"],
                            seeds=glue_cfg["seeds"],
                            max_train_examples=glue_cfg["max_train_examples"],
                            max_eval_examples=glue_cfg["max_eval_examples"],
                            save_predictions=glue_cfg["save_predictions"],
                            device=glue_cfg["device"],
                            threads=glue_cfg["threads"],
                            stack=None if glue_cfg["stack"] == "auto" else glue_cfg["stack"],
                            group_by_length=glue_cfg["group_by_length"],
                            label=label,
                            lock=lock if self.is_main else None,
                        )
                    )
                run_plans(plans, progress=self.progress)
                if self.is_main:
                    for plan, (_, stage, fp) in zip(plans, pending):
                        glue = finish_glue(plan)
                        result = {"glue": str(plan.out / "glue.json"), "average": glue.get("average")}
                        book.finish(stage, fp, result)
        if not self.is_main:
            return {}

        # report --------------------------------------------------------------------------------
        from budgetkd.report import write_report

        self._say("stage report: writing tables and plots")
        atomic_write_json(self.out / "experiment.json", cfg)
        if cfg["budget"].get("sweep"):
            from budgetkd.sweep_report import write_sweep_report

            paths = write_sweep_report(self.out)
        else:
            paths = write_report(self.out)
        book.finish("report", sha256_json({"time": time.time()}), {"files": [str(p) for p in paths]})
        atomic_write_json(self.out / "fairness.json", fairness)
        self._say(f"done: {self.out / ('sweep.md' if cfg['budget'].get('sweep') else 'table.md')}")
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
        """SPEC §4: identical initial weights, data, data order and schedule shape, or refuse."""
        checks = {}
        for key in ("init_fingerprint", "data_fingerprint", "data_seed", "batch_size", "world_size"):
            values = {label: s.get(key) for label, s in summaries.items()}
            if len(set(map(str, values.values()))) > 1:
                raise BudgetKDError(f"fairness violated: {key} differs between strategies ({values})")
            checks[key] = next(iter(values.values()), None)
        checks["peak_lr"] = {label: s.get("lr") for label, s in summaries.items()}
        checks["budget"] = {label: s["budget"]["text"] for label, s in summaries.items()}
        checks["ok"] = True
        if self.is_main:
            atomic_write_json(self.out / "fairness.json", checks)
        return checks


def _check_branch_point(entry: dict) -> None:
    """A wsd branch needs its trunk's snapshot; a trunk that stopped at the data limit (a time
    budget under data_setting: unlimited) may never have reached it: say so, not "cannot read"."""
    start = entry["schedule"].get("init_from")
    if not start or Path(start).is_file():
        return
    trunk = Path(start).parent.parent
    summary_path = trunk / "summary.json"
    if summary_path.is_file():
        summary = read_json(summary_path, "run summary")
        if summary.get("stopped_by") == "data limit":
            raise BudgetKDError(
                f"sweep point {entry['id']} branches from {start}, but its trunk {trunk.name} stopped at the "
                f"data limit (data_setting: unlimited, {summary['consumed']['epochs']:.2f} epoch) before "
                "reaching it; lower the largest point or set data_setting: limited"
            )
    raise BudgetKDError(
        f"sweep point {entry['id']} branches from {start}, which its trunk {trunk.name} never wrote"
    )


def snapshot_path(run_dir: Path, amount: float) -> Path:
    """Where a wsd trunk keeps its state at ``amount`` (the same rule as ``Pretrainer.snapshot_path``)."""
    from budgetkd.train import snapshot_file

    return run_dir / snapshot_file(amount)


def compare(
    config_path: str | Path,
    out: str | Path,
    *,
    force: list[str] | None = None,
    overrides=None,
    progress: bool = True,
) -> dict:
    cfg = load_experiment(config_path, overrides)
    out = Path(out)
    _refuse_foreign(out)
    # Fail before compute: every check that configs, tokenizers and file listings allow, on
    # every rank (each refuses the same way), before any stage writes anything.
    from budgetkd.plan import preflight

    resolved = preflight(cfg, out, dist_utils.world_size())
    if dist_utils.rank() == 0:
        for note in resolved.notes:
            print(f"[compare] note: {note}", flush=True)
    plan = _sweep_plan(cfg, out, resolved) if cfg["budget"].get("sweep") else None
    # every rank has looked at --out before rank 0 writes into it (its lock, experiment.json's
    # temp file): otherwise a slower rank can take rank 0's first files for a foreign directory
    dist_utils.barrier()
    lock = DirectoryLock(out) if dist_utils.rank() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None and plan is not None:
            from budgetkd.plan import render_plan, write_plan

            print(render_plan(plan), flush=True)
            write_plan(plan, out / "plan.json")
        return Experiment(cfg, out, force=force, progress=progress).run()
    finally:
        if lock is not None:
            lock.release()


def _sweep_plan(cfg: dict, out: Path, resolved) -> dict:
    """A sweep's plan, built on every rank (each refuses alike): what will be trained, in FLOPs
    (hours with ``--dry-run --probe``) and what the schedule saves; rank 0 prints it first and
    writes DIR/plan.json (issue 15). A point beyond the data limit is refused here."""
    from budgetkd.plan import build_plan, check_sweep_fits_data

    plan = build_plan(cfg, out, resolved)
    check_sweep_fits_data(plan, resolved.data.exact)
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
    plan = build_plan(cfg, out, resolved, tokens_per_s=measured, assumed_tokens_per_s=assume_tokens_per_s)
    if dist_utils.rank() == 0:
        print(json.dumps(plan, indent=1, default=str) if as_json else render_plan(plan), flush=True)
        write_plan(plan, out / "plan.json")
    if cfg["budget"].get("sweep"):  # what compare would refuse, the dry run refuses too
        from budgetkd.plan import check_sweep_fits_data

        check_sweep_fits_data(plan, resolved.data.exact)
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
        compare(args.config, args.out, force=args.force, progress=not args.no_progress)
    finally:
        dist_utils.destroy()
    return 0
