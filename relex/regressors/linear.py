"""Ordinary least squares with intercept: c(t) ≈ a + b·t on the real step numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relex.regressors.base import ArrayFit, loader, r_squared, register


@loader("linear")
@dataclass
class LinearFit(ArrayFit):
    intercept: np.ndarray  # (k,)
    slope: np.ndarray  # (k,)
    r2: np.ndarray  # (k,)

    def predict(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        return self.intercept + t * self.slope


@register("linear", "least squares with intercept on the step (the paper's default)")
def fit_linear(steps: np.ndarray, values: np.ndarray) -> LinearFit:
    t = np.asarray(steps, dtype=np.float64)
    design = np.stack([np.ones_like(t), t], axis=1)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return LinearFit(intercept=coef[0], slope=coef[1], r2=r_squared(values, design @ coef))
