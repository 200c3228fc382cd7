"""Backtests in weight space, computed exactly from Gram matrices.

Fit a trajectory model on the first part of the observed window and predict the held-out last observed
checkpoints. Because every temporal model predicts x̂_j = Σ_i A_ji x_i (a mix of the fitted deltas), the
squared error ‖x_j − x̂_j‖² = G_jj − 2 A_j·G[:p, j] + A_j G[:p, :p] A_jᵀ needs only the Gram matrix of
the whole window: no checkpoint is read again.

Errors are relative to the true update: ‖x̂_j − x_j‖ / ‖x_j‖ (1.0 means "as bad as not moving at all").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from relex.methods import Method


def default_holdout(n_steps: int) -> int:
    """Hold out the last quarter of the window (at least one checkpoint, keeping at least three to fit)."""
    return max(1, min(n_steps - 3, int(round(0.25 * n_steps)))) if n_steps >= 4 else 1


def gram_errors(gram: np.ndarray, steps, method: Method, holdout: int, *, tensor: str = "",
                ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Squared prediction errors and squared true norms of the ``holdout`` last deltas of one tensor."""
    g = np.asarray(gram, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.float64)
    p = len(steps) - holdout
    if p < 2:
        raise ValueError(f"a backtest needs at least 2 checkpoints to fit, got {p}")
    weights = method.plan(g[:p, :p], steps[:p], steps[p:], tensor=tensor, ndim=ndim).weights  # (h, p)
    cross = g[:p, p:]  # ⟨x_i, x_j⟩ for fitted i and held-out j
    true_sq = np.diag(g)[p:]
    predicted_sq = np.einsum("ji,ik,jk->j", weights, g[:p, :p], weights)
    sq_errors = true_sq - 2 * np.einsum("ji,ij->j", weights, cross) + predicted_sq
    return np.clip(sq_errors, 0.0, None), true_sq


@dataclass
class Backtest:
    """Relative weight-space errors of several models on the held-out end of the window."""

    fit_steps: list[int]
    held_out_steps: list[int]
    errors: dict[str, np.ndarray]  # model -> (holdout,) whole-model relative error per held-out step
    per_tensor: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> tensor -> error at the last

    def best(self) -> str:
        """The model with the smallest error at the farthest held-out step."""
        return min(self.errors, key=lambda m: self.errors[m][-1])

    def table(self) -> list[dict]:
        rows = []
        for model, errs in self.errors.items():
            for step, err in zip(self.held_out_steps, errs):
                rows.append({"model": model, "held_out_step": step,
                             "horizon": step / self.fit_steps[-1], "relative_error": float(err)})
        return rows


def backtest(grams: Mapping[str, np.ndarray], steps, methods: Mapping[str, Method], holdout: int | None = None,
             ndims: Mapping[str, int] | None = None, per_tensor: bool = False) -> Backtest:
    """Backtest each model on every tensor's Gram matrix; whole-model errors sum over tensors."""
    steps = [int(s) for s in steps]
    holdout = default_holdout(len(steps)) if holdout is None else holdout
    p = len(steps) - holdout
    errors, details = {}, {}
    for label, method in methods.items():
        total_err = np.zeros(holdout)
        total_true = np.zeros(holdout)
        details[label] = {}
        for name, g in grams.items():
            ndim = (ndims or {}).get(name, 2)
            sq_err, true_sq = gram_errors(g, steps, method, holdout, tensor=name, ndim=ndim)
            total_err += sq_err
            total_true += true_sq
            if per_tensor:
                details[label][name] = float(np.sqrt(sq_err[-1] / true_sq[-1])) if true_sq[-1] > 0 else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            errors[label] = np.sqrt(np.where(total_true > 0, total_err / total_true, 0.0))
    return Backtest(steps[:p], steps[p:], errors, details if per_tensor else {})
