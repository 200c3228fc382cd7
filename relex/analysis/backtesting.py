"""Backtests of every available trajectory model, at several fit windows and horizons.

Fit on the first p observed checkpoints, predict each later observed checkpoint, and measure the
relative weight-space error ‖x̂_j − x_j‖ / ‖x_j‖ (exact, from the Gram matrices; see
:mod:`relex.backtest`). The horizon of a prediction is t_j / t_p: 1.5 means "50% beyond the last
checkpoint the model saw". Models are discovered at run time from :func:`relex.methods.available` and
:func:`relex.regressors.available`, so a new method or regressor appears here without any change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from relex.backtest import backtest, default_holdout

BASELINES = ("last", "elementwise")


@dataclass
class ModelSpec:
    label: str
    method: str
    options: dict = field(default_factory=dict)
    min_points: int = 2
    instance: object = field(default=None, repr=False)


def _registered(module) -> tuple[list[str], str | None]:
    """Names registered in ``module`` (methods or regressors), and the error if loading some failed."""
    try:
        return list(module.available()), None
    except Exception as exc:  # noqa: BLE001 - a half-written module must not stop the analysis
        return sorted(getattr(module, "REGISTRY", {})), f"{type(exc).__name__}: {exc}"


def available_models(ranks: Sequence[int] = (1, 2), learned: bool = False) -> tuple[list[ModelSpec], list[dict]]:
    """Every model to backtest: the baselines; RELEX at rank 1 with each available regressor (and the
    anchored, shrunk variant when it exists); RELEX at the higher ``ranks`` with the linear regressor; and
    any other registered method with its defaults.

    Learned predictors (regressors registered with ``shared=True``, trained across tensors by the engine)
    cost about a second per tensor and fit window here, so they are left out unless ``learned``.

    Returns the specs that could be built and ``{"model", "reason"}`` for those that could not.
    """
    from relex import methods, regressors

    skipped: list[dict] = []
    method_names, error = _registered(methods)
    if error:
        skipped.append({"model": "methods", "reason": error})
    regressor_names, error = _registered(regressors)
    if error:
        skipped.append({"model": "regressors", "reason": error})
    specs = [ModelSpec(name, name) for name in BASELINES if name in method_names]
    if "relex" in method_names:
        for rank in sorted(set(ranks)):
            names = regressor_names if rank == 1 else [n for n in regressor_names if n == "linear"]
            if rank == 1:
                names = names + ["anchored"]
            for name in names:
                try:
                    regressor = regressors.get_regressor(name)
                    points, shared = regressor.min_points, getattr(regressor, "shared", False)
                except Exception:  # noqa: BLE001 - e.g. a spelled variant with no registry entry
                    points, shared = 2, False
                if shared and not learned:
                    skipped.append({"model": f"relex/{name}", "reason": "learned predictor: left out for speed "
                                    "(pass learned=True / --learned)"})
                    continue
                label = f"relex/{name}" if rank == 1 else f"relex-r{rank}/{name}"
                specs.append(ModelSpec(label, "relex", {"rank": rank, "regressor": name},
                                       max(points, rank + 1 if rank > 1 else 2)))
    for name in method_names:
        if name not in BASELINES and name != "relex":
            specs.append(ModelSpec(name, name))
    built = []
    for spec in specs:
        try:
            spec.instance = methods.get_method(spec.method, **spec.options)
        except Exception as exc:  # noqa: BLE001 - a model that needs options we cannot guess is skipped
            if spec.label != "relex/anchored":  # optional variant: absent in older versions
                skipped.append({"model": spec.label, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        built.append(spec)
    return built, skipped


def fit_points(n_steps: int, fractions: Sequence[float], holdout: int | None) -> list[int]:
    """Numbers of fitted checkpoints: the main backtest's and one per fraction of the window."""
    main = n_steps - (default_holdout(n_steps) if holdout is None else holdout)
    points = {main}
    for f in fractions:
        points.add(int(round(f * n_steps)))
    return sorted(p for p in points if 2 <= p <= n_steps - 1)


@dataclass
class BacktestResult:
    """Rows ``model, fit_points, fit_end_step, held_out_step, horizon, relative_error``; the main fit's
    per-tensor errors at its farthest held-out step; and which models were skipped and why."""

    rows: list[dict]
    main_fit_points: int
    per_tensor: dict[str, dict[str, float]]  # model -> tensor -> relative error
    skipped: list[dict]

    def main_rows(self) -> list[dict]:
        return [r for r in self.rows if r["fit_points"] == self.main_fit_points]

    def ranking(self) -> list[tuple[str, float]]:
        """Models by their error at the farthest held-out step of the main backtest, best first."""
        farthest: dict[str, tuple[int, float]] = {}
        for r in self.main_rows():
            if r["model"] not in farthest or r["held_out_step"] > farthest[r["model"]][0]:
                farthest[r["model"]] = (r["held_out_step"], r["relative_error"])
        ranked = [(m, e) for m, (_, e) in farthest.items() if math.isfinite(e)]
        return sorted(ranked, key=lambda item: item[1])

    def mean_error_by_horizon(self) -> dict[str, list[tuple[float, float]]]:
        """model -> [(horizon, error)] over every fit window, sorted by horizon."""
        out: dict[str, list[tuple[float, float]]] = {}
        for r in self.rows:
            out.setdefault(r["model"], []).append((r["horizon"], r["relative_error"]))
        return {m: sorted(v) for m, v in out.items()}


def run_backtests(grams: Mapping[str, np.ndarray], steps: Sequence[int], ndims: Mapping[str, int] | None = None,
                  holdout: int | None = None, fractions: Sequence[float] = (0.25, 0.5, 0.75),
                  ranks: Sequence[int] = (1, 2), learned: bool = False) -> BacktestResult:
    """Backtest every available model on every fit window (see the module docstring)."""
    steps = [int(s) for s in steps]
    n = len(steps)
    specs, skipped = available_models(ranks, learned)
    if n < 3:
        return BacktestResult([], 0, {}, skipped + [{"model": "*", "reason": "fewer than 3 observed checkpoints"}])
    main = n - (default_holdout(n) if holdout is None else holdout)
    if not 2 <= main <= n - 1:
        main = n - default_holdout(n)
    rows: list[dict] = []
    per_tensor: dict[str, dict[str, float]] = {}
    failed: set[str] = set()
    for p in sorted(set(fit_points(n, fractions, holdout)) | {main}):
        for spec in specs:
            if p < spec.min_points or spec.label in failed:
                continue
            try:
                result = backtest(grams, steps, {spec.label: spec.instance}, holdout=n - p, ndims=ndims,
                                  per_tensor=(p == main))
            except Exception as exc:  # noqa: BLE001 - one model failing must not stop the others
                failed.add(spec.label)
                skipped.append({"model": spec.label, "fit_points": p, "reason": f"{type(exc).__name__}: {exc}"})
                continue
            for step, err in zip(result.held_out_steps, result.errors[spec.label]):
                rows.append({"model": spec.label, "fit_points": p, "fit_end_step": steps[p - 1],
                             "held_out_step": step, "horizon": step / steps[p - 1],
                             "relative_error": float(err)})
            if p == main:
                per_tensor[spec.label] = result.per_tensor.get(spec.label, {})
    return BacktestResult(rows, main, per_tensor, skipped)
