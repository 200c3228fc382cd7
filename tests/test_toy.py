"""The toy RLVR run: checkpoint layout, determinism, GRPO advantages, the verifier and the splits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from relex.toy import ToyConfig, group_advantages, heldout_split, score, train_run, train_split
from relex.toy import task
from relex.toy.train import completion_mask, grpo_loss


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toy") / "run"
    summary = train_run(out, ToyConfig.ci())
    return out, summary


def test_run_writes_loadable_checkpoints(ci_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = ci_run
    config = ToyConfig.ci()
    expected = [0] + list(range(config.checkpoint_every, config.steps + 1, config.checkpoint_every))
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == expected
    assert [c["step"] for c in summary["checkpoints"]] == expected
    for step in expected:
        folder = out / f"checkpoint-{step}"
        for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "trainer_state.json"):
            assert (folder / name).is_file(), (folder, name)
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
    folder = out / f"checkpoint-{config.steps}"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("12+34=", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id and ids.shape[1] == 7
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert isinstance(text, str)
    assert (out / "toy_run.json").is_file()


def test_training_is_deterministic(ci_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = ci_run
    train_run(tmp_path / "again", ToyConfig.ci())
    step = ToyConfig.ci().steps
    a = load_file(out / f"checkpoint-{step}" / "model.safetensors")
    b = load_file(tmp_path / "again" / f"checkpoint-{step}" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    base = load_file(out / "checkpoint-0" / "model.safetensors")
    assert any(not torch.equal(base[n], a[n]) for n in a), "RL did not move the weights"


def test_group_advantages_match_naive():
    torch.manual_seed(0)
    r = (torch.rand(6, 5) < 0.4).float()
    r[0] = 1.0  # a degenerate group: all correct
    adv = group_advantages(r)
    for g in range(r.shape[0]):
        values = r[g].tolist()
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        for i, v in enumerate(values):
            assert adv[g, i].item() == pytest.approx((v - mean) / (std + 1e-4), abs=1e-5)
    assert torch.all(adv[0] == 0)
    centred = group_advantages(r, scale=False)
    assert torch.allclose(centred, r - r.mean(dim=1, keepdim=True))


def test_grpo_loss_clips_and_masks():
    logp = torch.zeros(2, 4)
    old = torch.full((2, 4), -1.0)  # ratio e > 1 + eps
    adv = torch.tensor([1.0, -1.0])
    mask = completion_mask(torch.tensor([[5, 6, 2, 9], [5, 6, 7, 2]]))
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    loss = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    # positive advantage: clipped at 1.2; negative: min(-e, -1.2) = -e
    expected = (math.e - 1.2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_verifier():
    assert score("125", "125")
    assert score(" 125\n", "125")
    assert score("125<eos>", "125")
    assert not score("124", "125")
    assert not score("1250", "125")
    assert not score("25", "025")
    assert not score("", "125")
    for record in heldout_split()[:20]:
        a, b = record["prompt"][:-1].split("+")
        assert record["answer"] == f"{int(a) + int(b):03d}"
        assert score(record["answer"], record["answer"])


def test_splits_are_disjoint_and_fixed():
    held = heldout_split()
    train = train_split()
    assert len(held) == task.HELDOUT_SIZE
    held_prompts = {r["prompt"] for r in held}
    train_prompts = {r["prompt"] for r in train}
    assert not held_prompts & train_prompts
    swapped = {f"{p[3:5]}+{p[0:2]}=" for p in held_prompts}
    assert not swapped & train_prompts
    assert heldout_split() == held  # independent of any training seed
    assert all(set(r) == {"prompt", "answer"} for r in held)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError):
        ToyConfig(objective="ppo")
    with pytest.raises(ValueError):
        ToyConfig(optimizer="lion")


def test_presets():
    demo, noisy, ci = ToyConfig.demo(), ToyConfig.noisy(), ToyConfig.ci()
    assert demo.warmup_key() == noisy.warmup_key()  # the two share one base
    assert (demo.optimizer, noisy.optimizer) == ("sgd", "adam")
    assert ci.steps * ci.prompts_per_step * ci.samples_per_prompt < demo.prompts_per_step * demo.samples_per_prompt
    assert ToyConfig.from_dict(demo.to_dict()) == demo
    assert ToyConfig.demo(lr=0.5).lr == 0.5


def test_the_tests_toy_runs_are_retrained_when_the_trainer_changes(toy, tmp_path):
    """tests/toy_runs.py keys each cached run on its config and on the toy trainer's source: a run trained by
    other code (one byte changed in relex/toy/) is not reused."""
    import shutil

    import relex.toy
    from toy_runs import finished, run_key, trainer_digest

    source = Path(relex.toy.__file__).resolve().parent
    copy = tmp_path / "toy"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert trainer_digest(copy) == trainer_digest()
    train = copy / "train.py"
    train.write_text(train.read_text() + "\n")
    changed = trainer_digest(copy)
    assert changed != trainer_digest()
    config = ToyConfig.demo(steps=20)
    assert finished(toy["demo"], run_key(config, trainer_digest()))
    assert not finished(toy["demo"], run_key(config, changed))
    assert not finished(toy["demo"], run_key(config.replace(lr=0.002), trainer_digest()))
