"""Steps as users write them: selections ``10,20,30``, ranges ``1-75`` and strides ``10-100:10``; target steps."""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from relex.errors import RelexInputError

# The largest step a training run can count to (a signed 64-bit counter, as in PyTorch and every trainer).
MAX_STEP = 2**63 - 1

_RANGE = re.compile(r"^(\d+)-(\d+)(?::(\d+))?$")


def parse_steps(text: str | Sequence[int]) -> list[int]:
    """Steps from ``"10,20,30"``, ranges ``"1-75"`` (inclusive) and ``"10-100:10"`` (every 10th), or a list.

    Returns the sorted steps; raises :class:`RelexInputError` on malformed text or duplicates.
    """
    if isinstance(text, str):
        values: list[int] = []
        for part in text.replace(" ", "").split(","):
            if not part:
                continue
            match = _RANGE.match(part)
            if match:
                first, last, stride = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
                if last < first or stride < 1:
                    raise RelexInputError(f"--steps range {part!r} is empty (write FIRST-LAST or FIRST-LAST:STRIDE)")
                values.extend(range(first, last + 1, stride))
            elif part.isdigit():
                values.append(int(part))
            else:
                raise RelexInputError(
                    f"--steps must be integers or ranges like 1-75 or 10-100:10, separated by commas; got {part!r}")
    else:
        values = [int(s) for s in text]
    if len(set(values)) != len(values):
        raise RelexInputError(f"duplicate steps in --steps: {sorted({v for v in values if values.count(v) > 1})}")
    return sorted(values)


def parse_targets(value) -> tuple[int, ...]:
    """The target steps, sorted and unique: one step (an int, or its text), several as ``"100,200"``, or a list.

    Every target is an integer from 1 to 2⁶³ − 1 (a step a training run can reach); anything else raises
    :class:`RelexInputError`.
    """
    if isinstance(value, str):
        parts = [part for part in value.replace(" ", "").split(",") if part]
    elif isinstance(value, (int, float, np.integer, np.floating)):
        parts = [value]
    else:
        parts = list(value)
    if not parts:
        raise RelexInputError("give at least one --target-step")
    targets = set()
    for part in parts:
        number = _integer(part)
        if number is None:
            raise RelexInputError(f"--target-step must be an integer or a comma-separated list of integers, got "
                                  f"{value!r}")
        if not 1 <= number <= MAX_STEP:
            shown = str(number) if len(str(number)) <= 30 else f"a {len(str(abs(number)))}-digit number"
            raise RelexInputError(f"--target-step {shown} is not a training step: steps run from 1 to 2^63 − 1 "
                                  f"({MAX_STEP})")
        targets.add(number)
    return tuple(sorted(targets))


def _integer(value) -> int | None:
    """``value`` as an int when it is one (``12``, ``"12"``, ``12.0``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None
