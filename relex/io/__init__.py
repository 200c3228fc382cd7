"""Checkpoint I/O: find a checkpoint series, read its tensors through sources, write sharded safetensors.

The names below load on first use: importing one submodule (``relex.io.steps`` for the command line's target
parser) must not import torch, which the readers and writers need.
"""

from importlib import import_module

_HOMES = {
    "Checkpoint": "relex.io.discover",
    "CheckpointSeries": "relex.io.discover",
    "discover_series": "relex.io.discover",
    "parse_steps": "relex.io.steps",
    "Source": "relex.io.source",
    "TensorInfo": "relex.io.source",
    "open_source": "relex.io.sources",
    "CheckpointReader": "relex.io.reader",
    "open_checkpoint": "relex.io.reader",
    "ShardedWriter": "relex.io.writer",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'relex.io' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
