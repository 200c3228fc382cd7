"""``relex extrapolate``: write the checkpoint of a later step from a run's observed checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import GATE, DryRunOption, QuietOption, SummaryOption
from relex_cli.options import INPUT_FIELDS, PROBE_FIELDS, REWARD_FIELDS, RunDirArgument, run_options

REQUIRE_HELP = ("Judge the run first, as relex check does, and refuse (exit 3, nothing written) unless the gate "
                "passes: plausible (the gate of relex check: a plausible verdict only) or mixed (of relex check "
                "--lenient: a mixed or inconclusive verdict too, with a warning). Reads the run twice: the check's "
                "Gram pass, then the writing pass. Not with --probe: the probe is the gate there (nothing is "
                "written when no candidate beats the last observed checkpoint).")
REQUIRE_CHOICES = ("plausible", "mixed")
OUTPUT_FIELDS = ("target_steps", "allow_interpolation", "device", "dtype", "output", "lora_rank", "max_shard_size",
                 "overwrite")


@app.command(no_args_is_help=True)
@run_options(*INPUT_FIELDS, "model", *OUTPUT_FIELDS, *REWARD_FIELDS, *PROBE_FIELDS, required=("target_steps",))
def extrapolate(
    run_dir: RunDirArgument,
    out: Annotated[Path, typer.Option("--out", help="Output folder (a Hugging Face checkpoint).", rich_help_panel="Output", show_default=False)],
    options=None,
    report: Annotated[Optional[Path], typer.Option(help="Also write the full report (per-tensor statistics) to this JSON file.", rich_help_panel="Output")] = None,
    require: Annotated[Optional[str], typer.Option("--require", help=REQUIRE_HELP, rich_help_panel=GATE, show_default=False)] = None,
    summary_path: SummaryOption = None,
    dry_run: DryRunOption = False,
    quiet: QuietOption = False,
) -> None:
    """Predict the checkpoint at --target-step from the observed checkpoints of RUN_DIR.

    Streams one tensor at a time: memory does not grow with the model. Automatic choices per run or group
    (--regressor auto, --scale auto) and the learned mlp predictor read the run twice. Prints the backtest
    of automatic choices and a verdict on whether the run is drift-dominated (extrapolation plausible) or
    noise-dominated (it will likely hurt). With --require, a run whose verdict fails the gate is refused with
    exit code 3 before anything is written.

    Under torchrun (torchrun --nproc_per_node N --no-python relex extrapolate ...) each process reads,
    computes and writes a share of the tensors; the output is the same checkpoint.
    """
    import os

    from relex import api
    from relex.errors import RelexInputError
    from relex.io.staging import check_output_folder
    from relex.jsonable import write_json
    from relex.summaries import write_summary

    from relex_cli.console import check_output_files, console, print_gate, progress_bars, rank_zero

    printing = rank_zero() and not quiet  # under torchrun rank 0 prints and writes the reports
    if require is not None and require not in REQUIRE_CHOICES:
        raise RelexInputError(f"unknown --require {require!r} (use {' or '.join(REQUIRE_CHOICES)})")
    if require is not None and options.probed:
        raise RelexInputError("--require is the weights' gate and --probe is the gate with a probe: give one of them")
    check_output_folder(out, options.overwrite)  # before downloading a Hub run
    check_output_files(summary_path, report)
    if dry_run:
        return _print_plan(run_dir, options, quiet)
    decision = None
    if require is not None:
        with progress_bars(disable=not printing) as progress:
            checked = api.check(run_dir, options, lenient=require == "mixed", progress=progress)
        decision = checked.decision
        if not decision.passed:
            if rank_zero():
                _report_check(checked, printing, "relex extrapolate", require)
                refused = [("output", f"none: refused by --require {require}")]
                write_summary(checked.markdown("relex extrapolate", notes=refused), summary_path)
            raise typer.Exit(decision.exit_code)
        if printing:
            print_gate(decision, "relex extrapolate")
    with progress_bars(disable=not printing) as progress:
        result = api.extrapolate(run_dir, out, options, progress=progress)
    if not rank_zero():
        return
    if result.probe is not None:
        _report_probe(result, printing)
        if not result.written:
            write_summary(result.markdown("relex extrapolate", result.probe.gate(),
                                          [("output", "none: no target beats the last observed checkpoint")]),
                          summary_path)
            raise typer.Exit(3)
    if report is not None:
        write_json(report, result.to_dict())
    if summary_path is not None or os.environ.get("GITHUB_STEP_SUMMARY"):
        written = [("output", f"step {step} → `{folder}`") for step, folder in result.out_dirs.items()]
        write_summary(result.markdown("relex extrapolate", decision or (result.probe.gate() if result.probe else None),
                                      written), summary_path)
    if not printing:
        return
    _print_result(result)
    if result.probe is not None:
        console.print(f"probe: [bold]{result.probe.curve.probe['name']}[/bold] chose step {result.probe.chosen}")
    for step, folder in result.out_dirs.items():
        console.print(f"wrote step {step} → [bold]{folder}[/bold]")


def _report_probe(result, printing: bool) -> None:
    """The probe's curve and decision (the weights' verdict is printed beside it with the result)."""
    from relex_cli.console import console, err_console, print_gate

    outcome = result.probe
    if printing:
        console.print(outcome.curve.text(), highlight=False)
        print_gate(outcome.gate(), "relex extrapolate")
    if not result.written:
        err_console.print(f"relex: refused: {outcome.gate().reason}; nothing written", soft_wrap=True,
                          highlight=False, markup=False)


def _print_plan(run_dir: str, options, quiet: bool) -> None:
    from relex.run import open_run

    from relex_cli.console import print_plan, progress_bars

    with progress_bars(disable=quiet) as progress, open_run(run_dir, options, progress=progress) as run:
        if options.probed:
            from relex.probe.verify import candidate_targets, plan_text

            print_plan(run.plan(*_planned_sinks(options, candidate_targets(run, options))), plan_text(run, options))
        else:
            print_plan(run.plan(*_planned_sinks(options)))


def _planned_sinks(options, candidates=None):
    """What an extrapolation writes, as a plan names it (nothing is opened); with a probe, its ``candidates``."""
    from relex.stream import Sink

    class Named(Sink):
        def __init__(self, text: str):
            self.text = text

        def describe(self) -> str:
            return self.text

    if candidates is not None:
        return [Named(f"a candidate checkpoint of step {t} (scratch)") for t in candidates]
    kind = "a PEFT adapter" if options.output == "lora" else "a checkpoint"
    return [Named(f"{kind} of step {t}") for t in options.target_steps]


def _report_check(checked, printing: bool, title: str, require: str) -> None:
    from relex_cli.console import err_console, print_check, print_gate, print_sources, print_verdict

    if printing:
        print_sources(checked.series, None)
        print_verdict(checked.verdict, checked.series)
        print_check(checked.verdict)
        print_gate(checked.decision, title)
    err_console.print(f"relex: refused (--require {require}): {checked.decision.reason}; nothing written",
                      soft_wrap=True, highlight=False, markup=False)


def _print_result(result) -> None:
    from rich.table import Table

    from relex_cli.console import console, print_selection, print_sources, print_verdict

    summary = result.summary()
    table = Table(title=f"relex extrapolate ({result.method}) → step {', '.join(map(str, result.target_steps))}",
                  show_header=True)
    for column in ("observed", "tensors", "expl. var.\nmean / min", "fit R²\nmean / min", "seconds",
                   "GB read\n/ written"):
        table.add_column(column, justify="left" if column == "observed" else "right")
    observed = result.series.steps
    table.add_row(f"{len(observed)} steps\n{observed[0]}…{observed[-1]}", str(summary["tensors"]),
                  f"{summary['explained_mean']:.3f} / {summary['explained_min']:.3f}",
                  f"{summary['r2_mean']:.3f} / {summary['r2_min']:.3f}", f"{summary['seconds']:.1f}",
                  f"{summary['bytes_read'] / 1e9:.2f} / {summary['bytes_written'] / 1e9:.2f}")
    console.print(table)
    print_sources(result.series, result.result.sources)
    print_selection(result.selection, [t.stats for t in result.tensors])
    print_verdict(result.verdict, result.series)
