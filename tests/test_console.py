"""The command line's progress where stderr is not a terminal (a log file, a CI job): plain lines now and then."""

from __future__ import annotations

from types import SimpleNamespace

from relex.progress import Progress
from relex_cli import console


def test_progress_without_a_terminal_is_a_line_now_and_then(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(console, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    lines = console.ProgressLines(after=10, every=30)
    for now, done in [(0, 0), (5, 1), (11, 2), (20, 3), (41, 4), (50, 10)]:
        clock[0] = now
        lines(Progress("training the toy run", done, 10, "", f"step {done}"))
    clock[0] = 60
    lines(Progress("reading", 5_000_000, 5_000_000, "B", "a.safetensors"))  # ended before 10 s: nothing
    for now in (70, 85):  # a task of the same name starts anew after it ended
        clock[0] = now
        lines(Progress("training the toy run", 1, None, "", "step 1"))
    assert capsys.readouterr().err.splitlines() == [
        "training the toy run: 2/10, 11 s (step 2)",
        "training the toy run: 4/10, 41 s (step 4)",
        "training the toy run: 10/10, 50 s",
        "training the toy run: 1, 15 s (step 1)",
    ]


def test_the_command_line_draws_lines_without_a_terminal_and_nothing_when_quiet(monkeypatch):
    monkeypatch.setattr(console.err_console, "_force_terminal", False)
    with console.progress_bars() as report:
        assert isinstance(report, console.ProgressLines)
    with console.progress_bars(disable=True) as report:
        assert not isinstance(report, console.ProgressLines)
