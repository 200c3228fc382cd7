"""A run's inputs as rows: the base and each observed checkpoint of a series, opened, checked and read.

:class:`RunReaders` opens the sources of a :class:`relex.io.discover.CheckpointSeries` and checks that every
checkpoint has the base's tensors (a missing tied ``lm_head`` reads the embedding); :meth:`RunReaders.rows`
gives one tensor's inputs as :class:`Row` objects, which read ranges of its entries into a buffer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.device import OUTPUT_DTYPES
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries
from relex.io.source import Source, TensorInfo
from relex.io.sources import open_source

TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Row:
    """One input of a tensor: where its entries are read and how they enter the arithmetic.

    ``kind``: ``base`` (w_0), ``weight`` (w_i; the delta is w_i − w_0 in float32), ``delta`` (the source gives
    w_i − w_0 exactly, in float32: LoRA), ``basis`` (a stored basis vector b_r) or ``value`` (a stored value to
    write as it is).
    """

    source: Source
    key: str
    dtype: torch.dtype
    kind: str

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def read(self, first: int, count: int, out: torch.Tensor) -> int:
        """Entries ``first .. first + count`` of the flattened tensor into the uint8 buffer ``out``; the bytes read."""
        if count == 0:
            return 0
        if self.kind != "delta":
            self.source.read_range(self.key, first, count, out)
            return count * self.itemsize
        info = self.source.tensors[self.key]
        if not info.shape:
            delta, cost = self.source.delta(self.key)
            out[:4].view(torch.float32).copy_(delta.reshape(-1))
            return cost
        cols = info.numel // info.shape[0]
        r0, r1 = first // cols, -(-(first + count) // cols)
        delta, cost = self.source.delta(self.key, r0, r1)
        flat = delta.reshape(-1)[first - r0 * cols: first - r0 * cols + count]
        out[: 4 * count].view(torch.float32).copy_(flat)
        return cost

    def read_whole(self) -> torch.Tensor:
        """The whole tensor: stored values, or float32 for a delta row."""
        if self.kind == "delta":
            return self.source.delta(self.key)[0]
        return self.source.read(self.key)


class RunReaders:
    """The open sources of a run: the base and each observed checkpoint, with the tensor layout checked."""

    def __init__(self, series: CheckpointSeries, allow_pickle: bool):
        self.series = series
        self.observed: list[Source] = []
        self.base = open_source(series.base, allow_pickle=allow_pickle)
        try:
            for checkpoint in series.observed:
                self.observed.append(open_source(checkpoint, base=self.base, allow_pickle=allow_pickle))
            # Reading in storage order keeps the access to each file sequential.
            self.names = self.base.order()
            self.aliases = [self._check_layout(r) for r in self.observed]
        except BaseException:
            self.close()
            raise

    def describe(self) -> dict:
        """How each checkpoint was read, for ``relex.json``."""
        kinds = sorted({source.kind for source in self.observed})
        return {"base": self.base.describe(), "observed_kind": kinds[0] if len(kinds) == 1 else kinds,
                "observed": [source.describe() for source in self.observed]}

    def run_bytes(self) -> int:
        """Bytes one full read of the base and every observed checkpoint costs."""
        return self.base.nbytes() + sum(source.nbytes() for source in self.observed)

    def config_folders(self) -> list[Path]:
        """Where config and tokenizer files are taken from: newest checkpoint first, the base last."""
        return [self.observed[-1].config_folder, *[s.config_folder for s in reversed(self.observed[:-1])],
                self.base.config_folder]

    def info(self, name: str) -> TensorInfo:
        return self.base.tensors[name]

    def output_dtype(self, name: str, dtype: str = "auto") -> torch.dtype:
        """The dtype ``name`` is written in: ``dtype`` for floating-point tensors, else the newest checkpoint's."""
        if dtype != "auto" and self.info(name).is_float:
            return OUTPUT_DTYPES[dtype]
        newest = self.observed[-1]
        return newest.tensors[self.aliases[-1].get(name, name)].dtype

    def rows(self, name: str) -> list[Row]:
        """The base, then each observed checkpoint (a ``delta`` row when its source knows W − W_0 exactly)."""
        rows = [Row(self.base, name, self.base.tensors[name].dtype, "base")]
        for source, aliases in zip(self.observed, self.aliases):
            key = aliases.get(name, name)
            if source.has_exact_delta:
                rows.append(Row(source, key, torch.float32, "delta"))
            else:
                rows.append(Row(source, key, source.tensors[key].dtype, "weight"))
        return rows

    def close(self) -> None:
        for reader in [self.base, *self.observed]:
            reader.close()

    def _tied_source(self, reader: Source) -> str | None:
        for name in reader.tensors:
            if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
                return name
        return None

    def _check_layout(self, reader: Source) -> dict[str, str]:
        """Names, shapes must match the base; a missing tied lm_head reads the embedding instead."""
        aliases = {}
        mine, base = set(reader.tensors), set(self.base.tensors)
        missing = base - mine
        if missing == {TIED_HEAD} and _config_ties(reader.config_folder):
            source = self._tied_source(reader)
            if source is not None:
                aliases[TIED_HEAD] = source
                missing = set()
        extra = mine - base - ({TIED_HEAD} if TIED_HEAD not in base else set())
        if missing or extra:
            what = []
            if missing:
                what.append(f"lacks {len(missing)} tensor(s) of the base, e.g. {sorted(missing)[0]!r}")
            if extra:
                what.append(f"has {len(extra)} tensor(s) the base lacks, e.g. {sorted(extra)[0]!r}")
            raise RelexInputError("tensor names differ from the base: " + "; ".join(what), reader.folder)
        for name in self.names:
            info = reader.tensors[aliases.get(name, name)]
            expected = self.base.tensors[name].shape
            if info.shape != expected:
                raise RelexInputError(
                    f"tensor {name!r} has shape {list(info.shape)} but {list(expected)} in the base", info.file
                )
        return aliases


def _config_ties(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("tie_word_embeddings", True))
