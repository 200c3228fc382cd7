"""``relex analyze``: how linear is a run, and is it drift or noise? Every figure beside its random-walk null."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import VERDICT_STYLE, QuietOption, console
from relex_cli.options import INPUT_FIELDS, REWARD_FIELDS, RunDirArgument, run_options

ANALYSIS = "Analysis"
LOGPROB = "Log-prob linearity (output space)"
OUTPUT = "Output"


def _fmt(value, digits: int = 3) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return "0" if abs(value) < 1e-9 else f"{value:.{digits}f}"


def _records(spec: Optional[str], run_dir: Optional[Path], limit: Optional[int]):
    """The records to score: a JSONL file, ``toy`` (the toy task's held-out answers), or — when RUN_DIR is
    a toy run (it holds toy_run.json) and nothing was asked — the toy's held-out answers."""
    from relex.analysis.logprob import load_records, toy_records

    if spec is None:
        return toy_records(limit) if run_dir is not None and (run_dir / "toy_run.json").is_file() else None
    if spec.lower() == "none":
        return None
    if spec.lower() == "toy":
        return toy_records(limit)
    return load_records(spec, limit)


def print_summary(result) -> None:
    """The run's figures beside their random-walk null and pure-drift values, the backtest, the verdict."""
    from rich.table import Table

    s = result.summary
    whole, null = s["whole_model"], s["whole_model_null"]
    console.print(f"[bold]relex analyze[/bold]: {s['tensors_moved']} tensors, {s['parameters']:,} parameters, "
                  f"{len(result.steps)} checkpoints (steps {result.steps[0]}..{result.steps[-1]}), "
                  f"{result.seconds:.1f} s")
    table = Table(show_header=True, title="linearity, whole model (per-tensor median)")
    table.add_column("statistic")
    table.add_column("observed", justify="right")
    table.add_column("random walk", justify="right")
    table.add_column("pure drift", justify="right")
    diagnostics = result.verdict.diagnostics
    drift = diagnostics.drift if diagnostics is not None else None
    rows = [
        ("rank-1 explained variance", "explained_r1", "explained_r1_median", "explained_r1_null_median",
         "explained_rank1"),
        ("R² of rank-1 coefficient vs step", "r2_rank1", "r2_rank1_median", "r2_rank1_null_median", "r2_rank1"),
        ("drift share of the last delta", "drift_share", "drift_share_median", "drift_share_null_median",
         "drift_share"),
        ("growth exponent α", "alpha", "alpha_median", None, "alpha"),
        ("cos(first, last delta)", "cos_first_last", None, None, "cos_first_last"),
        ("drift ratio ‖x_T‖²/Σ‖step‖²", "drift_ratio", None, None, "drift_ratio"),
    ]
    for label, key, median, null_median, drift_key in rows:
        observed = _fmt(whole.get(key), 2 if key == "drift_ratio" else 3)
        if median:
            observed += f" ({_fmt(s.get(median))})"
        walk = _fmt(null.get(key), 2 if key == "drift_ratio" else 3)
        if null_median:
            walk += f" ({_fmt(s.get(null_median))})"
        pure = _fmt(getattr(drift, drift_key), 2) if drift is not None else "n/a"
        table.add_row(label, observed, walk, pure)
    console.print(table)
    ranking = result.backtest.ranking()
    if ranking:
        main = result.backtest.main_rows()
        fit_end = result.steps[result.backtest.main_fit_points - 1]
        first, last = min(r["held_out_step"] for r in main), max(r["held_out_step"] for r in main)
        held = f"steps {first}..{last}" if first != last else f"step {first}"
        # analyze's own backtest of every model (the verdict's window backtest is another, fitted on fewer steps)
        bt = Table(show_header=True, title=f"backtest: fit ≤ step {fit_end}, predict {held}")
        bt.add_column("model")
        bt.add_column("relative error at the last", justify="right")
        errors = dict(ranking)
        shown = [m for m, _ in ranking[:5]] + [m for m in ("last", "elementwise", "relex/linear")
                                                if m in errors and m not in [x for x, _ in ranking[:5]]]
        for model in sorted(shown, key=lambda m: errors[m]):
            style = "bold" if model == ranking[0][0] else ""
            bt.add_row(f"[{style}]{model}[/{style}]" if style else model, _fmt(errors[model]))
        console.print(bt)
    if result.logprob is not None:
        lp = result.logprob.summary()
        console.print(f"log-probs of {lp['responses']} responses: R² vs step median {_fmt(lp['r2_median'])} "
                      f"(random walk {_fmt(lp['r2_null']['median'])}, 95th pct {_fmt(lp['r2_null']['p95'])}); "
                      f"mean {lp['mean_logprob'][0]:.3f} → {lp['mean_logprob'][-1]:.3f}; output-space drift share "
                      f"{_fmt(lp['drift_share'], 2)}")
    verdict = result.verdict
    if verdict.diagnostics is not None:
        style = VERDICT_STYLE.get(verdict.drift_class, "bold")
        verdicts = s.get("tensor_verdicts", {})
        counts = ", ".join(f"{verdicts[k]} {k}" for k in ("drift-dominated", "mixed", "noise-dominated")
                           if verdicts.get(k))
        console.print(f"verdict: [{style}]{verdict.message}[/{style}] (drift share {verdict.drift_share:.2f}; "
                      f"tensors: {counts})")


@app.command(no_args_is_help=True)
@run_options(*INPUT_FIELDS, "target_steps", *REWARD_FIELDS, "device",
             help={"target_steps": "The step the verdict's window backtest is carried to (default: the window "
                                   "alone)."},
             panels={"target_steps": ANALYSIS, "rewards": ANALYSIS, "reward_key": ANALYSIS, "reward_max": ANALYSIS})
def analyze(
    run_dir: RunDirArgument,
    options=None,
    rank: Annotated[int, typer.Option(help="Report explained variance at ranks 1..RANK.", rich_help_panel=ANALYSIS)] = 3,
    holdout: Annotated[Optional[int], typer.Option(help="Checkpoints the main backtest holds out (default: the last quarter).", rich_help_panel=ANALYSIS)] = None,
    learned: Annotated[bool, typer.Option("--learned", help="Also backtest learned predictors (slow: a training per tensor).", rich_help_panel=ANALYSIS)] = False,
    null_samples: Annotated[int, typer.Option(help="Random walks drawn per tensor size for the nulls.", rich_help_panel=ANALYSIS)] = 200,
    logprob_prompts: Annotated[Optional[str], typer.Option(help="JSONL of {prompt, response} to score under every checkpoint; 'toy' for the toy task's held-out answers (the default for a toy run); 'none' to skip.", rich_help_panel=LOGPROB, show_default=False)] = None,
    logprob_limit: Annotated[Optional[int], typer.Option(help="Score at most this many records.", rich_help_panel=LOGPROB)] = None,
    logprob_batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.", rich_help_panel=LOGPROB)] = 64,
    out: Annotated[Optional[Path], typer.Option(help="Folder for analysis.json, tensors.csv, backtest.csv and the PNG plots (default: print only).", rich_help_panel=OUTPUT, show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.", rich_help_panel=OUTPUT)] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the PNG plots into OUT.", rich_help_panel=OUTPUT)] = True,
    quiet: QuietOption = False,
) -> None:
    """Measure how linear RUN_DIR's trajectory is, each statistic beside its random-walk null.

    Reads every checkpoint once, one tensor at a time. Explained variance and R² look linear even for a
    random walk; the drift share (0 random walk, 1 drift), the backtests and the verdict say whether
    extrapolating the run is plausible.
    """
    from relex import api
    from relex.io.hub import parse_hub_run
    from relex.io.staging import check_output_folder

    from relex_cli.console import progress_bars, rank_zero

    quiet = quiet or not rank_zero()  # under torchrun rank 0 prints and writes OUT
    if out is not None:
        check_output_folder(out, overwrite)  # fail before reading anything
    records = _records(logprob_prompts, None if parse_hub_run(run_dir) else Path(run_dir), logprob_limit)
    with progress_bars(disable=quiet) as progress:
        # under torchrun the ranks share the reading; rank 0 alone scores the log-probs it reports
        result = api.analyze(run_dir, options, rank=rank, holdout=holdout, learned=learned,
                             null_samples=null_samples, logprob_records=records if rank_zero() else None,
                             logprob_batch_size=logprob_batch_size, progress=progress)
    if out is not None and rank_zero():
        result.write(out, plots=plots, overwrite=overwrite)
    if quiet:
        return
    print_summary(result)
    if out is not None:
        console.print(f"wrote [bold]{out}[/bold] (analysis.json, tensors.csv, backtest.csv"
                      f"{', logprob.csv' if result.logprob is not None else ''}{', PNG plots' if plots else ''})")
