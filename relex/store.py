"""Fit once, materialize many: store a run's trajectory model, then write any step from it.

``relex fit RUN --out TRAJ/`` reads the run (twice: the Gram pass that decides every tensor's model,
then the pass that forms its basis vectors) and stores, per tensor,

* the basis vectors b_r = Σ_i B_ri x_i (for ``relex``: the directions v_j; anchored models add the last
  delta x_T; ``elementwise``: x_a and x_b) as tensors ``NAME@b0``, ``NAME@b1``, … of the tensor's shape;
* for ``matrix-rank1`` the newest singular vectors as ``NAME@u0`` (m,) and ``NAME@v0`` (n,);
* for integer buffers the value to write, ``NAME@value``;
* in ``trajectory.json``: the coefficient model (the predictor's fitted parameters, scale, shrinkage —
  see :meth:`relex.methods.TensorModel.coefficients`), the output dtype, the norm of the base tensor
  (to recognise the base later), the statistics, the verdict and the backtest choices of the fit,

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

import numpy as np

from relex.device import OUTPUT_DTYPES, resolve_device
from relex.distributed import current
from relex.errors import RelexInputError
from relex.io.reader import DTYPE_NAMES, DTYPES, CheckpointReader
from relex.io.run_readers import Row, RunReaders
from relex.io.staging import check_output_folder, require_free_space
from relex.io.writer import OutputTensor
from relex.jsonable import jsonable
from relex.methods import TensorModel
from relex.options import RunOptions
from relex.progress import Report, bytes_of
from relex.sinks import CheckpointSink, basis_key, factor_keys, run_record, target_folders, value_key
from relex.staging import staged_folder
from relex.stream import StreamPass, TensorState

FORMAT = "relex-trajectory"
FORMAT_VERSION = 1
MANIFEST = "trajectory.json"
STORAGE_DTYPES = ("float32", "auto")

__all__ = ["FitResult", "MaterializeResult", "basis_key", "factor_keys", "materialize", "trajectory_manifest",
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


def trajectory_manifest(result, readers: RunReaders, options: RunOptions, bytes_written: int) -> dict:
    """``trajectory.json`` of a fit (see the module docstring): what :func:`materialize` needs of every tensor,
    and the fit's provenance, selection and verdict. ``result`` is the fit's :class:`relex.run.PassResult`."""
    series = result.series
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **run_record(method=options.model.method, options={}, base=series.base.path.resolve(),
                     observed_steps=series.steps, observed_folders=[c.path for c in series.observed]),
        "options": options.model.record(),
        "sources": result.sources,
        "storage": {"dtype": options.storage_dtype, "bytes": bytes_written, "model_bytes": readers.base.nbytes()},
        "selection": result.selection,
        "verdict": result.verdict.to_dict(),
        "order": list(readers.names),
        "tensors": {},
    }
    tensors = {t.name: t for t in result.tensors}
    for name in readers.names:
        model = result.models.get(name)
        info = readers.info(name)
        entry = {"shape": list(info.shape), "input_dtype": DTYPE_NAMES[info.dtype],
                 "dtype": DTYPE_NAMES[readers.output_dtype(name, options.dtype)],
                 "base_norm": result.base_norms[name] if info.is_float else None,
                 "stats": jsonable(tensors[name].stats)}
        if model is None:
            entry["value"] = value_key(name)
        else:
            entry["params"] = model.params
            entry["basis"] = [basis_key(name, r) for r in range(model.n_basis)]
            entry["factors"] = [list(factor_keys(name, f)) for f in range(len(model.factors))]
        manifest["tensors"][name] = entry
    return manifest


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


def materialize(trajectory_dir: str | Path, out_dir: str | Path, options: RunOptions | None = None, *,
                base: str | Path | None = None, scale: float | None = None, progress: Report = None,
                **settings) -> MaterializeResult:
    """Write the checkpoint of each target step (``options.target_steps``) from a stored trajectory and the
    base alone; of the options, ``dtype``, ``device``, ``overwrite``, ``allow_interpolation``,
    ``max_shard_size`` and ``block_bytes`` apply.

    ``scale`` overrides the stored scale (the multiplier of the update from the base); ``base`` the
    stored base folder (its tensors must match: names, shapes and norms are checked). The checkpoints go
    through the same sink as :func:`relex.api.extrapolate`'s.
    """
    started = time.perf_counter()
    options = (options or RunOptions(device="cpu")).replace(**settings)
    if not options.target_steps:
        raise RelexInputError("give at least one --target-step")
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
    targets = list(options.target_steps)
    last = manifest["observed_steps"][-1]
    early = [t for t in targets if t <= last]
    if early and not options.allow_interpolation:
        raise RelexInputError(f"target step {early[0]} is not beyond the last observed step {last} "
                              "(pass --allow-interpolation to predict or judge inside the observed window)")
    dtype, overwrite, max_shard_size = options.dtype, options.overwrite, options.max_shard_size
    if scale is not None and not math.isfinite(float(scale)):
        raise RelexInputError(f"--scale must be finite, got {scale}")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    torch_device = resolve_device(options.device)
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
        recorded = {**manifest["options"], **({"scale": float(scale)} if scale is not None else {})}
        record = run_record(method=manifest["method"], options=recorded, base=base_dir,
                            observed_steps=manifest["observed_steps"], observed_folders=manifest["observed_folders"],
                            materialized_from=str(folder.resolve()), target_steps=targets,
                            verdict=manifest.get("verdict"), selection=manifest.get("selection"))
        with staged_folder(out_dir, overwrite) as staging:
            sink = _StoredCheckpointSink(target_folders(staging, targets), layout, np.array(targets, dtype=np.float64),
                                         torch_device, max_shard_size, scale, entries=entries, base_dir=base_dir)
            try:
                require_free_space(out_dir, sink.output_bytes([folder]))  # before reading anything
                bytes_read = StreamPass(states, sink, torch_device, block_bytes=options.block_bytes,
                                        progress=bytes_of(progress, "materializing"), total_bytes=total).run()
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
