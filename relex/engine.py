"""The streaming engine: from a checkpoint series to the checkpoint(s) of later steps, or to its Gram matrices.

:func:`extrapolate` and :func:`collect_grams` open the run (:class:`relex.io.run_readers.RunReaders`), choose each
tensor's trajectory model (:class:`relex.trajectory.ModelSelector`) as its Gram matrix comes in, and stream
the tensors through one pass (:class:`relex.stream.StreamPass`) into a sink (:mod:`relex.sinks`): a
checkpoint per target step, a LoRA adapter, or nothing but the Gram matrices. Memory holds the T + 1 stored
copies of about one tensor, never a whole model.

Automatic choices that need the whole run (``--regressor auto`` per run or group, ``--scale auto``, the
learned ``mlp`` predictor) make the engine read the run twice, through the same code: a Gram pass, the
decisions, then the writing pass with every model known (:func:`stream_models`).

Under ``torchrun`` (:mod:`relex.distributed`) each rank streams a contiguous share of the tensors into its own
shards; the ranks gather each other's per-tensor figures at fixed sync points, rank 0 makes the run-level
choices from every rank's Gram matrices and writes the index and ``relex.json``: the values written are those
of one process.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from relex.analysis.drift import DriftDiagnostics
from relex.analysis.reward import checkpoint_reward_trend
from relex.analysis.verdict import RunVerdict
from relex.device import OUTPUT_DTYPES, check_dtype, resolve_device
from relex.distributed import SINGLE, Ranks, current, shares
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries, discover_series, is_checkpoint_name
from relex.io.run_readers import RunReaders
from relex.io.staging import check_output_folder, require_free_space
from relex.methods import DeltaAccumulator, TensorModel, method_class
from relex.sinks import (AdapterSink, CheckpointSink, GramSink, check_targets, checkpoint_layout, parse_targets,
                         run_record, target_folders)
from relex.staging import staged_folder
from relex.stream import DEFAULT_BLOCK_BYTES, ProgressCallback, Sink, StreamPass, TensorState
from relex.trajectory import ModelSelector, ModelSpec, model_spec

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
            "explained_median": statistics.median(explained.tolist()),  # np.median imports numpy.ma: 10 ms
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
    window backtest of the verdict, and how many times the run was read (every rank's, across ranks)."""

    tensors: list[TensorResult]
    models: dict[str, TensorModel | None]
    base_norms: dict[str, float]
    bytes_read: int
    run_gram: np.ndarray
    verdict: RunVerdict
    passes: int
    parts: list[dict] | None = None  # across ranks: what each rank's sink wrote (its ``part()``)

    def diagnostics(self, target_step: float | None = None, reward=None) -> DriftDiagnostics | None:
        """The run's verdict (:meth:`relex.analysis.verdict.RunVerdict.judge`): drift diagnostics with the
        calibration checks, the training reward's trend (a ``RewardTrend``, when given) and the window backtest
        carried to ``target_step``."""
        return self.verdict.judge(self.run_gram, target_step, reward)


def tensor_states(readers: RunReaders, names: Sequence[str] | None = None) -> list[TensorState]:
    """One :class:`relex.stream.TensorState` per tensor of the run (or of ``names``), in storage order."""
    steps = np.asarray(readers.series.steps, dtype=np.float64)
    return [TensorState(name, readers.info(name), readers.rows(name), steps)
            for name in (readers.names if names is None else names)]


def rank_names(readers: RunReaders, ranks: Ranks) -> list[str]:
    """The tensors this rank reads: its contiguous share of the storage order, balanced by bytes read."""
    if not ranks.distributed:
        return list(readers.names)
    sizes = [sum(readers.info(name).numel * row.itemsize for row in readers.rows(name)) for name in readers.names]
    return [readers.names[i] for i in shares(sizes, ranks.world)[ranks.rank]]


@dataclass
class _Measured:
    """What streaming one tensor gave, as its rank hands it to the others."""

    result: TensorResult
    model: TensorModel | None
    base_norm: float
    gram: np.ndarray
    is_float: bool
    ndim: int


def _measured(state: TensorState, keep_grams: bool, targets: np.ndarray) -> _Measured:
    return _Measured(_tensor_result(state, keep_grams, targets), state.model, state.data.base_norm, state.data.gram,
                     state.is_float, len(state.info.shape))


def stream_models(readers: RunReaders, selector: ModelSelector, make_sink: Callable[[Mapping], Sink],
                  device: torch.device, *, block_bytes: int = DEFAULT_BLOCK_BYTES, targets: np.ndarray,
                  keep_grams: bool = False, progress: ProgressCallback | None = None,
                  ranks: Ranks = SINGLE) -> ModelPassResult:
    """Decide every tensor's model and stream the tensors into the sink ``make_sink(models)``, then finish it.

    One pass when every choice is per tensor (``make_sink`` gets no models); otherwise a Gram pass (plus the
    singular triples in per-matrix modes), the run-level choices of ``selector``, then the writing pass
    with every model known (``make_sink`` gets them all).

    Across ``ranks`` each streams its share of the tensors (:func:`rank_names`) into its own sink (a sharded
    sink whose shards are numbered among every rank's); the run-level choices are made by rank 0 from every
    rank's Gram matrices, in storage order, as one process makes them; every rank gets every tensor's
    figures, and the ``parts`` of the result say what each rank's sink wrote.
    """
    steps = readers.series.steps
    n = len(steps)
    mine = rank_names(readers, ranks)
    run_bytes = readers.run_bytes()
    own_bytes = run_bytes
    if ranks.distributed:
        own_bytes = sum(readers.info(name).numel * row.itemsize for name in mine for row in readers.rows(name))
        progress = ranks.progress(progress, own_bytes, run_bytes)

    def decide(state: TensorState) -> TensorModel:
        state.model = selector.model(state.data)
        return state.model

    def factor_accumulator(state: TensorState) -> DeltaAccumulator | None:
        return selector.method.factor_accumulator(state.info.shape, state.n_observed, selector.p)

    def part(sink: Sink) -> dict | None:
        return sink.part() if ranks.distributed else None

    if not selector.needs_run_pass:
        sink = ranks.step(lambda: make_sink({}))
        _number_shards(sink, ranks)

        def stream() -> tuple[int, list[_Measured], dict | None]:
            measured: list[_Measured] = []
            recording = _Recording(sink, lambda state: measured.append(_measured(state, keep_grams, targets)))
            bytes_read = StreamPass(tensor_states(readers, mine), recording, device, block_bytes=block_bytes,
                                    decide=decide, factor_accumulator=factor_accumulator, progress=progress,
                                    total_bytes=own_bytes).run()
            sink.finish()
            return bytes_read, measured, part(sink)

        return _merged(ranks.gather(stream), n, steps, 1)

    def gram_pass() -> tuple[int, list]:
        grams = GramSink()
        bytes_read = StreamPass(tensor_states(readers, mine), grams, device, block_bytes=block_bytes,
                                factor_accumulator=factor_accumulator, progress=progress,
                                total_bytes=2 * own_bytes).run()
        return bytes_read, [grams.datas[name] for name in mine]

    gathered = ranks.gather(gram_pass)
    own_gram_bytes = gathered[ranks.rank][0]
    gram_bytes = sum(bytes_read for bytes_read, _ in gathered)
    datas = {data.name: data for _, rank_datas in gathered for data in rank_datas}  # storage order
    prepared = ranks.from_leader(lambda: (selector.prepare(datas), selector.prepared())[1])
    if not ranks.leader:
        selector.adopt(prepared)
    known = tensor_states(readers, mine)
    measured: list[_Measured] = []

    def decide_known() -> Sink:
        for state in known:
            state.data = datas[state.name]
            state.model = selector.model(state.data) if state.is_float else None
            state.known = True
            measured.append(_measured(state, keep_grams, targets))
        return make_sink({state.name: state.model for state in known})

    sink = ranks.step(decide_known)
    _number_shards(sink, ranks)

    def write() -> tuple[int, list[_Measured], dict | None]:
        bytes_read = StreamPass(known, sink, device, block_bytes=block_bytes, progress=progress,
                                bytes_before=own_gram_bytes, total_bytes=2 * own_bytes).run()
        sink.finish()
        return bytes_read - own_gram_bytes, measured, part(sink)

    result = _merged(ranks.gather(write), n, steps, 2)
    result.bytes_read += gram_bytes
    return result


def _number_shards(sink: Sink, ranks: Ranks) -> None:
    """Number each rank's shards after those of the ranks before it (one sync point)."""
    if not ranks.distributed:
        return
    counts = ranks.gather(lambda: sink.shard_count)
    sink.number_shards(sum(counts[: ranks.rank]), sum(counts))


def _merged(gathered: list[tuple[int, list[_Measured], dict | None]], n: int, steps: Sequence[int],
            passes: int) -> ModelPassResult:
    """Every rank's tensors (in rank order: storage order), summed as one process sums them."""
    results: list[TensorResult] = []
    models: dict[str, TensorModel | None] = {}
    base_norms: dict[str, float] = {}
    verdict = RunVerdict(steps)
    run_gram = np.zeros((n, n))
    for _, measured, _ in gathered:
        for m in measured:
            models[m.result.name] = m.model
            base_norms[m.result.name] = m.base_norm
            run_gram = run_gram + m.gram
            if m.is_float:
                verdict.add(m.result.name, m.gram, m.ndim)
            results.append(m.result)
    parts = [p for _, _, p in gathered] if gathered[0][2] is not None else None
    return ModelPassResult(results, models, base_norms, sum(b for b, _, _ in gathered), run_gram, verdict, passes,
                           parts)


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
        spec: the model options below as one :class:`relex.trajectory.ModelSpec` (then leave them at their
            defaults).
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
    spec = model_spec(spec, method=method, rank=rank, regressor=regressor, scale=scale, auto_scope=auto_scope,
                      candidates=candidates, holdout=holdout, copy_norms=copy_norms, from_step=from_step)
    ranks = current()  # the ranks joined (relex.distributed.join); without, this process alone
    if ranks.distributed and output == "lora":
        raise RelexInputError("--output lora writes one adapter file: run it in one process (without torchrun)")
    opened: dict = {}

    def open_run():
        check_output_folder(out_dir, overwrite)
        check_output_place(out_dir, run_dir)
        series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
        check_targets(targets, series.steps[-1], allow_interpolation)
        torch_device = ranks.device(resolve_device(device))
        selector = ModelSelector(spec, series.steps)
        readers = opened["readers"] = RunReaders(series, allow_pickle)
        if output == "lora":
            AdapterSink.check(readers, spec.method)
        return series, torch_device, selector, readers, readers.config_folders()

    try:
        series, torch_device, selector, readers, config_folders = ranks.step(open_run)
        target_array = np.array(targets, dtype=np.float64)
        with staged_folder(out_dir, overwrite, ranks=ranks) as staging:
            folders = target_folders(staging, targets)
            made: list[Sink] = []

            def make_sink() -> Sink:
                if output == "lora":
                    made.append(AdapterSink(readers, folders, target_array, torch_device, lora_rank, dtype))
                else:
                    layout = checkpoint_layout(readers, dtype, rank_names(readers, ranks))
                    made.append(CheckpointSink(folders, layout, target_array, torch_device, max_shard_size,
                                               part=ranks.distributed))
                return made[-1]

            try:
                sink = ranks.step(make_sink)
                needed = sum(ranks.gather(lambda: sink.output_bytes(config_folders)))
                ranks.step(lambda: require_free_space(out_dir, needed))  # before reading anything
                measured = stream_models(readers, selector, lambda models: sink, torch_device,
                                         block_bytes=block_bytes, targets=target_array, keep_grams=keep_grams,
                                         progress=progress, ranks=ranks)
            finally:
                for made_sink in made:
                    made_sink.close()
            bytes_written = sink.bytes_written if measured.parts is None else sum(
                written["bytes_written"] for part in measured.parts for written in part.values())
            result = ExtrapolationResult(
                out_dirs={t: (out_dir if len(targets) == 1 else out_dir / f"step-{t}") for t in targets},
                series=series, method=spec.method, options=spec.record(), tensors=measured.tensors,
                diagnostics=measured.diagnostics(max(targets), checkpoint_reward_trend(
                    series.observed[-1].path, series.steps, max(targets))),
                seconds=time.perf_counter() - started, bytes_read=measured.bytes_read,
                bytes_written=bytes_written, device=str(torch_device), selection=selector.selection,
                passes=measured.passes, sources=readers.describe(), output=output,
            )
            record = result.to_dict()

            def save() -> None:
                for t in targets:
                    if measured.parts is None:
                        sink.save(t, record, config_folders)
                    else:
                        sink.save(t, record, config_folders, measured.parts)

            ranks.step(lambda: save() if ranks.leader else None)
    finally:
        if "readers" in opened:
            opened["readers"].close()
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
    ranks = current()  # the ranks joined (relex.distributed.join); without, this process alone
    opened: dict = {}

    def open_run():
        series = discover_series(run_dir, base=base, steps=steps, max_step=max_step, checkpoints=checkpoints)
        opened["readers"] = RunReaders(series, allow_pickle)
        return series, opened["readers"], ranks.device(resolve_device(device))

    def read() -> tuple[int, dict, dict]:
        sink = GramSink()
        mine = rank_names(readers, ranks)
        own_bytes = readers.run_bytes()
        scaled = progress
        if ranks.distributed:
            own_bytes = sum(readers.info(name).numel * row.itemsize for name in mine for row in readers.rows(name))
            scaled = ranks.progress(progress, own_bytes, readers.run_bytes())
        bytes_read = StreamPass(tensor_states(readers, mine), sink, torch_device, block_bytes=block_bytes,
                                progress=scaled, total_bytes=own_bytes).run()
        return bytes_read, sink.grams, sink.base_norms

    try:
        series, readers, torch_device = ranks.step(open_run)
        gathered = ranks.gather(read)
    finally:
        if "readers" in opened:
            opened["readers"].close()
    grams = {name: gram for _, rank_grams, _ in gathered for name, gram in rank_grams.items()}  # storage order
    return GramSet(
        series=series,
        names=[n for n in readers.names if n in grams],
        shapes={n: readers.info(n).shape for n in readers.names},
        grams=grams,
        base_norms={name: norm for _, _, norms in gathered for name, norm in norms.items()},
        seconds=time.perf_counter() - started,
        bytes_read=sum(bytes_read for bytes_read, _, _ in gathered),
    )
