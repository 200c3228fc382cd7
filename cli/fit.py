"""``relex fit`` and ``relex materialize``: fit a run's trajectory model once, write any step from it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import console, BaseOption, MaxStepOption, RunDirArgument, StepsOption
from relex_cli.console import RevisionPatternOption, SubfolderPatternOption
from relex_cli.extrapolate import INPUT, MODEL, OUTPUT, _parse_targets, model_options, print_selection


@app.command(no_args_is_help=True)
@model_options
def fit(
    run_dir: RunDirArgument,
    out: Annotated[Path, typer.Option("--out", help="Folder for the stored trajectory (safetensors + trajectory.json).", rich_help_panel=OUTPUT, show_default=False)],
    base: BaseOption = None,
    steps: StepsOption = None,
    max_step: MaxStepOption = None,
    revision_pattern: RevisionPatternOption = "step_{N}",
    subfolder_pattern: SubfolderPatternOption = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read pytorch_model*.bin pickles when no safetensors exist.", rich_help_panel=INPUT)] = False,
    spec=None,
    dtype: Annotated[str, typer.Option(help="dtype materialize writes: auto (as the newest checkpoint), bfloat16, float16 or float32.", rich_help_panel=OUTPUT)] = "auto",
    storage_dtype: Annotated[str, typer.Option(help="dtype of the stored basis vectors: float32 (materialize then equals extrapolate bit for bit) or auto (each tensor's own dtype: half the size for bf16 models, not bit-identical).", rich_help_panel=OUTPUT)] = "float32",
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.", rich_help_panel=OUTPUT)] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.", rich_help_panel=OUTPUT)] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB or 500MB.", rich_help_panel=OUTPUT)] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only errors.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Fit the trajectory model of RUN_DIR once and store it; then `relex materialize` writes any step.

    Takes the model options of `relex extrapolate`. Stores, per tensor, its basis vectors (RELEX: the k
    directions v_j, plus the last delta when anchored) and the fitted coefficient model: about k × the
    model's size in float32 (matrix-rank1: only u and v per matrix). Reads the run twice (a Gram pass,
    then the pass that forms the vectors).
    """
    from relex.io.staging import check_output_folder
    from relex.store import fit_trajectory

    from relex_cli.console import byte_progress, rank_zero, resolve_run

    quiet = quiet or not rank_zero()  # under torchrun rank 0 prints
    check_output_folder(out, overwrite)  # before downloading a Hub run
    with byte_progress(disable=quiet, label="downloading") as fetched:
        run = resolve_run(run_dir, steps, revision_pattern, subfolder_pattern, fetched, base=base, max_step=max_step)
    with byte_progress(disable=quiet, label="fitting") as progress:
        result = fit_trajectory(
            **run, out_dir=out, max_step=max_step, spec=spec, device=device, dtype=dtype,
            storage_dtype=storage_dtype, overwrite=overwrite, allow_pickle=allow_pickle,
            max_shard_size=max_shard_size, progress=progress,
        )
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
def materialize(
    trajectory: Annotated[Path, typer.Argument(help="Folder written by relex fit.", show_default=False)],
    target_step: Annotated[str, typer.Option("--target-step", help="Step to write; several as 100,200 (then OUT/step-N/ each).", rich_help_panel=OUTPUT, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (a Hugging Face checkpoint).", rich_help_panel=OUTPUT, show_default=False)],
    base: Annotated[Optional[Path], typer.Option(help="Base checkpoint, if it moved since relex fit (its tensors are checked).", rich_help_panel=INPUT)] = None,
    scale: Annotated[Optional[float], typer.Option(help="Override the stored multiplier of the update w(t*) − w_0.", rich_help_panel=MODEL, show_default=False)] = None,
    allow_interpolation: Annotated[bool, typer.Option("--allow-interpolation", help="Allow target steps inside the observed window.", rich_help_panel=MODEL)] = False,
    dtype: Annotated[str, typer.Option(help="auto (as stored by fit), bfloat16, float16 or float32.", rich_help_panel=OUTPUT)] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.", rich_help_panel=OUTPUT)] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.", rich_help_panel=OUTPUT)] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB or 500MB.", rich_help_panel=OUTPUT)] = "5GB",
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only errors.", rich_help_panel=OUTPUT)] = False,
) -> None:
    """Write the checkpoint at --target-step from a stored trajectory, reading only the base and the
    stored vectors. With float32 storage the result is identical to `relex extrapolate` with the same
    settings."""
    from relex.store import materialize as run_materialize

    from relex_cli.console import byte_progress

    targets = _parse_targets(target_step)
    with byte_progress(disable=quiet, label="materializing") as progress:
        result = run_materialize(trajectory, target_step=targets, out_dir=out, base=base, scale=scale, dtype=dtype,
                                 device=device, overwrite=overwrite, allow_interpolation=allow_interpolation,
                                 max_shard_size=max_shard_size, progress=progress)
    if quiet:
        return
    for step, folder in result.out_dirs.items():
        console.print(f"wrote step {step} → [bold]{folder}[/bold] ({result.seconds:.1f} s)")
