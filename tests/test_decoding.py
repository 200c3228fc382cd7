"""Decode-time extrapolation (relex.decoding): the rules' end points, an independent cache-free decoder as an
oracle, stop conditions, the option syntax, and ``relex eval`` scoring the rules through real lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from relex.decoding import (
    LogitsExtrapolation,
    SelectiveExtrapolation,
    SingleModel,
    TwoModelDecoder,
    alpha_for,
    checkpoint_step,
    parse_logits,
    parse_selective,
)
from relex.errors import RelexInputError
from relex.testing import byte_level_tokenizer, save_tiny_model

PROMPTS = ["The answer is", "x", "Problem: 2+2=? Solution:"]  # three lengths: left padding in every batch


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    model_a = save_tiny_model(root / "checkpoint-100", seed=0, chat_template=True).eval()
    model_b = save_tiny_model(root / "checkpoint-200", seed=1, chat_template=True).eval()
    for step in (100, 200):
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return {"a": model_a, "b": model_b, "tokenizer": byte_level_tokenizer(), "root": root}


def _encoded(tokenizer, prompts=PROMPTS):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, padding=True, return_tensors="pt")


def _hf_greedy(model, tokenizer, new_tokens):
    """transformers' own greedy generate, cut after each row's end-of-sequence token."""
    encoded = _encoded(tokenizer)
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    rows = []
    for row in out[:, encoded["input_ids"].shape[1]:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id) + 1]
        rows.append(row)
    return rows


def _decode(pair, rule, **kwargs):
    decoder = TwoModelDecoder(pair["b"], rule, model_a=pair["a"], tokenizer=pair["tokenizer"])
    return decoder.generate(PROMPTS, **kwargs)


# ---------------------------------------------------------------------------------------------- end points
def test_alpha_one_is_checkpoint_b_and_alpha_zero_checkpoint_a(pair):
    assert _decode(pair, LogitsExtrapolation(1.0), max_new_tokens=24).token_ids == _hf_greedy(pair["b"], pair["tokenizer"], 24)
    assert _decode(pair, LogitsExtrapolation(0.0), max_new_tokens=24).token_ids == _hf_greedy(pair["a"], pair["tokenizer"], 24)
    # and something else in between / beyond
    assert _decode(pair, LogitsExtrapolation(3.0), max_new_tokens=24).token_ids != _hf_greedy(pair["b"], pair["tokenizer"], 24)


def test_end_points_hold_when_sampling(pair):
    sampled = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    alone_b = TwoModelDecoder(pair["b"], SingleModel(), tokenizer=pair["tokenizer"]).generate(PROMPTS, **sampled)
    alone_a = TwoModelDecoder(pair["a"], SingleModel(), tokenizer=pair["tokenizer"]).generate(PROMPTS, **sampled)
    assert _decode(pair, LogitsExtrapolation(1.0), **sampled).token_ids == alone_b.token_ids
    assert _decode(pair, LogitsExtrapolation(0.0), **sampled).token_ids == alone_a.token_ids
    again = _decode(pair, LogitsExtrapolation(1.0), **sampled)
    assert again.token_ids == alone_b.token_ids  # a seed fixes the completions
    assert _decode(pair, LogitsExtrapolation(1.0), **dict(sampled, seed=8)).token_ids != alone_b.token_ids


def test_selective_with_gamma_zero_is_the_rl_model(pair):
    for tau in (-0.3, 0.0, 5.0):  # 5.0: every token is below tau and resampled from the RL model itself
        out = _decode(pair, SelectiveExtrapolation(tau=tau, gamma=0.0), max_new_tokens=24)
        assert out.token_ids == _hf_greedy(pair["b"], pair["tokenizer"], 24)
    sampled = dict(max_new_tokens=24, temperature=1.0, seed=3)
    alone = TwoModelDecoder(pair["b"], SingleModel(), tokenizer=pair["tokenizer"]).generate(PROMPTS, **sampled)
    assert _decode(pair, SelectiveExtrapolation(tau=5.0, gamma=0.0), **sampled).token_ids == alone.token_ids


def test_selective_replaces_exactly_the_tokens_below_tau(pair):
    kept = _decode(pair, SelectiveExtrapolation(tau=-1e9, gamma=2.0), max_new_tokens=16)
    assert kept.token_ids == _hf_greedy(pair["b"], pair["tokenizer"], 16) and kept.stats.replaced == 0
    every = _decode(pair, SelectiveExtrapolation(tau=1e9, gamma=2.0), max_new_tokens=16)
    assert every.stats.replaced == every.stats.new_tokens > 0
    # resampling everywhere from log p_RL + gamma (log p_RL - log p_base) is logits extrapolation of the
    # log-probabilities with alpha = 1 + gamma: log_softmax only shifts each row, which argmax ignores
    assert every.token_ids == _decode(pair, LogitsExtrapolation(3.0), max_new_tokens=16).token_ids


# ------------------------------------------------------------------------------------- the naive oracle
def _naive(model_a, model_b, rule, input_ids, mask, new_tokens, temperature=0.0, top_p=1.0, generator=None):
    """Full forward passes over the whole sequence at every step (no cache), the rules written out again."""

    def sample(logits):
        if temperature == 0.0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_p < 1.0:
            probs, order = torch.softmax(logits, -1).sort(-1, descending=True)
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            cut = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p)
            logits = logits.masked_fill(cut, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)

    def last_logits(model, ids, mask):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1].float()

    ids, out = input_ids, []
    for _ in range(new_tokens):
        z_a, z_b = last_logits(model_a, ids, mask), last_logits(model_b, ids, mask)
        if isinstance(rule, LogitsExtrapolation):
            token = sample(z_a + rule.alpha * (z_b - z_a))
        else:
            token = sample(z_b)
            lp_a, lp_b = torch.log_softmax(z_a, -1), torch.log_softmax(z_b, -1)
            delta = lp_b.gather(-1, token[:, None])[:, 0] - lp_a.gather(-1, token[:, None])[:, 0]
            if rule.gamma != 0.0:
                other = sample(lp_b + rule.gamma * (lp_b - lp_a))
                token = torch.where(delta < rule.tau, other, token)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("rule", [LogitsExtrapolation(2.5), LogitsExtrapolation(-0.5),
                                  SelectiveExtrapolation(tau=0.35, gamma=1.0)], ids=str)
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.8, 0.9)])
def test_cached_decoder_matches_a_naive_loop(pair, rule, temperature, top_p):
    encoded = _encoded(pair["tokenizer"])
    decoder = TwoModelDecoder(pair["b"], rule, model_a=pair["a"], tokenizer=pair["tokenizer"], eos_token_id=[])
    tokens, lengths, reasons, stats = decoder.generate_ids(
        encoded["input_ids"], encoded["attention_mask"], max_new_tokens=20, temperature=temperature, top_p=top_p,
        generator=torch.Generator().manual_seed(11))
    expected = _naive(pair["a"], pair["b"], rule, encoded["input_ids"], encoded["attention_mask"], 20,
                      temperature, top_p, torch.Generator().manual_seed(11))
    assert tokens.tolist() == expected.tolist()
    assert lengths == [20, 20, 20] and reasons == ["length"] * 3 and stats.new_tokens == 60
    if isinstance(rule, SelectiveExtrapolation):
        assert 0 < stats.replaced < stats.new_tokens  # the test exercises both branches


def test_a_padded_row_decodes_as_it_would_alone(pair):
    batch = _decode(pair, LogitsExtrapolation(2.0), max_new_tokens=12)
    for index, prompt in enumerate(PROMPTS):
        decoder = TwoModelDecoder(pair["b"], LogitsExtrapolation(2.0), model_a=pair["a"], tokenizer=pair["tokenizer"])
        assert decoder.generate(prompt, max_new_tokens=12).token_ids[0] == batch.token_ids[index]


# --------------------------------------------------------------------------------------- stop conditions
def test_stop_strings_eos_and_budget(pair):
    tokenizer = pair["tokenizer"]
    free = _decode(pair, LogitsExtrapolation(2.0), max_new_tokens=16, skip_special_tokens=False)
    assert free.finish_reasons == ["length"] * 3 and all(len(ids) == 16 for ids in free.token_ids)
    text = free.texts[0]
    # a stop string that first occurs past the start of the completion (a whole, printable character)
    stop = next(c for i, c in enumerate(text) if i >= 2 and c.isprintable() and c != "\ufffd" and c not in text[:i])
    stopped = _decode(pair, LogitsExtrapolation(2.0), max_new_tokens=16, stop=[stop], skip_special_tokens=False)
    assert stopped.texts[0] == text[:text.index(stop)]
    assert stopped.finish_reasons[0] == "stop" and stopped.token_ids[0] == free.token_ids[0][:len(stopped.token_ids[0])]
    assert stop in tokenizer.decode(stopped.token_ids[0]) and len(stopped.token_ids[0]) < 16

    eos = free.token_ids[1][4]
    decoder = TwoModelDecoder(pair["b"], LogitsExtrapolation(2.0), model_a=pair["a"], tokenizer=tokenizer,
                              eos_token_id=eos)
    ended = decoder.generate(PROMPTS, max_new_tokens=16)
    first = free.token_ids[1].index(eos)
    assert ended.token_ids[1] == free.token_ids[1][:first + 1] and ended.finish_reasons[1] == "eos"
    # the other rows are not disturbed by a finished neighbour
    for row in (0, 2):
        ids = free.token_ids[row]
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        assert ended.token_ids[row] == ids[:cut]

    short = _decode(pair, LogitsExtrapolation(2.0), max_new_tokens=3)
    assert [len(ids) for ids in short.token_ids] == [3, 3, 3]


def test_different_vocabularies_are_refused(pair, tmp_path):
    other = save_tiny_model(tmp_path / "other", seed=2, chat_template=False)
    other.resize_token_embeddings(300)
    with pytest.raises(RelexInputError, match="different vocabularies"):
        TwoModelDecoder(pair["b"], LogitsExtrapolation(2.0), model_a=other)


def test_from_pretrained_loads_both_folders(pair):
    root = pair["root"]
    decoder = TwoModelDecoder.from_pretrained(root / "checkpoint-200", LogitsExtrapolation(1.0),
                                              a=root / "checkpoint-100", device_a="cpu", device_b="cpu")
    assert decoder.generate(PROMPTS, max_new_tokens=8).token_ids == _hf_greedy(pair["b"], pair["tokenizer"], 8)


# -------------------------------------------------------------------------------------------- the syntax
def test_logits_spec_from_two_folders(pair):
    root = pair["root"]
    spec = parse_logits(f"a={root / 'checkpoint-100'},b={root / 'checkpoint-200'},alpha=2.5,label=x2.5")
    assert (spec.kind, spec.alpha, spec.label, spec.model_name) == ("logits", 2.5, "x2.5", "relex-logits")
    spec = parse_logits(f"a={root / 'checkpoint-100'},b={root / 'checkpoint-200'},target=500,device_a=cpu")
    assert (spec.step_a, spec.step_b, spec.target, spec.alpha) == (100, 200, 500, 4.0)
    assert spec.default_label() == "logits→500" and spec.model_args()["device_a"] == "cpu"
    assert alpha_for(100, 200, 500) == 4.0 and checkpoint_step(root / "checkpoint-200") == 200

    unnamed = root / "some-folder"
    unnamed.mkdir(exist_ok=True)
    with pytest.raises(RelexInputError, match="step of a is unknown"):
        parse_logits(f"a={unnamed},b={root / 'checkpoint-200'},target=500")
    assert parse_logits(f"a={unnamed},b={root / 'checkpoint-200'},target=500,a_step=50").alpha == 3.0
    for bad, message in [("a=x,b=y", "either alpha"), ("a=x,b=y,alpha=1,target=3", "either alpha"),
                         ("a=x,alpha=2", "name the two"), ("a=x,b=y,alpha=two", "must be a number"),
                         ("a=x,b=y,alpha=1,beta=2", "unknown key 'beta'"), ("a=x,a=y,alpha=1", "given twice"),
                         ("a=x,b=y,alpha=1,steps=1-5", "give run=RUN")]:
        with pytest.raises(RelexInputError, match=message):
            parse_logits(bad)


def test_logits_spec_from_a_run(tmp_path):
    run = tmp_path / "run"
    for step in (0, 10, 20, 30, 40):
        save_tiny_model(run / f"checkpoint-{step}", seed=step, chat_template=False, hidden=16, layers=1)
    spec = parse_logits(f"run={run},target=100")
    assert (spec.step_a, spec.step_b, spec.alpha) == (30, 40, 7.0)
    assert spec.a == str(run / "checkpoint-30") and spec.b == str(run / "checkpoint-40")
    spec = parse_logits(f"run={run},steps=10,20,target=100")  # a comma list continues the value of steps=
    assert (spec.step_a, spec.step_b, spec.alpha) == (10, 20, 9.0)
    spec = parse_logits(f"run={run},max_step=20,a=0,target=100")
    assert (spec.step_a, spec.step_b, spec.alpha) == (0, 20, 5.0)
    with pytest.raises(RelexInputError, match="a=15 is not a step"):
        parse_logits(f"run={run},a=15,target=100")
    selective = parse_selective(f"run={run},max_step=30,tau=-0.5")
    assert (selective.a, selective.b) == (str(run / "checkpoint-0"), str(run / "checkpoint-30"))
    assert (selective.tau, selective.gamma, selective.model_name) == (-0.5, 0.1, "relex-selective")
    spec = parse_selective("base=B,rl=R,gamma=0.05,device_rl=cpu,device_base=cpu")
    assert (spec.a, spec.b, spec.tau, spec.gamma, spec.device_a, spec.device_b) == ("B", "R", -0.3, 0.05, "cpu", "cpu")
    with pytest.raises(RelexInputError, match="name the two models"):
        parse_selective("rl=R")


# ------------------------------------------------------------------------------------------ the toy model
def test_toy_checkpoints_decode_as_the_toy_scorer_does(tmp_path):
    from transformers import AutoModelForCausalLM

    from relex.toy import ToyConfig, train_run
    from relex.toy.evaluate import ANSWER_TOKENS, answer_ids, generate, prompt_ids, rewards
    from relex.toy.task import heldout_problems

    run = train_run(tmp_path / "run", ToyConfig.ci(steps=2, checkpoint_every=1, num_threads=1), evaluate=False)
    paths = [Path(c["path"]) for c in run["checkpoints"]]
    base, last = (AutoModelForCausalLM.from_pretrained(paths[i]).eval() for i in (0, -1))
    problems = heldout_problems()[:64]
    prompts, answers = prompt_ids(problems), answer_ids(problems)
    expected = generate(last, prompts)
    for rule in (SingleModel(), LogitsExtrapolation(1.0), SelectiveExtrapolation(gamma=0.0)):
        tokens, *_ = TwoModelDecoder(last, rule, model_a=base).generate_ids(prompts, max_new_tokens=ANSWER_TOKENS)
        padded = torch.where(tokens == 0, expected, tokens)  # rows padded after <eos>: the toy keeps sampling
        assert torch.equal(padded, expected)
        assert rewards(tokens, answers).tolist() == rewards(expected, answers).tolist()


def test_lm_eval_model_scores_with_the_extrapolated_logits(pair):
    pytest.importorskip("lm_eval")
    from relex.decoding.lm_eval_model import LogitsExtrapolationLM, SelectiveExtrapolationLM

    root = pair["root"]
    ids = _encoded(pair["tokenizer"], ["The answer is 4"])["input_ids"]
    with torch.no_grad():
        z_a, z_b = pair["a"](ids).logits, pair["b"](ids).logits
    lm = LogitsExtrapolationLM(pretrained=str(root / "checkpoint-200"), a=str(root / "checkpoint-100"), alpha=2.0,
                               device="cpu", batch_size=1)
    assert torch.allclose(lm._model_call(ids), z_a + 2.0 * (z_b - z_a), atol=1e-5)
    selective = SelectiveExtrapolationLM(pretrained=str(root / "checkpoint-200"), a=str(root / "checkpoint-100"),
                                         device="cpu", batch_size=1)
    with pytest.raises(NotImplementedError, match="decoding procedure"):
        selective._model_call(ids)


# --------------------------------------------------------------------------------- relex eval, end to end
@pytest.fixture
def _one_thread_workers(monkeypatch):
    for name, value in (("OMP_NUM_THREADS", "1"), ("OMP_WAIT_POLICY", "PASSIVE"), ("MKL_NUM_THREADS", "1"),
                        ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)


@pytest.mark.slow
def test_relex_eval_scores_both_rules_on_math_tasks(pair, small_math_dir, tmp_path, capsys, _one_thread_workers):
    pytest.importorskip("lm_eval")
    pytest.importorskip("math_verify")
    from relex_cli.app import main

    root = pair["root"]
    a, b = root / "checkpoint-100", root / "checkpoint-200"
    out = tmp_path / "results.json"
    code = main(["eval", f"b={b}", "--tasks", "aime24,math500", "--data-dir", str(small_math_dir), "--limit", "2",
                 "--max-new-tokens", "12", "--completions", "--quiet", "--out", str(out),
                 "--logits-extrapolate", f"a={a},b={b},target=200", "--logits-extrapolate", f"a={a},b={b},alpha=3",
                 "--selective", f"base={a},rl={b},gamma=0,label=selective-g0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(out.read_text())
    labels = [c["label"] for c in data["checkpoints"]]
    assert labels == ["b", "logits→200", "logits α=3", "selective-g0"]
    assert data["checkpoints"][1]["decoding"]["alpha"] == 1.0 and data["checkpoints"][1]["decoding"]["a"] == str(a)
    for task in ("aime24", "math500"):
        results = data["tasks"][task]["results"]
        reference = [p["completions"] for p in results["b"]["problems"]]
        assert [p["completions"] for p in results["logits→200"]["problems"]] == reference
        assert [p["completions"] for p in results["selective-g0"]["problems"]] == reference
        assert [p["completions"] for p in results["logits α=3"]["problems"]] != reference
        difference = data["tasks"][task]["comparison"]["differences"]["logits→200"]
        assert (difference["diff"], difference["ci_low"], difference["ci_high"]) == (0.0, 0.0, 0.0)
    for label in labels:
        assert label in captured.out


@pytest.mark.slow
def test_relex_eval_scores_both_rules_on_the_toy(tmp_path, capsys, _one_thread_workers):
    pytest.importorskip("lm_eval")
    from relex.toy import ToyConfig, train_run
    from relex_cli.app import main

    run_dir = tmp_path / "run"
    train_run(run_dir, ToyConfig.ci(steps=4, checkpoint_every=2, num_threads=1), evaluate=False)
    out = tmp_path / "toy.json"
    code = main(["eval", f"final={run_dir / 'checkpoint-4'}", "--tasks", "toy", "--limit", "60", "--quiet",
                 "--out", str(out), "--logits-extrapolate", f"run={run_dir},target=4,label=alpha1",
                 "--logits-extrapolate", f"run={run_dir},max_step=2,a=0,target=4",
                 "--selective", f"run={run_dir},tau=0,gamma=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(out.read_text())
    results = data["tasks"]["toy"]["results"]
    assert list(results) == ["final", "alpha1", "logits→4", "selective τ=0 γ=1"]
    assert data["checkpoints"][2]["decoding"]["alpha"] == 2.0  # steps 0 and 2 carried to step 4
    flags = {label: [p["correct"][0] for p in result["problems"]] for label, result in results.items()}
    assert flags["alpha1"] == flags["final"] and len(flags["final"]) == 60
    assert data["tasks"]["toy"]["comparison"]["differences"]["alpha1"]["diff"] == 0.0
