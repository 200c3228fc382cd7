"""One run, one target, one training reward: the same verdict from all six ways relex gives one.

A real ``transformers.Trainer`` trains a tiny Llama with :class:`relex.integrations.RelexCallback` attached and
logs a bounded "reward" beside its loss (what TRL's GRPOTrainer logs under that key), saving a checkpoint every
4 steps. Then the installed ``relex`` command judges the same checkpoints with ``extrapolate``, ``check``,
``analyze`` and ``fit``, and the leap's fit (:func:`relex.integrations.leap.fit_segment`) judges them as
snapshots in memory with the rewards the trainer logged. Every one must give the same verdict record, figure
for figure; the only field allowed to differ is where the reward log was read (a file, or memory).
"""

from __future__ import annotations

import json

import pytest
import torch

import command
from relex.io.reader import CheckpointReader
from relex.testing import save_tiny_model

pytest.importorskip("transformers")

STEPS, SAVE_EVERY, TARGET = 24, 4, 60


class _Batches(torch.utils.data.Dataset):
    """One fixed batch of token sequences, repeated: the loss falls steadily, the weights drift."""

    def __init__(self, n: int = 8, length: int = 24):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 250, (n, length), generator=generator)

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        ids = self.ids[i % len(self.ids)]
        return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run folder, the callback, and the rewards the trainer logged."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from relex.integrations import RelexCallback

    root = tmp_path_factory.mktemp("one-verdict")
    save_tiny_model(root / "init")
    model = AutoModelForCausalLM.from_pretrained(root / "init")

    class RewardTrainer(Trainer):
        # a bounded reward that rises as the loss falls, logged beside it as GRPOTrainer logs its reward
        def log(self, logs, *args, **kwargs):
            if "loss" in logs:
                logs = {**logs, "reward": max(0.0, min(1.0, 1.0 - logs["loss"] / 6.0))}
            super().log(logs, *args, **kwargs)

    callback = RelexCallback(target_steps=TARGET, min_checkpoints=STEPS // SAVE_EVERY)
    args = TrainingArguments(output_dir=str(root / "run"), max_steps=STEPS, per_device_train_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="constant", optim="sgd", logging_steps=1,
                             save_steps=SAVE_EVERY, save_only_model=True, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    RewardTrainer(model=model, args=args, train_dataset=_Batches(), callbacks=[callback]).train()
    log = json.loads((root / "run" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    rewards = [(entry["step"], entry["reward"]) for entry in log if "reward" in entry]
    return root / "run", callback, rewards


def _without_reward_source(verdict: dict) -> dict:
    verdict = json.loads(json.dumps(verdict))
    if verdict.get("reward"):
        verdict["reward"].pop("source")
        verdict["calibration"]["reward"].pop("source")
    return verdict


def test_the_six_callers_give_one_verdict(trained, tmp_path):
    run, callback, rewards = trained
    base = run / "relex-base"
    common = ["--base", base, "--target-step", TARGET, "--quiet"]
    env = command.environment(OMP_NUM_THREADS="1")

    def relex(*args):
        done = command.relex(*args, env=env)
        assert done.returncode == 0, done.stderr[-2000:]

    relex("extrapolate", run, "--out", tmp_path / "out", *common)
    relex("check", run, "--json", tmp_path / "check.json", *common)
    relex("analyze", run, "--out", tmp_path / "analysis", "--no-plots", "--logprob-prompts", "none", *common)
    relex("fit", run, "--out", tmp_path / "trajectory", *common)
    verdicts = {
        "extrapolate": json.loads((tmp_path / "out" / "relex.json").read_text())["verdict"],
        "check": json.loads((tmp_path / "check.json").read_text())["verdict"],
        "analyze": json.loads((tmp_path / "analysis" / "analysis.json").read_text())["verdict"],
        "fit": json.loads((tmp_path / "trajectory" / "trajectory.json").read_text())["verdict"],
        "callback": json.loads(json.dumps(callback.latest.verdict.to_dict())),
    }

    from relex.integrations.leap import fit_segment

    def tensors(folder):
        with CheckpointReader(folder) as reader:
            return {name: reader.read(name).clone() for name in reader.order()}

    snapshots = [(step, tensors(run / f"checkpoint-{step}")) for step in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    verdicts["leap"] = fit_segment(tensors(base), snapshots, TARGET, rewards=rewards).verdict.to_dict()

    reference = verdicts["check"]
    # the run's verdict weighed the reward the trainer logged, carried to the target
    assert reference["target_step"] == TARGET and reference["steps"] == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))
    assert reference["reward"]["points"] >= 4 and reference["reward"]["target_step"] == TARGET
    assert reference["backtest"]["projected_line_error"] > 0 and reference["diagnostics"] is not None
    for caller in ("extrapolate", "analyze", "fit", "callback"):
        assert verdicts[caller] == reference, caller
    assert _without_reward_source(verdicts["leap"]) == _without_reward_source(reference)
    assert verdicts["leap"]["reward"]["source"] == "<memory>"
