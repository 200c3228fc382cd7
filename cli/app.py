"""Entry point of the ``relex`` command.

Every command parses its options and calls the library. Errors the user can fix
(:class:`relex.RelexInputError`) become one line on stderr and exit code 2; anything else is an
internal error (exit 1).
"""

from __future__ import annotations

import sys

import typer

from relex.errors import RelexInputError

app = typer.Typer(
    name="relex",
    help="Extrapolate RLVR checkpoints along their low-rank trajectory, and tell whether that is safe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    # Each command lives in its own module; importing it registers it on ``app``.
    import importlib

    for module in ("extrapolate", "eval", "analyze", "demo", "fit"):
        try:
            importlib.import_module(f"relex_cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"relex_cli.{module}":
                raise


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 2 bad input, 1 internal error)."""
    _register_commands()
    try:
        app(args=argv, standalone_mode=False)
    except RelexInputError as exc:
        print(f"relex: error: {exc}", file=sys.stderr)
        return 2
    except (typer.Exit, SystemExit) as exc:  # --help, explicit exits
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except typer.Abort:
        print("relex: aborted", file=sys.stderr)
        return 1
    except Exception as exc:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
