"""Checkpoints held in memory: a training loop's snapshots of its weights, read as any checkpoint is."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from relex.io.source import Source, TensorInfo

MEMORY = Path("<memory>")  # names in-memory checkpoints in messages and records


class MemorySource(Source):
    """One snapshot of a model's tensors (CPU tensors in their own dtype) as a checkpoint."""

    kind = "memory"

    def __init__(self, tensors: Mapping[str, torch.Tensor], folder: Path):
        self.folder = folder
        self.data = dict(tensors)
        self.tensors = {name: TensorInfo(name, tuple(t.shape), t.dtype, folder, i)
                        for i, (name, t) in enumerate(self.data.items())}

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        tensor = self.data[name]
        return tensor if start is None and stop is None else tensor[start:stop]
