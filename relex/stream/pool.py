"""The buffers of a pass: a fixed pool of slots, allocated once and reused, each holding one span of a tensor's
base and checkpoints in their stored dtype."""

from __future__ import annotations

import queue
from typing import Callable, Sequence

import torch

from relex.stream.contract import TensorState
from relex.subspace import GRAM_CHUNK

DEFAULT_BLOCK_BYTES = 2 * 1024**3  # the pool of stored-dtype copies one pass holds at most
ROW_BYTES = 2 * 1024**2  # bytes of one checkpoint in one slot (fewer when T is large, see slot_row_bytes)


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
