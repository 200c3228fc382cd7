"""Where a command computes and in what dtype it writes: the ``--device`` and ``--dtype`` options resolved."""

from __future__ import annotations

import torch

from relex.errors import RelexInputError

OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RelexInputError(f"--device {device} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RelexInputError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


def check_dtype(dtype: str) -> None:
    if dtype != "auto" and dtype not in OUTPUT_DTYPES:
        raise RelexInputError(f"unknown --dtype {dtype!r} (use auto, {', '.join(OUTPUT_DTYPES)})")
