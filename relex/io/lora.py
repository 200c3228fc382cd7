"""PEFT LoRA adapters seen as the merged model over their base.

A TRL + PEFT run saves, per checkpoint, only the adapter: for every LoRA target module (a linear layer
with base weight ``W_0``) the factors ``A_t`` (r × in) and ``B_t`` (out × r), and, in full, the tensors
PEFT trains outright (``modules_to_save``, biases with ``bias="all"`` / ``"lora_only"``). The model the
run trains is the *merged* one::

    W_t = W_0 + ΔW_t,   ΔW_t = s · B_t A_t     (transposed, (B_t A_t)ᵀ, for GPT-2's Conv1D: fan_in_fan_out)

with ``r`` and the scaling ``s`` of each module from its ``adapter_config.json`` (:mod:`relex.io.lora_config`).
The factors themselves are not a trajectory — ``(B Q)(Q⁻¹ A)`` is the same update for any invertible
``Q``, and Adam moves A and B in a gauge of its own — so relex extrapolates in merged weight space:
:class:`LoraSource` presents an adapter checkpoint as the full set of base tensors, and its
:meth:`LoraSource.delta` gives ``ΔW_t`` exactly (a float64 product of the factors, cast to float32) without
ever subtracting two rounded merged weights. :meth:`LoraSource.factors` gives the factors of ``ΔW_t = P Q``
(``P = s·B``, ``Q = A``; ``s·Aᵀ`` and ``Bᵀ`` with fan_in_fan_out) for the factor algebra of
:mod:`relex.io.lora_factors`.

What relex refuses, because the update is then not ``s·B A`` over the saved base: what
:func:`relex.io.lora_config.read_adapter_config` refuses, and, seen only in the weights, LoRA on embeddings or
convolutions, ``lora_bias``, DoRA magnitudes, trainable tokens and LoRA tensors of any other kind.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from relex.errors import RelexInputError
from relex.io.lora_config import lora_scaling, read_adapter_config
from relex.io.lora_factors import factor_inner
from relex.io.reader import read_safetensors_header
from relex.io.source import Source, TensorInfo

ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def _refuse(problem: str, path: Path) -> RelexInputError:
    return RelexInputError(problem.replace("\n", " "), path)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted weight: ``ΔW = scaling · B A`` (transposed when ``fan_in_fan_out``).

    ``base_name`` is the base tensor (``model.layers.0.self_attn.q_proj.weight``), ``a_key`` / ``b_key`` the
    keys of ``lora_A`` (r × in) and ``lora_B`` (out × r) in the adapter file.
    """

    base_name: str
    a_key: str
    b_key: str
    rank: int
    scaling: float
    fan_in_fan_out: bool

    @property
    def module_path(self) -> str:
        return self.base_name.removesuffix(".weight")


class _AdapterWeights:
    """The tensors of one adapter file, read lazily (safetensors) or loaded once (opted-in pickle)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._pickled: dict[str, torch.Tensor] | None = None
        if path.suffix == ".bin":
            self._pickled = self._load_pickled(path)
            self.infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, path, i)
                          for i, (k, v) in enumerate(self._pickled.items())}
            return
        self.infos = read_safetensors_header(path)
        try:  # opened now, not on first read: reads come from more than one thread
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise RelexInputError(f"cannot open file ({exc.strerror})", path) from None

    @staticmethod
    def _load_pickled(path: Path) -> dict[str, torch.Tensor]:
        # Reached only with an explicit opt-in. weights_only refuses arbitrary objects; mmap (zip-format
        # files) keeps whole tensors such as a saved lm_head on disk until they are read.
        state = None
        for mmap in (True, False):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception as exc:  # noqa: BLE001 - any load failure is the file's fault
                if not mmap:
                    raise RelexInputError(f"cannot load pickled adapter weights ({type(exc).__name__})",
                                          path) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RelexInputError("pickled adapter weights are not a state dict of tensors", path)
        return state

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        info = self.infos[key]
        if self._pickled is not None:
            tensor = self._pickled[key]
            return (tensor if start is None and stop is None else tensor[start:stop]).clone()
        shape = list(info.shape)
        offset, nbytes = info.offset, info.nbytes
        if (start is not None or stop is not None) and shape:
            row_bytes = nbytes // shape[0] if shape[0] else 0
            begin = max(0, start or 0)
            end = min(shape[0], shape[0] if stop is None else stop)
            offset += begin * row_bytes
            shape[0] = max(0, end - begin)
            nbytes = shape[0] * row_bytes
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        done = 0
        while done < nbytes:
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise RelexInputError(f"cannot read tensor {key!r} ({exc.strerror})", self.path) from None
            if n == 0:
                raise RelexInputError(f"truncated file while reading tensor {key!r}", self.path)
            done += n
        return buffer.view(info.dtype).reshape(shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _full_tensor_name(key: str) -> str:
    """Base name of a tensor PEFT saved whole: ``q_proj.base_layer.bias`` → ``q_proj.bias``,
    ``lm_head.modules_to_save.default.weight`` (an unfiltered state dict) → ``lm_head.weight``."""
    key = key.replace(".base_layer.", ".")
    return re.sub(r"\.modules_to_save\.(?:default\.)?", ".", key)


class LoraSource(Source):
    """A PEFT LoRA adapter checkpoint seen as the merged model ``W_0 + ΔW`` over its base.

    ``folder`` holds ``adapter_model.safetensors`` (``adapter_model.bin`` only with ``allow_pickle``) and
    ``adapter_config.json``; ``base`` is the base checkpoint's :class:`Source`, shared, not owned (closing
    this source does not close it). ``tensors`` are the base's (names, shapes and dtypes); the infos of
    tensors the adapter changes point at the adapter file.

    Attributes:
        modules: base tensor name → :class:`LoraModule`.
        saved: base tensor names the adapter stores whole (``modules_to_save``, trained biases).
        saved_keys: base tensor name → its key in the adapter file, for each of ``saved``.
        config: the checked ``adapter_config.json``.
    """

    kind = "lora"

    def __init__(self, folder: str | Path, base: Source, allow_pickle: bool = False):
        self.folder = Path(folder)
        self.base = base
        self.config = read_adapter_config(self.folder)
        self.file = self._weights_file(allow_pickle)
        self._weights = _AdapterWeights(self.file)
        self.modules: dict[str, LoraModule] = {}
        self.saved: set[str] = set()
        self.saved_keys: dict[str, str] = {}
        try:
            self._map_keys()
        except BaseException:
            self._weights.close()
            raise
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in base.tensors.items():
            key = self.saved_keys.get(name) or (self.modules[name].a_key if name in self.modules else None)
            if key is not None:
                info = TensorInfo(name, info.shape, info.dtype, self.file, self._weights.infos[key].offset)
            self.tensors[name] = info

    def _weights_file(self, allow_pickle: bool) -> Path:
        safetensors, pickled = self.folder / ADAPTER_SAFETENSORS, self.folder / ADAPTER_PICKLE
        if safetensors.is_file():
            return safetensors
        if pickled.is_file():
            if not allow_pickle:
                raise RelexInputError(
                    "only pickled adapter weights (adapter_model.bin) found; pickles can run code when loaded, so "
                    "relex refuses them unless you pass --allow-pickle (or save the adapter as safetensors)",
                    pickled,
                )
            return pickled
        raise RelexInputError(f"no adapter weights ({ADAPTER_SAFETENSORS}) found", self.folder)

    # -- the adapter's keys ------------------------------------------------------------------------
    def _map_keys(self) -> None:
        """Sort the adapter's keys into LoRA factors and whole tensors, and check them against the base."""
        path = self.file
        factors: dict[str, dict[str, str]] = {}
        for key, info in self._weights.infos.items():
            bare = key.removeprefix(PEFT_PREFIX)
            if "lora_embedding_A" in bare or "lora_embedding_B" in bare:
                raise _refuse(f"LoRA on an embedding layer ({key!r}) is not supported", path)
            if "lora_magnitude_vector" in bare:
                raise _refuse(f"DoRA adapter ({key!r}): the update is not s·B·A", path)
            if "trainable_tokens" in bare:
                raise _refuse(f"trainable tokens ({key!r}) are not supported", path)
            match = re.fullmatch(r"(.+)\.lora_([AB])\.(weight|bias)", bare)
            if match and match.group(3) == "bias":
                raise _refuse(f"lora_bias ({key!r}): a trained bias on lora_B is not supported", path)
            if match:
                module, which = match.group(1), match.group(2)
                if len(info.shape) != 2:
                    raise _refuse(f"LoRA on a convolution layer ({key!r} has {len(info.shape)}-D factors) is "
                                  "not supported", path)
                factors.setdefault(module, {})[which] = key
                continue
            if re.search(r"(^|\.)lora_", bare):
                raise _refuse(f"unrecognised LoRA tensor {key!r} (not a plain LoRA factor)", path)
            name = _full_tensor_name(bare)
            base_info = self.base.tensors.get(name)
            if base_info is None:
                raise _refuse(f"saved tensor {key!r} has no tensor {name!r} in the base {self.base.folder}", path)
            if info.shape != base_info.shape:
                raise _refuse(f"saved tensor {key!r} has shape {list(info.shape)} but {list(base_info.shape)} in "
                              "the base", path)
            if name in self.saved_keys:
                raise _refuse(f"tensor {name!r} is saved twice", path)
            self.saved_keys[name] = key
            self.saved.add(name)
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, keys in sorted(factors.items()):
            if set(keys) != {"A", "B"}:
                missing = "lora_B" if "A" in keys else "lora_A"
                raise _refuse(f"module {module!r} has no {missing} weight", path)
            a_shape = self._weights.infos[keys["A"]].shape
            b_shape = self._weights.infos[keys["B"]].shape
            rank, scaling = lora_scaling(self.config, module)
            if a_shape[0] != rank or b_shape[1] != rank:
                raise _refuse(f"module {module!r} has factors of rank {a_shape[0]}/{b_shape[1]} but the config "
                              f"gives r={rank}", path)
            name = f"{module}.weight"
            base_info = self.base.tensors.get(name)
            if base_info is None:
                raise _refuse(f"LoRA module {module!r} has no tensor {name!r} in the base {self.base.folder}",
                              path)
            expected = (a_shape[1], b_shape[0]) if fan_in_fan_out else (b_shape[0], a_shape[1])
            if base_info.shape != expected:
                hint = " (is fan_in_fan_out set correctly?)" if base_info.shape == expected[::-1] else ""
                raise _refuse(f"LoRA module {module!r} makes an update of shape {list(expected)} but the base "
                              f"tensor has shape {list(base_info.shape)}{hint}", path)
            if name in self.saved_keys:
                raise _refuse(f"tensor {name!r} is both LoRA-adapted and saved whole", path)
            self.modules[name] = LoraModule(name, keys["A"], keys["B"], rank, scaling, fan_in_fan_out)

    # -- factors and deltas ------------------------------------------------------------------------
    def _factors64(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(P, Q, bytes read)`` in float64 with ``ΔW = P @ Q`` in the base tensor's layout."""
        module = self.modules[name]
        a, b = self._weights.read(module.a_key), self._weights.read(module.b_key)
        nbytes = a.numel() * a.element_size() + b.numel() * b.element_size()
        p, q = b.double() * module.scaling, a.double()
        if module.fan_in_fan_out:  # ΔW = (s·B A)ᵀ = (s·Aᵀ)(Bᵀ)
            p, q = a.double().T * module.scaling, b.double().T
        return p, q, nbytes

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, Q)`` in float32 with ``ΔW = P @ Q`` in the base tensor's layout: ``P = s·B`` (out × r),
        ``Q = A`` (r × in); with ``fan_in_fan_out``, ``P = s·Aᵀ`` and ``Q = Bᵀ``."""
        p, q, _ = self._factors64(name)
        return p.float().contiguous(), q.float().contiguous()

    def delta(self, name: str, start: int | None = None,
              stop: int | None = None) -> tuple[torch.Tensor, int]:
        """``(W_t − W_0 in float32, bytes read)`` for tensor ``name``, rows ``start:stop`` when given.

        LoRA modules: ``P[start:stop] @ Q`` computed in float64 (the factors are read whole); tensors saved
        whole: saved − base, in float64 then cast; untouched tensors: zeros (no read). The shape is that of
        :meth:`read`: ``(rows, *rest)``.
        """
        info = self.base.tensors[name]
        shape = list(info.shape)
        rows = slice(start, stop)
        if shape and (start is not None or stop is not None):
            shape[0] = len(range(*rows.indices(shape[0])))
        if name in self.modules:
            p, q, nbytes = self._factors64(name)
            return (p[rows] @ q).float().reshape(shape), nbytes
        if name in self.saved:
            saved = self._weights.read(self.saved_keys[name], start, stop)
            base = self.base.read(name, start, stop)
            nbytes = saved.numel() * saved.element_size() + base.numel() * base.element_size()
            return (saved.double() - base.double()).float().reshape(shape), nbytes
        return torch.zeros(shape, dtype=torch.float32), 0

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The merged weight ``W_0 + ΔW`` in the base dtype (rows ``start:stop`` when given).

        Saved tensors are returned as saved (cast to the base dtype); LoRA modules are merged in float64.
        Prefer :meth:`delta` for arithmetic: the merged weight is rounded to the base dtype.
        """
        dtype = self.base.tensors[name].dtype
        if name in self.saved:
            return self._weights.read(self.saved_keys[name], start, stop).to(dtype)
        base = self.base.read(name, start, stop)
        if name not in self.modules:
            return base
        p, q, _ = self._factors64(name)
        return (base.double() + (p[slice(start, stop)] @ q).reshape(base.shape)).to(dtype)

    def factor_gram(self, other: "LoraSource", name: str) -> float:
        """``⟨ΔW_self, ΔW_other⟩_F`` of tensor ``name``, in factor space when both adapt it with LoRA
        (``tr((P_iᵀ P_j)(Q_j Q_iᵀ))``, O((out + in)·r²)), densely otherwise."""
        if name in self.modules and name in other.modules:
            pi, qi, _ = self._factors64(name)
            pj, qj, _ = other._factors64(name)
            return factor_inner(pi, qi, pj, qj)
        if not (name in self.modules or name in self.saved) or not (name in other.modules or name in other.saved):
            return 0.0
        x, _ = self.delta(name)
        y, _ = other.delta(name)
        return float((x.double() * y.double()).sum())

    # -- the rest of the Source interface ----------------------------------------------------------
    @property
    def config_folder(self) -> Path:
        """The adapter folder: TRL saves the tokenizer there (``config.json`` comes from the base)."""
        return self.folder

    def nbytes(self) -> int:
        """Bytes :meth:`delta` reads for every tensor once: each module's factors, and each saved tensor
        with its base (untouched tensors cost nothing) — not the size of the merged model."""
        infos = self._weights.infos
        factors = sum(infos[m.a_key].nbytes + infos[m.b_key].nbytes for m in self.modules.values())
        saved = sum(infos[self.saved_keys[n]].nbytes + self.base.tensors[n].nbytes for n in self.saved)
        return factors + saved

    def describe(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        scalings = sorted({m.scaling for m in self.modules.values()})
        out = {
            "kind": self.kind,
            "folder": str(self.folder),
            "adapter_file": self.file.name,
            "base": str(self.base.folder),
            "r": self.config["r"],
            "lora_alpha": self.config["lora_alpha"],
            "use_rslora": bool(self.config.get("use_rslora")),
            "scaling": scalings[0] if len(scalings) == 1 else scalings,
            "ranks": ranks,
            "target_modules": self.config.get("target_modules"),
            "modules_to_save": self.config.get("modules_to_save"),
            "n_lora_modules": len(self.modules),
            "saved_tensors": sorted(self.saved),
            "fan_in_fan_out": bool(self.config.get("fan_in_fan_out")),
            "bias": self.config.get("bias", "none"),
        }
        for field in ("rank_pattern", "alpha_pattern"):
            if self.config.get(field):
                out[field] = self.config[field]
        return out

    def close(self) -> None:
        """Close the adapter file (the base source is the caller's to close)."""
        self._weights.close()
