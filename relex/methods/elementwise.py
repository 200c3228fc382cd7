"""Element-wise linear extrapolation between two checkpoints (arXiv 2601.04537).

w(t*) = w_a + α (w_b − w_a) with α = (t* − a)/(b − a), for the last two observed steps a < b by default
(``--from-step`` picks a). With ``copy_norms`` 1-D tensors (norm weights, biases) are copied from w_b
instead, as that paper does. The scale multiplies the update from the base: w_0 + s·(x_a + α (x_b − x_a)).
"""

from __future__ import annotations

import numpy as np

from relex.errors import RelexInputError
from relex.methods.base import TemporalMethod, TensorModel, register, unit_rows


@register("elementwise")
class ElementwiseLinear(TemporalMethod):
    def __init__(self, scale: float = 1.0, copy_norms: bool = False, first: int | None = None, **_ignored):
        self.scale = float(scale)
        self.copy_norms = copy_norms
        self.first = first  # observed step used as w_a (default: the one before the last)

    def fit_tensor(self, data, *, regressor=None, scale=None, shared=None) -> TensorModel:
        steps = np.asarray(data.steps, dtype=np.float64)
        n = len(steps)
        b = n - 1
        a = n - 2 if self.first is None else int(np.searchsorted(steps, self.first))
        if not 0 <= a < b or (self.first is not None and steps[a] != self.first):
            raise RelexInputError(f"elementwise: step {self.first} is not an observed step before the last")
        stats = {"rank": 0, "explained": float("nan"), "explained_rank1": float("nan"), "r2": float("nan"),
                 "from_step": float(steps[a])}
        s = self.scale if scale is None else float(scale)
        if self.copy_norms and data.ndim == 1:
            return TensorModel({"method": "elementwise", "copy": True}, unit_rows([b], n), [],
                               {**stats, "copied": True})
        params = {"method": "elementwise", "scale": s, "a": float(steps[a]), "b": float(steps[b])}
        return TensorModel(params, unit_rows([a, b], n), [], stats)

    @staticmethod
    def coefficients(params, targets) -> np.ndarray:
        targets = np.asarray(targets, dtype=np.float64).reshape(-1)
        if params.get("copy"):
            return np.ones((len(targets), 1))
        s, a, b = params["scale"], params["a"], params["b"]
        alpha = (targets - a) / (b - a)
        # w_a + α (w_b − w_a), then the scale acts on the update from the base
        return np.stack([s * (1.0 - alpha), s * alpha], axis=1)
