"""The command line's output: progress bars for :class:`relex.progress.Progress` events, the verdict, the gate."""

from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

GATE = "Gate"
SummaryOption = Annotated[Optional[Path], typer.Option("--summary", help="Write a Markdown summary (the verdict first) to this file; in a GitHub Actions job it is also appended to $GITHUB_STEP_SUMMARY.", rich_help_panel=GATE, show_default=False)]
QuietOption = Annotated[bool, typer.Option("--quiet", help="Print only errors (and warnings about the output).", rich_help_panel="Output")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Print the plan (checkpoints, passes, outputs, memory) and stop: nothing is read or written.", rich_help_panel="Output")]

VERDICT_STYLE = {"drift-dominated": "bold green", "mixed": "bold yellow", "noise-dominated": "bold red"}
def rank_zero() -> bool:
    """This process prints and writes reports: always, except on ranks other than 0 of a torchrun launch."""
    return os.environ.get("RANK", "0") in ("", "0")


def _amount(event) -> str:
    if event.unit == "B":
        return decimal(int(event.done)) + (f"/{decimal(int(event.total))}" if event.total else "")
    return f"{event.done:g}" + (f"/{event.total:g}" if event.total else "")


class ProgressLines:
    """Progress events as plain lines on stderr, where there is no terminal to draw bars on (a log file, a CI
    job): a task's first line once it has run ``after`` seconds, then one every ``every`` seconds, and one when it
    ends if it printed any. Work shorter than ``after`` prints nothing, as with bars that go away."""

    def __init__(self, after: float = 10.0, every: float = 30.0):
        self.after, self.every = after, every
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}

    def __call__(self, event) -> None:
        now = time.monotonic()
        started = self.started.setdefault(event.task, now)
        finished = event.total is not None and event.done >= event.total
        last = self.printed.get(event.task)
        due = now - started >= self.after if last is None else now - last >= self.every
        if not (due or (finished and last is not None)):
            return
        self.printed[event.task] = now
        item = f" ({event.item})" if event.item and not finished else ""
        err_console.print(f"{event.task}: {_amount(event)}, {now - started:.0f} s{item}", highlight=False,
                          markup=False, soft_wrap=True)
        if finished:  # a task of the same name later starts anew
            del self.started[event.task], self.printed[event.task]

    def pause(self) -> None:
        """Nothing to take away (lines stay where they are)."""


@contextmanager
def progress_bars(disable: bool = False):
    """Rich progress bars, one per task, for the :class:`relex.progress.Progress` events of the work inside;
    plain lines (:class:`ProgressLines`) when stderr is not a terminal.

    A bar appears at its task's first event, so input errors found before any work print one line only; bars go
    away when the work ends (the summary that follows reports time and bytes), or when ``report.pause()`` is
    called before printing a line.
    """
    if not disable and rank_zero() and not err_console.is_terminal:
        yield ProgressLines()
        return
    columns = (TextColumn("[bold]{task.description}[/bold]"), BarColumn(), TextColumn("{task.fields[amount]}"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[item]}", style="dim"))
    bars = Progress(*columns, console=err_console, disable=disable or not rank_zero(), transient=True)
    tasks: dict[str, int] = {}

    def report(event) -> None:
        if event.task not in tasks:
            if not tasks:
                bars.start()
            tasks[event.task] = bars.add_task(event.task, total=event.total, amount="", item="")
        bars.update(tasks[event.task], completed=event.done, total=event.total, amount=_amount(event),
                    item=event.item)

    def pause() -> None:
        """Take the bars away (before printing a line); the next event draws them again."""
        if tasks:
            bars.stop()
            for task in tasks.values():
                bars.remove_task(task)
            tasks.clear()

    report.pause = pause
    try:
        yield report
    finally:
        pause()


def print_plan(plan, probe: str = "") -> None:
    """The plan of a pass (``--dry-run``), and what a probe will do after it."""
    console.print(plan.text(), highlight=False)
    if probe:
        console.print(probe, highlight=False)
    console.print("[dim]--dry-run: nothing was read or written[/dim]")


def print_sources(series, sources: dict | None = None) -> None:
    """How the checkpoints were read, and the folders that looked like checkpoints but were skipped."""
    if sources is not None:
        kind = sources.get("observed_kind")
        kinds = kind if isinstance(kind, str) else ", ".join(kind)
        console.print(f"read {len(series.observed)} checkpoints as {kinds} over the base "
                      f"{series.base.path} ({sources['base']['kind']})")
    for folder, reason in series.skipped:
        console.print(f"[dim]skipped {folder}: {reason}[/dim]")


def print_verdict(verdict, series=None) -> None:
    """The drift statistics beside their random-walk null and pure-drift values, the verdict, its backtest.

    With the ``series``, a window too short for a verdict also says which trainer setting keeps more
    checkpoints."""
    diagnostics = verdict.diagnostics
    if diagnostics is None:
        console.print(f"verdict: [bold]{verdict.message}[/bold]")
        return
    from relex.analysis.outcomes import Finding  # start-up: the analysis loads once a command has a verdict
    from relex.summaries import STATISTICS

    table = Table(title="drift diagnostics (whole model)", show_header=True)
    table.add_column("statistic")
    for column in ("observed", "random walk", "pure drift"):
        table.add_column(column, justify="right")
    for label, key, fmt in STATISTICS:
        values = [getattr(s, key) for s in (diagnostics.observed, diagnostics.null, diagnostics.drift)]
        table.add_row(label, *[fmt.format(v) if v == v else "n/a" for v in values])
    console.print(table)
    style = VERDICT_STYLE.get(verdict.drift_class, "bold")
    console.print(f"verdict: [{style}]{verdict.message}[/{style}] "
                  f"(fitted drift share of the last delta: {verdict.drift_share:.2f})")
    if series is not None and verdict.finding == Finding.TOO_SHORT:
        console.print(f"hint: {series.retention_hint()}")
    if verdict.reward is not None:
        console.print(verdict.reward.text())


def print_check(verdict) -> None:
    """The window backtest carried to the target, and how far the target lies beyond the window."""
    from relex.analysis.wording import error_text, horizon_text

    backtest = verdict.backtest or {}
    if backtest:
        line = (f"window backtest: a line fitted up to step {backtest['fit_steps'][-1]} predicted step "
                f"{backtest['held_out_steps'][-1]} with weight error {backtest['line_error']:.2f}, stopping "
                f"{backtest['stop_error']:.2f}")
        if "projected_line_error" in backtest:
            line += (f"; carried to step {verdict.target_step}: {error_text(backtest['projected_line_error'])} "
                     f"against {backtest['projected_stop_error']:.2f}")
        console.print(line)
    reach = verdict.horizon
    if reach is not None:
        limit = (f"; the backtest vouches for up to step {reach['max_target_step']}"
                 if reach.get("within_limit") else "")
        console.print(f"horizon: {horizon_text(reach)}{limit}")


def print_gate(decision, title: str = "relex check") -> None:
    """The gate's status line; in a GitHub Actions job also an annotation on the run page."""
    style = "bold green" if decision.passed and not decision.warning else "bold yellow" if decision.passed else "bold red"
    console.print(f"gate: [{style}]{decision.status}[/{style}] (exit {decision.exit_code}): {decision.reason}")
    if os.environ.get("GITHUB_ACTIONS") == "true" and (decision.warning or not decision.passed):
        level = "warning" if decision.passed else "error"
        print(f"::{level} title={title}::{decision.reason}", flush=True)


def print_selection(selection: dict | None, tensor_stats=()) -> None:
    """The backtest behind automatic choices: one row per candidate (run), per group, or counts (tensor)."""
    if not selection:
        return
    held = selection["held_out_steps"]
    title = (f"backtest: fit on steps ≤ {selection['fit_steps'][-1]:g}, predict {', '.join(f'{s:g}' for s in held)}"
             f" — relative weight error at step {held[-1]:g}")
    decisions = selection.get("decisions")
    if selection["scope"] == "tensor" or not decisions:
        counts = Counter((s.get("regressor"), s.get("scale")) for s in tensor_stats
                         if s.get("regressor") is not None and "auto" in s)
        table = Table(title=title + " (chosen per tensor)")
        for column, justify in (("predictor", "left"), ("scale", "right"), ("tensors", "right")):
            table.add_column(column, justify=justify)
        for (name, scale), n in counts.most_common():
            table.add_row(str(name), f"{scale:.3g}" if isinstance(scale, float) else str(scale), str(n))
        console.print(table)
        return
    if selection["scope"] == "run" and len(decisions) == 1:
        (decision,) = decisions.values()
        table = Table(title=title)
        for column, justify in (("predictor", "left"), ("error", "right"), ("scale", "right"), ("", "left")):
            table.add_column(column, justify=justify)
        for name, figures in decision["errors"].items():
            chosen = "[bold green]chosen[/bold green]" if name == decision["regressor"] else ""
            error = figures["error"]
            table.add_row(name, f"{error:.4f}" if error == error and error != float("inf") else "n/a",
                          f"{figures.get('scale', 1.0):.3g}", chosen)
            if chosen and "auto_scale" in figures:
                table.add_row(f"{name} (scale auto)", f"{figures['auto_scale']['error']:.4f}",
                              f"{figures['auto_scale']['scale']:.3g}", "[bold green]chosen[/bold green]")
        console.print(table)
        return
    table = Table(title=title + " (per group)")
    for column, justify in (("group", "left"), ("chosen", "left"), ("error", "right"), ("scale", "right")):
        table.add_column(column, justify=justify)
    for key, decision in decisions.items():
        error = decision["errors"][decision["regressor"]]["error"]
        table.add_row(key, decision["regressor"], f"{error:.4f}", f"{decision['scale']:.3g}")
    console.print(table)


def check_output_files(*paths: Optional[Path]) -> None:
    """Refuse, before any work, an output file that cannot be written (:func:`relex.io.staging.check_output_file`)."""
    from relex.io.staging import check_output_file

    for path in paths:
        check_output_file(path)
