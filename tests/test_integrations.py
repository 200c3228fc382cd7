"""relex in the training loop (relex.integrations): RelexCallback in a real transformers Trainer.

Every run here is a real ``transformers.Trainer`` (and, when TRL is installed, a TRL ``SFTTrainer``) training
a tiny Llama on CPU for 10 steps with a checkpoint every 2. Whatever the callback logs is checked against an
independent oracle on the same checkpoints, read from their files afterwards: every figure of the verdict
computed from the whole tensors in float64 by its textbook definition (tests/naive.py; LoRA adapters merged
by hand), the verdict against the documented rules applied to those figures; and the checkpoints it writes
against ``relex.extrapolate`` run afterwards.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from relex.analysis.verdict import DRIFT, MIXED, NOISE
from relex.api import extrapolate
from relex.integrations import RelexCallback, assess
from relex.integrations.trainer import BASE_FOLDER
from relex.testing import byte_level_tokenizer, load_state, save_tiny_model, tiny_config
from naive import naive_plausible, naive_run_figures

TARGET = 20
SAVES = [2, 4, 6, 8, 10]
LOGGER = "relex.integrations.trainer"
# Figures computed twice from the same files agree to float32 summation order (threads may differ).
REL = 1e-6

# Fixed batch + plain SGD at a constant rate: a drift-dominated run (the verdict says plausible at step 20).
STEADY = dict(optim="sgd", learning_rate=0.05, lr_scheduler_type="constant", fixed=True)
# Adam on fresh random batches: noise-dominated (the window backtest: a line loses to stopping).
NOISY = dict(optim="adamw_torch", learning_rate=1e-3, lr_scheduler_type="linear", fixed=False)


class TokenBatches(torch.utils.data.Dataset):
    """Random byte sequences (8 of them when ``fixed``: every step sees the same batch)."""

    def __init__(self, fixed: bool, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 256, (8 if fixed else 96, 16), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(TrainerCallback):
    """Stands where a logging integration (TensorBoard, W&B) stands: before user callbacks in the list."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs or {})))


def train(run: Path, callbacks, *, optim, learning_rate, lr_scheduler_type, fixed, model=None, max_steps=10,
          resume=None, resumable=False, logging_steps=100, **overrides):
    """A real Trainer run on CPU: ``max_steps`` steps, a checkpoint every 2; returns the trainer."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    if model is None:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config())
    args = TrainingArguments(
        output_dir=str(run), max_steps=max_steps, save_steps=2, per_device_train_batch_size=8, report_to=[],
        learning_rate=learning_rate, optim=optim, lr_scheduler_type=lr_scheduler_type, use_cpu=True,
        disable_tqdm=True, save_only_model=not resumable, logging_steps=logging_steps, seed=0, **overrides)
    trainer = Trainer(model=model, args=args, train_dataset=TokenBatches(fixed), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def window(run: Path, step: int, base=None) -> tuple[list[int], dict, list[dict]]:
    """The run's checkpoints up to ``step`` read from their files: (steps, base tensors, tensors of each step).
    A LoRA checkpoint is merged by hand: W = W_0 + (lora_alpha / r) B A for each adapted module, the base from
    ``base`` or from the adapter's ``base_model_name_or_path``."""
    found = sorted((int(p.name.split("-")[1]), p) for p in run.glob("checkpoint-*"))
    found = [(s, p) for s, p in found if s <= step]
    steps = [s for s, _ in found]
    adapter = found[0][1] / "adapter_config.json"
    if not adapter.is_file():
        return steps, load_state(base), [load_state(p) for _, p in found]
    config = json.loads(adapter.read_text())
    base_state = load_state(base if base is not None else config["base_model_name_or_path"])
    merged = []
    for _, folder in found:
        state = dict(base_state)
        lora = load_state(folder)
        for key in [k for k in lora if k.endswith(".lora_A.weight")]:
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = lora[key.replace(".lora_A.", ".lora_B.")].double()
            state[f"{module}.weight"] = (base_state[f"{module}.weight"].double()
                                         + config["lora_alpha"] / config["r"] * b @ lora[key].double())
        merged.append(state)
    return steps, base_state, merged


def naive_verdict(run: Path, step: int, base=None, target=TARGET) -> tuple[list[int], dict]:
    """The steps of the window and the verdict's figures computed from the files (tests/naive.py)."""
    steps, base_state, states = window(run, step, base)
    return steps, naive_run_figures(base_state, states, steps, target)


FIGURES = ("drift_share", "explained_rank1", "r2_rank1", "alpha", "drift_ratio", "cos_first_last",
           "backtest_line_error", "backtest_stop_error", "backtest_projected_line_error",
           "backtest_projected_stop_error")
# The relex figures come from float32 deltas, the oracle's from float64 ones: they agree to a few 1e-6.
NAIVE_REL = 2e-5


def assert_figures_match(figures: dict, steps, oracle: dict, skip=()):
    assert figures["relex/step"] == steps[-1] and figures["relex/checkpoints"] == len(steps)
    assert figures["relex/plausible"] == (1.0 if naive_plausible(oracle) else 0.0)
    for key in FIGURES:
        if key in skip:
            continue
        if key in oracle:
            assert figures[f"relex/{key}"] == pytest.approx(oracle[key], rel=NAIVE_REL), key
        else:
            assert f"relex/{key}" not in figures, key


def assert_verdict_matches(verdict: str, message: str, steps, oracle: dict, target=TARGET):
    """The verdict (its drift class) the documented rules give on the oracle's figures, and its evidence in the
    message."""
    plausible = naive_plausible(oracle)
    assert (verdict == DRIFT) == plausible, (verdict, message)
    if plausible:
        assert message.startswith("drift-dominated"), message
    line = oracle.get("backtest_projected_line_error", oracle.get("backtest_line_error"))
    stop = oracle.get("backtest_projected_stop_error", oracle.get("backtest_stop_error"))
    if line is not None and line >= stop:
        if oracle["drift_share"] < 0.8:
            assert verdict == NOISE and message.startswith("noise-dominated: extrapolation will likely hurt"), message
        else:
            assert verdict == MIXED and message.startswith("extrapolation this far will likely hurt"), message
    if "backtest_line_error" in oracle:
        assert (f"on the observed window a line fitted up to step {oracle['fit_last_step']:.0f} predicted step "
                f"{oracle['held_out_step']:.0f} with weight error {oracle['backtest_line_error']:.2f}, stopping "
                f"{oracle['backtest_stop_error']:.2f}") in message, message
    if target is not None and "backtest_projected_line_error" in oracle:
        assert (f"the target is {target / steps[-1]:.3g}× the observed window (step {target} from steps "
                f"{steps[0]}..{steps[-1]})") in message, message
        assert (f"carried to step {target}: {oracle['backtest_projected_line_error']:.2f} against "
                f"{oracle['backtest_projected_stop_error']:.2f}") in message, message


def assert_same_checkpoint(folder: Path, reference: Path):
    mine, theirs = load_state(folder), load_state(reference)
    assert set(mine) == set(theirs) and mine
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """A drift-dominated run watched by a blocking callback writing step 20, and by a background one."""
    root = tmp_path_factory.mktemp("steady")
    recorder = Recorder()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config())
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blocking = RelexCallback(target_steps=TARGET, out_dir=root / "predicted")
    background = RelexCallback(target_steps=TARGET, background=True)
    trainer = train(root / "run", [recorder, blocking, background], model=model, **STEADY)
    return dict(root=root, run=root / "run", trainer=trainer, recorder=recorder, blocking=blocking,
                background=background, initial=initial)


def test_the_logged_verdict_is_the_verdict_of_the_checkpoints(steady):
    run, recorder, callback = steady["run"], steady["recorder"], steady["blocking"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == sorted(f"checkpoint-{s}" for s in SAVES)
    # Saves at 2 and 4 and 6 hold fewer than min_checkpoints=4 checkpoints: nothing is assessed there.
    assert [a.step for a in callback.history] == [8, 10]
    for assessment in callback.history:
        steps, oracle = naive_verdict(run, assessment.step, base=run / BASE_FOLDER)
        assert assessment.steps == steps == [s for s in SAVES if s <= assessment.step]
        assert assessment.verdict.drift_class == DRIFT and assessment.plausible
        assert_verdict_matches(assessment.verdict.drift_class, assessment.message, steps, oracle)
        assert_figures_match(assessment.figures, steps, oracle)
    # What a logger placed before the callback (as TensorBoard / W&B are) received: the same figures,
    # logged at the step of the save (blocking mode), all plain numbers.
    logged = [(step, logs) for step, logs in recorder.logs if "relex/written" in logs]  # the background
    # callback of this run writes nothing, so its figures lack relex/written
    assert [(step, logs["relex/step"]) for step, logs in logged] == [(8, 8.0), (10, 10.0)]
    for (_, logs), assessment in zip(logged, callback.history):
        assert {k: v for k, v in logs.items() if k.startswith("relex/")} == assessment.figures
        assert all(isinstance(v, float) for k, v in logs.items() if k.startswith("relex/"))
        assert logs["relex/plausible"] == 1.0 and logs["relex/written"] == 1.0


def test_the_figures_reach_the_trainer_state(steady):
    run, trainer, callback = steady["run"], steady["trainer"], steady["blocking"]
    history = [entry for entry in trainer.state.log_history if "relex/written" in entry]
    assert [(e["step"], e["relex/step"]) for e in history] == [(8, 8.0), (10, 10.0)]
    assert {k: v for k, v in history[0].items() if k.startswith("relex/")} == callback.history[0].figures
    # checkpoint-10's trainer_state.json was written before its own assessment: it holds step 8's.
    saved = json.loads((run / "checkpoint-10" / "trainer_state.json").read_text())["log_history"]
    assert [e["relex/step"] for e in saved if "relex/written" in e] == [8.0]


def test_the_written_prediction_is_relex_extrapolate_on_the_same_checkpoints(steady, tmp_path):
    run, predicted = steady["run"], steady["root"] / "predicted"
    assert sorted(p.name for p in predicted.iterdir()) == [f"step-{TARGET}"]
    provenance = json.loads((predicted / f"step-{TARGET}" / "relex.json").read_text())
    assert provenance["observed_steps"] == SAVES  # refreshed at the last save with the newest window
    reference = extrapolate(run, tmp_path / "reference", target_step=TARGET, base=run / BASE_FOLDER, max_step=10,
                            device="cpu")
    assert_same_checkpoint(predicted / f"step-{TARGET}", reference.out_dirs[TARGET])
    assert reference.verdict.drift_class == steady["blocking"].latest.verdict.drift_class


def test_the_saved_base_is_the_model_before_training(steady):
    base = load_state(steady["run"] / BASE_FOLDER)
    assert set(base) == set(steady["initial"])
    for name, tensor in steady["initial"].items():
        assert torch.equal(base[name], tensor), name


def test_background_mode_logs_the_same_figures(steady):
    blocking, background, recorder = steady["blocking"], steady["background"], steady["recorder"]
    assert [a.step for a in background.history] == [8, 10]
    for mine, theirs in zip(background.history, blocking.history):
        same = {k: v for k, v in mine.figures.items() if k != "relex/seconds"}
        assert same == pytest.approx({k: v for k, v in theirs.figures.items()
                                      if k not in ("relex/seconds", "relex/written")}, rel=REL)
    # Logged once ready: step 8's at step 9 or 10 (at the latest before the save at step 10: the callback
    # waits for it there), step 10's when training ends; each carries the checkpoint it describes.
    logged = [(step, logs["relex/step"]) for step, logs in recorder.logs
              if "relex/step" in logs and "relex/written" not in logs]
    assert [figure for _, figure in logged] == [8.0, 10.0]
    assert logged[0][0] in (9, 10) and logged[1][0] == 10


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A noise-dominated run watched by a callback that writes only a plausible prediction, and by one that
    writes it anyway."""
    root = tmp_path_factory.mktemp("noisy")
    gated = RelexCallback(target_steps=TARGET, out_dir=root / "gated")
    forced = RelexCallback(target_steps=TARGET, out_dir=root / "forced", require_plausible=False)
    train(root / "run", [gated, forced], **NOISY)
    return dict(root=root, run=root / "run", gated=gated, forced=forced)


def test_a_noise_dominated_run_writes_nothing_unless_asked(noisy, tmp_path):
    root, run, gated, forced = noisy["root"], noisy["run"], noisy["gated"], noisy["forced"]
    for callback in (gated, forced):
        assert [a.step for a in callback.history] == [8, 10]
        for assessment in callback.history:
            steps, oracle = naive_verdict(run, assessment.step, base=run / BASE_FOLDER)
            assert not naive_plausible(oracle) and not assessment.plausible
            assert_verdict_matches(assessment.verdict.drift_class, assessment.message, steps, oracle)
            # the drift share of the 10-step window: see test_the_drift_share_is_the_converged_factor_fit
            assert_figures_match(assessment.figures, steps, oracle,
                                 skip=("drift_share",) if assessment.step == 10 else ())
            assert assessment.figures["relex/plausible"] == 0.0
    assert gated.latest.verdict.drift_class == NOISE  # the carried line loses to stopping
    assert gated.latest.figures["relex/written"] == 0.0 and not (root / "gated").exists()
    assert forced.latest.figures["relex/written"] == 1.0
    reference = extrapolate(run, tmp_path / "reference", target_step=TARGET, base=run / BASE_FOLDER, device="cpu")
    assert_same_checkpoint(root / "forced" / f"step-{TARGET}", reference.out_dirs[TARGET])
    from relex_cli.app import main

    code = main(["check", str(run), "--base", str(run / BASE_FOLDER), "--target-step", str(TARGET),
                 "--device", "cpu", "--json", str(tmp_path / "check.json"), "--quiet"])
    report = json.loads((tmp_path / "check.json").read_text())
    verdict = report["verdict"]
    assert code == 3 and not report["gate"]["passed"] and verdict["verdict"] == gated.latest.verdict.drift_class
    assert gated.latest.figures["relex/drift_share"] == pytest.approx(verdict["drift_share"], rel=REL)


@pytest.mark.xfail(strict=True, reason=(
    "relex.analysis.drift._masked_factors stops after 300 alternating-least-squares iterations, before it "
    "converges on this window (steps 2..10 of the noisy run): the drift share it gives is 0.61, the converged "
    "fit's 0.56 (the same minimum scipy's BFGS and relex's own ALS run for 3000 iterations reach)"))
def test_the_drift_share_is_the_converged_factor_fit(noisy):
    run = noisy["run"]
    steps, oracle = naive_verdict(run, 10, base=run / BASE_FOLDER)
    assert noisy["gated"].latest.figures["relex/drift_share"] == pytest.approx(oracle["drift_share"], rel=NAIVE_REL)


@pytest.mark.parametrize("explicit_base", [False, True])
def test_peft_lora_checkpoints_are_read_in_merged_space(tmp_path, explicit_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_tiny_model(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    run = tmp_path / "run"
    # The base comes from the adapter's base_model_name_or_path, or is given.
    callback = RelexCallback(target_steps=TARGET, base=base if explicit_base else None, out_dir=tmp_path / "out",
                             require_plausible=False)
    train(run, [callback], model=model, optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="constant",
          fixed=True)
    checkpoint = run / "checkpoint-10"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    assert not (run / BASE_FOLDER).exists()  # a LoRA run needs no saved base
    assert [a.step for a in callback.history] == [8, 10]
    for assessment in callback.history:
        # merged by hand; the base from the adapter config, or given
        steps, oracle = naive_verdict(run, assessment.step, base=base if explicit_base else None)
        assert_verdict_matches(assessment.verdict.drift_class, assessment.message, steps, oracle)
        assert_figures_match(assessment.figures, steps, oracle)
    written = tmp_path / "out" / f"step-{TARGET}"
    provenance = json.loads((written / "relex.json").read_text())
    assert provenance["sources"]["observed_kind"] == "lora" and provenance["observed_steps"] == SAVES
    reference = extrapolate(run, tmp_path / "reference", target_step=TARGET, base=base, device="cpu")
    assert_same_checkpoint(written, reference.out_dirs[TARGET])


def trl_run(trainer_cls, config_cls, run: Path, callback, dataset, **options):
    """A TRL trainer on a fresh tiny model: 8 SGD steps, a checkpoint every 2, a log every 3 (out of step
    with the saves, so a relex entry falls between two of the trainer's own logs)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = config_cls(output_dir=str(run), max_steps=8, save_steps=2, logging_steps=3, report_to=[],
                          learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", use_cpu=True,
                          disable_tqdm=True, save_only_model=True, seed=0, **options)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=byte_level_tokenizer(),
                              callbacks=[callback], **({} if trainer_cls.__name__ != "GRPOTrainer" else
                                                       {"reward_funcs": first_byte_parity}))
        trainer.train()
    return trainer


def first_byte_parity(completions, **kwargs):
    """A verifiable reward a random model earns half the time."""
    return [float(len(c) > 0 and ord(c[0]) % 2 == 0) for c in completions]


def assert_trl_run(trainer, callback, run: Path):
    assert [a.step for a in callback.history] == [8]
    steps, oracle = naive_verdict(run, 8, base=run / BASE_FOLDER)
    assert_verdict_matches(callback.latest.verdict.drift_class, callback.latest.message, steps, oracle)
    assert_figures_match(callback.latest.figures, steps, oracle)
    entries = [e for e in trainer.state.log_history if "relex/step" in e]
    # Only relex's figures: the metrics TRL accumulates between its own logs stay in its own entries.
    assert [e["step"] for e in entries] == [8]
    assert set(entries[0]) == set(callback.latest.figures) | {"epoch", "step"}
    own = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in own] == [3, 6]


def test_trl_sft_trainer_takes_the_callback(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset

    callback = RelexCallback(target_steps=TARGET)
    dataset = Dataset.from_dict({"text": [f"{a}+{b}={a + b}" for a in range(8) for b in range(4)]})
    trainer = trl_run(trl.SFTTrainer, trl.SFTConfig, tmp_path / "run", callback, dataset,
                      per_device_train_batch_size=8, max_length=32)
    assert_trl_run(trainer, callback, tmp_path / "run")
    assert "mean_token_accuracy" in trainer.state.log_history[0]


def test_trl_grpo_trainer_takes_the_callback(tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset

    callback = RelexCallback(target_steps=TARGET)
    dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(8) for b in range(4)]})
    trainer = trl_run(trl.GRPOTrainer, trl.GRPOConfig, tmp_path / "run", callback, dataset,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=8)
    assert_trl_run(trainer, callback, tmp_path / "run")
    assert "reward" in trainer.state.log_history[0] and trainer.state.log_history[0]["reward_std"] > 0


def test_every_and_min_checkpoints(tmp_path):
    callback = RelexCallback(every=2, min_checkpoints=2)
    train(tmp_path / "run", [callback], **STEADY)
    # saves 1, 3, 5 (steps 2, 6, 10); step 2 holds a single checkpoint, fewer than min_checkpoints
    assert [a.step for a in callback.history] == [6, 10]
    assert "relex/backtest_line_error" not in callback.history[0].figures  # 3 checkpoints: no window backtest
    assert "relex/written" not in callback.history[0].figures  # nothing asked to be written


def test_a_save_total_limit_below_min_checkpoints_is_said_once(tmp_path, caplog):
    callback = RelexCallback()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train(tmp_path / "run", [callback], save_total_limit=3, **STEADY)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "save_total_limit=3" in warned[0] and not callback.history
    assert not (tmp_path / "run" / BASE_FOLDER).exists()


def test_with_save_total_limit_the_window_is_the_kept_checkpoints(tmp_path):
    run = tmp_path / "run"
    callback = RelexCallback()
    train(run, [callback], save_total_limit=4, **STEADY)
    assert [a.steps for a in callback.history] == [[2, 4, 6, 8], [4, 6, 8, 10]]
    assert (run / BASE_FOLDER).is_dir()  # the saved base is no checkpoint: never rotated away
    steps, oracle = naive_verdict(run, 10, base=run / BASE_FOLDER, target=None)
    assert steps == [4, 6, 8, 10] and callback.latest.steps == steps
    assert_verdict_matches(callback.latest.verdict.drift_class, callback.latest.message, steps, oracle, target=None)
    assert_figures_match(callback.latest.figures, steps, oracle)


def test_errors_never_stop_training(tmp_path, caplog):
    callback = RelexCallback(base=tmp_path / "missing", min_checkpoints=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = train(tmp_path / "run", [callback], **STEADY)
    assert trainer.state.global_step == 10 and not callback.history
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 4  # saves at steps 4, 6, 8, 10
    assert all(m.startswith("relex: no verdict at step ") and "\n" not in m for m in warned)
    assert "missing" in warned[0]
    assert not any(k.startswith("relex/") for e in trainer.state.log_history for k in e)


def test_a_prediction_that_cannot_be_written_leaves_the_verdict(tmp_path, caplog):
    # output="lora" needs adapter checkpoints: this run holds full weights, so every write fails
    callback = RelexCallback(target_steps=TARGET, out_dir=tmp_path / "out", output="lora")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train(tmp_path / "run", [callback], **STEADY)
    assert [a.step for a in callback.history] == [8, 10]
    assert all(a.figures["relex/written"] == 0.0 and "relex/drift_share" in a.figures for a in callback.history)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 2 and all(m.startswith("relex: could not write the prediction at step ") for m in warned)
    assert "--output lora needs a LoRA run" in warned[0]


def test_out_dir_inside_a_checkpoint_folder_is_not_written(tmp_path, caplog):
    run = tmp_path / "run"
    callback = RelexCallback(target_steps=TARGET, out_dir=run / "checkpoint-2" / "relex", require_plausible=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train(run, [callback], **STEADY)
    assert any("inside a checkpoint folder" in r.getMessage() for r in caplog.records)
    assert not (run / "checkpoint-2" / "relex").exists()
    assert [a.step for a in callback.history] == [8, 10] and not callback.latest.written


def test_resumed_training_reuses_the_saved_base(tmp_path, caplog):
    run = tmp_path / "run"
    train(run, [RelexCallback()], max_steps=6, resumable=True, **STEADY)
    base_weights = load_state(run / BASE_FOLDER)
    callback = RelexCallback()
    train(run, [callback], resume=str(run / "checkpoint-6"), resumable=True, **STEADY)
    assert [a.step for a in callback.history] == [8, 10]
    for name, tensor in load_state(run / BASE_FOLDER).items():
        assert torch.equal(tensor, base_weights[name]), name
    # Resumed without any step-0 weights: one warning, then silence.
    other = tmp_path / "other"
    train(other, [RelexCallback(save_base=False, min_checkpoints=8)], max_steps=6, resumable=True, **STEADY)
    callback = RelexCallback()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train(other, [callback], resume=str(other / "checkpoint-6"), resumable=True, **STEADY)
    warned = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warned) == 1 and "resumed at step 6" in warned[0] and not callback.history


def test_attach_adds_the_callback_and_logs_through_the_trainer(tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=8, save_steps=2, report_to=[],
                             per_device_train_batch_size=8, learning_rate=0.05, optim="sgd", use_cpu=True,
                             disable_tqdm=True, save_only_model=True, logging_steps=100)
    trainer = Trainer(model=AutoModelForCausalLM.from_config(tiny_config()), args=args,
                      train_dataset=TokenBatches(fixed=True))
    recorder = Recorder()
    trainer.add_callback(recorder)
    callback = RelexCallback().attach(trainer)
    assert callback.attach(trainer) is callback  # attaching twice adds it once
    assert sum(c is callback for c in trainer.callback_handler.callbacks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert [step for step, logs in recorder.logs if "relex/step" in logs] == [8]


def test_without_a_trainer_to_log_through_the_figures_still_reach_the_history(tmp_path, monkeypatch, caplog):
    import relex.integrations.trainer as module

    monkeypatch.setattr(module, "calling_trainer", lambda callback: None)
    callback = RelexCallback()
    after = Recorder()  # after the callback: it sees the figures at the next log
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer = train(tmp_path / "run", [callback, after], logging_steps=1, **STEADY)
    assert [(e["step"], e["relex/step"]) for e in trainer.state.log_history if "relex/step" in e] == [(8, 8.0), (10, 10.0)]
    # step 10's ride with the trainer's summary log at the end of training
    assert [(step, logs["relex/step"]) for step, logs in after.logs if "relex/step" in logs] == [(9, 8.0), (10, 10.0)]
    assert sum("found no trainer" in r.getMessage() for r in caplog.records) == 1


def test_assess_is_the_same_outside_a_trainer(steady):
    run = steady["run"]
    assessment = assess(run, base=run / BASE_FOLDER, max_step=10, target_steps=TARGET)
    mine = {k: v for k, v in assessment.figures.items() if k != "relex/seconds"}
    theirs = {k: v for k, v in steady["blocking"].latest.figures.items() if k not in ("relex/seconds", "relex/written")}
    assert mine == pytest.approx(theirs, rel=REL)
    steps, oracle = naive_verdict(run, 10, base=run / BASE_FOLDER)
    assert_verdict_matches(assessment.verdict.drift_class, assessment.message, steps, oracle)
    assert_figures_match(assessment.figures, steps, oracle)


def test_a_target_the_run_has_passed_is_left_out(steady, tmp_path):
    run = steady["run"]
    assessment = assess(run, base=run / BASE_FOLDER, max_step=10, target_steps=[6], out_dir=tmp_path / "out",
                        require_plausible=False)
    steps, oracle = naive_verdict(run, 10, base=run / BASE_FOLDER, target=None)
    assert_verdict_matches(assessment.verdict.drift_class, assessment.message, steps, oracle, target=None)
    assert_figures_match(assessment.figures, steps, oracle)
    assert not any("projected" in k for k in assessment.figures)
    assert assessment.figures["relex/written"] == 0.0 and not (tmp_path / "out").exists()


def test_options_are_checked_when_the_callback_is_made():
    with pytest.raises(TypeError, match="regresor"):
        RelexCallback(regresor="linear")
    with pytest.raises(ValueError, match="target_steps"):
        RelexCallback(out_dir="somewhere")
    RelexCallback(target_steps=[100, 50], regressor="linear", rank=2, block_bytes=1 << 20)


@pytest.mark.parametrize("max_step", [8, 10])
def test_relex_check_json_gives_the_figures_the_callback_logged(steady, tmp_path, max_step):
    from relex_cli.app import main

    run, callback = steady["run"], steady["blocking"]
    figures = next(a.figures for a in callback.history if a.step == max_step)
    out = tmp_path / "check.json"
    code = main(["check", str(run), "--base", str(run / BASE_FOLDER), "--max-step", str(max_step),
                 "--target-step", str(TARGET), "--device", "cpu", "--json", str(out), "--quiet"])
    report = json.loads(out.read_text())
    assert code == 0 and report["gate"]["passed"]  # plausible: the gate passes
    assert report["steps"] == [s for s in SAVES if s <= max_step] and report["target_step"] == TARGET
    verdict = report["verdict"]  # relex-check/2: the verdict's record, its statistics in "diagnostics"
    assert figures["relex/plausible"] == (1.0 if verdict["verdict"] == DRIFT else 0.0) == 1.0
    assert figures["relex/drift_share"] == pytest.approx(verdict["drift_share"], rel=REL)
    statistics = verdict["diagnostics"]["observed"]
    for key in ("explained_rank1", "r2_rank1", "alpha", "drift_ratio", "cos_first_last"):
        assert figures[f"relex/{key}"] == pytest.approx(statistics[key], rel=REL), key
    for key in ("line_error", "stop_error", "projected_line_error", "projected_stop_error"):
        assert figures[f"relex/backtest_{key}"] == pytest.approx(verdict["backtest"][key], rel=REL), key
