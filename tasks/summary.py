"""Run summaries: counts of what the store holds after a run, as a dict and a markdown table."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from faceloop.schema import AUTO, HUMAN, IMG_NO_FACE, IMG_QUARANTINED, QUARANTINED, REJECTED, REVIEW
from storage import layout
from storage.objectstore import ObjectStore
from storage.tables import read_faces, read_images


def new_run_id() -> str:
    """Sortable, unique: UTC time plus a little randomness."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def store_counts(store: ObjectStore) -> dict[str, int]:
    """Counts over the whole store (every run so far)."""
    faces = read_faces(store, columns=["status", "identity_id"])
    images = read_images(store, columns=["status"])
    status = faces.column("status")

    def count(col, value: str) -> int:
        return int(pc.sum(pc.equal(col, value)).as_py() or 0) if len(col) else 0

    accepted = faces.filter(pc.is_in(status, value_set=pa.array([AUTO, HUMAN])))
    ids = accepted.column("identity_id").drop_null()
    return {
        "images": len(images),
        "faces": len(faces),
        "identities": len(pc.unique(ids)) if len(ids) else 0,
        "auto": count(status, AUTO),
        "human": count(status, HUMAN),
        "review": count(status, REVIEW),
        "rejected": count(status, REJECTED),
        "quarantined": count(status, QUARANTINED) + count(images.column("status"), IMG_QUARANTINED),
        "images without a face": count(images.column("status"), IMG_NO_FACE),
    }


def markdown_table(summary: dict[str, Any]) -> str:
    """The summary as a two-column markdown table (Prefect artifact and CLI output)."""
    rows = [("run", summary.get("run_id", ""))]
    rows += [(k, summary["totals"][k]) for k in summary["totals"]]
    rows += [(f"this run: {k}", v) for k, v in summary.get("run", {}).items()]
    lines = ["| what | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_review_queue(store: ObjectStore, run_id: str) -> tuple[str, int]:
    """Snapshot of the faces waiting for a person (status=review), with the Label Studio task
    kind each would become (None: stays in review, not worth an annotator's minute alone).
    Rewritten whole after every labelling run; the faces table stays the source of truth."""
    from faceloop.vocab import reason_code, task_kind_for

    cols = [
        "face_id",
        "image_uri",
        "source_kind",
        "source_group",
        "role",
        "identity_id",
        "reason",
        "score",
        "quality",
    ]
    faces = read_faces(store, columns=[*cols, "status"])
    queue = faces.filter(pc.equal(faces.column("status"), REVIEW)).select(cols)
    reasons = queue.column("reason").to_pylist()
    queue = queue.append_column(
        "reason_code", pa.array([reason_code(r or "") for r in reasons], pa.string())
    )
    queue = queue.append_column(
        "task_kind", pa.array([task_kind_for(r) for r in reasons], pa.string())
    )
    queue = queue.append_column("run_id", pa.array([run_id] * len(queue), pa.string()))
    store.write_parquet(layout.REVIEW_QUEUE, queue)
    return layout.REVIEW_QUEUE, len(queue)


def write_run_record(store: ObjectStore, summary: dict[str, Any]) -> str:
    rel = layout.run_record(summary["run_id"])
    store.write_bytes(rel, json.dumps(summary, indent=2, default=str).encode())
    return rel
