"""Helpers shared by the per-trainer scripts: run a command and log it, compare two checkpoints, record checks.

Each per-trainer script runs inside its trainer's venv, prints what it ran, and writes ``result.json`` into
its work folder: the versions of the packages that matter, the commands, and a list of checks (name, passed,
figures). ``run.py`` collects these and exits non-zero when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent

# One torch thread per process, and idle OpenMP threads that sleep: these scripts share the machine.
QUIET_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
             "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_DATASETS_OFFLINE": "1", "WANDB_DISABLED": "true", "WANDB_MODE": "disabled",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
os.environ.update(QUIET_ENV)  # this process too (set before torch and transformers are imported)


def quiet_env() -> dict:
    env = dict(os.environ)
    env.update(QUIET_ENV)
    return env


def versions(names) -> dict:
    """``{package: version}`` of the installed distributions among ``names`` (None when absent)."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def venv_bin(name: str) -> str:
    """A command installed beside this Python (the venv's ``bin/``), e.g. ``relex`` or ``torchrun``."""
    return str(Path(sys.executable).parent / name)


class Recorder:
    """Commands run and checks made by one per-trainer script, written to ``work/result.json``."""

    def __init__(self, trainer: str, work: Path):
        self.trainer = trainer
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.commands: list[dict] = []
        self.checks: list[dict] = []
        self.notes: list[str] = []
        self.versions: dict = {}

    def run(self, argv, log: str, cwd: Path | None = None, ok_codes=(0,), env: dict | None = None,
            ) -> subprocess.CompletedProcess:
        """Run ``argv`` (output to ``work/logs/<log>.log``); raise when its exit code is not in ``ok_codes``.

        ``env`` adds variables to the environment (shown before the command)."""
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        shown = " ".join([f"{k}={shlex.quote(self.short(v))}" for k, v in (env or {}).items()]
                         + [shlex.quote(self.short(a)) for a in argv])
        print(f"$ {shown}", flush=True)
        start = time.perf_counter()
        with open(logs / f"{log}.log", "w") as out:
            done = subprocess.run([str(a) for a in argv], cwd=cwd or self.work, env={**quiet_env(), **(env or {})},
                                  stdout=out, stderr=subprocess.STDOUT, text=True)
        seconds = round(time.perf_counter() - start, 1)
        self.commands.append({"argv": shown, "exit": done.returncode, "seconds": seconds, "log": f"logs/{log}.log"})
        if done.returncode not in ok_codes:
            tail = (logs / f"{log}.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"exit {done.returncode} from {shown}:\n" + "\n".join(tail))
        return done

    def log_text(self, log: str) -> str:
        return (self.work / "logs" / f"{log}.log").read_text()

    def short(self, arg) -> str:
        """Paths inside the work folder relative to it, the venv's commands by name: logs read the same anywhere."""
        text = str(arg)
        bindir = str(Path(sys.executable).parent) + os.sep
        if text.startswith(bindir):
            return text[len(bindir):]
        if text.startswith(str(self.work) + os.sep):
            return text[len(str(self.work)) + 1:]
        if text.startswith(str(HERE) + os.sep):
            return text[len(str(HERE)) + 1:]
        return text

    def check(self, name: str, passed: bool, **figures) -> bool:
        self.checks.append({"name": name, "passed": bool(passed), **figures})
        shown = ", ".join(f"{k}={v}" for k, v in figures.items())
        print(f"[{'PASS' if passed else 'FAIL'}] {name}: {shown}", flush=True)
        return passed

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def save(self, error: str | None = None) -> int:
        failed = [c["name"] for c in self.checks if not c["passed"]]
        result = {"trainer": self.trainer, "python": sys.version.split()[0], "versions": self.versions,
                  "commands": self.commands, "checks": self.checks, "notes": self.notes, "error": error,
                  "passed": not failed and error is None and bool(self.checks)}
        (self.work / "result.json").write_text(json.dumps(result, indent=1))
        return 0 if result["passed"] else 1


def check_main(trainer: str, title: str, description: str, packages, body, **arguments) -> int:
    """A per-trainer script's ``main``: parse ``--work`` and ``arguments`` (name -> (type, default)), print
    ``title`` and the versions, run ``body(rec, args)``, and record any exception in ``result.json``."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    for name, (kind, default) in arguments.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = parser.parse_args()
    rec = Recorder(trainer, args.work.resolve())
    rec.versions = versions(packages)
    print(f"{title} in {rec.work}; versions: {rec.versions}", flush=True)
    try:
        body(rec, args)
    except Exception:  # noqa: BLE001 - recorded in result.json, and the driver fails
        error = traceback.format_exc()
        print(error, flush=True)
        return rec.save(error=error.strip().splitlines()[-1])
    return rec.save()


def compare_states(a: dict, b: dict) -> dict:
    """Tensor-by-tensor comparison of two state dicts (in float64 for the differences)."""
    import torch

    names_a, names_b = set(a), set(b)
    worst_name, worst = None, 0.0
    worst_rel_name, worst_rel = None, 0.0
    unequal = 0
    dtypes = set()
    for name in sorted(names_a & names_b):
        x, y = a[name], b[name]
        dtypes.add(f"{x.dtype}/{y.dtype}".replace("torch.", ""))
        if x.shape != y.shape:
            unequal += 1
            worst_name, worst = name, float("inf")
            continue
        if x.dtype == y.dtype and torch.equal(x, y):
            continue
        unequal += 1
        diff = (x.double() - y.double()).abs().max().item()
        scale = y.double().abs().max().item() or 1.0
        if diff > worst:
            worst_name, worst = name, diff
        if diff / scale > worst_rel:
            worst_rel_name, worst_rel = name, diff / scale
    return {
        "tensors": len(names_a & names_b),
        "only_in_first": sorted(names_a - names_b),
        "only_in_second": sorted(names_b - names_a),
        "dtypes": sorted(dtypes),
        "bit_equal": unequal == 0 and names_a == names_b,
        "unequal_tensors": unequal,
        "max_abs_diff": worst,
        "max_abs_diff_tensor": worst_name,
        "max_rel_diff": worst_rel,  # |difference| / max |value| of the tensor, the largest over tensors
        "max_rel_diff_tensor": worst_rel_name,
    }


def load_folder(folder) -> dict:
    from relex.testing import load_state

    return load_state(folder)
