"""Answer extraction and equivalence on the real benchmark answers; pass@k and bootstrap against naive code;
task definitions and the results document (no model is run here)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from relex.errors import RelexInputError
from relex.evaluate import answers, stats
from relex.evaluate.tasks import CHAT_PROMPT, DEFAULT_TASKS, TASKS, TASKS_DIR, normalize_doc, resolve_tasks

pytest.importorskip("math_verify")

# The benchmark files come from the ``math_data_dir`` fixture (RELEX_MATH_DATA, default ../shared/data/math).
_DATA: dict[str, Path] = {}


@pytest.fixture
def real_data(math_data_dir):
    """The real benchmark files; tests using them skip in a clone without them."""
    _DATA["folder"] = Path(math_data_dir)


def _records(name: str) -> list[dict]:
    path = _DATA["folder"] / TASKS[name].local_file
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _references(name: str) -> list[str]:
    return [answers.reference_answer(record) for record in _records(name)]


# ----------------------------------------------------------------------------------------------- references
@pytest.mark.usefixtures("real_data")
def test_reference_counts_and_fields():
    sizes = {name: len(_records(name)) for name in DEFAULT_TASKS}
    assert sizes == {name: TASKS[name].size for name in DEFAULT_TASKS}
    for name in DEFAULT_TASKS:
        for index, record in enumerate(_records(name)):
            doc = normalize_doc(record, index)
            assert set(doc) == {"id", "problem", "answer"}
            assert doc["problem"].strip() and doc["answer"].strip()


@pytest.mark.usefixtures("real_data")
def test_amc_float_answers_are_written_as_integers():
    refs = _references("amc23")
    assert refs[0] == "27"  # stored as 27.0
    assert all("." not in ref for ref in refs), refs
    assert answers.score_completion("so they meet at \\boxed{27}", refs[0]) == ("27", True)
    assert answers.is_equivalent("27.0", "27") and answers.is_equivalent("27", "27.0")


@pytest.mark.usefixtures("real_data")
def test_minerva_reference_is_the_last_box_of_the_solution():
    records = _records("minerva_math")
    assert all("answer" not in record for record in records)
    refs = _references("minerva_math")
    assert refs[0] == "1.6" and refs[1] == "4.5e33"
    assert all(ref for ref in refs)


@pytest.mark.usefixtures("real_data")
def test_aime_zero_padded_answers():
    refs = _references("aime24")
    assert "025" in refs
    assert answers.is_equivalent("25", "025") and answers.is_equivalent("\\boxed{025}"[7:-1], "25")


def _clean(ref: str) -> str:
    # one Minerva reference carries a stray "$ $" from its source; a model would write it without
    return ref.replace("$ $", " ")


@pytest.mark.parametrize("name", DEFAULT_TASKS)
@pytest.mark.usefixtures("real_data")
def test_every_reference_matches_itself_in_equivalent_forms(name):
    refs = _references(name)
    failures = []
    for ref in refs:
        clean = _clean(ref)
        completions = [
            f"Reasoning first.\n\nSo the result is \\boxed{{{ref}}}.",
            f"$\\boxed{{ {ref} }}$",
            f"We compute it.\nThe answer is ${clean}$.",
            f"Putting it together, the final answer is {clean}",
            f"**Answer:** ${clean}$",
            f"\\boxed{{{ref.replace(chr(92) + 'frac', chr(92) + 'dfrac')}}}",
        ]
        for completion in completions:
            extracted, correct = answers.score_completion(completion, ref)
            if not correct:
                failures.append((ref, completion, extracted))
    assert not failures, failures[:10]


@pytest.mark.parametrize("name", DEFAULT_TASKS)
@pytest.mark.usefixtures("real_data")
def test_math_verify_accepts_every_reference_in_other_spellings(name):
    """Without the string fast path: math-verify itself must parse and accept every reference."""
    failures = []
    for ref in _references(name):
        clean = _clean(ref)
        for form in (clean.replace("\\frac", "\\dfrac"), f"  {clean} ", clean.replace("\\frac", "\\tfrac")):
            if not answers.math_equal(form, ref):
                failures.append((ref, form))
    assert not failures, failures[:10]


def _wrong_answers(ref: str) -> list[str]:
    try:
        value = float(ref)
    except ValueError:
        return [ref.replace("=", "=1+", 1) if "=" in ref else f"{ref}+1"]
    return [repr(value * 1.01 + 1), repr(-value - 1), "\\frac{" + ref + "}{7}" if value != 0 else "7"]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFAULT_TASKS)
@pytest.mark.usefixtures("real_data")
def test_wrong_answers_do_not_match(name):
    refs = _references(name)
    failures = []
    for ref in refs:
        for wrong in _wrong_answers(_clean(ref)):
            if answers.is_equivalent(wrong, ref):
                failures.append((ref, wrong))
    # another (different) reference of the same benchmark is wrong too; numbers only, to keep sympy quick
    numbers = sorted({float(r): r for r in map(_clean, refs) if _is_number(r)}.items())
    for (_, ref), (_, other) in zip(numbers, numbers[1:]):
        if answers.is_equivalent(other, ref):
            failures.append((ref, other))
    assert not failures, failures[:10]


# ----------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("completion, expected", [
    ("first \\boxed{1}, then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("so $\\boxed 5$", "5"),
    ("\\fbox{7}", "7"),
    ("$\\framebox{204}$ minutes", "204"),
    ("The answer is $\\frac{14}{3}$.", "\\frac{14}{3}"),
    ("The answer is 42. Next we check.", "42"),
    ("Thus the final answer is: 3\\sqrt{13}", "3\\sqrt{13}"),
    ("Answer: \\$18.90", "\\$18.90"),
    ("**Final Answer:** $x=5$", "x=5"),
    ("the answer is 1 \n but wait, the answer is 2", "2"),
    ("no final answer here, just 17 and 23", None),
    ("cut off at \\boxed{\\frac{1}{", None),
    ("", None),
    ("\\boxed{}", None),
])
def test_extract_answer(completion, expected):
    assert answers.extract_answer(completion) == expected


def test_box_wins_over_phrases_and_last_box_wins():
    text = "The answer is 3. Actually, recomputing: \\boxed{4}. Hmm, the answer is 5"
    assert answers.extract_answer(text) == "4"


@pytest.mark.parametrize("prediction, reference, expected", [
    ("\\frac12", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\dfrac{14}{3}", "\\frac{14}{3}", True),
    ("(3,\\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("4.5 \\times 10^{33}", "4.5e33", True),
    ("4.5e+33", "4.5e33", True),
    ("2.88e-19", "2.88e-19", True),
    ("2.9e-19", "2.88e-19", False),  # tiny numbers are compared relatively, not rounded to 0
    ("1e-5", "1.45e-5", False),
    ("5", "x=5", True),
    ("Evelyn", "\\text{Evelyn}", True),
    ("90", "90^\\circ", True),
    ("-2, 1", "1,-2", True),
    ("\\frac{1}{3}E_1 + \\frac{2}{3}E_2", "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}", True),
    ("\\frac{1}{3}E_1 + \\frac{2}{3}E_2 + 1", "\\frac{1}{3} E_{1}+\\frac{2}{3} E_{2}", False),
    ("2", "\\hbar \\omega(v+1 / 2)-\\frac{E_{0}^{2} e^{2}}{2 m \\omega^{2}}", False),
    ("28", "27", False),
    ("", "27", False),
    (None, "27", False),
])
def test_is_equivalent(prediction, reference, expected):
    assert answers.is_equivalent(prediction, reference) is expected


def test_normalize():
    assert answers.normalize(" $27.0$ ") == "27"
    assert answers.normalize("025") == "25"
    assert answers.normalize("\\dfrac{1}{2}.") == "\\frac{1}{2}"
    assert answers.normalize("\\left( 3, \\pi \\right)") == "(3,\\pi)"
    assert answers.normalize("\\text{Evelyn}") == "Evelyn"


def test_reference_answer_without_any_answer_fails():
    with pytest.raises(ValueError):
        answers.reference_answer({"problem": "p", "solution": "no box"})
    assert answers.reference_answer({"answer": 3.5}) == "3.5"
    assert answers.reference_answer({"answer": "", "solution": "so \\boxed{7}"}) == "7"


# ----------------------------------------------------------------------------------------------- pass@k
def _naive_pass_at_k(n: int, c: int, k: int) -> float:
    flags = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(flags[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert stats.pass_at_k(n, c, k) == pytest.approx(_naive_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases_and_levels():
    assert stats.pass_at_k(64, 0, 8) == 0.0
    assert stats.pass_at_k(64, 64, 1) == 1.0
    assert stats.pass_at_k(1000, 1, 1) == pytest.approx(0.001)
    assert 0.0 < stats.pass_at_k(1000, 3, 500) < 1.0
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        stats.pass_at_k(4, 1, 5)
    assert stats.pass_at_k_levels(1) == [1]
    assert stats.pass_at_k_levels(8) == [1, 2, 4, 8]
    assert stats.pass_at_k_levels(12) == [1, 2, 4, 8, 12]
    summary = stats.summarize_counts([(4, 1), (4, 4), (4, 0)])
    assert summary["avg@4"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert summary["pass@k"]["1"] == pytest.approx(summary["avg@4"])  # pass@1 is avg@n
    assert summary["pass@k"]["4"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------- bootstrap
def _naive_bootstrap(a, b, n_boot, seed, confidence):
    rng = random.Random(seed)
    n = len(a)
    means = []
    for _ in range(n_boot):
        picks = [rng.randrange(n) for _ in range(n)]
        means.append(sum(b[i] - a[i] for i in picks) / n)
    means.sort()
    alpha = (1 - confidence) / 2
    return means[int(alpha * n_boot)], means[int((1 - alpha) * n_boot) - 1]


def test_paired_bootstrap_matches_naive_resampling():
    rng = np.random.default_rng(3)
    a = (rng.random(150) < 0.4).astype(float)
    b = np.clip(a + (rng.random(150) < 0.15) - (rng.random(150) < 0.05), 0, 1)
    result = stats.paired_bootstrap(a, b, n_boot=20_000, seed=1)
    low, high = _naive_bootstrap(list(a), list(b), 20_000, 7, 0.95)
    assert result["diff"] == pytest.approx(float(np.mean(b - a)))
    assert result["ci_low"] == pytest.approx(low, abs=0.01)
    assert result["ci_high"] == pytest.approx(high, abs=0.01)
    # the normal approximation of the same interval
    se = np.std(b - a, ddof=1) / math.sqrt(len(a))
    assert result["ci_low"] == pytest.approx(result["diff"] - 1.96 * se, abs=0.015)
    assert result["n_problems"] == 150 and result["n_boot"] == 20_000


def test_paired_bootstrap_is_seeded_and_degenerate_cases():
    a, b = [0, 1, 0, 1, 1], [1, 1, 0, 1, 0]
    assert stats.paired_bootstrap(a, b, seed=5) == stats.paired_bootstrap(a, b, seed=5)
    same = stats.paired_bootstrap([0.5] * 10, [0.75] * 10)
    assert same["diff"] == same["ci_low"] == same["ci_high"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([], [])


def test_stratified_bootstrap_is_the_mean_over_tasks():
    rng = np.random.default_rng(0)
    pairs = [(rng.random(30), rng.random(30)), (rng.random(200), rng.random(200))]
    result = stats.stratified_paired_bootstrap(pairs, n_boot=4000, seed=2)
    assert result["diff"] == pytest.approx(np.mean([np.mean(b - a) for a, b in pairs]))
    assert result["ci_low"] < result["diff"] < result["ci_high"]
    single = stats.stratified_paired_bootstrap(pairs[:1], n_boot=4000, seed=2)
    assert single == stats.paired_bootstrap(*pairs[0], n_boot=4000, seed=2)
    # naive: resample each task separately, average the two task means
    pyrng = random.Random(4)
    boots = []
    for _ in range(4000):
        task_means = []
        for a, b in pairs:
            picks = [pyrng.randrange(len(a)) for _ in range(len(a))]
            task_means.append(sum(b[i] - a[i] for i in picks) / len(a))
        boots.append(sum(task_means) / 2)
    boots.sort()
    assert result["ci_low"] == pytest.approx(boots[100], abs=0.02)
    assert result["ci_high"] == pytest.approx(boots[3899], abs=0.02)


# ----------------------------------------------------------------------------------------------- tasks
def test_resolve_tasks():
    assert [s.name for s in resolve_tasks("aime24, math500")] == ["aime24", "math500"]
    assert [s.name for s in resolve_tasks("relex_amc23,amc23")] == ["amc23"]
    assert [s.name for s in resolve_tasks("all")] == list(DEFAULT_TASKS)
    assert [s.name for s in resolve_tasks(None)] == list(DEFAULT_TASKS)
    with pytest.raises(RelexInputError, match="unknown task 'gsm8k'; known tasks: aime24, aime25"):
        resolve_tasks("aime24,gsm8k")


def test_task_yamls_are_consistent():
    import yaml

    base = yaml.load((TASKS_DIR / "_relex_math.yaml").read_text(), Loader=_loader())
    assert base["doc_to_text"] == CHAT_PROMPT
    for name in DEFAULT_TASKS:
        spec = TASKS[name]
        config = yaml.load(spec.yaml_path.read_text(), Loader=_loader())
        assert config["task"] == spec.lm_eval_name == f"relex_{name}"
        assert spec.hub_dataset == f"{config['dataset_path']} ({config['test_split']})" and "/" in spec.hub_dataset
        assert config["include"] == "_relex_math.yaml"


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return Loader


def test_lm_eval_hooks_score_like_relex():
    spec = importlib.util.spec_from_file_location("relex_task_utils", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = {"id": "0", "problem": "p", "answer": "27"}
    assert module.process_results(doc, [["\\boxed{27}", "\\boxed{26}", "the answer is 27.0", "no"]]) == {
        "accuracy": 0.5, "pass_at_n": 1.0}
    assert module.process_results(doc, ["\\boxed{26}"]) == {"accuracy": 0.0, "pass_at_n": 0.0}


# ----------------------------------------------------------------------------------------------- results
def _document(scores: dict[str, dict[str, list[float]]]) -> dict:
    from relex.evaluate.results import add_checkpoint, new_document

    data = new_document({"samples": 1, "tasks": list(scores)}, "test")
    labels = list(next(iter(scores.values())))
    for label in labels:
        tasks = {}
        for task, per_label in scores.items():
            problems = [{"id": str(i), "index": i, "reference": "1", "extracted": ["1" if s else "0"],
                         "correct": [bool(s)], "n_correct": int(s), "score": float(s)}
                        for i, s in enumerate(per_label[label])]
            tasks[task] = {"summary": {"accuracy": float(np.mean(per_label[label])), "samples": 1,
                                       "n_problems": len(problems)},
                           "problems": problems, "source": "test"}
        add_checkpoint(data, label, {"checkpoint": {"path": f"/x/{label}"}, "tasks": tasks}, {})
    return data


def test_compare_merge_table_and_io(tmp_path):
    from relex.evaluate.results import EvalResults, compare, format_table, merge, table_rows

    scores = {"aime24": {"base": [0, 0, 1, 0], "new": [1, 0, 1, 1]},
              "math500": {"base": [1, 1, 0, 0, 1, 0], "new": [1, 1, 1, 0, 1, 0]}}
    results = compare(EvalResults(_document(scores)), n_boot=2000, seed=0)
    assert results.labels == ["base", "new"]
    diff = results.difference("aime24", "new")
    assert diff["diff"] == pytest.approx(0.5) and diff["ci_low"] <= 0.5 <= diff["ci_high"]
    assert results.difference("aime24", "base") is None
    mean = results.difference("mean", "new")
    assert mean["diff"] == pytest.approx((0.5 + 1 / 6) / 2) and mean["n_tasks"] == 2
    assert results.mean_accuracy("new") == pytest.approx((0.75 + 4 / 6) / 2)
    header, rows = table_rows(results)
    assert header[0] == "checkpoint" and header[-1] == "mean" and len(rows) == 2
    assert rows[1][1].startswith("75.0  +50.0 [")
    assert "base" in format_table(results)

    # another baseline, by label
    swapped = compare(json.loads(results.to_json()), baseline="new", n_boot=500)
    assert swapped.labels == ["new", "base"]
    assert swapped.difference("aime24", "base")["diff"] == pytest.approx(-0.5)

    path = results.save(tmp_path / "results.json")
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]  # no temporary left
    loaded = EvalResults.load(path)
    assert loaded.data == json.loads(results.to_json())

    # merging a baseline scored alone with a later run
    alone = {"aime24": {"later": [1, 1, 1, 1]}, "math500": {"later": [0, 0, 0, 0, 0, 0]}}
    merged = compare(merge([results, EvalResults(_document(alone))]), n_boot=500)
    assert merged.labels == ["base", "new", "later"]
    assert merged.difference("aime24", "later")["diff"] == pytest.approx(0.75)
    with pytest.raises(RelexInputError, match="more than one results file"):
        merge([results, results])
    other = _document(alone)
    other["settings"]["samples"] = 4
    with pytest.raises(RelexInputError, match="different 'samples'"):
        merge([results, EvalResults(other)])
    with pytest.raises(RelexInputError, match="unknown baseline"):
        compare(results, baseline="nope")


def test_nan_is_written_as_null(tmp_path):
    from relex.evaluate.results import EvalResults

    data = _document({"aime24": {"base": [0, 1]}})
    data["tasks"]["aime24"]["results"]["base"]["summary"]["no_answer_rate"] = float("nan")
    text = EvalResults(data).to_json()
    assert "NaN" not in text and json.loads(text)["tasks"]["aime24"]["results"]["base"]["summary"][
        "no_answer_rate"] is None


def test_unique_labels():
    from relex.evaluate.results import unique_labels

    assert unique_labels(["runs/a/checkpoint-10", "runs/a/checkpoint-20"]) == ["checkpoint-10", "checkpoint-20"]
    assert unique_labels(["r/global_step_1/actor/huggingface", "r/global_step_2/actor/huggingface"]) == [
        "global_step_1/actor/huggingface", "global_step_2/actor/huggingface"]
    assert unique_labels(["x/model", "x/model"]) == ["x/model", "x/model#2"]
    assert unique_labels(["Qwen/Qwen2.5-Math-1.5B"]) == ["Qwen2.5-Math-1.5B"]


def test_toy_scorer_is_the_toys_exact_match():
    from relex.evaluate.tasks import score_for

    score = score_for("toy")
    assert score("157", "157") == ("157", True)
    assert score(" 157 <eos><pad>", "157") == ("157", True)
    assert score("15<pad>7", "157") == ("15<pad>7", False)  # special tokens kept as text are wrong
    assert score("1571", "157") == ("1571", False)
    assert score("", "157") == (None, False)
    assert score_for("math") is answers.score_completion
