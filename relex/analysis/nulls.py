"""Random-walk nulls of the trajectory statistics, at the length *and dimension* of a tensor.

A statistic of a trajectory means little alone: a pure random walk observed at the same steps already
has a rank-1 explained variance of ~0.81 and a coefficient R² of ~0.96. Every figure relex reports is
shown beside its value for an isotropic random walk w_t − w_0 = Σ_{s≤t} ε_s, ε_s ~ N(0, I_d), observed at
the same steps.

Two versions:

* :func:`expected_null`: the statistics of the expected Gram matrix E[G] ∝ min(t_i, t_j), which a
  random walk concentrates on as d → ∞ (what :func:`relex.analysis.drift.diagnose` uses);
* :func:`random_walk_null`: the Monte-Carlo distribution at a finite dimension d. The Gram matrix of a
  d-dimensional random walk is Wishart(d, Σ) with Σ_ij = min(t_i, t_j), so it is drawn directly in
  O(T³) per sample with Bartlett's decomposition, whatever d is (a 1-D norm weight and a 10⁸-entry
  embedding cost the same). Small tensors fluctuate more: their null is wider and higher.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from relex.analysis.drift import drift_stats, random_walk_gram

STATISTICS = ("alpha", "drift_ratio", "cos_first_last", "prefix_cos", "explained_rank1", "r2_rank1",
              "drift_share")


def explained_ranks(gram: np.ndarray, rank: int) -> list[float]:
    """Cumulative explained variance of ranks 1..``rank`` of an (uncentred) Gram matrix."""
    values = np.clip(np.linalg.eigvalsh(0.5 * (gram + gram.T)), 0.0, None)[::-1]
    total = values.sum()
    cumulative = np.cumsum(values) / total if total > 0 else np.full(len(values), np.nan)
    out = [float(cumulative[min(j, len(values) - 1)]) for j in range(rank)]
    return out


def _statistics(gram: np.ndarray, steps, rank: int) -> dict:
    stats = drift_stats(gram, steps)
    row = {name: getattr(stats, name) for name in STATISTICS}
    for j, value in enumerate(explained_ranks(gram, rank), start=1):
        row[f"explained_r{j}"] = value
    return row


def expected_null(steps, rank: int = 3) -> dict:
    """Statistics of the expected random-walk Gram matrix min(t_i, t_j) (the d → ∞ null)."""
    return _statistics(random_walk_gram(steps), [float(s) for s in steps], rank)


def sample_random_walk_grams(steps, dim: int, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` Gram matrices (samples, T, T) of ``dim``-dimensional unit random walks at ``steps``."""
    t = np.asarray(steps, dtype=np.float64)
    n = len(t)
    rng = np.random.default_rng(seed)
    cholesky = np.linalg.cholesky(random_walk_gram(t))
    out = np.empty((samples, n, n))
    for k in range(samples):
        if dim >= n:
            # Bartlett: W = L A Aᵀ Lᵀ, A lower triangular, A_ii² ~ χ²(d − i), A_ij ~ N(0, 1) below.
            a = np.tril(rng.standard_normal((n, n)), -1)
            a[np.diag_indices(n)] = np.sqrt(rng.chisquare(dim - np.arange(n)))
            la = cholesky @ a
        else:
            la = cholesky @ rng.standard_normal((n, dim))
        out[k] = la @ la.T
    return out


def random_walk_null(steps, dim: int, rank: int = 3, samples: int = 200, seed: int = 0) -> dict:
    """Median, 5th and 95th percentiles of each statistic over random walks of dimension ``dim``.

    Returns ``{statistic: {"median": m, "p05": lo, "p95": hi}}`` for the drift statistics of
    :class:`relex.analysis.drift.DriftStats` and ``explained_r1 .. explained_r{rank}``.
    """
    return _cached_null(tuple(float(s) for s in steps), max(1, int(dim)), int(rank), int(samples), int(seed))


@lru_cache(maxsize=256)
def _cached_null(steps: tuple, dim: int, rank: int, samples: int, seed: int) -> dict:
    rows = [_statistics(g, steps, rank) for g in sample_random_walk_grams(steps, dim, samples, seed)]
    out = {}
    for name in rows[0]:
        values = np.array([r[name] for r in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            out[name] = {"median": float("nan"), "p05": float("nan"), "p95": float("nan")}
            continue
        lo, mid, hi = np.percentile(values, [5, 50, 95])
        out[name] = {"median": float(mid), "p05": float(lo), "p95": float(hi)}
    return out


def scalar_walk_r2_null(steps, samples: int = 2000, seed: int = 0, include_origin: bool = True) -> dict:
    """R² of a least-squares line through a 1-D random walk at ``steps`` (median, p05, p95).

    The null for "the log-prob of a response moves linearly with the step": a scalar random walk gives
    R² ≈ 0.6-0.8 in the median, far from 0. With ``include_origin`` the walk's value 0 at step 0 is one of
    the fitted points (as the base checkpoint is).
    """
    t = np.asarray(steps, dtype=np.float64)
    rng = np.random.default_rng(seed)
    dt = np.diff(np.concatenate([[0.0], t]))
    walks = np.cumsum(rng.standard_normal((samples, len(t))) * np.sqrt(dt), axis=1)
    if include_origin:
        t = np.concatenate([[0.0], t])
        walks = np.concatenate([np.zeros((samples, 1)), walks], axis=1)
    r2 = line_r2(t, walks)
    lo, mid, hi = np.percentile(r2, [5, 50, 95])
    return {"median": float(mid), "p05": float(lo), "p95": float(hi)}


def line_r2(t: np.ndarray, values: np.ndarray) -> np.ndarray:
    """R² of an ordinary least-squares line on ``t`` for each row of ``values`` (rows × len(t))."""
    t = np.asarray(t, dtype=np.float64)
    y = np.atleast_2d(np.asarray(values, dtype=np.float64))
    tc = t - t.mean()
    yc = y - y.mean(axis=1, keepdims=True)
    slope = yc @ tc / (tc @ tc)
    residual = yc - np.outer(slope, tc)
    total = (yc**2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - (residual**2).sum(axis=1) / np.where(total > 0, total, 1.0), 1.0)
