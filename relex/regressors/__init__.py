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

from dataclasses import dataclass

from relex.errors import RelexInputError
from relex.regressors.base import (LOADERS, PATTERNS, REGISTRY, Fit, Regressor, as_array, loader, r_squared, register,
                                   register_pattern)
# Every predictor module registers itself on import.
from relex.regressors import anchored, linear, loglinear, mlp, poly, powerlaw, saturating  # noqa: E402,F401


def load_fit(record: dict) -> Fit:
    """The fit stored as ``record`` (from ``fit.to_dict()``)."""
    try:
        return LOADERS[record["kind"]](record)
    except KeyError:
        raise RelexInputError(f"unknown stored fit kind {record.get('kind')!r}") from None


def get_regressor(name: str) -> Regressor:
    if name in REGISTRY:
        return REGISTRY[name]
    for pattern, factory in PATTERNS:
        match = pattern.fullmatch(name)
        if match:
            return factory(match)
    raise RelexInputError(f"unknown regressor {name!r}; known: {', '.join(available())}, anchored[-NAME][@λ], auto")


def available() -> list[str]:
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
