"""Shared console output of the command line: progress bars, the drift verdict."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

INPUT = "Input"

# Options every command that reads a run shares.
# RUN_DIR and --base are strings: a Path would collapse the // of a Hub run (hf://ORG/REPO).
RunDirArgument = Annotated[str, typer.Argument(help="Run folder holding checkpoint-N/, global_step_N/ or step_N/ folders, or a Hub run hf://ORG/REPO[@REVISION] (see --revision-pattern, --subfolder-pattern).", show_default=False)]
BaseOption = Annotated[Optional[str], typer.Option(help="Base (step-0) checkpoint: a folder or a Hub id ORG/NAME, if not the run's own step-0 checkpoint.", rich_help_panel=INPUT)]
StepsOption = Annotated[Optional[str], typer.Option(help="Observed steps to use, e.g. 10,20,30, 1-75 or 10-100:10 (default: all).", rich_help_panel=INPUT)]
MaxStepOption = Annotated[Optional[int], typer.Option(help="Use observed steps up to this one.", rich_help_panel=INPUT)]
RevisionPatternOption = Annotated[str, typer.Option(help="Hub runs: the branches (or tags) holding the checkpoints, {N} the step, e.g. step_{N} or step-{N:04d}.", rich_help_panel=INPUT)]
SubfolderPatternOption = Annotated[Optional[str], typer.Option(help="Hub runs: read the checkpoints from folders of one revision (main, or hf://ORG/REPO@REVISION) named so, e.g. step-{N:04d}, instead of from branches.", rich_help_panel=INPUT, show_default=False)]

console = Console()
err_console = Console(stderr=True)


def rank_zero() -> bool:
    """This process prints and writes reports: always, except on ranks other than 0 of a torchrun launch."""
    return os.environ.get("RANK", "0") in ("", "0")


VERDICT_STYLE = {"drift-dominated": "bold green", "mixed": "bold yellow", "noise-dominated": "bold red"}


@contextmanager
def byte_progress(disable: bool = False, label: str = "working"):
    """A rich progress bar over bytes read; yields the ``progress(name, done, total)`` callback.

    The bar appears at the first update, so input errors found before any reading print one line only.
    """
    bar = Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=err_console,
        disable=disable,
        transient=True,  # the summary that follows reports time and bytes
    )
    task = None

    def update(name: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total, tensor="")
        bar.update(task, completed=done, total=total, tensor=name)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def resolve_run(run_dir: str, steps: Optional[str], revision_pattern: str = "step_{N}",
                subfolder_pattern: Optional[str] = None, progress=None, *, base: Optional[str] = None,
                max_step: Optional[int] = None) -> dict:
    """The keyword arguments naming a run for the engine: ``run_dir``, ``checkpoints``, ``base``, ``steps``.

    A local folder gives ``{"run_dir": Path(run_dir), ...}``. A Hub run ``hf://ORG/REPO[@REVISION]`` is
    fetched into the Hugging Face cache (only weights, config and tokenizer; offline from the cache alone)
    and gives ``{"run_dir": None, "checkpoints": [(step, folder), ...], "steps": None, ...}``, its steps
    already chosen by ``steps`` and ``max_step``. A ``base`` given as a Hub id (``ORG/NAME`` or
    ``hf://ORG/NAME[@REVISION]``) is fetched the same way. ``progress(name, done, total)`` gets the bytes
    downloaded.
    """
    from relex.errors import RelexInputError
    from relex.io import hub

    local = hub.parse_hub_run(run_dir) is None
    if local:
        if subfolder_pattern is not None or revision_pattern != hub.DEFAULT_REVISION_PATTERN:
            raise RelexInputError("--revision-pattern and --subfolder-pattern apply to Hub runs (hf://ORG/REPO) only")
        if not Path(run_dir).is_dir():  # before fetching a Hub base for nothing
            raise RelexInputError("run folder does not exist or is not a folder", run_dir)
        run = {"run_dir": Path(run_dir), "steps": steps}
    else:
        checkpoints = hub.resolve_hub_run(run_dir, steps, revision_pattern=revision_pattern,
                                          subfolder_pattern=subfolder_pattern, progress=progress,
                                          max_step=max_step, include_base=base is None)
        run = {"run_dir": None, "checkpoints": checkpoints, "steps": None}
    if base is not None and (hub.parse_hub_run(base) is not None or hub.is_hub_id(base)):
        run["base"] = hub.resolve_model(base, progress=progress)
    else:
        run["base"] = None if base is None else Path(base)
    return run


def print_sources(series, sources: dict | None = None) -> None:
    """How the checkpoints were read, and the folders that looked like checkpoints but were skipped."""
    if sources is not None:
        kind = sources.get("observed_kind")
        kinds = kind if isinstance(kind, str) else ", ".join(kind)
        console.print(f"read {len(series.observed)} checkpoints as {kinds} over the base "
                      f"{series.base.path} ({sources['base']['kind']})")
    for folder, reason in series.skipped:
        console.print(f"[dim]skipped {folder}: {reason}[/dim]")


def print_diagnostics(diagnostics, series=None) -> None:
    """The drift statistics beside their random-walk null and pure-drift values, then the verdict.

    With the ``series``, a window too short for a verdict also says which trainer setting keeps more
    checkpoints."""
    table = Table(title="drift diagnostics (whole model)", show_header=True)
    table.add_column("statistic")
    table.add_column("observed", justify="right")
    table.add_column("random walk", justify="right")
    table.add_column("pure drift", justify="right")
    from relex.gate import STATISTICS

    for label, key, fmt in STATISTICS:
        values = [getattr(s, key) for s in (diagnostics.observed, diagnostics.null, diagnostics.drift)]
        table.add_row(label, *[fmt.format(v) if v == v else "n/a" for v in values])
    console.print(table)
    style = VERDICT_STYLE.get(diagnostics.verdict, "bold")
    console.print(f"verdict: [{style}]{diagnostics.message}[/{style}] "
                  f"(fitted drift share of the last delta: {diagnostics.drift_share:.2f})")
    if series is not None and "too short" in diagnostics.message:
        console.print(f"hint: {series.retention_hint()}")
    reward = (diagnostics.calibration or {}).get("reward")
    if reward is not None:
        console.print(reward["text"])


# Options of the commands that gate (check, extrapolate --require, eval --fail-if-worse).
GATE = "Gate"
SummaryOption = Annotated[Optional[Path], typer.Option("--summary", help="Write a Markdown summary (the verdict first) to this file; in a GitHub Actions job it is also appended to $GITHUB_STEP_SUMMARY.", rich_help_panel=GATE, show_default=False)]


def check_output_files(*paths: Optional[Path]) -> None:
    """Refuse, before any work, an output file whose folder does not exist."""
    from relex.errors import RelexInputError

    for path in paths:
        if path is not None and not Path(path).parent.is_dir():
            raise RelexInputError("folder does not exist", Path(path).parent)


def print_check(result) -> None:
    """The window backtest carried to the target, how far the target lies beyond the window, the gate."""
    reach = result.horizon()
    backtest = (result.diagnostics.backtest if result.diagnostics is not None else None) or {}
    if backtest:
        line = (f"window backtest: a line fitted up to step {backtest['fit_steps'][-1]} predicted step "
                f"{backtest['held_out_steps'][-1]} with weight error {backtest['line_error']:.2f}, stopping "
                f"{backtest['stop_error']:.2f}")
        if "projected_line_error" in backtest:
            from relex.gate import _error

            line += (f"; carried to step {result.target_step}: {_error(backtest['projected_line_error'])} "
                     f"against {backtest['projected_stop_error']:.2f}")
        console.print(line)
    if reach is not None:
        record, text = reach
        limit = (f"; the backtest vouches for up to step {record['max_target_step']}"
                 if "max_target_step" in record and record["within_limit"] else "")
        console.print(f"horizon: {text}{limit}")
    print_gate(result.decision)


def print_gate(decision, title: str = "relex check") -> None:
    """The gate's status line; in a GitHub Actions job also an annotation on the run page."""
    import os

    style = "bold green" if decision.passed and not decision.warning else "bold yellow" if decision.passed else "bold red"
    console.print(f"gate: [{style}]{decision.status}[/{style}] (exit {decision.exit_code}): {decision.reason}")
    if os.environ.get("GITHUB_ACTIONS") == "true" and (decision.warning or not decision.passed):
        level = "warning" if decision.passed else "error"
        print(f"::{level} title={title}::{decision.reason}", flush=True)
