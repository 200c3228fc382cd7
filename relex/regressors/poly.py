"""Polynomial least squares of degree N on the step: ``poly2``, ``poly3`` (any ``polyN``, N ≤ 6).

Fitted in τ = t / t_ref (t_ref the last fitted step) so that the design stays well conditioned; a
degree-N fit needs at least N + 1 points. Beyond the window a polynomial bends away quickly: it is a
candidate for backtests, not a safe default.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from relex.errors import RelexInputError
from relex.regressors.base import (
    ArrayFit,
    Regressor,
    loader,
    r_squared,
    register_pattern,
)

MAX_DEGREE = 6


@loader("poly")
@dataclass
class PolyFit(ArrayFit):
    coefficients: np.ndarray  # (degree + 1, k), lowest power first, in τ = t / t_ref
    t_ref: float
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray:
        tau = np.asarray(t, dtype=np.float64).reshape(-1) / self.t_ref
        design = np.vander(tau, len(self.coefficients), increasing=True)
        return design @ self.coefficients


def fit_poly(steps: np.ndarray, values: np.ndarray, degree: int = 2) -> PolyFit:
    t = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64).reshape(len(t), -1)
    if len(t) < degree + 1:
        raise RelexInputError(f"poly{degree} needs at least {degree + 1} observed checkpoints, got {len(t)}")
    t_ref = float(np.max(np.abs(t))) or 1.0
    design = np.vander(t / t_ref, degree + 1, increasing=True)
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    return PolyFit(coef, t_ref, r_squared(values, design @ coef))


def _factory(match) -> Regressor:
    degree = int(match.group(1))
    if not 1 <= degree <= MAX_DEGREE:
        raise RelexInputError(f"polynomial degree must be 1..{MAX_DEGREE}, got poly{degree}")
    return Regressor(name=f"poly{degree}", fit=partial(fit_poly, degree=degree),
                     description=f"least squares polynomial of degree {degree} on the step",
                     min_points=degree + 1, options={"degree": degree})


register_pattern(r"poly(\d+)", _factory)
