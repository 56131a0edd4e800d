"""Publish the accepted faces as a new dataset version, only when something changed.

A face is published when its ``status`` is in ``settings.dataset.statuses`` and it has an
``identity_id`` and an ``aligned_jpeg``. "Changed" means the face_id -> identity_id mapping of
those faces differs from the newest committed version's (a face added, removed or
relabelled); re-running with the same faces table publishes nothing.

Two streaming passes over the faces table, one group file at a time: the first reads only
(face_id, identity_id, status, aligned_jpeg) to decide and to build the class list; the second
reads the published columns of the faces that need writing, from the files that hold them only,
one new shard per work item (a Ray Data map from ``ray.publish_min_rows`` rows, else a loop
here), and the :class:`storage.versions.DatasetWriter` lists the shards in order and commits
the version. The first pass reads only the group
files whose stamp (size + ETag on S3; size, mtime and inode locally) differs from the one
``state/published/<name>.keys.parquet`` recorded with their accepted keys at the last publish;
the others' keys come from that file (one read instead of one per group file). A publish writes
only the entries of the files it read (and drops those of removed files) into a delta beside it,
``<name>.keys-delta.parquet``; the whole cache is written again once the delta has reached
:data:`KEYS_DELTA_SHARE` of it. So the bytes a publish writes follow the change here too. A file
whose label overlay alone changed since (its own stamp is the one recorded: the label stage
wrote only labels) is compared from the overlay, a few KB instead of the file and its overlay,
when the cache recorded the file's write id and face ids and every face of it has a crop.

The new version reuses its parent (:func:`plan_reuse`): every parent shard is listed again
(shards are named by their content and shared, storage/versions.py), minus the rows that are no
longer published with the same identity (a deletion vector, format /3), and only faces that are
new or relabelled are written into new shards. A shard that would have lost more than
``dataset.max_deleted_share`` of its rows is not reused: its surviving rows are written again.
So the bytes a version writes follow the change, not the size of the dataset, even when the
changed faces are spread over every shard. The labels 0..C-1
come from the version's classes.parquet when read.

Neither pass runs when nothing can have changed: ``state/published`` records the faces-table
generation token (:func:`storage.tables.faces_generation`), the dataset's newest version and the
accepted statuses of the last decision; when all three are what they were, publish returns at
once (a no-op refresh then costs O(1) here instead of a read of every crop).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.config import Settings
from faceloop.errors import StorageError
from faceloop.progress import iterate
from faceloop.schema import FACES_SCHEMA, SHARD_SCHEMA
from storage import layout
from storage.keys import KeyIndex
from storage.manifest import ShardInfo
from storage.objectstore import ObjectInfo, ObjectStore, conform
from storage.privacy import TombstoneCheck
from storage.tables import (
    STAMP_SETTLE_S,
    faces_generation,
    faces_listing,
    faces_removed,
    file_stamp,
    group_key,
    overlay_base,
    read_faces_group,
    read_overlay,
    subject_keys,
    write_id,
)
from storage.versions import (
    MAX_DELETED_SHARE,
    MAX_SMALL_SHARDS,
    DatasetWriter,
    class_index,
    diff_assignments,
    load_manifest,
    newest_version,
    same_assignment,
    shard_keys,
    write_pool_shard,
)
from tasks.ray_faces import ray_map_iter

log = logging.getLogger(__name__)

_KEYS = ["face_id", "identity_id"]

# An ID-card subject's identity is its subject id (its folder's name), which often names the
# person. A dataset goes to training jobs, which need labels, not names: its classes, changes
# and shards name the subject by a store pseudonym instead (storage.secret.pseudonym, the one
# Label Studio's tasks show), for every face labelled with that subject (album faces a person
# attached to it too). An identity is a subject's when an ID-card faces file of that name is
# listed (its file stem is the name's group_key), or when it is the name of a subject `faceloop
# forget` tombstoned (its files are gone; a face still labelled with it is named no better for
# that). The keys cache records that it holds ids so published (a cache from before is read
# again: one written before forgotten subjects were pseudonymized may hold their raw names).
SUBJECT_PREFIX = "subject-"
_IDS_FORM = "subjects-pseudonymized/forgotten-too"


def forgotten_subjects(store: ObjectStore) -> TombstoneCheck | None:
    """What tells a forgotten ID-card subject's name (:meth:`TombstoneCheck.subject`); None
    when no subject was ever forgotten."""
    check = TombstoneCheck(store)
    return check if check and check.t.subjects else None


def published_ids(
    store: ObjectStore,
    t: pa.Table,
    subjects: frozenset[str],
    forgotten: TombstoneCheck | None = None,
) -> pa.Table:
    """``t`` with each ``identity_id`` that is an ID-card subject's (``subjects``:
    :func:`subject_keys`; ``forgotten``: :func:`forgotten_subjects`) replaced by
    ``subject-<pseudonym>``; the others as they are."""
    if not (subjects or forgotten) or not t.num_rows or "identity_id" not in t.column_names:
        return t
    from storage.secret import pseudonym

    col = t.column("identity_id")
    mapping = {
        x: SUBJECT_PREFIX + pseudonym(store, "subject", x)
        for x in pc.unique(pc.drop_null(col)).to_pylist()
        if group_key("idcard", x) in subjects or (forgotten and forgotten.subject(x))
    }
    if not mapping:
        return t
    keys = pa.array(list(mapping), pa.string())
    at = pc.index_in(col, value_set=keys)
    new = pc.if_else(
        pc.is_valid(at), pc.take(pa.array(list(mapping.values()), pa.string()), at), col
    )
    return t.set_column(t.schema.get_field_index("identity_id"), "identity_id", new)


# A file written this close to the listing may be replaced again within the file system's
# timestamp granularity without its stamp changing: its keys are not cached.
_STAMP_SETTLE_S = STAMP_SETTLE_S
_KEYS_SCHEMA = pa.schema(
    [
        ("rel", pa.string()),
        ("stamp", pa.string()),
        ("face_id", pa.string()),
        ("identity_id", pa.string()),
        # Per file: "<write id>/<digest of its face ids>" when every face of the faces file has
        # a crop, else "" (_base_of). With it, a file whose label overlay alone changed since
        # is compared from the overlay (_overlay_keys). Caches written before it have no column.
        ("base", pa.string()),
    ]
)


# The delta of the keys cache is merged into the cache file by the publish that finds it at this
# share of the cache file's rows or more (as the label stage's index and identities deltas).
KEYS_DELTA_SHARE = 0.2
# The stamp of a delta entry that says the file is gone (real stamps are never empty).
_GONE = ""
# The stamp of an entry for a file written too close to the listing to trust its stamp
# (_STAMP_SETTLE_S): it is read again by the next publish, but its keys count in the check for
# faces files lost since (_refuse_vanished_files), which a first publish's files escaped.
_YOUNG = "~young"


class _Entry(NamedTuple):
    """A faces file's entry in the keys cache: the stamp its keys were read at, its accepted
    keys, and what says its label overlay can be read alone (:func:`_base_of`; None: it
    cannot)."""

    stamp: str
    keys: pa.Table
    base: str | None = None


class _KeysCache(NamedTuple):
    """The keys cache as loaded: ``entries`` rel -> entry with the delta applied;
    ``base_rows`` the cache file's rows; ``delta`` the delta file's entries (stamp ``_GONE``:
    a file removed since the cache file was written)."""

    entries: dict[str, _Entry]
    base_rows: int
    delta: dict[str, _Entry]


def _refuse_vanished_files(
    store: ObjectStore, cached: dict[str, _Entry], files: list[str], name: str
) -> None:
    """Faces files are rewritten in place, never removed, but by `faceloop forget`, which drops
    this cache with them: a file the cache lists with accepted faces that is gone now was
    deleted outside faceloop (a bad copy, a hand). Publishing would drop its faces from the
    training set without a word (it did: 35 faces of a deleted album). With no cache, the
    files a forget left in its stead (:func:`storage.layout.published_files`) are checked."""
    listed = set(files)
    gone: list[tuple[str, int | None]] = sorted(
        (rel, e.keys.num_rows) for rel, e in cached.items() if rel not in listed and e.keys.num_rows
    )
    if not cached:
        try:
            after_forget = json.loads(store.read_bytes(layout.published_files(name)))["files"]
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            after_forget = []
        gone = [(str(rel), None) for rel in after_forget if rel not in listed]
    if gone:
        # Removed by the label commit itself: their faces moved to other groups.
        removed = faces_removed(store)
        gone = [(rel, n) for rel, n in gone if rel not in removed]
    if not gone:
        return
    few = ", ".join(rel for rel, _ in gone[:3]) + (
        f" (+{len(gone) - 3} more)" if len(gone) > 3 else ""
    )
    counted = [n for _, n in gone if n is not None]
    raise StorageError(
        f"{len(gone)} faces files that held "
        + (f"{sum(counted)} " if len(counted) == len(gone) else "")
        + f"published faces at the last publish are gone from the store ({few}); refusing to "
        "publish a version without "
        "them. Restore them (`faceloop doctor` lists what else is missing), or, to publish "
        f"without them, delete {store.uri('state/published')} (the next publish reads the faces "
        "table afresh)"
    )


def _load_keys(store: ObjectStore, name: str, statuses: list[str]) -> _KeysCache:
    """The keys cache of ``name`` as the last publish left it; empty when there is none, it
    was made for other statuses or cannot be read (it is only a cache)."""
    base, base_rows = _read_keys(store, layout.published_keys(name), statuses)
    if base is None:
        return _KeysCache({}, 0, {})
    delta, _ = _read_keys(store, layout.published_keys_delta(name), statuses)
    entries = dict(base)
    for rel, entry in (delta or {}).items():
        if entry.stamp == _GONE:
            entries.pop(rel, None)
        else:
            entries[rel] = entry
    return _KeysCache(entries, base_rows, delta or {})


def _read_keys(
    store: ObjectStore, rel: str, statuses: list[str]
) -> tuple[dict[str, _Entry] | None, int]:
    """(rel -> entry, rows) of one keys-cache file; None when it is missing, unreadable or
    made for other statuses."""
    try:
        t = store.read_parquet_file(rel)
        meta = t.schema.metadata or {}
        if json.loads(meta.get(b"statuses", b"null")) != sorted(statuses):
            return None, 0
        if meta.get(b"identity_ids") != _IDS_FORM.encode():
            return None, 0  # ids as the faces table holds them: read the files again
        keys = conform(t.select(_KEYS), pa.schema([_KEYS_SCHEMA.field(k) for k in _KEYS]))
        # rel and stamp stay codes into their dictionaries (as written): decoding them to a
        # string per face held ~300 MB at 10^6 faces.
        rel_codes, rel_values = _codes(t.column("rel"))
        stamp_codes, stamp_values = _codes(t.column("stamp"))
        base_codes, base_values = (
            _codes(t.column("base")) if "base" in t.column_names else (None, [])
        )
        del t
    except FileNotFoundError:
        return None, 0
    except (StorageError, ValueError, KeyError, pa.ArrowInvalid) as exc:
        log.warning("publish: ignoring the keys cache %s: %s", store.uri(rel), exc)
        return None, 0
    out: dict[str, _Entry] = {}
    if not keys.num_rows:
        return out, 0
    bounds = np.flatnonzero(rel_codes[1:] != rel_codes[:-1]) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    ends = np.concatenate([bounds, [len(rel_codes)]]).tolist()
    for lo, hi in zip(starts, ends, strict=True):
        part = keys.slice(lo, hi - lo)
        if part.column("face_id").null_count:
            part = part.filter(pc.is_valid(part.column("face_id")))
        base = (base_values[base_codes[lo]] or None) if base_codes is not None else None
        out[rel_values[rel_codes[lo]]] = _Entry(stamp_values[stamp_codes[lo]], part, base)
    return out, keys.num_rows


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """(a code per row, the distinct values) of a string column, without a string per row."""
    if pa.types.is_dictionary(col.type):
        col = col.unify_dictionaries()
        if not col.num_chunks:
            return np.zeros(0, np.int64), []
        codes = np.concatenate(
            [c.indices.to_numpy(zero_copy_only=False).astype(np.int64) for c in col.chunks]
        )
        return codes, col.chunk(0).dictionary.to_pylist()
    enc = col.combine_chunks().dictionary_encode()  # a cache written with plain strings
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


def _save_keys(
    store: ObjectStore,
    name: str,
    statuses: list[str],
    listing: list[ObjectInfo],
    current: pa.Table,
    bases: list[str | None],
    horizon: float,
    cache: _KeysCache,
    fresh: list[tuple[ObjectInfo, _Entry]],
) -> None:
    """Bring the keys cache up to date: the entries of the files read this time (``fresh``)
    and of the files removed since go into the delta; when that would reach
    :data:`KEYS_DELTA_SHARE` of the cache file (or there is none), the whole cache is written
    again from ``current`` (``bases``: each listed file's base, in listing order) and the
    delta removed."""
    listed = {o.rel for o in listing}
    delta = {rel: e for rel, e in cache.delta.items() if rel in listed or e.stamp == _GONE}
    empty = current.schema.empty_table().select(_KEYS)
    for rel in cache.entries.keys() - listed:
        delta[rel] = _Entry(_GONE, empty)
    for info, entry in fresh:
        # A younger file is read again anyway: recorded for the count of its keys only.
        delta[info.rel] = entry if _settled(info, horizon) else entry._replace(stamp=_YOUNG)
    rows = sum(max(1, e.keys.num_rows) for e in delta.values())
    if not cache.base_rows or rows >= KEYS_DELTA_SHARE * cache.base_rows:
        _save_all_keys(store, name, statuses, listing, current, bases, horizon)
        store.delete(layout.published_keys_delta(name))
        return
    rels = list(delta)
    sizes = [max(1, delta[r].keys.num_rows) for r in rels]

    def column(c: str) -> pa.ChunkedArray:
        parts = [
            delta[r].keys.column(c) if delta[r].keys.num_rows else pa.nulls(1, pa.string())
            for r in rels
        ]
        return pa.chunked_array([a for p in parts for a in getattr(p, "chunks", [p])], pa.string())

    _write_keys(
        store,
        layout.published_keys_delta(name),
        statuses,
        pa.array(np.repeat(np.arange(len(rels), dtype=np.int32), sizes)),
        pa.array(rels, pa.string()),
        pa.array([delta[r].stamp for r in rels], pa.string()),
        pa.array([delta[r].base or "" for r in rels], pa.string()),
        column("face_id"),
        column("identity_id"),
    )


def _save_all_keys(
    store: ObjectStore,
    name: str,
    statuses: list[str],
    listing: list[ObjectInfo],
    current: pa.Table,
    bases: list[str | None],
    horizon: float,
) -> None:
    """Record the accepted keys, stamp and base of each listed file (a file without accepted
    faces gets one row with null keys, so it is not read again either; a file last modified
    after ``horizon`` gets the stamp _YOUNG, so it is read again next time). Built in Arrow: the
    file of a row is an index into the listing (a dictionary column), never a Python string per
    face."""
    ords = current.column("_file").to_numpy()
    keys = current
    counts = np.bincount(ords, minlength=len(listing)) if len(ords) else np.zeros(len(listing))
    empty = np.flatnonzero(counts == 0).astype(np.int32)
    # ``current`` is in listing order already and an empty file adds one row of its own, so
    # every file's rows are one run (what _load_keys splits on): no sort, no copy of the keys.
    files = pa.concat_arrays(
        [keys.column("_file").combine_chunks().cast(pa.int32()), pa.array(empty, pa.int32())]
    )
    rels = pa.array([o.rel for o in listing], pa.string())
    stamps = pa.array([o.stamp if _settled(o, horizon) else _YOUNG for o in listing], pa.string())
    none = pa.nulls(len(empty), pa.string())

    def column(name: str) -> pa.ChunkedArray:
        return pa.chunked_array([*keys.column(name).chunks, none], pa.string())

    _write_keys(
        store,
        layout.published_keys(name),
        statuses,
        files,
        rels,
        stamps,
        pa.array([b or "" for b in bases], pa.string()),
        column("face_id"),
        column("identity_id"),
    )
    # The cache guards the files again (it was checked against the forget's list before).
    store.delete(layout.published_files(name))


def _settled(info: ObjectInfo, horizon: float) -> bool:
    """Whether a file's keys may be cached: last modified before ``horizon``."""
    return info.mtime is None or info.mtime <= horizon


def _write_keys(
    store: ObjectStore,
    rel: str,
    statuses: list[str],
    files: pa.Array,
    rels: pa.Array,
    stamps: pa.Array,
    bases: pa.Array,
    face_id: pa.ChunkedArray,
    identity_id: pa.ChunkedArray,
) -> None:
    """Write a keys-cache file (the cache, or its delta): per row the index ``files`` of its
    file into ``rels`` / ``stamps`` / ``bases`` ("": none), and its keys; every file's rows
    one run."""
    t = pa.table(
        {
            "rel": pa.chunked_array([pa.DictionaryArray.from_arrays(files, rels)]),
            "stamp": pa.chunked_array([pa.DictionaryArray.from_arrays(files, stamps)]),
            "face_id": face_id,
            "identity_id": identity_id,
            "base": pa.chunked_array([pa.DictionaryArray.from_arrays(files, bases)]),
        }
    )
    meta = {"statuses": json.dumps(sorted(statuses)), "identity_ids": _IDS_FORM}
    # rel and stamp are dictionary columns already; face ids are unique and identity ids
    # nearly so: dictionary-encoding them only built a hash of every key (+100 MB at 10^6).
    store.write_parquet(
        rel,
        t.replace_schema_metadata(meta),
        use_dictionary=["rel", "stamp", "base"],
        row_group_size=1 << 17,
    )


_COMPARE = ["face_id", "identity_id", "status", "aligned_jpeg"]
_LABEL_KEYS_SCHEMA = pa.schema(
    [FACES_SCHEMA.field(c) for c in ("face_id", "identity_id", "status")]
)
# Threads reading the changed group files in publish's compare pass.
_COMPARE_THREADS = 4
_WRITE = [*_COMPARE, "quality", "source_kind"]


def _read_group(store: ObjectStore, rel: str, columns: list[str], overlays: set[str]) -> pa.Table:
    """One faces file with its label overlay applied, its write id kept in the metadata."""
    return read_faces_group(store, rel, columns, overlays)


def _keys_of(accepted: pa.Table) -> pa.Table:
    return accepted.select(_KEYS).replace_schema_metadata(None)


def _ids_digest(face_id: pa.ChunkedArray | pa.Array) -> str:
    return hashlib.blake2b(json.dumps(face_id.to_pylist()).encode(), digest_size=16).hexdigest()


def _base_of(t: pa.Table) -> str | None:
    """What lets a later compare pass read this faces file's label overlay alone (``t``: the
    file as :func:`_read_group` read it): its write id and a digest of its face ids, when every
    face has a crop (the overlay carries labels only; a face without a crop is never
    published). None when the file has no write id or a face without a crop."""
    wid = write_id(t)
    if wid is None or t.column("aligned_jpeg").null_count:
        return None
    return f"{wid}/{_ids_digest(t.column('face_id'))}"


def _overlay_alone(info: ObjectInfo, entry: _Entry, overlays: set[str]) -> bool:
    """Whether only the label overlay of the faces file ``info`` can have changed since its
    cached ``entry``: the file's own stamp is the one recorded, and it has an overlay now."""
    return (
        entry.base is not None
        and entry.stamp != _YOUNG
        and layout.labels_of(info.rel) in overlays
        and file_stamp(entry.stamp) == file_stamp(info.stamp)
    )


def _overlay_keys(
    store: ObjectStore,
    rel: str,
    base: str,
    statuses: list[str],
    subjects: frozenset[str],
    forgotten: TombstoneCheck | None = None,
) -> pa.Table | None:
    """The accepted keys of the faces file ``rel`` from its label overlay alone, the file being
    the one ``base`` (:func:`_base_of`) describes. None, so that the file is read, unless the
    overlay applies to that write of the file and lists the same faces (what
    :func:`storage.tables.apply_overlay` checks against the file)."""
    ov = read_overlay(store, rel)
    wid, _, digest = base.partition("/")
    if ov is None or overlay_base(ov) != wid:
        return None
    if _ids_digest(ov.column("face_id")) != digest:
        return None
    t = conform(ov.select(["face_id", "identity_id", "status"]), _LABEL_KEYS_SCHEMA)
    # every face has a crop (``base``)
    return published_ids(store, _keys_of(t.filter(_labelled(t, statuses))), subjects, forgotten)


def _labelled(table: pa.Table, statuses: list[str]) -> pa.ChunkedArray | pa.Array:
    """The rows whose status is accepted and that have an identity (with a crop, accepted)."""
    return pc.and_(
        pc.fill_null(
            pc.is_in(table.column("status"), value_set=pa.array(statuses, pa.string())), False
        ),
        pc.is_valid(table.column("identity_id")),
    )


def _accepted(table: pa.Table, statuses: list[str]) -> pa.Table:
    return table.filter(
        pc.and_(_labelled(table, statuses), pc.is_valid(table.column("aligned_jpeg")))
    )


def _use_ray(settings: Settings, rows: int, use_ray: bool | None) -> bool:
    """Ray for the write pass when asked or when it writes ``ray.publish_min_rows`` rows or
    more; fewer are written in this process (a Ray Data map costs seconds to start)."""
    if use_ray is not None:
        return use_ray
    return rows >= settings.ray.publish_min_rows


def _write_items(
    current: pa.Table, writes: pa.Table, files: list[str], shard_rows: int
) -> list[dict[str, Any]]:
    """The write pass as one work item per new shard.

    The rows to write, file by file in listing order and by face_id inside a file, are cut
    into shards of ``shard_rows`` (the last one shorter), as one writer fed file by file would
    cut them; an item names the slice of each file its shard holds. A file whose accepted faces
    are all written is named by its slice of them (``lo``..``hi`` of ``n``); otherwise by the
    face ids of its slice."""
    if writes.num_rows == 0:
        return []
    n_files = len(files)
    accepted = np.bincount(current.column("_file").to_numpy(), minlength=n_files)
    ords = writes.column("_file").to_numpy()
    fid = writes.column("face_id")
    # ``current`` was built file by file in listing order, so each file's faces are one run of
    # rows already: slices, no sorted copy of the face ids.
    if len(ords) > 1 and (np.diff(ords) < 0).any():
        order = np.argsort(ords, kind="stable")
        ords, fid = ords[order], fid.take(pa.array(order))
    to_write = np.bincount(ords, minlength=n_files)
    starts = np.concatenate([[0], np.cumsum(to_write)])
    items: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    room = shard_rows
    for k in np.flatnonzero(to_write).tolist():
        n, lo = int(to_write[k]), 0
        sorted_ids: pa.Array | None = None
        if n != accepted[k]:
            ids = fid.slice(int(starts[k]), n)
            sorted_ids = pc.take(ids, pc.sort_indices(ids))
        while lo < n:
            hi = min(n, lo + room)
            entry: dict[str, Any] = {"rel": files[k]}
            if sorted_ids is None:
                entry |= {"lo": lo, "hi": hi, "n": n}
            else:
                entry["ids"] = sorted_ids.slice(lo, hi - lo).to_pylist()
            entries.append(entry)
            room -= hi - lo
            lo = hi
            if room == 0:
                items.append({"files": entries})
                entries, room = [], shard_rows
    if entries:
        items.append({"files": entries})
    return items


def _write_part(
    store: ObjectStore,
    item: dict[str, Any],
    *,
    name: str,
    statuses: list[str],
    overlays: list[str],
    subjects: list[str] | None = None,
    forgotten: bool = False,
) -> dict[str, Any]:
    """One item of :func:`_write_items`: its rows read from the faces table, written as one
    pool shard; the shard's manifest entry, the bytes uploaded and its rows per identity.
    ``forgotten``: some subject was forgotten (its name is read from the store's tombstones
    here, where the rows are: the store key stays out of the task)."""
    gone = forgotten_subjects(store) if forgotten else None
    parts = []
    for e in item["files"]:
        rows = _accepted(_read_group(store, e["rel"], _WRITE, set(overlays)), statuses)
        if "ids" in e:
            rows = rows.filter(pc.is_in(rows.column("face_id"), value_set=pa.array(e["ids"])))
            found, want = rows.num_rows, len(e["ids"])
            rows = rows.sort_by("face_id")
        else:
            found, want = rows.num_rows, e["n"]
            rows = rows.sort_by("face_id").slice(e["lo"], e["hi"] - e["lo"])
        if found != want:
            raise StorageError(
                f"faces table changed during publish ({e['rel']}: {found} faces to write, "
                f"{want} planned)"
            )
        rows = published_ids(store, rows, frozenset(subjects or ()), gone)
        parts.append(
            pa.table(
                {
                    "face_id": rows.column("face_id"),
                    "identity_id": rows.column("identity_id"),
                    "image": rows.column("aligned_jpeg"),
                    "quality": rows.column("quality"),
                    "source_kind": rows.column("source_kind"),
                }
            )
        )
    shard = conform(pa.concat_tables(parts), SHARD_SCHEMA)
    info, uploaded = write_pool_shard(store, name, shard)
    counts = pc.value_counts(shard.column("identity_id").combine_chunks())
    return {
        "file": info.file,
        "rows": info.rows,
        "bytes": info.bytes,
        "sha256": info.sha256,
        "uploaded": uploaded,
        "counts": {str(v["values"]): int(v["counts"]) for v in counts.to_pylist()},
    }


def publish_dataset(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    models: list[dict[str, Any]],
    use_ray: bool | None = None,
    nodes: set[str] | None = None,
) -> dict[str, Any] | None:
    """Write a new version of ``settings.dataset.name`` if the accepted faces changed since the
    newest version (or there is none yet and there are accepted faces). Returns the new
    manifest, or None when nothing was published. The new shards are written as a Ray Data map
    when ``use_ray`` (None: when at least ``ray.publish_min_rows`` rows are written); the Ray
    node ids that wrote them are added to ``nodes``."""
    from storage.objectstore import use_store_modes

    use_store_modes(settings)
    cfg = settings.dataset
    state_rel = layout.published_state(cfg.name)
    generation = faces_generation(store)  # taken before reading: a later write changes it
    # The ids' form too: a store whose latest version a release before subject pseudonyms
    # published (ID subjects named by their folders) is published again once, under the
    # pseudonyms, instead of serving those names to training jobs until a face changes.
    decided = {
        "faces_generation": generation,
        "statuses": sorted(cfg.statuses),
        "identity_ids": _IDS_FORM,
    }
    newest = newest_version(store, cfg.name)
    try:
        last = json.loads(store.read_bytes(state_rel))
    except FileNotFoundError:
        last = None
    if last == decided | {"version": newest}:
        log.info(
            "publish: faces unchanged since %s v%s was checked; nothing to publish",
            cfg.name,
            newest,
        )
        return None
    manifest = _publish(settings, store, run_id, models, newest, use_ray, nodes)
    version = manifest["version"] if manifest else newest
    store.write_bytes(
        state_rel, json.dumps(decided | {"version": version}, sort_keys=True).encode()
    )
    return manifest


def _publish(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    models: list[dict[str, Any]],
    parent: int | None,
    use_ray: bool | None = None,
    nodes: set[str] | None = None,
) -> dict[str, Any] | None:
    """The two passes; ``parent`` is the newest committed version (None: there is none).

    The parent's shard keys are read on a thread (``pool``) while the changed faces files are
    compared: nothing before the diff needs them, and their Parquet decoding runs mostly
    outside the GIL. At 10^6 faces that took the publish of an increment from 1.41-1.52 s to
    1.26-1.34 s; started before the keys cache was loaded as well, it raised the publish's
    peak RSS by ~40 MB (two decodes at once), started after it by 10-20 MB."""
    with ThreadPoolExecutor(1, thread_name_prefix="faceloop-parent-keys") as pool:
        return _publish_passes(settings, store, run_id, models, parent, pool, use_ray, nodes)


def _publish_passes(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    models: list[dict[str, Any]],
    parent: int | None,
    pool: ThreadPoolExecutor,
    use_ray: bool | None,
    nodes: set[str] | None,
) -> dict[str, Any] | None:
    """:func:`_publish`, reading the parent's :func:`shard_keys` on ``pool``."""
    cfg = settings.dataset
    listed_at = time.time()
    listing, overlays = faces_listing(store)
    files = [o.rel for o in listing]
    subjects = subject_keys(files)
    forgotten = forgotten_subjects(store)
    # Pass 1: the keys of every accepted face, with the ordinal of the group file holding it.
    cache = _load_keys(store, cfg.name, cfg.statuses)
    _refuse_vanished_files(store, cache.entries, files, cfg.name)
    parent_keys: Future[list[tuple[ShardInfo, pa.Table]]] | None = (
        pool.submit(shard_keys, store, cfg.name, parent) if parent is not None else None
    )
    cached = cache.entries
    current_parts = []
    fresh: list[tuple[ObjectInfo, _Entry]] = []
    # Each file's cached entry when its stamp is the one its keys were recorded with, else None.
    hits = [
        hit if (hit := cached.get(info.rel)) is not None and hit.stamp == info.stamp else None
        for info in listing
    ]
    # The others, each with its cached entry when only its label overlay changed since (the
    # faces file's own stamp is the one recorded; its overlay is then all that is read).
    misses = [
        (info, e if e is not None and _overlay_alone(info, e, overlays) else None)
        for info, hit in zip(listing, hits, strict=True)
        if hit is None
        for e in [cached.get(info.rel)]
    ]

    def compare(miss: tuple[ObjectInfo, _Entry | None]) -> tuple[_Entry, bool]:
        """(the file's new entry, whether its overlay alone was read)."""
        info, entry = miss
        if entry is not None and entry.base is not None:
            keys = _overlay_keys(store, info.rel, entry.base, cfg.statuses, subjects, forgotten)
            if keys is not None:
                return _Entry(info.stamp, keys, entry.base), True
        t = _read_group(store, info.rel, _COMPARE, overlays)
        keys = published_ids(store, _keys_of(_accepted(t, cfg.statuses)), subjects, forgotten)
        return _Entry(info.stamp, keys, _base_of(t)), False

    # The files whose stamp changed are read on a few threads, in listing order (each read is
    # a file and its overlay, or the overlay alone: on S3 requests that mostly wait).
    bases: list[str | None] = []
    per_file = np.zeros(len(listing), np.int64)  # accepted keys of each listed file
    overlay_only = 0
    with ThreadPoolExecutor(_COMPARE_THREADS, thread_name_prefix="faceloop-publish") as pool:
        read = iter(iterate(pool.map(compare, misses), "publish: compare", len(misses), "group"))
        for k, (info, hit) in enumerate(zip(listing, hits, strict=True)):
            if hit is None:
                hit, alone = next(read)
                overlay_only += alone
                fresh.append((info, hit))
            bases.append(hit.base)
            current_parts.append(hit.keys)
            per_file[k] = hit.keys.num_rows
    # Each key's file ordinal as one column for all files: a column made and appended per file
    # cost ~0.17 s of every publish of a 10^6-face store (5,000 files), whatever changed.
    current = (
        pa.concat_tables(current_parts)
        if current_parts
        else pa.table(
            {"face_id": pa.array([], pa.string()), "identity_id": pa.array([], pa.string())}
        )
    ).append_column("_file", pa.array(np.repeat(np.arange(len(listing), dtype=np.int32), per_file)))
    if fresh or set(cached) != set(files):
        _save_keys(
            store,
            cfg.name,
            cfg.statuses,
            listing,
            current,
            bases,
            listed_at - _STAMP_SETTLE_S,
            cache,
            fresh,
        )
    log.info(
        "publish: %d of %d faces files read (%d of them through their label overlay only; "
        "the others unchanged)",
        len(fresh),
        len(files),
        overlay_only,
    )
    del cache, cached, fresh, current_parts  # ``current`` holds what is needed
    index = KeyIndex(current.column("face_id"))
    if index.duplicates:
        raise StorageError("faces table holds duplicate face_id values; refusing to publish")

    if parent is None:
        if current.num_rows == 0:
            log.info("publish: no accepted faces and no version yet; nothing to publish")
            return None
        previous = current.schema.empty_table()
        parent_shards: list[tuple[ShardInfo, pa.Table]] = []
    else:
        assert parent_keys is not None
        parent_shards = parent_keys.result()
        parent_keys = None  # the keys go with their last use below
        previous = (
            pa.concat_tables([k for _, k in parent_shards])
            if parent_shards
            else current.schema.empty_table()
        )
    # Where each of the parent's faces is now (-1: gone), found once for the diff and the plan.
    parent_at = index.lookup(previous.column("face_id"))
    del index
    # Whether each parent row is still published with its identity: for the diff and the plan.
    same = same_assignment(previous, current, parent_at)
    changes = diff_assignments(previous, current, parent_at, same)
    if parent is not None and changes.num_rows == 0:
        log.info(
            "publish: %s v%d is up to date (%d faces); nothing to publish",
            cfg.name,
            parent,
            current.num_rows,
        )
        return None

    pooled = parent is not None and load_manifest(store, cfg.name, parent).pooled
    reuse, write_mask = _plan_reuse(
        parent_shards if pooled else [],
        current.select(_KEYS),
        cfg.shard_rows,
        MAX_SMALL_SHARDS,
        cfg.max_deleted_share,
        parent_at,
        same,
    )
    identities = class_index(current.column("identity_id"))
    # Pass 2 reads only the group files that hold a face to write, each filtered by its own
    # few face ids (one membership test per file against every face to write rebuilt a hash
    # set of them per file: quadratic in the store), one new shard per work item, on Ray Data
    # when there are many. The rows to write are a mask over ``current``, not a set of face
    # ids: a first version writes every face, and a hash set of 10^6 face ids was the
    # publish's peak memory; a file whose accepted faces are all written is named by a slice.
    writes = current if write_mask.all() else current.filter(pa.array(write_mask))
    expected = writes.num_rows
    items = _write_items(current, writes, files, cfg.shard_rows)
    del current, previous, parent_shards, writes  # the plan is all that is needed
    ray_on = _use_ray(settings, expected, use_ray)
    part = functools.partial(
        _write_part,
        name=cfg.name,
        statuses=list(cfg.statuses),
        overlays=sorted(overlays),
        subjects=sorted(subjects),
        forgotten=forgotten is not None,
    )
    meta = {"run_id": run_id, "config_hash": settings.config_hash(), "models": models}
    with DatasetWriter(
        store, cfg.name, cfg.shard_rows, meta, identities=identities, changes=changes, parent=parent
    ) as writer:
        for r in reuse:
            writer.reuse(r.shard, r.keys, r.deleted)
        # The shards arrive as their tasks finish; they are listed in item order, so the
        # version is the same on Ray as in this process.
        arrived: dict[int, dict[str, Any]] = {}
        listed = 0
        for i, out in ray_map_iter(
            settings, ray_on, "publish: write", items, part, nodes, "shard", store
        ):
            arrived[i] = out
            while listed in arrived:
                o = arrived.pop(listed)
                listed += 1
                writer.adopt(
                    ShardInfo(o["file"], o["rows"], o["bytes"], o["sha256"]),
                    o["counts"],
                    o["uploaded"],
                )
        if arrived or writer.rows_added != expected:
            # The faces table changed between the two passes: the changes would be wrong.
            raise StorageError(f"faces table changed during publish ({expected} rows planned)")
    log.info(
        "publish: %d rows reused in %d shards (%d of them with deleted rows), %d rows written "
        "(%d shard bytes)",
        writer.rows_reused,
        writer.shards_reused,
        sum(1 for r in reuse if len(r.deleted)),
        expected,
        writer.bytes_written,
    )
    if parent is not None and writer.manifest is not None and writer.manifest["num_rows"] == 0:
        # Published as asked (every face removed, forgotten or sent to review), but a new
        # `latest` with nothing in it is rarely meant: a settings change (quality gates,
        # thresholds) that took every face out of the training set was said at INFO only.
        log.warning(
            "publish: %s v%d holds no face (v%d held %d): is that meant? A settings change "
            "may have taken every face out of the training set; its parent stays readable",
            cfg.name,
            writer.manifest["version"],
            parent,
            load_manifest(store, cfg.name, parent).num_rows,
        )
    return writer.manifest


class Reuse(NamedTuple):
    """A parent shard the new version lists again: ``keys`` (face_id, identity_id) of the rows
    it holds, ``deleted`` the positions in the shard file of the rows it does not hold (the
    parent's deletions plus the rows removed or relabelled since)."""

    shard: ShardInfo
    keys: pa.Table
    deleted: np.ndarray


def plan_reuse(
    parent_shards: list[tuple[ShardInfo, pa.Table]],
    current: pa.Table,
    shard_rows: int,
    max_small_shards: int,
    max_deleted_share: float = MAX_DELETED_SHARE,
    parent_at: np.ndarray | None = None,
) -> tuple[list[Reuse], pa.Array]:
    """``(parent shards to reuse, face ids to write)``.

    ``parent_shards`` (as :func:`storage.versions.shard_keys` gives them: the keys of the rows
    the parent holds, with their file position ``_row``); ``current``: (face_id, identity_id)
    of the faces to publish (``parent_at``: the position in ``current`` of each parent row, in
    ``parent_shards`` order, -1 where it is gone, when the caller has looked them up). A
    parent shard is reused minus its rows that are no longer published with the same identity
    (a deletion vector), as long as at most ``max_deleted_share`` of its file's rows are
    deleted; past that its surviving rows are written again, into new shards, with the new
    and relabelled faces (the face ids to write are every face of ``current`` that no reused
    shard holds). So a few changed faces spread over every shard write only themselves. When
    more than ``max_small_shards`` reusable shards hold fewer than half of ``shard_rows``
    rows, those are written again, merged, so incremental versions do not end up as many tiny
    files."""
    reuse, write = _plan_reuse(
        parent_shards, current, shard_rows, max_small_shards, max_deleted_share, parent_at
    )
    now_fid = current.column("face_id")
    fids = now_fid.combine_chunks() if isinstance(now_fid, pa.ChunkedArray) else now_fid
    return reuse, fids.filter(pa.array(write))


def _plan_reuse(
    parent_shards: list[tuple[ShardInfo, pa.Table]],
    current: pa.Table,
    shard_rows: int,
    max_small_shards: int,
    max_deleted_share: float,
    parent_at: np.ndarray | None,
    same: np.ndarray | None = None,
) -> tuple[list[Reuse], np.ndarray]:
    """:func:`plan_reuse` with the faces to write as a mask over the rows of ``current``
    (``same``: :func:`storage.versions.same_assignment` of the parent's rows, when the caller
    has it)."""
    now_fid = current.column("face_id")
    if not parent_shards:
        return [], np.ones(len(now_fid), dtype=bool)
    sizes = np.array([k.num_rows for _, k in parent_shards], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if parent_at is None or same is None:
        keys = pa.concat_tables([k.select(_KEYS) for _, k in parent_shards])
        if parent_at is None:
            parent_at = KeyIndex(now_fid).lookup(keys.column("face_id"))
        same = same_assignment(keys, current, parent_at)
        del keys
    reuse: list[Reuse] = []
    held: list[np.ndarray] = []  # per reused shard: the positions in ``current`` it holds
    for i, (info, k) in enumerate(parent_shards):
        lo, hi = int(starts[i]), int(starts[i + 1])
        rows_held = (
            k.column("_row").to_numpy().astype(np.int64)
            if "_row" in k.column_names
            else np.arange(k.num_rows, dtype=np.int64)
        )
        prior = np.setdiff1d(np.arange(info.rows, dtype=np.int64), rows_held)
        keep = same[lo:hi]
        if keep.all():
            reuse.append(Reuse(info, k.select(_KEYS), prior))
            held.append(parent_at[lo:hi])
            continue
        deleted = np.union1d(prior, rows_held[~keep])
        if not keep.any() or len(deleted) > max_deleted_share * info.rows:
            continue  # its surviving rows are written again
        reuse.append(Reuse(info, k.select(_KEYS).filter(pa.array(keep)), deleted))
        held.append(parent_at[lo:hi][keep])
    small = {id(r) for r in reuse if r.keys.num_rows < shard_rows // 2}
    if len(small) > max_small_shards:
        kept = [(r, h) for r, h in zip(reuse, held, strict=True) if id(r) not in small]
        reuse, held = [r for r, _ in kept], [h for _, h in kept]
    write = np.ones(len(now_fid), dtype=bool)
    for h in held:
        write[h] = False
    return reuse, write
