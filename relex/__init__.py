"""relex: extrapolate RLVR checkpoints along their low-rank trajectory, and tell whether that is safe."""

from __future__ import annotations

__version__ = "0.1.0"

from relex.errors import RelexInputError

__all__ = ["__version__", "RelexInputError", "ExtrapolationResult", "ModelSpec", "extrapolate"]


def __getattr__(name: str):
    # The engine pulls in torch; importing it lazily keeps `relex --help` and input errors fast.
    if name in ("extrapolate", "ExtrapolationResult"):
        from relex import engine

        return getattr(engine, name)
    if name == "ModelSpec":  # start-up: as the engine
        from relex.trajectory import ModelSpec

        return ModelSpec
    raise AttributeError(f"module 'relex' has no attribute {name!r}")
