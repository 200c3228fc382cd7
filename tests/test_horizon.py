"""How far beyond the observed window a target lies, and the farthest the window backtest can vouch for."""

from __future__ import annotations

import json

import pytest

from relex.analysis.drift import diagnose, pure_drift_gram
from relex.analysis.verdict import DRIFT, MAX_CARRY, MIXED, WindowBacktest, decide, horizon
from relex.analysis.wording import horizon_text

STEPS = [5, 10, 15, 20]


def _verdict(target, line=0.01, stop=0.49, steps=STEPS, fit=(5, 10), held=(15, 20)):
    return decide(diagnose(pure_drift_gram(steps), steps), backtest=WindowBacktest(tuple(fit), tuple(held), line, stop),
                  target_step=target)


def test_horizon_is_stated_and_limited():
    steps = list(range(4, 41, 4))  # steps 4..40; the backtest fits 4..20 and predicts 40 (2x)
    d = _verdict(500, steps=steps, fit=steps[:5], held=steps[5:])
    assert "the target is 12.5× the observed window (step 500 from steps 4..40)" in d.message
    assert d.drift_class == MIXED and d.message.startswith("extrapolation this far cannot be vouched for")
    horizon = d.backtest["horizon"]
    assert horizon["max_target_step"] == 440 and horizon["carry"] == pytest.approx(11.5)
    # At the limit itself a clean line is still plausible.
    d = _verdict(440, steps=steps, fit=steps[:5], held=steps[5:])
    assert d.drift_class == DRIFT and d.backtest["horizon"]["within_limit"]
    assert d.backtest["horizon"]["carry"] == pytest.approx(MAX_CARRY)


def test_absurd_targets_never_crash_the_verdict():
    for target in (10**15, 99999999999999999999, 10**400, float("inf")):
        d = _verdict(target)
        assert d.drift_class != DRIFT
        assert d.backtest["line_beats_stop"] is False  # carried that far, any line error exceeds stopping's
        json.dumps(d.to_dict(), default=str)
    # A perfect line (zero backtest error) is still refused far out: the limit does not rest on the error.
    d = _verdict(10**400, line=0.0)
    assert d.backtest["line_beats_stop"] and d.drift_class == MIXED and not d.backtest["horizon"]["within_limit"]
    assert "step 1.00e+400" in d.message and "∞×" in d.message


def test_horizon_without_a_backtest_and_inside_the_window():
    record = horizon([5, 10], 50)
    assert horizon_text(record) == "the target is 5× the observed window (step 50 from steps 5..10)"
    assert record["ratio"] == 5.0 and "within_limit" not in record
    assert horizon_text(horizon([5, 10], 8)) == "the target lies inside the observed window (step 8 from steps 5..10)"
    assert horizon([5, 10], None) is None
    # Uneven steps: a backtest over 50x (fitted up to step 2, predicting step 100) reaches much farther.
    record = horizon([1, 2, 3, 100], 10_000, [1, 2], [3, 100])
    assert record["backtest_ratio"] == 50 and record["within_limit"] and record["max_target_step"] == 49_100


def test_messages_keep_the_evidence_of_a_verdict_that_passes():
    d = _verdict(100, line=0.10)
    assert d.drift_class == DRIFT
    assert d.message == ("drift-dominated: extrapolation along the trajectory is plausible (the target is 5× the "
                         "observed window (step 100 from steps 5..20); on the observed window a line fitted up to "
                         "step 10 predicted step 20 with weight error 0.10, stopping 0.49; carried to step 100: "
                         "0.40 against 0.78)")
    assert d.backtest["horizon"]["max_target_step"] == 220 and d.backtest["line_beats_stop"]
    assert _verdict(None).message.endswith("weight error 0.01, stopping 0.49)")
