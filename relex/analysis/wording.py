"""The verdict in words: one sentence for each finding of :mod:`relex.analysis.verdict`, its evidence, the gate's
reason, and how steps and ratios are written. Nothing here decides anything; every figure comes from the
verdict's record.
"""

from __future__ import annotations

import math

import numpy as np

from relex.analysis.outcomes import Finding, Outcome

# The sentence of each finding of the drift share and of the calibration checks, before any evidence: its headline
# (what a gate's reason quotes) and what to do about it.
BASE_MESSAGES = {
    Finding.TOO_SHORT: ("inconclusive", "the window is too short to tell drift from noise"),
    Finding.DRIFT: ("drift-dominated", "extrapolation along the trajectory is plausible"),
    Finding.CURVED: ("drift-dominated but {shape}", "a line through the base will miss; extrapolate with the model "
                     "the backtest ranks first"),
    Finding.TURNING: ("coherent but {shape}", "the direction of the update changes, so a line extrapolates poorly; "
                      "check the backtest"),
    Finding.NOISE: ("noise-dominated", "extrapolation will likely hurt"),
    Finding.MIXED: ("mixed drift and noise", "extrapolate only a short horizon and check the backtest"),
    Finding.UNBALANCED: ("drift carried by a few tensors", "the whole-model drift share is {share:.2f}, but "
                         "{balanced:.2f} with each weight matrix counted once; extrapolate only a short horizon and "
                         "check the backtest"),
    Finding.DECELERATING: ("decelerating inside the window", "the second half moved at {slowest:.2f} of the pace of "
                           "the first, so a line through the base will overshoot"),
    Finding.ACCELERATING: ("accelerating inside the window", "the second half moved at {fastest:.2f} times the pace "
                           "of the first, so the pace a line would follow is not settled"),
    Finding.REWARD_SATURATES: ("the training reward saturates before the target", "its trend over the window reaches "
                               "{ceiling:g} at step {ceiling_step:.0f}, before step {reward_target:g}, so the run "
                               "must slow down and a line will overshoot"),
    Finding.TOO_CLOSE: ("too close to call", "the line beats stopping by less than the {margin:.0%} margin, and "
                        "retraining the same run with another thread count can move this comparison by more"),
}


def message(verdict) -> str:
    """The verdict (:class:`relex.analysis.verdict.Verdict`) in one sentence, with the evidence behind it."""
    finding = verdict.finding
    if finding == Finding.STATIC:
        return "no tensor moved over the observed window"
    evidence = backtest_evidence(verdict)
    if finding == Finding.LINE_LOSES:
        if verdict.drift_class == "mixed":  # a drift-dominated run whose line loses
            return (f"extrapolation this far will likely hurt: the drift share is {verdict.drift_share:.2f}, "
                    f"but {evidence}")
        return f"noise-dominated: extrapolation will likely hurt ({evidence})"
    if finding == Finding.BEYOND:
        return f"extrapolation this far cannot be vouched for: {evidence}"
    text = "{}: {}".format(*BASE_MESSAGES[finding]).format(**_figures(verdict))
    return f"{text} ({evidence})" if evidence else text


def headline(verdict) -> str:
    """The verdict's finding in a few words (the part of :func:`message` before its colon)."""
    return BASE_MESSAGES[verdict.finding][0].format(**_figures(verdict))


def _figures(verdict) -> dict:
    calibration = verdict.calibration or {}
    paces = [x for x in (calibration.get("pace_ratio"), calibration.get("whole_model_pace_ratio"))
             if x is not None and math.isfinite(x)]
    reward = verdict.reward
    return {"shape": verdict.shape or "turning", "share": verdict.drift_share,
            "balanced": calibration.get("balanced_drift_share", float("nan")),
            "slowest": min(paces, default=float("nan")), "fastest": max(paces, default=float("nan")),
            "ceiling": reward.ceiling if reward else float("nan"),
            "ceiling_step": (reward.ceiling_step or float("nan")) if reward else float("nan"),
            "reward_target": (reward.target_step or float("nan")) if reward else float("nan"),
            "margin": verdict.margin}


def backtest_evidence(verdict) -> str:
    """What the window backtest showed, carried to the target (empty without a backtest with finite errors)."""
    record = verdict.backtest
    if not record or not (math.isfinite(record["line_error"]) and math.isfinite(record["stop_error"])):
        return ""
    evidence = (f"on the observed window a line fitted up to step {record['fit_steps'][-1]} predicted step "
                f"{record['held_out_steps'][-1]} with weight error {record['line_error']:.2f}, stopping "
                f"{record['stop_error']:.2f}")
    if verdict.horizon is not None and verdict.target_step is not None:  # a target the backtest is carried to
        evidence = f"{horizon_text(verdict.horizon)}; {evidence}"
    if "projected_line_error" in record:
        evidence += (f"; carried to step {step_text(verdict.target_step)}: {error_text(record['projected_line_error'])}"
                     f" against {record['projected_stop_error']:.2f}")
    return evidence


def gate_reason(verdict, passed: bool, lenient: bool) -> str:
    """Why a gate passed or failed on ``verdict``, in one line."""
    outcome = verdict.outcome
    target = verdict.target_step
    where = f"to step {step_text(target)}" if target is not None else "as far as the window backtest reached"
    reach = verdict.horizon or {}
    limit = (f"step {step_text(reach.get('target_step'))} is beyond step {reach.get('max_target_step')}, the "
             "farthest the window backtest can vouch for") if reach.get("within_limit") is False else ""
    if verdict.finding == Finding.STATIC:
        reason = "no tensor moved over the observed window: there is nothing to extrapolate"
    elif outcome == Outcome.HURT:
        reason = f"extrapolation {where} will likely hurt" + (f", and {limit}" if limit else "")
    elif outcome == Outcome.BEYOND:
        reason = limit
    elif outcome == Outcome.PLAUSIBLE:
        reason = f"extrapolation {where} is plausible"
    elif verdict.finding == Finding.TOO_SHORT:
        reason = "the window is too short to tell drift from noise"
    else:
        reason = f"the verdict is mixed: {headline(verdict)}"
    if outcome in (Outcome.MIXED, Outcome.INCONCLUSIVE):
        reason += " (passed under --lenient)" if passed else " (only --lenient passes it, with a warning)"
    return reason


def horizon_text(record: dict) -> str:
    """How far beyond the observed window the target lies (a record of :func:`relex.analysis.verdict.horizon`)."""
    window = f"steps {step_text(record['first_observed_step'])}..{step_text(record['last_observed_step'])}"
    target = record["target_step"]
    if record["ratio"] <= 1.0:
        return f"the target lies inside the observed window (step {step_text(target)} from {window})"
    text = f"the target is {times_text(record['ratio'])}× the observed window (step {step_text(target)} from {window})"
    if record.get("within_limit") is False:
        text += (f", beyond the {times_text(record['max_ratio'])}× (step {record['max_target_step']}) that a backtest "
                 f"over {times_text(record['backtest_ratio'])}× can vouch for (relex carries it at most "
                 f"{record['max_carry']:g} times as far)")
    return text


def step_text(step) -> str:
    """A step as it is written: an integer when it is one, however large."""
    if isinstance(step, (int, np.integer)):
        digits = str(abs(int(step)))
        if len(digits) > 24:  # an absurd step stays readable
            return f"{'-' if step < 0 else ''}{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"
        return str(int(step))
    try:
        value = float(step)
    except OverflowError:
        value = math.inf if step > 0 else -math.inf
    if math.isfinite(value) and value.is_integer():
        return str(int(value))
    return f"{value:g}"


def times_text(ratio: float) -> str:
    """A ratio of steps as '12.5', '250' or '6.2e+17'."""
    if not math.isfinite(ratio):
        return "∞"
    if ratio < 100:
        return f"{ratio:.3g}"
    if ratio < 1e6:
        return f"{ratio:,.0f}"
    return f"{ratio:.2g}"


def error_text(error: float) -> str:
    """A relative error, readable however large it was carried."""
    if not isinstance(error, (int, float)) or error != error:
        return "n/a"
    if not math.isfinite(error):
        return "∞"
    return f"{error:.2f}" if error < 1e4 else f"{error:.2g}"
