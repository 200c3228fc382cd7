"""Shared console output of the command line: progress bars, the drift verdict."""

from __future__ import annotations

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
RunDirArgument = Annotated[Path, typer.Argument(help="Run folder holding checkpoint-N/, global_step_N/ or step_N/ folders.", show_default=False)]
BaseOption = Annotated[Optional[Path], typer.Option(help="Base (step-0) checkpoint, if not the run's own step-0 folder.", rich_help_panel=INPUT)]
StepsOption = Annotated[Optional[str], typer.Option(help="Observed steps to use, e.g. 10,20,30 (default: all).", rich_help_panel=INPUT)]
MaxStepOption = Annotated[Optional[int], typer.Option(help="Use observed steps up to this one.", rich_help_panel=INPUT)]

console = Console()
err_console = Console(stderr=True)

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


def print_diagnostics(diagnostics) -> None:
    """The drift statistics beside their random-walk null and pure-drift values, then the verdict."""
    table = Table(title="drift diagnostics (whole model)", show_header=True)
    table.add_column("statistic")
    table.add_column("observed", justify="right")
    table.add_column("random walk", justify="right")
    table.add_column("pure drift", justify="right")
    rows = [
        ("growth exponent α", "alpha", "{:.2f}"),
        ("drift ratio ‖Δ_T‖²/Σ‖step‖²", "drift_ratio", "{:.1f}"),
        ("cos(first, last delta)", "cos_first_last", "{:.2f}"),
        ("cos(prefix direction, direction)", "prefix_cos", "{:.2f}"),
        ("rank-1 explained variance", "explained_rank1", "{:.3f}"),
        ("R² of rank-1 coefficient", "r2_rank1", "{:.3f}"),
    ]
    for label, key, fmt in rows:
        values = [getattr(s, key) for s in (diagnostics.observed, diagnostics.null, diagnostics.drift)]
        table.add_row(label, *[fmt.format(v) if v == v else "n/a" for v in values])
    console.print(table)
    style = VERDICT_STYLE.get(diagnostics.verdict, "bold")
    console.print(f"verdict: [{style}]{diagnostics.message}[/{style}] "
                  f"(fitted drift share of the last delta: {diagnostics.drift_share:.2f})")
