"""Reader throughput: :class:`FaceShardDataset` through a DataLoader, with the settings the
README documents (``batched=True``, ``DataLoader(ds, batch_size=None)``), against a plain
pyarrow read of the same shards (read only, and read + the same JPEG decode)."""

from __future__ import annotations

import statistics
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
    rounds: int = 3,
    batched: bool = True,
) -> dict[str, Any]:
    """Throughput of one epoch of :class:`FaceShardDataset` through a DataLoader, against
    plain pyarrow reading the same shards (read only, and read + the same JPEG decode).

    The loader and the plain read + decode are measured interleaved, ``rounds`` times each (a
    loaded machine slows both alike); each figure is the best round, and
    ``loader_vs_plain_ratio`` is loader ÷ plain read + decode (``ratio_per_round``: per round).
    Returns ``{"samples", "shards", "loader_samples_per_s", "pyarrow_read_samples_per_s",
    "pyarrow_decode_samples_per_s", "loader_vs_plain_ratio", ...}``; prints nothing.
    ``max_samples`` stops each measurement after about that many samples.
    """
    from torch.utils.data import DataLoader

    ds = FaceShardDataset(
        store_root, name, version, rank=0, world_size=1, batch_size=batch_size, batched=batched
    )
    limit = max_samples or ds.info.num_rows

    def run_loader() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        loader = DataLoader(ds, batch_size=None if batched else batch_size, num_workers=num_workers)
        for images, _labels in loader:
            n += len(images)
            if n >= limit:
                break
        return n, time.perf_counter() - t0

    def plain_read(shard: ShardInfo) -> pa.Table:  # the baseline: bytes -> pyarrow, nothing else
        return pq.read_table(
            pa.BufferReader(read_store_bytes(ds.info.store_root, ds.info.shard_path(shard))),
            # What the reader needs of a row: the label (/1) or the identity it maps (/2).
            columns=["identity_id" if ds.info.label_ids is not None else "label", "image"],
        )

    def run_read() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for shard in ds.info.shards:
            n += plain_read(shard).num_rows
            if n >= limit:
                break
        return n, time.perf_counter() - t0

    def run_decode() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = 0
        for shard in ds.info.shards:
            for jpeg in plain_read(shard).column("image").to_pylist():
                torch.from_numpy(decode_image(jpeg))
                n += 1
                if n >= limit:
                    break
            if n >= limit:
                break
        return n, time.perf_counter() - t0

    loader_rates, read_rates, dec_rates = [], [], []
    n_loader, t_loader = 0, 0.0
    for _ in range(max(rounds, 1)):
        n_loader, t_loader = run_loader()
        loader_rates.append(n_loader / t_loader)
        n, t = run_decode()
        dec_rates.append(n / t)
        n, t = run_read()
        read_rates.append(n / t)
    loader_rate, dec_rate = max(loader_rates), max(dec_rates)
    return {
        "dataset": name,
        "version": ds.info.version,
        "shards": len(ds.info.shards),
        "samples": n_loader,
        "batch_size": batch_size,
        "batched": batched,
        "num_workers": num_workers,
        "rounds": len(loader_rates),
        "loader_seconds": t_loader,
        "loader_samples_per_s": loader_rate,
        "pyarrow_read_samples_per_s": max(read_rates),
        "pyarrow_decode_samples_per_s": dec_rate,
        "loader_vs_plain_ratio": loader_rate / dec_rate,
        "ratio_per_round": [a / b for a, b in zip(loader_rates, dec_rates, strict=True)],
        "ratio_median": statistics.median(
            a / b for a, b in zip(loader_rates, dec_rates, strict=True)
        ),
    }
