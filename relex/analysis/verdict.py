"""The verdict: is extrapolating a run to a target step plausible? Its rules, all in this module.

One object computes it (:class:`RunVerdict`), from the same inputs for every caller — each tensor's Gram matrix
of its deltas, the observed steps, the target step and the training reward's trend — and returns a
:class:`Verdict` with a typed outcome. Its wording is :mod:`relex.analysis.wording`; its rendering (console,
Markdown, JSON) is left to whoever shows it.

The rules, in the order they apply:

1. **The drift share** of the summed Gram matrix (:func:`relex.analysis.drift.diagnose`) classes the run:
   drift-dominated at a share ≥ :data:`DRIFT_THRESHOLD`, noise-dominated below :data:`NOISE_THRESHOLD`, mixed
   in between (also when only a two-factor fit is coherent: a turning path). Fewer than 3 checkpoints are too
   short to tell. Under drift + random walk, extrapolating along the drift beats stopping at the last
   checkpoint exactly when the share exceeds 0.5, whatever the horizon, and its relative weight error far out
   tends to sqrt((1 − s) / s): 0.5 at s = 0.8, 0.33 at s = 0.9.
2. **Four calibration checks** (docs/verdict_calibration.md) keep a run from being called drift-dominated on
   the strength of part of it; each makes a drift-dominated run mixed. The first three see the weights only,
   and a run whose accuracy has already saturated looks to them like one still climbing; the fourth sees the
   training reward:

   - *balance*: the drift share with each weight matrix counted once
     (:func:`relex.analysis.drift.balanced_gram`) must clear the same threshold, so one tensor that moves far
     more than the rest (the embedding) cannot carry the whole-model figure alone;
   - *pace*: a run whose second half of the window moved at less than :data:`MIN_PACE_RATIO` of the pace of
     its first half (:func:`relex.analysis.drift.pace_ratio`) is decelerating, and a line would overshoot;
     one above :data:`MAX_PACE_RATIO` is accelerating, and its pace is not settled;
   - *reward*: a run whose training reward, fitted by a line over the window, reaches its ceiling before the
     target (:mod:`relex.analysis.reward`) must slow down before it.
3. **The window backtest**, with 4 checkpoints or more: a rank-1 line fitted on the first half of the window
   must predict its last checkpoint better than stopping at the last fitted one. Both errors are carried to
   the target: the line's in proportion to the distance beyond the window (the cautious assumption), stopping's
   as pure drift gives. A line that loses makes the run "will likely hurt", whatever the drift share; a target
   farther than :data:`MAX_CARRY` times the backtest's own horizon is never plausible; a line that wins by less
   than :data:`BACKTEST_MARGIN` is too close to call.

The gate (:meth:`Verdict.gate`) turns the outcome into pass or fail: plausible passes, "will likely hurt" and
"beyond the horizon" fail; mixed and inconclusive fail too, unless the gate is lenient (they then pass with a
warning). A probe, when one is given, decides instead (:mod:`relex.probe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from relex.analysis import wording
from relex.analysis.drift import DriftDiagnostics, balanced_gram, coherent_share, diagnose, pace_ratio
from relex.analysis.outcomes import Finding, Outcome
from relex.analysis.reward import RewardTrend
from relex.backtest import gram_errors
from relex.methods import get_method

# The drift classes (what relex.json, relex check and the callbacks have always called the verdict).
DRIFT = "drift-dominated"
MIXED = "mixed"
NOISE = "noise-dominated"

# Thresholds on the drift share s.
DRIFT_THRESHOLD = 0.8
NOISE_THRESHOLD = 0.5

# A run is called drift-dominated only when the pace of the second half of the window is at least
# MIN_PACE_RATIO times that of the first, and at most MAX_PACE_RATIO (above: accelerating, as a momentum
# optimizer's start; its pace is not settled).
MIN_PACE_RATIO = 0.75
MAX_PACE_RATIO = 1.5

# A carried backtest in which the line beats stopping by less than this fraction of stopping's error does not
# make a run plausible. It is smaller than the spread measured in docs/verdict_calibration.md: retraining a toy
# run with another thread count moved the ratio line / stop by a factor of up to 1.54, which only a margin of
# 0.35 (1 - 1/1.54) would cover; that margin still let saturated runs through and halved the runs called
# plausible where extrapolating helped, so it was not adopted, and a plausible call with a ratio above 0.65 may
# not repeat on another CPU or thread count.
BACKTEST_MARGIN = 0.2

# How far the window backtest may be carried (see :func:`horizon`): its line was checked over one horizon h_b
# (the farthest held-out step over the last fitted one, about 2); its error is carried to the target multiplied
# by k = (h − 1) / (h_b − 1). Beyond k = 10, an order of magnitude more extrapolation than the backtest checked,
# the carried error is an assumption rather than a measurement. The extrapolations relex is built for, from
# 10-20% of a run to its end, carry it 4-9 times.
MAX_CARRY = 10.0


@dataclass(frozen=True)
class WindowBacktest:
    """The window backtest's figures: a rank-1 line fitted up to ``fit_steps[-1]`` and stopping there, each
    scored at ``held_out_steps[-1]`` by its relative weight-space error (whole model; ``balanced``: the same
    with each weight matrix counted once, for information)."""

    fit_steps: tuple[int, ...]
    held_out_steps: tuple[int, ...]
    line_error: float
    stop_error: float
    balanced: tuple[float, float] | None = None


@dataclass(frozen=True)
class GateDecision:
    """Whether a gate passes, on which outcome, and why (one line)."""

    passed: bool
    outcome: Outcome
    reason: str
    lenient: bool = False  # mixed and inconclusive passed, with a warning
    decided_by: str = "weights"  # "weights" (the verdict) or "probe" (candidates scored on a probe set)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 3

    @property
    def warning(self) -> bool:
        """Passed, but not on a plausible verdict."""
        return self.passed and self.outcome is not Outcome.PLAUSIBLE

    @property
    def status(self) -> str:
        return "failed" if not self.passed else "passed with a warning" if self.warning else "passed"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": self.status, "exit_code": self.exit_code,
                "outcome": self.outcome.value, "reason": self.reason, "lenient": self.lenient,
                "decided_by": self.decided_by}


@dataclass(frozen=True)
class Verdict:
    """The verdict on a run: its outcome, the rule that decided it, and every figure behind it."""

    outcome: Outcome
    finding: Finding
    drift_class: str | None  # DRIFT, MIXED or NOISE; None when no tensor moved
    steps: tuple[int, ...]
    target_step: int | None  # the step the backtest was carried to (None: the window alone)
    diagnostics: DriftDiagnostics | None = field(default=None, repr=False)
    shape: str = ""  # how the coherent path departs from a line: "decelerating", "turning", …
    backtest: dict | None = None  # the window backtest's figures, carried to the target
    horizon: dict | None = None  # how far beyond the window the target lies (see horizon)
    calibration: dict | None = None  # the calibration checks' figures (balance, pace, reward)
    reward: RewardTrend | None = None
    margin: float = BACKTEST_MARGIN

    @property
    def plausible(self) -> bool:
        return self.outcome is Outcome.PLAUSIBLE

    @property
    def drift_share(self) -> float:
        return self.diagnostics.drift_share if self.diagnostics is not None else float("nan")

    @property
    def message(self) -> str:
        """The verdict in one sentence, with the evidence behind it."""
        return wording.message(self)

    def gate(self, lenient: bool = False) -> GateDecision:
        """Pass or fail: only a plausible verdict passes (the verdict vouches for nothing less); will likely hurt
        and beyond the horizon always fail; mixed and inconclusive pass when ``lenient``, with a warning."""
        if self.outcome is Outcome.PLAUSIBLE:
            passed = True
        elif self.outcome in (Outcome.MIXED, Outcome.INCONCLUSIVE):
            passed = lenient
        else:
            passed = False
        return GateDecision(passed, self.outcome, wording.gate_reason(self, passed, lenient), lenient)

    def to_dict(self) -> dict:
        """Every figure of the verdict, as JSON-able values (the same for every command that reports it)."""
        return {
            "outcome": self.outcome.value,
            "finding": self.finding.value,
            "verdict": self.drift_class,
            "message": self.message,
            "drift_share": self.drift_share,
            "steps": list(self.steps),
            "target_step": self.target_step,
            "horizon": None if self.horizon is None else {**self.horizon, "text": wording.horizon_text(self.horizon)},
            "backtest": self.backtest,
            "calibration": self.calibration,
            "reward": None if self.reward is None else self.reward.to_dict(),
            "thresholds": {"drift_dominated": DRIFT_THRESHOLD, "noise_dominated": NOISE_THRESHOLD,
                           "backtest_margin": self.margin, "max_carry": MAX_CARRY},
            "diagnostics": None if self.diagnostics is None else self.diagnostics.to_dict(),
        }


# ------------------------------------------------------------------ the rules


def drift_class(diagnostics: DriftDiagnostics) -> tuple[str, Finding, str]:
    """Rule 1: the class of a trajectory from its drift share alone, the finding, and the path's shape."""
    share = diagnostics.drift_share
    turning = diagnostics.turning
    if len(diagnostics.steps) < 3 or not math.isfinite(share):
        return MIXED, Finding.TOO_SHORT, ""
    shape = path_shape(turning)
    if share >= DRIFT_THRESHOLD:
        return DRIFT, (Finding.CURVED if shape else Finding.DRIFT), shape
    if turning is not None and turning.share >= DRIFT_THRESHOLD:
        return MIXED, Finding.TURNING, shape
    if share < NOISE_THRESHOLD:
        return NOISE, Finding.NOISE, shape
    return MIXED, Finding.MIXED, shape


def path_shape(fit) -> str:
    """How the coherent path departs from a straight line through the base ("" when it does not)."""
    if fit is None:
        return ""
    notes = []
    if math.isfinite(fit.coherent_alpha):
        if fit.coherent_alpha < 0.8:
            notes.append("decelerating")
        elif fit.coherent_alpha > 1.25:
            notes.append("accelerating")
    if math.isfinite(fit.coherent_cos) and fit.coherent_cos < 0.85:
        notes.append("turning")
    return " and ".join(notes)


def verdict_holdout(n_steps: int) -> int | None:
    """Checkpoints the window backtest holds out: the second half of the window (horizon about 2x), keeping at
    least two to fit; None when the window is too short (fewer than 4 checkpoints)."""
    if n_steps < 4:
        return None
    return n_steps - max(2, (n_steps + 1) // 2)


def horizon(steps, target_step, fit_steps=None, held_out_steps=None) -> dict | None:
    """How far beyond the observed window ``target_step`` lies, and whether the window backtest reaches it.

    ``None`` without a target. The record holds the target, the window and the ratio of the target to the last
    observed step and, with the backtest's ``fit_steps`` and ``held_out_steps``: the backtest's own horizon
    ``backtest_ratio`` (h_b), the factor ``carry`` by which its error is carried to the target, and the
    farthest step it can vouch for (``max_target_step``, where the carry reaches :data:`MAX_CARRY`);
    ``within_limit`` is False beyond it. Any integer target is accepted (a step too large for a float is an
    infinite ratio).
    """
    if target_step is None or not len(steps):
        return None
    first, last = steps[0], steps[-1]
    target = _as_float(target_step)
    last_value = float(last)
    ratio = target / last_value if last_value > 0 else math.inf
    record = {"target_step": int(target_step) if isinstance(target_step, (int, np.integer)) else target,
              "first_observed_step": _step_value(first), "last_observed_step": _step_value(last), "ratio": ratio}
    if target > last_value and fit_steps is not None and held_out_steps is not None and len(fit_steps) \
            and len(held_out_steps):
        fit_last, held_last = float(fit_steps[-1]), float(held_out_steps[-1])
        if fit_last > 0 and held_last > fit_last:
            h_b = held_last / fit_last
            carry = (ratio - 1.0) / (h_b - 1.0)
            max_ratio = 1.0 + MAX_CARRY * (h_b - 1.0)
            record.update(backtest_ratio=h_b, carry=carry, max_carry=MAX_CARRY, max_ratio=max_ratio,
                          max_target_step=int(math.floor(last_value * max_ratio)), within_limit=carry <= MAX_CARRY)
    return record


def horizon_limit(steps) -> int | None:
    """The farthest target step the window backtest of ``steps`` can vouch for (:data:`MAX_CARRY` times its own
    horizon), or None when the window is too short for a backtest."""
    holdout = verdict_holdout(len(steps))
    if holdout is None:
        return None
    p = len(steps) - holdout
    reach = horizon(list(steps), float("inf"), steps[:p], steps[p:])
    return None if reach is None else reach.get("max_target_step")


def decide(diagnostics: DriftDiagnostics | None, *, target_step=None, backtest: WindowBacktest | None = None,
           calibration: dict | None = None, reward: RewardTrend | None = None, margin: float | None = None,
           steps=None) -> Verdict:
    """The verdict from its figures: the drift statistics (``None`` when nothing moved), the window backtest,
    the calibration checks' figures (``None``: not applied) and the reward's trend, carried to ``target_step``.

    ``calibration`` holds ``balanced_drift_share``, ``pace_ratio`` and ``whole_model_pace_ratio``; ``margin``
    replaces :data:`BACKTEST_MARGIN`.
    """
    margin = BACKTEST_MARGIN if margin is None else float(margin)
    steps = tuple(int(s) for s in (diagnostics.steps if diagnostics is not None else steps or ()))
    target = None if target_step is None else _target_value(target_step)
    if diagnostics is None:
        return Verdict(Outcome.INCONCLUSIVE, Finding.STATIC, None, steps, target, margin=margin)
    label, finding, shape = drift_class(diagnostics)
    if calibration is not None:
        calibration = {**calibration, "min_pace_ratio": MIN_PACE_RATIO, "max_pace_ratio": MAX_PACE_RATIO,
                       "reward": None if reward is None else reward.to_dict()}
        if label == DRIFT:
            label, finding = _calibrated(finding, calibration, reward)
    record = reach = None
    if backtest is not None:
        record, reach, label, finding = _carried(backtest, steps, target, label, finding, margin)
    elif target is not None:
        reach = horizon(steps, target)
    beyond = reach is not None and reach.get("within_limit") is False
    if label == NOISE or (record or {}).get("line_beats_stop") is False:
        outcome = Outcome.HURT
    elif beyond:
        outcome = Outcome.BEYOND
    elif label == DRIFT:
        outcome = Outcome.PLAUSIBLE
    elif finding is Finding.TOO_SHORT:
        outcome = Outcome.INCONCLUSIVE
    else:
        outcome = Outcome.MIXED
    return Verdict(outcome, finding, label, steps, target, diagnostics, shape, record, reach, calibration, reward,
                   margin)


def _calibrated(finding: Finding, calibration: dict, reward: RewardTrend | None) -> tuple[str, Finding]:
    """Rule 2 on a drift-dominated run: the first check that fails makes it mixed."""
    share = calibration["balanced_drift_share"]
    if math.isfinite(share) and share < DRIFT_THRESHOLD:
        return MIXED, Finding.UNBALANCED
    paces = [x for x in (calibration["pace_ratio"], calibration["whole_model_pace_ratio"]) if math.isfinite(x)]
    if paces and min(paces) < MIN_PACE_RATIO:
        return MIXED, Finding.DECELERATING
    if paces and max(paces) > MAX_PACE_RATIO:
        return MIXED, Finding.ACCELERATING
    if reward is not None and reward.saturates_before_target:
        return MIXED, Finding.REWARD_SATURATES
    return DRIFT, finding


def _carried(backtest: WindowBacktest, steps, target, label: str, finding: Finding,
             margin: float) -> tuple[dict, dict | None, str, Finding]:
    """Rule 3: the window backtest carried to the target; its record, the horizon, and the verdict after it."""
    fit, held = list(backtest.fit_steps), list(backtest.held_out_steps)
    line, stop = float(backtest.line_error), float(backtest.stop_error)
    record = {"fit_steps": fit, "held_out_steps": held, "line_error": line, "stop_error": stop}
    if backtest.balanced is not None:  # for information: the same errors with each matrix counted once
        record["balanced"] = {"line_error": float(backtest.balanced[0]), "stop_error": float(backtest.balanced[1])}
    reach = horizon(steps, target, fit, held)
    if reach is not None:
        record["horizon"] = reach
    if not (math.isfinite(line) and math.isfinite(stop)):
        return record, reach, label, finding
    if target is not None and target > steps[-1] and held[-1] > fit[-1]:
        h_backtest = held[-1] / fit[-1]
        h_target = _as_float(target) / float(steps[-1])
        carry = (h_target - 1.0) / (h_backtest - 1.0)
        line = line * carry if line > 0 else 0.0  # never 0 × ∞
        stop = stop * (1.0 - 1.0 / h_target) / (1.0 - 1.0 / h_backtest)
        record.update(target_step=_as_float(target), projected_line_error=line, projected_stop_error=stop)
    record["line_beats_stop"] = bool(line < stop)
    beyond = reach is not None and reach.get("within_limit") is False
    if line >= stop:
        return record, reach, (MIXED if label == DRIFT else NOISE), Finding.LINE_LOSES
    if beyond and label == DRIFT:
        return record, reach, MIXED, Finding.BEYOND
    if line > (1.0 - margin) * stop and label == DRIFT:
        # the line wins, but by less than the margin; the same run retrained on another CPU or thread count
        # moves these figures by more (docs/verdict_calibration.md): too close to call
        record["within_margin"] = True
        return record, reach, MIXED, Finding.TOO_CLOSE
    return record, reach, label, finding


def _as_float(value) -> float:
    """``float(value)``, with integers too large for a float as infinity (never an OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _target_value(step):
    """A target step as an int when it is one (however large); an infinite or fractional one as given."""
    if isinstance(step, (int, np.integer)):
        return int(step)
    value = _as_float(step)
    return int(value) if math.isfinite(value) and value.is_integer() else value


def _step_value(step):
    value = float(step)
    return int(value) if value.is_integer() else value


# ------------------------------------------------------------------ the one object that computes it


class RunVerdict:
    """The verdict of a run, built tensor by tensor as a pass reads it: :meth:`add` each tensor's Gram matrix,
    then :meth:`judge`. It sums, over tensors, the Gram-space backtest errors of a rank-1 linear line and of
    stopping, and keeps each moving tensor's Gram matrix for the balance check.

    ``calibrated=False`` gives the verdict without the balance, pace and reward checks (whole-model figures
    only), as relex gave it before its calibration, for comparison; ``margin`` replaces
    :data:`BACKTEST_MARGIN` (the calibration harness scores other margins with it).
    """

    def __init__(self, steps, calibrated: bool = True, margin: float | None = None):
        self.calibrated = calibrated
        self.margin = margin
        self.steps = np.asarray(steps, dtype=np.float64)
        self.holdout = verdict_holdout(len(self.steps))
        self.run_gram = np.zeros((len(self.steps), len(self.steps)))
        self.sums = np.zeros(3)  # line error², stop error², true norm² at the farthest held-out step
        self.relative = np.zeros(2)  # Σ over matrices of (line error² / true norm², stop error² / true norm²)
        self.matrices = 0
        self.vectors = np.zeros(2)  # the same over the other tensors (used when no matrix moved)
        self.others = 0
        self.grams: dict[str, np.ndarray] = {}  # each moving tensor's T×T Gram matrix, for the balance check
        self.ndims: dict[str, int] = {}
        if self.holdout is not None:
            self.line, self.stop = get_method("relex"), get_method("last")

    def add(self, name: str, gram: np.ndarray, ndim: int) -> None:
        """One floating-point tensor's Gram matrix (``ndim``: its number of dimensions)."""
        self.run_gram = self.run_gram + gram
        if not np.any(gram):
            return
        self.grams[name], self.ndims[name] = gram, ndim
        if self.holdout is None:
            return
        line, true_sq = gram_errors(gram, self.steps, self.line, self.holdout, tensor=name, ndim=ndim)
        stop, _ = gram_errors(gram, self.steps, self.stop, self.holdout, tensor=name, ndim=ndim)
        self.sums += (line[-1], stop[-1], true_sq[-1])
        if true_sq[-1] > 0:
            ratios = np.array([line[-1], stop[-1]]) / true_sq[-1]
            if ndim >= 2:
                self.relative += ratios
                self.matrices += 1
            else:
                self.vectors += ratios
                self.others += 1

    def judge(self, target_step=None, reward: RewardTrend | None = None) -> Verdict:
        """The verdict, the window backtest carried to ``target_step`` (None: the window alone), weighing the
        training reward's trend when given."""
        steps = [int(s) for s in self.steps]
        diagnostics = diagnose(self.run_gram, list(self.steps)) if np.any(self.run_gram) else None
        calibration = self._calibration() if diagnostics is not None and self.calibrated else None
        return decide(diagnostics, target_step=target_step, backtest=self._backtest(), calibration=calibration,
                      reward=reward if self.calibrated else None, margin=self.margin if self.calibrated else 0.0,
                      steps=steps)

    def _backtest(self) -> WindowBacktest | None:
        if self.holdout is None or self.sums[2] <= 0:
            return None
        p = len(self.steps) - self.holdout
        line, stop = np.sqrt(self.sums[:2] / self.sums[2])
        return WindowBacktest(tuple(int(s) for s in self.steps[:p]), tuple(int(s) for s in self.steps[p:]),
                              float(line), float(stop), self._balanced_errors())

    def _balanced_errors(self) -> tuple[float, float]:
        """Root-mean-square relative errors (line, stop) with each matrix counted once."""
        if self.matrices:
            return tuple(float(x) for x in np.sqrt(self.relative / self.matrices))
        if self.others:
            return tuple(float(x) for x in np.sqrt(self.vectors / self.others))
        return float("nan"), float("nan")

    def _calibration(self) -> dict:
        balanced = balanced_gram(self.grams, self.ndims)
        steps = self.steps
        return {"balanced_drift_share": coherent_share(balanced, steps, factors=1).share if balanced is not None
                else float("nan"),
                "pace_ratio": pace_ratio(balanced, steps) if balanced is not None else float("nan"),
                "whole_model_pace_ratio": pace_ratio(self.run_gram, steps)}


def run_verdict(grams: Mapping[str, np.ndarray], ndims: Mapping[str, int], steps, target_step=None, *,
                calibrated: bool = True, margin: float | None = None,
                reward: RewardTrend | None = None) -> Verdict:
    """The verdict of a run from its per-tensor Gram matrices (``ndims``: each tensor's number of dimensions),
    the window backtest carried to ``target_step``; see :class:`RunVerdict`."""
    verdict = RunVerdict(steps, calibrated=calibrated, margin=margin)
    for name, gram in grams.items():
        verdict.add(name, gram, ndims[name])
    return verdict.judge(target_step, reward)
