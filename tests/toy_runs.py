"""The toy runs the tests read: the demo's run (all 100 steps, and its first 20) and its noisy twin (Adam).

``relex demo`` and ``relex demo --preset noisy`` train these runs for 100 steps; the verdict from their first
20% (steps 5..20, a checkpoint every 5) predicting step 100 is what the README shows: too close to call for
the demo (its carried backtest win is inside the calibrated margin), "will likely hurt" for the noisy twin;
the gate tests also use step 60, where the demo passes clearly.

* ``demo-final``: the demo's whole run, exactly ``relex demo``'s (``ToyConfig.demo()``, 100 steps): the
  demo's claim, ``relex eval`` on checkpoints of known accuracy and its ``--fail-if-worse`` gate read it;
* ``demo``: its checkpoints 0..20, copied (the first 20 steps of a run are the same whatever its length,
  so this is the 20-step run of ``ToyConfig.demo(steps=20)``);
* ``noisy``: the noisy twin, trained for 20 steps only. The two presets share one warm-up (the base).

Training takes about 1.5 minutes on two idle cores, several on busy ones. The runs are kept in pytest's cache
folder and reused by later sessions; a run is retrained when its setting changes or when the toy trainer
does: each run's key holds the config and a digest of the source of ``relex/toy/`` (and the torch and
transformers versions, which change the weights a seed gives).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

WINDOW = 20  # observed steps: the first 20% of the demo's 100
FINAL = 100  # the step the demo predicts
KEY_FILE = "tests_cache_key.json"


def trainer_digest(folder: Path | None = None) -> str:
    """sha256 of every source file of the toy trainer (``relex/toy/``, or ``folder``), with the torch and
    transformers versions."""
    import torch
    import transformers

    if folder is None:
        import relex.toy

        folder = Path(relex.toy.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(f"torch {torch.__version__}, transformers {transformers.__version__}".encode())
    return digest.hexdigest()


def _configs() -> dict:
    from relex.toy import ToyConfig

    return {"demo-final": ToyConfig.demo(), "demo": ToyConfig.demo(steps=WINDOW),
            "noisy": ToyConfig.noisy(steps=WINDOW)}


def run_key(config, digest: str) -> dict:
    return {"config": config.to_dict(), "trainer": digest}


def finished(run_dir: Path, key: dict) -> bool:
    """True when ``run_dir`` holds a whole run trained under ``key`` (config and trainer source)."""
    try:
        saved = json.loads((run_dir / KEY_FILE).read_text())
    except (OSError, ValueError):
        return False
    last = run_dir / f"checkpoint-{key['config']['steps']}"
    return saved == key and (last / "model.safetensors").is_file()


def _put_in_place(staged: Path, run_dir: Path, key: dict) -> None:
    # The key is written last and the folder renamed into place: a concurrent session never sees half a run.
    (staged / KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.replace(staged, run_dir)


def toy_runs(cache: Path) -> dict[str, Path]:
    """``{"demo-final": RUN, "demo": RUN, "noisy": RUN}``: trained into ``cache`` unless already there."""
    from relex.toy import train_run
    from relex.toy.train import warmup_model

    cache.mkdir(parents=True, exist_ok=True)
    digest = trainer_digest()
    configs = _configs()
    runs = {name: cache / name for name in configs}
    keys = {name: run_key(config, digest) for name, config in configs.items()}
    base = None
    for name in ("demo-final", "noisy"):
        if finished(runs[name], keys[name]):
            continue
        if base is None:  # the two presets share their warm-up (the base)
            base = warmup_model(configs[name])
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
        try:
            train_run(staging / "run", configs[name], base=base, evaluate=False)
            _put_in_place(staging / "run", runs[name], keys[name])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not finished(runs["demo"], keys["demo"]):
        config = configs["demo"]
        staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=cache))
        try:
            steps = range(0, config.steps + 1, config.checkpoint_every)
            for step in steps:
                shutil.copytree(runs["demo-final"] / f"checkpoint-{step}", staging / "run" / f"checkpoint-{step}")
            record = {"config": config.to_dict(), "checkpoints": [{"step": s} for s in steps],
                      "copied_from": "the first steps of the demo-final run"}
            (staging / "run" / "toy_run.json").write_text(json.dumps(record, indent=2) + "\n")
            _put_in_place(staging / "run", runs["demo"], keys["demo"])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return runs
