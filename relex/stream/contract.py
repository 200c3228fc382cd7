"""The contract between a pass and its sinks: what the pass knows about each tensor (:class:`TensorState`),
what it hands a sink for each chunk it mixes (:class:`Chunk`), and the calls a sink gets (:class:`Sink`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from relex.io.run_readers import Row
from relex.io.source import TensorInfo
from relex.methods.base import MatrixFactors, TensorData, TensorModel


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

    A sink whose layout depends on every tensor's model (``needs_models``) is given them all, before the pass
    that writes, through ``bind(models)``: the run then reads twice (a Gram pass decides every model first).
    """

    needs_models = False

    def describe(self) -> str:
        """What the sink makes, for a printed plan."""
        return type(self).__name__

    def bind(self, models: dict) -> None:
        """Every tensor's model (``needs_models`` sinks), before any of them is written."""

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
