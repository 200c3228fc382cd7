"""What the user asks of the trajectory model: :class:`ModelSpec` (mode, rank, predictor or ``auto``, scale or
``auto``, the scope of automatic choices), its defaults and help texts, and their parsers.

Kept apart from :mod:`relex.trajectory`, which makes the choices: the command line builds its options from
these fields, and must not import torch to print ``--help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from relex.errors import RelexInputError
from relex.fields import option
from relex.regressors import RegressorSpec, parse_regressor

DEFAULT_CANDIDATES = ("linear", "loglinear", "powerlaw", "saturating", "poly2", "anchored", "anchored-saturating")
TOLERANCE = 0.05
SCOPES = ("run", "group", "tensor")

def parse_scale(value) -> float | str:
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise RelexInputError(f"--scale must be a number or 'auto', got {value!r}") from None
    value = float(value)
    if not math.isfinite(value):
        raise RelexInputError(f"--scale must be finite, got {value}")
    return value


def parse_candidates(candidates) -> list[RegressorSpec]:
    if candidates is None:
        names = list(DEFAULT_CANDIDATES)
    elif isinstance(candidates, str):
        names = [c for c in candidates.replace(" ", "").split(",") if c]
    else:
        names = list(candidates)
    if not names:
        raise RelexInputError("--candidates is empty")
    specs = []
    for name in names:
        if name == "auto":
            raise RelexInputError("--candidates cannot contain 'auto'")
        spec = parse_regressor(name)
        if spec.text not in [s.text for s in specs]:
            specs.append(spec)
    return specs


MODEL = "Model"  # the panel of the model options in --help

METHOD_HELP = ("Mode: relex (temporal rank-k SVD of the deltas), matrix-rank1 (top singular triple of each 2-D "
               "delta, exact sparse SVD; 1-D tensors element-wise), elementwise (line through two checkpoints), "
               "last (the newest checkpoint).")
REGRESSOR_HELP = ("Predictor of each coefficient series: linear, poly2, poly3, loglinear (a+b·log t), powerlaw "
                  "(a·t^b), saturating (a·(1−e^(−t/τ))), mlp (small learned predictor shared by tensors of one "
                  "kind, NExt-style; reads the run twice); anchored or anchored-NAME: start from the last "
                  "checkpoint and add the increment NAME (default linear) predicts, shrunk by λ estimated per "
                  "tensor (anchored@0.5, anchored-NAME@0.5: fixed λ); auto: the candidate with the smallest "
                  "backtest error.")
CANDIDATES_HELP = ("Predictors --regressor auto chooses from, simplest first (a later one must beat an earlier "
                   "one by 5%). Default: linear,loglinear,powerlaw,saturating,poly2,anchored,anchored-saturating.")
SCOPE_HELP = ("Where auto choices (--regressor auto, --scale auto) are made: run (one choice for the model), "
              "group (per kind of tensor, e.g. all q_proj) or tensor. run and group read the run twice: a cheap "
              "Gram pass to decide, then the writing pass.")
SCALE_HELP = ("Multiplier of the predicted update w(t*) − w_0, or auto: the closed-form best scale on the "
              "backtest (measured at the backtest's shorter horizon; clipped to [0, 2]).")


@dataclass(frozen=True)
class ModelSpec:
    """The trajectory model the user asked for: the model options of ``relex extrapolate`` and ``relex fit``."""

    # the mode: how a tensor's observed checkpoints map to its future (relex.methods)
    method: str = option("relex", help=METHOD_HELP, panel=MODEL)
    # temporal components of the relex mode
    rank: int = option(1, help="Number of temporal components (relex).", panel=MODEL)
    # the predictor of each coefficient series (relex.regressors), or auto: chosen by backtest
    regressor: str = option("linear", help=REGRESSOR_HELP, panel=MODEL)
    # what auto chooses from (None: DEFAULT_CANDIDATES)
    candidates: tuple[str, ...] | None = option(None, help=CANDIDATES_HELP, panel=MODEL)
    # where auto choices are made: run, group or tensor
    auto_scope: str = option("run", help=SCOPE_HELP, panel=MODEL)
    # checkpoints the backtests of auto choices hold out (None: the last quarter)
    holdout: int | None = option(None, help="Checkpoints held out by backtests (default: the last quarter).",
                                 panel=MODEL)
    # multiplier of the predicted update, or "auto"
    scale: float | str = option(1.0, help=SCALE_HELP, panel=MODEL)
    # elementwise: copy 1-D tensors (norms, biases) from the newest checkpoint, as arXiv 2601.04537 does
    copy_norms: bool = option(False, help="elementwise (and the 1-D tensors of matrix-rank1): copy 1-D tensors "
                                          "(norms, biases) from the newest checkpoint.", panel=MODEL)
    # elementwise: the observed step w_a of the line w_a + α(w_b − w_a) (None: the one before the last)
    from_step: int | None = option(None, help="elementwise: the observed step w_a of the line w_a + α(w_b − w_a) "
                                              "(default: the one before the last).", panel=MODEL)
    # how much better a more flexible auto candidate must be (not on the command line)
    tolerance: float = option(TOLERANCE, help="Relative error margin of auto choices.", panel=MODEL, cli=False)

    def __post_init__(self):
        if isinstance(self.candidates, str):
            object.__setattr__(self, "candidates", tuple(c for c in self.candidates.replace(" ", "").split(",") if c))
        elif self.candidates is not None:
            object.__setattr__(self, "candidates", tuple(self.candidates))
        if isinstance(self.scale, str) and self.scale.strip().lower() != "auto":
            object.__setattr__(self, "scale", parse_scale(self.scale))

    def record(self) -> dict:
        """The model options ``relex.json`` and ``trajectory.json`` record: rank, regressor and scale, and the
        options of automatic choices and of the element-wise mode when they matter."""
        record = {"rank": self.rank, "regressor": self.regressor, "scale": parse_scale(self.scale)}
        if self.regressor == "auto" or str(self.scale) == "auto":
            record.update(auto_scope=self.auto_scope, candidates=self.options()["candidates"], holdout=self.holdout)
        if self.copy_norms:
            record["copy_norms"] = True
        if self.from_step is not None:
            record["from_step"] = self.from_step
        return record

    def options(self) -> dict:
        """The JSON-able record of these settings (provenance)."""
        return {"rank": self.rank, "regressor": self.regressor, "scale": self.scale,
                "auto_scope": self.auto_scope, "candidates": None if self.candidates is None else
                [s.text for s in parse_candidates(self.candidates)], "holdout": self.holdout,
                "copy_norms": self.copy_norms, "from_step": self.from_step}
