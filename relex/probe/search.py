"""The horizon search: which candidate checkpoint beats the last observed one on the probe, and which is best.

Every candidate (a prediction at one target step) is scored on the probe's problems paired with the last observed
checkpoint, in looks: after each look a paired-bootstrap interval of the mean per-problem difference, at a
confidence corrected for the looks and the candidates (Bonferroni), says whether the candidate is decided better,
decided worse, or not yet decided. A candidate decided worse is dropped; the search stops once every remaining
candidate is decided better, or after the last look. Every remaining candidate was scored on the same problems,
so their means compare.

The choice: among the candidates decided better than the last observed checkpoint, the best by the probe; those
within ``tie`` of the best count as tied, and the nearest step wins. None decided better: no target is chosen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from relex.evaluate.stats import paired_bootstrap
from relex.probe.problems import ProbeSet
from relex.progress import Progress, Report

DEFAULT_CONFIDENCE = 0.95
DEFAULT_LOOKS = 3
# Doubling the step from one candidate to the next: on the toy calibration (docs/probe.md) half the candidates of
# a √2 grid captured as much of the oracle's gain (fewer candidates, a milder correction for them) at half the cost.
GRID_FACTOR = 2.0


def target_grid(last_step: int, limit: int, factor: float = GRID_FACTOR, most: int = 8) -> list[int]:
    """Targets from just past ``last_step`` to ``limit``: ``last_step·factor^k`` (k = 1, 2, …), coarser when more
    than ``most`` would fit."""
    if limit <= last_step:
        return []
    while True:
        grid, value = [], float(last_step)
        while True:
            value *= factor
            step = int(round(value))
            if step > limit:
                break
            if step > last_step and (not grid or step > grid[-1]):
                grid.append(step)
        if len(grid) <= most:
            return grid
        factor *= factor ** 0.5


@dataclass
class CandidateScore:
    """One candidate's standing against the last observed checkpoint."""

    step: int
    mean: float = float("nan")
    problems: int = 0
    difference: dict = field(default_factory=dict)  # paired bootstrap: diff, ci_low, ci_high, confidence
    decision: str = "undecided"  # "better", "worse" or "undecided"


@dataclass
class ProbeCurve:
    """The probe against the target step, and the choice made on it."""

    probe: dict
    mode: str
    reference_step: int
    reference_mean: float
    candidates: list[CandidateScore]
    reference_problems: int  # the problems the last observed checkpoint was scored on (all the looks done)
    chosen: int | None
    confidence: float
    looks_done: int
    tokens: int
    seconds: float

    @property
    def better(self) -> list[CandidateScore]:
        return [c for c in self.candidates if c.decision == "better"]

    @property
    def blind(self) -> str:
        """Why the probe told nothing apart ("" when it did): every candidate scored exactly what the last observed
        checkpoint scored, problem by problem (a prompt format, verifier or token budget that no model meets)."""
        scored = [c for c in self.candidates if c.difference]
        if not scored or any(c.difference["ci_low"] != 0 or c.difference["ci_high"] != 0 for c in scored):
            return ""
        return (f"every candidate scored what the last observed checkpoint scored on every problem ({self.mode} "
                f"{self.reference_mean:.3f}): the probe tells nothing apart; check its prompts' format, its verifier"
                + (" or --probe-max-new-tokens" if self.mode == "reward" else ""))

    def to_dict(self) -> dict:
        return {"probe": self.probe, "mode": self.mode, "reference_step": self.reference_step,
                "reference_mean": self.reference_mean, "reference_problems": self.reference_problems,
                "chosen": self.chosen, "confidence": self.confidence,
                "looks_done": self.looks_done, "tokens": self.tokens, "seconds": self.seconds,
                "candidates": [c.__dict__ for c in self.candidates]}

    def text(self) -> str:
        """The curve for people: one line per candidate."""
        count = self.probe["problems"]
        lines = [f"probe {self.probe['name']} ({self.mode}, {count} problem{'s' if count != 1 else ''}): last "
                 f"observed step {self.reference_step} {self.reference_mean:.3f} on {self.reference_problems}"]
        for c in self.candidates:
            d = c.difference
            interval = (f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if d else "n/a")
            mark = "  ← chosen" if c.step == self.chosen else ""
            lines.append(f"  step {c.step}: {c.mean:.3f} on {c.problems}, {interval}, {c.decision}{mark}")
        lines.append(f"probe cost: {self.tokens:,} forward tokens, {self.seconds:.1f} s")
        if self.blind:
            lines.append(f"warning: {self.blind}")
        return "\n".join(lines)


def search(reference, candidates: Mapping[int, Callable[[], object]], probe: ProbeSet, *, mode: str = "reward",
           confidence: float = DEFAULT_CONFIDENCE, looks: int = DEFAULT_LOOKS, tie: float | None = None,
           seed: int = 0, progress: Report = None) -> ProbeCurve:
    """Score ``candidates`` (step → a function giving its :class:`relex.probe.scoring.ProbeModel`; called at each
    look, its model dropped after the look's scoring: one candidate in memory at a time) against ``reference``
    (the last observed checkpoint's ProbeModel; its ``step`` attribute names it) on ``probe``, and choose (see the
    module docstring).

    ``confidence`` is family-wise over the candidates and the looks; ``tie`` defaults to one problem's worth of
    the probe's score (1/n). ``progress`` gets :class:`relex.progress.Progress` events in problems scored (of
    every model scoring every problem: sequential stopping ends below that).
    """
    started = time.perf_counter()
    n = len(probe)
    steps = sorted(candidates)
    looks = max(1, min(looks, n))
    level = 1.0 - (1.0 - confidence) / (looks * max(1, len(steps)))
    bounds = [math.ceil(n * (j + 1) / looks) for j in range(looks)]
    scores = {step: np.zeros(0) for step in steps}
    reference_scores = np.zeros(0)
    standing = {step: CandidateScore(step) for step in steps}
    alive = list(steps)
    tokens, done_looks, lo, scored = 0, 0, 0, 0
    total = n * (1 + len(steps))

    def report(item: str) -> None:
        if progress is not None:
            progress(Progress("probing", scored, total, "", item))

    for hi in bounds:
        indices = list(range(lo, hi))
        look = f"problems {lo + 1}-{hi} of {n}"
        report(f"last observed step {getattr(reference, 'step', '')}, {look}")
        before = reference.tokens
        reference_scores = np.concatenate([reference_scores, reference.score(indices, mode)])
        tokens += reference.tokens - before
        scored += len(indices)
        for step in alive:
            report(f"step {step}, {look}")
            model = candidates[step]()
            before = model.tokens
            scores[step] = np.concatenate([scores[step], model.score(indices, mode)])
            tokens += model.tokens - before
            scored += len(indices)
            del model
            difference = paired_bootstrap(reference_scores, scores[step], n_boot=20_000, seed=seed,
                                          confidence=level)
            entry = standing[step]
            entry.mean, entry.problems, entry.difference = float(scores[step].mean()), hi, difference
            entry.decision = ("better" if difference["ci_low"] > 0 else "worse" if difference["ci_high"] < 0
                              else "undecided")
        alive = [step for step in alive if standing[step].decision != "worse"]
        done_looks, lo = done_looks + 1, hi
        if not alive or all(standing[step].decision == "better" for step in alive):
            break
    scored = total
    report("decided")
    better = [standing[step] for step in alive if standing[step].decision == "better"]
    chosen = None
    if better:
        best = max(c.mean for c in better)
        margin = (1.0 / lo) if tie is None else tie
        chosen = min(c.step for c in better if c.mean >= best - margin - 1e-12)
    return ProbeCurve(probe.describe(), mode, int(getattr(reference, "step", 0)), float(reference_scores.mean()),
                      [standing[step] for step in steps], lo, chosen, confidence, done_looks, tokens,
                      time.perf_counter() - started)
