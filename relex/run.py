"""One run, one pass, one verdict: ``open_run(source, options) → Run``, then ``Run.execute(*sinks) → PassResult``.

:func:`open_run` finds the run's checkpoints (a folder, ``hf://ORG/REPO``, a list of checkpoint folders, or
snapshots in memory: :mod:`relex.io.runs`), opens each one's reader and checks that they hold the same tensors.
Nothing is read yet. :meth:`Run.plan` says what a pass into given sinks will do; :meth:`Run.execute` does it:
it streams every tensor once (:class:`relex.stream.StreamPass`), chooses each tensor's trajectory model as its
Gram matrix comes in (:class:`relex.trajectory.ModelSelector`), hands the prediction to the sinks (a checkpoint
per target step, an adapter, the trajectory store; :mod:`relex.sinks`), and computes the verdict once, from
every tensor's Gram matrix, carried to the farthest target and weighing the training reward
(:class:`relex.analysis.verdict.RunVerdict`). Every command and integration is a caller of these two.

A pass reads the run twice when a choice needs the whole run first (``--regressor auto`` per run or group,
``--scale auto``, the learned ``mlp`` predictor) or a sink needs every model before it writes (the trajectory
store): a Gram pass, the choices, then the writing pass.

Under ``torchrun`` (:mod:`relex.distributed`) each rank streams a contiguous share of the tensors (balanced by
bytes) into its own sinks; the ranks meet at fixed sync points, rank 0 makes the run-level choices from every
rank's Gram matrices, and every rank gets every tensor's figures: the result is the one of one process.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from relex.analysis.reward import MIN_POINTS, RewardLog, checkpoint_reward_trend, read_reward_log, reward_trend
from relex.analysis.verdict import RunVerdict, Verdict, horizon
from relex.device import resolve_device
from relex.distributed import Ranks, current, shares
from relex.errors import RelexInputError
from relex.io.discover import CheckpointSeries
from relex.io.memory import MEMORY
from relex.io.run_readers import RunReaders
from relex.io.runs import describe, find_series
from relex.methods import TensorModel, method_class
from relex.options import RunOptions
from relex.progress import Report, bytes_of
from relex.sinks import GramSink
from relex.stream import Sink, StreamPass, TensorState
from relex.trajectory import ModelSelector

__all__ = ["PassResult", "Plan", "Run", "TensorResult", "open_run"]


@dataclass
class TensorResult:
    """What a pass measured of one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stats: dict  # the model's figures (explained variance, fit R², …); empty when no model was fitted
    relative_delta: float  # ‖x_T‖ / ‖w_0‖
    gram: np.ndarray | None = field(default=None, repr=False)  # G = X Xᵀ of its deltas (floating point only)


@dataclass
class PassResult:
    """What :meth:`Run.execute` measured: every tensor's Gram matrix and model, and the verdict."""

    label: str  # the run, as messages and records name it
    series: CheckpointSeries
    tensors: list[TensorResult]
    models: dict[str, TensorModel | None]  # empty when no sink took a prediction
    base_norms: dict[str, float]
    verdict: Verdict
    bytes_read: int
    passes: int
    seconds: float
    selection: dict | None = None  # the backtest figures of automatic choices
    sources: dict | None = None  # how each checkpoint was read
    parts: list[list[dict]] | None = None  # across ranks: what each rank's sinks wrote (their ``part()``)
    judged: object = field(default=None, repr=False)  # the RunVerdict of this pass, and the reward it weighs

    def verdict_at(self, target_step: int | None) -> Verdict:
        """The same verdict carried to another target (the one a probe chose): the same Gram matrices, the same
        rules, the reward's trend carried there too."""
        return self.judged(target_step)

    @property
    def grams(self) -> dict[str, np.ndarray]:
        """Each floating-point tensor's Gram matrix, in storage order."""
        return {t.name: t.gram for t in self.tensors if t.gram is not None}

    @property
    def steps(self) -> list[int]:
        return self.series.steps

    @property
    def parameters(self) -> int:
        """Entries of the floating-point tensors (those the verdict and the models see)."""
        return sum(math.prod(t.shape) for t in self.tensors if t.gram is not None)

    def summary(self) -> dict:
        """Whole-run figures: tensor count, explained variance and fit R² of the models (mean, min)."""
        moved = [t for t in self.tensors if t.stats.get("rank", 0) > 0]
        explained = [t.stats["explained"] for t in moved] or [float("nan")]
        r2 = [t.stats["r2"] for t in moved] or [float("nan")]
        return {"tensors": len(self.tensors), "tensors_moved": len(moved),
                "explained_mean": float(np.mean(explained)), "explained_min": float(np.min(explained)),
                "explained_median": statistics.median(explained),  # np.median imports numpy.ma: 10 ms
                "r2_mean": float(np.mean(r2)), "r2_min": float(np.min(r2)),
                "seconds": self.seconds, "bytes_read": self.bytes_read}


@dataclass(frozen=True)
class Plan:
    """What a pass will do, before it reads anything: printed by ``--dry-run``."""

    run: str
    steps: tuple[int, ...]
    base: str
    target_steps: tuple[int, ...]
    tensors: int
    parameters: int
    passes: tuple[str, ...]  # ("read",), or ("gram", "write") when run-level choices or a sink need every model
    sinks: tuple[str, ...]
    reason: str  # why two passes, when there are
    ranks: int
    device: str
    bytes_per_pass: int
    memory_bytes: int  # the pass's buffers at most

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def text(self) -> str:
        """The plan for people, one line per fact."""
        window = f"{len(self.steps)} checkpoints, steps {self.steps[0]}..{self.steps[-1]}"
        lines = [f"run: {self.run} ({window}; base {self.base})",
                 f"tensors: {self.tensors:,} ({self.parameters:,} parameters), {self.bytes_per_pass / 1e9:.2f} GB "
                 "per read of the run",
                 f"passes: {' then '.join(self.passes)}" + (f" ({self.reason})" if self.reason else ""),
                 f"into: {', '.join(self.sinks) if self.sinks else 'nothing (Gram matrices and the verdict only)'}",
                 f"verdict carried to: {'step ' + str(max(self.target_steps)) if self.target_steps else 'the window'}",
                 f"processes: {self.ranks} on {self.device}; buffers at most {self.memory_bytes / 1e9:.2f} GB"]
        return "\n".join(lines)


def open_run(source, options: RunOptions | None = None, *, progress: Report = None, **settings) -> "Run":
    """Open a run (see the module docstring): ``source`` is a run folder, ``"hf://ORG/REPO[@REVISION]"``, a list
    of ``(step, folder)`` pairs, or :class:`relex.io.runs.Snapshots`; ``options`` (or the same settings as
    keywords, flat: ``target_step=500, max_step=75, regressor="auto"``) say what to read and where to go.

    Downloads a Hub run's files first (``progress`` gets :class:`relex.progress.Progress` events). Raises
    :class:`relex.RelexInputError` on bad input, before anything is read.
    """
    options = (options or RunOptions()).replace(**settings) if settings else (options or RunOptions())
    ranks = current()  # the ranks joined (relex.distributed.join); without, this process alone
    log = None
    if options.reward_file is not None:  # a file the user named is read before the run
        log = read_reward_log(options.reward_file, options.reward_key)
    opened: dict = {}

    def open_here() -> tuple[CheckpointSeries, RunReaders, torch.device]:
        series = find_series(source, base=options.base, steps=options.steps, max_step=options.max_step,
                             revision_pattern=options.revision_pattern, subfolder_pattern=options.subfolder_pattern,
                             progress=bytes_of(progress, "downloading"))
        early = [t for t in options.target_steps if t <= series.steps[-1]]
        if early and not options.allow_interpolation:
            raise RelexInputError(f"target step {early[0]} is not beyond the last observed step {series.steps[-1]} "
                                  "(pass --allow-interpolation to predict or judge inside the observed window)")
        ModelSelector(options.model, series.steps)  # refuses a model the window cannot fit, before any reading
        device = ranks.device(resolve_device(options.device))
        opened["readers"] = RunReaders(series, options.allow_pickle)
        return series, opened["readers"], device

    try:
        series, readers, device = ranks.step(open_here)
    except BaseException:
        if "readers" in opened:
            opened["readers"].close()
        raise
    return Run(describe(source), series, readers, options, ranks, device, log)


class Run:
    """An opened run: its checkpoint series and readers, the options, the processes it is split across."""

    def __init__(self, label: str, series: CheckpointSeries, readers: RunReaders, options: RunOptions, ranks: Ranks,
                 device: torch.device, reward_log: RewardLog | None = None):
        self.label, self.series, self.readers, self.options = label, series, readers, options
        self.ranks, self.device, self.reward_log = ranks, device, reward_log

    @property
    def steps(self) -> list[int]:
        return self.series.steps

    @property
    def in_memory(self) -> bool:
        return self.series.base.path.parts[:1] == MEMORY.parts

    def with_options(self, options: RunOptions) -> "Run":
        """The same opened run under other ``options`` (another method or target; the same checkpoints): it shares
        this run's readers, so close only one of the two."""
        ModelSelector(options.model, self.steps)  # refuses a model the window cannot fit, before any reading
        return Run(self.label, self.series, self.readers, options, self.ranks, self.device, self.reward_log)

    def close(self) -> None:
        self.readers.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the plan -------------------------------------------------------------------------------------------------
    def plan(self, *sinks: Sink) -> Plan:
        """What :meth:`execute` into ``sinks`` will do."""
        selector = self._selector(sinks)
        reason = ""
        if selector.needs_run_pass:
            reason = ("a sink needs every model before it writes" if any(_needs_models(s) for s in sinks)
                      else "run-level choices need every tensor's Gram matrix first")
        names = self.readers.names
        return Plan(run=self.label, steps=tuple(self.steps), base=str(self.series.base.path),
                    target_steps=self.options.target_steps, tensors=len(names),
                    parameters=sum(self.readers.info(n).numel for n in names),
                    passes=("gram", "write") if selector.needs_run_pass and sinks else ("read",), sinks=tuple(
                        s.describe() for s in sinks), reason=reason if sinks else "", ranks=self.ranks.world,
                    device=str(self.device), bytes_per_pass=self.readers.run_bytes(),
                    memory_bytes=min(self.options.block_bytes, self._largest_tensor_bytes()))

    def _largest_tensor_bytes(self) -> int:
        return max((sum(self.readers.info(n).numel * row.itemsize for row in self.readers.rows(n))
                    for n in self.readers.names), default=0)

    # -- the pass -------------------------------------------------------------------------------------------------
    def execute(self, *sinks: Sink, progress: Report = None, task: str = "reading") -> PassResult:
        """Stream the run into ``sinks`` (none: the Gram matrices and the verdict only) and finish them; the
        verdict is carried to the options' farthest target step. ``progress`` gets :class:`relex.progress.Progress`
        events of ``task``."""
        started = time.perf_counter()
        ranks, readers = self.ranks, self.readers
        selector = self._selector(sinks)
        sink = sinks[0] if len(sinks) == 1 else _AllSinks(sinks)  # none: the Gram matrices alone
        steps = self.steps
        mine = self._rank_names()
        run_bytes = readers.run_bytes()
        own_bytes = run_bytes
        report = bytes_of(progress, task)
        if ranks.distributed:
            own_bytes = sum(readers.info(n).numel * row.itemsize for n in mine for row in readers.rows(n))
            report = ranks.progress(report, own_bytes, run_bytes)
        targets = np.asarray(self.options.target_steps or [steps[-1]], dtype=np.float64)

        def factors(state: TensorState):
            return selector.method.factor_accumulator(state.info.shape, state.n_observed, selector.p)

        if not (selector.needs_run_pass and sinks):
            decide = None
            if sinks:
                def decide(state: TensorState) -> TensorModel:
                    state.model = selector.model(state.data)
                    return state.model

            def stream() -> tuple[int, list[_Measured], list[dict] | None]:
                measured: list[_Measured] = []
                recording = _Recording(sink, lambda state: measured.append(_measured(state, targets)))
                bytes_read = StreamPass(self._states(mine), recording, self.device,
                                        block_bytes=self.options.block_bytes, decide=decide,
                                        factor_accumulator=factors if sinks else lambda state: None,
                                        progress=report, total_bytes=own_bytes).run()
                sink.finish()
                return bytes_read, measured, self._parts(sinks)

            self._number_shards(sinks)
            return self._result(ranks.gather(stream), 1, selector, started)

        def gram_pass() -> tuple[int, list]:
            grams = GramSink()
            bytes_read = StreamPass(self._states(mine), grams, self.device, block_bytes=self.options.block_bytes,
                                    factor_accumulator=factors, progress=report, total_bytes=2 * own_bytes).run()
            return bytes_read, [grams.datas[name] for name in mine]

        gathered = ranks.gather(gram_pass)
        own_gram_bytes = gathered[ranks.rank][0]
        gram_bytes = sum(bytes_read for bytes_read, _ in gathered)
        datas = {data.name: data for _, rank_datas in gathered for data in rank_datas}  # storage order
        prepared = ranks.from_leader(lambda: (selector.prepare(datas), selector.prepared())[1])
        if not ranks.leader:
            selector.adopt(prepared)
        known = self._states(mine)
        measured: list[_Measured] = []

        def decide_known() -> None:
            for state in known:
                state.data = datas[state.name]
                state.model = selector.model(state.data) if state.is_float else None
                state.known = True
                measured.append(_measured(state, targets))
            models = {state.name: state.model for state in known}
            for each in sinks:
                if _needs_models(each):
                    each.bind(models)

        ranks.step(decide_known)
        self._number_shards(sinks)

        def write() -> tuple[int, list[_Measured], list[dict] | None]:
            bytes_read = StreamPass(known, sink, self.device, block_bytes=self.options.block_bytes, progress=report,
                                    bytes_before=own_gram_bytes, total_bytes=2 * own_bytes).run()
            sink.finish()
            return bytes_read - own_gram_bytes, measured, self._parts(sinks)

        result = self._result(ranks.gather(write), 2, selector, started)
        result.bytes_read += gram_bytes
        return result

    def _selector(self, sinks: Sequence[Sink]) -> ModelSelector:
        return ModelSelector(self.options.model, self.steps, run_pass=any(_needs_models(s) for s in sinks))

    def _rank_names(self) -> list[str]:
        """The tensors this rank reads: its contiguous share of the storage order, balanced by bytes read."""
        readers, ranks = self.readers, self.ranks
        if not ranks.distributed:
            return list(readers.names)
        sizes = [sum(readers.info(n).numel * row.itemsize for row in readers.rows(n)) for n in readers.names]
        return [readers.names[i] for i in shares(sizes, ranks.world)[ranks.rank]]

    def rank_names(self) -> list[str]:
        """The tensors this process reads and writes (all of them, outside ``torchrun``)."""
        return self._rank_names()

    def _states(self, names: Sequence[str]) -> list[TensorState]:
        steps = np.asarray(self.steps, dtype=np.float64)
        return [TensorState(n, self.readers.info(n), self.readers.rows(n), steps) for n in names]

    def _number_shards(self, sinks: Sequence[Sink]) -> None:
        """Number each rank's shards after those of the ranks before it (one sync point per sharded sink)."""
        if not self.ranks.distributed:
            return
        for sink in sinks:
            if hasattr(sink, "number_shards"):
                counts = self.ranks.gather(lambda sink=sink: sink.shard_count)
                sink.number_shards(sum(counts[: self.ranks.rank]), sum(counts))

    def _parts(self, sinks: Sequence[Sink]) -> list[dict] | None:
        return [s.part() if hasattr(s, "part") else {} for s in sinks] if self.ranks.distributed else None

    def _result(self, gathered, passes: int, selector: ModelSelector, started: float) -> PassResult:
        """Every rank's tensors (in rank order: storage order), and the verdict on them, as one process gets it."""
        tensors, models, base_norms = [], {}, {}
        verdict = RunVerdict(self.steps)
        for _, measured, _ in gathered:
            for m in measured:
                models[m.result.name] = m.model
                base_norms[m.result.name] = m.base_norm
                if m.is_float:
                    verdict.add(m.result.name, m.gram, m.ndim)
                tensors.append(m.result)
        parts = [p for _, _, p in gathered] if gathered[0][2] is not None else None

        def judged(target: int | None) -> Verdict:
            carried = target if target is not None and target > self.steps[-1] else None
            judged = verdict.judge(carried, self._reward(carried))
            if target is not None and carried is None:  # a target inside the window: the window alone is judged
                judged = dataclasses.replace(judged, horizon=horizon(self.steps, target))
            return judged

        return PassResult(self.label, self.series, tensors, models if any(m is not None for m in models.values()) else {},
                          base_norms, judged(self.options.target_step), sum(b for b, _, _ in gathered), passes,
                          time.perf_counter() - started, selector.selection, self.readers.describe(), parts, judged)

    def _reward(self, target) -> object:
        """The training reward's trend the verdict weighs (:mod:`relex.analysis.reward`), or None."""
        options = self.options
        if options.rewards == "none":
            return None
        if self.reward_log is not None:  # a file the user named must weigh in, or say why not
            trend = reward_trend(self.reward_log, self.steps, target, options.reward_max)
            if trend is None:
                inside = sum(self.steps[0] < s <= self.steps[-1] for s in self.reward_log.steps)
                raise RelexInputError(f"{self.reward_log.source}: {inside} rewards logged under "
                                      f"{self.reward_log.key!r} after step {self.steps[0]} up to step "
                                      f"{self.steps[-1]} (the observed window); the trend needs at least {MIN_POINTS}")
            return trend
        if self.series.rewards:
            log = RewardLog(tuple(s for s, _ in self.series.rewards), tuple(r for _, r in self.series.rewards),
                            options.reward_key, str(MEMORY))
            return reward_trend(log, self.steps, target, options.reward_max)
        return checkpoint_reward_trend(self.series.observed[-1].path, self.steps, target, options.reward_key,
                                       options.reward_max)


def _needs_models(sink: Sink) -> bool:
    return bool(getattr(sink, "needs_models", False))


@dataclass
class _Measured:
    """What streaming one tensor gave, as its rank hands it to the others."""

    result: TensorResult
    model: TensorModel | None
    base_norm: float
    gram: np.ndarray
    is_float: bool
    ndim: int


def _measured(state: TensorState, targets: np.ndarray) -> _Measured:
    g = state.data.gram
    stats = {}
    if state.model is not None:
        stats = dict(state.model.stats)
        describe_model = getattr(method_class(state.model.params["method"]), "describe", None)
        if describe_model is not None:
            stats.update(describe_model(state.model.params, targets))
    elif state.data is not None and not state.is_float:
        stats = {"rank": 0, "explained": 0.0, "explained_rank1": 0.0, "r2": 1.0, "copied": True}
    base_norm = state.data.base_norm
    relative = math.sqrt(max(g[-1, -1], 0.0)) / base_norm if base_norm > 0 else 0.0
    result = TensorResult(state.name, state.info.shape, str(state.info.dtype).replace("torch.", ""), stats, relative,
                          g if state.is_float else None)
    return _Measured(result, state.model, base_norm, g, state.is_float, len(state.info.shape))


class _Recording(Sink):
    """A sink that records each tensor's figures before passing it on."""

    def __init__(self, sink: Sink | None, record):
        self.sink, self.record = sink, record

    def wants_chunks(self, state):
        return self.sink is not None and self.sink.wants_chunks(state)

    def on_model(self, state):
        self.record(state)
        if self.sink is not None:
            self.sink.on_model(state)

    def open_span(self, state, first, count):
        return self.sink.open_span(state, first, count)

    def fill(self, state, span, lo, chunk):
        self.sink.fill(state, span, lo, chunk)

    def emit(self, state, span):
        self.sink.emit(state, span)

    def on_tensor_done(self, state):
        if self.sink is not None:
            self.sink.on_tensor_done(state)


class _AllSinks(Sink):
    """Several sinks fed by one pass: each tensor is mixed once, and every sink gets its chunks."""

    def __init__(self, sinks: Sequence[Sink]):
        self.sinks = list(sinks)

    def wants_chunks(self, state):
        return any(s.wants_chunks(state) for s in self.sinks)

    def on_model(self, state):
        for s in self.sinks:
            s.on_model(state)

    def open_span(self, state, first, count):
        return [s.open_span(state, first, count) if s.wants_chunks(state) else None for s in self.sinks]

    def fill(self, state, span, lo, chunk):
        for s, part in zip(self.sinks, span):
            if part is not None:
                s.fill(state, part, lo, chunk)

    def emit(self, state, span):
        for s, part in zip(self.sinks, span):
            if part is not None:
                s.emit(state, part)

    def on_tensor_done(self, state):
        for s in self.sinks:
            s.on_tensor_done(state)

    def finish(self):
        for s in self.sinks:
            s.finish()
