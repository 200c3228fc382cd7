"""Hub trajectories (hf://ORG/REPO) and Hub ids as --base, offline from a hand-made Hugging Face cache.

The cache is laid out as huggingface_hub documents it: ``models--ORG--NAME/refs/<revision>`` holds a commit
id, ``snapshots/<commit>/`` the files (symlinks into ``blobs/``, or plain files: both must work). The online
path (listing, free-space check, downloads) is tested by injecting the Hub's answers: there is no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from typer.testing import CliRunner

import relex
from relex.errors import RelexInputError
from relex.io import hub
from relex.synthetic import make_run
from relex.testing import load_state
from relex_cli.app import register_commands, app, main

STEPS = [0, 2, 4, 6, 8, 10]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline; huggingface_hub read both settings at import, so patch them."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setattr(constants, name, str(folder))
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


@pytest.fixture
def online(cache, monkeypatch):
    """Online mode over the temporary cache; every test using it injects the Hub's answers."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A local run with known trajectory: checkpoint-0 (the base) and steps 2…10."""
    root = tmp_path_factory.mktemp("traj") / "run"
    make_run(root, STEPS[1:], noise=0.02)
    return root


def storage(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def publish(cache: Path, repo_id: str, files: dict[str, Path], ref: str | None = "main",
            symlinks: bool = True) -> str:
    """Put ``files`` (path in the repo → local file) into the cache as one commit; return the commit id.

    With ``symlinks`` the snapshot holds relative symlinks to ``blobs/<sha256>`` as huggingface_hub makes them,
    otherwise plain copies.
    """
    digest = hashlib.sha1()
    for path in sorted(files):
        digest.update(path.encode() + files[path].read_bytes())
    commit = digest.hexdigest()
    root = storage(cache, repo_id)
    for path, source in files.items():
        target = root / "snapshots" / commit / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # the same files published under another ref: the same commit
            continue
        if symlinks:
            data = source.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, target.parent), target)
        else:
            shutil.copyfile(source, target)
    if ref is not None:
        (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return commit


def files_of(folder: Path, under: str = "") -> dict[str, Path]:
    return {(f"{under}/{p.name}" if under else p.name): p for p in folder.iterdir() if p.is_file()}


def publish_branches(cache: Path, run: Path, repo_id: str, steps=STEPS) -> None:
    for step in steps:
        publish(cache, repo_id, files_of(run / f"checkpoint-{step}"), ref=f"step_{step}")


def publish_folders(cache: Path, run: Path, repo_id: str, steps=STEPS) -> None:
    files = {}
    for step in steps:
        files.update(files_of(run / f"checkpoint-{step}", f"step-{step:04d}"))
    publish(cache, repo_id, files, ref="main", symlinks=False)


def extrapolate(*args) -> None:
    register_commands()
    result = CliRunner().invoke(app, ["extrapolate", *map(str, args), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)


def assert_same_tensors(a: Path, b: Path) -> None:
    left, right = load_state(a), load_state(b)
    assert sorted(left) == sorted(right)
    assert all(torch.equal(left[name], right[name]) for name in left)


def invoke(capsys, *args) -> tuple[int, list[str]]:
    code = main([*map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


# --------------------------------------------------------------------------------------------- CLI, offline


@pytest.mark.parametrize("layout", ["branches", "folders"])
def test_hub_trajectory_gives_the_same_checkpoint_as_the_local_run(run, cache, tmp_path, layout):
    if layout == "branches":
        publish_branches(cache, run, "org/traj")
        pattern = []
    else:
        publish_folders(cache, run, "org/traj")
        pattern = ["--subfolder-pattern", "step-{N:04d}"]
    extrapolate(run, "--steps", "2,4,6,8", "--target-step", 40, "--out", tmp_path / "local")
    # --steps as a range: 2-8:2 is 2,4,6,8.
    extrapolate("hf://org/traj", *pattern, "--steps", "2-8:2", "--target-step", 40, "--out", tmp_path / "hub")
    assert_same_tensors(tmp_path / "local", tmp_path / "hub")


def test_base_as_a_hub_id(run, cache, tmp_path):
    publish_branches(cache, run, "org/no-base", STEPS[1:])  # the trajectory has no step 0
    publish(cache, "org/base", files_of(run / "checkpoint-0"))
    extrapolate(run, "--target-step", 40, "--out", tmp_path / "local")
    extrapolate("hf://org/no-base", "--base", "org/base", "--target-step", 40, "--out", tmp_path / "hub")
    assert_same_tensors(tmp_path / "local", tmp_path / "hub")
    # A local run with a Hub base reads the same base.
    extrapolate(run, "--base", "org/base", "--target-step", 40, "--out", tmp_path / "local-hub-base")
    assert_same_tensors(tmp_path / "local", tmp_path / "local-hub-base")


def test_missing_revision_is_one_line_and_leaves_no_output(run, cache, tmp_path, capsys):
    publish_branches(cache, run, "org/traj")
    code, lines = invoke(capsys, "extrapolate", "hf://org/traj", "--steps", "2,4,30", "--target-step", 40,
                         "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "hf://org/traj: no revision step_30 (in the local cache; offline)" in lines[0]
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]


def test_missing_subfolder_and_missing_repo_are_one_line(run, cache, tmp_path, capsys):
    publish_folders(cache, run, "org/traj")
    code, lines = invoke(capsys, "extrapolate", "hf://org/traj", "--subfolder-pattern", "step-{N:04d}",
                         "--steps", "2,40", "--target-step", 80, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "no subfolder step-0040" in lines[0], lines
    code, lines = invoke(capsys, "extrapolate", "hf://org/absent", "--target-step", 80, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "hf://org/absent: not in the Hugging Face cache" in lines[0], lines
    code, lines = invoke(capsys, "extrapolate", "hf://org/traj", "--subfolder-pattern", "step-{N:04d}", "--base",
                         "org/absent-base", "--target-step", 80, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "org/absent-base: neither a local folder nor in the Hugging Face cache" in lines[0]
    assert not (tmp_path / "out").exists()


def test_pickled_only_checkpoints_are_refused_with_a_hint(cache, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    (folder / "config.json").write_text("{}")
    for step in (0, 5, 10):
        publish(cache, "org/pickled", files_of(folder), ref=f"step_{step}")
    code, lines = invoke(capsys, "extrapolate", "hf://org/pickled", "--target-step", 40, "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    assert "only pickled weights (pytorch_model.bin)" in lines[0] and "--allow-pickle" in lines[0]


def test_fit_and_analyze_read_hub_runs(run, cache, tmp_path):
    publish_branches(cache, run, "org/traj")
    register_commands()
    runner = CliRunner()
    result = runner.invoke(app, ["fit", "hf://org/traj", "--max-step", "8", "--out", str(tmp_path / "traj"),
                                 "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "traj" / "trajectory.json").is_file()
    result = runner.invoke(app, ["analyze", "hf://org/traj", "--null-samples", "10", "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)


def test_patterns_apply_to_hub_runs_only(run, capsys, tmp_path):
    code, lines = invoke(capsys, "extrapolate", run, "--subfolder-pattern", "step-{N}", "--target-step", 40,
                         "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "Hub runs" in lines[0], lines


# --------------------------------------------------------------------------------------------- library


@pytest.mark.parametrize("layout", ["branches", "folders"])
def test_extrapolate_from_python_reads_a_hub_run_offline(run, cache, tmp_path, monkeypatch, layout):
    """``relex.extrapolate("hf://ORG/REPO", out, target_step=N)`` from Python, offline from the cache: the same
    checkpoint, figures and verdict as the local run, and nothing asked of the Hub."""
    if layout == "branches":
        publish_branches(cache, run, "org/traj")
        pattern = {}
    else:
        publish_folders(cache, run, "org/traj")
        pattern = {"subfolder_pattern": "step-{N:04d}"}

    def no_hub(*args, **kwargs):
        raise AssertionError("asked the Hub while offline")

    for name in ("_remote_refs", "_remote_files", "download_file"):
        monkeypatch.setattr(hub, name, no_hub)
    local = relex.extrapolate(run, tmp_path / "local", target_step=40)
    remote = relex.extrapolate("hf://org/traj", tmp_path / "hub", target_step=40, **pattern)
    assert remote.series.steps == local.series.steps == STEPS[1:]
    assert remote.result.label == "hf://org/traj"
    assert_same_tensors(tmp_path / "local", tmp_path / "hub")
    assert remote.verdict.to_dict() == local.verdict.to_dict()
    assert remote.to_dict()["tensors"] == local.to_dict()["tensors"]
    files = {p.name for p in (tmp_path / "local").iterdir()}
    assert {p.name for p in (tmp_path / "hub").iterdir()} == files and "relex.json" in files


def test_parse_hub_run():
    assert hub.parse_hub_run("hf://org/repo") == ("org/repo", None)
    assert hub.parse_hub_run("hf://org/repo@step_10") == ("org/repo", "step_10")
    assert hub.parse_hub_run("org/repo") is None and hub.parse_hub_run("/runs/x") is None
    for bad in ("hf://repo", "hf://org/repo/sub", "hf://org/repo@", "hf://"):
        with pytest.raises(RelexInputError, match="not a Hub run"):
            hub.parse_hub_run(bad)


def test_step_patterns():
    padded = hub._StepPattern("step-{N:04d}", "--revision-pattern")
    assert padded.step("step-0010") == 10 and padded.step("step-10") is None and padded.name(7) == "step-0007"
    plain = hub._StepPattern("ckpt/{N}", "--subfolder-pattern")
    assert plain.step("ckpt/300") == 300 and plain.step("ckpt/x") is None
    for bad in ("step", "{M}", "{N}-{N}", "{N!r}"):
        with pytest.raises(RelexInputError, match="must contain"):
            hub._StepPattern(bad, "--revision-pattern")


def test_steps_ranges_max_step_and_the_base(run, cache):
    publish_branches(cache, run, "org/traj")
    resolved = hub.resolve_hub_run("hf://org/traj", "4-8:2")
    assert [s for s, _ in resolved] == [0, 4, 6, 8]  # the run's own base comes along
    assert [s for s, _ in hub.resolve_hub_run("hf://org/traj", None, max_step=6)] == [0, 2, 4, 6]
    assert [s for s, _ in hub.resolve_hub_run("hf://org/traj", [2, 4], include_base=False)] == [2, 4]
    step, folder = resolved[1]
    assert (folder / "model.safetensors").is_file() and folder.parent.name == "snapshots"
    with pytest.raises(RelexInputError, match="@main names one revision"):
        hub.resolve_hub_run("hf://org/traj@main", None)
    with pytest.raises(RelexInputError, match=r"no revision named like ckpt-\{N\}.*found: step_0"):
        hub.resolve_hub_run("hf://org/traj", None, revision_pattern="ckpt-{N}")


# --------------------------------------------------------------------------------------------- online, injected


def remote_listing(run: Path, step: int, size: int | None = None) -> list[hub._RemoteFile]:
    """What the Hub lists for one checkpoint branch: the run's files plus what relex must never download."""
    files = [hub._RemoteFile(p.name, size or p.stat().st_size, f"etag-{step}-{p.name}")
             for p in (run / f"checkpoint-{step}").iterdir()]
    junk = ["pytorch_model.bin", "optimizer.pt", "optimizer.safetensors", "scheduler.pt", "rng_state.pth",
            "training_args.bin", "README.md", "sub/model.safetensors"]
    return files + [hub._RemoteFile(name, 10**12, f"etag-{step}-{name}") for name in junk]


def inject_hub(monkeypatch, run: Path, steps=STEPS, size: int | None = None) -> dict[str, str]:
    commits = {f"step_{s}": hashlib.sha1(f"commit {s}".encode()).hexdigest() for s in steps}
    monkeypatch.setattr(hub, "_remote_refs", lambda repo_id: {"main": "0" * 40, **commits})

    def remote_files(repo_id, revision):
        step = int(revision.split("_")[1])
        return commits[revision], remote_listing(run, step, size)

    monkeypatch.setattr(hub, "_remote_files", remote_files)
    return commits


def test_free_space_check_refuses_with_one_line(run, cache, online, tmp_path, capsys, monkeypatch):
    inject_hub(monkeypatch, run, size=2 * 10**9)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: usage(10**12, 0, 3 * 10**9))

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded despite too little space")

    monkeypatch.setattr(hub, "download_file", no_download)
    code, lines = invoke(capsys, "extrapolate", "hf://org/traj", "--steps", "2,4", "--target-step", 40,
                         "--out", tmp_path / "out")
    assert code == 2 and len(lines) == 1, lines
    # Steps 0 (the base), 2 and 4 × model.safetensors and config.json, 2 GB each; the junk (1 TB each) is not counted.
    assert "the download needs 12.0 GB in the Hugging Face cache" in lines[0], lines[0]
    assert "only 3.0 GB is free" in lines[0]
    assert not (tmp_path / "out").exists()


def test_online_downloads_only_weights_config_and_tokenizer(run, cache, online, monkeypatch):
    commits = inject_hub(monkeypatch, run)
    downloaded = []

    def fake_download(repo_id, filename, *, revision, cache_dir, tqdm_class=None):
        """Write the file where huggingface_hub would, reporting its bytes through ``tqdm_class`` (given only
        by the huggingface_hub versions whose ``hf_hub_download`` takes one)."""
        step = next(int(name.split("_")[1]) for name, commit in commits.items() if commit == revision)
        source = run / f"checkpoint-{step}" / filename
        target = storage(Path(cache_dir), repo_id) / "snapshots" / revision / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        if tqdm_class is not None:
            with tqdm_class(total=source.stat().st_size, unit="B") as bar:
                bar.update(source.stat().st_size)
                bar.update_transfer(source.stat().st_size)  # counted once, not twice
        downloaded.append((step, filename))
        return str(target)

    monkeypatch.setattr(hub, "download_file", fake_download)
    reports = []
    resolved = hub.resolve_hub_run("hf://org/traj", "2,4", progress=lambda *a: reports.append(a))
    assert [s for s, _ in resolved] == [0, 2, 4]
    assert sorted({name for _, name in downloaded}) == ["config.json", "model.safetensors"]
    total = sum((run / f"checkpoint-{s}" / n).stat().st_size for s, n in downloaded)
    assert reports[-1][1:] == (total, total) and all(done <= total for _, done, _ in reports)
    # The refs were recorded: the same steps now resolve offline, to the same folders.
    assert (storage(cache, "org/traj") / "refs" / "step_2").read_text() == commits["step_2"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.resolve_hub_run("hf://org/traj", "2,4") == resolved
    # Cached files are neither downloaded again nor counted against the free space.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    downloaded.clear()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: usage(1, 1, 0))
    hub.resolve_hub_run("hf://org/traj", "2,4")
    assert downloaded == []


def test_online_pickled_only_and_hub_errors_are_one_line(run, cache, online, monkeypatch):
    monkeypatch.setattr(hub, "_remote_refs", lambda repo_id: {"step_0": "a" * 40, "step_5": "b" * 40})
    monkeypatch.setattr(hub, "_remote_files", lambda repo_id, revision: ("a" * 40, [
        hub._RemoteFile("pytorch_model-00001-of-00002.bin", 10), hub._RemoteFile("config.json", 2)]))
    with pytest.raises(RelexInputError, match=r"hf://org/traj@step_0: only pickled weights .*--allow-pickle"):
        hub.resolve_hub_run("hf://org/traj", None)

    from huggingface_hub.utils import GatedRepoError  # huggingface_hub.errors has it in later versions only

    def gated(repo_id):
        error = GatedRepoError.__new__(GatedRepoError)
        Exception.__init__(error, "403 Client Error.\nAccess to model org/traj is restricted.")
        raise error

    monkeypatch.setattr(hub, "_remote_refs", gated)
    with pytest.raises(RelexInputError, match="hf://org/traj: gated repository") as caught:
        hub.resolve_hub_run("hf://org/traj", None)
    assert "\n" not in str(caught.value)

    def unreachable(repo_id):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_remote_refs", unreachable)
    with pytest.raises(RelexInputError, match="cannot reach the Hub .*HF_HUB_OFFLINE=1"):
        hub.resolve_hub_run("hf://org/traj", None)
