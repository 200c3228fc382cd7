"""The two decode-time extrapolation rules and the sampler they share.

Both rules see, at every decoding step, the raw next-token logits of two checkpoints fed the same prefix
(``[batch, vocab]``, float32) and return the next token of each row:

* :class:`LogitsExtrapolation` (arXiv 2601.04537): ``z = z_a + alpha (z_b - z_a)``, then temperature, top-p
  and sampling (or argmax). ``alpha = 1`` is checkpoint b, ``alpha = 0`` checkpoint a, exactly: the
  combination is ``torch.lerp``, which returns its end points bit for bit.
* :class:`SelectiveExtrapolation` (arXiv 2603.22117): the RL model (b) proposes its token ``y`` as it would
  alone; where ``dlogp = log p_RL(y) - log p_base(y) < tau`` (log-probabilities at temperature 1) the token
  is replaced by a draw (the argmax when greedy) from ``log p_RL + gamma (log p_RL - log p_base)``;
  elsewhere ``y`` is kept. ``gamma = 0`` makes the second distribution the RL model's own, so no second
  draw is made and the RL model's tokens come out unchanged, greedy or sampled.

:class:`SingleModel` decodes checkpoint b alone with the same sampler (the reference for tokens and cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def choose(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens ``[batch]`` from logits ``[batch, vocab]``: argmax at temperature 0, else a draw.

    Sampling divides by ``temperature``, keeps the smallest set of tokens whose probability reaches ``top_p``
    (as transformers' top-p warper: the most likely token always stays), and draws with
    ``torch.multinomial`` from ``generator`` — one draw per row, so a seeded generator makes it reproducible.
    """
    if not temperature or temperature <= 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / float(temperature)
    if top_p < 1.0:
        ordered, order = torch.sort(scaled, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1.0 - float(top_p))
        drop[..., -1:] = False
        scaled = scaled.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def alpha_for(step_a: int, step_b: int, target: int) -> float:
    """The logits-extrapolation coefficient that carries checkpoints at ``step_a`` and ``step_b`` to ``target``."""
    if step_a == step_b:
        raise ValueError("the two checkpoints must be at different steps")
    return (target - step_a) / (step_b - step_a)


@dataclass(frozen=True)
class SingleModel:
    """Decode checkpoint b alone (no second model): the reference the two rules are measured against."""

    name = "single"
    models = 1

    def step(self, z_a, z_b, temperature, top_p, generator):
        return choose(z_b, temperature, top_p, generator), None

    def describe(self) -> str:
        return "one model"


@dataclass(frozen=True)
class LogitsExtrapolation:
    """``z = z_a + alpha (z_b - z_a)`` on the raw logits of checkpoints a (earlier) and b (later)."""

    alpha: float
    name = "logits"
    models = 2

    def __post_init__(self):
        if not math.isfinite(float(self.alpha)):
            raise ValueError(f"alpha must be a finite number, got {self.alpha}")

    def combine(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """The extrapolated logits (exactly ``z_a`` at alpha 0 and ``z_b`` at alpha 1)."""
        return torch.lerp(z_a.float(), z_b.float(), float(self.alpha))

    def step(self, z_a, z_b, temperature, top_p, generator):
        return choose(self.combine(z_a, z_b), temperature, top_p, generator), None

    def describe(self) -> str:
        return f"logits extrapolation, alpha={self.alpha:g}"


@dataclass(frozen=True)
class SelectiveExtrapolation:
    """Keep the RL model's token unless ``log p_RL(y) - log p_base(y) < tau``; then resample from
    ``log p_RL + gamma (log p_RL - log p_base)``. Model a is the base, model b the RL model."""

    tau: float = -0.3
    gamma: float = 0.1
    name = "selective"
    models = 2

    def __post_init__(self):
        if not (math.isfinite(float(self.tau)) or self.tau == float("-inf")):
            raise ValueError(f"tau must be a number, got {self.tau}")
        if not math.isfinite(float(self.gamma)):
            raise ValueError(f"gamma must be a finite number, got {self.gamma}")

    def extrapolated(self, logp_base: torch.Tensor, logp_rl: torch.Tensor) -> torch.Tensor:
        return logp_rl + float(self.gamma) * (logp_rl - logp_base)

    def step(self, z_base, z_rl, temperature, top_p, generator):
        """``(tokens, rows whose proposal fell below tau and was resampled)``."""
        proposed = choose(z_rl, temperature, top_p, generator)
        if self.gamma == 0.0:
            return proposed, None
        logp_base = torch.log_softmax(z_base.float(), dim=-1)
        logp_rl = torch.log_softmax(z_rl.float(), dim=-1)
        index = proposed.unsqueeze(-1)
        delta = (logp_rl.gather(-1, index) - logp_base.gather(-1, index)).squeeze(-1)
        low = delta < float(self.tau)
        # one draw for every row and step (not only where a token is replaced), so the generator advances
        # the same way whichever rows fall below tau
        resampled = choose(self.extrapolated(logp_base, logp_rl), temperature, top_p, generator)
        return torch.where(low, resampled, proposed), low

    def describe(self) -> str:
        return f"selective extrapolation, tau={self.tau:g}, gamma={self.gamma:g}"
