"""Reader throughput: :class:`FaceShardDataset` through a DataLoader against a plain pyarrow read
of the same shards (read only, and read + the same JPEG decode)."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from storage.dataset import FaceShardDataset, decode_image, read_store_bytes
from storage.manifest import ShardInfo


def bench_loader(
    store_root: str,
    name: str,
    version: int | None = None,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Throughput of one epoch of :class:`FaceShardDataset` through a DataLoader, against
    plain pyarrow reading the same shards (read only, and read + the same JPEG decode).

    Returns ``{"samples", "shards", "loader_samples_per_s", "pyarrow_read_samples_per_s",
    "pyarrow_decode_samples_per_s", ...}``; prints nothing. ``max_samples`` stops each
    measurement after about that many samples.
    """
    from torch.utils.data import DataLoader

    ds = FaceShardDataset(store_root, name, version, rank=0, world_size=1, batch_size=batch_size)
    limit = max_samples or ds.info.num_rows

    t0 = time.perf_counter()
    n_loader = 0
    loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers)
    for images, _labels in loader:
        n_loader += len(images)
        if n_loader >= limit:
            break
    t_loader = time.perf_counter() - t0

    def plain_read(shard: ShardInfo) -> pa.Table:  # the baseline: bytes -> pyarrow, nothing else
        return pq.read_table(
            pa.BufferReader(read_store_bytes(ds.info.store_root, ds.info.shard_path(shard))),
            columns=["label", "image"],
        )

    t0 = time.perf_counter()
    n_read = 0
    for shard in ds.info.shards:
        n_read += plain_read(shard).num_rows
        if n_read >= limit:
            break
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_dec = 0
    for shard in ds.info.shards:
        for jpeg in plain_read(shard).column("image").to_pylist():
            torch.from_numpy(decode_image(jpeg))
            n_dec += 1
            if n_dec >= limit:
                break
        if n_dec >= limit:
            break
    t_dec = time.perf_counter() - t0

    return {
        "dataset": name,
        "version": ds.info.version,
        "shards": len(ds.info.shards),
        "samples": n_loader,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "loader_seconds": t_loader,
        "loader_samples_per_s": n_loader / t_loader,
        "pyarrow_read_samples_per_s": n_read / t_read,
        "pyarrow_decode_samples_per_s": n_dec / t_dec,
    }
