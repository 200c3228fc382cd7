"""The one JSON encoder of relex's records (``relex.json``, ``relex check --json``, ``analysis.json``,
``trajectory.json``, ``results.json``): JSON has no NaN or infinity, so a non-finite number is written as
``null``; numpy scalars and arrays become Python numbers and lists, paths and enumerations their text."""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path, PurePath

import numpy as np


def jsonable(value):
    """``value`` with every number finite or ``None``, every key a string, every container a list or a dict."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, indent: int | None = 2) -> str:
    """``value`` as JSON text (see :func:`jsonable`)."""
    return json.dumps(jsonable(value), indent=indent, ensure_ascii=False)


def write_json(path: str | Path, value) -> Path:
    """Write ``value`` as JSON (see :func:`jsonable`) to ``path``, with a final newline; returns the path."""
    path = Path(path)
    path.write_text(dumps(value) + "\n", encoding="utf-8")
    return path
