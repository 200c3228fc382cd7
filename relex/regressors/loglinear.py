"""Log-linear: c(t) ≈ a + b·log t — growth that keeps going but slows down (steps must be positive)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relex.regressors.base import ArrayFit, loader, positive_steps, r_squared, register


@loader("loglinear")
@dataclass
class LogLinearFit(ArrayFit):
    intercept: np.ndarray
    slope: np.ndarray  # per unit of log t
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        return self.intercept + np.log(t) * self.slope


@register("loglinear", "least squares of c on log t (decelerating growth)")
def fit_loglinear(steps: np.ndarray, values: np.ndarray) -> LogLinearFit:
    t, values = positive_steps("loglinear", steps, values)
    design = np.stack([np.ones_like(t), np.log(t)], axis=1)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return LogLinearFit(coef[0], coef[1], r_squared(values, design @ coef))
