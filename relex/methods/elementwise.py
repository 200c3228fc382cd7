"""Element-wise linear extrapolation between two checkpoints (arXiv 2601.04537).

w(t*) = w_a + α (w_b − w_a) with α = (t* − a)/(b − a), for the last two observed steps a < b by default.
With ``copy_norms`` 1-D tensors (norm weights, biases) are copied from w_b instead, as that paper does.
"""

from __future__ import annotations

import numpy as np

from relex.errors import RelexInputError
from relex.methods import TensorPlan, register


@register("elementwise")
class ElementwiseLinear:
    def __init__(self, scale: float = 1.0, copy_norms: bool = False, first: int | None = None, **_ignored):
        self.scale = float(scale)
        self.copy_norms = copy_norms
        self.first = first  # observed step used as w_a (default: the one before the last)

    def plan(self, gram, steps, targets, *, tensor="", ndim=2) -> TensorPlan:
        steps = np.asarray(steps, dtype=np.float64)
        n = len(steps)
        b = n - 1
        a = n - 2 if self.first is None else int(np.searchsorted(steps, self.first))
        if not 0 <= a < b or (self.first is not None and steps[a] != self.first):
            raise RelexInputError(f"elementwise: step {self.first} is not an observed step before the last")
        weights = np.zeros((len(targets), n))
        for k, target in enumerate(np.asarray(targets, dtype=np.float64)):
            if self.copy_norms and ndim == 1:
                weights[k, b] = 1.0
                continue
            alpha = (target - steps[a]) / (steps[b] - steps[a])
            # w_a + α (w_b − w_a), then the scale acts on the update from the base
            weights[k, a] = self.scale * (1.0 - alpha)
            weights[k, b] = self.scale * alpha
        return TensorPlan(weights, {"rank": 0, "explained": float("nan"), "explained_rank1": float("nan"),
                                    "r2": float("nan"), "from_step": float(steps[a])})
