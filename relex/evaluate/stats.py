"""Scores over sampled completions and paired-bootstrap confidence intervals.

- avg@k: the mean over problems of the fraction of a problem's k completions that are correct;
- pass@k: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` for a problem with ``n``
  completions of which ``c`` are correct, averaged over problems;
- paired bootstrap: resample problems with replacement (the same draw for both checkpoints) and take the
  percentile interval of the mean per-problem difference. Seeded, so a results file is reproducible.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["pass_at_k", "mean_pass_at_k", "pass_at_k_levels", "paired_bootstrap", "stratified_paired_bootstrap"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` are correct (``k <= n``)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i), numerically stable for large n
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems given as ``(n, c)`` pairs."""
    if not counts:
        return float("nan")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def pass_at_k_levels(n: int) -> list[int]:
    """The k reported for ``n`` samples: powers of two below ``n``, and ``n`` itself."""
    levels, k = [], 1
    while k < n:
        levels.append(k)
        k *= 2
    levels.append(n)
    return levels


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap(baseline: Sequence[float], other: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Mean of ``other - baseline`` over problems with a paired percentile-bootstrap interval.

    ``baseline`` and ``other`` are per-problem scores (e.g. the fraction of correct samples) in the same
    problem order. Returns ``{"diff", "ci_low", "ci_high", "n_problems", "n_boot", "seed", "confidence"}``.
    """
    return stratified_paired_bootstrap([(baseline, other)], n_boot=n_boot, seed=seed, confidence=confidence)


def stratified_paired_bootstrap(pairs: Sequence[tuple[Sequence[float], Sequence[float]]], n_boot: int = 10_000,
                                seed: int = 0, confidence: float = 0.95) -> dict:
    """Macro average over groups (tasks) of the mean paired difference, with a bootstrap interval.

    Each group is resampled separately (problems stay within their task), and the statistic is the
    unweighted mean over groups of the mean difference, as when a table reports the average of benchmark
    accuracies. With one group this is :func:`paired_bootstrap`.
    """
    if not pairs:
        raise ValueError("need at least one group of paired scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    diffs = []
    for baseline, other in pairs:
        a = np.asarray(baseline, dtype=np.float64)
        b = np.asarray(other, dtype=np.float64)
        if a.shape != b.shape or a.ndim != 1:
            raise ValueError(f"paired scores must be two 1-D sequences of equal length, got {a.shape} and {b.shape}")
        if a.size == 0:
            raise ValueError("cannot bootstrap an empty set of problems")
        diffs.append(b - a)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot, dtype=np.float64)
    chunk = 1000
    for d in diffs:
        n = d.size
        means = np.empty(n_boot, dtype=np.float64)
        for start in range(0, n_boot, chunk):
            stop = min(n_boot, start + chunk)
            idx = rng.integers(0, n, size=(stop - start, n))
            means[start:stop] = d[idx].mean(axis=1)
        boot += means
    boot /= len(diffs)
    low, high = _percentile_interval(boot, confidence)
    return {
        "diff": float(np.mean([d.mean() for d in diffs])),
        "ci_low": low,
        "ci_high": high,
        "n_problems": int(sum(d.size for d in diffs)),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "confidence": float(confidence),
    }


def summarize_counts(counts: Mapping[str, tuple[int, int]] | Sequence[tuple[int, int]]) -> dict:
    """avg@n and pass@k levels for per-problem ``(n, c)`` counts that share the same ``n``."""
    values = list(counts.values()) if isinstance(counts, Mapping) else list(counts)
    if not values:
        return {"n_problems": 0}
    n = min(n for n, _ in values)
    return {
        "n_problems": len(values),
        "samples": n,
        f"avg@{n}": float(np.mean([c / m for m, c in values])),
        "pass@k": {str(k): mean_pass_at_k(values, k) for k in pass_at_k_levels(n)},
    }
