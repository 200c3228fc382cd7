"""The benchmarks ``relex eval`` knows, as lm-eval task definitions.

Each benchmark is a YAML file in this folder (``relex_<name>.yaml``, sharing ``_relex_math.yaml``) that
plain lm-eval can also run::

    lm_eval --include_path "$(python -c 'import relex.evaluate.tasks as t; print(t.TASKS_DIR)')" \\
            --tasks relex_aime24 --model hf --model_args pretrained=MODEL --apply_chat_template

The internal names carry a ``relex_`` prefix so they never clash with lm-eval's built-in tasks (its
``minerva_math`` is MATH with Minerva prompts, not the Minerva OCW set); users type the short names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from relex.errors import RelexInputError

TASKS_DIR = Path(__file__).resolve().parent

# Jinja templates over the normalised document {"id", "problem", "answer"}.
CHAT_PROMPT = "{{problem}}\nPlease reason step by step, and put your final answer within \\boxed{}."
PLAIN_PROMPT = (
    "Problem:\n{{problem}}\n\nPlease reason step by step, and put your final answer within \\boxed{}.\n\n"
    "Solution:"
)
# Generation stops at these strings (besides the tokenizer's end-of-sequence token).
CHAT_STOP = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"]
PLAIN_STOP = ["\nProblem:", "<|im_end|>", "<|endoftext|>", "<|eot_id|>"]


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: the short name users type and where its problems come from."""

    name: str
    title: str
    size: int
    local_file: str | None = None  # its file in a --data-dir (the layout of ../shared/data/math)
    kind: str = "math"

    @property
    def lm_eval_name(self) -> str:
        return f"relex_{self.name}"

    @property
    def yaml_path(self) -> Path:
        return TASKS_DIR / f"{self.lm_eval_name}.yaml"

    @property
    def hub_dataset(self) -> str | None:
        """``path (split)``: the hub dataset its YAML reads (``dataset_path``, ``test_split``), if any."""
        keys = dict(line.split(":", 1) for line in self.yaml_path.read_text().splitlines()
                    if ":" in line and not line.startswith(("#", " ", "-")))
        path = keys.get("dataset_path", "").strip()
        return f"{path} ({keys['test_split'].strip()})" if path else None


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("aime24", "AIME 2024", 30, "aime24.jsonl"),
        TaskSpec("aime25", "AIME 2025", 30, "aime25.jsonl"),
        TaskSpec("amc23", "AMC 2023", 40, "amc23.jsonl"),
        TaskSpec("minerva_math", "Minerva math (OCW)", 272, "minerva_math.jsonl"),
        TaskSpec("math500", "MATH-500", 500, "math500.jsonl"),
        TaskSpec("toy", "Toy addition (held-out)", 300, kind="toy"),
    )
}

DEFAULT_TASKS: tuple[str, ...] = ("aime24", "aime25", "amc23", "minerva_math", "math500")


def toy_answer_tokens() -> int:
    """Generation budget of the toy task: its answer digits and ``<eos>``."""
    from relex.toy.task import ANSWER_DIGITS

    return ANSWER_DIGITS + 1


def toy_records() -> list[dict[str, str]]:
    """The toy's held-out split as ``{"id", "prompt", "answer"}`` records (fixed order)."""
    from relex.toy.task import heldout_split

    return [{"id": str(index), "prompt": record["prompt"], "answer": record["answer"]}
            for index, record in enumerate(heldout_split())]


def _score_toy(completion: str | None, reference: str) -> tuple[str | None, bool]:
    from relex.toy.task import EOS_TEXT, score

    extracted = None if completion is None else completion.split(EOS_TEXT, 1)[0].strip() or None
    return extracted, bool(score(completion, reference))


def score_for(kind: str):
    """The scorer of a task kind: ``(completion, reference) -> (extracted answer, correct)``."""
    if kind == "toy":
        return _score_toy
    from relex.evaluate.answers import score_completion

    return score_completion


def known_tasks() -> list[str]:
    """Every task name ``relex eval --tasks`` accepts."""
    return list(TASKS)


def resolve_tasks(names: str | Sequence[str] | None) -> list[TaskSpec]:
    """Task specs for a comma-separated string or a list of short names (``None``: the five math benchmarks).

    Accepts the internal ``relex_`` names too. Unknown names raise :class:`RelexInputError` listing the
    known ones; duplicates are dropped.
    """
    if names is None:
        names = list(DEFAULT_TASKS)
    if isinstance(names, str):
        names = [part for part in names.split(",")]
    specs: list[TaskSpec] = []
    for raw in names:
        name = raw.strip().lower()
        if not name:
            continue
        if name == "all":
            candidates = [TASKS[n] for n in DEFAULT_TASKS]
        else:
            key = name[len("relex_"):] if name.startswith("relex_") else name
            if key not in TASKS:
                raise RelexInputError(f"unknown task '{raw.strip()}'; known tasks: {', '.join(known_tasks())}")
            candidates = [TASKS[key]]
        for spec in candidates:
            if spec not in specs:
                specs.append(spec)
    if not specs:
        raise RelexInputError(f"no task given; known tasks: {', '.join(known_tasks())}")
    return specs


def local_data_file(spec: TaskSpec, data_dir: str | Path) -> Path:
    """The jsonl file of ``spec`` in a local data folder laid out like ``<name>.jsonl``.

    Raises :class:`RelexInputError` naming the missing file.
    """
    if spec.local_file is None:
        raise RelexInputError(f"task '{spec.name}' does not read a data folder", data_dir)
    path = Path(data_dir).expanduser().resolve() / spec.local_file
    if not path.is_file():
        raise RelexInputError(f"missing data file for task '{spec.name}'", path)
    return path


def _lower_keys(doc: Mapping[str, Any]) -> dict[str, Any]:
    lowered: dict[str, Any] = {}
    for key, value in doc.items():
        lowered.setdefault(str(key).lower(), value)
    return lowered


def normalize_doc(doc: Mapping[str, Any], index: int = 0) -> dict[str, str]:
    """``{"id", "problem", "answer"}`` of a benchmark record from the hub or a local jsonl file.

    The problem is ``problem`` (or ``question``); the answer is ``answer`` or the last ``\\boxed{}`` of
    ``solution`` (see :func:`relex.evaluate.answers.reference_answer`); the id is the first of ``id``,
    ``unique_id``, ``idx``, ``problem_idx``, else the position in the file.
    """
    from relex.evaluate.answers import reference_answer

    fields = _lower_keys(doc)
    problem = fields.get("problem") or fields.get("question")
    if not problem:
        raise ValueError(f"record {index} has no 'problem' or 'question' field")
    ident = next((fields[k] for k in ("id", "unique_id", "idx", "problem_idx") if fields.get(k) is not None), index)
    return {"id": str(ident), "problem": str(problem), "answer": reference_answer(fields)}


def check_local_file(spec: TaskSpec, path: str | Path) -> int:
    """Read a local jsonl file as the task will; return its number of problems.

    Raises :class:`RelexInputError` naming the file and line of the first record that is not valid JSON or
    lacks a problem or an answer.
    """
    import json

    path = Path(path)
    count = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RelexInputError(f"cannot read the data file: {exc}", path) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            normalize_doc(record, count)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise RelexInputError(f"line {number}: {exc}", path) from None
        count += 1
    if count == 0:
        raise RelexInputError(f"no problems in the data file of task '{spec.name}'", path)
    return count

