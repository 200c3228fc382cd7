"""The streaming engine: from a checkpoint series to the checkpoint(s) of later steps.

For each tensor, in the base's storage order: read the base and the T observed checkpoints (whole, or in
row blocks when the tensor is large), form float32 deltas X (T×n), accumulate G = X Xᵀ, let the
trajectory model (:mod:`relex.methods`, chosen by :mod:`relex.trajectory`) turn G — and, in per-matrix
modes, the top singular triple of each 2-D delta — into a :class:`relex.methods.TensorModel`, and write
w_0 + Σ a_r(t*) b_r (+ Σ a_f(t*) u_f v_fᵀ) with basis vectors b_r = B X. The next read runs on a
background thread while the current tensor computes. Memory holds at most two tensors' worth of T + 2
float32 rows (per-matrix modes: plus T pairs of singular vectors of one tensor, and up to three whole
float32 copies of a tensor too large for one row block), never a whole model.

Automatic choices that need the whole run (``--regressor auto`` per run or group, ``--scale auto``, the
learned ``mlp`` predictor) make the engine read the run twice: a Gram pass, the decisions, the writing
pass.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from relex import __version__
from relex.analysis.drift import DriftDiagnostics, diagnose
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries, discover_series, is_checkpoint_name
from relex.io.source import Source, TensorInfo
from relex.io.sources import open_source
from relex.io.lora import LoraAdapterWriter, mix_factors
from relex.io.files import AUX_FILES
from relex.io.writer import PlannedTensor, ShardedWriter, check_output_folder, staged_folder
from relex.methods import MatrixFactors, TensorData, TensorModel, method_class
from relex.methods.matrix_rank1 import FactorAccumulator, matrix_shape
from relex.subspace import gram
from relex.trajectory import ModelSelector, ModelSpec
from relex.analysis.verdict import VerdictBacktest

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
    selection: dict | None = None  # backtest figures of automatic choices
    passes: int = 1  # reads of the run (2 when run-level choices needed a Gram pass first)
    sources: dict | None = None  # how each checkpoint was read (kind, folder, adapter settings)
    output: str = "checkpoint"  # or "lora": a PEFT adapter

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
            "sources": self.sources,
            "skipped": [{"folder": str(f), "reason": r} for f, r in self.series.skipped],
            "output": self.output,
            "target_steps": self.target_steps,
            "outputs": {str(k): str(v) for k, v in self.out_dirs.items()},
            "device": self.device,
            "summary": self.summary(),
            "diagnostics": self.diagnostics.to_dict() if self.diagnostics else None,
            "selection": self.selection,
            "passes": self.passes,
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
    """Open sources over the base and observed checkpoints, with the tensor layout checked."""

    def __init__(self, series: CheckpointSeries, allow_pickle: bool):
        self.series = series
        self.observed: list[Source] = []
        self.base = open_source(series.base, allow_pickle=allow_pickle)
        try:
            for checkpoint in series.observed:
                self.observed.append(open_source(checkpoint, base=self.base, allow_pickle=allow_pickle))
            # Reading in storage order keeps the access to each file sequential.
            self.names = self.base.order()
            self.aliases = [self._check_layout(r) for r in self.observed]
        except BaseException:
            self.close()
            raise

    def describe(self) -> dict:
        """How each checkpoint was read, for ``relex.json``."""
        kinds = sorted({source.kind for source in self.observed})
        return {"base": self.base.describe(), "observed_kind": kinds[0] if len(kinds) == 1 else kinds,
                "observed": [source.describe() for source in self.observed]}

    def run_bytes(self) -> int:
        """Bytes one full read of the base and every observed checkpoint costs."""
        return self.base.nbytes() + sum(source.nbytes() for source in self.observed)

    def config_folders(self) -> list[Path]:
        """Where config and tokenizer files are taken from: newest checkpoint first, the base last."""
        return [self.observed[-1].config_folder, *[s.config_folder for s in reversed(self.observed[:-1])],
                self.base.config_folder]

    def _tied_source(self, reader: Source) -> str | None:
        for name in reader.tensors:
            if name.endswith("embed_tokens.weight") or name.endswith("wte.weight"):
                return name
        return None

    def _check_layout(self, reader: Source) -> dict[str, str]:
        """Names, shapes must match the base; a missing tied lm_head reads the embedding instead."""
        aliases = {}
        mine, base = set(reader.tensors), set(self.base.tensors)
        missing = base - mine
        if missing == {TIED_HEAD} and _config_ties(reader.config_folder):
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

    def read_block(self, name: str, start: int | None, stop: int | None, device: torch.device,
                   rows: Sequence[int] | None = None):
        """(w_0, X, bytes read): float32 base rows (n,) and deltas (T, n) of one row block.

        With ``rows``, only those observed checkpoints are read; the other deltas are left at zero.
        """
        raw = self.base.read(name, start, stop)
        nbytes = raw.numel() * raw.element_size()
        w0 = raw.to(device=device, dtype=torch.float32).reshape(-1)
        if rows is None:
            x = torch.empty((len(self.observed), w0.numel()), dtype=torch.float32, device=device)
        else:
            x = torch.zeros((len(self.observed), w0.numel()), dtype=torch.float32, device=device)
        for i, (reader, aliases) in enumerate(zip(self.observed, self.aliases)):
            if rows is not None and i not in rows:
                continue
            source = aliases.get(name, name)
            exact = reader.delta(source, start, stop)
            if exact is not None:  # a source over the base (LoRA) knows W − W_0 without rounding W
                delta, cost = exact
                nbytes += cost
                x[i].copy_(delta.reshape(-1))
                continue
            raw = reader.read(source, start, stop)
            nbytes += raw.numel() * raw.element_size()
            x[i].copy_(raw.reshape(-1))
            x[i].sub_(w0)
        return w0, x, nbytes

    def read_whole(self, name: str, index: int, device: torch.device):
        """(flat float32 tensor, bytes read, is a delta) of the base (``index`` −1) or observed checkpoint
        ``index``; a source over the base gives the delta W − W_0 directly."""
        if index < 0:
            reader, source = self.base, name
        else:
            reader, source = self.observed[index], self.aliases[index].get(name, name)
            exact = reader.delta(source)
            if exact is not None:
                delta, cost = exact
                return delta.to(device=device, dtype=torch.float32).reshape(-1), cost, True
        raw = reader.read(source)
        return raw.to(device=device, dtype=torch.float32).reshape(-1), raw.numel() * raw.element_size(), False

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


@dataclass
class _Job:
    """One read of the streaming passes: a row block of base + all checkpoints, or one whole tensor."""

    kind: str  # "block", "base" (whole base tensor) or "delta" (whole tensor of observed checkpoint ``index``)
    name: str
    start: int | None = None
    stop: int | None = None
    n_blocks: int = 1
    gram: bool = False  # accumulate G (and, for a single block, the singular triples)
    write: bool = False  # predict / store this block
    index: int = -1
    rows: tuple[int, ...] | None = None  # observed checkpoints a write-only block needs (None: all)


def _plan_jobs(readers: "_Series", block_bytes: int, *, gram: bool, write: bool,
               factorised: Callable[[TensorInfo], bool],
               needed: Callable[[str], tuple[int, ...] | None] = lambda name: None) -> list[_Job]:
    """Reads of one pass, in storage order.

    A tensor that fits one row block is read once (G, singular triples and the prediction from the same
    block). A larger one is read in row blocks for G, then — in per-matrix modes — whole, one checkpoint
    at a time, for the singular triples, then in row blocks again for the prediction.
    """
    jobs = []
    t = len(readers.observed)
    for name in readers.names:
        info = readers.info(name)
        blocks = _row_blocks(info, t, block_bytes)
        n = len(blocks)
        if gram:
            jobs += [_Job("block", name, s, e, n, gram=True, write=write and n == 1) for s, e in blocks]
            if n > 1 and info.is_float and factorised(info):
                jobs.append(_Job("base", name, n_blocks=n))
                jobs += [_Job("delta", name, n_blocks=n, index=i) for i in range(t)]
        if write and (not gram or n > 1):
            rows = None if gram else needed(name)
            jobs += [_Job("block", name, s, e, n, write=True, rows=rows) for s, e in blocks]
    return jobs


def _read_job(readers: "_Series", job: _Job, device: torch.device):
    if job.kind == "block":
        return readers.read_block(job.name, job.start, job.stop, device, job.rows)
    return readers.read_whole(job.name, job.index, device)


def _prefetched_jobs(readers: "_Series", jobs: list[_Job], device: torch.device):
    """Yield ``(job, payload)`` for each job while a background thread reads the next one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="relex-read") as pool:
        pending = pool.submit(_read_job, readers, jobs[0], device) if jobs else None
        for k, job in enumerate(jobs):
            payload = pending.result()
            pending = pool.submit(_read_job, readers, jobs[k + 1], device) if k + 1 < len(jobs) else None
            yield job, payload


class _TensorState:
    """What the streaming pass knows about the tensor it is reading."""

    def __init__(self, name: str, info: TensorInfo, n_steps: int):
        self.name = name
        self.info = info
        self.gram = np.zeros((n_steps, n_steps))
        self.norm0 = 0.0
        self.blocks = 0
        self.factors: MatrixFactors | None = None
        self.accumulator: FactorAccumulator | None = None
        self.w0_whole: torch.Tensor | None = None
        self.data: TensorData | None = None
        self.model: TensorModel | None = None
        self.prepared: dict = {}  # per-sink tensors (coefficients, basis weights on the device)
        self.pieces: list = []


def _stream(readers: "_Series", jobs: list[_Job], device: torch.device, steps: np.ndarray, *,
            factorised: Callable[[TensorInfo], bool], factor_p: int | None,
            on_ready: Callable[[_TensorState], None], on_block: Callable[[_TensorState, _Job, torch.Tensor, torch.Tensor], None] | None,
            known: Mapping[str, tuple[TensorData, TensorModel | None]] | None = None,
            progress: ProgressCallback | None = None, bytes_before: int = 0, total_bytes: int = 0) -> int:
    """Run one pass over ``jobs``; returns the bytes read.

    ``on_ready(state)`` is called once per tensor when its G (and singular triples) are complete;
    ``on_block(state, job, w_0, X)`` for every block to write. With ``known`` (a previous pass), tensors
    start ready with that pass's data and model.
    """
    n_steps = len(steps)
    state: _TensorState | None = None
    bytes_read = bytes_before
    for job, payload in _prefetched_jobs(readers, jobs, device):
        if state is None or state.name != job.name:
            state = _TensorState(job.name, readers.info(job.name), n_steps)
            if known is not None and job.name in known:
                state.data, state.model = known[job.name]
        info = state.info
        if job.kind == "block":
            w0, x, nbytes = payload
            if job.gram:
                if info.is_float:
                    state.gram += readers.checked_gram(job.name, job.start, job.stop, w0, x)
                    state.norm0 += float(w0 @ w0)
                    if job.n_blocks == 1 and factorised(info):
                        accumulator = FactorAccumulator(n_steps, factor_p)
                        rows, cols = matrix_shape(info.shape)
                        for i in range(n_steps):
                            accumulator.add(x[i].reshape(rows, cols))
                        state.factors = accumulator.result()
                state.blocks += 1
                if state.blocks == job.n_blocks and not (job.n_blocks > 1 and info.is_float and factorised(info)):
                    _ready(state, steps, on_ready)
            if job.write and on_block is not None:
                on_block(state, job, w0, x)
        elif job.kind == "base":
            state.w0_whole, nbytes, _ = payload
            state.accumulator = FactorAccumulator(n_steps, factor_p)
        else:
            w, nbytes, is_delta = payload
            rows, cols = matrix_shape(info.shape)
            state.accumulator.add((w if is_delta else w - state.w0_whole).reshape(rows, cols))
            del w
            if job.index == n_steps - 1:
                state.factors = state.accumulator.result()
                state.accumulator = state.w0_whole = None
                _ready(state, steps, on_ready)
        bytes_read += nbytes
        if progress is not None:
            progress(job.name, bytes_read, max(total_bytes, bytes_read))
    return bytes_read


def _ready(state: _TensorState, steps: np.ndarray, on_ready) -> None:
    state.data = TensorData(state.name, state.info.shape, steps, state.gram, state.info.is_float,
                            math.sqrt(max(state.norm0, 0.0)), state.factors)
    on_ready(state)


def _combine(w0: torch.Tensor, coefficients: np.ndarray, basis: torch.Tensor | None,
             factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """w_0 + Σ a_r b_r + Σ a_f (u_f v_fᵀ) of one row block, in float32.

    Separate multiply and add kernels (no fused multiply-add), so the result of every entry does not
    depend on how the tensor was cut into blocks: ``relex materialize`` reproduces it bit for bit.
    """
    out = w0.clone()
    n_basis = 0 if basis is None else basis.shape[0]
    for r in range(n_basis):
        out.add_(torch.mul(basis[r], float(coefficients[r])))
    for f, (u_rows, v) in enumerate(factors):
        out.add_(torch.mul(torch.outer(u_rows, v).reshape(-1), float(coefficients[n_basis + f])))
    return out


def _newest_value(w0: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An integer buffer (not a weight) keeps its newest observed value."""
    value = x[-1].to(torch.float64) + w0.to(torch.float64)
    return value.round().to(dtype) if not dtype.is_floating_point else value.to(dtype)


def _block_basis(state: _TensorState, x: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The basis vectors b_r = Σ_i B_ri x_i of one row block (r, n), float32."""
    model = state.model
    if model is None or model.n_basis == 0:
        return None
    weights = state.prepared.get("basis_weights")
    if weights is None:
        weights = state.prepared["basis_weights"] = torch.as_tensor(model.basis, dtype=torch.float32, device=device)
    return weights @ x


def _factor_rows(model: TensorModel | None, job: _Job, device: torch.device) -> list:
    if model is None:
        return []
    rows = []
    for u, v in model.factors:
        u_t = torch.as_tensor(u, dtype=torch.float32, device=device)
        if job.start is not None:
            u_t = u_t[job.start:job.stop]
        rows.append((u_t, torch.as_tensor(v, dtype=torch.float32, device=device)))
    return rows


def _describe(model: TensorModel, targets: np.ndarray) -> dict:
    method = method_class(model.params["method"])
    describe = getattr(method, "describe", None)
    return describe(model.params, targets) if describe is not None else {}


def _tensor_result(state: _TensorState, keep_grams: bool, targets: np.ndarray) -> TensorResult:
    g = state.data.gram
    stats = dict(state.model.stats) if state.model is not None else {
        "rank": 0, "explained": 0.0, "explained_rank1": 0.0, "r2": 1.0, "copied": True}
    if state.model is not None:
        stats.update(_describe(state.model, targets))
    relative = math.sqrt(max(g[-1, -1], 0.0)) / state.data.base_norm if state.data.base_norm > 0 else 0.0
    return TensorResult(state.name, state.info.shape, str(state.info.dtype).replace("torch.", ""), stats,
                        relative, g if keep_grams else None)


def _model_pass(readers: "_Series", planner: ModelSelector, device: torch.device, block_bytes: int, *,
                on_block: Callable, targets: np.ndarray, keep_grams: bool, progress: ProgressCallback | None,
                on_model: Callable[[_TensorState], None] | None = None) -> tuple[list[TensorResult], int, dict]:
    """Decide every tensor's model and stream the blocks to ``on_block``.

    One pass when every choice is per tensor; otherwise a Gram (+ singular triples) pass, the run-level
    choices of the planner, then the writing pass. Returns (tensor results, bytes read, run Gram).
    """
    steps = np.asarray(readers.series.steps, dtype=np.float64)
    factorised = lambda info: info.is_float and planner.factorised(info.shape)  # noqa: E731
    run_bytes = readers.run_bytes()
    tensors: list[TensorResult] = []
    run_gram = np.zeros((len(steps),) * 2)
    verdict_check = VerdictBacktest(steps)

    def decide(state: _TensorState) -> None:
        nonlocal run_gram
        state.model = planner.model(state.data) if state.info.is_float else None
        run_gram = run_gram + state.data.gram
        if state.info.is_float:
            verdict_check.add(state.name, state.data.gram, len(state.info.shape))
        tensors.append(_tensor_result(state, keep_grams, targets))
        if on_model is not None:
            on_model(state)

    if not planner.needs_run_pass:
        jobs = _plan_jobs(readers, block_bytes, gram=True, write=True, factorised=factorised)
        bytes_read = _stream(readers, jobs, device, steps, factorised=factorised, factor_p=planner.p,
                             on_ready=decide, on_block=on_block, progress=progress, total_bytes=run_bytes)
        return tensors, bytes_read, (run_gram, verdict_check)

    datas: dict[str, TensorData] = {}
    jobs = _plan_jobs(readers, block_bytes, gram=True, write=False, factorised=factorised)
    bytes_read = _stream(readers, jobs, device, steps, factorised=factorised, factor_p=planner.p,
                         on_ready=lambda state: datas.__setitem__(state.name, state.data), on_block=None,
                         progress=progress, total_bytes=2 * run_bytes)
    planner.prepare(datas)
    known = {}
    for name, data in datas.items():
        state = _TensorState(name, readers.info(name), len(steps))
        state.data = data
        decide(state)
        known[name] = (data, state.model)

    def needed(name: str) -> tuple[int, ...]:
        model = known[name][1]
        if model is None:  # integer buffers keep the newest value
            return (len(steps) - 1,)
        return tuple(int(i) for i in np.flatnonzero(np.any(model.basis != 0, axis=0)))

    jobs = _plan_jobs(readers, block_bytes, gram=False, write=True, factorised=factorised, needed=needed)
    bytes_read = _stream(readers, jobs, device, steps, factorised=factorised, factor_p=None,
                         on_ready=lambda state: None, on_block=on_block, known=known, progress=progress,
                         bytes_before=bytes_read, total_bytes=2 * run_bytes)
    return tensors, bytes_read, (run_gram, verdict_check)


def _targets(target_step) -> list[int]:
    targets = sorted({int(t) for t in ([target_step] if isinstance(target_step, (int, np.integer)) else target_step)})
    if not targets:
        raise RelexInputError("give at least one --target-step")
    return targets


def _check_targets(targets: list[int], last: int, allow_interpolation: bool) -> None:
    early = [t for t in targets if t <= last]
    if early and not allow_interpolation:
        raise RelexInputError(
            f"target step {early[0]} is not beyond the last observed step {last} "
            "(pass --allow-interpolation to predict inside the observed window)"
        )


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
    scale: float | str = 1.0,
    auto_scope: str = "run",
    candidates: str | Sequence[str] | None = None,
    holdout: int | None = None,
    copy_norms: bool = False,
    from_step: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    overwrite: bool = False,
    allow_interpolation: bool = False,
    allow_pickle: bool = False,
    max_shard_size: str | int = "5GB",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    keep_grams: bool = False,
    output: str = "checkpoint",
    lora_rank: int | None = None,
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
        method: the mode: ``relex`` (temporal rank-k SVD), ``matrix-rank1`` (top singular triple of each
            2-D delta), ``elementwise`` (two-checkpoint linear) or ``last``.
        rank: temporal components (``relex``).
        regressor: predictor of the coefficient series (see :mod:`relex.regressors`), or ``auto``: chosen
            by backtest on the held-out end of the observed window among ``candidates``.
        scale: multiplier of the predicted update w(t*) − w_0, or ``auto`` (chosen by backtest).
        auto_scope: where ``auto`` choices are made: ``run`` (one for the model), ``group`` (per kind
            of tensor, e.g. all ``q_proj``) or ``tensor``. ``run`` and ``group`` (and the learned ``mlp``
            predictor) read the run twice: a Gram pass to decide, then the writing pass.
        candidates: predictors ``auto`` chooses from (default
            :data:`relex.trajectory.DEFAULT_CANDIDATES`); holdout: checkpoints held out (default a quarter).
        copy_norms, from_step: ``elementwise`` options (and the 1-D fallback of ``matrix-rank1``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: output dtype; ``auto`` keeps the dtype of the newest observed checkpoint.
        allow_interpolation: permit target steps at or before the last observed step.
        allow_pickle: read ``pytorch_model*.bin`` weights (pickles) when no safetensors exist.
        block_bytes: tensors whose T+2 float32 copies exceed this are processed in row blocks.
        keep_grams: keep each tensor's Gram matrix in the result (for analysis).
        output: ``checkpoint`` (a full Hugging Face checkpoint; for a LoRA run the merged model) or
            ``lora`` (a LoRA run only: a PEFT adapter over the same base holding the prediction exactly,
            of rank Σ r_i over the observed adapters).
        lora_rank: with ``output="lora"``, truncate each module's update to this rank (SVD of the small
            factors); the relative truncation error per module goes to ``relex.json``.
        progress: called as ``progress(tensor_name, bytes_read_so_far, total_bytes)``.

    Returns:
        An :class:`ExtrapolationResult` with per-tensor statistics, the drift diagnostics and, for
        automatic choices, the backtest figures (``selection``).

    Raises:
        RelexInputError: on any bad input; no output folder is left behind.
    """
    started = time.perf_counter()
    targets = _targets(target_step)
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise RelexInputError(f"unknown --dtype {dtype!r} (use auto, {', '.join(OUTPUT_DTYPES)})")
    if output not in ("checkpoint", "lora"):
        raise RelexInputError(f"unknown --output {output!r} (use checkpoint or lora)")
    if lora_rank is not None and (output != "lora" or lora_rank < 1):
        raise RelexInputError("--lora-rank takes a positive rank and needs --output lora")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    _check_output_place(out_dir, run_dir)
    series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
    _check_targets(targets, series.steps[-1], allow_interpolation)
    torch_device = resolve_device(device)
    spec = ModelSpec(method=method, rank=rank, regressor=regressor, scale=scale, auto_scope=auto_scope,
                     candidates=candidates, holdout=holdout, copy_norms=copy_norms, from_step=from_step)
    planner = ModelSelector(spec, series.steps)
    options = {"rank": rank, "regressor": regressor, "scale": planner.scale, **_extra_options(spec)}
    target_array = np.array(targets, dtype=np.float64)

    readers = _Series(series, allow_pickle)
    try:
        if output == "lora":
            _check_adapter_output(readers, method)
        with staged_folder(out_dir, overwrite) as staging:
            folders = {t: staging if len(targets) == 1 else staging / f"step-{t}" for t in targets}
            if output == "lora":
                sink = _AdapterSink(readers, folders, target_array, torch_device, lora_rank, dtype)
            else:
                sink = _CheckpointSink(readers, folders, target_array, torch_device, dtype, max_shard_size)
            try:
                tensors, bytes_read, (run_gram, verdict_check) = _model_pass(
                    readers, planner, torch_device, block_bytes, on_block=sink.on_block, targets=target_array,
                    keep_grams=keep_grams, progress=progress, on_model=sink.on_model)
                sink.finish()
            finally:
                sink.close()
            seconds = time.perf_counter() - started
            diagnostics = verdict_check.apply(diagnose(run_gram, series.steps) if np.any(run_gram) else None,
                                              max(targets))
            result = ExtrapolationResult(
                out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
                series=series, method=method, options=options, tensors=tensors, diagnostics=diagnostics,
                seconds=seconds, bytes_read=bytes_read, bytes_written=sink.bytes_written,
                device=str(torch_device), selection=planner.selection,
                passes=2 if planner.needs_run_pass else 1, sources=readers.describe(), output=output,
            )
            for t in targets:
                provenance = result.to_dict()
                provenance["target_step"] = t
                provenance.update(sink.provenance(t))
                sink.save(t, provenance, readers.config_folders())
    finally:
        readers.close()
    result.seconds = time.perf_counter() - started
    return result


def _check_output_place(out_dir: Path, run_dir) -> None:
    """An output inside the run folder under a checkpoint-like name would later be read as training."""
    if run_dir is None or str(run_dir).startswith("hf://"):
        return
    if is_checkpoint_name(out_dir.name) and out_dir.resolve().parent == Path(run_dir).resolve():
        raise RelexInputError(
            "this output would sit in the run folder under a checkpoint name and look like a trained "
            "checkpoint; write it elsewhere (e.g. RUN-relex-STEP)", out_dir)


def _check_adapter_output(readers: "_Series", method: str) -> None:
    """``--output lora`` needs adapters and a model whose prediction mixes the observed updates."""
    if any(source.kind != "lora" for source in readers.observed):
        raise RelexInputError("--output lora needs a LoRA run (adapter checkpoints); this run holds full weights",
                              readers.observed[-1].folder)
    if method == "matrix-rank1":
        raise RelexInputError("--output lora needs a mode whose prediction mixes the observed updates "
                              "(relex, elementwise or last), not matrix-rank1")
    modules = set(readers.observed[-1].modules)
    for source in readers.observed[:-1]:
        if set(source.modules) != modules:
            raise RelexInputError("targets other modules than the newest adapter; --output lora needs one "
                                  "set of LoRA modules", source.folder)


def _block_outputs(state: "_TensorState", job: _Job, w0: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                   n_targets: int, device: torch.device) -> list[torch.Tensor]:
    """The predicted values of one row block, one per target step, in ``dtype``."""
    if state.model is None:
        if state.info.is_float:  # prepared by an earlier pass
            raise RuntimeError(f"no model for tensor {state.name!r}")
        return [_newest_value(w0, x, dtype)] * n_targets
    basis = _block_basis(state, x, device)
    factors = _factor_rows(state.model, job, device)
    return [_combine(w0, row, basis, factors).to(dtype) for row in state.prepared["coefficients"]]


def _assembled(state: "_TensorState", job: _Job, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Collect one row block's outputs; once the tensor's last block is in, its whole value per target."""
    state.pieces.append([o.cpu() for o in outputs])
    if len(state.pieces) < job.n_blocks:
        return []
    whole = []
    for i in range(len(outputs)):
        parts = [block[i] for block in state.pieces]
        whole.append((parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(state.info.shape))
    state.pieces = []
    return whole


class _Sink:
    """Where the predictions of one extrapolation go: one writer per target step.

    The engine calls ``on_model(state)`` when a tensor's model is known and ``on_block(state, job, w_0, X)``
    for each of its row blocks; then ``finish`` (or ``close`` on failure), ``provenance`` and ``save``.
    """

    writers: dict

    def finish(self) -> None:
        for writer in self.writers.values():
            writer.finish()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class _CheckpointSink(_Sink):
    """Writes the predicted tensors as a Hugging Face checkpoint per target step."""

    def __init__(self, readers: "_Series", folders: dict[int, Path], targets: np.ndarray,
                 device: torch.device, dtype: str, max_shard_size: str | int):
        self.plan = _output_plan(readers, dtype)
        self.targets, self.device = targets, device
        self.writers = {t: ShardedWriter(folders[t], self.plan.values(), max_shard_size) for t in folders}

    def on_model(self, state: "_TensorState") -> None:
        if state.model is not None:
            state.prepared["coefficients"] = state.model.coefficients(self.targets)

    def on_block(self, state: "_TensorState", job: _Job, w0: torch.Tensor, x: torch.Tensor) -> None:
        planned = self.plan[state.name]
        if state.model is not None and "coefficients" not in state.prepared:
            self.on_model(state)
        outputs = _block_outputs(state, job, w0, x, planned.dtype, len(self.targets), self.device)
        for writer, tensor in zip(self.writers.values(), _assembled(state, job, outputs)):
            writer.write(state.name, tensor)

    @property
    def bytes_written(self) -> int:
        return sum(w.bytes_written for w in self.writers.values())

    def provenance(self, target: int) -> dict:
        return {"shards_sha256": self.writers[target].shard_digests()}

    def save(self, target: int, provenance: dict, config_folders: list[Path]) -> None:
        writer = self.writers[target]
        writer.copy_aux_files(config_folders)
        writer.write_json("relex.json", provenance)


class _AdapterSink(_Sink):
    """Writes the prediction of a LoRA run as a PEFT adapter per target step.

    The prediction of a target module is W_0 + Σ_i m_i ΔW_i with ΔW_i = P_i Q_i (P_i = s·B_i, Q_i = A_i), so it
    is exactly one LoRA of rank Σ_i r_i: P = [m_1 P_1 | … | m_T P_T], Q = [Q_1; …; Q_T], optionally truncated
    to ``lora_rank`` by an SVD of the small factors. Full tensors of the adapter (``modules_to_save``) are
    predicted like any weight.
    """

    def __init__(self, readers: "_Series", folders: dict[int, Path], targets: np.ndarray,
                 device: torch.device, lora_rank: int | None, dtype: str):
        self.readers, self.targets, self.device, self.folders = readers, targets, device, folders
        newest = readers.observed[-1]
        exact = {name: sum(source.modules[name].rank for source in readers.observed) for name in newest.modules}
        self.ranks = {n: r if lora_rank is None else min(lora_rank, r) for n, r in exact.items()}
        self.exact = lora_rank is None or all(lora_rank >= r for r in exact.values())
        factor_dtype = torch.float32 if dtype == "auto" else OUTPUT_DTYPES[dtype]
        self.full_dtypes = {n: (OUTPUT_DTYPES[dtype] if dtype != "auto" else readers.output_dtype(n))
                            for n in newest.saved}
        full = {n: (readers.info(n).shape, d) for n, d in self.full_dtypes.items()}
        self.factor_dtype = factor_dtype
        self.writers = {t: LoraAdapterWriter(folders[t], newest, self.ranks, full, factor_dtype) for t in folders}
        self.errors: dict[int, dict[str, float]] = {t: {} for t in folders}

    def on_model(self, state: "_TensorState") -> None:
        model = state.model
        if model is not None:
            state.prepared["coefficients"] = model.coefficients(self.targets)
        if state.name not in self.ranks:
            return
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

    def on_block(self, state: "_TensorState", job: _Job, w0: torch.Tensor, x: torch.Tensor) -> None:
        if state.name not in self.full_dtypes:
            return  # the base's own tensors are not part of an adapter
        outputs = _block_outputs(state, job, w0, x, self.full_dtypes[state.name], len(self.targets), self.device)
        for writer, tensor in zip(self.writers.values(), _assembled(state, job, outputs)):
            writer.write_full(state.name, tensor)

    @property
    def bytes_written(self) -> int:
        return sum(_folder_bytes(folder) for folder in self.folders.values())

    def provenance(self, target: int) -> dict:
        errors = self.errors[target]
        return {"lora": {"rank": max(self.ranks.values(), default=0), "exact": self.exact,
                         "max_truncation_error": max(errors.values(), default=0.0),
                         "truncation_error": errors}}

    def save(self, target: int, provenance: dict, config_folders: list[Path]) -> None:
        folder = self.folders[target]
        for name in AUX_FILES:  # tokenizer files; an adapter folder has no model config of its own
            if name in ("config.json", "generation_config.json"):
                continue
            for source in config_folders:
                if (source / name).is_file():
                    shutil.copyfile(source / name, folder / name)
                    break
        provenance["adapter_sha256"] = self.writers[target].digests()
        (folder / "relex.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0


def _extra_options(spec: ModelSpec) -> dict:
    """Model options beyond the historical rank/regressor/scale, recorded only when they matter."""
    extra = {}
    if spec.regressor == "auto" or str(spec.scale) == "auto":
        options = spec.options()
        extra.update(auto_scope=spec.auto_scope, candidates=options["candidates"], holdout=spec.holdout)
    if spec.copy_norms:
        extra["copy_norms"] = True
    if spec.from_step is not None:
        extra["from_step"] = spec.from_step
    return extra


def _output_plan(readers: "_Series", dtype: str) -> dict[str, PlannedTensor]:
    return {
        n: PlannedTensor(n, readers.info(n).shape,
                         OUTPUT_DTYPES[dtype] if dtype != "auto" and readers.info(n).is_float else readers.output_dtype(n))
        for n in readers.names
    }


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
    total_bytes = readers.run_bytes()
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
