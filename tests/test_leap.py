"""Leaping during training (relex.integrations.leap): LeapCallback in a real transformers Trainer.

Every run is a real ``transformers.Trainer`` training the tiny Llama of ``relex.testing`` on CPU. Its batch
is 8 copies of one sequence, so every step sees the same batch whatever the sampler's order (a run resumed
from a checkpoint sees what the uninterrupted run saw). What a jump writes is checked against relex's
engine run afterwards on the segment's weights saved as checkpoints.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from relex.analysis.verdict import run_verdict
from relex.api import extrapolate
from relex.integrations.leap import LeapOptions, Leaper, fit_segment
from relex.integrations.leap_callback import LeapCallback
from relex.options import RunOptions
from relex.run import PassResult, open_run
from relex.testing import load_state, tiny_config
from naive import naive_relex

REL = 1e-6  # figures computed twice from the same tensors agree to float32 summation order


class SameBatch(torch.utils.data.Dataset):
    """8 copies of one random byte sequence: every batch is the same, in any order."""

    def __init__(self):
        self.ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"input_ids": self.ids, "labels": self.ids}


class Watcher(TrainerCallback):
    """Copies the trainable weights and the optimizer state at each step end (where it stands in the list
    of callbacks decides whether it sees them before or after the leap callback)."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.optimizer: dict[int, dict] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        self.optimizer[state.global_step] = {
            i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in
            enumerate(inner.state[p] for group in inner.param_groups for p in group["params"])}


class StopAt(TrainerCallback):
    """Ends training after ``step`` (a run whose ``max_steps`` leaves room for a long jump)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def train(run: Path, callbacks, *, max_steps, optim="sgd", learning_rate=0.05, resume=None, **overrides):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    args = TrainingArguments(
        output_dir=str(run), max_steps=max_steps, save_steps=2, per_device_train_batch_size=8, report_to=[],
        learning_rate=learning_rate, optim=optim, lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True,
        logging_steps=100, seed=0, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=SameBatch(), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return trainer


def save_as_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config) -> None:
    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "model.safetensors"))
    config.save_pretrained(folder)


def read_run(run, **settings) -> PassResult:
    """One pass of relex over a run folder (Gram matrices and the verdict, nothing written)."""
    with open_run(run, **settings) as opened:
        return opened.execute()


def leap_entries(trainer_state: dict) -> list[dict]:
    return [e for e in trainer_state["log_history"] if "leap/from_step" in e]


def test_a_jump_writes_the_weights_relex_extrapolate_writes_from_the_same_checkpoints(tmp_path):
    watcher = Watcher()  # before the leap callback: it sees the weights of step 8 before the jump
    callback = LeapCallback(every=8, leap=16, snapshot_every=2, require="always")
    trainer = train(tmp_path / "run", [watcher, callback], max_steps=26)
    # Saves at 2, 4, 6; the save of step 8 falls on the jump and holds the jumped weights as step 24.
    run = tmp_path / "run"
    assert sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*")) == [2, 4, 6, 24, 26]
    assert trainer.state.global_step == 26
    [decision] = callback.decisions
    assert (decision.real_step, decision.from_step, decision.to_step, decision.length) == (8, 8, 24, 16)
    assert decision.jumped and decision.reason == "jumped" and decision.segment_start == 0

    # The oracle: the segment's weights (steps 0, 2, 4, 6, 8) saved as checkpoints, extrapolated by the engine.
    oracle_run = tmp_path / "segment"
    for step in (0, 2, 4, 6, 8):
        save_as_checkpoint(oracle_run / f"checkpoint-{step}", watcher.weights[step], trainer.model.config)
    extrapolate(oracle_run, tmp_path / "oracle", target_step=24, device="cpu")
    oracle, jumped = load_state(tmp_path / "oracle"), load_state(run / "checkpoint-24")
    assert set(oracle) == set(jumped) == set(watcher.weights[8])
    for name in oracle:
        assert torch.equal(jumped[name], oracle[name]), name
        assert not torch.equal(jumped[name], watcher.weights[8][name]), name  # every tensor moved

    # The decision is in the trainer state saved with the jump, with the verdict of the same checkpoints.
    state = json.loads((run / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    [entry] = leap_entries(state)
    assert entry["step"] == 24 and entry["leap/from_step"] == 8 and entry["leap/to_step"] == 24
    assert entry["leap/jumped"] == 1.0 and entry["leap/real_step"] == 8 and entry["leap/horizon"] == 3.0
    grams = read_run(oracle_run, device="cpu")
    shapes = {t.name: t.shape for t in grams.tensors}
    verdict = run_verdict(grams.grams, {n: len(shapes[n]) for n in grams.grams}, grams.steps, 24)
    assert decision.verdict["verdict"] == verdict.drift_class and decision.message == verdict.message
    assert entry["relex/drift_share"] == pytest.approx(verdict.drift_share, rel=REL)
    assert entry["relex/backtest_projected_line_error"] == pytest.approx(
        verdict.backtest["projected_line_error"], rel=REL)
    # The run's own checkpoints stay a series relex reads, in virtual steps.
    assert read_run(run, base=oracle_run / "checkpoint-0", device="cpu").steps == [2, 4, 6, 24, 26]


def test_a_refused_jump_changes_nothing(tmp_path):
    before, after = Watcher(), Watcher()
    # A jump of 200 steps from a window of 8 is 26x the window, beyond what its backtest can vouch for.
    callback = LeapCallback(every=8, leap=200, snapshot_every=2)
    trainer = train(tmp_path / "leap", [before, callback, after, StopAt(10)], max_steps=300, optim="adamw_torch",
                    learning_rate=1e-3)
    [decision] = callback.decisions
    assert not decision.jumped and decision.reason == "refused" and decision.to_step == decision.from_step == 8
    assert "26× the observed window" in decision.message and decision.verdict["verdict"] != "drift-dominated"
    assert decision.figures["relex/plausible"] == 0.0 and decision.passes_gate is False
    for name, value in before.weights[8].items():
        assert torch.equal(after.weights[8][name], value), name
    assert before.optimizer[8] and before.optimizer[8].keys() == after.optimizer[8].keys()
    for i, slots in before.optimizer[8].items():
        for key, value in slots.items():
            assert torch.equal(torch.as_tensor(after.optimizer[8][i][key]), torch.as_tensor(value)), (i, key)
    # The whole run is the run without the callback, bit for bit.
    plain_watcher = Watcher()
    plain = train(tmp_path / "plain", [plain_watcher, StopAt(10)], max_steps=300, optim="adamw_torch",
                  learning_rate=1e-3)
    assert trainer.state.global_step == plain.state.global_step == 10
    for name, value in plain_watcher.weights[10].items():
        assert torch.equal(after.weights[10][name], value), name
    [entry] = [e for e in trainer.state.log_history if "leap/from_step" in e]
    assert entry["leap/jumped"] == 0.0 and entry["relex/plausible"] == 0.0 and entry["step"] == 8
    assert entry["leap/passes_gate"] == 0.0


def test_resuming_after_a_jump_continues_the_same_run(tmp_path):
    options = dict(every=4, leap=8, snapshot_every=2, require="always", optimizer_state="reset")
    whole = LeapCallback(**options)
    train(tmp_path / "whole", [whole], max_steps=30, optim="adamw_torch", learning_rate=1e-3)
    # real steps 1-4, jump 4 -> 12; 13-16, jump 16 -> 24; 25-28, jump 28 -> 30 (cut at max_steps).
    assert [(d.from_step, d.to_step, d.segment_start, d.real_step) for d in whole.decisions] == [
        (4, 12, 0, 4), (16, 24, 12, 8), (28, 30, 24, 12)]
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "whole").glob("checkpoint-*"))
    assert saved == [2, 12, 14, 24, 26, 30]

    # Resume at step 14, mid-segment (the segment started with the jump to 12), from a folder holding only
    # that segment's checkpoints.
    resumed_run = tmp_path / "resumed"
    for step in (12, 14):
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", resumed_run / f"checkpoint-{step}")
    state = json.loads((resumed_run / "checkpoint-14" / "trainer_state.json").read_text())
    assert [(e["leap/from_step"], e["leap/to_step"]) for e in leap_entries(state)] == [(4, 12)]
    resumed = LeapCallback(**options)
    train(resumed_run, [resumed], max_steps=30, optim="adamw_torch", learning_rate=1e-3,
          resume=resumed_run / "checkpoint-14")
    assert [(d.from_step, d.to_step, d.segment_start, d.real_step) for d in resumed.decisions] == [
        (16, 24, 12, 8), (28, 30, 24, 12)]
    for mine, theirs in zip(resumed.decisions, whole.decisions[1:]):
        assert mine.figures == theirs.figures
    final, reference = load_state(resumed_run / "checkpoint-30"), load_state(tmp_path / "whole" / "checkpoint-30")
    assert set(final) == set(reference)
    for name in reference:
        assert torch.equal(final[name], reference[name]), name
    state = json.loads((resumed_run / "checkpoint-30" / "trainer_state.json").read_text())
    assert [(e["leap/from_step"], e["leap/to_step"]) for e in leap_entries(state)] == [(4, 12), (16, 24), (28, 30)]


def test_a_check_that_gets_worse_reverts_the_jump():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn(3, 4)
    # Loss falls along a steady line; the check scores the negative distance to a point the jump overshoots.
    checks = []

    def check(m):
        value = -float((m.weight - target).norm().detach())
        checks.append(value)
        return value

    leaper = Leaper(LeapOptions(every=4, leap=400, snapshot_every=1, require="always", check=check))
    leaper.begin(model, 0)
    for step in range(1, 5):
        optimizer.zero_grad()
        ((model.weight - target) ** 2).sum().backward()
        optimizer.step()
        decision = leaper.after_step(model, optimizer, step, step)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert decision.reason == "reverted" and not decision.jumped and decision.to_step == 4
    assert decision.check_after < decision.check_before == checks[0]
    # The weights are those of step 4, and the next segment starts from them.
    assert leaper.snapshots == [] and leaper.segment_start == 4
    for name, value in weights.items():
        assert torch.equal(leaper.base[name], value), name


def test_fit_segment_refuses_bad_options_in_one_line():
    with pytest.raises(ValueError, match="snapshot_every must be a positive divisor of every=10"):
        LeapOptions(every=10, leap=5, snapshot_every=3)
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        LeapOptions(every=4, leap=5, snapshot_every=4)
    with pytest.raises(ValueError, match="require must be one of plausible, lenient, always, probe"):
        LeapOptions(every=4, leap=5, require="sometimes")
    with pytest.raises(ValueError, match="optimizer_state must be one of keep, reset"):
        LeapOptions(every=4, leap=5, optimizer_state="extrapolate")
    with pytest.raises(TypeError, match="unknown option: rnak"):
        LeapOptions(every=4, leap=5, run=RunOptions.of(rnak=2))
    with pytest.raises(ValueError, match="run must be a relex.RunOptions"):
        LeapOptions(every=4, leap=5, run={"rank": 2})
    with pytest.raises(ValueError, match="give every"):
        LeapCallback(every=4)
    base = {"w": torch.zeros(3)}
    fit = fit_segment(base, [(1, {"w": torch.ones(3)}), (2, {"w": 2 * torch.ones(3)})], 10)
    assert torch.allclose(fit.prediction["w"], torch.full((3,), 10.0))


def test_the_toy_trainer_leaps_in_virtual_steps(tmp_path):
    from relex.toy import ToyConfig, train_run

    config = ToyConfig.ci(steps=20, checkpoint_every=4, num_threads=1)
    leaper = Leaper(LeapOptions(every=4, leap=8, snapshot_every=2, require="always"))
    seen = []
    summary = train_run(tmp_path / "run", config, leap=leaper, evaluate=False,
                        on_step=lambda real, step, model: seen.append((real, step)))
    # real steps 1-4, jump 4 -> 12; 13-16, jump 16 -> 20 (cut at the run's 20 steps).
    assert [(d.from_step, d.to_step) for d in leaper.decisions] == [(4, 12), (16, 20)]
    assert summary["real_steps"] == 8 and seen[-1] == (8, 20) and (4, 12) in seen
    # The checkpoints due at steps 4 and 16 fall on the jumps: they hold the jumped weights of 12 and 20,
    # and the run's folder is one series in virtual steps.
    assert [c["step"] for c in summary["checkpoints"]] == [0, 12, 20]
    assert read_run(tmp_path / "run", device="cpu").steps == [12, 20]


def test_the_smollm_leap_script_runs_grpo_with_the_callback(tmp_path):
    pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    import importlib.util

    from relex.testing import save_tiny_model

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm_rlvr" / "leap.py"
    spec = importlib.util.spec_from_file_location("smollm_rlvr_leap", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    save_tiny_model(tmp_path / "base")
    run = tmp_path / "leap"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.main(["--base", str(tmp_path / "base"), "--out", str(run), "--every", "4", "--leap", "4",
                     "--snapshot-every", "2", "--require", "always", "--max-real-steps", "6",
                     "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "4"])
    # real steps 1-4, the jump at 4 -> 8 (the save due at 4 holds it), real steps 5 and 6 -> steps 9 and 10.
    assert json.loads((run / "real_steps.json").read_text()) == {"checkpoint-2": 2, "checkpoint-8": 4,
                                                                  "checkpoint-10": 6}
    [decision] = json.loads((run / "leaps.json").read_text())
    assert (decision["from_step"], decision["to_step"], decision["jumped"]) == (4, 8, True)
    state = json.loads((run / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["global_step"] == 10 and [e["leap/to_step"] for e in leap_entries(state)] == [8]
    assert any("reward" in e for e in state["log_history"])
    # Paired with a "plain" run that saved the same real steps: one pair per common real step.
    plain = tmp_path / "plain"
    for step in (2, 4):
        (plain / f"checkpoint-{step}").mkdir(parents=True)
    assert [(r, p.name, q.name) for r, p, q in module.pairs(run, plain)] == [
        (2, "checkpoint-2", "checkpoint-2"), (4, "checkpoint-4", "checkpoint-8")]


def test_a_peft_model_jumps_its_adapter_and_leaves_the_base_alone(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config()),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    watcher = Watcher()
    callback = LeapCallback(every=4, leap=8, snapshot_every=2, require="always")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, save_steps=2,
                             per_device_train_batch_size=8, report_to=[], learning_rate=0.05, optim="sgd",
                             lr_scheduler_type="constant", use_cpu=True, disable_tqdm=True, logging_steps=100, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=SameBatch(), callbacks=[watcher, callback]).train()
    [decision] = callback.decisions
    assert (decision.from_step, decision.to_step, decision.jumped) == (4, 12, True)
    for name, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    # What jumped is each adapter tensor along its own line through the snapshots of steps 0, 2 and 4, carried
    # to step 12: the oracle is tests/naive.py's RELEX (float64, numpy's SVD and polyfit) on those snapshots.
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    base = {n: watcher.weights[0][n] for n in trained}
    (oracle,) = naive_relex(base, [{n: watcher.weights[s][n] for n in trained} for s in (2, 4)], [2, 4], [12])
    jumped = load_state(tmp_path / "run" / "checkpoint-12")  # the adapter saved at the jump
    assert len(jumped) == len(trained)
    moved = 0
    for name in trained:
        saved = name.replace(".default", "")
        w0, w4 = (watcher.weights[s][name].double().numpy() for s in (0, 4))
        mine = jumped[saved].double().numpy()
        # float32 storage rounds each weight (lora_A barely moves from its random start: its update is a few
        # float32 steps); lora_B starts at zero, so its update is checked to 1e-5 of its size
        rounding = 4 * np.finfo(np.float32).eps * np.linalg.norm(oracle[name])
        assert np.linalg.norm(mine - oracle[name]) <= 1e-5 * np.linalg.norm(oracle[name] - w0) + rounding, name
        # the jump is no copy of the last snapshot: its 8 steps went farther than the 4 real steps before it
        assert np.linalg.norm(mine - w4) > np.linalg.norm(w4 - w0), name
        moved += "lora_B" in name and np.linalg.norm(w0) == 0
    assert moved == len(trained) // 2


@pytest.mark.parametrize("optimizer_state", ["keep", "reset"])
def test_the_optimizer_state_is_kept_or_reset_and_the_schedule_follows_the_jump(optimizer_state):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    leaper = Leaper(LeapOptions(every=4, leap=6, snapshot_every=2, require="always", optimizer_state=optimizer_state))
    leaper.begin(model, 0)
    x = torch.randn(16, 4)
    for step in range(1, 5):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        moments = {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(model.parameters())}
        decision = leaper.after_step(model, optimizer, step, step, scheduler=scheduler)
    assert decision.jumped and decision.to_step == 10
    assert scheduler.last_epoch == 10 and optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 11)
    if optimizer_state == "reset":
        assert all(not optimizer.state[p] for p in model.parameters())
    else:
        for i, p in enumerate(model.parameters()):
            assert moments[i].keys() == optimizer.state[p].keys()
            assert all(torch.equal(optimizer.state[p][k], v) for k, v in moments[i].items())


def test_the_probe_chooses_the_jump_on_the_toy_run_and_the_jump_helps_on_held_out_problems(toy, tmp_path):
    """The demo's toy run with ``LeapOptions(every=20, leap=100, probe="toy-train")``: at real step 20 the jump
    lengths 20 and 60 (the doubling grid up to 100) are scored on 64 training problems against the current
    weights; the current weights are the demo run's step 20 and the jumped ones are saved as step 80 (a save due
    at a jump holds the jump), each scored independently (``naive_toy_greedy``). The jump the probe chose is far
    better than the demo run's step 20 on the held-out problems, which the probe never sees."""
    from transformers import AutoModelForCausalLM

    from naive import naive_toy_greedy
    from relex.probe.problems import load_probe
    from relex.toy import ToyConfig, train_run

    class Stop(Exception):
        pass

    leaper = Leaper(LeapOptions(every=20, leap=100, probe="toy-train", probe_looks=1))

    def stop_after_the_first_decision(real, step, model):
        if leaper.decisions:
            raise Stop()

    base = AutoModelForCausalLM.from_pretrained(toy["demo-final"] / "checkpoint-0")
    with pytest.raises(Stop):
        train_run(tmp_path / "run", ToyConfig.demo(num_threads=1), base=base, leap=leaper, evaluate=False,
                  on_step=stop_after_the_first_decision)
    [decision] = leaper.decisions
    curve = decision.probe
    assert [c["step"] for c in curve["candidates"]] == [40, 80] and curve["reference_step"] == 20
    assert decision.jumped and curve["chosen"] == decision.to_step == 20 + decision.length
    chosen = next(c for c in curve["candidates"] if c["step"] == curve["chosen"])
    assert chosen["decision"] == "better" and chosen["problems"] == 64
    # the probe's scores, recomputed independently on the saved weights (greedy argmax ties may flip one problem)
    probed = load_probe("toy-train", 64).problems
    current = naive_toy_greedy(toy["demo-final"] / "checkpoint-20", probed)
    jumped_folder = tmp_path / "run" / f"checkpoint-{decision.to_step}"
    assert abs(curve["reference_mean"] - np.mean(current)) <= 1 / 64 + 1e-9
    assert abs(chosen["mean"] - np.mean(naive_toy_greedy(jumped_folder, probed))) <= 1 / 64 + 1e-9
    held_before = np.mean(naive_toy_greedy(toy["demo-final"] / "checkpoint-20"))
    held_after = np.mean(naive_toy_greedy(jumped_folder))
    assert held_after - held_before >= 0.2, (held_before, held_after)  # measured: 0.39 -> 0.74
    figures = decision.log_figures()
    assert figures["leap/probe_current"] == curve["reference_mean"] and figures["leap/probe_chosen"] == chosen["mean"]
    assert figures["leap/probe_tokens"] == curve["tokens"] > 0 and figures["leap/length"] == decision.length


def test_bad_probe_settings_are_refused_before_training(tmp_path):
    from relex.errors import RelexInputError

    for bad, fragment in ((dict(probe_mode="bogus"), "unknown --probe-mode"),
                          (dict(probe_confidence=1.0), "--probe-confidence must be in [0.5, 1)"),
                          (dict(probe_looks=0), "--probe-looks must be at least 1"),
                          (dict(probe_max_new_tokens=0), "--probe-max-new-tokens must be at least 1")):
        with pytest.raises(RelexInputError, match=re.escape(fragment)):
            LeapOptions(every=4, leap=8, probe="toy-train", **bad)
    probe = tmp_path / "train.jsonl"
    probe.write_text('{"text": "1+1=", "answer": "2", "verifier": "last-number"}\n')
    options = LeapOptions(every=4, leap=8, probe=probe, probe_max_new_tokens=5)
    assert options.probe.max_new_tokens == 5 and options.require == "probe"
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RelexInputError, match="needs the model's tokenizer"):
        Leaper(options).begin(model, 0)  # at the run's start, not at the first decision
    with pytest.raises(RelexInputError, match="scores the toy task's model"):
        Leaper(LeapOptions(every=4, leap=8, probe="toy-train")).begin(torch.nn.Linear(2, 2), 0)


def test_the_leap_callback_probes_with_the_trainers_tokenizer(tmp_path):
    """A chat probe given without tokenizer=: the callback takes the trainer's (processing_class), and leaves the
    trainer's own tokenizer as it was (the probe pads on the left on a copy)."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from relex.testing import byte_level_tokenizer

    probe = tmp_path / "train.jsonl"
    probe.write_text("".join(f'{{"text": "{a}+{a}=", "answer": "{2 * a}", "verifier": "last-number"}}\n'
                             for a in range(10, 20)))
    tokenizer = byte_level_tokenizer()
    tokenizer.padding_side = "right"
    callback = LeapCallback(every=4, leap=4, probe=probe, probe_max_new_tokens=3, probe_mode="logprob")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, save_steps=100, report_to=[],
                             per_device_train_batch_size=8, learning_rate=0.05, optim="sgd", use_cpu=True,
                             disable_tqdm=True, logging_steps=100, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=SameBatch(), processing_class=tokenizer,
                      callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    [decision] = callback.decisions
    assert callback.options.tokenizer is tokenizer and tokenizer.padding_side == "right"
    assert decision.probe is not None and decision.probe["probe"]["problems"] == 10
    logged = [e for e in trainer.state.log_history if "leap/probe_current" in e]
    assert logged and logged[0]["leap/probe_current"] == decision.probe["reference_mean"]
