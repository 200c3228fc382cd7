"""The verdict on a run's checkpoints so far, as figures a training loop can log, independent of any trainer.

:func:`assess` reads the run once (:func:`relex.engine.collect_grams`), computes the same verdict as
``relex extrapolate`` (:func:`relex.analysis.verdict.run_verdict`, carried to the largest target step), and
— when asked and the verdict allows it — writes the extrapolated checkpoint of each target step with
:func:`relex.engine.extrapolate` into ``out_dir/step-N/`` over the very same checkpoints.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from relex.analysis.drift import DRIFT

PREFIX = "relex/"


def _keywords(function) -> set[str]:
    return {name for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY}


def engine_options() -> tuple[set[str], set[str]]:
    """The keyword options the Gram pass accepts and those the extrapolation accepts (beyond the run's)."""
    from relex.engine import collect_grams, extrapolate

    run = {"base", "steps", "max_step", "checkpoints", "progress"}
    writing = {"target_step", "out_dir", "overwrite", "allow_interpolation", "keep_grams"}
    return _keywords(collect_grams) - run, _keywords(extrapolate) - run - writing


def check_options(options: dict) -> None:
    """Refuse, before any training, an option neither pass of the engine takes."""
    gram_keys, write_keys = engine_options()
    unknown = sorted(set(options) - gram_keys - write_keys)
    if unknown:
        raise TypeError(f"unknown relex engine option(s) {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(gram_keys | write_keys))})")


def is_plausible(verdict: str | None) -> bool:
    """Extrapolation is plausible when the verdict — backtest on the observed window included — is
    drift-dominated."""
    return verdict == DRIFT


@dataclass
class Assessment:
    """The verdict on one window of checkpoints, and what was written."""

    step: int  # the newest observed checkpoint
    steps: list[int]
    verdict: str | None  # None when no tensor moved
    message: str
    plausible: bool
    figures: dict[str, float]  # ``relex/...`` names, finite numbers only
    written: dict[int, Path] = field(default_factory=dict)  # target step -> folder written this time
    seconds: float = 0.0
    diagnostics: object = field(default=None, repr=False)  # relex.analysis.drift.DriftDiagnostics
    write_error: BaseException | None = None  # why a prediction was not written (``write_errors="keep"``)


def figures_of(diagnostics, steps: Sequence[int], plausible: bool) -> dict[str, float]:
    """The verdict's figures under ``relex/`` names (non-finite values left out)."""
    figures = {"step": steps[-1], "checkpoints": len(steps), "plausible": 1.0 if plausible else 0.0}
    if diagnostics is not None:
        observed = diagnostics.observed
        figures.update(drift_share=diagnostics.drift_share, explained_rank1=observed.explained_rank1,
                       r2_rank1=observed.r2_rank1, alpha=observed.alpha, drift_ratio=observed.drift_ratio,
                       cos_first_last=observed.cos_first_last)
        backtest = diagnostics.backtest or {}
        for key in ("line_error", "stop_error", "projected_line_error", "projected_stop_error"):
            if key in backtest:
                figures[f"backtest_{key}"] = backtest[key]
    return {PREFIX + k: float(v) for k, v in figures.items() if v is not None and math.isfinite(float(v))}


def assess(
    run_dir: str | Path,
    *,
    base: str | Path | None = None,
    max_step: int | None = None,
    target_steps: int | Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    require_plausible: bool = True,
    device: str = "cpu",
    write_errors: str = "raise",
    **options,
) -> Assessment:
    """The verdict on a run's checkpoints up to ``max_step``, and optionally their extrapolation.

    Args:
        run_dir: the run folder (``checkpoint-N/``, ``global_step_N/``, ``step_N/`` folders).
        base: the step-0 checkpoint (a folder or Hub id) when it is not the run's own step-0 folder or, for
            LoRA runs, the adapter's base model.
        max_step: ignore checkpoints after this step.
        target_steps: steps to predict; the verdict's backtest is carried to the largest (targets at or
            before the newest checkpoint are left out: with none ahead, the window alone is judged).
        out_dir: with ``target_steps``, write each prediction to ``out_dir/step-N/`` (replacing an older
            one) — only when the verdict is plausible, unless ``require_plausible=False``.
        device: where the engine computes (``cpu`` by default: beside a training job the accelerator is
            busy).
        write_errors: ``raise`` (default) or ``keep``: a prediction that cannot be written (e.g. an engine
            option this run does not allow) leaves the verdict standing, with the error in
            :attr:`Assessment.write_error` and ``relex/written`` 0.
        options: engine options: those of :func:`relex.engine.collect_grams` for the verdict, and those of
            :func:`relex.engine.extrapolate` (``method``, ``rank``, ``regressor``, ``dtype``, ``output``…)
            for the written checkpoints.

    Raises:
        RelexInputError: on bad input (as the command line would report it).
    """
    from relex.analysis.reward import checkpoint_reward_trend
    from relex.analysis.verdict import run_verdict
    from relex.engine import collect_grams, extrapolate

    started = time.perf_counter()
    check_options(options)
    if write_errors not in ("raise", "keep"):
        raise ValueError(f"write_errors must be 'raise' or 'keep', not {write_errors!r}")
    gram_keys, write_keys = engine_options()
    targets = sorted({int(t) for t in ([] if target_steps is None else
                                       [target_steps] if isinstance(target_steps, int) else target_steps)})
    grams = collect_grams(run_dir, base=base, max_step=max_step, device=device,
                          **{k: v for k, v in options.items() if k in gram_keys})
    steps = grams.steps
    ndims = {name: len(grams.shapes[name]) for name in grams.grams}
    # A target the run has already passed is not extrapolated to: the window alone is judged.
    ahead = [t for t in targets if t > steps[-1]]
    target = max(ahead) if ahead else None
    reward = checkpoint_reward_trend(grams.series.observed[-1].path, steps, target)
    diagnostics = run_verdict(grams.grams, ndims, steps, target, reward=reward)
    verdict = diagnostics.verdict if diagnostics is not None else None
    message = diagnostics.message if diagnostics is not None else "no tensor moved from the base"
    plausible = is_plausible(verdict)
    written: dict[int, Path] = {}
    write_error = None
    if out_dir is not None and (plausible or not require_plausible):
        try:
            for target in ahead:
                folder = Path(out_dir) / f"step-{target}"
                # The same checkpoints as the verdict, whatever the trainer writes meanwhile.
                extrapolate(run_dir, target_step=target, out_dir=folder, base=base, steps=list(steps),
                            overwrite=True, device=device,
                            **{k: v for k, v in options.items() if k in write_keys})
                written[target] = folder
        except Exception as exc:  # noqa: BLE001 — kept for the caller when asked to
            if write_errors == "raise":
                raise
            write_error = exc
    figures = figures_of(diagnostics, steps, plausible)
    if out_dir is not None and targets:
        figures[PREFIX + "written"] = 1.0 if written else 0.0
    seconds = time.perf_counter() - started
    figures[PREFIX + "seconds"] = seconds
    return Assessment(step=steps[-1], steps=list(steps), verdict=verdict, message=message, plausible=plausible,
                      figures=figures, written=written, seconds=seconds, diagnostics=diagnostics,
                      write_error=write_error)
