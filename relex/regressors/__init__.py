"""Predictors of a coefficient series c(t) against the real step numbers t.

Each predictor is one small module that registers itself by name with :func:`register`. A predictor's
``fit(steps, values)`` takes steps (T,) and values (T, k) and returns a fit whose ``predict(t)`` gives
(len(t), k), whose ``r2`` gives the in-sample R² of each column, and whose ``to_dict()`` is a JSON-able
record that :func:`load_fit` turns back into an identical fit (``relex fit`` stores it; ``relex
materialize`` evaluates it at any step).

Names a user can give (``--regressor``):

* ``linear`` (default), ``poly2`` / ``poly3`` (``polyN``: least squares of degree N), ``loglinear``
  (c ≈ a + b·log t), ``powerlaw`` (c ≈ a·t^b), ``saturating`` (c ≈ a·(1 − e^(−t/τ))), ``mlp`` (a small
  learned predictor, NExt-style, shared across the tensors of one kind);
* ``anchored``, ``anchored-NAME``: start from the last observed checkpoint and add only the increment the
  predictor NAME (default linear) expects after it, shrunk by λ ∈ [0, 1] estimated per tensor;
  ``anchored@0.5``, ``anchored-NAME@0.5``: the same with a fixed λ;
* ``auto``: chosen by backtest among candidates (see :mod:`relex.trajectory`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

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
_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], Regressor]]] = []


def register(name: str, description: str = "", min_points: int = 2, shared: bool = False):
    """Decorator registering ``fit(steps, values) -> Fit`` under ``name``."""

    def wrap(fit):
        REGISTRY[name] = Regressor(name=name, fit=fit, description=description, min_points=min_points,
                                   shared=shared)
        return fit

    return wrap


def register_pattern(pattern: str, factory: Callable[[re.Match], Regressor]) -> None:
    """Names matching ``pattern`` (e.g. ``poly(\\d+)``) build their regressor with ``factory(match)``."""
    _PATTERNS.append((re.compile(pattern), factory))


def loader(kind: str):
    """Class decorator: ``cls.from_dict`` rebuilds fits whose ``to_dict()['kind'] == kind``."""

    def wrap(cls):
        LOADERS[kind] = cls.from_dict
        return cls

    return wrap


def load_fit(record: dict) -> Fit:
    """The fit stored as ``record`` (from ``fit.to_dict()``)."""
    _load_builtin()
    try:
        return LOADERS[record["kind"]](record)
    except KeyError:
        raise RelexInputError(f"unknown stored fit kind {record.get('kind')!r}") from None


def r_squared(values: np.ndarray, fitted: np.ndarray) -> np.ndarray:
    """In-sample R² per column (1 for a constant series fitted exactly)."""
    residual = ((values - fitted) ** 2).sum(axis=0)
    total = ((values - values.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), 1.0)
    return r2


def as_array(values) -> list:
    """A numpy array as nested lists of Python floats (exact in JSON)."""
    return np.asarray(values, dtype=np.float64).tolist()


def get_regressor(name: str) -> Regressor:
    _load_builtin()
    if name in REGISTRY:
        return REGISTRY[name]
    for pattern, factory in _PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return factory(match)
    raise RelexInputError(f"unknown regressor {name!r}; known: {', '.join(available())}, anchored[-NAME][@λ], auto")


def available() -> list[str]:
    _load_builtin()
    return sorted([*REGISTRY, "poly2", "poly3"])


@dataclass(frozen=True)
class RegressorSpec:
    """A parsed ``--regressor`` name: the predictor, and whether (and how much) it is anchored."""

    text: str
    base: Regressor
    anchored: bool = False
    shrink: float | None = None  # fixed λ; None = estimated per tensor

    @property
    def shared(self) -> bool:
        return self.base.shared


def parse_regressor(text: str) -> RegressorSpec:
    """Parse ``NAME``, ``anchored``, ``anchored-NAME``, ``anchored@λ`` or ``anchored-NAME@λ``."""
    name = text.strip().lower()
    if name == "auto":
        raise RelexInputError("'auto' is not a single regressor here (it is resolved by backtest)")
    anchored, shrink = False, None
    if name.startswith("anchored"):
        anchored = True
        rest = name[len("anchored"):]
        if "@" in rest:
            rest, _, value = rest.partition("@")
            try:
                shrink = float(value)
            except ValueError:
                raise RelexInputError(f"bad shrinkage in regressor {text!r}: λ must be a number in [0, 1]") from None
            if not 0.0 <= shrink <= 1.0:
                raise RelexInputError(f"bad shrinkage in regressor {text!r}: λ must be in [0, 1]")
        if rest.startswith("-"):
            rest = rest[1:]
        elif rest:
            raise RelexInputError(f"unknown regressor {text!r} (anchored variants are anchored-NAME[@λ])")
        name = rest or "linear"
    elif "@" in name:
        raise RelexInputError(f"unknown regressor {text!r}: a fixed λ (@λ) applies to anchored variants only")
    base = get_regressor(name)
    canonical = (f"anchored-{base.name}" if anchored else base.name) + (f"@{shrink:g}" if shrink is not None else "")
    if canonical == "anchored-linear":
        canonical = "anchored"
    return RegressorSpec(text=canonical, base=base, anchored=anchored, shrink=shrink)


def _load_builtin() -> None:
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
