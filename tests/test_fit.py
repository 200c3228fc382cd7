"""relex fit + relex materialize: a stored trajectory writes exactly what relex extrapolate writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import relex
from relex.store import materialize
from relex.synthetic import make_run, write_checkpoint
from relex.testing import load_state
from relex_cli.app import main

STEPS = [3, 7, 8, 15, 22, 40]
TARGETS = [60, 150]


def saturating(t):
    return 1.0 - np.exp(-np.asarray(t, dtype=np.float64) / 30.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit") / "run"
    make_run(root, STEPS, coefficients=(saturating,), noise=0.05, dtype=torch.bfloat16)
    return root


def assert_identical(a, b):
    for step in TARGETS:
        left, right = load_state(a / f"step-{step}"), load_state(b / f"step-{step}")
        assert left.keys() == right.keys()
        for name in left:
            assert left[name].dtype == right[name].dtype
            assert torch.equal(left[name], right[name]), (step, name)


@pytest.mark.parametrize("options", [
    {},
    {"rank": 2, "regressor": "poly2", "scale": 0.8},
    {"regressor": "anchored"},
    {"regressor": "auto", "scale": "auto"},
    {"regressor": "auto", "auto_scope": "tensor", "block_bytes": 4096},
    {"method": "matrix-rank1", "regressor": "anchored-saturating"},
    {"method": "matrix-rank1", "block_bytes": 4096},
    {"method": "elementwise", "copy_norms": True, "from_step": 15},
    {"method": "last", "dtype": "float32"},
])
def test_materialize_equals_extrapolate(run, tmp_path, options):
    relex.extrapolate(run, target_step=TARGETS, out_dir=tmp_path / "extrapolated", **options)
    relex.fit(run, tmp_path / "trajectory", **options)
    materialize(tmp_path / "trajectory", target_step=TARGETS, out_dir=tmp_path / "materialized",
                **({"block_bytes": options["block_bytes"]} if "block_bytes" in options else {}))
    assert_identical(tmp_path / "extrapolated", tmp_path / "materialized")


def test_learned_predictor_is_stored_not_retrained(run, tmp_path):
    options = {"regressor": "mlp", "steps": "7,8,15,22,40"}
    relex.extrapolate(run, target_step=TARGETS, out_dir=tmp_path / "extrapolated", **options)
    relex.fit(run, tmp_path / "trajectory", **options)
    manifest = json.loads((tmp_path / "trajectory" / "trajectory.json").read_text())
    assert manifest["tensors"]["model.norm.weight"]["params"]["fit"]["kind"] == "mlp"
    materialize(tmp_path / "trajectory", target_step=TARGETS, out_dir=tmp_path / "materialized")
    assert_identical(tmp_path / "extrapolated", tmp_path / "materialized")


def test_storage_cost_and_layout(run, tmp_path):
    rank2 = relex.fit(run, tmp_path / "rank2", rank=2)
    model_bytes = rank2.manifest["storage"]["model_bytes"]  # the bf16 base
    assert rank2.storage_bytes == 2 * 2 * model_bytes  # k = 2 float32 directions per tensor
    compact = relex.fit(run, tmp_path / "compact", storage_dtype="auto")
    assert compact.storage_bytes == model_bytes
    rank1 = relex.fit(run, tmp_path / "rank1", method="matrix-rank1")
    assert rank1.storage_bytes < 0.2 * model_bytes  # u and v per matrix
    # the second pass reads only what the models mix: here the base (and two checkpoints of 1-D tensors)
    assert rank1.bytes_read < 1.2 * (1 + len(STEPS)) * model_bytes
    entry = rank2.manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert entry["basis"] == ["model.layers.0.mlp.up_proj.weight@b0", "model.layers.0.mlp.up_proj.weight@b1"]
    assert entry["params"]["method"] == "relex" and entry["dtype"] == "BF16"
    assert (tmp_path / "rank2" / "config.json").is_file()
    # bf16 storage rounds the directions: close to, not identical with, the float32 result
    materialize(tmp_path / "compact", target_step=60, out_dir=tmp_path / "a", dtype="float32")
    relex.extrapolate(run, target_step=60, out_dir=tmp_path / "c", dtype="float32")
    base, a, c = load_state(run / "checkpoint-0"), load_state(tmp_path / "a"), load_state(tmp_path / "c")
    for name in base:
        update = c[name].double() - base[name].double()
        assert float((a[name].double() - base[name].double() - update).norm() / update.norm()) < 1e-2


def test_materialize_scale_override_and_provenance(run, tmp_path):
    relex.fit(run, tmp_path / "trajectory")
    materialize(tmp_path / "trajectory", target_step=90, out_dir=tmp_path / "half", scale=0.5)
    relex.extrapolate(run, target_step=90, out_dir=tmp_path / "direct", scale=0.5)
    half, direct = load_state(tmp_path / "half"), load_state(tmp_path / "direct")
    assert all(torch.equal(half[n], direct[n]) for n in half)
    provenance = json.loads((tmp_path / "half" / "relex.json").read_text())
    assert provenance["scale"] == 0.5 and provenance["target_step"] == 90
    assert provenance["materialized_from"].endswith("trajectory")


def test_fit_and_materialize_on_the_command_line(run, tmp_path, capsys):
    assert main(["fit", str(run), "--out", str(tmp_path / "traj"), "--regressor", "auto"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "stored the relex trajectory" in printed and "chosen" in printed
    assert main(["materialize", str(tmp_path / "traj"), "--target-step", "60,150", "--out",
                 str(tmp_path / "mat")]) == 0
    assert main(["extrapolate", str(run), "--target-step", "60,150", "--out", str(tmp_path / "ex"),
                 "--regressor", "auto", "--quiet"]) == 0
    assert_identical(tmp_path / "ex", tmp_path / "mat")


def test_materialize_bad_inputs(run, tmp_path, capsys):
    relex.fit(run, tmp_path / "traj")

    def bad(args, fragment):
        code = main(["materialize", *map(str, args)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
        assert not (tmp_path / "out").exists()

    bad([run, "--target-step", 60, "--out", tmp_path / "out"], "not a trajectory folder")
    bad([tmp_path / "traj", "--target-step", 30, "--out", tmp_path / "out"], "not beyond the last observed step 40")
    other = load_state(run / "checkpoint-0")
    other["model.norm.weight"] = other["model.norm.weight"] + 1.0
    write_checkpoint(tmp_path / "other-base", other, step=0)
    bad([tmp_path / "traj", "--target-step", 60, "--out", tmp_path / "out", "--base", tmp_path / "other-base"],
        "differs from the base the trajectory was fitted on")
    (tmp_path / "traj" / "trajectory.json").write_text("{")
    bad([tmp_path / "traj", "--target-step", 60, "--out", tmp_path / "out"], "corrupt trajectory manifest")
