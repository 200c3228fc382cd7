"""Open the right :class:`relex.io.source.Source` for each checkpoint a discovery found."""

from __future__ import annotations

from relex.errors import RelexInputError
from relex.io.discover import Checkpoint
from relex.io.fsdp import FsdpSource
from relex.io.lora import LoraSource
from relex.io.memory import MemorySource
from relex.io.reader import CheckpointReader
from relex.io.source import Source


def open_source(checkpoint: Checkpoint, *, base: Source | None = None, allow_pickle: bool = False) -> Source:
    """The source reading ``checkpoint``; a LoRA adapter needs the opened ``base`` it applies to."""
    if checkpoint.kind == "hf":
        return CheckpointReader(checkpoint.path, allow_pickle=allow_pickle)
    if checkpoint.kind == "memory":
        return MemorySource(checkpoint.tensors, checkpoint.path)
    if checkpoint.kind == "fsdp":
        return FsdpSource(checkpoint.path, allow_pickle=allow_pickle)
    if checkpoint.kind == "lora":
        if base is None:
            raise RelexInputError("a LoRA adapter can only be read over its base model", checkpoint.path)
        return LoraSource(checkpoint.path, base, allow_pickle=allow_pickle)
    raise ValueError(f"unknown checkpoint kind {checkpoint.kind!r}")
