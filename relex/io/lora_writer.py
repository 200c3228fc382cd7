"""Writing LoRA adapters: the factors of a mix of updates as a PEFT adapter folder.

The factors :func:`relex.io.lora_factors.mix_factors` returns already carry each module's scaling, so the adapter
is written with ``lora_alpha`` equal to its rank: every scaling is exactly 1
(:func:`relex.io.lora_config.unit_scaling_config`). The adapter file is one safetensors file written by
:class:`relex.io.writer.SafetensorsWriter`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from relex.io.lora import ADAPTER_SAFETENSORS, LoraSource
from relex.io.lora_config import ADAPTER_CONFIG, unit_scaling_config
from relex.io.writer import OutputTensor, SafetensorsWriter


class LoraAdapterWriter:
    """Write a PEFT adapter folder: one ``adapter_model.safetensors`` and ``adapter_config.json``.

    PEFT does not load sharded adapters, so everything goes into one file, laid out up front (keys sorted, as
    PEFT's files have them) from ``ranks`` (base tensor name → output rank of that LoRA module) and ``full``
    (base tensor name → ``(shape, dtype)`` of a tensor written whole: ``modules_to_save``, trained biases).
    Tensors are then accepted in any order, from one thread, and written by a :class:`SafetensorsWriter` on
    its background thread, which hashes the file once complete. Keys are the template adapter's, so the
    output loads with ``PeftModel.from_pretrained(base, folder)`` wherever the template did.
    """

    def __init__(self, folder: Path, template: LoraSource, ranks: dict[str, int],
                 full: dict[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype):
        self.folder = Path(folder)
        self.template = template
        self.ranks = dict(ranks)
        self.dtype = dtype
        self.path = self.folder / ADAPTER_SAFETENSORS
        layout: list[OutputTensor] = []
        for name, rank in self.ranks.items():
            module = template.modules.get(name)
            if module is None:
                raise ValueError(f"{name!r} is not a LoRA module of the template adapter")
            if rank <= 0:
                raise ValueError(f"rank of {name!r} must be positive, got {rank}")
            rows, cols = template.base.tensors[name].shape
            d_out, d_in = (cols, rows) if module.fan_in_fan_out else (rows, cols)
            layout += [OutputTensor(module.a_key, (rank, d_in), dtype),
                       OutputTensor(module.b_key, (d_out, rank), dtype)]
        for name, (shape, full_dtype) in full.items():
            if name not in template.saved:
                raise ValueError(f"{name!r} is not a tensor the template adapter saves whole")
            if tuple(shape) != template.base.tensors[name].shape:
                raise ValueError(f"planned shape of {name!r} differs from the base's")
            layout.append(OutputTensor(template.saved_keys[name], tuple(shape), full_dtype))
        layout.sort(key=lambda t: t.name)  # sorted keys, as PEFT's safetensors files have them
        self._planned = {t.name: t for t in layout}
        self._module_keys = {n: (template.modules[n].a_key, template.modules[n].b_key) for n in self.ranks}
        self._full_keys = {n: template.saved_keys[n] for n in full}
        self._file = SafetensorsWriter(self.folder, {ADAPTER_SAFETENSORS: layout}, ordered=False)
        self._finished = False

    @property
    def bytes_written(self) -> int:
        """Bytes of the tensors handed over so far."""
        return self._file.bytes_written

    def _put(self, key: str, tensor: torch.Tensor) -> None:
        planned = self._planned[key]
        if tuple(tensor.shape) != planned.shape:
            raise ValueError(f"tensor {key!r} has shape {list(tensor.shape)}, planned {list(planned.shape)}")
        self._file.write(key, tensor.detach().to(device="cpu", dtype=planned.dtype).contiguous())

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
        """Check every planned tensor was written, wait until the file is written and hashed, write
        ``adapter_config.json``: the template's config with the output ranks and every scaling exactly 1
        (:func:`unit_scaling_config`)."""
        self._file.finish()
        ranks = {self.template.modules[n].module_path: r for n, r in self.ranks.items()}
        config = unit_scaling_config(self.template.config, ranks)
        (self.folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        self._finished = True

    def digests(self) -> dict[str, str]:
        """``{adapter_model.safetensors: sha256}`` once :meth:`finish` has run."""
        return self._file.digests() if self._finished else {}

    def close(self) -> None:
        """Wait for the tensors in flight (raising a failed write), stop the writer thread, close the file."""
        self._file.close()

    def __enter__(self) -> "LoraAdapterWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
