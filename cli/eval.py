"""``relex eval``: score checkpoints on math benchmarks with lm-evaluation-harness."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from relex_cli.app import app
from relex_cli.console import GATE, SummaryOption, console

BENCHMARKS = "Benchmarks"
DECODING = "Decoding"
MODEL = "Model"
OUTPUT = "Output"


def _print_table(results, title: str) -> None:
    """One row per benchmark (and the mean), one column per checkpoint; differences to the first below."""
    from rich.table import Table

    from relex.evaluate.results import format_difference

    rows = results.columns
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("benchmark")
    for index, label in enumerate(results.labels):
        table.add_column(label + (" (baseline)" if index == 0 and len(results.labels) > 1 else ""), justify="right")
    for task in rows:
        if task == "mean":
            name = "mean"
        else:
            metric = results.data["tasks"][task].get("metric", "")
            name = f"{task}\n[dim]{metric} · n={results.problem_count(task)}[/dim]"
        cells = []
        for label in results.labels:
            cell = results.percent(task, label)
            difference = results.difference(task, label)
            if difference:
                style = "green" if difference["ci_low"] > 0 else "red" if difference["ci_high"] < 0 else "dim"
                cell += f"\n[{style}]{format_difference(difference)}[/{style}]"
            cells.append(cell)
        table.add_row(name, *cells, end_section=len(rows) > 1 and rows[-1] == "mean" and task == rows[-2])
    console.print(table)
    confidence = next((d.get("confidence") for task in rows for label in results.labels[1:]
                       if (d := results.difference(task, label))), None)
    if confidence:
        console.print(f"[dim]accuracy in %; below: difference to {results.labels[0]} in points, "
                      f"[{100 * confidence:.0f}% paired-bootstrap interval over problems][/dim]")


@app.command("eval", no_args_is_help=True)
def eval_command(
    checkpoints: Annotated[Optional[list[str]], typer.Argument(
        help="Checkpoint folders (or hub ids) to score; the first is the baseline of the comparison. "
             "Name one with LABEL=PATH.", show_default=False, metavar="CKPT")] = None,
    tasks: Annotated[str, typer.Option(
        help="Comma-separated benchmarks: aime24, aime25, amc23, minerva_math (the OCW set), math500, toy; "
             "'all' for the five math benchmarks.", rich_help_panel=BENCHMARKS)] = "aime24,aime25,amc23,minerva_math,math500",
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Read <task>.jsonl from this folder instead of the Hugging Face hub.",
        rich_help_panel=BENCHMARKS, show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(
        help="Only the first N problems of each benchmark (smoke tests).", min=1, rich_help_panel=BENCHMARKS,
        show_default=False)] = None,
    samples: Annotated[int, typer.Option(
        help="Completions per problem: reports avg@K and pass@k (needs --temperature > 0 when K > 1).", min=1,
        rich_help_panel=DECODING)] = 1,
    temperature: Annotated[float, typer.Option(
        help="Sampling temperature; 0 is greedy decoding.", min=0.0, rich_help_panel=DECODING)] = 0.0,
    top_p: Annotated[float, typer.Option(
        "--top-p", help="Nucleus sampling threshold (with --temperature > 0).", min=0.0, max=1.0,
        rich_help_panel=DECODING)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", help="Generation budget per completion (math benchmarks; toy answers take 4 tokens).",
        min=1, rich_help_panel=DECODING)] = 2048,
    prompt: Annotated[str, typer.Option(
        help="auto (chat template when the tokenizer has one), chat, or plain ('Problem: ... Solution:').",
        rich_help_panel=DECODING)] = "auto",
    system_prompt: Annotated[Optional[str], typer.Option(
        "--system-prompt", help="System message for chat prompts.", rich_help_panel=DECODING,
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of sampling and of the bootstrap.", rich_help_panel=DECODING)] = 0,
    logits_extrapolate: Annotated[Optional[list[str]], typer.Option(
        "--logits-extrapolate", help="Also score logits extrapolation, z_a + alpha (z_b - z_a) at every decoding "
        "step, as a column after the checkpoints: a=CKPT_A,b=CKPT_B,alpha=2.5; or target=STEP instead of alpha "
        "(alpha = (STEP - step_a) / (step_b - step_a), steps from trainer_state.json or the folder names); or "
        "run=RUN,target=STEP[,steps=...|max_step=K][,a=STEP,b=STEP] (a, b: the two newest checkpoints of the "
        "window). Also label=NAME, device_a=, device_b=. Repeatable.", rich_help_panel=DECODING,
        show_default=False, metavar="SPEC")] = None,
    selective: Annotated[Optional[list[str]], typer.Option(
        "--selective", help="Also score selective Δlog p extrapolation as a column: decode with the RL model and "
        "where log p_RL(y) - log p_base(y) < tau resample from log p_RL + gamma (log p_RL - log p_base): "
        "base=BASE,rl=RL[,tau=-0.3][,gamma=0.1], or run=RUN[,steps=...|max_step=K] (the run's base and newest "
        "checkpoint). Also label=NAME, device_base=, device_rl=. Repeatable.", rich_help_panel=DECODING,
        show_default=False, metavar="SPEC")] = None,
    backend: Annotated[str, typer.Option(
        help="hf (transformers, CPU or GPU) or vllm (GPU, needs vLLM installed).", rich_help_panel=MODEL)] = "hf",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (hf backend).", rich_help_panel=MODEL)] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.", rich_help_panel=MODEL)] = "auto",
    batch_size: Annotated[str, typer.Option(
        "--batch-size", help="Prompts per forward pass, or auto (8 on a CPU; lm-eval's probe on a GPU).",
        rich_help_panel=MODEL)] = "auto",
    model_args: Annotated[Optional[str], typer.Option(
        "--model-args", help="Extra lm-eval model arguments, e.g. gpu_memory_utilization=0.8,max_model_len=8192.",
        rich_help_panel=MODEL, show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Write per-problem results, summaries and differences to this JSON file.", rich_help_panel=OUTPUT,
        show_default=False)] = None,
    completions: Annotated[bool, typer.Option(
        "--completions", help="Also store every completion's text in --out.", rich_help_panel=OUTPUT)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress display.", rich_help_panel=OUTPUT)] = False,
    fail_if_worse: Annotated[bool, typer.Option(
        "--fail-if-worse", help="Exit 3 when a checkpoint is worse than the first one by more than --margin with "
        "confidence: the upper end of its 95% paired-bootstrap interval (on the mean over tasks; on the task "
        "with one) lies below −margin.", rich_help_panel=GATE)] = False,
    margin: Annotated[float, typer.Option(
        help="With --fail-if-worse: the loss in accuracy points (1.0 = one percentage point) that is tolerated.",
        min=0.0, rich_help_panel=GATE)] = 0.0,
    summary_path: SummaryOption = None,
) -> None:
    """Score checkpoints on AIME 24/25, AMC 23, Minerva math and MATH-500 with lm-evaluation-harness.

    The final \\boxed{} answer is compared with math-verify; with --samples K the score is avg@K (pass@k in --out). Each checkpoint runs in its own process. With two or more checkpoints, each is compared to the first with a 95% paired-bootstrap interval over problems.

    Exit codes: 0 scored (and, with --fail-if-worse, no checkpoint worse than the first); 3 --fail-if-worse: a checkpoint is worse than the first by more than --margin with 95% confidence; 2 bad input; 1 internal error.
    """  # noqa: E501 - one line per paragraph, wrapped by the help formatter
    from relex.decoding import parse_logits, parse_selective

    checkpoints = list(checkpoints or [])
    decoders = [parse_logits(text) for text in logits_extrapolate or []] + [
        parse_selective(text) for text in selective or []]
    from relex.evaluate import evaluate
    from relex.evaluate.gate import check_gate_options, judge

    from relex_cli.console import check_output_files

    check_output_files(summary_path)
    if fail_if_worse:
        check_gate_options(len(checkpoints) + len(decoders), margin)
    from relex_cli.console import progress_bars

    with progress_bars(disable=quiet) as view:
        results = evaluate(
            checkpoints, tasks=tasks, data_dir=data_dir, samples=samples, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, limit=limit, backend=backend, device=device, dtype=dtype,
            batch_size=batch_size, seed=seed, prompt=prompt, system_prompt=system_prompt, model_args=model_args,
            keep_completions=completions, decoders=decoders, out=out, progress=view,
        )
    from relex.evaluate.tasks import TASKS

    decoding = ["greedy" if temperature == 0 else f"T={temperature:g}, top-p={top_p:g}"]
    if any(TASKS[task].kind == "math" for task in results.tasks):
        decoding.append(f"≤{max_new_tokens} new tokens")
    _print_table(results, title=f"relex eval · avg@{samples} ({', '.join(decoding)})")
    if out is not None:
        console.print(f"wrote results → [bold]{out}[/bold]")
    gate = None
    if fail_if_worse:
        gate = judge(results, margin)
        _print_gate(gate)
    from relex.evaluate.summary import eval_markdown
    from relex.summaries import write_summary

    write_summary(eval_markdown(results, gate), summary_path)
    if gate is not None and not gate.passed:
        raise typer.Exit(3)


def _print_gate(gate) -> None:
    """The --fail-if-worse line; in a GitHub Actions job a failure is also an annotation on the run page."""
    import os

    if gate.passed:
        console.print(f"gate: [bold green]passed[/bold green] (exit 0): {gate.reason()}")
        return
    console.print(f"gate: [bold red]failed[/bold red] (exit 3): {gate.reason()}")
    if os.environ.get("GITHUB_ACTIONS") == "true":
        print(f"::error title=relex eval::{gate.reason()}", flush=True)
