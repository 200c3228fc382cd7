"""The executor of a pass (:class:`StreamPass`, see :mod:`relex.stream`): its reader and compute threads, the
order of its reads, the Gram stage and the mixing of each tensor, the hand-over to the sink."""

from __future__ import annotations

import math
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from relex.errors import RelexInputError
from relex.methods.base import DeltaAccumulator, MatrixFactors, TensorData, TensorModel
from relex.stream.contract import Sink, TensorState
from relex.stream.kernels import Scratch, gram_span, mix_span, row_view
from relex.stream.pool import DEFAULT_BLOCK_BYTES, SlotPool, slot_row_bytes
from relex.subspace import GRAM_CHUNK

# Float32 bytes of w_0 and the T deltas converted, and mixed, at a time (see mix_chunk): at most MIX_BYTES,
# and at most 1/MIX_SHARE of the stored copies of the pass's largest tensor, which bound its memory.
MIX_BYTES = 6 * 1024**2
MIX_SHARE = 64
READER_THREADS = 2

ProgressCallback = Callable[[str, int, int], None]


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
    """One pass over ``tensors`` (see :mod:`relex.stream`); :meth:`run` returns the bytes read.

    ``decide(state)`` returns the model of a tensor whose Gram matrix (and singular triples) are known;
    ``factor_accumulator(state)``, asked for each floating-point tensor, gives what measures the singular
    triples of its 2-D deltas from the whole deltas (:meth:`relex.methods.Method.factor_accumulator`), or None
    when its model needs none. Tensors whose ``known`` flag is set skip the Gram stage.
    """

    def __init__(self, tensors: list[TensorState], sink: Sink, device: torch.device, *,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, decide: Callable[[TensorState], TensorModel | None] | None = None,
                 factor_accumulator: Callable[[TensorState], DeltaAccumulator | None] = lambda state: None,
                 progress: ProgressCallback | None = None, bytes_before: int = 0, total_bytes: int = 0):
        self.tensors, self.sink, self.device = tensors, sink, device
        self.decide, self.factor_accumulator = decide, factor_accumulator
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
            products, norm_sq = gram_span(self._on_device(slot, item, state), state, item.count,
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

    def _scratch_for(self, state: TensorState) -> Scratch:
        local = self._scratch
        n_basis = 0 if state.model is None else state.model.n_basis
        if not hasattr(local, "buffers"):
            local.buffers = Scratch(len(state.rows), n_basis, self.device, self.chunk_budget)
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
            accumulator = self.factor_accumulator(state) if state.is_float else None
            if accumulator is not None:
                state.factors = self._factors(state, kept, spans, accumulator)
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
            return mix_span(device_slot, state, item.first, item.count, self._scratch_for(state), self.sink, span,
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

    def _factors(self, state: TensorState, kept: dict, spans, accumulator: DeltaAccumulator) -> MatrixFactors:
        """Top singular triples of each 2-D delta: ``accumulator`` fed whole deltas, one checkpoint at a time."""
        if len(kept) == len(spans):  # every span is in memory
            x = torch.empty(state.numel, dtype=torch.float32)
            for i in range(1, len(state.rows)):
                for s, (a, b) in enumerate(spans):
                    slot = kept[s][0]
                    part = x[a:b]
                    part.copy_(row_view(slot, state, i, 0, b - a))
                    if state.rows[i].kind == "weight":
                        part.sub_(row_view(slot, state, 0, 0, b - a).to(torch.float32))
                accumulator.add(x)
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
            accumulator.add(x)
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
