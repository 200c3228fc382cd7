"""The verdict on a run's checkpoints so far, as figures a training loop can log, independent of any trainer.

:func:`assess` judges the run as ``relex check`` does (:func:`relex.api.check`: one pass, the verdict carried to
the farthest target step ahead of the run) and — when asked and the verdict allows it — writes the extrapolated
checkpoint of each target step with :func:`relex.api.extrapolate` into ``out_dir/step-N/``, over the very same
checkpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from relex.analysis.verdict import Verdict
from relex.api import check, extrapolate
from relex.options import RunOptions

PREFIX = "relex/"


@dataclass
class Assessment:
    """The verdict on one window of checkpoints, and what was written."""

    step: int  # the newest observed checkpoint
    steps: list[int]
    verdict: Verdict
    figures: dict[str, float]  # ``relex/...`` names, finite numbers only
    written: dict[int, Path] = field(default_factory=dict)  # target step -> folder written this time
    seconds: float = 0.0
    write_error: BaseException | None = None  # why a prediction was not written (``write_errors="keep"``)

    @property
    def plausible(self) -> bool:
        return self.verdict.plausible

    @property
    def message(self) -> str:
        return self.verdict.message


def figures_of(verdict: Verdict) -> dict[str, float]:
    """The verdict's figures under ``relex/`` names (non-finite values left out)."""
    steps = verdict.steps
    figures = {"step": steps[-1], "checkpoints": len(steps), "plausible": 1.0 if verdict.plausible else 0.0}
    diagnostics = verdict.diagnostics
    if diagnostics is not None:
        observed = diagnostics.observed
        figures.update(drift_share=diagnostics.drift_share, explained_rank1=observed.explained_rank1,
                       r2_rank1=observed.r2_rank1, alpha=observed.alpha, drift_ratio=observed.drift_ratio,
                       cos_first_last=observed.cos_first_last)
        backtest = verdict.backtest or {}
        for key in ("line_error", "stop_error", "projected_line_error", "projected_stop_error"):
            if key in backtest:
                figures[f"backtest_{key}"] = backtest[key]
    return {PREFIX + k: float(v) for k, v in figures.items() if v is not None and math.isfinite(float(v))}


def assess(run_dir: str | Path, options: RunOptions | None = None, *, out_dir: str | Path | None = None,
           require_plausible: bool = True, write_errors: str = "raise", **settings) -> Assessment:
    """The verdict on a run's checkpoints (up to ``max_step``), and optionally their extrapolation.

    Args:
        run_dir: the run folder (``checkpoint-N/``, ``global_step_N/``, ``step_N/`` folders).
        options: the run's settings (:class:`relex.options.RunOptions`; or as keywords). Its ``target_steps``
            are the steps to predict: the verdict's backtest is carried to the largest one ahead of the run
            (targets at or before the newest checkpoint are left out: with none ahead, the window alone is
            judged). ``device`` defaults to ``cpu``: beside a training job the accelerator is busy.
        out_dir: with target steps, write each prediction to ``out_dir/step-N/`` (replacing an older one) —
            only when the verdict is plausible, unless ``require_plausible=False``.
        write_errors: ``raise`` (default) or ``keep``: a prediction that cannot be written leaves the verdict
            standing, with the error in :attr:`Assessment.write_error` and ``relex/written`` 0.

    Raises:
        RelexInputError: on bad input (as the command line would report it).
    """
    started = time.perf_counter()
    options = (options or RunOptions(device="cpu")).replace(**settings)
    if write_errors not in ("raise", "keep"):
        raise ValueError(f"write_errors must be 'raise' or 'keep', not {write_errors!r}")
    judged = check(run_dir, options.replace(allow_interpolation=True))
    verdict, steps = judged.verdict, judged.steps
    ahead = [t for t in options.target_steps if t > steps[-1]]
    written: dict[int, Path] = {}
    write_error = None
    if out_dir is not None and (verdict.plausible or not require_plausible):
        try:
            for target in ahead:
                folder = Path(out_dir) / f"step-{target}"
                # The same checkpoints as the verdict, whatever the trainer writes meanwhile.
                extrapolate(run_dir, folder, options.replace(target_steps=(target,), steps=tuple(steps),
                                                             max_step=None, overwrite=True))
                written[target] = folder
        except Exception as exc:  # noqa: BLE001 — kept for the caller when asked to
            if write_errors == "raise":
                raise
            write_error = exc
    figures = figures_of(verdict)
    if out_dir is not None and options.target_steps:
        figures[PREFIX + "written"] = 1.0 if written else 0.0
    seconds = time.perf_counter() - started
    figures[PREFIX + "seconds"] = seconds
    return Assessment(step=steps[-1], steps=list(steps), verdict=verdict, figures=figures, written=written,
                      seconds=seconds, write_error=write_error)

