"""Find the checkpoints of one training run and their real step numbers.

Recognised layouts (each gives a step number):

* HF Trainer / TRL / OpenRLHF: ``RUN/checkpoint-<N>/`` (``trainer_state.json["global_step"]`` must agree);
* verl merged to HF: ``RUN/global_step_<N>/actor/huggingface/`` or ``RUN/global_step_<N>/``;
* plain: ``RUN/step_<N>/`` and ``RUN/step<N>/``.

The base (step 0) is given explicitly or is the step-0 folder of the run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from relex.errors import RelexInputError

_PATTERNS = (
    re.compile(r"^checkpoint-(\d+)$"),
    re.compile(r"^global_step_(\d+)$"),
    re.compile(r"^step_?(\d+)$"),
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder and the training step it was saved at."""

    step: int
    path: Path


@dataclass
class CheckpointSeries:
    """A base checkpoint (step 0) and the observed checkpoints, sorted by step."""

    base: Checkpoint
    observed: list[Checkpoint] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.observed]

    @property
    def newest(self) -> Checkpoint:
        return self.observed[-1]


def has_weights(folder: Path) -> bool:
    """True when ``folder`` holds safetensors or pickled weights in a Hugging Face layout."""
    return any((folder / name).is_file() for name in WEIGHT_FILES + PICKLE_FILES) or any(
        folder.glob("*.safetensors")
    )


def _weights_folder(folder: Path) -> Path | None:
    """The folder holding the weights of a checkpoint folder (verl nests them in actor/huggingface)."""
    for candidate in (folder / "actor" / "huggingface", folder / "huggingface", folder):
        if candidate.is_dir() and has_weights(candidate):
            return candidate
    return None


def _step_of(name: str) -> int | None:
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def _check_trainer_state(folder: Path, step: int) -> None:
    """HF Trainer writes ``trainer_state.json`` into each checkpoint; its global_step must agree."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return
    try:
        recorded = json.loads(state_file.read_text()).get("global_step")
    except (OSError, ValueError) as exc:
        raise RelexInputError(f"cannot read trainer state ({exc})", state_file) from None
    if recorded is not None and int(recorded) != step:
        raise RelexInputError(f"global_step is {recorded} but the folder name says step {step}", state_file)


def scan_run(run_dir: str | Path) -> list[Checkpoint]:
    """All checkpoints found directly inside ``run_dir``, sorted by step (step 0 included)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RelexInputError("run folder does not exist or is not a folder", run_dir)
    found: dict[int, Checkpoint] = {}
    for child in sorted(run_dir.iterdir()):
        if not child.is_dir():
            continue
        step = _step_of(child.name)
        if step is None:
            continue
        weights = _weights_folder(child)
        if weights is None:
            continue
        _check_trainer_state(child, step)
        if step in found:
            raise RelexInputError(
                f"duplicate step {step}: {found[step].path.name} and {child.name}", run_dir
            )
        found[step] = Checkpoint(step, weights)
    return [found[s] for s in sorted(found)]


def _parse_steps(steps: str | Sequence[int] | None) -> list[int] | None:
    if steps is None:
        return None
    if isinstance(steps, str):
        try:
            values = [int(s) for s in steps.replace(" ", "").split(",") if s]
        except ValueError:
            raise RelexInputError(f"--steps must be comma-separated integers, got {steps!r}") from None
    else:
        values = [int(s) for s in steps]
    if len(set(values)) != len(values):
        raise RelexInputError(f"duplicate steps in --steps: {values}")
    return sorted(values)


def discover_series(
    run_dir: str | Path | None = None,
    *,
    base: str | Path | None = None,
    steps: str | Sequence[int] | None = None,
    max_step: int | None = None,
    checkpoints: Iterable[tuple[int, str | Path]] | None = None,
    min_observed: int = 2,
) -> CheckpointSeries:
    """Build the checkpoint series of a run.

    Either ``run_dir`` is scanned for recognised layouts, or ``checkpoints`` lists ``(step, folder)``
    pairs explicitly. ``steps`` keeps only those steps; ``max_step`` keeps steps up to it. The base is
    ``base`` when given, otherwise the run's step-0 checkpoint. Raises :class:`RelexInputError` when the
    series is unusable (no checkpoints, fewer than ``min_observed``, duplicate steps, no base).
    """
    if checkpoints is not None:
        found = []
        for step, folder in checkpoints:
            folder = Path(folder)
            weights = _weights_folder(folder) if folder.is_dir() else None
            if weights is None:
                raise RelexInputError("no model weights (model.safetensors or index) found", folder)
            found.append(Checkpoint(int(step), weights))
        seen = [c.step for c in found]
        dupes = sorted({s for s in seen if seen.count(s) > 1})
        if dupes:
            raise RelexInputError(f"duplicate steps in the checkpoint list: {dupes}")
        found.sort(key=lambda c: c.step)
        where: Path | None = None
    else:
        if run_dir is None:
            raise RelexInputError("give a run folder or an explicit list of checkpoints")
        found = scan_run(run_dir)
        where = Path(run_dir)
        if not found:
            raise RelexInputError(
                "no checkpoints found (expected checkpoint-N/, global_step_N/ or step_N/ folders "
                "holding model weights)",
                where,
            )

    if base is not None:
        base_path = Path(base)
        weights = _weights_folder(base_path) if base_path.is_dir() else None
        if weights is None:
            raise RelexInputError("base folder holds no model weights", base_path)
        base_ckpt = Checkpoint(0, weights)
        found = [c for c in found if c.step != 0]
    else:
        zero = [c for c in found if c.step == 0]
        if not zero:
            raise RelexInputError(
                "no base checkpoint: pass --base or include a step-0 folder (e.g. checkpoint-0)", where
            )
        base_ckpt = zero[0]
        found = [c for c in found if c.step != 0]

    wanted = _parse_steps(steps)
    if wanted is not None:
        by_step = {c.step: c for c in found}
        missing = [s for s in wanted if s not in by_step]
        if missing:
            raise RelexInputError(f"--steps names steps with no checkpoint: {missing}", where)
        found = [by_step[s] for s in wanted]
    if max_step is not None:
        found = [c for c in found if c.step <= max_step]
    if any(c.step < 0 for c in found):
        raise RelexInputError("step numbers must not be negative", where)
    if len(found) < min_observed:
        raise RelexInputError(
            f"only {len(found)} observed checkpoint(s) besides the base; at least {min_observed} are needed",
            where,
        )
    return CheckpointSeries(base=base_ckpt, observed=found)
