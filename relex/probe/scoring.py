"""Score one checkpoint on a probe set: the reward itself, or a generation-free screen.

* ``reward``: greedy decoding of each problem's prompt, scored 0/1 by its verifier;
* ``logprob``: the teacher-forced log-probability of each problem's verified completion (one forward pass, no
  generation), per token: cheap enough for many candidates.

A :class:`ProbeModel` holds one checkpoint (a folder, or a model already in memory such as a training loop's)
and scores any subset of the probe's problems in batches; it counts the tokens its forward passes process.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from relex.errors import RelexInputError
from relex.probe.problems import ProbeProblem, ProbeSet

MODES = ("reward", "logprob")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def verify(problem: ProbeProblem, completion: str) -> bool:
    """Whether ``completion`` answers ``problem``, by its verifier."""
    if problem.verifier == "toy":
        from relex.toy.task import score  # start-up: only for the toy

        return bool(score(completion, problem.answer))
    if problem.verifier == "last-number":
        numbers = _NUMBER.findall(completion.replace(",", ""))
        return bool(numbers) and float(numbers[-1]) == float(problem.answer)
    from relex.evaluate.answers import score_completion  # start-up: math answers load sympy

    return score_completion(completion, problem.answer)[1]


class ProbeModel:
    """One checkpoint, ready to score problems of ``probe`` (``source``: a checkpoint folder or a loaded causal
    LM; ``tokenizer``: the tokenizer of a loaded chat model)."""

    def __init__(self, source, probe: ProbeSet, device: str = "cpu", batch_size: int = 32, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer  # start-up: only to probe

        self.probe, self.device, self.batch_size = probe, torch.device(device), batch_size
        self.tokens = 0  # forward-pass tokens processed so far
        if isinstance(source, (str, Path)):
            folder = Path(source)
            # the checkpoint's own dtype on an accelerator; float32 on a CPU, where half-precision products are slow
            dtype = {} if self.device.type == "cpu" else {_dtype_keyword(): "auto"}
            try:
                with _quiet_loading():  # a candidate is loaded per look: no progress bar of transformers' each time
                    self.model = AutoModelForCausalLM.from_pretrained(folder, **dtype)
            except (OSError, ValueError) as exc:
                raise RelexInputError(f"cannot load the checkpoint to probe it ({_first_line(exc)})", folder) from None
            if self.device.type == "cpu":
                self.model = self.model.float()
            self.model.to(self.device).eval()
            self.tokenizer = None
            if probe.kind != "toy":
                # a missing tokenizer fails differently by version: OSError, ValueError, ImportError (protobuf)
                try:
                    self.tokenizer = AutoTokenizer.from_pretrained(folder)
                except Exception as exc:  # noqa: BLE001
                    raise RelexInputError(f"cannot load the tokenizer to probe the checkpoint ({_first_line(exc)})",
                                          folder) from None
        else:  # a live model (a training loop's): its tokenizer is copied, so the padding set below stays here
            self.model, self.tokenizer = source, None if tokenizer is None else copy.copy(tokenizer)
        if probe.kind == "toy":
            from relex.toy.model import VOCAB  # start-up: only for the toy

            vocabulary = getattr(getattr(self.model, "config", None), "vocab_size", None)
            if vocabulary != len(VOCAB):
                raise RelexInputError(f"the probe {probe.name} scores the toy task's model (a vocabulary of "
                                      f"{len(VOCAB)} characters); this model's vocabulary has {vocabulary} tokens: "
                                      "give a JSON Lines file of training problems instead",
                                      source if isinstance(source, (str, Path)) else None)
        if probe.kind == "chat":
            if self.tokenizer is None:
                raise RelexInputError(f"the probe {probe.name} is chat problems: it needs the model's tokenizer "
                                      "(tokenizer=...)")
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self._lead = _leading_special_tokens(self.tokenizer)

    # -- the two modes ------------------------------------------------------------------------------------------
    def score(self, indices: Sequence[int], mode: str) -> np.ndarray:
        """Per-problem scores of the problems ``indices`` (0/1 rewards, or mean token log-probabilities)."""
        if mode not in MODES:
            raise RelexInputError(f"unknown probe mode {mode!r} (use {' or '.join(MODES)})")
        problems = [self.probe.problems[i] for i in indices]
        out = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(problems), self.batch_size):
                    chunk = problems[start:start + self.batch_size]
                    out.append(self._rewards(chunk) if mode == "reward" else self._logprobs(chunk))
        finally:
            self.model.train(was_training)
        return np.concatenate(out) if out else np.zeros(0)

    def _rewards(self, problems: list[ProbeProblem]) -> np.ndarray:
        texts = self._generate(problems)
        return np.array([1.0 if verify(p, t) else 0.0 for p, t in zip(problems, texts)])

    def _logprobs(self, problems: list[ProbeProblem]) -> np.ndarray:
        if self.probe.kind == "toy":
            from relex.toy.evaluate import answer_ids, answer_logprob, prompt_ids  # start-up: the toy's own

            prompts, answers = prompt_ids(_toy(problems)), answer_ids(_toy(problems))
            self.tokens += prompts.numel() + answers.numel()
            return answer_logprob(self.model, prompts.to(self.device), answers.to(self.device)).mean(dim=1).cpu().numpy()
        prompts = [self._chat(p) for p in problems]
        ids, mask = self._encode([prompt + p.completion for prompt, p in zip(prompts, problems)])
        prompt_lengths = [len(self._ids(prompt)) for prompt in prompts]
        self.tokens += int(mask.sum())
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        scores = []
        for row, (length, total) in enumerate(zip(prompt_lengths, mask.sum(dim=1).tolist())):
            pad = ids.shape[1] - total  # left padding
            first = pad + length - 1  # the logit that predicts the completion's first token
            scores.append(float(logp[row, first:].mean()))
        return np.array(scores)

    # -- decoding -----------------------------------------------------------------------------------------------
    def _generate(self, problems: list[ProbeProblem]) -> list[str]:
        if self.probe.kind == "toy":
            from relex.toy.evaluate import generate, prompt_ids  # start-up: the toy's own decoding
            from relex.toy.model import decode

            prompts = prompt_ids(_toy(problems)).to(self.device)
            out = generate(self.model, prompts)
            steps = out.shape[1]
            self.tokens += sum(prompts.shape[0] * (prompts.shape[1] + k) for k in range(steps))
            return [decode(row) for row in out.tolist()]
        ids, mask = self._encode([self._chat(p) for p in problems])
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self._room(ids.shape[1]),
                                  do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, ids.shape[1]:]
        self.tokens += int(mask.sum()) + int((new != self.tokenizer.pad_token_id).sum())
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _ids(self, text: str) -> list[int]:
        """``text``'s token ids, led by the special tokens the tokenizer puts before any text (a ``<bos>``) unless
        the text already begins with them, as a chat template's text does; none put after it (an ``<eos>``)."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids if ids[:len(self._lead)] == self._lead else self._lead + ids

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask of ``texts``, padded on the left, on the model's device."""
        rows = [self._ids(text) for text in texts]
        width = max(len(row) for row in rows)
        ids = torch.tensor([[self.tokenizer.pad_token_id] * (width - len(row)) + row for row in rows])
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
        return ids.to(self.device), mask.to(self.device)

    def _room(self, prompt_tokens: int) -> int:
        """The new tokens to generate: ``max_new_tokens``, within what the model's context leaves."""
        context = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if not isinstance(context, int):
            return self.probe.max_new_tokens
        if prompt_tokens >= context:
            raise RelexInputError(f"the probe {self.probe.name}'s prompts ({prompt_tokens} tokens) fill the model's "
                                  f"context of {context} tokens: give shorter problems")
        return min(self.probe.max_new_tokens, context - prompt_tokens)

    def _chat(self, problem: ProbeProblem) -> str:
        """The model's input for ``problem``: as given (raw), its chat template's, or a plain prompt."""
        if problem.raw:
            return problem.prompt
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": problem.prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"Problem:\n{problem.prompt}\n\nSolution:"


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging as hf_logging  # start-up: only to probe

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _leading_special_tokens(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before any text by default (a ``<bos>``; none for many tokenizers)."""
    plain = tokenizer("0", add_special_tokens=False)["input_ids"]
    special = tokenizer("0")["input_ids"]
    at = next((i for i in range(len(special) - len(plain) + 1) if special[i:i + len(plain)] == plain), 0)
    return list(special[:at])


def _first_line(exc: BaseException) -> str:
    """An exception of transformers' as ``Type: first non-empty line`` (at most 200 characters)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _toy(problems: list[ProbeProblem]):
    """The toy task's problems behind probe problems (the toy encodes prompts and answers itself)."""
    from relex.toy.task import Problem  # start-up: only for the toy

    return [Problem(int(p.prompt[0:2]), int(p.prompt[3:5])) for p in problems]
