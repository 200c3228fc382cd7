"""Byte sizes as the command line writes them (``--max-shard-size 5GB``); no torch, so options parse fast."""

from __future__ import annotations


def parse_size(size: str | int) -> int:
    """``"5GB"`` / ``"500MB"`` / ``1000`` -> bytes."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
