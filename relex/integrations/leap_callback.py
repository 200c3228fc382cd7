"""Leaping with the Hugging Face ``Trainer`` and TRL's trainers: :class:`LeapCallback` drives a
:class:`relex.integrations.leap.Leaper` from the trainer's events, logs its decisions through the trainer, and
rebuilds the current segment from saved checkpoints when a run resumes."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from relex.errors import RelexInputError
from relex.integrations.leap import LEAP, LeapDecision, Leaper, LeapOptions, decisions_from_log, trainable_parameters
from relex.integrations.trainer import calling_trainer, log_through
from relex.io.reader import CheckpointReader

logger = logging.getLogger(__name__)


def _saved_parameters(folder: Path, names: set[str]) -> dict[str, torch.Tensor] | None:
    """The tensors ``names`` of a saved checkpoint (full weights), or None when it does not hold them all."""
    try:
        reader = CheckpointReader(folder)
    except RelexInputError:  # no checkpoint there, or not one relex reads
        return None
    with reader:
        if not names <= set(reader.tensors):
            return None
        return {name: reader.read(name).clone() for name in names}


class LeapCallback(TrainerCallback):
    """Leap during training with the Hugging Face ``Trainer`` or TRL's trainers (e.g. ``GRPOTrainer``).

    Every ``every`` real steps the trajectory of the trainable parameters over the segment since the last
    decision is fitted in memory and, when the verdict allows (``require``), the weights jump ``leap``
    steps ahead (see :class:`LeapOptions` for every option; keyword arguments here are its fields).

    Steps: a jump adds its length to ``state.global_step``, so checkpoints, logs and ``max_steps`` count
    virtual steps (``max_steps`` is the virtual length of the run: leaping trains fewer real steps). A save
    that falls on the step of a jump holds the jumped weights under the new step. Choose ``save_steps`` that
    divides both ``every`` and ``leap`` so saves stay on their grid. The learning-rate scheduler is stepped
    along (``advance_scheduler``); the optimizer's moments are kept or reset (``optimizer_state``), never
    extrapolated.

    Each decision is logged through the trainer at its step (``leap/from_step``, ``leap/to_step``,
    ``leap/length``, ``leap/jumped``, ``leap/reverted``, ``leap/real_step``, ``leap/segment_start``,
    ``leap/horizon`` (the target over the window), ``leap/passes_gate``, ``leap/seconds``, with a check
    ``leap/check_before`` and ``leap/check_after``, with a probe ``leap/probe_current``, ``leap/probe_chosen`` and
    ``leap/probe_tokens``, and the verdict's ``relex/...`` figures), so it is in ``state.log_history`` and in every
    ``trainer_state.json`` saved after it; the decisions are also kept in :attr:`decisions`.

    Resuming from a checkpoint: the decisions are read back from the trainer state; the current segment
    is rebuilt from the run's saved checkpoints of its snapshot steps (full-weight checkpoints with
    ``save_steps`` dividing ``snapshot_every``); when one is missing the segment restarts at the resumed step,
    with a warning. The trainer fast-forwards its data by ``global_step``, i.e. by virtual steps.

    PEFT models: the trainable parameters are the adapter's, and each (``lora_A``, ``lora_B``,
    ``modules_to_save``) is extrapolated along its own trajectory. The product ``B A`` then follows the
    product of two lines, not the line of the merged update that ``relex extrapolate`` fits on adapter
    checkpoints; a rank-r adapter cannot hold that line's prediction, which has rank up to r × snapshots.

    Runs on a single process (``state.is_world_process_zero`` and no DeepSpeed / FSDP sharding): in
    distributed training the parameters of the other ranks would not follow the jump.
    """

    def __init__(self, every: int | None = None, leap: int | None = None, options: LeapOptions | None = None,
                 **fields):
        if options is None:
            if every is None or leap is None:
                raise ValueError("give every (M) and leap (N), or options=LeapOptions(...)")
            options = LeapOptions(every=every, leap=leap, **fields)
        elif every is not None or leap is not None or fields:
            raise ValueError("give either options=LeapOptions(...) or its fields, not both")
        self.options = options
        self.leaper = Leaper(options)
        self._trainer = None
        self._disabled: str | None = None
        self._jumped_before = 0  # steps jumped before a resume (from the trainer state)

    @property
    def decisions(self) -> list[LeapDecision]:
        return self.leaper.decisions

    def attach(self, trainer) -> "LeapCallback":
        """Log through ``trainer`` (added to its callbacks if it is not there yet); returns the callback."""
        self._trainer = trainer
        if not any(c is self for c in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._trainer is None:
            self._trainer = calling_trainer(self)
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None) or getattr(args, "world_size", 1) > 1:
            self._disabled = "distributed training: the other ranks' parameters would not follow a jump"
        elif model is None:
            self._disabled = "the trainer passed no model"
        if self._disabled:
            logger.warning("relex leap: no jumps in this run: %s", self._disabled)
            return
        if self.options.probe is not None and self.options.tokenizer is None:  # the trainer's, for a chat probe
            self.options.tokenizer = kwargs.get("processing_class") or kwargs.get("tokenizer")
        step = state.global_step
        if step == 0:
            self.leaper.begin(model, 0)
            return
        self._resume(args, state, model)

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if self._disabled or model is None:
            return
        real_step = state.global_step - self._jumped()
        # The trainer logs this step's reward after on_step_end: the segment's rewards up to the step before.
        key = self.options.run.reward_key
        rewards = [(e["step"], e[key]) for e in state.log_history if "step" in e and isinstance(e.get(key), (int, float))]
        decision = self.leaper.after_step(model, optimizer, real_step, state.global_step,
                                          max_step=state.max_steps or None, scheduler=lr_scheduler, rewards=rewards)
        if decision is None:
            return
        if decision.jumped:
            state.global_step = decision.to_step
            trainer = self._trainer
            # The trainer's mean loss divides by the steps since its last log: a jump trained none of them.
            if trainer is not None and hasattr(trainer, "_globalstep_last_logged"):
                trainer._globalstep_last_logged += decision.length
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_training_stop = True
                control.should_save = args.save_strategy != "no"
        figures = decision.log_figures()
        if self._trainer is not None:
            log_through(self._trainer, figures)
        else:
            state.log_history.append({**figures, "step": state.global_step})

    # -- internals ----------------------------------------------------------------------------------

    def _jumped(self) -> int:
        return sum(d.length for d in self.leaper.decisions if d.jumped) + self._jumped_before

    def _resume(self, args, state, model) -> None:
        logged = decisions_from_log(state.log_history)
        self._jumped_before = int(sum(e[LEAP + "length"] for e in logged if e.get(LEAP + "jumped")))
        start = int(logged[-1][LEAP + "to_step"]) if logged else 0
        names = set(trainable_parameters(model))
        every = self.options.snapshot_every
        saved = {}
        for s in range(start, state.global_step, every):
            tensors = _saved_parameters(Path(args.output_dir) / f"checkpoint-{s}", names)
            if tensors is not None:
                saved[s] = tensors
        if not self.leaper.resume(model, state.global_step, start, saved):
            logger.warning("relex leap: resumed at step %d without the segment's checkpoints since step %d "
                           "(save_steps must divide snapshot_every=%d); the segment restarts here",
                           state.global_step, start, every)



__all__ = ["LeapCallback"]
