"""relex killed mid-run, and a disk that is really full: the installed ``relex`` command in its own process.

A run killed outright (SIGKILL) cannot clean up: it must leave nothing that looks like a finished output, and
the next run for the same output must work. A disk that fills (a small tmpfs mounted for the test: this needs
root, and the tests skip, saying why, where mounting is not allowed) must give exit code 2, one line naming
the output and the problem, and no partial output.

Mid-run is made certain, not hoped for: the process is stopped (SIGSTOP) as soon as what is watched for
appears, the test checks that the run is indeed unfinished, and only then kills it (or fills the disk and lets
it go on).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from command import RELEX, environment, one_error_line, relex
from relex.synthetic import make_run
from relex.testing import load_state

# Four 4 MiB float32 tensors: the pass takes long enough (tenths of a second) to be caught in the middle.
SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (1024, 1024) for i in range(4)}
STEPS = [5, 10, 20]
TARGET = 60


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupted") / "run"
    make_run(root, STEPS, shapes=SHAPES, noise=0.1)
    return root


@pytest.fixture(scope="module")
def reference(run, tmp_path_factory) -> Path:
    """The output of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "out"
    done = relex("extrapolate", run, "--target-step", TARGET, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    return out


def partial_folders(parent: Path, name: str = "out") -> list[Path]:
    return sorted(parent.glob(f".{name}.relex-partial-*"))


def writing(parent: Path) -> bool:
    """A staging folder of ``parent / "out"`` holds a shard: relex checked the disk and is writing."""
    try:
        return any(shard.stat().st_size > 0 for folder in partial_folders(parent)
                   for shard in folder.glob("model-*.safetensors"))
    except FileNotFoundError:  # renamed into place meanwhile
        return False


def stop_when(process: subprocess.Popen, ready, timeout: float = 300) -> bool:
    """SIGSTOP ``process`` as soon as ``ready()`` holds (polled every millisecond); False when the process
    ended first without error (it finished within a poll: the caller tries again)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            assert process.returncode == 0, f"relex failed (exit {process.returncode}): {process.stderr.read()}"
            return False
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("relex did not reach the point the test waits for")
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGSTOP)
    return True


def stopped_while_writing(folder: Path, *args, attempts: int = 3) -> subprocess.Popen:
    """``relex ARGS`` (its output ``folder / "out"``) stopped while it writes its first shard. A run that
    finishes between two polls (the pass takes a tenth of a second) is removed and started again."""
    for _ in range(attempts):
        process = start(*args)
        try:
            if stop_when(process, lambda: writing(folder)):
                return process
        except BaseException:
            process.kill()
            raise
        process.communicate()
        shutil.rmtree(folder / "out")
    raise AssertionError(f"relex finished before it could be stopped, {attempts} times")


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([str(RELEX), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=environment())


def assert_same_checkpoint(folder: Path, reference: Path) -> None:
    mine, theirs = load_state(folder), load_state(reference)
    assert set(mine) == set(theirs) == set(SHAPES)
    for name in theirs:
        assert mine[name].equal(theirs[name]), name


def test_a_killed_run_leaves_no_output_and_the_next_run_works(run, reference, tmp_path):
    out = tmp_path / "out"
    # Stopped once its staging folder holds a shard: the pass is writing.
    process = stopped_while_writing(tmp_path, "extrapolate", run, "--target-step", TARGET, "--out", out, "--quiet")
    try:
        [staging] = partial_folders(tmp_path)
        assert staging.name == f".out.relex-partial-{process.pid}"
        assert not out.exists() and not (staging / "relex.json").exists(), "the run had already finished"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    # Nothing looks like a finished output: no `out`, only the hidden folder named as the killed run's partial.
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [staging.name]
    assert not (staging / "relex.json").exists() and not (staging / "model.safetensors.index.json").exists()

    # The next run for the same output works, removes what the killed one left, and writes the same weights.
    done = relex("extrapolate", run, "--target-step", TARGET, "--out", out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"removed {staging}, left by relex process {process.pid}, which no longer runs" in done.stderr
    assert (out / "relex.json").is_file()
    assert_same_checkpoint(out, reference)


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the size asked (``mount(size=..., inodes=...)``) at ``tmp_path / "disk"``; skip when
    this process may not mount (not root, or no permission in this container)."""
    mounted = []

    def mount(size: str, inodes: int | None = None) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs for a real full disk needs root")
        if shutil.which("mount") is None:
            pytest.skip("no mount command here")
        point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
        point.mkdir()
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path) -> None:
    """Write one file until the disk holding ``folder`` has no byte left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                size //= 2
    finally:
        os.close(fd)
    assert shutil.disk_usage(folder).free == 0


def test_an_output_larger_than_the_free_space_is_refused_before_reading(run, small_disk):
    disk = small_disk("4m")  # the output is 16 MiB
    out = disk / "out"
    done = relex("extrapolate", run, "--target-step", TARGET, "--out", out)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_error_line(done)
    assert line.startswith(f"relex: error: {out}: not enough free disk space: the output needs 16.")
    assert "the disk has 4.2 MB free" in line
    assert list(disk.iterdir()) == []


def test_a_disk_that_fills_while_writing(run, small_disk):
    """The disk has room when relex checks it; once relex writes its first shard, the test fills the disk."""
    disk = small_disk("64m")
    out = disk / "out"
    process = stopped_while_writing(disk, "extrapolate", run, "--target-step", TARGET, "--out", out, "--quiet")
    try:
        [staging] = partial_folders(disk)
        assert not (staging / "relex.json").exists(), "the run had already written everything"
        fill(disk)
        process.send_signal(signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done.returncode == 2, stdout + stderr
    line = one_error_line(done)
    assert line.startswith(f"relex: error: {out}: the output's disk is full (No space left on device); "
                           "nothing was written"), line
    assert [p.name for p in disk.iterdir()] == ["filler"]  # no output, no partial folder


def test_a_disk_without_inodes_left(run, small_disk):
    """Room for the bytes, but only three inodes (the disk's root, the staging folder and one file): the
    second file of the output cannot be created, a real ENOSPC from the kernel."""
    disk = small_disk("64m", inodes=3)
    out = disk / "out"
    done = relex("extrapolate", run, "--target-step", TARGET, "--out", out)
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_error_line(done)
    assert line.startswith(f"relex: error: {out}: the output's disk is full (No space left on device)"), line
    assert list(disk.iterdir()) == []
