"""RELEX: rank-k temporal SVD of the deltas, each coefficient regressed on the step (arXiv 2605.21468).

w(t*) = w_0 + s · Σ_j ĉ_j(t*) v_j with v_j = Xᵀ u_j / σ_j, i.e. mixing weights A = s · ĉ(t*) (U/Σ)ᵀ.
"""

from __future__ import annotations

import numpy as np

from relex.methods import TensorPlan, register
from relex.regressors import get_regressor
from relex.subspace import temporal_svd


@register("relex")
class TemporalLowRank:
    def __init__(self, rank: int = 1, regressor: str = "linear", scale: float = 1.0, **_ignored):
        if rank < 1:
            from relex.errors import RelexInputError

            raise RelexInputError(f"--rank must be at least 1, got {rank}")
        self.rank = rank
        self.regressor = get_regressor(regressor)
        self.scale = float(scale)

    def plan(self, gram, steps, targets, *, tensor="", ndim=2) -> TensorPlan:
        steps = np.asarray(steps, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.float64)
        svd = temporal_svd(gram, self.rank)
        t = len(steps)
        if svd.rank == 0:  # the tensor never moved: it stays at w_0
            return TensorPlan(np.zeros((len(targets), t)), {"explained": 0.0, "explained_rank1": 0.0,
                                                            "r2": 1.0, "rank": 0, "sigma1": 0.0})
        coefficients = svd.coefficients
        fit = self.regressor.fit(steps, coefficients)
        predicted = fit.predict(targets)  # (n_targets, k)
        weights = self.scale * predicted @ (svd.u / svd.sigma).T
        stats = {
            "explained": float(svd.explained[svd.rank - 1]),
            "explained_rank1": float(svd.explained[0]),
            "r2": float(np.asarray(fit.r2)[0]),
            "rank": svd.rank,
            "sigma1": float(svd.sigma[0]),
        }
        slope = getattr(fit, "slope", None)
        if slope is not None:
            stats["slope"] = float(np.asarray(slope)[0])
        return TensorPlan(weights, stats)
