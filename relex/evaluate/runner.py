"""Scoring one checkpoint with lm-evaluation-harness (runs inside a worker process).

The checkpoint is loaded once as an lm-eval model (``hf`` or ``vllm``); the task YAMLs of
:mod:`relex.evaluate.tasks` are specialised for this run (data source, prompt format, number of samples,
sampling settings) in a temporary folder that ``include:``-s them; ``lm_eval.simple_evaluate`` runs the math
benchmarks as one batch of requests (and the toy as another); the logged completions are then scored per
problem with :mod:`relex.evaluate.answers` (or the toy's verifier).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from relex.device import resolve_device
from relex.errors import RelexInputError, one_line
from relex.evaluate import stats
from relex.evaluate.tasks import (
    CHAT_PROMPT,
    CHAT_STOP,
    DEFAULT_TASKS,
    PLAIN_PROMPT,
    PLAIN_STOP,
    TaskSpec,
    check_local_file,
    local_data_file,
    resolve_tasks,
    score_for,
    toy_answer_tokens,
)

WorkerEvents = Callable[[dict], None]  # a worker's progress records, written one JSON line each

BACKENDS = ("hf", "vllm")
PROMPT_FORMATS = ("auto", "chat", "plain")
DTYPES = ("auto", "bfloat16", "float16", "float32")
INSTALL_HINT = "pip install 'relex-rlvr[eval]'"


@dataclass
class EvalSettings:
    """Everything that decides a score, besides the checkpoint. Stored in ``results.json``."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    data_dir: str | None = None
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    limit: int | None = None
    backend: str = "hf"
    device: str = "auto"
    dtype: str = "auto"
    batch_size: str = "auto"
    seed: int = 0
    prompt: str = "auto"
    system_prompt: str | None = None
    model_args: str | None = None
    keep_completions: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalSettings":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def validate(self) -> None:
        """Raise :class:`RelexInputError` for settings that cannot work (before any model is loaded)."""
        if self.samples < 1:
            raise RelexInputError(f"--samples must be at least 1, got {self.samples}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise RelexInputError(f"--temperature must be >= 0, got {self.temperature}")
        if self.samples > 1 and self.temperature == 0.0:
            raise RelexInputError(
                f"--samples {self.samples} with --temperature 0 would repeat one greedy completion; "
                "give a sampling temperature (e.g. --temperature 0.6)")
        if not 0.0 < self.top_p <= 1.0:
            raise RelexInputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise RelexInputError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise RelexInputError(f"--limit must be at least 1, got {self.limit}")
        if self.backend not in BACKENDS:
            raise RelexInputError(f"unknown backend '{self.backend}'; known backends: {', '.join(BACKENDS)}")
        if self.backend == "hf" and str(self.device).startswith("cuda") and not _cuda_available():
            # said before any model is loaded, not as a checkpoint that "does not load"
            raise RelexInputError(f"--device {self.device} requested but CUDA is not available")
        if self.prompt not in PROMPT_FORMATS:
            raise RelexInputError(f"unknown prompt format '{self.prompt}'; known: {', '.join(PROMPT_FORMATS)}")
        if self.dtype not in DTYPES:
            raise RelexInputError(f"unknown dtype '{self.dtype}'; known: {', '.join(DTYPES)}")
        if str(self.batch_size) != "auto":
            try:
                if int(self.batch_size) < 1:
                    raise ValueError
            except ValueError:
                raise RelexInputError(
                    f"--batch-size must be a positive integer or 'auto', got {self.batch_size}") from None
        if self.model_args:
            for part in self.model_args.split(","):
                if part.strip() and "=" not in part:
                    raise RelexInputError(f"--model-args must be key=value pairs separated by commas, got '{part}'")
        specs = resolve_tasks(self.tasks)
        self.tasks = [spec.name for spec in specs]
        if self.data_dir is not None:
            data_dir = Path(self.data_dir).expanduser()
            if not data_dir.is_dir():
                raise RelexInputError("data folder does not exist", data_dir)
            for spec in specs:
                if spec.kind == "math":
                    check_local_file(spec, local_data_file(spec, data_dir))
            self.data_dir = str(data_dir.resolve())


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def check_dependencies(backend: str = "hf") -> None:
    """Raise :class:`RelexInputError` when the evaluation extras (or vLLM) are not installed, or do not import.

    Installed is not enough: an environment can hold an lm-eval whose own dependencies fail to import (for
    example a pyarrow built for NumPy 2 beside NumPy 1.x), which the workers would only meet one by one.
    """
    for module, package in (("lm_eval", "lm-eval"), ("math_verify", "math-verify")):
        if not module_available(module):
            raise RelexInputError(f"{package} is not installed; {INSTALL_HINT}")
    # What the workers import (lm-eval's evaluator loads its data through datasets and pyarrow): 1-2 s, once.
    for module, package in (("lm_eval.evaluator", "lm-eval"), ("datasets", "lm-eval"), ("math_verify", "math-verify")):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is the environment's
            raise RelexInputError(f"{package} is installed but cannot be imported ({one_line(exc)}); repair this "
                                  "environment's packages (pip check lists conflicts)") from None
    if backend == "vllm" and not module_available("vllm"):
        raise RelexInputError("--backend vllm needs vLLM, which is not installed; pip install vllm (needs a GPU)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _model_args(checkpoint: str, settings: EvalSettings, device: str) -> tuple[dict, dict]:
    from lm_eval.utils import simple_parse_args_string

    args: dict[str, Any] = {"pretrained": checkpoint, "dtype": settings.dtype}
    if settings.backend == "vllm":
        args["seed"] = settings.seed
    extra = simple_parse_args_string(settings.model_args) if settings.model_args else {}
    args.update(extra)
    batch: Any = settings.batch_size
    if settings.backend == "hf" and str(batch) == "auto" and not device.startswith("cuda"):
        batch = 8  # on a CPU, lm-eval's automatic batch size would probe up to 64 full-length rows
    config = {"batch_size": batch if str(batch) == "auto" else int(batch)}
    if settings.backend == "hf":
        config["device"] = device
    return args, config


def load_model(checkpoint: str, settings: EvalSettings, device: str, decoding: dict | None = None):
    """The lm-eval model for ``checkpoint``; :class:`RelexInputError` if it does not load.

    With ``decoding`` (a :class:`relex.decoding.DecodingSpec` as a dict) ``checkpoint`` is its checkpoint b,
    decoded together with its checkpoint a by the spec's rule (:mod:`relex.decoding.lm_eval_model`).
    """
    import lm_eval.api.registry as registry

    args, config = _model_args(checkpoint, settings, device)
    name = settings.backend
    if decoding is not None:
        import relex.decoding.lm_eval_model  # noqa: F401 - registers the two-model lm-eval models
        from relex.decoding.spec import DecodingSpec

        spec = DecodingSpec.from_dict(decoding)
        name = spec.model_name + ("-vllm" if settings.backend == "vllm" else "")
        args.update(spec.model_args(), seed=settings.seed)
        if spec.device_b and settings.backend == "hf":
            config["device"] = spec.device_b
    try:
        cls = registry.get_model(name)
        return cls.create_from_arg_obj(args, config)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if type(exc).__name__ in {"OutOfMemoryError"}:
            raise
        raise RelexInputError(f"checkpoint does not load: {one_line(exc)}", checkpoint) from exc


def has_chat_template(lm) -> bool:
    tokenizer = getattr(lm, "tokenizer", None)
    return bool(getattr(tokenizer, "chat_template", None))


def choose_prompt_format(lm, settings: EvalSettings, checkpoint: str) -> str:
    if settings.prompt == "plain":
        return "plain"
    template = has_chat_template(lm)
    if settings.prompt == "chat" and not template:
        raise RelexInputError("--prompt chat, but the tokenizer has no chat template", checkpoint)
    return "chat" if template else "plain"


def new_tokens(spec: TaskSpec, settings: EvalSettings) -> int:
    """Generation budget of a task: ``--max-new-tokens`` for math, the answer length for the toy."""
    return toy_answer_tokens() if spec.kind == "toy" else int(settings.max_new_tokens)


def generation_kwargs(settings: EvalSettings, prompt_format: str, spec: TaskSpec | None = None) -> dict:
    if spec is not None and spec.kind == "toy":
        until: list[str] = []  # the end-of-sequence token ends every toy answer
    else:
        until = list(CHAT_STOP if prompt_format == "chat" else PLAIN_STOP)
    kwargs: dict[str, Any] = {
        "until": until,
        "max_gen_toks": new_tokens(spec, settings) if spec is not None else int(settings.max_new_tokens),
    }
    if settings.greedy:
        kwargs.update(do_sample=False, temperature=0.0)
    else:
        kwargs.update(do_sample=True, temperature=float(settings.temperature))
        if settings.top_p < 1.0:
            kwargs["top_p"] = float(settings.top_p)
    return kwargs


def task_overrides(spec: TaskSpec, settings: EvalSettings, prompt_format: str) -> dict:
    """The YAML of ``spec`` specialised for this run (an ``include:`` of the packaged file plus overrides)."""
    config: dict[str, Any] = {"include": str(spec.yaml_path), "task": spec.lm_eval_name}
    config["generation_kwargs"] = generation_kwargs(settings, prompt_format, spec)
    if spec.kind == "math":
        config["doc_to_text"] = CHAT_PROMPT if prompt_format == "chat" else PLAIN_PROMPT
        if settings.data_dir is not None:
            config.update(
                dataset_path="json",
                dataset_name=None,
                dataset_kwargs={"data_files": {"test": str(local_data_file(spec, settings.data_dir))}},
                test_split="test",
            )
    config["repeats"] = int(settings.samples)
    config["filter_list"] = [{"name": "all", "filter": [{"function": "take_first_k", "k": int(settings.samples)}]}]
    return config


def write_task_configs(folder: Path, specs: list[TaskSpec], settings: EvalSettings, prompt_format: str) -> None:
    import yaml

    for spec in specs:
        text = yaml.safe_dump(task_overrides(spec, settings, prompt_format), sort_keys=False, allow_unicode=True)
        (folder / f"{spec.lm_eval_name}.yaml").write_text(text, encoding="utf-8")


def _report_generation(lm, total: int, progress: WorkerEvents | None, chunk: int | None) -> None:
    """Wrap ``lm.generate_until`` so that it reports how many completions are done."""
    if progress is None:
        return
    inner = lm.generate_until
    state = {"done": 0}

    def generate_until(requests, *args, **kwargs):
        requests = list(requests)
        size = chunk or len(requests) or 1
        outputs: list[str] = []
        for start in range(0, len(requests), size):
            outputs.extend(inner(requests[start:start + size], *args, **kwargs))
            state["done"] += len(requests[start:start + size])
            progress({"stage": "generating", "done": state["done"], "total": total})
        return outputs

    lm.generate_until = generate_until


@contextmanager
def _special_tokens_in_completions(lm, keep: bool):
    """While active, the hf backend decodes completions without dropping special tokens."""
    original = getattr(lm, "tok_decode", None)
    if not keep or original is None:
        yield
        return

    def tok_decode(tokens, skip_special_tokens: bool = True):
        return original(tokens, skip_special_tokens=False)

    lm.tok_decode = tok_decode
    try:
        yield
    finally:
        del lm.tok_decode


def _count_tokens(lm, texts: list[str]) -> list[int] | None:
    tokenizer = getattr(lm, "tokenizer", None)
    if tokenizer is None or not texts:
        return None
    try:
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in encoded]
    except Exception:
        return None


def score_samples(spec: TaskSpec, samples: list[dict], settings: EvalSettings, lm=None) -> dict:
    """Per-problem records and a summary for one task from lm-eval's logged samples."""
    problems = []
    score = score_for(spec.kind)
    all_completions: list[str] = []
    prompt_example = None
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = sample["doc"]
        completions = [str(c) for c in (sample["resps"][0] if sample["resps"] else [])]
        if prompt_example is None:
            try:
                prompt_example = sample["arguments"][0][0]
            except (KeyError, IndexError, TypeError):
                prompt_example = None
        reference = str(doc.get("answer", sample.get("target", "")))
        scored = [score(text, reference) for text in completions]
        record = {
            "id": str(doc.get("id", sample["doc_id"])),
            "index": int(sample["doc_id"]),
            "reference": reference,
            "extracted": [answer for answer, _ in scored],
            "correct": [bool(ok) for _, ok in scored],
        }
        record["n_correct"] = sum(record["correct"])
        record["score"] = record["n_correct"] / len(scored) if scored else 0.0
        if settings.keep_completions:
            record["completions"] = completions
        problems.append(record)
        all_completions.extend(completions)
    counts = [(len(p["correct"]), p["n_correct"]) for p in problems]
    summary = stats.summarize_counts(counts)
    n = summary.get("samples", settings.samples)
    summary["accuracy"] = summary.get(f"avg@{n}", float("nan"))
    summary["no_answer_rate"] = (sum(e is None for p in problems for e in p["extracted"]) / len(all_completions)
                                 if all_completions else float("nan"))
    token_counts = _count_tokens(lm, all_completions) if lm is not None else None
    if token_counts:
        summary["mean_completion_tokens"] = sum(token_counts) / len(token_counts)
        budget = new_tokens(spec, settings)
        summary["hit_max_new_tokens_rate"] = sum(t >= budget for t in token_counts) / len(token_counts)
    return {"summary": summary, "prompt_example": prompt_example, "problems": problems}


def task_source(spec: TaskSpec, settings: EvalSettings) -> str:
    """Where the problems of ``spec`` come from: a local file, or a hub dataset and split."""
    if spec.kind == "math" and settings.data_dir is not None:
        return str(local_data_file(spec, settings.data_dir))
    return spec.hub_dataset or spec.title


def _load_task(manager, spec: TaskSpec, settings: EvalSettings) -> list:
    """Build the lm-eval task (this reads its problems); a source that cannot be read is bad input."""
    try:
        if hasattr(manager, "load"):
            return list(manager.load([spec.lm_eval_name])["tasks"].values())
        from lm_eval.tasks import get_task_dict

        return list(get_task_dict([spec.lm_eval_name], manager).values())
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:
        hint = "" if settings.data_dir is not None or spec.kind != "math" else (
            " (offline? read local copies with --data-dir)")
        raise RelexInputError(f"cannot read the problems of '{spec.name}': {one_line(exc)}{hint}",
                              task_source(spec, settings)) from exc


def run_checkpoint(checkpoint: str, settings: EvalSettings, progress: WorkerEvents | None = None,
                   decoding: dict | None = None) -> dict:
    """Evaluate one checkpoint on ``settings.tasks``; returns ``{"checkpoint": {...}, "tasks": {...}}``.

    ``decoding``: score two checkpoints decoding together instead (see :func:`load_model`)."""
    check_dependencies(settings.backend)
    settings.validate()
    notify = progress or (lambda event: None)
    started = time.time()
    device = str(resolve_device(settings.device))

    notify({"stage": "loading", "message": "loading the model"})
    lm = load_model(checkpoint, settings, device, decoding)
    prompt_format = choose_prompt_format(lm, settings, checkpoint)
    max_length = getattr(lm, "max_length", None)
    specs = resolve_tasks(settings.tasks)
    budget = max(new_tokens(spec, settings) for spec in specs)
    if isinstance(max_length, int) and budget >= max_length:
        raise RelexInputError(
            f"--max-new-tokens {budget} leaves no room for the prompt in the model's context "
            f"of {max_length} tokens", checkpoint)

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="relex-tasks-") as folder:
        write_task_configs(Path(folder), specs, settings, prompt_format)
        notify({"stage": "preparing", "message": "reading the problems"})
        manager = TaskManager(include_path=folder, include_defaults=False)
        names = [spec.lm_eval_name for spec in specs]
        missing = [name for name in names if name not in manager.all_tasks]
        if missing:
            raise RuntimeError(f"lm-eval did not register the task configs {missing} written to {folder}")
        loaded = [(spec, _load_task(manager, spec, settings)) for spec in specs]

        total = sum((min(spec.size, settings.limit) if settings.limit else spec.size) * settings.samples
                    for spec in specs)
        if settings.backend == "vllm" or str(settings.batch_size) == "auto" and device.startswith("cuda"):
            chunk = None  # one call: vLLM schedules the whole batch itself
        else:
            batch = int(_model_args(checkpoint, settings, device)[1]["batch_size"])
            chunk = max(batch * 4, 16)
        _report_generation(lm, total, notify, chunk)
        notify({"stage": "generating", "done": 0, "total": total})

        output: dict[str, dict] = {"samples": {}, "results": {}}
        # Math benchmarks use the chosen prompt format. The toy is always a raw prompt, and its completions
        # keep special tokens as text so that "15<pad>7" is wrong, as it is for the toy's token-level reward.
        groups = [([t for spec, ts in loaded if spec.kind == "math" for t in ts], prompt_format == "chat", False),
                  ([t for spec, ts in loaded if spec.kind == "toy" for t in ts], False, True)]
        for task_objects, chat, keep_special_tokens in groups:
            if not task_objects:
                continue
            with _special_tokens_in_completions(lm, keep_special_tokens):
                part = simple_evaluate(
                    model=lm,
                    tasks=task_objects,
                    task_manager=manager,
                    limit=settings.limit,
                    log_samples=True,
                    apply_chat_template=chat,
                    system_instruction=settings.system_prompt if chat or not keep_special_tokens else None,
                    bootstrap_iters=0,
                    random_seed=settings.seed,
                    numpy_random_seed=settings.seed,
                    torch_random_seed=settings.seed,
                    fewshot_random_seed=settings.seed,
                )
            if part is None:
                raise RuntimeError("lm-eval returned no results (not the main process)")
            output["samples"].update(part.get("samples") or {})
            output["results"].update(part.get("results") or {})

    notify({"stage": "scoring", "message": "scoring the answers"})
    tasks: dict[str, dict] = {}
    for spec in specs:
        samples = output.get("samples", {}).get(spec.lm_eval_name, [])
        result = score_samples(spec, samples, settings, lm)
        lm_eval_metrics = output.get("results", {}).get(spec.lm_eval_name, {})
        result["summary"]["lm_eval"] = {
            key.split(",")[0]: value for key, value in lm_eval_metrics.items()
            if isinstance(value, (int, float)) and not key.startswith("alias") and "stderr" not in key
        }
        result["source"] = task_source(spec, settings)
        tasks[spec.name] = result

    import lm_eval

    info = {
        "path": checkpoint,
        "prompt_format": prompt_format,
        "device": device,
        "max_length": max_length if isinstance(max_length, int) else None,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "elapsed_seconds": round(time.time() - started, 2),
    }
    if decoding is not None:
        info["decoding"] = dict(decoding)
    notify({"stage": "done", "message": "done"})
    return {"checkpoint": info, "tasks": tasks}
