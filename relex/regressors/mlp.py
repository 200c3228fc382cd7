"""A learned predictor in the manner of NExt (arXiv 2604.11446), on coefficient series.

NExt trains a small MLP on the rank-1 factors of the global (W_t − W_0) and local (W_t − W_{t−k})
differences to predict the next difference, and applies it repeatedly ("predict-extend"). Here the same
idea acts on the coefficient series a trajectory model extracts (the RELEX temporal coefficients, or the
per-matrix rank-1 coefficient), which keeps the network tiny and lets it be shared:

* each series is resampled on a uniform grid 0, h, …, t_T (h = t_T / T, the origin c(0) = 0 included)
  and scaled by its largest |value|;
* the inputs at grid point k are the global value c_k and the local increment (c_k − c_{k−1})·K, the
  target the next increment (c_{k+1} − c_k)·K (K grid intervals, so a straight line gives inputs of order
  one);
* one network (2 → 32 → 32 → 1, tanh) is trained, full batch with Adam, on the pairs of every series of a
  group of tensors (:func:`train_shared`; the engine groups tensors by kind, e.g. all ``q_proj``), or of
  one series alone (:func:`fit_mlp`);
* a prediction beyond t_T extends the series by one grid step at a time from its last two values and
  interpolates at the target.

Training is seeded and runs in float64 on one thread, so it is reproducible; inference is plain numpy,
so a stored fit (``to_dict``) predicts exactly what the fitted one did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from relex.errors import RelexInputError
from relex.regressors.base import as_array, loader, r_squared, register

HIDDEN = 32
ITERATIONS = 400
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4
SEED = 0
LAG_FRACTION = 4
MAX_EXTEND = 200_000  # grid steps of predict-extend


def _grid(steps: np.ndarray, values: np.ndarray) -> tuple[float, np.ndarray]:
    """(h, values on the grid 0..t_T, shape (K + 1, k)) with the origin c(0) = 0 prepended."""
    t = np.concatenate([[0.0], np.asarray(steps, dtype=np.float64)])
    v = np.concatenate([np.zeros((1, values.shape[1])), values], axis=0)
    intervals = len(steps)
    h = t[-1] / intervals
    grid = h * np.arange(intervals + 1)
    grid[-1] = t[-1]
    on_grid = np.stack([np.interp(grid, t, column) for column in v.T], axis=1)
    return h, on_grid


def _scales(on_grid: np.ndarray) -> np.ndarray:
    scale = np.abs(on_grid).max(axis=0)
    return np.where(scale > 0, scale, 1.0)


def _lag(intervals: int) -> int:
    return max(1, intervals // LAG_FRACTION)


def _features(z: np.ndarray, k: np.ndarray, intervals: int) -> np.ndarray:
    """Inputs at grid indices k: the value and the mean increment over the last lag (per K)."""
    lag = _lag(intervals)
    return np.stack([z[k], (z[k] - z[k - lag]) * intervals / lag], axis=-1)


def _pairs(on_grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training inputs (N, 2) and targets (N,) of one resampled series set (columns = series)."""
    intervals = len(on_grid) - 1
    z = on_grid / _scales(on_grid)
    lag = _lag(intervals)
    if intervals < lag + 1:
        return np.zeros((0, 2)), np.zeros(0)
    k = np.arange(lag, intervals)
    inputs = _features(z, k, intervals)
    targets = (z[k + 1] - z[k]) * intervals - inputs[..., 1]
    return inputs.reshape(-1, 2), targets.reshape(-1)


def _forward(params: dict, x: np.ndarray) -> np.ndarray:
    h = np.tanh(x @ params["w1"] + params["b1"])
    h = np.tanh(h @ params["w2"] + params["b2"])
    return (h @ params["w3"] + params["b3"])[..., 0]


def _train(inputs: np.ndarray, targets: np.ndarray) -> dict:
    import torch  # only when a learned predictor is trained: relex.regressors itself needs numpy alone (start-up)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order: the same weights in every process
    try:
        generator = torch.Generator().manual_seed(SEED)
        sizes = [(2, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)]
        weights = []
        for fan_in, fan_out in sizes:
            w = torch.randn(fan_in, fan_out, generator=generator, dtype=torch.float64) / np.sqrt(fan_in)
            if fan_out == 1:
                w = w * 0.0  # start from "keep the recent increment": a straight continuation
            weights += [w.requires_grad_(), torch.zeros(fan_out, dtype=torch.float64, requires_grad=True)]
        x = torch.as_tensor(inputs, dtype=torch.float64)
        y = torch.as_tensor(targets, dtype=torch.float64)
        optimizer = torch.optim.Adam(weights, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        for _ in range(ITERATIONS):
            optimizer.zero_grad()
            h = torch.tanh(x @ weights[0] + weights[1])
            h = torch.tanh(h @ weights[2] + weights[3])
            loss = ((h @ weights[4] + weights[5])[:, 0] - y).square().mean()
            loss.backward()
            optimizer.step()
        names = ["w1", "b1", "w2", "b2", "w3", "b3"]
        return {n: w.detach().numpy().copy() for n, w in zip(names, weights)}
    finally:
        torch.set_num_threads(threads)


@loader("mlp")
@dataclass
class MLPFit:
    params: dict  # network weights (numpy)
    h: float  # grid step
    on_grid: np.ndarray  # (K + 1, k) observed series on the grid
    r2: np.ndarray

    @property
    def t_last(self) -> float:
        return self.h * (len(self.on_grid) - 1)

    def _extend(self, until: float) -> tuple[np.ndarray, np.ndarray]:
        """Grid times and values from 0 up to ``until`` (observed, then predicted by the network)."""
        intervals = len(self.on_grid) - 1
        n_more = int(np.ceil((until - self.t_last) / self.h - 1e-12)) if until > self.t_last else 0
        if n_more > MAX_EXTEND:
            raise RelexInputError(f"mlp: target {until:g} is {n_more} grid steps beyond the window (max {MAX_EXTEND})")
        scale = _scales(self.on_grid)
        z = np.concatenate([self.on_grid / scale, np.zeros((n_more, self.on_grid.shape[1]))])
        for k in range(intervals, intervals + n_more):
            features = _features(z, np.array(k), intervals)
            z[k + 1] = z[k] + (features[..., 1] + _forward(self.params, features)) / intervals
        times = self.h * np.arange(len(z))
        times[intervals] = self.t_last
        return times, z * scale

    def predict(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        times, values = self._extend(float(t.max()) if len(t) else 0.0)
        return np.stack([np.interp(t, times, column) for column in values.T], axis=1)

    def to_dict(self) -> dict:
        return {"kind": "mlp", "params": {k: as_array(v) for k, v in self.params.items()},
                "h": float(self.h), "on_grid": as_array(self.on_grid), "r2": as_array(self.r2)}

    @classmethod
    def from_dict(cls, d: dict) -> "MLPFit":
        return cls({k: np.array(v) for k, v in d["params"].items()}, float(d["h"]), np.array(d["on_grid"]),
                   np.array(d["r2"]))


@dataclass
class SharedMLP:
    """One network trained on the series of a group of tensors; ``fit`` applies it to one of them."""

    params: dict
    series: int  # how many series it was trained on

    def fit(self, steps: np.ndarray, values: np.ndarray) -> MLPFit:
        values = np.asarray(values, dtype=np.float64).reshape(len(steps), -1)
        h, on_grid = _grid(np.asarray(steps, dtype=np.float64), values)
        fit = MLPFit(self.params, h, on_grid, np.zeros(values.shape[1]))
        # in-sample quality: one-step-ahead predictions on the grid
        intervals = len(on_grid) - 1
        scale = _scales(on_grid)
        z = on_grid / scale
        fitted = on_grid.copy()
        lag = _lag(intervals)
        if intervals > lag:
            k = np.arange(lag, intervals)
            features = _features(z, k, intervals)
            fitted[k + 1] = (z[k] + (features[..., 1] + _forward(self.params, features)) / intervals) * scale
        fit.r2 = r_squared(on_grid, fitted)
        return fit


def train_shared(series: list[tuple[np.ndarray, np.ndarray]]) -> SharedMLP:
    """Train one network on every (steps, values (T, k)) series given."""
    inputs, targets = [], []
    for steps, values in series:
        values = np.asarray(values, dtype=np.float64).reshape(len(steps), -1)
        _, on_grid = _grid(np.asarray(steps, dtype=np.float64), values)
        x, y = _pairs(on_grid)
        inputs.append(x)
        targets.append(y)
    x, y = np.concatenate(inputs), np.concatenate(targets)
    if len(y) == 0:
        raise RelexInputError("mlp: needs at least 2 observed checkpoints per series to learn from")
    return SharedMLP(_train(x, y), len(series))


@register("mlp", "small MLP on (value, local increment) -> next increment, applied step by step "
          "(NExt-style); shared across tensors of one kind", min_points=2, shared=True)
def fit_mlp(steps: np.ndarray, values: np.ndarray) -> MLPFit:
    return train_shared([(steps, values)]).fit(steps, values)
