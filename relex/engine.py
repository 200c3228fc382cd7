"""The streaming engine: from a checkpoint series to the checkpoint(s) of later steps.

For each tensor, in the base's storage order: read the base and the T observed checkpoints (whole, or in
row blocks when the tensor is large), form float32 deltas X (T×n), accumulate G = X Xᵀ, let the
trajectory model turn G into mixing weights A, and write w_0 + A X. The next tensor is read by a
background thread while the current one computes. Memory holds at most two tensors' worth of
T + 2 float32 rows, never a whole model.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from relex import __version__
from relex.analysis.drift import DriftDiagnostics, diagnose
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries, discover_series
from relex.io.reader import CheckpointReader, TensorInfo
from relex.io.writer import PlannedTensor, ShardedWriter, check_output_folder, staged_folder
from relex.methods import TensorPlan, get_method
from relex.subspace import gram

DEFAULT_BLOCK_BYTES = 2 * 1024**3
OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TIED_HEAD = "lm_head.weight"


@dataclass
class TensorResult:
    """What the engine did with one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stats: dict
    relative_delta: float  # ‖x_T‖ / ‖w_0‖
    gram: np.ndarray | None = field(default=None, repr=False)


@dataclass
class ExtrapolationResult:
    """The outcome of :func:`extrapolate`: where the checkpoints went and what was measured."""

    out_dirs: dict[int, Path]
    series: CheckpointSeries
    method: str
    options: dict
    tensors: list[TensorResult]
    diagnostics: DriftDiagnostics | None
    seconds: float
    bytes_read: int
    bytes_written: int
    device: str

    @property
    def target_steps(self) -> list[int]:
        return list(self.out_dirs)

    def summary(self) -> dict:
        """Whole-run figures: tensor count, explained variance and fit R² (mean, min), time, bytes."""
        moved = [t for t in self.tensors if t.stats.get("rank", 0) > 0]
        explained = np.array([t.stats["explained"] for t in moved]) if moved else np.array([np.nan])
        r2 = np.array([t.stats["r2"] for t in moved]) if moved else np.array([np.nan])
        return {
            "tensors": len(self.tensors),
            "tensors_moved": len(moved),
            "explained_mean": float(np.mean(explained)),
            "explained_min": float(np.min(explained)),
            "explained_median": float(np.median(explained)),
            "r2_mean": float(np.mean(r2)),
            "r2_min": float(np.min(r2)),
            "seconds": self.seconds,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
        }

    def to_dict(self, per_tensor: bool = True) -> dict:
        payload = {
            "relex_version": __version__,
            "method": self.method,
            **self.options,
            "base": str(self.series.base.path),
            "observed_steps": self.series.steps,
            "observed_folders": [str(c.path) for c in self.series.observed],
            "target_steps": self.target_steps,
            "outputs": {str(k): str(v) for k, v in self.out_dirs.items()},
            "device": self.device,
            "summary": self.summary(),
            "diagnostics": self.diagnostics.to_dict() if self.diagnostics else None,
        }
        if per_tensor:
            payload["tensors"] = {
                t.name: {"shape": list(t.shape), "relative_delta": t.relative_delta, **t.stats}
                for t in self.tensors
            }
        return payload


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RelexInputError(f"--device {device} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RelexInputError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


class _Series:
    """Open readers over the base and observed checkpoints, with the tensor layout checked."""

    def __init__(self, series: CheckpointSeries, allow_pickle: bool):
        self.series = series
        self.base = CheckpointReader(series.base.path, allow_pickle=allow_pickle)
        self.observed = [CheckpointReader(c.path, allow_pickle=allow_pickle) for c in series.observed]
        self.names = self._storage_order(self.base)
        self.aliases = [self._check_layout(r) for r in self.observed]

    @staticmethod
    def _storage_order(reader: CheckpointReader) -> list[str]:
        # Reading in storage order keeps the access to each file sequential.
        files = {f: i for i, f in enumerate(reader.files)}
        return sorted(reader.tensors, key=lambda n: (files[reader.tensors[n].file], reader.tensors[n].offset))

    def _tied_source(self, reader: CheckpointReader) -> str | None:
        for name in reader.tensors:
            if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
                return name
        return None

    def _check_layout(self, reader: CheckpointReader) -> dict[str, str]:
        """Names, shapes must match the base; a missing tied lm_head reads the embedding instead."""
        aliases = {}
        mine, base = set(reader.tensors), set(self.base.tensors)
        missing = base - mine
        if missing == {TIED_HEAD} and _config_ties(reader.folder):
            source = self._tied_source(reader)
            if source is not None:
                aliases[TIED_HEAD] = source
                missing = set()
        extra = mine - base - ({TIED_HEAD} if TIED_HEAD not in base else set())
        if missing or extra:
            what = []
            if missing:
                what.append(f"lacks {len(missing)} tensor(s) of the base, e.g. {sorted(missing)[0]!r}")
            if extra:
                what.append(f"has {len(extra)} tensor(s) the base lacks, e.g. {sorted(extra)[0]!r}")
            raise RelexInputError("tensor names differ from the base: " + "; ".join(what), reader.folder)
        for name in self.names:
            info = reader.tensors[aliases.get(name, name)]
            expected = self.base.tensors[name].shape
            if info.shape != expected:
                raise RelexInputError(
                    f"tensor {name!r} has shape {list(info.shape)} but {list(expected)} in the base", info.file
                )
        return aliases

    def info(self, name: str) -> TensorInfo:
        return self.base.tensors[name]

    def output_dtype(self, name: str) -> torch.dtype:
        newest = self.observed[-1]
        return newest.tensors[self.aliases[-1].get(name, name)].dtype

    def read_block(self, name: str, start: int | None, stop: int | None, device: torch.device):
        """(w_0, X, bytes read): float32 base rows (n,) and deltas (T, n) of one row block."""
        raw = self.base.read(name, start, stop)
        nbytes = raw.numel() * raw.element_size()
        w0 = raw.to(device=device, dtype=torch.float32).reshape(-1)
        x = torch.empty((len(self.observed), w0.numel()), dtype=torch.float32, device=device)
        for i, (reader, aliases) in enumerate(zip(self.observed, self.aliases)):
            source = aliases.get(name, name)
            raw = reader.read(source, start, stop)
            nbytes += raw.numel() * raw.element_size()
            x[i].copy_(raw.reshape(-1))
            x[i].sub_(w0)
        return w0, x, nbytes

    def checked_gram(self, name: str, start, stop, w0: torch.Tensor, x: torch.Tensor) -> np.ndarray:
        """G = X Xᵀ of a block; NaN/Inf anywhere in the inputs shows up in G, and only then are the
        inputs scanned to name the file (scanning every tensor up front would cost a full extra pass)."""
        g = gram(x)
        if np.isfinite(g).all() and math.isfinite(float(w0 @ w0)):
            return g
        sources = [(self.base, name), *[(r, a.get(name, name)) for r, a in zip(self.observed, self.aliases)]]
        for reader, source in sources:
            _check_finite(reader.read(source, start, stop), source, reader.tensors[source].file)
        raise RelexInputError(f"tensor {name!r} overflows float32 arithmetic", self.base.tensors[name].file)

    def close(self) -> None:
        for reader in [self.base, *self.observed]:
            reader.close()


def _config_ties(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(config.get("tie_word_embeddings", True))


def _check_finite(tensor: torch.Tensor, name: str, file: Path) -> None:
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise RelexInputError(f"tensor {name!r} contains NaN or Inf", file)


def _row_blocks(info: TensorInfo, n_observed: int, block_bytes: int) -> list[tuple[int | None, int | None]]:
    if len(info.shape) == 0 or info.numel == 0:
        return [(None, None)]
    rows = info.shape[0]
    per_row = max(1, info.numel // rows) * 4 * (n_observed + 2)
    block_rows = max(1, block_bytes // per_row)
    if block_rows >= rows:
        return [(None, None)]
    return [(s, min(rows, s + block_rows)) for s in range(0, rows, block_rows)]


ProgressCallback = Callable[[str, int, int], None]


def extrapolate(
    run_dir: str | Path | None = None,
    *,
    target_step: int | Sequence[int],
    out_dir: str | Path,
    base: str | Path | None = None,
    steps: str | Sequence[int] | None = None,
    max_step: int | None = None,
    checkpoints: Iterable[tuple[int, str | Path]] | None = None,
    method: str = "relex",
    rank: int = 1,
    regressor: str = "linear",
    scale: float = 1.0,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    allow_interpolation: bool = False,
    allow_pickle: bool = False,
    max_shard_size: str | int = "5GB",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    keep_grams: bool = False,
    progress: ProgressCallback | None = None,
) -> ExtrapolationResult:
    """Write the checkpoint(s) of ``target_step`` predicted from a run's observed checkpoints.

    Args:
        run_dir: folder holding ``checkpoint-N/``, ``global_step_N/`` or ``step_N/`` folders
            (or pass ``checkpoints`` as ``(step, folder)`` pairs instead).
        target_step: the step to predict, or several (then ``out_dir/step-N/`` holds each).
        out_dir: the output folder; written to a temporary folder beside it and renamed at the end.
        base: the step-0 checkpoint, when it is not the run's own step-0 folder.
        steps, max_step: which observed checkpoints to use (all by default).
        method, rank, regressor, scale: the trajectory model (``relex`` = temporal rank-k SVD).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: output dtype; ``auto`` keeps the dtype of the newest observed checkpoint.
        allow_interpolation: permit target steps at or before the last observed step.
        allow_pickle: read ``pytorch_model*.bin`` weights (pickles) when no safetensors exist.
        block_bytes: tensors whose T+2 float32 copies exceed this are processed in row blocks.
        keep_grams: keep each tensor's Gram matrix in the result (for analysis).
        progress: called as ``progress(tensor_name, bytes_read_so_far, total_bytes)``.

    Returns:
        An :class:`ExtrapolationResult` with per-tensor statistics and the drift diagnostics.

    Raises:
        RelexInputError: on any bad input; no output folder is left behind.
    """
    started = time.perf_counter()
    targets = sorted({int(t) for t in ([target_step] if isinstance(target_step, (int, np.integer)) else target_step)})
    if not targets:
        raise RelexInputError("give at least one --target-step")
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise RelexInputError(f"unknown --dtype {dtype!r} (use auto, {', '.join(OUTPUT_DTYPES)})")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
    last = series.steps[-1]
    early = [t for t in targets if t <= last]
    if early and not allow_interpolation:
        raise RelexInputError(
            f"target step {early[0]} is not beyond the last observed step {last} "
            "(pass --allow-interpolation to predict inside the observed window)"
        )
    torch_device = resolve_device(device)
    options = {"rank": rank, "regressor": regressor, "scale": scale}
    model = get_method(method, **options)
    observed_steps = np.array(series.steps, dtype=np.float64)
    target_array = np.array(targets, dtype=np.float64)

    readers = _Series(series, allow_pickle)
    try:
        plan = [
            PlannedTensor(n, readers.info(n).shape,
                          OUTPUT_DTYPES[dtype] if dtype != "auto" and readers.info(n).is_float else readers.output_dtype(n))
            for n in readers.names
        ]
        planned_by_name = {p.name: p for p in plan}
        total_bytes = readers.base.nbytes() * (1 + len(series.observed))
        jobs = _jobs(readers, block_bytes)

        tensors: list[TensorResult] = []
        run_gram = np.zeros((len(series.observed),) * 2)
        bytes_read = 0
        with staged_folder(out_dir, overwrite) as staging:
            folders = {t: staging if len(targets) == 1 else staging / f"step-{t}" for t in targets}
            writers = {t: ShardedWriter(folders[t], plan, max_shard_size) for t in targets}
            try:
                state: dict = {}
                blocks = _prefetched(readers, jobs, torch_device)
                for (name, start, stop, pass_index, n_blocks), w0, x, nbytes in blocks:
                    bytes_read += nbytes
                    info = readers.info(name)
                    if pass_index == 0:
                        if not state or state["name"] != name:
                            state = {"name": name, "gram": np.zeros((x.shape[0],) * 2), "norm0": 0.0,
                                     "blocks": 0, "out": []}
                        if info.is_float:
                            state["gram"] += readers.checked_gram(name, start, stop, w0, x)
                            state["norm0"] += float(w0 @ w0)
                        state["blocks"] += 1
                    if state["blocks"] == n_blocks and (n_blocks == 1 or pass_index == 1):
                        if "plan" not in state:
                            state["plan"] = _plan_tensor(model, state["gram"], observed_steps, target_array,
                                                         name, info)
                            g = state["gram"]
                            tensors.append(TensorResult(
                                name, info.shape, str(info.dtype).replace("torch.", ""), state["plan"].stats,
                                math.sqrt(max(g[-1, -1], 0.0) / state["norm0"]) if state["norm0"] > 0 else 0.0,
                                g if keep_grams else None,
                            ))
                            run_gram += g
                        _write_block(writers, state, w0, x, readers, name, n_blocks, planned_by_name, torch_device)
                    if progress is not None:
                        progress(name, bytes_read, total_bytes)
                for writer in writers.values():
                    writer.finish()
            finally:
                for writer in writers.values():
                    writer.close()
            seconds = time.perf_counter() - started
            diagnostics = diagnose(run_gram, series.steps) if np.any(run_gram) else None
            result = ExtrapolationResult(
                out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
                series=series, method=method, options=options, tensors=tensors, diagnostics=diagnostics,
                seconds=seconds, bytes_read=bytes_read,
                bytes_written=sum(w.bytes_written for w in writers.values()), device=str(torch_device),
            )
            sources = [series.newest.path, *[c.path for c in reversed(series.observed[:-1])], series.base.path]
            for t, writer in writers.items():
                writer.copy_aux_files(sources)
                provenance = result.to_dict()
                provenance["target_step"] = t
                provenance["shards_sha256"] = writer.shard_digests()
                writer.write_json("relex.json", provenance)
    finally:
        readers.close()
    result.seconds = time.perf_counter() - started
    return result


def _jobs(readers: "_Series", block_bytes: int, passes_when_blocked: int = 2) -> list[tuple]:
    """(name, start, stop, pass index, number of blocks) for every row block to read, in order."""
    jobs = []
    for name in readers.names:
        blocks = _row_blocks(readers.info(name), len(readers.observed), block_bytes)
        passes = 1 if len(blocks) == 1 else passes_when_blocked
        for p in range(passes):
            jobs.extend((name, start, stop, p, len(blocks)) for start, stop in blocks)
    return jobs


def _prefetched(readers: "_Series", jobs: list[tuple], device: torch.device):
    """Yield ``(job, w_0, X, bytes)`` for each job while a background thread reads the next one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex-read") as pool:
        def submit(k):
            name, start, stop, *_ = jobs[k]
            return pool.submit(readers.read_block, name, start, stop, device)

        pending = submit(0) if jobs else None
        for k, job in enumerate(jobs):
            w0, x, nbytes = pending.result()
            pending = submit(k + 1) if k + 1 < len(jobs) else None
            yield job, w0, x, nbytes


@dataclass
class GramSet:
    """Per-tensor Gram matrices of a run's deltas: everything the temporal models and diagnostics need."""

    series: CheckpointSeries
    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    grams: dict[str, np.ndarray]  # (T, T) float64 per floating-point tensor
    base_norms: dict[str, float]  # ‖w_0‖ per tensor
    seconds: float
    bytes_read: int

    @property
    def steps(self) -> list[int]:
        return self.series.steps

    def total(self) -> np.ndarray:
        """The whole-model Gram matrix (sum over tensors)."""
        return sum(self.grams.values())


def collect_grams(
    run_dir: str | Path | None = None,
    *,
    base: str | Path | None = None,
    steps: str | Sequence[int] | None = None,
    max_step: int | None = None,
    checkpoints: Iterable[tuple[int, str | Path]] | None = None,
    device: str = "auto",
    allow_pickle: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
) -> GramSet:
    """Read a run once, streaming, and return each tensor's Gram matrix G = X Xᵀ of its deltas.

    Same inputs and checks as :func:`extrapolate`; nothing is written.
    """
    started = time.perf_counter()
    series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
    readers = _Series(series, allow_pickle)
    torch_device = resolve_device(device)
    grams: dict[str, np.ndarray] = {}
    norms: dict[str, float] = {}
    bytes_read = 0
    total_bytes = readers.base.nbytes() * (1 + len(series.observed))
    try:
        for (name, start, stop, *_), w0, x, nbytes in _prefetched(readers, _jobs(readers, block_bytes, 1), torch_device):
            bytes_read += nbytes
            if readers.info(name).is_float:
                grams[name] = grams.get(name, 0) + readers.checked_gram(name, start, stop, w0, x)
                norms[name] = norms.get(name, 0.0) + float(w0 @ w0)
            if progress is not None:
                progress(name, bytes_read, total_bytes)
    finally:
        readers.close()
    return GramSet(
        series=series,
        names=[n for n in readers.names if n in grams],
        shapes={n: readers.info(n).shape for n in readers.names},
        grams=grams,
        base_norms={n: float(np.sqrt(v)) for n, v in norms.items()},
        seconds=time.perf_counter() - started,
        bytes_read=bytes_read,
    )


def _plan_tensor(model, gram, steps, targets, name, info) -> TensorPlan:
    if not info.is_float:
        # Integer buffers are not weights: keep the newest observed value.
        weights = np.zeros((len(targets), len(steps)))
        weights[:, -1] = 1.0
        return TensorPlan(weights, {"rank": 0, "explained": 0.0, "explained_rank1": 0.0, "r2": 1.0,
                                    "copied": True})
    return model.plan(gram, steps, targets, tensor=name, ndim=len(info.shape))


def _write_block(writers, state, w0, x, readers, name, n_blocks, plan_list, device):
    """Compute w_0 + A X for each target and write it (collecting row blocks of a blocked tensor)."""
    weights = torch.as_tensor(state["plan"].weights, dtype=torch.float32, device=device)  # (n_targets, T)
    planned = plan_list[name]
    info = readers.info(name)
    if not info.is_float:
        values = [x[-1].to(torch.float64) + w0.to(torch.float64)] * len(writers)
        outputs = [v.round().to(planned.dtype) if not planned.dtype.is_floating_point else v.to(planned.dtype)
                   for v in values]
    else:
        predicted = torch.addmm(w0.unsqueeze(0).expand(len(writers), -1), weights, x)
        outputs = [predicted[i].to(planned.dtype) for i in range(len(writers))]
    state["out"].append([o.cpu() for o in outputs])
    if len(state["out"]) < n_blocks:
        return
    shape = planned.shape
    for i, writer in enumerate(writers.values()):
        pieces = [block[i] for block in state["out"]]
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        writer.write(name, tensor.reshape(shape))
    state["out"] = []
