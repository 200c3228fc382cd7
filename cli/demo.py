"""``relex demo``: train a toy RLVR run on CPU, extrapolate it, and show when extrapolation works."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relex_cli.app import app
from relex_cli.console import VERDICT_STYLE, console


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the run, the extrapolated checkpoints, demo.json and demo.png.")] = Path("relex-demo"),
    preset: Annotated[str, typer.Option(help="Toy setting: demo (drift-dominated), noisy (noise-dominated) or ci (seconds).")] = "demo",
    fresh: Annotated[bool, typer.Option("--fresh", help="Retrain even if OUT holds a finished run of this setting.")] = False,
    samples: Annotated[int, typer.Option(help="Samples per problem for the sampled accuracy (avg@k at T=1).")] = 8,
) -> None:
    """Train a tiny RLVR run on CPU (minutes), extrapolate it from its first 10% and 20% of checkpoints
    with RELEX, and compare with the real final checkpoint on held-out problems."""
    from rich.table import Table

    from relex.demo import DEMO_PRESETS, run_demo
    from relex.errors import RelexInputError

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if preset not in DEMO_PRESETS:
        raise RelexInputError(f"unknown --preset {preset!r}; known: {', '.join(DEMO_PRESETS)}")
    config = DEMO_PRESETS[preset]()

    from relex_cli.console import progress_bars

    with progress_bars() as report:
        def say(message: str) -> None:
            report.pause()
            console.print(f"[dim]•[/dim] {message}")

        result = run_demo(out, config, fresh=fresh, samples=samples, progress=report, say=say)

    table = Table(title=f"relex demo: toy RLVR run '{config.name}' ({config.steps} steps), held-out accuracy")
    table.add_column("checkpoint")
    table.add_column("step", justify="right")
    table.add_column("greedy", justify="right")
    table.add_column(f"sampled avg@{samples}", justify="right")
    table.add_column("share of the real gain", justify="right")
    for row in result.rows:
        share = "—" if row.gain_fraction is None else f"{row.gain_fraction:+.2f}"
        table.add_row(row.label, str(row.step), f"{row.greedy:.3f}", f"{row.sampled:.3f}", share)
    console.print(table)
    for label, diagnostics in result.verdicts.items():
        verdict = diagnostics.get("verdict", "")
        style = VERDICT_STYLE.get(verdict, "bold")
        console.print(f"verdict from the first {label} (before any evaluation): "
                      f"[{style}]{diagnostics.get('message', '')}[/{style}]")
    for label, curve in result.probes.items():
        chosen = (f"step {curve['chosen']}" if curve["chosen"] is not None
                  else f"none: the last observed step {curve['reference_step']} stays")
        console.print(f"probe from the first {label} ({curve['probe']['problems']} training problems, "
                      f"{curve['tokens']:,} forward tokens): {chosen}")
    console.print(f"wrote {out / 'demo.json'} and {out / 'demo.png'} "
                  f"({result.seconds['total']:.0f} s: train {result.seconds['train']:.0f}, "
                  f"extrapolate {result.seconds['extrapolate']:.0f}, score {result.seconds['score']:.0f})")
