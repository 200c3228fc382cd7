"""The toy model: a tiny Llama over a character vocabulary, saved in the Hugging Face layout."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = ("<pad>", "<bos>", "<eos>", "<unk>") + tuple("0123456789+=")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
CHAR_TO_ID = {token: index for index, token in enumerate(VOCAB)}
DIGIT_IDS = tuple(CHAR_TO_ID[str(d)] for d in range(10))


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` built offline; it prepends ``<bos>`` to every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=dict(CHAR_TO_ID), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
        # a Llama's inputs: older transformers default to adding token_type_ids, which generate() refuses
        model_input_names=["input_ids", "attention_mask"])
    return tokenizer


def encode(text: str) -> list[int]:
    """Token ids of ``text`` with the leading ``<bos>``, as the saved tokenizer produces them."""
    return [BOS_ID] + [CHAR_TO_ID.get(ch, UNK_ID) for ch in text]


def decode(ids) -> str:
    """Text of generated ids, cut at the first ``<eos>`` (special tokens dropped)."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i in (PAD_ID, BOS_ID):
            continue
        out.append(VOCAB[i] if 0 <= i < len(VOCAB) else "")
    return "".join(out)


def build_config(hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


def build_model(config, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def save_checkpoint(model, tokenizer, path: str | Path, step: int, extra_state: dict | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` to ``path`` in the HF Trainer layout, with ``trainer_state.json``."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per checkpoint would flood the output of a run
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
                     max_new_tokens=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = {"global_step": int(step), "log_history": []}
    if extra_state:
        state.update(extra_state)
    (path / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return path
