"""Log-linear: c(t) ≈ a + b·log t — growth that keeps going but slows down (steps must be positive)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relex.errors import RelexInputError
from relex.regressors.base import as_array, loader, r_squared, register


@loader("loglinear")
@dataclass
class LogLinearFit:
    intercept: np.ndarray
    slope: np.ndarray  # per unit of log t
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        return self.intercept + np.log(t) * self.slope

    def to_dict(self) -> dict:
        return {"kind": "loglinear", "intercept": as_array(self.intercept), "slope": as_array(self.slope),
                "r2": as_array(self.r2)}

    @classmethod
    def from_dict(cls, d: dict) -> "LogLinearFit":
        return cls(np.array(d["intercept"]), np.array(d["slope"]), np.array(d["r2"]))


@register("loglinear", "least squares of c on log t (decelerating growth)")
def fit_loglinear(steps: np.ndarray, values: np.ndarray) -> LogLinearFit:
    t = np.asarray(steps, dtype=np.float64)
    if np.any(t <= 0):
        raise RelexInputError("loglinear needs positive step numbers")
    values = np.asarray(values, dtype=np.float64).reshape(len(t), -1)
    design = np.stack([np.ones_like(t), np.log(t)], axis=1)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return LogLinearFit(coef[0], coef[1], r_squared(values, design @ coef))
