"""Figures of a :class:`relex.analysis.report.RunAnalysis`; every statistic drawn beside its null.

Each function returns a matplotlib ``Figure`` built without pyplot (so it works under any backend, and a
notebook displays it); :func:`save_all` writes them as PNG files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from relex.analysis.drift import coherent_share
from relex.analysis.tables import GROUPS

DPI = 110
NULL_COLOR = "0.55"
DRIFT_COLOR = "tab:green"
OBSERVED_COLOR = "tab:blue"
BASELINE_STYLE = {"last": ("black", "-", 2.2), "elementwise": ("tab:gray", "--", 1.8),
                  "relex/linear": ("tab:blue", "-", 2.2)}


def _short(name: str) -> str:
    for prefix in ("model.", "transformer.", "gpt_neox."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".weight", "").replace("layers.", "L").replace("self_attn.", "")


def _fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return "0" if abs(value) < 1e-9 else f"{value:.3g}"


def _finite(values) -> np.ndarray:
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return array[np.isfinite(array)]


def coefficient_figure(analysis, n: int = 3) -> Figure:
    """The rank-1 coefficient c_1(t) of the ``n`` most and ``n`` least linear tensors (by R²), with the
    least-squares line over the whole window (solid) and the line fitted on the main backtest's window
    and extended (dashed), which is what an extrapolation would have drawn."""
    moved = [r for r in analysis.tensors if r.get("moved") and math.isfinite(r.get("r2_rank1", float("nan")))]
    moved.sort(key=lambda r: r["r2_rank1"], reverse=True)
    picks = moved[:n] + (moved[-n:] if len(moved) > n else [])
    picks = list(dict.fromkeys(r["name"] for r in picks))
    rows = {r["name"]: r for r in moved}
    cols = min(n, max(1, len(picks)))
    lines = max(1, math.ceil(len(picks) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.3 * lines), dpi=DPI, layout="constrained")
    t = np.asarray(analysis.steps, dtype=np.float64)
    p = analysis.backtest.main_fit_points or len(t)
    for k, name in enumerate(picks):
        ax = fig.add_subplot(lines, cols, k + 1)
        c = analysis.coefficient(name)
        row = rows[name]
        ax.plot(t, c, "o", color=OBSERVED_COLOR, ms=4, label="c₁(t)")
        slope, intercept = np.polyfit(t, c, 1)
        grid = np.linspace(0, t[-1], 50)
        ax.plot(grid, slope * grid + intercept, "-", color="tab:orange", lw=1.5, label="line, all")
        if 2 <= p < len(t):
            s_p, i_p = np.polyfit(t[:p], c[:p], 1)
            ax.plot(grid, s_p * grid + i_p, "--", color="tab:red", lw=1.2, label=f"line, ≤ step {int(t[p - 1])}")
            ax.axvline(t[p - 1], color="0.8", lw=0.8, zorder=0)
        kind = "most" if k < min(n, len(moved)) else "least"
        ax.set_title(f"{_short(name)}  ({kind} linear)", fontsize=9)
        ax.text(0.02, 0.97, f"R² {row['r2_rank1']:.3f} (walk {row['r2_rank1_null']:.3f})\n"
                            f"drift share {row['drift_share']:.2f} (walk {row['drift_share_null']:.2f})",
                transform=ax.transAxes, va="top", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9))
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Rank-1 temporal coefficient against the step", fontsize=11)
    return fig


def _histogram_panel(ax, observed, nulls, null_limit, title, bins):
    observed = _finite(observed)
    nulls = _finite(nulls)
    lo = min([observed.min() if len(observed) else 0.0, nulls.min() if len(nulls) else 0.0])
    hi = max([observed.max() if len(observed) else 1.0, nulls.max() if len(nulls) else 1.0, null_limit or 0.0])
    edges = np.linspace(lo - 0.02 * (hi - lo + 1e-9), hi + 0.02 * (hi - lo + 1e-9), bins + 1)
    ax.hist(nulls, bins=edges, color=NULL_COLOR, alpha=0.55, label="random-walk null (per tensor)")
    ax.hist(observed, bins=edges, color=OBSERVED_COLOR, alpha=0.75, label="observed (per tensor)")
    if null_limit is not None and math.isfinite(null_limit):
        ax.axvline(null_limit, color="black", ls="--", lw=1, label="null, d → ∞")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("tensors", fontsize=8)
    ax.tick_params(labelsize=7)


def explained_variance_figure(analysis) -> Figure:
    """Histograms of per-tensor rank-1 explained variance, coefficient R² and drift share, each against the
    random-walk null of the same tensor (median of walks with the tensor's length and dimension)."""
    fig = Figure(figsize=(12, 3.6), dpi=DPI, layout="constrained")
    rows = [r for r in analysis.tensors if r.get("moved")]
    limit = analysis.summary.get("whole_model_null", {})
    panels = [
        ("explained_r1", "explained_r1_null", limit.get("explained_r1"), "rank-1 explained variance"),
        ("r2_rank1", "r2_rank1_null", limit.get("r2_rank1"), "R² of the rank-1 coefficient vs step"),
        ("drift_share", "drift_share_null", 0.0, "drift share of the last delta"),
    ]
    bins = max(8, min(30, len(rows) // 2))
    for k, (key, null_key, null_limit, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        _histogram_panel(ax, [r.get(key) for r in rows], [r.get(null_key) for r in rows], null_limit, title, bins)
        whole = analysis.summary.get("whole_model", {}).get(key)
        if whole is not None and math.isfinite(whole):
            ax.axvline(whole, color="tab:red", lw=1.5, label="whole model")
        if k == 1:
            ax.legend(fontsize=7, loc="upper center")
    fig.suptitle("Explained variance and R² look linear even for a random walk; the drift share does not",
                 fontsize=10)
    return fig


def layer_heatmap_figure(analysis) -> Figure:
    """Per-layer heatmaps (module × layer): drift share, and relative size of the update ‖x_T‖/‖w_0‖."""
    rows = [r for r in analysis.tensors if r.get("moved")]
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    columns = [str(layer) for layer in layers] + (["other"] if any(r["layer"] is None for r in rows) else [])
    order = {g: i for i, g in enumerate(GROUPS)}
    modules = sorted({(r["group"], r["module"]) for r in rows}, key=lambda gm: (order.get(gm[0], 99), gm[1]))
    modules = [m for _, m in modules]
    fig = Figure(figsize=(max(7.0, 2.6 + 0.45 * len(columns)) * 2, max(3.0, 0.9 + 0.32 * len(modules))), dpi=DPI,
                 layout="constrained")
    panels = [("drift_share", "drift share (0 random walk, 1 drift)", "RdYlGn", (0.0, 1.0), False),
              ("relative_delta", "‖x_T‖ / ‖w₀‖ (log₁₀)", "viridis", None, True)]
    for k, (key, title, cmap, limits, log) in enumerate(panels):
        grid = np.full((len(modules), len(columns)), np.nan)
        for r in rows:
            column = str(r["layer"]) if r["layer"] is not None else "other"
            value = r.get(key)
            if value is None or not math.isfinite(value):
                continue
            if log:
                value = math.log10(value) if value > 0 else np.nan
            grid[modules.index(r["module"]), columns.index(column)] = value
        ax = fig.add_subplot(1, 2, k + 1)
        vmin, vmax = limits if limits else (np.nanmin(grid) if np.isfinite(grid).any() else 0,
                                             np.nanmax(grid) if np.isfinite(grid).any() else 1)
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
        ax.set_yticks(range(len(modules)), modules, fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_title(title, fontsize=9)
        if len(modules) * len(columns) <= 120:
            for i in range(len(modules)):
                for j in range(len(columns)):
                    if np.isfinite(grid[i, j]):
                        ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                                color="black" if key == "drift_share" else "white")
        fig.colorbar(image, ax=ax, shrink=0.85)
    fig.suptitle("Per-layer view", fontsize=11)
    return fig


def backtest_figure(analysis, max_models: int = 8) -> Figure:
    """Relative weight-space error of each model against the horizon t/t_fit (every fit window), and the
    ranking of the main backtest. The baselines are drawn heavier: last checkpoint and element-wise."""
    fig = Figure(figsize=(12, 4.2), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    ranking = analysis.backtest.ranking()
    shown = [m for m, _ in ranking[:max_models]]
    for baseline in ("last", "elementwise", "relex/linear"):
        if baseline not in shown and any(m == baseline for m, _ in ranking):
            shown.append(baseline)
    palette = iter(["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
                    "tab:cyan", "gold", "navy"])
    by_window: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in analysis.backtest.rows:
        if r["model"] in shown:
            by_window.setdefault((r["model"], r["fit_points"]), []).append((r["horizon"], r["relative_error"]))
    colors = {m: BASELINE_STYLE[m] if m in BASELINE_STYLE else (next(palette, "0.3"), "-", 1.2) for m in shown}
    finite_errors = []
    for (model, _), points in sorted(by_window.items()):
        points.sort()
        color, style, width = colors[model]
        x, y = zip(*points)
        finite_errors.extend(v for v in y if math.isfinite(v))
        ax.plot(x, y, style, color=color, lw=width, marker="o", ms=3, alpha=0.85)
    for model in shown:
        color, style, width = colors[model]
        ax.plot([], [], style, color=color, lw=width, label=model)
    ax.axhline(1.0, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("horizon  t / t_fit  (1.5 = 50% beyond the last fitted checkpoint)", fontsize=8)
    ax.set_ylabel("‖x̂ − x‖ / ‖x‖", fontsize=8)
    if finite_errors and max(finite_errors) / max(min(finite_errors), 1e-12) > 30:
        ax.set_yscale("log")
    ax.set_title("backtest error vs horizon (one line per fit window)", fontsize=9)
    if shown:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "too few checkpoints to backtest", ha="center", transform=ax.transAxes)
    ax.tick_params(labelsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    if ranking:
        names = [m for m, _ in ranking][::-1]
        values = [e for _, e in ranking][::-1]
        bar_colors = [BASELINE_STYLE.get(m, ("tab:orange",))[0] if m in BASELINE_STYLE else "tab:orange"
                      for m in names]
        ax2.barh(range(len(names)), values, color=bar_colors, alpha=0.8)
        ax2.set_yticks(range(len(names)), names, fontsize=7)
        for i, v in enumerate(values):
            ax2.text(v, i, f" {v:.3f}", va="center", fontsize=7)
        main = analysis.backtest.main_rows()
        fit_end = analysis.steps[analysis.backtest.main_fit_points - 1]
        ax2.set_title(f"fit ≤ step {fit_end}, error at step {max(r['held_out_step'] for r in main)}", fontsize=9)
        ax2.set_xlabel("relative error", fontsize=8)
        ax2.tick_params(labelsize=7)
    fig.suptitle("Backtests in weight space (exact, from the Gram matrices)", fontsize=11)
    return fig


def drift_figure(analysis) -> Figure:
    """Left: each drift statistic of the whole model on a scale where the random walk is 0 and pure drift
    1, raw values written beside it. Right: ‖x_t‖ against t (log-log) with the random-walk (t^0.5) and
    drift (t^1) slopes, and the coherent part found by the factor model."""
    d = analysis.verdict.diagnostics
    fig = Figure(figsize=(12, 4.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    if d is not None:
        labels = [("drift share of ‖x_T‖²", "drift_share"), ("cos(prefix dir., direction)", "prefix_cos"),
                  ("cos(first, last delta)", "cos_first_last"), ("drift ratio", "drift_ratio"),
                  ("growth exponent α", "alpha"), ("rank-1 explained var.", "explained_rank1"),
                  ("R² of rank-1 coefficient", "r2_rank1")]
        scores, texts = [], []
        for _, key in labels:
            o, n, p = (getattr(s, key) for s in (d.observed, d.null, d.drift))
            score = (o - n) / (p - n) if all(map(math.isfinite, (o, n, p))) and abs(p - n) > 1e-12 else float("nan")
            scores.append(score)
            texts.append(f"{_fmt(o)}  (walk {_fmt(n)}, drift {_fmt(p)})")
        y = np.arange(len(labels))[::-1]
        colors = [DRIFT_COLOR if s >= 0.8 else ("tab:orange" if s >= 0.5 else "tab:red") for s in
                  np.nan_to_num(scores, nan=0.0)]
        ax.barh(y, np.nan_to_num(scores, nan=0.0), color=colors, alpha=0.8)
        ax.set_yticks(y, [label for label, _ in labels], fontsize=8)
        ax.axvline(0, color=NULL_COLOR, lw=1.5)
        ax.axvline(1, color=DRIFT_COLOR, lw=1.5, ls="--")
        for yy, text in zip(y, texts):
            ax.text(1.03, yy, text, va="center", fontsize=7, transform=ax.get_yaxis_transform())
        ax.set_xlim(min(-0.1, np.nanmin(scores) - 0.05) if np.isfinite(scores).any() else -0.1, 1.1)
        ax.set_xlabel("0 = random walk of the same length, 1 = pure drift", fontsize=8)
        ax.set_title(f"whole model — verdict: {analysis.verdict.drift_class}", fontsize=9)
        ax.tick_params(labelsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    t = np.asarray(analysis.steps, dtype=np.float64)
    gram = sum(analysis.grams.values()) if analysis.grams else None
    if gram is not None and np.any(gram):
        norms = np.sqrt(np.clip(np.diag(gram), 0, None))
        ax2.loglog(t, norms, "o-", color=OBSERVED_COLOR, ms=3, label="‖x_t‖ observed")
        ref = norms[-1]
        ax2.loglog(t, ref * (t / t[-1]) ** 0.5, ":", color=NULL_COLOR, label="∝ t^0.5 (random walk)")
        ax2.loglog(t, ref * (t / t[-1]), "--", color=DRIFT_COLOR, label="∝ t (drift)")
        fit = coherent_share(gram, t)
        if math.isfinite(fit.share):
            ax2.loglog(fit.steps, np.clip(fit.coherent_norms, 1e-30, None), "s-", color="tab:purple", ms=2.5, lw=1,
                       label=f"coherent part (share {fit.share:.2f})")
        ax2.legend(fontsize=7)
        ax2.set_xlabel("step", fontsize=8)
        ax2.set_title("growth of the update", fontsize=9)
        ax2.tick_params(labelsize=7)
    fig.suptitle("Drift statistics beside their random-walk null", fontsize=11)
    return fig


def logprob_figure(analysis) -> Figure | None:
    """Mean and per-response total log-prob against the step, and the per-response R² against the
    R² of a scalar random walk at the same steps."""
    lp = analysis.logprob
    if lp is None:
        return None
    fig = Figure(figsize=(12, 3.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    t = np.asarray(lp.steps, dtype=np.float64)
    rng = np.random.default_rng(0)
    sample = rng.choice(lp.logprobs.shape[1], size=min(25, lp.logprobs.shape[1]), replace=False)
    for j in sample:
        ax.plot(t, lp.logprobs[:, j], color="0.75", lw=0.7)
    mean = lp.mean_logprob
    ax.plot(t, mean, "o-", color=OBSERVED_COLOR, lw=2, ms=3, label="mean over responses")
    slope, intercept = np.polyfit(t, mean, 1)
    ax.plot(t, slope * t + intercept, "--", color="tab:red", lw=1.2, label="least-squares line")
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("total log-prob of the response", fontsize=8)
    ax.set_title(f"log-probs of {lp.logprobs.shape[1]} fixed responses (grey: 25 of them)", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    ax2 = fig.add_subplot(1, 2, 2)
    r2 = _finite(lp.r2)
    ax2.hist(r2, bins=np.linspace(min(0.0, r2.min() if len(r2) else 0.0), 1.0, 26), color=OBSERVED_COLOR, alpha=0.8,
             label="observed")
    null = lp.r2_null
    ax2.axvspan(null["p05"], null["p95"], color=NULL_COLOR, alpha=0.25, label="random walk, 5-95%")
    ax2.axvline(null["median"], color="black", ls="--", lw=1, label="random walk, median")
    ax2.set_xlabel("R² of the log-prob against the step", fontsize=8)
    ax2.set_title("per-response linearity in output space", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.tick_params(labelsize=7)
    fig.suptitle("Output space: teacher-forced log-probabilities across the checkpoints", fontsize=11)
    return fig


FIGURES = {
    "coefficients.png": coefficient_figure,
    "explained_variance.png": explained_variance_figure,
    "layer_heatmap.png": layer_heatmap_figure,
    "backtest_horizon.png": backtest_figure,
    "drift_statistics.png": drift_figure,
    "logprob.png": logprob_figure,
}


def save_all(analysis, folder: str | Path) -> list[Path]:
    """Write every figure that applies as a PNG into ``folder``; return the paths."""
    folder = Path(folder)
    written = []
    for filename, make in FIGURES.items():
        fig = make(analysis)
        if fig is None:
            continue
        path = folder / filename
        fig.savefig(path)
        written.append(path)
    return written
