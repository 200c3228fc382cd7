"""The arithmetic of a pass on the spans in its slots: the Gram products, the mixing into basis vectors, the
combination a sink writes, through each thread's reused float32 buffers (:class:`Scratch`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from relex.stream.contract import Chunk, Sink, TensorState
from relex.subspace import GRAM_CHUNK


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


class Scratch:
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


def row_view(slot: torch.Tensor, state: TensorState, i: int, lo: int, hi: int) -> torch.Tensor:
    row = state.rows[i]
    size = row.itemsize
    return slot[i, lo * size: hi * size].view(row.dtype)


def _deltas(slot: torch.Tensor, state: TensorState, lo: int, hi: int, scratch: Scratch,
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
    w0.copy_(row_view(slot, state, 0, lo, hi))
    if len(wanted) < t:
        x.zero_()
    if len(wanted) == t and state.uniform:
        size = state.rows[1].itemsize
        x.copy_(slot[1: t + 1, lo * size: hi * size].view(state.rows[1].dtype))
        x.sub_(w0)
        return w0, x
    for i in wanted:
        x[i - 1].copy_(row_view(slot, state, i, lo, hi))
        if state.rows[i].kind == "weight":
            x[i - 1].sub_(w0)
    return w0, x


def gram_span(slot: torch.Tensor, state: TensorState, count: int, scratch: Scratch) -> tuple[np.ndarray, float]:
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


def mix_span(slot: torch.Tensor, state: TensorState, first: int, count: int, scratch: Scratch, sink: Sink,
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
            w0.copy_(row_view(slot, state, 0, lo, hi))
            norm_sq += torch.dot(w0, w0)
            if len(state.rows) > 1 and state.rows[1].kind == "value":
                value = row_view(slot, state, 1, lo, hi)
            elif n_basis:
                basis = scratch.basis_view(n_basis, c)
                for r in range(n_basis):
                    basis[r].copy_(row_view(slot, state, 1 + r, lo, hi))
        else:
            w0, x = _deltas(slot, state, lo, hi, scratch, rows)
            if not state.is_float or model is None:  # an integer buffer keeps its newest value
                value = x[-1].to(torch.float64) + w0.to(torch.float64)
            elif n_basis:
                basis = scratch.basis_view(n_basis, c)
                torch.mm(weights, x, out=basis)
        sink.fill(state, span, lo, Chunk(first + lo, c, w0, basis, value))
    return float(norm_sq)
