"""Writing LoRA adapters: the factors of a mix of updates as a PEFT adapter folder.

The factors :func:`relex.io.lora_factors.mix_factors` returns already carry each module's scaling, so the adapter
is written with ``lora_alpha`` equal to its rank: every scaling is exactly 1
(:func:`relex.io.lora_config.unit_scaling_config`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.io.lora import ADAPTER_SAFETENSORS, LoraSource
from relex.io.lora_config import ADAPTER_CONFIG, unit_scaling_config
from relex.io.reader import DTYPE_NAMES


@dataclass(frozen=True)
class _Planned:
    """One tensor of the adapter file being written, at its absolute byte offset."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class LoraAdapterWriter:
    """Write a PEFT adapter folder: one ``adapter_model.safetensors`` and ``adapter_config.json``.

    PEFT does not load sharded adapters, so everything goes into one file. Every tensor's offset is planned
    up front from ``ranks`` (base tensor name → output rank of that LoRA module) and ``full`` (base tensor
    name → ``(shape, dtype)`` of a tensor written whole: ``modules_to_save``, trained biases), the header is
    written first, and tensors are then accepted in any order and written at their offsets with ``pwrite``
    (safe from one writer thread while another thread computes). Keys are the template adapter's, so the
    output loads with ``PeftModel.from_pretrained(base, folder)`` wherever the template did.
    """

    def __init__(self, folder: Path, template: LoraSource, ranks: dict[str, int],
                 full: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype):
        self.folder = Path(folder)
        self.template = template
        self.ranks = dict(ranks)
        self.dtype = dtype
        self.path = self.folder / ADAPTER_SAFETENSORS
        plan: list[_Planned] = []
        for name, rank in self.ranks.items():
            module = template.modules.get(name)
            if module is None:
                raise ValueError(f"{name!r} is not a LoRA module of the template adapter")
            if rank <= 0:
                raise ValueError(f"rank of {name!r} must be positive, got {rank}")
            rows, cols = template.base.tensors[name].shape
            d_out, d_in = (cols, rows) if module.fan_in_fan_out else (rows, cols)
            plan += [_Planned(module.a_key, (rank, d_in), dtype), _Planned(module.b_key, (d_out, rank), dtype)]
        for name, (shape, full_dtype) in full.items():
            if name not in template.saved:
                raise ValueError(f"{name!r} is not a tensor the template adapter saves whole")
            if tuple(shape) != template.base.tensors[name].shape:
                raise ValueError(f"planned shape of {name!r} differs from the base's")
            plan.append(_Planned(template.saved_keys[name], tuple(shape), full_dtype))
        plan.sort(key=lambda t: t.key)  # sorted keys, as PEFT's safetensors files have them
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        position = 0
        for t in plan:
            header[t.key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [position, position + t.nbytes]}
            position += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        data_start = 8 + len(raw)
        self._planned = {t.key: _Planned(t.key, t.shape, t.dtype, data_start + header[t.key]["data_offsets"][0])
                         for t in plan}
        self._module_keys = {n: (template.modules[n].a_key, template.modules[n].b_key) for n in self.ranks}
        self._full_keys = {n: template.saved_keys[n] for n in full}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self.bytes_written = 0
        self.sha256: str | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, data_start + position)
        self._pwrite(struct.pack("<Q", len(raw)) + raw, 0)

    def _pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        planned = self._planned[key]
        if tuple(tensor.shape) != planned.shape:
            raise ValueError(f"tensor {key!r} has shape {list(tensor.shape)}, planned {list(planned.shape)}")
        data = tensor.detach().to(device="cpu", dtype=planned.dtype).contiguous().reshape(-1).view(torch.uint8)
        with self._lock:
            if key in self._written:
                raise RuntimeError(f"tensor {key!r} written twice")
            self._written.add(key)
            self.bytes_written += planned.nbytes
        self._pwrite(data.numpy(), planned.offset)

    def write_module(self, base_name: str, P: torch.Tensor, Q: torch.Tensor) -> None:
        """Store ``ΔW = P @ Q`` (base layout, P: rows × R, Q: R × cols) as ``lora_B = P``, ``lora_A = Q``
        (``fan_in_fan_out``: ``lora_A = Pᵀ``, ``lora_B = Qᵀ``) in the writer's dtype."""
        a_key, b_key = self._module_keys[base_name]
        if self.template.modules[base_name].fan_in_fan_out:
            lora_a, lora_b = P.T, Q.T  # ΔW_base = (B A)ᵀ = Aᵀ Bᵀ
        else:
            lora_a, lora_b = Q, P
        self._put(a_key, lora_a)
        self._put(b_key, lora_b)

    def write_full(self, base_name: str, tensor: torch.Tensor) -> None:
        """Store a tensor written whole (``modules_to_save``, trained biases) in its planned dtype."""
        self._put(self._full_keys[base_name], tensor)

    def finish(self) -> None:
        """Check every planned tensor was written, hash the file, write ``adapter_config.json``: the template's
        config with the output ranks and every scaling exactly 1 (:func:`unit_scaling_config`)."""
        missing = sorted(set(self._planned) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned adapter tensors were never written, e.g. {missing[0]!r}")
        os.fsync(self._fd)
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        self.sha256 = digest.hexdigest()
        ranks = {self.template.modules[n].module_path: r for n, r in self.ranks.items()}
        config = unit_scaling_config(self.template.config, ranks)
        (self.folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def digests(self) -> dict[str, str]:
        """``{adapter_model.safetensors: sha256}`` once :meth:`finish` has run."""
        return {} if self.sha256 is None else {self.path.name: self.sha256}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "LoraAdapterWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
