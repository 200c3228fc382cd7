"""``relex eval --fail-if-worse``: is any checkpoint worse than the first one, beyond a margin, with confidence?

A checkpoint is *worse* when the whole paired-bootstrap interval of its difference to the baseline (the
first checkpoint) lies below ``−margin``: at the interval's confidence (95% by default) it loses more than
``margin`` accuracy. With one task the task's difference is judged; with several, the mean over tasks (the
same stratified bootstrap as the ``mean`` row of the table). Per-task differences are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from relex.errors import RelexInputError
from relex.jsonable import jsonable


@dataclass
class CheckpointJudgement:
    """One checkpoint against the baseline: the judged difference (``None`` when there is none)."""

    label: str
    difference: dict | None  # {"diff", "ci_low", "ci_high", "confidence", ...} as in results.json
    worse: bool
    reason: str

    def to_dict(self) -> dict:
        return {"label": self.label, "worse": self.worse, "reason": self.reason,
                "difference": jsonable(self.difference)}


@dataclass
class EvalGate:
    """The judgement of every checkpoint after the first (see the module docstring)."""

    baseline: str
    judged: str  # the task judged, or "mean"
    margin: float  # accuracy (a fraction: 0.01 is one point)
    checkpoints: list[CheckpointJudgement] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(c.worse for c in self.checkpoints)

    @property
    def worse(self) -> list[str]:
        return [c.label for c in self.checkpoints if c.worse]

    def reason(self) -> str:
        """One line: which checkpoints are worse, or that none is."""
        scope = "on the mean over tasks" if self.judged == "mean" else f"on {self.judged}"
        points = 100 * self.margin
        margin = f"more than {points:g} point{'' if points == 1 else 's'}" if points > 0 else "any margin"
        if self.passed:
            return f"no checkpoint is worse than {self.baseline} by {margin} with confidence ({scope})"
        details = "; ".join(c.reason for c in self.checkpoints if c.worse)
        return f"worse than {self.baseline} by {margin} with confidence ({scope}): {details}"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "baseline": self.baseline, "judged": self.judged, "margin": self.margin,
                "rule": "worse when the upper end of the paired-bootstrap interval of (checkpoint − baseline) "
                        "is below −margin",
                "checkpoints": [c.to_dict() for c in self.checkpoints]}


def check_gate_options(n_columns: int, margin_points: float) -> None:
    """Refuse, before anything is scored, a gate that cannot be judged: fewer than two columns (checkpoints and
    decoders) to compare, or a margin that is not a number of points ≥ 0."""
    if not math.isfinite(margin_points) or margin_points < 0:
        raise RelexInputError(f"--margin must be a number of accuracy points ≥ 0, got {margin_points}")
    if n_columns < 2:
        raise RelexInputError("--fail-if-worse compares checkpoints with the first one: give at least two")


def judge(results, margin_points: float = 0.0) -> EvalGate:
    """Judge every checkpoint of ``results`` (an :class:`~relex.evaluate.results.EvalResults` with its
    comparison) against the first; ``margin_points`` in accuracy points (1.0 = one percentage point)."""
    labels = results.labels
    check_gate_options(len(labels), margin_points)
    judged = "mean" if len(results.tasks) > 1 else results.tasks[0]
    margin = margin_points / 100.0
    gate = EvalGate(baseline=labels[0], judged=judged, margin=margin)
    for label in labels[1:]:
        difference = results.difference(judged, label)
        if not difference:
            gate.checkpoints.append(CheckpointJudgement(label, None, False,
                                                        f"{label}: no paired problems with {labels[0]}"))
            continue
        high = difference["ci_high"]
        worse = high is not None and high < -margin
        confidence = 100 * float(difference.get("confidence") or 0.95)
        text = (f"{label} {100 * difference['diff']:+.1f} points [{100 * difference['ci_low']:+.1f}, "
                f"{100 * high:+.1f}] ({confidence:.0f}% interval)")
        gate.checkpoints.append(CheckpointJudgement(label, difference, worse, text))
    return gate
