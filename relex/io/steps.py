"""Step selections as users write them: ``10,20,30``, ranges ``1-75`` and strides ``10-100:10``."""

from __future__ import annotations

import re
from typing import Sequence

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
