"""Immutable, atomically published dataset versions (layout in docs/DESIGN.md).

``datasets/<name>/v<N>/`` holds ``classes.parquet`` (label, identity_id, count),
``changes.parquet`` (face_id, change, old_identity_id, new_identity_id) and, written **last**,
``manifest.json``. The shards (SHARD_SCHEMA) live in the dataset's pool,
``datasets/<name>/shards/<sha256>.parquet``, named by the sha256 of their bytes and shared by
every version whose manifest lists them. ``latest`` holds ``v<N>`` and is moved only after that
manifest is complete. (Format /1 versions, written before the pool, keep their shards in
``v<N>/shards/part-<i>.parquet`` with the label inside; they still read, verify and gc.)

Rules (what readers and writers may rely on):

- **Visibility.** A version exists iff ``v<N>/manifest.json`` exists. :func:`list_versions`,
  :func:`read_manifest`, :func:`read_shards` never look at a directory without one.
- **Numbering.** A new version gets ``N = newest visible + 1`` (1 for the first), so visible
  numbers have no gaps made by crashes. Its parent is that newest visible version.
- **Half-written directories.** A writer keeps ``v<N>/_writing.json`` (writer id, heartbeat time,
  state) up to date after every shard. A writer whose ``with`` block raises (an error, Ctrl-C,
  SIGTERM) removes its directory and the pool shards it uploaded for it; where it cannot (the
  store unreachable) it marks the directory ``aborted``. When the next writer finds ``v<N>``
  already there without a manifest (a writer killed, or one that could not clean up), it
  *replaces* it (deletes it and starts over) if the marker is missing, says ``aborted``, or
  its heartbeat is older than ``stale_after_s``
  (default 15 min: a writer that has not finished a shard for that long is dead). A fresh marker
  means another writer is live: :class:`ConcurrentWriteError`, nothing is touched. Before
  committing, a writer checks the marker is still its own, so a writer that was wrongly
  presumed dead cannot overwrite its successor.
- **gc.** :func:`gc` removes half-written directories that are below the newest visible version
  (no writer ever resumes a lower number) or whose marker is missing/aborted/stale; the newest
  live in-progress one is kept. It never touches committed versions.
- **Labels.** ``label`` is contiguous ``0..C-1`` within a version, assigned in ``identity_id``
  order; every label has at least one row. It is the row of the face's ``identity_id`` in the
  version's ``classes.parquet``, looked up when reading (storage/dataset.py): a shard holds
  ``identity_id`` and a null ``label``, so one shard serves every version whatever its classes.
- **Reuse.** A new version lists its parent's shards whose every row is still published with
  the same identity, unchanged, and writes new shards only for the rest: faces added,
  relabelled, and the surviving rows of shards that lost or relabelled a face (plus, once more
  than :data:`MAX_SMALL_SHARDS` shards are under half full, those small shards, merged). Bytes
  written are proportional to the change, not to the dataset. Every face is in exactly one
  shard of a version (checked at commit).
- **Shared shards and gc.** A version directory never holds shards, so removing a version
  (retention) removes no shard; :func:`sweep_pool` deletes the pool shards no committed
  version lists and no live writer (its marker lists the shards it wrote or reuses) is
  holding. A shard is never rewritten in place: its name is its content.

One publisher per dataset at a time is the intended use (the flow serialises publishes); the
marker makes accidental concurrency fail loudly instead of corrupting a version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from faceloop.crashpoints import crash_point
from faceloop.errors import StorageError
from faceloop.schema import SHARD_SCHEMA
from storage import layout
from storage.keys import KeyIndex
from storage.layout import LATEST, MANIFEST, MARKER
from storage.manifest import (
    FORMAT,
    FORMAT_V3,
    Manifest,
    ShardInfo,
    check_name,
    deletions_table,
    held_rows,
    latest_version,
    list_versions,
    newest_version,
    parse_deletions,
    pointed_version,
    version_dirs,
)
from storage.objectstore import ObjectStore, conform, read_parquet_bytes, temp_dir_prefix

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "MARKER",
    "MAX_DELETED_SHARE",
    "ConcurrentWriteError",
    "DatasetWriter",
    "Manifest",
    "class_index",
    "diff_assignments",
    "gc",
    "iter_shards",
    "latest_version",
    "list_versions",
    "load_manifest",
    "newest_version",
    "read_deletions",
    "read_manifest",
    "read_shards",
    "read_table",
    "same_assignment",
    "shard_keys",
    "sweep_pool",
    "verify_version",
    "version_prefix",
    "write_pool_shard",
]

STALE_AFTER_S = 15 * 60
# Shards under half of shard_rows a version may keep from its parent before they are merged.
MAX_SMALL_SHARDS = 8
# Default share of a reused shard's rows a version may delete (deletion vector) before the
# shard's surviving rows are written again instead (settings: dataset.max_deleted_share).
MAX_DELETED_SHARE = 0.25

CLASSES_SCHEMA = pa.schema(
    [("label", pa.int64()), ("identity_id", pa.string()), ("count", pa.int64())]
)
CHANGES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("change", pa.string()),  # added | removed | relabelled
        ("old_identity_id", pa.string()),
        ("new_identity_id", pa.string()),
    ]
)


class ConcurrentWriteError(StorageError):
    """Another writer is (or was, recently) writing the version this one needs."""


class ManifestUnreadable(StorageError):
    """A committed version's ``manifest.json`` that does not parse (damaged, cut short)."""


def _ds(name: str) -> str:
    return layout.dataset_dir(check_name(name))


def version_prefix(name: str, version: int) -> str:
    return layout.version_dir(check_name(name), version)


def _now() -> datetime:
    return datetime.now(UTC)


def _resolve(store: ObjectStore, name: str, version: int | str) -> int:
    if version == "latest":
        v = latest_version(store, name)
        if v is None:
            raise FileNotFoundError(f"dataset {name!r} has no version")
        return v
    if isinstance(version, str):
        version = int(version.lstrip("v"))
    return int(version)


def load_manifest(store: ObjectStore, name: str, version: int | str = "latest") -> Manifest:
    """The manifest of a committed version (``int``, ``"v3"``, ``"3"`` or ``"latest"``).
    FileNotFoundError if it is not committed."""
    v = _resolve(store, name, version)
    rel = f"{version_prefix(name, v)}/{MANIFEST}"
    data = store.read_bytes(rel)
    try:
        return Manifest.from_json(data, name, v)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestUnreadable(
            f"{store.uri(rel)}: unreadable ({type(exc).__name__}: {exc}); the version cannot be "
            f"read: restore it from a backup, or remove its folder "
            f"({store.uri(version_prefix(name, v))}) to drop it (its number is not used again)"
        ) from None


def read_manifest(store: ObjectStore, name: str, version: int | str = "latest") -> dict[str, Any]:
    """:func:`load_manifest` as the JSON object stored."""
    return load_manifest(store, name, version).to_dict()


def iter_shards(
    store: ObjectStore, name: str, version: int | str = "latest", columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The rows of a committed version, one shard at a time, in manifest order. ``label`` (when
    asked for) is the version's: a pooled version's shards store none, it is looked up in the
    version's classes.parquet by ``identity_id``."""
    manifest = load_manifest(store, name, version)
    want_label = manifest.pooled and (columns is None or "label" in columns)
    read_cols = columns
    identities: pa.Array | None = None
    if want_label:
        identities = read_table(store, name, manifest.version, "classes").column("identity_id")
        if columns is not None and "identity_id" not in columns:
            read_cols = [*columns, "identity_id"]
    deleted = read_deletions(store, manifest)
    for shard in manifest.shards:
        rel = manifest.shard_rel(shard)
        t = held_rows(
            store.read_parquet_file(rel, columns=read_cols)
            if read_cols is None or "image" in read_cols
            else store.read_parquet_columns(rel, read_cols),  # not the crops' bytes
            deleted.get(shard.sha256),
        )
        if identities is not None:
            lab = pc.index_in(t.column("identity_id"), value_set=identities).cast(pa.int64())
            i = t.schema.get_field_index("label")
            t = t.set_column(i, "label", lab) if i >= 0 else t.append_column("label", lab)
            if columns is not None:
                t = t.select(columns)
        yield t


def read_deletions(store: ObjectStore, manifest: Manifest) -> dict[str, np.ndarray]:
    """shard sha256 -> positions of its rows the version does not hold (/3; ``{}`` else)."""
    entry = manifest.deletions
    data = (
        store.read_bytes(f"{version_prefix(manifest.name, manifest.version)}/{entry['file']}")
        if entry
        else None
    )
    try:
        return parse_deletions(manifest, data)
    except ValueError as exc:
        raise StorageError(f"dataset {manifest.name} v{manifest.version}: {exc}") from None


def shard_keys(
    store: ObjectStore, name: str, version: int | str
) -> list[tuple[ShardInfo, pa.Table]]:
    """Each shard of a committed version with the ``(face_id, identity_id, _row)`` of the
    rows the version holds (``_row``: the row's position in the shard file)."""
    manifest = load_manifest(store, name, version)
    deleted = read_deletions(store, manifest)
    schema = pa.schema([SHARD_SCHEMA.field("face_id"), SHARD_SCHEMA.field("identity_id")])
    out = []
    for shard in manifest.shards:
        # Only the keys' bytes: the crops are nearly all of a shard's (at 10^6 faces reading
        # every shard whole was 1.3 s of a 5 s publish).
        rel = manifest.shard_rel(shard)
        try:
            cols = store.read_parquet_columns(rel, ["face_id", "identity_id"])
        except FileNotFoundError as exc:
            # (A publish reads its parent's shards: every refresh failed on a bare
            # FileNotFoundError, naming neither the version nor what to do.)
            raise StorageError(
                f"{store.uri(rel)}: a shard of {name} v{manifest.version} is missing from the "
                "store, though the version is committed and lists it: the store is damaged "
                f"(`faceloop datasets verify {manifest.version} --name {name}` lists every missing "
                "file); "
                "restore the file from a backup of the store, then run again"
            ) from exc
        keys = conform(cols, schema)
        keys = keys.append_column("_row", pa.array(np.arange(keys.num_rows, dtype=np.int32)))
        out.append((shard, held_rows(keys, deleted.get(shard.sha256))))
    return out


def read_shards(
    store: ObjectStore, name: str, version: int | str = "latest", columns: list[str] | None = None
) -> pa.Table:
    schema = (
        SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    )
    parts = [conform(t, schema) for t in iter_shards(store, name, version, columns)]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def read_table(
    store: ObjectStore, name: str, version: int | str, which: Literal["classes", "changes"]
) -> pa.Table:
    manifest = load_manifest(store, name, version)
    entry = manifest.classes if which == "classes" else manifest.changes
    if entry is None:
        raise KeyError(which)
    return store.read_parquet_file(f"{version_prefix(name, manifest.version)}/{entry['file']}")


# --------------------------------------------------------------------------------------------
# Labels and changes (pure Arrow)


def class_index(identity_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Sorted distinct non-null identity ids: position i is label i."""
    uniq = pc.unique(pc.drop_null(identity_ids))
    if isinstance(uniq, pa.ChunkedArray):
        uniq = uniq.combine_chunks()
    return pc.take(uniq, pc.sort_indices(uniq)).cast(pa.string())


def same_assignment(old: pa.Table, new: pa.Table, old_in_new: np.ndarray) -> np.ndarray:
    """Per row of ``old``: whether ``new`` holds its face (``old_in_new``, as
    :func:`diff_assignments` takes it) with the same identity."""
    found = old_in_new >= 0
    now = pc.take(new.column("identity_id").cast(pa.string()), pa.array(old_in_new, mask=~found))
    same = pc.fill_null(pc.equal(old.column("identity_id").cast(pa.string()), now), False)
    return found & np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)


def diff_assignments(
    old: pa.Table,
    new: pa.Table,
    old_in_new: np.ndarray | None = None,
    same: np.ndarray | None = None,
) -> pa.Table:
    """Changes from ``old`` to ``new`` (each: face_id, identity_id; face_id unique), sorted by
    face_id: ``added`` (only in new), ``removed`` (only in old), ``relabelled`` (identity
    differs). CHANGES_SCHEMA. ``old_in_new``: the row of ``new`` holding each old face (-1:
    none), when the caller has looked them up (a :class:`storage.keys.KeyIndex` of new);
    ``same``: :func:`same_assignment` of them, when the caller has it too (then only the
    changed rows' identities are taken: at 10^6 faces two dataset-sized takes fewer).

    One sorted-key lookup of the old faces in the new ones (a full outer join of two
    dataset-sized key tables held about five times their size at 10^6 faces, a hash lookup
    150-210 MB of memo tables)."""

    # The columns stay as chunked as they come: combining a dataset's keys into one array
    # copied them all.
    o_fid, o_id = (
        old.column("face_id").cast(pa.string()),
        old.column("identity_id").cast(pa.string()),
    )
    n_fid, n_id = (
        new.column("face_id").cast(pa.string()),
        new.column("identity_id").cast(pa.string()),
    )
    pos = old_in_new if old_in_new is not None else KeyIndex(n_fid).lookup(o_fid)
    in_new = pos >= 0
    at = pos[in_new]
    if same is None:
        same = same_assignment(old, new, pos)
    changed = ~same[in_new]  # per old face found in new: relabelled
    relab_old = pa.array(np.flatnonzero(in_new)[changed])
    relab_new = pa.array(at[changed])
    hit = np.zeros(len(n_fid), dtype=bool)
    hit[at] = True
    removed = pa.array(np.flatnonzero(~in_new))
    added = pa.array(np.flatnonzero(~hit))
    parts = [
        pa.table(
            {
                "face_id": n_fid.take(added),
                "change": pa.array(["added"] * len(added), pa.string()),
                "old_identity_id": pa.nulls(len(added), pa.string()),
                "new_identity_id": n_id.take(added),
            }
        ),
        pa.table(
            {
                "face_id": o_fid.take(removed),
                "change": pa.array(["removed"] * len(removed), pa.string()),
                "old_identity_id": o_id.take(removed),
                "new_identity_id": pa.nulls(len(removed), pa.string()),
            }
        ),
        pa.table(
            {
                "face_id": o_fid.take(relab_old),
                "change": pa.array(["relabelled"] * len(relab_old), pa.string()),
                "old_identity_id": o_id.take(relab_old),
                "new_identity_id": n_id.take(relab_new),
            }
        ),
    ]
    out = pa.concat_tables(parts)
    return conform(out.sort_by("face_id"), CHANGES_SCHEMA)


# --------------------------------------------------------------------------------------------
# Writer


class _HashingFile:
    """File-like sink that hashes and counts bytes as Parquet writes them."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.n, self.closed = f, hashlib.sha256(), 0, False

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.h.update(data)
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.n

    def close(self) -> None:
        self.closed = True


class DatasetWriter:
    """Write one new version: ``with DatasetWriter(store, name, shard_rows, meta, identities=...)
    as w: w.write(batch)``.

    Rows need ``face_id``, ``identity_id``, ``image`` and may carry ``quality``,
    ``source_kind``; every identity_id must be in ``identities`` and every identity must get at
    least one row (written or reused); the label is the identity's position there, stored in
    ``classes.parquet`` only. Rows are buffered up to ``shard_rows``, then written as one shard
    through a local spool file, hashed while written and uploaded to the pool under its sha256
    (not at all when the pool holds it already). :meth:`reuse` lists a parent's shard as it is.
    On a clean exit it writes classes, changes, the manifest, then moves ``latest``. If the
    block raises, the version stays invisible: its directory and the shards uploaded for it
    are removed (marker set to ``aborted`` where they cannot be).

    ``changes``: precomputed CHANGES_SCHEMA table (as :func:`diff_assignments` makes it); when
    None the writer keeps (face_id, identity_id) of the written rows and diffs against the
    parent at the end. ``parent``: ``"auto"`` = newest committed version; an explicit value must
    still be the newest when the writer starts, else ConcurrentWriteError.
    ``meta`` (run_id, config_hash, models, ...) is copied into the manifest.
    """

    def __init__(
        self,
        store: ObjectStore,
        name: str,
        shard_rows: int = 5000,
        meta: dict[str, Any] | None = None,
        *,
        identities: pa.Array | pa.ChunkedArray | list[str],
        changes: pa.Table | None = None,
        parent: int | Literal["auto"] | None = "auto",
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.store, self.name, self.shard_rows = store, name, shard_rows
        self.meta = dict(meta or {})
        self.identities = class_index(
            pa.array(identities, pa.string()) if isinstance(identities, list) else identities
        )
        self.changes = conform(changes, CHANGES_SCHEMA) if changes is not None else None
        self._want_parent = parent
        self.stale_after_s = stale_after_s
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.version: int | None = None
        self.parent: int | None = None
        self.num_rows = 0
        self.manifest: dict[str, Any] | None = None
        self._counts = np.zeros(len(self.identities), dtype=np.int64)
        # Identities of reused shards, counted together at commit: one class-list lookup per
        # reused shard rebuilt its hash table each time (0.6 s for 165 shards of 10^6 faces).
        self._uncounted: list[pa.Array] = []
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[ShardInfo] = []
        self._keys: list[pa.Table] = []  # (face_id, identity_id) when changes must be computed
        self._deleted: dict[str, np.ndarray] = {}  # reused shard sha256 -> rows not held
        self._reused: set[str] = set()
        self._uploaded: list[str] = []  # pool shards this version put there (none listed them)
        self.bytes_written = 0  # shard bytes uploaded (a reused or already pooled shard: 0)
        self.rows_reused = 0
        self.shards_reused = 0
        self._created = _now()
        self._spool: tempfile.TemporaryDirectory[str] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> DatasetWriter:
        self._claim()
        self._spool = tempfile.TemporaryDirectory(prefix=temp_dir_prefix("shard"))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                try:
                    self._commit()
                except BaseException as commit_exc:
                    self._abort(type(commit_exc))
                    raise
            else:
                self._abort(exc_type)
        finally:
            if self._spool is not None:
                self._spool.cleanup()

    def _abort(self, exc_type: type[BaseException]) -> None:
        committed = False
        with contextlib.suppress(Exception):
            committed = self.version is not None and self.store.exists(f"{self.prefix}/{MANIFEST}")
        # A publish stopped by Ctrl-C or SIGTERM (or failed) left its directory, marked
        # aborted, until the next writer's recovery or `datasets gc`: `faceloop doctor`
        # reported a half-written version in between.
        removed = not committed and self._remove_own()
        log.warning(
            "dataset %s v%s: aborted (%s); %s",
            self.name,
            self.version,
            exc_type.__name__,
            # (a failure after the manifest, moving `latest`: the version is there, and the
            # next writer, `datasets gc` or refresh, points `latest` at it)
            "its manifest is written: the next refresh or `datasets gc` finishes the commit"
            if committed
            else "its half-written directory is removed"
            if removed
            else "the version stays invisible; the next refresh or `datasets gc` removes it",
        )
        if committed or removed:
            return
        # Tell the next writer at once that this directory is dead (no need to wait until stale),
        # unless another writer has taken the directory over meanwhile.
        with contextlib.suppress(Exception):
            if self._still_own():
                self._write_marker("aborted")

    def _still_own(self) -> bool:
        """Whether this writer's directory is still its own and uncommitted."""
        marker = json.loads(self.store.read_bytes(f"{self.prefix}/{MARKER}"))
        return marker.get("writer") == self.writer_id and not self.store.exists(
            f"{self.prefix}/{MANIFEST}"
        )

    def _remove_own(self) -> bool:
        """Remove this aborted writer's directory and the pool shards it uploaded (no other
        version lists those: the pool did not hold them), shards first, so that what an
        interrupted removal leaves is still a marked directory that recovery sweeps. Nothing
        when another writer has taken the directory over. Whether it is gone."""
        if self.version is None:
            return False
        try:
            if not self._still_own():
                return False
            for file in self._uploaded:
                self.store.delete(f"{_ds(self.name)}/{file}")
            self.store.delete_prefix(self.prefix)
        except Exception:  # the store unreachable: the aborted marker, if it can be written
            return False
        return True

    @property
    def rows_added(self) -> int:
        """Rows passed to :meth:`write` so far (written to shards or still buffered)."""
        return self.num_rows - self.rows_reused + self._pending_rows

    def reuse(self, shard: ShardInfo, keys: pa.Table, deleted: np.ndarray | None = None) -> None:
        """List a pooled shard of the parent; ``keys`` are the (face_id, identity_id) of the
        rows this version holds (their identities are counted like written rows) and
        ``deleted`` the positions in the shard file of the rows it does not hold (a deletion
        vector: the parent's own and any new ones; the version is then written as /3)."""
        if self.version is None:
            raise RuntimeError("DatasetWriter.reuse outside its with-block")
        gone = (
            np.unique(np.asarray(deleted, np.int64))
            if deleted is not None
            else np.zeros(0, np.int64)
        )
        if len(gone) and (gone[0] < 0 or gone[-1] >= shard.rows):
            raise ValueError(f"{shard.file}: deleted rows outside 0..{shard.rows - 1}")
        if keys.num_rows != shard.rows - len(gone):
            raise ValueError(
                f"{shard.file}: {keys.num_rows} keys for {shard.rows} rows less {len(gone)} deleted"
            )
        if shard.sha256 in self._reused:
            raise ValueError(f"{shard.file}: listed twice")
        self._reused.add(shard.sha256)
        shard = dataclasses.replace(shard, deleted=len(gone))
        if len(gone):
            self._deleted[shard.sha256] = gone
        ids = keys.column("identity_id")
        self._uncounted.append(ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)
        if self.changes is None:
            self._keys.append(keys.select(["face_id", "identity_id"]))
        self._shards.append(shard)
        self.num_rows += shard.live_rows
        self.rows_reused += shard.live_rows
        self.shards_reused += 1

    @property
    def prefix(self) -> str:
        assert self.version is not None
        return version_prefix(self.name, self.version)

    def _claim(self) -> None:
        dirs = version_dirs(self.store, self.name)
        committed = sorted(v for v, f in dirs.items() if MANIFEST in f)
        newest = committed[-1] if committed else None
        if self._want_parent != "auto" and self._want_parent != newest:
            raise ConcurrentWriteError(
                f"dataset {self.name}: parent v{self._want_parent} is no longer the newest "
                f"(v{newest})"
            )
        self.parent = newest
        # Never a number a training job may have pinned: a committed version removed by hand
        # (a corrupt one, as its error says) left `latest` naming it, and the next publish
        # wrote another v2 under the same number.
        self.version = max(newest or 0, pointed_version(self.store, self.name) or 0) + 1
        if self.version in dirs:
            state = _marker_state(self.store, self.prefix, dirs[self.version], self.stale_after_s)
            if state == "live":
                raise ConcurrentWriteError(
                    f"{self.store.uri(self.prefix)} is being written by another writer"
                )
            log.warning("replacing half-written %s (%s)", self.store.uri(self.prefix), state)
            self.store.delete_prefix(self.prefix)
        self._write_marker("writing")
        log.info("dataset %s: writing v%d (parent %s)", self.name, self.version, self.parent)

    def _write_marker(self, state: str) -> None:
        body = {
            "writer": self.writer_id,
            "state": state,
            "heartbeat": _now().isoformat(),
            "created": self._created.isoformat(),
            # Pool shards this version will list: sweep_pool keeps them while the writer lives.
            "shards": [sh.file for sh in self._shards],
        }
        self.store.write_bytes(f"{self.prefix}/{MARKER}", json.dumps(body).encode())

    # -- rows ----------------------------------------------------------------------------------

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        """Add rows; writes every full shard at once."""
        if self.version is None:
            raise RuntimeError("DatasetWriter.write outside its with-block")
        table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
        if table.num_rows == 0:
            return
        table = self._labelled(table)
        if self.changes is None:
            self._keys.append(table.select(["face_id", "identity_id"]))
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _count(
        self, identity_ids: pa.Array | pa.ChunkedArray, weights: np.ndarray | None = None
    ) -> None:
        """Count rows per class (``weights``: rows per entry of ``identity_ids``, else one
        each); ValueError for an identity not in the class list."""
        ids = identity_ids.cast(pa.string())
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        labels = pc.index_in(ids, value_set=self.identities)
        if labels.null_count:
            bad = pc.filter(ids, pc.is_null(labels))[:3].to_pylist()
            raise ValueError(f"identity_id not in the class list (or null): {bad}")
        at = labels.to_numpy().astype(np.int64)
        if weights is None:
            # One pass (a sort of every row's label took ~0.05 s of a 10^6-face publish).
            self._counts += np.bincount(at, minlength=len(self._counts))
        else:
            np.add.at(self._counts, at, weights)

    def _labelled(self, table: pa.Table) -> pa.Table:
        """Rows checked and counted; ``label`` null: a shard serves versions with other
        class lists, the label comes from the version's classes.parquet."""
        self._count(table.column("identity_id"))
        out = table.drop_columns([c for c in ("label",) if c in table.column_names])
        return conform(out, SHARD_SCHEMA)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        shard, rest = table.slice(0, rows), table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._write_shard(shard)

    def _write_shard(self, shard: pa.Table) -> None:
        assert self._spool is not None
        info, uploaded = write_pool_shard(self.store, self.name, shard, self._spool.name)
        self._add_shard(info, uploaded)

    def adopt(self, shard: ShardInfo, identity_counts: dict[str, int], uploaded: int) -> None:
        """List a shard that another process wrote into the pool for this version
        (:func:`write_pool_shard`, e.g. a Ray task of the publish's write pass): its rows
        count as written; ``identity_counts`` its rows per identity_id, ``uploaded`` the bytes
        that process put into the pool (0 when the pool held the shard already)."""
        if self.version is None:
            raise RuntimeError("DatasetWriter.adopt outside its with-block")
        if sum(identity_counts.values()) != shard.rows:
            raise ValueError(f"{shard.file}: identity counts do not add up to {shard.rows} rows")
        self._count(
            pa.array(list(identity_counts), pa.string()),
            np.fromiter(identity_counts.values(), np.int64, len(identity_counts)),
        )
        self._add_shard(shard, uploaded)

    def _add_shard(self, info: ShardInfo, uploaded: int) -> None:
        index = len(self._shards)
        self._shards.append(info)
        self.num_rows += info.rows
        self.bytes_written += uploaded
        if uploaded:
            self._uploaded.append(info.file)
        self._write_marker("writing")  # heartbeat: proves this writer alive to the next one
        crash_point("publish")  # tests only (faceloop/crashpoints.py)
        log.debug(
            "dataset %s v%d: shard %d, %d rows, %d bytes",
            self.name,
            self.version,
            index,
            info.rows,
            info.bytes,
        )

    # -- commit --------------------------------------------------------------------------------

    def _commit(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._uncounted:
            self._count(pa.concat_arrays([a.cast(pa.string()) for a in self._uncounted]))
            self._uncounted = []
        empty = np.flatnonzero(self._counts == 0)
        if len(empty):
            raise ValueError(
                f"{len(empty)} identities have no rows, e.g. {self.identities[int(empty[0])]}"
            )
        classes = pa.table(
            {
                "label": pa.array(np.arange(len(self.identities)), pa.int64()),
                "identity_id": self.identities,
                "count": pa.array(self._counts, pa.int64()),
            },
            schema=CLASSES_SCHEMA,
        )
        changes = self.changes
        if changes is None:
            keys = (
                pa.concat_tables(self._keys)
                if self._keys
                else pa.table(
                    {"face_id": pa.array([], pa.string()), "identity_id": pa.array([], pa.string())}
                )
            )
            if pc.count_distinct(keys.column("face_id")).as_py() != keys.num_rows:
                raise ValueError("duplicate face_id in dataset rows")
            old = (
                read_shards(self.store, self.name, self.parent, ["face_id", "identity_id"])
                if self.parent is not None
                else keys.schema.empty_table()
            )
            changes = diff_assignments(old, keys)
        counts = {k: 0 for k in ("added", "removed", "relabelled")}
        for row in changes.group_by("change").aggregate([("face_id", "count")]).to_pylist():
            counts[row["change"]] = row["face_id_count"]
        classes_entry = self._put_small(layout.CLASSES, classes)
        changes_entry = self._put_small(layout.CHANGES, changes)
        deletions_entry = None
        if self._deleted:
            table = deletions_table(self._deleted)
            deletions_entry = {
                **self._put_small(layout.DELETIONS, table),
                "rows": table.num_rows,
            }

        # Last checks before the commit marker: nobody committed this number or took our dir.
        marker = json.loads(self.store.read_bytes(f"{self.prefix}/{MARKER}"))
        if marker.get("writer") != self.writer_id or self.store.exists(f"{self.prefix}/{MANIFEST}"):
            raise ConcurrentWriteError(
                f"{self.store.uri(self.prefix)} was taken over by another writer"
            )
        assert self.version is not None
        manifest = Manifest(
            run_id=self.meta.get("run_id"),
            config_hash=self.meta.get("config_hash"),
            models=self.meta.get("models", []),
            meta={
                k: v for k, v in self.meta.items() if k not in ("run_id", "config_hash", "models")
            },
            format=FORMAT_V3 if deletions_entry else FORMAT,
            name=self.name,
            version=self.version,
            created=self._created.isoformat().replace("+00:00", "Z"),
            parent=self.parent,
            num_rows=self.num_rows,
            num_classes=len(self.identities),
            shards=tuple(self._shards),
            classes=classes_entry,
            changes={**counts, **changes_entry},
            deletions=deletions_entry,
            schema={f.name: str(f.type) for f in SHARD_SCHEMA},
        )
        self.store.write_bytes(f"{self.prefix}/{MANIFEST}", manifest.to_json())
        self._move_latest()
        self.store.delete(f"{self.prefix}/{MARKER}")
        self.manifest = manifest.to_dict()
        log.info(
            "dataset %s: committed v%d (%d rows, %d classes, %d shards of which %d reused, "
            "%d shard bytes written, %d rows of reused shards deleted; +%d -%d ~%d)",
            self.name,
            self.version,
            self.num_rows,
            len(self.identities),
            len(self._shards),
            self.shards_reused,
            self.bytes_written,
            sum(len(v) for v in self._deleted.values()),
            counts["added"],
            counts["removed"],
            counts["relabelled"],
        )

    def _put_small(self, file: str, table: pa.Table) -> dict[str, Any]:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        self.store.write_bytes(f"{self.prefix}/{file}", data)
        return {"file": file, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def _move_latest(self) -> None:
        current = latest_version(self.store, self.name)
        if current is None or current <= (self.version or 0):
            _point_latest(self.store, self.name, self.version or 0)


def _point_latest(store: ObjectStore, name: str, version: int) -> None:
    """Write ``latest`` to name ``v<version>`` (a commit's last step: finish_commits redoes it)."""
    store.write_bytes(
        layout.dataset_latest(check_name(name)), layout.version_dir_name(version).encode()
    )


def finish_commits(
    store: ObjectStore, name: str, dirs: dict[int, set[str]] | None = None
) -> list[str]:
    """Finish what a writer killed inside its commit left: ``latest`` behind the newest
    committed version (killed between the manifest and the pointer: readers of "latest" got
    the version before it, and retention took the newest for superseded), and the writer's
    marker in a committed version. The caller holds the store lock (no writer is live).
    Returns what it did, for logs. ``dirs``: :func:`version_dirs`, when already listed."""
    dirs = version_dirs(store, name) if dirs is None else dirs
    committed = sorted(v for v, files in dirs.items() if MANIFEST in files)
    if not committed:
        return []
    done: list[str] = []
    rel = layout.dataset_latest(check_name(name))
    want = layout.version_dir_name(committed[-1])
    try:
        pointer = store.read_bytes(rel).decode().strip()
    except FileNotFoundError:
        pointer = None
    if pointer != want:
        _point_latest(store, name, committed[-1])
        done.append(f"{store.uri(rel)} -> {want} (was {pointer})")
    for v in committed:
        if MARKER in dirs[v]:
            store.delete(f"{version_prefix(name, v)}/{MARKER}")
            done.append(store.uri(f"{version_prefix(name, v)}/{MARKER}"))
    return done


def _marker_state(store: ObjectStore, prefix: str, files: set[str], stale_after_s: float) -> str:
    """``live`` | ``aborted`` | ``stale`` | ``no marker`` for a directory without manifest."""
    if MARKER not in files:
        return "no marker"
    try:
        marker = json.loads(store.read_bytes(f"{prefix}/{MARKER}"))
        beat = datetime.fromisoformat(marker["heartbeat"])
    except (FileNotFoundError, ValueError, KeyError):
        return "no marker"
    if marker.get("state") == "aborted":
        return "aborted"
    if (_now() - beat).total_seconds() > stale_after_s:
        return "stale"
    return "live"


# --------------------------------------------------------------------------------------------
# Maintenance


def verify_version(store: ObjectStore, name: str, version: int | str = "latest") -> list[str]:
    """Problems with a committed version; ``[]`` when every shard, classes and changes file
    re-hashes to its manifest entry, row/class counts add up, and labels are contiguous."""
    try:
        manifest = load_manifest(store, name, version)
    except FileNotFoundError as exc:
        return [f"no manifest: {exc}"]
    except ManifestUnreadable as exc:
        return [f"manifest.json {exc}"]
    prefix = version_prefix(name, manifest.version)
    problems: list[str] = []
    rows, missing = 0, False
    per_identity: dict[str, int] = {}  # pooled: rows per identity, to check classes.parquet
    face_ids: set[str] = set()
    try:
        deleted = read_deletions(store, manifest)
    except (StorageError, FileNotFoundError) as exc:
        problems.append(f"deletions: {exc}")
        deleted = {}
    for shard in manifest.shards:
        rel = manifest.shard_rel(shard)
        try:
            data = store.read_bytes(rel)
        except FileNotFoundError:
            problems.append(f"{shard.file}: missing")
            missing = True  # its rows are unknown: no row count to compare
            continue
        if len(data) != shard.bytes:
            problems.append(f"{shard.file}: {len(data)} bytes, manifest says {shard.bytes}")
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            problems.append(f"{shard.file}: sha256 mismatch")
        elif manifest.pooled:
            keys = read_parquet_bytes(data, ["face_id", "identity_id"])
            if keys.num_rows != shard.rows:
                problems.append(f"{shard.file}: {keys.num_rows} rows, manifest says {shard.rows}")
            else:
                keys = held_rows(keys, deleted.get(shard.sha256))
            for ident, n in zip(
                *np.unique(
                    np.asarray(keys.column("identity_id").to_pylist(), dtype=object).astype(str),
                    return_counts=True,
                ),
                strict=True,
            ):
                per_identity[str(ident)] = per_identity.get(str(ident), 0) + int(n)
            fids = keys.column("face_id").to_pylist()
            if face_ids.intersection(fids):
                problems.append(f"{shard.file}: a face is in two shards of the version")
            face_ids.update(fids)
        rows += shard.live_rows
    if not missing and rows != manifest.num_rows:
        problems.append(f"shards hold {rows} rows, manifest says {manifest.num_rows}")
    if not manifest.pooled:
        listed = {s.file for s in manifest.shards}
        extra = [
            o.rel
            for o in store.list(f"{prefix}/{layout.SHARDS}")
            if o.rel[len(prefix) + 1 :] not in listed
        ]
        problems += [f"{e}: not in the manifest" for e in extra]
    for key, entry in (("classes", manifest.classes), ("changes", manifest.changes)):
        if entry is None:
            raise KeyError(key)
        try:
            data = store.read_bytes(f"{prefix}/{entry['file']}")
        except FileNotFoundError:
            problems.append(f"{entry['file']}: missing")
            continue
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 mismatch")
        elif key == "classes":
            classes = read_parquet_bytes(data)
            labels = classes.column("label").to_numpy()
            if len(classes) != manifest.num_classes or not np.array_equal(
                labels, np.arange(len(classes))
            ):
                problems.append("classes.parquet: labels are not 0..num_classes-1")
            if int(pc.sum(classes.column("count")).as_py() or 0) != manifest.num_rows:
                problems.append("classes.parquet: counts do not add up to num_rows")
            if manifest.pooled and not problems:
                want = dict(
                    zip(
                        classes.column("identity_id").to_pylist(),
                        classes.column("count").to_pylist(),
                        strict=True,
                    )
                )
                if want != per_identity:
                    problems.append("classes.parquet: counts differ from the shards' identities")
    return problems


def unreadable_manifests(store: ObjectStore, name: str) -> dict[int, str]:
    """Committed versions of ``name`` whose manifest does not parse: version -> the error."""
    bad: dict[int, str] = {}
    for v in list_versions(store, name):
        try:
            load_manifest(store, name, v)
        except ManifestUnreadable as exc:
            bad[v] = str(exc)
        except FileNotFoundError:
            pass  # removed meanwhile
    return bad


def referenced_shards(store: ObjectStore, name: str, without: Collection[int] = ()) -> set[str]:
    """Pool shards (``shards/<sha256>.parquet``) that a committed version lists or a
    half-written version's marker names (its writer may still commit it); the versions in
    ``without`` left out (a dry run's retention). :class:`ManifestUnreadable` when a committed
    version's manifest does not parse: what it lists is unknown, so nothing may be swept."""
    keep: set[str] = set()
    for v, files in version_dirs(store, name).items():
        if v in without:
            continue
        prefix = version_prefix(name, v)
        if MANIFEST in files:
            m = load_manifest(store, name, v)
            if m.pooled:
                keep.update(sh.file for sh in m.shards)
        elif MARKER in files:
            with contextlib.suppress(FileNotFoundError, ValueError):
                keep.update(json.loads(store.read_bytes(f"{prefix}/{MARKER}")).get("shards", []))
    return keep


def sweep_pool(
    store: ObjectStore, name: str, dry_run: bool = False, without: Collection[int] = ()
) -> list[str]:
    """Delete the pool shards of ``name`` that no version lists (:func:`referenced_shards`);
    returns their URIs. A shard a committed version references is never deleted. The caller
    holds the store lock (no writer starts meanwhile). ``without``: versions a dry run's
    retention would remove first."""
    keep = referenced_shards(store, name, without)
    base = _ds(name) + "/"
    gone: list[str] = []
    for o in store.list(layout.dataset_pool(name)):
        if o.rel[len(base) :] in keep:
            continue
        log.info("gc: %s unreferenced shard %s", "would remove" if dry_run else "removing", o.rel)
        if not dry_run:
            store.delete(o.rel)
        gone.append(store.uri(o.rel))
    return gone


def gc(
    store: ObjectStore, name: str, dry_run: bool = False, stale_after_s: float = STALE_AFTER_S
) -> list[str]:
    """Remove half-written version directories (see the module docstring for the rule);
    returns their URIs. Committed versions are never touched."""
    dirs = version_dirs(store, name)
    newest = max((v for v, f in dirs.items() if MANIFEST in f), default=0)
    removed: list[str] = []
    for v, files in sorted(dirs.items()):
        if MANIFEST in files:
            continue
        prefix = version_prefix(name, v)
        state = "below newest" if v < newest else _marker_state(store, prefix, files, stale_after_s)
        if state == "live":
            log.info("gc: keeping %s (being written)", store.uri(prefix))
            continue
        log.info(
            "gc: %s %s (%s)", "would remove" if dry_run else "removing", store.uri(prefix), state
        )
        if not dry_run:
            store.delete_prefix(prefix)
        removed.append(store.uri(prefix))
    return removed


# --------------------------------------------------------------------------------------------
# Forgetting rows and retention (storage/forget.py, `faceloop datasets gc`)


def _write_parquet_shard(sink: _HashingFile, shard: pa.Table, row_group_size: int) -> None:
    # Images are JPEG already: compression would only cost CPU.
    with pq.ParquetWriter(
        pa.PythonFile(sink, mode="w"),
        SHARD_SCHEMA,
        compression={"image": "none"},
        use_dictionary=["source_kind"],
    ) as w:
        w.write_table(shard, row_group_size=row_group_size)


@contextlib.contextmanager
def _spooled_shard(shard: pa.Table, spool: str | None = None) -> Iterator[tuple[str, int, str]]:
    """``shard`` (SHARD_SCHEMA) written to a local Parquet file in a temporary directory under
    ``spool`` (the system's when None), hashed while written: (path, bytes, sha256), the file
    removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix=temp_dir_prefix("shard"), dir=spool) as tmp:
        path = os.path.join(tmp, "part.parquet")
        with open(path, "wb") as f:
            sink = _HashingFile(f)
            _write_parquet_shard(sink, shard, 1024)
        yield path, sink.n, sink.h.hexdigest()


def write_pool_shard(
    store: ObjectStore, name: str, shard: pa.Table, spool: str | None = None
) -> tuple[ShardInfo, int]:
    """Write ``shard`` (SHARD_SCHEMA) into the pool of dataset ``name`` under its sha256,
    through a local spool file in ``spool`` (a temporary directory when None); its manifest
    entry and the bytes uploaded (0: the pool held these bytes already)."""
    with _spooled_shard(shard, spool) as (path, size, digest):
        file = layout.pool_shard(digest)
        key = f"{_ds(name)}/{file}"
        uploaded = 0
        if not store.exists(key):  # same name, same bytes: already in the pool
            store.put_file(key, path)
            uploaded = size
    return ShardInfo(file, shard.num_rows, size, digest), uploaded


def _write_shard_file(
    store: ObjectStore, rel: str | None, shard: pa.Table, name: str = ""
) -> ShardInfo:
    """Write ``shard`` (SHARD_SCHEMA) as the writer does; its manifest entry. ``rel`` None: into
    the pool of dataset ``name`` under its sha256 (entry ``file`` set), else to ``rel``."""
    if rel is None:
        return write_pool_shard(store, name, shard)[0]
    with _spooled_shard(shard) as (path, size, digest):
        store.put_file(rel, path)
    return ShardInfo("", shard.num_rows, size, digest)


def rewrite_version(
    store: ObjectStore,
    name: str,
    version: int,
    drop_face: Any,
    note: dict[str, Any] | None = None,
) -> int:
    """Rewrite committed version ``v<N>`` without the rows whose ``face_id`` ``drop_face(fid)``
    says to drop (shards, classes and changes); returns the rows removed (0: untouched).

    The version stays verifiable: new classes and changes files get fresh names
    (``...-r<hex>``), and so do new shards (/1: ``part-<i>-r<hex>``; pooled: only the shards
    that held a dropped row are replaced, by new pooled shards, and the pool is swept of
    shards no version lists), labels are renumbered ``0..C'-1`` over the identities that keep a row,
    changes and counts are filtered the same way, and the manifest (keeping ``version``,
    ``parent``, ``created``; ``meta.rewritten`` says when and why) replaces the old one
    atomically. Then every file of the directory the manifest does not list is deleted
    (:func:`sweep_version`), so the old files, which hold the dropped rows, are gone. A crash
    before the manifest leaves the old version intact plus unlisted files; a crash after it
    leaves unlisted old files: either way the next call (or ``forget --resume``) sweeps them.
    The caller holds the store lock.
    """
    manifest = load_manifest(store, name, version)
    prefix = version_prefix(name, manifest.version)
    deleted = read_deletions(store, manifest)
    # Every row a shard file holds, the ones the version does not hold (deleted) included:
    # a dropped face must leave the files, not just the version's view of them.
    keys = [
        store.read_parquet_columns(manifest.shard_rel(s), ["face_id", "identity_id"])
        for s in manifest.shards
    ]
    changes = read_table(store, name, version, "changes")
    cand = {f for t in keys for f in t.column("face_id").to_pylist() if f is not None}
    cand |= {f for f in changes.column("face_id").to_pylist() if f is not None}
    dropped = {f for f in cand if drop_face(f)}
    if not dropped:
        sweep_version(store, name, version)
        return 0
    drop_arr = pa.array(sorted(dropped), pa.string())

    def keep(t: pa.Table) -> pa.Table:
        return t.filter(pc.invert(pc.is_in(t.column("face_id"), value_set=drop_arr)))

    live_keys = [
        held_rows(t, deleted.get(s.sha256)) for t, s in zip(keys, manifest.shards, strict=True)
    ]
    kept_keys = [keep(t) for t in live_keys]
    removed = sum(t.num_rows for t in live_keys) - sum(t.num_rows for t in kept_keys)
    identities = class_index(
        pa.chunked_array([t.column("identity_id") for t in kept_keys], pa.string())
        if kept_keys
        else pa.array([], pa.string())
    )
    tag = uuid.uuid4().hex[:8]
    counts = np.zeros(len(identities), dtype=np.int64)
    shards: list[ShardInfo] = []
    still_deleted: dict[str, np.ndarray] = {}
    for s, phys, after in zip(manifest.shards, keys, kept_keys, strict=True):
        if not after.num_rows:
            continue
        lab = pc.index_in(after.column("identity_id"), value_set=identities)
        labels = lab.to_numpy(zero_copy_only=False).astype(np.int64)
        uniq, cnt = np.unique(labels, return_counts=True)
        counts[uniq] += cnt
        if manifest.pooled:
            # Shards are shared: one without a dropped row (held or deleted) stays as it is,
            # with its deletions (other versions may list it); one with some is replaced by a
            # new pooled shard of the rows the version holds, less the dropped ones.
            if keep(phys).num_rows == phys.num_rows:
                shards.append(s)
                if s.deleted:
                    still_deleted[s.sha256] = deleted[s.sha256]
                continue
            t = conform(store.read_parquet_file(manifest.shard_rel(s)), SHARD_SCHEMA)
            t = keep(held_rows(t, deleted.get(s.sha256)))
            shards.append(_write_shard_file(store, None, conform(t, SHARD_SCHEMA), name))
            continue
        t = keep(conform(store.read_parquet_file(manifest.shard_rel(s)), SHARD_SCHEMA))
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
        rel = f"{layout.SHARDS}/part-{len(shards):05d}-r{tag}.parquet"
        info = _write_shard_file(store, f"{prefix}/{rel}", conform(t, SHARD_SCHEMA))
        shards.append(ShardInfo(rel, info.rows, info.bytes, info.sha256))
    classes = pa.table(
        {
            "label": pa.array(np.arange(len(identities)), pa.int64()),
            "identity_id": identities,
            "count": pa.array(counts, pa.int64()),
        },
        schema=CLASSES_SCHEMA,
    )
    changes = keep(conform(changes, CHANGES_SCHEMA))
    change_counts = {k: 0 for k in ("added", "removed", "relabelled")}
    for row in changes.group_by("change").aggregate([("face_id", "count")]).to_pylist():
        change_counts[row["change"]] = row["face_id_count"]

    def put_small(stem: str, table: pa.Table) -> dict[str, Any]:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        data = buf.getvalue().to_pybytes()
        file = f"{stem}-r{tag}.parquet"
        store.write_bytes(f"{prefix}/{file}", data)
        return {"file": file, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    classes_entry = put_small("classes", classes)
    changes_entry = put_small("changes", changes)
    deletions_entry = None
    if still_deleted:
        table = deletions_table(still_deleted)
        deletions_entry = {**put_small("deletions", table), "rows": table.num_rows}
    rewritten = [*manifest.meta.get("rewritten", []), {"at": _now().isoformat(), **(note or {})}]
    new = dataclasses.replace(
        manifest,
        format=manifest.format
        if not manifest.pooled
        else (FORMAT_V3 if deletions_entry else FORMAT),
        deletions=deletions_entry,
        shards=tuple(shards),
        num_rows=sum(s.live_rows for s in shards),
        num_classes=len(identities),
        classes=classes_entry,
        changes={**change_counts, **changes_entry},
        meta={**manifest.meta, "rewritten": rewritten},
    )
    store.write_bytes(f"{prefix}/{MANIFEST}", new.to_json())
    sweep_version(store, name, version)
    # The replaced pool shards hold the dropped rows: gone once no other version lists them
    # (a forget rewrites every version, so after the last one none does).
    sweep_pool(store, name)
    log.info("dataset %s v%d: rewritten without %d rows", name, version, removed)
    return removed


def sweep_version(store: ObjectStore, name: str, version: int) -> list[str]:
    """Delete every file of committed ``v<N>`` that its manifest does not list (what a rewrite
    replaced, or a crashed rewrite left); returns their keys."""
    manifest = load_manifest(store, name, version)
    prefix = version_prefix(name, manifest.version)
    listed = {MANIFEST, *(s.file for s in manifest.shards)}
    listed |= {e["file"] for e in (manifest.classes, manifest.changes, manifest.deletions) if e}
    gone = []
    for o in store.list(prefix):
        if o.rel[len(prefix) + 1 :] not in listed:
            store.delete(o.rel)
            gone.append(o.rel)
    return gone


def superseded_to_remove(
    store: ObjectStore, name: str, keep: int | None = None, days: float | None = None
) -> list[int]:
    """The versions :func:`prune_superseded` removes with these bounds, ascending."""
    if not keep and not days:
        return []
    latest = latest_version(store, name)
    # Nor the newest committed version, whatever the pointer says (a commit killed before it
    # moved the pointer: storage.versions.finish_commits).
    superseded = [v for v in list_versions(store, name)[:-1] if v != latest]
    doomed: set[int] = set()
    if keep:
        doomed |= set(superseded[: max(0, len(superseded) - keep)])
    if days:
        now = _now()
        for v in superseded:
            created = load_manifest(store, name, v).created
            if created:
                age = now - datetime.fromisoformat(created.replace("Z", "+00:00"))
                if age.total_seconds() > days * 86400:
                    doomed.add(v)
    return sorted(doomed)


def prune_superseded(
    store: ObjectStore,
    name: str,
    keep: int | None = None,
    days: float | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Retention of superseded versions (every committed version but ``latest``): keep the
    ``keep`` newest of them, and none older than ``days`` (by manifest ``created``); 0 or None
    for either = no bound. Returns the URIs removed (or that would be). ``latest`` is never
    removed. The caller holds the store lock."""
    removed = []
    for v in superseded_to_remove(store, name, keep, days):
        prefix = version_prefix(name, v)
        log.info("retention: %s %s", "would remove" if dry_run else "removing", store.uri(prefix))
        if not dry_run:
            # The manifest first: the version stops existing before its files go.
            store.delete(f"{prefix}/{MANIFEST}")
            store.delete_prefix(prefix)
        removed.append(store.uri(prefix))
    return removed
