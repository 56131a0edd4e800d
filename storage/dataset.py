"""Streaming reader of a published dataset version for training jobs (public name:
:mod:`faceloop.dataset`).

Imports only numpy, pyarrow, pillow/simplejpeg and, for S3, boto3 (the core ``pip install
faceloop``); torch is imported lazily, on first use of :class:`FaceShardDataset` (a
``torch.utils.data.IterableDataset``) or :class:`ResumableLoader`, so the reader runs on a
training image with its own torch and, through :class:`FaceShardReader`, without any torch. It
reads ``<store>/datasets/<name>/v<N>/manifest.json`` (the commit marker; a version directory
without it does not exist) and the Parquet shards it lists, from a local directory or an
``s3://`` store (through ``storage.objectstore``).

Sample order and partition (pure functions of integers, see :func:`partition_indices`):

1. Every sample has a *global id*: the shards in manifest order, rows in file order (a /3
   version's deleted rows of a reused shard are not samples and get no id).
2. The epoch's order: the shards are permuted with a generator seeded by ``(seed, epoch)``, cut
   into *blocks* of ``shuffle_window`` consecutive shards, and the samples of each block are
   permuted with a generator seeded by ``(seed, epoch, block)``. ``shuffle_window=1`` is the
   plain "shard permutation, then within-shard permutation"; a wider window mixes identities
   from several shards into one batch at the cost of holding that many shards per worker.
3. Rank ``r`` of ``world_size`` takes the contiguous slice ``[r*N//W, (r+1)*N//W)`` of that
   order: every sample exactly once per epoch, ranks differ by at most one sample, and this
   holds when there are fewer shards (or samples) than ranks. With ``drop_last`` every rank
   takes ``N//W`` samples, ``[r*(N//W), (r+1)*(N//W))``, and the last ``N % W`` positions of
   the epoch's order are not read that epoch (other samples each epoch, as the order is
   reshuffled): the same number of samples, hence of batches, on every rank, which
   DistributedDataParallel needs (a rank with one batch more waits for the others' gradients
   at its last step, for ever). (After a resume on another world size,
   :func:`merge_rank_states`, a rank's *stream* is its share of the positions the old ranks
   had not consumed: ``spans`` of the epoch order instead of one slice.)
4. Inside a rank, after skipping ``offset`` samples (resume), the remaining stream is cut into
   batches of ``batch_size`` and batch ``k`` goes to DataLoader worker ``k % num_workers``.
   ``torch.utils.data.DataLoader`` collects worker batches round-robin, so with the same
   ``batch_size`` the loader yields exactly the rank's stream, in order, whatever the worker
   count.

Resume (:meth:`FaceShardReader.state_dict`): the dataset counts what its iterator yielded; the
protocol is torchdata's ``StatefulDataLoader`` one (``state_dict()`` / ``load_state_dict()``,
called in each worker). With a plain DataLoader use :class:`ResumableLoader`, which counts the
samples the loader delivered. Each state names epoch, seed, world size, rank and position.

Speed: a local shard's sha256 is checked once per process (while its size and mtime stay), a
remote one's at every fetch (it may change under its key; the download costs more than the
hash), a cached copy's once per process; shards of a remote store go to a local,
size-bounded, content-addressed cache (``cache_dir``, ``cache_limit_bytes``), so later epochs
make no GETs; the next block's shards are fetched and parsed in a background thread while the
current one decodes; ``batched=True`` decodes straight into the batch tensor (no collate copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from faceloop.errors import BadInputError, ConfigError, StorageError
from storage import layout
from storage.manifest import Manifest, ShardInfo, held_rows, latest_version, parse_deletions

if TYPE_CHECKING:
    import torch
    from torch.utils.data import IterableDataset

log = logging.getLogger(__name__)

IMAGE_SIZE = 112
# insightface's ArcFaceONNX feeds (x - 127.5) / 127.5 of RGB pixels; training must match it so
# an exported recognizer loads through the same code path.
INPUT_MEAN = 127.5
INPUT_STD = 127.5

STATE_FORMAT = "faceloop.reader.state/1"
MERGED_STATE_FORMAT = "faceloop.reader.merged-state/1"
CACHE_ENV = "FACELOOP_CACHE_DIR"
DEFAULT_CACHE_LIMIT = 20 * 1024**3

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
    # Pooled (/2) versions: the sorted identity ids of classes.parquet (label i = entry i);
    # None for /1 versions, whose shards carry the label.
    label_ids: np.ndarray | None = field(default=None, compare=False, repr=False)
    # /3 versions: shard sha256 -> positions of the shard file's rows this version does not
    # hold (its deletion vectors); the reader skips them.
    deleted: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def prefix(self) -> str:
        """The version directory, relative to the store root."""
        return layout.version_dir(self.name, self.version)

    def shard_path(self, shard: ShardInfo) -> str:
        """A shard's path relative to the store root (in the dataset's pool for /2)."""
        return self.manifest.shard_rel(shard)

    def labels_of(self, identity_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The labels ``0..C-1`` of a pooled version's rows, from their ``identity_id``."""
        if self.label_ids is None:
            raise StorageError(f"{self.name} v{self.version}: shards carry their own labels")
        q = np.asarray(identity_ids.to_pylist(), dtype=self.label_ids.dtype)
        pos = np.searchsorted(self.label_ids, q)
        hit = pos < len(self.label_ids)
        hit[hit] = self.label_ids[pos[hit]] == q[hit]
        if not hit.all():
            raise StorageError(
                f"{self.name} v{self.version}: {int((~hit).sum())} shard rows name an identity "
                "that is not in classes.parquet"
            )
        return pos.astype(np.int64)


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


def _version_number(version: object) -> int | None:
    """``None`` / ``"latest"`` (the latest committed version), an int >= 1, ``"3"`` or ``"v3"``
    (as ``faceloop datasets show`` names them). ``1.7`` or ``True`` are refused, not rounded."""
    if version is None or (isinstance(version, str) and version.strip().lower() == "latest"):
        return None
    if isinstance(version, str):
        text = version.strip().lower().removeprefix("v")
        if not text.isdigit():
            raise ConfigError(f"version {version!r}: expected N, 'vN' or 'latest'")
        version = int(text)
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise ConfigError(f"version {version!r}: expected N, 'vN' or 'latest'")
    if version < 1:
        raise ConfigError(f"version {version}: versions are numbered from 1")
    return int(version)


def resolve_version(store_root: str, name: str, version: int | str | None = None) -> int:
    """The version number to read: ``version`` if given (an int, ``"vN"``, ``"N"``), else
    (``None`` or ``"latest"``) the latest committed one, as
    :func:`storage.manifest.latest_version` (the writer's rule) resolves it."""
    number = _version_number(version)
    if number is not None:
        return number
    v = latest_version(_store(store_root), name)
    if v is None:
        if not _is_remote(store_root) and not Path(store_root).is_dir():
            raise ConfigError(f"no store at {store_root} (no such folder)")
        raise ConfigError(f"dataset {name!r} has no published version in {store_root}")
    return v


def _root(store_root: str | os.PathLike[str]) -> str:
    """A store root as the reader keys it: an URI without its trailing '/', or a local path
    (``str`` or ``pathlib.Path``; a ``file://`` URI is its path)."""
    if not isinstance(store_root, (str, os.PathLike)):
        raise TypeError(f"store root must be a path or an URI, not {type(store_root).__name__}")
    root = os.fspath(store_root)
    if not isinstance(root, str) or not root:
        raise ConfigError(f"store root {store_root!r}: expected a folder or an s3:// URI")
    if root.startswith("file://"):
        # A local folder by another name: read in place like its path (a file:// root was
        # taken for a remote store and every shard copied into the shard cache as well).
        from storage.objectstore import _file_uri_path

        root = _file_uri_path(root)
    return root.rstrip("/") if _is_remote(root) else str(Path(root))


def load_version(
    store_root: str | os.PathLike[str], name: str, version: int | str | None = None
) -> DatasetVersion:
    """Read a committed version's manifest.

    Raises :class:`ConfigError` when the version has no ``manifest.json`` (it was never
    committed, or is being written now) and :class:`StorageError` when the manifest is
    inconsistent (row counts that do not add up, labels outside ``0..num_classes-1`` are the
    shards' business and checked while reading).
    """
    store_root = _root(store_root)
    v = resolve_version(store_root, name, version)
    rel = layout.version_manifest(name, v)
    try:
        manifest = Manifest.from_json(read_store_bytes(store_root, rel), name, v)
    except FileNotFoundError:
        raise ConfigError(f"dataset {name!r} version {v} does not exist (no {rel})") from None
    except ValueError as exc:
        raise StorageError(f"{rel}: {exc}") from None
    shards = manifest.shards
    if manifest.num_rows != sum(s.live_rows for s in shards):
        raise StorageError(
            f"{rel}: num_rows {manifest.num_rows} != sum of shard rows "
            f"{sum(s.live_rows for s in shards)}"
        )
    label_ids = _label_ids(store_root, manifest) if manifest.pooled else None
    deleted: dict[str, np.ndarray] = {}
    if manifest.deletions:
        drel = f"{layout.version_dir(name, v)}/{manifest.deletions['file']}"
        try:
            deleted = parse_deletions(manifest, read_store_bytes(store_root, drel))
        except (ValueError, FileNotFoundError) as exc:
            raise StorageError(f"{drel}: {exc}") from None
    return DatasetVersion(
        store_root=store_root,
        name=name,
        version=v,
        shards=shards,
        num_rows=manifest.num_rows,
        num_classes=manifest.num_classes,
        manifest=manifest,
        label_ids=label_ids,
        deleted=deleted,
    )


def _label_ids(store_root: str, manifest: Manifest) -> np.ndarray:
    """The sorted identity ids of a pooled version's ``classes.parquet`` (checked against the
    manifest's sha256; labels must be ``0..num_classes-1`` in identity order)."""
    entry = manifest.classes
    if not entry:
        raise StorageError(f"{manifest.name} v{manifest.version}: manifest lists no classes file")
    rel = f"{layout.version_dir(manifest.name, manifest.version)}/{entry['file']}"
    try:
        data = read_store_bytes(store_root, rel)
    except FileNotFoundError:
        raise StorageError(f"{rel}: missing, though the manifest lists it") from None
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise StorageError(f"{rel}: sha256 does not match the manifest")
    from storage.objectstore import read_parquet_bytes  # not pq.read_table: see there

    classes = read_parquet_bytes(data, ["label", "identity_id"])
    labels = classes.column("label").to_numpy()
    ids = np.asarray(classes.column("identity_id").to_pylist(), dtype=str)
    if (
        len(ids) != manifest.num_classes
        or not np.array_equal(labels, np.arange(len(ids)))
        or (len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])))
    ):
        raise StorageError(f"{rel}: labels are not 0..num_classes-1 over sorted identities")
    return ids


# ---------------------------------------------------------------------------------------------
# Partition: pure functions of integers

Spans = Sequence[tuple[int, int]]


def rank_range(
    num_samples: int, rank: int, world_size: int, drop_last: bool = False
) -> tuple[int, int]:
    """The ``[start, stop)`` slice of an epoch's order that ``rank`` owns (``drop_last``: the
    same ``num_samples // world_size`` on every rank; module docstring)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if drop_last:
        share = num_samples // world_size
        return rank * share, (rank + 1) * share
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


def rank_spans(
    num_samples: int,
    rank: int,
    world_size: int,
    spans: Spans | None = None,
    drop_last: bool = False,
) -> list[tuple[int, int]]:
    """The rank's stream as sorted, disjoint ``[lo, hi)`` spans of epoch positions: its
    :func:`rank_range` slice, or ``spans`` (after a re-partition) when given."""
    if spans is None:
        start, stop = rank_range(num_samples, rank, world_size, drop_last)
        return [(start, stop)] if stop > start else []
    out = sorted((int(a), int(b)) for a, b in spans if int(b) > int(a))
    for (_, b), (a2, _) in itertools.pairwise(out):
        if a2 < b:
            raise ValueError("overlapping spans")
    if out and (out[0][0] < 0 or out[-1][1] > num_samples):
        raise ValueError(f"spans outside 0..{num_samples}")
    return out


def spans_length(spans: Spans) -> int:
    return int(sum(b - a for a, b in spans))


def slice_spans(spans: Spans, lo: int, hi: int) -> list[tuple[int, int]]:
    """Stream indices ``[lo, hi)`` of the stream ``spans`` describe, as spans of positions."""
    out, base = [], 0
    for a, b in spans:
        n = b - a
        s, e = max(lo - base, 0), min(hi - base, n)
        if s < e:
            out.append((a + s, a + e))
        base += n
    return out


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
    spans: Spans | None = None,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Global sample ids that one worker of one rank yields, one array per shuffle block.

    See the module docstring for the order. ``num_workers`` counts DataLoader workers, with 0
    meaning "the main process" (one consumer). ``offset`` skips that many samples of the rank's
    stream; ``spans`` replaces the rank's slice (see :func:`rank_spans`). Memory is one
    block's ids, so this scales to any number of samples.
    """
    if seed < 0 or epoch < 0:
        raise ValueError("seed and epoch must be >= 0")
    if batch_size < 1 or shuffle_window < 1:
        raise ValueError("batch_size and shuffle_window must be >= 1")
    workers = max(num_workers, 1)
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} outside num_workers {num_workers}")
    total = int(sum(shard_rows))
    stream = rank_spans(total, rank, world_size, spans, drop_last)
    length = spans_length(stream)
    if offset < 0 or offset > length:
        raise ValueError(f"offset {offset} outside this rank's {length} samples")
    stream = slice_spans(stream, offset, length)  # the remaining stream
    if not stream:
        return
    bases = np.cumsum([0] + [b - a for a, b in stream])
    end = stream[-1][1]
    starts = np.concatenate([[0], np.cumsum(shard_rows, dtype=np.int64)])[:-1]
    for block, (pos, shards) in enumerate(
        _epoch_blocks(shard_rows, seed, epoch, shuffle, shuffle_window)
    ):
        if pos >= end:
            break
        size = int(sum(shard_rows[s] for s in shards))
        parts = []
        for (a, b), base in zip(stream, bases.tolist(), strict=False):
            lo, hi = max(pos, a), min(pos + size, b)
            if lo >= hi:
                continue
            # Positions in the remaining stream -> batch number -> owning worker.
            rel = np.arange(lo - a + base, hi - a + base, dtype=np.int64)
            mine = (rel // batch_size) % workers == worker
            parts.append(np.arange(lo, hi, dtype=np.int64)[mine])
        where = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        if len(where) == 0:
            continue
        ids = _block_samples(shards, starts, shard_rows, seed, epoch, block, shuffle)
        yield ids[where - pos]


def partition_indices(shard_rows: Sequence[int], **kwargs: Any) -> np.ndarray:
    """All of :func:`iter_partition`'s ids as one array (tests, small datasets)."""
    parts = list(iter_partition(shard_rows, **kwargs))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# Decoding: simplejpeg (libjpeg-turbo, a small wheel), else OpenCV where installed, else pillow

_SIMPLEJPEG: Any = None


def _simplejpeg() -> Any:
    global _SIMPLEJPEG
    if _SIMPLEJPEG is None:
        try:
            import simplejpeg

            _SIMPLEJPEG = simplejpeg
        except ImportError:  # pragma: no cover - a core dependency; pillow still decodes
            _SIMPLEJPEG = False
    return _SIMPLEJPEG


_CV2: Any = None


def _cv2() -> Any:
    global _CV2
    if _CV2 is None:
        try:
            import cv2

            _CV2 = cv2
        except ImportError:  # the reader's core install has no OpenCV
            _CV2 = False
    return _CV2


def _bad(got: str) -> BadInputError:
    return BadInputError("bad_shard_image", f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} JPEG, got {got}")


def decode_rgb(data: bytes | np.ndarray) -> np.ndarray:
    """Image bytes as an ``(H, W, 3)`` uint8 RGB array; :class:`BadInputError` if undecodable."""
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    sj = _simplejpeg()
    if sj and len(buf) > 2 and buf[0] == 0xFF and buf[1] == 0xD8:
        try:
            return sj.decode_jpeg(buf, colorspace="RGB")
        except ValueError:
            raise _bad("undecodable") from None
    cv2 = _cv2()
    if cv2:  # the pipeline's install has OpenCV: about twice pillow's speed
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if bgr is None:
            raise _bad("undecodable")
        return bgr[:, :, ::-1]
    from PIL import Image

    try:
        with Image.open(io.BytesIO(buf.tobytes())) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        raise _bad("undecodable") from None


def decode_into(data: bytes | np.ndarray, out: np.ndarray) -> np.ndarray:
    """Decode a 112x112 image into ``out`` (float32 ``(3, 112, 112)``), normalised like
    :func:`decode_image`; returns ``out``."""
    rgb = decode_rgb(data)
    if rgb.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise _bad(f"{rgb.shape[1]}x{rgb.shape[0]}")
    np.subtract(rgb.transpose(2, 0, 1), np.float32(INPUT_MEAN), out=out)
    out /= np.float32(INPUT_STD)
    return out


def decode_image(jpeg: bytes | np.ndarray) -> np.ndarray:
    """A 112x112 JPEG as a float32 ``(3, 112, 112)`` RGB array, ``(x - 127.5) / 127.5``.

    Raises :class:`BadInputError` (``bad_shard_image``) when the bytes are not a 112x112 image.
    """
    return decode_into(jpeg, np.empty((3, IMAGE_SIZE, IMAGE_SIZE), np.float32))


class _Shard:
    """One shard's labels and JPEG bytes, kept as Arrow buffers (no per-row Python objects).
    ``labels`` (pooled versions) replaces the table's ``label`` column."""

    def __init__(self, table: pa.Table, labels: np.ndarray | None = None) -> None:
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
        if labels is None:
            labels = table.column("label").to_numpy().astype(np.int64, copy=False)
        self.labels = labels

    def jpeg(self, row: int) -> np.ndarray:
        return self.data[self.offsets[row] : self.offsets[row + 1]]


# ---------------------------------------------------------------------------------------------
# Fetching shards: verify once per process, a local cache for remote stores

# (store root, shard path, sha256, size, mtime) of local shards whose sha256 this process
# checked (a remote shard is hashed at every fetch).
_VERIFIED: set[tuple[str, str, str, int, int]] = set()
# (cache dir, sha256) of cached shards hashed again by this process.
_CACHE_VERIFIED: set[tuple[str, str]] = set()


def default_cache_dir() -> Path:
    """``$FACELOOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/faceloop/shards``, else
    ``~/.cache/faceloop/shards``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return cache / "faceloop" / "shards"


class ShardCache:
    """Content-addressed shard files ``<dir>/<sha256>.parquet``, at most ``limit_bytes`` in all
    (least recently used first out). A file is written (atomically) only after its bytes
    hashed to its name; a reader that verifies hashes a hit again once per process (a disk
    error or a hand edit since), and a file that no longer matches is dropped and fetched
    again (:meth:`drop`)."""

    def __init__(self, directory: str | os.PathLike[str], limit_bytes: int) -> None:
        self.dir = Path(directory)
        self.limit = int(limit_bytes)

    def _path(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.parquet"

    def get(self, sha256: str, size: int = 0) -> bytes | None:
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if size and len(data) != size:
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return data

    def drop(self, sha256: str) -> None:
        with contextlib.suppress(OSError):
            self._path(sha256).unlink(missing_ok=True)

    def put(self, sha256: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        try:
            # Training crops are biometric data: the owner's only, whatever the umask (as in
            # the store), and so are the folders made for it (mkdir's mode is not the parents':
            # under umask 000 they were 0777, so others could swap the cache folder).
            missing = [p for p in (self.dir, *self.dir.parents) if not p.exists()]
            for folder in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    folder.mkdir(mode=0o700)
                os.chmod(folder, 0o700)
            if self.dir.stat().st_mode & 0o077:
                os.chmod(self.dir, 0o700)
            tmp = self.dir / f".{sha256}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            from storage.objectstore import write_chunked  # huge folios are slow on some VMs

            write_chunked(tmp, data, mode=0o600)
            os.replace(tmp, self._path(sha256))
            self._evict(keep=self._path(sha256))
        except OSError as exc:  # a full or read-only cache must not stop training
            log.warning("shard cache %s: %s", self.dir, exc)

    def _evict(self, keep: Path) -> None:
        files = []
        for p in self.dir.glob("*.parquet"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.limit:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


def _check_rows(version: DatasetVersion, shard: ShardInfo, table: pa.Table) -> pa.Table:
    if table.num_rows != shard.rows:
        raise StorageError(
            f"{version.shard_path(shard)}: {table.num_rows} rows, manifest says {shard.rows}"
        )
    return table


def _still_listed(version: DatasetVersion, shard: ShardInfo) -> bool:
    """Whether ``version``'s manifest in the store now still lists ``shard`` (the version was
    neither removed nor rewritten since it was opened)."""
    rel = layout.version_manifest(version.name, version.version)
    try:
        now = Manifest.from_json(read_store_bytes(version.store_root, rel))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False
    return any(s.file == shard.file for s in now.shards)


def fetch_shard_bytes(
    version: DatasetVersion,
    shard: ShardInfo,
    *,
    verify: bool = True,
    cache: ShardCache | None = None,
) -> bytes:
    """A shard's file: from ``cache`` when it holds it, else from the store; with ``verify``
    its sha256 is checked against the manifest once per process wherever it came from (a
    cached copy that fails is dropped and read from the store), and a store copy that passed
    is cached. A shard gone from the store (its version removed while a job read it) is a
    :class:`StorageError` that says so."""
    root, rel = version.store_root, version.shard_path(shard)
    if cache is not None and shard.sha256:
        hit = cache.get(shard.sha256, shard.bytes)
        if hit is not None:
            ck = (str(cache.dir), shard.sha256)
            if not verify or ck in _CACHE_VERIFIED:
                return hit
            if hashlib.sha256(hit).hexdigest() == shard.sha256:
                _CACHE_VERIFIED.add(ck)
                return hit
            log.warning("shard cache: %s no longer matches its sha256; read again", shard.sha256)
            cache.drop(shard.sha256)
    try:
        if _is_remote(root):
            # Hashed at every fetch: the object can change under the same key between two
            # reads (nothing cheap says it did), and the download costs more than the hash.
            data, key = read_store_bytes(root, rel), None
        else:
            path = Path(root) / rel
            st = path.stat()
            data = path.read_bytes()
            key = (root, rel, shard.sha256, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        if _still_listed(version, shard):
            raise StorageError(
                f"{rel}: a shard of {version.name} v{version.version} is missing from the store, "
                "though the version is still committed and lists it: the store is damaged (a "
                "file deleted by hand?); `faceloop datasets verify "
                f"{version.version} --name {version.name}` lists what is wrong"
            ) from None
        raise StorageError(
            f"{rel}: a shard of {version.name} v{version.version} is gone from the store: the "
            "version was removed (retention, `faceloop datasets gc`, `faceloop forget` "
            "rewriting it) while this job read it; read a version the store keeps "
            "(`faceloop datasets list`) and resume there"
        ) from None
    checked = key is not None and key in _VERIFIED
    if shard.sha256 and not checked and (verify or cache is not None):
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            raise StorageError(f"{rel}: sha256 does not match the manifest")
        if key is not None:
            _VERIFIED.add(key)
        checked = True
    if cache is not None and checked:
        cache.put(shard.sha256, data)
    return data


def read_shard_table(
    version: DatasetVersion,
    shard: ShardInfo,
    *,
    verify: bool = True,
    columns: Sequence[str] = ("label", "image"),
    cache: ShardCache | None = None,
) -> pa.Table:
    """The rows of a shard that the version holds (``columns`` only; a /3 version's deleted
    rows left out). With ``verify``, the file's sha256 (once per process) and row count must
    match the manifest, else :class:`StorageError`."""
    data = fetch_shard_bytes(version, shard, verify=verify, cache=cache)
    from storage.objectstore import read_parquet_bytes  # not pq.read_table: see there

    try:
        parsed = read_parquet_bytes(data, columns)
    except (pa.ArrowException, OSError) as exc:  # verify=False lets damaged bytes this far
        raise StorageError(f"{version.shard_path(shard)}: not a readable shard: {exc}") from None
    table = _check_rows(version, shard, parsed)
    return held_rows(table, version.deleted.get(shard.sha256))


# ---------------------------------------------------------------------------------------------
# The reader


def _torch_module() -> Any:
    """torch if this process already imported it, else None (the reader never imports it)."""
    return sys.modules.get("torch")


def _worker_info() -> Any:
    torch = _torch_module()
    if torch is None:
        return None
    from torch.utils.data import get_worker_info

    return get_worker_info()


def _default_rank() -> tuple[int, int]:
    """torch.distributed's rank and world size once its process group is up, else the
    ``RANK`` / ``WORLD_SIZE`` that torchrun (and most launchers) set before it is, else 0 of 1."""
    torch = _torch_module()
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is not None and world is not None:
        try:
            return int(rank), int(world)
        except ValueError:
            raise ConfigError(
                f"RANK={rank!r} / WORLD_SIZE={world!r} in the environment are not integers"
            ) from None
    if rank is not None or world is not None:
        raise ConfigError(
            "only one of RANK and WORLD_SIZE is set in the environment: pass rank= and "
            "world_size= (every rank would otherwise read the whole dataset)"
        )
    return 0, 1


def _agreed_latest(store_root: str | os.PathLike[str], name: str, world_size: int) -> int:
    """The latest version for a reader of ``world_size`` ranks: ranks that resolve "latest"
    each on their own, at slightly different times, read different versions when a publish
    lands in between (other samples, other labels for the same identities: silently). Under
    torch.distributed (its process group up with this world size) rank 0 resolves it and
    every rank takes rank 0's answer (a collective call: every rank must open the dataset);
    without a process group the ranks cannot agree, and a warning says to pin ``version``."""
    torch = _torch_module()
    root = _root(store_root)
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() == world_size
    ):
        box: list[object] = [None]
        if torch.distributed.get_rank() == 0:
            try:
                box = [("ok", resolve_version(root, name))]
            except ConfigError as exc:
                box = [("error", str(exc))]
        torch.distributed.broadcast_object_list(box, src=0)
        answer: tuple[str, Any] = box[0]  # type: ignore[assignment]
        if answer[0] == "error":
            raise ConfigError(str(answer[1]))
        return int(answer[1])
    v = resolve_version(root, name)
    log.warning(
        "%s: version 'latest' read as v%d by a rank of %d without a torch.distributed process "
        "group: ranks that open it after a new publish read another version (other samples, "
        "other labels). Pin version= (resolved once, e.g. by the launcher with "
        "faceloop.dataset.resolve_version), or open it after init_process_group",
        name,
        v,
        world_size,
    )
    return v


def _whole(name: str, value: object, least: int) -> int:
    """``value`` as an int >= ``least``, or a :class:`TypeError` / :class:`ValueError` naming
    the argument (``"4"`` or ``4.0`` are refused, not converted)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")
    return int(value)


class FaceShardReader:
    """Streams ``(image, label)`` of a dataset version: a float32 ``(3, 112, 112)`` array and an
    int label (or, with ``batched``, ``(B, 3, 112, 112)`` and ``(B,)`` int64 arrays). No torch:
    :class:`FaceShardDataset` is the same reader as a ``torch.utils.data.IterableDataset``.

    Each rank (``rank``/``world_size``, default from ``torch.distributed``) and each DataLoader
    worker reads its own part of the epoch; see the module docstring. Call :meth:`set_epoch`
    before each epoch; pass the DataLoader's ``batch_size`` so the loader's output order is the
    rank's stream (with ``batched=True`` the reader makes the batches itself: use
    ``DataLoader(ds, batch_size=None)``). ``transform`` gets each decoded array (e.g. a flip).

    ``drop_last`` gives every rank the same ``N // world_size`` samples (the module docstring):
    use it under DistributedDataParallel, which hangs at the last step of a rank that has a
    batch more than the others.

    ``cache_dir`` (default :func:`default_cache_dir`) holds shards of a remote store, at most
    ``cache_limit_bytes`` (0: no cache); ``prefetch`` reads the next block's shards in a
    background thread.
    """

    def __init__(
        self,
        store_root: str | os.PathLike[str],
        name: str,
        version: int | str | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4,
        batch_size: int = 1,
        batched: bool = False,
        drop_last: bool = False,
        verify: bool = True,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit_bytes: int = DEFAULT_CACHE_LIMIT,
        prefetch: bool = True,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError(
                "pass both rank and world_size, or neither (then torch.distributed's, or the "
                "RANK / WORLD_SIZE that torchrun sets): with one of them every rank would read "
                "the whole dataset"
            )
        if rank is None or world_size is None:
            rank, world_size = _default_rank()
        rank, world_size = _whole("rank", rank, 0), _whole("world_size", world_size, 1)
        batch_size = _whole("batch_size", batch_size, 1)
        seed, shuffle_window = _whole("seed", seed, 0), _whole("shuffle_window", shuffle_window, 1)
        if world_size > 1 and _version_number(version) is None:
            version = _agreed_latest(store_root, name, world_size)
        self.info = load_version(store_root, name, version)
        self.name = name
        rank_range(self.info.num_rows, rank, world_size)  # validates
        if drop_last and self.info.num_rows < world_size:
            raise ConfigError(
                f"{name} v{self.info.version} has {self.info.num_rows} samples for "
                f"world_size {world_size}: with drop_last every rank would read none"
            )
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.seed, self.shuffle, self.shuffle_window = seed, shuffle, shuffle_window
        self.batch_size, self.batched = batch_size, batched
        self.verify, self.transform, self.prefetch = verify, transform, prefetch
        self.cache: ShardCache | None = None
        if _is_remote(self.info.store_root) and cache_limit_bytes > 0:
            self.cache = ShardCache(cache_dir or default_cache_dir(), cache_limit_bytes)
        self.shard_rows = [s.live_rows for s in self.info.shards]
        self._starts = np.concatenate([[0], np.cumsum(self.shard_rows, dtype=np.int64)])
        self.epoch, self.offset = 0, 0
        self.spans: list[tuple[int, int]] | None = None  # None: the rank's slice
        self._yielded = 0  # samples the current iterator yielded (from ``offset``)
        # (epoch, offset) this copy last iterated inside a DataLoader worker (persistent
        # workers keep their copy: see _plan).
        self._worker_last: tuple[int, int] | None = None
        self._worker_resume: tuple[int, int, int] | None = None  # (num_workers, worker, skip)
        # The epoch of a position load_state_dict() set that no iterator has read yet: the
        # training loop's set_epoch() of that epoch keeps it (see set_epoch).
        self._resumed_epoch: int | None = None
        self.moves = 0  # how many times the position was set (ResumableLoader's counts)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def _stream(self) -> list[tuple[int, int]]:
        return rank_spans(
            self.info.num_rows, self.rank, self.world_size, self.spans, self.drop_last
        )

    @property
    def num_samples(self) -> int:
        """Samples this rank yields from the current (epoch, offset), over all its workers."""
        return spans_length(self._stream()) - self.offset

    def set_epoch(self, epoch: int, offset: int | None = None) -> None:
        """Select the epoch the next iterator reads (the rank's whole slice), skipping
        ``offset`` samples of this rank's stream (default 0).

        After :meth:`load_state_dict`, the same epoch's ``set_epoch(epoch)`` (without an
        offset) keeps the loaded position until an iterator has read from it, so a training
        loop that calls ``set_epoch`` at the top of every epoch resumes where it stopped."""
        epoch = _whole("epoch", epoch, 0)
        if offset is None:
            if self._resumed_epoch == epoch:
                return
            offset = 0
        self.spans = None
        self._seek(epoch, _whole("offset", offset, 0))

    def _seek(self, epoch: int, offset: int) -> None:
        length = spans_length(self._stream())
        if not 0 <= offset <= length:
            raise ValueError(f"offset {offset} outside this rank's {length} samples")
        self.epoch, self.offset, self._yielded, self._worker_resume = epoch, offset, 0, None
        self._resumed_epoch = None
        self.moves += 1

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the current iterator is: JSON-able, for :meth:`load_state_dict`.

        ``scope`` is ``rank`` when this object iterates the rank's whole stream (no DataLoader
        workers: ``position = offset + yielded``) and ``worker`` inside a DataLoader worker
        (torchdata's ``StatefulDataLoader`` calls this there and restores it there)."""
        wi = _worker_info()
        workers = wi.num_workers if wi is not None else 0
        return {
            "format": STATE_FORMAT,
            "dataset": self.name,
            "version": self.info.version,
            "num_rows": self.info.num_rows,
            # How often the version was rewritten (faceloop forget): a resume must match it.
            "rewrites": len(self.info.manifest.meta.get("rewritten") or []),
            # When the version was published: a store whose versions were all deleted numbers
            # its next one v1 again, with other samples.
            "created": self.info.manifest.created,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_window": self.shuffle_window,
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "world_size": self.world_size,
            "rank": self.rank,
            "drop_last": self.drop_last,
            "spans": [list(s) for s in self.spans] if self.spans is not None else None,
            "offset": self.offset,
            "yielded": self._yielded,
            "scope": "worker" if workers > 1 else "rank",
            "num_workers": workers,
            "worker": wi.id if wi is not None else 0,
        }

    def _check_same_data(self, state: dict[str, Any]) -> None:
        for key, mine in (
            ("dataset", self.name),
            ("version", self.info.version),
            ("seed", self.seed),
            ("shuffle", self.shuffle),
            ("shuffle_window", self.shuffle_window),
        ):
            if key in state and state[key] != mine:
                hint = (
                    f": open the reader with version={state[key]} (a newer version has other "
                    "samples)"
                    if key == "version"
                    else ""
                )
                raise ConfigError(
                    f"resume state is for {key}={state[key]!r}, this reader has {mine!r}{hint}"
                )
        if state.get("created") and state["created"] != self.info.manifest.created:
            raise ConfigError(
                f"resume state is for {self.name} v{self.info.version} published at "
                f"{state['created']}; the store's v{self.info.version} was published at "
                f"{self.info.manifest.created} (the versions were deleted and numbered again): "
                "its positions name other samples; start the epoch again with set_epoch(epoch)"
            )
        # The same version rewritten since (`faceloop forget`, `datasets gc` dropping forgotten
        # faces): its rows and labels moved, so the state's positions index other samples.
        rewrites = len(self.info.manifest.meta.get("rewritten") or [])
        if ("num_rows" in state and int(state["num_rows"]) != self.info.num_rows) or (
            "rewrites" in state and int(state["rewrites"]) != rewrites
        ):
            raise ConfigError(
                f"resume state is for {self.name} v{self.info.version} as it was before it was "
                f"rewritten ({state.get('num_rows')} rows, now {self.info.num_rows}: faceloop "
                "forget or datasets gc removed faces from it): its positions and labels name "
                "other samples now; start the epoch again with set_epoch(epoch) (and load the "
                "model's checkpoint as usual)"
            )
        # A state written before the option is a drop_last=False one.
        if bool(state.get("drop_last", False)) != self.drop_last:
            raise ConfigError(
                f"resume state is for drop_last={bool(state.get('drop_last', False))!r}, this "
                f"reader has {self.drop_last!r}: the ranks' slices differ"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or from :func:`merge_rank_states`' state of every
        rank, on any world size). The dataset, version, seed and shuffle must be the same; a
        rank's state needs the same world size and rank (else :class:`ConfigError`: gather every
        rank's state and use :func:`merge_rank_states`)."""
        if not isinstance(state, dict):
            raise TypeError(f"a resume state is the dict state_dict() gave, not {state!r}")
        self._check_same_data(state)
        if state.get("format") == MERGED_STATE_FORMAT:
            self._load_merged(state)
            return
        if "world_size" not in state or "rank" not in state:
            raise ConfigError(
                "resume state names no world_size/rank (written by an older reader): "
                "resume with set_epoch(epoch, offset) on the same world size"
            )
        if (state["world_size"], state["rank"]) != (self.world_size, self.rank):
            raise ConfigError(
                f"resume state is for rank {state['rank']} of world_size {state['world_size']}, "
                f"this job is rank {self.rank} of {self.world_size}: reading it would skip or "
                "repeat samples; gather every rank's state_dict() and load "
                "merge_rank_states(states) instead"
            )
        self.spans = [(int(a), int(b)) for a, b in state["spans"]] if state.get("spans") else None
        if state.get("spans") == []:
            self.spans = []
        offset, yielded = int(state["offset"]), int(state.get("yielded", 0))
        if state.get("scope", "rank") == "rank":
            self._seek(int(state["epoch"]), offset + yielded)
            self._resumed_epoch = self.epoch
            return
        # One DataLoader worker's state: only that worker, same worker count, can resume it.
        wi = _worker_info()
        workers, worker = int(state["num_workers"]), int(state["worker"])
        if wi is None:
            raise ConfigError(
                "this is one DataLoader worker's resume state: restore it through torchdata's "
                "StatefulDataLoader, or save ResumableLoader.state_dict() for a plain DataLoader"
            )
        if (wi.num_workers, wi.id) != (workers, worker) or state["batch_size"] != self.batch_size:
            raise ConfigError(
                f"worker resume state is for worker {worker} of {workers} with batch_size "
                f"{state['batch_size']}; this is worker {wi.id} of {wi.num_workers} with "
                f"batch_size {self.batch_size}"
            )
        self._seek(int(state["epoch"]), offset)
        self._worker_resume = (workers, worker, yielded)
        self._resumed_epoch = self.epoch

    def _load_merged(self, state: dict[str, Any]) -> None:
        remaining = [(int(a), int(b)) for a, b in state["remaining"]]
        n = spans_length(remaining)
        lo, hi = rank_range(n, self.rank, self.world_size, self.drop_last)
        self.spans = slice_spans(remaining, lo, hi)
        self._seek(int(state["epoch"]), 0)
        self._resumed_epoch = self.epoch

    # -- iteration -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples (``batched``: batches) this rank yields from the current position."""
        n = self.num_samples
        return -(-n // self.batch_size) if self.batched else n

    def _plan(self) -> Iterator[np.ndarray]:
        wi = _worker_info()
        worker, workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        if wi is not None:
            # A DataLoader worker iterates its own copy once per epoch, unless the loader has
            # persistent_workers=True: then set_epoch()/load_state_dict() in the main process
            # never reach the copy, and every epoch would silently repeat the first's order.
            if self._worker_last == (self.epoch, self.offset):
                raise ConfigError(
                    "this DataLoader worker is iterating the same epoch again: with "
                    "persistent_workers=True the workers keep the dataset they started with, "
                    "so set_epoch() does not reach them and every epoch would repeat the "
                    "first one's order; use persistent_workers=False (the default)"
                )
            self._worker_last = (self.epoch, self.offset)
        self._resumed_epoch = None  # being read: a later set_epoch() moves on
        skip = 0
        if self._worker_resume is not None and self._worker_resume[:2] == (workers, worker):
            skip = self._worker_resume[2]
        self._yielded = skip
        plan = iter_partition(
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
            spans=self.spans,
            drop_last=self.drop_last,
        )
        for ids in plan:
            if skip >= len(ids):
                skip -= len(ids)
                continue
            yield ids[skip:]
            skip = 0

    def iter_ids(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(global id, label, jpeg bytes)`` in this worker's order, without decoding. The
        next block's shards are read in a background thread while this one is consumed."""
        plan = self._plan()
        pool = (
            ThreadPoolExecutor(1, thread_name_prefix="faceloop-shards") if self.prefetch else None
        )
        loading: dict[int, Future[_Shard]] = {}

        def start(ids: np.ndarray | None) -> list[int]:
            if ids is None:
                return []
            need = np.unique(np.searchsorted(self._starts, ids, side="right") - 1).tolist()
            if pool is not None:
                for s in need:
                    if s not in loading:
                        loading[s] = pool.submit(self._load, s)
            return need

        try:
            nxt = next(plan, None)
            while nxt is not None:
                ids = nxt
                need = start(ids)
                nxt = next(plan, None)
                ahead = start(nxt)
                # One block in memory per worker, plus the next one being read.
                shards = {s: loading[s].result() if s in loading else self._load(s) for s in need}
                for s in list(loading):
                    if s not in ahead:
                        del loading[s]
                shard_idx = np.searchsorted(self._starts, ids, side="right") - 1
                for gid, s in zip(ids.tolist(), shard_idx.tolist(), strict=False):
                    shard = shards[s]
                    row = gid - int(self._starts[s])
                    yield gid, int(shard.labels[row]), shard.jpeg(row)
        finally:
            # Wait for a read already running (at most one block's shards): a thread left in
            # pyarrow past this point can outlive the interpreter and abort the process at exit
            # ("terminate called without an active exception", seen once in a bench child).
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, s: int) -> _Shard:
        t0 = time.perf_counter()
        info = self.info.shards[s]
        if self.info.label_ids is not None:
            t = read_shard_table(
                self.info,
                info,
                verify=self.verify,
                cache=self.cache,
                columns=("identity_id", "image"),
            )
            shard = _Shard(t, self.info.labels_of(t.column("identity_id")))
        else:
            shard = _Shard(read_shard_table(self.info, info, verify=self.verify, cache=self.cache))
        bad = (shard.labels < 0) | (shard.labels >= max(self.info.num_classes, 1))
        if self.info.num_classes and bad.any():
            raise StorageError(f"{info.file}: labels outside 0..{self.info.num_classes - 1}")
        log.debug("read shard %s in %.3fs", info.file, time.perf_counter() - t0)
        return shard

    def iter_samples(self) -> Iterator[tuple[np.ndarray, int]]:
        """``(float32 (3, 112, 112) array, label)`` in this worker's order; counts for
        :meth:`state_dict`."""
        for _, label, jpeg in self.iter_ids():
            img = decode_image(jpeg)
            if self.transform is not None:
                img = self.transform(img)
            self._yielded += 1
            yield img, label

    def iter_batches(
        self, alloc: Callable[[int], np.ndarray] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of ``batch_size`` (the last one shorter) of this worker's stream, decoded
        straight into one ``(B, 3, 112, 112)`` float32 array (``alloc(B)`` makes it)."""
        bs = self.batch_size
        make = alloc or (lambda n: np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
        buf: np.ndarray | None = None
        labels = np.empty(bs, np.int64)
        n = 0
        for _, label, jpeg in self.iter_ids():
            if buf is None:
                buf, labels, n = make(bs), np.empty(bs, np.int64), 0
            decode_into(jpeg, buf[n])
            if self.transform is not None:
                buf[n] = self.transform(buf[n])
            labels[n] = label
            n += 1
            if n == bs:
                self._yielded += n
                yield buf, labels
                buf = None
        if buf is not None and n:
            self._yielded += n
            yield buf[:n], labels[:n]

    def __iter__(self) -> Iterator[Any]:
        return self.iter_batches() if self.batched else self.iter_samples()


def merge_rank_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state for the whole job from every rank's :meth:`FaceShardReader.state_dict` (each
    of ``scope`` rank: no workers, or :class:`ResumableLoader`'s), loadable on any world size:
    each new rank takes an equal contiguous share of the samples no old rank had consumed, so
    every remaining sample of the epoch is read exactly once."""
    if not states:
        raise ConfigError("no rank states to merge")
    first = states[0]
    world = int(first["world_size"])
    ranks = sorted(int(s["rank"]) for s in states)
    if ranks != list(range(world)):
        raise ConfigError(f"need the state of every rank 0..{world - 1}, got ranks {ranks}")
    remaining: list[tuple[int, int]] = []
    for s in states:
        for key in (
            "dataset",
            "version",
            "seed",
            "shuffle",
            "shuffle_window",
            "epoch",
            "drop_last",
            "num_rows",
            "rewrites",
            "created",
        ):
            if s.get(key) != first.get(key):
                raise ConfigError(f"rank states disagree on {key}")
        if int(s["world_size"]) != world:
            raise ConfigError("rank states disagree on world_size")
        if s.get("scope") != "rank":
            raise ConfigError(
                "a DataLoader worker's state cannot be merged: save ResumableLoader.state_dict()"
            )
        stream = rank_spans(
            int(s["num_rows"]),
            int(s["rank"]),
            world,
            s.get("spans"),
            bool(s.get("drop_last", False)),
        )
        done = int(s["offset"]) + int(s["yielded"])
        remaining += slice_spans(stream, done, spans_length(stream))
    merged = rank_spans(int(first["num_rows"]), 0, 1, remaining)  # sorted, disjoint: checked
    return {
        "format": MERGED_STATE_FORMAT,
        **{
            k: first.get(k)
            for k in ("dataset", "version", "num_rows", "seed", "shuffle", "drop_last")
        },
        **({"rewrites": first["rewrites"]} if "rewrites" in first else {}),
        **({"created": first["created"]} if first.get("created") else {}),
        "shuffle_window": first.get("shuffle_window"),
        "epoch": int(first["epoch"]),
        "remaining": [list(s) for s in merged],
    }


class ResumableLoader:
    """A plain ``torch.utils.data.DataLoader`` over a reader that knows where it is: it counts
    the samples it delivered, so :meth:`state_dict` is exact with any number of workers (which
    the main process's dataset object cannot see). ``batch_size`` is the dataset's (``None``
    for a ``batched`` dataset); other keyword arguments go to the DataLoader.

    ``state_dict()``/``load_state_dict()`` speak the dataset's state format (scope ``rank``),
    so a state saved here also resumes a loop without workers, and the states of all ranks
    merge with :func:`merge_rank_states`."""

    def __init__(self, dataset: FaceShardReader, **loader_kwargs: Any) -> None:
        if "batch_size" in loader_kwargs:
            raise TypeError(
                "ResumableLoader takes the dataset's batch_size: pass batch_size= to "
                "FaceShardDataset"
            )
        self.dataset = dataset
        self.kwargs = loader_kwargs
        self._start = dataset.offset
        self._delivered = 0
        self._moves = dataset.moves  # the dataset position the counts are from

    def __iter__(self) -> Iterator[Any]:
        from torch.utils.data import DataLoader

        ds = self.dataset
        self._start, self._delivered, self._moves = ds.offset, 0, ds.moves
        bs = None if ds.batched else ds.batch_size
        for batch in DataLoader(ds, batch_size=bs, **self.kwargs):  # type: ignore[arg-type]
            self._delivered += len(batch[1])
            yield batch

    def __len__(self) -> int:
        return -(-self.dataset.num_samples // self.dataset.batch_size)

    def state_dict(self) -> dict[str, Any]:
        state = self.dataset.state_dict()
        if self.dataset.moves != self._moves:
            # set_epoch()/load_state_dict() since the last iteration: nothing delivered there
            # yet (the counts were the previous epoch's).
            self._start, self._delivered, self._moves = self.dataset.offset, 0, self.dataset.moves
        state.update(
            offset=self._start,
            yielded=self._delivered,
            scope="rank",
            num_workers=int(self.kwargs.get("num_workers", 0)),
            worker=0,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self._start, self._delivered, self._moves = self.dataset.offset, 0, self.dataset.moves


# ---------------------------------------------------------------------------------------------
# The torch face of the reader, built on first use so that importing this module imports no
# torch (a training image brings its own; a torch-less job uses FaceShardReader).

_TORCH_CLASS: type[FaceShardReader] | None = None


def _torch_dataset_class() -> type[FaceShardReader]:
    global _TORCH_CLASS
    if _TORCH_CLASS is not None:
        return _TORCH_CLASS
    import torch
    from torch.utils.data import IterableDataset as _Iterable

    def _alloc(n: int) -> np.ndarray:
        t = torch.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
        if _worker_info() is not None:  # straight into shared memory: no copy to the parent
            t = t.share_memory_()
        return t.numpy()

    class FaceShardDataset(FaceShardReader, _Iterable):
        __doc__ = (
            "A :class:`FaceShardReader` that is a ``torch.utils.data.IterableDataset``: yields "
            "``(float32 (3, 112, 112) tensor, int label)``, or with ``batched=True`` "
            "``((B, 3, 112, 112) tensor, (B,) int64 tensor)``.\n\n"
            + (FaceShardReader.__doc__ or "")
        )

        def __iter__(self) -> Iterator[Any]:
            if self.batched:
                for x, y in self.iter_batches(_alloc):
                    yield torch.from_numpy(x), torch.from_numpy(y)
            else:
                for img, label in self.iter_samples():
                    yield torch.from_numpy(np.ascontiguousarray(img)), label

    FaceShardDataset.__module__ = __name__
    FaceShardDataset.__qualname__ = "FaceShardDataset"
    _TORCH_CLASS = FaceShardDataset
    return FaceShardDataset


if TYPE_CHECKING:

    class FaceShardDataset(FaceShardReader, IterableDataset[Any]):
        def __iter__(self) -> Iterator[Any]: ...

    _ = torch
else:

    def __getattr__(name: str) -> Any:
        """``FaceShardDataset``: the torch class, built on first use (the torch-free
        :class:`FaceShardReader` where torch is not installed)."""
        if name == "FaceShardDataset":
            try:
                return _torch_dataset_class()
            except ModuleNotFoundError as exc:
                if exc.name != "torch":
                    raise
                # torch is not installed: the torch-free reader (the same samples, as numpy).
                # A torch that is installed but fails to import (a broken CUDA build) raises.
                return FaceShardReader
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
