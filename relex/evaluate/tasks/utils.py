"""Hooks that the relex task YAMLs name with ``!function utils.<name>``.

lm-eval loads this file by path, beside the YAML; everything of substance lives in :mod:`relex.evaluate`.
"""

from __future__ import annotations

from relex.evaluate.answers import reference_answer, score_completion
from relex.evaluate.tasks import normalize_doc, score_for, toy_records


def process_docs(dataset):
    """Map any of the supported layouts (hub or local jsonl) to ``{"id", "problem", "answer"}`` (strings)."""
    from datasets import Features, Value

    # explicit features: otherwise a float "answer" column (AMC: 27.0) keeps its type and undoes "27"
    features = Features({"id": Value("string"), "problem": Value("string"), "answer": Value("string")})
    return dataset.map(normalize_doc, with_indices=True, remove_columns=dataset.column_names, features=features)


def _completions(results) -> list[str]:
    # take_first_k gives a list of the k completions; lm-eval's default filter gives one string
    if len(results) == 1 and isinstance(results[0], (list, tuple)):
        return [str(r) for r in results[0]]
    return [str(r) for r in results]


def process_results(doc, results):
    """``accuracy``: fraction of the completions that are correct (avg@n); ``pass_at_n``: any correct."""
    reference = doc["answer"] if "answer" in doc else reference_answer(doc)
    flags = [score_completion(text, reference)[1] for text in _completions(results)]
    return {
        "accuracy": sum(flags) / len(flags) if flags else 0.0,
        "pass_at_n": float(any(flags)),
    }


def toy_dataset(**_metadata):
    """The toy's held-out split (``relex.toy``), generated in code: no file and no download."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(toy_records())})


def toy_process_results(doc, results):
    """Exact match of each completion, cut at ``<eos>`` and stripped, as the toy's verifier scores it."""
    score = score_for("toy")
    flags = [score(text, doc["answer"])[1] for text in _completions(results)]
    return {
        "accuracy": sum(flags) / len(flags) if flags else 0.0,
        "pass_at_n": float(any(flags)),
    }

