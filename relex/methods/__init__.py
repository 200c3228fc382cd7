"""Trajectory models: how a tensor's observed checkpoints map to its predicted future.

Every model here is *temporal*: it sees a tensor only through the Gram matrix G = X Xᵀ of its deltas
x_i = w_{t_i} − w_0 and the step numbers, and returns mixing weights A (one row per target step) so that
the prediction is w(t*) = w_0 + Σ_i A_i x_i. The engine then needs a single streaming pass over the
weights, whatever the model, and a backtest of any model is exact arithmetic on G.

Each model is one small module registered by name with :func:`register`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from relex.errors import RelexInputError


@dataclass
class TensorPlan:
    """Mixing weights (n_targets, T) over the observed deltas, and per-tensor statistics."""

    weights: np.ndarray
    stats: dict = field(default_factory=dict)


class Method(Protocol):
    name: str

    def plan(self, gram: np.ndarray, steps: np.ndarray, targets: np.ndarray, *, tensor: str = "",
             ndim: int = 2) -> TensorPlan: ...


REGISTRY: dict[str, Callable[..., Method]] = {}


def register(name: str):
    """Class decorator registering a method factory under ``name``."""

    def wrap(factory):
        REGISTRY[name] = factory
        factory.name = name
        return factory

    return wrap


def available() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def get_method(name: str, **options) -> Method:
    """Instantiate the method ``name`` with its options (rank, regressor, scale, ...)."""
    _load_builtin()
    if name not in REGISTRY:
        raise RelexInputError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**options)


def _load_builtin() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
