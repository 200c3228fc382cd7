"""Tiny Hugging Face models built offline, for tests, benchmarks and examples, and a checkpoint loader.

Nothing here downloads anything: the tokenizer is a byte-level BPE with the 256 ByteLevel symbols and no
merges, and the model is a randomly initialised Llama or Qwen2 of hidden size 64. The independent naive
implementations the tests compare the engine with live beside the tests (``tests/naive.py``).
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(chat_template: bool = True):
    """A ``PreTrainedTokenizerFast`` over raw bytes (256 symbols + 3 special tokens), built offline."""
    # transformers and tokenizers load in seconds: only when a tiny model is built (start-up of the rest)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        # those of the causal LMs it stands in for (older transformers default to adding token_type_ids,
        # which generate() refuses for Llama and Qwen2)
        model_input_names=["input_ids", "attention_mask"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str = "llama", hidden: int = 64, layers: int = 2, tie: bool = False, vocab: int = 259):
    """A ``LlamaConfig`` or ``Qwen2Config`` small enough to run anywhere."""
    from transformers import LlamaConfig, Qwen2Config  # start-up: see byte_level_tokenizer

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=256,  # <|endoftext|>, the first id after the 256 byte symbols
        pad_token_id=None,
    )


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, tie: bool = False,
                    chat_template: bool = True, hidden: int = 64, layers: int = 2):
    """Write a randomly initialised tiny causal LM with its tokenizer to ``path``; return the model."""
    import torch  # start-up: see byte_level_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = byte_level_tokenizer(chat_template=chat_template)
    config = tiny_config(arch, hidden=hidden, layers=layers, tie=tie, vocab=len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def load_state(folder):
    """All tensors of a checkpoint folder (single file or shards) as a dict."""
    from safetensors.torch import load_file  # start-up: safetensors.torch imports torch

    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def tiny_base_and_directions(folder, seed: int, **model):
    """Save a tiny model at ``folder`` (``model``: :func:`save_tiny_model`'s options) and return its tensors with
    one random direction per tensor (``torch.randn`` from ``seed``): the start of a run along known directions."""
    import torch

    save_tiny_model(folder, **model)
    base = load_state(folder)
    generator = torch.Generator().manual_seed(seed)
    return base, {n: torch.randn(t.shape, generator=generator) for n, t in base.items()}
