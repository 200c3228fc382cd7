"""The probe: verifying predictions on training problems, and choosing the target on them.

Through the installed ``relex`` command on the demo's own toy run (its first 20 steps observed; the cached
100-step run of ``tests/toy_runs.py``) and its noisy twin: ``--target-step auto --probe toy-train`` writes the one
checkpoint the probe chose, better than the last observed one on the held-out problems the probe never saw
(scored independently, ``tests/naive.py``), and records the curve; on the noisy run every candidate loses and
nothing is written (exit 3). The statistics of the search are checked against hand-made scores.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from command import one_error_line, relex
from naive import naive_answer_logprob, naive_toy_greedy, sums
from relex.probe.problems import ProbeSet, load_probe
from relex.probe.search import search, target_grid

WINDOW = 20


def test_auto_horizon_on_the_demo_run_writes_the_chosen_checkpoint(toy, tmp_path):
    out = tmp_path / "auto"
    done = relex("extrapolate", toy["demo-final"], "--max-step", WINDOW, "--target-step", "auto", "--probe",
                 "toy-train", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "relex.json").read_text())
    curve = record["probe"]["curve"]
    chosen = record["probe"]["chosen"]
    assert record["target_steps"] == [chosen] and record["target_step"] == chosen
    # candidates from just past the last observed step to the horizon the window backtest vouches for (220),
    # each twice the previous
    assert [c["step"] for c in curve["candidates"]] == [40, 80, 160]
    better = [c for c in curve["candidates"] if c["decision"] == "better"]
    assert chosen in [c["step"] for c in better]
    assert all(c["difference"]["ci_low"] > 0 for c in better)
    assert curve["tokens"] > 0 and (out / "probe.png").stat().st_size > 10_000
    assert record["verdict"]["target_step"] == chosen  # the weights' verdict, beside the probe, at the chosen step
    assert record["probe"]["decided_by"] == "probe"
    assert len(list(out.glob("model-*.safetensors"))) == 1 and not (out / ".candidates").exists()
    # the held-out problems, never seen by the probe: the chosen checkpoint is far better than the last observed
    last = naive_toy_greedy(toy["demo-final"] / f"checkpoint-{WINDOW}")
    picked = naive_toy_greedy(out)
    assert sum(picked) / 300 - sum(last) / 300 >= 0.25, (sum(picked), sum(last))
    assert f"wrote step {chosen}" in done.stdout and "the probe chose step" in done.stdout


def test_auto_horizon_on_the_noisy_run_writes_nothing(toy, tmp_path):
    out = tmp_path / "auto"
    done = relex("extrapolate", toy["noisy"], "--max-step", WINDOW, "--target-step", "auto", "--probe", "toy-train",
                 "--out", out, "--report", tmp_path / "report.json")
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert not out.exists() and not list(tmp_path.glob(".auto*"))
    assert "no target beats the last observed step 20 on the probe" in done.stderr
    assert not (tmp_path / "report.json").exists()  # nothing written, not even the report
    assert re.search(r"probe cost: [\d,]+ forward tokens, [\d.]+ s", done.stdout), done.stdout[-1000:]
    done = relex("check", toy["noisy"], "--max-step", WINDOW, "--target-step", "auto", "--probe", "toy-train",
                 "--json", tmp_path / "check.json", "--quiet")
    assert done.returncode == 3
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["gate"]["decided_by"] == "probe" and not check["gate"]["passed"]
    assert check["probe"]["chosen"] is None
    assert all(c["decision"] == "worse" for c in check["probe"]["curve"]["candidates"])


def test_a_fixed_target_is_verified_the_same_way(toy, tmp_path):
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--target-step", 100, "--probe", "toy-train",
                 "--json", tmp_path / "check.json", "--quiet")
    assert done.returncode == 0, done.stdout[-2000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["probe"]["chosen"] == 100 and [c["step"] for c in check["probe"]["curve"]["candidates"]] == [100]


def test_bad_probes_are_one_line(toy, tmp_path):
    done = relex("extrapolate", toy["demo-final"], "--max-step", WINDOW, "--target-step", "auto", "--out", tmp_path / "o")
    assert done.returncode == 2 and "--target-step auto needs --probe" in one_error_line(done)
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--probe", "aime24", "--target-step", 100)
    assert done.returncode == 2 and "names a benchmark" in one_error_line(done)
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--probe", "toy-train", "--target-step", 100,
                 "--lenient")
    assert done.returncode == 2 and "give one of them" in one_error_line(done)
    done = relex("extrapolate", toy["demo-final"], "--max-step", WINDOW, "--probe", "toy-train", "--target-step",
                 100, "--require", "plausible", "--out", tmp_path / "o")
    assert done.returncode == 2 and "give one of them" in one_error_line(done) and not (tmp_path / "o").exists()
    done = relex("extrapolate", toy["demo-final"], "--max-step", WINDOW, "--probe", "toy-train", "--target-step",
                 100, "--output", "lora", "--out", tmp_path / "o")
    assert done.returncode == 2 and "--output lora needs a LoRA run" in one_error_line(done)
    assert not (tmp_path / "o").exists()
    bad = tmp_path / "probe.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"answer": "3"}\n')
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--probe", bad, "--target-step", 100)
    assert done.returncode == 2 and f"{bad}: line 2" in one_error_line(done)


def test_a_json_lines_probe_gets_the_tokenizers_bos_and_stays_within_the_context(toy, tmp_path):
    """The toy's tokenizer leads every text with <bos>, without which the model answers nothing: a probe file of
    the toy's training sums as ``text`` records scores as the model's own tokenizer and ``generate`` score it
    (``tests/naive.py``), not 0. The default 256 new tokens are cut to the 32-token context the model has."""
    from relex.toy.task import train_problems

    problems = train_problems()[:64]
    probe = tmp_path / "sums.jsonl"
    probe.write_text("".join(json.dumps({"text": p.prompt, "answer": p.answer, "verifier": "last-number"}) + "\n"
                             for p in problems))
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--target-step", 100, "--probe", probe,
                 "--probe-looks", 1, "--json", tmp_path / "check.json")
    assert done.returncode in (0, 3), done.stderr[-2000:]
    assert "maximum length" not in done.stderr  # transformers' warning of generating past the context
    curve = json.loads((tmp_path / "check.json").read_text())["probe"]["curve"]
    assert curve["reference_problems"] == 64
    oracle = sum(naive_toy_greedy(toy["demo-final"] / f"checkpoint-{WINDOW}", problems)) / 64
    # the oracle's exact match implies the verifier's last number; they differ only on a shorter form ("57")
    assert oracle >= 0.2 and oracle - 1e-9 <= curve["reference_mean"] <= oracle + 2 / 64, (curve, oracle)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": "12+34=" * 6, "answer": "46", "verifier": "last-number"}) + "\n")
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--target-step", 100, "--probe", long)
    assert done.returncode == 2 and "fill the model's context of 32 tokens" in one_error_line(done)


class _Scores:
    def __init__(self, values, step=0):
        self.values, self.tokens, self.step = np.asarray(values, dtype=float), 0, step

    def score(self, indices, mode):
        indices = list(indices)
        self.tokens += len(indices)
        return self.values[indices]


def test_the_search_drops_losers_stops_once_decided_and_picks_the_nearest_of_the_best():
    n = 60
    probe = ProbeSet("hand-made", "toy", tuple(range(n)), 4)
    rng = np.random.default_rng(0)
    reference = _Scores(rng.random(n) < 0.5, step=10)
    better, worse = np.ones(n), np.zeros(n)
    # 14, 20 and 28 solve everything, the reference about half, 40 nothing
    candidates = {14: better, 20: better, 28: better, 40: worse}
    curve = search(reference, {t: (lambda v=v: _Scores(v)) for t, v in candidates.items()}, probe, looks=3)
    decisions = {c.step: c.decision for c in curve.candidates}
    assert decisions[40] == "worse" and decisions[14] == decisions[20] == decisions[28] == "better"
    assert curve.chosen == 14  # tied with 20 and 28: the nearest step
    # every remaining candidate decided better after the first look: the search stopped there
    assert curve.looks_done == 1 and all(c.problems == 20 for c in curve.candidates)
    assert reference.tokens == 20
    # a family-wise confidence split over 4 candidates and 3 looks
    assert curve.candidates[0].difference["confidence"] == pytest.approx(1 - 0.05 / 12)


def test_the_target_grid_doubles_up_to_the_limit_and_coarsens_past_eight():
    assert target_grid(20, 220) == [40, 80, 160]
    assert target_grid(10, 100) == [20, 40, 80]
    assert target_grid(20, 39) == [] and target_grid(20, 20) == []
    assert target_grid(10, 100, factor=2 ** 0.5) == [14, 20, 28, 40, 57, 80]
    # 2^1 … 2^12 would be 12 candidates: the factor grows to 2^1.5 (8 candidates)
    assert target_grid(1, 5000) == [round(2 ** (1.5 * k)) for k in range(1, 9)] == [3, 8, 23, 64, 181, 512, 1448, 4096]


def test_the_probe_set_is_the_training_split():
    probe = load_probe("toy-train", 64)
    from relex.toy.task import heldout_problems

    held = {p.prompt for p in heldout_problems()}
    assert len(probe) == 64 and not held & {p.prompt for p in probe.problems}
    assert load_probe("toy-train", 64).problems == probe.problems  # a fixed seed: the same problems


# -- a LoRA run: the last observed checkpoint is an adapter -------------------------------------------------------
LORA_STEPS = (2, 4, 6, 8, 10, 12)


def _lora_sum_run(root, lr: float = 0.03):
    """A TRL-style PEFT LoRA run on a tiny Llama: full-batch SGD on 128 "a+b=c" sums, an adapter every 2 steps.
    At this learning rate the loss still falls steadily at step 12, so going on along the trajectory helps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from relex.testing import byte_level_tokenizer, save_tiny_model

    base, run = root / "base", root / "run"
    save_tiny_model(base)
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = tokenizer([f"{a}+{b}={a + b}" for a, b in sums()[:128]], return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[:, :6] = -100  # the loss on the answer only
    for step in range(1, max(LORA_STEPS) + 1):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in LORA_STEPS:
            folder = run / f"checkpoint-{step}"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    probe = root / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": f"{a}+{b}=", "answer": str(a + b), "verifier": "last-number"}) + "\n"
                             for a, b in sums()[:64]))
    return base, run, probe


def test_a_lora_run_is_probed_against_its_merged_last_adapter(tmp_path):
    """The reference of a LoRA run is the base plus the last adapter (PEFT's own merge is the oracle); the chosen
    prediction is written merged and beats it on sums the probe never saw; with ``--output lora`` it is written
    as an adapter instead."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from relex.testing import byte_level_tokenizer

    base, run, probe = _lora_sum_run(tmp_path)
    out = tmp_path / "auto"
    done = relex("extrapolate", run, "--base", base, "--target-step", "auto", "--probe", probe, "--probe-mode",
                 "logprob", "--probe-looks", 1, "--out", out)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((out / "relex.json").read_text())
    curve, chosen = record["probe"]["curve"], record["probe"]["chosen"]
    assert record["sources"]["observed_kind"] == "lora" and curve["reference_step"] == 12
    assert [c["step"] for c in curve["candidates"]] == [24, 48, 96] and chosen is not None
    # a full model folder (the base's config, the adapter's tokenizer), not an adapter
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists() and (out / "probe.png").is_file()
    tokenizer = byte_level_tokenizer()
    probed = sums()[:64]
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                       run / "checkpoint-12").merge_and_unload().eval()
    assert curve["reference_mean"] == pytest.approx(naive_answer_logprob(merged, tokenizer, probed), abs=1e-4)
    written = AutoModelForCausalLM.from_pretrained(out).eval()
    scored = next(c for c in curve["candidates"] if c["step"] == chosen)
    assert scored["mean"] == pytest.approx(naive_answer_logprob(written, tokenizer, probed), abs=1e-4)
    unseen = sums()[128:192]  # neither trained on nor probed
    gain = naive_answer_logprob(written, tokenizer, unseen) - naive_answer_logprob(merged, tokenizer, unseen)
    assert gain > 0.02, (curve["reference_mean"], scored["mean"], gain)  # measured: −5.187, −5.116, +0.077
    assert not list(tmp_path.glob("**/last-observed"))  # the scratch reference is gone with the candidates
    # --output lora: the same choice, written as an adapter PEFT loads; it scores what the probed candidate scored
    done = relex("extrapolate", run, "--base", base, "--target-step", "auto", "--probe", probe, "--probe-mode",
                 "logprob", "--probe-looks", 1, "--out", tmp_path / "adapter", "--output", "lora")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "adapter" / "relex.json").read_text())
    assert record["output"] == "lora" and record["target_step"] == record["probe"]["chosen"] == chosen
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "adapter" / "config.json").exists()
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    assert naive_answer_logprob(adapter, tokenizer, probed) == pytest.approx(scored["mean"], abs=1e-4)


def test_a_probe_that_cannot_score_the_run_is_refused_before_the_candidates_are_written(toy, tmp_path):
    import shutil

    from relex.testing import save_tiny_model

    # a JSON Lines probe on a run whose checkpoints have no tokenizer: one line, nothing written
    run = tmp_path / "no-tokenizer"
    for step in (0, 5, 10, 15, 20):
        shutil.copytree(toy["demo-final"] / f"checkpoint-{step}", run / f"checkpoint-{step}",
                        ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "12+34=", "answer": "46", "verifier": "last-number"}\n')
    done = relex("extrapolate", run, "--target-step", "auto", "--probe", probe, "--out", tmp_path / "o")
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_error_line(done)
    assert "cannot load the tokenizer to probe the checkpoint" in line and "checkpoint-20" in line
    assert "writing the candidates" not in done.stderr + done.stdout
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))
    # the toy's probe on a model that is not the toy's
    save_tiny_model(tmp_path / "other" / "checkpoint-0")
    for step in (5, 10, 15):
        shutil.copytree(tmp_path / "other" / "checkpoint-0", tmp_path / "other" / f"checkpoint-{step}")
    done = relex("check", tmp_path / "other", "--target-step", "auto", "--probe", "toy-train")
    assert done.returncode == 2 and "scores the toy task's model" in one_error_line(done)
    # a benchmark's file, named as the benchmark
    bench = tmp_path / "aime24.jsonl"
    bench.write_text('{"problem": "1+1?", "answer": "2"}\n')
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--target-step", "auto", "--probe", bench)
    assert done.returncode == 2 and "named like the benchmark aime24" in one_error_line(done)


def test_probe_settings_without_a_probe_or_auto_are_refused(toy, tmp_path):
    for args, fragment in ((["--target-step", 100, "--probe-limit", 5], "--probe-limit sets the probe"),
                           (["--target-step", 100, "--horizon-limit", 50], "--horizon-limit bounds"),
                           (["--target-step", "auto", "--probe", "toy-train", "--horizon-limit", 30],
                            "the grid starts at twice the last observed step (40)")):
        done = relex("check", toy["demo-final"], "--max-step", WINDOW, *args)
        assert done.returncode == 2 and fragment in one_error_line(done), (args, done.stderr)


def test_the_summary_and_the_plan_show_the_probe(toy, tmp_path):
    summary = tmp_path / "summary.md"
    done = relex("check", toy["demo-final"], "--max-step", WINDOW, "--target-step", "auto", "--probe", "toy-train",
                 "--summary", summary, "--json", tmp_path / "check.json", "--quiet")
    assert done.returncode == 0
    text, check = summary.read_text(), json.loads((tmp_path / "check.json").read_text())
    curve = check["probe"]["curve"]
    assert "decided by the probe" in text and "**weights' verdict**" in text
    for c in curve["candidates"]:  # one row per candidate, with its decision; the chosen one marked
        assert re.search(rf"\| step {c['step']} \| {c['mean']:.3f} \| {c['problems']} \| .* \| {c['decision']}", text)
    assert f"step {check['probe']['chosen']} |" in text and "**chosen**" in text
    assert f"| last observed (step {WINDOW}) | {curve['reference_mean']:.3f} | {curve['reference_problems']} |" in text
    done = relex("extrapolate", toy["demo-final"], "--max-step", WINDOW, "--target-step", "auto", "--probe",
                 "toy-train", "--out", tmp_path / "o", "--dry-run")
    assert done.returncode == 0 and not (tmp_path / "o").exists()
    assert "candidates: step 40, 80, 160 (the probe chooses one)" in done.stdout
    assert "scratch: 3 checkpoints of" in done.stdout
    assert "the weights' verdict: carried to the step the probe chooses" in done.stdout


def test_a_probe_that_tells_nothing_apart_says_so(tmp_path):
    """Greedy decoding of a tiny random LoRA run answers no sum: every checkpoint scores 0 on every problem."""
    base, run, probe = _lora_sum_run(tmp_path)
    done = relex("check", run, "--base", base, "--target-step", "auto", "--probe", probe, "--probe-max-new-tokens", 4,
                 "--json", tmp_path / "check.json")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the probe tells nothing apart" in done.stdout + done.stderr
    gate = json.loads((tmp_path / "check.json").read_text())["gate"]
    assert "the probe tells nothing apart; check its prompts' format, its verifier or --probe-max-new-tokens" in \
        gate["reason"]
