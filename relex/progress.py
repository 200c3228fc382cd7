"""Progress of long work, as events: one protocol for everything relex does that takes time.

Work reports :class:`Progress` events to a callable (``report(event)``); whoever started it decides how they are
shown: the command line draws rich progress bars (``relex_cli.console``), a notebook or a trainer takes
:class:`LogProgress` (the ``logging`` module) or :class:`TqdmProgress`, a script may pass ``None`` (silent).
Inner loops that count bytes keep the plain ``(item, done, total)`` callback of the pass; :func:`bytes_of` makes
one that reports events.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Progress:
    """How far one task is: ``done`` of ``total`` (None: unknown) ``unit`` (``"B"`` bytes, ``""`` items);
    ``item`` what it is working on now (a tensor, a file, a checkpoint)."""

    task: str
    done: float
    total: float | None = None
    unit: str = "B"
    item: str = ""

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


Report = Optional[Callable[[Progress], None]]


def bytes_of(report: Report, task: str) -> Callable[[str, int, int], None] | None:
    """The pass's ``(item, done, total)`` byte callback, reporting :class:`Progress` events of ``task``."""
    if report is None:
        return None

    def update(item: str, done: int, total: int) -> None:
        report(Progress(task, done, total, "B", item))

    return update


def counts_of(report: Report, task: str) -> Callable[[int, int], None] | None:
    """A ``(done, total)`` callback over items (checkpoints, prompts), reporting :class:`Progress` events."""
    if report is None:
        return None

    def update(done: int, total: int) -> None:
        report(Progress(task, done, total, ""))

    return update


class LogProgress:
    """Progress events as log lines (``logging``, logger ``relex``): one per task at most every ``every`` seconds,
    and one when it ends. For notebooks and training loops."""

    def __init__(self, logger: logging.Logger | None = None, every: float = 10.0, level: int = logging.INFO):
        self.logger = logger or logging.getLogger("relex")
        self.every, self.level = every, level
        self.last: dict[str, float] = {}

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        finished = event.total is not None and event.done >= event.total
        if not finished and now - self.last.get(event.task, -1e9) < self.every:
            return
        self.last[event.task] = now
        self.logger.log(self.level, "%s: %s%s", event.task, _amount(event), f" ({event.item})" if event.item else "")


class TqdmProgress:
    """Progress events as tqdm bars, one per task (needs ``tqdm``; ``tqdm.auto`` in notebooks)."""

    def __init__(self):
        from tqdm.auto import tqdm  # optional: only when asked for

        self.tqdm = tqdm
        self.bars: dict[str, object] = {}

    def __call__(self, event: Progress) -> None:
        bar = self.bars.get(event.task)
        if bar is None:
            bar = self.bars[event.task] = self.tqdm(total=event.total, desc=event.task, unit=event.unit or "it",
                                                    unit_scale=event.unit == "B", leave=False)
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        bar.n = event.done
        bar.set_postfix_str(event.item, refresh=False)
        bar.refresh()
        if event.total is not None and event.done >= event.total:
            bar.close()
            del self.bars[event.task]


def _amount(event: Progress) -> str:
    if event.unit == "B":
        done = f"{event.done / 1e9:.2f} GB"
        return done if not event.total else f"{done} of {event.total / 1e9:.2f} GB"
    done = f"{event.done:g}"
    return done if not event.total else f"{done} of {event.total:g}"
