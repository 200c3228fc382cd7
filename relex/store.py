"""Fit once, materialize many: store a run's trajectory model, then write any step from it.

``relex fit RUN --out TRAJ/`` reads the run (twice: the Gram pass that decides every tensor's model,
then the pass that forms its basis vectors) and stores, per tensor,

* the basis vectors b_r = Σ_i B_ri x_i (for ``relex``: the directions v_j; anchored models add the last
  delta x_T; ``elementwise``: x_a and x_b) as tensors ``NAME@b0``, ``NAME@b1``, … of the tensor's shape;
* for ``matrix-rank1`` the newest singular vectors as ``NAME@u0`` (m,) and ``NAME@v0`` (n,);
* for integer buffers the value to write, ``NAME@value``;
* in ``trajectory.json``: the coefficient model (the predictor's fitted parameters, scale, shrinkage —
  see :meth:`relex.methods.TensorModel.coefficients`), the output dtype, the norm of the base tensor
  (to recognise the base later), the statistics, diagnostics and backtest choices of the fit,

plus the config and tokenizer files of the newest checkpoint. ``relex materialize TRAJ/ --target-step N
--out DIR`` then reads only the base and these files.

Storage cost: Σ over tensors of r × (tensor size) in the storage dtype, r = the number of basis vectors —
k for ``relex`` rank k (k + 1 anchored), 2 for ``elementwise``, 1 for ``last``; ``matrix-rank1`` stores
only m + n numbers per matrix (+ the whole x_T when anchored) and two vectors per 1-D tensor. With the
default float32 storage a rank-1 RELEX trajectory of a bfloat16 model takes twice the model's size
(k × model size in float32); ``--storage-dtype auto`` keeps each tensor's own dtype (k × model size), but
the float32 update is then rounded and the result is no longer bit-identical to ``relex extrapolate``.

With float32 storage, materialize computes exactly what extrapolate computes: the same float32 basis, the
same float64 coefficients from the same stored parameters, the same float32 combination — the written
checkpoints are identical bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from relex import __version__
from relex.device import OUTPUT_DTYPES, check_dtype, resolve_device
from relex.distributed import current
from relex.engine import stream_models
from relex.errors import RelexInputError
from relex.io.discover import discover_series
from relex.io.reader import DTYPE_NAMES, DTYPES, CheckpointReader
from relex.io.run_readers import Row, RunReaders
from relex.io.staging import check_output_folder, require_free_space
from relex.io.writer import OutputTensor, aux_bytes, write_index
from relex.methods import TensorModel
from relex.sinks import (CheckpointSink, TrajectorySink, basis_key, check_targets, factor_keys, parse_targets,
                         run_record, target_folders, value_key)
from relex.staging import staged_folder
from relex.stream import DEFAULT_BLOCK_BYTES, ProgressCallback, StreamPass, TensorState
from relex.trajectory import ModelSelector, ModelSpec, model_spec

FORMAT = "relex-trajectory"
FORMAT_VERSION = 1
MANIFEST = "trajectory.json"
STORAGE_DTYPES = ("float32", "auto")

__all__ = ["FitResult", "MaterializeResult", "basis_key", "factor_keys", "fit_trajectory", "materialize",
           "value_key"]


@dataclass
class FitResult:
    """The outcome of :func:`fit_trajectory`."""

    out_dir: Path
    manifest: dict
    seconds: float
    bytes_read: int
    bytes_written: int

    @property
    def storage_bytes(self) -> int:
        return self.manifest["storage"]["bytes"]


def fit_trajectory(
    run_dir: str | Path | None = None,
    *,
    out_dir: str | Path,
    base: str | Path | None = None,
    steps: str | Sequence[int] | None = None,
    max_step: int | None = None,
    checkpoints: Iterable[tuple[int, str | Path]] | None = None,
    spec: ModelSpec | None = None,
    method: str = "relex",
    rank: int = 1,
    regressor: str = "linear",
    scale: float | str = 1.0,
    auto_scope: str = "run",
    candidates: str | Sequence[str] | None = None,
    holdout: int | None = None,
    copy_norms: bool = False,
    from_step: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    storage_dtype: str = "float32",
    overwrite: bool = False,
    allow_pickle: bool = False,
    max_shard_size: str | int = "5GB",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
) -> FitResult:
    """Fit the trajectory model of a run and store it in ``out_dir`` (see the module docstring).

    Takes the model options of :func:`relex.engine.extrapolate` (one by one, or as ``spec``); ``dtype`` is the dtype materialize will
    write (``auto``: as the newest checkpoint), ``storage_dtype`` that of the stored basis vectors
    (``float32``, exact; ``auto``: each tensor's own dtype). Reads the run twice.
    """
    started = time.perf_counter()
    check_dtype(dtype)
    if storage_dtype not in STORAGE_DTYPES:
        raise RelexInputError(f"unknown --storage-dtype {storage_dtype!r} (use {' or '.join(STORAGE_DTYPES)})")
    out_dir = Path(out_dir)
    spec = model_spec(spec, method=method, rank=rank, regressor=regressor, scale=scale, auto_scope=auto_scope,
                      candidates=candidates, holdout=holdout, copy_norms=copy_norms, from_step=from_step)
    ranks = current()  # the ranks joined (relex.distributed.join); without, this process alone
    opened: dict = {}

    def open_run():
        check_output_folder(out_dir, overwrite)
        series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
        torch_device = ranks.device(resolve_device(device))
        selector = ModelSelector(spec, series.steps, run_pass=True)  # the storage layout needs every model first
        readers = opened["readers"] = RunReaders(series, allow_pickle)
        return series, torch_device, selector, readers

    try:
        series, torch_device, selector, readers = ranks.step(open_run)
        config_folders = readers.config_folders()
        written_dtypes = {n: readers.output_dtype(n, dtype) for n in readers.names}
        with staged_folder(out_dir, overwrite, ranks=ranks) as staging:
            sinks: list[TrajectorySink] = []

            def make_sink(models) -> TrajectorySink:
                storage = {n: torch.float32 if storage_dtype == "float32" else readers.output_dtype(n)
                           for n in readers.names}
                infos = {n: readers.info(n) for n in readers.names}
                order = [n for n in readers.names if n in models]  # every tensor, or this rank's share
                sink = TrajectorySink(staging, models, infos, storage, written_dtypes, order, max_shard_size,
                                      part=ranks.distributed)
                sinks.append(sink)
                # the layout is known once every model is: checked before the storing pass reads anything (each
                # rank its own share)
                require_free_space(out_dir, sink.output_bytes() + aux_bytes(config_folders) + 1024 * len(models))
                return sink

            try:
                measured = stream_models(readers, selector, make_sink, torch_device, block_bytes=block_bytes,
                                         targets=np.array([series.steps[-1]], dtype=np.float64), progress=progress,
                                         ranks=ranks)
            finally:
                for sink in sinks:
                    sink.close()
            writer = sinks[0].writer
            bytes_written = writer.bytes_written if measured.parts is None else sum(
                part["store"]["bytes_written"] for part in measured.parts)
            diagnostics = measured.diagnostics()
            results = {r.name: r for r in measured.tensors}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                **run_record(method=spec.method, options={}, base=series.base.path.resolve(),
                             observed_steps=series.steps, observed_folders=[c.path for c in series.observed]),
                "options": spec.record(),
                "sources": readers.describe(),
                "storage": {"dtype": storage_dtype, "bytes": bytes_written,
                            "model_bytes": readers.base.nbytes()},
                "selection": selector.selection,
                "diagnostics": diagnostics.to_dict() if diagnostics else None,
                "order": list(readers.names),
                "tensors": {},
            }
            for name in readers.names:
                model = measured.models[name]
                info = readers.info(name)
                entry = {
                    "shape": list(info.shape),
                    "input_dtype": DTYPE_NAMES[info.dtype],
                    "dtype": DTYPE_NAMES[written_dtypes[name]],
                    "base_norm": measured.base_norms[name] if info.is_float else None,
                    "stats": _json_safe(results[name].stats),
                }
                if model is None:
                    entry["value"] = value_key(name)
                else:
                    entry["params"] = model.params
                    entry["basis"] = [basis_key(name, r) for r in range(model.n_basis)]
                    entry["factors"] = [list(factor_keys(name, f)) for f in range(len(model.factors))]
                manifest["tensors"][name] = entry

            def save() -> None:
                if measured.parts is not None:
                    write_index(staging, [part["store"] for part in measured.parts])
                writer.copy_aux_files(config_folders)
                writer.write_json(MANIFEST, manifest)

            ranks.step(lambda: save() if ranks.leader else None)
    finally:
        if "readers" in opened:
            opened["readers"].close()
    return FitResult(out_dir, manifest, time.perf_counter() - started, measured.bytes_read, bytes_written)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass
class MaterializeResult:
    out_dirs: dict[int, Path]
    seconds: float
    bytes_read: int
    bytes_written: int


class _StoredCheckpointSink(CheckpointSink):
    """The checkpoint sink of :func:`materialize`: also checks each base tensor against the fitted one."""

    def __init__(self, *args, entries: dict, base_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.entries, self.base_dir = entries, base_dir

    def on_tensor_done(self, state: TensorState) -> None:
        _check_norm(state.name, math.sqrt(max(state.norm_sq, 0.0)), self.entries[state.name].get("base_norm"),
                    self.base_dir)


def materialize(
    trajectory_dir: str | Path,
    *,
    target_step: int | Sequence[int],
    out_dir: str | Path,
    base: str | Path | None = None,
    scale: float | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    allow_interpolation: bool = False,
    max_shard_size: str | int = "5GB",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
) -> MaterializeResult:
    """Write the checkpoint(s) of ``target_step`` from a stored trajectory and the base alone.

    ``scale`` overrides the stored scale (the multiplier of the update from the base); ``base`` the
    stored base folder (its tensors must match: names, shapes and norms are checked). The checkpoints go
    through the same sink as :func:`relex.engine.extrapolate`'s.
    """
    started = time.perf_counter()
    if current().distributed:
        raise RelexInputError("relex materialize runs in one process (without torchrun): it reads only the base and "
                              "the stored vectors")
    folder = Path(trajectory_dir)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise RelexInputError(f"not a trajectory folder (no {MANIFEST}; make one with relex fit)", folder) from None
    except (OSError, ValueError):
        raise RelexInputError("corrupt trajectory manifest (not readable JSON)", manifest_path) from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise RelexInputError(f"unsupported trajectory format {manifest.get('format')!r} "
                              f"version {manifest.get('format_version')!r}", manifest_path)
    targets = parse_targets(target_step)
    check_targets(targets, manifest["observed_steps"][-1], allow_interpolation)
    check_dtype(dtype)
    if scale is not None and not math.isfinite(float(scale)):
        raise RelexInputError(f"--scale must be finite, got {scale}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    torch_device = resolve_device(device)
    base_dir = Path(base) if base is not None else Path(manifest["base"])
    base_reader = CheckpointReader(base_dir)
    store = CheckpointReader(folder)
    try:
        entries = manifest["tensors"]
        order = manifest["order"]
        _check_base(base_reader, entries, order, base_dir)
        steps = np.asarray(manifest["observed_steps"], dtype=np.float64)
        layout, states = [], []
        for name in order:
            entry = entries[name]
            out_dtype = DTYPES[entry["dtype"]]
            if dtype != "auto" and DTYPES[entry["input_dtype"]].is_floating_point:
                out_dtype = OUTPUT_DTYPES[dtype]
            layout.append(OutputTensor(name, tuple(entry["shape"]), out_dtype))
            info = base_reader.tensors[name]
            rows = [Row(base_reader, name, info.dtype, "base")]
            model = None
            if "value" in entry:
                rows.append(Row(store, entry["value"], store.tensors[entry["value"]].dtype, "value"))
            else:
                rows += [Row(store, key, store.tensors[key].dtype, "basis") for key in entry["basis"]]
                factors = [(store.read(ku).numpy(), store.read(kv).numpy()) for ku, kv in entry["factors"]]
                model = TensorModel(entry["params"], np.zeros((len(entry["basis"]), 0)), factors)
            states.append(TensorState(name, info, rows, steps, model=model, known=True))
        total = sum(base_reader.tensors[n].nbytes for n in order) + store.nbytes()
        options = {**manifest["options"], **({"scale": float(scale)} if scale is not None else {})}
        record = run_record(method=manifest["method"], options=options, base=base_dir,
                            observed_steps=manifest["observed_steps"], observed_folders=manifest["observed_folders"],
                            materialized_from=str(folder.resolve()), target_steps=targets,
                            diagnostics=manifest.get("diagnostics"), selection=manifest.get("selection"))
        with staged_folder(out_dir, overwrite) as staging:
            sink = _StoredCheckpointSink(target_folders(staging, targets), layout, np.array(targets, dtype=np.float64),
                                         torch_device, max_shard_size, scale, entries=entries, base_dir=base_dir)
            try:
                require_free_space(out_dir, sink.output_bytes([folder]))  # before reading anything
                bytes_read = StreamPass(states, sink, torch_device, block_bytes=block_bytes, progress=progress,
                                        total_bytes=total).run()
                sink.finish()
            finally:
                sink.close()
            for t in targets:
                sink.save(t, record, [folder])
    finally:
        base_reader.close()
        store.close()
    return MaterializeResult(
        out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
        seconds=time.perf_counter() - started, bytes_read=bytes_read, bytes_written=sink.bytes_written)


def _check_base(reader: CheckpointReader, entries: dict, order: list[str], base_dir: Path) -> None:
    for name in order:
        info = reader.tensors.get(name)
        if info is None:
            raise RelexInputError(f"base lacks tensor {name!r} of the stored trajectory", base_dir)
        if list(info.shape) != entries[name]["shape"]:
            raise RelexInputError(f"tensor {name!r} has shape {list(info.shape)} in the base but "
                                  f"{entries[name]['shape']} in the trajectory", base_dir)


def _check_norm(name: str, norm: float, stored: float | None, base_dir: Path) -> None:
    if stored is None:
        return
    if not math.isclose(norm, stored, rel_tol=1e-5, abs_tol=1e-12):
        raise RelexInputError(f"tensor {name!r} differs from the base the trajectory was fitted on "
                              f"(norm {norm:.6g}, expected {stored:.6g})", base_dir)
