"""The gate: should a CI job (or a training loop) trust an extrapolation?

``relex check`` reads a run once (the streaming Gram pass of :func:`relex.engine.collect_grams`; nothing is
written) and gives the same verdict ``relex extrapolate`` prints (:func:`relex.analysis.verdict.run_verdict`),
then turns it into an exit code:

* **0**: extrapolation to the target is plausible (the verdict is drift-dominated). Without ``strict``, a
  *mixed* or *inconclusive* verdict also passes, with a warning: a mixed verdict means the window backtest
  carried to the target still beat stopping at the last checkpoint, so nothing says it will hurt; an
  inconclusive one (a window too short for a backtest) carries no evidence either way;
* **3**: the gate failed: the verdict says extrapolation will likely hurt (noise-dominated, or the window
  backtest's line loses to stopping once carried to the target), or the target lies beyond the horizon the
  window backtest can vouch for (:data:`relex.analysis.drift.MAX_CARRY`), or, with ``strict``, the verdict
  is anything but drift-dominated;
* **2**: bad input (nothing written); **1**: an internal error.

:func:`check` is the library form; :class:`CheckResult` holds every figure ``relex check`` prints, as
JSON (:meth:`CheckResult.to_dict`) and as a Markdown summary (:meth:`CheckResult.markdown`), which
:func:`write_summary` also appends to ``$GITHUB_STEP_SUMMARY`` in a GitHub Actions job.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from relex.analysis.drift import DRIFT, DRIFT_THRESHOLD, MAX_CARRY, NOISE, NOISE_THRESHOLD, horizon, step_text
from relex.errors import RelexInputError
from relex.io.steps import MAX_STEP

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_GATE = 3

# The largest step relex accepts: a training step is an int64 in every trainer.

# Outcomes of the gate, in the order they are checked.
HURT = "will likely hurt"
BEYOND = "beyond the backtest's horizon"
PLAUSIBLE = "plausible"
MIXED_OUTCOME = "mixed"
INCONCLUSIVE = "inconclusive"

# The drift statistics as printed, beside their random-walk and pure-drift values: (label, key, format).
STATISTICS = (
    ("growth exponent α", "alpha", "{:.2f}"),
    ("drift ratio ‖Δ_T‖²/Σ‖step‖²", "drift_ratio", "{:.1f}"),
    ("cos(first, last delta)", "cos_first_last", "{:.2f}"),
    ("cos(prefix direction, direction)", "prefix_cos", "{:.2f}"),
    ("rank-1 explained variance", "explained_rank1", "{:.3f}"),
    ("R² of rank-1 coefficient", "r2_rank1", "{:.3f}"),
)


def check_target_step(target_step) -> int:
    """``target_step`` (an int, or its text) as an int, or :class:`RelexInputError` for a step no training run
    can have."""
    if isinstance(target_step, str):
        try:
            target_step = int(target_step.strip())
        except ValueError:
            raise RelexInputError(f"--target-step must be an integer, got {target_step!r}") from None
    if isinstance(target_step, bool) or not isinstance(target_step, int):
        try:
            value = float(target_step)
        except (TypeError, ValueError, OverflowError):
            raise RelexInputError(f"--target-step must be an integer, got {target_step!r}") from None
        if not (math.isfinite(value) and value.is_integer()):
            raise RelexInputError(f"--target-step must be an integer, got {target_step!r}")
        target_step = int(value)
    if not 1 <= target_step <= MAX_STEP:
        shown = step_text(target_step)
        raise RelexInputError(f"--target-step {shown} is not a training step: steps run from 1 to 2^63 − 1 "
                              f"({MAX_STEP})")
    return target_step


@dataclass
class GateDecision:
    """Whether the gate passes, why (one line), and the outcome it rests on."""

    passed: bool
    outcome: str  # PLAUSIBLE, HURT, BEYOND, MIXED_OUTCOME or INCONCLUSIVE
    reason: str
    strict: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_GATE

    @property
    def warning(self) -> bool:
        """Passed, but not on a drift-dominated verdict."""
        return self.passed and self.outcome != PLAUSIBLE

    @property
    def status(self) -> str:
        return "failed" if not self.passed else "passed with a warning" if self.warning else "passed"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": self.status, "exit_code": self.exit_code,
                "outcome": self.outcome, "reason": self.reason, "strict": self.strict}


def judge(diagnostics, strict: bool = False, target_step: int | None = None) -> GateDecision:
    """The gate's decision on a verdict (:class:`~relex.analysis.drift.DriftDiagnostics`, or ``None`` when
    no tensor moved). See the module docstring for the rules."""
    if target_step is None and diagnostics is not None:
        target_step = ((diagnostics.backtest or {}).get("horizon") or {}).get("target_step")
    where = (f"to step {step_text(target_step)}" if target_step is not None
             else "as far as the window backtest reached")
    if diagnostics is None:
        outcome, reason = INCONCLUSIVE, "no tensor moved over the observed window: there is nothing to extrapolate"
    else:
        backtest = diagnostics.backtest or {}
        reach = backtest.get("horizon") or {}
        beyond = reach.get("within_limit") is False
        limit = (f"step {step_text(reach.get('target_step'))} is beyond step {reach.get('max_target_step')}, the "
                 f"farthest the window backtest can vouch for") if beyond else ""
        if diagnostics.verdict == NOISE or backtest.get("line_beats_stop") is False:
            outcome, reason = HURT, f"extrapolation {where} will likely hurt"
            if beyond:
                reason += f", and {limit}"
        elif beyond:
            outcome, reason = BEYOND, limit
        elif diagnostics.verdict == DRIFT:
            outcome, reason = PLAUSIBLE, f"extrapolation {where} is plausible"
        elif "too short" in diagnostics.message:
            outcome, reason = INCONCLUSIVE, "the window is too short to tell drift from noise"
        else:
            outcome, reason = MIXED_OUTCOME, f"the verdict is mixed: {diagnostics.message.split(':')[0]}"
    if outcome in (HURT, BEYOND):
        passed = False
    elif outcome == PLAUSIBLE:
        passed = True
    else:
        passed = not strict
        reason += " (fails under --strict)" if passed else " (--strict)"
    return GateDecision(passed, outcome, reason, strict)


@dataclass
class CheckResult:
    """Everything ``relex check`` prints: the verdict, its statistics, the backtest, the gate."""

    run: str
    series: object  # relex.io.discover.CheckpointSeries
    target_step: int | None
    diagnostics: object  # DriftDiagnostics or None
    decision: GateDecision
    tensors: int = 0
    parameters: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return list(self.series.steps)

    @property
    def exit_code(self) -> int:
        return self.decision.exit_code

    def horizon(self) -> tuple[dict, str] | None:
        """How far beyond the window the target lies (the verdict's record, or computed without a backtest)."""
        backtest = (self.diagnostics.backtest if self.diagnostics is not None else None) or {}
        return horizon(self.steps, self.target_step, backtest.get("fit_steps"), backtest.get("held_out_steps"))

    def statistics(self) -> list[dict]:
        """The drift statistics beside their random-walk null and pure-drift values (as printed)."""
        if self.diagnostics is None:
            return []
        d = self.diagnostics
        return [{"statistic": label, "key": key, "observed": getattr(d.observed, key),
                 "random_walk": getattr(d.null, key), "pure_drift": getattr(d.drift, key)}
                for label, key, _ in STATISTICS]

    def reward(self) -> dict | None:
        """The training reward's trend the verdict weighed (:class:`relex.analysis.reward.RewardTrend`), or
        ``None`` when the run logged none."""
        calibration = (self.diagnostics.calibration if self.diagnostics is not None else None) or {}
        return calibration.get("reward")

    def sources(self) -> dict:
        s = self.series
        kinds = sorted({c.kind for c in s.observed})
        return {"layout": s.layout, "base": {"path": str(s.base.path), "kind": s.base.kind},
                "observed_kind": kinds[0] if len(kinds) == 1 else kinds,
                "observed": [{"step": c.step, "path": str(c.path), "kind": c.kind} for c in s.observed],
                "skipped": [{"path": str(p), "reason": r} for p, r in s.skipped]}

    def to_dict(self) -> dict:
        from relex import __version__

        d = self.diagnostics
        reach = self.horizon()
        return _finite({
            "format": "relex-check/1",
            "relex_version": __version__,
            "run": self.run,
            "target_step": self.target_step,
            "steps": self.steps,
            "gate": self.decision.to_dict(),
            "verdict": None if d is None else d.verdict,
            "message": None if d is None else d.message,
            "drift_share": None if d is None else d.drift_share,
            "thresholds": {"drift_dominated": DRIFT_THRESHOLD, "noise_dominated": NOISE_THRESHOLD,
                           "max_carry": MAX_CARRY},
            "statistics": self.statistics(),
            "backtest": None if d is None else d.backtest,
            "horizon": None if reach is None else {**reach[0], "text": reach[1]},
            "reward": self.reward(),
            "diagnostics": None if d is None else d.to_dict(),
            "sources": self.sources(),
            "tensors": self.tensors,
            "parameters": self.parameters,
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            **self.extra,
        })

    def write_json(self, path: str | Path) -> Path:
        return write_json(self.to_dict(), path)

    def markdown(self, title: str = "relex check", notes: Sequence[str] = ()) -> str:
        """A Markdown summary: the verdict first, then the figures behind it, in tables."""
        return verdict_markdown(self, title, notes)


def check(run_dir: str | Path | None = None, *, target_step: int | None = None, strict: bool = False,
          base: str | Path | None = None, steps: str | Sequence[int] | None = None, max_step: int | None = None,
          checkpoints: Iterable[tuple[int, str | Path]] | None = None, device: str = "auto",
          allow_pickle: bool = False, progress=None, run_label: str | None = None,
          allow_interpolation: bool = False, rewards: str | Path | None = "auto", reward_key: str = "reward",
          reward_max: float = 1.0) -> CheckResult:
    """Read a run once (nothing is written) and judge whether extrapolating it to ``target_step`` is
    plausible; same inputs as :func:`relex.engine.collect_grams`. Without ``target_step`` (or, with
    ``allow_interpolation``, a target inside the window) the window alone is judged: as far as its backtest
    reached. ``rewards`` says where the training reward's trend comes from (:mod:`relex.analysis.reward`):
    ``"auto"`` the ``trainer_state.json`` of the last observed checkpoint when it logs ``reward_key`` (else
    the weights alone), a file (``trainer_state.json`` or JSON Lines; it must log ``reward_key`` at 4 steps or
    more inside the observed window), or ``None``
    (the weights alone); ``reward_max`` is the reward's ceiling. Raises :class:`RelexInputError` on bad input,
    including a target not beyond the last observed step without ``allow_interpolation``."""
    from relex.analysis.reward import MIN_POINTS, checkpoint_reward_trend, read_reward_log, reward_trend
    from relex.analysis.verdict import run_verdict
    from relex.engine import collect_grams

    started = time.perf_counter()
    if target_step is not None:
        target_step = check_target_step(target_step)
    if not math.isfinite(reward_max):
        raise RelexInputError(f"--reward-max must be a finite number, got {reward_max}")
    log = None if rewards in (None, "auto") else read_reward_log(rewards, reward_key)  # before reading the run
    grams = collect_grams(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints,
                          device=device, allow_pickle=allow_pickle, progress=progress)
    observed = grams.steps
    beyond = target_step  # the target the verdict carries the backtest to
    if target_step is not None and target_step <= observed[-1]:
        if not allow_interpolation:
            raise RelexInputError(f"target step {target_step} is not beyond the last observed step {observed[-1]} "
                                  "(pass --allow-interpolation to judge the window alone)")
        beyond = None
    ndims = {name: len(grams.shapes[name]) for name in grams.grams}
    if rewards == "auto":
        reward = checkpoint_reward_trend(grams.series.observed[-1].path, observed, beyond, reward_key, reward_max)
    else:
        reward = None if log is None else reward_trend(log, observed, beyond, reward_max)
        if log is not None and reward is None:  # a file the user named must weigh in, or say why not
            inside = sum(observed[0] < s <= observed[-1] for s in log.steps)
            raise RelexInputError(f"{log.source}: {inside} rewards logged under {log.key!r} after step "
                                  f"{observed[0]} up to step {observed[-1]} (the observed window); the trend needs "
                                  f"at least {MIN_POINTS}")
    diagnostics = run_verdict(grams.grams, ndims, observed, beyond, reward=reward)
    parameters = sum(math.prod(grams.shapes[name]) for name in grams.grams)
    return CheckResult(run=run_label if run_label is not None else str(run_dir), series=grams.series,
                       target_step=target_step, diagnostics=diagnostics,
                       decision=judge(diagnostics, strict, beyond), tensors=len(grams.grams),
                       parameters=parameters, seconds=time.perf_counter() - started, bytes_read=grams.bytes_read)


# ------------------------------------------------------------------ Markdown


def md(text) -> str:
    """Text safe inside a Markdown table cell."""
    text = str(text).replace("\n", " ")
    for char in ("\\", "|", "*", "_", "`", "<", ">", "[", "]"):
        text = text.replace(char, "\\" + char)
    return text


def code(text) -> str:
    """Text (a path, a command) as a Markdown code span, safe inside a table cell."""
    text = str(text).replace("\n", " ").replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}" if fence == "`" else f"{fence} {text} {fence}"


def table(header: Sequence[str], rows: Iterable[Sequence], align: Sequence[str] | None = None) -> str:
    """A Markdown table; cells are written as given (escape them with :func:`md`)."""
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


ICONS = {"passed": "✅", "passed with a warning": "⚠️", "failed": "❌", "not required": "ℹ️"}


def _number(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and value == value else "n/a"


def verdict_markdown(result: CheckResult, title: str = "relex check", notes: Sequence[str] = (),
                     gate: bool = True) -> str:
    """The summary of a verdict: a headline with the gate's status, the verdict and the figures behind it
    in one table, then the drift statistics beside their nulls. ``notes`` are more rows, ``(label,
    Markdown)``. ``gate=False`` reports the verdict without a gate (``relex extrapolate`` without
    ``--require``)."""
    d, decision = result.diagnostics, result.decision
    status = decision.status if gate else "not required"
    if gate:
        headline = f"### {ICONS[status]} {title}: {md(decision.reason)}"
    else:
        headline = f"### {title}: verdict {md(d.verdict) if d is not None else 'none'}"
    rows = []
    if d is None:
        rows.append(("**verdict**", "none: no tensor moved over the observed window"))
    else:
        rows.append(("**verdict**", f"**{md(d.verdict)}**"))
        rows.append(("why", md(d.message)))
    if gate:
        rows.append(("gate", f"{status} (exit {decision.exit_code}){' · strict' if decision.strict else ''}"))
    if d is not None:
        rows.append(("drift share", f"{d.drift_share:.2f} (drift-dominated ≥ {DRIFT_THRESHOLD:.2f}, "
                                    f"noise-dominated < {NOISE_THRESHOLD:.2f})"
                     if d.drift_share == d.drift_share else "n/a"))
    reach = result.horizon()
    if reach is not None:
        record, text = reach
        rows.append(("target", md(text[0].upper() + text[1:])))
        if "max_target_step" in record:
            rows.append(("horizon limit", f"step {record['max_target_step']} "
                                          f"({_number(record['max_ratio'], '{:.3g}')}× the window: "
                                          f"{MAX_CARRY:g}× the backtest's own horizon)"))
    backtest = (d.backtest if d is not None else None) or {}
    if backtest:
        rows.append(("window backtest", f"a line fitted up to step {backtest['fit_steps'][-1]} predicted step "
                                        f"{backtest['held_out_steps'][-1]}: weight error "
                                        f"{_number(backtest['line_error'], '{:.2f}')}, stopping "
                                        f"{_number(backtest['stop_error'], '{:.2f}')}"))
        if "projected_line_error" in backtest:
            rows.append((f"carried to step {md(step_text(result.target_step))}",
                         f"line {_error(backtest['projected_line_error'])}, stopping "
                         f"{_number(backtest['projected_stop_error'], '{:.2f}')} "
                         f"({'line wins' if backtest.get('line_beats_stop') else 'stopping wins'})"))
    elif d is not None:
        rows.append(("window backtest", "none: fewer than 4 checkpoints in the window"))
    reward = result.reward()
    if reward is not None:
        rows.append(("training reward", md(reward["text"])))
    steps = result.steps
    rows.append(("run", f"{code(result.run)} · {len(steps)} checkpoints, steps "
                        f"{steps[0]}..{steps[-1]} · {result.tensors} tensors, {result.parameters:,} parameters"))
    rows += [(md(k), v) for k, v in notes]  # values are Markdown already
    parts = [headline, "", table(list(rows[0]), rows[1:])]  # the verdict heads the table
    if d is not None:
        stats = [(md(s["statistic"]), _number(s["observed"], fmt), _number(s["random_walk"], fmt),
                  _number(s["pure_drift"], fmt))
                 for s, (_, _, fmt) in zip(result.statistics(), STATISTICS)]
        parts += ["", table(["drift statistic", "observed", "random walk", "pure drift"], stats,
                            ["---", "--:", "--:", "--:"])]
    return "\n".join(parts) + "\n"


def _error(value) -> str:
    if not isinstance(value, (int, float)) or value != value:
        return "n/a"
    if not math.isfinite(value):
        return "∞"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2g}"


def eval_markdown(results, gate=None, title: str = "relex eval") -> str:
    """The summary of ``relex eval``: accuracy of every checkpoint and its difference to the first, per
    task and mean, headed by the ``--fail-if-worse`` gate's status when there is one."""
    from relex.evaluate.results import format_difference

    if gate is None:
        headline = f"### {title}"
    else:
        status = "passed" if gate.passed else "failed"
        headline = f"### {ICONS[status]} {title}: {md(gate.reason())}"
    tasks = list(results.tasks)
    columns = tasks + (["mean"] if len(tasks) > 1 else [])
    header = ["checkpoint"] + [md(task) for task in columns]
    if gate is not None:
        header.append("gate")
    rows = []
    judged = {c.label: c for c in gate.checkpoints} if gate is not None else {}
    for index, label in enumerate(results.labels):
        row = [md(label) + (" (baseline)" if index == 0 and len(results.labels) > 1 else "")]
        for task in columns:
            if task == "mean":
                value = results.data["mean"]["accuracy"].get(label)
            else:
                entry = results.data["tasks"][task]["results"].get(label)
                value = entry["summary"]["accuracy"] if entry else None
            cell = "–" if value is None or value != value else f"{100 * value:.1f}"
            difference = results.difference(task, label)
            if difference:
                cell += f" ({md(format_difference(difference))})"
            row.append(cell)
        if gate is not None:
            row.append("baseline" if index == 0 else "❌ worse" if judged[label].worse else "ok")
        rows.append(row)
    parts = [headline, "", table(header, rows, ["---"] + ["--:"] * (len(header) - 1))]
    confidence = next((d.get("confidence") for task in columns for label in results.labels[1:]
                       if (d := results.difference(task, label))), None)
    settings = results.settings
    metric = f"avg@{settings.get('samples', 1)}"
    note = f"accuracy in % ({metric})"
    if confidence:
        note += (f"; in brackets: difference to {md(results.labels[0])} in points, "
                 f"[{100 * confidence:.0f}% paired-bootstrap interval over problems]")
    if gate is not None:
        note += (f". Gate: a checkpoint fails when the upper end of its interval on "
                 f"{'the mean over tasks' if gate.judged == 'mean' else md(gate.judged)} is below "
                 f"−{100 * gate.margin:g} points")
    parts += ["", note + "."]
    return "\n".join(parts) + "\n"


def write_summary(markdown: str, path: str | Path | None = None) -> list[Path]:
    """Write ``markdown`` to ``path`` (if given) and append it to ``$GITHUB_STEP_SUMMARY`` (if set, and not
    the same file). Returns the files written."""
    written = []
    if path is not None:
        path = Path(path)
        _check_parent(path)
        path.write_text(markdown, encoding="utf-8")
        written.append(path)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        target = Path(step_summary)
        if path is None or target.resolve() != path.resolve():
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(markdown + "\n")
            written.append(target)
    return written


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    _check_parent(path)
    path.write_text(json.dumps(_finite(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _check_parent(path: Path) -> None:
    if not path.parent.is_dir():
        raise RelexInputError("folder does not exist", path.parent)


def _finite(value):
    """JSON has no NaN or infinity: ``None`` instead; numpy scalars as Python numbers."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            value = value.item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
