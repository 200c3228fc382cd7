"""The toy runs the gate tests read: the demo's drift-dominated run and its noisy twin (Adam), 20 of 100 steps.

``relex demo`` and ``relex demo --preset noisy`` train these runs for 100 steps; the verdict from their first
20% (steps 5..20, a checkpoint every 5) predicting step 100 is what the README shows: too close to call for
the demo (its carried backtest win is inside the calibrated margin), "will likely hurt" for the noisy twin;
the gate tests also use step 60, where the demo passes clearly. Training stops at step 20 here (the first 20 steps of a
run are the same whatever its length), with one warm-up for both: about 40 s on two idle cores, a few
minutes on busy ones. The runs are kept in pytest's cache folder and reused by later sessions; a run is
retrained only when its setting changes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

WINDOW = 20  # observed steps: the first 20% of the demo's 100
FINAL = 100  # the step the demo predicts
PRESETS = ("demo", "noisy")


def _config(name: str):
    from relex.toy import ToyConfig

    return getattr(ToyConfig, name)(steps=WINDOW)


def _finished(run_dir: Path, config) -> bool:
    try:
        saved = json.loads((run_dir / "toy_run.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    last = run_dir / f"checkpoint-{config.steps}"
    try:  # runs trained before the toy trainer logged its reward into trainer_state.json are retrained
        logged = json.loads((last / "trainer_state.json").read_text()).get("log_history")
    except (OSError, ValueError):
        return False
    return saved == config.to_dict() and bool(logged)


def toy_runs(cache: Path) -> dict[str, Path]:
    """``{"demo": RUN, "noisy": RUN}``: trained into ``cache`` unless already there."""
    from relex.toy import train_run
    from relex.toy.train import warmup_model

    cache.mkdir(parents=True, exist_ok=True)
    runs, base = {}, None
    for name in PRESETS:
        config = _config(name)
        run_dir = cache / name
        if not _finished(run_dir, config):
            if base is None:  # the two presets share their warm-up (the base)
                base = warmup_model(config)
            # Train beside the cache entry and rename: a concurrent session never sees half a run.
            staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
            try:
                train_run(staging / "run", config, base=base, evaluate=False)
                shutil.rmtree(run_dir, ignore_errors=True)
                os.replace(staging / "run", run_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        runs[name] = run_dir
    return runs
