"""Choosing trajectory models for a whole run: predictors by backtest, shared learned predictors, the scale.

A :class:`ModelSpec` is what the user asked for (mode, rank, predictor or ``auto``, scale or ``auto``, the
scope of automatic choices). A :class:`ModelSelector` turns it into one :class:`relex.methods.TensorModel` per
tensor. Choices that need the whole run — ``auto`` per run or per group of tensors, ``--scale auto`` per
run or group, and the learned predictor (``mlp``), which is trained on the coefficient series of every
tensor of a kind — need every tensor's :class:`relex.methods.TensorData` first: the engine then reads the
run twice (a cheap pass for the T×T Gram matrices, plus the singular triples in ``matrix-rank1`` mode, and
the writing pass). Choices per tensor (``--auto-scope tensor``) need one pass.

Backtests fit each candidate on the first T − h observed checkpoints and predict the h held-out ones
(:func:`relex.backtest.products`); the decision uses the farthest held-out checkpoint, whole-model
relative error ‖x̂ − x‖/‖x‖ summed over the tensors of the scope. Candidates are listed from simple to
complex, and the simplest one whose error is within ``tolerance`` (5%) of the best wins, so noise alone
does not pick a more flexible predictor. ``--scale auto`` then gives the chosen predictor the closed-form
best scale s = Σ⟨x̂, x⟩ / Σ‖x̂‖² at that checkpoint (clipped to [0, 2]). The predictor is chosen at scale
1 first because at its own best scale every plain predictor along one direction reaches the same error;
note that the scale is measured at the backtest horizon (t_T / t_{T−h}), usually shorter than the real
one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from relex.backtest import best_scale, default_holdout, products, relative_error
from relex.errors import RelexInputError
from relex.methods import TensorData, TensorModel, get_method
from relex.model_spec import SCOPES, TOLERANCE, ModelSpec, parse_candidates, parse_scale
from relex.regressors import RegressorSpec, parse_regressor
from relex.regressors.mlp import train_shared

SCALE_BOUNDS = (0.0, 2.0)
MODES_WITH_PREDICTORS = ("relex", "matrix-rank1")


def group_of(name: str) -> str:
    """The kind of a tensor: its name with layer numbers replaced by ``*`` (``model.layers.*.mlp.up_proj.weight``)."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


@dataclass
class Decision:
    regressor: RegressorSpec
    scale: float
    errors: dict = field(default_factory=dict)  # candidate -> {"error": e, "errors": [...], "scale": s}


class ModelSelector:
    """Per-tensor trajectory models for one run, following a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec, steps: Sequence[float], run_pass: bool = False):
        self.spec = spec
        self.steps = np.asarray(steps, dtype=np.float64)
        n = len(self.steps)
        regressor = (spec.regressor or "linear").strip().lower()
        self.auto = regressor == "auto"
        self.scale = parse_scale(spec.scale)
        self.auto_scale = self.scale == "auto"
        if spec.auto_scope not in SCOPES:
            raise RelexInputError(f"--auto-scope must be one of {', '.join(SCOPES)}, got {spec.auto_scope!r}")
        self.scope = spec.auto_scope
        has_predictors = spec.method in MODES_WITH_PREDICTORS
        if self.auto:
            if not has_predictors:
                raise RelexInputError(f"--regressor auto applies to the {' and '.join(MODES_WITH_PREDICTORS)} modes, "
                                      f"not {spec.method!r}")
            self.candidates = parse_candidates(spec.candidates)
        else:
            self.candidates = [parse_regressor(regressor)]
        self.method = get_method(spec.method, rank=spec.rank, regressor=self.candidates[0],
                                 scale=1.0 if self.auto_scale else self.scale, copy_norms=spec.copy_norms,
                                 first=spec.from_step)
        self.holdout = spec.holdout if spec.holdout is not None else default_holdout(n)
        self.backtests = self.auto or self.auto_scale
        if self.backtests and not (1 <= self.holdout and n - self.holdout >= 2):
            raise RelexInputError(f"a backtest (--regressor auto, --scale auto) needs at least 2 checkpoints to fit "
                                  f"and 1 held out; got {n} observed with --holdout {self.holdout}")
        self.p = n - self.holdout if n - self.holdout >= 2 and self.holdout >= 1 else None
        self.shared_needed = has_predictors and any(c.shared for c in self.candidates)
        self.needs_run_pass = run_pass or self.shared_needed or (self.backtests and self.scope != "tensor")
        self.shared: dict[str, object] = {}  # group -> learned predictor on the whole window
        self.shared_backtest: dict[str, object] = {}  # group -> learned predictor on the fitted part
        self.decisions: dict[str, Decision] = {}
        self.selection: dict | None = {"scope": "tensor", **self._window()} if self.backtests and self.scope == "tensor" else None

    def key(self, name: str) -> str:
        return "run" if self.scope == "run" else group_of(name) if self.scope == "group" else name

    # -- the whole-run decisions ----------------------------------------------------------------------
    def prepare(self, datas: Mapping[str, TensorData]) -> dict | None:
        """Train shared predictors and make the per-run / per-group choices from every tensor's data."""
        float_data = {n: d for n, d in datas.items() if d.is_float}
        if self.shared_needed:
            self._train_shared(float_data)
        if self.backtests and self.scope != "tensor":
            keys: dict[str, list[str]] = {}
            for name in float_data:
                keys.setdefault(self.key(name), []).append(name)
            for key, names in keys.items():
                self.decisions[key] = self._decide({n: float_data[n] for n in names})
            self.selection = self._report()
        return self.selection

    def prepared(self) -> dict:
        """What :meth:`prepare` decided, for the processes of a run that did not decide (:meth:`adopt`)."""
        return {"shared": self.shared, "shared_backtest": self.shared_backtest, "decisions": self.decisions,
                "selection": self.selection}

    def adopt(self, prepared: dict) -> None:
        """Take the whole-run decisions another process's :meth:`prepare` made."""
        self.shared, self.shared_backtest = prepared["shared"], prepared["shared_backtest"]
        self.decisions, self.selection = prepared["decisions"], prepared["selection"]

    def _train_shared(self, datas: Mapping[str, TensorData]) -> None:
        groups: dict[str, list[TensorData]] = {}
        for data in datas.values():
            groups.setdefault(group_of(data.name), []).append(data)
        for group, members in groups.items():
            full = [(d.steps, s) for d in members if (s := self.method.series(d)) is not None]
            if full:
                self.shared[group] = train_shared(full)
            if self.backtests and self.p is not None:
                cut = [(d.steps[: self.p], s) for d in members
                       if (s := self.method.series(d.truncated(self.p))) is not None]
                if cut:
                    self.shared_backtest[group] = train_shared(cut)

    def _window(self) -> dict:
        p = len(self.steps) - self.holdout
        return {"holdout": self.holdout, "fit_steps": [float(s) for s in self.steps[:p]],
                "held_out_steps": [float(s) for s in self.steps[p:]], "tolerance": self.spec.tolerance,
                "candidates": [c.text for c in self.candidates],
                "scale": "auto" if self.auto_scale else self.scale}

    def _decide(self, datas: Mapping[str, TensorData]) -> Decision:
        errors = {}
        sums = {}
        for candidate in self.candidates:
            cross = pred = true = 0.0
            try:
                for data in datas.values():
                    c, q, t = products(self.method, data, self.holdout, regressor=candidate,
                                       shared=self.shared_backtest.get(group_of(data.name)))
                    cross, pred, true = cross + c, pred + q, true + t
            except RelexInputError as exc:
                errors[candidate.text] = {"error": float("inf"), "skipped": str(exc)}
                continue
            sums[candidate.text] = (cross, pred, true)
            errors[candidate.text] = _scored(cross, pred, true, 1.0 if self.auto_scale else self.scale)
        chosen = pick({k: v["error"] for k, v in errors.items()}, [c.text for c in self.candidates],
                      self.spec.tolerance)
        spec = next(c for c in self.candidates if c.text == chosen)
        scale = self.scale
        if self.auto_scale and chosen in sums:
            # the scale after the predictor: at its best scale every plain predictor of one direction
            # would tie, so the predictor is chosen at scale 1 and only then scaled
            errors[chosen]["auto_scale"] = _scored(*sums[chosen], "auto")
            scale = errors[chosen]["auto_scale"]["scale"]
        return Decision(spec, float(1.0 if scale == "auto" else scale), errors)

    def _report(self) -> dict:
        return {"scope": self.scope, **self._window(),
                "decisions": {key: {"regressor": d.regressor.text, "scale": d.scale, "errors": d.errors}
                              for key, d in self.decisions.items()}}

    # -- per tensor -----------------------------------------------------------------------------------
    def model(self, data: TensorData) -> TensorModel:
        """The fitted trajectory model of one (floating-point) tensor."""
        group = group_of(data.name)
        shared = self.shared.get(group)
        if self.backtests and self.scope == "tensor":
            return choose_for_tensor(self.method, data, scale=None if self.auto_scale else self.scale,
                                     shared=shared, shared_backtest=self.shared_backtest.get(group),
                                     candidates=self.candidates, holdout=self.holdout,
                                     tolerance=self.spec.tolerance)
        decision = self.decisions.get(self.key(data.name))
        if decision is not None:
            model = self.method.fit_tensor(data, regressor=decision.regressor, scale=decision.scale, shared=shared)
            model.stats["scale"] = decision.scale
            return model
        scale = 1.0 if self.auto_scale else self.scale
        model = self.method.fit_tensor(data, regressor=self.candidates[0], scale=scale, shared=shared)
        model.stats.setdefault("scale", scale)
        return model


def _scored(cross, pred, true, scale) -> dict:
    cross, pred, true = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (cross, pred, true))
    if scale == "auto":
        s = best_scale(float(cross[-1]), float(pred[-1]), SCALE_BOUNDS)
    else:
        s = float(scale)
    errs = relative_error(cross, pred, true, s)
    return {"error": float(errs[-1]), "errors": [float(e) for e in errs], "scale": s}


def pick(errors: Mapping[str, float], order: Sequence[str], tolerance: float = TOLERANCE) -> str:
    """The first candidate in ``order`` whose error is within ``tolerance`` of the best one."""
    finite = {k: e for k, e in errors.items() if math.isfinite(e)}
    if not finite:
        return order[0]
    best = min(finite.values())
    for name in order:
        if name in finite and finite[name] <= best * (1 + tolerance) + 1e-15:
            return name
    return min(finite, key=finite.get)


def choose_for_tensor(method, data: TensorData, *, scale=None, shared=None, shared_backtest=None,
                      candidates=None, holdout=None, tolerance: float = TOLERANCE) -> TensorModel:
    """Backtest the candidates on this tensor alone, fit the chosen one on the whole window.

    ``scale=None`` chooses the scale by backtest too; the figures go to the model's ``stats["auto"]``.
    """
    specs = candidates if candidates and isinstance(candidates[0], RegressorSpec) else parse_candidates(candidates)
    n = len(data.steps)
    holdout = default_holdout(n) if holdout is None else holdout
    errors, sums = {}, {}
    if n - holdout >= 2 and holdout >= 1 and np.any(data.gram):
        for spec in specs:
            try:
                c, q, t = products(method, data, holdout, regressor=spec, shared=shared_backtest)
            except RelexInputError as exc:
                errors[spec.text] = {"error": float("inf"), "skipped": str(exc)}
                continue
            sums[spec.text] = (c, q, t)
            errors[spec.text] = _scored(c, q, t, 1.0 if scale is None else scale)
    chosen = pick({k: v["error"] for k, v in errors.items()}, [s.text for s in specs], tolerance)
    spec = next(s for s in specs if s.text == chosen)
    s = 1.0 if scale is None else float(scale)
    if scale is None and chosen in sums:
        s = _scored(*sums[chosen], "auto")["scale"]
    model = method.fit_tensor(data, regressor=spec, scale=s, shared=shared)
    model.stats.update({"regressor": spec.text, "scale": s,
                        "auto": {k: v["error"] for k, v in errors.items()}})
    return model
