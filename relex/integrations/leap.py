"""Train less: every M real steps, jump N steps ahead along the fitted trajectory, guarded by the verdict.

The loop of "periodic re-grounding" (train M steps, jump to step M + N along the line the weights follow,
train on from there, repeat), as a component:

* :class:`Leaper` — the loop's state for any training loop (the toy trainer uses it): snapshots of the
  trainable parameters, kept on the CPU in their own dtype, at every ``snapshot_every`` steps of the segment
  since the last decision; at the segment's end the fit, the verdict, and — when the verdict says a jump of N
  steps is plausible — the predicted weights written into the live model;
* :class:`relex.integrations.leap_callback.LeapCallback` — the same for the Hugging Face ``Trainer`` and TRL's
  trainers (``GRPOTrainer``).

The fit is relex's own engine, in memory: the snapshots are a run (:class:`relex.io.runs.Snapshots`), opened with
:func:`relex.run.open_run` and streamed by :meth:`relex.run.Run.execute`
with the same trajectory models and predictors as ``relex extrapolate`` — the jump writes exactly the weights
``relex extrapolate`` would write from the same snapshots saved as checkpoints (the segment's first weights
as the base, steps counted from the segment's start). The verdict is the one that pass computes
on the same Gram matrices, carried to the jump's target, as ``relex check`` gives it, and it weighs the
training reward logged inside the segment as ``relex check`` weighs a run's ``trainer_state.json``.

Steps are *virtual*: a jump of N steps adds N to the step counter (the trainer's ``global_step``), so a
checkpoint saved after a jump carries the step its weights stand for, and the run's checkpoints stay one
trajectory in step numbers that ``relex extrapolate`` can read later. Training stops at ``max_steps``
*virtual* steps (a jump is cut short there): that is how it trains less.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from relex.analysis.verdict import Verdict
from relex.errors import one_line
from relex.integrations.assess import PREFIX, figures_of
from relex.io.runs import Snapshots
from relex.io.steps import parse_targets
from relex.options import RunOptions
from relex.run import open_run
from relex.sinks import TensorSink

logger = logging.getLogger(__name__)

LEAP = "leap/"  # prefix of the figures of each decision
OPTIMIZER_STATES = ("keep", "reset")
REQUIREMENTS = ("plausible", "lenient", "always", "probe")


# -- the fit of one segment, in memory ------------------------------------------------------------------


@dataclass
class SegmentFit:
    """The fit of one segment: the prediction of the target and the verdict on the way there."""

    steps: list[int]  # the snapshots' steps, counted from the segment's start
    target: int  # likewise (the farthest target when there are several)
    prediction: dict[str, torch.Tensor]  # the prediction of the target
    verdict: Verdict
    figures: dict[str, float]
    seconds: float
    predictions: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # of every target

    @property
    def passes_gate(self) -> bool:
        """What relex check --lenient says: True unless it will likely hurt or is too far."""
        return self.verdict.gate(lenient=True).passed


def fit_segment(base: Mapping[str, torch.Tensor], snapshots: Sequence[tuple[int, Mapping[str, torch.Tensor]]],
                target: int | Sequence[int], options: RunOptions | None = None,
                rewards: Sequence[tuple[float, float]] | None = None) -> SegmentFit:
    """Fit the trajectory of ``snapshots`` (``(step, tensors)``, steps from the segment's start, base at 0) and
    predict ``target`` (or several targets, the verdict carried to the farthest): one pass of relex's engine over
    the snapshots in memory (:class:`relex.io.runs.Snapshots`),
    with the trajectory model of ``options`` (:class:`relex.options.RunOptions`), giving the verdict ``relex
    check`` gives on the same checkpoints; it weighs the training reward's trend when ``rewards`` (``(step, mean
    reward)``, steps counted like the snapshots') are given, as ``relex check`` weighs a run's logged reward."""
    targets = list(parse_targets(target))
    options = (options or RunOptions(device="cpu")).replace(target_steps=tuple(targets))
    with open_run(Snapshots(base, list(snapshots), list(rewards or ())), options) as run:
        dtypes = {name: info.dtype for name, info in run.readers.observed[-1].tensors.items()}
        sink = TensorSink(targets, dtypes, run.device)
        result = run.execute(sink)
    return SegmentFit(list(result.steps), targets[-1], sink.tensors[targets[-1]], result.verdict,
                      figures_of(result.verdict), result.seconds, dict(sink.tensors))


# -- options and records ------------------------------------------------------------------------------------


@dataclass
class LeapOptions:
    """How a run leaps.

    Every ``every`` real steps (M) the trajectory of the segment since the last decision is fitted and, when
    the verdict allows, the weights jump ``leap`` steps (N) ahead: to the prediction of step M + N of the
    segment. Steps are virtual (a jump adds N to the step counter); a jump is cut short at the run's last
    step.
    """

    every: int  # M: real steps per segment
    leap: int  # N: steps jumped at the end of a segment
    # Snapshot the trainable parameters every this many steps of a segment (its first weights are the base).
    # Default: every // 4 (4 snapshots, the fewest with which the verdict backtests the window).
    snapshot_every: int | None = None
    # "plausible": jump only when the verdict on the segment, carried to the target, is plausible (relex check
    # passes); "lenient": unless relex check --lenient fails, i.e. also on a mixed or inconclusive verdict, never
    # when it says the jump will likely hurt or lies beyond the horizon the backtest vouches for; "always":
    # whatever the verdict says (the figures are still recorded); "probe": the probe decides (set with probe).
    require: str = "plausible"
    # The optimizer's state at a jump: "keep" its moments as they are (never extrapolated), or "reset" them
    # (torch optimizers: the per-parameter state is cleared, so Adam restarts its bias correction).
    optimizer_state: str = "keep"
    # Step the learning-rate scheduler N times at a jump, so the rate follows the virtual step.
    advance_scheduler: bool = True
    # A probe set (relex.probe: "toy-train", a JSON Lines file of training problems, or a loaded ProbeSet): at each
    # decision the jump length is chosen on it (require "probe"): candidates on a grid of lengths up to leap are
    # scored against the current weights, and the run jumps to the best one that beats them with
    # probe_confidence; none better: no jump. The probe's settings are relex extrapolate's --probe-* options.
    # tokenizer: the model's, for a chat probe (LeapCallback takes the trainer's when none is given).
    probe: object = field(default=None, compare=False)
    probe_limit: int = 64
    probe_mode: str = "reward"
    probe_confidence: float = 0.95
    probe_looks: int = 3
    probe_max_new_tokens: int = 256
    tokenizer: object = field(default=None, compare=False)
    # An optional check of a jump: called as check(model) before and after it (higher is better, e.g. the
    # reward on a small validation set); a jump that lowers it by more than check_tolerance is reverted.
    check: Callable[[torch.nn.Module], float] | None = field(default=None, compare=False)
    check_tolerance: float = 0.0
    # The fit's settings, as relex extrapolate takes them: the trajectory model (method, rank, regressor, scale,
    # …), the device it computes on (the CPU, beside training), the training reward the verdict weighs (the key
    # the trainer logs its mean reward under, its ceiling: a reward whose trend over the segment reaches the
    # ceiling before the jump's end makes the verdict mixed) and block_bytes.
    run: RunOptions = field(default_factory=lambda: RunOptions(device="cpu"))

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 2:
            raise ValueError(f"every (M) must be an integer of at least 2 real steps, not {self.every!r}")
        if not isinstance(self.leap, int) or self.leap < 1:
            raise ValueError(f"leap (N) must be a positive integer number of steps, not {self.leap!r}")
        if self.snapshot_every is None:
            self.snapshot_every = max(1, self.every // 4)
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1 or self.every % self.snapshot_every:
            raise ValueError(f"snapshot_every must be a positive divisor of every={self.every}, "
                             f"not {self.snapshot_every!r}")
        if self.every // self.snapshot_every < 2:
            raise ValueError(f"a segment needs at least 2 snapshots to fit a line: every={self.every} with "
                             f"snapshot_every={self.snapshot_every} gives {self.every // self.snapshot_every}")
        if self.probe is not None and self.require == "plausible":
            self.require = "probe"  # a probe given decides
        if self.require == "probe" and self.probe is None:
            raise ValueError("require='probe' needs a probe set (probe=...)")
        if self.probe is not None:  # the probe's settings are checked as relex extrapolate checks them
            RunOptions(probe="given", probe_limit=self.probe_limit, probe_mode=self.probe_mode,
                       probe_confidence=self.probe_confidence, probe_looks=self.probe_looks,
                       probe_max_new_tokens=self.probe_max_new_tokens)
        if isinstance(self.probe, (str, Path)):
            from relex.probe.problems import load_probe  # start-up: only with a probe

            self.probe = load_probe(self.probe, self.probe_limit, max_new_tokens=self.probe_max_new_tokens)
        if self.require not in REQUIREMENTS:
            raise ValueError(f"require must be one of {', '.join(REQUIREMENTS)}, not {self.require!r}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {', '.join(OPTIMIZER_STATES)}, "
                             f"not {self.optimizer_state!r}")
        if self.check is not None and not callable(self.check):
            raise ValueError("check must be a callable check(model) -> float")
        if not (isinstance(self.check_tolerance, (int, float)) and self.check_tolerance >= 0):
            raise ValueError(f"check_tolerance must be a number >= 0, not {self.check_tolerance!r}")
        if not isinstance(self.run, RunOptions):
            raise ValueError(f"run must be a relex.RunOptions, not {type(self.run).__name__}")

    @property
    def snapshots(self) -> int:
        """Snapshots per segment, besides its base."""
        return self.every // self.snapshot_every


@dataclass
class LeapDecision:
    """What happened at the end of one segment."""

    real_step: int  # real training steps done when deciding
    from_step: int  # the (virtual) step when deciding
    to_step: int  # the step after the decision (from_step + length when it jumped, else from_step)
    length: int  # the jump asked for, cut at the run's last step
    segment_start: int  # the (virtual) step the segment started at
    jumped: bool
    reason: str  # "jumped", "refused" (verdict), "reverted" (check), "failed" (error)
    verdict: dict | None  # the verdict on the segment (Verdict.to_dict()); None when the fit failed
    message: str
    figures: dict[str, float] = field(default_factory=dict)  # relex/... verdict figures
    passes_gate: bool | None = None  # relex check --lenient would pass the jump (None: no fit)
    check_before: float | None = None
    check_after: float | None = None
    seconds: float = 0.0
    probe: dict | None = None  # the probe's curve over the candidate jumps (relex.probe.search.ProbeCurve)

    def log_figures(self) -> dict[str, float]:
        """The numbers logged for this decision (``leap/...`` and the verdict's ``relex/...``)."""
        figures = {LEAP + "real_step": self.real_step, LEAP + "from_step": self.from_step,
                   LEAP + "to_step": self.to_step, LEAP + "length": self.length,
                   LEAP + "segment_start": self.segment_start, LEAP + "jumped": 1.0 if self.jumped else 0.0,
                   LEAP + "horizon": (self.from_step - self.segment_start + self.length)
                   / max(1, self.from_step - self.segment_start),
                   LEAP + "seconds": self.seconds}
        if self.passes_gate is not None:
            figures[LEAP + "passes_gate"] = 1.0 if self.passes_gate else 0.0
        if self.check_before is not None:
            figures[LEAP + "check_before"] = self.check_before
        if self.check_after is not None:
            figures[LEAP + "check_after"] = self.check_after
        if self.probe is not None:  # the current weights and the chosen jump on the probe, and what it cost
            figures[LEAP + "probe_current"] = self.probe["reference_mean"]
            chosen = [c for c in self.probe["candidates"] if c["step"] == self.probe["chosen"]]
            if chosen:
                figures[LEAP + "probe_chosen"] = chosen[0]["mean"]
            figures[LEAP + "probe_tokens"] = self.probe["tokens"]
        figures = {k: float(v) for k, v in figures.items()}
        figures.update({k: v for k, v in self.figures.items() if k != PREFIX + "step"})
        figures[LEAP + "reverted"] = 1.0 if self.reason == "reverted" else 0.0
        return {k: v for k, v in figures.items() if math.isfinite(v)}

    def to_dict(self) -> dict:
        return asdict(self)


def decisions_from_log(log_history: Iterable[Mapping]) -> list[dict]:
    """The decisions a run logged (its ``trainer_state.json`` ``log_history``), oldest first."""
    return [dict(entry) for entry in log_history if LEAP + "from_step" in entry]


# -- the loop -----------------------------------------------------------------------------------------------


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters training moves (``requires_grad``), by name; for a PEFT model its adapter's."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of each tensor in its own dtype."""
    return {name: p.detach().to("cpu", copy=True) for name, p in parameters.items()}


def inner_optimizer(optimizer):
    """The torch optimizer under a wrapper (accelerate's ``AcceleratedOptimizer`` holds it as ``.optimizer``)."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class Leaper:
    """The leap loop's state, for any training loop: call :meth:`begin` once, then :meth:`after_step` after
    every optimizer step; it returns a :class:`LeapDecision` at the end of each segment (else None).

    Memory: the segment's base and ``options.snapshots`` copies of the trainable parameters on the CPU, plus
    one prediction while deciding.
    """

    def __init__(self, options: LeapOptions):
        self.options = options
        self.decisions: list[LeapDecision] = []
        self.segment_start = 0
        self.base: dict[str, torch.Tensor] | None = None
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []

    def begin(self, model: torch.nn.Module, step: int) -> None:
        """Start a segment at (virtual) ``step`` from the model's weights now (at the run's start, a probe that
        cannot score this model is refused here, before any training)."""
        if self.options.probe is not None and step == 0:
            from relex.probe.scoring import ProbeModel  # start-up: only with a probe

            ProbeModel(model, self.options.probe, "cpu", tokenizer=self.options.tokenizer)  # checks, scores nothing
        self.segment_start = int(step)
        self.base = snapshot(trainable_parameters(model))
        self.snapshots = []

    def resume(self, model: torch.nn.Module, step: int, segment_start: int,
               saved: Mapping[int, Mapping[str, torch.Tensor]]) -> bool:
        """Continue the segment that started at ``segment_start`` from a checkpoint of ``step``, with the
        segment's earlier weights from ``saved`` (step → trainable tensors). Returns False (and starts a new
        segment at ``step``) when one is missing."""
        live = snapshot(trainable_parameters(model))
        every = self.options.snapshot_every
        wanted = [s for s in range(segment_start, step, every)]
        if (step - segment_start) % every or step - segment_start >= self.options.every or any(
                s not in saved or set(saved[s]) != set(live) for s in wanted):
            self.begin(model, step)
            return False
        self.segment_start = segment_start
        self.base = {n: saved[segment_start][n].to(live[n].dtype) for n in live} if wanted else live
        self.snapshots = [(s - segment_start, {n: saved[s][n].to(live[n].dtype) for n in live})
                          for s in wanted[1:]]
        if step > segment_start:
            self.snapshots.append((step - segment_start, live))
        return True

    def after_step(self, model: torch.nn.Module, optimizer, real_step: int, step: int, *, max_step: int | None = None,
                   scheduler=None, rewards: Iterable[tuple[float, float]] | None = None) -> LeapDecision | None:
        """Record the weights after (virtual) ``step``; at the segment's end decide, and jump when allowed.

        ``rewards``: the mean training reward logged so far, ``(virtual step, reward)``; the verdict weighs the
        trend of those inside the segment (a reward that would reach 1 before the jump's end refuses it)."""
        if self.base is None:
            raise RuntimeError("Leaper.begin must be called before the first step")
        offset = step - self.segment_start
        if offset % self.options.snapshot_every:
            return None
        parameters = trainable_parameters(model)
        self.snapshots.append((offset, snapshot(parameters)))
        if offset < self.options.every:
            return None
        length = self.options.leap if max_step is None else min(self.options.leap, max_step - step)
        if length < 1:  # the run ends here: nothing to jump over
            self._restart(step)
            return None
        segment = [(float(s) - self.segment_start, float(r)) for s, r in (rewards or ())
                   if self.segment_start < s <= step and r is not None and math.isfinite(r)]
        decision = self._decide(model, parameters, optimizer, scheduler, real_step, step, length, segment)
        self.decisions.append(decision)
        return decision

    # -- internals ----------------------------------------------------------------------------------

    def _restart(self, step: int, base: dict[str, torch.Tensor] | None = None) -> None:
        self.segment_start = step
        self.base = base if base is not None else self.snapshots[-1][1]
        self.snapshots = []

    def _decide(self, model, parameters, optimizer, scheduler, real_step: int, step: int,
                length: int, rewards: list[tuple[float, float]]) -> LeapDecision:
        options = self.options
        started = time.perf_counter()
        offset = step - self.segment_start
        record = dict(real_step=real_step, from_step=step, to_step=step, length=length,
                      segment_start=self.segment_start, jumped=False)
        current = self.snapshots[-1][1]
        targets = [offset + length]
        if options.require == "probe":  # the jump length is chosen on the probe among a grid of them
            from relex.probe.search import target_grid  # start-up: only with a probe

            targets = target_grid(offset, offset + length) or targets
        try:
            fit = fit_segment(self.base, self.snapshots, targets, options.run, rewards)
        except Exception as exc:  # noqa: BLE001 — a failed fit leaves training as it was
            logger.warning("relex leap at step %d: no jump, the fit failed: %s", step, one_line(exc))
            self._restart(step)
            return LeapDecision(**record, reason="failed", verdict=None, message=one_line(exc),
                                seconds=time.perf_counter() - started)
        record.update(verdict=fit.verdict.to_dict(), message=fit.verdict.message, figures=fit.figures,
                      passes_gate=fit.passes_gate)
        prediction = fit.prediction
        if options.require == "probe":
            curve = self._probe(model, parameters, current, fit)
            record["probe"] = curve.to_dict()
            allowed = curve.chosen is not None
            if allowed:
                length, prediction = curve.chosen - offset, fit.predictions[curve.chosen]
                record["length"] = length
        else:
            allowed = {"plausible": fit.verdict.plausible, "lenient": fit.passes_gate,
                       "always": True}[options.require]
        if not allowed:
            logger.info("relex leap at step %d: no jump (%s)", step, fit.verdict.message)
            self._restart(step)
            return LeapDecision(**record, reason="refused", seconds=time.perf_counter() - started)
        before = float(options.check(model)) if options.check is not None else None
        self._write(parameters, prediction)
        try:
            after = float(options.check(model)) if options.check is not None else None
        except BaseException:
            self._write(parameters, current)  # a check that fails must not leave an unchecked jump behind
            raise
        record.update(check_before=before, check_after=after)
        if before is not None and after < before - options.check_tolerance:
            self._write(parameters, current)
            logger.info("relex leap at step %d: jump reverted (check %.4g -> %.4g)", step, before, after)
            self._restart(step)
            return LeapDecision(**record, reason="reverted", seconds=time.perf_counter() - started)
        if optimizer is not None and options.optimizer_state == "reset":
            inner_optimizer(optimizer).state.clear()
        if scheduler is not None and options.advance_scheduler:
            for _ in range(length):
                scheduler.step()
        record.update(to_step=step + length, jumped=True)
        logger.info("relex leap at step %d: jumped to step %d (%s)", step, step + length, fit.verdict.message)
        self._restart(step + length, base=prediction)
        return LeapDecision(**record, reason="jumped", seconds=time.perf_counter() - started)

    def _probe(self, model, parameters, current, fit: SegmentFit):
        """The probe's horizon search over the fit's candidate jumps, on the live model (its weights put back)."""
        from relex.probe.scoring import ProbeModel  # start-up: only with a probe
        from relex.probe.search import search

        options = self.options
        scorer = ProbeModel(model, options.probe, str(next(model.parameters()).device), tokenizer=options.tokenizer)
        try:
            reference = _OnWeights(scorer, parameters, current)
            reference.step = fit.steps[-1]
            return search(reference, {t: (lambda t=t: _OnWeights(scorer, parameters, fit.predictions[t]))
                                      for t in fit.predictions}, options.probe, mode=options.probe_mode,
                          confidence=options.probe_confidence, looks=options.probe_looks)
        finally:
            self._write(parameters, current)

    @staticmethod
    @torch.no_grad()
    def _write(parameters: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
        for name, p in parameters.items():
            p.copy_(values[name])


class _OnWeights:
    """A probe scorer of the live model with given weights written into it before it scores."""

    def __init__(self, scorer, parameters: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor]):
        self.scorer, self.parameters, self.values = scorer, parameters, values

    @property
    def tokens(self) -> int:
        return self.scorer.tokens

    def score(self, indices, mode: str):
        Leaper._write(self.parameters, self.values)
        return self.scorer.score(indices, mode)


__all__ = ["LEAP", "LeapDecision", "LeapOptions", "Leaper", "SegmentFit", "decisions_from_log", "fit_segment",
           "trainable_parameters"]
