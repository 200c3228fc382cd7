"""``relex extrapolate``: write the checkpoint of a later step from a run's observed checkpoints."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import console, print_diagnostics, print_sources, BaseOption, MaxStepOption, RunDirArgument, StepsOption
from relex_cli.console import GATE, RevisionPatternOption, SubfolderPatternOption, SummaryOption

INPUT = "Input"
MODEL = "Trajectory model"
OUTPUT = "Output"

METHOD_HELP = ("Mode: relex (temporal rank-k SVD of the deltas), matrix-rank1 (top singular triple of each 2-D "
               "delta, exact sparse SVD; 1-D tensors element-wise), elementwise (line through two checkpoints), "
               "last (the newest checkpoint).")
REGRESSOR_HELP = ("Predictor of each coefficient series: linear, poly2, poly3, loglinear (a+b·log t), powerlaw "
                  "(a·t^b), saturating (a·(1−e^(−t/τ))), mlp (small learned predictor shared by tensors of one "
                  "kind, NExt-style; reads the run twice); anchored or anchored-NAME: start from the last "
                  "checkpoint and add the increment NAME (default linear) predicts, shrunk by λ estimated per "
                  "tensor (anchored@0.5, anchored-NAME@0.5: fixed λ); auto: the candidate with the smallest "
                  "backtest error.")
CANDIDATES_HELP = ("Predictors --regressor auto chooses from, simplest first (a later one must beat an earlier "
                   "one by 5%). Default: linear,loglinear,powerlaw,saturating,poly2,anchored,anchored-saturating.")
SCOPE_HELP = ("Where auto choices (--regressor auto, --scale auto) are made: run (one choice for the model), "
              "group (per kind of tensor, e.g. all q_proj) or tensor. run and group read the run twice: a cheap "
              "Gram pass to decide, then the writing pass.")
SCALE_HELP = ("Multiplier of the predicted update w(t*) − w_0, or auto: the closed-form best scale on the "
              "backtest (measured at the backtest's shorter horizon; clipped to [0, 2]).")

MethodOption = Annotated[str, typer.Option(help=METHOD_HELP, rich_help_panel=MODEL)]
RankOption = Annotated[int, typer.Option(help="Number of temporal components (relex).", rich_help_panel=MODEL)]
RegressorOption = Annotated[str, typer.Option(help=REGRESSOR_HELP, rich_help_panel=MODEL)]
CandidatesOption = Annotated[Optional[str], typer.Option(help=CANDIDATES_HELP, rich_help_panel=MODEL, show_default=False)]
ScopeOption = Annotated[str, typer.Option("--auto-scope", help=SCOPE_HELP, rich_help_panel=MODEL)]
HoldoutOption = Annotated[Optional[int], typer.Option(help="Checkpoints held out by backtests (default: the last quarter).", rich_help_panel=MODEL, show_default=False)]
ScaleOption = Annotated[str, typer.Option(help=SCALE_HELP, rich_help_panel=MODEL)]
CopyNormsOption = Annotated[bool, typer.Option("--copy-norms", help="elementwise (and the 1-D tensors of matrix-rank1): copy 1-D tensors (norms, biases) from the newest checkpoint.", rich_help_panel=MODEL)]
FromStepOption = Annotated[Optional[int], typer.Option(help="elementwise: the observed step w_a of the line w_a + α(w_b − w_a) (default: the one before the last).", rich_help_panel=MODEL, show_default=False)]

# The model options of every command that fits a trajectory, in the order --help lists them, with defaults.
MODEL_OPTIONS = (("method", MethodOption, "relex"), ("rank", RankOption, 1), ("regressor", RegressorOption, "linear"),
                 ("candidates", CandidatesOption, None), ("auto_scope", ScopeOption, "run"),
                 ("holdout", HoldoutOption, None), ("scale", ScaleOption, "1.0"), ("copy_norms", CopyNormsOption, False),
                 ("from_step", FromStepOption, None))


def model_options(command):
    """Give ``command`` the model options (--method, --rank, --regressor, …) in place of its ``spec`` parameter;
    it receives them as one :class:`relex.trajectory.ModelSpec`."""
    signature = inspect.signature(command, eval_str=True)
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name == "spec":
            parameters += [inspect.Parameter(name, parameter.kind, annotation=annotation, default=default)
                           for name, annotation, default in MODEL_OPTIONS]
        else:
            parameters.append(parameter)

    @functools.wraps(command)
    def with_spec(**options):
        from relex.trajectory import ModelSpec  # start-up: numpy and the engine load once a command runs

        spec = ModelSpec(**{name: options.pop(name) for name, _, _ in MODEL_OPTIONS})
        return command(spec=spec, **options)

    with_spec.__signature__ = signature.replace(parameters=parameters)
    return with_spec


REQUIRE_HELP = ("Judge the run first, as relex check does, and refuse (exit 3, nothing written) unless the gate "
                "passes: plausible (the gate of relex check) or drift-dominated (of relex check --strict). Reads "
                "the run twice: the check's Gram pass, then the writing pass.")
REQUIRE_CHOICES = ("plausible", "drift-dominated")


def _parse_targets(text: str) -> list[int]:
    from relex.gate import check_target_step

    try:
        targets = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        from relex.errors import RelexInputError

        raise RelexInputError(f"--target-step must be an integer or a comma-separated list, got {text!r}") from None
    return [check_target_step(t) for t in targets]


@app.command(no_args_is_help=True)
@model_options
def extrapolate(
    run_dir: RunDirArgument,
    target_step: Annotated[str, typer.Option("--target-step", help="Step to predict; several as 100,200 (then OUT_DIR/step-N/ each).", rich_help_panel=OUTPUT, show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Output folder (a Hugging Face checkpoint).", rich_help_panel=OUTPUT, show_default=False)],
    base: BaseOption = None,
    steps: StepsOption = None,
    max_step: MaxStepOption = None,
    revision_pattern: RevisionPatternOption = "step_{N}",
    subfolder_pattern: SubfolderPatternOption = None,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Read pytorch_model*.bin pickles when no safetensors exist.", rich_help_panel=INPUT)] = False,
    spec=None,
    allow_interpolation: Annotated[bool, typer.Option("--allow-interpolation", help="Allow target steps inside the observed window.", rich_help_panel=MODEL)] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.", rich_help_panel=OUTPUT)] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (as the newest checkpoint), bfloat16, float16 or float32.", rich_help_panel=OUTPUT)] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.", rich_help_panel=OUTPUT)] = False,
    report: Annotated[Optional[Path], typer.Option(help="Also write the full report (per-tensor statistics) to this JSON file.", rich_help_panel=OUTPUT)] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 5GB or 500MB.", rich_help_panel=OUTPUT)] = "5GB",
    output: Annotated[str, typer.Option("--output", help="checkpoint: a full Hugging Face checkpoint (for a LoRA run, the merged model; needs the base). lora (LoRA runs only): a PEFT adapter over the same base holding the prediction exactly.", rich_help_panel=OUTPUT)] = "checkpoint",
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help="With --output lora: truncate each module's update to this rank (SVD of the small factors); the truncation error per module goes to relex.json. Default: exact (rank = sum of the observed adapters' ranks).", rich_help_panel=OUTPUT, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print only errors.", rich_help_panel=OUTPUT)] = False,
    require: Annotated[Optional[str], typer.Option("--require", help=REQUIRE_HELP, rich_help_panel=GATE, show_default=False)] = None,
    summary_path: SummaryOption = None,
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
    from relex.engine import extrapolate as run_extrapolation

    from relex.io.staging import check_output_folder

    from relex_cli.console import byte_progress, resolve_run

    from relex.gate import write_summary

    from relex_cli.console import check_output_files, rank_zero

    quiet = quiet or not rank_zero()  # under torchrun rank 0 prints and writes the reports
    targets = _parse_targets(target_step)
    if require is not None and require not in REQUIRE_CHOICES:
        from relex.errors import RelexInputError

        raise RelexInputError(f"unknown --require {require!r} (use {' or '.join(REQUIRE_CHOICES)})")
    check_output_folder(out, overwrite)  # before downloading a Hub run
    check_output_files(summary_path)
    with byte_progress(disable=quiet, label="downloading") as fetched:
        run = resolve_run(run_dir, steps, revision_pattern, subfolder_pattern, fetched, base=base, max_step=max_step)
    gate = None
    if require is not None:
        gate = _require(run, run_dir, targets, require, max_step, device, allow_pickle, allow_interpolation, quiet)
        if not gate.decision.passed:
            if rank_zero():
                write_summary(gate.markdown("relex extrapolate", [("output", f"none: refused by --require {require}")]),
                              summary_path)
            raise typer.Exit(gate.exit_code)
    with byte_progress(disable=quiet, label="extrapolating") as progress:
        result = run_extrapolation(
            **run, target_step=targets, out_dir=out, max_step=max_step, spec=spec, device=device, dtype=dtype,
            overwrite=overwrite, allow_interpolation=allow_interpolation, allow_pickle=allow_pickle,
            max_shard_size=max_shard_size, output=output, lora_rank=lora_rank, progress=progress,
        )
    if not rank_zero():
        return
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if summary_path is not None or _in_github_actions():
        write_summary(_summary(result, run_dir, gate), summary_path)
    if quiet:
        return
    summary = result.summary()
    from rich.table import Table

    table = Table(title=f"relex extrapolate ({spec.method}) → step {', '.join(map(str, result.target_steps))}",
                  show_header=True)
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
    print_sources(result.series, result.sources)
    print_selection(result.selection, [t.stats for t in result.tensors])
    if result.diagnostics is not None:
        print_diagnostics(result.diagnostics, result.series)
    for step, folder in result.out_dirs.items():
        console.print(f"wrote step {step} → [bold]{folder}[/bold]")


def _require(run: dict, run_dir: str, targets: list[int], require: str, max_step, device: str, allow_pickle: bool,
             allow_interpolation: bool, quiet: bool):
    """The gate of relex check (--strict for drift-dominated) on the farthest target; printed as it does."""
    from relex.gate import check as run_check

    from relex_cli.console import byte_progress, err_console, print_check, print_gate

    with byte_progress(disable=quiet, label="checking") as progress:
        gate = run_check(**run, target_step=max(targets), strict=require == "drift-dominated", max_step=max_step,
                         device=device, allow_pickle=allow_pickle, progress=progress, run_label=run_dir,
                         allow_interpolation=allow_interpolation)
    if gate.decision.passed:
        if not quiet:
            print_gate(gate.decision, "relex extrapolate")
        return gate
    if not quiet:
        print_sources(gate.series, gate.sources())
        if gate.diagnostics is not None:
            print_diagnostics(gate.diagnostics, gate.series)
        print_check(gate)
    from relex_cli.console import rank_zero

    if rank_zero():
        err_console.print(f"relex: refused (--require {require}): {gate.decision.reason}; nothing written",
                          soft_wrap=True, highlight=False, markup=False)
    return gate


def _in_github_actions() -> bool:
    import os

    return bool(os.environ.get("GITHUB_STEP_SUMMARY"))


def _summary(result, run_dir: str, gate) -> str:
    """The Markdown summary of an extrapolation: the verdict (and the gate, with --require), what was written."""
    import math

    from relex.gate import CheckResult, code, judge, verdict_markdown

    written = [("output", f"step {step} → {code(folder)}") for step, folder in result.out_dirs.items()]
    if gate is not None:
        return gate.markdown("relex extrapolate", written)
    target = max(result.target_steps)
    verdict = CheckResult(run=run_dir, series=result.series,
                          target_step=target if target > result.series.steps[-1] else None,
                          diagnostics=result.diagnostics, decision=judge(result.diagnostics, target_step=target),
                          tensors=len(result.tensors), parameters=sum(math.prod(t.shape) for t in result.tensors),
                          seconds=result.seconds, bytes_read=result.bytes_read)
    return verdict_markdown(verdict, "relex extrapolate", written, gate=False)


def print_selection(selection: dict | None, tensor_stats=()) -> None:
    """The backtest behind automatic choices: one row per candidate (run), per group, or counts (tensor)."""
    if not selection:
        return
    from collections import Counter

    from rich.table import Table

    held = selection["held_out_steps"]
    title = (f"backtest: fit on steps ≤ {selection['fit_steps'][-1]:g}, predict {', '.join(f'{s:g}' for s in held)}"
             f" — relative weight error at step {held[-1]:g}")
    decisions = selection.get("decisions")
    if selection["scope"] == "tensor" or not decisions:
        counts = Counter((s.get("regressor"), s.get("scale")) for s in tensor_stats
                         if s.get("regressor") is not None and "auto" in s)
        table = Table(title=title + " (chosen per tensor)")
        table.add_column("predictor")
        table.add_column("scale", justify="right")
        table.add_column("tensors", justify="right")
        for (name, scale), n in counts.most_common():
            table.add_row(str(name), f"{scale:.3g}" if isinstance(scale, float) else str(scale), str(n))
        console.print(table)
        return
    if selection["scope"] == "run" and len(decisions) == 1:
        (decision,) = decisions.values()
        table = Table(title=title)
        table.add_column("predictor")
        table.add_column("error", justify="right")
        table.add_column("scale", justify="right")
        table.add_column("")
        for name, figures in decision["errors"].items():
            chosen = name == decision["regressor"]
            error = figures["error"]
            table.add_row(name, f"{error:.4f}" if error == error and error != float("inf") else "n/a",
                          f"{figures.get('scale', 1.0):.3g}", "[bold green]chosen[/bold green]" if chosen else "")
            if chosen and "auto_scale" in figures:
                table.add_row(f"{name} (scale auto)", f"{figures['auto_scale']['error']:.4f}",
                              f"{figures['auto_scale']['scale']:.3g}", "[bold green]chosen[/bold green]")
        console.print(table)
        return
    table = Table(title=title + " (per group)")
    table.add_column("group")
    table.add_column("chosen")
    table.add_column("error", justify="right")
    table.add_column("scale", justify="right")
    for key, decision in decisions.items():
        error = decision["errors"][decision["regressor"]]["error"]
        table.add_row(key, decision["regressor"], f"{error:.4f}", f"{decision['scale']:.3g}")
    console.print(table)
