"""The whole-run verdict: is extrapolating this run to a target step plausible?

One place computes it, from the per-tensor Gram matrices of the deltas, for every command that reports it
(``relex extrapolate``, ``relex analyze``, ``relex fit``): the drift statistics of the summed run Gram
matrix (:func:`relex.analysis.drift.diagnose`), then a backtest on the observed window — a line fitted on
the first half of the window must predict its second half, and carried to the target, better than
stopping (:func:`relex.analysis.drift.apply_backtest`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from relex.analysis.drift import DriftDiagnostics, apply_backtest, diagnose, verdict_holdout
from relex.backtest import gram_errors
from relex.methods import get_method


class VerdictBacktest:
    """Sums, over tensors, the Gram-space backtest errors of a rank-1 linear line and of stopping.

    Feed it each tensor's Gram matrix as it is known (:meth:`add`), then :meth:`apply` it to the run's
    drift diagnostics.
    """

    def __init__(self, steps):
        self.steps = np.asarray(steps, dtype=np.float64)
        self.holdout = verdict_holdout(len(self.steps))
        self.sums = np.zeros(3)  # line error², stop error², true norm² at the farthest held-out step
        if self.holdout is not None:
            self.line, self.stop = get_method("relex"), get_method("last")

    def add(self, name: str, gram: np.ndarray, ndim: int) -> None:
        if self.holdout is None or not np.any(gram):
            return
        line, true_sq = gram_errors(gram, self.steps, self.line, self.holdout, tensor=name, ndim=ndim)
        stop, _ = gram_errors(gram, self.steps, self.stop, self.holdout, tensor=name, ndim=ndim)
        self.sums += (line[-1], stop[-1], true_sq[-1])

    def apply(self, diagnostics: DriftDiagnostics | None, target_step: float | None = None) -> DriftDiagnostics | None:
        """``diagnostics`` with the backtest's figures and, when it fails, a downgraded verdict."""
        if diagnostics is None or self.holdout is None or self.sums[2] <= 0:
            return diagnostics
        p = len(self.steps) - self.holdout
        line, stop = np.sqrt(self.sums[:2] / self.sums[2])
        return apply_backtest(diagnostics, self.steps[:p], self.steps[p:], line, stop, target_step)


def run_verdict(grams: Mapping[str, np.ndarray], ndims: Mapping[str, int], steps,
                target_step: float | None = None) -> DriftDiagnostics | None:
    """The verdict of a run from its per-tensor Gram matrices (``None`` when nothing moved).

    ``ndims`` gives each tensor's number of dimensions; ``target_step`` is the step to extrapolate to
    (the window backtest is carried there).
    """
    n = len(steps)
    run_gram = sum(grams.values()) if grams else np.zeros((n, n))
    check = VerdictBacktest(steps)
    for name, gram in grams.items():
        check.add(name, gram, ndims[name])
    return check.apply(diagnose(run_gram, list(steps)) if np.any(run_gram) else None, target_step)
