"""Streaming reader of a published dataset version for training jobs.

Imports only numpy, pyarrow, OpenCV and torch: no Prefect, no Ray, so a training job can use it
on a bare GPU box. It reads ``<store>/datasets/<name>/v<N>/manifest.json`` (the commit marker;
a version directory without it does not exist) and the Parquet shards it lists, from a local
directory or an ``s3://`` store (through ``storage.objectstore``).

Sample order and partition (pure functions of integers, see :func:`partition_indices`):

1. Every sample has a *global id*: the shards in manifest order, rows in file order.
2. The epoch's order: the shards are permuted with a generator seeded by ``(seed, epoch)``, cut
   into *blocks* of ``shuffle_window`` consecutive shards, and the samples of each block are
   permuted with a generator seeded by ``(seed, epoch, block)``. ``shuffle_window=1`` is the
   plain "shard permutation, then within-shard permutation"; a wider window mixes identities
   from several shards into one batch at the cost of holding that many shards per worker.
3. Rank ``r`` of ``world_size`` takes the contiguous slice ``[r*N//W, (r+1)*N//W)`` of that
   order: every sample exactly once per epoch, ranks differ by at most one sample, and this
   holds when there are fewer shards (or samples) than ranks.
4. Inside a rank, after skipping ``offset`` samples (resume), the remaining stream is cut into
   batches of ``batch_size`` and batch ``k`` goes to DataLoader worker ``k % num_workers``.
   ``torch.utils.data.DataLoader`` collects worker batches round-robin, so with the same
   ``batch_size`` the loader yields exactly the rank's stream, in order; a training job that has
   consumed ``c`` samples of epoch ``e`` resumes with ``set_epoch(e, offset=c)`` and sees
   precisely the samples it had not seen, whatever its worker count before and after.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from faceloop.errors import BadInputError, ConfigError, StorageError
from storage import layout
from storage.manifest import Manifest, ShardInfo, latest_version

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
# insightface's ArcFaceONNX feeds (x - 127.5) / 127.5 of RGB pixels; training must match it so
# an exported recognizer loads through the same code path.
INPUT_MEAN = 127.5
INPUT_STD = 127.5

# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class DatasetVersion:
    """A committed dataset version: its manifest, read from ``<store>/datasets/<name>/v<N>/``."""

    store_root: str
    name: str
    version: int
    shards: tuple[ShardInfo, ...]
    num_rows: int
    num_classes: int
    manifest: Manifest

    @property
    def prefix(self) -> str:
        """The version directory, relative to the store root."""
        return layout.version_dir(self.name, self.version)

    def shard_path(self, shard: ShardInfo) -> str:
        """A shard's path relative to the store root."""
        return f"{self.prefix}/{shard.file}"


def _is_remote(root: str) -> bool:
    return "://" in root


def read_store_bytes(root: str, relpath: str) -> bytes:
    """Bytes of ``<root>/<relpath>`` from a local directory or an object store.

    Raises :class:`FileNotFoundError` when the object does not exist.
    """
    if not _is_remote(root):
        return (Path(root) / relpath).read_bytes()
    return _store(root).read_bytes(relpath)


_STORES: dict[str, Any] = {}


def _store(root: str) -> Any:
    """The (cached) :class:`storage.objectstore.ObjectStore` at ``root``, local or remote."""
    # Safe across the fork into DataLoader workers: an S3Store takes its client from a
    # per-process cache (storage/objectstore.py), so a forked worker gets its own.
    if root not in _STORES:
        # Imported here so a local-only training job never loads the S3 client code.
        from storage.objectstore import open_store

        _STORES[root] = open_store(root)
    return _STORES[root]


def resolve_version(store_root: str, name: str, version: int | None = None) -> int:
    """The version number to read: ``version`` if given, else the latest committed one, as
    :func:`storage.manifest.latest_version` (the writer's rule) resolves it."""
    if version is not None:
        return int(version)
    v = latest_version(_store(store_root), name)
    if v is None:
        raise ConfigError(f"dataset {name!r} has no published version in {store_root}")
    return v


def load_version(store_root: str, name: str, version: int | None = None) -> DatasetVersion:
    """Read a committed version's manifest.

    Raises :class:`ConfigError` when the version has no ``manifest.json`` (it was never
    committed, or is being written now) and :class:`StorageError` when the manifest is
    inconsistent (row counts that do not add up, labels outside ``0..num_classes-1`` are the
    shards' business and checked while reading).
    """
    store_root = store_root.rstrip("/") if _is_remote(store_root) else str(Path(store_root))
    v = resolve_version(store_root, name, version)
    rel = layout.version_manifest(name, v)
    try:
        manifest = Manifest.from_json(read_store_bytes(store_root, rel), name, v)
    except FileNotFoundError:
        raise ConfigError(f"dataset {name!r} version {v} does not exist (no {rel})") from None
    shards = manifest.shards
    if manifest.num_rows != sum(s.rows for s in shards):
        raise StorageError(
            f"{rel}: num_rows {manifest.num_rows} != sum of shard rows "
            f"{sum(s.rows for s in shards)}"
        )
    return DatasetVersion(
        store_root=store_root,
        name=name,
        version=v,
        shards=shards,
        num_rows=manifest.num_rows,
        num_classes=manifest.num_classes,
        manifest=manifest,
    )


# ---------------------------------------------------------------------------------------------
# Partition: pure functions of integers


def rank_range(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """The ``[start, stop)`` slice of an epoch's order that ``rank`` owns."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def _epoch_blocks(
    shard_rows: Sequence[int], seed: int, epoch: int, shuffle: bool, window: int
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(position of the block's first sample, the block's shard indices)`` in epoch
    order. The samples are permuted by :func:`_block_samples`, only for blocks somebody reads."""
    n_shards = len(shard_rows)
    order = (
        np.random.default_rng([seed, epoch]).permutation(n_shards)
        if shuffle
        else np.arange(n_shards)
    )
    pos = 0
    for b in range(0, n_shards, window):
        shards = order[b : b + window]
        yield pos, shards
        pos += int(sum(shard_rows[s] for s in shards))


def _block_samples(
    shards: np.ndarray,
    starts: np.ndarray,
    shard_rows: Sequence[int],
    seed: int,
    epoch: int,
    block: int,
    shuffle: bool,
) -> np.ndarray:
    ids = (
        np.concatenate([starts[s] + np.arange(shard_rows[s], dtype=np.int64) for s in shards])
        if len(shards)
        else np.zeros(0, np.int64)
    )
    if shuffle:
        ids = ids[np.random.default_rng([seed, epoch, block]).permutation(len(ids))]
    return ids


def iter_partition(
    shard_rows: Sequence[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int = 0,
    num_workers: int = 1,
    offset: int = 0,
    batch_size: int = 1,
    shuffle: bool = True,
    shuffle_window: int = 1,
) -> Iterator[np.ndarray]:
    """Global sample ids that one worker of one rank yields, one array per shuffle block.

    See the module docstring for the order. ``num_workers`` counts DataLoader workers, with 0
    meaning "the main process" (one consumer). ``offset`` skips that many samples of the rank's
    stream. Memory is one block's ids, so this scales to any number of samples.
    """
    if seed < 0 or epoch < 0:
        raise ValueError("seed and epoch must be >= 0")
    if batch_size < 1 or shuffle_window < 1:
        raise ValueError("batch_size and shuffle_window must be >= 1")
    workers = max(num_workers, 1)
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} outside num_workers {num_workers}")
    total = int(sum(shard_rows))
    start, stop = rank_range(total, rank, world_size)
    if offset < 0 or offset > stop - start:
        raise ValueError(f"offset {offset} outside this rank's {stop - start} samples")
    start += offset  # first position of the remaining stream
    starts = np.concatenate([[0], np.cumsum(shard_rows, dtype=np.int64)])[:-1]
    for block, (pos, shards) in enumerate(
        _epoch_blocks(shard_rows, seed, epoch, shuffle, shuffle_window)
    ):
        size = int(sum(shard_rows[s] for s in shards))
        lo, hi = max(pos, start), min(pos + size, stop)
        if lo >= hi:
            if pos >= stop:
                break
            continue
        # Positions in the remaining stream -> batch number -> owning worker.
        rel = np.arange(lo - start, hi - start, dtype=np.int64)
        mine = rel[(rel // batch_size) % workers == worker]
        if len(mine) == 0:
            continue
        ids = _block_samples(shards, starts, shard_rows, seed, epoch, block, shuffle)
        yield ids[mine + start - pos]


def partition_indices(shard_rows: Sequence[int], **kwargs: Any) -> np.ndarray:
    """All of :func:`iter_partition`'s ids as one array (tests, small datasets)."""
    parts = list(iter_partition(shard_rows, **kwargs))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_image(jpeg: bytes | np.ndarray) -> np.ndarray:
    """A 112x112 JPEG as a float32 ``(3, 112, 112)`` RGB array, ``(x - 127.5) / 127.5``.

    Raises :class:`BadInputError` (``bad_shard_image``) when the bytes are not a 112x112 image.
    """
    buf = (
        np.frombuffer(jpeg, np.uint8) if isinstance(jpeg, (bytes, bytearray, memoryview)) else jpeg
    )
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        got = "undecodable" if bgr is None else f"{bgr.shape[1]}x{bgr.shape[0]}"
        raise BadInputError(
            "bad_shard_image", f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} JPEG, got {got}"
        )
    rgb = bgr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    rgb -= INPUT_MEAN
    rgb /= INPUT_STD
    return rgb


class _Shard:
    """One shard's labels and JPEG bytes, kept as Arrow buffers (no per-row Python objects)."""

    def __init__(self, table: pa.Table) -> None:
        images = table.column("image").combine_chunks()
        if isinstance(images, pa.ChunkedArray):  # pyarrow < 17 returns a ChunkedArray
            images = images.chunk(0) if images.num_chunks else pa.array([], pa.binary())
        if images.null_count:
            raise StorageError("shard has null images")
        odt: type[np.signedinteger[Any]]
        if images.type == pa.large_binary():
            odt = np.int64
        else:
            images = images.cast(pa.binary())
            odt = np.int32
        _, offsets, data = images.buffers()
        self.offsets = np.frombuffer(offsets, odt)[images.offset : images.offset + len(images) + 1]
        self.data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        self.labels = table.column("label").to_numpy().astype(np.int64, copy=False)

    def jpeg(self, row: int) -> np.ndarray:
        return self.data[self.offsets[row] : self.offsets[row + 1]]


def read_shard_table(
    version: DatasetVersion,
    shard: ShardInfo,
    *,
    verify: bool = True,
    columns: Sequence[str] = ("label", "image"),
) -> pa.Table:
    """A shard's rows (``columns`` only). With ``verify``, the file's sha256 and row count must
    match the manifest, else :class:`StorageError`."""
    data = read_store_bytes(version.store_root, version.shard_path(shard))
    if verify and shard.sha256 and hashlib.sha256(data).hexdigest() != shard.sha256:
        raise StorageError(f"{version.shard_path(shard)}: sha256 does not match the manifest")
    table = pq.read_table(pa.BufferReader(data), columns=list(columns))
    if table.num_rows != shard.rows:
        raise StorageError(
            f"{version.shard_path(shard)}: {table.num_rows} rows, manifest says {shard.rows}"
        )
    return table


# ---------------------------------------------------------------------------------------------
# The dataset


def _default_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FaceShardDataset(IterableDataset):
    """Yields ``(image, label)``: a float32 ``(3, 112, 112)`` tensor and an int label.

    Each rank (``rank``/``world_size``, default from ``torch.distributed``) and each DataLoader
    worker reads its own part of the epoch; see the module docstring. Call :meth:`set_epoch`
    before each epoch (and with ``offset`` to resume); pass the DataLoader's ``batch_size`` so
    the loader's output order is the rank's stream and resume offsets are exact.
    ``transform`` gets each decoded array (e.g. a flip) before it becomes a tensor.
    """

    def __init__(
        self,
        store_root: str,
        name: str,
        version: int | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4,
        batch_size: int = 1,
        verify: bool = True,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.info = load_version(store_root, name, version)
        if rank is None or world_size is None:
            rank, world_size = _default_rank()
        rank_range(self.info.num_rows, rank, world_size)  # validates
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, shuffle_window
        self.batch_size, self.verify, self.transform = batch_size, verify, transform
        self.epoch, self.offset = 0, 0
        self.shard_rows = [s.rows for s in self.info.shards]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_rows, dtype=np.int64)])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """Select the epoch the next iterator reads, skipping ``offset`` samples of this rank."""
        start, stop = rank_range(self.info.num_rows, self.rank, self.world_size)
        if not 0 <= offset <= stop - start:
            raise ValueError(f"offset {offset} outside this rank's {stop - start} samples")
        self.epoch, self.offset = epoch, offset

    def state_dict(self, consumed: int) -> dict[str, int]:
        """The state to resume from after ``consumed`` samples of the current iterator."""
        return {
            "epoch": self.epoch,
            "offset": self.offset + consumed,
            "seed": self.seed,
            "version": self.info.version,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict`; the seed and version must be the same."""
        if (
            state.get("seed", self.seed) != self.seed
            or state.get("version", self.info.version) != self.info.version
        ):
            raise ConfigError("resume state is for another seed or dataset version")
        self.set_epoch(int(state["epoch"]), int(state["offset"]))

    def __len__(self) -> int:
        """Samples this rank yields from the current (epoch, offset), over all its workers."""
        start, stop = rank_range(self.info.num_rows, self.rank, self.world_size)
        return stop - start - self.offset

    def _plan(self) -> Iterator[np.ndarray]:
        wi = get_worker_info()
        worker, workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        return iter_partition(
            self.shard_rows,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=workers,
            offset=self.offset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            shuffle_window=self.shuffle_window,
        )

    def iter_ids(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(global id, label, jpeg bytes)`` in this worker's order, without decoding."""
        cache: dict[int, _Shard] = {}
        for ids in self._plan():
            shard_idx = np.searchsorted(self._starts, ids, side="right") - 1
            # A block's shards replace the previous block's: one block in memory per worker.
            cache = {s: cache.get(s) or self._load(s) for s in np.unique(shard_idx).tolist()}
            for gid, s in zip(ids.tolist(), shard_idx.tolist(), strict=False):
                shard = cache[s]
                row = gid - int(self._starts[s])
                yield gid, int(shard.labels[row]), shard.jpeg(row)

    def _load(self, s: int) -> _Shard:
        t0 = time.perf_counter()
        shard = _Shard(read_shard_table(self.info, self.info.shards[s], verify=self.verify))
        bad = (shard.labels < 0) | (shard.labels >= max(self.info.num_classes, 1))
        if self.info.num_classes and bad.any():
            raise StorageError(
                f"{self.info.shards[s].file}: labels outside 0..{self.info.num_classes - 1}"
            )
        log.debug("read shard %s in %.3fs", self.info.shards[s].file, time.perf_counter() - t0)
        return shard

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for _, label, jpeg in self.iter_ids():
            img = decode_image(jpeg)
            if self.transform is not None:
                img = self.transform(img)
            yield torch.from_numpy(np.ascontiguousarray(img)), label
