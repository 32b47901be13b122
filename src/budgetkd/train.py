"""One pretraining loop for every strategy, single- or multi-process (SPEC §2, §3, §5).

Read :meth:`Pretrainer.pretrain` top to bottom: set up (data, student, teacher, strategy,
optimizer, meter), resume or branch, warm up, then loop — learning rate, one optimizer step
(micro-batches: teacher forward, student forward, loss, backward), charge the budget, snapshots,
logs, evaluations, checkpoints — and finally export the student and write ``summary.json``.
Everything strategy-specific is behind ``Strategy.loss``; each step of the loop is one call into
``budgetkd.trainer`` (``setup``, ``step``, ``accounting``, ``checkpoint``, ``evaluation``,
``summary``). This module owns the run directory: every file of a run is written here.

Run directory::

    RUN_DIR/run_config.json  the resolved run configuration (what produced this run)
    RUN_DIR/checkpoint.pt    student, projections, optimizer, meter, RNG, history (atomic)
    RUN_DIR/model/           the student, ``save_pretrained`` + tokenizer (plain transformers)
    RUN_DIR/summary.json     strategy, budget, consumption in every currency, val losses
    RUN_DIR/tb/              TensorBoard events
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from budgetkd import distributed as dist_utils
from budgetkd import flops
from budgetkd.budget import Budget, Meter, in_steps, learning_rate
from budgetkd.config import TrainConfig
from budgetkd.errors import BudgetKDError
from budgetkd.io import atomic_torch_save, atomic_write_json, locked, read_json, sha256_json
from budgetkd.models import export_student, load_teacher, resolve_architecture, weights_fingerprint
from budgetkd.strategies import get_strategy
from budgetkd.trainer import SUMMARY_VERSION, accounting
from budgetkd.trainer.accounting import StepFlopsCache, charge_step, step_flops, wsd_schedule
from budgetkd.trainer.checkpoint import (
    check_snapshot,
    checkpoint_state,
    consumed_at,
    dropout_seed,
    gather_rng,
    read_state,
    rebased_history,
    restore_rng,
    restore_training,
    snapshot_file,
)
from budgetkd.trainer.evaluation import eval_due, evaluation_entry, next_eval_index, validation_losses
from budgetkd.trainer.setup import (
    _select_device,
    build_batches,
    build_module,
    build_optimizer,
    build_strategy,
    build_student,
    check_teacher,
    compiles,
    open_data,
)
from budgetkd.trainer.step import (
    TeacherRunner,
    TrainModule,
    _encoder,
    accumulate_gradients,
    apply_update,
    run_and_undo,
    set_learning_rate,
    training_precision,
)
from budgetkd.trainer.summary import (
    _progress,
    _tensorboard,
    log_evaluation,
    log_step,
    run_config,
    run_summary,
)

__all__ = [  # what other modules and the tests import from here (the parts live in budgetkd.trainer)
    "SUMMARY_VERSION",
    "Pretrainer",
    "TeacherRunner",
    "TrainConfig",
    "TrainModule",
    "_encoder",
    "_run_state",
    "_select_device",
    "dropout_seed",
    "pretrain",
    "snapshot_file",
    "step_flops",
]


# What a run directory may hold before its first checkpoint (a run killed early, or the lock).
_RUN_FILES = {".lock", "run_config.json", "tb", "summary.json", "checkpoint.pt", "model"}


def _is_temporary(name: str) -> bool:
    """What an atomic write or export killed half-way leaves behind (``.checkpoint.pt.k3x9.tmp``,
    ``.summary.json.ab12.tmp``, ``.model.tmp``): never a result, never read, safe to delete."""
    return name.startswith(".") and name.endswith(".tmp")


def _remove_temporaries(run_dir: Path) -> None:
    import shutil

    for path in run_dir.iterdir() if run_dir.is_dir() else []:
        if _is_temporary(path.name):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _run_state(run_dir: Path) -> str:
    """'new', 'unfinished' (a checkpoint, no summary) or 'finished'."""
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            if read_json(summary).get("finished"):
                return "finished"
        except BudgetKDError:
            pass
    if (run_dir / "checkpoint.pt").exists():
        return "unfinished"
    foreign = (
        [p.name for p in run_dir.iterdir() if p.name not in _RUN_FILES and not _is_temporary(p.name)]
        if run_dir.is_dir()
        else []
    )
    if foreign:
        raise BudgetKDError(
            f"{run_dir} is not empty and holds no budgetkd run (found {sorted(foreign)[0]!r}); choose a new --out"
        )
    return "new"


class Pretrainer:
    """One pretraining run: :meth:`pretrain` is the loop; every other method is one of its steps,
    delegating to one part of ``budgetkd.trainer`` (and the seam the tests patch)."""

    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = config
        self.resume = resume
        self.run_dir = Path(config.out)
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        self.prefetcher: dist_utils.Prefetcher | None = None  # CUDA: set while the loop runs

    # -- the loop -------------------------------------------------------------------------------
    def pretrain(self) -> dict:
        """Set up, start (resume, branch or seed), warm up, loop until the budget (or the data
        limit) is spent, then evaluate, checkpoint, export and summarise."""
        cfg = self.config
        self.setup()
        self._start()
        writer = _tensorboard(self.run_dir / "tb") if self.is_main else None
        if not self.history:
            self._record_eval(writer)  # the starting point (budget fraction 0), uncharged
        if not self.meter.exhausted(self.budget):
            self.warm_up()
        progress = _progress(self.is_main and cfg.progress, self.budget, self.meter)
        flops_of_step = StepFlopsCache(self.step_flops, cfg.batch_size)
        last_checkpoint = time.perf_counter()
        self._start_prefetcher()
        try:
            while not self.meter.exhausted(self.budget) and not self._at_data_limit():
                step, lr = self.meter.steps, self.learning_rate()
                started = time.perf_counter()
                loss, parts, teacher_s, n_pred = self.train_step(step, lr)
                finite = self.apply_update(loss)
                elapsed = time.perf_counter() - started
                # Rank 0's clock is the run's clock: every rank charges the same time and thus
                # takes the same stop decision at the same step (SPEC §3) — and the same
                # checkpoint decision, since a checkpoint gathers every rank's RNG.
                since_checkpoint = time.perf_counter() - last_checkpoint
                elapsed, teacher_s, since_checkpoint = dist_utils.broadcast_floats(
                    [elapsed, teacher_s, since_checkpoint], self.device
                )
                self._skip_or_stop(finite, loss, step)
                self._charge(step, elapsed, teacher_s, flops_of_step(n_pred))
                progress.update(self.meter)
                if cfg.snapshots:
                    self._take_snapshots()
                self._log_step(writer, loss, lr, parts)
                if eval_due(self.meter, self.budget, self.next_eval, cfg.num_evals):
                    self._record_eval(writer)
                if self._checkpoint_due(since_checkpoint):
                    self.save_checkpoint()
                    last_checkpoint = time.perf_counter()
        finally:
            self._stop_prefetcher()
            progress.close()
        self._record_eval(writer, final=True)
        self.save_checkpoint()
        return self._finish(writer)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything the run needs (``budgetkd.trainer.setup``), refusing a configuration
        that cannot run before any compute."""
        cfg = self.config
        self.budget_requested = self.budget = Budget.parse(cfg.budget)
        self.strategy_cls = get_strategy(cfg.strategy)
        self.wsd = (
            wsd_schedule(
                self.budget,
                cfg.schedule_point,
                cfg.schedule_warmup,
                cfg.warmup,
                cfg.decay_fraction,
                cfg.snapshots,
            )
            if cfg.schedule == "wsd"
            else None
        )
        if self.strategy_cls.needs_teacher and not cfg.teacher:
            raise BudgetKDError(f"strategy {cfg.strategy!r} needs a teacher: pass --teacher PATH_OR_HUB_ID")
        self.arch = resolve_architecture(cfg.student)
        self.device = _select_device(cfg.device)
        self.data, self.tokenizer = open_data(cfg.data)
        if self.wsd is None:  # one data rule (SPEC §1): an epochs budget is ⌊E·N/B⌋ full batches
            self.budget = in_steps(self.budget_requested, self.data.num_train, cfg.batch_size)
        self.seq_len = self.data.seq_len
        self.lr = cfg.lr if cfg.lr is not None else self.strategy_cls.default_lr
        self.data_seed = cfg.seed if cfg.data_seed is None else cfg.data_seed
        self.mask_seed = cfg.seed if cfg.mask_seed is None else cfg.mask_seed
        self.student = build_student(self.arch, self.data, cfg.seed, cfg.dropout)
        self.init_fingerprint = weights_fingerprint(self.student)
        self.teacher = load_teacher(cfg.teacher, self.device) if self.strategy_cls.needs_teacher else None
        teacher_config = self.teacher.config if self.teacher is not None else None
        if self.teacher is not None:
            check_teacher(
                self.teacher, self.tokenizer, self.seq_len, self.strategy_cls, cfg.strategy, cfg.teacher
            )
        self.strategy = build_strategy(
            self.strategy_cls, cfg.strategy_options, cfg.seed, self.student.config, teacher_config
        )
        self.compiled = compiles(cfg.compile, self.device)
        self.batches, self.val_batches, self.micro_batch_size = build_batches(
            cfg, self.data, self.data_seed, self.mask_seed, self.rank, self.world_size, self.compiled
        )
        self.module, self.model, self.teacher_runner = build_module(
            self.student, self.strategy, self.teacher, self.device, self.compiled
        )
        self.optimizer = build_optimizer(self.module, cfg, self.lr, self.device)
        self.meter = Meter(num_train_sequences=self.data.num_train, charge_teacher=cfg.charge_teacher)
        self.history: list[dict] = []
        self.skipped_steps = 0
        self.next_eval = 1
        self.snapshots_taken: list[float] = []
        self.branch: dict | None = None
        self.student_shape = flops.EncoderShape.from_config(self.student.config)
        self.teacher_shape = flops.EncoderShape.from_config(teacher_config) if teacher_config else None
        self.check_data_limit()

    def check_data_limit(self) -> None:
        """Set ``data_limit_steps`` and refuse a budget the data cannot pay for
        (``accounting.check_data_limit``)."""
        cfg = self.config
        # an epochs budget is checked as requested (E ≤ max_epochs), then trains ⌊E·N/B⌋ batches
        requested = getattr(self, "budget_requested", self.budget)
        requested = requested if requested.currency == "epochs" else self.budget
        self.data_limit_steps = accounting.check_data_limit(
            requested, cfg.max_epochs, self.data.num_train, cfg.batch_size, self.seq_len, self.step_flops
        )

    def _start(self) -> None:
        """Resume the checkpoint, branch from a snapshot, or seed this rank's dropout stream; then
        write run_config.json."""
        cfg = self.config
        self.config_hash = sha256_json(
            {**cfg.identity(), "data_fingerprint": self.data.meta.get("fingerprint")}
        )
        state = _run_state(self.run_dir)
        if state == "finished":
            raise BudgetKDError(f"{self.run_dir} already holds a finished run; choose another --out")
        if state == "unfinished" and not self.resume:
            raise BudgetKDError(f"{self.run_dir} holds an unfinished run; pass --resume to continue it")
        if state == "unfinished":
            self.load_checkpoint()
        elif cfg.init_from:
            self._branch_from(cfg.init_from)
        else:
            torch.manual_seed(dropout_seed(cfg.seed, self.rank))  # this rank's own dropout stream
        if self.is_main:
            atomic_write_json(self.run_dir / "run_config.json", run_config(self, cfg.resolved()))

    def _start_prefetcher(self) -> None:
        if self.device.type == "cuda":
            # the next steps' micro-batches are gathered, masked and pinned in a background thread
            # (a step's batch is a function of its number only: results do not change)
            self.prefetcher = dist_utils.Prefetcher(self.batches, start_step=self.meter.steps, pin=True)

    def _stop_prefetcher(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None

    # -- one step -------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The rate of the next step: SPEC §3's linear schedule over the budget fraction, or WSD
        over the consumed amount (budgetkd.sweep)."""
        if self.wsd is not None:
            return self.wsd.rate(self.lr, self.meter.consumed(self.budget.currency))
        return learning_rate(self.lr, self.meter.fraction(self.budget), self.config.warmup)

    def autocast(self):
        """The training precision: bf16 autocast on CUDA, fp32 elsewhere (SPEC §5). Training and
        validation both run under it, so validation measures the model that trains."""
        return training_precision(self.device)

    def train_step(self, step: int, lr: float) -> tuple[float, dict, float, float]:
        """One optimizer step's forward and backward (``step.accumulate_gradients``). Returns
        (loss, components, teacher seconds, predicted count)."""
        set_learning_rate(self.optimizer, lr)
        micro_batches = (
            self.prefetcher.get(step) if self.prefetcher is not None else self.batches.micro_batches(step)
        )
        return accumulate_gradients(
            self.model,
            micro_batches,
            device=self.device,
            world_size=self.world_size,
            teacher_runner=self.teacher_runner,
            normalizer=self.strategy.normalizer,
            autocast=self.autocast,
            clock=time.perf_counter,
        )

    def apply_update(self, loss: float) -> bool:
        """Clip, check and apply the gradients (``step.apply_update``); whether they were applied."""
        return apply_update(self.module, self.optimizer, self.device, loss, self.config.max_grad_norm)

    def warm_up(self) -> None:
        """One uncharged optimizer step, run exactly as training runs it and then undone, so that
        no charged step pays a one-time cost (SPEC §3: start-up is excluded; issue 13 item 4).

        It *is* a training step — :meth:`train_step` and :meth:`apply_update`, the very code the
        loop runs: every micro-batch under the same contexts (bf16 autocast on CUDA, the compiled
        encoders, DDP's no_sync and final all-reduce), so kernel selection, compilation (autocast
        state is part of a compiled graph's guards), allocator growth and the optimizer's lazily
        created state all happen here. Then it is undone (``step.run_and_undo``): weights and
        buffers are copied back, optimizer state created by it is zeroed (AdamW's fresh state is
        step 0 with zero moments, so that is the state a first step would have created) and state
        that existed is copied back, gradients are dropped and the RNG streams are restored — the
        run's result is bit for bit that of a run without warm-up (tested)."""
        started = time.perf_counter()
        run_and_undo(self.module, self.optimizer, self.device, self._uncharged_step)
        self.meter.time_excluded_s += time.perf_counter() - started

    def _uncharged_step(self) -> None:
        loss, _, _, _ = self.train_step(self.meter.steps, self.learning_rate())
        self.apply_update(loss)

    def step_flops(self, num_sequences: int, num_predicted: int) -> tuple[float, float]:
        """(student, teacher) FLOPs of a step over ``num_sequences`` with ``num_predicted`` masks:
        what runs and nothing else — each encoder to its depth (``Strategy.student_depth`` /
        ``teacher_depth``), the MLM heads only where their logits are used; the student's part
        forward + backward (3×), the teacher's forward only."""
        return step_flops(
            self.strategy, self.student_shape, self.teacher_shape, self.seq_len, num_sequences, num_predicted
        )

    def _charge(self, step: int, elapsed: float, teacher_s: float, step_cost: tuple[float, float]) -> None:
        """Charge step ``step`` to the meter (``accounting.charge_step``): the charge is the same
        whether or not its update was applied — its time was spent."""
        charge_step(
            self.meter,
            sequences=self.config.batch_size,
            tokens=self.batches.global_tokens(step),
            time_s=elapsed,
            time_teacher_s=teacher_s,
            step_flops=step_cost,
        )

    def _at_data_limit(self) -> bool:
        """The next step would cross max_epochs (the data limit, SPEC §1)."""
        return self.data_limit_steps is not None and self.meter.steps >= self.data_limit_steps

    def _skip_or_stop(self, finite: bool, loss: float, step: int) -> None:
        """A step whose update was not applied: counted (on_nonfinite: skip) or the run stops."""
        if finite:
            return
        if self.config.on_nonfinite == "stop":
            raise BudgetKDError(
                f"non-finite loss or gradients (loss {loss}) at step {step}; the last good checkpoint is kept in "
                f"{self.run_dir} (lower the learning rate, or set on_nonfinite: skip)"
            )
        self.skipped_steps += 1

    def _log_step(self, writer, loss: float, lr: float, parts: dict) -> None:
        steps = self.meter.steps
        if writer is not None and (steps % self.config.log_every == 0 or steps == 1):
            log_step(writer, self.meter, self.budget, loss, lr, parts)

    def _checkpoint_due(self, since_checkpoint: float) -> bool:
        cfg = self.config
        due_time = cfg.checkpoint_interval_s > 0 and since_checkpoint >= cfg.checkpoint_interval_s
        due_steps = cfg.checkpoint_every_steps > 0 and self.meter.steps % cfg.checkpoint_every_steps == 0
        return due_time or due_steps

    # -- evaluation -----------------------------------------------------------------------------
    @property
    def mlm_head_trained(self) -> bool:
        """Whether the student's MLM head receives gradients: only when its logits enter the loss
        (No-KD, Vanilla-KD, or an MLM weight > 0). Otherwise its validation MLM loss measures an
        untrained head and means nothing (issue 13 item 8)."""
        return bool(self.strategy.needs_student_logits)

    def evaluate(self) -> dict:
        """Validation MLM loss (and the strategy's loss when there is a teacher), fixed masks,
        under the training precision (:meth:`autocast`); its time is excluded from the budget."""
        started = time.perf_counter()
        mlm, strategy_loss = validation_losses(
            self.module,
            self.val_batches,
            self.device,
            self.teacher_runner,
            self.strategy.normalizer,
            self.autocast,
        )
        result = evaluation_entry(self.meter, self.budget, mlm, strategy_loss, self.mlm_head_trained)
        self.meter.time_excluded_s += time.perf_counter() - started
        return result

    def _record_eval(self, writer, final: bool = False) -> None:
        if (
            final
            and self.history
            and self.history[-1].get("final")
            and self.history[-1]["step"] == self.meter.steps
        ):
            return  # resumed after the final checkpoint (killed during export): already evaluated
        result = self.evaluate()
        result["final"] = final
        self.history.append(result)
        self.next_eval = next_eval_index(
            self.next_eval, self.config.num_evals, self.meter.fraction(self.budget)
        )
        if writer is not None:
            log_evaluation(writer, result, self.meter.steps)

    # -- checkpoints, snapshots and branches ----------------------------------------------------
    def rng_state(self) -> dict:
        """Every rank's dropout RNG, gathered in rank order (``checkpoint.gather_rng``). Collective."""
        return gather_rng(self.device, self.world_size)

    def state(self, rng: dict | None = None) -> dict:
        """The checkpoint (``checkpoint.checkpoint_state``)."""
        return checkpoint_state(
            config_hash=self.config_hash,
            module=self.module,
            optimizer=self.optimizer,
            meter=self.meter,
            history=self.history,
            skipped_steps=self.skipped_steps,
            next_eval=self.next_eval,
            snapshots_taken=self.snapshots_taken,
            rng=rng if rng is not None else self.rng_state(),
            init_fingerprint=self.init_fingerprint,
            branch=self.branch,
        )

    def save_checkpoint(self) -> None:
        """Collective (every rank's RNG is gathered): every rank calls it at the same step."""
        started = time.perf_counter()
        rng = self.rng_state()
        if self.is_main:
            atomic_torch_save(self.run_dir / "checkpoint.pt", self.state(rng))
        self.meter.time_excluded_s += time.perf_counter() - started

    def _read_state(self, path: Path, what: str) -> dict:
        return read_state(path, what, self.device)

    def load_checkpoint(self) -> None:
        state = self._read_state(self.run_dir / "checkpoint.pt", "checkpoint")
        if state.get("config") != self.config_hash:
            raise BudgetKDError(
                f"{self.run_dir} was started with a different configuration; resume with the same options or use a new --out"
            )
        self.meter = restore_training(state, self.module, self.optimizer)
        self.history = state["history"]
        self.skipped_steps = state["skipped_steps"]
        self.next_eval = state["next_eval"]
        self.snapshots_taken = list(state.get("snapshots_taken", []))
        self.branch = state.get("branch")
        self._restore_rng(state)

    def _restore_rng(self, state: dict) -> None:
        """This rank's dropout stream (``checkpoint.restore_rng``); a note when it is re-derived."""
        saved_world = restore_rng(
            state,
            rank=self.rank,
            world_size=self.world_size,
            device=self.device,
            seed=self.config.seed,
            step=self.meter.steps,
        )
        if saved_world is not None and self.is_main:
            print(
                f"budgetkd: note: {self.run_dir} was checkpointed with {saved_world} process(es) and resumes "
                f"with {self.world_size}; dropout streams are re-derived from (seed, rank, step {self.meter.steps})"
            )

    def snapshot_path(self, amount: float) -> Path:
        return self.run_dir / snapshot_file(amount)

    def _take_snapshots(self) -> None:
        """Keep the state at the first step that reaches each snapshot amount (a branch point)."""
        consumed = self.meter.consumed(self.budget.currency)
        for amount in self.config.snapshots:
            if consumed >= amount and amount not in self.snapshots_taken:
                self.snapshots_taken.append(amount)
                started = time.perf_counter()
                rng = self.rng_state()  # collective: every rank takes the snapshot at the same step
                if self.is_main:
                    state = self.state(rng)
                    state["snapshot_of"] = str(self.run_dir)
                    state["prefix"] = self.meter.summary()
                    atomic_torch_save(self.snapshot_path(amount), state)
                self.meter.time_excluded_s += time.perf_counter() - started

    def _branch_from(self, path: str) -> None:
        """Continue a snapshot of another run: same weights, optimizer, meter, RNG and data
        position, so this run's charge is the prefix's plus its own (SPEC §7a)."""
        cfg = self.config
        state = self._read_state(Path(path), "snapshot")
        check_snapshot(state, path, self.init_fingerprint)
        self.meter = restore_training(state, self.module, self.optimizer)
        self.meter.charge_teacher = cfg.charge_teacher
        if self.meter.exhausted(self.budget):
            raise BudgetKDError(f"snapshot {path} has already consumed this run's budget {self.budget}")
        self.skipped_steps = state["skipped_steps"]
        currency, num_train = self.budget.currency, self.data.num_train
        self.history = rebased_history(
            state["history"],
            lambda entry: consumed_at(entry, currency, cfg.batch_size, num_train),
            self.budget.amount,
        )
        self.next_eval = next_eval_index(self.next_eval, cfg.num_evals, self.meter.fraction(self.budget))
        self.branch = {"from": str(path), "of": state.get("snapshot_of"), "prefix": state.get("prefix")}
        self._restore_rng(state)

    # -- the end --------------------------------------------------------------------------------
    def _finish(self, writer) -> dict:
        """Export the student and write summary.json (rank 0); every rank returns the summary."""
        summary = run_summary(self)
        if self.is_main:
            started = time.perf_counter()
            export_student(self.module.student, self.tokenizer, self.run_dir / "model")
            summary["export_s"] = time.perf_counter() - started
            atomic_write_json(self.run_dir / "summary.json", summary)
        if writer is not None:
            writer.close()
        dist_utils.barrier()
        return summary


def pretrain(config: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) one pretraining run and return its summary."""
    run_dir = Path(config.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise BudgetKDError(f"--out {run_dir} exists and is not a directory")
    _run_state(run_dir)  # refuses a foreign, non-empty directory before the lock file is put in it
    with locked(run_dir, enabled=dist_utils.rank() == 0):
        if dist_utils.rank() == 0:
            _remove_temporaries(run_dir)  # left by a process killed in the middle of a write
        return Pretrainer(config, resume=resume).pretrain()
