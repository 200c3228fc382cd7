"""``relex check``: is extrapolating this run to a target step plausible? The verdict as an exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import GATE, DryRunOption, SummaryOption
from relex_cli.options import INPUT_FIELDS, PROBE_FIELDS, REWARD_FIELDS, RunDirArgument, run_options

CHECK_HELP = """Judge, before anything is written, whether extrapolating RUN_DIR to --target-step is plausible.

Reads the run once (streaming; nothing is written but, with --probe, the candidates in a temporary folder, deleted after), then prints the verdict relex extrapolate gives, the drift statistics beside their random-walk and pure-drift values, and the window backtest carried to the target. With --probe, the probe decides: the candidates (--target-step N, or auto: a grid of them) are scored on training problems against the last observed checkpoint, and the weights' verdict is reported beside.

Exit codes:

* **0** extrapolation to the target is plausible (or, with --probe, a candidate beats the last observed checkpoint on the probe); with --lenient also a mixed or inconclusive verdict, with a warning;
* **3** the gate failed: extrapolation will likely hurt (noise-dominated, or the window backtest's line loses to stopping once carried to the target), the target lies beyond the horizon the backtest can vouch for (10 times its own), the verdict is mixed or inconclusive (without --lenient), or, with --probe, no candidate beats the last observed checkpoint;
* **2** bad input (one line on stderr, nothing written);
* **1** internal error.
"""  # noqa: E501 - one line per paragraph, wrapped by the help formatter
TARGET_HELP = ("The step to extrapolate to (default: judge the window alone, as far as its backtest reached); auto: "
               "the step the probe chooses (needs --probe).")


@app.command(no_args_is_help=True, help=CHECK_HELP)
@run_options(*INPUT_FIELDS, "target_steps", "allow_interpolation", *REWARD_FIELDS, *PROBE_FIELDS, "device",
             "dtype", "max_shard_size",
             help={"target_steps": TARGET_HELP, "allow_interpolation": "Accept a target step inside the observed "
                   "window (the window alone is then judged)."},
             panels={"target_steps": GATE, "allow_interpolation": GATE, "rewards": GATE, "reward_key": GATE,
                     "reward_max": GATE, "device": "Input"})
def check(
    run_dir: RunDirArgument,
    options=None,
    lenient: Annotated[bool, typer.Option("--lenient", help="Also pass a mixed or inconclusive verdict (exit 0, with a warning): verdicts that say nothing will hurt, but cannot vouch for the extrapolation either. Without it only a plausible verdict passes. Not with --probe (the probe decides).", rich_help_panel=GATE)] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the verdict and every figure behind it (drift statistics with their nulls, backtest, target, horizon, training reward), the gate, the steps and how each checkpoint was read to this JSON file.", rich_help_panel=GATE, show_default=False)] = None,
    summary: SummaryOption = None,
    dry_run: DryRunOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only the gate's line.", rich_help_panel=GATE)] = False,
) -> None:
    from relex import api
    from relex.jsonable import write_json
    from relex.summaries import write_summary

    from relex_cli.console import (check_output_files, console, print_check, print_gate, print_plan,
                                   print_sources, print_verdict, progress_bars, rank_zero)

    printing = rank_zero()  # under torchrun rank 0 prints and writes the reports
    check_output_files(json_path, summary)  # before reading (or downloading) anything
    if options.target_steps[1:]:
        from relex.errors import RelexInputError

        raise RelexInputError("relex check judges one --target-step")
    if dry_run:
        from relex.run import open_run

        with progress_bars(disable=quiet) as progress, open_run(run_dir, options, progress=progress) as run:
            if options.probed:
                from relex.probe.verify import plan_text

                print_plan(run.plan(), plan_text(run, options))
            else:
                print_plan(run.plan())
        return
    with progress_bars(disable=quiet or not printing) as progress:
        result = api.check(run_dir, options, lenient=lenient, progress=progress)
    if printing:
        if not quiet:
            observed = result.steps
            console.print(f"[bold]relex check[/bold]: {result.tensors} tensors, {result.parameters:,} parameters, "
                          f"{len(observed)} checkpoints (steps {observed[0]}..{observed[-1]}), "
                          f"{result.seconds:.1f} s")
            print_sources(result.series, result.sources)
            print_verdict(result.verdict, result.series)
            print_check(result.verdict)
            if result.probe is not None:
                console.print(result.probe.curve.text() + "; the probe decides the gate", highlight=False)
        print_gate(result.decision)
        if json_path is not None:
            write_json(json_path, result.to_dict())
        write_summary(result.markdown(), summary)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
