"""The two rules on two vLLM engines (GPU). Not exercised by the test suite, which runs on CPU without vLLM.

vLLM exposes no hook that sees two models' logits at once, so the engines step together, as in the logits
extrapolation paper: at every step each engine is asked for one token of every unfinished prefix with the
log-probabilities of the whole vocabulary (``SamplingParams(max_tokens=1, logprobs=-1)``, engine settings
``max_logprobs=-1`` and ``logprobs_mode="raw_logprobs"``: before temperature and top-p); prefix caching keeps
the prompt and the tokens so far in each engine's KV cache, so a step computes only the new position. The
rule then picks the token on the CPU, exactly as :class:`relex.decoding.TwoModelDecoder` does.

Log-probabilities instead of logits change nothing: ``log_softmax`` shifts each row by a constant, and the
extrapolation of two shifted rows is the extrapolated row shifted by a constant, which softmax, argmax and
top-p ignore. The two engines share the GPU (``gpu_memory_utilization`` each, default 0.4) unless placed
otherwise with engine arguments.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from relex.decoding.decoder import DecodeOutput, DecodeStats, cut_at_stop


class VLLMPairDecoder:
    """Decode with ``rule`` over two vLLM engines: ``a`` (earlier checkpoint, or the base) and ``b``."""

    def __init__(self, b: str, rule, a: str, *, dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.4, engine_kwargs: dict | None = None,
                 engine_kwargs_a: dict | None = None):
        from vllm import LLM

        common = dict(dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                      enable_prefix_caching=True, max_logprobs=-1, logprobs_mode="raw_logprobs")
        common.update(engine_kwargs or {})
        self.rule = rule
        self.llm_b = LLM(model=str(b), **common)
        self.llm_a = LLM(model=str(a), **dict(common, **(engine_kwargs_a or {})))
        self.tokenizer = self.llm_b.get_tokenizer()
        self.vocab = int(self.llm_b.llm_engine.model_config.get_vocab_size())
        if int(self.llm_a.llm_engine.model_config.get_vocab_size()) != self.vocab:
            raise ValueError("the two checkpoints have different vocabularies")
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_id = {int(eos)} if eos is not None else set()

    def _logprobs(self, llm, prefixes: list[list[int]]) -> torch.Tensor:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prefixes], params, use_tqdm=False)
        dense = torch.full((len(prefixes), self.vocab), -1e4, dtype=torch.float32)
        for row, output in enumerate(outputs):
            for token, entry in output.outputs[0].logprobs[0].items():
                if token < self.vocab:
                    dense[row, token] = float(entry.logprob)
        return dense

    def generate(self, prompts: str | Sequence[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, generator: torch.Generator | None = None,
                 stop: Sequence[str] | None = None, add_special_tokens: bool = True,
                 skip_special_tokens: bool = True) -> DecodeOutput:
        started = time.perf_counter()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if generator is None and temperature and temperature > 0:
            generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        prefixes = [self.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
        history: list[list[int]] = [[] for _ in prompts]
        reasons = ["length"] * len(prompts)
        live = list(range(len(prompts)))
        stop = [s for s in (stop or []) if s]
        window = 2 * max((len(s) for s in stop), default=0) + 8
        stats = DecodeStats(rows=len(prompts))
        for _ in range(int(max_new_tokens)):
            if not live:
                break
            current = [prefixes[i] + history[i] for i in live]
            z_b = self._logprobs(self.llm_b, current)
            z_a = self._logprobs(self.llm_a, current)
            tokens, replaced = self.rule.step(z_a, z_b, temperature, top_p, generator)
            stats.steps += 1
            stats.new_tokens += len(live)
            if replaced is not None:
                stats.replaced += int(replaced.sum())
            still = []
            for i, token in zip(live, tokens.tolist()):
                history[i].append(token)
                if token in self.eos_token_id:
                    reasons[i] = "eos"
                elif stop and any(s in self.tokenizer.decode(history[i][-window:]) for s in stop):
                    reasons[i] = "stop"
                else:
                    still.append(i)
            live = still
        texts = [cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), stop)
                 for ids in history]
        stats.seconds = time.perf_counter() - started
        return DecodeOutput(texts, history, reasons, stats)
