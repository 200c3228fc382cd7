"""Power law through the origin: c(t) ≈ a·t^b, least squares in c (not in log c, so signs and zeros are fine).

For each column, a is closed-form given b, and b ∈ [B_MIN, B_MAX] is found by a grid search refined with
a bounded scalar minimisation (deterministic). b < 1 decelerates, b = 1 is a line through the base,
b > 1 accelerates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relex.regressors.base import ArrayFit, loader, positive_steps, r_squared, register

B_MIN, B_MAX = -2.0, 4.0


@loader("powerlaw")
@dataclass
class PowerLawFit(ArrayFit):
    amplitude: np.ndarray  # a, for t in units of t_ref
    exponent: np.ndarray  # b
    t_ref: float
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray:
        tau = np.asarray(t, dtype=np.float64).reshape(-1, 1) / self.t_ref
        return self.amplitude * tau**self.exponent


def fit_shape(basis, values: np.ndarray, lo: float, hi: float, grid: int = 121) -> tuple[float, float]:
    """Least squares c ≈ a·basis(θ) over θ ∈ [lo, hi]: grid search, then a bounded refinement. -> (a, θ)."""

    def loss(theta):
        f = basis(theta)
        ff = float(f @ f)
        if ff <= 0 or not np.isfinite(ff):
            return float(values @ values), 0.0
        a = float(f @ values) / ff
        return float(((values - a * f) ** 2).sum()), a

    thetas = np.linspace(lo, hi, grid)
    losses = [loss(th)[0] for th in thetas]
    i = int(np.argmin(losses))
    left, right = thetas[max(i - 1, 0)], thetas[min(i + 1, grid - 1)]
    if right > left:
        # start-up: scipy.optimize takes 0.3 s to import, and few runs fit a power law
        from scipy.optimize import minimize_scalar

        best = minimize_scalar(lambda th: loss(th)[0], bounds=(left, right), method="bounded",
                               options={"xatol": 1e-10})
        theta = float(best.x) if best.fun <= losses[i] else float(thetas[i])
    else:
        theta = float(thetas[i])
    return loss(theta)[1], theta


@register("powerlaw", "c ≈ a·t^b through the base (b fitted, least squares)", min_points=2)
def fit_powerlaw(steps: np.ndarray, values: np.ndarray) -> PowerLawFit:
    t, values = positive_steps("powerlaw", steps, values)
    t_ref = float(t.max())
    tau = t / t_ref
    amplitudes, exponents = [], []
    for column in values.T:
        a, b = fit_shape(lambda b: tau**b, column, B_MIN, B_MAX)
        amplitudes.append(a)
        exponents.append(b)
    fit = PowerLawFit(np.array(amplitudes), np.array(exponents), t_ref, np.zeros(values.shape[1]))
    fit.r2 = r_squared(values, fit.predict(t))
    return fit
