"""--regressor auto and --scale auto: backtest-driven choices that beat the default against the truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

import relex
from relex.synthetic import make_run
from relex.testing import load_state
from relex_cli.app import main

STEPS = list(range(4, 44, 4))  # observe 4..40
TARGET = 100


def saturating(t):
    return 1.0 - np.exp(-np.asarray(t, dtype=np.float64) / 25.0)


def linear(t):
    return np.asarray(t, dtype=np.float64) / 40.0


def error(out: dict, truth: dict, base: dict) -> float:
    """Whole-model relative error of the update ‖ŵ − w‖ / ‖w − w_0‖."""
    num = sum(float((out[n].double() - truth[n].double()).square().sum()) for n in truth)
    den = sum(float((truth[n].double() - base[n].double()).square().sum()) for n in truth)
    return (num / den) ** 0.5


def run_case(tmp_path, coefficient, noise, kind, seed, **options):
    """Write a run that continues to TARGET, observe up to step 40, extrapolate; return errors vs the truth."""
    run = make_run(tmp_path / "run", [*STEPS, TARGET], coefficients=(coefficient,), noise=noise, noise_kind=kind,
                   seed=seed)
    base = load_state(tmp_path / "run" / "checkpoint-0")
    realized = load_state(tmp_path / "run" / f"checkpoint-{TARGET}")  # what training actually reached
    clean = run.truth(TARGET)  # the drift alone
    results = {}
    for label, kwargs in options.items():
        result = relex.extrapolate(tmp_path / "run", target_step=TARGET, out_dir=tmp_path / label, max_step=STEPS[-1],
                                   **kwargs)
        out = load_state(tmp_path / label)
        results[label] = (result, error(out, clean, base), error(out, realized, base))
    return results


@pytest.mark.parametrize("seed", [0, 1])
def test_saturating_run_picks_a_nonlinear_predictor(tmp_path, seed):
    results = run_case(tmp_path, saturating, 0.01, "iid", seed,
                       linear={"regressor": "linear"}, auto={"regressor": "auto"})
    result, clean, realized = results["auto"]
    chosen = result.selection["decisions"]["run"]["regressor"]
    assert chosen not in ("linear", "anchored"), chosen
    _, clean_linear, realized_linear = results["linear"]
    assert clean < 0.25 * clean_linear and realized < 0.25 * realized_linear
    assert all(t.stats["regressor"] == chosen for t in result.tensors)


@pytest.mark.parametrize("seed", [0, 1])
def test_linear_run_keeps_linear(tmp_path, seed):
    results = run_case(tmp_path, linear, 0.02, "iid", seed, auto={"regressor": "auto"})
    result, clean, _ = results["auto"]
    assert result.selection["decisions"]["run"]["regressor"] == "linear"
    assert clean < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_random_walk_noise_picks_an_anchored_shrunk_predictor(tmp_path, seed):
    results = run_case(tmp_path, linear, 0.3, "walk", seed,
                       relex={"regressor": "linear"}, auto={"regressor": "auto"})
    result, clean, realized = results["auto"]
    assert result.selection["decisions"]["run"]["regressor"].startswith("anchored")
    shrink = [t.stats["shrink"][0] for t in result.tensors]
    assert max(shrink) < 0.9 and min(shrink) >= 0.0  # shrunk, not a full extrapolation
    _, clean_relex, realized_relex = results["relex"]
    assert clean < 0.8 * clean_relex and realized < 0.8 * realized_relex


def test_group_and_tensor_scopes(tmp_path):
    results = run_case(tmp_path, saturating, 0.01, "iid", 0,
                       group={"regressor": "auto", "auto_scope": "group"},
                       tensor={"regressor": "auto", "auto_scope": "tensor", "scale": "auto"})
    group, clean_group, _ = results["group"]
    assert group.result.passes == 2 and set(group.selection["decisions"]) == {
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.mlp.up_proj.weight", "model.layers.*.input_layernorm.weight", "model.norm.weight"}
    tensor, clean_tensor, _ = results["tensor"]
    assert tensor.result.passes == 1 and tensor.selection["scope"] == "tensor"
    for t in tensor.tensors:
        assert t.stats["regressor"] != "linear" and 0.0 <= t.stats["scale"] <= 2.0 and "auto" in t.stats
    assert clean_group < 0.1 and clean_tensor < 0.1


def test_scale_auto_shrinks_an_overshooting_line(tmp_path):
    results = run_case(tmp_path, saturating, 0.01, "iid", 0, one={"regressor": "linear"},
                       auto={"regressor": "linear", "scale": "auto"})
    result, clean, _ = results["auto"]
    decision = result.selection["decisions"]["run"]
    assert 0.0 < decision["scale"] < 1.0  # the line overshoots the held-out checkpoints
    assert clean < results["one"][1]


def test_matrix_rank1_auto_and_learned_candidate(tmp_path):
    results = run_case(tmp_path, saturating, 0.01, "iid", 0,
                       rank1={"method": "matrix-rank1", "regressor": "auto",
                              "candidates": "linear,saturating,mlp,anchored"})
    result, _, _ = results["rank1"]
    errors = result.selection["decisions"]["run"]["errors"]
    assert set(errors) == {"linear", "saturating", "mlp", "anchored"}
    assert all(np.isfinite(e["error"]) for e in errors.values())
    assert errors["saturating"]["error"] < errors["linear"]["error"]


def test_auto_on_the_command_line(tmp_path, capsys):
    make_run(tmp_path / "run", STEPS, coefficients=(saturating,), noise=0.01)
    code = main(["extrapolate", str(tmp_path / "run"), "--target-step", "100", "--out", str(tmp_path / "out"),
                 "--regressor", "auto", "--candidates", "linear,saturating,anchored", "--holdout", "3",
                 "--scale", "auto"])
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert "backtest: fit on steps ≤ 28, predict 32, 36, 40" in printed and "chosen" in printed
    provenance = json.loads((tmp_path / "out" / "relex.json").read_text())
    assert provenance["regressor"] == "auto" and provenance["scale"] == "auto"
    assert provenance["candidates"] == ["linear", "saturating", "anchored"]
    decision = provenance["selection"]["decisions"]["run"]
    assert decision["regressor"] == "saturating" and set(decision["errors"]) == {"linear", "saturating", "anchored"}
    assert provenance["selection"]["held_out_steps"] == [32.0, 36.0, 40.0]
    assert provenance["tensors"]["model.norm.weight"]["regressor"] == "saturating"


@pytest.mark.parametrize("args,fragment", [
    (["--regressor", "auto", "--method", "elementwise"], "applies to the relex and matrix-rank1 modes"),
    (["--regressor", "auto", "--holdout", "9"], "needs at least 2 checkpoints to fit"),
    (["--regressor", "poly7"], "polynomial degree must be 1..6"),
    (["--scale", "big"], "--scale must be a number or 'auto'"),
    (["--auto-scope", "layer", "--regressor", "auto"], "--auto-scope must be one of run, group, tensor"),
    (["--method", "matrix-rank1", "--rank", "2"], "one singular triple per matrix"),
    (["--candidates", "linear,auto", "--regressor", "auto"], "cannot contain 'auto'"),
])
def test_bad_model_options_are_input_errors(tmp_path, capsys, args, fragment):
    make_run(tmp_path / "run", STEPS)
    code = main(["extrapolate", str(tmp_path / "run"), "--target-step", "100", "--out", str(tmp_path / "out"), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()
