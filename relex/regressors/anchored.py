"""Anchored, shrunk predictors: start from the last observed checkpoint, add only the expected drift.

A plain predictor draws its curve through the fitted coefficients: x̂(t*) = ĉ(t*)·v. Under noise that
accumulates like a random walk, the fitted direction v carries noise, and extrapolating stretches it by
t*/t_T. The anchored variant keeps the last observed delta as it is and extrapolates only the increment
the predictor expects beyond it, shrunk by λ ∈ [0, 1]:

    x̂(t*) = x_T + λ · (ĉ(t*) − ĉ(t_T)) · v.

λ = 0 is "stop at the last checkpoint", λ = 1 trusts the predicted increment fully. Spelled on the
command line as ``anchored`` (linear predictor), ``anchored-NAME`` (any predictor), with a fixed λ as
``anchored@0.5`` / ``anchored-NAME@0.5``; without ``@λ`` it is estimated per tensor:

* temporal modes (``relex``): from the drift + random-walk fit of the tensor's Gram matrix,
  G ≈ a²·t tᵀ + b²·min(t, t') (:func:`relex.subspace.fit_drift_noise`, the model of the drift diagnostics). Writing the predicted
  increment as a mix B of the deltas, the λ that minimises the expected error E‖x_T + λ·B X − x(t*)‖²
  under that model is

      λ = a²·(t* − t_T)·(B·t) / (a²·(B·t)² + b²·Bᵀ min(t, t') B),

  i.e. the share of the predicted increment that is drift rather than amplified noise (clipped to [0, 1]).
* ``matrix-rank1``: by a closed-form backtest on the observed window (fit on the first p checkpoints,
  λ = Σ_j κ_j·(⟨Δ_j − Δ_p, u_p v_pᵀ⟩) / Σ_j κ_j² over the held-out j, κ_j the predicted increment).
"""

from __future__ import annotations

import numpy as np


def drift_shrink(increment: np.ndarray, mix: np.ndarray, steps, a2: float, b2: float, targets) -> np.ndarray:
    """λ per target for predicted coefficient increments ``increment`` (n, k) along directions whose
    mixing rows are ``mix`` (T, k), under the drift + random-walk model (a², b²)."""
    t = np.asarray(steps, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    b = np.asarray(increment, dtype=np.float64) @ np.asarray(mix, dtype=np.float64).T  # (n, T)
    bt = b @ t
    bmb = np.einsum("ni,ij,nj->n", b, np.minimum.outer(t, t), b)
    numerator = a2 * (targets - t[-1]) * bt
    denominator = a2 * bt**2 + b2 * bmb
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)
    return np.clip(lam, 0.0, 1.0)


def backtest_shrink(increments: np.ndarray, gains: np.ndarray) -> float:
    """λ minimising Σ_j (gains_j − λ κ_j)² (κ = increments): Σ κ_j gains_j / Σ κ_j², clipped to [0, 1]."""
    increments = np.asarray(increments, dtype=np.float64)
    denominator = float(increments @ increments)
    if denominator <= 0:
        return 0.0
    return float(np.clip(float(increments @ np.asarray(gains, dtype=np.float64)) / denominator, 0.0, 1.0))
