"""What the engine reads from: one checkpoint as a set of named tensors, read one at a time.

A :class:`Source` knows its tensors' names, shapes and dtypes before reading any data (``tensors``), and
reads one tensor, or a range of rows of it, on demand (``read``). Implementations:

* :class:`relex.io.reader.CheckpointReader` — a Hugging Face folder of safetensors (or, on request,
  pickled ``.bin``) weights;
* :class:`relex.io.fsdp.FsdpSource` — verl's per-rank FSDP shards, reassembled one tensor at a time;
* :class:`relex.io.lora.LoraSource` — a PEFT LoRA adapter seen as the merged model over its base.

A source defined relative to the base (LoRA) also gives the exact update ``W_t − W_0`` of a tensor through
:meth:`Source.delta`, so the engine never subtracts two rounded merged weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of a stored tensor, and where it is stored.

    ``file`` is the file holding the tensor (for messages); ``offset`` orders tensors within a file
    (for safetensors the absolute byte offset of the data).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class Source(ABC):
    """One checkpoint as the engine reads it.

    Attributes:
        kind: what the checkpoint is (``safetensors``, ``pickle``, ``fsdp``, ``lora``); recorded in
            ``relex.json``.
        folder: the checkpoint folder, named in error messages.
        tensors: name → :class:`TensorInfo`, known without reading tensor data.
    """

    kind: str = "source"
    folder: Path
    tensors: dict[str, TensorInfo]

    @abstractmethod
    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype on the CPU; rows ``start:stop`` of dim 0 when given."""

    def delta(self, name: str, start: int | None = None,
              stop: int | None = None) -> tuple[torch.Tensor, int] | None:
        """``(W − W_0 as float32, bytes read)`` for sources defined over the base, else ``None``."""
        return None

    @property
    def has_exact_delta(self) -> bool:
        """Whether :meth:`delta` gives W − W_0 (sources defined over the base override it)."""
        return type(self).delta is not Source.delta

    def read_range(self, name: str, first: int, count: int, out: torch.Tensor) -> None:
        """Entries ``first .. first + count`` of the flattened tensor ``name``, in its stored dtype, into
        ``out`` (a CPU uint8 buffer of at least ``count`` × itemsize bytes, e.g. a reused streaming buffer).

        This default reads the rows covering the range with :meth:`read`; a source that can read bytes
        in place overrides it.
        """
        info = self.tensors[name]
        nbytes = count * info.dtype.itemsize
        target = out[:nbytes].view(info.dtype)
        if len(info.shape) == 0:
            target.copy_(self.read(name).reshape(-1))
            return
        cols = info.numel // info.shape[0]
        r0, r1 = first // cols, -(-(first + count) // cols)
        rows = self.read(name, r0, r1).reshape(-1)
        target.copy_(rows[first - r0 * cols: first - r0 * cols + count])

    @property
    def config_folder(self) -> Path:
        """The folder holding this checkpoint's ``config.json`` and tokenizer files."""
        return self.folder

    def order(self) -> list[str]:
        """Tensor names in the order that reads them fastest (storage order)."""
        files: dict[Path, int] = {}
        for info in self.tensors.values():
            files.setdefault(info.file, len(files))
        return sorted(self.tensors, key=lambda n: (files[self.tensors[n].file], self.tensors[n].offset))

    def nbytes(self) -> int:
        """Bytes a full read of every tensor of this source costs."""
        return sum(info.nbytes for info in self.tensors.values())

    def describe(self) -> dict:
        """What ``relex.json`` records about this source."""
        return {"kind": self.kind, "folder": str(self.folder)}

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
