"""Drift diagnostics of a trajectory from the Gram matrix of its deltas.

Explained variance and the R² of the coefficient look "linear" even for a pure random walk, so they
cannot say whether extrapolation is safe. These statistics can, when compared with their values for a
random walk over the same steps (the *null*) and for pure drift:

* ``alpha``: growth exponent of ‖x_t‖ ∝ t^α (random walk 0.5, drift 1);
* ``drift_ratio``: ‖x_T‖² / Σ_i ‖x_i − x_{i−1}‖² (x_0 = 0; random walk 1, drift (Σ Δt)² / Σ Δt²);
* ``cos_first_last``: cosine of the first and last deltas (random walk √(t_1/t_T), drift 1);
* ``prefix_cos``: cosine between the top direction of the first ``prefix_fraction`` of the window and of
  the whole window (drift 1).

Everything is computed from G = X Xᵀ (x_i = w_{t_i} − w_0), so it costs nothing beyond the Gram pass
the engine makes anyway. The nulls are computed, not assumed: they are the same statistics evaluated on
the expected Gram matrix of a random walk at the same steps, E[G_ij] ∝ min(t_i, t_j), which is what a
high-dimensional random walk concentrates on; pure drift has G_ij ∝ t_i t_j.

A drift + random-walk model G ≈ a²·t tᵀ + b²·min(t, t') fitted to G gives the share of the last delta's
squared norm that is drift, and the expected weight-space error of extrapolating along the fitted line
versus stopping at the last checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import nnls

DRIFT = "drift-dominated"
MIXED = "mixed"
NOISE = "noise-dominated"


def random_walk_gram(steps) -> np.ndarray:
    """Expected Gram matrix of a random walk observed at ``steps`` (unit variance per step)."""
    t = np.asarray(steps, dtype=np.float64)
    return np.minimum.outer(t, t)


def pure_drift_gram(steps) -> np.ndarray:
    """Gram matrix of a straight line through the base observed at ``steps``."""
    t = np.asarray(steps, dtype=np.float64)
    return np.outer(t, t)


def _top_vector(g: np.ndarray) -> tuple[np.ndarray, float]:
    values, vectors = np.linalg.eigh(0.5 * (g + g.T))
    return vectors[:, -1], float(math.sqrt(max(values[-1], 0.0)))


@dataclass
class DriftStats:
    """Statistics of one Gram matrix (see the module docstring)."""

    alpha: float
    drift_ratio: float
    drift_ratio_max: float
    cos_first_last: float
    prefix_cos: float
    explained_rank1: float
    r2_rank1: float


def prefix_length(n_steps: int, prefix_fraction: float) -> int:
    return min(n_steps - 1, max(2, int(round(prefix_fraction * n_steps))))


def drift_stats(gram: np.ndarray, steps, prefix_fraction: float = 0.2) -> DriftStats:
    """Drift statistics of the trajectory whose delta Gram matrix is ``gram`` at ``steps``."""
    g = np.asarray(gram, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    n = len(t)
    diag = np.clip(np.diag(g), 0.0, None)
    nan = float("nan")
    if n < 2 or diag[-1] <= 0:
        return DriftStats(nan, nan, nan, nan, nan, nan, nan)
    positive = (diag > 0) & (t > 0)
    alpha = nan
    if positive.sum() >= 2:
        alpha = float(0.5 * np.polyfit(np.log(t[positive]), np.log(diag[positive]), 1)[0])
    # ‖x_i − x_{i−1}‖² with x_0 = 0
    previous = np.concatenate([[0.0], diag[:-1]])
    cross = np.concatenate([[0.0], np.diag(g, -1)])
    increments = np.clip(diag + previous - 2 * cross, 0.0, None)
    drift_ratio = float(diag[-1] / increments.sum()) if increments.sum() > 0 else nan
    dt = np.diff(np.concatenate([[0.0], t]))
    drift_ratio_max = float(dt.sum() ** 2 / (dt**2).sum())
    cos_first_last = float(g[0, -1] / math.sqrt(diag[0] * diag[-1])) if diag[0] > 0 else nan

    u, sigma = _top_vector(g)
    prefix_cos = nan
    if n >= 3:
        p = prefix_length(n, prefix_fraction)
        u_p, sigma_p = _top_vector(g[:p, :p])
        if sigma_p > 0 and sigma > 0:
            prefix_cos = float(abs(u_p @ g[:p, :] @ u) / (sigma_p * sigma))
    eigenvalues = np.clip(np.linalg.eigvalsh(0.5 * (g + g.T)), 0.0, None)
    explained = float(eigenvalues[-1] / eigenvalues.sum()) if eigenvalues.sum() > 0 else nan
    coefficient = sigma * u
    fitted = np.polyval(np.polyfit(t, coefficient, 1), t)
    total = ((coefficient - coefficient.mean()) ** 2).sum()
    r2 = float(1 - ((coefficient - fitted) ** 2).sum() / total) if total > 0 else 1.0
    return DriftStats(alpha, drift_ratio, drift_ratio_max, cos_first_last, prefix_cos, explained, r2)


def _normalised(observed: float, null: float, drift: float) -> float:
    """0 at the random-walk value, 1 at the pure-drift value (nan when the two coincide)."""
    if not (math.isfinite(observed) and math.isfinite(null) and math.isfinite(drift)) or abs(drift - null) < 1e-9:
        return float("nan")
    return float((observed - null) / (drift - null))


@dataclass
class DriftDiagnostics:
    """Observed statistics beside their random-walk null and pure-drift values, and a verdict."""

    steps: list[float]
    observed: DriftStats
    null: DriftStats
    drift: DriftStats
    scores: dict  # normalised: 0 = random walk, 1 = pure drift
    drift_share: float  # fitted share of ‖x_T‖² that is drift
    verdict: str  # DRIFT, MIXED or NOISE
    message: str

    def expected_errors(self, target: float) -> dict:
        """Expected relative weight error ‖pred − true‖/‖true − w_0‖ at ``target`` under the fitted
        drift + random-walk model, for the line through the base and for stopping at the last checkpoint."""
        return expected_errors(self._a2, self._b2, self.steps[-1], target)

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "observed": asdict(self.observed),
            "random_walk_null": asdict(self.null),
            "pure_drift": asdict(self.drift),
            "scores": self.scores,
            "drift_share": self.drift_share,
            "verdict": self.verdict,
            "message": self.message,
        }


def fit_drift_noise(gram: np.ndarray, steps) -> tuple[float, float]:
    """Non-negative (a², b²) with G ≈ a²·t tᵀ + b²·min(t, t'), least squares over the entries."""
    design = np.stack([pure_drift_gram(steps).ravel(), random_walk_gram(steps).ravel()], axis=1)
    target = np.asarray(gram, dtype=np.float64).ravel()
    scale = np.abs(design).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(design / scale, target)
    a2, b2 = coef / scale
    return float(a2), float(b2)


def expected_errors(a2: float, b2: float, last_step: float, target: float) -> dict:
    """Relative errors at ``target`` for x̂ = (t*/t_T)·x_T (extrapolate) and x̂ = x_T (stop)."""
    true_sq = a2 * target**2 + b2 * target
    if true_sq <= 0:
        return {"extrapolate": float("nan"), "last_checkpoint": float("nan")}
    ratio = target / last_step
    extrapolate = b2 * target * (ratio - 1.0)
    stop = a2 * (target - last_step) ** 2 + b2 * (target - last_step)
    return {"extrapolate": math.sqrt(max(extrapolate, 0) / true_sq), "last_checkpoint": math.sqrt(max(stop, 0) / true_sq)}


def diagnose(gram: np.ndarray, steps, prefix_fraction: float = 0.2) -> DriftDiagnostics:
    """Diagnose a trajectory (one tensor, or a whole model with the Gram matrices summed over tensors)."""
    steps = [float(s) for s in steps]
    observed = drift_stats(gram, steps, prefix_fraction)
    null = drift_stats(random_walk_gram(steps), steps, prefix_fraction)
    drift = drift_stats(pure_drift_gram(steps), steps, prefix_fraction)
    scores = {
        "alpha": _normalised(observed.alpha, null.alpha, drift.alpha),
        "drift_ratio": _normalised(observed.drift_ratio, null.drift_ratio, drift.drift_ratio),
        "cos_first_last": _normalised(observed.cos_first_last, null.cos_first_last, drift.cos_first_last),
        "prefix_cos": _normalised(observed.prefix_cos, null.prefix_cos, drift.prefix_cos),
    }
    a2, b2 = fit_drift_noise(gram, steps)
    t_last = steps[-1]
    denominator = a2 * t_last**2 + b2 * t_last
    share = float(a2 * t_last**2 / denominator) if denominator > 0 else float("nan")
    verdict, message = _verdict(scores, share)
    result = DriftDiagnostics(steps, observed, null, drift, scores, share, verdict, message)
    result._a2, result._b2 = a2, b2
    return result


def _verdict(scores: dict, share: float) -> tuple[str, str]:
    # The drift ratio and the first/last cosine separate drift from noise best on measured runs; both are
    # judged relative to the random-walk null, so short or late windows do not look linear by accident.
    key = [scores["drift_ratio"], scores["cos_first_last"]]
    if not all(math.isfinite(k) for k in key):
        return MIXED, "inconclusive: the window is too short to tell drift from noise"
    low = min(key)
    if low >= 0.6:
        return DRIFT, "drift-dominated: extrapolation along the trajectory is plausible"
    if low < 0.35:
        return NOISE, "noise-dominated: extrapolation will likely hurt"
    return MIXED, "mixed drift and noise: extrapolate only a short horizon and check the backtest"
