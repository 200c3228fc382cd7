"""Names of the files in a Hugging Face model folder that are not weights (no torch needed to import)."""

from __future__ import annotations

# Files a Hugging Face model folder needs besides its weights.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "preprocessor_config.json",
)
