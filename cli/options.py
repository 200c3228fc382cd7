"""The command line's run options, generated from :class:`relex.options.RunOptions` and its model.

A command declares which settings it takes (``@run_options("base", "steps", "model", ...)``) and receives them
as one ``options: RunOptions``; each flag, default, help text and panel comes from the field it sets, so it is
written once, in :mod:`relex.options` (and :class:`relex.trajectory.ModelSpec`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Annotated, Optional

import typer

from relex.errors import RelexInputError
from relex.options import RunOptions
from relex.model_spec import ModelSpec

# Settings every command that reads a run takes.
INPUT_FIELDS = ("base", "steps", "max_step", "revision_pattern", "subfolder_pattern", "allow_pickle")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec) if f.metadata.get("cli", True))
REWARD_FIELDS = ("rewards", "reward_key", "reward_max")
PROBE_FIELDS = ("probe", "probe_limit", "probe_mode", "probe_confidence", "probe_looks", "probe_batch",
                "probe_max_new_tokens", "horizon_limit")

RUN_DIR_HELP = ("Run folder holding checkpoint-N/, global_step_N/ or step_N/ folders, or a Hub run "
                "hf://ORG/REPO[@REVISION] (see --revision-pattern, --subfolder-pattern).")
# RUN_DIR is a string: a Path would collapse the // of a Hub run (hf://ORG/REPO).
RunDirArgument = Annotated[str, typer.Argument(help=RUN_DIR_HELP, show_default=False)]


def _fields() -> dict[str, dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(RunOptions) if f.name != "model"}
    fields.update({f.name: f for f in dataclasses.fields(ModelSpec)})
    return fields


def _hints() -> dict[str, object]:
    hints = typing.get_type_hints(RunOptions)
    hints.update(typing.get_type_hints(ModelSpec))
    return hints


def _cli_type(hint) -> type:
    """What the command line parses a field's value as: lists, unions and tuples are given as text."""
    if hint is bool:
        return bool
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint in (int, float, str):
        return hint
    if len(args) == 1 and args[0] in (int, float, str):
        return args[0]
    return str


def parameter(name: str, *, help: str | None = None, panel: str | None = None, required: bool = False,
              default=dataclasses.MISSING, metavar: str | None = None) -> inspect.Parameter:
    """The typer parameter of one field (``help``, ``panel``, ``required``, ``default`` or ``metavar`` for this
    command)."""
    field = _fields()[name]
    meta = field.metadata
    kind = _cli_type(_hints()[name])
    value = field.default if default is dataclasses.MISSING else default
    if value is dataclasses.MISSING:  # a default factory: not on the command line
        value = None
    flag = meta.get("flag") or "--" + name.replace("_", "-")
    shown = None if value in ((), None) else value
    if isinstance(shown, tuple):
        shown = ",".join(map(str, shown))
    settings = dict(help=help or meta["help"], rich_help_panel=panel or meta["panel"], metavar=metavar or meta.get("metavar"),
                    show_default=shown is not None and kind is not bool)
    if kind is bool:
        annotation = Annotated[bool, typer.Option(flag, **settings)]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=bool(value))
    if required:
        annotation = Annotated[kind, typer.Option(flag, **{**settings, "show_default": False})]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)
    annotation = Annotated[Optional[kind], typer.Option(flag, **settings)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=None if shown is None else shown)


def run_options(*names: str, required: tuple[str, ...] = (), help: dict[str, str] | None = None,
                panels: dict[str, str] | None = None, defaults: dict | None = None):
    """Give a command the :class:`RunOptions` settings ``names`` (``"model"``: every model option) in place of its
    ``options`` parameter; it receives them as one ``RunOptions``. ``required``, ``help``, ``panels`` and
    ``defaults`` adjust a field for this command."""
    expanded = [m for n in names for m in (MODEL_FIELDS if n == "model" else (n,))]
    help, panels, defaults = help or {}, panels or {}, defaults or {}
    probed = "probe" in expanded  # --target-step auto is the probe's choice: only where a probe can be given

    def wrap(command):
        signature = inspect.signature(command, eval_str=True)
        parameters = []
        for each in signature.parameters.values():
            if each.name == "options":
                parameters += [parameter(n, help=help.get(n), panel=panels.get(n), required=n in required,
                                         default=defaults.get(n, dataclasses.MISSING),
                                         metavar=None if probed or n != "target_steps" else "N") for n in expanded]
            else:
                parameters.append(each.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def with_options(**given):
            settings = {n: given.pop(n) for n in expanded if n in given}
            settings = {n: v for n, v in settings.items() if v is not None}
            if not probed and str(settings.get("target_steps", "")).strip().lower() == "auto":
                raise RelexInputError("--target-step auto is the probe's choice: give it to relex extrapolate or "
                                      "relex check with --probe")
            return command(options=RunOptions.of(**settings), **given)

        with_options.__signature__ = signature.replace(parameters=parameters)
        return with_options

    return wrap
