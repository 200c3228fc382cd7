"""Trajectory models ("modes"): how a tensor's observed checkpoints map to its predicted future.

A model sees one tensor through a :class:`TensorData` — the Gram matrix G = X Xᵀ of its deltas
x_i = w_{t_i} − w_0, the step numbers, and for per-matrix modes the top singular triples of each 2-D delta
— and returns a :class:`TensorModel`: the prediction at any target step t* is

    w(t*) = w_0 + Σ_r a_r(t*) · b_r + Σ_f a_f(t*) · u_f v_fᵀ,      b_r = Σ_i B_ri x_i,

a few *basis vectors* b_r that are fixed mixes of the observed deltas (rows of B), optional rank-1 matrices
u_f v_fᵀ, and coefficient functions a(t*) that the model evaluates from its JSON-able ``params``
(:meth:`coefficients`). The engine streams each tensor once to form the b_r; ``relex fit`` stores the b_r,
the u_f, v_f and the params, and ``relex materialize`` evaluates them at any step without the run.

Models that only mix deltas (no u_f v_fᵀ) are *temporal*: their mixing weights A = a(t*)·B make any
backtest exact arithmetic on G (:meth:`TemporalMethod.backtest_products`, the backtest kernel). Each model
is one small module registered by name with :func:`register` (:mod:`relex.methods.base`).
"""

from __future__ import annotations

from relex.errors import RelexInputError
from relex.methods.base import (REGISTRY, DeltaAccumulator, MatrixFactors, Method, TemporalMethod, TensorData,
                                TensorModel, method_class, register, unit_rows)
# Every model module registers itself on import.
from relex.methods import elementwise, last, matrix_rank1, relex  # noqa: E402,F401

__all__ = ["REGISTRY", "DeltaAccumulator", "MatrixFactors", "Method", "TemporalMethod", "TensorData", "TensorModel",
           "available", "get_method", "method_class", "register", "unit_rows"]


def available() -> list[str]:
    return sorted(REGISTRY)


def get_method(name: str, **options) -> Method:
    """Instantiate the method ``name`` with its options (rank, regressor, scale, ...)."""
    if name not in REGISTRY:
        raise RelexInputError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)
