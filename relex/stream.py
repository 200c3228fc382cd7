"""One streaming pass over a run: each tensor read once, in spans, through a fixed pool of reused buffers.

For each tensor, in the base's storage order, a pass

1. reads the base and the T observed checkpoints in *spans* — the same consecutive entries of each, in their
   stored dtype (bf16 is half the bytes of float32) — into one *slot* of a pool of buffers allocated once;
   several reader threads ``pread`` straight into the slots;
2. accumulates the Gram matrix G = X Xᵀ of the float32 deltas x_i = w_i − w_0: right after reading a span,
   its reader thread converts and differences it a few chunks of 65,536 entries at a time into small reused
   buffers and takes each chunk's float32 product; the products are added to G in float64, chunk after chunk
   from the tensor's first entry. Every thread runs its BLAS on one core, so the numbers depend neither on the
   number of threads nor on how the tensor is cut into spans;
3. hands G — and, in per-matrix modes, the top singular triple of each 2-D delta — to ``decide``, which
   returns the tensor's model (:class:`relex.methods.TensorModel`);
4. mixes the same spans, still in their slots, on compute threads: w_0 and the basis vectors
   b_r = Σ_i B_ri x_i of each chunk go to the :class:`Sink`, which makes its outputs from them (a checkpoint
   per target step, an adapter, a trajectory store) and writes them in order.

While a tensor is mixed, the readers fill the slots it frees with the next one (and take its Gram products),
and the next tensors' models are decided; the sink gets the mixed spans in order. Writers write and hash on
their own threads. A tensor whose T + 1 stored copies do not fit the pool (``block_bytes``) is read twice: its
Gram pass keeps its last spans, the mixing pass re-reads the others — only the checkpoints the model
mixes. With models known before reading (the writing pass after run-level choices, ``relex materialize``),
each span is mixed as soon as it is read.

On CUDA the slots are pinned host memory, each span is copied to the device asynchronously, and the same
chunk kernels run there; results come back before a slot or an output buffer is reused.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from relex.errors import RelexInputError
from relex.io.run_readers import Row
from relex.io.source import TensorInfo
from relex.methods import MatrixFactors, TensorData, TensorModel
from relex.methods.matrix_rank1 import FactorAccumulator, matrix_shape
from relex.subspace import GRAM_CHUNK

DEFAULT_BLOCK_BYTES = 2 * 1024**3  # the pool of stored-dtype copies one pass holds at most
ROW_BYTES = 2 * 1024**2  # bytes of one checkpoint in one slot (fewer when T is large, see slot_row_bytes)
# Float32 bytes of w_0 and the T deltas converted, and mixed, at a time (see mix_chunk): at most MIX_BYTES,
# and at most 1/MIX_SHARE of the stored copies of the pass's largest tensor, which bound its memory.
MIX_BYTES = 6 * 1024**2
MIX_SHARE = 64
READER_THREADS = 2

ProgressCallback = Callable[[str, int, int], None]


# -- what a pass knows about one tensor ----------------------------------------------------------------------


@dataclass
class TensorState:
    """One tensor of a pass: its inputs, then its Gram matrix, data and model as they become known.

    ``rows[0]`` is the base; the others are the observed checkpoints (``weight``/``delta`` rows) or, when
    the model is known beforehand, its stored basis vectors (``basis``) or value (``value``). Sinks keep
    what they derive from the model (coefficients, weights on the device) in ``prepared``.
    """

    name: str
    info: TensorInfo
    rows: list[Row]
    steps: np.ndarray
    model: TensorModel | None = None
    known: bool = False  # the model was decided before this pass
    gram: np.ndarray | None = None
    norm_sq: float = 0.0  # ‖w_0‖², summed over the chunks read
    factors: MatrixFactors | None = None
    data: TensorData | None = None
    prepared: dict = field(default_factory=dict)
    bytes_read: int = 0

    @property
    def numel(self) -> int:
        return self.info.numel

    @property
    def is_float(self) -> bool:
        return self.info.is_float

    @property
    def n_observed(self) -> int:
        return len(self.rows) - 1

    @property
    def uniform(self) -> bool:
        """Every observed input is a stored weight of one dtype (their conversion is one operation)."""
        if "uniform" not in self.prepared:
            rows = self.rows[1:]
            self.prepared["uniform"] = bool(rows) and all(r.kind == "weight" and r.dtype == rows[0].dtype for r in rows)
        return self.prepared["uniform"]

    @property
    def uniform_with_base(self) -> bool:
        """... and the base has that dtype too (the base and every checkpoint convert in one operation)."""
        return self.uniform and self.rows[0].dtype == self.rows[1].dtype

    def mixed_rows(self) -> tuple[int, ...]:
        """Indices (into ``rows``) of the inputs the mixing needs besides the base."""
        kinds = {row.kind for row in self.rows[1:]}
        if kinds <= {"basis", "value"}:
            return tuple(range(1, len(self.rows)))
        if not self.is_float or self.model is None:
            return (len(self.rows) - 1,)  # an integer buffer keeps its newest value
        return tuple(1 + int(i) for i in np.flatnonzero(np.any(self.model.basis != 0, axis=0)))


@dataclass
class Chunk:
    """What the mixing of entries ``first .. first + count`` of a tensor gives a sink (on the device).

    ``w0``: the base in float32; ``basis``: the basis vectors b_r (r, count) in float32, or None; ``value``:
    the value to write for an integer buffer (or a stored value), else None.
    """

    first: int
    count: int
    w0: torch.Tensor
    basis: torch.Tensor | None
    value: torch.Tensor | None


class Sink:
    """Where a pass sends each tensor once its model is known.

    The pass calls, per tensor: ``on_model(state)`` (main thread); if ``wants_chunks(state)``, for each span
    ``open_span(state, first, count)`` → a span output, ``fill(state, span, lo, chunk)`` for each of its chunks
    (compute threads; ``lo`` is the offset of the chunk in the span), then ``emit(state, span)`` in span order
    (main thread); then ``on_tensor_done(state)``. ``emit`` and ``on_tensor_done`` come tensor after tensor,
    in the pass's order; the next tensors' ``on_model`` and ``open_span`` may come before a tensor's last
    ``emit`` (the pass goes on while a tensor is mixed). ``finish`` at the end of a successful pass, ``close``
    always.
    """

    def wants_chunks(self, state: TensorState) -> bool:
        return False

    def on_model(self, state: TensorState) -> None:
        pass

    def open_span(self, state: TensorState, first: int, count: int):
        return None

    def fill(self, state: TensorState, span, lo: int, chunk: Chunk) -> None:
        pass

    def emit(self, state: TensorState, span) -> None:
        pass

    def on_tensor_done(self, state: TensorState) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


# -- kernels -------------------------------------------------------------------------------------------------


def combine(w0: torch.Tensor, coefficients: Sequence[float], basis: torch.Tensor | None,
            factors: Sequence[tuple[torch.Tensor, torch.Tensor]], first: int, out: torch.Tensor,
            scratch: torch.Tensor) -> torch.Tensor:
    """w_0 + Σ a_r b_r + Σ a_f (u_f v_fᵀ) of entries ``first .. first + len(w0)`` in float32, into ``out``.

    Separate multiply and add kernels (no fused multiply-add), so an entry's value does not depend on how
    the tensor was cut into spans and chunks: ``relex materialize`` reproduces it bit for bit. ``factors``
    are (u, v) of the 2-D view of the tensor; ``scratch`` has room for ``len(w0)`` entries.
    """
    count = w0.numel()
    out = out[:count]
    tmp = scratch[:count]
    n_basis = 0 if basis is None else basis.shape[0]
    terms = [basis[r] for r in range(n_basis)]
    for u, v in factors:
        cols = v.numel()
        r0, r1 = first // cols, -(-(first + count) // cols)
        terms.append(torch.outer(u[r0:r1], v).reshape(-1)[first - r0 * cols: first - r0 * cols + count])
    if not terms:
        return out.copy_(w0)
    total = w0
    for term, coefficient in zip(terms, coefficients):
        torch.mul(term, float(coefficient), out=tmp)
        torch.add(total, tmp, out=out)
        total = out
    return out


def mix_chunk(n_rows: int, budget: int) -> int:
    """Entries converted and mixed at a time for ``n_rows`` inputs: whole Gram chunks (at least one) whose
    float32 rows fit ``budget`` bytes (a pass gives at most ``MIX_BYTES``, and at most 1/``MIX_SHARE`` of its
    largest tensor's stored copies: small models keep one Gram chunk, and their memory its bound).

    The conversion and the mixing are entry by entry (unlike the Gram products, still taken chunk by chunk),
    so any size gives the same numbers. Larger chunks cost less Python dispatch and fewer hand-offs between
    threads while the rows stay in the processor's cache: on the 164M-parameter run of
    ``benchmarks/extrapolate_speed.py --whole-process`` (T = 4; three runs each, alternated), the pass took
    1.65-1.66 s mixing four Gram chunks at a time, 1.91-1.98 s one, 1.66-1.69 s eight, 1.73-1.76 s sixteen;
    converting the Gram stage's inputs four chunks at a time too, 1.58-1.69 s against 1.64-1.74 s.
    """
    return max(1, budget // (4 * max(1, n_rows) * GRAM_CHUNK)) * GRAM_CHUNK


class _Scratch:
    """One thread's reused float32 buffers (on the pass's device) for what it converts or mixes at a time."""

    def __init__(self, n_rows: int, n_basis: int, device: torch.device, budget: int):
        self.device, self.budget = device, budget
        self.w0 = self.x = self.basis = torch.empty(0, dtype=torch.float32, device=device)
        self._views: dict = {}
        self.ensure(n_rows, n_basis)

    def entries(self, n_rows: int) -> int:
        """Entries of ``n_rows`` inputs converted or mixed at a time."""
        return mix_chunk(n_rows, self.budget)

    def ensure(self, n_rows: int, n_basis: int) -> None:
        c = self.entries(n_rows)
        if self.w0.numel() < c:
            self.w0 = torch.empty(c, dtype=torch.float32, device=self.device)
        if self.x.numel() < max(1, n_rows) * c:
            self.x = torch.empty(max(1, n_rows) * c, dtype=torch.float32, device=self.device)  # w_0 and X
            self._views.clear()
        if self.basis.numel() < max(1, n_basis) * c:
            self.basis = torch.empty(max(1, n_basis) * c, dtype=torch.float32, device=self.device)
            self._views.clear()

    def chunk(self, n_rows: int, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (both, w_0, X) of ``n_rows`` × ``c`` float32 entries: w_0 then X, made once per shape (the
        views cost more Python time than a whole chunk of arithmetic on small tensors)."""
        key = ("x", n_rows, c)
        views = self._views.get(key)
        if views is None:
            both = self.x[: n_rows * c].view(n_rows, c)
            views = self._views[key] = (both, both[0], both[1:])
        return views

    def gram_views(self, n_rows: int, c: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(w_0, X, Xᵀ) of each Gram chunk of the ``c`` entries :meth:`chunk` holds, made once per shape."""
        key = ("g", n_rows, c)
        views = self._views.get(key)
        if views is None:
            _, w0, x = self.chunk(n_rows, c)
            parts = [(w0[lo: lo + GRAM_CHUNK], x[:, lo: lo + GRAM_CHUNK]) for lo in range(0, c, GRAM_CHUNK)]
            views = self._views[key] = [(w0_k, x_k, x_k.T) for w0_k, x_k in parts]
        return views

    def basis_view(self, n_basis: int, c: int) -> torch.Tensor:
        key = ("b", n_basis, c)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.basis[: n_basis * c].view(n_basis, c)
        return view


def _row_view(slot: torch.Tensor, state: TensorState, i: int, lo: int, hi: int) -> torch.Tensor:
    row = state.rows[i]
    size = row.itemsize
    return slot[i, lo * size: hi * size].view(row.dtype)


def _deltas(slot: torch.Tensor, state: TensorState, lo: int, hi: int, scratch: _Scratch,
            rows: Sequence[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_0, X) of entries ``lo .. hi`` of a span in float32: X (T, hi − lo) with x_i = w_i − w_0 (or the exact
    delta); the rows (indices into ``state.rows``) not in ``rows`` (None: all) were not read and are zero."""
    c = hi - lo
    t = state.n_observed
    both, w0, x = scratch.chunk(t + 1, c)
    wanted = range(1, t + 1) if rows is None else rows
    if len(wanted) == t and state.uniform_with_base:  # one conversion, one subtraction, every checkpoint
        size = state.rows[0].itemsize
        both.copy_(slot[: t + 1, lo * size: hi * size].view(state.rows[0].dtype))
        x.sub_(w0)
        return w0, x
    w0.copy_(_row_view(slot, state, 0, lo, hi))
    if len(wanted) < t:
        x.zero_()
    if len(wanted) == t and state.uniform:
        size = state.rows[1].itemsize
        x.copy_(slot[1: t + 1, lo * size: hi * size].view(state.rows[1].dtype))
        x.sub_(w0)
        return w0, x
    for i in wanted:
        x[i - 1].copy_(_row_view(slot, state, i, lo, hi))
        if state.rows[i].kind == "weight":
            x[i - 1].sub_(w0)
    return w0, x


def _gram_span(slot: torch.Tensor, state: TensorState, count: int, scratch: _Scratch) -> tuple[np.ndarray, float]:
    """Float32 Gram products of each 65,536-entry chunk of a span (n_chunks, T, T), and Σ w_0² of the span."""
    t = state.n_observed
    n_chunks = -(-count // GRAM_CHUNK)
    products = torch.empty((n_chunks, t, t), dtype=torch.float32, device=scratch.device)
    norms = torch.empty(n_chunks, dtype=torch.float32, device=scratch.device)
    step = scratch.entries(t + 1)  # converted at a time: whole Gram chunks, products taken chunk by chunk
    k = 0
    for first in range(0, count, step):
        c = min(count, first + step) - first
        w0, x = _deltas(slot, state, first, first + c, scratch, None)
        for w0_k, x_k, x_k_t in scratch.gram_views(t + 1, c):
            torch.mm(x_k, x_k_t, out=products[k])
            torch.dot(w0_k, w0_k, out=norms[k])
            k += 1
    return products.cpu().numpy(), float(norms.double().sum())


def _mix_span(slot: torch.Tensor, state: TensorState, first: int, count: int, scratch: _Scratch, sink: Sink,
              span, rows: Sequence[int] | None) -> float:
    """Hand each chunk of a span to the sink: w_0, the basis vectors B X (or the stored ones), the value.

    Returns Σ w_0² of the span when the tensor's inputs are stored basis vectors (its Gram stage, which
    measures it otherwise, was skipped), else 0."""
    model = state.model
    stored = all(row.kind in ("basis", "value") for row in state.rows[1:])
    weights = state.prepared.get("basis_weights") if not stored else None
    n_basis = 0 if model is None else model.n_basis
    scratch.ensure(len(state.rows), n_basis)
    norm_sq = torch.zeros((), dtype=torch.float64, device=scratch.device)
    step = scratch.entries(len(state.rows))
    for lo in range(0, count, step):
        hi = min(count, lo + step)
        c = hi - lo
        basis = value = None
        if stored:
            w0 = scratch.w0[:c]
            w0.copy_(_row_view(slot, state, 0, lo, hi))
            norm_sq += torch.dot(w0, w0)
            if len(state.rows) > 1 and state.rows[1].kind == "value":
                value = _row_view(slot, state, 1, lo, hi)
            elif n_basis:
                basis = scratch.basis_view(n_basis, c)
                for r in range(n_basis):
                    basis[r].copy_(_row_view(slot, state, 1 + r, lo, hi))
        else:
            w0, x = _deltas(slot, state, lo, hi, scratch, rows)
            if not state.is_float or model is None:  # an integer buffer keeps its newest value
                value = x[-1].to(torch.float64) + w0.to(torch.float64)
            elif n_basis:
                basis = scratch.basis_view(n_basis, c)
                torch.mm(weights, x, out=basis)
        sink.fill(state, span, lo, Chunk(first + lo, c, w0, basis, value))
    return float(norm_sq)


# -- buffers and threads -------------------------------------------------------------------------------------


def slot_row_bytes(tensors: Sequence[TensorState], block_bytes: int) -> int:
    """Bytes of one input in one slot: 2 MiB, less for long series (a slot stays under 64 MiB), for small
    pools (at least eight slots in ``block_bytes``) and for small models (the largest tensor in at least 16
    spans, so that rounding it up to whole slots costs little memory), but always a whole Gram chunk of the
    widest floating-point input."""
    n_rows = max([len(s.rows) for s in tensors] + [1])
    widest = max([row.itemsize for s in tensors if s.is_float for row in s.rows] + [1])
    largest = max([s.numel * max(row.itemsize for row in s.rows) for s in tensors if not s.known] + [0])
    chunk = GRAM_CHUNK * widest
    wanted = min(ROW_BYTES, 64 * 1024**2 // n_rows, block_bytes // (8 * n_rows), max(1, largest // 16))
    return max(chunk, wanted // chunk * chunk)


class SlotPool:
    """A fixed set of slots, each ``n_rows`` × ``row_bytes`` bytes, allocated once and reused."""

    def __init__(self, n_slots: int, n_rows: int, row_bytes: int, pin: bool):
        self.n_slots = n_slots
        self.row_bytes = row_bytes
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        if pin:  # page-locked host memory, for asynchronous copies to the GPU
            slots = [torch.empty((n_rows, row_bytes), dtype=torch.uint8, pin_memory=True) for _ in range(n_slots)]
        else:
            # Ordinary pages: getting transparent huge pages (madvise) can make the kernel compact memory, or a
            # virtual machine fault in fresh host memory, before the first byte is read (a 1.6 GB run took
            # 0.2-0.4 s longer in each of three tries, one 7 GB run 12 s instead of about 6.5).
            slots = list(torch.empty((n_slots, n_rows, row_bytes), dtype=torch.uint8))
        for slot in slots:
            self._free.put(slot)

    def acquire(self, stop: Callable[[], bool] = lambda: False) -> torch.Tensor | None:
        """A free slot, waiting for one; None once ``stop()`` says the pass failed."""
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if stop():
                    return None

    def release(self, slot: torch.Tensor) -> None:
        self._free.put(slot)


@dataclass
class _Read:
    """One span to read: which tensor, which entries, which rows (indices into its ``rows``), and for which
    stage (``gram``: every input, its Gram products taken on reading; ``mix``: the inputs the model mixes)."""

    tensor: int
    span: int
    first: int
    count: int
    rows: tuple[int, ...]
    phase: str  # "gram" or "mix"


class StreamPass:
    """One pass over ``tensors`` (see the module docstring); :meth:`run` returns the bytes read.

    ``decide(state)`` returns the model of a tensor whose Gram matrix (and singular triples) are known;
    ``factorised(state)`` says whether a tensor needs the singular triples of its 2-D deltas (``factor_p``:
    the checkpoints a backtest of them fits on). Tensors whose ``known`` flag is set skip the Gram stage.
    """

    def __init__(self, tensors: list[TensorState], sink: Sink, device: torch.device, *,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, decide: Callable[[TensorState], TensorModel | None] | None = None,
                 factorised: Callable[[TensorState], bool] = lambda state: False, factor_p: int | None = None,
                 progress: ProgressCallback | None = None, bytes_before: int = 0, total_bytes: int = 0):
        self.tensors, self.sink, self.device = tensors, sink, device
        self.decide, self.factorised, self.factor_p = decide, factorised, factor_p
        self.progress, self.bytes_read, self.total_bytes = progress, bytes_before, total_bytes
        n_rows = max([len(s.rows) for s in tensors] + [1])
        self.row_bytes = slot_row_bytes(tensors, block_bytes)
        self.spans = [self._spans(s) for s in tensors]
        slot_bytes = n_rows * self.row_bytes
        need = max([len(sp) for s, sp in zip(tensors, self.spans) if not s.known] + [0])
        self.workers = 1 if device.type == "cuda" else max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
        self.streaming = READER_THREADS + self.workers + 2  # slots in flight when spans are mixed as they come
        cap = max(self.streaming, block_bytes // slot_bytes)
        # the largest tensor whole (the readers go on with the next one as its mixing frees slots)
        self.n_slots = max(self.streaming, min(cap, need))
        self.resident = self.n_slots  # spans of one tensor that may stay for its mixing
        self.pin = device.type == "cuda"
        largest = max([s.numel * sum(row.itemsize for row in s.rows) for s in tensors] + [0])
        self.chunk_budget = min(MIX_BYTES, largest // MIX_SHARE)
        self._models: dict[int, threading.Event] = {}

    def _spans(self, state: TensorState) -> list[tuple[int, int]]:
        """Entry ranges read together; for a floating-point tensor whole Gram chunks (the Gram matrix is
        summed chunk by chunk from the tensor's start, whatever the spans)."""
        span = self.row_bytes // max(row.itemsize for row in state.rows)
        if state.is_float:
            span = span // GRAM_CHUNK * GRAM_CHUNK
        n = state.numel
        if n == 0:
            return [(0, 0)]
        return [(a, min(n, a + span)) for a in range(0, n, span)]

    def _kept(self, index: int) -> int:
        """How many of a tensor's last spans stay in their slots from the Gram stage to the mixing."""
        n = len(self.spans[index])
        return n if n <= self.resident else max(0, self.n_slots - self.streaming)

    def _schedule(self) -> Iterator[_Read]:
        for k, state in enumerate(self.tensors):
            spans = self.spans[k]
            all_rows = tuple(range(len(state.rows)))
            if not state.known:
                for s, (a, b) in enumerate(spans):
                    yield _Read(k, s, a, b - a, all_rows, "gram")
                kept = self._kept(k)
                if kept == len(spans):
                    continue
                self._models[k].wait()
                if self._failed:
                    return
                if not self.sink.wants_chunks(state):
                    continue
                rows = (0, *state.mixed_rows())
                for s, (a, b) in enumerate(spans[: len(spans) - kept]):
                    yield _Read(k, s, a, b - a, rows, "mix")
            elif self.sink.wants_chunks(state):
                rows = (0, *state.mixed_rows())
                for s, (a, b) in enumerate(spans):
                    yield _Read(k, s, a, b - a, rows, "mix")

    def _read(self, item: _Read, slot: torch.Tensor) -> tuple[int, np.ndarray | None, float]:
        """Read one span into its slot; in the Gram stage also its Gram products while the bytes are hot in the
        cache: (bytes read, products (n_chunks, T, T) or None, Σ w_0²)."""
        state = self.tensors[item.tensor]
        nbytes = sum(state.rows[i].read(item.first, item.count, slot[i]) for i in item.rows)
        if item.phase != "gram" or not state.is_float:
            return nbytes, None, 0.0
        try:
            products, norm_sq = _gram_span(self._on_device(slot, item, state), state, item.count,
                                           self._scratch_for(state))
        finally:
            self._synchronize()
        return nbytes, products, norm_sq

    def _prefetch(self, out: queue.Queue, pool: SlotPool, readers: ThreadPoolExecutor) -> None:
        try:
            for item in self._schedule():
                slot = pool.acquire(lambda: self._failed)
                if slot is None:
                    break
                if self._failed:
                    pool.release(slot)
                    break
                out.put((item, slot, readers.submit(self._read, item, slot)))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            out.put(exc)
            return
        out.put(None)

    def run(self) -> int:
        self._failed = False
        for k, state in enumerate(self.tensors):
            if not state.known and len(self.spans[k]) > self._kept(k):
                self._models[k] = threading.Event()
        pool = SlotPool(self.n_slots, max(len(s.rows) for s in self.tensors) if self.tensors else 1,
                        self.row_bytes, self.pin)
        threads = torch.get_num_threads()
        scratch = threading.local()

        def init_worker() -> None:
            torch.set_num_threads(1)  # one BLAS thread per compute thread: results independent of their number

        items: queue.Queue = queue.Queue()
        readers = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="relex-read", initializer=init_worker)
        compute = ThreadPoolExecutor(self.workers, thread_name_prefix="relex-compute", initializer=init_worker)
        prefetcher = threading.Thread(target=self._prefetch, args=(items, pool, readers), name="relex-prefetch",
                                      daemon=True)
        self._pool, self._items, self._compute, self._scratch = pool, items, compute, scratch
        self._handed: deque[tuple[Future | None, object, TensorState]] = deque()  # spans mixing, tensor ends
        prefetcher.start()
        try:
            for k, state in enumerate(self.tensors):
                self._tensor(k, state)
            self._hand_over(0)
        except BaseException:
            self._failed = True
            for event in self._models.values():
                event.set()
            self._drain(prefetcher)
            raise
        finally:
            compute.shutdown(wait=True)
            readers.shutdown(wait=True)
            torch.set_num_threads(threads)
        prefetcher.join()
        return self.bytes_read

    def _drain(self, prefetcher: threading.Thread) -> None:
        """After a failure: let the prefetcher finish (it stops at its next slot) and free what it read."""
        while prefetcher.is_alive() or not self._items.empty():
            try:
                entry = self._items.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(entry, tuple):
                entry[2].exception()
                self._pool.release(entry[1])

    def _next(self, k: int, phase: str) -> tuple[_Read, torch.Tensor, Future]:
        entry = self._items.get()
        if isinstance(entry, BaseException):
            raise entry
        item, slot, future = entry
        if item is None or item.tensor != k or item.phase != phase:  # pragma: no cover - a scheduling bug
            raise RuntimeError(f"stream out of step: expected tensor {k} {phase}, got {item}")
        return item, slot, future

    def _scratch_for(self, state: TensorState) -> _Scratch:
        local = self._scratch
        n_basis = 0 if state.model is None else state.model.n_basis
        if not hasattr(local, "buffers"):
            local.buffers = _Scratch(len(state.rows), n_basis, self.device, self.chunk_budget)
        local.buffers.ensure(len(state.rows), n_basis)
        return local.buffers

    def _on_device(self, slot: torch.Tensor, item: _Read, state: TensorState) -> torch.Tensor:
        if self.device.type == "cpu":
            return slot
        width = max(state.rows[i].itemsize for i in item.rows) * item.count
        return slot[:, :width].to(self.device, non_blocking=True)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _account(self, state: TensorState, nbytes: int) -> None:
        self.bytes_read += nbytes
        state.bytes_read += nbytes
        if self.progress is not None:
            self.progress(state.name, self.bytes_read, max(self.total_bytes, self.bytes_read))

    # -- one tensor ------------------------------------------------------------------------------------------

    def _tensor(self, k: int, state: TensorState) -> None:
        spans = self.spans[k]
        kept: dict[int, tuple[torch.Tensor, _Read]] = {}
        if not state.known:
            kept = self._gram_stage(k, state)
            if self.factorised(state) and state.is_float:
                state.factors = self._factors(state, kept, spans)
            t = state.n_observed
            gram = state.gram if state.gram is not None else np.zeros((t, t))
            state.data = TensorData(state.name, state.info.shape, state.steps, gram, state.is_float,
                                    math.sqrt(max(state.norm_sq, 0.0)), state.factors)
            state.model = self.decide(state) if (self.decide is not None and state.is_float) else None
            if k in self._models:
                self._models[k].set()
        self.sink.on_model(state)
        if not self.sink.wants_chunks(state):
            for slot, _ in kept.values():
                self._pool.release(slot)
            self._handed.append((None, None, state))
            return
        if state.model is not None and state.model.n_basis and state.rows[1].kind in ("weight", "delta"):
            state.prepared["basis_weights"] = torch.as_tensor(state.model.basis, dtype=torch.float32,
                                                              device=self.device)
        for s, (a, b) in enumerate(spans):
            if s in kept:
                slot, item = kept.pop(s)
                rows = None  # every input of this span is in memory since the Gram stage
            else:
                self._hand_over(self._mixing)
                item, slot, read = self._next(k, "mix")
                self._account(state, read.result()[0])
                rows = state.mixed_rows()
            span = self.sink.open_span(state, a, b - a)
            self._handed.append((self._compute.submit(self._mix_task, slot, item, state, span, rows), span, state))
            self._hand_over(self.workers)
        self._handed.append((None, None, state))  # its end, once every span before it went to the sink

    @property
    def _mixing(self) -> int:
        """Spans handed to the compute threads and not yet to the sink."""
        return sum(future is not None for future, _, _ in self._handed)

    def _hand_over(self, busy: int) -> None:
        """Give the sink the mixed spans (and tensor ends) at the head of the queue, in order: wait for the
        oldest until at most ``busy`` spans are being mixed, then take those already done.

        The next tensor's Gram stage and model go on while a tensor's last spans are mixed (small tensors are
        a single span: waiting for each would leave all but one compute thread idle).
        """
        while self._handed:
            future, span, state = self._handed[0]
            if future is not None and self._mixing <= busy and not future.done():
                return
            self._handed.popleft()
            if future is None:
                self.sink.on_tensor_done(state)
                continue
            state.norm_sq += future.result()
            self.sink.emit(state, span)

    def _mix_task(self, slot: torch.Tensor, item: _Read, state: TensorState, span, rows) -> float:
        try:
            device_slot = self._on_device(slot, item, state)
            return _mix_span(device_slot, state, item.first, item.count, self._scratch_for(state), self.sink, span,
                             rows)
        finally:
            self._synchronize()  # the slot may be refilled only once its copy to the device is done
            self._pool.release(slot)

    def _gram_stage(self, k: int, state: TensorState) -> dict[int, tuple[torch.Tensor, _Read]]:
        spans = self.spans[k]
        keep_from = len(spans) - self._kept(k)
        kept: dict[int, tuple[torch.Tensor, _Read]] = {}
        t = state.n_observed
        gram = np.zeros((t, t))
        norm_sq = 0.0
        for s in range(len(spans)):
            self._hand_over(self._mixing)  # what the previous tensor's mixing has done meanwhile
            item, slot, read = self._next(k, "gram")
            nbytes, products, span_norm = read.result()
            self._account(state, nbytes)
            if s >= keep_from:
                kept[s] = (slot, item)
            else:
                self._pool.release(slot)
            if products is not None:
                for p in products:  # chunk after chunk, from the tensor's first entry: the sum's order is fixed
                    gram += p
                norm_sq += span_norm
        if state.is_float:
            state.gram, state.norm_sq = gram, norm_sq
            if not (np.isfinite(gram).all() and math.isfinite(norm_sq)):
                for slot, _ in kept.values():
                    self._pool.release(slot)
                _raise_non_finite(state)
        return kept

    def _factors(self, state: TensorState, kept: dict, spans) -> MatrixFactors:
        """Top singular triples of each 2-D delta: whole deltas, one checkpoint at a time."""
        rows_, cols = matrix_shape(state.info.shape)
        accumulator = FactorAccumulator(state.n_observed, self.factor_p)
        if len(kept) == len(spans):  # every span is in memory
            x = torch.empty(state.numel, dtype=torch.float32)
            for i in range(1, len(state.rows)):
                for s, (a, b) in enumerate(spans):
                    slot = kept[s][0]
                    part = x[a:b]
                    part.copy_(_row_view(slot, state, i, 0, b - a))
                    if state.rows[i].kind == "weight":
                        part.sub_(_row_view(slot, state, 0, 0, b - a).to(torch.float32))
                accumulator.add(x.reshape(rows_, cols))
            return accumulator.result()
        w0 = state.rows[0].read_whole().to(torch.float32).reshape(-1)
        self._account(state, w0.numel() * state.rows[0].itemsize)
        for row in state.rows[1:]:
            raw = row.read_whole()
            self._account(state, raw.numel() * raw.element_size())
            x = raw.to(torch.float32).reshape(-1)
            del raw
            if row.kind == "weight":
                x.sub_(w0)
            accumulator.add(x.reshape(rows_, cols))
            del x
        return accumulator.result()


def _raise_non_finite(state: TensorState) -> None:
    """NaN or Inf shows up in G; only then are the inputs scanned to name the file (scanning every tensor
    up front would cost a full extra pass)."""
    for row in state.rows:
        tensor = row.read_whole()
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise RelexInputError(f"tensor {row.key!r} contains NaN or Inf", row.source.tensors[row.key].file)
    raise RelexInputError(f"tensor {state.name!r} overflows float32 arithmetic", state.info.file)
