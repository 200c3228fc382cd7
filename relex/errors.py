"""Errors that relex reports to users as one line (exit code 2 on the command line)."""

from __future__ import annotations

from pathlib import Path


class RelexInputError(ValueError):
    """Bad input or usage: a file, folder or option the user can fix.

    ``str(error)`` is one line that names the offending file (when there is one) and the problem.
    """

    def __init__(self, problem: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


def one_line(exc: BaseException) -> str:
    """An error as one short line: relex's input errors as relex words them, anything else with its type."""
    text = str(exc) if isinstance(exc, RelexInputError) else f"{type(exc).__name__}: {exc}"
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."
