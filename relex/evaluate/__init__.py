"""Score checkpoints on math benchmarks with lm-evaluation-harness (``relex eval``).

    from relex.evaluate import evaluate
    results = evaluate(["runs/base", "runs/step-500", "out/relex-500"], tasks="aime24,math500",
                       samples=8, temperature=0.6, top_p=0.95, out="results.json")
    results.accuracy("math500", "step-500")          # avg@8, a fraction
    results.difference("math500", "relex-500")        # vs the first checkpoint, with a 95% bootstrap CI

Each checkpoint is scored in its own process (``python -m relex.evaluate.worker``). Benchmarks: AIME 2024,
AIME 2025, AMC 2023, Minerva math (the OCW set), MATH-500 (:mod:`relex.evaluate.tasks`); answers are the
last ``\\boxed{}`` compared with math-verify (:mod:`relex.evaluate.answers`). Needs ``pip install
'relex-rlvr[eval]'`` (from a clone: ``pip install -e '.[eval]'``).
"""

from __future__ import annotations

from relex.evaluate.answers import extract_answer, is_equivalent, reference_answer, score_completion
from relex.evaluate.launcher import evaluate
from relex.evaluate.results import EvalResults, compare, format_table, merge
from relex.evaluate.runner import EvalSettings
from relex.evaluate.stats import paired_bootstrap, pass_at_k
from relex.evaluate.tasks import DEFAULT_TASKS, TASKS, known_tasks

__all__ = [
    "evaluate",
    "compare",
    "merge",
    "EvalResults",
    "EvalSettings",
    "format_table",
    "extract_answer",
    "is_equivalent",
    "reference_answer",
    "score_completion",
    "pass_at_k",
    "paired_bootstrap",
    "TASKS",
    "DEFAULT_TASKS",
    "known_tasks",
]
