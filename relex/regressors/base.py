"""What every predictor module builds on: the fit protocol, the registries, and shared helpers.

A predictor module registers its fitting function with :func:`register` (or a family of names with
:func:`register_pattern`) and the class of its fits with :func:`loader`; :mod:`relex.regressors` imports
every predictor module and looks names up in these registries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar, Protocol

import numpy as np

from relex.errors import RelexInputError


class Fit(Protocol):
    r2: np.ndarray

    def predict(self, t: np.ndarray) -> np.ndarray: ...

    def to_dict(self) -> dict: ...


@dataclass
class Regressor:
    """A named way of fitting coefficient series."""

    name: str
    fit: Callable[[np.ndarray, np.ndarray], Fit]
    description: str = ""
    min_points: int = 2
    options: dict = field(default_factory=dict)
    shared: bool = False  # learned across tensors (needs a whole-run pass first)


REGISTRY: dict[str, Regressor] = {}
LOADERS: dict[str, Callable[[dict], Fit]] = {}
PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], Regressor]]] = []


def register(name: str, description: str = "", min_points: int = 2, shared: bool = False):
    """Decorator registering ``fit(steps, values) -> Fit`` under ``name``."""

    def wrap(fit):
        REGISTRY[name] = Regressor(name=name, fit=fit, description=description, min_points=min_points,
                                   shared=shared)
        return fit

    return wrap


def register_pattern(pattern: str, factory: Callable[[re.Match], Regressor]) -> None:
    """Names matching ``pattern`` (e.g. ``poly(\\d+)``) build their regressor with ``factory(match)``."""
    PATTERNS.append((re.compile(pattern), factory))


def loader(kind: str):
    """Class decorator: ``cls.from_dict`` rebuilds fits whose ``to_dict()['kind'] == kind`` (``cls.kind``)."""

    def wrap(cls):
        cls.kind = kind
        LOADERS[kind] = cls.from_dict
        return cls

    return wrap


class ArrayFit:
    """A dataclass fit whose fields are arrays (one value per column) or floats: its JSON form, ``{"kind": ...,
    field: value, ...}`` in field order, and back."""

    kind: ClassVar[str]

    def to_dict(self) -> dict:
        return {"kind": self.kind} | {f.name: float(getattr(self, f.name)) if f.type == "float"
                                      else as_array(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{f.name: float(d[f.name]) if f.type == "float" else np.array(d[f.name]) for f in fields(cls)})


def r_squared(values: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """In-sample R² per column (1 for a constant series fitted exactly)."""
    residual = ((values - fitted) ** 2).sum(axis=0)
    total = ((values - values.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), 1.0)
    return r2


def positive_steps(name: str, steps, values) -> tuple[np.ndarray, np.ndarray]:
    """``(t, values)`` as float64, values one column per series; refuses steps ≤ 0 (curves in log t or
    through the base at t = 0)."""
    t = np.asarray(steps, dtype=np.float64)
    if np.any(t <= 0):
        raise RelexInputError(f"{name} needs positive step numbers")
    return t, np.asarray(values, dtype=np.float64).reshape(len(t), -1)


def as_array(values) -> list:
    """A numpy array as nested lists of Python floats (exact in JSON)."""
    return np.asarray(values, dtype=np.float64).tolist()
