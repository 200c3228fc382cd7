"""Evaluate several checkpoints, each in its own worker process, and assemble one results document."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import relex
from relex.errors import RelexInputError
from relex.io.staging import check_output_file
from relex.evaluate.results import EvalResults, add_checkpoint, compare, new_document, unique_labels
from relex.evaluate.runner import EvalSettings, check_dependencies
from relex.evaluate.tasks import TASKS
from relex.progress import Progress, Report


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _split_label(item: str | tuple[str, str]) -> tuple[str | None, str]:
    if isinstance(item, tuple):
        label, path = item
        return str(label), str(path)
    item = str(item)
    if "=" in item and not Path(item).expanduser().exists():
        label, path = item.split("=", 1)
        if label and "/" not in label and path:
            return label, path
    return None, item


def check_checkpoint(path: str) -> tuple[str, bool]:
    """``(location, is_local)`` for a checkpoint argument; :class:`RelexInputError` if it cannot be a model.

    A local folder needs a readable ``config.json`` and weights; a string that is not an existing path but
    looks like ``org/name`` is passed on as a Hugging Face hub id.
    """
    folder = Path(path).expanduser()
    if folder.exists():
        if not folder.is_dir():
            raise RelexInputError("checkpoint is not a folder", folder)
        config = folder / "config.json"
        if not config.is_file():
            raise RelexInputError("not a model folder: no config.json", folder)
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RelexInputError(f"checkpoint does not load: config.json is not valid JSON ({exc})", config) from None
        if not any((folder / name).is_file() for name in _WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
            raise RelexInputError("checkpoint does not load: no model.safetensors or pytorch_model.bin", folder)
        _check_safetensors_headers(folder)
        return str(folder.resolve()), True
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        return path, False
    raise RelexInputError("checkpoint folder does not exist", folder)


def _check_safetensors_headers(folder: Path) -> None:
    """Read the header of every safetensors file (cheap), so a broken checkpoint fails before any scoring."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise RelexInputError(f"checkpoint does not load: unreadable shard index ({exc})", index) from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise RelexInputError("checkpoint does not load: shard listed in the index is missing", folder / shard)
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - safetensors is a dependency of transformers
        return
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - any failure to read the header means it cannot load
            raise RelexInputError(f"checkpoint does not load: {type(exc).__name__}: {exc}", path) from None


def _worker_env(all_local: bool) -> dict:
    env = dict(os.environ)
    package_root = str(Path(relex.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if all_local:  # nothing to fetch: never wait on the network
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _run_worker(checkpoint: str, label: str, settings: EvalSettings, folder: Path, index: int, count: int,
                env: dict, progress: Report, decoding: dict | None = None) -> dict:
    job = {
        "checkpoint": checkpoint,
        "settings": settings.to_dict(),
        "output": str(folder / f"result-{index}.json"),
        "progress": str(folder / f"progress-{index}.jsonl"),
        "decoding": decoding,
    }
    job_path = folder / f"job-{index}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    log_path = folder / f"worker-{index}.log"
    task = f"[{index + 1}/{count}] {label}"
    if progress:
        progress(Progress(task, 0, None, "", "starting a worker"))
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "relex.evaluate.worker", str(job_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        offset = 0
        try:
            while True:
                code = process.poll()
                offset = _forward_progress(Path(job["progress"]), offset, task, progress)
                if code is not None:
                    break
                time.sleep(0.2)
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise
    output_path = Path(job["output"])
    output = None
    if output_path.is_file():
        try:
            output = json.loads(output_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            output = None
    if code == 0 and output and output.get("ok"):
        return output["result"]
    if output and output.get("error"):
        error = output["error"]
        raise RelexInputError(error["problem"], error.get("path"))
    raise RuntimeError(f"evaluation of {checkpoint} failed (worker exit code {code}); end of its log:\n"
                       f"{_tail(log_path)}")


def _forward_progress(path: Path, offset: int, task: str, progress: Report) -> int:
    """The worker's new records (``{"stage", "message", "done", "total"}`` per line) as progress events."""
    if not path.is_file():
        return offset
    with path.open("rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    for line in complete.decode("utf-8", errors="replace").splitlines():
        if progress and line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            stage = record.get("stage", "")
            if stage == "generating":
                progress(Progress(task, record.get("done", 0), record.get("total") or None, "", "generating"))
            elif stage == "done":
                progress(Progress(task, 1, 1, "", "done"))
            else:
                progress(Progress(task, 0, None, "", record.get("message", stage)))
    return offset + len(complete)


def _decoding_spec(item):
    from relex.decoding.spec import DecodingSpec

    if isinstance(item, DecodingSpec):
        return DecodingSpec.from_dict(item.to_dict())  # a copy: paths are resolved below
    if isinstance(item, dict):
        return DecodingSpec.from_dict(item)
    raise TypeError(f"decoders takes DecodingSpec objects, got {type(item).__name__}")


def evaluate(
    checkpoints: Sequence[str | tuple[str, str]] | str,
    tasks: str | Sequence[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 2048,
    limit: int | None = None,
    backend: str = "hf",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | str = "auto",
    seed: int = 0,
    prompt: str = "auto",
    system_prompt: str | None = None,
    model_args: str | None = None,
    keep_completions: bool = False,
    labels: Sequence[str] | None = None,
    decoders: Sequence[Any] | None = None,
    out: str | Path | None = None,
    n_boot: int = 10_000,
    confidence: float = 0.95,
    progress: Report = None,
) -> EvalResults:
    """Score checkpoints on math benchmarks with lm-evaluation-harness.

    Args:
        checkpoints: model folders (or hub ids); ``"label=path"`` or ``(label, path)`` names a checkpoint.
            The first one is the baseline of the comparison.
        tasks: short task names (``aime24, aime25, amc23, minerva_math, math500``, ``toy``), comma-separated
            or a list; ``None`` for the five math benchmarks.
        data_dir: read ``<task>.jsonl`` files from this folder instead of the Hugging Face hub.
        samples: completions per problem (avg@k, pass@k); more than one needs ``temperature > 0``.
        temperature, top_p: sampling settings; temperature 0 is greedy decoding.
        max_new_tokens: generation budget per completion.
        limit: only the first ``limit`` problems of each task (for smoke tests).
        backend: ``"hf"`` (transformers, CPU or GPU) or ``"vllm"`` (GPU, needs vLLM).
        device, dtype, batch_size: passed to the backend (``batch_size="auto"``: 8 on a CPU).
        seed: seeds sampling and the bootstrap.
        prompt: ``"auto"`` (the chat template when the tokenizer has one), ``"chat"`` or ``"plain"``.
        system_prompt: an optional system message (chat prompts).
        model_args: extra lm-eval model arguments, ``"key=value,key=value"``.
        keep_completions: store every completion's text in the results.
        labels: names for the checkpoints in tables and in the results (default: short distinct paths).
        decoders: two checkpoints decoding together, scored as further columns after ``checkpoints``:
            :class:`relex.decoding.DecodingSpec` objects (e.g. from :func:`relex.decoding.parse_logits` or
            :func:`relex.decoding.parse_selective`), labelled by their ``label`` or a default.
        out: write the results JSON here (atomically, only once everything succeeded).
        n_boot, confidence: paired bootstrap of the differences to the baseline.
        progress: called with :class:`relex.progress.Progress` events, one task per checkpoint (``[i/n]
            LABEL``): its stage as the item, and the completions generated of all while generating.

    Returns:
        :class:`EvalResults`. Raises :class:`RelexInputError` for bad input (unknown task, missing data file,
        checkpoint that does not load, evaluation extras not installed).
    """
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [str(checkpoints)]
    checkpoints = list(checkpoints or [])
    decoders = [_decoding_spec(item) for item in decoders or []]
    if not checkpoints and not decoders:
        raise RelexInputError("no checkpoint given")
    settings = EvalSettings(
        tasks=list(tasks.split(",")) if isinstance(tasks, str) else list(tasks or []) or None,
        data_dir=None if data_dir is None else str(data_dir), samples=int(samples), temperature=float(temperature),
        top_p=float(top_p), max_new_tokens=int(max_new_tokens), limit=None if limit is None else int(limit),
        backend=backend, device=device, dtype=dtype, batch_size=str(batch_size), seed=int(seed), prompt=prompt,
        system_prompt=system_prompt, model_args=model_args, keep_completions=keep_completions,
    )
    if settings.tasks is None:
        settings.tasks = EvalSettings().tasks
    settings.validate()
    check_dependencies(settings.backend)

    named = [_split_label(item) for item in checkpoints]
    located = [check_checkpoint(path) for _, path in named]
    paths = [location for location, _ in located]
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(paths):
            raise RelexInputError(f"{len(labels)} labels for {len(paths)} checkpoints")
    else:
        defaults = unique_labels([path for _, path in named])
        labels = [given or default for (given, _), default in zip(named, defaults)]
    for spec in decoders:
        spec.a, spec.b = check_checkpoint(spec.a)[0], check_checkpoint(spec.b)[0]
    jobs = [(path, label, None) for path, label in zip(paths, labels)]
    jobs += [(spec.b, spec.label or spec.default_label(), spec.to_dict()) for spec in decoders]
    labels = [label for _, label, _ in jobs]
    if len(set(labels)) != len(labels):
        raise RelexInputError(f"checkpoint labels must be distinct, got {', '.join(labels)}")
    if out is not None:
        out = Path(out).expanduser()
        check_output_file(out)

    all_local = all(is_local for _, is_local in located) and all(
        Path(spec.a).is_dir() and Path(spec.b).is_dir() for spec in decoders) and (
        settings.data_dir is not None or all(TASKS[name].kind != "math" for name in settings.tasks))
    env = _worker_env(all_local)
    document = new_document(settings.to_dict(), relex.__version__)
    titles = {name: TASKS[name].title for name in settings.tasks}
    folder = Path(tempfile.mkdtemp(prefix="relex-eval-"))
    try:
        for index, (path, label, decoding) in enumerate(jobs):
            result = _run_worker(path, label, settings, folder, index, len(jobs), env, progress, decoding)
            add_checkpoint(document, label, result, titles)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results = EvalResults(document)
    if len(jobs) > 1:
        compare(results, baseline=0, n_boot=n_boot, seed=seed, confidence=confidence)
    if out is not None:
        results.save(out)
    return results
