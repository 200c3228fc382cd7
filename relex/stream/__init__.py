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

The package: :mod:`relex.stream.contract` (what a pass tells its sinks), :mod:`relex.stream.kernels` (the
arithmetic on a span), :mod:`relex.stream.pool` (the slots), :mod:`relex.stream.executor` (the threads and the
order of the work).
"""

from __future__ import annotations

from relex.stream.contract import Chunk, Sink, TensorState
from relex.stream.executor import ProgressCallback, StreamPass
from relex.stream.kernels import combine, mix_chunk
from relex.stream.pool import DEFAULT_BLOCK_BYTES

__all__ = ["DEFAULT_BLOCK_BYTES", "Chunk", "ProgressCallback", "Sink", "StreamPass", "TensorState", "combine",
           "mix_chunk"]
