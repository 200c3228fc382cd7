"""Output-space linearity: teacher-forced log-probabilities of fixed responses across the checkpoints.

The weight-space statistics ask whether the *weights* move along a line; arXiv 2601.04537 looks at the
output instead: the log-probability of a response under the checkpoint at step t. Here a fixed set of
(prompt, response) records is scored by every checkpoint (one model in memory at a time), and each
response's total log-probability ℓ(t) is regressed on the step (base included at step 0). Its R² is shown
beside the R² of a scalar random walk at the same steps, which is far from 0 (≈ 0.6-0.8), and the vector
ℓ(t) − ℓ(0) over responses gets the same drift diagnostics as the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from relex.analysis.drift import DriftDiagnostics, diagnose
from relex.analysis.verdict import drift_class
from relex.analysis.nulls import line_r2, scalar_walk_r2_null
from relex.errors import RelexInputError

PROMPT_KEYS = ("prompt", "question", "input")
RESPONSE_KEYS = ("response", "answer", "completion", "output")


def load_records(path: str | Path, limit: int | None = None) -> list[dict]:
    """``{"prompt", "response"}`` records from a JSONL file (``answer``/``completion`` also accepted)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise RelexInputError(f"cannot read log-prob prompts ({exc.strerror})", path) from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise RelexInputError(f"line {number} is not valid JSON", path) from None
        if not isinstance(item, dict):
            raise RelexInputError(f"line {number} is not a JSON object", path)
        prompt = next((item[k] for k in PROMPT_KEYS if isinstance(item.get(k), str)), None)
        response = next((item[k] for k in RESPONSE_KEYS if isinstance(item.get(k), str)), None)
        if prompt is None or response is None:
            raise RelexInputError(f"line {number} needs string fields 'prompt' and 'response'", path)
        records.append({"prompt": prompt, "response": response})
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise RelexInputError("no prompt/response records found", path)
    return records


def toy_records(limit: int | None = None) -> list[dict]:
    """The toy addition task's held-out prompts with their correct answers."""
    from relex.toy.task import heldout_split

    records = [{"prompt": r["prompt"], "response": r["answer"]} for r in heldout_split()]
    return records[:limit] if limit is not None else records


def _tokenizer_folder(folders: Sequence[Path]) -> Path | None:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    for folder in folders:
        if any((Path(folder) / n).is_file() for n in names):
            return Path(folder)
    return None


def encode_records(tokenizer, records: Sequence[dict], append_eos: bool = True) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) per record; the prompt keeps the tokenizer's special tokens (e.g. BOS),
    the response gets none except a final EOS when ``append_eos``."""
    encoded = []
    eos = tokenizer.eos_token_id
    for record in records:
        prompt = list(tokenizer(record["prompt"])["input_ids"])
        response = list(tokenizer(record["response"], add_special_tokens=False)["input_ids"])
        if append_eos and eos is not None:
            response.append(int(eos))
        if not response:
            raise RelexInputError(f"empty response for prompt {record['prompt'][:40]!r}")
        encoded.append((prompt, response))
    return encoded


def sequence_logprobs(model, encoded: Sequence[tuple[list[int], list[int]]], batch_size: int = 64,
                      device: str = "cpu") -> np.ndarray:
    """Total log-probability of each response given its prompt (teacher forcing), float64 (n,)."""
    import torch

    out = np.zeros(len(encoded))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    pad = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            sequences = [encoded[i][0] + encoded[i][1] for i in chunk]
            width = max(len(s) for s in sequences)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(sequences):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(chunk):
                prompt, response = encoded[i]
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
                targets = torch.tensor(response)
                out[i] = float(logp[row, positions, targets].double().sum())
    return out


@dataclass
class LogprobAnalysis:
    """Log-probabilities (checkpoints × responses) and their linearity in the step."""

    steps: list[int]  # including the base at 0
    logprobs: np.ndarray = field(repr=False)  # (len(steps), n)
    tokens: np.ndarray = field(repr=False)  # response length in tokens (n,)
    r2: np.ndarray = field(repr=False)  # per response
    slope: np.ndarray = field(repr=False)  # per response, log-prob per step
    r2_null: dict = field(default_factory=dict)  # scalar random walk at the same steps
    diagnostics: DriftDiagnostics | None = None  # of the vector ℓ(t) − ℓ(0)
    records: list[dict] = field(default_factory=list, repr=False)
    seconds: float = 0.0

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.logprobs.mean(axis=1)

    def summary(self) -> dict:
        mean = self.mean_logprob
        return {
            "responses": int(self.logprobs.shape[1]),
            "steps": self.steps,
            "mean_logprob": [float(v) for v in mean],
            "mean_logprob_r2": float(line_r2(np.asarray(self.steps, float), mean)[0]),
            "r2_median": float(np.median(self.r2)),
            "r2_null": self.r2_null,
            "fraction_r2_above_null_p95": float(np.mean(self.r2 > self.r2_null.get("p95", np.nan))),
            "fraction_increasing": float(np.mean(self.slope > 0)),
            "drift_share": None if self.diagnostics is None else self.diagnostics.drift_share,
            "drift_verdict": None if self.diagnostics is None else drift_class(self.diagnostics)[0],
            "seconds": self.seconds,
        }

    def table(self) -> list[dict]:
        rows = []
        for j, record in enumerate(self.records):
            row = {"prompt": record["prompt"], "response": record["response"], "tokens": int(self.tokens[j]),
                   "r2": float(self.r2[j]), "slope": float(self.slope[j])}
            for k, step in enumerate(self.steps):
                row[f"logprob_{step}"] = float(self.logprobs[k, j])
            rows.append(row)
        return rows


def logprob_trajectory(checkpoints: Sequence[tuple[int, str | Path]], records: Sequence[dict], *,
                       batch_size: int = 64, device: str = "cpu", append_eos: bool = True,
                       progress: Callable[[int, int], None] | None = None) -> LogprobAnalysis:
    """Score ``records`` under each checkpoint ``(step, folder)`` (the base at step 0 first) in turn."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    checkpoints = sorted((int(s), Path(p)) for s, p in checkpoints)
    folders = [p for _, p in checkpoints]
    tokenizer_folder = _tokenizer_folder([folders[-1], *folders])
    if tokenizer_folder is None:
        raise RelexInputError("no tokenizer files in any checkpoint folder: cannot score log-probs", folders[-1])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    encoded = encode_records(tokenizer, records, append_eos)
    table = np.zeros((len(checkpoints), len(records)))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for k, (step, folder) in enumerate(checkpoints):
            model = AutoModelForCausalLM.from_pretrained(folder).to(device=device, dtype=torch.float32)
            model.eval()
            table[k] = sequence_logprobs(model, encoded, batch_size, device)
            del model
            if progress is not None:
                progress(k + 1, len(checkpoints))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    steps = [s for s, _ in checkpoints]
    t = np.asarray(steps, dtype=np.float64)
    r2 = line_r2(t, table.T)
    tc = t - t.mean()
    slope = (table.T - table.T.mean(axis=1, keepdims=True)) @ tc / (tc @ tc)
    diagnostics = None
    if steps[0] == 0 and len(steps) >= 3:
        deltas = table[1:] - table[0]
        gram = deltas @ deltas.T
        if np.any(gram):
            diagnostics = diagnose(gram, steps[1:])
    null = scalar_walk_r2_null(steps[1:] if steps[0] == 0 else steps, include_origin=steps[0] == 0)
    return LogprobAnalysis(steps, table, np.array([len(r) for _, r in encoded]), r2, slope, null, diagnostics,
                           list(records), time.perf_counter() - started)
