"""Find the checkpoints of one training run, their real step numbers and how to read each.

Recognised layouts (each gives a step number):

* HF Trainer / TRL: ``RUN/checkpoint-<N>/`` (``trainer_state.json["global_step"]`` must agree), with full
  weights or a PEFT LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``);
* verl: ``RUN/global_step_<N>/actor/`` with per-rank FSDP shards (``model_world_size_W_rank_R.pt``), a
  LoRA adapter in ``actor/lora_adapter/``, or weights merged to HF in ``actor/huggingface/``;
* OpenRLHF: ``RUN/global_step<N>_hf/`` (``--ckpt.save_hf``); its DeepSpeed folders ``global_step<N>/`` are
  refused with the conversion to run;
* plain: ``RUN/step_<N>/`` and ``RUN/step<N>/``.

Each checkpoint says which :class:`relex.io.source.Source` reads it (``kind``: ``hf``, ``fsdp`` or ``lora``).
Folders holding a ``relex.json`` were written by relex, not by training: they are skipped and reported.
The base (step 0) is given explicitly, is the run's step-0 folder, or — for LoRA runs — the model named by
the adapter's ``base_model_name_or_path``; a Hub id (``ORG/NAME``) is fetched through the Hugging Face cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from relex.errors import RelexInputError
from relex.io import hub
from relex.io.fsdp import is_fsdp_folder
from relex.io.steps import parse_steps

_PATTERNS = (
    re.compile(r"^checkpoint-(\d+)$"),
    re.compile(r"^global_step_?(\d+)(?:_hf)?$"),
    re.compile(r"^step_?(\d+)$"),
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "relex.json"  # written by relex into every output folder

# What each trainer calls the settings that keep more checkpoints, by the layout of the run.
RETENTION = {
    "hf": "HF Trainer / TRL: save_steps (smaller) and save_total_limit (None keeps all)",
    "verl": "verl: trainer.save_freq (smaller) and trainer.max_actor_ckpt_to_keep (null keeps all)",
    "openrlhf": ("OpenRLHF: --ckpt.save_steps (smaller), --ckpt.max_num (larger) and --ckpt.save_hf "
                 "(before 0.10.4: --save_steps, --max_ckpt_num, --save_hf_ckpt)"),
    "plain": "save a checkpoint more often during training and keep them all",
}


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder, the training step it was saved at, and how to read it.

    ``kind`` is ``hf`` (safetensors or pickled weights in a Hugging Face folder), ``fsdp`` (verl's per-rank
    shards; ``path`` is the ``actor/`` folder), ``lora`` (a PEFT adapter over the base) or ``memory`` (tensors
    held in memory, ``tensors``; ``path`` only names them).
    """

    step: int
    path: Path
    kind: str = "hf"
    tensors: Mapping | None = field(default=None, compare=False, repr=False)


@dataclass
class CheckpointSeries:
    """A base checkpoint (step 0) and the observed checkpoints, sorted by step.

    ``skipped`` lists folders that looked like checkpoints but were not read, with the reason (e.g. an
    output of relex); ``layout`` names the trainer layout (``hf``, ``verl``, ``openrlhf``, ``plain``).
    """

    base: Checkpoint
    observed: list[Checkpoint] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    layout: str = "plain"
    rewards: tuple[tuple[float, float], ...] | None = None  # (step, mean reward) logged beside in-memory runs

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.observed]

    @property
    def newest(self) -> Checkpoint:
        return self.observed[-1]

    def retention_hint(self) -> str:
        """Which trainer setting keeps more checkpoints for this run's layout."""
        return "to keep more checkpoints, set " + RETENTION.get(self.layout, RETENTION["plain"])


def has_weights(folder: Path) -> bool:
    """True when ``folder`` holds safetensors or pickled weights in a Hugging Face layout."""
    return any((folder / name).is_file() for name in WEIGHT_FILES + PICKLE_FILES) or any(
        folder.glob("*.safetensors")
    ) or any(folder.glob("pytorch_model*.bin"))


def is_adapter(folder: Path) -> bool:
    """True when ``folder`` holds a PEFT adapter (``adapter_config.json``)."""
    return (folder / ADAPTER_CONFIG).is_file()


def locate_weights(folder: Path) -> tuple[Path, str] | None:
    """``(folder to read, kind)`` of a checkpoint folder, or None when it holds no readable model.

    Full weights win over an adapter (they are the model); verl nests them in ``actor/huggingface``, its
    LoRA adapter in ``actor/lora_adapter`` and its FSDP shards in ``actor/``.
    """
    for candidate in (folder / "actor" / "huggingface", folder / "huggingface", folder):
        if candidate.is_dir() and has_weights(candidate) and not is_adapter(candidate):
            return candidate, "hf"
    for candidate in (folder / "actor" / "lora_adapter", folder / "lora_adapter", folder):
        if candidate.is_dir() and is_adapter(candidate):
            return candidate, "lora"
    for candidate in (folder / "actor", folder):
        if candidate.is_dir() and is_fsdp_folder(candidate):
            return candidate, "fsdp"
    return None


def _deepspeed_hint(folder: Path) -> str | None:
    """A one-line hint for DeepSpeed ZeRO folders, which hold optimizer-partitioned states, not weights."""
    if any(folder.glob("*model_states.pt")) or any(folder.glob("zero_pp_rank_*")) or any(
            folder.glob("*/mp_rank_*_model_states.pt")):
        return ("a DeepSpeed checkpoint, not model weights: convert it with DeepSpeed's zero_to_fp32.py "
                f"(python zero_to_fp32.py {folder.parent} OUT_DIR --tag {folder.name} --safe_serialization), or "
                "save with OpenRLHF's --ckpt.save_hf (--save_hf_ckpt before 0.10.4), which writes "
                "global_stepN_hf/ folders relex reads")
    return None


def step_of(name: str) -> int | None:
    """The step a checkpoint folder's name gives (``checkpoint-200``, ``global_step_200``, ``step_200``, …)."""
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def is_checkpoint_name(name: str) -> bool:
    """True when a folder called ``name`` would be read as a training checkpoint."""
    return step_of(name) is not None


def _layout_of(names: Sequence[str]) -> str:
    if any(n.startswith("checkpoint-") for n in names):
        return "hf"
    if any(re.match(r"^global_step\d+", n) for n in names):
        return "openrlhf"
    if any(n.startswith("global_step_") for n in names):
        return "verl"
    return "plain"


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


def scan_run(run_dir: str | Path, skipped: list[tuple[Path, str]] | None = None) -> list[Checkpoint]:
    """All checkpoints found directly inside ``run_dir``, sorted by step (step 0 included).

    Folders that look like checkpoints but are not read (outputs of relex, DeepSpeed states, folders
    without weights) are appended to ``skipped`` as ``(folder, reason)``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RelexInputError("run folder does not exist or is not a folder", run_dir)
    skipped = [] if skipped is None else skipped
    found: dict[int, Checkpoint] = {}
    for child in sorted(run_dir.iterdir()):
        if not child.is_dir():
            continue
        step = step_of(child.name)
        if step is None:
            continue
        if (child / PROVENANCE).is_file():
            skipped.append((child, "written by relex (it holds relex.json), not a training checkpoint"))
            continue
        located = locate_weights(child)
        if located is None:
            skipped.append((child, _deepspeed_hint(child) or "no model weights"))
            continue
        _check_trainer_state(child, step)
        if step in found:
            raise RelexInputError(
                f"duplicate step {step}: {found[step].path.name} and {child.name}", run_dir
            )
        found[step] = Checkpoint(step, *located)
    return [found[s] for s in sorted(found)]


def resolve_model_folder(name: str | Path, what: str = "base") -> Path:
    """A local model folder for ``name``: an existing folder, or a Hub id (``ORG/NAME``) fetched to the cache."""
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if hub.is_hub_id(text):
        return hub.resolve_model(text)
    raise RelexInputError(f"{what} folder does not exist (nor is it a Hub id ORG/NAME)", path)


def _adapter_base(adapter: Path) -> str | None:
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        raise RelexInputError("cannot read the adapter config (not valid JSON)", adapter / ADAPTER_CONFIG) from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return str(base) if base else None


def _base_checkpoint(base: str | Path) -> Checkpoint:
    folder = resolve_model_folder(base)
    located = locate_weights(folder) if folder.is_dir() else None
    if located is None:
        raise RelexInputError("base folder holds no model weights", folder)
    if located[1] == "lora":
        raise RelexInputError("the base must be a full model, not a LoRA adapter", folder)
    return Checkpoint(0, *located)


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
    pairs explicitly. ``steps`` keeps only those steps (a list, or text with ranges: see
    :func:`parse_steps`); ``max_step`` keeps steps up to it. The base is ``base`` when given (a folder or a
    Hub id), otherwise the run's step-0 checkpoint, or for LoRA runs the adapter's base model. Raises
    :class:`RelexInputError` when the series is unusable (no checkpoints, fewer than ``min_observed``,
    duplicate steps, no base, adapters mixed with full checkpoints).
    """
    skipped: list[tuple[Path, str]] = []
    if checkpoints is not None:
        found = []
        for step, folder in checkpoints:
            folder = Path(folder)
            located = locate_weights(folder) if folder.is_dir() else None
            if located is None:
                raise RelexInputError(_deepspeed_hint(folder) or "no model weights (model.safetensors, an index, "
                                      "a LoRA adapter or FSDP shards) found", folder)
            found.append(Checkpoint(int(step), *located))
        seen = [c.step for c in found]
        dupes = sorted({s for s in seen if seen.count(s) > 1})
        if dupes:
            raise RelexInputError(f"duplicate steps in the checkpoint list: {dupes}")
        found.sort(key=lambda c: c.step)
        where: Path | None = None
        layout = "plain"
    else:
        if run_dir is None:
            raise RelexInputError("give a run folder or an explicit list of checkpoints")
        found = scan_run(run_dir, skipped)
        where = Path(run_dir)
        layout = _layout_of([p.name for p in where.iterdir() if p.is_dir()])
        if not found:
            hints = [reason for _, reason in skipped if reason.startswith("a DeepSpeed")]
            raise RelexInputError(
                (f"{skipped[0][0].name} is {hints[0]}" if hints else
                 "no checkpoints found (expected checkpoint-N/, global_step_N/, global_stepN_hf/ or step_N/ "
                 "folders holding model weights, a LoRA adapter or FSDP shards)"),
                where,
            )

    adapters = [c for c in found if c.kind == "lora"]
    full_steps = [c for c in found if c.kind != "lora" and not (c.step == 0 and base is None)]
    if adapters and full_steps:
        full = full_steps[0]
        raise RelexInputError(
            f"mixes LoRA adapters (e.g. step {adapters[0].step}) with full checkpoints (e.g. step {full.step}); "
            "pass --steps to choose one kind", where or full.path)
    if base is not None:
        base_ckpt = _base_checkpoint(base)
        found = [c for c in found if c.step != 0]
    elif adapters and not any(c.step == 0 and c.kind != "lora" for c in found):
        # A LoRA run's step 0 is its base model; an adapter saved at step 0 is an update of zero.
        named = _adapter_base(adapters[-1].path)
        if named is None:
            raise RelexInputError("the adapter names no base_model_name_or_path; pass --base", adapters[-1].path)
        base_ckpt = _base_checkpoint(named)
        found = [c for c in found if c.step != 0]
    else:
        zero = [c for c in found if c.step == 0]
        if not zero:
            raise RelexInputError(
                "no base checkpoint: pass --base or include a step-0 folder (e.g. checkpoint-0)", where
            )
        base_ckpt = zero[0]
        found = [c for c in found if c.step != 0]

    if steps is not None:
        wanted = parse_steps(steps)
        by_step = {c.step: c for c in found}
        missing = [s for s in wanted if s not in by_step]
        if missing:
            raise RelexInputError(f"--steps names steps with no checkpoint: {missing}", where)
        found = [by_step[s] for s in wanted]
    if max_step is not None:
        found = [c for c in found if c.step <= max_step]
    if any(c.step < 0 for c in found):
        raise RelexInputError("step numbers must not be negative", where)
    series = CheckpointSeries(base=base_ckpt, observed=found, skipped=skipped, layout=layout)
    if len(found) < min_observed:
        raise RelexInputError(
            f"only {len(found)} observed checkpoint(s) besides the base; at least {min_observed} are needed "
            f"({series.retention_hint()})",
            where,
        )
    return series
