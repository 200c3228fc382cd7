"""``relex check``: is extrapolating this run to a target step plausible? The verdict as an exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import BaseOption, MaxStepOption, RunDirArgument, StepsOption, SummaryOption
from relex_cli.console import GATE, RevisionPatternOption, SubfolderPatternOption, console

INPUT = "Input"

CHECK_HELP = """Judge, before anything is written, whether extrapolating RUN_DIR to --target-step is plausible.

Reads the run once (streaming; nothing is written), then prints the verdict relex extrapolate gives, the drift statistics beside their random-walk and pure-drift values, and the window backtest carried to the target.

Exit codes:

* **0** extrapolation to the target is plausible (drift-dominated); without --strict also a mixed or inconclusive verdict, with a warning;
* **3** the gate failed: extrapolation will likely hurt (noise-dominated, or the window backtest's line loses to stopping once carried to the target), or the target lies beyond the horizon the backtest can vouch for (10 times its own), or, with --strict, the verdict is not drift-dominated;
* **2** bad input (one line on stderr, nothing written);
* **1** internal error.
"""  # noqa: E501 - one line per paragraph, wrapped by the help formatter


@app.command(no_args_is_help=True, help=CHECK_HELP)
def check(
    run_dir: RunDirArgument,
    target_step: Annotated[Optional[str], typer.Option("--target-step", metavar="N", help="The step to extrapolate to (default: judge the window alone, as far as its backtest reached).", rich_help_panel=GATE, show_default=False)] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 3) on anything but a drift-dominated verdict: mixed and inconclusive too.", rich_help_panel=GATE)] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every figure printed (verdict, message, drift share, statistics with their nulls, backtest, target, horizon, training reward, steps, sources) to this JSON file.", rich_help_panel=GATE, show_default=False)] = None,
    summary: SummaryOption = None,
    base: BaseOption = None,
    steps: StepsOption = None,
    max_step: MaxStepOption = None,
    revision_pattern: RevisionPatternOption = "step_{N}",
    subfolder_pattern: SubfolderPatternOption = None,
    allow_interpolation: Annotated[bool, typer.Option("--allow-interpolation", help="Accept a target step inside the observed window (the window alone is then judged).", rich_help_panel=GATE)] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read pytorch_model*.bin pickles when no safetensors exist.", rich_help_panel=INPUT)] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.", rich_help_panel=INPUT)] = "auto",
    rewards: Annotated[str, typer.Option("--rewards", metavar="auto|none|FILE", help="The training reward the verdict weighs beside the weights: auto reads the log_history of the last observed checkpoint's trainer_state.json (when it logs --reward-key), none the weights alone, or a trainer_state.json or JSON Lines file of {\"step\": N, \"reward\": R} objects (at least 4 inside the observed window). A reward whose trend reaches --reward-max before the target makes the verdict mixed.", rich_help_panel=GATE)] = "auto",
    reward_key: Annotated[str, typer.Option("--reward-key", help="The key the mean training reward is logged under (TRL's GRPOTrainer: reward).", rich_help_panel=GATE)] = "reward",
    reward_max: Annotated[float, typer.Option("--reward-max", help="The reward's ceiling (a verifier's reward for a correct answer).", rich_help_panel=GATE)] = 1.0,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the gate's line.", rich_help_panel=GATE)] = False,
) -> None:
    from relex.gate import check as run_check
    from relex.gate import check_target_step, write_summary

    from relex_cli.console import byte_progress, check_output_files, print_check, print_diagnostics
    from relex_cli.console import print_gate, print_sources, rank_zero, resolve_run

    printing = rank_zero()  # under torchrun rank 0 prints and writes the reports
    if target_step is not None:
        target_step = check_target_step(target_step)
    check_output_files(json_path, summary)  # before reading (or downloading) anything
    with byte_progress(disable=quiet or not printing, label="downloading") as fetched:
        run = resolve_run(run_dir, steps, revision_pattern, subfolder_pattern, fetched, base=base, max_step=max_step)
    with byte_progress(disable=quiet or not printing, label="reading") as progress:
        result = run_check(**run, target_step=target_step, strict=strict, max_step=max_step, device=device,
                           allow_pickle=allow_pickle, progress=progress, run_label=run_dir,
                           allow_interpolation=allow_interpolation,
                           rewards=None if rewards == "none" else rewards, reward_key=reward_key,
                           reward_max=reward_max)
    if printing:
        if not quiet:
            observed = result.steps
            console.print(f"[bold]relex check[/bold]: {result.tensors} tensors, {result.parameters:,} parameters, "
                          f"{len(observed)} checkpoints (steps {observed[0]}..{observed[-1]}), "
                          f"{result.seconds:.1f} s")
            print_sources(result.series, result.sources())
            if result.diagnostics is not None:
                print_diagnostics(result.diagnostics, result.series)
            print_check(result)
        else:
            print_gate(result.decision)
        if json_path is not None:
            result.write_json(json_path)
        write_summary(result.markdown(), summary)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
