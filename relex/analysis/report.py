"""``analyze``: how linear a run is, per tensor and as a whole, each figure beside its random-walk null.

One streaming pass (:meth:`relex.run.Run.execute`) gives every tensor's Gram matrix G = X Xᵀ of its deltas
and the run's verdict; everything else is arithmetic on these T×T matrices: explained variance of the temporal SVD at
ranks 1..k, the R² and slope of the rank-1 coefficient against the step, the drift diagnostics, exact
weight-space backtests of every available trajectory model, and Monte-Carlo random-walk nulls at each
tensor's own dimension. Optionally, the log-probabilities of fixed responses are scored by every
checkpoint (output-space linearity). :func:`relex.api.analyze` is the pass and this analysis, in one call.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from relex.analysis.backtesting import BacktestResult, run_backtests
from relex.analysis.drift import diagnose
from relex.analysis.nulls import expected_null, explained_ranks, random_walk_null
from relex.analysis.tables import parse_name, rows_to_csv
from relex.analysis.verdict import Verdict, drift_class
from relex.jsonable import jsonable, write_json
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
    verdict: Verdict  # the run's, from the same pass (carried to the options' target, weighing the reward)
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
            "verdict": self.verdict.to_dict(),
            "backtest": {"main_fit_points": self.backtest.main_fit_points,
                         "ranking": [{"model": m, "relative_error": e} for m, e in self.backtest.ranking()],
                         "rows": self.backtest.rows, "skipped": self.backtest.skipped},
            "logprob": self.logprob.summary() if self.logprob is not None else None,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
        }
        if per_tensor:
            payload["tensors"] = self.tensors
        return jsonable(payload)

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
        lines.append(f"verdict: {self.verdict.message}")
        return lines

    def write(self, out_dir: str | Path, plots: bool = True, overwrite: bool = False) -> Path:
        """Write ``analysis.json``, ``tensors.csv``, ``backtest.csv`` (and ``logprob.csv``) and the PNG plots
        into ``out_dir`` (through a temporary folder renamed at the end)."""
        from relex.staging import staged_folder

        out_dir = Path(out_dir)
        with staged_folder(out_dir, overwrite) as staging:
            write_json(staging / "analysis.json", self.to_dict())
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
    row["verdict"] = drift_class(diag)[0]
    return row


def _median(rows: Iterable[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
    return float(np.median(values)) if values else float("nan")


def summarize(rows: Sequence[dict], run_gram: np.ndarray, steps: Sequence[int], rank: int, verdict: Verdict,
              backtest: BacktestResult) -> dict:
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
            whole[key] = getattr(verdict.diagnostics.observed, key)
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
        "verdict": verdict.drift_class,
        "backtest_best": ranking[0][0] if ranking else None,
        "backtest_ranking": [{"model": m, "relative_error": e} for m, e in ranking],
    }


def analyze_pass(result, *, run_dir: str | None = None, rank: int = 3, holdout: int | None = None,
                 fractions: Sequence[float] = (0.25, 0.5, 0.75), backtest_ranks: Sequence[int] = (1, 2),
                 learned: bool = False, null_samples: int = 200, logprob_records: Sequence[dict] | None = None,
                 logprob_batch_size: int = 64, device: str = "cpu",
                 logprob_progress: Callable[[int, int], None] | None = None) -> RunAnalysis:
    """The analysis of a pass's result (:class:`relex.run.PassResult`: every tensor's Gram matrix, the verdict),
    and, given ``logprob_records``, of the log-probabilities every checkpoint gives them.

    Args:
        rank: explained variance is reported at ranks 1..``rank``.
        holdout: checkpoints held out by the main backtest (default: the last quarter).
        fractions: further backtests fit on these fractions of the window (error vs horizon).
        backtest_ranks: RELEX ranks to backtest (rank 1 with every available regressor, higher ranks linear).
        learned: also backtest learned predictors (slow: one training per tensor and fit window).
        null_samples: Monte-Carlo random walks per tensor size for the nulls.
        logprob_records: ``{"prompt", "response"}`` records to score under every checkpoint.
        logprob_progress: ``logprob_progress(checkpoints_done, checkpoints_total)`` while scoring.
    """
    started = time.perf_counter()
    observed = list(result.steps)
    grams = result.grams
    shapes = {t.name: t.shape for t in result.tensors}
    rows = [tensor_row(name, grams[name], observed, shapes[name], result.base_norms[name], rank, null_samples)
            for name in grams]
    run_gram = sum(grams.values()) if grams else np.zeros((len(observed), len(observed)))
    ndims = {name: len(shapes[name]) for name in grams}
    bt = run_backtests(grams, observed, ndims, holdout=holdout, fractions=fractions, ranks=backtest_ranks,
                       learned=learned)
    for row in rows:
        for model, errors in bt.per_tensor.items():
            if row["name"] in errors:
                row[f"backtest_{model}"] = errors[row["name"]]
    summary = summarize(rows, run_gram, observed, rank, result.verdict, bt)
    logprob = None
    if logprob_records:
        from relex.analysis.logprob import logprob_trajectory  # start-up: transformers loads only to score

        series = result.series
        points = [(0, series.base.path)] + [(c.step, c.path) for c in series.observed]
        logprob = logprob_trajectory(points, logprob_records, batch_size=logprob_batch_size, device=device,
                                     progress=logprob_progress)
        summary["logprob"] = logprob.summary()
    return RunAnalysis(run_dir=run_dir, base=str(result.series.base.path), steps=observed, rank=rank, tensors=rows,
                       summary=summary, verdict=result.verdict, backtest=bt, grams=grams, logprob=logprob,
                       seconds=result.seconds + time.perf_counter() - started, bytes_read=result.bytes_read)
