"""The streaming engine: from a checkpoint series to the checkpoint(s) of later steps, or to its Gram matrices.

:func:`extrapolate` and :func:`collect_grams` open the run (:class:`relex.stream.RunReaders`), choose each
tensor's trajectory model (:class:`relex.trajectory.ModelSelector`) as its Gram matrix comes in, and stream
the tensors through one pass (:class:`relex.stream.StreamPass`) into a sink (:mod:`relex.sinks`): a
checkpoint per target step, a LoRA adapter, or nothing but the Gram matrices. Memory holds the T + 1 stored
copies of about one tensor, never a whole model.

Automatic choices that need the whole run (``--regressor auto`` per run or group, ``--scale auto``, the
learned ``mlp`` predictor) make the engine read the run twice, through the same code: a Gram pass, the
decisions, then the writing pass with every model known (:func:`stream_models`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from relex.analysis.drift import DriftDiagnostics, diagnose
from relex.analysis.verdict import VerdictBacktest
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries, discover_series, is_checkpoint_name
from relex.io.writer import check_output_folder, require_free_space, staged_folder
from relex.methods import TensorModel, method_class
from relex.sinks import (AdapterSink, CheckpointSink, GramSink, check_targets, checkpoint_layout, parse_targets,
                         run_record, target_folders)
from relex.stream import (DEFAULT_BLOCK_BYTES, OUTPUT_DTYPES, ProgressCallback, RunReaders, Sink, StreamPass,
                          TensorState, check_dtype, resolve_device)
from relex.trajectory import ModelSelector, ModelSpec

__all__ = ["DEFAULT_BLOCK_BYTES", "OUTPUT_DTYPES", "ExtrapolationResult", "GramSet", "ModelPassResult",
           "ProgressCallback", "TensorResult", "collect_grams", "extrapolate", "resolve_device", "stream_models"]


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
        """The provenance of the run (``relex.json`` adds each target's step and digests to it)."""
        payload = run_record(
            method=self.method, options=self.options, base=self.series.base.path,
            observed_steps=self.series.steps, observed_folders=[c.path for c in self.series.observed],
            sources=self.sources,
            skipped=[{"folder": str(f), "reason": r} for f, r in self.series.skipped],
            output=self.output,
            target_steps=self.target_steps,
            outputs={str(k): str(v) for k, v in self.out_dirs.items()},
            device=self.device,
            summary=self.summary(),
            diagnostics=self.diagnostics.to_dict() if self.diagnostics else None,
            selection=self.selection,
            passes=self.passes,
        )
        if per_tensor:
            payload["tensors"] = {
                t.name: {"shape": list(t.shape), "relative_delta": t.relative_delta, **t.stats}
                for t in self.tensors
            }
        return payload


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


@dataclass
class ModelPassResult:
    """What :func:`stream_models` measured: per-tensor results, bytes read, the run's Gram matrix and the
    window backtest of the verdict, and how many times the run was read."""

    tensors: list[TensorResult]
    models: dict[str, TensorModel | None]
    base_norms: dict[str, float]
    bytes_read: int
    run_gram: np.ndarray
    verdict: VerdictBacktest
    passes: int

    def diagnostics(self, steps: Sequence[int], target_step: float | None = None) -> DriftDiagnostics | None:
        """The drift diagnostics of the run with the verdict's window backtest applied."""
        return self.verdict.apply(diagnose(self.run_gram, list(steps)) if np.any(self.run_gram) else None,
                                  target_step)


def tensor_states(readers: RunReaders) -> list[TensorState]:
    """One :class:`relex.stream.TensorState` per tensor of the run, in storage order."""
    steps = np.asarray(readers.series.steps, dtype=np.float64)
    return [TensorState(name, readers.info(name), readers.rows(name), steps) for name in readers.names]


def stream_models(readers: RunReaders, selector: ModelSelector, make_sink: Callable[[Mapping], Sink],
                  device: torch.device, *, block_bytes: int = DEFAULT_BLOCK_BYTES, targets: np.ndarray,
                  keep_grams: bool = False, progress: ProgressCallback | None = None) -> ModelPassResult:
    """Decide every tensor's model and stream the tensors into the sink ``make_sink(models)``.

    One pass when every choice is per tensor (``make_sink`` gets no models); otherwise a Gram pass (plus the
    singular triples in per-matrix modes), the run-level choices of ``selector``, then the writing pass
    with every model known (``make_sink`` gets them all).
    """
    steps = readers.series.steps
    n = len(steps)
    run_bytes = readers.run_bytes()
    results: list[TensorResult] = []
    models: dict[str, TensorModel | None] = {}
    base_norms: dict[str, float] = {}
    verdict = VerdictBacktest(steps)
    run_gram = np.zeros((n, n))

    def record(state: TensorState) -> None:
        nonlocal run_gram
        models[state.name] = state.model
        base_norms[state.name] = state.data.base_norm
        run_gram = run_gram + state.data.gram
        if state.is_float:
            verdict.add(state.name, state.data.gram, len(state.info.shape))
        results.append(_tensor_result(state, keep_grams, targets))

    def decide(state: TensorState) -> TensorModel:
        state.model = selector.model(state.data)
        return state.model

    def factorised(state: TensorState) -> bool:
        return state.is_float and selector.factorised(state.info.shape)

    states = tensor_states(readers)
    if not selector.needs_run_pass:
        sink = _Recording(make_sink({}), record)
        bytes_read = StreamPass(states, sink, device, block_bytes=block_bytes, decide=decide, factorised=factorised,
                                factor_p=selector.p, progress=progress, total_bytes=run_bytes).run()
        return ModelPassResult(results, models, base_norms, bytes_read, run_gram, verdict, 1)

    grams = GramSink()
    bytes_read = StreamPass(states, grams, device, block_bytes=block_bytes, factorised=factorised,
                            factor_p=selector.p, progress=progress, total_bytes=2 * run_bytes).run()
    selector.prepare(grams.datas)
    known = tensor_states(readers)
    for state in known:
        state.data = grams.datas[state.name]
        state.model = selector.model(state.data) if state.is_float else None
        state.known = True
        record(state)
    bytes_read = StreamPass(known, make_sink(models), device, block_bytes=block_bytes, progress=progress,
                            bytes_before=bytes_read, total_bytes=2 * run_bytes).run()
    return ModelPassResult(results, models, base_norms, bytes_read, run_gram, verdict, 2)


class _Recording(Sink):
    """A sink that records each tensor's model (results, run Gram, verdict) before passing it on."""

    def __init__(self, sink: Sink, record: Callable[[TensorState], None]):
        self.sink, self.record = sink, record

    def wants_chunks(self, state):
        return self.sink.wants_chunks(state)

    def on_model(self, state):
        self.record(state)
        self.sink.on_model(state)

    def open_span(self, state, first, count):
        return self.sink.open_span(state, first, count)

    def fill(self, state, span, lo, chunk):
        self.sink.fill(state, span, lo, chunk)

    def emit(self, state, span):
        self.sink.emit(state, span)

    def on_tensor_done(self, state):
        self.sink.on_tensor_done(state)


def _tensor_result(state: TensorState, keep_grams: bool, targets: np.ndarray) -> TensorResult:
    g = state.data.gram
    stats = dict(state.model.stats) if state.model is not None else {
        "rank": 0, "explained": 0.0, "explained_rank1": 0.0, "r2": 1.0, "copied": True}
    if state.model is not None:
        describe = getattr(method_class(state.model.params["method"]), "describe", None)
        if describe is not None:
            stats.update(describe(state.model.params, targets))
    base_norm = state.data.base_norm
    relative = math.sqrt(max(g[-1, -1], 0.0)) / base_norm if base_norm > 0 else 0.0
    return TensorResult(state.name, state.info.shape, str(state.info.dtype).replace("torch.", ""), stats,
                        relative, g if keep_grams else None)


def check_output_place(out_dir: Path, run_dir) -> None:
    """An output inside the run folder under a checkpoint-like name would later be read as training."""
    if run_dir is None or str(run_dir).startswith("hf://"):
        return
    if is_checkpoint_name(out_dir.name) and out_dir.resolve().parent == Path(run_dir).resolve():
        raise RelexInputError(
            "this output would sit in the run folder under a checkpoint name and look like a trained "
            "checkpoint; write it elsewhere (e.g. RUN-relex-STEP)", out_dir)


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
        block_bytes: the most memory the stored copies of the inputs may take at once; a tensor whose T + 1
            stored copies exceed it is read twice (its Gram pass, then the part that did not stay in memory).
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
        RelexInputError: on any bad input (including an output that does not fit its disk); no output
            folder is left behind.
    """
    started = time.perf_counter()
    targets = parse_targets(target_step)
    check_dtype(dtype)
    if output not in ("checkpoint", "lora"):
        raise RelexInputError(f"unknown --output {output!r} (use checkpoint or lora)")
    if lora_rank is not None and (output != "lora" or lora_rank < 1):
        raise RelexInputError("--lora-rank takes a positive rank and needs --output lora")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite)
    check_output_place(out_dir, run_dir)
    series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
    check_targets(targets, series.steps[-1], allow_interpolation)
    torch_device = resolve_device(device)
    spec = ModelSpec(method=method, rank=rank, regressor=regressor, scale=scale, auto_scope=auto_scope,
                     candidates=candidates, holdout=holdout, copy_norms=copy_norms, from_step=from_step)
    selector = ModelSelector(spec, series.steps)
    target_array = np.array(targets, dtype=np.float64)

    readers = RunReaders(series, allow_pickle)
    try:
        if output == "lora":
            AdapterSink.check(readers, method)
        config_folders = readers.config_folders()
        with staged_folder(out_dir, overwrite) as staging:
            folders = target_folders(staging, targets)
            if output == "lora":
                sink = AdapterSink(readers, folders, target_array, torch_device, lora_rank, dtype)
            else:
                sink = CheckpointSink(folders, checkpoint_layout(readers, dtype), target_array, torch_device,
                                      max_shard_size)
            try:
                require_free_space(out_dir, sink.output_bytes(config_folders))  # before reading anything
                measured = stream_models(readers, selector, lambda models: sink, torch_device,
                                         block_bytes=block_bytes, targets=target_array, keep_grams=keep_grams,
                                         progress=progress)
                sink.finish()
            finally:
                sink.close()
            result = ExtrapolationResult(
                out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
                series=series, method=method, options=spec.record(), tensors=measured.tensors,
                diagnostics=measured.diagnostics(series.steps, max(targets)),
                seconds=time.perf_counter() - started, bytes_read=measured.bytes_read,
                bytes_written=sink.bytes_written, device=str(torch_device), selection=selector.selection,
                passes=measured.passes, sources=readers.describe(), output=output,
            )
            record = result.to_dict()
            for t in targets:
                sink.save(t, record, config_folders)
    finally:
        readers.close()
    result.seconds = time.perf_counter() - started
    return result


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
    readers = RunReaders(series, allow_pickle)
    try:
        sink = GramSink()
        bytes_read = StreamPass(tensor_states(readers), sink, resolve_device(device), block_bytes=block_bytes,
                                progress=progress, total_bytes=readers.run_bytes()).run()
    finally:
        readers.close()
    return GramSet(
        series=series,
        names=[n for n in readers.names if n in sink.grams],
        shapes={n: readers.info(n).shape for n in readers.names},
        grams=sink.grams,
        base_norms=sink.base_norms,
        seconds=time.perf_counter() - started,
        bytes_read=bytes_read,
    )
