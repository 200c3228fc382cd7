"""Per-matrix rank-1 trajectories (AlphaRL arXiv 2510.00553, NExt arXiv 2604.11446 style).

For each 2-D tensor, the top singular triple (u_i, σ_i, v_i) of every observed delta Δ_i = W_{t_i} − W_0
is computed exactly (:func:`relex.subspace.top_singular_triple`: ARPACK with a convergence check). The
trajectory is that of the rank-1 update σ_i u_i v_iᵀ, read along the newest direction:

    c_i = ⟨σ_i u_i v_iᵀ, u_T v_Tᵀ⟩ = σ_i (u_i·u_T)(v_i·v_T),

which equals σ_i while the direction is stable, is free of the solver's sign ambiguity, and counts only
the part of an older rank-1 update that lies along the direction being extrapolated. A predictor fits
c(t) and the prediction is

    W(t*) = W_0 + s · ĉ(t*) · u_T v_Tᵀ                          (plain predictors)
    W(t*) = W_0 + s · (Δ_T + λ (ĉ(t*) − ĉ(t_T)) · u_T v_Tᵀ)      (anchored predictors)

so a plain prediction keeps only the newest rank-1 direction of the update (AlphaRL's "rank-1
dominance"), while the anchored one keeps all of Δ_T and extrapolates only along u_T v_Tᵀ. λ without
``@λ`` comes from a closed-form backtest on the observed window (:mod:`relex.regressors.anchored`); in
the backtests of ``--regressor auto`` that λ is measured on the same held-out checkpoints, so the error of
an anchored candidate with estimated λ is optimistic there (a fixed ``anchored@λ`` is not).
Tensors with more than two dimensions are read as (shape[0], rest); 1-D tensors (norms, biases) and
scalars fall back to element-wise linear extrapolation (``copy_norms`` copies them instead).

Unlike the temporal modes this is not a mix of deltas: it needs each 2-D delta whole, one checkpoint at a
time (the engine reads it so when a tensor does not fit one row block), costs T sparse SVDs per matrix,
and its backtests need ⟨Δ_j, u_p v_pᵀ⟩ for the held-out j, which the engine measures while reading.
"""

from __future__ import annotations

import numpy as np

from relex.errors import RelexInputError
from relex.methods.base import MatrixFactors, TensorData, TensorModel, register, unit_rows
from relex.methods.elementwise import ElementwiseLinear
from relex.methods.relex import fit_series, fitted_coefficients, resolve_spec
from relex.regressors.anchored import backtest_shrink
from relex.subspace import top_singular_triple


def matrix_shape(shape) -> tuple[int, int] | None:
    """The 2-D view of a tensor this mode factorises, or None for 1-D tensors and scalars."""
    if len(shape) < 2:
        return None
    rows = int(shape[0])
    cols = int(np.prod(shape[1:])) if rows else 0
    return rows, cols


class FactorAccumulator:
    """Fed the deltas Δ_0 … Δ_{T−1} of one matrix in order, gives its :class:`MatrixFactors`.

    Keeps T pairs of singular vectors (T·(m + n) floats), never the deltas. ``p`` (the number of
    checkpoints a backtest fits on) also records ⟨Δ_i, u_{p−1} v_{p−1}ᵀ⟩ for i ≥ p. With ``shape`` (the
    2-D view, :func:`matrix_shape`) it takes flattened deltas, as a pass gives them
    (:class:`relex.methods.DeltaAccumulator`).
    """

    def __init__(self, n_steps: int, p: int | None = None, shape: tuple[int, int] | None = None):
        self.n_steps = n_steps
        self.p = p if p is not None and 2 <= p < n_steps else None
        self.shape = shape
        self.us, self.vs, self.sigmas, self.projections = [], [], [], {}
        self.residual = 0.0

    def add(self, delta) -> None:
        if self.shape is not None:
            delta = delta.reshape(self.shape)
        a = delta.detach().cpu().numpy() if hasattr(delta, "detach") else np.asarray(delta)
        a = a.reshape(a.shape[0], -1) if a.ndim > 2 else a
        triple = top_singular_triple(a)
        i = len(self.sigmas)
        self.us.append(triple.u)
        self.vs.append(triple.v)
        self.sigmas.append(triple.sigma)
        self.residual = max(self.residual, triple.residual)
        if self.p is not None and i >= self.p:
            u, v = self.us[self.p - 1].astype(np.float64), self.vs[self.p - 1].astype(np.float64)
            self.projections[i] = float(u @ (a.astype(np.float64) @ v))

    def result(self) -> MatrixFactors:
        if len(self.sigmas) != self.n_steps:
            raise RuntimeError(f"factor accumulator got {len(self.sigmas)} of {self.n_steps} deltas")
        sigma = np.array(self.sigmas, dtype=np.float64)
        u64 = [u.astype(np.float64) for u in self.us]
        v64 = [v.astype(np.float64) for v in self.vs]

        def along(j):
            return np.array([s * (u @ u64[j]) * (v @ v64[j]) for s, u, v in zip(sigma, u64, v64)])

        coef = along(-1)
        coef_fit = None
        if self.p is not None:
            coef_fit = along(self.p - 1)
            for i, value in self.projections.items():
                coef_fit[i] = value
        alignment = float(abs(u64[0] @ u64[-1]) * abs(v64[0] @ v64[-1])) if sigma[0] > 0 and sigma[-1] > 0 else float("nan")
        return MatrixFactors(sigma=sigma, coef=coef, u=self.us[-1], v=self.vs[-1], coef_fit=coef_fit, p=self.p,
                             residual=self.residual, alignment=alignment)


@register("matrix-rank1")
class MatrixRankOne:
    def __init__(self, rank: int = 1, regressor: str = "linear", scale: float = 1.0, copy_norms: bool = False,
                 first: int | None = None, **_ignored):
        if rank != 1:
            raise RelexInputError(f"matrix-rank1 keeps one singular triple per matrix; --rank {rank} is not supported")
        self.spec = resolve_spec(regressor)
        self.scale = float(scale)
        self.fallback = ElementwiseLinear(scale=scale, copy_norms=copy_norms, first=first)

    @staticmethod
    def factorised(shape) -> bool:
        return matrix_shape(shape) is not None

    @staticmethod
    def factor_accumulator(shape, n_observed: int, p: int | None) -> FactorAccumulator | None:
        """The top singular triples of each 2-D delta; none for 1-D tensors and scalars (element-wise)."""
        view = matrix_shape(shape)
        return None if view is None else FactorAccumulator(n_observed, p, view)

    def series(self, data: TensorData) -> np.ndarray | None:
        f = data.factors
        if f is None or not np.any(f.coef):
            return None
        return f.coef[:, None]

    def fit_tensor(self, data: TensorData, *, regressor=None, scale=None, shared=None) -> TensorModel:
        s = self.scale if scale is None else float(scale)
        if not self.factorised(data.shape):
            model = self.fallback.fit_tensor(data, scale=s)
            model.stats["fallback"] = "elementwise"
            return model
        spec = resolve_spec(regressor) or self.spec
        steps = np.asarray(data.steps, dtype=np.float64)
        t = len(steps)
        f = data.factors
        if f is None:
            raise RelexInputError(f"matrix-rank1 needs the singular triples of {data.name!r} (each 2-D delta), not "
                                  "only the Gram matrix")
        base_stats = {"rank": 1, "regressor": spec.text, "sigma1": float(f.sigma[-1]), "solver_residual": f.residual,
                      "alignment": f.alignment}
        last_sq = float(data.gram[-1, -1]) if data.gram.size else 0.0
        base_stats["explained"] = base_stats["explained_rank1"] = (
            float(f.sigma[-1] ** 2 / last_sq) if last_sq > 0 else 0.0)
        if f.u is None or f.sigma[-1] <= 0 or not np.any(f.coef):
            # no direction to follow (the newest delta is zero): stay at the base
            return TensorModel({"method": "matrix-rank1", "scale": s, "regressor": spec.text, "fit": None},
                               np.zeros((0, t)), [], {**base_stats, "rank": 0, "r2": 1.0})
        fit = fit_series(spec, steps, f.coef[:, None], shared)
        params = {"method": "matrix-rank1", "scale": s, "regressor": spec.text, "fit": fit.to_dict(),
                  "anchored": spec.anchored}
        basis = np.zeros((0, t))
        if spec.anchored:
            basis = unit_rows([t - 1], t)
            shrink = spec.shrink
            if shrink is None:
                shrink = self.window_shrink(data, spec, shared)
            params.update(t_last=float(steps[-1]), shrink=float(shrink))
        return TensorModel(params, basis, [(f.u, f.v)], {**base_stats, "r2": float(np.asarray(fit.r2)[0])})

    def window_shrink(self, data: TensorData, spec, shared=None) -> float:
        """λ of an anchored model from a closed-form backtest on the observed window (1 if impossible)."""
        f = data.factors
        if f.coef_fit is None or f.p is None:
            return 1.0
        p = f.p
        steps = np.asarray(data.steps, dtype=np.float64)
        fit = fit_series(spec, steps[:p], f.coef_fit[:p, None], shared)
        predicted = fit.predict(steps[p:])[:, 0]
        increments = predicted - fit.predict(steps[p - 1:p])[0, 0]
        gains = f.coef_fit[p:] - f.sigma[p - 1]  # ⟨Δ_j − Δ_{p−1}, u v ᵀ⟩ = Q_j − σ_{p−1}
        return backtest_shrink(increments, gains)

    # Anchored models here always carry a numeric λ (from the backtest), which fitted_coefficients uses.
    coefficients = staticmethod(fitted_coefficients)

    @staticmethod
    def describe(params: dict, targets: np.ndarray) -> dict:
        """λ of an anchored model, the same at every target."""
        anchored = params.get("anchored") and params.get("fit") is not None
        return {"shrink": [float(params["shrink"])] * len(np.atleast_1d(targets))} if anchored else {}

    def backtest_products(self, data: TensorData, holdout: int, *, regressor=None, shared=None, scale=1.0):
        """(⟨x̂_j, x_j⟩, ‖x̂_j‖², ‖x_j‖²) for the held-out j of a fit on the first T − holdout checkpoints
        (at scale 1: the products of the rank-1 direction; 1-D tensors: those of the element-wise line)."""
        if not self.factorised(data.shape):
            return self.fallback.backtest_products(data, holdout, scale=scale)
        spec = resolve_spec(regressor) or self.spec
        g = data.gram
        t = len(data.steps)
        p = t - holdout
        f = data.factors
        true_sq = np.diag(g)[p:].copy()
        if f is None or f.coef_fit is None or f.p != p:
            raise RelexInputError(f"matrix-rank1 backtest of {data.name!r} needs the projections for holdout {holdout}")
        steps = np.asarray(data.steps, dtype=np.float64)
        if f.sigma[p - 1] <= 0 or not np.any(f.coef_fit[:p]):
            return np.zeros(holdout), np.zeros(holdout), true_sq
        fit = fit_series(spec, steps[:p], f.coef_fit[:p, None], shared)
        predicted = fit.predict(steps[p:])[:, 0]
        q = f.coef_fit[p:]  # ⟨Δ_j, u v ᵀ⟩ along the direction of checkpoint p − 1
        if not spec.anchored:
            return predicted * q, predicted**2, true_sq
        kappa = predicted - fit.predict(steps[p - 1:p])[0, 0]
        lam = spec.shrink if spec.shrink is not None else backtest_shrink(kappa, q - f.sigma[p - 1])
        phi = lam * kappa
        cross = g[p - 1, p:] + phi * q
        pred_sq = g[p - 1, p - 1] + 2 * phi * f.sigma[p - 1] + phi**2
        return cross, pred_sq, true_sq
