"""Immutable, atomically published dataset versions (layout in docs/DESIGN.md).

``datasets/<name>/v<N>/`` holds ``shards/part-00000.parquet`` ... (SHARD_SCHEMA),
``classes.parquet`` (label, identity_id, count), ``changes.parquet`` (face_id, change,
old_identity_id, new_identity_id) and, written **last**, ``manifest.json``. ``latest`` holds
``v<N>`` and is moved only after that manifest is complete.

Rules (what readers and writers may rely on):

- **Visibility.** A version exists iff ``v<N>/manifest.json`` exists. :func:`list_versions`,
  :func:`read_manifest`, :func:`read_shards` never look at a directory without one.
- **Numbering.** A new version gets ``N = newest visible + 1`` (1 for the first), so visible
  numbers have no gaps made by crashes. Its parent is that newest visible version.
- **Half-written directories.** A writer keeps ``v<N>/_writing.json`` (writer id, heartbeat time,
  state) up to date after every shard. When the next writer finds ``v<N>`` already there without
  a manifest, it *replaces* it (deletes it and starts over) if the marker is missing, says
  ``aborted`` (the ``with`` block raised), or its heartbeat is older than ``stale_after_s``
  (default 15 min: a writer that has not finished a shard for that long is dead). A fresh marker
  means another writer is live: :class:`ConcurrentWriteError`, nothing is touched. Before
  committing, a writer checks the marker is still its own, so a writer that was wrongly
  presumed dead cannot overwrite its successor.
- **gc.** :func:`gc` removes half-written directories that are below the newest visible version
  (no writer ever resumes a lower number) or whose marker is missing/aborted/stale; the newest
  live in-progress one is kept. It never touches committed versions.
- **Labels.** ``label`` is contiguous ``0..C-1`` within a version, assigned in ``identity_id``
  order; every label has at least one row. Computed with Arrow (sorted unique array +
  ``index_in``), not a Python dict, so 10^8 classes cost Arrow buffers, not Python objects.

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
from collections.abc import Iterator
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
from storage.layout import LATEST, MANIFEST, MARKER
from storage.manifest import (
    FORMAT,
    Manifest,
    ShardInfo,
    check_name,
    latest_version,
    list_versions,
    newest_version,
    version_dirs,
)
from storage.objectstore import ObjectStore, conform, sha256_of, temp_dir_prefix

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "MARKER",
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
    "read_manifest",
    "read_shards",
    "read_table",
    "verify_version",
    "version_prefix",
]

STALE_AFTER_S = 15 * 60

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
    return Manifest.from_json(store.read_bytes(f"{version_prefix(name, v)}/{MANIFEST}"), name, v)


def read_manifest(store: ObjectStore, name: str, version: int | str = "latest") -> dict[str, Any]:
    """:func:`load_manifest` as the JSON object stored."""
    return load_manifest(store, name, version).to_dict()


def iter_shards(
    store: ObjectStore, name: str, version: int | str = "latest", columns: list[str] | None = None
) -> Iterator[pa.Table]:
    """The rows of a committed version, one shard at a time, in manifest order."""
    manifest = load_manifest(store, name, version)
    prefix = version_prefix(name, manifest.version)
    for shard in manifest.shards:
        yield store.read_parquet_file(f"{prefix}/{shard.file}", columns=columns)


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


def diff_assignments(old: pa.Table, new: pa.Table) -> pa.Table:
    """Changes from ``old`` to ``new`` (each: face_id, identity_id; face_id unique), sorted by
    face_id: ``added`` (only in new), ``removed`` (only in old), ``relabelled`` (identity
    differs). CHANGES_SCHEMA."""
    o = old.select(["face_id", "identity_id"]).rename_columns(["face_id", "old_identity_id"])
    n = new.select(["face_id", "identity_id"]).rename_columns(["face_id", "new_identity_id"])
    o = o.append_column("_in_old", pa.array(np.ones(o.num_rows, dtype=bool)))
    n = n.append_column("_in_new", pa.array(np.ones(n.num_rows, dtype=bool)))
    j = n.join(o, keys="face_id", join_type="full outer")
    in_old = pc.fill_null(j.column("_in_old"), False)
    in_new = pc.fill_null(j.column("_in_new"), False)
    same = pc.fill_null(pc.equal(j.column("old_identity_id"), j.column("new_identity_id")), False)
    change = pc.if_else(
        pc.invert(in_old),
        "added",
        pc.if_else(
            pc.invert(in_new),
            "removed",
            pc.if_else(same, pa.scalar(None, pa.string()), "relabelled"),
        ),
    )
    out = pa.table(
        {
            "face_id": j.column("face_id"),
            "change": change,
            "old_identity_id": j.column("old_identity_id"),
            "new_identity_id": j.column("new_identity_id"),
        }
    ).filter(pc.is_valid(change))
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
    ``source_kind``; ``label`` is computed from ``identities`` (every identity_id must be in it,
    and every identity must get at least one row). Rows are buffered up to ``shard_rows``, then
    written as one shard through a local spool file, hashed and counted while written, and
    uploaded. On a clean exit it writes classes, changes, the manifest, then moves ``latest``.
    If the block raises, the version stays invisible (marker set to ``aborted``).

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
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[ShardInfo] = []
        self._keys: list[pa.Table] = []  # (face_id, identity_id) when changes must be computed
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
        log.warning(
            "dataset %s v%s: aborted (%s); version stays invisible",
            self.name,
            self.version,
            exc_type.__name__,
        )
        # Tell the next writer at once that this directory is dead (no need to wait until stale),
        # unless another writer has taken the directory over meanwhile.
        with contextlib.suppress(Exception):
            marker = json.loads(self.store.read_bytes(f"{self.prefix}/{MARKER}"))
            if marker.get("writer") == self.writer_id and not self.store.exists(
                f"{self.prefix}/{MANIFEST}"
            ):
                self._write_marker("aborted")

    @property
    def rows_added(self) -> int:
        """Rows passed to :meth:`write` so far (written to shards or still buffered)."""
        return self.num_rows + self._pending_rows

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
        self.version = (newest or 0) + 1
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

    def _labelled(self, table: pa.Table) -> pa.Table:
        ids = table.column("identity_id").cast(pa.string())
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        labels = pc.index_in(ids, value_set=self.identities)
        if labels.null_count:
            bad = pc.filter(ids, pc.is_null(labels))[:3].to_pylist()
            raise ValueError(f"identity_id not in the class list (or null): {bad}")
        lab = labels.to_numpy().astype(np.int64)
        uniq, cnt = np.unique(lab, return_counts=True)
        self._counts[uniq] += cnt
        out = table.drop_columns([c for c in ("label",) if c in table.column_names])
        out = out.append_column("label", pa.array(lab, pa.int64()))
        return conform(out, SHARD_SCHEMA)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._pending)
        shard, rest = table.slice(0, rows), table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        self._write_shard(shard)

    def _write_shard(self, shard: pa.Table) -> None:
        assert self._spool is not None
        index = len(self._shards)
        rel = layout.shard_file(index)
        path = os.path.join(self._spool.name, f"part-{index:05d}.parquet")
        with open(path, "wb") as f:
            sink = _HashingFile(f)
            # Images are JPEG already: compression would only cost CPU.
            with pq.ParquetWriter(
                pa.PythonFile(sink, mode="w"),
                SHARD_SCHEMA,
                compression={"image": "none"},
                use_dictionary=["source_kind"],
            ) as w:
                w.write_table(shard, row_group_size=min(1024, self.shard_rows))
        self.store.put_file(f"{self.prefix}/{rel}", path)
        os.unlink(path)
        self._shards.append(ShardInfo(rel, shard.num_rows, sink.n, sink.h.hexdigest()))
        self.num_rows += shard.num_rows
        self._write_marker("writing")  # heartbeat: proves this writer alive to the next one
        crash_point("publish")  # tests only (faceloop/crashpoints.py)
        log.debug(
            "dataset %s v%d: shard %d, %d rows, %d bytes",
            self.name,
            self.version,
            index,
            shard.num_rows,
            sink.n,
        )

    # -- commit --------------------------------------------------------------------------------

    def _commit(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
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
            format=FORMAT,
            name=self.name,
            version=self.version,
            created=self._created.isoformat().replace("+00:00", "Z"),
            parent=self.parent,
            num_rows=self.num_rows,
            num_classes=len(self.identities),
            shards=tuple(self._shards),
            classes=classes_entry,
            changes={**counts, **changes_entry},
            schema={f.name: str(f.type) for f in SHARD_SCHEMA},
        )
        self.store.write_bytes(f"{self.prefix}/{MANIFEST}", manifest.to_json())
        self._move_latest()
        self.store.delete(f"{self.prefix}/{MARKER}")
        self.manifest = manifest.to_dict()
        log.info(
            "dataset %s: committed v%d (%d rows, %d classes, %d shards; +%d -%d ~%d)",
            self.name,
            self.version,
            self.num_rows,
            len(self.identities),
            len(self._shards),
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
            self.store.write_bytes(
                f"{_ds(self.name)}/{LATEST}", layout.version_dir_name(self.version or 0).encode()
            )


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
    prefix = version_prefix(name, manifest.version)
    problems: list[str] = []
    rows = 0
    for shard in manifest.shards:
        rel = f"{prefix}/{shard.file}"
        try:
            digest, size = sha256_of(store, rel)
        except FileNotFoundError:
            problems.append(f"{shard.file}: missing")
            continue
        if size != shard.bytes:
            problems.append(f"{shard.file}: {size} bytes, manifest says {shard.bytes}")
        if digest != shard.sha256:
            problems.append(f"{shard.file}: sha256 mismatch")
        rows += shard.rows
    if rows != manifest.num_rows:
        problems.append(f"shards hold {rows} rows, manifest says {manifest.num_rows}")
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
            classes = pq.read_table(pa.BufferReader(data))
            labels = classes.column("label").to_numpy()
            if len(classes) != manifest.num_classes or not np.array_equal(
                labels, np.arange(len(classes))
            ):
                problems.append("classes.parquet: labels are not 0..num_classes-1")
            if int(pc.sum(classes.column("count")).as_py() or 0) != manifest.num_rows:
                problems.append("classes.parquet: counts do not add up to num_rows")
    return problems


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


def _write_shard_file(store: ObjectStore, rel: str, shard: pa.Table) -> ShardInfo:
    """Write ``shard`` (SHARD_SCHEMA) to ``rel`` as the writer does; its manifest entry."""
    with tempfile.TemporaryDirectory(prefix=temp_dir_prefix("shard")) as tmp:
        path = os.path.join(tmp, "part.parquet")
        with open(path, "wb") as f:
            sink = _HashingFile(f)
            with pq.ParquetWriter(
                pa.PythonFile(sink, mode="w"),
                SHARD_SCHEMA,
                compression={"image": "none"},
                use_dictionary=["source_kind"],
            ) as w:
                w.write_table(shard, row_group_size=1024)
        store.put_file(rel, path)
    return ShardInfo("", shard.num_rows, sink.n, sink.h.hexdigest())


def rewrite_version(
    store: ObjectStore,
    name: str,
    version: int,
    drop_face: Any,
    note: dict[str, Any] | None = None,
) -> int:
    """Rewrite committed version ``v<N>`` without the rows whose ``face_id`` ``drop_face(fid)``
    says to drop (shards, classes and changes); returns the rows removed (0: untouched).

    The version stays verifiable: new shard, classes and changes files get fresh names
    (``...-r<hex>``), labels are renumbered ``0..C'-1`` over the identities that keep a row,
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
    keys = [
        store.read_parquet_file(f"{prefix}/{s.file}", columns=["face_id", "identity_id"])
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

    kept_keys = [keep(t) for t in keys]
    removed = sum(t.num_rows for t in keys) - sum(t.num_rows for t in kept_keys)
    identities = class_index(
        pa.chunked_array([t.column("identity_id") for t in kept_keys], pa.string())
        if kept_keys
        else pa.array([], pa.string())
    )
    tag = uuid.uuid4().hex[:8]
    counts = np.zeros(len(identities), dtype=np.int64)
    shards: list[ShardInfo] = []
    for s in manifest.shards:
        t = keep(conform(store.read_parquet_file(f"{prefix}/{s.file}"), SHARD_SCHEMA))
        if not t.num_rows:
            continue
        lab = pc.index_in(t.column("identity_id"), value_set=identities)
        labels = lab.to_numpy(zero_copy_only=False).astype(np.int64)
        uniq, cnt = np.unique(labels, return_counts=True)
        counts[uniq] += cnt
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
    rewritten = [*manifest.meta.get("rewritten", []), {"at": _now().isoformat(), **(note or {})}]
    new = dataclasses.replace(
        manifest,
        shards=tuple(shards),
        num_rows=sum(s.rows for s in shards),
        num_classes=len(identities),
        classes=classes_entry,
        changes={**change_counts, **changes_entry},
        meta={**manifest.meta, "rewritten": rewritten},
    )
    store.write_bytes(f"{prefix}/{MANIFEST}", new.to_json())
    sweep_version(store, name, version)
    log.info("dataset %s v%d: rewritten without %d rows", name, version, removed)
    return removed


def sweep_version(store: ObjectStore, name: str, version: int) -> list[str]:
    """Delete every file of committed ``v<N>`` that its manifest does not list (what a rewrite
    replaced, or a crashed rewrite left); returns their keys."""
    manifest = load_manifest(store, name, version)
    prefix = version_prefix(name, manifest.version)
    listed = {MANIFEST, *(s.file for s in manifest.shards)}
    listed |= {e["file"] for e in (manifest.classes, manifest.changes) if e}
    gone = []
    for o in store.list(prefix):
        if o.rel[len(prefix) + 1 :] not in listed:
            store.delete(o.rel)
            gone.append(o.rel)
    return gone


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
    if not keep and not days:
        return []
    latest = latest_version(store, name)
    superseded = [v for v in list_versions(store, name) if v != latest]
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
    removed = []
    for v in sorted(doomed):
        prefix = version_prefix(name, v)
        log.info("retention: %s %s", "would remove" if dry_run else "removing", store.uri(prefix))
        if not dry_run:
            # The manifest first: the version stops existing before its files go.
            store.delete(f"{prefix}/{MANIFEST}")
            store.delete_prefix(prefix)
        removed.append(store.uri(prefix))
    return removed
