"""The whole-run verdict: is extrapolating this run to a target step plausible?

One place computes it, from the per-tensor Gram matrices of the deltas, for every command that reports it
(``relex extrapolate``, ``relex analyze``, ``relex fit``): the drift statistics of the summed run Gram
matrix (:func:`relex.analysis.drift.diagnose`), then a backtest on the observed window — a line fitted on
the first half of the window must predict its second half, and carried to the target, better than
stopping (:func:`relex.analysis.drift.apply_backtest`).

Four checks calibrated on toy runs (docs/verdict_calibration.md) keep a run from being called
drift-dominated on the strength of part of it. The first three see the weights only, and a run whose
accuracy has already saturated inside the window looks to them like one that is still climbing; the fourth
sees the training reward, when the run logged it.

- *balance*: the drift share is also computed with each weight matrix counted once
  (:func:`relex.analysis.drift.balanced_gram`) and must clear the same threshold, so one tensor that moves
  far more than the rest (the embedding) cannot carry the whole-model figure alone;
- *pace*: a run whose second half of the window moved at less than
  :data:`~relex.analysis.drift.MIN_PACE_RATIO` of the pace of its first half
  (:func:`relex.analysis.drift.pace_ratio`) is decelerating, and a line would overshoot it; one above
  :data:`~relex.analysis.drift.MAX_PACE_RATIO` is accelerating, and its pace is not settled;
- *reward*: a run whose training reward, fitted by a line over the window, would reach its ceiling before
  the target step (:mod:`relex.analysis.reward`) must slow down before the target, and a line would
  overshoot it;
- *margin*: a line that beats stopping in the carried backtest by less than
  :data:`~relex.analysis.drift.BACKTEST_MARGIN` is too close to call.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from relex.analysis.drift import (DRIFT, MIXED, DriftDiagnostics, apply_backtest, balanced_gram, coherent_share,
                                  diagnose, pace_ratio, verdict_holdout, MAX_PACE_RATIO, MIN_PACE_RATIO,
                                  DRIFT_THRESHOLD)
from relex.analysis.reward import RewardTrend
from relex.backtest import gram_errors
from relex.methods import get_method


class RunVerdict:
    """The verdict of a run, built tensor by tensor: every caller (the engine's passes, ``relex check``, the
    training-loop callbacks) feeds it the same Gram matrices and gets the same verdict.

    Feed it each tensor's Gram matrix as it is known (:meth:`add`), then :meth:`judge` the run from its
    whole-model Gram matrix. It sums, over tensors, the Gram-space backtest errors of a rank-1 linear line and
    of stopping, and the balanced Gram matrix of the calibration checks.
    """

    def __init__(self, steps, calibrated: bool = True, margin: float | None = None):
        self.calibrated = calibrated
        self.margin = margin  # None: BACKTEST_MARGIN (see apply_backtest)
        self.steps = np.asarray(steps, dtype=np.float64)
        self.holdout = verdict_holdout(len(self.steps))
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

    def balanced_errors(self) -> tuple[float, float]:
        """Root-mean-square relative errors (line, stop) with each matrix counted once."""
        if self.matrices:
            return tuple(np.sqrt(self.relative / self.matrices))
        if self.others:
            return tuple(np.sqrt(self.vectors / self.others))
        return float("nan"), float("nan")

    def judge(self, run_gram: np.ndarray, target_step: float | None = None,
              reward: RewardTrend | None = None) -> DriftDiagnostics | None:
        """The run's drift diagnostics (``None`` when nothing moved) from its whole-model Gram matrix, with the
        calibration checks (when ``calibrated``), the training reward's trend (when given) and the window
        backtest carried to ``target_step`` applied."""
        diagnostics = diagnose(run_gram, list(self.steps)) if np.any(run_gram) else None
        if diagnostics is not None and self.calibrated:
            self._calibration_checks(diagnostics, run_gram, reward)
        return self._backtest(diagnostics, target_step)

    def _backtest(self, diagnostics: DriftDiagnostics | None, target_step: float | None) -> DriftDiagnostics | None:
        """``diagnostics`` with the backtest's figures and, when it fails, a downgraded verdict."""
        if diagnostics is None or self.holdout is None or self.sums[2] <= 0:
            return diagnostics
        p = len(self.steps) - self.holdout
        line, stop = np.sqrt(self.sums[:2] / self.sums[2])
        b_line, b_stop = self.balanced_errors()
        result = apply_backtest(diagnostics, self.steps[:p], self.steps[p:], line, stop, target_step,
                                margin=self.margin if self.calibrated else 0.0)
        if result.backtest is not None:  # for information: the same errors with each matrix counted once
            result.backtest["balanced"] = {"line_error": float(b_line), "stop_error": float(b_stop)}
        return result

    def _calibration_checks(self, diagnostics: DriftDiagnostics, run_gram: np.ndarray,
                            reward: RewardTrend | None) -> None:
        """Balanced drift share, pace ratio and the reward's trend: recorded in ``diagnostics.calibration``;
        each can turn a drift-dominated verdict into a mixed one."""
        steps = self.steps
        balanced = balanced_gram(self.grams, self.ndims)
        share = coherent_share(balanced, steps, factors=1).share if balanced is not None else float("nan")
        pace = pace_ratio(balanced, steps) if balanced is not None else float("nan")
        whole_pace = pace_ratio(run_gram, steps)
        diagnostics.calibration = {"balanced_drift_share": share, "pace_ratio": pace,
                                   "whole_model_pace_ratio": whole_pace, "min_pace_ratio": MIN_PACE_RATIO,
                                   "max_pace_ratio": MAX_PACE_RATIO,
                                   "reward": None if reward is None else reward.to_dict()}
        if diagnostics.verdict != DRIFT:
            return
        if math.isfinite(share) and share < DRIFT_THRESHOLD:
            diagnostics.verdict = MIXED
            diagnostics.message = (f"drift carried by a few tensors: the whole-model drift share is "
                                   f"{diagnostics.drift_share:.2f}, but {share:.2f} with each weight matrix "
                                   "counted once; extrapolate only a short horizon and check the backtest")
            return
        slowest = min((x for x in (pace, whole_pace) if math.isfinite(x)), default=float("nan"))
        if math.isfinite(slowest) and slowest < MIN_PACE_RATIO:
            diagnostics.verdict = MIXED
            diagnostics.message = (f"decelerating inside the window: the second half moved at {slowest:.2f} of "
                                   "the pace of the first, so a line through the base will overshoot")
            return
        fastest = max((x for x in (pace, whole_pace) if math.isfinite(x)), default=float("nan"))
        if math.isfinite(fastest) and fastest > MAX_PACE_RATIO:
            diagnostics.verdict = MIXED
            diagnostics.message = (f"accelerating inside the window: the second half moved at {fastest:.2f} times "
                                   "the pace of the first, so the pace a line would follow is not settled")
            return
        if reward is not None and reward.saturates_before_target:
            diagnostics.verdict = MIXED
            diagnostics.message = (f"the training reward saturates before the target: its trend over the window "
                                   f"reaches {reward.ceiling:g} at step {reward.ceiling_step:.0f}, before step "
                                   f"{reward.target_step:g}, so the run must slow down and a line will overshoot")


def run_verdict(grams: Mapping[str, np.ndarray], ndims: Mapping[str, int], steps,
                target_step: float | None = None, *, calibrated: bool = True,
                margin: float | None = None, reward: RewardTrend | None = None) -> DriftDiagnostics | None:
    """The verdict of a run from its per-tensor Gram matrices (``None`` when nothing moved).

    ``ndims`` gives each tensor's number of dimensions; ``target_step`` is the step to extrapolate to
    (the window backtest is carried there). ``calibrated=False`` gives the verdict without the balance, pace
    and reward checks (whole-model figures only), as relex gave it before its calibration, for comparison.
    ``margin`` replaces :data:`~relex.analysis.drift.BACKTEST_MARGIN` (the calibration harness scores other
    margins with it). ``reward`` is the training reward's trend over the window
    (:func:`relex.analysis.reward.reward_trend`, carried to the same target).
    """
    n = len(steps)
    run_gram = sum(grams.values()) if grams else np.zeros((n, n))
    verdict = RunVerdict(steps, calibrated=calibrated, margin=margin)
    for name, gram in grams.items():
        verdict.add(name, gram, ndims[name])
    return verdict.judge(run_gram, target_step, reward)
