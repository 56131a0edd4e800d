"""Run summaries: counts of what the store holds after a run, as a :class:`RunSummary` (JSON in
``runs/<run_id>.json``, snake_case keys) and a markdown table (the only place with prose)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.errors import StorageError
from faceloop.schema import AUTO, HUMAN, IMG_NO_FACE, IMG_QUARANTINED, QUARANTINED, REJECTED, REVIEW
from storage import layout
from storage.objectstore import ObjectStore
from storage.tables import latest_images

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """Sortable, unique: UTC time plus a little randomness."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def _label(f: Any) -> str:
    """How a summary field is printed: its ``label`` metadata, else its name with spaces."""
    return f.metadata.get("label", f.name.replace("_", " "))


@dataclass
class StoreTotals:
    """Counts over the whole store (every run so far). Images are counted once per URI, in the
    state of the latest run that recorded it (reruns and changed files are not added up)."""

    images: int = 0
    faces: int = 0
    identities: int = 0
    auto: int = 0
    human: int = 0
    review: int = 0
    rejected: int = 0
    quarantined: int = 0  # faces and images
    images_without_face: int = field(default=0, metadata={"label": "images without a face"})


@dataclass
class RunCounts:
    """What this run did. Every file listed is exactly one of: already seen (recorded by an
    earlier run), a new image (content a model decoded for the first time), moved (known bytes
    whose earlier paths are gone: faces reused), a duplicate (same bytes as an image still
    there) or quarantined (unusable, with its reason). ``files_hashed``: files whose bytes
    discovery read (new or changed stamps); ``images_sent_to_models``: images that reached the
    detector."""

    files_listed: int = 0
    already_seen: int = 0
    new_images: int = 0
    moved: int = field(default=0, metadata={"label": "moved (faces reused)"})
    duplicates: int = field(default=0, metadata={"label": "duplicates (same bytes)"})
    quarantined: int = 0
    files_hashed: int = field(default=0, metadata={"label": "files read to hash them"})
    images_sent_to_models: int = field(default=0, metadata={"label": "images sent to the models"})
    label_nodes: int = field(
        default=0, metadata={"label": "Ray nodes the label passes ran on (0: in the driver)"}
    )
    new_faces: int = 0
    changed_faces: int = field(default=0, metadata={"label": "faces whose label changed"})
    reembedded_faces: int = field(default=0, metadata={"label": "faces re-embedded (new model)"})
    dataset_version: str = "unchanged"  # "<name> v<version>" when this run published one


@dataclass
class DatasetInfo:
    """The dataset version a run published."""

    name: str
    version: int
    num_rows: int
    num_classes: int


@dataclass
class RunSummary:
    """One refresh: store totals, this run's counts, stage timings (seconds), the dataset version
    published (None: unchanged), the models used, the review push outcome and where the run's
    report and record are."""

    run_id: str
    store: str
    totals: StoreTotals
    run: RunCounts
    timings: dict[str, float] = field(default_factory=dict)
    dataset: DatasetInfo | None = None
    models: list[dict[str, Any]] = field(default_factory=list)
    review: str | None = None
    report: str | None = None
    record: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        """The summary of a ``runs/<run_id>.json`` record."""
        ds = d.get("dataset")
        return cls(
            run_id=d["run_id"],
            store=d["store"],
            totals=StoreTotals(**d["totals"]),
            run=_run_counts(d["run"]),
            timings=dict(d.get("timings") or {}),
            dataset=DatasetInfo(**ds) if ds else None,
            models=list(d.get("models") or []),
            review=d.get("review"),
            report=d.get("report"),
            record=d.get("record"),
        )

    def rows(self) -> list[tuple[str, Any]]:
        """(what, count) rows in prose: the run id, the totals, then this run's counts."""
        out: list[tuple[str, Any]] = [("run", self.run_id)]
        out += [(_label(f), getattr(self.totals, f.name)) for f in fields(self.totals)]
        out += [(f"this run: {_label(f)}", getattr(self.run, f.name)) for f in fields(self.run)]
        return out


def _run_counts(d: dict[str, Any]) -> RunCounts:
    """RunCounts of a stored record; records written before ``duplicates`` existed have
    ``quarantined_at_discovery`` instead of ``quarantined``."""
    d = dict(d)
    if "quarantined_at_discovery" in d:
        d.setdefault("quarantined", d.pop("quarantined_at_discovery"))
    names = {f.name for f in fields(RunCounts)}
    return RunCounts(**{k: v for k, v in d.items() if k in names})


def store_counts(store: ObjectStore, groups: pa.Table | None = None) -> StoreTotals:
    """Counts over the whole store (every run so far); images in their latest state per URI.
    The faces' counts come from :func:`group_summaries` (``groups``: already taken)."""
    g = group_summaries(store) if groups is None else groups
    images = latest_images(store, columns=["status"])

    def count(col: pa.ChunkedArray, value: str) -> int:
        return int(pc.sum(pc.equal(col, value)).as_py() or 0) if len(col) else 0

    def total(name: str) -> int:
        return int(pc.sum(g.column(name)).as_py() or 0) if g.num_rows else 0

    ids = pc.list_flatten(g.column("identities")) if g.num_rows else pa.array([], pa.string())
    return StoreTotals(
        images=len(images),
        faces=total("faces"),
        identities=len(pc.unique(ids)) if len(ids) else 0,
        auto=total(AUTO),
        human=total(HUMAN),
        review=total(REVIEW),
        rejected=total(REJECTED),
        quarantined=total(QUARANTINED) + count(images.column("status"), IMG_QUARANTINED),
        images_without_face=count(images.column("status"), IMG_NO_FACE),
    )


def markdown_table(summary: RunSummary) -> str:
    """The summary as a two-column markdown table (Prefect artifact and CLI output)."""
    rows = summary.rows()
    lines = ["| what | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_review_queue(
    store: ObjectStore, run_id: str, groups: pa.Table | None = None
) -> tuple[str, int]:
    """Snapshot of the faces waiting for a person (status=review), with the Label Studio task
    kind each would become (None: stays in review, not worth an annotator's minute alone).
    Rewritten whole after every labelling run from :func:`group_summaries` (``groups``: already
    taken); the faces table stays the source of truth."""
    from faceloop.vocab import task_kind_for_code

    g = group_summaries(store) if groups is None else groups
    rows = pc.list_flatten(g.column("queue")) if g.num_rows else None
    if rows is None or not len(rows):
        queue = _QUEUE_ROW.empty_table()
    else:
        queue = pa.Table.from_struct_array(rows.combine_chunks())
    codes = queue.column("reason_code").to_pylist()
    queue = queue.append_column(
        "task_kind", pa.array([task_kind_for_code(c) for c in codes], pa.string())
    )
    queue = queue.append_column("run_id", pa.array([run_id] * len(queue), pa.string()))
    store.write_parquet(layout.REVIEW_QUEUE, queue)
    return layout.REVIEW_QUEUE, len(queue)


# ---- per faces file: status counts, accepted identities and review rows (a cache)

# The review queue's columns, as the faces table has them (reason_code parsed from the reason
# where a store written before the column existed has none).
_QUEUE_ROW = pa.schema(
    [
        ("face_id", pa.string()),
        ("image_uri", pa.string()),
        ("source_kind", pa.string()),
        ("source_group", pa.string()),
        ("role", pa.string()),
        ("identity_id", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float32()),
        ("quality", pa.float32()),
        ("reason_code", pa.string()),
    ]
)
_STATUSES = (AUTO, HUMAN, REVIEW, REJECTED, QUARANTINED)
GROUP_SUMMARY_SCHEMA = pa.schema(
    [
        ("rel", pa.string()),
        ("stamp", pa.string()),  # null: written too close to the listing to be trusted later
        ("faces", pa.int64()),
        *((s, pa.int64()) for s in _STATUSES),
        ("identities", pa.list_(pa.string())),  # distinct ids of its accepted faces
        ("queue", pa.list_(pa.struct(list(_QUEUE_ROW)))),  # its status=review faces
    ]
)
_READ = [*(n for n in _QUEUE_ROW.names if n != "reason_code"), "reason_code", "status"]


def _queue_rows(t: pa.Table) -> pa.Table:
    """The status=review rows of one faces file (``_READ`` columns) as ``_QUEUE_ROW``."""
    from faceloop.vocab import reason_code

    q = t.filter(pc.fill_null(pc.equal(t.column("status"), REVIEW), False))
    codes = q.column("reason_code")
    if codes.null_count:  # written before the column existed: parse the reason
        codes = pa.array(
            [
                c or reason_code(r)
                for c, r in zip(codes.to_pylist(), q.column("reason").to_pylist(), strict=True)
            ],
            pa.string(),
        )
        q = q.set_column(q.schema.get_field_index("reason_code"), "reason_code", codes)
    return q.select(_QUEUE_ROW.names).cast(_QUEUE_ROW)


def _summaries(rows: list[tuple[str, str | None, pa.Table]]) -> pa.Table:
    """GROUP_SUMMARY_SCHEMA rows of faces files ``(rel, stamp, rows with _READ columns)``."""
    counts: dict[str, list[int]] = {s: [] for s in ("faces", *_STATUSES)}
    ids: list[list[str]] = []
    queues: list[pa.Table] = []
    for _, _, t in rows:
        status = t.column("status")
        counts["faces"].append(t.num_rows)
        for s in _STATUSES:
            counts[s].append(int(pc.sum(pc.equal(status, s)).as_py() or 0) if t.num_rows else 0)
        accepted = pc.fill_null(pc.is_in(status, value_set=pa.array([AUTO, HUMAN])), False)
        acc = t.column("identity_id").filter(accepted).drop_null()
        ids.append(sorted(pc.unique(acc).to_pylist()) if len(acc) else [])
        queues.append(_queue_rows(t))
    offsets = pa.array(np.concatenate([[0], np.cumsum([q.num_rows for q in queues])]), pa.int32())
    queue = (
        pa.concat_tables(queues).combine_chunks().to_struct_array()
        if queues
        else pa.array([], pa.struct(list(_QUEUE_ROW)))
    )
    if isinstance(queue, pa.ChunkedArray):
        queue = queue.combine_chunks() if queue.num_chunks else pa.array([], queue.type)
    return pa.table(
        {
            "rel": pa.array([r for r, _, _ in rows], pa.string()),
            "stamp": pa.array([st for _, st, _ in rows], pa.string()),
            **{k: pa.array(v, pa.int64()) for k, v in counts.items()},
            "identities": pa.array(ids, pa.list_(pa.string())),
            "queue": pa.ListArray.from_arrays(offsets, queue),
        },
        schema=GROUP_SUMMARY_SCHEMA,
    )


def group_summaries(store: ObjectStore) -> pa.Table:
    """One row per faces group file (GROUP_SUMMARY_SCHEMA): its faces per status, the distinct
    identities of its accepted faces and its status=review rows, what the run summary's totals
    and the review queue are made of.

    Kept in ``state/summary.parquet`` with each file's stamp (size and ETag, or size, mtime
    and inode; the label overlay's taken in, :func:`storage.tables.faces_listing`) and the
    faces generation it was taken at: when the generation has not moved since, nothing is
    listed or read; otherwise only the files whose stamp changed are read. A refresh that
    rewrote k albums reads k files here, not the store. It is only a cache: one that cannot be
    read is rebuilt, and ``faceloop forget`` deletes it."""
    from storage.tables import (
        STAMP_SETTLE_S,
        faces_generation,
        faces_listing,
        read_faces_file,
    )

    generation = faces_generation(store)  # before the listing: a later write moves it
    cached = _load_summaries(store)
    if cached is not None and cached[0] == generation:
        return cached[1]
    listed_at = time.time()
    listing, overlays = faces_listing(store)
    old = cached[1] if cached is not None else GROUP_SUMMARY_SCHEMA.empty_table()
    pos = {
        (r, st): i
        for i, (r, st) in enumerate(
            zip(old.column("rel").to_pylist(), old.column("stamp").to_pylist(), strict=True)
        )
        if st is not None
    }
    horizon = listed_at - STAMP_SETTLE_S
    keep: list[int] = []
    fresh: list[tuple[str, str | None, pa.Table]] = []
    for info in listing:
        k = pos.get((info.rel, info.stamp))
        if k is not None:
            keep.append(k)
            continue
        settled = info.mtime is None or info.mtime <= horizon
        t = read_faces_file(store, info.rel, _READ, overlays)
        fresh.append((info.rel, info.stamp if settled else None, t))
    table = pa.concat_tables(
        [
            old.take(pa.array(keep, pa.int64())),
            _summaries(fresh),
        ]
    )
    table = table.take(pc.sort_indices(table, [("rel", "ascending")]))
    if fresh or len(keep) != old.num_rows:
        store.write_parquet(
            layout.SUMMARY_CACHE,
            table.replace_schema_metadata({"faces_generation": generation}),
        )
    return table


def _load_summaries(store: ObjectStore) -> tuple[str, pa.Table] | None:
    """(faces generation, rows) of the cache; None when there is none or it cannot be read."""
    try:
        t = store.read_parquet_file(layout.SUMMARY_CACHE)
        generation = (t.schema.metadata or {}).get(b"faces_generation", b"").decode()
        t = t.replace_schema_metadata(None)
        if t.schema.names != GROUP_SUMMARY_SCHEMA.names:
            raise ValueError("written by another version")
        t = t.cast(GROUP_SUMMARY_SCHEMA)
    except FileNotFoundError:
        return None
    except (StorageError, ValueError, pa.ArrowInvalid) as exc:
        log.warning("ignoring the summary cache %s: %s", store.uri(layout.SUMMARY_CACHE), exc)
        return None
    return generation, t


def write_run_record(store: ObjectStore, summary: RunSummary) -> str:
    """Write ``runs/<run_id>.json`` (the summary as JSON, naming itself in ``record``)."""
    rel = layout.run_record(summary.run_id)
    summary.record = rel
    store.write_bytes(rel, summary.to_json().encode())
    return rel
