"""``RelexCallback``: the verdict on a run while it trains, for the Hugging Face ``Trainer`` and TRL's trainers.

After each checkpoint the trainer saves, the callback reads the checkpoints so far (the run folder is
``args.output_dir``), computes the verdict ``relex extrapolate`` would print, and logs its figures through
the trainer's own ``log`` — so every logger the trainer reports to (TensorBoard, W&B, …) shows them, and they
go to ``state.log_history`` and from there into the next ``trainer_state.json``. Optionally it writes the
extrapolated checkpoint of given target steps into a folder of its own.

The figures are logged by calling ``transformers.Trainer.log`` on the trainer (see :func:`log_through`):
logging integrations are callbacks that come *before* user callbacks in the trainer's list, and
``log_history`` is appended before any callback runs, so adding keys to the ``logs`` dict in ``on_log``
would reach neither. The callback finds the trainer that calls it (or is given it with
:meth:`RelexCallback.attach`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from transformers import TrainerCallback

from relex.errors import one_line
from relex.integrations.assess import PREFIX, Assessment, assess
from relex.io.steps import parse_targets
from relex.options import RunOptions

logger = logging.getLogger(__name__)

BASE_FOLDER = "relex-base"  # under args.output_dir: not a checkpoint name, so neither relex nor the trainer reads it
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def count_checkpoints(run_dir: str | Path, max_step: int) -> int:
    """Trainer checkpoints ``checkpoint-N/`` with 0 < N ≤ ``max_step`` in ``run_dir``."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return 0
    return sum(1 for name in names if (m := _CHECKPOINT.match(name)) and 0 < int(m.group(1)) <= max_step
               and os.path.isdir(os.path.join(run_dir, name)))


def calling_trainer(callback: TrainerCallback, depth: int = 16):
    """The ``transformers.Trainer`` up the call stack whose callbacks include ``callback``, or None."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer) and any(
                    c is callback for c in getattr(candidate.callback_handler, "callbacks", ())):
                return candidate
    finally:
        del frame
    return None


def log_through(trainer, figures: dict[str, float]) -> None:
    """Log ``figures`` as the trainer logs its own: ``state.log_history`` and every logging callback.

    ``transformers.Trainer.log`` itself, not a subclass's override: TRL's trainers override ``log`` to
    flush the metrics they accumulate between logging steps (rewards, entropy, token accuracy…) into
    whatever is logged, which would move them into the relex entry and shorten their averaging window.
    """
    from transformers import Trainer

    if isinstance(trainer, Trainer):
        Trainer.log(trainer, figures)
    else:
        trainer.log(figures)


def _is_peft(model) -> bool:
    return getattr(model, "peft_config", None) is not None


def _adapter_base(model) -> str | None:
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(getattr(model, "active_adapter", "default")) or next(iter(configs.values()), None)
    return getattr(config, "base_model_name_or_path", None) if config is not None else None


class RelexCallback(TrainerCallback):
    """Give relex's verdict on the run at every checkpoint the trainer saves, and log its figures.

    Args:
        target_steps: the step(s) you would extrapolate to. The verdict's window backtest is carried to the
            largest (as ``relex extrapolate --target-step`` does); with ``out_dir`` each is written.
        base: the step-0 checkpoint (a folder or Hub id). By default ``args.output_dir/checkpoint-0/`` when
            it exists; for a PEFT model the adapter's base model (checkpoints are adapters, read in merged
            weight space); otherwise the callback saves the model's weights when training starts into
            ``args.output_dir/relex-base/`` (``save_base=False`` to refuse that).
        out_dir: with ``target_steps``, write the extrapolated checkpoint of each target to
            ``out_dir/step-N/``, replaced at every save with the prediction from the newest window — only
            when that window's verdict is plausible, unless ``require_plausible=False``. Its ``relex.json``
            names the observed window. Must not be inside a checkpoint folder.
        every: assess at every ``every``-th save only.
        min_checkpoints: assess once the run holds this many checkpoints (the verdict's window backtest
            needs 4; with 3 the verdict rests on the drift share alone; with 2 it is inconclusive).
        background: run relex on a worker thread while training continues (the figures are logged at the
            first step after they are ready, and carry ``relex/step``, the checkpoint they describe). Before
            the next save the callback waits for the worker, so checkpoints are never written, rotated or
            deleted while relex reads them. By default the training loop waits for relex at each save.
        options: the run's settings (:class:`relex.options.RunOptions`), or any of them as keywords (``method``,
            ``rank``, ``regressor``, ``dtype``, ``output``, ``block_bytes``, ``rewards``, …); ``device`` is
            ``cpu`` unless given, leaving the accelerator to training.

    Figures (all numbers; logged through the trainer, so TensorBoard / W&B show them): ``relex/plausible``
    (1 when the verdict — the window backtest carried to the target included — is drift-dominated, 0
    otherwise), ``relex/drift_share``,
    ``relex/backtest_line_error`` and ``relex/backtest_stop_error`` (weight error of a line fitted on the
    first half of the window, and of stopping, on its second half), ``relex/backtest_projected_line_error`` /
    ``..._stop_error`` (the same carried to the largest target step), ``relex/explained_rank1``,
    ``relex/r2_rank1``, ``relex/alpha``, ``relex/drift_ratio``, ``relex/cos_first_last``, ``relex/step``,
    ``relex/checkpoints``, ``relex/written`` (with ``out_dir``) and ``relex/seconds``. The verdict's text
    is logged (``logging``, logger ``relex.integrations.trainer``) at INFO; every assessment is kept in
    :attr:`history`. The figures of the save at step N are logged at step N, once ``checkpoint-N/`` is
    complete — after the trainer wrote its ``trainer_state.json`` — so they reach ``state.log_history`` at
    once and the ``trainer_state.json`` of the next checkpoint (or of ``trainer.save_state()``).

    Never stops training: any error is logged as one warning line and that save's figures are left out
    (a prediction that cannot be written leaves the verdict's figures, with ``relex/written`` 0).
    Runs on the main process only (``state.is_world_process_zero``).
    """

    def __init__(
        self,
        target_steps: int | Sequence[int] | None = None,
        base: str | Path | None = None,
        out_dir: str | Path | None = None,
        *,
        every: int = 1,
        min_checkpoints: int = 4,
        require_plausible: bool = True,
        background: bool = False,
        save_base: bool = True,
        options: RunOptions | None = None,
        **settings,
    ):
        self.options = (options or RunOptions(device="cpu")).replace(**settings)  # refuses unknown settings now
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        if min_checkpoints < 2:
            raise ValueError(f"min_checkpoints must be at least 2 (the engine needs two), not {min_checkpoints}")
        self.target_steps = [] if target_steps is None else list(parse_targets(target_steps))  # as --target-step
        if out_dir is not None and not self.target_steps:
            raise ValueError("out_dir needs target_steps: the steps whose checkpoints to write")
        self.base = base
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.every = every
        self.min_checkpoints = min_checkpoints
        self.require_plausible = require_plausible
        self.background = background
        self.save_base = save_base
        self.history: list[Assessment] = []
        self._trainer = None
        self._base: str | Path | None = base
        self._disabled: str | None = None  # why the callback does nothing (said once)
        self._write = self.out_dir is not None
        self._saves = 0
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future | None = None
        self._future_step = 0
        self._pending: dict[str, float] = {}
        self._emitting = False
        self._warned_unattached = False

    # -- public -------------------------------------------------------------------------------------

    def attach(self, trainer) -> "RelexCallback":
        """Log through ``trainer`` (added to its callbacks if it is not there yet); returns the callback.

        Needed only when the callback cannot find the trainer that calls it, e.g. a trainer that calls its
        callbacks from an unusual place.
        """
        self._trainer = trainer
        if not any(c is self for c in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    @property
    def latest(self) -> Assessment | None:
        """The newest assessment (None before the first)."""
        return self.history[-1] if self.history else None

    # -- trainer events -----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        try:
            if self._trainer is None:
                self._trainer = calling_trainer(self)
            if state.is_world_process_zero:
                limit = getattr(args, "save_total_limit", None)
                if limit is not None and limit < self.min_checkpoints:
                    self._disable(f"save_total_limit={limit} keeps fewer checkpoints than min_checkpoints="
                                  f"{self.min_checkpoints}; raise it (or set it to None) to get a verdict")
                    return
                self._check_out_dir(Path(args.output_dir))
                self._resolve_base(args, state, model)
        except Exception as exc:  # noqa: BLE001 — training must go on
            self._disable(f"cannot prepare at the start of training: {one_line(exc)}")

    def on_step_end(self, args, state, control, **kwargs):
        self._collect(state, wait=bool(control.should_save))

    def on_epoch_end(self, args, state, control, **kwargs):
        self._collect(state, wait=bool(control.should_save))

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._collect(state, wait=True)
        self._saves += 1
        if self._disabled or (self._saves - 1) % self.every:
            return
        step = state.global_step
        try:
            if count_checkpoints(args.output_dir, step) < self.min_checkpoints:
                return
            options = self.options.replace(base=self._base, max_step=step, target_steps=tuple(self.target_steps))
            job = functools.partial(assess, args.output_dir, options, out_dir=self.out_dir if self._write else None,
                                    require_plausible=self.require_plausible, write_errors="keep")
            if self.background:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex")
                self._future, self._future_step = self._executor.submit(job), step
            else:
                self._emit(job(), state)
        except Exception as exc:  # noqa: BLE001
            self._warn(step, exc)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only without a trainer to log through: hand the figures to the callbacks after this one.
        if not self._emitting and self._pending and logs is not None:
            logs.update(self._pending)
            self._pending.clear()

    def on_train_end(self, args, state, control, **kwargs):
        self._collect(state, wait=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- internals ----------------------------------------------------------------------------------

    def _check_out_dir(self, run_dir: Path) -> None:
        """An output inside a checkpoint folder would be rotated away with it, or read as training."""
        if self.out_dir is None:
            return
        from relex.io.discover import is_checkpoint_name

        out, run = self.out_dir.resolve(), run_dir.resolve()
        if out == run or run not in out.parents:
            return
        inside = out.relative_to(run).parts
        if any(is_checkpoint_name(part) for part in inside):
            self._write = False
            logger.warning("relex: out_dir %s is inside a checkpoint folder of the run; extrapolated "
                           "checkpoints will not be written (choose a folder of its own)", self.out_dir)

    def _resolve_base(self, args, state, model) -> None:
        run = Path(args.output_dir)
        if self.base is not None or (run / "checkpoint-0").is_dir():
            return
        if _is_peft(model):
            if not _adapter_base(model):
                self._disable("the adapter names no base model (base_model_name_or_path); pass base=")
            return
        folder = run / BASE_FOLDER
        if state.global_step > 0:  # resumed: the weights in memory are not step 0
            if (folder / "config.json").is_file():
                self._base = folder
            else:
                self._disable(f"training resumed at step {state.global_step} without the step-0 weights "
                              f"({folder} or checkpoint-0/); pass base=")
            return
        if not self.save_base:
            self._disable("no step-0 checkpoint in the run and save_base=False; pass base=")
            return
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            self._disable("sharded training (DeepSpeed / FSDP): the callback cannot save the step-0 weights "
                          "from one process; pass base= (the model training started from)")
            return
        if model is None:
            self._disable("the trainer passed no model to save as the step-0 weights; pass base=")
            return
        partial = run / f".{BASE_FOLDER}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        self._base = folder

    def _disable(self, reason: str) -> None:
        self._disabled = reason
        logger.warning("relex: no verdict during this run: %s", reason)

    def _warn(self, step: int, exc: BaseException) -> None:
        logger.warning("relex: no verdict at step %d: %s", step, one_line(exc))

    def _collect(self, state, wait: bool) -> None:
        """Log a finished background assessment (waiting for it when ``wait``)."""
        future = self._future
        if future is None or not (wait or future.done()):
            return
        self._future = None
        try:
            assessment = future.result()
        except Exception as exc:  # noqa: BLE001
            self._warn(self._future_step, exc)
            return
        try:
            self._emit(assessment, state)
        except Exception as exc:  # noqa: BLE001
            self._warn(self._future_step, exc)

    def _emit(self, assessment: Assessment, state) -> None:
        self.history.append(assessment)
        logger.info("relex at step %d (%d checkpoints): %s", assessment.step, len(assessment.steps),
                    assessment.message)
        for target, folder in assessment.written.items():
            logger.info("relex: wrote the prediction of step %d to %s", target, folder)
        if assessment.write_error is not None:
            logger.warning("relex: could not write the prediction at step %d: %s", assessment.step,
                           one_line(assessment.write_error))
        figures = dict(assessment.figures)
        if self._trainer is not None:
            self._emitting = True
            try:
                log_through(self._trainer, figures)
            finally:
                self._emitting = False
            return
        # No trainer to log through: the history gets the figures now, later callbacks at the next log.
        if not self._warned_unattached:
            self._warned_unattached = True
            logger.warning("relex: the callback found no trainer to log through; the figures go to the "
                           "trainer state, but not to loggers such as TensorBoard or W&B, which come earlier in "
                           "the callbacks (call RelexCallback.attach(trainer))")
        state.log_history.append({**figures, "step": state.global_step})
        self._pending.update(figures)


__all__ = ["RelexCallback", "BASE_FOLDER", "PREFIX"]
