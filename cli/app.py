"""Entry point of the ``relex`` command.

Every command parses its options and calls the library. Errors the user can fix
(:class:`relex.RelexInputError`) become one line on stderr and exit code 2; anything else is an
internal error (exit 1). Under torchrun every rank runs the command and exits with the same code; rank 0
alone prints (errors included), so a run prints what one process would.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading

import typer

from relex.errors import RelexInputError
from relex_cli.console import rank_zero

app = typer.Typer(
    name="relex",
    help="Extrapolate RLVR checkpoints along their low-rank trajectory, and tell whether that is safe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


def register_commands() -> None:
    # Each command lives in its own module; importing it registers it on ``app``.
    import importlib

    for module in ("extrapolate", "check", "eval", "analyze", "demo", "fit"):
        try:
            importlib.import_module(f"relex_cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"relex_cli.{module}":
                raise


@app.callback()
def _root() -> None:
    """Extrapolate RLVR checkpoints along their low-rank trajectory, and tell whether that is safe."""


def _load_torch(args: list[str]) -> None:
    """Import torch before a command runs, with the garbage collector paused, and freeze what it allocated.

    Importing torch creates about 170,000 long-lived objects; the collector's full passes over them while it
    loads took 0.15-0.35 s of a 1.2-1.5 s start-up, and each later full pass (during a command's work,
    holding every thread up) another 50 ms. Frozen objects are left out of every later pass. Nothing is done
    for help (no command needs torch there) or in a process that has loaded torch already (a notebook, a
    test session: its objects are not for this command to freeze).
    """
    if not args or {"--help", "-h"} & set(args) or "torch" in sys.modules or not gc.isenabled():
        return
    gc.disable()
    try:
        import torch  # noqa: F401  (start-up: every command's work needs it, help does not)
    finally:
        gc.freeze()
        gc.enable()


# click's exception classes as the installed typer raises them (typer 0.28 and later carry their own click).
_CLICK_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}


def _asks_for_help(error: Exception) -> bool:
    """``relex`` or ``relex COMMAND`` with nothing else: click answers with the help, as an error."""
    return type(error).__name__ == "NoArgsIsHelpError" and getattr(error, "ctx", None) is not None


def _usage_error(error: Exception) -> str:
    """One line for a usage error (``relex: error: …, see relex COMMAND --help``); the help when that was it."""
    context = getattr(error, "ctx", None)
    if _asks_for_help(error):
        return context.get_help()
    message = " ".join(error.format_message().split())
    if isinstance(error, _CLICK_ERRORS["UsageError"]):
        command = context.command_path if context is not None else "relex"
        message += f" (see {command} --help)"
    return f"relex: error: {message}"


# Commands that would repeat their whole work (and write the same files) on every rank of a launch.
SINGLE_PROCESS_COMMANDS = ("eval", "demo", "materialize")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 3 a gate failed, 2 bad input or usage, 1 internal
    error)."""
    register_commands()
    _load_torch(sys.argv[1:] if argv is None else list(argv))
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    joined = False
    try:
        if launched:
            # start-up: torch.distributed loads only under a launcher. The ranks meet before any work and leave
            # together (below), so no rank ends, and no launcher stops the others, before rank 0 has printed.
            from relex.distributed import join

            join()
            joined = True
            command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
            if command in SINGLE_PROCESS_COMMANDS:
                raise RelexInputError(f"relex {command} runs in one process: start it without torchrun")
        # Not click's standalone mode: a usage error is one line like every other bad input, not a framed panel.
        code = app(args=argv, prog_name="relex", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except RelexInputError as exc:
        if rank_zero():
            print(f"relex: error: {exc}", file=sys.stderr)
        return 2
    except _CLICK_ERRORS["ClickException"] as exc:
        if rank_zero():
            print(_usage_error(exc), file=sys.stdout if _asks_for_help(exc) else sys.stderr)
        return exc.exit_code
    except typer.Abort:  # end of input while a prompt read it
        return 1
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        if joined:
            from relex.distributed import leave  # start-up: loaded above

            leave()
    return 0


class _StdoutWithoutReader:
    """``sys.stdout`` that outlives its reader (``relex check … | head -1``): the command still finishes its work
    (its ``--json``, its output folder) and exits with its own code; what it prints after the reader has gone
    is dropped, as nobody reads it, instead of a ``BrokenPipeError`` ending the command as an internal error."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        # what is still buffered, and all that follows, goes to /dev/null from now on
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run() -> None:
    """The ``relex`` command (its console script, ``python -m relex_cli``): :func:`main`, then end the process.

    Python's own exit would then take every module down object by object: 0.1 s with torch loaded, on every run
    of ``relex``. Once the command is done and its threads are gone, the process ends after what that exit does
    first (the ``atexit`` handlers: logging, multiprocessing, torch's; the standard streams flushed), in 0.015
    s. With a thread still running, Python's exit waits for it as usual.
    """
    sys.stdout = _StdoutWithoutReader(sys.stdout)
    code = main()
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()  # noqa: SLF001 - the handlers sys.exit runs before its teardown
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: what Python's exit would ignore too
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
