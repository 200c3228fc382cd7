"""Evaluate one checkpoint in its own process: ``python -m relex.evaluate.worker JOB.json``.

GPU memory is not reliably freed between models inside one process, so :func:`relex.evaluate.evaluate`
starts one worker per checkpoint. The job file holds ``{"checkpoint", "settings", "output", "progress"}``
(and ``"decoding"`` for two checkpoints decoding together, :mod:`relex.decoding`);
the worker appends progress events (json lines) to ``progress`` and writes ``output``:
``{"ok": true, "result": ...}`` on success (exit 0), ``{"ok": false, "error": {"problem", "path"}}`` for
bad input (exit 2), or ``{"ok": false, "internal": "traceback"}`` for anything else (exit 1).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, allow_nan=True), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m relex.evaluate.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    output = Path(job["output"])
    progress_path = Path(job["progress"]) if job.get("progress") else None

    def progress(event: dict) -> None:
        if progress_path is None:
            return
        event = dict(event, time=time.time())
        with progress_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")

    from relex.errors import RelexInputError
    from relex.evaluate.runner import EvalSettings, run_checkpoint

    try:
        settings = EvalSettings.from_dict(job["settings"])
        result = run_checkpoint(job["checkpoint"], settings, progress, job.get("decoding"))
    except RelexInputError as exc:
        _write_json(output, {"ok": False, "error": {"problem": exc.problem,
                                                    "path": None if exc.path is None else str(exc.path)}})
        print(f"relex: error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        _write_json(output, {"ok": False, "internal": traceback.format_exc()})
        traceback.print_exc()
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    _write_json(output, {"ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
