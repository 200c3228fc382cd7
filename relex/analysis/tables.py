"""Tidy tables: tensor names parsed into layer and module, rows written as CSV (no pandas needed)."""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

# Containers of numbered blocks in the common architectures (Llama/Qwen/Mistral, GPT-2, GPT-NeoX, T5, BERT).
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_DROP = {"self_attn", "attention", "attn", "self", "model", "transformer", "gpt_neox", "decoder", "encoder"}

GROUPS = ("embed", "attention", "mlp", "norm", "head", "other")


def parse_name(name: str) -> dict:
    """Layer index, module kind and group of a parameter name.

    ``model.layers.3.self_attn.q_proj.weight`` -> layer 3, module ``q_proj``, group ``attention``;
    ``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj``; ``model.norm.weight`` -> ``norm``;
    ``model.embed_tokens.weight`` -> ``embed``; a bias gets a ``.bias`` suffix. ``layer`` is None outside
    the numbered blocks.
    """
    if "." not in name:
        return {"layer": None, "module": name, "group": _group(name)}
    stem, parameter = name.rsplit(".", 1)
    suffix = "" if parameter in ("weight", "scale") else f".{parameter}"
    match = _LAYER.search(name)
    layer = int(match.group(1)) if match else None
    lower = name.lower()
    if match:
        inner = stem[match.end():] if match.end() <= len(stem) else ""
        parts = [p for p in inner.split(".") if p and p not in _DROP]
        module = ".".join(parts) if parts else stem.rsplit(".", 1)[-1]
    elif "lm_head" in lower or "embed_out" in lower:
        module = "lm_head"
    elif "embed" in lower or lower.endswith(("wte.weight", "wpe.weight")):
        module = "embed" if "pos" not in lower and "wpe" not in lower else "embed_positions"
    elif lower.startswith("output.") or ".output." in lower:
        module = "lm_head"
    elif "norm" in lower or re.search(r"(?:^|\.)ln_f(?:\.|$)", lower):
        module = "norm"
    else:
        module = stem.rsplit(".", 1)[-1]
    module += suffix
    return {"layer": layer, "module": module, "group": _group(module)}


def _group(module: str) -> str:
    m = module.lower()
    if m.startswith("embed"):
        return "embed"
    if m.startswith("lm_head"):
        return "head"
    if "norm" in m or m.startswith("ln"):
        return "norm"
    if m.startswith(("mlp", "ffn", "feed_forward", "fc", "c_fc", "experts", "block_sparse_moe")) or any(
            k in m for k in ("up_proj", "down_proj", "gate_proj", "dense_h_to_4h", "dense_4h_to_h", "mlp")):
        return "mlp"
    if any(k in m for k in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "c_attn", "c_proj", "query", "key",
                            "value", "attn", "dense")):
        return "attention"
    return "other"


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return value


def rows_to_csv(rows: Sequence[dict], path: str | Path | None = None, columns: Iterable[str] | None = None) -> str:
    """Write ``rows`` (dicts) as CSV to ``path`` (when given) and return the text.

    Columns are ``columns`` or the union of the rows' keys in first-seen order; floats use 6 significant
    digits, shapes are written as ``4096x4096``.
    """
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    columns = list(columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    text = buffer.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a CSV written by :func:`rows_to_csv`, numbers parsed back to int/float where they look so."""
    with open(path, newline="") as handle:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _parse(text: str):
    if text == "":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
