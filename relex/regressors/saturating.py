"""Saturating exponential through the base: c(t) ≈ a·(1 − e^(−t/τ)).

Models a run that decelerates as the reward saturates (the straight line of RELEX then overshoots). τ is
searched on a log scale between t_ref/100 and 100·t_ref (t_ref the last fitted step); with τ at the top of
that range the fit is practically a line through the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from relex.regressors.base import ArrayFit, loader, positive_steps, r_squared, register
from relex.regressors.powerlaw import fit_shape

LOG_TAU_RANGE = (math.log(0.01), math.log(100.0))


@loader("saturating")
@dataclass
class SaturatingFit(ArrayFit):
    amplitude: np.ndarray  # a
    tau: np.ndarray  # τ, in steps
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1, 1)
        return self.amplitude * -np.expm1(-t / self.tau)


@register("saturating", "c ≈ a·(1 − exp(−t/τ)) through the base (deceleration toward a plateau)")
def fit_saturating(steps: np.ndarray, values: np.ndarray) -> SaturatingFit:
    t, values = positive_steps("saturating", steps, values)
    t_ref = float(t.max())
    amplitudes, taus = [], []
    for column in values.T:
        a, log_tau = fit_shape(lambda lt: -np.expm1(-t / (t_ref * math.exp(lt))), column, *LOG_TAU_RANGE)
        amplitudes.append(a)
        taus.append(t_ref * math.exp(log_tau))
    fit = SaturatingFit(np.array(amplitudes), np.array(taus), np.zeros(values.shape[1]))
    fit.r2 = r_squared(values, fit.predict(t))
    return fit
