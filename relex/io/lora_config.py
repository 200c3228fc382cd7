"""The ``adapter_config.json`` of a PEFT LoRA adapter: which adapters relex can merge exactly, and each module's
rank and scaling.

A LoRA module adds ``ΔW = s · B A`` to its base weight, with ``s = lora_alpha / r`` (``lora_alpha / √r`` with
``use_rslora``), ``r`` and ``lora_alpha`` of each module taken from ``rank_pattern`` / ``alpha_pattern`` when a key
matches its name (PEFT's rule: the first key ``k`` for which ``(.*\\.)?(k)$`` matches the module path):
:func:`lora_scaling`. :func:`read_adapter_config` refuses what is not ``s·B A`` over the saved base: other PEFT
methods, DoRA and the other LoRA variants that change the forward pass, ``lora_bias``, ``target_parameters``,
trainable tokens, layer replication, and initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA). :func:`unit_scaling_config` is the config of an adapter whose factors carry their own scaling.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from relex.errors import RelexInputError

ADAPTER_CONFIG = "adapter_config.json"

# init_lora_weights values that leave the base weights as saved (B_0 A_0 = 0, or at least the base untouched).
# True/"gaussian"/False: B_0 = 0 or random factors; "eva": A_0 from activations, B_0 = 0 (ranks go to
# rank_pattern/alpha_pattern); "orthogonal": B_0 A_0 = 0 by construction; "mica": A_0 = 0.
_SAFE_INITS = {"gaussian", "eva", "orthogonal", "mica"}
# init_lora_weights values (or prefixes) that subtract s·B_0 A_0 (or a quantisation residual) from W_0 in
# memory: the model being trained is then not the saved base plus s·B A.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoRA variants whose forward pass is not x ↦ W_0 x + s·B A x (name of the config field → what it is).
_VARIANT_FIELDS = {
    "use_dora": "DoRA (use_dora: a learned magnitude rescales the columns of W_0 + s·B A)",
    "kasa_config": "KaSA (kasa_config: a learned diagonal between A and B and a truncated base)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens: the adapter acts only after the invocation "
                               "tokens, so it cannot be merged)",
    "use_qalora": "QALoRA (use_qalora: A acts on pooled input features)",
    "use_bdlora": "BD-LoRA (use_bdlora: block-diagonal factors)",
    "monteclora_config": "MonteCLoRA (monteclora_config: sampled factors)",
    "arrow_config": "Arrow (arrow_config: routed mixture of adapters)",
    "layer_replication": "layer_replication (the adapted model has layers the base checkpoint lacks)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices: sparse embedding-row updates)",
    "target_parameters": "LoRA on parameters (target_parameters, e.g. MoE expert tensors)",
    "lora_bias": "lora_bias (a trained bias on lora_B)",
}


def _refuse(problem: str, path: Path) -> RelexInputError:
    return RelexInputError(problem.replace("\n", " "), path)


def read_adapter_config(folder: Path) -> dict:
    """``adapter_config.json`` of an adapter folder, checked to be a LoRA relex can merge exactly.

    Raises :class:`RelexInputError` (one line naming the file and the variant) for a missing or unreadable
    file, a PEFT type other than LORA, the LoRA variants in ``_VARIANT_FIELDS`` (DoRA, aLoRA, QALoRA, …,
    ``lora_bias``, ``target_parameters``, trainable tokens, layer replication), initialisations that rewrite the
    base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or are unknown, an unknown ``bias`` mode and malformed
    ``r`` / ``lora_alpha`` / patterns. LoRA on embeddings or convolutions shows only in the weights and is
    refused by :class:`relex.io.lora.LoraSource`. Supported: ``use_rslora``, ``rank_pattern`` / ``alpha_pattern``,
    ``fan_in_fan_out`` (GPT-2 Conv1D), ``bias`` ``"all"`` / ``"lora_only"`` and ``modules_to_save`` (those
    tensors are saved whole), VeLoRA (it changes only the backward pass).
    """
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise RelexInputError(f"no {ADAPTER_CONFIG} (not a PEFT adapter folder)", Path(folder))
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RelexInputError(f"cannot read the adapter config ({type(exc).__name__})", path) from None
    if not isinstance(config, dict):
        raise RelexInputError("corrupt adapter config (not a JSON object)", path)

    peft_type = str(config.get("peft_type") or "missing")
    if peft_type.upper() != "LORA":
        raise _refuse(f"PEFT type {peft_type} is not LoRA; relex reads only LoRA adapters (peft_type LORA)", path)
    for field, what in _VARIANT_FIELDS.items():
        if config.get(field):
            raise _refuse(f"{what} is not supported: the update is not s·B·A over the saved base", path)
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _SAFE_INITS:
        text = str(init)
        if text.lower().startswith(_BASE_REWRITING_INITS):
            raise _refuse(
                f"init_lora_weights={text!r} rewrites the base weights at initialisation (PEFT trains over a "
                "residual of W_0, e.g. W_0 − s·B_0·A_0, that is not saved), so the adapter cannot be merged "
                "onto the saved base", path,
            )
        raise _refuse(f"unknown init_lora_weights={text!r}: relex cannot tell whether it rewrites the base "
                      "weights", path)
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise _refuse(f"unknown bias mode {config.get('bias')!r}", path)

    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _refuse(f"LoRA rank r must be a positive integer, got {r!r}", path)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _refuse(f"lora_alpha must be a number, got {alpha!r}", path)
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pattern.values()
        ):
            raise _refuse(f"{field} must map module patterns to numbers", path)
        config[field] = pattern
    config.setdefault("use_rslora", False)
    config.setdefault("fan_in_fan_out", False)
    return config


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the value of the first key ``k`` with ``(.*\\.)?(k)$`` matching ``module``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict, module: str) -> tuple[int, float]:
    """``(r, s)`` of module path ``module`` (e.g. ``model.layers.0.self_attn.q_proj``) under ``config``."""
    r = int(_pattern_value(config["rank_pattern"], module, config["r"]))
    alpha = float(_pattern_value(config["alpha_pattern"], module, config["lora_alpha"]))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)



def unit_scaling_config(config: dict, ranks: dict[str, int]) -> dict:
    """The ``adapter_config.json`` of an adapter whose factors carry their own scaling, from the checked ``config``
    of the adapter it was made from and ``ranks`` (module path → output rank).

    The config is ``config`` with ``r`` the most common output rank (``rank_pattern`` / ``alpha_pattern`` for the
    other modules), ``lora_alpha = r`` so that every scaling is exactly 1, ``use_rslora`` off and
    ``init_lora_weights`` plain; target modules, ``modules_to_save``, ``bias``, ``fan_in_fan_out`` and
    ``base_model_name_or_path`` are kept.
    """
    config = dict(config)
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    common = max(counts, key=lambda r: (counts[r], r)) if counts else int(config["r"])
    others = {module: r for module, r in ranks.items() if r != common}
    config.update(
        r=common,
        lora_alpha=common,
        rank_pattern=others,
        alpha_pattern=dict(others),  # alpha = r per module: scaling 1
        use_rslora=False,
        init_lora_weights=True,
        inference_mode=True,
    )
    if "eva_config" in config:  # only PEFT versions that write the key (0.14 and later) accept it when loading
        config["eva_config"] = None
    return config
