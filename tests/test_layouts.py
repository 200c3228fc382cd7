"""Run layouts of real trainers, outputs of relex inside a run, step ranges and retention hints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from relex.api import extrapolate
from relex.errors import RelexInputError
from relex.io.discover import discover_series, parse_steps
from relex.synthetic import make_run
from relex.testing import load_state
from relex_cli.app import main


def invoke(capsys, *args):
    code = main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def same_tensors(a, b):
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.fixture
def plain_run(tmp_path):
    make_run(tmp_path / "plain", [5, 10, 15, 20], layout="step_{step}")
    return tmp_path / "plain"


def test_openrlhf_hf_folders_read_and_deepspeed_folders_ignored(tmp_path, plain_run):
    run = tmp_path / "openrlhf"
    make_run(run, [5, 10, 15, 20], layout="global_step{step}_hf")
    for step in (5, 10, 15, 20):  # the DeepSpeed states OpenRLHF writes beside the HF folders
        (run / f"global_step{step}").mkdir()
        (run / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"not weights")
    series = discover_series(run)
    assert series.steps == [5, 10, 15, 20] and series.layout == "openrlhf"
    extrapolate(run, target_step=40, out_dir=tmp_path / "a")
    extrapolate(plain_run, target_step=40, out_dir=tmp_path / "b")
    same_tensors(tmp_path / "a", tmp_path / "b")


def test_deepspeed_only_run_is_refused_with_the_conversion(tmp_path, capsys):
    run = tmp_path / "ds"
    for step in (0, 5, 10):
        (run / f"global_step{step}").mkdir(parents=True)
        (run / f"global_step{step}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
        (run / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    code, _, lines = invoke(capsys, "extrapolate", run, "--target-step", 50, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "DeepSpeed" in lines[0] and "zero_to_fp32.py" in lines[0] and "--ckpt.save_hf" in lines[0]
    assert "--tag global_step" in lines[0]
    assert not (tmp_path / "out").exists()


def test_verl_merged_layout(tmp_path, plain_run):
    run = tmp_path / "verl"
    make_run(run, [5, 10, 15, 20], layout="global_step_{step}/actor/huggingface")
    assert discover_series(run).layout == "verl"
    extrapolate(run, target_step=40, out_dir=tmp_path / "a")
    extrapolate(plain_run, target_step=40, out_dir=tmp_path / "b")
    same_tensors(tmp_path / "a", tmp_path / "b")


def test_outputs_of_relex_are_never_read_as_checkpoints(tmp_path, capsys, plain_run):
    # An extrapolated folder moved into the run under a checkpoint name is skipped and reported.
    extrapolate(plain_run, target_step=100, out_dir=tmp_path / "pred")
    shutil.move(tmp_path / "pred", plain_run / "step_100")
    series = discover_series(plain_run)
    assert series.steps == [5, 10, 15, 20]
    assert [f.name for f, _ in series.skipped] == ["step_100"]
    code, out, _ = invoke(capsys, "extrapolate", plain_run, "--target-step", 40, "--out", tmp_path / "o")
    assert code == 0
    assert "skipped" in out and "step_100" in out and "written by relex" in out
    provenance = json.loads((tmp_path / "o" / "relex.json").read_text())
    assert provenance["observed_steps"] == [5, 10, 15, 20]
    assert provenance["skipped"][0]["folder"].endswith("step_100")
    assert provenance["sources"]["observed_kind"] == "safetensors"


def test_out_inside_the_run_with_a_checkpoint_name_is_refused(tmp_path, capsys, plain_run):
    for name in ("step_100", "checkpoint-100", "global_step_100"):
        code, _, lines = invoke(capsys, "extrapolate", plain_run, "--target-step", 100, "--out", plain_run / name)
        assert code == 2 and len(lines) == 1, lines
        assert "checkpoint name" in lines[0] and name in lines[0]
        assert not (plain_run / name).exists()
    # Any other name inside the run is fine.
    code, _, _ = invoke(capsys, "extrapolate", plain_run, "--target-step", 100, "--out", plain_run / "relex-100",
                        "--quiet")
    assert code == 0


def test_step_ranges():
    assert parse_steps("1-5") == [1, 2, 3, 4, 5]
    assert parse_steps("10-50:10,75") == [10, 20, 30, 40, 50, 75]
    assert parse_steps([3, 1]) == [1, 3]
    for bad in ("5-1", "1-5:0", "a-b", "1,1"):
        with pytest.raises(RelexInputError):
            parse_steps(bad)


def test_steps_range_on_the_command_line(tmp_path, capsys):
    make_run(tmp_path / "run", [5, 10, 15, 20, 25, 30])
    code, _, lines = invoke(capsys, "extrapolate", tmp_path / "run", "--steps", "10-30:10", "--target-step", 60,
                            "--out", tmp_path / "o", "--quiet")
    assert code == 0, lines
    assert json.loads((tmp_path / "o" / "relex.json").read_text())["observed_steps"] == [10, 20, 30]


@pytest.mark.parametrize("layout, setting", [
    ("checkpoint-{step}", "save_total_limit"),
    ("global_step_{step}/actor/huggingface", "trainer.max_actor_ckpt_to_keep"),
    ("global_step{step}_hf", "--ckpt.max_num"),
])
def test_too_few_checkpoints_names_the_trainer_setting(tmp_path, capsys, layout, setting):
    make_run(tmp_path / "run", [5], layout=layout)
    code, _, lines = invoke(capsys, "extrapolate", tmp_path / "run", "--target-step", 50, "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1
    assert "only 1 observed checkpoint" in lines[0] and setting in lines[0]


def test_short_window_verdict_names_the_trainer_setting(tmp_path, capsys):
    make_run(tmp_path / "run", [5, 10])
    code, out, _ = invoke(capsys, "extrapolate", tmp_path / "run", "--target-step", 50, "--out", tmp_path / "o")
    assert code == 0
    assert "too short" in out and "save_steps" in out
