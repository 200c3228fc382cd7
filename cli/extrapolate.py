"""``relex extrapolate``: write the checkpoint of a later step from a run's observed checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import console, err_console, print_diagnostics

INPUT = "Input"
MODEL = "Trajectory model"
OUTPUT = "Output"


def _parse_targets(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        from relex.errors import RelexInputError

        raise RelexInputError(f"--target-step must be an integer or a comma-separated list, got {text!r}") from None


@app.command(no_args_is_help=True)
def extrapolate(
    run_dir: Annotated[Path, typer.Argument(help="Run folder holding checkpoint-N/, global_step_N/ or step_N/ folders.", show_default=False)],
    target_step: Annotated[str, typer.Option("--target-step", help="Step to predict; several as 100,200 (then OUT_DIR/step-N/ each).", rich_help_panel=OUTPUT, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (a Hugging Face checkpoint).", rich_help_panel=OUTPUT, show_default=False)],
    base: Annotated[Optional[Path], typer.Option(help="Base (step-0) checkpoint, if not the run's own step-0 folder.", rich_help_panel=INPUT)] = None,
    steps: Annotated[Optional[str], typer.Option(help="Observed steps to use, e.g. 10,20,30 (default: all).", rich_help_panel=INPUT)] = None,
    max_step: Annotated[Optional[int], typer.Option(help="Use observed steps up to this one.", rich_help_panel=INPUT)] = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read pytorch_model*.bin pickles when no safetensors exist.", rich_help_panel=INPUT)] = False,
    method: Annotated[str, typer.Option(help="Trajectory model.", rich_help_panel=MODEL)] = "relex",
    rank: Annotated[int, typer.Option(help="Number of temporal components.", rich_help_panel=MODEL)] = 1,
    regressor: Annotated[str, typer.Option(help="Fit of each coefficient against the step.", rich_help_panel=MODEL)] = "linear",
    scale: Annotated[float, typer.Option(help="Multiplier of the predicted update w(t*) − w_0.", rich_help_panel=MODEL)] = 1.0,
    allow_interpolation: Annotated[bool, typer.Option("--allow-interpolation", help="Allow target steps inside the observed window.", rich_help_panel=MODEL)] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.", rich_help_panel=OUTPUT)] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (as the newest checkpoint), bfloat16, float16 or float32.", rich_help_panel=OUTPUT)] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.", rich_help_panel=OUTPUT)] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the full report (per-tensor statistics) to this JSON file.", rich_help_panel=OUTPUT)] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB or 500MB.", rich_help_panel=OUTPUT)] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only errors.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Predict the checkpoint at --target-step from the observed checkpoints of RUN_DIR.

    Streams one tensor at a time: memory does not grow with the model. Prints a verdict on whether the
    run is drift-dominated (extrapolation plausible) or noise-dominated (it will likely hurt).
    """
    from relex.engine import extrapolate as run_extrapolation

    from relex_cli.console import byte_progress

    targets = _parse_targets(target_step)
    with byte_progress(disable=quiet, label="extrapolating") as progress:
        result = run_extrapolation(
            run_dir, target_step=targets, out_dir=out, base=base, steps=steps, max_step=max_step,
            method=method, rank=rank, regressor=regressor, scale=scale, device=device, dtype=dtype,
            overwrite=overwrite, allow_interpolation=allow_interpolation, allow_pickle=allow_pickle,
            max_shard_size=max_shard_size, progress=progress,
        )
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if quiet:
        return
    summary = result.summary()
    from rich.table import Table

    table = Table(title=f"relex extrapolate → step {', '.join(map(str, result.target_steps))}", show_header=True)
    table.add_column("observed")
    table.add_column("tensors", justify="right")
    table.add_column("expl. var.\nmean / min", justify="right")
    table.add_column("fit R²\nmean / min", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("GB read\n/ written", justify="right")
    observed = result.series.steps
    table.add_row(
        f"{len(observed)} steps\n{observed[0]}…{observed[-1]}",
        str(summary["tensors"]),
        f"{summary['explained_mean']:.3f} / {summary['explained_min']:.3f}",
        f"{summary['r2_mean']:.3f} / {summary['r2_min']:.3f}",
        f"{summary['seconds']:.1f}",
        f"{summary['bytes_read'] / 1e9:.2f} / {summary['bytes_written'] / 1e9:.2f}",
    )
    console.print(table)
    if result.diagnostics is not None:
        print_diagnostics(result.diagnostics)
    for step, folder in result.out_dirs.items():
        console.print(f"wrote step {step} → [bold]{folder}[/bold]")
