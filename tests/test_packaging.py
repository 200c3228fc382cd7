"""The built wheel holds every module of the source tree: a package folder without ``__init__.py`` is skipped
by ``find_packages``, which an editable install (CI's, the tests') never notices."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools builds inside the source tree
    for name in ("relex", "cli"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)]
    # with this environment's setuptools when it can build wheels, else (an old setuptools without the wheel
    # package) in pip's isolated build environment
    done = subprocess.run(pip_wheel + ["--no-build-isolation"], capture_output=True, text=True)
    if done.returncode:
        done = subprocess.run(pip_wheel, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("relex_rlvr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(ROOT)) for p in (ROOT / "relex").rglob("*.py")}
    expected |= {"relex_cli/" + str(p.relative_to(ROOT / "cli")) for p in (ROOT / "cli").rglob("*.py")}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "relex" / "evaluate" / "tasks").glob("*.yaml")}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
