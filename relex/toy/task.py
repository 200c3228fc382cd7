"""A verifiable toy task: two-digit addition with a three-digit answer.

A prompt is ``"ab+cd="`` with two operands in 0..99 written with two digits each; the answer is their sum
written with exactly three digits (``"57+68="`` -> ``"125"``, ``"03+04="`` -> ``"007"``). A completion is
correct only if, cut at the first end-of-sequence marker and stripped of surrounding whitespace, it equals
the answer exactly.

The held-out split is fixed (it does not depend on any training seed): 300 prompts drawn with a fixed seed,
and the training split is every other prompt except the swapped versions of held-out prompts, so a model
cannot pass the held-out split by having seen ``cd+ab=``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

HELDOUT_SIZE = 300
HELDOUT_SEED = 20240611
ANSWER_DIGITS = 3
EOS_TEXT = "<eos>"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a:02d}+{self.b:02d}="

    @property
    def answer(self) -> str:
        return f"{self.a + self.b:03d}"

    @property
    def distractor(self) -> str:
        """The answer of a solver that forgets every carry (digit-wise sums modulo 10)."""
        tens = (self.a // 10 + self.b // 10) % 10
        units = (self.a % 10 + self.b % 10) % 10
        return f"0{tens}{units}"

    @property
    def has_carry(self) -> bool:
        return self.distractor != self.answer

    def record(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer}


def score(completion: str, answer: str) -> bool:
    """The verifier: ``completion`` (cut at the first ``<eos>``, stripped) equals ``answer`` exactly."""
    if completion is None:
        return False
    text = completion.split(EOS_TEXT, 1)[0].strip()
    return text == str(answer).strip()


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[Problem, ...], tuple[Problem, ...]]:
    everything = [Problem(a, b) for a in range(100) for b in range(100)]
    rng = random.Random(HELDOUT_SEED)
    heldout = rng.sample(everything, HELDOUT_SIZE)
    excluded = {(p.a, p.b) for p in heldout} | {(p.b, p.a) for p in heldout}
    train = tuple(p for p in everything if (p.a, p.b) not in excluded)
    return train, tuple(heldout)


def train_problems() -> tuple[Problem, ...]:
    """The training split (9,4xx problems; no held-out problem and no swap of one)."""
    return _splits()[0]


def heldout_problems() -> tuple[Problem, ...]:
    """The held-out split, 300 problems in a fixed order."""
    return _splits()[1]


def heldout_split() -> list[dict]:
    """The held-out split as records ``{"prompt": str, "answer": str}`` (fixed; 300 records)."""
    return [p.record() for p in heldout_problems()]


def train_split() -> list[dict]:
    """The training split as records ``{"prompt": str, "answer": str}``."""
    return [p.record() for p in train_problems()]
