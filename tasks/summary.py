"""Run summaries: counts of what the store holds after a run, as a :class:`RunSummary` (JSON in
``runs/<run_id>.json``, snake_case keys) and a markdown table (the only place with prose)."""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from faceloop.schema import AUTO, HUMAN, IMG_NO_FACE, IMG_QUARANTINED, QUARANTINED, REJECTED, REVIEW
from storage import layout
from storage.objectstore import ObjectStore
from storage.tables import latest_images, read_faces


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


def store_counts(store: ObjectStore) -> StoreTotals:
    """Counts over the whole store (every run so far); images in their latest state per URI."""
    faces = read_faces(store, columns=["status", "identity_id"])
    images = latest_images(store, columns=["status"])
    status = faces.column("status")

    def count(col: pa.ChunkedArray, value: str) -> int:
        return int(pc.sum(pc.equal(col, value)).as_py() or 0) if len(col) else 0

    accepted = faces.filter(pc.is_in(status, value_set=pa.array([AUTO, HUMAN])))
    ids = accepted.column("identity_id").drop_null()
    return StoreTotals(
        images=len(images),
        faces=len(faces),
        identities=len(pc.unique(ids)) if len(ids) else 0,
        auto=count(status, AUTO),
        human=count(status, HUMAN),
        review=count(status, REVIEW),
        rejected=count(status, REJECTED),
        quarantined=count(status, QUARANTINED) + count(images.column("status"), IMG_QUARANTINED),
        images_without_face=count(images.column("status"), IMG_NO_FACE),
    )


def markdown_table(summary: RunSummary) -> str:
    """The summary as a two-column markdown table (Prefect artifact and CLI output)."""
    rows = summary.rows()
    lines = ["| what | count |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def write_review_queue(store: ObjectStore, run_id: str) -> tuple[str, int]:
    """Snapshot of the faces waiting for a person (status=review), with the Label Studio task
    kind each would become (None: stays in review, not worth an annotator's minute alone).
    Rewritten whole after every labelling run; the faces table stays the source of truth."""
    from faceloop.vocab import reason_code, task_kind_for_code

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
    faces = read_faces(store, columns=[*cols, "reason_code", "status"])
    queue = faces.filter(pc.equal(faces.column("status"), REVIEW))
    # The stored code; rows of stores written before the column existed have none: parse it.
    codes = [
        c or reason_code(r)
        for c, r in zip(
            queue.column("reason_code").to_pylist(),
            queue.column("reason").to_pylist(),
            strict=True,
        )
    ]
    queue = queue.select(cols)
    queue = queue.append_column("reason_code", pa.array(codes, pa.string()))
    queue = queue.append_column(
        "task_kind", pa.array([task_kind_for_code(c) for c in codes], pa.string())
    )
    queue = queue.append_column("run_id", pa.array([run_id] * len(queue), pa.string()))
    store.write_parquet(layout.REVIEW_QUEUE, queue)
    return layout.REVIEW_QUEUE, len(queue)


def write_run_record(store: ObjectStore, summary: RunSummary) -> str:
    """Write ``runs/<run_id>.json`` (the summary as JSON, naming itself in ``record``)."""
    rel = layout.run_record(summary.run_id)
    summary.record = rel
    store.write_bytes(rel, summary.to_json().encode())
    return rel
