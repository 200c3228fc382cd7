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

from relex.methods import Method, TensorData


def default_holdout(n_steps: int) -> int:
    """Hold out the last quarter of the window (at least one checkpoint, keeping at least three to fit)."""
    return max(1, min(n_steps - 3, int(round(0.25 * n_steps)))) if n_steps >= 4 else 1


def gram_errors(gram: np.ndarray, steps, method: Method, holdout: int, *, tensor: str = "",
                ndim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Squared prediction errors and squared true norms of the ``holdout`` last deltas of one tensor, the
    model at its own scale (from :func:`products`)."""
    data = TensorData(tensor, (0,) * ndim, np.asarray(steps, dtype=np.float64), np.asarray(gram, dtype=np.float64))
    cross, predicted_sq, true_sq = products(method, data, holdout, scale=None)
    return np.clip(true_sq - 2 * cross + predicted_sq, 0.0, None), true_sq


def mixing_weights(method: Method, gram: np.ndarray, steps, targets, *, tensor: str = "", ndim: int = 2) -> np.ndarray:
    """Mixing weights A (n_targets, T) of ``method`` fitted on a Gram matrix alone: x̂(t*) = Σ_i A_i x_i."""
    data = TensorData(tensor, (0,) * ndim, np.asarray(steps, dtype=np.float64), np.asarray(gram, dtype=np.float64))
    model = method.fit_tensor(data)
    if model.factors:
        raise ValueError(f"method {model.params['method']!r} needs the weight matrices, not only G")
    return model.mixing(np.asarray(targets, dtype=np.float64))


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


# -- backtests of fitted tensor models (any mode, any predictor, any scale) -------------------------------


def products(method: Method, data: TensorData, holdout: int, *, regressor=None, shared=None,
             scale: float | None = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(⟨x̂_j, x_j⟩, ‖x̂_j‖², ‖x_j‖²) for the ``holdout`` last checkpoints of one tensor (a
    :class:`relex.methods.TensorData`), the model fitted on the others at ``scale`` (1 by default; ``None``:
    the method's own).

    The squared error of the model at scale s is then ‖x_j‖² − 2s⟨x̂_j, x_j⟩ + s²‖x̂_j‖², so a backtest
    also gives the best scale in closed form. Each method computes these (``backtest_products``): temporal
    models from G alone, per-matrix models from the singular triples the engine measured.
    """
    return method.backtest_products(data, holdout, regressor=regressor, shared=shared, scale=scale)


def best_scale(cross: float, predicted_sq: float, bounds: tuple[float, float] = (0.0, 2.0)) -> float:
    """The scale s minimising ‖s x̂ − x‖² summed as given: ⟨x̂, x⟩ / ‖x̂‖², clipped to ``bounds``."""
    if predicted_sq <= 0:
        return 1.0
    return float(np.clip(cross / predicted_sq, *bounds))


def relative_error(cross, predicted_sq, true_sq, scale: float = 1.0):
    """‖s x̂ − x‖ / ‖x‖ from the products (elementwise over arrays)."""
    cross, predicted_sq, true_sq = (np.asarray(a, dtype=np.float64) for a in (cross, predicted_sq, true_sq))
    sq = np.clip(true_sq - 2 * scale * cross + scale**2 * predicted_sq, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(np.where(true_sq > 0, sq / np.where(true_sq > 0, true_sq, 1.0), 0.0))
