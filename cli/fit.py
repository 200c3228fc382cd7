"""``relex fit`` and ``relex materialize``: fit a run's trajectory model once, write any step from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import DryRunOption, QuietOption, console
from relex_cli.options import INPUT_FIELDS, REWARD_FIELDS, RunDirArgument, run_options

OUTPUT = "Output"


@app.command(no_args_is_help=True)
@run_options(*INPUT_FIELDS, "model", "target_steps", *REWARD_FIELDS, "device", "dtype", "storage_dtype",
             "max_shard_size", "overwrite",
             help={"dtype": "dtype materialize writes: auto (as the newest checkpoint), bfloat16, float16 or "
                            "float32.",
                   "target_steps": "The step the verdict recorded in trajectory.json carries the window backtest to "
                                   "(default: the window alone); materialize writes any step."},
             panels={"target_steps": "Verdict"})
def fit(
    run_dir: RunDirArgument,
    out: Annotated[Path, typer.Option("--out", help="Folder for the stored trajectory (safetensors + trajectory.json).", rich_help_panel=OUTPUT, show_default=False)],
    options=None,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fit the trajectory model of RUN_DIR once and store it; then `relex materialize` writes any step.

    Takes the model options of `relex extrapolate`. Stores, per tensor, its basis vectors (RELEX: the k
    directions v_j, plus the last delta when anchored) and the fitted coefficient model: about k × the
    model's size in float32 (matrix-rank1: only u and v per matrix). Reads the run twice (a Gram pass,
    then the pass that forms the vectors).
    """
    from relex import api
    from relex.io.staging import check_output_folder

    from relex_cli.console import print_plan, print_selection, progress_bars, rank_zero

    quiet = quiet or not rank_zero()  # under torchrun rank 0 prints
    check_output_folder(out, options.overwrite)  # before downloading a Hub run
    if dry_run:
        from relex.run import open_run
        from relex.sinks import TrajectorySink

        with progress_bars(disable=quiet) as progress, open_run(run_dir, options, progress=progress) as run:
            print_plan(run.plan(TrajectorySink(out, run.readers, options.storage_dtype, options.dtype,
                                               run.rank_names(), options.max_shard_size)))
        return
    with progress_bars(disable=quiet) as progress:
        result = api.fit(run_dir, out, options, progress=progress)
    if quiet:
        return
    manifest = result.manifest
    print_selection(manifest.get("selection"), [t["stats"] for t in manifest["tensors"].values()])
    storage = manifest["storage"]
    console.print(f"stored the {manifest['method']} trajectory of steps {manifest['observed_steps'][0]}…"
                  f"{manifest['observed_steps'][-1]} → [bold]{result.out_dir}[/bold] "
                  f"({storage['bytes'] / 1e9:.3f} GB, {storage['bytes'] / max(storage['model_bytes'], 1):.2f}× "
                  f"the base checkpoint; {result.seconds:.1f} s)")


@app.command(no_args_is_help=True)
@run_options("target_steps", "allow_interpolation", "dtype", "device", "max_shard_size", "overwrite",
             required=("target_steps",), defaults={"device": "cpu"},
             help={"target_steps": "Step to write; several as 100,200 (then OUT/step-N/ each).",
                   "dtype": "auto (as stored by fit), bfloat16, float16 or float32."})
def materialize(
    trajectory: Annotated[Path, typer.Argument(help="Folder written by relex fit.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (a Hugging Face checkpoint).", rich_help_panel=OUTPUT, show_default=False)],
    options=None,
    base: Annotated[Optional[Path], typer.Option(help="Base checkpoint, if it moved since relex fit (its tensors are checked).", rich_help_panel="Input")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Override the stored multiplier of the update w(t*) − w_0.", rich_help_panel="Model", show_default=False)] = None,
    quiet: QuietOption = False,
) -> None:
    """Write the checkpoint at --target-step from a stored trajectory, reading only the base and the
    stored vectors. With float32 storage the result is identical to `relex extrapolate` with the same
    settings."""
    from relex.store import materialize as run_materialize

    from relex_cli.console import progress_bars

    with progress_bars(disable=quiet) as progress:
        result = run_materialize(trajectory, out, options, base=base, scale=scale, progress=progress)
    if quiet:
        return
    for step, folder in result.out_dirs.items():
        console.print(f"wrote step {step} → [bold]{folder}[/bold] ({result.seconds:.1f} s)")
