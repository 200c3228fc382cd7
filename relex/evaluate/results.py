"""The results of ``relex eval``: a JSON document and the object around it.

Layout of ``results.json`` (``"format": "relex-eval/1"``)::

    {
      "format", "relex_version", "created",
      "settings":    {tasks, samples, temperature, top_p, max_new_tokens, limit, backend, seed, ...},
      "checkpoints": [{"label", "path", "prompt_format", "lm_eval_version", "elapsed_seconds", ...}],
      "tasks": {
        "<task>": {
          "title", "source", "metric": "avg@k",
          "results": {"<label>": {"summary": {"accuracy", "avg@k", "pass@k": {"1": .., "k": ..}, "n_problems",
                                              "samples", "no_answer_rate", ...},
                                  "prompt_example": "...",
                                  "problems": [{"id", "index", "reference", "extracted": [..],
                                                "correct": [..], "n_correct", "score"}]}},
          "comparison": {"baseline": "<label>",
                         "differences": {"<label>": {"diff", "ci_low", "ci_high", "n_problems", "n_boot",
                                                     "seed", "confidence"}}}     # two or more checkpoints
        }
      },
      "mean": {"accuracy": {"<label>": ..}, "comparison": {...}}   # unweighted mean over tasks
    }

Accuracies are fractions in [0, 1]; a difference is ``checkpoint - baseline`` with a paired-bootstrap
interval over problems (stratified by task for the mean).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from relex.errors import RelexInputError
from relex.jsonable import jsonable
from relex.evaluate import stats

FORMAT = "relex-eval/1"

# Settings that change what a score means; results can only be merged when these agree.
_SCORING_SETTINGS = ("samples", "temperature", "top_p", "max_new_tokens", "limit", "prompt", "system_prompt",
                     "data_dir")


class EvalResults:
    """Scores of one or more checkpoints on one or more tasks (wraps the ``results.json`` document)."""

    def __init__(self, data: dict):
        if data.get("format") != FORMAT:
            raise ValueError(f"not a relex eval results document (format {data.get('format')!r})")
        self.data = data

    # ------------------------------------------------------------------ access
    @property
    def labels(self) -> list[str]:
        """Checkpoint labels, baseline first."""
        return [c["label"] for c in self.data["checkpoints"]]

    @property
    def tasks(self) -> list[str]:
        return list(self.data["tasks"])

    @property
    def settings(self) -> dict:
        return self.data["settings"]

    def checkpoint(self, label: str) -> dict:
        for entry in self.data["checkpoints"]:
            if entry["label"] == label:
                return entry
        raise KeyError(label)

    def summary(self, task: str, label: str) -> dict:
        return self.data["tasks"][task]["results"][label]["summary"]

    def accuracy(self, task: str, label: str) -> float:
        """avg@k of ``label`` on ``task`` (a fraction)."""
        return float(self.summary(task, label)["accuracy"])

    def problems(self, task: str, label: str) -> list[dict]:
        return self.data["tasks"][task]["results"][label]["problems"]

    @property
    def columns(self) -> list[str]:
        """The tasks, then ``"mean"`` when there are several: the columns of every table of results."""
        return list(self.tasks) + (["mean"] if len(self.tasks) > 1 else [])

    def problem_count(self, task: str) -> int:
        """The most problems any checkpoint was scored on in ``task``."""
        return max((len(r["problems"]) for r in self.data["tasks"][task]["results"].values()), default=0)

    def percent(self, task: str, label: str) -> str:
        """``41.2``: the accuracy of ``label`` on ``task`` (or ``"mean"``) in %; ``–`` where there is none."""
        if task == "mean":
            value = self.data["mean"]["accuracy"].get(label)
        else:
            result = self.data["tasks"][task]["results"].get(label)
            value = result["summary"]["accuracy"] if result else None
        return "–" if value is None or value != value else f"{100 * value:.1f}"

    def difference(self, task: str, label: str) -> dict | None:
        """``{"diff", "ci_low", "ci_high", ...}`` of ``label`` minus the baseline (``task="mean"`` for the mean)."""
        block = self.data["mean"] if task == "mean" else self.data["tasks"][task]
        comparison = block.get("comparison") or {}
        return comparison.get("differences", {}).get(label)

    def mean_accuracy(self, label: str) -> float:
        return float(self.data["mean"]["accuracy"][label])

    @property
    def baseline(self) -> str | None:
        comparison = self.data.get("mean", {}).get("comparison")
        return comparison.get("baseline") if comparison else None

    # ------------------------------------------------------------------ io
    def to_json(self) -> str:
        return json.dumps(jsonable(self.data), indent=1, ensure_ascii=False)

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file beside ``path``, then a rename)."""
        path = Path(path).expanduser()
        if path.parent and not path.parent.exists():
            raise RelexInputError("folder of the results file does not exist", path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent or "."))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json())
                handle.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "EvalResults":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RelexInputError("results file does not exist", path) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise RelexInputError(f"cannot read results: {exc}", path) from None
        try:
            return cls(data)
        except ValueError as exc:
            raise RelexInputError(str(exc), path) from None

    def __repr__(self) -> str:
        return f"EvalResults(checkpoints={self.labels}, tasks={self.tasks})"


def new_document(settings: dict, relex_version: str) -> dict:
    return {
        "format": FORMAT,
        "relex_version": relex_version,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "checkpoints": [],
        "tasks": {},
        "mean": {"accuracy": {}},
    }


def add_checkpoint(data: dict, label: str, worker_result: dict, titles: dict[str, str]) -> None:
    """Fold one worker's output into a results document."""
    entry = dict(worker_result["checkpoint"], label=label)
    data["checkpoints"].append(entry)
    for task, result in worker_result["tasks"].items():
        block = data["tasks"].setdefault(task, {"title": titles.get(task, task), "source": result.get("source"),
                                                "metric": None, "results": {}})
        samples = result["summary"].get("samples", data["settings"].get("samples", 1))
        block["metric"] = f"avg@{samples}"
        block["results"][label] = {k: v for k, v in result.items() if k != "source"}
    _update_mean(data)


def _update_mean(data: dict) -> None:
    accuracies = {}
    for entry in data["checkpoints"]:
        label = entry["label"]
        values = [block["results"][label]["summary"]["accuracy"] for block in data["tasks"].values()
                  if label in block["results"]]
        accuracies[label] = float(sum(values) / len(values)) if values else float("nan")
    data["mean"]["accuracy"] = accuracies


def _paired_scores(problems_a: list[dict], problems_b: list[dict]) -> tuple[list[float], list[float]]:
    """Per-problem scores of two checkpoints, aligned by problem id (problems both have)."""
    by_id = {p["id"]: p["score"] for p in problems_b}
    a, b = [], []
    for problem in problems_a:
        if problem["id"] in by_id:
            a.append(float(problem["score"]))
            b.append(float(by_id[problem["id"]]))
    return a, b


def compare(results: "EvalResults | dict | str | Path", baseline: str | int = 0, n_boot: int = 10_000,
            seed: int = 0, confidence: float = 0.95) -> "EvalResults":
    """Differences of every checkpoint to ``baseline`` with paired-bootstrap intervals, per task and mean.

    ``results`` is an :class:`EvalResults`, its dict, or the path of a ``results.json``; ``baseline`` is a
    label or a position (default: the first checkpoint). The comparison is stored in the results (replacing
    any earlier one) and the results are returned. Problems are paired by id; the bootstrap is seeded.
    """
    if isinstance(results, (str, Path)):
        results = EvalResults.load(results)
    elif isinstance(results, dict):
        results = EvalResults(results)
    labels = results.labels
    if isinstance(baseline, int):
        if not -len(labels) <= baseline < len(labels):
            raise RelexInputError(f"baseline position {baseline} is out of range for {len(labels)} checkpoints")
        baseline = labels[baseline]
    if baseline not in labels:
        raise RelexInputError(f"unknown baseline '{baseline}'; checkpoints: {', '.join(labels)}")
    # baseline first, the others in their order
    order = [baseline] + [label for label in labels if label != baseline]
    results.data["checkpoints"].sort(key=lambda entry: order.index(entry["label"]))
    others = order[1:]
    mean_pairs: dict[str, list[tuple[list[float], list[float]]]] = {label: [] for label in others}
    for task, block in results.data["tasks"].items():
        differences = {}
        if baseline in block["results"]:
            base_problems = block["results"][baseline]["problems"]
            for label in others:
                if label not in block["results"]:
                    continue
                a, b = _paired_scores(base_problems, block["results"][label]["problems"])
                if not a:
                    continue
                differences[label] = stats.paired_bootstrap(a, b, n_boot=n_boot, seed=seed, confidence=confidence)
                mean_pairs[label].append((a, b))
        block["comparison"] = {"baseline": baseline, "differences": differences} if others else None
    mean_differences = {}
    for label, pairs in mean_pairs.items():
        if pairs:
            mean_differences[label] = stats.stratified_paired_bootstrap(pairs, n_boot=n_boot, seed=seed,
                                                                        confidence=confidence)
            mean_differences[label]["n_tasks"] = len(pairs)
    results.data["mean"]["comparison"] = {"baseline": baseline, "differences": mean_differences} if others else None
    return results


def merge(parts: Iterable["EvalResults | dict | str | Path"]) -> EvalResults:
    """One results document from several (e.g. a baseline scored once and new checkpoints scored later).

    The scoring settings (samples, temperature, top-p, max-new-tokens, limit, prompt, data) must agree;
    checkpoint labels must be distinct. Comparisons are dropped: call :func:`compare` on the merged results.
    """
    loaded: list[EvalResults] = []
    for part in parts:
        if isinstance(part, (str, Path)):
            loaded.append(EvalResults.load(part))
        elif isinstance(part, dict):
            loaded.append(EvalResults(part))
        else:
            loaded.append(part)
    if not loaded:
        raise RelexInputError("nothing to merge")
    first = loaded[0]
    merged = json.loads(json.dumps(first.data))
    merged["checkpoints"] = []
    merged["tasks"] = {}
    merged["mean"] = {"accuracy": {}}
    for part in loaded:
        for key in _SCORING_SETTINGS:
            if part.settings.get(key) != first.settings.get(key):
                raise RelexInputError(f"cannot merge results scored with different '{key}': "
                                      f"{first.settings.get(key)!r} vs {part.settings.get(key)!r}")
        for entry in part.data["checkpoints"]:
            if entry["label"] in {c["label"] for c in merged["checkpoints"]}:
                raise RelexInputError(f"checkpoint label '{entry['label']}' appears in more than one results file")
            merged["checkpoints"].append(entry)
        for task, block in part.data["tasks"].items():
            target = merged["tasks"].setdefault(task, {k: v for k, v in block.items()
                                                       if k not in ("results", "comparison")} | {"results": {}})
            target["results"].update(block["results"])
    merged["settings"]["tasks"] = list(merged["tasks"])
    _update_mean(merged)
    return EvalResults(merged)


def table_rows(results: EvalResults) -> tuple[list[str], list[list[str]]]:
    """Plain-text table (header, rows): one row per checkpoint, one column per task and the mean.

    Cells read ``41.2`` (accuracy in %) and, for checkpoints other than the baseline,
    ``+3.1 [-1.0, +7.2]`` (difference to the baseline in points with its 95% interval).
    """
    header = ["checkpoint"]
    for task in results.tasks:
        metric = results.data["tasks"][task].get("metric") or ""
        header.append(f"{task} {metric} (n={results.problem_count(task)})".replace("  ", " "))
    if len(results.tasks) > 1:
        header.append("mean")
    rows = []
    for label in results.labels:
        row = [label]
        for task in results.columns:
            cell = results.percent(task, label)
            difference = results.difference(task, label)
            if difference:
                cell += f"  {format_difference(difference)}"
            row.append(cell)
        rows.append(row)
    return header, rows


def format_difference(difference: dict) -> str:
    """``+3.1 [-1.0, +7.2]`` in percentage points."""
    return (f"{100 * difference['diff']:+.1f} [{100 * difference['ci_low']:+.1f}, "
            f"{100 * difference['ci_high']:+.1f}]")


def format_table(results: EvalResults) -> str:
    """The table of :func:`table_rows` as aligned plain text (for logs and notebooks)."""
    header, rows = table_rows(results)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def unique_labels(paths: Sequence[str]) -> list[str]:
    """Short distinct labels for checkpoint paths: the shortest trailing path parts that differ.

    ``runs/a/global_step_100/actor/huggingface`` and ``.../global_step_200/actor/huggingface`` become
    ``global_step_100/actor/huggingface`` and ``global_step_200/actor/huggingface``.
    """
    parts = [[p for p in Path(str(path).rstrip("/")).parts if p not in ("", "/")] or [str(path)] for path in paths]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    seen: dict[str, int] = {}
    result = []
    for label in labels:
        count = seen.get(label, 0)
        seen[label] = count + 1
        result.append(label if count == 0 else f"{label}#{count + 1}")
    return result
