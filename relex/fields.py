"""Documented option fields: a dataclass field that carries the help text and the panel the command line shows.

relex's options are frozen dataclasses (:class:`relex.options.RunOptions`, :class:`relex.trajectory.ModelSpec`);
the command line is generated from their fields, so each default and each help text is written once.
"""

from __future__ import annotations

from dataclasses import MISSING, field


def option(default=MISSING, *, help: str, panel: str, flag: str | None = None, metavar: str | None = None,
           default_factory=MISSING, cli: bool = True):
    """A dataclass field documented for the command line: ``help`` and ``panel`` (the group ``--help`` lists it
    in); ``flag`` the option's name when it is not ``--field-name``; ``metavar`` the placeholder of its value;
    ``cli=False`` for a field the command line does not offer (a Python-only setting)."""
    metadata = {"help": help, "panel": panel, "flag": flag, "metavar": metavar, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)
