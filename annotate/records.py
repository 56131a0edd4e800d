"""The review records in the store: what was pushed, what annotators answered, what was applied.

Promises: the three Arrow schemas below and the only code that reads or writes them, plus the
pull cursor. Everything lives under :data:`REVIEWS` (``<store>/tables/reviews/``):

- ``tasks/<batch>.parquet``   one row per task pushed (key, project, task id, faces); written
  *before* import with ``task_id`` null and rewritten with the ids after it, so a crash between
  the two is repaired on the next push by looking the keys up in Label Studio.
- ``answers/<pull>.parquet``  each completed annotation verbatim (JSON) plus its parsed decision.
- ``applied/<pull>.parquet``  each resolution applied (or held as a conflict) and faces settled.
- ``state.json``              the pull cursor per project (``updated_at`` of the newest task seen)
  and the recorded projects Label Studio no longer has.

Files are only ever added (a batch file is rewritten once, with its task ids); readers merge
them: :func:`read_task_records` keeps one row per key, :func:`all_answers` the latest version of
each annotation. No Label Studio here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from annotate import review as rv
from storage import layout
from storage.objectstore import ObjectStore

# The one place the review records' prefix is spelled (storage/layout.py will own it).
REVIEWS = layout.REVIEWS
STATE = layout.REVIEW_STATE

TASKS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),
        ("project_id", pa.int64()),
        ("task_id", pa.int64()),
        ("face_ids", pa.list_(pa.string())),
        ("shown", pa.list_(pa.string())),
        ("identity_ids", pa.list_(pa.string())),
        ("suspects", pa.list_(pa.string())),
        ("proposal", pa.string()),
        ("score", pa.float32()),
        ("subject", pa.string()),
        ("model_version", pa.string()),
        ("pushed_at", pa.string()),
    ]
)
ANSWERS_SCHEMA = pa.schema(
    [
        ("task_key", pa.string()),
        ("kind", pa.string()),
        ("project_id", pa.int64()),
        ("task_id", pa.int64()),
        ("annotation_id", pa.int64()),
        ("annotator", pa.string()),
        ("updated_at", pa.string()),
        ("cancelled", pa.bool_()),
        ("decision", pa.string()),
        ("marked", pa.list_(pa.string())),
        ("raw_json", pa.string()),
        ("pulled_at", pa.string()),
        # Label Studio's created_at of the annotation (answers pulled before it was recorded
        # have it in raw_json only): see annotation_key.
        ("created_at", pa.string()),
    ]
)
APPLIED_SCHEMA = pa.schema(
    [
        ("task_key", pa.string()),
        ("kind", pa.string()),
        ("decision", pa.string()),
        ("conflict", pa.bool_()),
        ("annotators", pa.list_(pa.string())),
        ("annotation_ids", pa.list_(pa.int64())),
        ("settled", pa.int64()),
        ("run_id", pa.string()),
        ("applied_at", pa.string()),
    ]
)


def now() -> str:
    """The timestamp written into records (UTC, ISO-8601)."""
    return datetime.now(UTC).isoformat()


def new_id() -> str:
    """A fresh record file name: sortable by time, unique across concurrent writers."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


# -- tasks ----------------------------------------------------------------------------------


def new_tasks_file(prefix: str = "") -> str:
    """The key of a new tasks file (``prefix`` marks repairs: ``repair-``)."""
    return f"{layout.REVIEW_TASKS}/{prefix}{new_id()}.parquet"


def read_task_records(store: ObjectStore) -> pa.Table:
    """All pushed-task rows, one per key: the latest push (``pushed_at``) that has a task id,
    else the unconfirmed one. A key has two confirmed rows when its task went missing from
    Label Studio and was pushed again (:func:`annotate.sync.push_items`)."""
    t = store.read_parquet(layout.REVIEW_TASKS, schema=TASKS_SCHEMA)
    rows: dict[str, dict[str, Any]] = {}
    for r in t.to_pylist():
        prev = rows.get(r["key"])
        if (
            prev is None
            or prev["task_id"] is None
            or (r["task_id"] is not None and (r["pushed_at"] or "") > (prev["pushed_at"] or ""))
        ):
            rows[r["key"]] = r
    return pa.Table.from_pylist(list(rows.values()), schema=TASKS_SCHEMA)


def write_task_records(store: ObjectStore, rel: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write (or rewrite) the tasks file ``rel`` with ``rows`` (see :func:`task_record`)."""
    store.write_parquet(rel, pa.Table.from_pylist(list(rows), schema=TASKS_SCHEMA))


def task_record(
    item: rv.ReviewItem, project: int, task_id: int | None, mv: str, at: str
) -> dict[str, Any]:
    """The tasks row of ``item`` pushed to ``project`` (``task_id`` None until imported)."""
    return {
        "key": item.key,
        "kind": item.kind,
        "project_id": project,
        "task_id": task_id,
        "face_ids": list(item.face_ids),
        "shown": list(item.shown),
        "identity_ids": list(item.identity_ids),
        "suspects": list(item.suspects),
        "proposal": item.proposal,
        "score": item.score,
        "subject": item.subject,
        "model_version": mv,
        "pushed_at": at,
    }


def item_from_record(r: Mapping[str, Any]) -> rv.ReviewItem:
    """The review item a tasks row was pushed for."""
    return rv.ReviewItem(
        kind=r["kind"],
        key=r["key"],
        face_ids=tuple(r["face_ids"] or ()),
        shown=tuple(r["shown"] or ()),
        proposal=r["proposal"] or "",
        score=float(r["score"] or 0.0),
        identity_ids=tuple(r["identity_ids"] or ()),
        suspects=tuple(r["suspects"] or ()),
        subject=r["subject"],
    )


# -- answers --------------------------------------------------------------------------------


def answer_row(
    a: rv.Answer,
    ann: Mapping[str, Any],
    project: int,
    task_id: int,
    pulled_at: str,
) -> dict[str, Any]:
    """The answers row of annotation ``ann`` (kept verbatim as JSON) parsed into ``a``."""
    return {
        "task_key": a.task_key,
        "kind": a.kind,
        "project_id": project,
        "task_id": task_id,
        "annotation_id": a.annotation_id,
        "annotator": a.annotator,
        "updated_at": a.updated_at,
        "cancelled": a.cancelled,
        "decision": a.decision,
        "marked": list(a.marked),
        "raw_json": json.dumps(ann, sort_keys=True, default=str),
        "pulled_at": pulled_at,
        "created_at": a.created_at,
    }


AnnotationKey = tuple[int, str]


def annotation_key(a: rv.Answer) -> AnnotationKey:
    """What tells one annotation from another: its Label Studio id and when it was made. The
    id alone does not: Label Studio started on a fresh database (or another instance) numbers
    annotations from 1 again, and an answer recorded before would be taken for an earlier
    version of a new one to another task (and replaced by it)."""
    return (a.annotation_id, a.created_at)


def _created_at(row: Mapping[str, Any]) -> str:
    """A recorded answer's ``created_at``; from its verbatim JSON for rows recorded before the
    column was."""
    if row.get("created_at") is not None:
        return str(row["created_at"])
    try:
        return str(json.loads(row.get("raw_json") or "{}").get("created_at") or "")
    except (ValueError, AttributeError):
        return ""


def recorded_answer_versions(store: ObjectStore) -> set[tuple[AnnotationKey, str]]:
    """``(annotation key, updated_at)`` of every recorded answer (:func:`annotation_key`)."""
    columns = ["annotation_id", "updated_at", "created_at"]
    t = store.read_parquet(layout.REVIEW_ANSWERS, columns=columns, schema=ANSWERS_SCHEMA)
    if t.column("created_at").null_count:
        # Answers recorded before the column: their verbatim JSON (the table's largest
        # column) is read only then.
        t = store.read_parquet(
            layout.REVIEW_ANSWERS, columns=[*columns, "raw_json"], schema=ANSWERS_SCHEMA
        )
    return {((r["annotation_id"], _created_at(r)), r["updated_at"]) for r in t.to_pylist()}


def write_answers(store: ObjectStore, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """Store answers rows in a new file; its key, or None when there are none."""
    if not rows:
        return None
    rel = f"{layout.REVIEW_ANSWERS}/{new_id()}.parquet"
    store.write_parquet(rel, pa.Table.from_pylist(list(rows), schema=ANSWERS_SCHEMA))
    return rel


def all_answers(store: ObjectStore) -> list[rv.Answer]:
    """Every answer ever recorded, latest version per annotation (:func:`annotation_key`)."""
    latest: dict[AnnotationKey, rv.Answer] = {}
    for r in store.read_parquet(layout.REVIEW_ANSWERS, schema=ANSWERS_SCHEMA).to_pylist():
        a = rv.Answer(
            r["task_key"],
            r["kind"],
            r["annotation_id"],
            r["annotator"],
            r["updated_at"],
            r["decision"] or "",
            tuple(r["marked"] or ()),
            bool(r["cancelled"]),
            _created_at(r),
        )
        prev = latest.get(annotation_key(a))
        if prev is None or a.updated_at >= prev.updated_at:
            latest[annotation_key(a)] = a
    return list(latest.values())


# -- applied --------------------------------------------------------------------------------


def record_applied(
    store: ObjectStore,
    resolutions: Sequence[rv.Resolution],
    settled: Mapping[str, int],
    run_id: str,
) -> str | None:
    """Store the resolutions applied by ``run_id`` with the faces each settled; the file's key,
    or None when there are none."""
    if not resolutions:
        return None
    at = now()
    rows = [
        {
            "task_key": r.task_key,
            "kind": r.kind,
            "decision": r.decision,
            "conflict": r.conflict,
            "annotators": list(r.annotators),
            "annotation_ids": list(r.annotation_ids),
            "settled": int(settled.get(r.task_key, 0)),
            "run_id": run_id,
            "applied_at": at,
        }
        for r in resolutions
    ]
    rel = f"{layout.REVIEW_APPLIED}/{new_id()}.parquet"
    store.write_parquet(rel, pa.Table.from_pylist(rows, schema=APPLIED_SCHEMA))
    return rel


def read_applied(store: ObjectStore) -> pa.Table:
    """Every applied-resolution row ever recorded (empty APPLIED_SCHEMA table when none)."""
    return store.read_parquet(layout.REVIEW_APPLIED, schema=APPLIED_SCHEMA)


# -- state ----------------------------------------------------------------------------------


def read_state(store: ObjectStore) -> dict[str, Any]:
    """The review state (``{"cursor": {project id: updated_at}, "projects_gone": [ids]}``);
    empty cursor at first."""
    return json.loads(store.read_bytes(STATE)) if store.exists(STATE) else {"cursor": {}}


def write_state(store: ObjectStore, state: Mapping[str, Any]) -> None:
    """Replace the review state."""
    store.write_bytes(STATE, json.dumps(state, indent=1, sort_keys=True).encode())
