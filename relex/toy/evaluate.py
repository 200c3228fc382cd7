"""Held-out accuracy of a toy model: greedy, sampled, and the exact expected accuracy at a temperature.

Every prompt has the same length and every answer is three digits plus ``<eos>``, so a batch needs no
padding: prompts are encoded once, and four decoding steps finish every completion.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import torch

from relex.toy import task as _task
from relex.toy.model import EOS_ID, decode, encode

ANSWER_TOKENS = _task.ANSWER_DIGITS + 1  # three digits and <eos>


def prompt_ids(problems: Sequence[_task.Problem]) -> torch.Tensor:
    return torch.tensor([encode(p.prompt) for p in problems], dtype=torch.long)


def answer_ids(problems: Sequence[_task.Problem]) -> torch.Tensor:
    return torch.tensor([encode(p.answer)[1:] + [EOS_ID] for p in problems], dtype=torch.long)


@functools.lru_cache(maxsize=None)
def _keep_last_argument(model_class: type) -> str:
    """The forward argument that computes the last position's logits alone (``num_…`` before transformers 4.50)."""
    parameters = inspect.signature(model_class.forward).parameters
    return "logits_to_keep" if "logits_to_keep" in parameters else "num_logits_to_keep"


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    keep = {_keep_last_argument(type(model)): 1}
    return model(input_ids=ids, use_cache=False, **keep).logits[:, -1, :].float()


@torch.no_grad()
def generate(model, prompts: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None,
             new_tokens: int = ANSWER_TOKENS) -> torch.Tensor:
    """Completions (``[N, new_tokens]`` ids) for prompt ids ``[N, P]``; greedy when ``temperature`` is 0."""
    ids = prompts
    for _ in range(new_tokens):
        logits = _last_logits(model, ids)
        if temperature and temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        else:
            nxt = logits.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompts.shape[1]:]


def rewards(completions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """0/1 rewards: the completion is the answer's three digits followed by ``<eos>`` (the verifier's rule)."""
    return (completions == answers).all(dim=1).float()


def _batches(problems, batch_size):
    for start in range(0, len(problems), batch_size):
        yield problems[start:start + batch_size]


@torch.no_grad()
def greedy_accuracy(model, problems: Sequence[_task.Problem] | None = None, batch_size: int = 1024) -> float:
    """Fraction of ``problems`` (default: the held-out split) solved by greedy decoding."""
    problems = list(problems if problems is not None else _task.heldout_problems())
    was_training = model.training
    model.eval()
    correct = 0.0
    for chunk in _batches(problems, batch_size):
        out = generate(model, prompt_ids(chunk))
        correct += rewards(out, answer_ids(chunk)).sum().item()
    model.train(was_training)
    return correct / len(problems)


@torch.no_grad()
def sampled_accuracy(model, problems: Sequence[_task.Problem] | None = None, samples: int = 8,
                     temperature: float = 1.0, seed: int = 0, batch_size: int = 1024) -> float:
    """Mean accuracy of ``samples`` completions per problem at ``temperature`` (avg@k), with the verifier."""
    problems = list(problems if problems is not None else _task.heldout_problems())
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = 0
    for chunk in _batches(problems, max(1, batch_size // samples)):
        prompts = prompt_ids(chunk).repeat_interleave(samples, dim=0)
        out = generate(model, prompts, temperature=temperature, generator=gen)
        for row, problem in zip(out.tolist(), [p for p in chunk for _ in range(samples)]):
            total += _task.score(decode(row), problem.answer)
    model.train(was_training)
    return total / (len(problems) * samples)


def answer_logprob(model, prompts: torch.Tensor, answers: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probabilities ``[N, A]`` of ``answers`` after ``prompts`` (teacher forcing)."""
    ids = torch.cat([prompts, answers], dim=1)
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits[:, prompts.shape[1] - 1:, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, answers.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def answer_probabilities(model, problems: Sequence[_task.Problem] | None = None, temperature: float = 1.0,
                         batch_size: int = 2048) -> torch.Tensor:
    """p(answer + <eos> | prompt) at ``temperature`` for each problem: the exact chance one sample is right."""
    problems = list(problems if problems is not None else _task.heldout_problems())
    was_training = model.training
    model.eval()
    out = []
    for chunk in _batches(problems, batch_size):
        lp = answer_logprob(model, prompt_ids(chunk), answer_ids(chunk), temperature)
        out.append(lp.sum(dim=1).exp())
    model.train(was_training)
    return torch.cat(out)


def expected_accuracy(model, problems=None, temperature: float = 1.0) -> float:
    """Exact expected accuracy of one sample at ``temperature`` (pass@1 without sampling noise)."""
    return answer_probabilities(model, problems, temperature).mean().item()


def pass_at_k(model, k: int = 8, problems=None, temperature: float = 1.0) -> float:
    """Exact pass@k at ``temperature``: mean of 1 - (1 - p)^k over problems."""
    p = answer_probabilities(model, problems, temperature)
    return (1 - (1 - p) ** k).mean().item()


def evaluate(model, problems=None) -> dict:
    """Greedy accuracy, exact expected accuracy at T=1 and exact pass@8 at T=1 on ``problems``."""
    p = answer_probabilities(model, problems, 1.0)
    return {"greedy": greedy_accuracy(model, problems), "expected_t1": p.mean().item(),
            "pass8_t1": (1 - (1 - p) ** 8).mean().item()}
