"""Streaming writer of a Hugging Face sharded safetensors checkpoint, and the staged output folder.

Shards are laid out from the tensors' sizes before anything is written, so each shard's header (and every
byte offset) is known up front: tensors arrive in pieces, in order, and go to disk with ``pwrite`` on a
background thread that also hashes them; nothing is held beyond the pieces in flight. A writer that does not
hash (a trajectory store) accepts pieces in any order. :func:`staged_folder` gives a temporary folder beside
the target that is renamed into place only when everything succeeded and removed otherwise, so an
interrupted run never leaves a folder that looks complete; before anything is read it checks that the disk
has room for the output (:func:`require_free_space`), and a disk that fills anyway gets the same one-line
error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from relex.distributed import SINGLE, Ranks
from relex.errors import RelexInputError
from relex.io.files import AUX_FILES
from relex.io.reader import DTYPE_NAMES

log = logging.getLogger("relex")
INDEX = "model.safetensors.index.json"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PENDING_PIECES = 4  # pieces queued for the writer thread before the producer waits


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


class _Shard:
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


class ShardedWriter:
    """Write tensors, whole or in pieces, into ``model-0000i-of-0000N.safetensors`` shards.

    With ``hashed`` (the default) pieces must come in layout order — each tensor from its first byte to its
    last, tensors in the order of ``layout`` — and every shard's sha256 is computed as it is written;
    without, pieces may come in any order (``offset`` says where).

    With ``part``, the writer holds one rank's share of a checkpoint: :meth:`number_shards` names its shards
    among every rank's, it writes no index (rank 0 writes one from every :meth:`part`, :func:`write_index`),
    and a share without tensors has no shard.
    """

    def __init__(self, folder: str | Path, layout: Sequence[OutputTensor], max_shard_bytes: int | str = "5GB", *,
                 hashed: bool = True, part: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shards = self._group_into_shards(list(layout), parse_size(max_shard_bytes))
        for shard in self.shards:
            shard.path = self.folder / shard.filename
        self._where = {t.name: shard for shard in self.shards for t in shard.tensors}
        self._layout = {t.name: t for t in layout}
        self._order = [t.name for t in layout]
        self._done = {t.name: 0 for t in layout}  # bytes of each tensor handed over
        self._next = 0  # index in _order of the tensor hashed pieces must continue
        self.hashed = hashed
        self.is_part = part
        if part and not self._order:
            self.shards = []
        self.bytes_written = 0
        # Writing and hashing run on one background thread (both release the GIL), so the next pieces are
        # computed while these go to disk.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex-write")
        self._pending: deque[Future] = deque()

    @staticmethod
    def _group_into_shards(layout: list[OutputTensor], limit: int) -> list[_Shard]:
        groups: list[list[OutputTensor]] = [[]]
        size = 0
        for t in layout:
            if groups[-1] and size + t.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

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
        if self.hashed:
            self._skip_complete()
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            if name != expected or position != self._done[name]:
                raise RuntimeError(f"writer expected tensor {expected!r} at byte {self._done.get(expected)}, "
                                   f"got {name!r} at byte {position}")
        if position + raw.numel() > planned.nbytes:
            raise RuntimeError(f"tensor {name!r} gets more bytes than its layout holds")
        self._done[name] += raw.numel()
        shard = self._where[name]
        at = len(shard.header) + shard.offsets[name][0] + position
        while len(self._pending) >= PENDING_PIECES:
            self._pending.popleft().result()  # re-raises a failed write (e.g. disk full)
        self._pending.append(self._pool.submit(self._pwrite, shard, at, raw.numpy(), done))
        self.bytes_written += raw.numel()

    def _skip_complete(self) -> None:
        while self._next < len(self._order):
            name = self._order[self._next]
            if self._done[name] < self._layout[name].nbytes:
                return
            self._next += 1

    def _pwrite(self, shard: _Shard, at: int, data, done) -> None:
        try:
            if shard.fd is None:
                shard.fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                _pwrite_all(shard.fd, shard.header, 0)
                if self.hashed:
                    shard.sha256.update(shard.header)
            _pwrite_all(shard.fd, memoryview(data), at)
            if self.hashed:
                shard.sha256.update(data)
            shard.written += data.nbytes
            if shard.written == shard.data_bytes:
                os.close(shard.fd)
                shard.fd = -1  # complete
        finally:
            if done is not None:
                done()

    def _wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def copy_aux_files(self, sources: Sequence[Path]) -> list[str]:
        """Copy config/tokenizer files, each from the first source folder that has it."""
        return copy_aux_files(self.folder, sources)

    def write_json(self, filename: str, payload: dict) -> None:
        (self.folder / filename).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")

    def shard_digests(self) -> dict[str, str]:
        self._wait()
        if not self.hashed:
            raise RuntimeError("this writer does not hash its shards")
        return {s.filename: s.sha256.hexdigest() for s in self.shards}

    def finish(self) -> None:
        """Check that every tensor was written whole, create shards holding nothing but a header, and write
        the index json (not for a ``part``)."""
        self._wait()
        missing = [n for n in self._order if self._done[n] != self._layout[n].nbytes]
        if missing:
            raise RuntimeError(f"{len(missing)} output tensors were never written, e.g. {missing[0]!r}")
        for shard in self.shards:
            if shard.fd is None:  # only empty tensors
                self._pwrite(shard, len(shard.header), memoryview(b""), None)
                if shard.fd is not None and shard.fd >= 0:
                    os.close(shard.fd)
                    shard.fd = -1
        if not self.is_part:
            write_index(self.folder, [self.part()])

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            for shard in self.shards:
                if shard.fd is not None and shard.fd >= 0:
                    os.close(shard.fd)
                    shard.fd = None


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


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def require_free_space(out_dir: Path, needed: int) -> None:
    """Refuse, before any work, an output that does not fit the free space of its disk."""
    free = free_bytes(out_dir)
    if needed > free:
        raise RelexInputError(f"not enough free disk space: the output needs {_gb(needed)}, the disk has "
                              f"{_gb(free)} free", out_dir)


@contextmanager
def staged_folder(out_dir: str | Path, overwrite: bool = False, needed_bytes: int = 0,
                  ranks: Ranks = SINGLE) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; rename it to ``out_dir`` on success, delete it on failure.

    Refuses an existing ``out_dir`` unless ``overwrite``, an unwritable location, and (with ``needed_bytes``) a
    disk with less free space than that, before yielding. Staging folders of this output left by relex
    processes that no longer run (killed, e.g. by SIGKILL) are removed first. A disk that fills while
    writing raises :class:`RelexInputError` (one line), and the partial folder is removed.

    Across ``ranks`` (the output is on a file system every rank sees): rank 0 checks, creates the folder
    under its own pid and hands its name to every rank; the body must end at a sync point, after which rank 0
    renames (or, when any rank failed, removes) the folder, and every rank learns how that went.
    """
    out_dir = Path(out_dir)

    def create() -> tuple[Path, list[Path]]:
        check_output_folder(out_dir, overwrite)
        remove_stale_staging(out_dir)
        if needed_bytes:
            require_free_space(out_dir, needed_bytes)
        tmp = out_dir.parent / f".{out_dir.name}.relex-partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        created = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise RelexInputError(f"output folder is not writable ({exc.strerror})", out_dir) from None
        return tmp, created

    tmp, created = ranks.from_leader(create)
    try:
        yield tmp
    except BaseException as exc:
        if ranks.leader:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # parents made for this output only
                try:
                    folder.rmdir()
                except OSError:
                    pass
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            raise RelexInputError(f"the output's disk is full ({exc.strerror}); nothing was written, and "
                                  f"{_gb(free_bytes(out_dir))} are free now", out_dir) from None
        raise
    ranks.step(lambda: _put_in_place(tmp, out_dir, overwrite) if ranks.leader else None)


def _put_in_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    try:
        _rename_into(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a complete-looking output never appears; nor does a partial one
        raise


def _rename_into(tmp: Path, out_dir: Path, overwrite: bool) -> None:
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


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove ``.OUT.relex-partial-PID`` / ``.OUT.relex-old-PID`` folders of ``out_dir`` whose process is gone.

    A run killed outright (SIGKILL, out of memory) cannot clean up after itself; the next run for the same
    output does. Folders of processes still running are left alone. Each removal is logged (``relex``).
    """
    parent = out_dir.parent
    removed = []
    if not parent.is_dir():
        return removed
    for marker in ("relex-partial", "relex-old"):
        for folder in parent.glob(f".{out_dir.name}.{marker}-*"):
            pid_text = folder.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit() or _process_alive(int(pid_text)):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
                log.warning("removed %s, left by relex process %s, which no longer runs", folder, pid_text)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder of this process is from an earlier, finished call
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


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
