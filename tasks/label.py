"""Label stage: fold a run's detections into the faces/images tables and (re)label.

What happens, in order:

1. Image rows for every processed image (one per image, with its status and reason) plus the
   rows discovery decided (quarantined files, copies) are the run's images-table rows.
2. New faces join the faces table. An image with the same bytes as one decoded under another
   URI (an earlier run's, or one that sorts first in this run) is ``duplicate_content`` and adds
   no face; a face whose ``face_id`` is already there is never added twice (under the same URI:
   an earlier run stored it but not its image row, and this run writes that row).
3. Album faces: gates first (``too_small``, ``low_quality``: rejected, kept out of clustering).
   Albums that received new faces are re-clustered (HDBSCAN, tasks/cluster.py); other albums
   keep their clusters. All clusters of all albums, plus the identities humans confirmed, are
   merged across albums by centroid similarity; identity ids stay stable (majority of previous
   ids). Purity checks (tasks/purity.py) decide auto / review / rejected per face.
4. ID-card subjects with new faces are verified (tasks/idcard.py).
5. Faces with status ``human`` are never changed. A group's file is rewritten only if one of its
   rows changed, so a rerun with nothing new rewrites nothing.
6. The rewritten groups and the image rows are committed together
   (:func:`storage.tables.commit_run_tables`): a run that fails while writing them (full disk,
   read-only store) leaves the tables as they were, never faces without their image rows.
"""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.config import Settings
from faceloop.progress import iterate
from faceloop.schema import (
    DETECTIONS_SCHEMA,
    FACES_SCHEMA,
    HUMAN,
    IMAGES_SCHEMA,
    IMG_NO_FACE,
    IMG_OK,
    IMG_QUARANTINED,
    REJECTED,
    ROLE_ID,
    ROLE_LIVE,
)
from faceloop.vocab import InputCode, Reason, is_human, reason_code, row_reason_code
from storage.objectstore import ObjectStore
from storage.tables import commit_run_tables, read_faces, read_images
from tasks.cluster import (
    assign_identity_ids,
    attach_to_identities,
    centroid,
    cluster_album,
    merge_clusters,
)
from tasks.idcard import FaceInfo, verify_subject
from tasks.purity import Decision, apply_purity, summarise
from tasks.quality import gate

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("cluster_id", "identity_id", "status", "reason", "reason_code", "score")
# A face's label changed (rewrite its group, stamp labelled_run_id) when one of these did; a
# score alone moving is refreshed in place but does not count as a change, and so is a
# reason_code filled in for a row of a store written before that column existed (the code is
# the start of the reason, so it only moves when the reason does).
CHANGE_COLUMNS = ("cluster_id", "identity_id", "status", "reason")


@dataclass
class LabelResult:
    """What a label run recorded. Image rows of the run: ``new_images`` (decoded content seen
    for the first time), ``duplicates`` (copies of decoded content), ``quarantined``."""

    new_images: int = 0
    duplicates: int = 0
    quarantined: int = 0
    new_faces: int = 0
    duplicate_faces: int = 0
    changed_faces: int = 0
    groups_rewritten: int = 0
    decisions: dict = field(default_factory=dict)


def image_rows(det: pa.Table) -> list[dict]:
    """One images-table row per processed image (detections hold one row per face)."""
    cols = [
        "image_uri",
        "image_sha256",
        "source_kind",
        "source_group",
        "role",
        "run_id",
        "image_status",
        "image_reason",
        "image_reason_code",
        "width",
        "height",
        "n_faces",
    ]
    seen: set[tuple[str, str]] = set()
    out = []
    # Detections staged before image_reason_code existed: the code is parsed from the reason.
    cols = [c for c in cols if c in det.column_names]
    for r in det.select(cols).to_pylist():
        key = (r["image_uri"], r["image_sha256"])
        if key in seen:
            continue
        seen.add(key)
        out.append(
            {
                "image_uri": r["image_uri"],
                "image_sha256": r["image_sha256"],
                "size_bytes": None,
                "source_kind": r["source_kind"],
                "source_group": r["source_group"],
                "role": r["role"],
                "status": r["image_status"],
                "reason": r["image_reason"],
                "reason_code": r.get("image_reason_code") or reason_code(r["image_reason"]) or None,
                "width": r["width"],
                "height": r["height"],
                "n_faces": r["n_faces"],
                "run_id": r["run_id"],
            }
        )
    return out


def _embeddings(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(n, d) float32; rows without an embedding (too-small faces, never embedded) are zero."""
    n = len(col)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    if n == 0 or not valid.any():
        return np.zeros((n, 1), np.float32)
    flat = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32)
    out = np.zeros((n, flat.size // int(valid.sum())), np.float32)
    out[valid] = flat.reshape(int(valid.sum()), -1)
    return out


_DECODED = (IMG_OK, IMG_NO_FACE)
_HISTORY_COLUMNS = [
    "image_uri",
    "image_sha256",
    "source_kind",
    "source_group",
    "role",
    "status",
    "reason",
    "reason_code",
    "run_id",
]


def mark_duplicates(images: list[dict], history: list[dict]) -> dict[str, str]:
    """Mark (in place) this run's image rows whose bytes a model already decoded under another
    URI as ``duplicate_content``; returns copy URI -> original URI.

    Originals are earlier runs' decoded rows (``history``), then this run's rows in URI order,
    so the copy of two identical new files is always the same one.
    """
    owners: dict[str, str] = {}
    for r in history:
        if r["status"] in _DECODED and row_reason_code(r) != InputCode.DUPLICATE_CONTENT:
            owners.setdefault(r["image_sha256"], r["image_uri"])
    copies: dict[str, str] = {}
    for row in sorted(images, key=lambda r: r["image_uri"]):
        if row["status"] not in _DECODED:
            continue
        uri, original = row["image_uri"], owners.setdefault(row["image_sha256"], row["image_uri"])
        if original != uri:
            why = Reason(InputCode.DUPLICATE_CONTENT, f"same bytes as {original}")
            row["reason"], row["reason_code"] = why.text, why.code
            copies[uri] = original
    return copies


def id_photo_problems(rows: list[dict]) -> dict[str, Reason]:
    """ID-card subject -> why it has no usable ID photo, for the subjects among ``rows`` (image
    rows, oldest first; the latest row of a URI wins) whose ``id.<ext>`` is missing, quarantined
    or a copy of another image. Subjects with a decoded ID photo are not in the result."""
    latest: dict[str, dict] = {}
    for r in rows:
        latest[r["image_uri"]] = r
    subjects: set[str] = set()
    ids: dict[str, list[dict]] = defaultdict(list)
    for r in latest.values():
        if r["source_kind"] == "idcard":
            subjects.add(r["source_group"])
            if r["role"] == ROLE_ID:
                ids[r["source_group"]].append(r)
    out: dict[str, Reason] = {}
    for subject in sorted(subjects):
        rs = sorted(ids.get(subject, []), key=lambda r: r["image_uri"])
        if any(
            r["status"] in _DECODED and row_reason_code(r) != InputCode.DUPLICATE_CONTENT
            for r in rs
        ):
            continue
        if not rs:
            out[subject] = Reason(InputCode.IDCARD_NO_ID_PHOTO, "no id.<ext> in the subject folder")
        else:
            name = posixpath.basename(rs[0]["image_uri"])
            why = rs[0]["reason"] or rs[0]["status"]
            out[subject] = Reason(InputCode.IDCARD_NO_ID_PHOTO, f"{name} is unusable ({why})")
    return out


def relabel(
    settings: Settings,
    faces: pa.Table,
    affected: set[tuple[str, str]],
    id_problems: dict[str, Reason] | None = None,
) -> tuple[dict[str, Decision], dict[str, str | None]]:
    """Decisions for the faces of ``faces`` (FACES_SCHEMA without crops). ``id_problems``
    (:func:`id_photo_problems`) says which ID-card subjects have no usable ID photo, and why.

    Returns (face_id -> Decision for every face it decided, face_id -> per-album cluster_id for
    album faces). Human faces get no decision.
    """
    th = settings.thresholds
    qs = settings.quality
    n = len(faces)
    fid = faces.column("face_id").to_pylist()
    kind = faces.column("source_kind").to_pylist()
    group = faces.column("source_group").to_pylist()
    status = faces.column("status").to_pylist()
    reasons = faces.column("reason").to_pylist()
    # A person decided these rows (status human, or a human_ rejection): never touched here.
    human = [
        is_human({"status": s_, "reason": r_}) for s_, r_ in zip(status, reasons, strict=False)
    ]
    prev_identity = faces.column("identity_id").to_pylist()
    prev_cluster = faces.column("cluster_id").to_pylist()
    q = faces.column("quality").to_numpy(zero_copy_only=False).astype(np.float32)
    px = faces.column("face_px").to_numpy(zero_copy_only=False).astype(np.float32)
    emb = _embeddings(faces.column("embedding"))
    has_emb = pc.is_valid(faces.column("embedding")).to_numpy(zero_copy_only=False)
    out: dict[str, Decision] = {}
    clusters: dict[str, str | None] = {}

    # ---- albums
    album_rows = [i for i in range(n) if kind[i] == "album" and not human[i]]
    eligible: list[int] = []
    for i in album_rows:
        if (g := gate("album", px[i], q[i], qs)) is not None:
            out[fid[i]] = Decision.of(fid[i], REJECTED, None, g.why, g.score)
        elif not has_emb[i]:
            # Passed today's gates but was gated out (not embedded) when it was detected: the
            # thresholds were lowered since. Registering a recognizer re-embeds every face.
            out[fid[i]] = Decision(
                fid[i],
                REJECTED,
                None,
                "not_embedded",
                "below the size/quality gates when detected; "
                "re-embed (faceloop models register) to label it",
                float(q[i]),
            )
        else:
            eligible.append(i)
    cluster_of: dict[int, str | None] = {}
    by_album: dict[str, list[int]] = defaultdict(list)
    for i in eligible:
        by_album[group[i]].append(i)
    for alb, rows in iterate(sorted(by_album.items()), "label: albums", len(by_album), "album"):
        if ("album", alb) in affected or any(prev_cluster[i] is None for i in rows):
            labels = cluster_album(emb[rows], q[rows], settings.cluster, th)
            for i, lab in zip(rows, labels.tolist(), strict=False):
                cluster_of[i] = f"{alb}#{lab}" if lab >= 0 else None
        else:
            for i in rows:
                cluster_of[i] = prev_cluster[i]
    # Human-confirmed identities take part in the merge as clusters of their own, so new faces
    # of a confirmed person join that identity.
    members: dict[str, list[int]] = defaultdict(list)
    for i, c in cluster_of.items():
        if c is not None:
            members[c].append(i)
    for i in range(n):
        if kind[i] == "album" and human[i] and status[i] == HUMAN and prev_identity[i]:
            members[f"human:{prev_identity[i]}"].append(i)
    keys = sorted(members)
    identity_members: dict[str, list[int]] = defaultdict(list)
    if keys:
        cents = np.stack([centroid(emb[members[k]], q[members[k]]) for k in keys])
        counts = np.array([len(members[k]) for k in keys])
        comps = merge_clusters(cents, counts, keys, th.merge)
        member_fids = [[fid[i] for i in members[k]] for k in keys]
        prev = {fid[i]: prev_identity[i] for k in keys for i in members[k]}
        ids = assign_identity_ids(comps, member_fids, prev)
        for k, comp in zip(keys, comps.tolist(), strict=False):
            for i in members[k]:
                if not human[i]:
                    identity_members[ids[comp]].append(i)
    if identity_members and settings.cluster.attach_margin >= 0:
        loose = [i for i in eligible if cluster_of.get(i) is None]
        names = sorted(identity_members)
        cents = np.stack(
            [centroid(emb[identity_members[k]], q[identity_members[k]]) for k in names]
        )
        to = attach_to_identities(emb[loose], cents, th.attach, settings.cluster.attach_margin)
        for i, k in zip(loose, to.tolist(), strict=True):
            if k >= 0:
                identity_members[names[k]].append(i)
    if eligible:
        local = {i: j for j, i in enumerate(eligible)}
        decisions = apply_purity(
            {ident: [local[i] for i in rows] for ident, rows in identity_members.items()},
            emb[eligible],
            q[eligible],
            th,
            settings.cluster,
            qs,
            face_ids=[fid[i] for i in eligible],
        )
        for d in decisions:
            out[d.face_id] = d
    for i in album_rows:
        clusters[fid[i]] = cluster_of.get(i)

    # ---- ID-card subjects with new faces
    subjects: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        if kind[i] == "idcard" and ("idcard", group[i]) in affected:
            subjects[group[i]].append(i)
    if subjects:
        row_of = {f: i for i, f in enumerate(fid)}
        role = faces.column("role").to_pylist()
        image = faces.column("image_sha256").to_pylist()
        bbox = faces.column("bbox").to_pylist()
        det = faces.column("det_score").to_numpy(zero_copy_only=False)
        for subject, rows in sorted(subjects.items()):

            def info(i: int) -> FaceInfo:
                b = bbox[i]
                return FaceInfo(
                    fid[i], emb[i], float((b[2] - b[0]) * (b[3] - b[1])), float(q[i]), float(det[i])
                )

            gated = {i: g for i in rows if (g := gate("idcard", px[i], q[i], qs)) is not None}
            for i, g in gated.items():  # never embedded: nothing to compare
                if not human[i]:
                    out[fid[i]] = Decision.of(fid[i], REJECTED, None, g.why, g.score)
            rows = [i for i in rows if i not in gated]
            id_faces = [info(i) for i in rows if role[i] == ROLE_ID]
            lives: dict[str, list[FaceInfo]] = defaultdict(list)
            for i in rows:
                if role[i] == ROLE_LIVE:
                    lives[image[i]].append(info(i))
            live_images = [lives[k] for k in sorted(lives)]
            no_id = (id_problems or {}).get(subject)
            for d in verify_subject(id_faces, live_images, th, qs, subject, no_id_photo=no_id):
                if not human[row_of[d.face_id]]:
                    out[d.face_id] = d
    return out, clusters


def label_run(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    detections_rel: str | None,
    quarantined_rows: list[dict],
    relabel_all: bool = False,
) -> LabelResult:
    """Fold ``detections_rel`` into the tables and relabel what it affects (everything with
    ``relabel_all``, e.g. after a re-embed). Idempotent per run."""
    res = LabelResult()
    det = store.read_parquet(detections_rel) if detections_rel else DETECTIONS_SCHEMA.empty_table()
    images = sorted(image_rows(det), key=lambda r: r["image_uri"])
    # Earlier runs' rows (a retried label of this run replaces its own file: not history).
    history = sorted(
        (
            r
            for r in read_images(store, columns=_HISTORY_COLUMNS).to_pylist()
            if r["run_id"] != run_id
        ),
        key=lambda r: r["run_id"] or "",
    )
    copies = mark_duplicates(images, history)

    existing = read_faces(store, columns=[c for c in FACES_SCHEMA.names if c != "aligned_jpeg"])
    known = dict(
        zip(
            existing.column("face_id").to_pylist(),
            existing.column("image_uri").to_pylist(),
            strict=True,
        )
    )
    new_det = det.filter(pc.greater_equal(det.column("face_index"), 0)) if len(det) else det
    keep: list[int] = []
    dup_images: dict[str, str] = {}
    for j, (f, uri) in enumerate(
        zip(
            new_det.column("face_id").to_pylist(),
            new_det.column("image_uri").to_pylist(),
            strict=True,
        )
    ):
        if uri in copies:
            dup_images[uri] = f
            continue
        if f in known:
            # Same URI: an earlier run stored this face but failed before its image row.
            if known[f] != uri:
                dup_images[uri] = f
            continue
        known[f] = uri
        keep.append(j)
    # An int64 index array: an empty Python list would be typed null, which take() refuses.
    new_det = new_det.take(pa.array(keep, pa.int64()))
    uris_with_new_faces = set(new_det.column("image_uri").to_pylist())
    for row in images:
        uri = row["image_uri"]
        if uri in dup_images and uri not in copies and uri not in uris_with_new_faces:
            why = Reason(
                InputCode.DUPLICATE_CONTENT, f"faces already in the table (e.g. {dup_images[uri]})"
            )
            row["reason"], row["reason_code"] = why.text, why.code
    res.duplicate_faces = len(dup_images)
    for row in images + quarantined_rows:
        if row_reason_code(row) == InputCode.DUPLICATE_CONTENT:
            res.duplicates += 1
        elif row["status"] == IMG_QUARANTINED:
            res.quarantined += 1
        else:
            res.new_images += 1
    res.new_faces = len(new_det)

    new_faces = _faces_from_detections(new_det, run_id)
    affected = set(
        zip(
            new_faces.column("source_kind").to_pylist(),
            new_faces.column("source_group").to_pylist(),
            strict=False,
        )
    )
    all_faces = (
        pa.concat_tables([existing, new_faces.drop(["aligned_jpeg"])])
        if len(new_faces)
        else existing
    )
    if relabel_all:
        affected |= set(
            zip(
                all_faces.column("source_kind").to_pylist(),
                all_faces.column("source_group").to_pylist(),
                strict=False,
            )
        )
    id_problems = id_photo_problems(history + images + quarantined_rows)
    decisions, clusters = relabel(settings, all_faces, affected, id_problems)
    res.decisions = summarise(decisions.values())

    # Which rows changed, and so which group files to rewrite.
    changed_groups: set[tuple[str, str]] = set(
        zip(
            new_faces.column("source_kind").to_pylist(),
            new_faces.column("source_group").to_pylist(),
            strict=False,
        )
    )
    fids = all_faces.column("face_id").to_pylist()
    kinds = all_faces.column("source_kind").to_pylist()
    groups = all_faces.column("source_group").to_pylist()
    old = {c: all_faces.column(c).to_pylist() for c in LABEL_COLUMNS}
    n_existing = len(existing)
    for i, f in enumerate(fids):
        before = {c: old[c][i] for c in LABEL_COLUMNS}
        if i >= n_existing or _changed(_new_labels(f, before, decisions, clusters), before):
            res.changed_faces += 1
            changed_groups.add((kinds[i], groups[i]))

    writes: list[tuple[str, str, pa.Table]] = []
    for kind, grp in sorted(changed_groups):
        current = read_faces(store, groups=[(kind, grp)])
        extra = (
            new_faces.filter(
                pc.and_(
                    pc.equal(new_faces.column("source_kind"), kind),
                    pc.equal(new_faces.column("source_group"), grp),
                )
            )
            if len(new_faces)
            else new_faces
        )
        table = pa.concat_tables([current.cast(FACES_SCHEMA), extra.cast(FACES_SCHEMA)])
        writes.append((kind, grp, _apply(table, decisions, clusters, run_id)))
        res.groups_rewritten += 1

    rows = images + quarantined_rows
    commit_run_tables(
        store, run_id, writes, pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA) if rows else None
    )
    log.info(
        "label: %d new faces, %d changed, %d groups rewritten, %s",
        res.new_faces,
        res.changed_faces,
        res.groups_rewritten,
        res.decisions.get("status"),
    )
    return res


def _new_labels(
    face_id: str, old: dict, decisions: dict[str, Decision], clusters: dict[str, str | None]
) -> dict:
    """``old`` (LABEL_COLUMNS of one face) updated with this run's decision and cluster."""
    out = dict(old)
    if face_id in clusters:
        out["cluster_id"] = clusters[face_id]
    d = decisions.get(face_id)
    if d is not None:
        out.update(
            identity_id=d.identity_id,
            status=d.status,
            reason=d.reason,
            reason_code=d.code,
            score=d.score,
        )
    return out


def _changed(new: dict, old: dict) -> bool:
    return any(new[c] != old[c] for c in CHANGE_COLUMNS)


def _apply(
    table: pa.Table, decisions: dict[str, Decision], clusters: dict[str, str | None], run_id: str
) -> pa.Table:
    rows = table.to_pylist()
    for r in rows:
        if is_human(r):
            continue
        new = _new_labels(r["face_id"], {c: r[c] for c in LABEL_COLUMNS}, decisions, clusters)
        if _changed(new, r):
            r.update(new)
            r["labelled_run_id"] = run_id
        else:
            r["score"], r["reason_code"] = new["score"], new["reason_code"]
    return pa.Table.from_pylist(rows, schema=FACES_SCHEMA)


def _faces_from_detections(det: pa.Table, run_id: str) -> pa.Table:
    """FACES_SCHEMA rows (unlabelled) from detection rows."""
    n = len(det)
    cols = {}
    for name in FACES_SCHEMA.names:
        if name in det.column_names:
            cols[name] = det.column(name).cast(FACES_SCHEMA.field(name).type)
        elif name == "labelled_run_id":
            cols[name] = pa.array([run_id] * n, pa.string())
        else:
            cols[name] = pa.nulls(n, FACES_SCHEMA.field(name).type)
    return pa.table(cols, schema=FACES_SCHEMA)
