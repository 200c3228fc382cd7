"""Final answers of math completions: extraction, reference answers and equivalence.

The score of a completion is whether its final answer is mathematically equal to the reference:

- the final answer is the content of the **last** ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``); a
  completion without one falls back to the last "final answer is X", "the answer is X" or "Answer: X";
- the reference is the dataset's ``answer`` field (AMC stores floats such as ``27.0``, written back as
  ``27``), or, for datasets without one (Minerva math), the last ``\\boxed{}`` of the reference solution;
- equality is decided by ``math-verify`` after light normalisation (``\\dfrac`` -> ``\\frac``, ``4.5e33`` ->
  ``4.5 \\times 10^{33}``, surrounding ``$``), with an exact match of the normalised strings as a fast path.

``math-verify`` is imported lazily, so this module can be imported without the ``eval`` extra.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any, Mapping

__all__ = [
    "last_boxed",
    "extract_answer",
    "reference_answer",
    "normalize",
    "is_equivalent",
    "math_equal",
    "score_completion",
]

# Relative tolerance for answers that are plain numbers (scale-free, unlike math-verify's 6-decimal rounding).
NUMERIC_REL_TOL = 1e-6

_BOX_COMMANDS = ("\\boxed", "\\fbox", "\\framebox")

# Phrases that introduce a final answer when a completion has no \boxed{}; the last match wins.
_ANSWER_PHRASES = re.compile(
    r"(?:final\s+answer\s*(?:is|:)|the\s+answer\s+is|\banswer\s*:)\s*[:=]?\s*(?P<rest>[^\n]*)",
    re.IGNORECASE,
)


def last_boxed(text: str | None) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\framebox{...}`` in ``text``.

    Braces are balanced, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``. The brace-less form
    ``\\boxed 5`` gives ``5``. An unclosed box (a completion cut off mid-answer) gives ``None``.
    """
    if not text:
        return None
    best = -1
    command = ""
    for name in _BOX_COMMANDS:
        at = text.rfind(name)
        while at >= 0 and text[at + len(name): at + len(name) + 1].isalpha():  # e.g. \boxedsomething
            at = text.rfind(name, 0, at)
        if at > best:
            best, command = at, name
    if best < 0:
        return None
    rest = text[best + len(command):]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        start = len(rest) - len(stripped)
        depth = 0
        for pos in range(start, len(rest)):
            char = rest[pos]
            if char == "{" and (pos == 0 or rest[pos - 1] != "\\"):
                depth += 1
            elif char == "}" and (pos == 0 or rest[pos - 1] != "\\"):
                depth -= 1
                if depth == 0:
                    return rest[start + 1: pos].strip()
        return None
    if rest[:1].isspace():  # "\boxed 5"
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1).rstrip(".") if match else None
    return None


def _clean_phrase_answer(rest: str) -> str | None:
    rest = rest.strip().strip("*").strip()
    if not rest:
        return None
    # Prefer the first inline-math segment: "the answer is $\frac{1}{2}$ because ..." -> \frac{1}{2}
    math = re.search(r"(?<!\\)\$\$?(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", rest)
    if math:
        return next(group for group in math.groups() if group is not None).strip()
    # Otherwise up to the end of the sentence: a period followed by a space or the end of the line.
    rest = re.split(r"\.\s|\.$", rest, maxsplit=1)[0]
    rest = rest.strip().strip("*").strip()
    return rest or None


def extract_answer(completion: str | None) -> str | None:
    """The final answer of a completion as a string, or ``None`` if it gives none.

    The last ``\\boxed{}`` wins; without one, the last "final answer is X" / "the answer is X" /
    "Answer: X" is used.
    """
    if not completion:
        return None
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed or None
    matches = list(_ANSWER_PHRASES.finditer(completion))
    for match in reversed(matches):
        answer = _clean_phrase_answer(match.group("rest"))
        if answer:
            return answer
    return None


def _format_number(value: float | int) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def reference_answer(doc: Mapping[str, Any]) -> str:
    """The reference answer of a benchmark record, as a string.

    Uses ``answer`` when present (floats that are whole numbers lose their ``.0``), otherwise the last
    ``\\boxed{}`` of ``solution``. Raises ``ValueError`` when the record has neither.
    """
    answer = doc.get("answer")
    if answer is not None and not (isinstance(answer, str) and not answer.strip()):
        if isinstance(answer, (int, float)):
            return _format_number(answer)
        return str(answer).strip()
    solution = doc.get("solution")
    boxed = last_boxed(solution) if isinstance(solution, str) else None
    if boxed:
        return boxed.strip()
    raise ValueError("record has no answer: its 'answer' is missing or empty, and its 'solution' has no \\boxed{} "
                     "answer")


_SPACING = re.compile(r"\\[,;:!]|\\ |~|\\quad|\\qquad")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_E_NOTATION = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.^{])")
_INTEGER_FLOAT = re.compile(r"^([+-]?\d+)\.0*$")
_LEADING_ZEROS = re.compile(r"^([+-]?)0+(\d)")


def _latex_cleanup(answer: str) -> str:
    text = answer.strip()
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", text.strip())
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "")
    # A subscripted E is a variable (an energy), not Euler's number, which the LaTeX parser assumes.
    text = re.sub(r"(?<![\\A-Za-z])E_", r"\\mathcal{E}_", text)
    text = _SPACING.sub(" ", text)
    text = text.strip().rstrip(".").strip()
    # Scientific "4.5e33" -> "4.5 \times 10^{33}" (Minerva references use the former).
    text = _E_NOTATION.sub(lambda m: f"{m.group(1)}\\times 10^{{{int(m.group(2))}}}", text)
    return text


def normalize(answer: str | None) -> str:
    """A canonical string form used for the exact-match fast path of :func:`is_equivalent`.

    Strips ``$``, spaces, ``\\left``/``\\right``, ``\\text{}`` wrappers, a trailing period, and writes
    ``\\dfrac``/``\\tfrac`` as ``\\frac``, ``27.0`` as ``27`` and ``025`` as ``25``.
    """
    if answer is None:
        return ""
    text = _latex_cleanup(str(answer))
    text = _TEXT.sub(r"\1", text)
    text = re.sub(r"\s+", "", text)
    integer = _INTEGER_FLOAT.match(text)
    if integer:
        text = integer.group(1)
    if re.fullmatch(r"[+-]?\d+", text):
        text = _LEADING_ZEROS.sub(r"\1\2", text)
        text = text.lstrip("+")
    return text


@lru_cache(maxsize=65536)
def _parsed(answer: str) -> list:
    """``math_verify.parse`` of a bare answer: LaTeX inside ``\\boxed{}`` (no free-text number hunting,
    which would turn an unparsable expression such as ``\\hbar\\omega(v+1/2)`` into the number 2)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = _latex_cleanup(answer)
    if not text:
        return []
    parsed = parse("\\boxed{" + text + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=5)
    if not parsed and re.fullmatch(r"[\d\s.,+\-*/()^eE]+", text):  # plain arithmetic such as "-1./3"
        parsed = parse(text, extraction_config=[ExprExtractionConfig()], parsing_timeout=5)
    return parsed


def math_equal(prediction: str, reference: str) -> bool:
    """``math_verify.verify`` of two bare answers (no string fast path); ``False`` if either fails to parse."""
    from math_verify import verify

    gold, target = _parsed(str(reference)), _parsed(str(prediction))
    if not gold or not target:
        return False
    gold_value, target_value = _real_number(gold[0]), _real_number(target[0])
    if gold_value is not None and target_value is not None:
        # math-verify rounds numbers to 6 decimals, so every answer below 5e-7 would equal every other
        # (Minerva has many, e.g. 2.88e-19); compare numbers with a relative tolerance instead.
        return math.isclose(gold_value, target_value, rel_tol=NUMERIC_REL_TOL, abs_tol=0.0)
    try:
        return bool(verify(gold, target, timeout_seconds=5))
    except Exception:  # math-verify failures (sympy errors, timeouts) count as "not equal"
        return False


def _real_number(expr) -> float | None:
    """The value of a parsed answer that is a plain real number (``1/3``, ``2.88e-19``, ``\\sqrt{2}``)."""
    try:
        import sympy

        if not isinstance(expr, sympy.Expr) or not expr.is_number:
            return None
        value = complex(expr.evalf(30))
    except Exception:
        return None
    if value.imag != 0 or not math.isfinite(value.real):
        return None
    return value.real


def is_equivalent(prediction: str | None, reference: str | None) -> bool:
    """Whether ``prediction`` is mathematically equal to ``reference`` (both are bare answers).

    Exact match after :func:`normalize` first; otherwise :func:`math_equal` (``math-verify``).
    An empty prediction is never correct.
    """
    if prediction is None or reference is None:
        return False
    norm_prediction, norm_reference = normalize(prediction), normalize(reference)
    if not norm_prediction:
        return False
    if norm_prediction == norm_reference:
        return True
    return math_equal(str(prediction), str(reference))


@lru_cache(maxsize=262144)
def score_completion(completion: str | None, reference: str) -> tuple[str | None, bool]:
    """``(extracted answer, correct)`` for one completion against a reference answer."""
    extracted = extract_answer(completion)
    return extracted, (extracted is not None and is_equivalent(extracted, reference))
