"""Where a run's checkpoints are: a folder, a Hub trajectory, a list of checkpoint folders, or snapshots in memory.

:func:`find_series` turns any of them into one :class:`relex.io.discover.CheckpointSeries`, which
:class:`relex.io.run_readers.RunReaders` then reads whatever it came from:

* a run folder (``str`` or ``Path``) holding ``checkpoint-N/``, ``global_step_N/``, ``global_stepN_hf/`` or
  ``step_N/`` folders (:func:`relex.io.discover.discover_series`);
* a Hub trajectory ``"hf://ORG/REPO[@REVISION]"``: its branches ``step_N`` (``revision_pattern``) or the folders
  of one revision (``subfolder_pattern``), fetched into the Hugging Face cache (:mod:`relex.io.hub`);
* a list of ``(step, folder)`` pairs;
* :class:`Snapshots`: tensors held in memory (a training loop's snapshots), with the rewards it logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from relex.errors import RelexInputError
from relex.io import hub
from relex.io.discover import Checkpoint, CheckpointSeries, discover_series
from relex.io.memory import MEMORY
from relex.io.steps import parse_steps

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Snapshots:
    """A run held in memory: the base's tensors (step 0) and the observed ones by step, in their own dtypes.

    ``rewards`` are ``(step, mean training reward)`` pairs the loop logged, which the verdict weighs as it weighs
    a run folder's ``trainer_state.json``.
    """

    base: Mapping
    observed: Sequence[tuple[int, Mapping]]
    rewards: Sequence[tuple[float, float]] = field(default=())


def describe(source) -> str:
    """How a run is named in messages and records."""
    if isinstance(source, Snapshots):
        return str(MEMORY)
    if isinstance(source, (str, Path)):
        return str(source)
    return "a list of checkpoints"


def find_series(source, *, base: str | Path | None = None, steps=None, max_step: int | None = None,
                revision_pattern: str = hub.DEFAULT_REVISION_PATTERN, subfolder_pattern: str | None = None,
                progress: ProgressCallback | None = None) -> CheckpointSeries:
    """The checkpoint series of ``source`` (see the module docstring), its observed steps chosen by ``steps`` and
    ``max_step``, over ``base`` when given (a folder, or a Hub id fetched to the cache). ``progress(name, done,
    total)`` gets the bytes a Hub download fetches. Raises :class:`RelexInputError` for a run that cannot be
    read, before anything is downloaded when the input is local and wrong."""
    if isinstance(source, Snapshots):
        return _in_memory(source, steps, max_step)
    hub_run = isinstance(source, str) and hub.parse_hub_run(source) is not None
    if not hub_run and (subfolder_pattern is not None or revision_pattern != hub.DEFAULT_REVISION_PATTERN):
        raise RelexInputError("--revision-pattern and --subfolder-pattern apply to Hub runs (hf://ORG/REPO) only")
    if isinstance(source, (str, Path)) and not hub_run and not Path(source).is_dir():
        raise RelexInputError("run folder does not exist or is not a folder", source)
    base_folder = _base_folder(base, progress)
    if hub_run:
        checkpoints = hub.resolve_hub_run(source, steps, revision_pattern=revision_pattern,
                                          subfolder_pattern=subfolder_pattern, progress=progress,
                                          max_step=max_step, include_base=base is None)
        return discover_series(checkpoints=checkpoints, base=base_folder)
    if isinstance(source, (str, Path)):
        return discover_series(Path(source), base=base_folder, steps=steps, max_step=max_step)
    return discover_series(checkpoints=list(source), base=base_folder, steps=steps, max_step=max_step)


def _base_folder(base, progress) -> Path | None:
    """A base named by a Hub id (``ORG/NAME`` or ``hf://ORG/NAME[@REVISION]``) fetched to the cache, or the folder."""
    if base is None:
        return None
    text = str(base)
    if hub.parse_hub_run(text) is not None or hub.is_hub_id(text):
        return hub.resolve_model(text, progress=progress)
    return Path(text)


def _in_memory(snapshots: Snapshots, steps, max_step) -> CheckpointSeries:
    observed = sorted((int(step), tensors) for step, tensors in snapshots.observed)
    if steps is not None:
        wanted = set(parse_steps(steps))
        observed = [(step, tensors) for step, tensors in observed if step in wanted]
    if max_step is not None:
        observed = [(step, tensors) for step, tensors in observed if step <= max_step]
    shapes = {name: tuple(t.shape) for name, t in snapshots.base.items()}
    for step, tensors in observed:
        if {name: tuple(t.shape) for name, t in tensors.items()} != shapes:
            raise RelexInputError(f"the snapshot of step {step} does not hold the base's tensors", MEMORY)
    if len(observed) < 2:
        raise RelexInputError(f"only {len(observed)} snapshot(s) besides the base; at least 2 are needed", MEMORY)
    return CheckpointSeries(Checkpoint(0, MEMORY / "step-0", "memory", snapshots.base),
                            [Checkpoint(step, MEMORY / f"step-{step}", "memory", tensors)
                             for step, tensors in observed],
                            rewards=tuple((float(s), float(r)) for s, r in snapshots.rewards) or None)
