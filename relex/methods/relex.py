"""RELEX: rank-k temporal SVD of the deltas, each coefficient regressed on the step (arXiv 2605.21468).

w(t*) = w_0 + s · Σ_j ĉ_j(t*) v_j with v_j = Xᵀ u_j / σ_j: the basis vectors are the directions v_j
(mixing rows (U/Σ)ᵀ) and the coefficients s·ĉ_j(t*). With an anchored predictor (``anchored[-NAME]``,
see :mod:`relex.regressors.anchored`) the basis gains the last delta x_T:
w(t*) = w_0 + s · (x_T + λ Σ_j (ĉ_j(t*) − ĉ_j(t_T)) v_j).
"""

from __future__ import annotations

import numpy as np

from relex.errors import RelexInputError
from relex.methods.base import TemporalMethod, TensorData, TensorModel, register, unit_rows
from relex.regressors import RegressorSpec, as_array, load_fit, parse_regressor
from relex.regressors.anchored import drift_shrink
from relex.subspace import fit_drift_noise, temporal_svd


def resolve_spec(regressor) -> RegressorSpec | None:
    """The predictor of a ``regressor`` option (a name or a parsed spec; ``None`` keeps the method's own).

    ``auto`` is not a predictor: :class:`relex.trajectory.ModelSelector` chooses one by backtest and passes it.
    """
    if regressor is None or isinstance(regressor, RegressorSpec):
        return regressor
    return parse_regressor(regressor)


def fit_series(spec: RegressorSpec, steps: np.ndarray, values: np.ndarray, shared=None):
    if len(steps) < spec.base.min_points:
        raise RelexInputError(f"regressor {spec.base.name} needs at least {spec.base.min_points} observed "
                              f"checkpoints, got {len(steps)}")
    fit = shared.fit if (shared is not None and spec.shared) else spec.base.fit
    return fit(steps, values)


@register("relex")
class TemporalLowRank(TemporalMethod):
    def __init__(self, rank: int = 1, regressor: str = "linear", scale: float = 1.0, **_ignored):
        if rank < 1:
            raise RelexInputError(f"--rank must be at least 1, got {rank}")
        self.rank = rank
        self.spec = resolve_spec(regressor)
        self.scale = float(scale)

    def series(self, data: TensorData) -> np.ndarray | None:
        svd = temporal_svd(data.gram, self.rank)
        return svd.coefficients if svd.rank else None

    def fit_tensor(self, data: TensorData, *, regressor=None, scale=None, shared=None) -> TensorModel:
        spec = resolve_spec(regressor) or self.spec
        s = self.scale if scale is None else float(scale)
        steps = np.asarray(data.steps, dtype=np.float64)
        t = len(steps)
        svd = temporal_svd(data.gram, self.rank)
        if svd.rank == 0:  # the tensor never moved: it stays at w_0
            return TensorModel({"method": "relex", "scale": s, "regressor": spec.text, "fit": None},
                               np.zeros((0, t)), [], {"explained": 0.0, "explained_rank1": 0.0, "r2": 1.0,
                                                      "rank": 0, "sigma1": 0.0, "regressor": spec.text})
        fit = fit_series(spec, steps, svd.coefficients, shared)
        mix = svd.u / svd.sigma  # (T, k): v_j = Xᵀ mix_j
        params = {"method": "relex", "scale": s, "regressor": spec.text, "fit": fit.to_dict(),
                  "anchored": spec.anchored}
        basis = mix.T
        stats = {
            "explained": float(svd.explained[svd.rank - 1]),
            "explained_rank1": float(svd.explained[0]),
            "r2": float(np.asarray(fit.r2)[0]),
            "rank": svd.rank,
            "sigma1": float(svd.sigma[0]),
            "regressor": spec.text,
        }
        slope = getattr(fit, "slope", None)
        if slope is not None and spec.base.name == "linear":
            stats["slope"] = float(np.asarray(slope)[0])
        if spec.anchored:
            basis = np.vstack([unit_rows([t - 1], t), mix.T])
            params.update(t_last=float(steps[-1]), shrink=spec.shrink)
            if spec.shrink is None:
                a2, b2 = fit_drift_noise(data.gram, steps)
                params.update(drift=[a2, b2], steps=as_array(steps), mix=as_array(mix))
                last = a2 * steps[-1] ** 2 + b2 * steps[-1]
                stats["drift_share"] = float(a2 * steps[-1] ** 2 / last) if last > 0 else float("nan")
        return TensorModel(params, basis, [], stats)

    @staticmethod
    def coefficients(params: dict, targets: np.ndarray) -> np.ndarray:
        return fitted_coefficients(params, targets)

    @staticmethod
    def describe(params: dict, targets: np.ndarray) -> dict:
        """Per-target figures worth reporting: λ of an anchored model."""
        if not params.get("anchored") or params.get("fit") is None:
            return {}
        targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        fit = load_fit(params["fit"])
        increment = fit.predict(targets) - fit.predict(np.array([params["t_last"]]))
        return {"shrink": [float(v) for v in shrink_of(params, increment, targets)]}


def fitted_coefficients(params: dict, targets: np.ndarray) -> np.ndarray:
    """Coefficients (n_targets, r) of a fitted model's basis at ``targets``: the fitted curves times the
    scale, or, anchored, 1 for the last delta followed by the shrunk increments beyond the last step."""
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    s = params["scale"]
    if params.get("fit") is None:
        return np.zeros((len(targets), 0))
    fit = load_fit(params["fit"])
    predicted = fit.predict(targets)  # (n, k)
    if not params.get("anchored"):
        return s * predicted
    increment = predicted - fit.predict(np.array([params["t_last"]]))
    lam = shrink_of(params, increment, targets)
    return s * np.hstack([np.ones((len(targets), 1)), lam[:, None] * increment])


def shrink_of(params: dict, increment: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """λ per target of an anchored model: fixed, or from the drift + random-walk fit."""
    if params.get("shrink") is not None:
        return np.full(len(targets), float(params["shrink"]))
    a2, b2 = params["drift"]
    return drift_shrink(increment, np.array(params["mix"]), params["steps"], a2, b2, targets)
