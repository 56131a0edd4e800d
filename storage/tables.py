"""The faces and images tables of the store (layout in docs/DESIGN.md).

- ``tables/faces/<kind>/<group_key>.parquet``: current state of one source group (album or ID
  subject), FACES_SCHEMA, replaced whole whenever its rows change (except for labels alone, see
  the next item).
- ``tables/labels/<kind>/<group_key>.parquet``: a label overlay, LABELS_SCHEMA: face_id and
  the label columns of every face of the group, newer than the faces file's own. The label
  stage writes one instead of the whole faces file when only labels changed (a few KB, not the
  group's embeddings and crops). It applies to one write of its faces file only: every faces
  file carries a fresh write id in its Parquet metadata, the overlay names the id it was made
  for, and it is used only while that id and the face ids (in order) still match; readers get
  the merged rows (:func:`read_faces_file`). A write of the faces file folds it in and removes it.
- ``tables/images/<run_id>.parquet``: IMAGES_SCHEMA, one file per run, never modified by later
  runs; together they are the "seen" state of discovery.
- ``state/faces_generation``: a random token replaced before and after every write of a faces
  group, so a reader that remembers the token it started from can tell "nothing was written
  since" without reading the table (publish uses this to make a no-op refresh O(1)).

Every function works the same on a local and an S3 store (it only uses :class:`ObjectStore`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from faceloop.crashpoints import crash_point
from faceloop.schema import FACE_LABEL_COLUMNS, FACES_SCHEMA, IMAGES_SCHEMA, LABELS_SCHEMA
from storage import layout
from storage.objectstore import ObjectInfo, ObjectStore, conform

log = logging.getLogger(__name__)

_KINDS = ("album", "idcard")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def group_key(kind: str, group: str) -> str:
    """File stem of a source group: ``sha1(group)[:16]``, stable across runs and machines.

    ``kind`` is part of the folder, not the hash (an album and an ID subject may share a name).
    """
    _check_kind(kind)
    return hashlib.sha1(group.encode("utf-8")).hexdigest()[:16]


def faces_rel(kind: str, group: str) -> str:
    return layout.faces_group(kind, group_key(kind, group))


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"unknown source kind {kind!r}; expected one of {_KINDS}")


# Parquet metadata keys: a faces file's write id, and the write id a label overlay is for.
WRITE_ID = b"faceloop.write_id"
BASE_WRITE_ID = b"faceloop.base_write_id"


def with_write_id(table: pa.Table) -> pa.Table:
    """``table`` (a faces group about to be written) with a fresh write id in its metadata: a
    label overlay made for an earlier write of the file no longer applies to it."""
    meta = dict(table.schema.metadata or {})
    meta[WRITE_ID] = uuid.uuid4().hex.encode()
    return table.replace_schema_metadata(meta)


def write_id(table: pa.Table) -> str | None:
    """The write id of the faces file ``table`` was read from (None: written without one)."""
    v = (table.schema.metadata or {}).get(WRITE_ID)
    return v.decode() if v else None


def label_overlay(table: pa.Table, base_write_id: str) -> pa.Table:
    """The label overlay of a group: face_id and the label columns of ``table`` (every face of
    the group, in the faces file's order), for the faces file write ``base_write_id``."""
    t = conform(table.select(LABELS_SCHEMA.names), LABELS_SCHEMA)
    return t.replace_schema_metadata({BASE_WRITE_ID: base_write_id.encode()})


def overlay_base(overlay: pa.Table) -> str | None:
    """The faces-file write id a label overlay was made for (None: it names none)."""
    v = (overlay.schema.metadata or {}).get(BASE_WRITE_ID)
    return v.decode() if v else None


def apply_overlay(base: pa.Table, overlay: pa.Table | None) -> pa.Table:
    """``base`` (rows of one faces file, with its metadata) with the overlay's label columns
    when the overlay was made for this write of the file and lists the same faces in the same
    order; otherwise ``base`` unchanged (a stale overlay is ignored)."""
    if overlay is None:
        return base
    wid = write_id(base)
    if wid is None or overlay_base(overlay) != wid:
        return base
    if "face_id" not in base.column_names or not base.column("face_id").equals(
        overlay.column("face_id")
    ):
        log.warning("ignoring a label overlay whose faces differ from its faces file")
        return base
    for c in FACE_LABEL_COLUMNS:
        if c in base.column_names:
            i = base.schema.get_field_index(c)
            base = base.set_column(
                i, base.schema.field(i), overlay.column(c).cast(base.schema.field(i).type)
            )
    return base


def read_overlay(store: ObjectStore, rel: str) -> pa.Table | None:
    """The label overlay of the faces file ``rel``; None when it has none."""
    try:
        return store.read_parquet_file(layout.labels_of(rel))
    except FileNotFoundError:
        return None


def drop_overlays(store: ObjectStore, faces_rels: Iterable[str]) -> None:
    """Remove the label overlays of the faces files ``faces_rels`` (just rewritten: theirs no
    longer apply). A few are checked one by one, many against one listing."""
    rels = sorted({layout.labels_of(r) for r in faces_rels})
    if len(rels) > _EXISTS_MAX:
        present = {o.rel for o in store.list(layout.LABELS)}
        rels = [r for r in rels if r in present]
    for r in rels:
        store.delete(r)


def write_group(store: ObjectStore, kind: str, group: str, table: pa.Table) -> str:
    """Replace the faces of one source group with ``table`` (conformed to FACES_SCHEMA).

    Atomic per group: readers see the old rows or the new ones. Returns the object's key.
    Every row must belong to ``(kind, group)``: a misfiled row would be invisible to the next
    rewrite of its real group and could be duplicated.
    """
    table = _group_table(kind, group, table)
    rel = faces_rel(kind, group)
    # Before: a crash after the data write still leaves a new token. After: a reader that took
    # the token between the first bump and the data write sees it change again.
    bump_faces_generation(store)
    store.write_parquet(rel, table)
    crash_point("label")  # tests only (faceloop/crashpoints.py)
    drop_overlays(store, [rel])  # folded into ``table`` (read merged); stale from now on
    bump_faces_generation(store)
    log.debug("wrote %d faces to %s", table.num_rows, rel)
    return rel


def _group_table(kind: str, group: str, table: pa.Table) -> pa.Table:
    """``table`` conformed to FACES_SCHEMA, checked to hold only rows of ``(kind, group)``,
    with a fresh write id."""
    table = with_write_id(conform(table, FACES_SCHEMA))
    if table.num_rows:
        kinds = set(pc.unique(table.column("source_kind")).to_pylist())
        groups = set(pc.unique(table.column("source_group")).to_pylist())
        if kinds != {kind} or groups != {group}:
            raise ValueError(
                f"rows of other groups in write_group({kind!r}, {group!r}): {kinds} {groups}"
            )
    return table


def faces_removed(store: ObjectStore) -> set[str]:
    """The faces files the label commit removed itself (layout.FACES_REMOVED)."""
    try:
        return set(json.loads(store.read_bytes(layout.FACES_REMOVED)).get("files") or ())
    except FileNotFoundError:
        return set()
    except (ValueError, AttributeError) as exc:  # only a record: publish then asks for them
        log.warning("ignoring %s: %s", store.uri(layout.FACES_REMOVED), exc)
        return set()


def _note_removed(store: ObjectStore, removed: list[str], written: list[str]) -> None:
    """Record ``removed`` faces files before they go (a crash in between leaves them listed and
    still there: harmless), and take the files ``written`` again off the record."""
    if not removed and not store.exists(layout.FACES_REMOVED):
        return
    old = faces_removed(store)
    new = (old | set(removed)) - set(written)
    if new == old:
        return
    if new:
        store.write_bytes(layout.FACES_REMOVED, json.dumps({"files": sorted(new)}).encode())
    else:
        store.delete(layout.FACES_REMOVED)


def commit_run_tables(
    store: ObjectStore,
    run_id: str,
    groups: list[tuple[str, str, pa.Table]],
    images: pa.Table | None,
    staged_groups: list[tuple[str, str]] | None = None,
    staged_state: list[tuple[str, str]] | None = None,
) -> None:
    """Write a run's rewritten faces groups ``(kind, group, table)`` and its image rows so that
    a failure leaves no face without its image row.

    Phase 1 writes every file in full under ``staging/<run_id>/label/`` (where a full disk, a
    read-only store or an outage strikes); on any failure the staged files are removed and
    ``tables/`` is exactly as before. Phase 2 moves them in (renames on a local store: no new
    space needed): the faces groups, then the images file, between two faces-generation bumps.
    Only a crash inside phase 2 can leave faces whose image rows are missing, and the next run
    heals that: those images are not "seen", are processed again, their faces are found by
    face_id under the same URI (not added twice) and their image rows are written.

    ``staged_groups`` are faces group files that workers already wrote in full under staging
    (``(staged key, table key)``), moved in with the others; ``staged_state`` are label-state
    files, moved in after the faces (the state is only trusted once its meta names the faces
    generation this leaves, so a crash between the two is harmless).
    """
    staged: list[tuple[str, str]] = list(staged_groups or [])
    any_groups = bool(groups or staged)
    # A group left with no faces (every face moved to another subject's group) is deleted, as
    # forget deletes one it empties, not kept as an empty file.
    emptied = [faces_rel(kind, group) for kind, group, table in groups if not table.num_rows]
    try:
        for kind, group, table in groups:
            if not table.num_rows:
                continue  # deleted below
            rel = faces_rel(kind, group)
            tmp = layout.staging_label_file(run_id, rel)
            store.write_parquet(tmp, _group_table(kind, group, table))
            staged.append((tmp, rel))
        if images is not None and images.num_rows:
            rel = images_rel(run_id)
            tmp = layout.staging_label_file(run_id, rel)
            store.write_parquet(tmp, conform(images, IMAGES_SCHEMA))
            staged.append((tmp, rel))
        if any_groups:
            bump_faces_generation(store)
    except BaseException:
        for tmp, _ in staged + list(staged_state or []):
            try:
                store.delete(tmp)
            except Exception as exc:  # the original failure is the one to report
                log.warning("could not remove staged %s: %s", tmp, exc)
        raise
    for i, (tmp, rel) in enumerate(staged):
        store.move(tmp, rel)
        if i == 0 and any_groups:
            crash_point("label")  # tests only (faceloop/crashpoints.py)
    _note_removed(store, emptied, [rel for _, rel in staged])
    for rel in emptied:
        store.delete(rel)
    drop_overlays(store, emptied)
    # Faces files written in full hold their current labels: their old overlays go (a staged
    # overlay is for a faces file this run did not rewrite).
    overlays = {rel for _, rel in staged if rel.startswith(layout.LABELS + "/")}
    drop_overlays(
        store,
        [
            rel
            for _, rel in staged
            if rel.startswith(layout.FACES + "/") and layout.labels_of(rel) not in overlays
        ],
    )
    for tmp, rel in staged_state or []:
        store.move(tmp, rel)
    if any_groups:
        bump_faces_generation(store)
    log.debug("committed %d faces groups and the image rows of run %s", len(groups), run_id)


def bump_faces_generation(store: ObjectStore) -> str:
    """Replace the faces table's generation token (see the module docstring); the new token."""
    token = uuid.uuid4().hex
    store.write_bytes(layout.FACES_GENERATION, token.encode())
    return token


def faces_generation(store: ObjectStore) -> str:
    """The faces table's current generation token (made when there is none yet)."""
    try:
        return store.read_bytes(layout.FACES_GENERATION).decode().strip()
    except FileNotFoundError:
        return bump_faces_generation(store)


# Up to this many groups, faces_files checks each one's file instead of listing the table.
_EXISTS_MAX = 256


def faces_files(
    store: ObjectStore,
    kinds: Iterable[str] | None = None,
    groups: Iterable[tuple[str, str]] | None = None,
) -> list[str]:
    """Keys of the faces files, sorted; optionally only some kinds or ``(kind, group)`` pairs."""
    if groups is not None:
        wanted = sorted({faces_rel(k, g) for k, g in groups})
        if kinds is not None:
            ks = set(kinds)
            wanted = [w for w in wanted if w.split("/")[2] in ks]
        if len(wanted) <= _EXISTS_MAX:
            # A refresh asks for the few groups it touched: one existence check each, not a
            # listing of every group file in the store.
            return [w for w in wanted if store.exists(w)]
        present = {o.rel for o in store.list(layout.FACES)}
        return [w for w in wanted if w in present]
    files: list[str] = []
    for kind in sorted(set(kinds) if kinds is not None else _KINDS):
        _check_kind(kind)
        files += [
            o.rel for o in store.list(layout.faces_kind_dir(kind)) if o.rel.endswith(".parquet")
        ]
    return files


def subject_keys(files: list[str]) -> frozenset[str]:
    """The file stems (group keys) of the ID-card faces files among the listed ``files``: the
    subjects a publish names ``subject-<pseudonym>``."""
    prefix = layout.faces_kind_dir("idcard") + "/"
    return frozenset(
        f[len(prefix) :].removesuffix(".parquet") for f in files if f.startswith(prefix)
    )


def iter_faces(
    store: ObjectStore,
    columns: list[str] | None = None,
    kinds: Iterable[str] | None = None,
    groups: Iterable[tuple[str, str]] | None = None,
) -> Iterator[pa.Table]:
    """The faces table one group file at a time (bounded memory), each conformed to
    FACES_SCHEMA (projected to ``columns``), label overlays applied."""
    files = faces_files(store, kinds, groups)
    # A whole table is read against one listing of the overlays, a few groups one by one.
    overlays = None if groups is not None else {o.rel for o in store.list(layout.LABELS)}
    for rel in files:
        yield read_faces_file(store, rel, columns, overlays)


# A file written this close to a listing may be replaced again within the file system's
# timestamp granularity without its stamp changing: caches keyed by stamps skip such files.
STAMP_SETTLE_S = 2.0


def faces_listing(store: ObjectStore) -> tuple[list[ObjectInfo], set[str]]:
    """The faces group files with their stamps, sorted by key (one listing of the faces files,
    one of the label overlays), and the overlays. A file's stamp takes in its overlay's: the
    overlay changes the file's labels without touching the file. What caches of per-group
    figures key on (publish's keys, the run summary's counts)."""
    overlays = {
        layout.faces_of(o.rel): o for o in store.list(layout.LABELS) if o.rel.endswith(".parquet")
    }
    out = []
    for o in store.list(layout.FACES):
        if not o.rel.endswith(".parquet"):
            continue
        if (ov := overlays.get(o.rel)) is not None:
            mtimes = [m for m in (o.mtime, ov.mtime) if m is not None]
            o = ObjectInfo(o.rel, o.size, f"{o.etag}+{ov.stamp}", max(mtimes) if mtimes else None)
        out.append(o)
    return out, {layout.labels_of(r) for r in overlays}


def file_stamp(stamp: str) -> str:
    """The stamp of a faces file alone, from the stamp :func:`faces_listing` gave it (which
    takes in its label overlay's after a "+": S3 ETags and local "<mtime_ns>:<inode>" hold
    none)."""
    return stamp.partition("+")[0]


def read_faces_file(
    store: ObjectStore,
    rel: str,
    columns: list[str] | None = None,
    overlays: set[str] | None = None,
) -> pa.Table:
    """One faces group file conformed to FACES_SCHEMA (projected to ``columns``), its label
    overlay applied; ``overlays``: the overlays known to exist (None: look for this one)."""
    t = read_faces_group(store, rel, columns, overlays)
    return t.replace_schema_metadata(None)


def read_faces_group(
    store: ObjectStore,
    rel: str,
    columns: list[str] | None = None,
    overlays: set[str] | None = None,
) -> pa.Table:
    """As :func:`read_faces_file`, keeping the faces file's write id (:func:`write_id`) in
    the table's metadata: what a label overlay for this read must name."""
    labels = columns is None or any(c in FACE_LABEL_COLUMNS for c in columns)
    cols = (
        columns if columns is None or "face_id" in columns or not labels else [*columns, "face_id"]
    )
    t = store.read_parquet_file(rel, columns=cols)
    meta = {WRITE_ID: m} if (m := (t.schema.metadata or {}).get(WRITE_ID)) else None
    if labels and (overlays is None or layout.labels_of(rel) in overlays):
        t = apply_overlay(t, read_overlay(store, rel))
    return conform(t, _project(FACES_SCHEMA, columns)).replace_schema_metadata(meta)


def read_faces(
    store: ObjectStore,
    columns: list[str] | None = None,
    kinds: Iterable[str] | None = None,
    groups: Iterable[tuple[str, str]] | None = None,
) -> pa.Table:
    """The faces table (or part of it) as one table; empty with FACES_SCHEMA when none."""
    parts = list(iter_faces(store, columns, kinds, groups))
    if not parts:
        return _project(FACES_SCHEMA, columns).empty_table()
    return pa.concat_tables(parts)


def images_rel(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run_id not usable as a file name: {run_id!r}")
    return layout.images_run(run_id)


def check_run_id(run_id: str) -> str:
    """``run_id`` when it can name a run's files, else :class:`faceloop.errors.ConfigError`,
    before any work: called by the stages' entry points (discover, the face stage, label_run),
    which a library user may call with their scheduler's ids (Airflow's hold ':' and fail only
    when the run's tables are committed, after all its model work)."""
    from faceloop.errors import ConfigError

    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ConfigError(
            f"run_id {run_id!r} cannot name the run's files (letters, digits, '.', '_' and '-'; "
            "at most 128): use faceloop.runids.new_run_id(), whose ids also sort by time, as "
            "the images table needs (a path's latest row is its latest run id's)"
        )
    return run_id


def run_committed(store: ObjectStore, run_id: str) -> bool:
    """Whether run ``run_id`` recorded its images (or its run record): another run given that
    id would replace its images file, and its rows would be lost."""
    return store.exists(layout.images_run(run_id)) or store.exists(layout.run_record(run_id))


def append_images(store: ObjectStore, run_id: str, table: pa.Table) -> str:
    """Record the images a run has seen as ``tables/images/<run_id>.parquet``.

    One file per run: calling again with the same ``run_id`` replaces that run's file (so a
    retried task does not duplicate rows); other runs' files are never touched. An empty table
    writes nothing. Returns the key.
    """
    rel = images_rel(run_id)
    table = conform(table, IMAGES_SCHEMA)
    if table.num_rows == 0:
        return rel
    store.write_parquet(rel, table)
    log.debug("wrote %d image rows to %s", table.num_rows, rel)
    return rel


def image_runs(store: ObjectStore) -> list[str]:
    """The ids of the runs that recorded images (one ``tables/images/<run_id>.parquet`` each)."""
    return [
        o.rel.rsplit("/", 1)[-1].removesuffix(".parquet")
        for o in store.list(layout.IMAGES)
        if o.rel.endswith(".parquet")
    ]


def read_images(
    store: ObjectStore,
    columns: list[str] | None = None,
    where: pc.Expression | None = None,
) -> pa.Table:
    """All runs' image rows (those matching ``where`` only, filtered while each run's file is
    decoded); an empty IMAGES_SCHEMA table when there are none."""
    schema = _project(IMAGES_SCHEMA, columns)
    parts = [
        conform(store.read_parquet_file(o.rel, columns=columns, filter=where), schema)
        for o in store.list(layout.IMAGES)
        if o.rel.endswith(".parquet")
    ]
    return pa.concat_tables(parts) if parts else schema.empty_table()


def latest_images(store: ObjectStore, columns: list[str] | None = None) -> pa.Table:
    """The images table's current state: one row per ``image_uri``, the latest run's (run ids
    sort by time). The table keeps every run's rows (a changed file, a rerun over the same
    files); counts of images are counts of this."""
    cols = None if columns is None else list(dict.fromkeys([*columns, "image_uri", "run_id"]))
    table = latest_rows(read_images(store, columns=cols))
    return table if columns is None else table.select(columns)


def latest_rows(table: pa.Table) -> pa.Table:
    """The latest row of each ``image_uri`` of images-table rows (:func:`latest_images`)."""
    n = table.num_rows
    if n:
        # Sorted by URI then run (a stable sort), the last row of each run of equal URIs; the
        # URIs compared in Arrow (a Python string per row and a loop over them took 0.4 s of
        # 0.9 at 10^6 rows).
        order = pc.sort_indices(
            table, sort_keys=[("image_uri", "ascending"), ("run_id", "ascending")]
        )
        uris = table.column("image_uri").take(order)
        a, b = uris.slice(0, n - 1), uris.slice(1)
        differs = pc.if_else(  # a null URI equals a null one (as Python's == has it)
            pc.and_(pc.is_valid(a), pc.is_valid(b)),
            pc.not_equal(a, b),
            pc.xor(pc.is_null(a), pc.is_null(b)),
        ).combine_chunks()
        last = pa.concat_arrays([differs, pa.array([True])])
        table = table.take(pc.filter(order, last))
    return table


def _project(schema: pa.Schema, columns: list[str] | None) -> pa.Schema:
    if columns is None:
        return schema
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown columns {unknown}")
    return pa.schema([schema.field(c) for c in columns])
