"""The training reward beside the weights: does the reward's own trend leave room for the target?

The weights' verdict cannot see a run whose accuracy saturates: its weights keep moving along a line while
what they buy flattens, and a line carried far past the window overshoots (every row of the calibration that
the weights called plausible and where extrapolation hurt had nearly reached its final accuracy,
docs/verdict_calibration.md). The training reward sees it. A verifier's reward is bounded (1 for a correct
answer); if the reward's linear trend over the observed window would reach that ceiling before the target
step, the run cannot keep the pace the line assumes, and the verdict says so
(:class:`relex.analysis.verdict.RunVerdict`).

Where the rewards come from: the ``log_history`` of the last observed checkpoint's ``trainer_state.json``
(the HF Trainer writes it into every checkpoint; TRL's ``GRPOTrainer`` and relex's toy trainer log the mean
reward under ``"reward"``), or a JSON Lines file with one ``{"step": N, "<key>": value}`` object per line
(what a verl or OpenRLHF user exports from their logger).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relex.errors import RelexInputError

DEFAULT_KEY = "reward"  # TRL's GRPOTrainer and relex's toy trainer
DEFAULT_CEILING = 1.0  # a verifier's reward for a correct answer
MIN_POINTS = 4  # fewer logged rewards inside the window give no trend
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class RewardLog:
    """Training rewards by step, as logged: ``values[i]`` is the mean reward logged at ``steps[i]``."""

    steps: tuple[float, ...]
    values: tuple[float, ...]
    key: str
    source: str  # the file they were read from


def read_reward_log(path: str | Path, key: str = DEFAULT_KEY) -> RewardLog:
    """The rewards logged under ``key`` in ``path``: a ``trainer_state.json`` (its ``log_history``) or a JSON
    Lines file of ``{"step": N, key: value}`` objects. :class:`RelexInputError` (naming the file) when it cannot
    be read or logs no finite ``key`` at any step."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RelexInputError(f"{path}: cannot read the reward log ({exc.strerror or exc})") from None
    try:  # one JSON document (a trainer_state.json), else JSON Lines
        document = json.loads(text)
        entries = document.get("log_history", [document]) if isinstance(document, dict) else document
    except json.JSONDecodeError:
        try:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise RelexInputError(f"{path}: not JSON or JSON Lines ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(entries, list):
        raise RelexInputError(f"{path}: expected a trainer_state.json or JSON Lines of objects")
    by_step: dict[float, float] = {}
    for entry in entries:
        if not isinstance(entry, dict) or key not in entry or "step" not in entry:
            continue
        try:
            step, value = float(entry["step"]), float(entry[key])
        except (TypeError, ValueError):
            raise RelexInputError(f"{path}: step {entry.get('step')!r} logs {key!r} = {entry[key]!r}, "
                                  "not a number") from None
        if math.isfinite(step) and math.isfinite(value):
            by_step[step] = value  # a step logged twice (a resumed run) keeps its last value
    if not by_step:
        raise RelexInputError(f"{path}: no step logs a finite {key!r} (pass the key the trainer logs the mean "
                              "reward under)")
    steps = sorted(by_step)
    return RewardLog(tuple(steps), tuple(by_step[s] for s in steps), key, str(path))


def find_reward_log(checkpoint: str | Path, key: str = DEFAULT_KEY) -> RewardLog | None:
    """The rewards of a checkpoint folder's ``trainer_state.json``, or ``None`` when it has none (no file, or
    no step logs ``key``): an absent log is not an error, the verdict then rests on the weights alone."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        return read_reward_log(path, key)
    except RelexInputError:
        return None


@dataclass(frozen=True)
class RewardTrend:
    """A line fitted to the training reward over the observed window, carried to the target step."""

    key: str
    source: str
    points: int  # rewards logged inside the window
    first_step: float
    last_step: float
    slope: float  # reward per step
    at_last_step: float  # the line's value at the window's last step
    ceiling: float
    target_step: float | None
    at_target: float | None  # the line's value at the target step
    ceiling_step: float | None  # where the line reaches the ceiling (None: it does not rise, or already above)
    above_ceiling: bool  # a logged reward exceeds the ceiling: the ceiling is wrong, the check does not apply

    @property
    def saturates_before_target(self) -> bool:
        """The reward's trend reaches its ceiling before the target step: a line would overshoot."""
        return (not self.above_ceiling and self.ceiling_step is not None and self.target_step is not None
                and self.ceiling_step < self.target_step)

    def text(self) -> str:
        """One line for people."""
        where = f"steps {self.first_step:g}..{self.last_step:g}, {self.points} points"
        if self.above_ceiling:
            return (f"training reward ({self.key}, {where}): a logged reward exceeds the ceiling {self.ceiling:g}, "
                    "so the trend is not checked (set the reward's maximum)")
        rise = f"{self.slope * 100:+.3f} per 100 steps, {self.at_last_step:.3f} at step {self.last_step:g}"
        if self.ceiling_step is None:
            return f"training reward ({self.key}, {where}): {rise}; not rising, never reaches {self.ceiling:g}"
        reach = f"reaches {self.ceiling:g} at step {self.ceiling_step:.0f}"
        if self.target_step is None:
            return f"training reward ({self.key}, {where}): {rise}; {reach}"
        relation = "before" if self.saturates_before_target else "after"
        return (f"training reward ({self.key}, {where}): {rise}; {reach}, {relation} the target step "
                f"{self.target_step:g}")

    def to_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "points": self.points, "first_step": self.first_step,
                "last_step": self.last_step, "slope": self.slope, "at_last_step": self.at_last_step,
                "ceiling": self.ceiling, "target_step": self.target_step, "at_target": self.at_target,
                "ceiling_step": self.ceiling_step, "above_ceiling": self.above_ceiling,
                "saturates_before_target": self.saturates_before_target, "text": self.text()}


def reward_trend(log: RewardLog, window_steps, target_step: float | None = None,
                 ceiling: float = DEFAULT_CEILING) -> RewardTrend | None:
    """The least-squares line through the rewards logged after the window's first step up to its last one,
    carried to ``target_step``; ``None`` with fewer than :data:`MIN_POINTS` rewards in the window."""
    if not math.isfinite(ceiling):
        raise RelexInputError(f"the reward's maximum must be a finite number, got {ceiling!r}")
    first, last = float(window_steps[0]), float(window_steps[-1])
    steps = np.asarray(log.steps, dtype=np.float64)
    values = np.asarray(log.values, dtype=np.float64)
    inside = (steps > first) & (steps <= last)
    if int(inside.sum()) < MIN_POINTS:
        return None
    t, y = steps[inside], values[inside]
    slope, intercept = np.polyfit(t, y, 1)
    slope, intercept = float(slope), float(intercept)
    at_last = slope * last + intercept
    above = bool(np.any(y > ceiling))
    rising = slope * (last - first) > 1e-9 * max(1.0, abs(ceiling))  # not a flat line's rounding error
    ceiling_step = (ceiling - intercept) / slope if rising and not above else None
    if ceiling_step is not None:
        ceiling_step = max(ceiling_step, last)  # a line already at the ceiling reaches it at the window's end
    at_target = None if target_step is None else slope * float(target_step) + intercept
    return RewardTrend(log.key, log.source, int(inside.sum()), float(t[0]), float(t[-1]), slope, at_last,
                       float(ceiling), None if target_step is None else float(target_step), at_target, ceiling_step,
                       above)


def checkpoint_reward_trend(checkpoint: str | Path, window_steps, target_step: float | None = None,
                            key: str = DEFAULT_KEY, ceiling: float = DEFAULT_CEILING) -> RewardTrend | None:
    """The reward trend of a run from the ``trainer_state.json`` of its last observed checkpoint, or ``None``
    when that folder logs no reward under ``key`` (or too few inside the window)."""
    log = find_reward_log(checkpoint, key)
    return None if log is None else reward_trend(log, window_steps, target_step, ceiling)
