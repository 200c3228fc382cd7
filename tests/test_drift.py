"""Drift diagnostics on trajectories of known construction, each statistic against its random-walk null."""

from __future__ import annotations

import math

import numpy as np

from relex.synthetic import trajectory_gram as synthetic_gram
import pytest

from relex.analysis.drift import DriftDiagnostics, coherent_share, diagnose, drift_stats, random_walk_gram
from relex.analysis.verdict import DRIFT, MIXED, NOISE, decide
from relex.analysis.nulls import (expected_null, explained_ranks, line_r2, random_walk_null,
                                  sample_random_walk_grams, scalar_walk_r2_null)

DIM = 4000
STEPS = np.arange(5, 101, 5)  # 20 checkpoints


def trajectory_gram(steps, coefficients=(), walk=0.0, seed=0, dim=DIM):
    return synthetic_gram(steps, coefficients, walk=walk, seed=seed, dim=dim)


def momentum_noise_gram(n_steps=300, beta=0.9, every=5, seed=0, dim=DIM):
    """Pure noise through heavy-ball momentum (as Adam's first moment), checkpointed every ``every`` steps."""
    rng = np.random.default_rng(seed)
    m = np.zeros(dim)
    w = np.zeros(dim)
    rows = []
    for step in range(1, n_steps + 1):
        m = beta * m + (1 - beta) * rng.standard_normal(dim) / math.sqrt(dim)
        w = w + m
        if step % every == 0:
            rows.append(w.copy())
    x = np.array(rows)
    return x @ x.T, list(range(every, n_steps + 1, every))


def drift_walk_gram(steps, share, seed=0):
    """Linear drift + random walk whose drift share of ‖x_T‖² is ``share`` (by construction)."""
    t_last = float(steps[-1])
    nu = (1 - share) / share  # noise / drift at the last step
    return trajectory_gram(steps, [lambda t: t], walk=math.sqrt(nu * t_last), seed=seed)


def test_pure_drift_matches_its_construction():
    d = diagnose(trajectory_gram(STEPS, [lambda t: 0.01 * t]), STEPS)
    assert decide(d).drift_class == DRIFT
    assert decide(d).message.startswith("drift-dominated: extrapolation")
    o = d.observed
    assert o.alpha == pytest.approx(1.0, abs=1e-6)
    assert o.drift_ratio == pytest.approx(o.drift_ratio_max, rel=1e-6)
    assert o.cos_first_last == pytest.approx(1.0, abs=1e-9)
    assert o.prefix_cos == pytest.approx(1.0, abs=1e-9)
    assert o.explained_rank1 == pytest.approx(1.0, abs=1e-9)
    assert d.drift_share == pytest.approx(1.0, abs=1e-6)
    assert all(score == pytest.approx(1.0, abs=1e-6) for score in d.scores.values())


def test_random_walk_is_noise_and_its_linearity_figures_sit_at_the_null():
    d = diagnose(trajectory_gram(STEPS, walk=1.0), STEPS)
    assert decide(d).drift_class == NOISE
    assert d.drift_share < 0.1
    # The "linearity" figures of a random walk look high, and equal their null: they cannot tell.
    assert d.observed.explained_rank1 == pytest.approx(d.null.explained_rank1, abs=0.05)
    assert d.null.explained_rank1 == pytest.approx(0.81, abs=0.01)
    assert d.observed.r2_rank1 > 0.9 and d.null.r2_rank1 == pytest.approx(0.958, abs=0.01)
    assert d.observed.alpha == pytest.approx(0.5, abs=0.05)
    assert d.observed.drift_ratio == pytest.approx(1.0, abs=0.15)
    assert d.null.drift_share == pytest.approx(0.0, abs=1e-9)
    assert d.drift.drift_share == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("share,verdict", [(0.95, DRIFT), (0.85, DRIFT), (0.65, MIXED), (0.35, NOISE),
                                           (0.15, NOISE)])
def test_drift_plus_walk_share_is_recovered(share, verdict):
    d = diagnose(drift_walk_gram(STEPS, share), STEPS)
    assert d.drift_share == pytest.approx(share, abs=0.04)
    assert decide(d).drift_class == verdict


def test_drift_share_does_not_depend_on_checkpoint_spacing():
    """The same process checkpointed 10, 20 or 100 times: the verdict's statistic stays put, while the
    drift ratio's normalised score (a per-interval share) does not."""
    shares, ratio_scores = [], []
    for steps in (np.arange(10, 101, 10), STEPS, np.arange(1, 101)):
        d = diagnose(drift_walk_gram(steps, 0.9, seed=3), steps)
        shares.append(d.drift_share)
        ratio_scores.append(d.scores["drift_ratio"])
    assert max(shares) - min(shares) < 0.05
    assert all(s == pytest.approx(0.9, abs=0.04) for s in shares)
    assert ratio_scores[0] - ratio_scores[-1] > 0.3


@pytest.mark.parametrize("name,coefficient,note", [
    ("sqrt", lambda t: np.sqrt(100.0 * t), "decelerating"),
    ("saturating", lambda t: 100.0 * (1 - np.exp(-3 * t / 100.0)), "decelerating"),
    ("accelerating", lambda t: t**2 / 100.0, "accelerating"),
])
def test_curved_deterministic_paths_are_drift_with_a_shape_note(name, coefficient, note):
    d = diagnose(trajectory_gram(STEPS, [coefficient]), STEPS)
    assert d.drift_share > 0.99
    assert decide(d).drift_class == DRIFT
    assert note in decide(d).message
    if name == "sqrt":  # growth exponent of √t is the random walk's: α alone cannot tell
        assert d.observed.alpha == pytest.approx(0.5, abs=1e-6)


def test_rank_two_trajectory():
    g = trajectory_gram(STEPS, [lambda t: t, lambda t: t**2 / 100.0])
    ev = explained_ranks(g, 3)
    assert ev[0] < 0.995 and ev[1] == pytest.approx(1.0, abs=1e-9)
    d = diagnose(g, STEPS)
    assert decide(d).drift_class == DRIFT
    assert "turning" in decide(d).message
    assert d.coherent.coherent_cos < 0.85  # the rank-2 fit sees the turn


def test_strongly_turning_path_is_coherent_not_noise():
    g = trajectory_gram(STEPS, [lambda t: t, lambda t: 100.0 * np.sin(3 * t / 100.0)])
    d = diagnose(g, STEPS)
    assert decide(d).drift_class == MIXED and decide(d).message.startswith("coherent but")
    assert d.coherent.share > 0.95 and d.drift_share < 0.5


def test_momentum_smoothed_noise_is_not_read_as_drift():
    """Adam-like momentum makes nearby increments correlated; only far-apart increments are fitted."""
    g, steps = momentum_noise_gram()
    d = diagnose(g, steps)
    assert d.drift_share < 0.2
    assert decide(d).drift_class == NOISE
    # a factor model that also fits nearby increments (no band, no subsampling) calls most of it drift
    assert coherent_share(g, steps, band=0, max_points=len(steps)).share > max(0.3, 5 * d.drift_share)


def test_short_windows_are_inconclusive_or_still_exact():
    two = [10, 20]
    d = diagnose(trajectory_gram(two, [lambda t: t]), two)
    assert decide(d).drift_class == MIXED and "inconclusive" in decide(d).message
    three = [10, 20, 30]
    assert decide(diagnose(trajectory_gram(three, [lambda t: t]), three)).drift_class == DRIFT
    assert decide(diagnose(np.zeros((3, 3)), three)).drift_class == MIXED


def test_uneven_steps():
    steps = np.array([1, 2, 4, 8, 16, 32, 64, 100])
    assert diagnose(drift_walk_gram(steps, 0.9, seed=1), steps).drift_share == pytest.approx(0.9, abs=0.05)
    assert decide(diagnose(trajectory_gram(steps, walk=1.0), steps)).drift_class == NOISE


def test_diagnostics_api_is_backward_compatible():
    d = diagnose(drift_walk_gram(STEPS, 0.9), STEPS)
    assert isinstance(d, DriftDiagnostics)
    assert {"alpha", "drift_ratio", "cos_first_last", "prefix_cos"} <= set(d.scores)
    payload = d.to_dict()
    assert {"steps", "observed", "random_walk_null", "pure_drift", "scores", "drift_share"} <= set(payload)
    # the class and the message are the verdict's now (relex.analysis.verdict); its record holds the statistics
    verdict = decide(d).to_dict()
    assert {"steps", "drift_share", "verdict", "message"} <= set(verdict) and verdict["diagnostics"] == payload
    errors = d.expected_errors(2 * STEPS[-1])
    assert set(errors) == {"extrapolate", "last_checkpoint"}
    assert errors["extrapolate"] < errors["last_checkpoint"]
    stats = drift_stats(random_walk_gram(STEPS), STEPS)
    assert stats.alpha == pytest.approx(0.5) and stats.drift_ratio == pytest.approx(1.0)


def test_bartlett_wishart_has_the_random_walk_mean():
    steps = [1, 3, 4, 9]
    grams = sample_random_walk_grams(steps, dim=50, samples=4000, seed=1)
    mean = grams.mean(axis=0) / 50
    assert np.allclose(mean, random_walk_gram(steps), atol=0.08 * 9)
    small = sample_random_walk_grams(steps, dim=2, samples=3000, seed=2)  # d < T: drawn directly
    assert np.allclose(small.mean(axis=0) / 2, random_walk_gram(steps), atol=0.1 * 9)


def test_random_walk_null_depends_on_dimension():
    big = random_walk_null(STEPS, dim=10**6, samples=100)
    small = random_walk_null(STEPS, dim=32, samples=100)
    limit = expected_null(STEPS)
    assert big["explained_r1"]["median"] == pytest.approx(limit["explained_r1"], abs=0.01)
    assert small["explained_r1"]["median"] > big["explained_r1"]["median"]
    assert small["explained_r1"]["p95"] > small["explained_r1"]["median"]
    assert big["drift_share"]["p95"] < 0.05


def test_scalar_walk_r2_null_and_line_r2():
    t = np.arange(1, 11, dtype=float)
    assert line_r2(t, 3 * t + 1)[0] == pytest.approx(1.0)
    null = scalar_walk_r2_null(t, samples=2000)
    assert 0.4 < null["median"] < 0.9 and null["p05"] < null["median"] < null["p95"]
