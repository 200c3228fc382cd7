"""Prove relex works inside the trainers' own environments: verl, TRL + PEFT, OpenRLHF.

For each trainer this makes a venv of its own (torch first, then the trainer with plain pip, then relex from
this checkout with ``pip install -e``), runs the trainer's own checkpoint-writing code on a tiny model on CPU,
runs the ``relex`` command on what it wrote and compares the result with the trainer's own tools.
Results: the lines printed, ``WORK/<trainer>/result.json`` and ``WORK/<trainer>/freeze.txt``; the exit
code is 1 when a check failed or an install that should work did not. Slow (several hundred MB of wheels
on first use; with cached wheels about 17 minutes on two busy cores) and not part of CI. See docs/trainers.md.

    python benchmarks/trainer_envs/run.py                          # all three, in <tmp>/relex-trainer-envs
    python benchmarks/trainer_envs/run.py --root DIR --only verl   # venvs in DIR/venvs, outputs in DIR/work
    python benchmarks/trainer_envs/run.py --reinstall              # rebuild the venvs

Nothing is downloaded but packages: the tiny Llama and its tokenizer are built offline by relex.testing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TORCH = "torch==2.13.0"  # first: a bare torch requirement pulls a multi-GB CUDA build
OPENRLHF = "openrlhf==0.11.2"
MARKER = ".relex-trainer-env.json"  # written into a venv once everything is installed

# pip commands after torch, per trainer; the last one installs relex from this checkout.
INSTALL = {
    "verl": [["verl==0.9.1"]],
    "trl": [["trl==1.16.0", "peft==0.21.2"]],
    "openrlhf": [],  # see install_openrlhf
}
CHECK = {"verl": "verl_check.py", "trl": "trl_check.py", "openrlhf": "openrlhf_check.py"}
FREEZE = {  # the packages docs/trainers.md lists
    "verl": ("verl", "torch", "transformers", "accelerate", "peft", "ray", "tensordict", "safetensors", "numpy",
             "typer", "relex-rlvr"),
    "trl": ("trl", "peft", "torch", "transformers", "accelerate", "datasets", "safetensors", "numpy", "typer",
            "relex-rlvr"),
    "openrlhf": ("openrlhf", "deepspeed", "flash-attn", "torch", "transformers", "accelerate", "peft", "ray",
                 "safetensors", "numpy", "typer", "relex-rlvr"),
}


class Installer:
    def __init__(self, venv: Path, logs: Path, python: str):
        self.venv, self.logs, self.python = venv, logs, python
        self.commands: list[dict] = []

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def run(self, argv: list[str], log: str, must: bool = True) -> int:
        shown = " ".join(["pip" if a == str(self.bin / "pip") else a for a in map(str, argv)])
        print(f"$ {shown}", flush=True)
        start = time.perf_counter()
        with open(self.logs / f"{log}.log", "w") as out:
            code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}).returncode
        seconds = round(time.perf_counter() - start)
        entry = {"command": shown, "exit": code, "seconds": seconds, "log": f"{log}.log"}
        if code:
            entry["error"] = key_error(self.logs / f"{log}.log")
            print(f"  exit {code} after {seconds} s: {entry['error']}", flush=True)
        self.commands.append(entry)
        if code and must:
            raise RuntimeError(f"{shown} failed (exit {code}): {entry['error']}")
        return code

    def pip(self, *args: str, log: str, must: bool = True) -> int:
        return self.run([str(self.bin / "pip"), "install", *args], log, must)

    def create(self) -> None:
        if self.venv.exists():
            if not (self.venv / MARKER).is_file() and any(self.venv.iterdir()):
                raise RuntimeError(f"{self.venv} exists and was not made by this script: choose another --venvs")
            shutil.rmtree(self.venv)
        self.venv.parent.mkdir(parents=True, exist_ok=True)
        self.run([self.python, "-m", "venv", str(self.venv)], "venv")
        (self.venv / MARKER).write_text(json.dumps({"complete": False}))  # ours: a later run may remove it
        self.pip(TORCH, log="torch")


def key_error(log: Path) -> str:
    """The most telling line of a failed pip run: the exception that stopped a build (with the package being
    built), else pip's last error line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if not line.startswith("WARNING: Location")]
    for marker in ("OSError:", "ModuleNotFoundError:", "RuntimeError:", "subprocess.CalledProcessError:"):
        hits = [i for i, line in enumerate(lines) if line.startswith(marker)]
        if hits:
            building = [line.split()[1] for line in lines[:hits[-1]] if line.startswith("Collecting ")]
            return (f"building {building[-1]}: " if building else "") + lines[hits[-1]]
    hits = [line for line in lines if line.startswith("ERROR:") or line.startswith("error:")]
    return hits[-1] if hits else (lines[-1] if lines else "")


def install_openrlhf(inst: Installer, notes: list[str]) -> None:
    """Plain pip first (recorded); when flash-attn cannot build, everything else of OpenRLHF's requirements."""
    if inst.pip(OPENRLHF, log="openrlhf-plain", must=False) == 0:
        notes.append(f"pip install {OPENRLHF} succeeded")
        return
    notes.append(f"pip install {OPENRLHF}: {inst.commands[-1]['error']}")
    if inst.pip("--no-build-isolation", OPENRLHF, log="openrlhf-no-build-isolation", must=False) == 0:
        notes.append(f"pip install --no-build-isolation {OPENRLHF} succeeded")
        return
    notes.append(f"pip install --no-build-isolation {OPENRLHF}: {inst.commands[-1]['error']}")
    inst.pip("--no-deps", OPENRLHF, log="openrlhf-no-deps")
    requires = subprocess.run(
        [str(inst.bin / "python"), "-c",
         "import importlib.metadata as m; print('\\n'.join(m.requires('openrlhf') or []))"],
        capture_output=True, text=True, check=True).stdout.split("\n")
    wanted = [r.strip() for r in requires if r.strip() and "extra ==" not in r]
    deepspeed = [r for r in wanted if r.replace(" ", "").startswith("deepspeed")]
    rest = [r for r in wanted if not r.replace(" ", "").startswith(("flash-attn", "flash_attn", "deepspeed"))]
    # deepspeed ships as a source archive whose setup imports torch: build it against the venv's torch.
    inst.pip("--no-build-isolation", *deepspeed, log="deepspeed")
    inst.pip(*rest, log="openrlhf-requirements")
    notes.append("installed instead: " + ", ".join([f"{OPENRLHF} --no-deps", *deepspeed, "(--no-build-isolation)",
                                                    "and every other requirement of openrlhf but flash-attn"]))


def prepare(trainer: str, venv: Path, logs: Path, python: str, reinstall: bool) -> dict:
    inst = Installer(venv, logs, python)
    marker = venv / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("complete") and not reinstall:
        print(f"reusing {venv} (installed by an earlier run; --reinstall rebuilds it)", flush=True)
        # relex itself is re-installed from this checkout every time (fast)
        inst.pip("--no-deps", "-e", str(REPO), log="relex")
        return json.loads(marker.read_text())
    notes: list[str] = []
    inst.create()
    for requirements in INSTALL[trainer]:
        inst.pip(*requirements, log=trainer)
    if trainer == "openrlhf":
        install_openrlhf(inst, notes)
    inst.pip("-e", str(REPO), log="relex")
    record = {"complete": True, "commands": inst.commands, "notes": notes}
    marker.write_text(json.dumps(record, indent=1))
    return record


def freeze(venv: Path, names) -> list[str]:
    """``name==version`` of each of ``names`` installed in the venv (as pip freeze would print them)."""
    script = ("import importlib.metadata as m, sys\n"
              "for name in sys.argv[1:]:\n"
              "    try: print(f'{name}=={m.version(name)}')\n"
              "    except m.PackageNotFoundError: print(f'{name}: not installed')\n")
    return subprocess.run([str(venv / "bin" / "python"), "-c", script, *names], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "relex-trainer-envs",
                        help="venvs go to ROOT/venvs, outputs to ROOT/work (default: <tmp>/relex-trainer-envs)")
    parser.add_argument("--venvs", type=Path, help="where the venvs are made (default ROOT/venvs)")
    parser.add_argument("--only", default="verl,trl,openrlhf", help="comma-separated: verl, trl, openrlhf")
    parser.add_argument("--python", default=sys.executable, help="the Python the venvs are made with")
    parser.add_argument("--reinstall", action="store_true", help="rebuild venvs made by an earlier run")
    args = parser.parse_args()
    trainers = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in trainers if t not in CHECK]
    if unknown:
        parser.error(f"unknown trainer(s) {unknown}; choose from {list(CHECK)}")
    venvs = (args.venvs or args.root / "venvs").resolve()
    work = (args.root / "work").resolve()
    print(f"relex in trainer environments: {', '.join(trainers)}; venvs in {venvs}, outputs in {work}", flush=True)

    summary = {}
    for trainer in trainers:
        print(f"\n=== {trainer} ===", flush=True)
        out = work / trainer
        shutil.rmtree(out, ignore_errors=True)
        (out / "install-logs").mkdir(parents=True)
        try:
            install = prepare(trainer, venvs / trainer, out / "install-logs", args.python, args.reinstall)
        except RuntimeError as exc:
            print(f"install failed: {exc}", flush=True)
            summary[trainer] = {"passed": False, "install_error": str(exc)}
            continue
        for note in install["notes"]:
            print(f"note: {note}", flush=True)
        frozen = freeze(venvs / trainer, FREEZE[trainer])
        (out / "freeze.txt").write_text("\n".join(frozen) + "\n")
        print("versions: " + ", ".join(frozen), flush=True)
        code = subprocess.run([str(venvs / trainer / "bin" / "python"), str(HERE / CHECK[trainer]),
                               "--work", str(out)]).returncode
        result_file = out / "result.json"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {"passed": False, "checks": []}
        result["install"] = install
        result_file.write_text(json.dumps(result, indent=1))
        checks = result.get("checks", [])
        summary[trainer] = {"passed": code == 0 and result.get("passed", False),
                            "checks": f"{sum(c['passed'] for c in checks)}/{len(checks)}",
                            "error": result.get("error")}

    print("\n=== summary ===", flush=True)
    for trainer, entry in summary.items():
        state = "PASS" if entry["passed"] else "FAIL"
        detail = entry.get("install_error") or entry.get("error") or ""
        print(f"{state}  {trainer:9} checks passed {entry.get('checks', '-')}  {detail}".rstrip(), flush=True)
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0 if summary and all(e["passed"] for e in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
