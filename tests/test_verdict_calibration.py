"""The calibrated verdict: no single tensor carries the whole-model figure, and a decelerating run is caught."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np

from relex.analysis.drift import balanced_gram, pace_ratio, pure_drift_gram, random_walk_gram
from relex.analysis.verdict import BACKTEST_MARGIN, DRIFT, MIN_PACE_RATIO, MIXED, run_verdict

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
    assert before.drift_class == DRIFT and before.drift_share > 0.9
    assert after.drift_class != DRIFT and after.calibration["balanced_drift_share"] < 0.5
    assert balanced_gram(grams, ndims)[-1, -1] == len(grams)  # each tensor counts once


def test_every_tensor_drifting_stays_drift_dominated():
    rng = np.random.default_rng(1)
    grams = {f"w{i}": _gram(_line(rng, 2000, speed=1.0 + i) + _walk(rng, 2000, 0.01)) for i in range(4)}
    grams["norm"] = _gram(_walk(rng, 16))  # a noisy vector does not count against the matrices
    ndims = {**dict.fromkeys(grams, 2), "norm": 1}
    verdict = run_verdict(grams, ndims, STEPS, 40)
    assert verdict.drift_class == DRIFT, verdict.message
    assert verdict.calibration["pace_ratio"] > 0.9


def test_a_run_that_slows_inside_the_window_is_not_called_drift_dominated():
    rng = np.random.default_rng(2)
    grams = {f"w{i}": _gram(_line(rng, 2000, 1.0, np.sqrt) + _walk(rng, 2000, 0.001)) for i in range(3)}
    ndims = dict.fromkeys(grams, 2)
    assert run_verdict(grams, ndims, STEPS, 40, calibrated=False).drift_share > 0.9
    verdict = run_verdict(grams, ndims, STEPS, 40)
    assert verdict.drift_class != DRIFT
    assert verdict.calibration["pace_ratio"] < MIN_PACE_RATIO


def test_a_run_that_speeds_up_inside_the_window_is_not_called_drift_dominated():
    rng = np.random.default_rng(3)
    grams = {f"w{i}": _gram(_line(rng, 2000, 1.0, np.square) + _walk(rng, 2000, 0.001)) for i in range(3)}
    verdict = run_verdict(grams, dict.fromkeys(grams, 2), STEPS, 40)
    assert verdict.drift_class != DRIFT and verdict.message.startswith("accelerating")


def _drift_and_walk(seed: int, walk: float, steps=STEPS, d: int = 3000, tensors: int = 3) -> dict:
    """Per-tensor Gram matrices of a straight line plus a random walk of the given scale."""
    rng = np.random.default_rng(seed)
    t = np.asarray(steps, dtype=float)
    dt = np.diff(np.concatenate([[0.0], t]))
    grams = {}
    for i in range(tensors):
        v = rng.normal(size=d)
        path = np.outer(t, v / np.linalg.norm(v)) + np.cumsum(rng.normal(size=(len(t), d)) * np.sqrt(dt)[:, None],
                                                               axis=0) * walk / math.sqrt(d)
        grams[f"w{i}"] = path @ path.T
    return grams


def test_the_margin_is_how_clearly_the_carried_line_must_beat_stopping():
    grams = _drift_and_walk(4, walk=1.4)
    ndims = dict.fromkeys(grams, 2)
    default = run_verdict(grams, ndims, STEPS, 90)
    bt = default.backtest
    ratio = bt["projected_line_error"] / bt["projected_stop_error"]
    # The line wins by more than the default margin, but by less than the factor 1.54 by which retraining
    # with another thread count moved the toy runs' ratio (docs/verdict_calibration.md): a margin of 0.35
    # would be needed for this call to survive it.
    assert 1 / 1.54 < ratio < 1 - BACKTEST_MARGIN, ratio
    assert default.drift_class == DRIFT and math.isclose(BACKTEST_MARGIN, 0.2)
    assert run_verdict(grams, ndims, STEPS, 90, margin=0.35).drift_class == MIXED
    # Plausible at any margin below 1 - ratio, too close to call above it: the same run, the same figures.
    assert run_verdict(grams, ndims, STEPS, 90, margin=1 - ratio - 0.02).drift_class == DRIFT
    strict = run_verdict(grams, ndims, STEPS, 90, margin=1 - ratio + 0.02)
    assert strict.drift_class == MIXED and strict.message.startswith("too close to call")
    assert strict.backtest["projected_line_error"] == bt["projected_line_error"]


def test_a_margin_never_rescues_a_line_that_loses():
    grams = _drift_and_walk(5, walk=12.0)  # mostly random walk: the carried line loses to stopping
    ndims = dict.fromkeys(grams, 2)
    for margin in (0.0, 0.2, 0.35):
        verdict = run_verdict(grams, ndims, STEPS, 90, margin=margin)
        assert verdict.drift_class != DRIFT and not verdict.backtest["line_beats_stop"]


def _harness():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_verdict.py"
    spec = importlib.util.spec_from_file_location("calibrate_verdict", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(setting, seed, grams, outcome, threads=1, target=90):
    diff = {"helped": 0.3, "hurt": -0.3, "n.s.": 0.0}[outcome]
    return {"setting": setting, "seed": seed, "threads": threads, "prefix": 0.3, "steps": STEPS, "target": target,
            "grams": {n: g.tolist() for n, g in grams.items()}, "ndims": dict.fromkeys(grams, 2),
            "outcome": outcome, "diff": diff, "ci_low": diff - 0.05, "ci_high": diff + 0.05,
            "last_greedy": 0.4, "pred_greedy": 0.4 + diff, "final_greedy": 0.8}


def test_rescore_counts_each_row_by_its_verdict_and_outcome(tmp_path, capsys):
    # Known ground truth: two clear drift runs that helped, a random walk that hurt, and a drift run that hurt
    # (saturated after the window: the weights cannot show it, so it is counted as plausible where it hurt).
    rows = [_row("line-a", 0, _drift_and_walk(6, 0.3), "helped"),
            _row("line-b", 1, _drift_and_walk(7, 0.3), "helped"),
            _row("walk", 0, _drift_and_walk(8, 12.0), "hurt"),
            _row("saturating", 1, _drift_and_walk(9, 0.3), "hurt"),
            _row("line-a", 0, _drift_and_walk(10, 1.0), "helped", threads=2)]
    out = tmp_path / "calibration.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    harness = _harness()
    assert harness.main(["--out", str(out), "--rescore", "--margin", "0.99"]) == 0
    printed = capsys.readouterr().out
    calibrated = printed.split("## calibrated verdict\n")[1]
    assert "| plausible | 3 | 0 | 1 | 4 |" in calibrated.split("###")[0]
    assert "plausible where it hurt: 1; recall (plausible among helped) 3/3 = 1.00" in calibrated
    # by the gate's outcome: the random walk fails (exit 3), the rest pass
    assert "| plausible | 0 | 3 | 0 | 1 | 4 |" in calibrated and "| will likely hurt | 3 | 0 | 0 | 1 | 1 |" in calibrated
    # the eval step after the gate stops the saturating run (its interval lies below -1 point)
    assert "shipped 3 extrapolations: 3 helped, 0 n.s., 0 hurt" in calibrated
    # seed 0 against seeds 1-2, and the 0.99 margin that calls nothing plausible
    assert "### seeds 1 and 2" in printed
    assert "| plausible | 0 | 0 | 0 | 0 |" in printed.split("backtest margin 0.99")[1]
    # the two thread counts of line-a, side by side, with how far the carried ratio moved
    assert re.search(r"- line-a s0 30%: carried ratio moved by \d\.\d\d \(a factor \d\.\d\d\)", printed)
