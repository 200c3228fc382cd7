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
from relex.engine import (
    DEFAULT_BLOCK_BYTES,
    OUTPUT_DTYPES,
    ProgressCallback,
    _check_targets,
    _combine,
    _extra_options,
    _Job,
    _model_pass,
    _newest_value,
    _output_plan,
    _row_blocks,
    _Series,
    _targets,
    _TensorState,
    resolve_device,
)
from relex.errors import RelexInputError
from relex.io.discover import discover_series
from relex.io.reader import DTYPES, DTYPE_NAMES, CheckpointReader
from relex.io.writer import PlannedTensor, ShardedWriter, check_output_folder, staged_folder
from relex.methods import TensorModel
from relex.trajectory import ModelSelector, ModelSpec

FORMAT = "relex-trajectory"
FORMAT_VERSION = 1
MANIFEST = "trajectory.json"
STORAGE_DTYPES = ("float32", "auto")


def basis_key(name: str, r: int) -> str:
    return f"{name}@b{r}"


def factor_keys(name: str, f: int) -> tuple[str, str]:
    return f"{name}@u{f}", f"{name}@v{f}"


def value_key(name: str) -> str:
    return f"{name}@value"


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

    Takes the model options of :func:`relex.engine.extrapolate`; ``dtype`` is the dtype materialize will
    write (``auto``: as the newest checkpoint), ``storage_dtype`` that of the stored basis vectors
    (``float32``, exact; ``auto``: each tensor's own dtype). Reads the run twice.
    """
    started = time.perf_counter()
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise RelexInputError(f"unknown --dtype {dtype!r} (use auto, {', '.join(OUTPUT_DTYPES)})")
    if storage_dtype not in STORAGE_DTYPES:
        raise RelexInputError(f"unknown --storage-dtype {storage_dtype!r} (use {' or '.join(STORAGE_DTYPES)})")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
    torch_device = resolve_device(device)
    spec = ModelSpec(method=method, rank=rank, regressor=regressor, scale=scale, auto_scope=auto_scope,
                     candidates=candidates, holdout=holdout, copy_norms=copy_norms, from_step=from_step)
    planner = ModelSelector(spec, series.steps, run_pass=True)  # the storage layout needs every model first
    readers = _Series(series, allow_pickle)
    try:
        outputs = _output_plan(readers, dtype)
        models: dict[str, TensorModel | None] = {}
        base_norms: dict[str, float] = {}
        layout: list[PlannedTensor] = []
        writer_box: dict = {}

        def store_dtype(name: str) -> torch.dtype:
            return torch.float32 if storage_dtype == "float32" else readers.output_dtype(name)

        def on_model(state: _TensorState) -> None:
            models[state.name] = state.model
            base_norms[state.name] = state.data.base_norm
            info = state.info
            if state.model is None:
                layout.append(PlannedTensor(value_key(state.name), info.shape, outputs[state.name].dtype))
                return
            for r in range(state.model.n_basis):
                layout.append(PlannedTensor(basis_key(state.name, r), info.shape, store_dtype(state.name)))
            for f, (u, v) in enumerate(state.model.factors):
                ku, kv = factor_keys(state.name, f)
                layout.append(PlannedTensor(ku, (len(u),), torch.float32))
                layout.append(PlannedTensor(kv, (len(v),), torch.float32))

        def on_block(state: _TensorState, job: _Job, w0: torch.Tensor, x: torch.Tensor) -> None:
            writer = writer_box.get("writer")
            if writer is None:
                writer = writer_box["writer"] = ShardedWriter(writer_box["folder"], layout, max_shard_size)
            model = state.model
            if model is None:
                piece = [_newest_value(w0, x, outputs[state.name].dtype).cpu()]
            elif model.n_basis:
                weights = torch.as_tensor(model.basis, dtype=torch.float32, device=torch_device)
                basis = (weights @ x).cpu()
                piece = [basis[r] for r in range(model.n_basis)]
            else:
                piece = []
            state.pieces.append(piece)
            if len(state.pieces) < job.n_blocks:
                return
            shape = state.info.shape
            if model is None:
                parts = [p[0] for p in state.pieces]
                writer.write(value_key(state.name), (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(shape))
            else:
                for r in range(model.n_basis):
                    parts = [p[r] for p in state.pieces]
                    row = parts[0] if len(parts) == 1 else torch.cat(parts)
                    writer.write(basis_key(state.name, r), row.reshape(shape).to(store_dtype(state.name)))
                for f, (u, v) in enumerate(model.factors):
                    ku, kv = factor_keys(state.name, f)
                    writer.write(ku, torch.as_tensor(np.asarray(u, dtype=np.float32)))
                    writer.write(kv, torch.as_tensor(np.asarray(v, dtype=np.float32)))
            state.pieces = []

        with staged_folder(out_dir, overwrite) as staging:
            writer_box["folder"] = staging
            try:
                tensors, bytes_read, (run_gram, verdict_check) = _model_pass(
                    readers, planner, torch_device, block_bytes, on_block=on_block,
                    targets=np.array([series.steps[-1]], dtype=np.float64), keep_grams=False, progress=progress,
                    on_model=on_model)
                writer = writer_box.get("writer") or ShardedWriter(staging, layout, max_shard_size)
                writer_box["writer"] = writer
                writer.finish()
            finally:
                if "writer" in writer_box:
                    writer_box["writer"].close()
            from relex.analysis.drift import diagnose

            diagnostics = verdict_check.apply(diagnose(run_gram, series.steps) if np.any(run_gram) else None)
            results = {t.name: t for t in tensors}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "relex_version": __version__,
                "method": method,
                "options": {"rank": rank, "regressor": regressor, "scale": planner.scale, **_extra_options(spec)},
                "base": str(series.base.path.resolve()),
                "observed_steps": series.steps,
                "observed_folders": [str(c.path) for c in series.observed],
                "sources": readers.describe(),
                "storage": {"dtype": storage_dtype, "bytes": writer.bytes_written,
                            "model_bytes": readers.base.nbytes()},
                "selection": planner.selection,
                "diagnostics": diagnostics.to_dict() if diagnostics else None,
                "order": list(readers.names),
                "tensors": {},
            }
            for name in readers.names:
                model = models[name]
                info = readers.info(name)
                entry = {
                    "shape": list(info.shape),
                    "input_dtype": DTYPE_NAMES[info.dtype],
                    "dtype": DTYPE_NAMES[outputs[name].dtype],
                    "base_norm": base_norms[name] if info.is_float else None,
                    "stats": _json_safe(results[name].stats),
                }
                if model is None:
                    entry["value"] = value_key(name)
                else:
                    entry["params"] = model.params
                    entry["basis"] = [basis_key(name, r) for r in range(model.n_basis)]
                    entry["factors"] = [list(factor_keys(name, f)) for f in range(len(model.factors))]
                manifest["tensors"][name] = entry
            writer.copy_aux_files(readers.config_folders())
            writer.write_json(MANIFEST, manifest)
    finally:
        readers.close()
    return FitResult(out_dir, manifest, time.perf_counter() - started, bytes_read, writer.bytes_written)


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
    stored base folder (its tensors must match: names, shapes and norms are checked).
    """
    started = time.perf_counter()
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
    targets = _targets(target_step)
    _check_targets(targets, manifest["observed_steps"][-1], allow_interpolation)
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise RelexInputError(f"unknown --dtype {dtype!r} (use auto, {', '.join(OUTPUT_DTYPES)})")
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
        plan = []
        for name in order:
            entry = entries[name]
            out_dtype = DTYPES[entry["dtype"]]
            if dtype != "auto" and DTYPES[entry["input_dtype"]].is_floating_point:
                out_dtype = OUTPUT_DTYPES[dtype]
            plan.append(PlannedTensor(name, tuple(entry["shape"]), out_dtype))
        planned = {p.name: p for p in plan}
        target_array = np.array(targets, dtype=np.float64)
        bytes_read = 0
        total = sum(base_reader.tensors[n].nbytes for n in order) + store.nbytes()
        with staged_folder(out_dir, overwrite) as staging:
            folders = {t: staging if len(targets) == 1 else staging / f"step-{t}" for t in targets}
            writers = {t: ShardedWriter(folders[t], plan, max_shard_size) for t in targets}
            try:
                for name in order:
                    entry = entries[name]
                    out = planned[name]
                    if "value" in entry:
                        value = store.read(entry["value"])
                        bytes_read += value.numel() * value.element_size()
                        for writer in writers.values():
                            writer.write(name, value.to(out.dtype).reshape(out.shape))
                        continue
                    model = TensorModel(entry["params"], np.zeros((len(entry["basis"]), 0)))
                    coefficients = model.coefficients(target_array, scale)
                    factors = [(store.read(ku).to(torch_device), store.read(kv).to(torch_device))
                               for ku, kv in entry["factors"]]
                    info = base_reader.tensors[name]
                    blocks = _row_blocks(info, len(entry["basis"]), block_bytes)
                    pieces = []
                    norm_sq = 0.0
                    for start, stop in blocks:
                        raw = base_reader.read(name, start, stop)
                        bytes_read += raw.numel() * raw.element_size()
                        w0 = raw.to(device=torch_device, dtype=torch.float32).reshape(-1)
                        norm_sq += float(w0.double() @ w0.double())
                        basis = None
                        if entry["basis"]:
                            rows = [store.read(key, start, stop) for key in entry["basis"]]
                            bytes_read += sum(r.numel() * r.element_size() for r in rows)
                            basis = torch.stack([r.reshape(-1).to(device=torch_device, dtype=torch.float32)
                                                 for r in rows])
                        factor_rows = [(u if start is None else u[start:stop], v) for u, v in factors]
                        pieces.append([_combine(w0, row, basis, factor_rows).to(out.dtype).cpu()
                                       for row in coefficients])
                    _check_norm(name, math.sqrt(norm_sq), entry.get("base_norm"), base_dir)
                    for i, writer in enumerate(writers.values()):
                        parts = [p[i] for p in pieces]
                        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
                        writer.write(name, tensor.reshape(out.shape))
                    if progress is not None:
                        progress(name, bytes_read, total)
                for writer in writers.values():
                    writer.finish()
            finally:
                for writer in writers.values():
                    writer.close()
            for t, writer in writers.items():
                writer.copy_aux_files([folder])
                provenance = {
                    "relex_version": __version__,
                    "materialized_from": str(folder.resolve()),
                    "method": manifest["method"],
                    **manifest["options"],
                    **({"scale": float(scale)} if scale is not None else {}),
                    "base": str(base_dir),
                    "observed_steps": manifest["observed_steps"],
                    "observed_folders": manifest["observed_folders"],
                    "target_step": t,
                    "target_steps": targets,
                    "diagnostics": manifest.get("diagnostics"),
                    "selection": manifest.get("selection"),
                    "shards_sha256": writer.shard_digests(),
                }
                writer.write_json("relex.json", provenance)
    finally:
        base_reader.close()
        store.close()
    return MaterializeResult(
        out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
        seconds=time.perf_counter() - started, bytes_read=bytes_read,
        bytes_written=sum(w.bytes_written for w in writers.values()))


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
