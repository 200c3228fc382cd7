"""Regressors of a coefficient series c(t) against the real step numbers t.

Each regressor is one small module that registers itself by name with :func:`register`. A regressor's
``fit(steps, values)`` takes steps (T,) and values (T, k) and returns a :class:`Fit` whose
``predict(t)`` gives (len(t), k) and whose ``r2`` gives the in-sample R² of each column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from relex.errors import RelexInputError


class Fit(Protocol):
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray: ...


@dataclass
class Regressor:
    """A named way of fitting coefficient series."""

    name: str
    fit: Callable[[np.ndarray, np.ndarray], Fit]
    description: str = ""
    min_points: int = 2
    options: dict = field(default_factory=dict)


REGISTRY: dict[str, Regressor] = {}


def register(name: str, description: str = "", min_points: int = 2):
    """Decorator registering ``fit(steps, values) -> Fit`` under ``name``."""

    def wrap(fit):
        REGISTRY[name] = Regressor(name=name, fit=fit, description=description, min_points=min_points)
        return fit

    return wrap


def r_squared(values: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """In-sample R² per column (1 for a constant series fitted exactly)."""
    residual = ((values - fitted) ** 2).sum(axis=0)
    total = ((values - values.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), 1.0)
    return r2


def get_regressor(name: str) -> Regressor:
    _load_builtin()
    if name not in REGISTRY:
        raise RelexInputError(f"unknown regressor {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def available() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
