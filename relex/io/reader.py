"""Lazy reading of one checkpoint folder: headers first, then one tensor (or a row range) at a time.

Headers are parsed by hand so that every defect gets a precise message (truncated file, corrupt header,
index pointing outside its folder, missing shard); tensor bytes, or a range of rows, are then read with
``pread`` at the offsets the header gives, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import torch

from relex.errors import RelexInputError
from relex.io.source import Source, TensorInfo

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items() if v is not None}
_MAX_HEADER = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check the header of one ``.safetensors`` file without reading tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise RelexInputError("not a safetensors file (shorter than 8 bytes)", path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise RelexInputError("corrupt safetensors header (length out of range)", path)
            raw = handle.read(header_len)
    except OSError as exc:
        raise RelexInputError(f"cannot read file ({exc.strerror})", path) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise RelexInputError("corrupt safetensors header (not valid JSON)", path) from None
    if not isinstance(header, dict):
        raise RelexInputError("corrupt safetensors header (not a JSON object)", path)
    available = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise RelexInputError(f"corrupt safetensors header entry for tensor {name!r}", path) from None
        if dtype is None:
            raise RelexInputError(f"tensor {name!r} has dtype {entry['dtype']} unsupported by this torch", path)
        info = TensorInfo(name, shape, dtype, path, 8 + header_len + start)
        if end > available:
            raise RelexInputError(
                f"truncated file: tensor {name!r} ends at byte {end} of {available} data bytes", path
            )
        if end - start != info.nbytes:
            raise RelexInputError(f"corrupt safetensors header: size of tensor {name!r} does not match", path)
        infos[name] = info
    return infos


class CheckpointReader(Source):
    """A Hugging Face checkpoint folder (single file or shards + index), read lazily.

    ``tensors`` maps names to :class:`TensorInfo` from the headers alone; :meth:`read` returns one tensor
    (or rows ``start:stop`` of it) as a CPU tensor. ``kind`` is ``safetensors`` (or ``pickle`` for
    ``pytorch_model*.bin`` weights read with ``--allow-pickle``).
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.files = self._weight_files(allow_pickle)
        self._pickled = bool(self.files) and self.files[0].suffix == ".bin"
        self.kind = "pickle" if self._pickled else "safetensors"
        self._handles: dict[Path, int] = {}
        self._lock = threading.Lock()  # reader threads open files on first use
        self.tensors: dict[str, TensorInfo] = {}
        if self._pickled:
            self._load_pickled()
        else:
            for file in self.files:
                for name, info in read_safetensors_header(file).items():
                    if name in self.tensors:
                        raise RelexInputError(f"tensor {name!r} is stored in two shards", file)
                    self.tensors[name] = info
            self._check_index()

    # -- discovery of the weight files -------------------------------------------------------------
    def _weight_files(self, allow_pickle: bool) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            return self._files_from_index(index)
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        shards = sorted(self.folder.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(self.folder.glob("pytorch_model*.bin"))
        if pickles:
            if not allow_pickle:
                raise RelexInputError(
                    "only pickled .bin weights found; pickles can run code when loaded, so relex refuses "
                    "them unless you pass --allow-pickle (or convert the checkpoint to safetensors)",
                    self.folder,
                )
            return pickles
        raise RelexInputError("no model weights (model.safetensors or index) found", self.folder)

    def _files_from_index(self, index: Path) -> list[Path]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise RelexInputError("corrupt index (no readable weight_map)", index) from None
        self._weight_map = weight_map
        files = []
        root = self.folder.resolve()
        for shard in sorted(set(weight_map.values())):
            path = (self.folder / shard).resolve()
            if path.parent != root:
                raise RelexInputError(f"index points outside its folder: {shard!r}", index)
            if not path.is_file():
                raise RelexInputError(f"index names a missing shard {shard!r}", index)
            files.append(self.folder / shard)
        return files

    def _check_index(self) -> None:
        weight_map = getattr(self, "_weight_map", None)
        if weight_map is None:
            return
        index = self.folder / "model.safetensors.index.json"
        for name, shard in weight_map.items():
            info = self.tensors.get(name)
            if info is None or info.file.name != Path(shard).name:
                raise RelexInputError(f"index says tensor {name!r} is in {shard!r}, but it is not", index)

    def _load_pickled(self) -> None:
        # Reached only with an explicit opt-in. weights_only refuses arbitrary objects; mmap keeps the
        # tensors on disk until they are touched.
        self._pickled_tensors: dict[str, torch.Tensor] = {}
        for file in self.files:
            try:
                state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any load failure is the file's fault
                raise RelexInputError(f"cannot load pickled weights ({type(exc).__name__})", file) from None
            for name, tensor in state.items():
                self._pickled_tensors[name] = tensor
                self.tensors[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)

    # -- reading -----------------------------------------------------------------------------------
    def _descriptor(self, file: Path) -> int:
        fd = self._handles.get(file)
        if fd is None:
            with self._lock:
                fd = self._handles.get(file)
                if fd is None:
                    try:
                        fd = os.open(file, os.O_RDONLY)
                    except OSError as exc:
                        raise RelexInputError(f"cannot open file ({exc.strerror})", file) from None
                    self._handles[file] = fd
        return fd

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``start:stop`` of its first dimension when given), on the CPU.

        Bytes are read with ``pread`` into a fresh buffer rather than through a memory map, so memory use
        is what relex allocates, and concurrent reads from threads are safe.
        """
        info = self.tensors[name]
        if self._pickled:
            tensor = self._pickled_tensors[name]
            return (tensor if start is None else tensor[start:stop]).clone()
        shape = list(info.shape)
        offset, nbytes = info.offset, info.nbytes
        if start is not None and shape:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            start, stop = max(0, start), min(shape[0], shape[0] if stop is None else stop)
            offset += start * row_bytes
            nbytes = max(0, stop - start) * row_bytes
            shape[0] = max(0, stop - start)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        self._pread(info, offset, buffer)
        if info.dtype == torch.bool:
            return buffer.view(torch.bool).reshape(shape)
        return buffer.view(info.dtype).reshape(shape)

    def read_range(self, name: str, first: int, count: int, out: torch.Tensor) -> None:
        """Entries ``first .. first + count`` of the flattened tensor, ``pread`` straight into ``out`` (uint8)."""
        if self._pickled:
            super().read_range(name, first, count, out)
            return
        info = self.tensors[name]
        size = info.dtype.itemsize
        self._pread(info, info.offset + first * size, out[: count * size])

    def _pread(self, info: TensorInfo, offset: int, buffer: torch.Tensor) -> None:
        """Fill the uint8 CPU tensor ``buffer`` with the file's bytes from ``offset`` (releases the GIL)."""
        nbytes = buffer.numel()
        view = memoryview(buffer.numpy())
        fd = self._descriptor(info.file)
        done = 0
        while done < nbytes:
            try:
                n = os.preadv(fd, [view[done:]], offset + done)
            except OSError as exc:
                raise RelexInputError(f"cannot read tensor {info.name!r} ({exc.strerror})", info.file) from None
            if n == 0:
                raise RelexInputError(f"truncated file while reading tensor {info.name!r}", info.file)
            done += n

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()


def open_checkpoint(folder: str | Path, allow_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint folder for lazy reading (headers are read and checked immediately)."""
    return CheckpointReader(folder, allow_pickle=allow_pickle)


def file_size(path: Path) -> int:
    return os.stat(path).st_size
