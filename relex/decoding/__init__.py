"""Extrapolation in output space: two checkpoints decoding side by side.

Besides moving the weights along their trajectory (:func:`relex.extrapolate`), a run can be carried past its
last checkpoint at decode time:

* logits extrapolation (arXiv 2601.04537): ``z = z_a + alpha (z_b - z_a)`` on the next-token logits of
  checkpoints a < b, with ``alpha = (target - step_a) / (step_b - step_a)``;
* selective Δlog p extrapolation (arXiv 2603.22117): decode with the RL model and, where its token's
  ``log p_RL(y) - log p_base(y) < tau``, resample from ``log p_RL + gamma (log p_RL - log p_base)``.

    from relex.decoding import LogitsExtrapolation, TwoModelDecoder
    decoder = TwoModelDecoder.from_pretrained(b="RUN/checkpoint-200", a="RUN/checkpoint-100",
                                              rule=LogitsExtrapolation(alpha=3.0))
    out = decoder.generate(prompts, max_new_tokens=512, temperature=0.6, top_p=0.95, seed=0,
                           stop=["</answer>"])

``relex eval --logits-extrapolate ... --selective ...`` scores them beside real checkpoints
(:mod:`relex.decoding.spec`, :mod:`relex.decoding.lm_eval_model`); :mod:`relex.decoding.vllm` runs them on two
vLLM engines.
"""

from relex.decoding.decoder import DecodeOutput, DecodeStats, TwoModelDecoder, check_same_tokenizer
from relex.decoding.rules import LogitsExtrapolation, SelectiveExtrapolation, SingleModel, alpha_for, choose
from relex.decoding.spec import DecodingSpec, checkpoint_step, parse_logits, parse_selective


__all__ = ["TwoModelDecoder", "DecodeOutput", "DecodeStats", "LogitsExtrapolation", "SelectiveExtrapolation",
           "SingleModel", "choose", "DecodingSpec", "parse_logits", "parse_selective", "checkpoint_step",
           "check_same_tokenizer", "alpha_for"]
