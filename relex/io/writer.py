"""Streaming writer of a Hugging Face sharded safetensors checkpoint.

Shards are planned from the tensors' sizes before anything is written, so each shard's header (and all
byte offsets) is known up front and tensors are appended one at a time; nothing is held beyond the tensor
being written. :func:`staged_folder` gives a temporary folder beside the target that is renamed into place only when
everything succeeded and removed otherwise, so an interrupted run never leaves a folder that looks
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from relex.errors import RelexInputError
from relex.io.files import AUX_FILES
from relex.io.reader import DTYPE_NAMES

def parse_size(size: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class _Shard:
    def __init__(self, filename: str, tensors: list[PlannedTensor]):
        self.filename = filename
        self.tensors = tensors
        self.offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for t in tensors:
            self.offsets[t.name] = (position, position + t.nbytes)
            position += t.nbytes
        self.data_bytes = position
        self.handle = None
        self.sha256 = hashlib.sha256()
        self.written = 0

    def header_bytes(self) -> bytes:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for t in self.tensors:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": list(self.offsets[t.name]),
            }
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Write tensors, in the planned order, into ``model-0000i-of-0000N.safetensors`` shards."""

    def __init__(self, folder: str | Path, plan: Sequence[PlannedTensor], max_shard_bytes: int | str = "5GB"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards = self._plan(list(plan), parse_size(max_shard_bytes))
        for shard in self.shards:
            shard.path = self.folder / shard.filename
        self._where = {t.name: shard for shard in self.shards for t in shard.tensors}
        self._planned = {t.name: t for t in plan}
        self._order = [t.name for t in plan]
        self._next = 0
        self.bytes_written = 0
        # Writing and hashing run on one background thread (both release the GIL), so the next tensor is
        # computed while this one goes to disk; at most one write is in flight.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex-write")
        self._pending: Future | None = None

    @staticmethod
    def _plan(plan: list[PlannedTensor], limit: int) -> list[_Shard]:
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in plan:
            if groups[-1] and size + t.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (names must come in plan order)."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"writer expected tensor {expected!r}, got {name!r}")
        shard = self._where[name]
        planned = self._planned[name]
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"tensor {name!r} does not match its plan")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._wait()
        self._pending = self._pool.submit(self._append, shard, data)
        self.bytes_written += data.nbytes
        self._next += 1

    @staticmethod
    def _append(shard: "_Shard", data) -> None:
        if shard.handle is None:
            shard.handle = open(shard.path, "wb")
            header = shard.header_bytes()
            shard.handle.write(header)
            shard.sha256.update(header)
        shard.handle.write(data)
        shard.sha256.update(data)
        shard.written += data.nbytes
        if shard.written == shard.data_bytes:
            shard.handle.close()
            shard.handle = None

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write (e.g. disk full)

    def copy_aux_files(self, sources: Sequence[Path]) -> list[str]:
        """Copy config/tokenizer files, each from the first source folder that has it."""
        copied = []
        for name in AUX_FILES:
            for folder in sources:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, self.folder / name)
                    copied.append(name)
                    break
        return copied

    def write_json(self, filename: str, payload: dict) -> None:
        (self.folder / filename).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def shard_digests(self) -> dict[str, str]:
        self._wait()
        return {s.filename: s.sha256.hexdigest() for s in self.shards}

    def finish(self) -> None:
        """Check that every planned tensor was written and write the index json."""
        self._wait()
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} planned tensors were never written")
        index = {
            "metadata": {"total_size": sum(s.data_bytes for s in self.shards)},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }
        self.write_json("model.safetensors.index.json", index)

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        for shard in self.shards:
            if shard.handle is not None:
                shard.handle.close()
                shard.handle = None


@contextmanager
def staged_folder(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; rename it to ``out_dir`` on success, delete it on failure.

    Refuses an existing ``out_dir`` unless ``overwrite``, and an unwritable location, before yielding.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    tmp = out_dir.parent / f".{out_dir.name}.relex-partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise RelexInputError(f"output folder is not writable ({exc.strerror})", out_dir) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # parents made for this output only
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    if out_dir.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RelexInputError("output folder appeared while writing; not replacing it", out_dir)
        old = out_dir.parent / f".{out_dir.name}.relex-old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def check_output_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing output folder (unless overwriting) and an unwritable parent, before any work."""
    if out_dir.exists() and not overwrite:
        raise RelexInputError("output folder exists (pass --overwrite to replace it)", out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RelexInputError("output path exists and is not a folder", out_dir)
    parent = out_dir.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RelexInputError("output folder is not writable", out_dir)
