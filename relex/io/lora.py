"""PEFT LoRA adapters seen as the merged model over their base, and LoRA adapters written back.

A TRL + PEFT run saves, per checkpoint, only the adapter: for every LoRA target module (a linear layer
with base weight ``W_0``) the factors ``A_t`` (r × in) and ``B_t`` (out × r), and, in full, the tensors
PEFT trains outright (``modules_to_save``, biases with ``bias="all"`` / ``"lora_only"``). The model the
run trains is the *merged* one::

    W_t = W_0 + ΔW_t,   ΔW_t = s · B_t A_t     (transposed, (B_t A_t)ᵀ, for GPT-2's Conv1D: fan_in_fan_out)
    s = lora_alpha / r          (or lora_alpha / √r with use_rslora)

with ``r`` and ``lora_alpha`` of each module taken from ``rank_pattern`` / ``alpha_pattern`` when a key
matches its name (PEFT's rule: the first key ``k`` for which ``(.*\\.)?(k)$`` matches the module path).
The factors themselves are not a trajectory — ``(B Q)(Q⁻¹ A)`` is the same update for any invertible
``Q``, and Adam moves A and B in a gauge of its own — so relex extrapolates in merged weight space:
:class:`LoraSource` presents an adapter checkpoint as the full set of base tensors, and its
:meth:`LoraSource.delta` gives ``ΔW_t`` exactly (a float64 product of the factors, cast to float32) without
ever subtracting two rounded merged weights.

Everything relex predicts is a mix of observed deltas, ``Σ_i a_i ΔW_i`` per tensor, so a module's prediction
is again a low-rank product: with ``P_i = s_i B_i`` and ``Q_i = A_i``,

    Σ_i a_i P_i Q_i = [a_1 P_1 | … | a_T P_T] · [Q_1; …; Q_T]          (rank ≤ T·r, exact)

:func:`mix_factors` returns that product, or its best rank-k approximation (Eckart–Young) from a QR
decomposition of both stacked factors and an SVD of the small core, with the relative Frobenius error of the
truncation. :class:`LoraAdapterWriter` writes such factors as a PEFT adapter whose ``lora_alpha`` equals its
rank, so that the scaling is exactly 1 (``P`` already carries ``s``). Inner products of two deltas need no
dense matrix either: ``⟨P_i Q_i, P_j Q_j⟩_F = tr((P_iᵀ P_j)(Q_j Q_iᵀ))`` (:func:`factor_inner`).

What relex refuses, because the update is then not ``s·B A`` over the saved base (see
:func:`read_adapter_config`): other PEFT methods, DoRA and the other LoRA variants that change the forward
pass, LoRA on embeddings or convolutions, ``lora_bias``, ``target_parameters``, trainable tokens, layer
replication, and initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from relex.errors import RelexInputError
from relex.io.reader import DTYPE_NAMES, read_safetensors_header
from relex.io.source import Source, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# init_lora_weights values that leave the base weights as saved (B_0 A_0 = 0, or at least the base untouched).
# True/"gaussian"/False: B_0 = 0 or random factors; "eva": A_0 from activations, B_0 = 0 (ranks go to
# rank_pattern/alpha_pattern); "orthogonal": B_0 A_0 = 0 by construction; "mica": A_0 = 0.
_SAFE_INITS = {"gaussian", "eva", "orthogonal", "mica"}
# init_lora_weights values (or prefixes) that subtract s·B_0 A_0 (or a quantisation residual) from W_0 in
# memory: the model being trained is then not the saved base plus s·B A.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoRA variants whose forward pass is not x ↦ W_0 x + s·B A x (name of the config field → what it is).
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora: a learned magnitude rescales the columns of W_0 + s·B A)",
    "kasa_config": "KaSA (kasa_config: a learned diagonal between A and B and a truncated base)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens: the adapter acts only after the invocation "
                               "tokens, so it cannot be merged)",
    "use_qalora": "QALoRA (use_qalora: A acts on pooled input features)",
    "use_bdlora": "BD-LoRA (use_bdlora: block-diagonal factors)",
    "monteclora_config": "MonteCLoRA (monteclora_config: sampled factors)",
    "arrow_config": "Arrow (arrow_config: routed mixture of adapters)",
    "layer_replication": "layer_replication (the adapted model has layers the base checkpoint lacks)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices: sparse embedding-row updates)",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. MoE expert tensors)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
}


def _refuse(problem: str, path: Path) -> RelexInputError:
    return RelexInputError(problem.replace("\n", " "), path)


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` of an adapter folder, checked to be a LoRA relex can merge exactly.

    Raises :class:`RelexInputError` (one line naming the file and the variant) for a missing or unreadable
    file, a PEFT type other than LORA, the LoRA variants in ``_VARIANT_FIELDS`` (DoRA, aLoRA, QALoRA, …,
    ``lora_bias``, ``target_parameters``, trainable tokens, layer replication), initialisations that rewrite the
    base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or are unknown, an unknown ``bias`` mode and malformed
    ``r`` / ``lora_alpha`` / patterns. LoRA on embeddings or convolutions shows only in the weights and is
    refused by :class:`LoraSource`. Supported: ``use_rslora``, ``rank_pattern`` / ``alpha_pattern``,
    ``fan_in_fan_out`` (GPT-2 Conv1D), ``bias`` ``"all"`` / ``"lora_only"`` and ``modules_to_save`` (those
    tensors are saved whole), VeLoRA (it changes only the backward pass).
    """
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise RelexInputError(f"no {ADAPTER_CONFIG} (not a PEFT adapter folder)", Path(folder))
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RelexInputError(f"cannot read the adapter config ({type(exc).__name__})", path) from None
    if not isinstance(config, dict):
        raise RelexInputError("corrupt adapter config (not a JSON object)", path)

    peft_type = str(config.get("peft_type") or "missing")
    if peft_type.upper() != "LORA":
        raise _refuse(f"PEFT type {peft_type} is not LoRA; relex reads only LoRA adapters (peft_type LORA)", path)
    for field, what in _VARIANT_FIELDS.items():
        if config.get(field):
            raise _refuse(f"{what} is not supported: the update is not s·B·A over the saved base", path)
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _SAFE_INITS:
        text = str(init)
        if text.lower().startswith(_BASE_REWRITING_INITS):
            raise _refuse(
                f"init_lora_weights={text!r} rewrites the base weights at initialisation (PEFT trains over a "
                "residual of W_0, e.g. W_0 − s·B_0·A_0, that is not saved), so the adapter cannot be merged "
                "onto the saved base", path,
            )
        raise _refuse(f"unknown init_lora_weights={text!r}: relex cannot tell whether it rewrites the base "
                      "weights", path)
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise _refuse(f"unknown bias mode {config.get('bias')!r}", path)

    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _refuse(f"LoRA rank r must be a positive integer, got {r!r}", path)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _refuse(f"lora_alpha must be a number, got {alpha!r}", path)
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pattern.values()
        ):
            raise _refuse(f"{field} must map module patterns to numbers", path)
        config[field] = pattern
    config.setdefault("use_rslora", False)
    config.setdefault("fan_in_fan_out", False)
    return config


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the value of the first key ``k`` with ``(.*\\.)?(k)$`` matching ``module``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict, module: str) -> tuple[int, float]:
    """``(r, s)`` of module path ``module`` (e.g. ``model.layers.0.self_attn.q_proj``) under ``config``."""
    r = int(_pattern_value(config["rank_pattern"], module, config["r"]))
    alpha = float(_pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


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
        self._saved_keys: dict[str, str] = {}  # base name -> adapter key
        try:
            self._map_keys()
        except BaseException:
            self._weights.close()
            raise
        self.tensors: dict[str, TensorInfo] = {}
        for name, info in base.tensors.items():
            key = self._saved_keys.get(name) or (self.modules[name].a_key if name in self.modules else None)
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
            if name in self._saved_keys:
                raise _refuse(f"tensor {name!r} is saved twice", path)
            self._saved_keys[name] = key
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
            if name in self._saved_keys:
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
            saved = self._weights.read(self._saved_keys[name], start, stop)
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
            return self._weights.read(self._saved_keys[name], start, stop).to(dtype)
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
        saved = sum(infos[self._saved_keys[n]].nbytes + self.base.tensors[n].nbytes for n in self.saved)
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


def factor_inner(pi: torch.Tensor, qi: torch.Tensor, pj: torch.Tensor, qj: torch.Tensor) -> float:
    """``⟨P_i Q_i, P_j Q_j⟩_F = tr((P_iᵀ P_j)(Q_j Q_iᵀ))`` in float64, without forming either product."""
    left = pi.double().T @ pj.double()  # r_i × r_j
    right = qi.double() @ qj.double().T  # r_i × r_j; tr(L (Q_j Q_iᵀ)) = Σ L ∘ (Q_i Q_jᵀ)
    return float((left * right).sum())


def factor_gram_matrix(sources: Sequence[LoraSource], name: str) -> np.ndarray:
    """The T × T Gram matrix ``G_ij = ⟨ΔW_i, ΔW_j⟩`` of tensor ``name`` over adapter checkpoints, from the
    factors alone when every source adapts ``name`` with LoRA (each factor pair is read once)."""
    t = len(sources)
    if not all(name in s.modules for s in sources):
        g = np.zeros((t, t))
        for i in range(t):
            for j in range(i, t):
                g[i, j] = g[j, i] = sources[i].factor_gram(sources[j], name)
        return g
    pairs = [s._factors64(name)[:2] for s in sources]
    p = torch.cat([pq[0] for pq in pairs], dim=1)  # out × Σr
    q = torch.cat([pq[1] for pq in pairs], dim=0)  # Σr × in
    blocks = (p.T @ p) * (q @ q.T)  # entry (a, b): (P_aᵀP_b)(Q_a Q_bᵀ) for rank indices a, b
    edges = np.cumsum([0] + [pq[0].shape[1] for pq in pairs])
    full = blocks.numpy()
    return np.array([[full[edges[i]:edges[i + 1], edges[j]:edges[j + 1]].sum() for j in range(t)]
                     for i in range(t)])


def mix_factors(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``Σ_i w_i P_i Q_i`` as one low-rank product ``P @ Q``; returns ``(P, Q, relative truncation error)``.

    ``rank=None``, or ``rank`` at least ``R = Σ_i r_i``: exactly ``P = [w_1 P_1 | … | w_T P_T]``,
    ``Q = [Q_1; …; Q_T]`` (padded with zero columns / rows up to ``rank``), error 0.0. Otherwise the best
    rank-``rank`` approximation: ``P_cat = U_P R_P`` and ``Q_catᵀ = U_Q R_Q`` (reduced QR), the SVD
    ``R_P R_Qᵀ = U S Vᵀ`` of the small core, and ``P = U_P U_k S_k^½``, ``Q = S_k^½ V_kᵀ U_Qᵀ`` (the
    singular values split evenly between the factors, which keeps both in a range a bf16 adapter stores
    well), padded with zeros when the product has lower rank; the error is ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F =
    √(Σ_{j>k} S_j²) / √(Σ_j S_j²)`` (0.0 for ΔW = 0). Computed in float64; returned in the inputs' float
    dtype (at least float32).
    """
    if len(pairs) != len(weights) or not pairs:
        raise ValueError("mix_factors needs one weight per factor pair, and at least one pair")
    if rank is not None and rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    out_dtype = torch.float32
    for p, q in pairs:
        out_dtype = torch.promote_types(out_dtype, torch.promote_types(p.dtype, q.dtype))
    p_cat = torch.cat([p.double() * float(w) for (p, _), w in zip(pairs, weights)], dim=1)
    q_cat = torch.cat([q.double() for _, q in pairs], dim=0)
    total = p_cat.shape[1]
    m, n = p_cat.shape[0], q_cat.shape[1]
    if rank is None or rank >= total:
        width = total if rank is None else rank
        p_out = torch.zeros((m, width), dtype=torch.float64)
        q_out = torch.zeros((width, n), dtype=torch.float64)
        p_out[:, :total], q_out[:total] = p_cat, q_cat
        return p_out.to(out_dtype), q_out.to(out_dtype), 0.0
    u_p, r_p = torch.linalg.qr(p_cat)  # m × K1, K1 × R
    u_q, r_q = torch.linalg.qr(q_cat.T)  # n × K2, K2 × R
    u, s, vh = torch.linalg.svd(r_p @ r_q.T, full_matrices=False)  # core K1 × K2
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    p_out = torch.zeros((m, rank), dtype=torch.float64)
    q_out = torch.zeros((rank, n), dtype=torch.float64)
    p_out[:, :k] = (u_p @ u[:, :k]) * root
    q_out[:k] = root[:, None] * (vh[:k] @ u_q.T)
    energy = float((s * s).sum())
    error = math.sqrt(max(0.0, float((s[k:] * s[k:]).sum())) / energy) if energy > 0 else 0.0
    return p_out.to(out_dtype), q_out.to(out_dtype), error


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
            plan.append(_Planned(template._saved_keys[name], tuple(shape), full_dtype))
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
        self._full_keys = {n: template._saved_keys[n] for n in full}
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
        """Check every planned tensor was written, hash the file, write ``adapter_config.json``.

        The config is the template's with ``r`` the most common output rank (``rank_pattern`` /
        ``alpha_pattern`` for the other modules), ``lora_alpha = r`` so that every scaling is exactly 1,
        ``use_rslora`` off and ``init_lora_weights`` plain; target modules, ``modules_to_save``, ``bias``,
        ``fan_in_fan_out`` and ``base_model_name_or_path`` are kept.
        """
        missing = sorted(set(self._planned) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned adapter tensors were never written, e.g. {missing[0]!r}")
        os.fsync(self._fd)
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        self.sha256 = digest.hexdigest()
        config = dict(self.template.config)
        counts: dict[int, int] = {}
        for rank in self.ranks.values():
            counts[rank] = counts.get(rank, 0) + 1
        common = max(counts, key=lambda r: (counts[r], r)) if counts else int(config["r"])
        others = {self.template.modules[n].module_path: r for n, r in self.ranks.items() if r != common}
        config.update(
            r=common,
            lora_alpha=common,
            rank_pattern=others,
            alpha_pattern=dict(others),  # alpha = r per module: scaling 1
            use_rslora=False,
            init_lora_weights=True,
            inference_mode=True,
        )
        if "eva_config" in config:  # only PEFT versions that write the key (0.14 and later) accept it when loading
            config["eva_config"] = None
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
