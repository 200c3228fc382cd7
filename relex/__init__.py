"""relex: extrapolate RLVR checkpoints along their low-rank trajectory, and tell whether that is safe."""

from __future__ import annotations

__version__ = "0.1.0"

from relex.errors import RelexInputError
from relex.engine import ExtrapolationResult, extrapolate

__all__ = ["__version__", "RelexInputError", "ExtrapolationResult", "extrapolate"]
