"""Run summaries: counts of what the store holds after a run, as a :class:`RunSummary` (JSON in
``runs/<run_id>.json``, snake_case keys) and a markdown table (the only place with prose)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.errors import StorageError
from faceloop.schema import (
    AUTO,
    HUMAN,
    IMG_NO_FACE,
    IMG_OK,
    IMG_QUARANTINED,
    QUARANTINED,
    REJECTED,
    REVIEW,
)
from faceloop.vocab import UNLISTED_FOLDER, InputCode, render_reason
from storage import layout
from storage.objectstore import ObjectStore
from storage.tables import latest_rows, read_images

log = logging.getLogger(__name__)


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
    quarantined: int = field(default=0, metadata={"label": "quarantined (faces + images)"})
    images_without_face: int = field(default=0, metadata={"label": "images without a face"})


@dataclass
class RunCounts:
    """What this run did. Every file listed is exactly one of: already seen (recorded by an
    earlier run), a new image (content a model decoded for the first time), moved (known bytes
    whose earlier paths are gone: faces reused), restored (bytes a path held before it held
    others), a duplicate (same bytes as an image still there) or quarantined (unusable, with its
    reason). ``files_hashed``: files whose bytes
    discovery read (new or changed stamps); ``images_sent_to_models``: images that reached the
    detector."""

    files_listed: int = 0
    already_seen: int = 0
    new_images: int = 0
    moved: int = field(default=0, metadata={"label": "moved (faces reused)"})
    # Paths holding bytes they held before they held others (an edit reverted).
    restored: int = field(default=0, metadata={"label": "restored (earlier bytes: faces reused)"})
    # New images (among new_images) in a renamed album folder: clustered in the album the
    # folder's earlier photos were (tasks/discover.py _renamed_albums).
    refiled_faces: int = field(
        default=0,
        metadata={"label": "ID-card faces moved to another subject (their photo was)"},
    )
    lapsed_answers: int = field(
        default=0,
        metadata={"label": "annotators' ID answers lapsed (the subject's ID photo changed)"},
    )
    # ID-card subjects decided again because `faceloop forget` took away photos their duplicate
    # claims rested on: their label changes (and a dataset version they lead to) come from it.
    subjects_decided_again: int = field(
        default=0,
        metadata={
            "label": "ID-card subjects decided again (a forget took photos their claims rested on)"
        },
    )
    renamed_album_photos: int = field(
        default=0, metadata={"label": "new images in renamed album folders (kept in the album)"}
    )
    duplicates: int = field(default=0, metadata={"label": "duplicates (same bytes)"})
    quarantined: int = 0
    files_hashed: int = field(default=0, metadata={"label": "files read to hash them"})
    ignored: int = field(
        default=0, metadata={"label": "files ignored (hidden or system: limits.ignore)"}
    )
    images_sent_to_models: int = field(default=0, metadata={"label": "images sent to the models"})
    label_nodes: int = field(
        default=0, metadata={"label": "Ray nodes the label passes ran on (0: in the driver)"}
    )
    publish_nodes: int = field(
        default=0, metadata={"label": "Ray nodes that wrote the new shards (0: the driver)"}
    )
    new_faces: int = 0
    changed_faces: int = field(default=0, metadata={"label": "faces whose label changed"})
    reembedded_faces: int = field(default=0, metadata={"label": "faces re-embedded (new model)"})
    # Why this run relabelled every album and ID subject ("no" when it labelled only what
    # changed): after a re-embed, or under label settings other than the last run's.
    relabelled_all: str = field(
        default="no", metadata={"label": "every album and subject relabelled"}
    )
    # What the store work of an interrupted `faceloop forget` removed when this run finished it
    # first ("no": none was interrupted): rows and versions it changed come from the forget.
    forget_finished: str = field(
        default="no", metadata={"label": "an interrupted forget finished first"}
    )
    dataset_version: str = "unchanged"  # "<name> v<version>" when this run published one
    # Sources that listed no file while the store holds images from them, each with their count
    # ("none": no such source): most likely not mounted. Their images stay as they were.
    empty_sources: str = field(
        default="none",
        metadata={"label": "sources that listed no files but hold images in the store (mounted?)"},
    )


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


def current_images(store: ObjectStore, columns: list[str]) -> pa.Table:
    """:func:`storage.tables.latest_images` without the places a photo left: a content's
    ``moved`` row (tasks/discover.py) says none of its earlier paths is listed any more, so
    those rows are where it was, not more images (a renamed album counted twice), and a
    ``moved`` row with ``moved_from`` says that one path was left while a copy stays listed
    elsewhere (the copy still counts); a photo quarantined for its place in a source
    (``wrong_layout``: dropped at the source's root, say) whose bytes were decoded later
    elsewhere was put where it belongs; and a folder recorded as one that could not be listed,
    whose files a later run listed, is readable again: its files are the images, not the
    folder; and a forgotten file's placeholder row whose path was taken in since
    (``forgotten_taken_in``) is not counted. The moves are read from every run's rows, not only
    each path's latest: a path a photo was moved to may hold an edit of it since."""
    from tasks.discover import PLACE_CODES

    cols = list(
        dict.fromkeys(
            [*columns, "image_uri", "image_sha256", "reason", "reason_code", "status", "run_id"]
        )
    )
    history = read_images(store, columns=list(dict.fromkeys([*cols, "moved_from"])))
    hcode = history.column("reason_code")
    moves = history.filter(pc.fill_null(pc.equal(hcode, InputCode.MOVED.value), False))
    t = latest_rows(history)
    # A forgotten file's placeholder whose path was taken in since: the path's own row counts.
    t = t.filter(
        pc.invert(
            pc.fill_null(
                pc.equal(t.column("reason_code"), InputCode.FORGOTTEN_TAKEN_IN.value), False
            )
        )
    )
    code = t.column("reason_code")
    misplaced = pc.fill_null(pc.is_in(code, value_set=pa.array(sorted(PLACE_CODES))), False)
    folders = pc.fill_null(
        pc.and_(
            pc.equal(code, InputCode.UNREADABLE.value),
            pc.starts_with(
                t.column("reason"), render_reason(InputCode.UNREADABLE, UNLISTED_FOLDER)
            ),
        ),
        False,
    )
    if not len(t) or not (moves.num_rows or any(pc.any(m).as_py() for m in (misplaced, folders))):
        return t.select(columns)
    decoded = pc.is_in(t.column("status"), value_set=pa.array([IMG_OK, IMG_NO_FACE]))
    t = t.append_column("_row", pa.array(range(len(t)), pa.int64()))
    gone = [_listed_again(t, folders)]
    # A content's latest move that left no place of it listed: every earlier row of it goes.
    whole = moves.filter(pc.is_null(moves.column("moved_from")))
    # (the rows that say they left: a content's latest such row; rows that may leave)
    for after_rows, leaving in ((whole, None), (t.filter(decoded), misplaced)):
        after = (
            after_rows.select(["image_sha256", "run_id"])
            .group_by("image_sha256")
            .aggregate([("run_id", "max")])
            .rename_columns(["image_sha256", "_after"])
        )
        rows = t if leaving is None else t.filter(leaving)
        joined = rows.join(after, "image_sha256", join_type="left outer")
        left = pc.fill_null(pc.less(joined.column("run_id"), joined.column("_after")), False)
        gone.append(pc.filter(joined.column("_row"), left).combine_chunks())
    # A move out of a set of copies: only the place it names goes, if it still held the bytes.
    one = moves.filter(pc.is_valid(moves.column("moved_from")))
    if one.num_rows:
        after = (
            one.select(["moved_from", "image_sha256", "run_id"])
            .group_by(["moved_from", "image_sha256"])
            .aggregate([("run_id", "max")])
            .rename_columns(["image_uri", "image_sha256", "_after"])
        )
        joined = t.select(["image_uri", "image_sha256", "run_id", "_row"]).join(
            after, ["image_uri", "image_sha256"], join_type="inner"
        )
        left = pc.less(joined.column("run_id"), joined.column("_after"))
        gone.append(pc.filter(joined.column("_row"), left).combine_chunks())
    keep = pc.invert(pc.is_in(t.column("_row"), value_set=pa.concat_arrays(gone)))
    return t.filter(keep).select(columns)


def _listed_again(t: pa.Table, folders: pa.ChunkedArray) -> pa.Array:
    """The ``_row`` of each unlisted-folder row of ``t`` (``folders``) under which a later run
    recorded a file: the folder was listed again. Such rows are few (one per folder that
    could not be listed), so each is one pass over the URIs."""
    rows = t.filter(folders)
    uris, runs = t.column("image_uri"), t.column("run_id")
    out = [
        row
        for row, uri, run in zip(
            rows.column("_row").to_pylist(),
            rows.column("image_uri").to_pylist(),
            rows.column("run_id").to_pylist(),
            strict=True,
        )
        if pc.any(pc.and_(pc.starts_with(uris, uri + "/"), pc.greater(runs, run))).as_py()
    ]
    return pa.array(out, pa.int64())


def store_counts(store: ObjectStore, groups: pa.Table | None = None) -> StoreTotals:
    """Counts over the whole store (every run so far); images in their latest state per URI,
    without the places moved photos left (:func:`current_images`).
    The faces' counts come from :func:`group_summaries` (``groups``: already taken)."""
    g = group_summaries(store) if groups is None else groups
    images = current_images(store, columns=["status"])

    def count(col: pa.ChunkedArray, value: str) -> int:
        return int(pc.sum(pc.equal(col, value)).as_py() or 0) if len(col) else 0

    faces = summary_status_counts(g)
    return StoreTotals(
        images=len(images),
        faces=faces["all"],
        identities=len(identity_sizes(g)),
        auto=faces[AUTO],
        human=faces[HUMAN],
        review=faces[REVIEW],
        rejected=faces[REJECTED],
        quarantined=faces[QUARANTINED] + count(images.column("status"), IMG_QUARANTINED),
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
    from storage.tables import faces_generation

    generation = faces_generation(store)  # before the read: a later change makes it stale
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
    store.write_bytes(layout.REVIEW_QUEUE_GENERATION, generation.encode())
    return layout.REVIEW_QUEUE, len(queue)


def review_queue_current(store: ObjectStore) -> bool:
    """Whether the review queue was written from the faces as they are now."""
    from storage.tables import faces_generation

    try:
        written = store.read_bytes(layout.REVIEW_QUEUE_GENERATION).decode().strip()
    except FileNotFoundError:
        return False
    return store.exists(layout.REVIEW_QUEUE) and written == faces_generation(store)


# ---- what the report's plots draw, counted (they add up over faces files)

SIM_EDGES = np.linspace(-0.2, 1.0, 61)
QUALITY_EDGES = np.linspace(0, 1, 41)
KINDS = ("album", "idcard")
_STATUSES = (AUTO, HUMAN, REVIEW, REJECTED, QUARANTINED)


@dataclass
class PlotCounts:
    """What the run report's plots draw, counted: per (source kind, status) the faces with a
    score and their histogram over SIM_EDGES, per status the faces with a quality and theirs
    over QUALITY_EDGES, and the faces of each identity (auto and human). Counts add up: those
    of a store are the sums of its faces files' (:func:`summary_plot_counts`)."""

    sim: dict[tuple[str, str], tuple[int, np.ndarray]] = field(default_factory=dict)
    quality: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _col(faces: pa.Table, name: str) -> Any:
    if name in faces.column_names:
        return faces.column(name)
    return pa.nulls(faces.num_rows, pa.float32() if name in ("score", "quality") else pa.string())


def _codes(col: Any, values: tuple[str, ...]) -> np.ndarray:
    """Per row the position of its value in ``values``; ``len(values)`` for another or none."""
    code = np.full(len(col), len(values), np.int64)
    for j, v in enumerate(values):
        code[pc.fill_null(pc.equal(col, v), False).to_numpy(zero_copy_only=False)] = j
    return code


def _bins(
    faces: pa.Table, code: np.ndarray, file_of: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per file (``file_of``: each row's, of ``n``): the plots' bins flattened as the
    summaries store them, per (kind, status) of the scores and per status of the qualities,
    each ``[n, *counts]`` (:func:`_bin_counts`); ``code``: each row's status code (:func:`_codes`
    of the status column over ``_STATUSES``)."""
    ns, nk = len(_STATUSES) + 1, len(KINDS) + 1
    kind = _codes(_col(faces, "source_kind"), KINDS)
    sim = _bin_counts(
        _col(faces, "score"), (file_of * nk + kind) * ns + code, n * nk * ns, SIM_EDGES
    )
    sim = sim.reshape(n, nk, ns, -1)[:, : len(KINDS), : len(_STATUSES)].reshape(n, -1)
    qual = _bin_counts(_col(faces, "quality"), file_of * ns + code, n * ns, QUALITY_EDGES)
    qual = qual.reshape(n, ns, -1)[:, : len(_STATUSES)].reshape(n, -1)
    return sim, qual


def _plot_counts(sim: np.ndarray, qual: np.ndarray, sizes: np.ndarray) -> PlotCounts:
    """:class:`PlotCounts` of summed flat bins (:func:`_bins`) and identity sizes."""
    out = PlotCounts(sizes=sizes)
    n_sim, n_q = len(SIM_EDGES), len(QUALITY_EDGES)  # n plus the bins
    for j, (k, st) in enumerate((k, st) for k in KINDS for st in _STATUSES):
        part = sim[j * n_sim : (j + 1) * n_sim]
        out.sim[(k, st)] = (int(part[0]), part[1:].astype(np.int64))
    for j, st in enumerate(_STATUSES):
        part = qual[j * n_q : (j + 1) * n_q]
        out.quality[st] = (int(part[0]), part[1:].astype(np.int64))
    return out


def plot_counts(faces: pa.Table) -> PlotCounts:
    """:class:`PlotCounts` of a faces table (columns used: source_kind, status, score,
    quality, identity_id; a missing one counts as nulls), in Arrow: no Python object per face."""
    status = _col(faces, "status")
    sim, qual = _bins(faces, _codes(status, _STATUSES), np.zeros(faces.num_rows, np.int64), 1)
    accepted = pc.fill_null(pc.is_in(status, value_set=pa.array([AUTO, HUMAN])), False)
    ids = _col(faces, "identity_id").filter(accepted).drop_null()
    sizes = np.zeros(0, np.int64)
    if len(ids):
        per = pa.table({"i": ids}).group_by("i").aggregate([("i", "count")])
        sizes = per.column("i_count").to_numpy().astype(np.int64)
    return _plot_counts(sim[0], qual[0], sizes)


def summary_plot_counts(groups: pa.Table) -> PlotCounts:
    """:class:`PlotCounts` of a store from its :func:`group_summaries` (the sums of its files')."""
    sim = np.zeros(len(KINDS) * len(_STATUSES) * len(SIM_EDGES), np.int64)
    qual = np.zeros(len(_STATUSES) * len(QUALITY_EDGES), np.int64)
    if groups.num_rows:
        sim = pc.list_flatten(groups.column("sim")).to_numpy().reshape(groups.num_rows, -1).sum(0)
        qual = pc.list_flatten(groups.column("quality")).to_numpy()
        qual = qual.reshape(groups.num_rows, -1).sum(0)
    return _plot_counts(sim, qual, np.asarray(list(identity_sizes(groups).values()), np.int64))


def summary_status_counts(groups: pa.Table) -> dict[str, int]:
    """Faces per status, and ``"all"``, over the summarised files."""
    out: dict[str, int] = {str(s): int(pc.sum(groups.column(s)).as_py() or 0) for s in _STATUSES}
    out["all"] = int(pc.sum(groups.column("faces")).as_py() or 0)
    return out


def _people(groups: pa.Table) -> pa.Table:
    """Every (faces file, identity) row of the summaries: identity_id ("" for none), accepted,
    shown, doubt."""
    if not groups.num_rows:
        return pa.schema(list(_PERSON)).empty_table()
    return pa.Table.from_struct_array(pc.list_flatten(groups.column("people")).combine_chunks())


def identity_sizes(groups: pa.Table) -> dict[str, int]:
    """Accepted (auto, human) faces per identity over the summarised files."""
    p = _people(groups)
    p = p.filter(
        pc.and_(pc.greater(p.column("accepted"), 0), pc.not_equal(p.column("identity_id"), ""))
    )
    if not p.num_rows:
        return {}
    agg = p.group_by("identity_id").aggregate([("accepted", "sum")])
    return dict(
        zip(
            agg.column("identity_id").to_pylist(),
            agg.column("accepted_sum").to_pylist(),
            strict=True,
        )
    )


def sheet_counts(groups: pa.Table) -> dict[str, tuple[int, int]]:
    """Per identity ("" for faces without one) with a face that is not quarantined: (faces in
    doubt, faces), over the summarised files: what the report's contact sheets are chosen by."""
    p = _people(groups)
    p = p.filter(pc.greater(p.column("shown"), 0))
    if not p.num_rows:
        return {}
    agg = p.group_by("identity_id").aggregate([("doubt", "sum"), ("shown", "sum")])
    return {
        k: (int(d), int(n))
        for k, d, n in zip(
            agg.column("identity_id").to_pylist(),
            agg.column("doubt_sum").to_pylist(),
            agg.column("shown_sum").to_pylist(),
            strict=True,
        )
    }


def files_holding(groups: pa.Table, identities: list[str]) -> list[str]:
    """The faces files (in order) holding a face of ``identities`` that is not quarantined."""
    if not groups.num_rows or not identities:
        return []
    lengths = pc.list_value_length(groups.column("people")).to_numpy(zero_copy_only=False)
    p = _people(groups)
    hit = pc.and_(
        pc.is_in(p.column("identity_id"), value_set=pa.array(identities, pa.string())),
        pc.greater(p.column("shown"), 0),
    ).to_numpy(zero_copy_only=False)
    owner = np.repeat(np.arange(groups.num_rows), lengths)
    rels = groups.column("rel").to_pylist()
    return [rels[i] for i in sorted(set(owner[hit].tolist()))]


def unnamed_rows(groups: pa.Table) -> pa.Table:
    """The rows kept for the contact sheet of faces without an identity, in file order: per
    file its UNNAMED_KEEP lowest-scored faces in doubt and every other one (auto)."""
    if not groups.num_rows:
        return SHEET_ROW.empty_table()
    return pa.Table.from_struct_array(pc.list_flatten(groups.column("unnamed")).combine_chunks())


# ---- per faces file: counts, plot bins, identities, review rows (a cache)

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
# A row of a contact sheet: what the report shows of a face, as stored (crop read apart).
SHEET_ROW = pa.schema(
    [
        ("face_id", pa.string()),
        ("source_kind", pa.string()),
        ("role", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("score", pa.float32()),
        ("quality", pa.float32()),
        ("identity_id", pa.string()),
        ("reason_code", pa.string()),
        ("source_group", pa.string()),
    ]
)
# Faces without an identity kept per file for their sheet: at least the most a sheet shows.
UNNAMED_KEEP = 12
_PERSON = pa.struct(
    [
        ("identity_id", pa.string()),
        ("accepted", pa.int64()),  # auto or human
        ("shown", pa.int64()),  # not quarantined
        ("doubt", pa.int64()),  # not quarantined, not auto
    ]
)
GROUP_SUMMARY_SCHEMA = pa.schema(
    [
        ("rel", pa.string()),
        ("stamp", pa.string()),  # null: written too close to the listing to be trusted later
        ("faces", pa.int64()),
        *((s, pa.int64()) for s in _STATUSES),
        ("people", pa.list_(_PERSON)),  # per identity of the file ("" for none)
        ("sim", pa.list_(pa.int64())),  # per (kind, status): n, then counts over SIM_EDGES
        ("quality", pa.list_(pa.int64())),  # per status: n, then counts over QUALITY_EDGES
        ("queue", pa.list_(pa.struct(list(_QUEUE_ROW)))),  # its status=review faces
        ("unnamed", pa.list_(pa.struct(list(SHEET_ROW)))),  # see unnamed_rows
    ]
)
_READ = [*_QUEUE_ROW.names, "status"]


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


def _bin_counts(values: Any, keys: np.ndarray, n_keys: int, edges: np.ndarray) -> np.ndarray:
    """Per key: ``[n, *counts over edges]`` of the non-null ``values`` (an Arrow column) with
    that key, as ``np.histogram`` counts them (the last bin closed, values outside dropped);
    shape (n_keys, len(edges))."""
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    x = pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False).astype(np.float64)[valid]
    k = keys[valid]
    nb = len(edges) - 1
    out = np.zeros((n_keys, nb + 1), np.int64)
    out[:, 0] = np.bincount(k, minlength=n_keys)
    b = np.searchsorted(edges, x, side="right") - 1
    b[x == edges[-1]] = nb - 1
    inside = (b >= 0) & (b < nb)
    out[:, 1:] = np.bincount(k[inside] * nb + b[inside], minlength=n_keys * nb).reshape(n_keys, nb)
    return out


def _lists(values: pa.Table | np.ndarray, owner: np.ndarray, n: int, item: pa.DataType) -> pa.Array:
    """A list column of ``n`` rows from rows (a table, as structs) owned by row ``owner``
    (non-decreasing)."""
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=n))]).astype(np.int32)
    if isinstance(values, pa.Table):
        flat: Any = values.combine_chunks().to_struct_array() if values.num_rows else None
        if isinstance(flat, pa.ChunkedArray):
            flat = flat.combine_chunks() if flat.num_chunks else None
        if flat is None:
            flat = pa.array([], item)
        return pa.ListArray.from_arrays(pa.array(offsets), flat.cast(item))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.ravel(), item))


def _summaries(rows: list[tuple[str, str | None, pa.Table]]) -> pa.Table:
    """GROUP_SUMMARY_SCHEMA rows of faces files ``(rel, stamp, rows with _READ columns)``,
    computed over all of them at once (a few Arrow and numpy passes, not a few per file)."""
    n = len(rows)
    if not n:
        return GROUP_SUMMARY_SCHEMA.empty_table()
    read = pa.schema([*_QUEUE_ROW, ("status", pa.string())])
    parts = [t.select(_READ).cast(read) for *_, t in rows]
    t = pa.concat_tables(parts).combine_chunks()
    file_of = np.repeat(np.arange(n), [p.num_rows for p in parts]).astype(np.int64)
    status = t.column("status")
    code = _codes(status, _STATUSES)  # len(_STATUSES): another status, or none
    ns = len(_STATUSES) + 1
    per_status = np.bincount(file_of * ns + code, minlength=n * ns).reshape(n, ns)
    cols: dict[str, Any] = {
        "rel": pa.array([r for r, _, _ in rows], pa.string()),
        "stamp": pa.array([st for _, st, _ in rows], pa.string()),
        "faces": pa.array(np.bincount(file_of, minlength=n), pa.int64()),
    }
    for j, st in enumerate(_STATUSES):
        cols[st] = pa.array(per_status[:, j], pa.int64())

    # Per (file, identity): accepted, shown and doubt counts.
    shown = pc.fill_null(pc.not_equal(status, QUARANTINED), True)
    per = pa.table(
        {
            "_file": pa.array(file_of),
            "identity_id": pc.fill_null(t.column("identity_id"), ""),
            "accepted": pc.cast(
                pc.fill_null(pc.is_in(status, value_set=pa.array([AUTO, HUMAN])), False),
                pa.int64(),
            ),
            "shown": pc.cast(shown, pa.int64()),
            "doubt": pc.cast(
                pc.and_(shown, pc.fill_null(pc.not_equal(status, AUTO), True)), pa.int64()
            ),
        }
    )
    agg = per.group_by(["_file", "identity_id"]).aggregate(
        [("accepted", "sum"), ("shown", "sum"), ("doubt", "sum")]
    )
    agg = agg.rename_columns([c.removesuffix("_sum") for c in agg.column_names])
    agg = agg.sort_by([("_file", "ascending"), ("identity_id", "ascending")])
    owner = agg.column("_file").to_numpy()
    cols["people"] = _lists(agg.select(_PERSON.names), owner, n, _PERSON)

    # Plot bins: per (file, kind, status) of the scores, per (file, status) of the qualities.
    sim, qual = _bins(t, code, file_of, n)
    cols["sim"] = _lists(sim, np.repeat(np.arange(n), sim.shape[1]), n, pa.int64())
    cols["quality"] = _lists(qual, np.repeat(np.arange(n), qual.shape[1]), n, pa.int64())

    # The review queue's rows.
    review = np.flatnonzero(code == _STATUSES.index(REVIEW))
    cols["queue"] = _lists(
        _queue_rows(t.take(pa.array(review, pa.int64()))),
        file_of[review],
        n,
        pa.struct(list(_QUEUE_ROW)),
    )

    # Faces without an identity, not quarantined: per file the UNNAMED_KEEP lowest-scored in
    # doubt (score, then face id) and every other one, in file order.
    none = np.flatnonzero(
        pc.and_(pc.is_null(t.column("identity_id")), shown).to_numpy(zero_copy_only=False)
    )
    cand = t.take(pa.array(none, pa.int64()))
    doubt = pc.fill_null(pc.not_equal(cand.column("status"), AUTO), True).to_numpy(
        zero_copy_only=False
    )
    d = np.flatnonzero(doubt)
    order = pa.table(
        {
            "f": pa.array(file_of[none][d]),
            "s": pc.fill_null(cand.column("score").take(pa.array(d, pa.int64())), 0.0),
            "i": cand.column("face_id").take(pa.array(d, pa.int64())),
        }
    )
    ranked = d[
        pc.sort_indices(
            order, [("f", "ascending"), ("s", "ascending"), ("i", "ascending")]
        ).to_numpy()
    ]
    rf = file_of[none][ranked]
    first = np.searchsorted(rf, rf, side="left")
    rank = np.arange(len(ranked)) - first
    keep = np.sort(np.concatenate([ranked[rank < UNNAMED_KEEP], np.flatnonzero(~doubt)]))
    cols["unnamed"] = _lists(
        cand.take(pa.array(keep, pa.int64())).select(SHEET_ROW.names).cast(SHEET_ROW),
        file_of[none][keep],
        n,
        pa.struct(list(SHEET_ROW)),
    )
    return pa.table(cols, schema=GROUP_SUMMARY_SCHEMA)


def group_summaries(store: ObjectStore) -> pa.Table:
    """One row per faces group file (GROUP_SUMMARY_SCHEMA): its faces per status and per
    identity, the run report's plot bins, its status=review rows and its rows for the report's
    no-identity sheet: what the run summary's totals, the review queue and the run report
    (evaluation/report.py) are made of.

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
