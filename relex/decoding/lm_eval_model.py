"""The two rules as lm-evaluation-harness models, so that ``relex eval`` (or plain ``lm_eval``) scores them.

Importing this module registers:

* ``relex-logits``: ``pretrained=B,a=A,alpha=2.5[,device_a=cuda:1]`` — lm-eval's ``hf`` model for checkpoint
  b (tokenizer, batching, chat template, stop strings as usual) whose generation is logits extrapolation
  with checkpoint a; its log-likelihoods are those of the extrapolated logits;
* ``relex-selective``: ``pretrained=RL,a=BASE,tau=-0.3,gamma=0.1`` — selective extrapolation (generation
  only: the rule is a sampling procedure, not a distribution to score continuations with);
* ``relex-logits-vllm`` and ``relex-selective-vllm``: the same on two vLLM engines (generation only;
  untested without a GPU).

``seed=N`` seeds the sampler (greedy decoding does not use it); ``device`` places b, ``device_a`` places a
(default: b's device).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from relex.decoding.decoder import TwoModelDecoder, check_same_tokenizer
from relex.decoding.rules import LogitsExtrapolation, SelectiveExtrapolation

_GENERATION_KEYS = {"do_sample", "temperature", "top_p", "attention_mask"}


def _sampling(kwargs: dict) -> tuple[float, float]:
    """``(temperature, top_p)`` from lm-eval's generation kwargs; refuses settings the rules do not apply."""
    unknown = {k: v for k, v in kwargs.items() if k not in _GENERATION_KEYS and v is not None}
    if unknown:
        raise ValueError(f"two-model decoding supports temperature and top_p only; got {sorted(unknown)}")
    temperature = float(kwargs.get("temperature") or 0.0)
    if kwargs.get("do_sample") is False:
        temperature = 0.0
    return temperature, float(kwargs.get("top_p") or 1.0)


class _TwoModelHFLM(HFLM):
    def __init__(self, pretrained, a, device_a=None, seed=0, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        from transformers import AutoModelForCausalLM

        device_a = device_a or str(self.device)
        model_a = AutoModelForCausalLM.from_pretrained(str(a), dtype=self.model.dtype).to(device_a).eval()
        check_same_tokenizer(self.tokenizer, a)
        self.decoder = TwoModelDecoder(self.model, self._rule(), model_a=model_a, tokenizer=self.tokenizer)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))

    def _rule(self):  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        temperature, top_p = _sampling(generation_kwargs)
        tokens, _, _, _ = self.decoder.generate_ids(
            context, mask, max_new_tokens=max(1, int(max_length) - context.shape[1]), temperature=temperature,
            top_p=top_p, generator=self.generator, stop=stop)
        return torch.cat([context, tokens.to(context.device)], dim=1)


@register_model("relex-logits")
class LogitsExtrapolationLM(_TwoModelHFLM):
    """lm-eval ``hf`` model of checkpoint b decoding ``z_a + alpha (z_b - z_a)`` with checkpoint a."""

    def __init__(self, pretrained, a, alpha, **kwargs):
        self.alpha = float(alpha)
        super().__init__(pretrained, a, **kwargs)

    def _rule(self):
        return LogitsExtrapolation(self.alpha)

    def _model_call(self, inps, attn_mask=None, labels=None):
        z_b = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        model_a = self.decoder.model_a
        with torch.no_grad():
            z_a = model_a(inps.to(next(model_a.parameters()).device)).logits.to(z_b.device)
        return torch.lerp(z_a.float(), z_b.float(), self.alpha).to(z_b.dtype)


@register_model("relex-selective")
class SelectiveExtrapolationLM(_TwoModelHFLM):
    """lm-eval ``hf`` model of the RL checkpoint with selective Δlog p extrapolation against the base (a)."""

    def __init__(self, pretrained, a, tau=-0.3, gamma=0.1, **kwargs):
        self.tau, self.gamma = float(tau), float(gamma)
        super().__init__(pretrained, a, **kwargs)

    def _rule(self):
        return SelectiveExtrapolation(tau=self.tau, gamma=self.gamma)

    def _model_call(self, inps, attn_mask=None, labels=None):
        raise NotImplementedError("selective extrapolation is a decoding procedure: it scores generations "
                                  "(generate_until tasks), not log-likelihoods")


class _TwoEngineLM(LM):
    """Generation-only lm-eval model over :class:`relex.decoding.vllm.VLLMPairDecoder`."""

    def __init__(self, pretrained, a, rule, seed=0, dtype="auto", gpu_memory_utilization=0.4, batch_size=None,
                 **engine_kwargs):
        super().__init__()
        from relex.decoding.vllm import VLLMPairDecoder

        for key in ("device", "device_a", "max_batch_size"):  # placement is vLLM's (engine arguments)
            engine_kwargs.pop(key, None)
        self.decoder = VLLMPairDecoder(str(pretrained), rule, str(a), dtype=dtype, seed=int(seed),
                                       gpu_memory_utilization=float(gpu_memory_utilization),
                                       engine_kwargs=engine_kwargs)
        self.tokenizer = self.decoder.tokenizer
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        settings = []
        for index, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = list(kwargs.pop("until", None) or [])
            budget = int(kwargs.pop("max_gen_toks", 256))
            setting = (tuple(until), budget, *_sampling(kwargs))
            settings.append((context, setting))
            groups.setdefault(repr(setting), []).append(index)
        outputs: list[str] = [""] * len(settings)
        for indices in groups.values():
            until, budget, temperature, top_p = settings[indices[0]][1]
            out = self.decoder.generate([settings[i][0] for i in indices], max_new_tokens=budget,
                                        temperature=temperature, top_p=top_p, generator=self.generator,
                                        stop=list(until))
            for i, text in zip(indices, out.texts):
                outputs[i] = text
        return outputs

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the vLLM two-model decoders score generations only")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("the vLLM two-model decoders score generations only")


@register_model("relex-logits-vllm")
class LogitsExtrapolationVLLM(_TwoEngineLM):
    def __init__(self, pretrained, a, alpha, **kwargs):
        super().__init__(pretrained, a, LogitsExtrapolation(float(alpha)), **kwargs)


@register_model("relex-selective-vllm")
class SelectiveExtrapolationVLLM(_TwoEngineLM):
    def __init__(self, pretrained, a, tau=-0.3, gamma=0.1, **kwargs):
        super().__init__(pretrained, a, SelectiveExtrapolation(tau=float(tau), gamma=float(gamma)), **kwargs)
