"""Every bad input: exit code 2, one line on stderr naming the file and the problem, no output left."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from command import one_error_line, relex
from relex.synthetic import make_run, write_checkpoint
from relex.testing import load_state
from relex_cli.app import main


@pytest.fixture
def run(tmp_path):
    make_run(tmp_path / "run", [5, 10, 20])
    return tmp_path / "run"


def invoke(capsys, *args):
    code = main(["extrapolate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def assert_bad_input(capsys, tmp_path, args, *fragments, out_name="out"):
    code, lines = invoke(capsys, *args)
    assert code == 2, lines
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in lines[0]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out_name}") or p.name == out_name]
    assert leftovers == [], leftovers


def test_no_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_bad_input(capsys, tmp_path, [tmp_path / "empty", "--target-step", 50, "--out", tmp_path / "out"],
                     str(tmp_path / "empty"), "no checkpoints found")


def test_only_one_checkpoint(tmp_path, capsys):
    make_run(tmp_path / "run", [5])
    assert_bad_input(capsys, tmp_path, [tmp_path / "run", "--target-step", 50, "--out", tmp_path / "out"],
                     "only 1 observed checkpoint")


def test_duplicate_steps(run, tmp_path, capsys):
    shutil.copytree(run / "checkpoint-10", run / "step_10")
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"], "duplicate step 10")


def test_trainer_state_disagrees(run, tmp_path, capsys):
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 11}))
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     "trainer_state.json", "global_step is 11")


def test_target_inside_window_needs_flag(run, tmp_path, capsys):
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 20, "--out", tmp_path / "out"],
                     "not beyond the last observed step 20", "--allow-interpolation")
    code, _ = invoke(capsys, run, "--target-step", 15, "--out", tmp_path / "inside", "--allow-interpolation", "--quiet")
    assert code == 0 and (tmp_path / "inside" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("target", [10**400, 2**63, -5])
def test_library_refuses_a_step_no_run_can_have(run, tmp_path, target):
    """The library call refuses what the command line refuses, with the same kind of error (no OverflowError
    from float arithmetic, nothing written)."""
    import relex
    from relex.errors import RelexInputError

    with pytest.raises(RelexInputError, match="is not a training step"):
        relex.extrapolate(run, target_step=[30, target], out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == [run]


def test_shape_differs(run, tmp_path, capsys):
    state = load_state(run / "checkpoint-10")
    state["model.norm.weight"] = torch.zeros(33)
    write_checkpoint(run / "checkpoint-10", state, step=10)
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     "checkpoint-10", "'model.norm.weight' has shape [33]")


def test_names_differ(run, tmp_path, capsys):
    state = load_state(run / "checkpoint-10")
    state["model.extra.weight"] = torch.zeros(3)
    write_checkpoint(run / "checkpoint-10", state, step=10)
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     "checkpoint-10", "tensor names differ", "model.extra.weight")


def _shard(run):
    make_run(run, [5, 10, 20], shard_size=10_000)
    return run / "checkpoint-10"


def test_missing_shard(tmp_path, capsys):
    folder = _shard(tmp_path / "run")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_bad_input(capsys, tmp_path, [tmp_path / "run", "--target-step", 50, "--out", tmp_path / "out"],
                     "model.safetensors.index.json", f"missing shard {shard.name!r}")


def test_index_points_outside_folder(tmp_path, capsys):
    folder = _shard(tmp_path / "run")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../checkpoint-5/" + index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_bad_input(capsys, tmp_path, [tmp_path / "run", "--target-step", 50, "--out", tmp_path / "out"],
                     "index points outside its folder")


def test_truncated_file(run, tmp_path, capsys):
    file = run / "checkpoint-10" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     str(file), "truncated file")


def test_corrupt_header(run, tmp_path, capsys):
    file = run / "checkpoint-10" / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"\xff" * 12
    file.write_bytes(bytes(data))
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     str(file), "corrupt safetensors header")


def test_garbage_file(run, tmp_path, capsys):
    file = run / "checkpoint-10" / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 10**12) + b"junk")
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     str(file), "corrupt safetensors header")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf(run, tmp_path, capsys, value):
    state = load_state(run / "checkpoint-20")
    state["model.layers.0.mlp.up_proj.weight"][3, 4] = value
    write_checkpoint(run / "checkpoint-20", state, step=20)
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     str(run / "checkpoint-20" / "model.safetensors"), "NaN or Inf")


def test_out_exists(run, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, lines = invoke(capsys, run, "--target-step", 50, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "output folder exists" in lines[0] and "--overwrite" in lines[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    code, _ = invoke(capsys, run, "--target-step", 50, "--out", tmp_path / "out", "--overwrite", "--quiet")
    assert code == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_out_not_writable(run, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    code, lines = invoke(capsys, run, "--target-step", 50, "--out", tmp_path / "afile" / "out")
    assert code == 2 and len(lines) == 1 and "not writable" in lines[0] and "afile" in lines[0]


def test_pickle_only_refused_unless_asked(run, tmp_path, capsys):
    for step in (0, 5, 10, 20):
        folder = run / f"checkpoint-{step}"
        torch.save(load_state(folder), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out"],
                     "checkpoint-0", "pickled .bin", "--allow-pickle")
    code, lines = invoke(capsys, run, "--target-step", 50, "--out", tmp_path / "out", "--allow-pickle", "--quiet")
    assert code == 0, lines
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").is_file()


def test_unknown_method_and_dtype(run, tmp_path, capsys):
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out", "--method", "magic"],
                     "unknown method 'magic'")
    assert_bad_input(capsys, tmp_path, [run, "--target-step", 50, "--out", tmp_path / "out", "--dtype", "int3"],
                     "unknown --dtype")


def _relex_process(*args) -> subprocess.CompletedProcess:
    """``relex ARGS`` started as users start it, in its own process, with an exit handler of a library."""
    code = ("import atexit, sys; atexit.register(print, 'exit handler ran'); "
            "from relex_cli.app import run; run()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_the_relex_process_ends_with_its_code_its_output_and_the_exit_handlers(run, tmp_path):
    """The process skips Python's teardown of its modules, not what an exit does before it: exit code,
    everything printed (stdout a pipe), ``atexit`` handlers run after the command."""
    bad = _relex_process("extrapolate", tmp_path / "missing", "--target-step", 50, "--out", tmp_path / "out")
    assert bad.returncode == 2, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert bad.stderr.startswith("relex: error:") and "missing" in bad.stderr
    assert bad.stdout == "exit handler ran\n"
    good = _relex_process("extrapolate", run, "--target-step", 40, "--out", tmp_path / "out")
    assert good.returncode == 0, good.stderr
    lines = good.stdout.splitlines()
    assert "relex extrapolate" in lines[0] and lines[-1] == "exit handler ran"
    assert "wrote step 40" in good.stdout and json.loads((tmp_path / "out" / "relex.json").read_text())


def test_a_reader_gone_from_the_pipe_leaves_the_work_and_the_exit_code(run, tmp_path):
    """``relex check … | head -1`` with the reader gone before anything is printed: the check still writes its
    JSON and exits with the gate's code, as with a reader, not 1 from a broken pipe."""
    from command import RELEX, environment

    args = [str(RELEX), "check", str(run), "--target-step", "40"]
    read = relex(*args[1:], "--json", tmp_path / "read.json")
    process = subprocess.Popen([*args, "--json", str(tmp_path / "gone.json")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environment())
    process.stdout.close()  # the reader goes first: the command's first line meets a closed pipe
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=600) == read.returncode, stderr
    assert read.returncode in (0, 3) and "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert json.loads((tmp_path / "gone.json").read_text())["verdict"] == json.loads(
        (tmp_path / "read.json").read_text())["verdict"]


def _no_output_left(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".out", "out", ".results", "results")))


@pytest.mark.parametrize("command", ["extrapolate", "check", "analyze", "fit", "materialize", "eval"])
def test_device_cuda_without_cuda_is_refused_by_the_relex_command(command, run, tmp_path):
    """``--device cuda`` on a machine without CUDA: exit 2, one line saying so, nothing written, from every
    command that takes the option (through the installed ``relex`` command)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda is not refused")
    from relex.testing import save_tiny_model

    out = tmp_path / "out"
    if command == "materialize":
        assert main(["fit", str(run), "--out", str(tmp_path / "trajectory"), "--quiet"]) == 0
        args = [tmp_path / "trajectory", "--target-step", 50, "--out", out]
    elif command == "eval":
        save_tiny_model(tmp_path / "model", arch="llama", seed=0)
        args = [tmp_path / "model", "--tasks", "toy", "--limit", 2, "--out", tmp_path / "results.json"]
    elif command == "check":
        args = [run, "--target-step", 50, "--json", tmp_path / "results.json"]
    elif command in ("analyze", "fit"):
        args = [run, "--out", out]
    else:
        args = [run, "--target-step", 50, "--out", out]
    done = relex(command, *args, "--device", "cuda", timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--device cuda requested but CUDA is not available" in one_error_line(done)
    assert _no_output_left(tmp_path) == []


def test_backend_vllm_without_vllm_is_refused_by_the_relex_command(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: --backend vllm is not refused")
    pytest.importorskip("lm_eval", reason="relex eval needs lm-eval (pip install 'relex-rlvr[eval]')")
    pytest.importorskip("math_verify", reason="relex eval needs math-verify (pip install 'relex-rlvr[eval]')")
    from relex.testing import save_tiny_model

    save_tiny_model(tmp_path / "model", arch="llama", seed=0)
    done = relex("eval", tmp_path / "model", "--tasks", "toy", "--limit", 2, "--backend", "vllm",
                 "--out", tmp_path / "results.json", timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_error_line(done)
    assert "--backend vllm needs vLLM, which is not installed" in line and "pip install vllm" in line
    assert _no_output_left(tmp_path) == []


def test_output_files_that_cannot_be_written_are_refused_before_any_work(run, tmp_path):
    """A summary, report or JSON path that is a folder (or whose folder is missing) is one line and exit 2 before
    the run is read, through the installed command; nothing is written."""
    folder = tmp_path / "a-folder"
    folder.mkdir()
    cases = [
        (["extrapolate", run, "--target-step", 50, "--out", tmp_path / "o1", "--summary", folder], "is a folder"),
        (["extrapolate", run, "--target-step", 50, "--out", tmp_path / "o2", "--report", folder], "is a folder"),
        (["check", run, "--target-step", 50, "--json", folder], "is a folder"),
        (["check", run, "--target-step", 50, "--summary", tmp_path / "missing" / "s.md"], "folder does not exist"),
    ]
    for args, fragment in cases:
        done = relex(*args)
        assert done.returncode == 2, (args, done.stderr)
        line = one_error_line(done)
        assert fragment in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "run"]  # no output, no staging folder
    assert list(folder.iterdir()) == []
    (tmp_path / "a-file").write_text("mine")
    done = relex("demo", "--out", tmp_path / "a-file", "--preset", "ci")
    assert done.returncode == 2 and "output path exists and is not a folder" in one_error_line(done)
    assert (tmp_path / "a-file").read_text() == "mine"


def test_target_step_auto_is_refused_where_no_probe_can_choose(run, tmp_path):
    for command in (["analyze", run, "--out", tmp_path / "a"], ["fit", run, "--out", tmp_path / "f"]):
        done = relex(*command, "--target-step", "auto")
        assert done.returncode == 2 and "relex extrapolate or relex check with --probe" in one_error_line(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_python_dash_m_relex_names_the_command():
    done = subprocess.run([sys.executable, "-m", "relex", "extrapolate", "--help"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert one_error_line(done).endswith("the command is `relex ...` (or `python -m relex_cli ...`); `python -m "
                                          "relex` runs nothing")


def test_the_trainer_callback_reads_target_steps_as_the_command_line_does():
    from relex.errors import RelexInputError
    from relex.integrations.trainer import RelexCallback

    assert RelexCallback(target_steps="500").target_steps == [500]  # not [0, 5], the string's characters
    assert RelexCallback(target_steps="300,100").target_steps == [100, 300]
    assert RelexCallback(target_steps=(200, 100, 200)).target_steps == [100, 200]
    for bad in (0, -5, "1e3", "ten"):
        with pytest.raises(RelexInputError, match="--target-step"):
            RelexCallback(target_steps=bad)
