"""Probe sets: a few problems from the training distribution, with their answers and a verifier.

A probe never comes from the benchmark being reported: it is the training split of the toy task
(``toy-train``), or a JSON Lines file of training problems in the layout of the math benchmarks (one object
per line with ``problem`` — or ``prompt``, the exact user turn, or ``text``, the exact model input with no chat
template applied — and ``answer``, or a ``solution`` whose last ``\\boxed{}`` is the answer). A line may name its verifier: ``"verifier": "math"`` (the default: the last
``\\boxed{}`` of the completion, or "the answer is …", compared with math-verify, as ``relex eval`` scores) or
``"last-number"`` (the last number in the completion equals the answer, as many arithmetic RL rewards are).

Each problem also carries a verified completion (the solution, or the answer in the verifier's format) whose
teacher-forced log-probability is the generation-free screen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from relex.errors import RelexInputError

VERIFIERS = ("math", "last-number", "toy")
TOY_PROBE = "toy-train"
# The suffix relex eval's math prompts end with (relex.evaluate.tasks.CHAT_PROMPT).
MATH_INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class ProbeProblem:
    """One probe problem: what the model is asked, the answer, how it is verified, a verified completion."""

    prompt: str  # the toy's "ab+cd=", the user turn of a chat, or (raw) the exact model input
    answer: str
    verifier: str
    completion: str  # a completion the verifier accepts (scored teacher-forced by the screen)
    raw: bool = False  # the prompt is the model's input as is (no chat template)


@dataclass(frozen=True)
class ProbeSet:
    """The problems of a probe, in the order they are scored (sequential stopping takes a prefix)."""

    name: str
    kind: str  # "toy" (the toy's own tokenizer and decoding) or "chat" (a causal LM with its tokenizer)
    problems: tuple[ProbeProblem, ...]
    max_new_tokens: int

    def __len__(self) -> int:
        return len(self.problems)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "problems": len(self.problems),
                "max_new_tokens": self.max_new_tokens}


def load_probe(spec: str | Path, limit: int | None = 64, seed: int = 0, max_new_tokens: int = 256) -> ProbeSet:
    """The probe set ``spec`` names (``toy-train``, or a JSON Lines file), its first ``limit`` problems after a
    seeded shuffle. Raises :class:`RelexInputError` naming the file and line of a record it cannot use."""
    if limit is not None and limit < 1:
        raise RelexInputError(f"--probe-limit must be at least 1, got {limit}")
    text = str(spec)
    if text == TOY_PROBE:
        from relex.toy.task import ANSWER_DIGITS, EOS_TEXT, train_problems  # start-up: only for the toy

        problems = [ProbeProblem(p.prompt, p.answer, "toy", p.answer + EOS_TEXT) for p in train_problems()]
        return ProbeSet(TOY_PROBE, "toy", _sample(problems, limit, seed), ANSWER_DIGITS + 1)
    from relex.evaluate.tasks import TASKS  # start-up: the task list, to refuse a benchmark by name

    if text.lower().removeprefix("relex_") in TASKS:
        raise RelexInputError(f"--probe {text} names a benchmark; a probe must come from the training distribution: "
                              f"give {TOY_PROBE} or a JSON Lines file of training problems with answers")
    path = Path(text)
    if path.is_dir():
        raise RelexInputError(f"a folder, not a probe file (give {TOY_PROBE} or a JSON Lines file)", path)
    if not path.is_file():
        raise RelexInputError(f"no such probe file (give {TOY_PROBE} or a JSON Lines file)", path)
    if path.stem.lower().removeprefix("relex_") in TASKS:
        raise RelexInputError(f"the probe file is named like the benchmark {path.stem}; a probe must come from the "
                              "training distribution (if it does, rename the file)", path)
    problems = [_problem(record, path, number) for number, record in _records(path)]
    if not problems:
        raise RelexInputError("no problems in the probe file", path)
    return ProbeSet(path.name, "chat", _sample(problems, limit, seed), max_new_tokens)


def _sample(problems: list[ProbeProblem], limit: int | None, seed: int) -> tuple[ProbeProblem, ...]:
    order = list(problems)
    random.Random(seed).shuffle(order)
    return tuple(order if limit is None else order[:limit])


def _records(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RelexInputError(f"cannot read the probe file: {exc}", path) from None
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RelexInputError(f"line {number}: not JSON ({exc.msg})", path) from None
            if not isinstance(record, dict):
                raise RelexInputError(f"line {number}: not a JSON object", path)
            yield number, record


def _problem(record: dict, path: Path, number: int) -> ProbeProblem:
    from relex.evaluate.answers import reference_answer  # start-up: math answers load sympy

    verifier = record.get("verifier", "math")
    if verifier not in ("math", "last-number"):
        raise RelexInputError(f"line {number}: unknown verifier {verifier!r} (use math or last-number)", path)
    raw = bool(record.get("text"))
    if raw:
        prompt = str(record["text"])
    elif record.get("prompt"):
        prompt = str(record["prompt"])
    elif record.get("problem") or record.get("question"):
        prompt = str(record.get("problem") or record.get("question")) + (MATH_INSTRUCTION if verifier == "math" else "")
    else:
        raise RelexInputError(f"line {number}: no 'problem', 'question', 'prompt' or 'text'", path)
    try:
        answer = reference_answer(record)
    except ValueError as exc:
        raise RelexInputError(f"line {number}: {exc}", path) from None
    if verifier == "math":
        completion = str(record.get("solution") or f"The final answer is $\\boxed{{{answer}}}$.")
    else:
        completion = str(answer)
    return ProbeProblem(prompt, str(answer), verifier, completion, raw)
