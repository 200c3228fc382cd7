"""Where a streaming pass sends each tensor once its model is known.

* :class:`CheckpointSink` — a Hugging Face checkpoint per target step (``relex extrapolate``; ``relex
  materialize`` writes through it too, from a stored trajectory);
* :class:`AdapterSink` — a PEFT LoRA adapter per target step (``--output lora``);
* :class:`TrajectorySink` — the trajectory store of ``relex fit``;
* :class:`GramSink` — the Gram matrices alone (``collect_grams``, ``relex analyze``, the first pass of
  run-level choices).

Every output folder's ``relex.json`` starts from :func:`run_record`; each sink adds what it knows of its own
target (digests, adapter figures) in ``save``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from relex import __version__
from relex.device import OUTPUT_DTYPES
from relex.errors import RelexInputError
from relex.io.lora_factors import mix_factors
from relex.io.lora_writer import LoraAdapterWriter
from relex.io.run_readers import RunReaders
from relex.io.writer import OutputTensor, ShardedWriter, aux_bytes, copy_aux_files, write_index
from relex.jsonable import write_json
from relex.stream import Chunk, Sink, TensorState, combine


def target_folders(staging: Path, targets: Sequence[int]) -> dict[int, Path]:
    """Where each target step's output goes: the folder itself for one target, ``step-N/`` for several."""
    return {t: staging if len(targets) == 1 else staging / f"step-{t}" for t in targets}


def run_record(*, method: str, options: dict, base, observed_steps: Sequence[int], observed_folders: Sequence,
               **fields) -> dict:
    """The provenance every ``relex.json`` (and ``trajectory.json``) starts with, then ``fields`` in order."""
    return {"relex_version": __version__, "method": method, **options, "base": str(base),
            "observed_steps": list(observed_steps), "observed_folders": [str(f) for f in observed_folders],
            **fields}


def checkpoint_layout(readers: RunReaders, dtype: str, names: Sequence[str] | None = None) -> list[OutputTensor]:
    """The tensors (``names``: a share of them) of a checkpoint predicted from ``readers``' run, in the base's
    storage order."""
    return [OutputTensor(n, readers.info(n).shape, readers.output_dtype(n, dtype))
            for n in (readers.names if names is None else names)]


class _Pieces:
    """Reused output buffers (uint8, any dtype viewed on them), returned by the writer once written."""

    def __init__(self):
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def get(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = count * dtype.itemsize
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.numel() >= nbytes:
                    del self._free[i]
                    return buffer[:nbytes].view(dtype) if nbytes else torch.empty(0, dtype=dtype)
        buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype) if nbytes else torch.empty(0, dtype=dtype)

    def put(self, piece: torch.Tensor) -> None:
        """Return a piece from :meth:`get` (the whole buffer under it goes back to the pool)."""
        if piece.numel():
            buffer = torch.empty(0, dtype=torch.uint8).set_(piece.untyped_storage())
            with self._lock:
                self._free.append(buffer)


class _Buffers(threading.local):
    """Per compute thread float32 chunk buffers of a sink (on the pass's device)."""

    def get(self, device: torch.device, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two buffers of at least ``count`` entries."""
        if not hasattr(self, "out") or self.out.numel() < count:
            self.out = torch.empty(count, dtype=torch.float32, device=device)
            self.tmp = torch.empty(count, dtype=torch.float32, device=device)
        return self.out, self.tmp


def _value_into(piece: torch.Tensor, value: torch.Tensor) -> None:
    """An integer buffer's newest value (float64, from the deltas) or a stored value, cast as written."""
    if value.dtype.is_floating_point and not piece.dtype.is_floating_point:
        value = value.round()
    piece.copy_(value)


class _PredictionSink(Sink):
    """The prediction w_0 + Σ a_r(t*) b_r (+ Σ a_f u_f v_fᵀ) of each target step, span by span."""

    def __init__(self, targets: np.ndarray, device: torch.device, scale: float | None = None):
        self.targets, self.device, self.scale = np.asarray(targets, dtype=np.float64), device, scale
        self.pieces = _Pieces()
        self.buffers = _Buffers()

    def output_dtype(self, state: TensorState) -> torch.dtype:
        raise NotImplementedError

    def on_model(self, state: TensorState) -> None:
        model = state.model
        if model is None:
            if state.is_float:  # pragma: no cover - every floating-point tensor gets a model
                raise RuntimeError(f"no model for tensor {state.name!r}")
            return
        state.prepared["coefficients"] = model.coefficients(self.targets, self.scale)
        state.prepared["factors"] = [(torch.as_tensor(np.asarray(u), dtype=torch.float32, device=self.device),
                                      torch.as_tensor(np.asarray(v), dtype=torch.float32, device=self.device))
                                     for u, v in model.factors]

    def open_span(self, state: TensorState, first: int, count: int) -> list[torch.Tensor]:
        return [self.pieces.get(count, self.output_dtype(state)) for _ in self.targets]

    def fill(self, state: TensorState, span: list[torch.Tensor], lo: int, chunk: Chunk) -> None:
        hi = lo + chunk.count
        if chunk.value is not None:
            for piece in span:
                _value_into(piece[lo:hi], chunk.value)
            return
        out, tmp = self.buffers.get(self.device, chunk.count)
        factors = state.prepared["factors"]
        for piece, coefficients in zip(span, state.prepared["coefficients"]):
            piece[lo:hi].copy_(combine(chunk.w0, coefficients, chunk.basis, factors, chunk.first, out, tmp))


class _WritingSink(_PredictionSink):
    """A prediction sink that writes through one writer per target (``self.writers``)."""

    writers: dict

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class TensorSink(_PredictionSink):
    """The prediction of each target step as CPU tensors in memory (``tensors[target][name]``), in ``dtypes``.

    The arithmetic is the checkpoint sink's, so the values are those ``relex extrapolate`` writes.
    """

    def __init__(self, targets, dtypes: dict[str, torch.dtype], device: torch.device):
        super().__init__(targets, device)
        self.dtypes = dtypes
        self.tensors: dict[int, dict[str, torch.Tensor]] = {int(t): {} for t in self.targets}

    def output_dtype(self, state: TensorState) -> torch.dtype:
        return self.dtypes[state.name]

    def wants_chunks(self, state: TensorState) -> bool:
        return True

    def on_model(self, state: TensorState) -> None:
        for tensors in self.tensors.values():
            tensors[state.name] = torch.empty(state.info.numel, dtype=self.dtypes[state.name])
        super().on_model(state)

    def open_span(self, state: TensorState, first: int, count: int) -> list[torch.Tensor]:
        return [tensors[state.name][first: first + count] for tensors in self.tensors.values()]

    def emit(self, state: TensorState, span: list[torch.Tensor]) -> None:
        pass  # the span's pieces are views of the tensors themselves

    def on_tensor_done(self, state: TensorState) -> None:
        for tensors in self.tensors.values():
            tensors[state.name] = tensors[state.name].view(state.info.shape)


class _ShardedOutput:
    """Of a sink whose files are :class:`ShardedWriter` shards, possibly one rank's part of the output."""

    writers: dict

    @property
    def shard_count(self) -> int:
        """Shards each output of this sink has."""
        return len(next(iter(self.writers.values())).shards)

    def number_shards(self, first: int, total: int) -> None:
        """Name this rank's shards among every rank's (``first`` shards come before them, ``total`` in all)."""
        for writer in self.writers.values():
            writer.number_shards(first, total)

    def part(self) -> dict:
        """What this sink wrote into each output, for the index rank 0 writes."""
        return {key: writer.part() for key, writer in self.writers.items()}


class CheckpointSink(_ShardedOutput, _WritingSink):
    """A Hugging Face checkpoint per target step: shards, index, config and tokenizer files, ``relex.json``.

    ``scale`` (materialize) overrides the scale of every stored model. With ``part``, ``layout`` is this
    rank's share of the checkpoint (see :class:`ShardedWriter`); :meth:`save` then gets every rank's part.
    """

    def __init__(self, folders: dict[int, Path], layout: Sequence[OutputTensor], targets, device: torch.device,
                 max_shard_size: str | int, scale: float | None = None, part: bool = False):
        super().__init__(targets, device, scale)
        self.folders = folders
        self.dtypes = {t.name: t.dtype for t in layout}
        self.writers = {t: ShardedWriter(folders[t], layout, max_shard_size, part=part) for t in folders}

    def describe(self) -> str:
        return f"a checkpoint of step {', '.join(f'{t:g}' for t in self.targets)}"

    def output_bytes(self, config_folders: Sequence[Path]) -> int:
        """Bytes this sink will write: every shard, index, config and tokenizer file, and ``relex.json``."""
        extra = aux_bytes(config_folders) + 64 * 1024 + 200 * len(self.dtypes)
        return sum(w.total_bytes + extra for w in self.writers.values())

    def output_dtype(self, state: TensorState) -> torch.dtype:
        return self.dtypes[state.name]

    def wants_chunks(self, state: TensorState) -> bool:
        return True

    def emit(self, state: TensorState, span: list[torch.Tensor]) -> None:
        for writer, piece in zip(self.writers.values(), span):
            writer.write_part(state.name, piece, done=lambda piece=piece: self.pieces.put(piece))

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers.values())

    def save(self, target: int, record: dict, config_folders: Sequence[Path], parts: Sequence[dict] | None = None) -> None:
        """Config and tokenizer files, and ``relex.json``: ``record`` with the target step and shard digests;
        given every rank's :meth:`part`, the index of all their shards too."""
        writer = self.writers[target]
        writer.copy_aux_files(config_folders)
        if parts is None:
            digests = writer.digests()
        else:
            write_index(writer.folder, [p[target] for p in parts])
            digests = {shard: digest for p in parts for shard, digest in p[target]["sha256"].items()}
        writer.write_json("relex.json", {**record, "target_step": target, "shards_sha256": digests})


class AdapterSink(_WritingSink):
    """The prediction of a LoRA run as a PEFT adapter per target step.

    The prediction of a target module is W_0 + Σ_i m_i ΔW_i with ΔW_i = P_i Q_i (P_i = s·B_i, Q_i = A_i), so it
    is exactly one LoRA of rank Σ_i r_i: P = [m_1 P_1 | … | m_T P_T], Q = [Q_1; …; Q_T], optionally truncated
    to ``lora_rank`` by an SVD of the small factors. Full tensors of the adapter (``modules_to_save``) are
    predicted like any weight.
    """

    def __init__(self, readers: RunReaders, folders: dict[int, Path], targets, device: torch.device,
                 lora_rank: int | None, dtype: str):
        super().__init__(targets, device)
        self.readers, self.folders = readers, folders
        newest = readers.observed[-1]
        exact = {name: sum(source.modules[name].rank for source in readers.observed) for name in newest.modules}
        self.ranks = {n: r if lora_rank is None else min(lora_rank, r) for n, r in exact.items()}
        self.exact = lora_rank is None or all(lora_rank >= r for r in exact.values())
        self.factor_dtype = torch.float32 if dtype == "auto" else OUTPUT_DTYPES[dtype]
        self.full_dtypes = {n: readers.output_dtype(n, dtype) for n in newest.saved}
        full = {n: (readers.info(n).shape, d) for n, d in self.full_dtypes.items()}
        self.writers = {t: LoraAdapterWriter(folders[t], newest, self.ranks, full, self.factor_dtype)
                        for t in folders}
        self.errors: dict[int, dict[str, float]] = {t: {} for t in folders}
        self._parts: list[list[torch.Tensor]] = []

    @staticmethod
    def check(readers: RunReaders, method: str) -> None:
        """``--output lora`` needs adapters and a model whose prediction mixes the observed updates."""
        if any(source.kind != "lora" for source in readers.observed):
            raise RelexInputError("--output lora needs a LoRA run (adapter checkpoints); this run holds full "
                                  "weights", readers.observed[-1].folder)
        if method == "matrix-rank1":
            raise RelexInputError("--output lora needs a mode whose prediction mixes the observed updates "
                                  "(relex, elementwise or last), not matrix-rank1")
        modules = set(readers.observed[-1].modules)
        for source in readers.observed[:-1]:
            if set(source.modules) != modules:
                raise RelexInputError("targets other modules than the newest adapter; --output lora needs one "
                                      "set of LoRA modules", source.folder)

    def describe(self) -> str:
        return f"a PEFT adapter of step {', '.join(f'{t:g}' for t in self.targets)}"

    def output_dtype(self, state: TensorState) -> torch.dtype:
        return self.full_dtypes[state.name]

    def output_bytes(self, config_folders: Sequence[Path]) -> int:
        """Bytes this sink will write (an upper bound): factors, full tensors, tokenizer files, ``relex.json``."""
        size = self.factor_dtype.itemsize
        modules = sum(rank * sum(self.readers.info(n).shape[:2]) * size for n, rank in self.ranks.items())
        full = sum(self.readers.info(n).numel * d.itemsize
                   for n, d in self.full_dtypes.items())
        extra = aux_bytes(config_folders) + 64 * 1024 + 1024 * len(self.ranks)
        return len(self.folders) * (modules + full + extra)

    def wants_chunks(self, state: TensorState) -> bool:
        return state.name in self.full_dtypes  # the base's own tensors are not part of an adapter

    def on_model(self, state: TensorState) -> None:
        super().on_model(state)
        if state.name not in self.ranks:
            return
        model = state.model
        n_obs = len(self.readers.observed)
        pairs = [source.factors(self.readers.aliases[i].get(state.name, state.name))
                 for i, source in enumerate(self.readers.observed)]
        for k, target in enumerate(self.writers):
            if model is None or model.n_basis == 0:
                weights = np.zeros(n_obs)
            else:
                weights = np.asarray(state.prepared["coefficients"][k][:model.n_basis]) @ np.asarray(model.basis)
            p, q, error = mix_factors(pairs, [float(w) for w in weights], self.ranks[state.name])
            self.writers[target].write_module(state.name, p.to(self.factor_dtype), q.to(self.factor_dtype))
            self.errors[target][state.name] = float(error)

    def emit(self, state: TensorState, span: list[torch.Tensor]) -> None:
        self._parts.append([piece.clone() for piece in span])
        for piece in span:
            self.pieces.put(piece)

    def on_tensor_done(self, state: TensorState) -> None:
        if not self._parts:
            return
        for k, writer in enumerate(self.writers.values()):
            parts = [span[k] for span in self._parts]
            whole = parts[0] if len(parts) == 1 else torch.cat(parts)
            writer.write_full(state.name, whole.reshape(state.info.shape))
        self._parts = []

    @property
    def bytes_written(self) -> int:
        return sum(_folder_bytes(folder) for folder in self.folders.values())

    def save(self, target: int, record: dict, config_folders: Sequence[Path]) -> None:
        """Tokenizer files (an adapter folder has no model config of its own) and ``relex.json`` with the
        adapter's rank, truncation errors and digests."""
        folder = self.folders[target]
        copy_aux_files(folder, config_folders, skip=("config.json", "generation_config.json"))
        errors = self.errors[target]
        record = {**record, "target_step": target,
                  "lora": {"rank": max(self.ranks.values(), default=0), "exact": self.exact,
                           "max_truncation_error": max(errors.values(), default=0.0), "truncation_error": errors},
                  "adapter_sha256": self.writers[target].digests()}
        write_json(folder / "relex.json", record)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0


def basis_key(name: str, r: int) -> str:
    return f"{name}@b{r}"


def factor_keys(name: str, f: int) -> tuple[str, str]:
    return f"{name}@u{f}", f"{name}@v{f}"


def value_key(name: str) -> str:
    return f"{name}@value"


class TrajectorySink(_ShardedOutput, Sink):
    """The store of ``relex fit``: per tensor its basis vectors b_r (``NAME@b0``, …), the newest singular
    vectors of per-matrix models (``NAME@u0``, ``NAME@v0``) or, for an integer buffer, its value
    (``NAME@value``). Its layout depends on the models, which it is given before the writing pass
    (:meth:`bind`; ``before_writing(bytes)`` then checks the disk). ``storage_dtype`` is ``float32`` or ``auto``
    (each tensor's own dtype); ``dtype`` the dtype materialize will write. With ``part``, ``names`` are this
    rank's share of the tensors (see :class:`ShardedWriter`)."""

    needs_models = True

    def __init__(self, folder: Path, readers: RunReaders, storage_dtype: str, dtype: str, names: Sequence[str],
                 max_shard_size: str | int, part: bool = False, before_writing=None):
        self.folder, self.names, self.max_shard_size, self.part_of_run = folder, list(names), max_shard_size, part
        self.infos = {n: readers.info(n) for n in readers.names}
        self.storage_dtypes = {n: torch.float32 if storage_dtype == "float32" else readers.output_dtype(n)
                               for n in readers.names}
        self.value_dtypes = {n: readers.output_dtype(n, dtype) for n in readers.names}
        self.before_writing = before_writing
        self.writers: dict = {}
        self.pieces = _Pieces()

    def describe(self) -> str:
        return "the trajectory store (basis vectors and fitted curves)"

    def bind(self, models: dict) -> None:
        self.layout: list[OutputTensor] = []
        for name in self.names:
            model, shape = models[name], self.infos[name].shape
            if model is None:
                self.layout.append(OutputTensor(value_key(name), shape, self.value_dtypes[name]))
                continue
            for r in range(model.n_basis):
                self.layout.append(OutputTensor(basis_key(name, r), shape, self.storage_dtypes[name]))
            for f, (u, v) in enumerate(model.factors):
                ku, kv = factor_keys(name, f)
                self.layout.append(OutputTensor(ku, (len(u),), torch.float32))
                self.layout.append(OutputTensor(kv, (len(v),), torch.float32))
        self.writer = ShardedWriter(self.folder, self.layout, self.max_shard_size, hashed=False, part=self.part_of_run)
        self.writers = {"store": self.writer}
        if self.before_writing is not None:  # the layout is known: checked before the storing pass reads anything
            self.before_writing(self.writer.total_bytes + 1024 * len(models))

    def output_bytes(self) -> int:
        return self.writer.total_bytes

    def wants_chunks(self, state: TensorState) -> bool:
        return state.model is None or state.model.n_basis > 0

    def open_span(self, state: TensorState, first: int, count: int):
        if state.model is None:
            return first, [self.pieces.get(count, self.value_dtypes[state.name])]
        dtype = self.storage_dtypes[state.name]
        return first, [self.pieces.get(count, dtype) for _ in range(state.model.n_basis)]

    def fill(self, state: TensorState, span, lo: int, chunk: Chunk) -> None:
        _, pieces = span
        hi = lo + chunk.count
        if chunk.value is not None:
            _value_into(pieces[0][lo:hi], chunk.value)
            return
        for r, piece in enumerate(pieces):
            piece[lo:hi].copy_(chunk.basis[r])

    def emit(self, state: TensorState, span) -> None:
        first, pieces = span
        keys = [value_key(state.name)] if state.model is None else [basis_key(state.name, r)
                                                                    for r in range(len(pieces))]
        for key, piece in zip(keys, pieces):
            self.writer.write_part(key, piece, offset=first * piece.element_size(),
                                   done=lambda piece=piece: self.pieces.put(piece))

    def on_tensor_done(self, state: TensorState) -> None:
        if state.model is None:
            return
        for f, (u, v) in enumerate(state.model.factors):
            ku, kv = factor_keys(state.name, f)
            self.writer.write(ku, torch.as_tensor(np.asarray(u, dtype=np.float32)))
            self.writer.write(kv, torch.as_tensor(np.asarray(v, dtype=np.float32)))

    @property
    def bytes_written(self) -> int:
        return self.writer.bytes_written

    def finish(self) -> None:
        self.writer.finish()

    def close(self) -> None:
        if self.writers:
            self.writer.close()


class GramSink(Sink):
    """Keeps each floating-point tensor's Gram matrix and base norm; writes nothing."""

    def describe(self) -> str:
        return "Gram matrices"

    def __init__(self):
        self.grams: dict[str, np.ndarray] = {}
        self.base_norms: dict[str, float] = {}
        self.datas: dict = {}

    def on_model(self, state: TensorState) -> None:
        self.datas[state.name] = state.data
        if state.is_float:
            self.grams[state.name] = state.data.gram
            self.base_norms[state.name] = state.data.base_norm
