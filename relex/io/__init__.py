"""Checkpoint I/O: find a checkpoint series, read tensors lazily, write sharded safetensors."""

from relex.io.discover import Checkpoint, CheckpointSeries, discover_series
from relex.io.reader import CheckpointReader, TensorInfo, open_checkpoint
from relex.io.writer import ShardedWriter, staged_folder

__all__ = [
    "Checkpoint",
    "CheckpointSeries",
    "discover_series",
    "CheckpointReader",
    "TensorInfo",
    "open_checkpoint",
    "ShardedWriter",
    "staged_folder",
]
