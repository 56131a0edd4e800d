"""The training reader's public name: ``from faceloop.dataset import FaceShardDataset``.

The reader lives in :mod:`storage.dataset` (it is the store's read side); this module is its
stable, collision-free import path for training jobs. It sits in the storage room (see
tests/test_layers.py and docs/DESIGN.md): nothing in faceloop's core imports it. Importing it
imports no torch; ``FaceShardDataset`` (a torch ``IterableDataset``) is built on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage import dataset as _impl
from storage.dataset import (
    DEFAULT_CACHE_LIMIT,
    IMAGE_SIZE,
    INPUT_MEAN,
    INPUT_STD,
    DatasetVersion,
    FaceShardReader,
    ResumableLoader,
    ShardCache,
    decode_image,
    decode_into,
    decode_rgb,
    default_cache_dir,
    iter_partition,
    load_version,
    merge_rank_states,
    partition_indices,
    rank_range,
    read_shard_table,
    resolve_version,
)

__all__ = [
    "DEFAULT_CACHE_LIMIT",
    "IMAGE_SIZE",
    "INPUT_MEAN",
    "INPUT_STD",
    "DatasetVersion",
    "FaceShardDataset",
    "FaceShardReader",
    "ResumableLoader",
    "ShardCache",
    "decode_image",
    "decode_into",
    "decode_rgb",
    "default_cache_dir",
    "iter_partition",
    "load_version",
    "merge_rank_states",
    "partition_indices",
    "rank_range",
    "read_shard_table",
    "resolve_version",
]

if TYPE_CHECKING:
    from storage.dataset import FaceShardDataset
else:

    def __getattr__(name: str) -> Any:
        return getattr(_impl, name)
