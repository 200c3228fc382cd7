"""Synthetic checkpoint series with known ground truth, for tests, benchmarks and examples.

Each tensor follows W_t = W_0 + Σ_j c_j(t)·V_j + noise(t), with unit-norm directions V_j drawn once per
tensor. ``noise="iid"`` adds independent Gaussian noise at every checkpoint; ``noise="walk"`` adds a
random walk (noise accumulated over steps, as an optimizer's noise does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

DEFAULT_SHAPES = {
    "model.embed_tokens.weight": (96, 32),
    "model.layers.0.self_attn.q_proj.weight": (32, 32),
    "model.layers.0.mlp.up_proj.weight": (64, 32),
    "model.layers.0.input_layernorm.weight": (32,),
    "model.norm.weight": (32,),
    "lm_head.weight": (96, 32),
}


def linear(t):
    return np.asarray(t, dtype=np.float64)


@dataclass
class SyntheticRun:
    """A written synthetic run and the means to compute its noise-free truth at any step."""

    root: Path
    steps: list[int]
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    base: dict[str, torch.Tensor] = field(repr=False)
    directions: dict[str, list[torch.Tensor]] = field(repr=False)
    coefficients: list[Callable] = field(repr=False)
    scale: float = 1.0

    def truth(self, step: float) -> dict[str, torch.Tensor]:
        """Noise-free float32 weights at ``step``."""
        out = {}
        for name, w0 in self.base.items():
            w = w0.clone()
            for c, v in zip(self.coefficients, self.directions[name]):
                w += float(c(step)) * self.scale * v
            out[name] = w
        return out


def make_run(
    root: str | Path,
    steps: Sequence[int] = (5, 10, 15, 20, 30, 40),
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
    coefficients: Sequence[Callable] = (linear,),
    noise: float = 0.0,
    noise_kind: str = "iid",
    dtype: torch.dtype = torch.float32,
    scale: float = 1e-3,
    layout: str = "checkpoint-{step}",
    seed: int = 0,
    config: dict | None = None,
    shard_size: int | None = None,
) -> SyntheticRun:
    """Write a base (``layout`` at step 0) and checkpoints at ``steps`` under ``root``.

    ``scale`` multiplies every coefficient (weights are ~N(0, 0.02²), like a language model's);
    ``noise`` is the per-entry standard deviation of the noise, relative to ``scale``.
    """
    shapes = dict(shapes or DEFAULT_SHAPES)
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
    directions = {}
    for name, shape in shapes.items():
        vs = []
        for _ in coefficients:
            v = torch.randn(shape, generator=generator)
            vs.append(v / v.norm() * np.sqrt(v.numel()))  # entries of order 1
        directions[name] = vs
    run = SyntheticRun(root, sorted(steps), shapes, dtype, base, directions, list(coefficients), scale)
    walk = {n: torch.zeros(s) for n, s in shapes.items()}
    previous = 0
    for step in [0, *run.steps]:
        truth = run.truth(step)
        tensors = {}
        for name, w in truth.items():
            if step > 0 and noise > 0:
                if noise_kind == "walk":
                    walk[name] += torch.randn(w.shape, generator=generator) * noise * scale * np.sqrt(step - previous)
                    w = w + walk[name]
                else:
                    w = w + torch.randn(w.shape, generator=generator) * noise * scale
            tensors[name] = w.to(dtype).contiguous()
        previous = step
        write_checkpoint(root / layout.format(step=step), tensors, step=step, config=config, shard_size=shard_size)
    return run


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], step: int | None = None,
                     config: dict | None = None, shard_size: int | None = None) -> None:
    """Write a Hugging Face style checkpoint folder (one file, or shards + index when ``shard_size``)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if shard_size is None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        groups, size = [[]], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if groups[-1] and size + nbytes > shard_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nbytes
        weight_map = {}
        for i, names in enumerate(groups):
            filename = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({n: tensors[n] for n in names}, folder / filename, metadata={"format": "pt"})
            weight_map.update({n: filename for n in names})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "synthetic"}))
    if step is not None:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def trajectory_gram(steps, coefficients=(), walk: float = 0.0, seed: int = 0, dim: int = 4000) -> np.ndarray:
    """Gram matrix G = X Xᵀ of X = Σ_j c_j(t) v_j + a random walk, without writing checkpoints.

    The v_j are random unit vectors in ``dim`` dimensions; the walk has squared norm ``walk² · t`` at step t.
    """
    import math

    rng = np.random.default_rng(seed)
    t = np.asarray(steps, dtype=np.float64)
    x = np.zeros((len(t), dim))
    for c in coefficients:
        v = rng.standard_normal(dim)
        x += np.outer(c(t), v / np.linalg.norm(v))
    if walk:
        dt = np.diff(np.concatenate([[0.0], t]))
        x += np.cumsum(rng.standard_normal((len(t), dim)) * np.sqrt(dt)[:, None], axis=0) * walk / math.sqrt(dim)
    return x @ x.T
