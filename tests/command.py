"""The installed ``relex`` command, run in its own process as a user runs it.

``relex`` is the console script next to the interpreter running the tests (``python -m relex_cli`` is not the
same program: it skips the entry point the package installs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RELEX = Path(sys.executable).parent / "relex"


def environment(**extra: str) -> dict[str, str]:
    """The tests' environment for a relex process: offline, one passive OpenMP thread pool, no colour codes."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "NO_COLOR": "1", "TERM": "dumb"}
    env.update(extra)
    return env


def relex(*args, timeout: float = 900, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``relex ARGS`` to completion; stdout and stderr captured as text."""
    assert RELEX.is_file(), f"the relex command is not installed next to {sys.executable}"
    return subprocess.run([str(RELEX), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or environment(), **kwargs)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The single line a refused input leaves on stderr (``relex: error: ...``), nothing else."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("relex: error: ") and "Traceback" not in done.stderr, done.stderr
    return lines[0]
