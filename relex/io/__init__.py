"""Checkpoint I/O: find a checkpoint series, read its tensors through sources, write sharded safetensors."""

from relex.io.discover import Checkpoint, CheckpointSeries, discover_series, parse_steps
from relex.io.reader import CheckpointReader, open_checkpoint
from relex.io.source import Source, TensorInfo
from relex.io.sources import open_source
from relex.io.writer import ShardedWriter

__all__ = [
    "Checkpoint",
    "CheckpointSeries",
    "discover_series",
    "parse_steps",
    "Source",
    "TensorInfo",
    "open_source",
    "CheckpointReader",
    "open_checkpoint",
    "ShardedWriter",
]
