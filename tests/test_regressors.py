"""Predictors of coefficient series: known parameters recovered, stored fits identical, names parsed."""

from __future__ import annotations

import numpy as np
import pytest

from relex.errors import RelexInputError
from relex.regressors import get_regressor, load_fit, parse_regressor
from relex.regressors.anchored import backtest_shrink, drift_shrink
from relex.subspace import fit_drift_noise

T = np.array([2.0, 5, 6, 11, 17, 25, 30])
FUTURE = np.array([45.0, 90.0])


@pytest.mark.parametrize("name,truth", [
    ("linear", lambda t: 0.3 + 0.02 * t),
    ("poly2", lambda t: 0.1 + 0.05 * t - 0.001 * t**2),
    ("poly3", lambda t: 0.1 + 0.05 * t - 0.001 * t**2 + 2e-5 * t**3),
    ("loglinear", lambda t: -0.2 + 0.4 * np.log(t)),
    ("powerlaw", lambda t: 0.7 * t**0.6),
    ("saturating", lambda t: 2.0 * (1 - np.exp(-t / 20.0))),
])
def test_exact_families_are_recovered(name, truth):
    values = np.stack([truth(T), -3 * truth(T)], axis=1)  # two columns, one negated
    fit = get_regressor(name).fit(T, values)
    expected = np.stack([truth(FUTURE), -3 * truth(FUTURE)], axis=1)
    np.testing.assert_allclose(fit.predict(FUTURE), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit.r2, 1.0, atol=1e-9)
    stored = load_fit(fit.to_dict())
    assert np.array_equal(stored.predict(FUTURE), fit.predict(FUTURE))


def test_mlp_continues_a_line_and_a_saturation():
    fit = get_regressor("mlp").fit(T, (0.1 * T)[:, None])
    np.testing.assert_allclose(fit.predict(FUTURE)[:, 0], 0.1 * FUTURE, rtol=0.05)
    steps = np.arange(2.0, 32.0, 2.0)
    curve = 1 - np.exp(-steps / 20.0)
    predicted = get_regressor("mlp").fit(steps, curve[:, None]).predict([60.0])[0, 0]
    linear = get_regressor("linear").fit(steps, curve[:, None]).predict([60.0])[0, 0]
    truth = 1 - np.exp(-3.0)
    assert abs(predicted - truth) < 0.5 * abs(linear - truth)
    stored = load_fit(fit.to_dict())
    assert np.array_equal(stored.predict(FUTURE), fit.predict(FUTURE))


def test_shared_mlp_learns_from_every_series_of_a_group():
    from relex.regressors.mlp import train_shared

    steps = np.arange(2.0, 32.0, 2.0)
    series = [(steps, (a * (1 - np.exp(-steps / 20.0)))[:, None]) for a in (0.5, 1.0, 2.0, -1.0)]
    shared = train_shared(series)
    assert shared.series == 4
    for a in (0.5, -1.0):
        predicted = shared.fit(steps, a * (1 - np.exp(-steps / 20.0))[:, None]).predict([50.0])[0, 0]
        assert abs(predicted - a * (1 - np.exp(-2.5))) < 0.1 * abs(a)


@pytest.mark.parametrize("text,canonical,anchored,shrink,base", [
    ("linear", "linear", False, None, "linear"),
    ("POLY3", "poly3", False, None, "poly3"),
    ("anchored", "anchored", True, None, "linear"),
    ("anchored-linear", "anchored", True, None, "linear"),
    ("anchored@0.5", "anchored-linear@0.5", True, 0.5, "linear"),
    ("anchored-saturating@0", "anchored-saturating@0", True, 0.0, "saturating"),
    ("anchored-mlp", "anchored-mlp", True, None, "mlp"),
])
def test_regressor_names(text, canonical, anchored, shrink, base):
    spec = parse_regressor(text)
    assert (spec.text, spec.anchored, spec.shrink, spec.base.name) == (canonical, anchored, shrink, base)


@pytest.mark.parametrize("text", ["cubic", "poly9", "anchored@1.5", "anchored@x", "linear@0.5", "anchoredpoly2",
                                  "auto"])
def test_bad_regressor_names(text):
    with pytest.raises(RelexInputError):
        parse_regressor(text)


def test_too_few_points_is_an_input_error():
    with pytest.raises(RelexInputError, match="at least 4"):
        get_regressor("poly3").fit(T[:3], T[:3, None])


def test_drift_noise_fit_is_scipys_nonnegative_least_squares():
    """The closed-form two-unknown fit against scipy's active-set NNLS, on Gram matrices of every kind: drift,
    noise, both, and ones whose unconstrained fit has a negative drift or a negative noise term."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(0)
    cases = 0
    for trial in range(300):
        t = np.sort(rng.choice(np.arange(1, 200), size=rng.integers(3, 12), replace=False)).astype(float)
        x = rng.normal(size=(len(t), 50)) * rng.uniform(0, 2) + np.outer(t, rng.normal(size=50)) * rng.uniform(-1, 1)
        gram = x @ x.T if trial % 3 else -(x @ x.T)  # a negated one forces the zero solution
        design = np.stack([np.outer(t, t).ravel(), np.minimum.outer(t, t).ravel()], axis=1)
        scale = np.abs(design).max(axis=0)
        expected = nnls(design / scale, gram.ravel())[0] / scale
        got = np.array(fit_drift_noise(gram, t))
        assert np.allclose(got, expected, rtol=1e-7, atol=1e-12 * np.abs(gram).max() / scale.min()), (trial, got,
                                                                                                       expected)
        cases += (expected == 0).any()
    assert cases > 50  # the constrained branches were exercised


def test_drift_noise_fit_and_shrinkage():
    t = np.array([1.0, 2, 3, 4, 5, 6])
    a2, b2 = 0.5, 3.0
    gram = a2 * np.outer(t, t) + b2 * np.minimum.outer(t, t)
    assert np.allclose(fit_drift_noise(gram, t), (a2, b2))
    # the increment 2·x_T (B = 2 e_T): B·t = 12, Bᵀ min(t,t') B = 24, horizon t* − t_T = 6
    mix, inc, target = np.eye(6)[:, -1:], np.array([[2.0]]), np.array([12.0])
    assert drift_shrink(inc, mix, t, a2, 0.0, target)[0] == pytest.approx(0.5 * 6 * 12 / (0.5 * 144))
    assert drift_shrink(inc, mix, t, a2, b2, target)[0] == pytest.approx(0.5 * 6 * 12 / (0.5 * 144 + 3 * 24))
    assert drift_shrink(inc, mix, t, a2, 1e6, target)[0] < 1e-3  # noise-dominated: stay at the last checkpoint
    assert drift_shrink(-inc, mix, t, a2, b2, target)[0] == 0.0  # predicted against the drift
    assert backtest_shrink(np.array([1.0, 2.0]), np.array([0.5, 1.0])) == pytest.approx(0.5)
    assert backtest_shrink(np.array([1.0]), np.array([-3.0])) == 0.0
    assert backtest_shrink(np.zeros(2), np.ones(2)) == 0.0
