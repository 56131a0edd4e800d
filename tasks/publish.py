"""Publish the accepted faces as a new dataset version, only when something changed.

A face is published when its ``status`` is in ``settings.dataset.statuses`` and it has an
``identity_id`` and an ``aligned_jpeg``. "Changed" means the face_id -> identity_id mapping of
those faces differs from the newest committed version's (a face added, removed or
relabelled); re-running with the same faces table publishes nothing.

Two streaming passes over the faces table, one group file at a time: the first reads only
(face_id, identity_id, status, aligned_jpeg) to decide and to build the class list; the second
reads the published columns and feeds the :class:`storage.versions.DatasetWriter`.

Neither pass runs when nothing can have changed: ``state/published`` records the faces-table
generation token (:func:`storage.tables.faces_generation`), the dataset's newest version and the
accepted statuses of the last decision; when all three are what they were, publish returns at
once (a no-op refresh then costs O(1) here instead of a read of every crop).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from faceloop.config import Settings
from faceloop.errors import StorageError
from faceloop.progress import iterate
from storage import layout
from storage.objectstore import ObjectStore
from storage.tables import faces_generation, iter_faces
from storage.versions import (
    DatasetWriter,
    class_index,
    diff_assignments,
    newest_version,
    read_shards,
)

log = logging.getLogger(__name__)

_KEYS = ["face_id", "identity_id"]


def _accepted(table: pa.Table, statuses: list[str]) -> pa.Table:
    mask = pc.and_(
        pc.and_(
            pc.fill_null(
                pc.is_in(table.column("status"), value_set=pa.array(statuses, pa.string())), False
            ),
            pc.is_valid(table.column("identity_id")),
        ),
        pc.is_valid(table.column("aligned_jpeg")),
    )
    return table.filter(mask)


def publish_dataset(
    settings: Settings, store: ObjectStore, run_id: str, models: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Write a new version of ``settings.dataset.name`` if the accepted faces changed since the
    newest version (or there is none yet and there are accepted faces). Returns the new
    manifest, or None when nothing was published."""
    cfg = settings.dataset
    state_rel = layout.published_state(cfg.name)
    generation = faces_generation(store)  # taken before reading: a later write changes it
    decided = {"faces_generation": generation, "statuses": sorted(cfg.statuses)}
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
    manifest = _publish(settings, store, run_id, models, parent=newest)
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
) -> dict[str, Any] | None:
    """The two passes; ``parent`` is the newest committed version (None: there is none)."""
    cfg = settings.dataset
    current_parts = [
        _accepted(t, cfg.statuses).select(_KEYS)
        for t in iterate(
            iter_faces(store, columns=["face_id", "identity_id", "status", "aligned_jpeg"]),
            "publish: compare",
            unit="group",
        )
    ]
    current = (
        pa.concat_tables(current_parts)
        if current_parts
        else pa.table(
            {"face_id": pa.array([], pa.string()), "identity_id": pa.array([], pa.string())}
        )
    )
    if pc.count_distinct(current.column("face_id")).as_py() != current.num_rows:
        raise StorageError("faces table holds duplicate face_id values; refusing to publish")

    if parent is None:
        if current.num_rows == 0:
            log.info("publish: no accepted faces and no version yet; nothing to publish")
            return None
        previous = current.schema.empty_table()
    else:
        previous = read_shards(store, cfg.name, parent, columns=_KEYS)
    changes = diff_assignments(previous, current)
    if parent is not None and changes.num_rows == 0:
        log.info(
            "publish: %s v%d is up to date (%d faces); nothing to publish",
            cfg.name,
            parent,
            current.num_rows,
        )
        return None

    identities = class_index(current.column("identity_id"))
    expected = current.num_rows
    del current, previous, current_parts  # only the class list and the changes are needed now
    meta = {"run_id": run_id, "config_hash": settings.config_hash(), "models": models}
    with DatasetWriter(
        store, cfg.name, cfg.shard_rows, meta, identities=identities, changes=changes, parent=parent
    ) as writer:
        for t in iterate(
            iter_faces(
                store,
                columns=[
                    "face_id",
                    "identity_id",
                    "status",
                    "aligned_jpeg",
                    "quality",
                    "source_kind",
                ],
            ),
            "publish: write",
            unit="group",
        ):
            rows = _accepted(t, cfg.statuses).sort_by("face_id")
            writer.write(
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
        if writer.rows_added != expected:
            # The faces table changed between the two passes: the changes would be wrong.
            raise StorageError(f"faces table changed during publish ({expected} rows planned)")
    return writer.manifest
