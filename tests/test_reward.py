"""The training reward's trend beside the weights: read from trainer_state.json or JSON Lines, fitted by a line,
and a reward that reaches its ceiling before the target makes the verdict mixed (relex check, extrapolate)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from relex.analysis.reward import (RewardLog, checkpoint_reward_trend, find_reward_log, read_reward_log,
                                   reward_trend)
from relex.analysis.verdict import DRIFT, MIXED, run_verdict
from relex.errors import RelexInputError
from relex.options import RunOptions
from relex_cli.app import main
from test_check import TARGET  # the toy fixture (conftest.py): the demo's run and its noisy twin, steps 5..20

STEPS = [5, 10, 15, 20, 25, 30]


def _log(rewards: dict[int, float]) -> RewardLog:
    return RewardLog(tuple(float(s) for s in rewards), tuple(rewards.values()), "reward", "test")


def test_a_rising_reward_reaches_its_ceiling_where_its_line_does():
    # reward = 0.3 + 0.01 t: the line reaches 1.0 at t = 70 exactly
    log = _log({t: 0.3 + 0.01 * t for t in range(1, 31)})
    trend = reward_trend(log, STEPS, target_step=100)
    assert trend.points == 25  # steps 6..30: after the window's first step, up to its last
    assert trend.slope == pytest.approx(0.01) and trend.at_last_step == pytest.approx(0.6)
    assert trend.ceiling_step == pytest.approx(70.0) and trend.at_target == pytest.approx(1.3)
    assert trend.saturates_before_target and "before the target step 100" in trend.text()
    assert not reward_trend(log, STEPS, target_step=60).saturates_before_target  # 60 < 70
    assert reward_trend(log, STEPS, target_step=100, ceiling=2.0).ceiling_step == pytest.approx(170.0)
    # A flat or falling reward never reaches the ceiling; a reward above it makes the check inapplicable.
    flat = reward_trend(_log({t: 0.5 for t in range(1, 31)}), STEPS, 1000)
    assert flat.ceiling_step is None and not flat.saturates_before_target
    above = reward_trend(_log({t: 0.9 + 0.01 * t for t in range(1, 31)}), STEPS, 100)
    assert above.above_ceiling and not above.saturates_before_target and "not checked" in above.text()
    # Too few rewards inside the window: no trend.
    assert reward_trend(_log({t: 0.1 * t for t in (1, 10, 20, 30)}), STEPS, 100) is None


def test_the_trend_is_the_least_squares_line():
    rng = np.random.default_rng(0)
    t = np.arange(1, 31, dtype=float)
    y = 0.2 + 0.004 * t + rng.normal(0, 0.05, t.size)
    trend = reward_trend(_log(dict(zip(t.astype(int).tolist(), y.tolist()))), STEPS, 100)
    inside = t > STEPS[0]
    slope, intercept = np.linalg.lstsq(np.stack([t[inside], np.ones(inside.sum())], 1), y[inside], rcond=None)[0]
    assert trend.slope == pytest.approx(slope, rel=1e-9)
    assert trend.ceiling_step == pytest.approx((1.0 - intercept) / slope, rel=1e-9)


def test_reward_logs_from_trainer_state_and_json_lines(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"global_step": 4, "log_history": [
        {"step": 1, "reward": 0.1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "reward": 0.2},
        {"step": 3, "reward": 0.3}, {"step": 3, "reward": 0.35}, {"step": 4, "train_runtime": 5.0}]}))
    log = read_reward_log(state)
    assert log.steps == (1.0, 2.0, 3.0) and log.values == (0.1, 0.2, 0.35)  # a step logged twice keeps its last
    assert find_reward_log(tmp_path).values == log.values
    assert find_reward_log(tmp_path, key="rewards/accuracy/mean") is None  # not an error: the weights decide
    assert find_reward_log(tmp_path / "missing") is None
    lines = tmp_path / "rewards.jsonl"
    lines.write_text("\n".join(json.dumps({"step": s, "acc": 0.1 * s}) for s in range(1, 6)) + "\n")
    assert read_reward_log(lines, key="acc").values == pytest.approx((0.1, 0.2, 0.3, 0.4, 0.5))
    for text, problem in (("{not json", "not JSON"), ('{"step": 1, "reward": "high"}\n{"step": 2}', "not a number"),
                          ('{"step": 1, "loss": 0.5}', "no step logs a finite 'reward'")):
        lines.write_text(text)
        with pytest.raises(RelexInputError) as error:
            read_reward_log(lines)
        assert str(lines) in str(error.value) and problem in str(error.value)


def test_a_saturating_reward_makes_a_drift_dominated_verdict_mixed():
    steps = [5.0, 10.0, 15.0, 20.0]
    rng = np.random.default_rng(1)
    grams = {}
    for i in range(4):  # four matrices moving along their own lines: drift-dominated
        path = np.outer(steps, rng.normal(size=500)) + rng.normal(0, 0.05, (4, 500))
        grams[f"w{i}"] = path @ path.T
    ndims = dict.fromkeys(grams, 2)
    assert run_verdict(grams, ndims, steps, 60).drift_class == DRIFT
    rising = _log({t: 0.5 + 0.02 * t for t in range(1, 21)})  # reaches 1.0 at step 25
    saturating = reward_trend(rising, steps, 60)
    verdict = run_verdict(grams, ndims, steps, 60, reward=saturating)
    assert verdict.drift_class == MIXED and "training reward saturates before the target" in verdict.message
    assert "step 25, before step 60" in verdict.message
    assert verdict.calibration["reward"]["ceiling_step"] == pytest.approx(25.0)
    slow = reward_trend(_log({t: 0.5 + 0.001 * t for t in range(1, 21)}), steps, 60)  # reaches 1.0 at 500
    assert run_verdict(grams, ndims, steps, 60, reward=slow).drift_class == DRIFT
    # The verdict before calibration (whole-model figures only) does not weigh the reward.
    assert run_verdict(grams, ndims, steps, 60, reward=saturating, calibrated=False).drift_class == DRIFT


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _with_rewards(run: Path, folder: Path, rewards: dict[int, float]) -> Path:
    """A copy of ``run`` whose checkpoints' trainer_state.json log ``rewards`` (up to each one's step)."""
    shutil.copytree(run, folder)
    for checkpoint in folder.glob("checkpoint-*"):
        path = checkpoint / "trainer_state.json"
        state = json.loads(path.read_text())
        state["log_history"] = [{"step": s, "reward": r} for s, r in rewards.items() if s <= state["global_step"]]
        path.write_text(json.dumps(state))
    return folder


def test_check_and_extrapolate_weigh_the_logged_reward_alike(toy, tmp_path, capsys):  # noqa: F811
    # The toy trainer logs its reward in every checkpoint's trainer_state.json: relex check reads it.
    report = tmp_path / "check.json"
    code, out, err = _run(["check", toy["demo"], "--target-step", TARGET, "--json", report], capsys)
    assert code == 0, out + err
    data = json.loads(report.read_text())
    logged = json.loads((toy["demo"] / "checkpoint-20" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in logged] == list(range(1, 21))
    reward = data["verdict"]["reward"]
    assert reward["points"] == 15 and reward["key"] == "reward"  # steps 6..20
    assert data["gate"]["outcome"] == "plausible" and not reward["saturates_before_target"]
    assert reward["text"] in " ".join(out.split())

    # The same weights with a reward that reaches 1.0 at step 30, before the target (60): mixed, exit 3 (exit 0
    # with a warning under --lenient); relex extrapolate writes the same verdict into relex.json.
    rising = _with_rewards(toy["demo"], tmp_path / "rising", {t: 0.4 + 0.02 * t for t in range(1, 21)})
    code, out, err = _run(["check", rising, "--target-step", TARGET, "--json", report], capsys)
    assert code == 3, out + err
    data = json.loads(report.read_text())
    assert data["verdict"]["verdict"] == MIXED and data["gate"]["outcome"] == "mixed" and data["gate"]["status"] == (
        "failed")
    assert _run(["check", rising, "--target-step", TARGET, "--lenient", "--quiet"], capsys)[0] == 0
    assert "training reward saturates before the target" in data["verdict"]["message"]
    assert data["verdict"]["reward"]["ceiling_step"] == pytest.approx(30.0)
    out_dir = tmp_path / "pred"
    code, out, err = _run(["extrapolate", rising, "--target-step", TARGET, "--out", out_dir], capsys)
    assert code == 0, out + err
    record = json.loads((out_dir / "relex.json").read_text())
    assert record["verdict"]["verdict"] == MIXED and record["verdict"]["message"] == data["verdict"]["message"]
    # --rewards none judges the weights alone; a file given explicitly is used instead.
    assert _run(["check", rising, "--target-step", TARGET, "--rewards", "none", "--quiet"], capsys)[0] == 0
    flat = tmp_path / "flat.jsonl"
    flat.write_text("".join(json.dumps({"step": t, "acc": 0.5}) + "\n" for t in range(1, 21)))
    code, out, err = _run(["check", rising, "--target-step", TARGET, "--rewards", flat, "--reward-key", "acc",
                           "--json", report], capsys)
    assert code == 0, out + err
    assert json.loads(report.read_text())["verdict"]["reward"]["source"] == str(flat)


def test_a_bad_reward_file_is_refused_before_anything_is_read(toy, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "rewards.jsonl"
    bad.write_text('{"step": 1, "loss": 0.3}\n')
    report = tmp_path / "check.json"
    code, out, err = _run(["check", toy["demo"], "--target-step", TARGET, "--rewards", bad, "--json", report],
                          capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(bad) in err and "'reward'" in err
    assert not report.exists()
    # A file whose steps miss the observed window (steps 5..20) cannot weigh in: refused, not ignored.
    bad.write_text("".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in range(100, 120)))
    code, out, err = _run(["check", toy["demo"], "--target-step", TARGET, "--rewards", bad, "--json", report],
                          capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(bad) in err and "0 rewards logged under 'reward' after step 5 up to step 20" in err
    assert not report.exists()


def test_checkpoint_reward_trend_of_a_folder_without_a_log(tmp_path):
    assert checkpoint_reward_trend(tmp_path, STEPS, 100) is None


def test_the_leap_weighs_the_segment_reward_like_check():
    import torch

    from relex.integrations.leap import fit_segment

    generator = torch.Generator().manual_seed(0)
    directions = {f"layers.{i}.weight": torch.randn(64, 64, generator=generator) for i in range(4)}
    base = {name: torch.zeros(64, 64) for name in directions}
    snapshots = [(t, {name: t * v + 0.01 * torch.randn(64, 64, generator=generator)
                      for name, v in directions.items()}) for t in (2, 4, 6, 8)]
    alone = fit_segment(base, snapshots, 24)
    assert alone.verdict.drift_class == DRIFT and alone.verdict.plausible
    rising = [(t, 0.5 + 0.05 * t) for t in range(1, 8)]  # reaches 1.0 at step 10, before the jump's end (24)
    guarded = fit_segment(base, snapshots, 24, rewards=rising)
    assert guarded.verdict.drift_class == MIXED and not guarded.verdict.plausible
    assert "training reward saturates before the target" in guarded.verdict.message
    assert all(torch.equal(guarded.prediction[n], alone.prediction[n]) for n in directions)  # same fit
    ceiling = RunOptions.of(reward_max=2.0, device="cpu")
    assert fit_segment(base, snapshots, 24, ceiling, rewards=rising).verdict.plausible  # 2.0 is reached at 30
