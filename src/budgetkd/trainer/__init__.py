"""The parts of the pretraining loop in ``budgetkd.train``, one job each (SPEC §2, §3, §5).

From the bottom up — a module imports only those listed before it:

- ``step``        what trains and one optimizer step: TrainModule, TeacherRunner, the micro-batch
                  loop, the update (clip, finiteness), the uncharged warm-up step;
- ``accounting``  what a step costs and what the budget allows: step FLOPs, the data limit, the
                  meter charge, the learning-rate schedules (linear, WSD);
- ``checkpoint``  the checkpoint's contents: state, RNG gather/restore, ``weights_only`` reading,
                  restoring from a checkpoint or a snapshot (branch);
- ``evaluation``  validation losses and when the next evaluation is due;
- ``summary``     summary.json, run_config.json, versions, TensorBoard and the progress bar;
- ``setup``       building data, student, teacher, strategy, optimizer and the DDP wrap.

None of them writes a file: ``budgetkd.train`` (the recipe) owns the run directory.
"""

SUMMARY_VERSION = 1  # of summary.json and of the checkpoint
