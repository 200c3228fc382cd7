"""What every trajectory model builds on: the data a model sees, the model it returns, the registry.

See :mod:`relex.methods` for what a model is. Each model module registers its class with :func:`register`;
:mod:`relex.methods` imports every model module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from relex.errors import RelexInputError


@dataclass
class MatrixFactors:
    """Per-checkpoint top singular triples of one 2-D tensor's deltas, reduced to what models need.

    ``sigma[i]`` is σ_1 of Δ_i; ``coef[i] = σ_i (u_i·u_T)(v_i·v_T)`` is the rank-1 part of Δ_i measured
    along the newest rank-1 direction u_T v_Tᵀ (sign-free, and equal to σ_i when the direction is stable).
    For backtests fitted on the first ``p`` checkpoints, ``coef_fit[i]`` is the same along the direction
    of checkpoint p − 1 for i < p, and ⟨Δ_i, u_{p−1} v_{p−1}ᵀ⟩ for i ≥ p. ``u``/``v`` are the newest
    direction (float32), ``residual`` the largest relative residual of the solver over all checkpoints.
    """

    sigma: np.ndarray
    coef: np.ndarray
    u: np.ndarray | None
    v: np.ndarray | None
    coef_fit: np.ndarray | None = None
    p: int | None = None
    residual: float = 0.0
    alignment: float = float("nan")  # |u_1·u_T|·|v_1·v_T|: stability of the direction over the window


@dataclass
class TensorData:
    """Everything a trajectory model may look at for one tensor."""

    name: str
    shape: tuple[int, ...]
    steps: np.ndarray  # (T,) float64
    gram: np.ndarray  # (T, T) float64
    is_float: bool = True
    base_norm: float = 0.0
    factors: MatrixFactors | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def truncated(self, p: int) -> "TensorData":
        """The same tensor seen through its first ``p`` checkpoints only (for backtests)."""
        factors = None
        if self.factors is not None and self.factors.coef_fit is not None and self.factors.p == p:
            f = self.factors
            factors = MatrixFactors(sigma=f.sigma[:p], coef=f.coef_fit[:p], u=None, v=None)
        return TensorData(self.name, self.shape, self.steps[:p], self.gram[:p, :p], self.is_float, self.base_norm,
                          factors)


@dataclass
class TensorModel:
    """A fitted trajectory of one tensor (see the module docstring)."""

    params: dict  # JSON-able; ``get_method(params["method"]).coefficients(params, targets)``
    basis: np.ndarray  # (r, T) float64 mixing rows
    factors: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (u (m,), v (n,)) float32
    stats: dict = field(default_factory=dict)

    @property
    def n_basis(self) -> int:
        return self.basis.shape[0]

    def coefficients(self, targets, scale: float | None = None) -> np.ndarray:
        """(n_targets, r + f) coefficients, evaluated from the JSON round trip of ``params`` so that a
        stored model gives bit-identical numbers."""
        params = json.loads(json.dumps(self.params))
        if scale is not None:
            params["scale"] = float(scale)
        return method_class(params["method"]).coefficients(params, np.asarray(targets, dtype=np.float64))

    def mixing(self, targets, scale: float | None = None) -> np.ndarray:
        """Mixing weights A (n_targets, T) of the delta part of the prediction."""
        coef = self.coefficients(targets, scale)
        return coef[:, : self.n_basis] @ self.basis


class DeltaAccumulator(Protocol):
    """What a method measures on one tensor's whole deltas while a pass reads them: per-matrix modes, the top
    singular triples of each (:class:`MatrixFactors`).

    The pass calls :meth:`add` with Δ_0 … Δ_{T−1} in order, each the whole float32 delta of one checkpoint
    flattened in storage order (a buffer the pass reuses once ``add`` returns), then :meth:`result`.
    """

    def add(self, delta) -> None: ...

    def result(self) -> MatrixFactors: ...


class Method(Protocol):
    name: str

    def factor_accumulator(self, shape: tuple[int, ...], n_observed: int,
                           p: int | None) -> DeltaAccumulator | None:
        """What measures the :class:`MatrixFactors` of a floating-point tensor of ``shape`` from its
        ``n_observed`` whole deltas as a pass reads them (``p``: the checkpoints a backtest fits on, or None),
        or None when the model of such a tensor needs none (it sees the tensor through G alone)."""
        ...

    def fit_tensor(self, data: TensorData, *, regressor=None, scale: float | None = None,
                   shared=None) -> TensorModel: ...

    @staticmethod
    def coefficients(params: dict, targets: np.ndarray) -> np.ndarray: ...

    def backtest_products(self, data: TensorData, holdout: int, *, regressor=None, shared=None,
                          scale: float | None = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class TemporalMethod:
    """Shared behaviour of models that see a tensor through G alone."""

    scale: float = 1.0

    def factor_accumulator(self, shape: tuple[int, ...], n_observed: int, p: int | None) -> None:
        """None: G is all a temporal model needs."""
        return None

    def series(self, data: TensorData) -> np.ndarray | None:
        """The coefficient series (T, k) a shared learned predictor trains on (None: none)."""
        return None

    def backtest_products(self, data: TensorData, holdout: int, *, regressor=None, shared=None,
                          scale: float | None = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(⟨x̂_j, x_j⟩, ‖x̂_j‖², ‖x_j‖²) for the ``holdout`` last checkpoints, the model fitted on the others.

        The backtest kernel of every temporal model, exact from G alone: the prediction of a held-out
        delta is a mix x̂_j = Σ_i A_ji x_i of the fitted ones, so ⟨x̂_j, x_j⟩ = A_j·G[:p, j] and
        ‖x̂_j‖² = A_j G[:p, :p] A_jᵀ. ``scale=None`` keeps the method's own scale.
        """
        g = np.asarray(data.gram, dtype=np.float64)
        t = len(data.steps)
        p = t - holdout
        if p < 2:
            raise ValueError(f"a backtest needs at least 2 checkpoints to fit, got {p}")
        true_sq = np.diag(g)[p:].copy()
        model = self.fit_tensor(data.truncated(p), regressor=regressor, scale=scale, shared=shared)
        if model.factors:
            raise RelexInputError(f"method {model.params['method']!r} needs the weight matrices, not only G")
        weights = model.mixing(np.asarray(data.steps, dtype=np.float64)[p:])  # (h, p)
        cross = np.einsum("ji,ij->j", weights, g[:p, p:])
        predicted_sq = np.einsum("ji,ik,jk->j", weights, g[:p, :p], weights)
        return cross, predicted_sq, true_sq


REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
    """Class decorator registering a method factory under ``name``."""

    def wrap(factory):
        REGISTRY[name] = factory
        factory.name = name
        return factory

    return wrap


def method_class(name: str):
    """The registered factory (class) of ``name``, without instantiating it."""
    if name not in REGISTRY:
        raise RelexInputError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def unit_rows(indices, t: int) -> np.ndarray:
    """Basis rows selecting single observed deltas."""
    rows = np.zeros((len(indices), t))
    for r, i in enumerate(indices):
        rows[r, i] = 1.0
    return rows
