"""The verdict's typed results: what it means for a gate (:class:`Outcome`) and the rule that decided it
(:class:`Finding`). The rules live in :mod:`relex.analysis.verdict`, the words in :mod:`relex.analysis.wording`;
both name these members, never their text.
"""

from __future__ import annotations

from enum import Enum


class Outcome(str, Enum):
    """What the verdict means for a gate."""

    PLAUSIBLE = "plausible"
    MIXED = "mixed"
    INCONCLUSIVE = "inconclusive"
    HURT = "will likely hurt"
    BEYOND = "beyond the backtest's horizon"
    NOT_BETTER = "not better on the probe"  # a probe decided: no candidate beat the last observed checkpoint


class Finding(str, Enum):
    """The rule that decided the verdict."""

    STATIC = "static"  # no tensor moved
    TOO_SHORT = "too short"  # fewer than 3 checkpoints
    DRIFT = "drift"  # drift-dominated, along a straight line through the base
    CURVED = "curved"  # drift-dominated, but the coherent path decelerates, accelerates or turns
    TURNING = "turning"  # coherent only with two factors: the direction changes
    MIXED = "mixed"  # drift and noise
    NOISE = "noise"  # noise-dominated
    UNBALANCED = "unbalanced"  # the drift is carried by a few tensors
    DECELERATING = "decelerating"
    ACCELERATING = "accelerating"
    REWARD_SATURATES = "reward saturates"
    LINE_LOSES = "line loses"  # the window backtest's line loses to stopping, carried to the target
    BEYOND = "beyond the horizon"  # the target lies beyond what the backtest can vouch for
    TOO_CLOSE = "too close to call"  # the line wins by less than the margin
