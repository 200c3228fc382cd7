"""``analyze``: how linear a run is, per tensor and as a whole, each figure beside its random-walk null.

One streaming pass (:func:`relex.engine.collect_grams`) gives every tensor's Gram matrix G = X Xᵀ of its
deltas; everything else is arithmetic on these T×T matrices: explained variance of the temporal SVD at
ranks 1..k, the R² and slope of the rank-1 coefficient against the step, the drift diagnostics, exact
weight-space backtests of every available trajectory model, and Monte-Carlo random-walk nulls at each
tensor's own dimension. Optionally, the log-probabilities of fixed responses are scored by every
checkpoint (output-space linearity).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from relex.analysis.backtesting import BacktestResult, run_backtests
from relex.analysis.drift import DriftDiagnostics, diagnose
from relex.analysis.verdict import run_verdict
from relex.analysis.nulls import expected_null, explained_ranks, random_walk_null
from relex.analysis.tables import parse_name, rows_to_csv
from relex.engine import collect_grams
from relex.subspace import temporal_svd

TENSOR_COLUMNS = [
    "name", "layer", "module", "group", "shape", "numel", "base_norm", "delta_norm", "relative_delta",
    "explained_r1", "explained_r1_null", "explained_r1_null_p95", "explained_r2", "explained_r3",
    "r2_rank1", "r2_rank1_null", "slope", "slope_relative",
    "drift_share", "drift_share_null", "drift_share_null_p95", "drift_share_significant",
    "alpha", "alpha_null", "drift_ratio", "drift_ratio_null", "drift_ratio_max",
    "cos_first_last", "cos_first_last_null", "prefix_cos", "prefix_cos_null", "verdict",
]


@dataclass
class RunAnalysis:
    """The result of :func:`analyze`: tidy tables, whole-run summaries with their nulls, and the verdict."""

    run_dir: str | None
    base: str
    steps: list[int]
    rank: int
    tensors: list[dict]  # one row per floating-point tensor (see TENSOR_COLUMNS)
    summary: dict
    diagnostics: DriftDiagnostics | None  # whole model: Gram matrices summed over tensors
    backtest: BacktestResult
    grams: dict[str, np.ndarray] = field(repr=False)
    logprob: object | None = None  # relex.analysis.logprob.LogprobAnalysis
    seconds: float = 0.0
    bytes_read: int = 0

    # tables ------------------------------------------------------------------------------------------
    def tensor_table(self) -> list[dict]:
        return self.tensors

    def backtest_table(self) -> list[dict]:
        return self.backtest.rows

    def coefficient(self, name: str) -> np.ndarray:
        """The rank-1 temporal coefficient c_1(t_i) = ⟨x_i, v_1⟩ of tensor ``name`` (sign: last ≥ 0)."""
        svd = temporal_svd(self.grams[name], 1)
        return svd.coefficients[:, 0] if svd.rank else np.zeros(len(self.steps))

    def to_dict(self, per_tensor: bool = True) -> dict:
        from relex import __version__

        payload = {
            "relex_version": __version__,
            "run_dir": self.run_dir,
            "base": self.base,
            "observed_steps": self.steps,
            "rank": self.rank,
            "summary": self.summary,
            "diagnostics": self.diagnostics.to_dict() if self.diagnostics else None,
            "backtest": {"main_fit_points": self.backtest.main_fit_points,
                         "ranking": [{"model": m, "relative_error": e} for m, e in self.backtest.ranking()],
                         "rows": self.backtest.rows, "skipped": self.backtest.skipped},
            "logprob": self.logprob.summary() if self.logprob is not None else None,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
        }
        if per_tensor:
            payload["tensors"] = self.tensors
        return _json_safe(payload)

    def summary_lines(self) -> list[str]:
        """A few lines for a terminal or a notebook: the figures that matter, each beside its null."""
        s = self.summary
        lines = [f"{s['tensors_moved']} tensors ({s['parameters']:,} parameters) over {len(self.steps)} "
                 f"checkpoints, steps {self.steps[0]}..{self.steps[-1]}"]
        w, n = s["whole_model"], s["whole_model_null"]
        lines.append(f"rank-1 explained variance: whole model {w['explained_r1']:.3f} (random walk "
                     f"{n['explained_r1']:.3f}); per-tensor median {s['explained_r1_median']:.3f} "
                     f"(null {s['explained_r1_null_median']:.3f})")
        lines.append(f"R² of the rank-1 coefficient vs step: whole model {w['r2_rank1']:.3f} (random walk "
                     f"{n['r2_rank1']:.3f}); per-tensor median {s['r2_rank1_median']:.3f}")
        lines.append(f"drift share of the last delta: whole model {w['drift_share']:.2f} (random walk 0, "
                     f"pure drift 1); per-tensor median {s['drift_share_median']:.2f}, "
                     f"{s['fraction_drift_share_above_null_p95']:.0%} of tensors above their null's 95th percentile")
        ranking = self.backtest.ranking()
        if ranking:
            held = [r["held_out_step"] for r in self.backtest.main_rows()]
            fit_end = self.steps[self.backtest.main_fit_points - 1]
            shown = ", ".join(f"{m} {e:.3f}" for m, e in ranking[:4])
            lines.append(f"backtest (fit ≤ step {fit_end}, predict step {max(held)}): {shown}")
        if self.logprob is not None:
            ls = self.logprob.summary()
            lines.append(f"log-prob R² vs step (median over {ls['responses']} responses): {ls['r2_median']:.3f} "
                         f"(random walk {ls['r2_null']['median']:.3f}); mean log-prob "
                         f"{ls['mean_logprob'][0]:.2f} -> {ls['mean_logprob'][-1]:.2f}")
        if self.diagnostics is not None:
            lines.append(f"verdict: {self.diagnostics.message}")
        return lines

    def write(self, out_dir: str | Path, plots: bool = True, overwrite: bool = False) -> Path:
        """Write ``analysis.json``, ``tensors.csv``, ``backtest.csv`` (and ``logprob.csv``) and the PNG plots
        into ``out_dir`` (through a temporary folder renamed at the end)."""
        from relex.staging import staged_folder

        out_dir = Path(out_dir)
        with staged_folder(out_dir, overwrite) as staging:
            (staging / "analysis.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            rows_to_csv(self.tensors, staging / "tensors.csv", _tensor_columns(self.tensors))
            rows_to_csv(self.backtest.rows, staging / "backtest.csv",
                        ["model", "fit_points", "fit_end_step", "held_out_step", "horizon", "relative_error"])
            if self.logprob is not None:
                rows_to_csv(self.logprob.table(), staging / "logprob.csv")
            if plots:
                from relex.analysis.plots import save_all

                save_all(self, staging)
        return out_dir


def _tensor_columns(rows: Sequence[dict]) -> list[str]:
    columns = [c for c in TENSOR_COLUMNS if any(c in r for r in rows)]
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def _json_safe(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    return value


def _fit_line(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, intercept, R²) of OLS with intercept."""
    slope, intercept = np.polyfit(t, y, 1)
    fitted = slope * t + intercept
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - ((y - fitted) ** 2).sum() / total if total > 0 else 1.0
    return float(slope), float(intercept), float(r2)


def tensor_row(name: str, gram: np.ndarray, steps: Sequence[int], shape: Sequence[int], base_norm: float,
               rank: int = 3, null_samples: int = 200) -> dict:
    """One row of the tensor table (see :data:`TENSOR_COLUMNS`)."""
    g = np.asarray(gram, dtype=np.float64)
    t = np.asarray(steps, dtype=np.float64)
    numel = int(np.prod(shape)) if len(shape) else 1
    row = {"name": name, **parse_name(name), "shape": list(shape), "numel": numel, "base_norm": base_norm}
    delta = math.sqrt(max(g[-1, -1], 0.0))
    row["delta_norm"] = delta
    row["relative_delta"] = delta / base_norm if base_norm > 0 else float("nan")
    null = random_walk_null(steps, numel, rank=rank, samples=null_samples)
    if not np.any(g):
        row.update({"moved": False, "verdict": "static"})
        return row
    row["moved"] = True
    for j, value in enumerate(explained_ranks(g, rank), start=1):
        row[f"explained_r{j}"] = value
        row[f"explained_r{j}_null"] = null[f"explained_r{j}"]["median"]
    row["explained_r1_null_p95"] = null["explained_r1"]["p95"]
    coefficient = temporal_svd(g, 1).coefficients[:, 0]
    slope, _, r2 = _fit_line(t, coefficient)
    row["r2_rank1"] = r2
    row["r2_rank1_null"] = null["r2_rank1"]["median"]
    row["slope"] = slope
    row["slope_relative"] = slope / base_norm if base_norm > 0 else float("nan")
    diag = diagnose(g, steps)
    for key in ("drift_share", "alpha", "drift_ratio", "cos_first_last", "prefix_cos"):
        row[key] = getattr(diag.observed, key)
        row[f"{key}_null"] = null[key]["median"]
    row["drift_share_null_p95"] = null["drift_share"]["p95"]
    # A small tensor's random walk can reach a high share by chance (d = 32, 12 checkpoints: 95th percentile
    # ≈ 0.75); its verdict means little unless the share clears that.
    row["drift_share_significant"] = bool(row["drift_share"] > row["drift_share_null_p95"])
    row["drift_ratio_max"] = diag.observed.drift_ratio_max
    row["verdict"] = diag.verdict
    return row


def _median(rows: Iterable[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.median(values)) if values else float("nan")


def summarize(rows: Sequence[dict], run_gram: np.ndarray, steps: Sequence[int], rank: int,
              diagnostics: DriftDiagnostics | None, backtest: BacktestResult) -> dict:
    """Whole-run figures: the whole-model statistics beside the random-walk null, per-tensor medians
    beside the medians of their own nulls, and the backtest ranking."""
    moved = [r for r in rows if r.get("moved")]
    parameters = int(sum(r["numel"] for r in rows))
    whole = {}
    if np.any(run_gram):
        for j, value in enumerate(explained_ranks(run_gram, rank), start=1):
            whole[f"explained_r{j}"] = value
        _, _, whole["r2_rank1"] = _fit_line(np.asarray(steps, float), temporal_svd(run_gram, 1).coefficients[:, 0])
        for key in ("drift_share", "alpha", "drift_ratio", "drift_ratio_max", "cos_first_last", "prefix_cos"):
            whole[key] = getattr(diagnostics.observed, key)
    null = expected_null(steps, rank)
    whole_null = {k: null[k] for k in whole if k in null}
    whole_null["drift_ratio_max"] = whole.get("drift_ratio_max", float("nan"))

    def fraction_above(key: str, null_key: str) -> float:
        usable = [r for r in moved if math.isfinite(r.get(key, float("nan"))) and math.isfinite(r.get(null_key, float("nan")))]
        return float(np.mean([r[key] > r[null_key] for r in usable])) if usable else float("nan")

    verdicts = {}
    for r in rows:
        verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
    ranking = backtest.ranking()
    return {
        "tensors": len(rows),
        "tensors_moved": len(moved),
        "parameters": parameters,
        "steps": list(steps),
        "whole_model": whole,
        "whole_model_null": whole_null,
        "explained_r1_median": _median(moved, "explained_r1"),
        "explained_r1_null_median": _median(moved, "explained_r1_null"),
        "fraction_explained_r1_above_null_p95": fraction_above("explained_r1", "explained_r1_null_p95"),
        "r2_rank1_median": _median(moved, "r2_rank1"),
        "r2_rank1_null_median": _median(moved, "r2_rank1_null"),
        "drift_share_median": _median(moved, "drift_share"),
        "drift_share_null_median": _median(moved, "drift_share_null"),
        "fraction_drift_share_above_null_p95": fraction_above("drift_share", "drift_share_null_p95"),
        "alpha_median": _median(moved, "alpha"),
        "relative_delta_median": _median(moved, "relative_delta"),
        "tensor_verdicts": verdicts,
        "verdict": diagnostics.verdict if diagnostics else None,
        "backtest_best": ranking[0][0] if ranking else None,
        "backtest_ranking": [{"model": m, "relative_error": e} for m, e in ranking],
    }


ProgressCallback = Callable[[str, int, int], None]


def _torch_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def analyze(
    run_dir: str | Path | None = None,
    *,
    base: str | Path | None = None,
    steps: str | Sequence[int] | None = None,
    max_step: int | None = None,
    checkpoints: Iterable[tuple[int, str | Path]] | None = None,
    rank: int = 3,
    holdout: int | None = None,
    fractions: Sequence[float] = (0.25, 0.5, 0.75),
    backtest_ranks: Sequence[int] = (1, 2),
    learned: bool = False,
    null_samples: int = 200,
    logprob_records: Sequence[dict] | None = None,
    logprob_batch_size: int = 64,
    device: str = "cpu",
    allow_pickle: bool = False,
    progress: ProgressCallback | None = None,
    logprob_progress: Callable[[int, int], None] | None = None,
) -> RunAnalysis:
    """Analyse a run's linearity in weight space (and, given ``logprob_records``, in output space).

    Args:
        run_dir, base, steps, max_step, checkpoints: the checkpoint series, as for ``relex extrapolate``.
        rank: explained variance is reported at ranks 1..``rank``.
        holdout: checkpoints held out by the main backtest (default: the last quarter).
        fractions: further backtests fit on these fractions of the window (error vs horizon).
        backtest_ranks: RELEX ranks to backtest (rank 1 with every available regressor, higher ranks linear).
        learned: also backtest learned predictors (slow: one training per tensor and fit window).
        null_samples: Monte-Carlo random walks per tensor size for the nulls.
        logprob_records: ``{"prompt", "response"}`` records to score under every checkpoint.
        progress: ``progress(tensor_name, bytes_done, bytes_total)`` while reading the run.
        logprob_progress: ``logprob_progress(checkpoints_done, checkpoints_total)`` while scoring.

    The run is read once, one tensor at a time; only T×T Gram matrices are kept.
    """
    started = time.perf_counter()
    if rank < 1:
        from relex.errors import RelexInputError

        raise RelexInputError(f"--rank must be at least 1, got {rank}")
    grams = collect_grams(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints,
                          device=device, allow_pickle=allow_pickle, progress=progress)
    observed = list(grams.steps)
    rows = [tensor_row(name, grams.grams[name], observed, grams.shapes[name], grams.base_norms[name], rank,
                       null_samples) for name in grams.names]
    run_gram = grams.total() if grams.grams else np.zeros((len(observed), len(observed)))
    ndims = {name: len(grams.shapes[name]) for name in grams.names}
    # The same verdict as relex extrapolate's (drift statistics, then the window backtest).
    diagnostics = run_verdict(grams.grams, ndims, observed)
    bt = run_backtests(grams.grams, observed, ndims, holdout=holdout, fractions=fractions, ranks=backtest_ranks,
                       learned=learned)
    for row in rows:
        for model, errors in bt.per_tensor.items():
            if row["name"] in errors:
                row[f"backtest_{model}"] = errors[row["name"]]
    summary = summarize(rows, run_gram, observed, rank, diagnostics, bt)
    logprob = None
    if logprob_records:
        from relex.analysis.logprob import logprob_trajectory

        series = grams.series
        points = [(0, series.base.path)] + [(c.step, c.path) for c in series.observed]
        logprob = logprob_trajectory(points, logprob_records, batch_size=logprob_batch_size,
                                     device=_torch_device(device), progress=logprob_progress)
        summary["logprob"] = logprob.summary()
    return RunAnalysis(
        run_dir=str(run_dir) if run_dir is not None else None,
        base=str(grams.series.base.path),
        steps=observed,
        rank=rank,
        tensors=rows,
        summary=summary,
        diagnostics=diagnostics,
        backtest=bt,
        grams=grams.grams,
        logprob=logprob,
        seconds=time.perf_counter() - started,
        bytes_read=grams.bytes_read,
    )
