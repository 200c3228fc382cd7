"""``relex eval`` end to end: real lm-eval, offline, on tiny local models and small problem files in each
benchmark's own layout (``small_math_dir``), so these run in any clone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")

from command import relex  # noqa: E402
from naive import naive_toy_greedy  # noqa: E402
from relex.evaluate.tasks import DEFAULT_TASKS  # noqa: E402
from relex.testing import save_tiny_model  # noqa: E402
from relex_cli.app import main  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread_workers(monkeypatch):
    # workers are subprocesses: keep them to one thread each on shared CPUs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    chat, plain = root / "chat-model", root / "plain-model"
    save_tiny_model(chat, arch="llama", seed=0, chat_template=True)
    save_tiny_model(plain, arch="llama", seed=1, chat_template=False)
    return {"chat": chat, "plain": plain}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _data_references(folder: Path, task: str, count: int) -> list[str]:
    from relex.evaluate.answers import reference_answer

    lines = (folder / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
    return [reference_answer(json.loads(line)) for line in lines]


def test_two_checkpoints_on_all_five_benchmarks(models, small_math_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, stdout, stderr = _run([
        "eval", f"base={models['chat']}", str(models["plain"]),
        "--tasks", ",".join(DEFAULT_TASKS), "--data-dir", str(small_math_dir),
        "--limit", "2", "--max-new-tokens", "16", "--batch-size", "4", "--out", str(out),
    ], capsys)
    assert code == 0, stderr
    data = json.loads(out.read_text())
    assert data["format"] == "relex-eval/1"
    settings = data["settings"]
    assert settings["tasks"] == list(DEFAULT_TASKS)
    assert (settings["samples"], settings["temperature"], settings["max_new_tokens"], settings["limit"]) == (1, 0.0, 16, 2)
    assert [c["label"] for c in data["checkpoints"]] == ["base", "plain-model"]
    assert [c["prompt_format"] for c in data["checkpoints"]] == ["chat", "plain"]
    assert all(Path(c["path"]).is_dir() for c in data["checkpoints"])

    assert list(data["tasks"]) == list(DEFAULT_TASKS)
    for task, block in data["tasks"].items():
        assert block["metric"] == "avg@1"
        assert block["source"] == str(small_math_dir.resolve() / f"{task}.jsonl")
        references = _data_references(small_math_dir, task, 2)
        for label, result in block["results"].items():
            summary = result["summary"]
            assert summary["n_problems"] == 2 and summary["samples"] == 1
            assert 0.0 <= summary["accuracy"] <= 1.0 and summary["accuracy"] == summary["avg@1"]
            assert set(summary["pass@k"]) == {"1"}
            assert 0.0 <= summary["no_answer_rate"] <= 1.0
            assert summary["lm_eval"]["accuracy"] == pytest.approx(summary["accuracy"])
            problems = result["problems"]
            assert [p["index"] for p in problems] == [0, 1]
            assert [p["reference"] for p in problems] == references
            for problem in problems:
                assert problem["id"]
                assert len(problem["extracted"]) == len(problem["correct"]) == 1
                assert all(isinstance(flag, bool) for flag in problem["correct"])
                assert problem["n_correct"] == sum(problem["correct"]) and 0.0 <= problem["score"] <= 1.0
                assert "completions" not in problem
        chat_prompt = block["results"]["base"]["prompt_example"]
        plain_prompt = block["results"]["plain-model"]["prompt_example"]
        assert chat_prompt.startswith("<|im_start|>user\n") and "\\boxed{}" in chat_prompt
        assert plain_prompt.startswith("Problem:\n") and plain_prompt.endswith("Solution:")
        difference = block["comparison"]["differences"]["plain-model"]
        assert block["comparison"]["baseline"] == "base" and "base" not in block["comparison"]["differences"]
        assert difference["ci_low"] <= difference["diff"] <= difference["ci_high"]
        assert difference["n_problems"] == 2 and difference["confidence"] == 0.95
    assert data["tasks"]["amc23"]["results"]["base"]["problems"][0]["reference"] == "27"
    assert data["tasks"]["minerva_math"]["results"]["base"]["problems"][0]["reference"] == "5"  # from the boxed answer of the solution
    mean = data["mean"]
    assert set(mean["accuracy"]) == {"base", "plain-model"}
    assert mean["comparison"]["differences"]["plain-model"]["n_tasks"] == 5
    assert mean["comparison"]["differences"]["plain-model"]["n_problems"] == 10

    # the table: one row per checkpoint, a column per task and the mean
    for word in ("base", "plain-model", *DEFAULT_TASKS, "mean", "avg@1"):
        assert word in stdout
    assert f"wrote results → {out}" in stdout.replace("\n", "")

    from relex.evaluate import EvalResults

    results = EvalResults.load(out)
    assert results.labels == ["base", "plain-model"]
    assert 0.0 <= results.accuracy("aime24", "base") <= 1.0


def test_sampling_reports_avg_and_pass_at_k(models, small_math_dir, tmp_path, capsys):
    out = tmp_path / "sampled.json"
    code, stdout, stderr = _run([
        "eval", str(models["chat"]), "--tasks", "amc23", "--data-dir", str(small_math_dir), "--limit", "2",
        "--samples", "3", "--temperature", "1.0", "--top-p", "0.9", "--max-new-tokens", "8",
        "--completions", "--quiet", "--out", str(out),
    ], capsys)
    assert code == 0, stderr
    data = json.loads(out.read_text())
    result = data["tasks"]["amc23"]["results"]["chat-model"]
    assert data["tasks"]["amc23"]["metric"] == "avg@3"
    assert set(result["summary"]["pass@k"]) == {"1", "2", "3"}
    assert result["summary"]["avg@3"] == result["summary"]["accuracy"]
    for problem in result["problems"]:
        assert len(problem["extracted"]) == len(problem["correct"]) == len(problem["completions"]) == 3
    completions = [c for p in result["problems"] for c in p["completions"]]
    assert len(set(completions)) > 1  # sampled, not three copies of one greedy completion
    assert "comparison" not in data["tasks"]["amc23"] or not data["tasks"]["amc23"].get("comparison")
    assert "avg@3" in stdout


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("relex: error: ")
    return lines[0]


def test_bad_input_is_one_line_and_leaves_no_results(models, small_math_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.json"
    common = ["--limit", "1", "--max-new-tokens", "4", "--out", str(out), "--quiet"]

    code, _, stderr = _run(["eval", str(models["chat"]), "--tasks", "aime24,gsm8k",
                            "--data-dir", str(small_math_dir), *common], capsys)
    line = _one_error_line(stderr)
    assert code == 2 and "unknown task 'gsm8k'" in line and "aime24, aime25, amc23, minerva_math, math500" in line

    partial = tmp_path / "partial-data"
    partial.mkdir()
    for name in ("aime24", "aime25", "amc23", "math500"):
        (partial / f"{name}.jsonl").symlink_to(small_math_dir / f"{name}.jsonl")
    code, _, stderr = _run(["eval", str(models["chat"]), "--data-dir", str(partial), *common], capsys)
    line = _one_error_line(stderr)
    assert code == 2 and str(partial.resolve() / "minerva_math.jsonl") in line and "missing data file" in line

    (partial / "minerva_math.jsonl").write_text('{"problem": "no answer and no solution"}\n')
    code, _, stderr = _run(["eval", str(models["chat"]), "--data-dir", str(partial), *common], capsys)
    line = _one_error_line(stderr)
    assert code == 2 and str(partial.resolve() / "minerva_math.jsonl") in line and "line 1" in line

    code, _, stderr = _run(["eval", str(tmp_path / "nowhere"), "--data-dir", str(small_math_dir), *common], capsys)
    assert code == 2 and "checkpoint folder does not exist" in _one_error_line(stderr)

    empty = tmp_path / "empty-checkpoint"
    empty.mkdir()
    code, _, stderr = _run(["eval", str(empty), "--data-dir", str(small_math_dir), *common], capsys)
    assert code == 2 and "no config.json" in _one_error_line(stderr)

    broken = tmp_path / "broken-weights"
    broken.mkdir()
    for item in models["chat"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    code, _, stderr = _run(["eval", str(models["chat"]), str(broken), "--data-dir", str(small_math_dir), *common],
                           capsys)
    line = _one_error_line(stderr)
    assert code == 2 and str(broken / "model.safetensors") in line and "does not load" in line

    code, _, stderr = _run(["eval", str(models["chat"]), "--samples", "4", "--data-dir", str(small_math_dir),
                            *common], capsys)
    assert code == 2 and "--temperature" in _one_error_line(stderr)

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    code, _, stderr = _run(["eval", str(models["chat"]), "--data-dir", str(small_math_dir), *common], capsys)
    line = _one_error_line(stderr)
    assert code == 2 and "lm-eval is not installed" in line and "pip install 'relex-rlvr[eval]'" in line

    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".results.json*"))


def test_checkpoint_that_fails_to_load_in_the_worker(models, small_math_dir, tmp_path, capsys):
    """Files look right to the quick checks, but transformers cannot build the model."""
    odd = tmp_path / "odd-model"
    odd.mkdir()
    for item in models["chat"].iterdir():
        (odd / item.name).write_bytes(item.read_bytes())
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (odd / "config.json").write_text(json.dumps(config))
    out = tmp_path / "results.json"
    code, _, stderr = _run(["eval", str(odd), "--tasks", "aime24", "--data-dir", str(small_math_dir), "--limit", "1",
                            "--max-new-tokens", "4", "--out", str(out), "--quiet"], capsys)
    line = _one_error_line(stderr)
    assert code == 2 and str(odd) in line and "checkpoint does not load" in line
    assert not out.exists()


def test_packaged_task_yamls_register_in_lm_eval():
    """Plain lm-eval can index the shipped YAMLs (hub sources) under the relex_ names, without clashes."""
    from lm_eval.tasks import TaskManager

    from relex.evaluate.tasks import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert {f"relex_{name}" for name in DEFAULT_TASKS} <= set(manager.all_tasks)


def test_relex_eval_scores_trained_toy_checkpoints_and_fails_if_worse(toy, tmp_path):
    """The installed ``relex eval`` on the toy task, on two checkpoints of the demo's run with a large known gap:
    the trained step 100 (~0.84 greedy) and its base (~0.34-0.38). Each score, problem by problem, is the one
    an independent greedy decode gives (transformers' ``generate`` + exact match, tests/naive.py), and equals
    the toy's own evaluator's; ``--fail-if-worse`` exits 3 when the second checkpoint is the worse one, naming
    it and the gap, and 0 in the other order."""
    from relex.toy import greedy_accuracy
    from relex.toy.task import heldout_problems
    from transformers import AutoModelForCausalLM

    run = toy["demo-final"]
    final, base = run / "checkpoint-100", run / "checkpoint-0"
    problems = heldout_problems()
    oracle = {"final": naive_toy_greedy(final), "base": naive_toy_greedy(base)}
    accuracy = {label: sum(flags) / len(problems) for label, flags in oracle.items()}
    for label, folder in (("final", final), ("base", base)):
        assert accuracy[label] == greedy_accuracy(AutoModelForCausalLM.from_pretrained(folder)), label
    assert accuracy["final"] >= 0.7 and accuracy["base"] <= 0.5  # a gap of 0.46-0.53 in the runs seen

    out = tmp_path / "worse.json"
    worse = relex("eval", f"final={final}", f"base={base}", "--tasks", "toy", "--fail-if-worse", "--margin", "10",
                  "--out", out)
    assert worse.returncode == 3, worse.stdout + worse.stderr
    data = json.loads(out.read_text())
    block = data["tasks"]["toy"]
    assert [c["label"] for c in data["checkpoints"]] == ["final", "base"]
    assert [c["prompt_format"] for c in data["checkpoints"]] == ["plain", "plain"]
    for label in ("final", "base"):
        result = block["results"][label]
        assert result["prompt_example"] == problems[0].prompt
        assert [p["reference"] for p in result["problems"]] == [p.answer for p in problems]
        assert [p["correct"][0] for p in result["problems"]] == oracle[label], label
        assert result["summary"]["accuracy"] == pytest.approx(accuracy[label], abs=1e-12), label
    difference = block["comparison"]["differences"]["base"]
    assert difference["diff"] == pytest.approx(accuracy["base"] - accuracy["final"], abs=1e-12)
    printed = " ".join(worse.stdout.split())
    gap = f"{100 * (accuracy['base'] - accuracy['final']):.1f}"
    assert ("gate: failed (exit 3): worse than final by more than 10 points with confidence (on toy): "
            f"base {gap} points") in printed, printed
    for label in ("final", "base"):
        assert f"{100 * accuracy[label]:.1f}" in printed

    better = relex("eval", f"base={base}", f"final={final}", "--tasks", "toy", "--fail-if-worse", "--margin", "10",
                   "--quiet")
    assert better.returncode == 0, better.stdout + better.stderr
    assert "gate: passed (exit 0)" in " ".join(better.stdout.split())
