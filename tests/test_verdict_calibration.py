"""The calibrated verdict: no single tensor carries the whole-model figure, and a decelerating run is caught."""

from __future__ import annotations

import numpy as np

from relex.analysis.drift import DRIFT, MIN_PACE_RATIO, balanced_gram, pace_ratio, pure_drift_gram, random_walk_gram
from relex.analysis.verdict import run_verdict

STEPS = [5, 10, 15, 20, 25, 30]


def _gram(path: np.ndarray) -> np.ndarray:
    return path @ path.T


def _walk(rng, d: int, scale: float = 1.0) -> np.ndarray:
    dt = np.diff(np.concatenate([[0], STEPS]))
    return np.cumsum(rng.normal(size=(len(STEPS), d)) * np.sqrt(dt)[:, None] * scale, axis=0)


def _line(rng, d: int, speed: float, profile=lambda t: t) -> np.ndarray:
    v = rng.normal(size=d)
    return np.outer(profile(np.asarray(STEPS, dtype=float)), v / np.linalg.norm(v)) * speed


def test_pace_ratio_of_line_walk_and_slowing_path():
    t = np.asarray(STEPS, dtype=float)
    assert np.isclose(pace_ratio(pure_drift_gram(t), t), 1.0)
    assert np.isclose(pace_ratio(random_walk_gram(t), t), 1.0)  # noise alone does not look like slowing
    root = np.sqrt(t)
    assert pace_ratio(np.outer(root, root), t) < MIN_PACE_RATIO


def test_one_tensor_cannot_carry_the_verdict():
    rng = np.random.default_rng(0)
    grams = {"embed": _gram(_line(rng, 4000, speed=200.0) + _walk(rng, 4000, 0.01))}
    grams.update({f"layer{i}": _gram(_walk(rng, 4000)) for i in range(4)})
    ndims = dict.fromkeys(grams, 2)
    before = run_verdict(grams, ndims, STEPS, 40, calibrated=False)
    after = run_verdict(grams, ndims, STEPS, 40)
    assert before.verdict == DRIFT and before.drift_share > 0.9
    assert after.verdict != DRIFT and after.calibration["balanced_drift_share"] < 0.5
    assert balanced_gram(grams, ndims)[-1, -1] == len(grams)  # each tensor counts once


def test_every_tensor_drifting_stays_drift_dominated():
    rng = np.random.default_rng(1)
    grams = {f"w{i}": _gram(_line(rng, 2000, speed=1.0 + i) + _walk(rng, 2000, 0.01)) for i in range(4)}
    grams["norm"] = _gram(_walk(rng, 16))  # a noisy vector does not count against the matrices
    ndims = {**dict.fromkeys(grams, 2), "norm": 1}
    verdict = run_verdict(grams, ndims, STEPS, 40)
    assert verdict.verdict == DRIFT, verdict.message
    assert verdict.calibration["pace_ratio"] > 0.9


def test_a_run_that_slows_inside_the_window_is_not_called_drift_dominated():
    rng = np.random.default_rng(2)
    grams = {f"w{i}": _gram(_line(rng, 2000, 1.0, np.sqrt) + _walk(rng, 2000, 0.001)) for i in range(3)}
    ndims = dict.fromkeys(grams, 2)
    assert run_verdict(grams, ndims, STEPS, 40, calibrated=False).drift_share > 0.9
    verdict = run_verdict(grams, ndims, STEPS, 40)
    assert verdict.verdict != DRIFT
    assert verdict.calibration["pace_ratio"] < MIN_PACE_RATIO


def test_a_run_that_speeds_up_inside_the_window_is_not_called_drift_dominated():
    rng = np.random.default_rng(3)
    grams = {f"w{i}": _gram(_line(rng, 2000, 1.0, np.square) + _walk(rng, 2000, 0.001)) for i in range(3)}
    verdict = run_verdict(grams, dict.fromkeys(grams, 2), STEPS, 40)
    assert verdict.verdict != DRIFT and verdict.message.startswith("accelerating")
