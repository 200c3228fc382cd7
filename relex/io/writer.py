"""Streaming writer of safetensors files: a Hugging Face sharded checkpoint, or any files laid out up front.

Every file is laid out from its tensors' shapes before anything is written, so its header (and every byte
offset) is known up front: tensors arrive in pieces and go to disk with ``pwrite`` on a background thread that
also hashes them; nothing is held beyond the pieces in flight. :class:`SafetensorsWriter` writes the files;
:class:`ShardedWriter` lays a checkpoint out in ``model-0000i-of-0000N.safetensors`` shards with their index.
The folder written into is a staging folder (:mod:`relex.io.staging`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from relex.io.files import AUX_FILES
from relex.io.reader import DTYPE_NAMES
from relex.io.sizes import parse_size
from relex.jsonable import write_json

INDEX = "model.safetensors.index.json"
PENDING_PIECES = 4  # pieces queued for the writer thread before the producer waits


@dataclass(frozen=True)
class OutputTensor:
    """Name, shape and dtype of one tensor an output file will hold."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class _File:
    """One safetensors file being written: its tensors' byte ranges, its header and, once opened, its descriptor
    (-1 once complete)."""

    def __init__(self, filename: str, tensors: list[OutputTensor]):
        self.filename = filename
        self.tensors = tensors
        self.offsets: dict[str, tuple[int, int]] = {}
        position = 0
        for t in tensors:
            self.offsets[t.name] = (position, position + t.nbytes)
            position += t.nbytes
        self.data_bytes = position
        self.header = self._header()
        self.path: Path | None = None
        self.fd: int | None = None
        self.sha256 = hashlib.sha256()
        self.written = 0

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes

    def _header(self) -> bytes:
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


class SafetensorsWriter:
    """Write tensors, whole or in pieces, into safetensors files laid out before anything is written.

    ``files`` maps the name of each file (in ``folder``) to the tensors it holds, in their order in the file.
    Pieces are written with ``pwrite`` on one background thread while the caller computes the next ones; a
    write that fails there (e.g. a full disk) is raised by a later call of this writer. Calls come from one
    thread.

    With ``ordered`` (the default), pieces must come in layout order — each tensor from its first byte to its
    last, the tensors of every file and the files in the order of ``files`` — and with ``hashed`` (the default)
    each file's sha256 is computed as it is written. Without ``ordered``, pieces may come in any order
    (``offset`` says where), and with ``hashed`` each file is synced and hashed by reading it back once its
    last byte is written.
    """

    def __init__(self, folder: str | Path, files: dict[str, Sequence[OutputTensor]], *, ordered: bool = True,
                 hashed: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files = [_File(filename, list(tensors)) for filename, tensors in files.items()]
        for file in self.files:
            file.path = self.folder / file.filename
        layout = [t for file in self.files for t in file.tensors]
        self._where = {t.name: file for file in self.files for t in file.tensors}
        self._layout = {t.name: t for t in layout}
        self._order = [t.name for t in layout]
        self._done = {t.name: 0 for t in layout}  # bytes of each tensor handed over
        self._next = 0  # index in _order of the tensor ordered pieces must continue
        self.ordered = ordered
        self.hashed = hashed
        self.bytes_written = 0
        # Writing and hashing run on one background thread (both release the GIL), so the next pieces are
        # computed while these go to disk.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex-write")
        self._pending: deque[Future] = deque()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        planned = self._layout.get(name)
        if planned is None or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise RuntimeError(f"tensor {name!r} does not match the output layout")
        self.write_part(name, tensor)

    def write_part(self, name: str, data: torch.Tensor, offset: int | None = None,
                   done: Callable[[], None] | None = None) -> None:
        """Hand over the next bytes of tensor ``name`` (``offset`` bytes into it; by default right after the
        previous piece). ``data`` (on the CPU) must stay unchanged until ``done()`` is called on the writer
        thread."""
        planned = self._layout.get(name)
        if planned is None:
            raise RuntimeError(f"tensor {name!r} is not in the output layout")
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8)
        if raw.device.type != "cpu":
            raw = raw.cpu()
        position = self._done[name] if offset is None else offset
        if self.ordered:
            self._skip_complete()
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            if name != expected or position != self._done[name]:
                raise RuntimeError(f"writer expected tensor {expected!r} at byte {self._done.get(expected)}, "
                                   f"got {name!r} at byte {position}")
        if position + raw.numel() > planned.nbytes:
            raise RuntimeError(f"tensor {name!r} gets more bytes than its layout holds")
        self._done[name] += raw.numel()
        file = self._where[name]
        at = len(file.header) + file.offsets[name][0] + position
        while len(self._pending) >= PENDING_PIECES:
            self._pending.popleft().result()  # re-raises a failed write (e.g. disk full)
        self._pending.append(self._pool.submit(self._pwrite, file, at, raw.numpy(), done))
        self.bytes_written += raw.numel()

    def _skip_complete(self) -> None:
        while self._next < len(self._order):
            name = self._order[self._next]
            if self._done[name] < self._layout[name].nbytes:
                return
            self._next += 1

    def _pwrite(self, file: _File, at: int, data, done) -> None:
        hash_now = self.hashed and self.ordered
        try:
            if file.fd is None:
                file.fd = os.open(file.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                _pwrite_all(file.fd, file.header, 0)
                if hash_now:
                    file.sha256.update(file.header)
            _pwrite_all(file.fd, memoryview(data), at)
            if hash_now:
                file.sha256.update(data)
            file.written += data.nbytes
            if file.written == file.data_bytes and file.fd >= 0:
                self._complete(file)
        finally:
            if done is not None:
                done()

    def _complete(self, file: _File) -> None:
        fd, file.fd = file.fd, -1
        try:
            if self.hashed and not self.ordered:
                os.fsync(fd)
        finally:
            os.close(fd)
        if self.hashed and not self.ordered:
            with open(file.path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    file.sha256.update(chunk)

    def _wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def digests(self) -> dict[str, str]:
        """Each file's sha256 (``hashed``), once every piece handed over is written."""
        self._wait()
        if not self.hashed:
            raise RuntimeError("this writer does not hash its files")
        return {f.filename: f.sha256.hexdigest() for f in self.files}

    def finish(self) -> None:
        """Check that every tensor was written whole, and create the files holding nothing but a header."""
        self._wait()
        missing = [n for n in self._order if self._done[n] != self._layout[n].nbytes]
        if missing:
            raise RuntimeError(f"{len(missing)} output tensors were never written, e.g. {missing[0]!r}")
        for file in self.files:
            if file.fd is None:  # only empty tensors
                self._pwrite(file, len(file.header), memoryview(b""), None)

    def close(self) -> None:
        """Wait for the pieces in flight (raising a failed write), stop the writer thread, close the files."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            for file in self.files:
                if file.fd is not None and file.fd >= 0:
                    os.close(file.fd)
                    file.fd = None


class ShardedWriter(SafetensorsWriter):
    """Write tensors, whole or in pieces, into ``model-0000i-of-0000N.safetensors`` shards.

    ``layout`` is split, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of
    its own). With ``hashed`` (the default) pieces must come in layout order — each tensor from its first byte
    to its last, tensors in the order of ``layout`` — and every shard's sha256 is computed as it is written;
    without, pieces may come in any order (``offset`` says where).

    With ``part``, the writer holds one rank's share of a checkpoint: :meth:`number_shards` names its shards
    among every rank's, it writes no index (rank 0 writes one from every :meth:`part`, :func:`write_index`),
    and a share without tensors has no shard.
    """

    def __init__(self, folder: str | Path, layout: Sequence[OutputTensor], max_shard_bytes: int | str = "5GB", *,
                 hashed: bool = True, part: bool = False):
        layout = list(layout)
        groups = [] if part and not layout else self._group_into_shards(layout, parse_size(max_shard_bytes))
        files = {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups)}
        super().__init__(folder, files, ordered=hashed, hashed=hashed)
        self.is_part = part

    @staticmethod
    def _group_into_shards(layout: list[OutputTensor], limit: int) -> list[list[OutputTensor]]:
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for t in layout:
            if groups[-1] and size + t.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        return groups

    @property
    def shards(self) -> list[_File]:
        """The shard files, in order."""
        return self.files

    def number_shards(self, first: int, total: int) -> None:
        """Name the shards ``model-{first + 1}-of-{total}`` onwards (before anything is written)."""
        for i, shard in enumerate(self.shards):
            shard.filename = f"model-{first + i + 1:05d}-of-{total:05d}.safetensors"
            shard.path = self.folder / shard.filename

    def part(self) -> dict:
        """What this writer wrote, for the index: tensor → shard, data bytes, each shard's sha256 (hashed)."""
        self._wait()
        return {"weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
                "total_size": sum(s.data_bytes for s in self.shards),
                "sha256": {s.filename: s.sha256.hexdigest() for s in self.shards} if self.hashed else {},
                "bytes_written": self.bytes_written}

    @property
    def total_bytes(self) -> int:
        """Bytes of every shard file (headers and data) and the index."""
        return sum(shard.file_bytes for shard in self.shards) + 128 * len(self._order) + 1024

    def copy_aux_files(self, sources: Sequence[Path]) -> list[str]:
        """Copy config/tokenizer files, each from the first source folder that has it."""
        return copy_aux_files(self.folder, sources)

    def write_json(self, filename: str, payload: dict) -> None:
        write_json(self.folder / filename, payload)

    def finish(self) -> None:
        """Check that every tensor was written whole, create shards holding nothing but a header, and write
        the index json (not for a ``part``)."""
        super().finish()
        if not self.is_part:
            write_index(self.folder, [self.part()])


def write_index(folder: Path, parts: Sequence[dict]) -> None:
    """The index json of a checkpoint written by one or several :class:`ShardedWriter` (their ``part()``)."""
    index = {
        "metadata": {"total_size": sum(p["total_size"] for p in parts)},
        "weight_map": {name: shard for p in parts for name, shard in p["weight_map"].items()},
    }
    (Path(folder) / INDEX).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_aux_files(folder: Path, sources: Sequence[Path], skip: Sequence[str] = ()) -> list[str]:
    """Copy config/tokenizer files into ``folder``, each from the first source folder that has it."""
    copied = []
    for name in AUX_FILES:
        if name in skip:
            continue
        for source in sources:
            if (source / name).is_file():
                shutil.copyfile(source / name, folder / name)
                copied.append(name)
                break
    return copied


def aux_bytes(sources: Sequence[Path]) -> int:
    """Bytes :func:`copy_aux_files` would copy from ``sources``."""
    total = 0
    for name in AUX_FILES:
        for source in sources:
            if (source / name).is_file():
                total += (source / name).stat().st_size
                break
    return total
