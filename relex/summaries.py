"""Markdown summaries: the verdict, with the gate's decision when there is one, and the cells they are made of.

``relex check`` and ``relex extrapolate`` write one to ``--summary FILE`` (``relex eval`` its own, made of the
same cells: :mod:`relex.evaluate.summary`), and append it to ``$GITHUB_STEP_SUMMARY`` in a GitHub Actions job
(:func:`write_summary`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from relex.analysis.verdict import DRIFT_THRESHOLD, MAX_CARRY, NOISE_THRESHOLD
from relex.analysis.wording import error_text, horizon_text, step_text
from relex.io.staging import check_output_file

# The drift statistics as printed, beside their random-walk and pure-drift values: (label, key, format).
STATISTICS = (
    ("growth exponent α", "alpha", "{:.2f}"),
    ("drift ratio ‖Δ_T‖²/Σ‖step‖²", "drift_ratio", "{:.1f}"),
    ("cos(first, last delta)", "cos_first_last", "{:.2f}"),
    ("cos(prefix direction, direction)", "prefix_cos", "{:.2f}"),
    ("rank-1 explained variance", "explained_rank1", "{:.3f}"),
    ("R² of rank-1 coefficient", "r2_rank1", "{:.3f}"),
)


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


def number(value, fmt: str) -> str:
    """``value`` formatted, or n/a when it is not a finite number."""
    return fmt.format(value) if isinstance(value, (int, float)) and value == value else "n/a"


def verdict_markdown(verdict, *, run: str, steps: Sequence[int], tensors: int, parameters: int,
                     title: str = "relex check", decision=None, notes: Sequence[tuple[str, str]] = (),
                     probe: dict | None = None) -> str:
    """The summary of a verdict (:class:`relex.analysis.verdict.Verdict`): a headline with the gate's status, the
    verdict and the figures behind it in one table, then the drift statistics beside their nulls. ``decision``
    is the gate's (None: the verdict is reported without a gate, as ``relex extrapolate`` without
    ``--require`` does); ``notes`` are more rows, ``(label, Markdown)``; ``probe``: the probe's curve
    (:meth:`relex.probe.search.ProbeCurve.to_dict`) when a probe decided, shown after the table, the weights'
    verdict then reported beside it."""
    d = verdict.diagnostics
    status = decision.status if decision is not None else "not required"
    if decision is not None:
        headline = f"### {ICONS[status]} {title}: {md(decision.reason)}"
    else:
        headline = f"### {title}: verdict {md(verdict.drift_class) if d is not None else 'none'}"
    rows = []
    if d is None:
        rows.append(("**verdict**", "none: no tensor moved over the observed window"))
    else:
        label = "**weights' verdict**" if probe is not None else "**verdict**"
        rows.append((label, f"**{md(verdict.drift_class)}**"))
        rows.append(("why", md(verdict.message)))
    if decision is not None:
        rows.append(("gate", f"{status} (exit {decision.exit_code}){' · lenient' if decision.lenient else ''}"
                             f"{' · decided by the probe' if probe is not None else ''}"))
    if d is not None:
        rows.append(("drift share", f"{d.drift_share:.2f} (drift-dominated ≥ {DRIFT_THRESHOLD:.2f}, "
                                    f"noise-dominated < {NOISE_THRESHOLD:.2f})"
                     if d.drift_share == d.drift_share else "n/a"))
    reach = verdict.horizon
    if reach is not None:
        text = horizon_text(reach)
        rows.append(("target", md(text[0].upper() + text[1:])))
        if "max_target_step" in reach:
            rows.append(("horizon limit", f"step {reach['max_target_step']} "
                                          f"({number(reach['max_ratio'], '{:.3g}')}× the window: "
                                          f"{MAX_CARRY:g}× the backtest's own horizon)"))
    backtest = verdict.backtest or {}
    if backtest:
        rows.append(("window backtest", f"a line fitted up to step {backtest['fit_steps'][-1]} predicted step "
                                        f"{backtest['held_out_steps'][-1]}: weight error "
                                        f"{number(backtest['line_error'], '{:.2f}')}, stopping "
                                        f"{number(backtest['stop_error'], '{:.2f}')}"))
        if "projected_line_error" in backtest:
            rows.append((f"carried to step {md(step_text(verdict.target_step))}",
                         f"line {error_text(backtest['projected_line_error'])}, stopping "
                         f"{number(backtest['projected_stop_error'], '{:.2f}')} "
                         f"({'line wins' if backtest.get('line_beats_stop') else 'stopping wins'})"))
    elif d is not None:
        rows.append(("window backtest", "none: fewer than 4 checkpoints in the window"))
    if verdict.reward is not None:
        rows.append(("training reward", md(verdict.reward.text())))
    rows.append(("run", f"{code(run)} · {len(steps)} checkpoints, steps "
                        f"{steps[0]}..{steps[-1]} · {tensors} tensors, {parameters:,} parameters"))
    rows += [(md(k), v) for k, v in notes]  # values are Markdown already
    parts = [headline, "", table(list(rows[0]), rows[1:])]  # the verdict heads the table
    if probe is not None:  # what decided comes before the drift statistics
        parts += ["", probe_table(probe)]
    if d is not None:
        stats = [(md(label), number(getattr(d.observed, key), fmt), number(getattr(d.null, key), fmt),
                  number(getattr(d.drift, key), fmt)) for label, key, fmt in STATISTICS]
        parts += ["", table(["drift statistic", "observed", "random walk", "pure drift"], stats,
                            ["---", "--:", "--:", "--:"])]
    return "\n".join(parts) + "\n"


def probe_table(curve: dict) -> str:
    """The probe's curve (a :meth:`relex.probe.search.ProbeCurve.to_dict`) as a Markdown table: the last observed
    checkpoint, then each candidate with its paired difference, interval and decision; the cost below."""
    info = curve["probe"]
    rows = [(f"last observed (step {curve['reference_step']})", number(curve["reference_mean"], "{:.3f}"),
             str(curve["reference_problems"]), "", "reference")]
    for c in curve["candidates"]:
        d = c["difference"]
        chosen = " · **chosen**" if c["step"] == curve["chosen"] else ""
        rows.append((f"step {c['step']}", number(c["mean"], "{:.3f}"), str(c["problems"]),
                     f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]" if d else "n/a",
                     f"{c['decision']}{chosen}"))
    head = (f"**probe** {code(info['name'])} ({curve['mode']}, {info['problems']} problems, confidence "
            f"{curve['confidence']:g}): {curve['tokens']:,} forward tokens, {curve['seconds']:.1f} s")
    return head + "\n\n" + table(["checkpoint", "probe", "problems", "difference [interval]", "decision"], rows,
                                  ["---", "--:", "--:", "--:", "---"])


def write_summary(markdown: str, path: str | Path | None = None) -> list[Path]:
    """Write ``markdown`` to ``path`` (if given) and append it to ``$GITHUB_STEP_SUMMARY`` (if set, and not
    the same file). Returns the files written."""
    written = []
    if path is not None:
        path = Path(path)
        check_output_file(path)
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

