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
import os
import posixpath
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.arrays import l2_normalize, take_rows
from faceloop.config import Settings
from faceloop.errors import StorageError
from faceloop.hashing import (
    PHASH_COPY_BITS,
    PHASH_MAIN_COPY_BITS,
    PHASH_NEAR_BITS,
    PHASH_VERIFIED_BITS,
    hamming64,
    hamming_matrix,
)
from faceloop.progress import iterate
from faceloop.schema import (
    DETECTIONS_SCHEMA,
    FACE_LABEL_COLUMNS,
    FACES_SCHEMA,
    HUMAN,
    IMAGES_SCHEMA,
    IMG_NO_FACE,
    IMG_OK,
    IMG_QUARANTINED,
    LABELS_SCHEMA,
    REJECTED,
    REVIEW,
    ROLE_ID,
    ROLE_LIVE,
)
from faceloop.vocab import (
    DUPLICATE_CLAIM,
    LIVE_IS_ID_PHOTO,
    SAME_CAPTURE,
    SEVERAL_ID_PHOTOS,
    UNREAD_PREFIX,
    InputCode,
    Reason,
    human_mask,
    is_human,
    reason_code,
    reason_key,
    row_reason_code,
)
from storage.objectstore import ObjectStore
from storage.secret import pseudonym
from storage.tables import (
    commit_run_tables,
    label_overlay,
    read_faces,
    read_images,
    with_write_id,
    write_id,
)
from tasks.cluster import (
    KNN_K,
    NPROBE,
    assign_identity_ids,
    assign_identity_ids_from_votes,
    attach_to_identities,
    capture_copies,
    centroid,
    cluster_album,
    merge_clusters,
)
from tasks.idcard import FaceInfo, by_size, same_picture_score, verify_subject
from tasks.purity import Decision, apply_purity, one_face_per_photo, summarise
from tasks.quality import gate
from tasks.ray_faces import ray_map

log = logging.getLogger(__name__)

# What a decision sets: the faces table's label columns (faceloop.schema) but the run stamp.
LABEL_COLUMNS = tuple(c for c in FACE_LABEL_COLUMNS if c != "labelled_run_id")
# A face's label changed (rewrite its group, stamp labelled_run_id) when one of these did, the
# reason compared without its measured figures (faceloop.vocab.reason_key). A score or a
# reason's figure alone moving (they drift whenever the identity grows) is refreshed when the
# group is written anyway but does not count as a change, and so is a reason_code filled in for
# a row of a store written before that column existed (the code is the start of the reason, so
# it only moves when the reason does).
CHANGE_COLUMNS = ("cluster_id", "identity_id", "status")
RELABEL_COLUMNS = ("identity_id", "status")


@dataclass
class LabelResult:
    """What a label run recorded. Image rows of the run: ``new_images`` (decoded content seen
    for the first time), ``moved`` (known content at a new path whose old ones are gone, or
    restored at a path that held other bytes since), ``duplicates`` (copies of decoded content),
    ``quarantined``."""

    new_images: int = 0
    moved: int = 0
    duplicates: int = 0
    quarantined: int = 0
    new_faces: int = 0
    duplicate_faces: int = 0
    changed_faces: int = 0
    groups_rewritten: int = 0
    # ID-card faces whose photo was moved into another subject's folder: moved with it.
    refiled_faces: int = 0
    # Faces whose annotator's ID-pair answer lapsed (their subject's ID photo changed).
    lapsed_answers: int = 0
    # ID-card subjects decided again though nothing new reached them: `faceloop forget` took
    # away photos their duplicate claims rested on (storage.recovery.subjects_to_relabel).
    subjects_decided_again: int = 0
    decisions: dict = field(default_factory=dict)
    # Scale figures: albums re-clustered, albums whose decisions were redone, merge units
    # merged again (all of them in a full rebuild).
    albums_clustered: int = 0
    albums_decided: int = 0
    units_merged: int = 0
    # Ray nodes the per-album passes ran on (empty: they ran in this process).
    ray_nodes: list[str] = field(default_factory=list)
    # Seconds of each part of the run, in order (:class:`_Laps`): "prepare" (reading the
    # detections and staging the new faces), the album passes "cluster", "merge", "cohesion"
    # and "decide" (absent when no album was touched), "idcards", "commit".
    pass_seconds: dict[str, float] = field(default_factory=dict)


class _Laps:
    """Seconds of the named parts of a label run, one after the other (LabelResult.pass_seconds:
    where a run's time went, in the run record and in ``faceloop bench --scale``)."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """The time since the last lap (or the start) is ``name``'s."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now


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
        "image_phash",
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
                "phash": r.get("image_phash"),
            }
        )
    return out


def _geometry(t: pa.Table) -> np.ndarray:
    """(n, 14) float64: each face's box and five landmarks, NaN where a table lacks them (a
    store's synthetic faces, say): such faces are no copy of anything (capture_copies)."""
    n = t.num_rows
    out = np.full((n, 14), np.nan)
    for col, lo, k in (("bbox", 0, 4), ("landmarks", 4, 10)):
        if col not in t.column_names or n == 0:
            continue
        c = t.column(col)
        valid = pc.is_valid(c).to_numpy(zero_copy_only=False)
        if not valid.any():
            continue
        flat = pc.list_flatten(c).to_numpy(zero_copy_only=False).astype(np.float64)
        if flat.size != int(valid.sum()) * k:
            continue
        out[valid, lo : lo + k] = flat.reshape(-1, k)
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
    "phash",
    # An ID photo's size (relabel's ``dims``): whether a face is cut by its edge, and which of
    # its aligned crop's pixels lie inside it, for subjects decided again in a later run.
    "width",
    "height",
]


def copies_decided(rows: list[dict], images: list[dict]) -> list[dict]:
    """Discovery's ``rows`` with the copies it held back from the models (``COPY_OF``) given
    their original's verdict from this run's ``images``: its status, size, face count and
    pHash, and its reason when it could not be decoded (same bytes, same verdict); a decoded
    copy keeps its ``duplicate_content`` reason."""
    from tasks.discover import COPY_OF

    originals = {r["image_uri"]: r for r in images}
    out = []
    for r in rows:
        if COPY_OF not in r:
            out.append(r)
            continue
        row = {k: v for k, v in r.items() if k != COPY_OF}
        o = originals.get(r[COPY_OF])
        if o is None:  # every work-list row comes back from the face stage with its verdict
            raise RuntimeError(
                f"the face stage returned no row for {r[COPY_OF]}, which {r['image_uri']} is "
                "a copy of"
            )
        row |= {k: o[k] for k in ("status", "width", "height", "n_faces", "phash")}
        if o["status"] not in _DECODED:
            row["reason"], row["reason_code"] = o["reason"], o["reason_code"]
        if str(o.get("image_sha256") or "").startswith(UNREAD_PREFIX):
            # The original could not be read as discovery hashed it: neither was this copy's
            # content judged; both are read again by the next refresh.
            row["image_sha256"] = o["image_sha256"]
        out.append(row)
    return out


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


def current_rows(rows: list[dict]) -> list[dict]:
    """The latest row of each URI among images-table ``rows`` (oldest first), without the
    places a photo was moved away from: a later ``moved`` row of its content says they are no
    longer listed, or, with ``moved_from``, that one of them is not (tasks/discover.py;
    :func:`tasks.summary.current_images` is the same rule over the whole table, in Arrow); nor
    a forgotten file's placeholder whose path was taken in since (``forgotten_taken_in``)."""
    latest: dict[str, tuple[int, dict]] = {}
    moved_at: dict[str, int] = {}  # content -> its latest "moved" row that left no place listed
    left_at: dict[tuple[str, str], int] = {}  # (place, content) -> the latest move out of it
    for n, r in enumerate(rows):
        latest[r["image_uri"]] = (n, r)
        if row_reason_code(r) == InputCode.MOVED:
            if r.get("moved_from"):
                left_at[(r["moved_from"], r["image_sha256"])] = n
            else:
                moved_at[r["image_sha256"]] = n
    return [
        r
        for n, r in latest.values()
        if row_reason_code(r) != InputCode.FORGOTTEN_TAKEN_IN
        and moved_at.get(r["image_sha256"], -1) <= n
        and left_at.get((r["image_uri"], r["image_sha256"]), -1) <= n
    ]


def replaced_id_photos(rows: list[dict]) -> set[str]:
    """The contents (sha256) of ID photos a later file took the place of (``id.jpg``
    overwritten with a new ID photo), among images-table ``rows`` (oldest first): recorded,
    and current at no place (:func:`current_rows`). A subject has one ID photo; the replaced
    one's faces would make it two."""
    current = {r["image_sha256"] for r in current_rows(rows)}
    return {
        r["image_sha256"]
        for r in rows
        if r.get("source_kind") == "idcard"
        and r.get("role") == ROLE_ID
        and r["image_sha256"] not in current
    }


def refiled_id_photos(rows: list[dict], history: list[dict]) -> dict[str, dict]:
    """The ID-card photos of this run's image ``rows`` that were moved into another subject's
    folder (a misfiled live capture put where it belongs, a renamed subject folder), or to the
    other role in their own (an id.jpg and a live photo swapped): content
    sha256 -> the row of its new place, for contents that ``history`` (earlier runs' rows)
    recorded under another subject. Their faces carry the subject where they were decoded
    (tasks/discover.py); :func:`refile_faces` moves them to the new one."""
    moves = {
        r["image_sha256"]: r
        for r in rows
        if r.get("source_kind") == "idcard"
        and row_reason_code(r) == InputCode.MOVED
        and r.get("status") in _DECODED
        and r.get("source_group")
    }
    # Another subject's, or another role in the same subject (an id.jpg and a live photo
    # swapped by an operator fixing misnamed files: the capture is not the ID photo now).
    was_elsewhere = {
        h["image_sha256"]
        for h in history
        if h.get("source_kind") == "idcard"
        and h["image_sha256"] in moves
        and (
            h.get("source_group") != moves[h["image_sha256"]]["source_group"]
            or h.get("role") != moves[h["image_sha256"]].get("role")
        )
    }
    return {sha: r for sha, r in moves.items() if sha in was_elsewhere}


def refile_faces(
    faces: pa.Table, moves: dict[str, dict], had_faces: Collection[str] = ()
) -> tuple[pa.Table, set[str]]:
    """The faces of ``faces`` (ID-card face rows) whose photo :func:`refiled_id_photos` moved
    to another subject or role, with that subject, path and role. Their labels are decided
    again there; a person's decision stays (identity renamed) only when the subject's ID photo
    moved to the
    same folder with them and that folder held no faces before (``had_faces``: the subjects
    that did), as in a renamed subject folder: it was judged against that photo, and no other
    ID photo waits there. A decision on a live photo moved alone was about the old subject's
    ID photo. Also returns the subjects they leave."""
    if not moves or not len(faces):
        return faces.slice(0, 0), set()
    sha = faces.column("image_sha256").to_pylist()
    group = faces.column("source_group").to_pylist()
    role = faces.column("role").to_pylist()
    keep = [
        s in moves and (moves[s]["source_group"] != g or moves[s].get("role") != r)
        for s, g, r in zip(sha, group, role, strict=True)
    ]
    faces = faces.filter(pa.array(keep, pa.bool_()))
    rows = faces.select([c for c in faces.column_names if c != "aligned_jpeg"]).to_pylist()
    # (old subject, new subject) pairs whose ID photo made the move too.
    with_id = {
        (r["source_group"], moves[r["image_sha256"]]["source_group"])
        for r in rows
        if moves[r["image_sha256"]]["role"] == ROLE_ID and r.get("role") == ROLE_ID
    }
    cols: dict[str, list] = {c: [] for c in ("source_group", "image_uri", "role")}
    labels: dict[str, list] = {c: [] for c in FACE_LABEL_COLUMNS}
    for r in rows:
        to = moves[r["image_sha256"]]
        for c in cols:
            cols[c].append(to[c])
        keeps = (
            is_human(r)
            and (r["source_group"], to["source_group"]) in with_id
            and to["source_group"] not in had_faces
        )
        for c in FACE_LABEL_COLUMNS:
            labels[c].append(r[c] if keeps else None)
        if keeps and r["identity_id"] == r["source_group"]:
            labels["identity_id"][-1] = to["source_group"]
    for c, values in {**cols, **labels}.items():
        i = faces.schema.get_field_index(c)
        faces = faces.set_column(
            i, faces.schema.field(i), pa.array(values, faces.schema.field(i).type)
        )
    return faces, {r["source_group"] for r in rows}


# The reasons of a person's answer on an ID pair (annotate/review.py): given against the ID
# photo the subject had then.
_PAIR_ANSWERS = ("human_same_person", "human_different_person")


def _id_photos_by_subject(faces: pa.Table, replaced: Collection[str]) -> dict[str, set[str]]:
    """ID-card subject -> the contents (sha256) of its ID photos' faces, replaced ones left out."""
    out: dict[str, set[str]] = defaultdict(set)
    for g, role, sha in zip(
        *(faces.column(c).to_pylist() for c in ("source_group", "role", "image_sha256")),
        strict=True,
    ):
        if role == ROLE_ID and sha not in replaced:
            out[g].add(sha)
    return dict(out)


def _lapsed_answers(faces: pa.Table, subjects: Collection[str], keep: Collection[str]) -> set[str]:
    """The live faces of ``subjects`` (whose ID photo changed) that hold a person's answer on
    an ID pair, but those in ``keep``."""
    want = set(subjects)
    if not want:
        return set()
    return {
        f
        for f, g, role, reason in zip(
            *(faces.column(c).to_pylist() for c in ("face_id", "source_group", "role", "reason")),
            strict=True,
        )
        if g in want
        and role == ROLE_LIVE
        and f not in keep
        and str(reason or "").startswith(_PAIR_ANSWERS)
    }


def _reset_labels(faces: pa.Table, face_ids: Collection[str]) -> pa.Table:
    """``faces`` with the label columns of ``face_ids`` emptied: decided again."""
    hit = pc.is_in(faces.column("face_id"), pa.array(sorted(face_ids), pa.string()))
    for c in FACE_LABEL_COLUMNS:
        i = faces.schema.get_field_index(c)
        field_ = faces.schema.field(i)
        faces = faces.set_column(
            i, field_, pc.if_else(hit, pa.nulls(len(faces), field_.type), faces.column(c))
        )
    return faces


def id_photo_problems(rows: list[dict]) -> dict[str, Reason]:
    """ID-card subject -> why it has no usable ID photo, for the subjects among ``rows`` (image
    rows, oldest first; :func:`current_rows`: an ID photo moved out is not the subject's)
    whose ``id.<ext>`` is missing, quarantined or a copy of another image. Subjects with a
    decoded ID photo are not in the result."""
    subjects: set[str] = set()
    ids: dict[str, list[dict]] = defaultdict(list)
    for r in current_rows(rows):
        if r["source_kind"] == "idcard":
            subjects.add(r["source_group"])
            # An id.<ext> quarantined before its role was known (id.tif: unsupported_extension)
            # is the subject's ID photo too: "no id.<ext> in the subject folder" was untrue.
            stem = posixpath.splitext(posixpath.basename(r["image_uri"] or ""))[0]
            if r["role"] == ROLE_ID or (not r["role"] and stem.lower() == "id"):
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


def _idcard_photos(rows: list[dict]) -> list[dict]:
    """The decoded ID and live photos among images-table ``rows`` (:func:`current_rows`: a
    renamed subject folder is not a second subject claiming its photos), without the
    pseudo-digests of unread, too large or forgotten files."""
    return [
        r
        for r in current_rows(rows)
        if r.get("source_kind") == "idcard"
        and r.get("role") in (ROLE_ID, ROLE_LIVE)
        and r.get("status") in _DECODED
        and r.get("source_group")
        and not str(r.get("image_sha256") or "").startswith((UNREAD_PREFIX, "size:", "forgotten:"))
    ]


def live_copies_of_id(
    rows: list[dict],
    subjects: Collection[str],
    same_capture: Callable[..., bool | None] | None = None,
    copy_bits: int = PHASH_COPY_BITS,
) -> dict[str, dict[str, str]]:
    """subject -> {live photo sha256: why} for the live photos of ``subjects`` that are the
    subject's own ID photo rather than a live capture: the same bytes, or (with
    ``same_capture``) a pHash within ``copy_bits`` bits of an ID photo of the subject whose
    main face is nearly the ID photo's (``same_capture(live, id, main_only=True)``). ``rows``
    are images-table rows, oldest first (the latest row of a URI wins). Such a photo confirms
    nothing: another photo of the same person is never this close (COPY_COSINE)."""
    want = set(subjects)
    ids: dict[str, list[dict]] = defaultdict(list)
    lives: dict[str, list[dict]] = defaultdict(list)
    for r in _idcard_photos(rows):
        if r["source_group"] in want:
            (ids if r["role"] == ROLE_ID else lives)[r["source_group"]].append(r)
    out: dict[str, dict[str, str]] = defaultdict(dict)
    for subject, live_rows in sorted(lives.items()):
        id_rows = sorted(ids.get(subject, []), key=lambda r: r["image_uri"])
        id_shas = {r["image_sha256"] for r in id_rows}
        for live in sorted(live_rows, key=lambda r: r["image_uri"]):
            name = posixpath.basename(live["image_uri"])
            if live["image_sha256"] in id_shas:
                out[subject][live["image_sha256"]] = f"{name} has the ID photo's bytes"
                continue
            if same_capture is None or live.get("phash") is None:
                continue
            for id_row in id_rows:
                if id_row.get("phash") is None:
                    continue
                d = hamming64(live["phash"], id_row["phash"])
                if d <= copy_bits and same_capture(live, id_row, main_only=True):
                    out[subject][live["image_sha256"]] = (
                        f"{name} is a copy of the ID photo (pHash {d} bits apart, the same face)"
                    )
                    break
    return dict(out)


def duplicate_claims(
    rows: list[dict],
    focus: set[str],
    near_bits: int = PHASH_NEAR_BITS,
    confirm: Callable[[dict, dict], bool | None] | None = None,
    verified_bits: int = PHASH_VERIFIED_BITS,
    same_capture: Callable[..., bool | None] | None = None,
    copy_bits: int = PHASH_COPY_BITS,
    main_bits: int = PHASH_MAIN_COPY_BITS,
) -> dict[str, dict[str, str]]:
    """Photos claimed by two ID-card subjects: subject -> {other subject: how} for every subject
    in ``focus`` with such a photo, and for each subject it shares one with.

    ``rows`` are images-table rows (oldest first; the latest row of a URI wins) with
    ``image_sha256`` and ``phash``. Two ID or live photos of *different* subjects are the same
    photo when their bytes are identical (``"identical"``; a copy recorded as
    ``duplicate_content`` counts, under its own subject) or their pHashes are close
    (``"near-identical"``: re-encoded, resized). Close means: within ``near_bits`` bits, unless
    ``confirm(row_a, row_b)`` says False (the faces are different people); or, with ``confirm``,
    within ``verified_bits`` bits when it says True (the faces match; None: it cannot tell).
    :class:`ClaimFaces` confirms with the recognizer, since tight ID chips of two different
    people can hash within a few bits of each other, and a resized chip can move 8 bits.
    With ``same_capture``, two *live* photos within ``copy_bits`` bits are also the same photo
    when it says True (a face of one nearly identical to a face of the other:
    :meth:`ClaimFaces.same_capture`): a copy with a stranger's face pasted into a corner moves
    up to ~20 bits, beyond any hash threshold that keeps different photos apart. Beyond
    ``copy_bits``, up to ``main_bits``, only the two photos' main faces may make them one
    capture (``same_capture(a, b, main_only=True)``): the farther out, the more chance pairs of
    photos share a near-identical *bystander*. Each photo
    asks ``same_capture`` about its :data:`COPY_CANDIDATES` nearest such photos at most; a pair
    ``confirm`` judged to be two people is not asked (``same_capture``'s faces must be closer
    than ``confirm``'s, as :class:`ClaimFaces`' are), so it uses none of those checks.
    Photos of one subject (an ID reused as a live photo) and album photos are not claims.
    Cost: a dictionary over all ID-card photos plus (photos of ``focus``) x (all ID-card
    photos) pHash distances, and ``confirm`` on the few close pairs."""
    photos = _idcard_photos(rows)
    out: dict[str, dict[str, str]] = defaultdict(dict)

    def claim(a: str, b: str, how: str) -> None:
        if a != b:
            if out[a].get(b) != "identical":
                out[a][b] = how
            if out[b].get(a) != "identical":
                out[b][a] = how

    by_sha: dict[str, set[str]] = defaultdict(set)
    for r in photos:
        by_sha[r["image_sha256"]].add(r["source_group"])
    for r in photos:
        if r["source_group"] in focus:
            for other in by_sha[r["image_sha256"]]:
                claim(r["source_group"], other, "identical")
    hashed = [r for r in photos if r.get("phash") is not None]
    mine = [r for r in hashed if r["source_group"] in focus]
    if mine and len(hashed) > 1:
        all_h = [r["phash"] for r in hashed]
        # pairs the pHash rules decide (with confirm's answer), and how far candidates reach
        close = near_bits if confirm is None else max(near_bits, verified_bits)
        reach = close if same_capture is None else max(close, copy_bits, main_bits)
        for start in range(0, len(mine), 1024):
            chunk = mine[start : start + 1024]
            bits = hamming_matrix([r["phash"] for r in chunk], all_h)
            for i, a in enumerate(chunk):
                js = np.nonzero(bits[i] <= reach)[0]
                asked = 0  # same-capture checks of this photo: the nearest COPY_CANDIDATES
                for j in js[np.argsort(bits[i, js], kind="stable")]:
                    b = hashed[j]
                    if a["source_group"] == b["source_group"] or out[a["source_group"]].get(
                        b["source_group"]
                    ):
                        continue
                    d = int(bits[i, j])
                    if d <= close:
                        same = None if confirm is None else confirm(a, b)
                        if same or (same is None and d <= near_bits):
                            claim(a["source_group"], b["source_group"], "near-identical")
                            continue
                        if same is False:  # different people: no face of one capture either
                            continue
                    if (
                        same_capture is not None
                        and asked < COPY_CANDIDATES
                        and d <= max(copy_bits, main_bits)
                        and a.get("role") == ROLE_LIVE
                        and b.get("role") == ROLE_LIVE
                    ):
                        asked += 1
                        if same_capture(a, b, main_only=d > copy_bits):
                            claim(a["source_group"], b["source_group"], "same capture")
    return {k: v for k, v in out.items() if v}


# Two faces this close are one capture, not two photos of one person (EdgeFace-S, lfw-dev):
# a live photo against its copy with a stranger's face pasted into a corner (the eval's
# compositing) 0.854-0.999, 1st percentile 0.946, median 0.995; another photo of the same
# person at most 0.947 (1,105 pairs of 350 people; none within PHASH_COPY_BITS at >= 0.93).
# With PHASH_COPY_BITS, 325 of the 350 pasted copies are caught and none of the 1,105 pairs.
COPY_COSINE = 0.95
# A live face this close to its subject's ID face is the ID picture itself, not a live capture:
# the chip pasted into another person's photo (an impostor "holding" the card), printed, or
# photographed on a table. Such a face reached 0.99 and was accepted; a live capture of the
# same person reaches at most 0.947 against another photo (COPY_COSINE's lfw-dev pairs), and the
# demo's live crops of the very photo its chips come from 0.94-0.95. Above both with a margin a
# re-embed (~0.01) does not cross.
ID_COPY_COSINE = 0.975
# Same-capture checks per photo, the nearest by pHash first: each may read another subject's
# faces. 0.27% of different people's photos come within PHASH_COPY_BITS (lfw-dev), so in a store
# of 10^6 live photos a new one would otherwise ask ~2,700 times; a pasted copy is a median 10
# bits away, where ~0.003% of others are.
COPY_CANDIDATES = 16


class ClaimFaces:
    """Confirms a near-identical pair of ID-card photos (pHash within a few bits) with the
    recognizer: a re-encoded or resized copy of one photo holds the same face, so some face of
    one and some face of the other must match at ``threshold`` (the ID-card accept threshold:
    the same person at the calibrated false-accept rate). Tight, low-quality ID chips all look
    alike to a 64-bit pHash: two chips of *different* people 6 bits apart were measured
    (docs/QUALITY.md, "Duplicate claims"), and without this check both subjects went to review
    with a false claim. A photo whose faces cannot be found or were not embedded (gated) cannot
    be checked (None): within ``PHASH_NEAR_BITS`` the pair stays a claim (review costs a
    minute; a missed claim, a wrong label).

    Embeddings come from this run's ID-card detections (``det``: ``image_sha256``,
    ``embedding``) and, for photos of earlier runs, from
    the stored faces of the photo's own subject (read once per subject, only for candidate
    pairs, so a run without near-identical photos reads nothing)."""

    def __init__(
        self,
        store: ObjectStore,
        det: pa.Table,
        threshold: float,
        recorded_in: Mapping[str, Collection[str]] | None = None,
    ) -> None:
        self._store = store
        self._det = det
        self._threshold = threshold
        # image sha256 -> the subjects it was recorded under: a photo moved to another subject
        # this run still has its faces in the subject it was decoded in (refile_faces moves
        # them after the claims are found), so a claim on it is checked with those.
        self._recorded_in = recorded_in or {}
        self._new: dict[str, list[tuple[float, np.ndarray]]] | None = None
        self._stored: dict[str, dict[str, list[tuple[float, np.ndarray]]]] = {}

    @staticmethod
    def _by_sha(t: pa.Table) -> dict[str, list[tuple[float, np.ndarray]]]:
        """image sha256 -> (face size, unit embedding) of its embedded faces, largest first
        (stable: detection order among equal sizes; a face without a recorded size last)."""
        out: dict[str, list[tuple[float, np.ndarray]]] = defaultdict(list)
        t = t.filter(pc.is_valid(t.column("embedding")))
        if not t.num_rows:
            return out
        emb = l2_normalize(_embeddings(t.column("embedding")))
        px = t.column("face_px").to_pylist()
        for sha, size, e in zip(t.column("image_sha256").to_pylist(), px, emb, strict=True):
            out[sha].append((float(size or 0.0), e))
        for faces in out.values():
            faces.sort(key=lambda f: -f[0])
        return out

    def _faces(self, row: dict) -> list[tuple[float, np.ndarray]]:
        sha = row["image_sha256"]
        if self._new is None:
            self._new = self._by_sha(self._det)
        if sha in self._new:
            return self._new[sha]
        own = row["source_group"]
        for group in [own, *sorted(set(self._recorded_in.get(sha, ())) - {own})]:
            if group not in self._stored:
                stored = read_faces(
                    self._store,
                    columns=["image_sha256", "face_px", "embedding"],
                    groups={("idcard", group)},
                )
                self._stored[group] = self._by_sha(stored)
            if sha in self._stored[group]:
                return self._stored[group][sha]
        return []

    def best(self, a: dict, b: dict, main_only: bool = False) -> float | None:
        """The highest cosine between a face of one photo and a face of the other (with
        ``main_only``: between the two photos' largest embedded faces); None when either has
        none to compare."""
        fa, fb = self._faces(a), self._faces(b)
        if not fa or not fb:
            return None
        if main_only:
            return float(fa[0][1] @ fb[0][1])
        return float((np.stack([e for _, e in fa]) @ np.stack([e for _, e in fb]).T).max())

    def __call__(self, a: dict, b: dict) -> bool | None:
        """Whether the two photos hold the same face; None when either has none to compare."""
        best = self.best(a, b)
        return None if best is None else best >= self._threshold

    def same_capture(self, a: dict, b: dict, main_only: bool = False) -> bool | None:
        """Whether the two photos hold nearly the same face, as copies of one capture do
        (:data:`COPY_COSINE`; with ``main_only``, their largest faces); None when either has
        none to compare."""
        best = self.best(a, b, main_only)
        return None if best is None else best >= COPY_COSINE


def claim_reasons(
    claims: dict[str, dict[str, str]], name: Callable[[str], str]
) -> dict[str, Reason]:
    """subject -> ``duplicate_claim: <other subject's pseudonym>[, <another's>]`` (pseudonyms from
    ``name``, sorted), the reason its faces go to review with."""
    return {
        subject: Reason(DUPLICATE_CLAIM, ", ".join(sorted(name(o) for o in others)))
        for subject, others in claims.items()
    }


# A subject in a duplicate claim keeps these decisions: faces that are not the claimed person
# (bystanders, ghost portraits) or that no one could compare (gated crops).
_CLAIM_KEEPS = frozenset(
    {
        "not_the_largest_face_in_live_photo",
        "not_the_matching_face_in_live_photo",
        "idcard_secondary_face_in_id_photo",
        "low_quality",
        "too_small",
    }
)


def _several_id_photos(
    id_faces: list[FaceInfo], images: list[str], uris: list[str]
) -> tuple[Reason | None, set[str]]:
    """For one subject's ID faces (each with its image's sha256 and URI): the review reason
    when they come from more than one ID photo (None: from one), and the face id of each such
    photo's largest face (:func:`tasks.idcard.by_size`, the order verify_subject takes)."""
    by_image: dict[str, list[FaceInfo]] = defaultdict(list)
    for f, sha in zip(id_faces, images, strict=True):
        by_image[sha].append(f)
    if len(by_image) < 2:
        return None, set()
    names = sorted({posixpath.basename(u) for u in uris})
    main = {by_size(fs)[0].face_id for fs in by_image.values()}
    why = Reason(
        SEVERAL_ID_PHOTOS,
        f"{len(by_image)} ID photos ({', '.join(names)}); a subject has one: settle it in "
        "review, or `faceloop forget --image` the wrong one (deleting a file keeps its faces)",
    )
    return why, main


def relabel(
    settings: Settings,
    faces: pa.Table,
    affected: set[tuple[str, str]],
    id_problems: dict[str, Reason] | None = None,
    claims: dict[str, Reason] | None = None,
    live_copies: dict[str, dict[str, str]] | None = None,
    replaced_ids: Collection[str] = (),
    dims: Mapping[str, tuple[int | None, int | None]] | None = None,
    crops: Callable[[str, Collection[str]], Mapping[str, bytes]] | None = None,
) -> tuple[dict[str, Decision], dict[str, str | None]]:
    """Decisions for the faces of ``faces`` (FACES_SCHEMA without crops). ``replaced_ids``
    (:func:`replaced_id_photos`): contents of ID photos another file replaced; their faces are
    rejected and the subject is verified with the ID photo it has now. ``id_problems``
    (:func:`id_photo_problems`) says which ID-card subjects have no usable ID photo, and why;
    ``claims`` (:func:`claim_reasons`) which share a photo with another subject: their faces
    (the ID face and the claimed live faces, whatever the comparison said) go to review with
    that reason; ``live_copies`` (:func:`live_copies_of_id`) which live photos are a subject's
    own ID photo: their faces are rejected and not compared, and an ID face left with no live
    face to compare goes to review saying so. ``dims``: image sha256 -> (width, height), so that
    an ID face cut by its photo's edge is known (tasks.idcard.FaceInfo.cut). ``crops(subject,
    face ids)``: those faces' aligned JPEG crops, for the pixel test of a live face that would be
    auto against its ID face (tasks.idcard.same_picture_score; None: no such test).

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
        merge_th = _gallery_threshold(
            settings,
            dict(zip(keys, cents, strict=True)),
            {k: sorted({group[i] for i in members[k]}) for k in keys},
            len(keys),
        )
        comps = merge_clusters(cents, counts, keys, merge_th)
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
        photo = faces.column("image_sha256").to_pylist()
        for d in one_face_per_photo(
            decisions, {fid[i]: photo[i] for i in eligible}, {fid[i]: px[i] for i in eligible}
        ):
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
        uris = faces.column("image_uri").to_pylist()
        landmarks = faces.column("landmarks").to_pylist()
        for subject, rows in sorted(subjects.items()):

            def info(i: int) -> FaceInfo:
                b = bbox[i]
                w, h = (dims or {}).get(image[i], (None, None))
                # Within 4% of the photo's shorter side of an edge (2 px at least): a printed
                # ghost lies millimetres inside its card, a neighbour cut by a tight crop at it
                # (lfw-dev eval chips: boxes from x = 0 and x = 2 of 102 px).
                m = max(2.0, 0.04 * min(w, h)) if w and h else 1.0
                cut = (
                    b[0] <= m or b[1] <= m or bool(w and b[2] >= w - m) or bool(h and b[3] >= h - m)
                )
                return FaceInfo(
                    fid[i],
                    emb[i],
                    float((b[2] - b[0]) * (b[3] - b[1])),
                    float(q[i]),
                    float(det[i]),
                    cut,
                )

            gated = {i: g for i in rows if (g := gate("idcard", px[i], q[i], qs)) is not None}
            for i, g in gated.items():  # never embedded: nothing to compare
                if not human[i]:
                    out[fid[i]] = Decision.of(fid[i], REJECTED, None, g.why, g.score)
            rows = [i for i in rows if i not in gated]
            gone = [i for i in rows if role[i] == ROLE_ID and image[i] in replaced_ids]
            for i in gone:
                if not human[i]:
                    name = posixpath.basename(uris[i])
                    out[fid[i]] = Decision(
                        fid[i],
                        REJECTED,
                        None,
                        "idcard_id_photo_replaced",
                        f"{name} holds another ID photo now",
                        None,
                    )
            rows = [i for i in rows if i not in gone]
            id_rows = [i for i in rows if role[i] == ROLE_ID]
            id_faces = [info(i) for i in id_rows]
            # One ID photo per subject: with two (id.jpg and id.png, say) the faces would be
            # pooled and the smaller photo's holder rejected as the larger one's "ghost
            # portrait". The subject goes to review instead, each ID photo's largest face too.
            several, main_ids = _several_id_photos(
                id_faces, [image[i] for i in id_rows], [uris[i] for i in id_rows]
            )
            copies = (live_copies or {}).get(subject, {})
            lives: dict[str, list[FaceInfo]] = defaultdict(list)
            pictures: set[str] = set()  # live photos holding the ID picture
            for i in rows:
                if role[i] == ROLE_LIVE and image[i] in copies:
                    if not human[i]:
                        out[fid[i]] = Decision(
                            fid[i], REJECTED, None, LIVE_IS_ID_PHOTO, copies[image[i]], None
                        )
                elif role[i] == ROLE_LIVE:
                    # The ID picture inside a live photo: rejected, and the photo's other
                    # faces are judged without it (the holder of a pasted card is compared).
                    pic = max((float(emb[i] @ f.embedding) for f in id_faces), default=-1.0)
                    if pic >= ID_COPY_COSINE:
                        if not human[i]:
                            out[fid[i]] = Decision(
                                fid[i],
                                REJECTED,
                                None,
                                LIVE_IS_ID_PHOTO,
                                f"its face is the ID photo's (cosine {pic:.3f} >= "
                                f"{ID_COPY_COSINE}): the ID picture pasted, printed or "
                                "photographed, not a live capture",
                                pic,
                            )
                        pictures.add(posixpath.basename(uris[i]))
                        continue
                    lives[image[i]].append(info(i))
            live_images = [lives[k] for k in sorted(lives)]
            no_id = (id_problems or {}).get(subject)
            claim = (claims or {}).get(subject) or several

            def same_picture(id_face: str, live_face: str, subject: str = subject) -> float | None:
                """tasks.idcard.same_picture_score of two faces of ``subject`` (None: unknown)."""
                a = row_of[id_face]
                w, h = (dims or {}).get(image[a], (None, None))
                if crops is None or not w or not h or landmarks[a] is None:
                    return None
                got = crops(subject, (id_face, live_face))
                if id_face not in got or live_face not in got:
                    return None
                import cv2

                pic: list[np.ndarray] = []
                for f in (id_face, live_face):
                    p = cv2.imdecode(np.frombuffer(got[f], np.uint8), cv2.IMREAD_COLOR)
                    if p is None or p.shape[:2] != (112, 112):
                        return None
                    pic.append(p)
                return same_picture_score(pic[0], np.asarray(landmarks[a]), (w, h), pic[1])

            for d in verify_subject(
                id_faces, live_images, th, qs, subject, no_id_photo=no_id, same_picture=same_picture
            ):
                if (copies or pictures) and d.code == "idcard_no_live_face":
                    whys = [*copies.values(), *(f"{n} holds the ID picture" for n in pictures)]
                    detail = "; ".join(sorted(whys)) + ": no live capture to compare"
                    d = Decision(d.face_id, REVIEW, subject, LIVE_IS_ID_PHOTO, detail, d.score)
                if claim is not None and (d.code not in _CLAIM_KEEPS or d.face_id in main_ids):
                    d = Decision(d.face_id, REVIEW, subject, claim.code, claim.detail, d.score)
                if not human[row_of[d.face_id]]:
                    out[d.face_id] = d
    return out, clusters


class _SubjectCrops:
    """``(subject, face ids) -> {face id: aligned JPEG}`` for relabel's pixel test: this run's
    new faces from their detections, stored ones from the subject's faces file; one subject's
    crops held at a time (subjects are decided one after the other)."""

    def __init__(self, store: ObjectStore, new: pa.Table) -> None:
        self._store, self._new = store, new
        self._rows: dict[str, list[int]] | None = None
        self._subject: str | None = None
        self._crops: dict[str, bytes] = {}

    def __call__(self, subject: str, face_ids: Collection[str]) -> dict[str, bytes]:
        if subject != self._subject:
            self._subject, self._crops = subject, {}
            if self._rows is None:
                self._rows = defaultdict(list)
                for k, g in enumerate(self._new.column("source_group").to_pylist()):
                    self._rows[g].append(k)
            if rows := self._rows.get(subject):
                t = self._new.select(["face_id", "aligned_jpeg"]).take(pa.array(rows, pa.int64()))
                self._crops.update(
                    zip(
                        t.column("face_id").to_pylist(),
                        t.column("aligned_jpeg").to_pylist(),
                        strict=True,
                    )
                )
            if any(f not in self._crops for f in face_ids):
                stored = read_faces(
                    self._store, columns=["face_id", "aligned_jpeg"], groups=[("idcard", subject)]
                )
                for f, c in zip(
                    stored.column("face_id").to_pylist(),
                    stored.column("aligned_jpeg").to_pylist(),
                    strict=True,
                ):
                    self._crops.setdefault(f, c)
        return {f: c for f in face_ids if (c := self._crops.get(f)) is not None}


def label_run(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    detections_rel: str | None,
    quarantined_rows: list[dict],
    relabel_all: bool = False,
    use_ray: bool | None = None,
) -> LabelResult:
    """:func:`_label_run`; when the label state (``state/label/``: a cache of what the faces
    table says) is damaged or part of it is missing, it is dropped and the run labels again,
    rebuilding it (one O(store) pass, no model work). A truncated ``units.parquet`` failed every
    refresh with a bare "not a readable Parquet file", a deleted one with FileNotFoundError."""
    from storage import layout
    from storage.objectstore import use_store_modes
    from storage.recovery import drop_label_state
    from storage.tables import check_run_id

    check_run_id(run_id)
    use_store_modes(settings)

    def run() -> LabelResult:
        return _label_run(
            settings, store, run_id, detections_rel, quarantined_rows, relabel_all, use_ray
        )

    try:
        return run()
    except (StorageError, OSError, pa.ArrowInvalid) as exc:  # (OSError: FileNotFoundError too)
        if layout.LABEL_STATE not in str(exc):
            raise
        log.warning(
            "label: its state is damaged (%s): dropped and rebuilt from the faces table",
            exc,
        )
        drop_label_state(store)
        return run()


def _label_run(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    detections_rel: str | None,
    quarantined_rows: list[dict],
    relabel_all: bool = False,
    use_ray: bool | None = None,
) -> LabelResult:
    """Fold ``detections_rel`` into the tables and relabel what it affects (everything with
    ``relabel_all``, e.g. after a re-embed, and when the label settings changed since the last
    run: :func:`state_fingerprint`). Idempotent per run.

    Album faces go through the per-group passes and the merge step described above (on Ray
    when ``use_ray``; None: when at least ``ray.label_min_groups`` albums are touched); ID-card
    subjects with new faces are verified in this process (a subject is a handful of faces)."""
    import json

    from storage import layout
    from storage.recovery import subjects_to_relabel
    from storage.tables import faces_files, faces_generation, group_key
    from tasks.discover import EARLIER

    res = LabelResult()
    laps = _Laps()
    det = store.read_parquet(detections_rel) if detections_rel else DETECTIONS_SCHEMA.empty_table()
    images = sorted(image_rows(det), key=lambda r: r["image_uri"])
    quarantined_rows = copies_decided(quarantined_rows, images)
    # Earlier runs' rows (a retried label of this run replaces its own file: not history): the
    # ID-card photos (claims and ID-photo problems look at all of them) and the album photos
    # with the bytes of one of this run's images (all that copy detection needs). The album
    # rows are the store's size: they are filtered while each run's file is decoded.
    shas = pa.array(sorted({r["image_sha256"] for r in images if r["image_sha256"]}), pa.string())
    history = sorted(
        (
            r
            for r in read_images(
                store,
                columns=_HISTORY_COLUMNS,
                where=pc.field("image_sha256").isin(shas) | (pc.field("source_kind") == "idcard"),
            ).to_pylist()
            if r["run_id"] != run_id
        ),
        key=lambda r: r["run_id"] or "",
    )
    copies = mark_duplicates(images, history)

    # The face rows of the detections, by index: the table (embeddings and crops) is taken
    # once, below, for the faces kept (two copies of it were most of the driver's peak).
    face_rows = (
        np.flatnonzero(
            pc.fill_null(pc.greater_equal(det.column("face_index"), 0), False).to_numpy(
                zero_copy_only=False
            )
        )
        if len(det)
        else np.zeros(0, np.int64)
    )
    face_keys = det.select(["source_kind", "source_group", "face_id", "image_uri"]).take(
        pa.array(face_rows, pa.int64())
    )
    det_groups = set(
        zip(
            face_keys.column("source_kind").to_pylist(),
            face_keys.column("source_group").to_pylist(),
            strict=True,
        )
    )
    # Faces already stored for the groups this run adds to (a face id is sha256 of the image
    # plus its box: a copy elsewhere is caught by mark_duplicates through the image history).
    existing_ids = read_faces(store, columns=["face_id", "image_uri"], groups=det_groups)
    known = dict(
        zip(
            existing_ids.column("face_id").to_pylist(),
            existing_ids.column("image_uri").to_pylist(),
            strict=True,
        )
    )
    keep: list[int] = []
    recovered = 0  # faces an interrupted run stored for this run's photos (below)
    dup_images: dict[str, str] = {}
    for j, (f, uri) in enumerate(
        zip(
            face_keys.column("face_id").to_pylist(),
            face_keys.column("image_uri").to_pylist(),
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
            else:
                # Counted here: that run has no record (its images were never recorded), so
                # the runs' new faces would not add up to the store's.
                recovered += 1
            continue
        known[f] = uri
        keep.append(j)
    # The detection rows of the faces kept. The table (embeddings and crops) is taken per
    # album and once for the ID-card faces, never copied whole: at 10^6 faces two whole copies
    # of a 10,000-face run were most of the driver's peak.
    kept_rows = face_rows[np.asarray(keep, np.int64)]
    kept_keys = face_keys.take(pa.array(np.asarray(keep, np.int64)))
    del face_keys
    uris_with_new_faces = set(kept_keys.column("image_uri").to_pylist())
    for row in images:
        uri = row["image_uri"]
        if uri in dup_images and uri not in copies and uri not in uris_with_new_faces:
            why = Reason(
                InputCode.DUPLICATE_CONTENT, f"faces already in the table (e.g. {dup_images[uri]})"
            )
            row["reason"], row["reason_code"] = why.text, why.code
    res.duplicate_faces = len(dup_images)
    for row in images + quarantined_rows:
        if row.get(EARLIER):
            continue  # the same file as its path's row of this run (tasks.discover.EARLIER)
        code = row_reason_code(row)
        if code == InputCode.FORGOTTEN_TAKEN_IN:
            continue  # no file: a placeholder that stops counting (tasks.discover.TAKEN_IN)
        if code == InputCode.DUPLICATE_CONTENT:
            res.duplicates += 1
        elif row["status"] == IMG_QUARANTINED:
            res.quarantined += 1
        elif code in (InputCode.MOVED, InputCode.RESTORED):
            res.moved += 1
        else:
            res.new_images += 1
    res.new_faces = len(kept_rows) + recovered

    # ---- album faces: new faces staged per album for the workers
    kinds_col = kept_keys.column("source_kind").to_pylist()
    groups_col = kept_keys.column("source_group").to_pylist()
    new_albums: dict[str, str] = {}  # key -> album
    album_rows: dict[str, list[int]] = defaultdict(list)
    id_rows_j: list[int] = []
    for j, (k, g) in enumerate(zip(kinds_col, groups_col, strict=True)):
        if k == ALBUM:
            key = group_key(ALBUM, g)
            new_albums[key] = g
            album_rows[key].append(j)
        else:
            id_rows_j.append(j)
    # (take_rows: the detections are one chunk per face-stage batch, and Table.take would
    # concatenate all of them for every album.)
    for key, rows_j in album_rows.items():
        store.write_parquet(
            layout.staging_label_new(run_id, ALBUM, key),
            _faces_from_detections(take_rows(det, kept_rows[rows_j]), run_id),
        )
    # ID-card faces of this run (a subject is a handful of faces).
    id_new = _faces_from_detections(
        take_rows(det, kept_rows[np.asarray(id_rows_j, np.int64)]), run_id
    )
    # This run's ID-card faces by photo, for confirming near-identical claims (ClaimFaces).
    id_det = det.filter(pc.fill_null(pc.not_equal(det.column("source_kind"), ALBUM), False))
    id_det = id_det.select(["image_sha256", "face_px", "embedding"])
    del det, kept_keys
    meta = _label_meta(store)
    marked_subjects = subjects_to_relabel(store)
    if _fingerprint_changed(meta, settings):
        # Thresholds, clustering or quality gates changed since the last label run (e.g. a new
        # `faceloop calibrate`): every album is clustered again and every ID-card subject
        # verified again under them, as after a re-embed. Otherwise a stored subject, or an
        # album whose faces all had a cluster, would keep decisions made under the old settings
        # until new photos reached it. Identity ids carry over by their faces' votes.
        log.info("label: label settings changed since the last run: relabelling everything")
        relabel_all = True
    # (A changed fingerprint has set relabel_all above.)
    valid = (
        not relabel_all and meta is not None and meta.get("generation") == faces_generation(store)
    )
    if valid:
        passes_a = sorted(new_albums)
        recluster = set(passes_a)
    else:
        stored = [
            o.rsplit("/", 1)[-1].removesuffix(".parquet") for o in faces_files(store, kinds=[ALBUM])
        ]
        passes_a = sorted(set(stored) | set(new_albums))
        recluster = set(new_albums) | (set(stored) if relabel_all else set())
    try:
        album_decisions: Counter[str] = Counter()
        album_codes: Counter[str] = Counter()
        staged_groups: list[tuple[str, str]] = []
        staged_state: list[tuple[str, str]] = []
        merged: dict = {}
        loose: dict = {}
        nodes: set[str] = set()
        if passes_a or not valid:
            state_units = int((meta or {}).get("units", 0)) if valid else 0
            ray_on = _use_ray(settings, len(passes_a), use_ray, state_units)
            laps.lap("prepare")
            a_out = ray_map(
                settings,
                ray_on,
                "label: cluster",
                [{"key": k, "recluster": k in recluster} for k in passes_a],
                lambda st, it: cluster_group(settings, st, run_id, it["key"], it["recluster"]),
                nodes=nodes,
            )
            res.albums_clustered = sum(1 for o in a_out if o["clustered"])
            laps.lap("cluster")
            merged, views = _call_with_views(
                settings,
                ray_on,
                lambda st, v: merge_step(settings, st, run_id, passes_a, full=not valid, views=v),
            )
            albums = merged["albums"]
            staged = set(passes_a)
            laps.lap("merge")
            # Names this call's state for the passes' per-process caches (a retry of the run
            # stages it again, so the run id alone would not do).
            scope = f"{run_id}:{uuid.uuid4().hex}"
            ray_on = _use_ray(settings, len(albums), use_ray, state_units)
            kept: dict[str, float] = merged["cohesion_kept"]
            wanted = None if not valid else set(merged["identities"]) - set(kept)
            b_out = ray_map(
                settings,
                ray_on,
                "label: cohesion",
                # A full build's are all albums (every album is a changed one then).
                [{"key": k} for k in merged["cohesion_albums"]],
                lambda st, it: cohesion_group(
                    settings, st, run_id, it["key"], it["key"] in staged, wanted, scope, views
                ),
                nodes=nodes,
            )
            sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for o in b_out:
                for name, (s_, n_) in o["loo"].items():
                    sums[name][0] += s_
                    sums[name][1] += n_
            cohesion = {name: (s_ / n_ if n_ else 1.0) for name, (s_, n_) in sums.items()}
            _call(settings, ray_on, lambda st: _stage_cohesion(st, run_id, cohesion))
            cohesion |= kept
            laps.lap("cohesion")
            # Albums in chunks: a chunk's unclustered faces meet the centroids in one product.
            per = _decide_chunk(len(albums))
            c_out = ray_map(
                settings,
                ray_on,
                "label: decide",
                [{"keys": albums[i : i + per]} for i in range(0, len(albums), per)],
                lambda st, it: {
                    "out": decide_groups(
                        settings,
                        st,
                        run_id,
                        it["keys"],
                        staged,
                        cohesion,
                        scope,
                        views,
                        loose_all=not valid,
                    )
                },
                nodes=nodes,
                unit="chunk",
            )
            for o in (o for chunk in c_out for o in chunk["out"]):
                res.changed_faces += o["changed"]
                album_decisions.update(o["status"])
                album_codes.update(o["codes"])
                if o["staged"]:
                    staged_groups.append((o["staged"][0], o["staged"][1]))
            res.groups_rewritten += len(staged_groups)
            res.albums_decided = len(albums)
            # The loose faces' index with the changes the decide pass staged.
            loose = _call(
                settings, ray_on, lambda st: stage_loose(st, run_id, not valid, meta or {})
            )
            for rel in loose["staged"]:
                staged_state.append((layout.staging_label_file(run_id, rel), rel))
            for key in passes_a:
                rel = layout.label_clusters(ALBUM, key)
                staged_state.append((layout.staging_label_file(run_id, rel), rel))
            state = [
                layout.LABEL_UNITS_DELTA,
                layout.LABEL_INDEX_DELTA,
                layout.LABEL_IDENTITIES_DELTA,
            ]
            if merged["units_written"]:
                state.append(layout.LABEL_UNITS)
            if merged["index_written"]:
                state.append(layout.LABEL_INDEX)
            if merged["identities_written"]:
                state.append(layout.LABEL_IDENTITIES)
            for rel in state:
                staged_state.append((layout.staging_label_file(run_id, rel), rel))
            laps.lap("decide")
        else:
            laps.lap("prepare")

        # ---- ID-card subjects with new faces (all of them with relabel_all)
        id_groups = {(k, g) for k, g in det_groups if k != ALBUM}
        # Photos two ID subjects claim: this run's subjects and those with new faces are checked
        # against every stored ID-card photo; the subjects they share a photo with are relabelled
        # too (a claim found now may involve a subject an earlier run accepted).
        id_rows = history + images + quarantined_rows
        focus = {
            r["source_group"] for r in images + quarantined_rows if r["source_kind"] == "idcard"
        }
        focus |= {g for k, g in id_groups if k == "idcard"}
        if relabel_all:  # every subject is decided again: every claim with it
            focus |= {r["source_group"] for r in id_rows if r["source_kind"] == "idcard"}
        # Subjects whose claim rested on photos `faceloop forget` took away since.
        focus |= marked_subjects
        id_groups |= {("idcard", g) for g in marked_subjects}
        # A subject's photo back at its path (an ID photo's edit reverted, restored) changes
        # which ID photo is its own (replaced_id_photos): decided again.
        id_groups |= {
            ("idcard", r["source_group"])
            for r in quarantined_rows
            if r["source_kind"] == "idcard" and row_reason_code(r) == InputCode.RESTORED
        }
        # Photos moved into another subject's folder: their faces go with them, and both
        # subjects are decided again.
        moves = refiled_id_photos(images + quarantined_rows, history)
        if relabel_all:
            # Every photo's faces where its photo is now, this run's moves or earlier ones (a
            # store whose moved ID photos kept their old subject's faces is healed).
            moves = refiled_id_photos(current_rows(id_rows), id_rows) | moves
        # The subjects the moved photos were recorded under (where their faces may be).
        was_in = (
            {("idcard", h["source_group"]) for h in history if h["image_sha256"] in moves}
            if moves
            else set()
        )
        if moves:
            id_groups |= was_in
            id_groups |= {("idcard", r["source_group"]) for r in moves.values()}
        recorded_in: dict[str, set[str]] = defaultdict(set)
        for h in history:
            if h.get("source_kind") == "idcard" and h.get("source_group"):
                recorded_in[h["image_sha256"]].add(h["source_group"])
        confirm = ClaimFaces(store, id_det, settings.thresholds.idcard_accept, recorded_in)
        claims = duplicate_claims(
            id_rows, focus, confirm=confirm, same_capture=confirm.same_capture
        )
        claims = duplicate_claims(
            id_rows, focus | set(claims), confirm=confirm, same_capture=confirm.same_capture
        )
        reasons = claim_reasons(claims, lambda subject: pseudonym(store, "subject", subject))
        id_groups |= {("idcard", g) for g in claims}
        # The claims this run's subjects were in before it: a claim that no longer holds (the
        # photo that made it restored, replaced or moved) frees the other subject too.
        if focus and not relabel_all:
            before = duplicate_claims(
                history, focus, confirm=confirm, same_capture=confirm.same_capture
            )
            id_groups |= {("idcard", g) for g in before}
        if claims:
            log.info(
                "duplicate claims: %d subjects share a photo with another subject", len(claims)
            )
        id_existing = (
            read_faces(store, columns=NO_CROP, kinds=["idcard"])
            if relabel_all
            else read_faces(store, columns=NO_CROP, groups=id_groups)
            if id_groups
            else FACES_SCHEMA.empty_table().drop(["aligned_jpeg"])
        )
        refiled = FACES_SCHEMA.empty_table()
        refiled_groups: set[tuple[str, str]] = set()
        replaced_before = replaced_id_photos(history)
        id_before = _id_photos_by_subject(id_existing, replaced_before)
        if moves:
            had_faces = set(id_existing.column("source_group").to_pylist())
            refiled, left = refile_faces(read_faces(store, groups=was_in), moves, had_faces)
            refiled_groups = {("idcard", g) for g in left}
            refiled_groups |= {("idcard", g) for g in refiled.column("source_group").to_pylist()}
            moved_out = pc.is_in(id_existing.column("face_id"), refiled.column("face_id"))
            id_existing = pa.concat_tables(
                [
                    id_existing.filter(pc.invert(moved_out)),
                    refiled.select(id_existing.column_names).cast(id_existing.schema),
                ]
            )
        # A person's answer on an ID pair stands while its subject's ID photo is the one it was
        # given against: a subject whose ID photo moved away, was swapped, replaced or restored
        # is verified again (a renamed folder keeps its answers: refile_faces).
        replaced_now = replaced_id_photos(id_rows)
        id_after = _id_photos_by_subject(
            pa.concat_tables([id_existing, id_new.drop(["aligned_jpeg"])]), replaced_now
        )
        lapsed = _lapsed_answers(
            id_existing,
            {g for g in id_before.keys() | id_after.keys() if id_before.get(g) != id_after.get(g)},
            set(refiled.column("face_id").to_pylist()),
        )
        if lapsed:
            id_existing = _reset_labels(id_existing, lapsed)
        res.refiled_faces, res.lapsed_answers = len(refiled), len(lapsed)
        writes: list[tuple[str, str, pa.Table]] = []
        id_decisions: dict[str, Decision] = {}
        if len(id_existing) or len(id_new):
            id_faces = pa.concat_tables([id_existing, id_new.drop(["aligned_jpeg"])])
            affected = (
                set(
                    zip(
                        id_faces.column("source_kind").to_pylist(),
                        id_faces.column("source_group").to_pylist(),
                        strict=True,
                    )
                )
                if relabel_all
                else id_groups
            )
            id_problems = id_photo_problems(id_rows)
            id_copies = live_copies_of_id(
                id_rows, {g for k, g in affected if k == "idcard"}, confirm.same_capture
            )
            id_decisions, clusters = relabel(
                settings,
                id_faces,
                affected,
                id_problems,
                reasons,
                id_copies,
                replaced_now,
                {r["image_sha256"]: (r.get("width"), r.get("height")) for r in id_rows},
                _SubjectCrops(store, id_new),
            )
            changed_groups: set[tuple[str, str]] = set(
                zip(
                    id_new.column("source_kind").to_pylist(),
                    id_new.column("source_group").to_pylist(),
                    strict=True,
                )
            )
            fids = id_faces.column("face_id").to_pylist()
            kinds = id_faces.column("source_kind").to_pylist()
            groups = id_faces.column("source_group").to_pylist()
            old = {c: id_faces.column(c).to_pylist() for c in LABEL_COLUMNS}
            n_existing = len(id_existing)
            changed_groups |= refiled_groups
            changed_groups |= {
                ("idcard", g)
                for g, f in zip(
                    id_existing.column("source_group").to_pylist(),
                    id_existing.column("face_id").to_pylist(),
                    strict=True,
                )
                if f in lapsed
            }
            for i, f in enumerate(fids):
                before = {c: old[c][i] for c in LABEL_COLUMNS}
                after = _new_labels(f, before, id_decisions, clusters)
                if i >= n_existing or _changed(after, before):
                    res.changed_faces += i >= n_existing or _changed(after, before, RELABEL_COLUMNS)
                    changed_groups.add((kinds[i], groups[i]))
            for kind, grp in sorted(changed_groups):
                current = read_faces(store, groups=[(kind, grp)])
                if lapsed:
                    current = _reset_labels(current, lapsed)
                if len(refiled):  # the faces moved to another subject's group, and in from one
                    current = pa.concat_tables(
                        [
                            current.filter(
                                pc.invert(
                                    pc.is_in(current.column("face_id"), refiled.column("face_id"))
                                )
                            ).cast(FACES_SCHEMA),
                            refiled.filter(pc.equal(refiled.column("source_group"), grp)).cast(
                                FACES_SCHEMA
                            ),
                        ]
                    )
                extra = (
                    id_new.filter(
                        pc.and_(
                            pc.equal(id_new.column("source_kind"), kind),
                            pc.equal(id_new.column("source_group"), grp),
                        )
                    )
                    if len(id_new)
                    else id_new
                )
                table = pa.concat_tables([current.cast(FACES_SCHEMA), extra.cast(FACES_SCHEMA)])
                writes.append((kind, grp, _apply(table, id_decisions, clusters, run_id)))
                res.groups_rewritten += 1
        id_summary = summarise(id_decisions.values())
        status = Counter(id_summary["status"]) + album_decisions
        codes = Counter(id_summary["reason"]) + album_codes
        res.decisions = {
            "status": dict(sorted(status.items())),
            "reason": dict(sorted(codes.items())),
        }

        # A path's earlier state this run records too (a renamed album's photo, edited: the
        # move, then the edit) goes first: a path's latest row is its last in run order.
        earlier = [r for r in quarantined_rows if r.get(EARLIER)]
        rows = earlier + images + [r for r in quarantined_rows if not r.get(EARLIER)]
        laps.lap("idcards")
        # Open until the state below is recorded (layout.LABEL_COMMIT_OPEN).
        store.write_bytes(layout.LABEL_COMMIT_OPEN, json.dumps({"run_id": run_id}).encode())
        commit_run_tables(
            store,
            run_id,
            writes,
            pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA) if rows else None,
            staged_groups=staged_groups,
            staged_state=staged_state,
        )
    except BaseException:
        # Nothing of this run may stay staged: the files a pass wrote before the failure
        # (units files, staged groups, state) go with it; the tables are as before.
        for prefix in (layout.staging_label(run_id), layout.staging_dir(run_id) + "/label-new"):
            try:
                store.delete_prefix(prefix)
            except Exception as exc:  # the original failure is the one to report
                log.warning("could not remove staged %s: %s", prefix, exc)
        raise
    # The state now matches the faces as committed: record the generation that says so.
    if merged or valid:
        new_meta = {
            "generation": faces_generation(store),
            "fingerprint": state_fingerprint(settings),
            "run_id": run_id,
            "next_cid": merged.get("next_cid", (meta or {}).get("next_cid", 0)),
            "index_kind": merged.get("index_kind", (meta or {}).get("index_kind")),
            "index_trained_n": merged.get(
                "index_trained_n", (meta or {}).get("index_trained_n", 0)
            ),
            "merge_threshold": merged.get("merge_threshold", (meta or {}).get("merge_threshold")),
            "units": merged.get("units", (meta or {}).get("units", 0)),
            "identities": merged.get("identities_total", (meta or {}).get("identities", 0)),
            "loose_kind": loose.get("loose_kind", (meta or {}).get("loose_kind")),
            "loose_trained_n": loose.get("loose_trained_n", (meta or {}).get("loose_trained_n", 0)),
        }
        store.write_bytes(layout.LABEL_META, json.dumps(new_meta, indent=1).encode())
    store.delete(layout.LABEL_COMMIT_OPEN)
    if marked_subjects:  # decided again and committed (a forget since holds the lock: none)
        store.delete(layout.RELABEL_SUBJECTS)
    res.subjects_decided_again = len(marked_subjects)
    res.units_merged = int(merged.get("units_merged", 0))
    res.ray_nodes = sorted(nodes)
    laps.lap("commit")
    res.pass_seconds = laps.seconds
    log.info(
        "label: %d new faces, %d changed, %d groups rewritten, %d albums clustered, %d decided, %s",
        res.new_faces,
        res.changed_faces,
        res.groups_rewritten,
        res.albums_clustered,
        res.albums_decided,
        res.decisions.get("status"),
    )
    return res


def _use_ray(settings: Settings, n_groups: int, use_ray: bool | None, state_units: int = 0) -> bool:
    """Ray for the label passes when asked, when many albums are touched, or when the state is
    large enough that holding its index and identity sums would grow the driver. A few albums
    run faster in this process (a Ray Data map costs seconds to start, even on a warm Ray)."""
    if use_ray is not None:
        return use_ray
    return n_groups >= settings.ray.label_min_groups or state_units >= INDEX_FLAT_MAX


def _call(settings: Settings, ray_on: bool, fn: Callable[[ObjectStore], dict]) -> dict:
    """``fn(store)`` as one Ray task (its memory is not the driver's) or in this process."""
    from storage.objectstore import open_store

    if not ray_on:
        return fn(open_store(settings.store))
    import ray

    from tasks.ray_faces import init_ray

    init_ray(settings.ray)
    store_uri = settings.store

    def remote() -> dict:
        from storage.objectstore import open_store as _open
        from storage.objectstore import use_store_modes

        use_store_modes(settings)
        return fn(_open(store_uri))

    ref: Any = ray.remote(num_cpus=1)(remote).remote()
    return dict(ray.get(ref))


def _call_with_views(
    settings: Settings, ray_on: bool, fn: Callable[[ObjectStore, dict], dict]
) -> tuple[dict, Any]:
    """``fn(store, views)`` as :func:`_call` does, with the dict ``fn`` fills in ``views``
    handed on: in this process the dict itself; on Ray the task's second return value, which
    stays in the object store of the node that made it (this process owns it and never reads
    it: the passes' workers map its arrays from their node's store)."""
    from storage.objectstore import open_store

    if not ray_on:
        views: dict = {}
        return fn(open_store(settings.store), views), views
    import ray

    from tasks.ray_faces import init_ray

    init_ray(settings.ray)
    store_uri = settings.store

    def remote() -> tuple[dict, dict]:
        from storage.objectstore import open_store as _open
        from storage.objectstore import use_store_modes

        use_store_modes(settings)
        out_views: dict = {}
        return fn(_open(store_uri), out_views), out_views

    refs: Any = ray.remote(num_cpus=1, num_returns=2)(remote).remote()
    ref_out, ref_views = refs
    return dict(ray.get(ref_out)), ref_views


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


def _changed(new: dict, old: dict, columns: Sequence[str] = CHANGE_COLUMNS) -> bool:
    """Whether a face's row must be written again (``columns``: CHANGE_COLUMNS; with
    RELABEL_COLUMNS, whether its label changed for a reader: its cluster's renumbering alone,
    as every re-embed brings, is not a new label)."""
    return any(new[c] != old[c] for c in columns) or (
        new["reason"] != old["reason"] and reason_key(new["reason"]) != reason_key(old["reason"])
    )


def _touched(
    fids: list[str],
    cluster_ids: list[str | None],
    decisions: dict[str, Decision],
    clusters: dict[str, str | None],
) -> list[int]:
    """The rows :func:`_new_labels` can change: a decision of this run, or another cluster
    (the others keep every label column; most faces of an album decided again for one
    identity belong to other identities)."""
    return [
        i
        for i, f in enumerate(fids)
        if f in decisions or (f in clusters and clusters[f] != cluster_ids[i])
    ]


def _apply(
    table: pa.Table, decisions: dict[str, Decision], clusters: dict[str, str | None], run_id: str
) -> pa.Table:
    """``table`` (FACES_SCHEMA, or the part of it that holds face_id and the label columns)
    with this run's labels; only the label columns are touched (embeddings and crops are
    carried over as Arrow buffers, never as Python objects)."""
    names = FACE_LABEL_COLUMNS
    cols = {c: table.column(c).to_pylist() for c in names}
    fids = table.column("face_id").to_pylist()
    for i in _touched(fids, cols["cluster_id"], decisions, clusters):
        f = fids[i]
        old = {c: cols[c][i] for c in LABEL_COLUMNS}
        if is_human(old):
            continue
        new = _new_labels(f, old, decisions, clusters)
        if _changed(new, old):
            for c in LABEL_COLUMNS:
                cols[c][i] = new[c]
            cols["labelled_run_id"][i] = run_id
        else:  # the same decision: its figures as measured now (the row is written anyway)
            for c in ("score", "reason", "reason_code"):
                cols[c][i] = new[c]
    for c in names:
        field = FACES_SCHEMA.field(c)
        table = table.set_column(
            table.schema.get_field_index(c), field, pa.array(cols[c], field.type)
        )
    return table


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


# ============================================================================================
# Album faces at scale (docs/SCALING.md): three per-group passes and one merge step.
#
# A. cluster: per album touched by this run, HDBSCAN (tasks/cluster.cluster_album) -> one
#    file of "merge units" (per-album clusters, and per-album parts of human-confirmed
#    identities) with their quality-weighted centroid sums, unit-vector sums, counts and the
#    previous identities their faces held (state/label/clusters/<kind>/<key>.parquet).
# M. merge (one task): the changed units query the persisted faiss index of unit centroids;
#    the identities they touch (and those of the units they replace) are merged again with
#    tasks/cluster.merge_clusters on just those units, ids by the same majority rule; the
#    identity table (centroid sums, sizes, look-alikes, cohesion) is updated for the touched
#    identities; a look-alike flag that moves re-decides that identity's albums too.
# B. cohesion: per album holding an identity whose members changed, leave-one-out similarity
#    sums (the others keep the cohesion recorded in the identity table).
# C. decide: per such album, the purity decisions (tasks/purity.decide_face); the group file
#    is staged when one of its rows changed.
# The passes read one group at a time; nothing holds all faces or all embeddings. They run as
# Ray Data maps when many groups are touched and Ray is available, in-process otherwise (the
# same functions). The state is trusted only while the faces generation token equals the one
# its meta recorded (any other writer of faces: review answers, forget, a crash -> one full
# rebuild), and a first run, a re-embed or changed settings rebuild it from every album.
# ============================================================================================

# 2: the auto reason no longer restates the drifting similarity and identity size; a store
# labelled before rebuilds once, so that every group carries the same reasons a full rebuild
# writes (an incremental refresh re-decides only the albums it touched).
# 3: identities carry their cohesion (IDENTITIES_SCHEMA); a store labelled before rebuilds once.
# 4: an identity auto-labels at most one face per photo (tasks.purity.one_face_per_photo); a store
# labelled before rebuilds once, so the rule reaches its stored albums.
# 5: a live photo that is its subject's own ID photo confirms nothing (live_copies_of_id); a
# store labelled before relabels once, so the rule reaches its stored subjects.
# 7: an ID-card photo moved into another subject's folder takes its faces with it
# (refile_faces); a store labelled before relabels once, which moves the faces of photos moved
# before this rule to the subjects they are in now.
# 8: 7 had first been given to a rule on copies of one capture that was then taken back
# (docs/QUALITY.md, "Copies of one capture"): a store labelled in between carried 7 without the
# rule above and kept its labels for good. And an ID photo and a live photo swapped in their
# subject's folder take the roles of their new places (refile_faces). Every store relabels once.
# 9: album faces of another file of one photo are rejected as ``same_capture``
# (tasks/cluster.capture_copies); a store labelled before relabels once, so that copies it
# labelled before the rule (a photo app's metadata edits, exports) leave its datasets; and a
# live face at ID_COPY_COSINE to its ID face is the ID picture, not a live capture.
# 10: a live face that would be auto and is the ID picture re-photographed (a phone photo of the
# card, a screen: tasks.idcard.same_picture_score) goes to review; a store labelled before
# relabels once, so that such a face accepted before leaves its datasets. Reasons print their
# comparisons so that they read as decided (faceloop.vocab.compared).
STATE_VERSION = 10
ALBUM = "album"
NO_CROP = [c for c in FACES_SCHEMA.names if c != "aligned_jpeg"]
# What the cohesion and decide passes read of an album that was not clustered again: the
# columns _album_rows takes and the label overlay's (decide_groups reads the others only for an
# album it must write whole).
_PASS_COLUMNS = [
    c
    for c in FACES_SCHEMA.names
    if c in ("source_group", "image_sha256", "quality", "face_px", "embedding")
    # capture_copies: where each face lies, and the run that found it (the copy kept)
    or c in ("bbox", "landmarks", "run_id")
    or c in LABELS_SCHEMA.names
]
_F32_LIST = pa.list_(pa.float32())
CLUSTERS_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),  # "<album>#<n>" or "human:<identity_id>"
        ("count", pa.int64()),  # faces in the unit (merge weight)
        ("ncount", pa.int64()),  # machine-labelled faces (identity size for purity)
        ("min_face_id", pa.string()),
        ("votes", pa.string()),  # JSON {previous identity_id: faces holding it}
        ("wsum", _F32_LIST),  # sum of quality * embedding (the merge centroid's direction)
        ("usum", _F32_LIST),  # sum of unit embeddings of the machine-labelled faces
        ("members", pa.list_(pa.string())),  # face ids
    ]
)
# A unit's columns other than its vectors and members (what the merge reads of a unit).
_UNIT_SCALARS = ["unit", "count", "ncount", "min_face_id", "votes"]
UNITS_SCHEMA = pa.schema(
    [
        ("unit", pa.string()),
        ("albums", pa.list_(pa.string())),  # group keys holding a part of the unit
        ("count", pa.int64()),
        ("ncount", pa.int64()),
        ("min_face_id", pa.string()),
        ("votes", pa.string()),
        ("identity_id", pa.string()),
        ("cid", pa.int64()),  # id in the faiss index
    ]
)
# The units file, like the identities file below, is written in full only on a rebuild or once
# the rows that differ from it reach INDEX_DELTA_SHARE of it; otherwise a refresh writes those
# rows (and ``removed`` for a unit that is gone) beside it. 10^6 faces: 4.5 MB in full (100,000
# units) for a refresh that replaces a few hundred.
UNITS_DELTA_SCHEMA = pa.schema([*UNITS_SCHEMA, ("removed", pa.bool_())])
IDENTITIES_SCHEMA = pa.schema(
    [
        ("identity_id", pa.string()),
        ("size", pa.int64()),
        ("usum", _F32_LIST),
        ("dup_id", pa.string()),  # larger look-alike identity (purity duplicate check)
        ("dup_sim", pa.float32()),
        # Mean leave-one-out similarity of its faces (pass B; null until pass B measured it):
        # an identity whose members did not change keeps it, so a refresh that only moves its
        # look-alike flag decides its albums without pass B reading them again.
        ("cohesion", pa.float64()),
    ]
)
# The identities file is written in full only on a rebuild or once the rows that differ from
# it reach INDEX_DELTA_SHARE of it; otherwise a refresh writes those rows (the same schema, and
# ``removed`` for an identity that is gone) beside it. 10^6 faces: 90 MB in full, 0.6 MB (297
# rows) for a refresh that adds 10,000 faces to five albums.
IDENTITIES_DELTA_SCHEMA = pa.schema([*IDENTITIES_SCHEMA, ("removed", pa.bool_())])
_IDENTITY_SCALARS = pa.schema([f for f in IDENTITIES_SCHEMA if f.name != "usum"])
# The persisted unit index is exact (flat) up to this many units, then an IVF index trained on
# the units it then holds; it is trained again once it has grown by REBUILD_GROWTH.
INDEX_FLAT_MAX = 20_000
REBUILD_GROWTH = 2.0
# The index file is the index as last written in full; the changes since (units added, units
# removed) are a small Parquet file beside it, applied when it is loaded. Once they reach this
# share of the index, the next refresh writes the index in full again (and an empty delta).
INDEX_DELTA_SHARE = 0.2
INDEX_DELTA_SCHEMA = pa.schema(
    [
        ("cid", pa.int64()),
        ("vector", _F32_LIST),  # null: the unit left the index file
    ]
)


class _IndexDelta:
    """The index's changes since its file was written: units added (id -> unit vector; an
    added one removed again is just forgotten) and ids removed from the file."""

    def __init__(self) -> None:
        self.added: dict[int, np.ndarray] = {}
        self.removed: set[int] = set()

    def add(self, ids: list[int], vecs: np.ndarray) -> None:
        for c, v in zip(ids, vecs, strict=True):
            self.added[int(c)] = v

    def remove(self, ids: list[int]) -> None:
        for c in ids:
            if self.added.pop(int(c), None) is None:
                self.removed.add(int(c))

    def size(self) -> int:
        return len(self.added) + len(self.removed)

    def add_to(self, index: Any) -> None:
        """Add the units added since the file to the faiss ``index`` (in id order, as written)."""
        if self.added:
            ids = sorted(self.added)
            index.add_with_ids(
                np.stack([self.added[c] for c in ids]).astype(np.float32),
                np.asarray(ids, np.int64),
            )

    def apply_to(self, index: Any) -> None:
        """The file's index ``index`` made the index as changed since: added in, removed out."""
        self.add_to(index)
        _remove_ids(index, self.removed)

    def table(self) -> pa.Table:
        added = sorted(self.added)
        vecs = np.stack([self.added[c] for c in added]) if added else np.zeros((0, 1), np.float32)
        return pa.table(
            {
                "cid": pa.array([*sorted(self.removed), *added], pa.int64()),
                "vector": pa.chunked_array(
                    [pa.nulls(len(self.removed), _F32_LIST), *_list_column(vecs).chunks],
                    _F32_LIST,
                ),
            },
            schema=INDEX_DELTA_SCHEMA,
        )


def _remove_ids(index: Any, ids: Collection[int]) -> None:
    """Take the units ``ids`` out of a faiss index, or of a :class:`_MappedIndex`."""
    import faiss

    if isinstance(index, _MappedIndex):
        index.remove(ids)
    elif ids:
        arr = np.asarray(sorted(ids), np.int64)
        # An array selector: the IVF index's hashtable direct map takes no other.
        index.remove_ids(faiss.IDSelectorArray(len(arr), faiss.swig_ptr(arr)))


def _load_index(
    store: ObjectStore, rel: str | None = None, delta_rel: str | None = None
) -> tuple[Any, _IndexDelta]:
    """The persisted unit index (its file with the changes since applied) and those changes;
    ``rel`` / ``delta_rel``: another index kept the same way (the loose faces')."""
    import faiss

    from storage import layout

    rel = rel or layout.LABEL_INDEX
    path = store.local_file(rel)
    if path is not None and os.path.isfile(path):
        # faiss reads its file straight into the index (0.06-0.2 s for the 208 MB index of
        # 10^6 faces); from bytes it is read, then copied (0.6-1.7 s).
        index = faiss.read_index(path)
    else:
        index = faiss.deserialize_index(np.frombuffer(store.read_bytes(rel), dtype=np.uint8))
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = NPROBE
    delta = _read_index_delta(store, delta_rel)
    delta.apply_to(index)
    return index, delta


def _read_index_delta(store: ObjectStore, delta_rel: str | None = None) -> _IndexDelta:
    """The index's changes since its file was written (:class:`_IndexDelta`), from the store."""
    from storage import layout

    delta_rel = delta_rel or layout.LABEL_INDEX_DELTA
    delta = _IndexDelta()
    if store.exists(delta_rel):
        t = store.read_parquet_file(delta_rel)
        cids = t.column("cid").to_pylist()
        valid = pc.is_valid(t.column("vector")).to_numpy(zero_copy_only=False)
        delta.removed = {c for c, v in zip(cids, valid.tolist(), strict=True) if not v}
        rows = np.flatnonzero(valid)
        if len(rows):
            delta.add(
                [cids[i] for i in rows.tolist()], _list_matrix(t.column("vector"), rows.tolist())
            )
    return delta


class _MappedIndex:
    """The stored IVF index for a refresh that only queries it and records its changes: the
    file memory-mapped read-only (faiss reads its inverted lists from the page cache as the
    probed cells are scanned), the units added since it was written in a small IVF index on
    the same coarse quantizer (so a query probes the same cells in both), and the ids removed
    since hidden from its searches. It answers ``search`` as the file loaded with the changes
    applied does (the same cells probed, the same vectors scanned, the same top ``k``); only
    writing the index in full loads it (:meth:`materialize`). Loading the 208 MB index of 10^6
    faces into a fresh Ray worker took 0.55-0.7 s of the merge step's ~2.9 s; mapping it, ~5 ms.
    """

    def __init__(self, path: str, delta: _IndexDelta) -> None:
        import faiss

        self.path = path
        self.base: Any = faiss.read_index(path, faiss.IO_FLAG_MMAP)
        base_ivf: Any = faiss.extract_index_ivf(self.base)
        base_ivf.nprobe = NPROBE
        self.added = faiss.IndexIVFFlat(
            base_ivf.quantizer, base_ivf.d, base_ivf.nlist, base_ivf.metric_type
        )
        self.added.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        self.added.nprobe = NPROBE
        self.delta = delta
        delta.add_to(self.added)
        self.hidden: set[int] = set(delta.removed)

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal) - len(self.hidden) + int(self.added.ntotal)

    def remove(self, ids: Collection[int]) -> None:
        """Take ``ids`` out: those added since the file are dropped, the file's are hidden."""
        in_added = [int(c) for c in ids if int(c) in self.delta.added]
        _remove_ids(self.added, in_added)
        self.hidden |= {int(c) for c in ids} - set(in_added)

    def add_with_ids(self, vecs: np.ndarray, ids: np.ndarray) -> None:
        self.added.add_with_ids(vecs, ids)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        params = None
        if self.hidden:
            arr = np.asarray(sorted(self.hidden), np.int64)
            self._hide = faiss.IDSelectorBatch(len(arr), faiss.swig_ptr(arr))
            self._not = faiss.IDSelectorNot(self._hide)
            params = faiss.SearchParametersIVF()
            params.sel = self._not
            params.nprobe = NPROBE
        d1, i1 = self.base.search(q, k, params=params)
        if not self.added.ntotal:
            return d1, i1
        d2, i2 = self.added.search(q, k)
        d = np.concatenate([d1, d2], axis=1)
        i = np.concatenate([i1, i2], axis=1)
        # Per row, the k best of both by similarity (a stable sort keeps the file's first);
        # faiss marks a missing result with id -1 and the lowest float, which sorts last.
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)

    def range_hits(self, q: np.ndarray, radius: float, nprobe: int) -> np.ndarray:
        """:func:`range_hits` over the file (its removed ids hidden) and the added index."""
        import faiss

        q = np.ascontiguousarray(q, np.float32)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if self.hidden:
            arr = np.asarray(sorted(self.hidden), np.int64)
            hide = faiss.IDSelectorBatch(len(arr), faiss.swig_ptr(arr))
            keep = faiss.IDSelectorNot(hide)  # held here: params.sel does not own it
            params.sel = keep
        _, _, i1 = self.base.range_search(q, radius - 1e-6, params=params)
        i2: np.ndarray = np.zeros(0, np.int64)
        if self.added.ntotal:
            added = faiss.SearchParametersIVF()
            added.nprobe = nprobe
            _, _, i2 = self.added.range_search(q, radius - 1e-6, params=added)
        return np.unique(np.concatenate([i1, i2]))

    def materialize(self) -> Any:
        """The whole index in memory: the file with the changes applied (to write it in full)."""
        import faiss

        index = faiss.read_index(self.path)
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = NPROBE
        self.delta.apply_to(index)
        return index


# Map the stored IVF index instead of loading it, where the store is a local folder.
MAP_INDEX = True


def _open_index(
    store: ObjectStore, rel: str | None = None, delta_rel: str | None = None
) -> tuple[Any, _IndexDelta]:
    """The persisted unit index for a refresh: :class:`_MappedIndex` over a local IVF file
    (``MAP_INDEX``), else :func:`_load_index`'s index in memory. Either takes ``search``,
    ``range_hits``, ``add_with_ids``, ``ntotal`` and :func:`_remove_ids`. ``rel`` /
    ``delta_rel``: as :func:`_load_index`."""
    from storage import layout

    path = store.local_file(rel or layout.LABEL_INDEX)
    if MAP_INDEX and path is not None and os.path.isfile(path):
        with open(path, "rb") as f:
            kind = f.read(4)
        if kind in _IVF_FOURCC:
            delta = _read_index_delta(store, delta_rel)
            try:
                return _MappedIndex(path, delta), delta
            except RuntimeError as exc:  # a faiss build or platform that cannot map the file
                log.warning("label: could not map %s (%s); loading it", path, exc)
    return _load_index(store, rel, delta_rel)


def range_hits(index: Any, q: np.ndarray, radius: float, nprobe: int = NPROBE) -> np.ndarray:
    """The ids of ``index`` (faiss, or :class:`_MappedIndex`) at cosine ``radius`` or more from
    any row of ``q`` (unit rows), each once; an IVF index probes ``nprobe`` cells per row."""
    import faiss

    if not len(q) or not index.ntotal:
        return np.zeros(0, np.int64)
    if isinstance(index, _MappedIndex):
        return index.range_hits(q, radius, nprobe)
    params = None
    if isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
    # faiss keeps inner products strictly above the threshold: a hair below keeps ``radius``.
    _, _, ids = index.range_search(
        np.ascontiguousarray(q, np.float32), radius - 1e-6, params=params
    )
    return np.unique(ids)


# faiss's file tags of the IVF index _build_index writes (IndexIVFFlat, with or without the
# direct map): the first four bytes of the file.
_IVF_FOURCC = (b"IwFl", b"IvFl")


def _index_to_write(index: Any) -> Any:
    return index.materialize() if isinstance(index, _MappedIndex) else index


def _units_with_delta(base: pa.Table, delta: pa.Table) -> pa.Table:
    """The units table ``base`` (UNITS_SCHEMA, or some of its columns with ``unit``) with the
    rows of ``delta`` (UNITS_DELTA_SCHEMA, the same columns and ``removed``) in place of its
    rows of the same unit, its removed units left out, in unit order (the order the table is
    written in)."""
    if not delta.num_rows:
        return base
    keep = pc.invert(pc.is_in(base.column("unit"), value_set=delta.column("unit")))
    added = delta.filter(pc.invert(pc.fill_null(delta.column("removed"), False)))
    added = added.select(base.column_names).cast(base.schema)
    out = pa.concat_tables([base.filter(keep), added])
    return out.take(pc.sort_indices(out, [("unit", "ascending")]))


def _units_delta(old: pa.Table, rows: pa.Table, gone: Collection[str]) -> pa.Table:
    """The units delta after a refresh: ``old`` (the stored delta) without the units this
    refresh wrote (``rows``, UNITS_SCHEMA) or removed (``gone``), then those."""
    from storage.objectstore import conform

    names = pa.array(sorted({*rows.column("unit").to_pylist(), *gone}), pa.string())
    kept = old.filter(pc.invert(pc.is_in(old.column("unit"), value_set=names)))
    fresh = rows.append_column("removed", pa.array([False] * rows.num_rows, pa.bool_()))
    removed = pa.table(
        {"unit": pa.array(sorted(gone), pa.string()), "removed": [True] * len(gone)}
    )  # the other columns null
    return pa.concat_tables([conform(t, UNITS_DELTA_SCHEMA) for t in (kept, fresh, removed)])


def _identities_with_delta(
    base: pa.Table, delta: pa.Table, by_name: bool = False
) -> tuple[pa.Table, np.ndarray]:
    """The identities table ``base`` (IDENTITIES_SCHEMA) with the rows of ``delta`` in place of
    its own and the removed ones left out, as (the table without ``usum``, the ``usum`` matrix);
    the delta's rows come last unless ``by_name`` orders them all by identity name. The matrix
    is filled in its final order straight from the columns' buffers: filtering, concatenating,
    flattening and ordering the list column each copied the 90 MB of vectors at 10^6 faces
    (0.6 s, with the allocations' page faults, in every process that loads the state)."""
    scalars = _IDENTITY_SCALARS.names
    n_base = base.num_rows
    if delta.num_rows:
        keep = pc.invert(pc.is_in(base.column("identity_id"), delta.column("identity_id")))
        keep_np = keep.to_numpy(zero_copy_only=False)
        added = delta.filter(pc.invert(delta.column("removed")))
    else:
        keep_np = np.ones(n_base, bool)
        added = delta
    kept = base.select(scalars) if keep_np.all() else base.select(scalars).filter(keep_np)
    table = pa.concat_tables(
        [
            kept.cast(_IDENTITY_SCALARS),
            added.select(scalars).cast(_IDENTITY_SCALARS),
        ]
    )
    # Destination row of each source row (-1: left out).
    dest_base = np.full(n_base, -1, np.int64)
    dest_base[keep_np] = np.arange(int(keep_np.sum()))
    dest_added = kept.num_rows + np.arange(added.num_rows, dtype=np.int64)
    if by_name and table.num_rows:
        order = pc.sort_indices(table.column("identity_id")).to_numpy()
        table = table.take(pa.array(order))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        dest_base = np.where(dest_base >= 0, inverse[np.maximum(dest_base, 0)], -1)
        dest_added = inverse[dest_added]
    dim = _list_width(base.column("usum")) or _list_width(added.column("usum")) or 1
    out = np.empty((table.num_rows, dim), np.float32)
    _fill_rows(out, base.column("usum"), dest_base)
    _fill_rows(out, added.column("usum"), dest_added)
    return table, out


def _stage_cohesion(store: ObjectStore, run_id: str, cohesion: dict[str, float]) -> dict:
    """Record pass B's ``cohesion`` in the identities merge_step staged (the whole file when
    it staged one, else the rows of its delta)."""
    from storage import layout

    base = layout.staging_label_file(run_id, layout.LABEL_IDENTITIES)
    rel = (
        base
        if store.exists(base)
        else layout.staging_label_file(run_id, layout.LABEL_IDENTITIES_DELTA)
    )
    t = store.read_parquet_file(rel)
    old = t.column("cohesion").to_pylist()
    new = [
        cohesion.get(n, o) for n, o in zip(t.column("identity_id").to_pylist(), old, strict=True)
    ]
    if new != old:
        at = t.schema.get_field_index("cohesion")
        t = t.set_column(at, t.schema.field(at), pa.array(new, pa.float64()))
        store.write_parquet(rel, t)
    return {}


def _previous_look_alikes(store: ObjectStore) -> dict[str, str]:
    """identity -> its look-alike flag in the stored identities state (empty: no state)."""
    from storage import layout

    if not store.exists(layout.LABEL_IDENTITIES):
        return {}
    base = store.read_parquet_file(layout.LABEL_IDENTITIES, columns=["identity_id", "dup_id"])
    out = dict(
        zip(base.column("identity_id").to_pylist(), base.column("dup_id").to_pylist(), strict=True)
    )
    delta = store.read_parquet(layout.LABEL_IDENTITIES_DELTA, schema=IDENTITIES_DELTA_SCHEMA)
    for name, dup, removed in zip(
        delta.column("identity_id").to_pylist(),
        delta.column("dup_id").to_pylist(),
        delta.column("removed").to_pylist(),
        strict=True,
    ):
        if removed:
            out.pop(name, None)
        else:
            out[name] = dup
    return {k: v for k, v in out.items() if v is not None}


def _identity_delta(
    base: pa.Table,
    base_usum: np.ndarray,
    now: pa.Table,
    now_usum: np.ndarray,
    only: Collection[str] | None = None,
) -> pa.Table:
    """The rows of ``now`` that differ from (or are not in) ``base``, and a removed row for
    each identity of ``base`` not in ``now`` (both IDENTITIES_SCHEMA; ``*_usum``: their usum
    columns as matrices). ``only``: the identities of both that can differ (the caller knows
    the others are base's rows as they are); None: compare every row."""
    base_ids = base.column("identity_id").to_pylist()
    now_ids = now.column("identity_id").to_pylist()
    at = {name: k for k, name in enumerate(base_ids)}
    both = [
        (k, at[name])
        for k, name in enumerate(now_ids)
        if name in at and (only is None or name in only)
    ]
    differ = {k for k, name in enumerate(now_ids) if name not in at}
    if both:
        ni = np.asarray([k for k, _ in both], np.int64)
        bi = np.asarray([j for _, j in both], np.int64)
        moved = (now_usum[ni] != base_usum[bi]).any(axis=1)
        for c in ("size", "dup_id", "dup_sim", "cohesion"):
            a = now.column(c).take(pa.array(ni)).to_pylist()
            b = base.column(c).take(pa.array(bi)).to_pylist()
            moved |= np.fromiter((x != y for x, y in zip(a, b, strict=True)), bool, len(a))
        differ.update(ni[moved].tolist())
    rows = now.take(pa.array(sorted(differ), pa.int64())).cast(IDENTITIES_SCHEMA)
    changed = rows.append_column("removed", pa.array([False] * rows.num_rows, pa.bool_()))
    now_set = set(now_ids)
    gone = sorted(name for name in base_ids if name not in now_set)
    removed = pa.table(
        {
            "identity_id": pa.array(gone, pa.string()),
            "size": pa.nulls(len(gone), pa.int64()),
            "usum": pa.nulls(len(gone), _F32_LIST),
            "dup_id": pa.nulls(len(gone), pa.string()),
            "dup_sim": pa.nulls(len(gone), pa.float32()),
            "cohesion": pa.nulls(len(gone), pa.float64()),
            "removed": pa.array([True] * len(gone), pa.bool_()),
        },
        schema=IDENTITIES_DELTA_SCHEMA,
    )
    return pa.concat_tables([changed.cast(IDENTITIES_DELTA_SCHEMA), removed])


def _label_meta(store: ObjectStore) -> dict[str, Any] | None:
    """The label state's meta (``state/label/meta.json``); None for a store never labelled."""
    import json

    from storage import layout

    try:
        return dict(json.loads(store.read_bytes(layout.LABEL_META)))
    except FileNotFoundError:
        return None


def _fingerprint_changed(meta: dict[str, Any] | None, settings: Settings) -> bool:
    """Whether the state ``meta`` describes was labelled under other label settings."""
    return meta is not None and meta.get("fingerprint") != state_fingerprint(settings)


def label_settings_changed(store: ObjectStore, settings: Settings) -> bool:
    """Whether the store was last labelled under other label settings than ``settings`` (its
    state's fingerprint differs): the next label run relabels everything, so a refresh must
    run one even when it found nothing new. False for a store never labelled."""
    return _fingerprint_changed(_label_meta(store), settings)


def state_fingerprint(settings: Settings) -> str:
    """What the label state depends on besides the faces: thresholds and gates."""
    import hashlib
    import json

    doc = {
        "v": STATE_VERSION,
        "th": settings.thresholds.model_dump(mode="json"),
        "cluster": settings.cluster.model_dump(mode="json"),
        "quality": settings.quality.model_dump(mode="json"),
    }
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _group_rel(key: str) -> str:
    from storage import layout

    return layout.faces_group(ALBUM, key)


def _group_faces(
    store: ObjectStore, run_id: str, key: str, columns: list[str] | None
) -> tuple[pa.Table, int]:
    """One album's stored faces (its label overlay applied) followed by this run's new faces
    of it (FACES_SCHEMA projected to ``columns``) and how many rows were already stored. The
    table's metadata keeps the stored file's write id (:func:`storage.tables.write_id`)."""
    from storage import layout
    from storage.objectstore import conform
    from storage.tables import read_faces_group

    schema = pa.schema([FACES_SCHEMA.field(c) for c in (columns or FACES_SCHEMA.names)])
    parts = []
    rel = _group_rel(key)
    n_old = 0
    meta = None
    if store.exists(rel):
        base = read_faces_group(store, rel, columns)
        meta = base.schema.metadata
        parts.append(base.replace_schema_metadata(None))
        n_old = base.num_rows
    new_rel = layout.staging_label_new(run_id, ALBUM, key)
    if store.exists(new_rel):
        parts.append(conform(store.read_parquet_file(new_rel, columns=columns), schema))
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table.replace_schema_metadata(meta), n_old


@dataclass
class _AlbumRows:
    """Per-face columns of one album that every pass needs."""

    fid: list[str]
    group: list[str]
    photo: list[str | None]  # image_sha256: one person per photo (one_face_per_photo)
    status: list[str | None]
    prev_identity: list[str | None]
    prev_cluster: list[str | None]
    human: list[bool]
    q: np.ndarray
    px: np.ndarray
    emb: np.ndarray
    has_emb: np.ndarray
    # Where each face lies and the run that found it (capture_copies); None without the columns.
    geometry: np.ndarray | None = None
    first_seen: list[str | None] | None = None
    # Faces the gates may reject (the rest pass them), found once per album by _gated.
    may_gate: np.ndarray | None = None
    # Face row -> the row of the same face in the photo kept, for copies of one capture.
    copy_of: dict[int, int] = field(default_factory=dict)


def _album_rows(t: pa.Table) -> _AlbumRows:
    status = t.column("status").to_pylist()
    return _AlbumRows(
        fid=t.column("face_id").to_pylist(),
        group=t.column("source_group").to_pylist(),
        photo=t.column("image_sha256").to_pylist(),
        status=status,
        prev_identity=t.column("identity_id").to_pylist(),
        prev_cluster=t.column("cluster_id").to_pylist(),
        human=human_mask(t.column("status"), t.column("reason")),
        q=t.column("quality").to_numpy(zero_copy_only=False).astype(np.float32),
        px=t.column("face_px").to_numpy(zero_copy_only=False).astype(np.float32),
        emb=_embeddings(t.column("embedding")),
        has_emb=pc.is_valid(t.column("embedding")).to_numpy(zero_copy_only=False),
        geometry=_geometry(t) if "bbox" in t.column_names else None,
        first_seen=t.column("run_id").to_pylist() if "run_id" in t.column_names else None,
    )


def _gated(settings: Settings, r: _AlbumRows, i: int) -> Decision | None:
    """The decision for a face kept out of clustering (gates, never embedded); None: eligible."""
    if r.may_gate is None:
        # The gates' comparisons for the whole album at once: most faces pass them, and the
        # passes ask about every face (~300,000 calls for a 10^6-face store's increment).
        qs = settings.quality
        r.may_gate = (r.px < qs.min_face_px) | (r.q < qs.min_quality) | ~r.has_emb
        if r.geometry is not None and r.first_seen is not None:
            r.copy_of = capture_copies(r.photo, r.first_seen, r.geometry, r.emb, r.has_emb)
            r.may_gate[list(r.copy_of)] = True
    if not r.may_gate[i]:
        return None
    if (g := gate("album", r.px[i], r.q[i], settings.quality)) is not None:
        return Decision.of(r.fid[i], REJECTED, None, g.why, g.score)
    if (k := r.copy_of.get(i)) is not None:
        # Another file of one photo (a metadata edit, an export): its faces are no second
        # sighting, and a second crop of one capture in a training set is a duplicate sample.
        return Decision.of(
            r.fid[i],
            REJECTED,
            None,
            Reason(SAME_CAPTURE, f"the same face as {r.fid[k]}, of another file of this photo"),
        )
    if not r.has_emb[i]:
        # Passed today's gates but was gated out (not embedded) when it was detected: the
        # thresholds were lowered since. Registering a recognizer re-embeds every face.
        return Decision(
            r.fid[i],
            REJECTED,
            None,
            "not_embedded",
            "below the size/quality gates when detected; "
            "re-embed (faceloop models register) to label it",
            float(r.q[i]),
        )
    return None


def unit_summaries(
    emb: np.ndarray,
    quality: np.ndarray,
    face_ids: Sequence[str],
    previous_identity: Sequence[str | None],
    machine: Sequence[bool],
    units: Sequence[str | None],
) -> pa.Table:
    """CLUSTERS_SCHEMA rows of one album: one per distinct ``units`` entry (None: in no unit).

    ``emb`` / ``quality`` are the faces' embeddings and qualities, ``machine`` says which faces
    the machine labels (the others are human-confirmed and count only in the merge)."""
    import json

    by_unit: dict[str, list[int]] = defaultdict(list)
    for i, u in enumerate(units):
        if u is not None:
            by_unit[u].append(i)
    rows = []
    for u in sorted(by_unit):
        idx = np.asarray(by_unit[u], np.int64)
        wsum = (quality[idx][:, None] * emb[idx]).sum(axis=0)
        mach = idx[np.asarray([machine[i] for i in idx.tolist()], bool)]
        usum = (
            l2_normalize(emb[mach]).sum(axis=0) if len(mach) else np.zeros(emb.shape[1], np.float32)
        )
        votes = Counter(p for p in (previous_identity[i] for i in idx.tolist()) if p)
        rows.append(
            {
                "unit": u,
                "count": len(idx),
                "ncount": len(mach),
                "min_face_id": min(face_ids[i] for i in idx.tolist()),
                "votes": json.dumps(dict(sorted(votes.items()))),
                "wsum": wsum.astype(np.float32),
                "usum": usum.astype(np.float32),
                "members": [face_ids[i] for i in idx.tolist()],
            }
        )
    return pa.Table.from_pylist(rows, schema=CLUSTERS_SCHEMA)


def cluster_group(
    settings: Settings, store: ObjectStore, run_id: str, key: str, recluster: bool
) -> dict:
    """Pass A for one album: cluster it (or keep its stored clusters when nothing new came and
    every eligible face has one) and stage its units file. Returns counts."""
    from storage import layout

    t, _ = _group_faces(store, run_id, key, NO_CROP)
    r = _album_rows(t)
    n = len(r.fid)
    eligible = [i for i in range(n) if not r.human[i] and _gated(settings, r, i) is None]
    units: list[str | None] = [None] * n
    clustered = False
    if eligible and (recluster or any(r.prev_cluster[i] is None for i in eligible)):
        labels = cluster_album(
            r.emb[eligible], r.q[eligible], settings.cluster, settings.thresholds
        )
        for i, lab in zip(eligible, labels.tolist(), strict=True):
            units[i] = f"{r.group[i]}#{lab}" if lab >= 0 else None
        clustered = True
    else:
        for i in eligible:
            units[i] = r.prev_cluster[i]
    for i in range(n):
        if r.human[i] and r.status[i] == HUMAN and r.prev_identity[i]:
            units[i] = f"human:{r.prev_identity[i]}"
    table = unit_summaries(r.emb, r.q, r.fid, r.prev_identity, [not h for h in r.human], units)
    store.write_parquet(layout.staging_label_file(run_id, layout.label_clusters(ALBUM, key)), table)
    return {"key": key, "units": table.num_rows, "clustered": clustered, "faces": n}


# ---------------------------------------------------------------- merge step (one task)


class _UnitRows(Mapping[str, dict]):
    """The units state table (UNITS_SCHEMA) by column, a row made a dict only when asked for:
    a refresh looks at a few hundred of its 10^5 rows at 10^6 faces, and turning them all into
    dicts and back took ~0.7 s."""

    def __init__(self, t: pa.Table | None) -> None:
        from storage.objectstore import conform

        self.t = conform(t, UNITS_SCHEMA) if t is not None else UNITS_SCHEMA.empty_table()
        self.names: list[str] = self.t.column("unit").to_pylist()
        self.identity: list[str] = self.t.column("identity_id").to_pylist()
        self.cid: list[int] = self.t.column("cid").to_pylist()
        self.pos = {u: k for k, u in enumerate(self.names)}
        self._rows: dict[str, dict] = {}
        self._by_identity: tuple[dict[str | None, int], np.ndarray, np.ndarray] | None = None

    def __getitem__(self, u: str) -> dict:
        row = self._rows.get(u)
        if row is None:
            row = self.t.slice(self.pos[u], 1).to_pylist()[0]
            self._rows[u] = row
        return row

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, u: object) -> bool:
        return u in self.pos

    def in_albums(self, keys: Collection[str]) -> set[str]:
        """The units with a part in one of the albums ``keys``."""
        if not keys or not self.names:
            return set()
        col = self.t.column("albums").combine_chunks()
        hit = pc.is_in(pc.list_flatten(col), value_set=pa.array(sorted(keys), pa.string()))
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        rows = np.unique(parents[hit.to_numpy(zero_copy_only=False)])
        return {self.names[k] for k in rows.tolist()}

    def units_of(self, identity: str | None) -> list[str]:
        """The units of ``identity`` (none when it has none). The rows are grouped by identity
        once, in Arrow, when first asked: a refresh asks about a few hundred identities, and a
        set of units per identity for all 10^5 units took 0.2 s of the merge step at 10^6
        faces."""
        if self._by_identity is None:
            enc = self.t.column("identity_id").combine_chunks().dictionary_encode()
            names: list[str | None] = [*enc.dictionary.to_pylist(), None]  # None: a null's code
            codes = pc.fill_null(enc.indices, len(names) - 1).to_numpy(zero_copy_only=False)
            order = np.argsort(codes, kind="stable")
            bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
            code_of = {name: k for k, name in enumerate(names)}
            self._by_identity = (code_of, order, bounds)
        code_of, order, bounds = self._by_identity
        c = code_of.get(identity)
        if c is None:
            return []
        return [self.names[j] for j in order[bounds[c] : bounds[c + 1]].tolist()]

    def table_without(self, units: Collection[str]) -> pa.Table:
        keep = np.ones(len(self.names), bool)
        keep[[self.pos[u] for u in units if u in self.pos]] = False
        return self.t.filter(pa.array(keep))


def _read_clusters(store: ObjectStore, rel: str, columns: list[str] | None = None) -> pa.Table:
    """An album's units (CLUSTERS_SCHEMA, projected to ``columns``); empty when none."""
    from storage.objectstore import conform

    schema = (
        CLUSTERS_SCHEMA
        if columns is None
        else pa.schema([CLUSTERS_SCHEMA.field(c) for c in columns])
    )
    if not store.exists(rel):
        return schema.empty_table()
    return conform(store.read_parquet_file(rel, columns=columns), schema)


def _unit_vectors(
    store: ObjectStore, run_id: str, wanted: dict[str, set[str]], staged: set[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """unit -> (wsum, usum) summed over the albums ``wanted`` (album key -> units); albums in
    ``staged`` are read from this run's staging, the others from the state."""
    from storage import layout

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(wanted):
        rel = layout.label_clusters(ALBUM, key)
        t = _read_clusters(store, layout.staging_label_file(run_id, rel) if key in staged else rel)
        units = t.column("unit").to_pylist()
        keep = [j for j, u in enumerate(units) if u in wanted[key]]
        if not keep:
            continue
        ws = _list_matrix(t.column("wsum"), keep)
        us = _list_matrix(t.column("usum"), keep)
        for row, j in enumerate(keep):
            u = units[j]
            if u in out:  # a human identity confirmed in several albums
                a, b = out[u]
                out[u] = (a + ws[row], b + us[row])
            else:
                out[u] = (ws[row], us[row])
    return out


def _list_matrix(col: pa.ChunkedArray, rows: list[int] | None = None) -> np.ndarray:
    """The rows ``rows`` (None: all) of a list<float32> column as a matrix."""
    sub = col if rows is None else col.take(pa.array(rows, pa.int64()))  # all: no copy first
    n = len(sub)
    if not n:
        return np.zeros((0, 1), np.float32)
    out = np.empty((n, _list_width(sub)), np.float32)
    _fill_rows(out, sub, None)
    return out


def _list_width(col: pa.ChunkedArray) -> int:
    """The length of the first list of a list column of equal-length lists (0: no rows)."""
    for c in col.chunks:
        if len(c):
            return int(c.offsets[1].as_py() - c.offsets[0].as_py())
    return 0


def _fill_rows(out: np.ndarray, col: pa.ChunkedArray, dest: np.ndarray | None) -> None:
    """Row i of the list column ``col`` (lists of ``out.shape[1]`` floats) into ``out[dest[i]]``
    (None: ``out[i]``), left out where ``dest[i] < 0``; straight from each chunk's value buffer,
    one copy (flattening and converting first copied every vector again)."""
    dim, at = out.shape[1], 0
    for c in col.chunks:
        n = len(c)
        if not n:
            continue
        lo, hi = c.offsets[0].as_py(), c.offsets[n].as_py()
        vals = c.values.slice(lo, hi - lo).to_numpy(zero_copy_only=False).reshape(n, dim)
        if dest is None:
            out[at : at + n] = vals
            at += n
            continue
        d = dest[at : at + n]
        sel = d >= 0
        if sel.all():
            out[d] = vals
        elif sel.any():
            out[d[sel]] = vals[sel]
        at += n


_ROWS_BLOCK = 8192


def _ordered_rows(
    old: np.ndarray, src: np.ndarray, fresh: list[np.ndarray], fresh_at: np.ndarray
) -> np.ndarray:
    """A matrix whose row j is ``old[src[j]]``, or, where ``src[j] < 0``,
    ``fresh[fresh_at[j]]``: filled in place, a block of rows at a time. Taking the kept rows,
    concatenating the fresh ones and putting the result in order each made a new copy of the
    identities' sums (90 MB at 10^6 faces), and a fresh allocation's first touch is most of
    the cost of a copy in a process that has just started (a Ray worker)."""
    dim = len(fresh[0]) if fresh else old.shape[1] if old.ndim == 2 and len(old) else 512
    out = np.empty((len(src), dim), np.float32)
    at_old = np.flatnonzero(src >= 0)
    rows = src[at_old]
    for lo in range(0, len(at_old), _ROWS_BLOCK):
        out[at_old[lo : lo + _ROWS_BLOCK]] = old[rows[lo : lo + _ROWS_BLOCK]]
    at_new = np.flatnonzero(src < 0)
    if len(at_new):
        out[at_new] = np.stack(fresh)[fresh_at[at_new]]
    return out


def _unit_rows(m: np.ndarray) -> np.ndarray:
    """:func:`faceloop.arrays.l2_normalize` of the rows of ``m``, a block of rows at a time:
    the same values, without its temporaries of the whole matrix (the identities' sums: 90 MB
    at 10^6 faces; the squares' copy and its page faults in a fresh Ray worker took 0.2 s of
    the merge step)."""
    out = np.empty(m.shape, np.float32)
    for lo in range(0, len(m), _ROWS_BLOCK):
        out[lo : lo + _ROWS_BLOCK] = l2_normalize(m[lo : lo + _ROWS_BLOCK])
    return out


def _list_column(m: np.ndarray) -> pa.ChunkedArray:
    """The rows of matrix ``m`` as a list<float32> column, built from its buffer (per-row Python
    lists through pa.array took 0.8 s for 50,000 x 512); chunks keep int32 offsets in range."""
    m = np.ascontiguousarray(m, np.float32)
    n, d = m.shape
    step = max(1, (1 << 30) // max(d, 1))
    chunks = [
        pa.ListArray.from_arrays(
            pa.array(np.arange(0, (min(n, lo + step) - lo + 1) * d, d, dtype=np.int32)),
            pa.array(m[lo : lo + step].ravel()),
        )
        for lo in range(0, n, step)
    ]
    return pa.chunked_array(chunks, _F32_LIST)


def _index_outgrown(exists: bool, n: int, kind: str | None, trained_n: int) -> bool:
    """Whether a persisted index of ``n`` vectors is built again (:func:`_build_index`): there
    is none, it must change kind (flat up to INDEX_FLAT_MAX, IVF beyond), or its IVF has grown
    REBUILD_GROWTH times past the count it was trained on."""
    want_ivf = n > INDEX_FLAT_MAX
    return (
        not exists
        or (want_ivf and kind != "ivf")
        or (kind == "ivf" and n > REBUILD_GROWTH * max(trained_n, 1))
        or (not want_ivf and kind == "ivf")
    )


def _build_index(vectors: np.ndarray, cids: np.ndarray) -> Any:
    """faiss index over unit centroids with ids ``cids``: exact up to INDEX_FLAT_MAX, else IVF
    trained on these vectors (a direct map keeps removal and growth possible)."""
    import faiss

    n, d = vectors.shape if len(vectors) else (0, 512)
    if n <= INDEX_FLAT_MAX:
        index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    else:
        nlist = int(2 * np.sqrt(n))
        rng = np.random.default_rng(0)
        train = vectors[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = 1234
        ivf.train(train)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        ivf.nprobe = NPROBE
        index = ivf
    if n:
        index.add_with_ids(np.ascontiguousarray(vectors, np.float32), cids.astype(np.int64))
    return index


# Identities whose look-alike is checked again, per matrix product (the product holds
# identities x block float32: 50 MB at 50,000 identities).
_LOOK_ALIKE_BLOCK = 256


def _gallery_threshold(
    settings: Settings,
    vectors: Mapping[str, np.ndarray],
    albums: Mapping[str, Sequence[str]],
    n_units: int,
) -> float:
    """The cross-album merge threshold for a store of ``n_units`` merge units
    (tasks.cluster.gallery_merge_threshold), its impostor tail measured on the machine units
    (one album each) of ``vectors`` (unit -> centroid or weighted sum)."""
    from tasks.cluster import gallery_merge_threshold, within_album_histogram

    th = settings.thresholds
    fpir = settings.cluster.merge_fpir
    if fpir is None:
        return th.merge
    machine = sorted(u for u in vectors if not u.startswith("human:") and len(albums[u]) == 1)
    hist = within_album_histogram(
        np.stack([vectors[u] for u in machine]) if machine else np.zeros((0, 1), np.float32),
        [albums[u][0] for u in machine],
    )
    t = gallery_merge_threshold(th.merge, hist, n_units, fpir)
    log.info(
        "cross-album merge threshold %.4f (policy %.2f; %d units, %d within-album pairs, fpir %g)",
        t,
        th.merge,
        n_units,
        int(hist.sum()),
        fpir,
    )
    return t


def merge_step(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    changed: list[str],
    full: bool,
    views: dict | None = None,
) -> dict:
    """Step M (see above). ``changed``: album keys whose units pass A staged. ``full``: no
    usable state, every album is in ``changed``. Stages units, index and identities; returns
    the album keys to decide again, the identities whose decisions are redone, and counts.
    ``views``, when given, receives what passes B and C read of the state it staged
    (:func:`_state_views`), so that they need not read it back from the store."""
    # The stored identities (their 90 MB of sums at 10^6 faces) are read and decoded on a
    # second thread from the start: nothing before the look-alike check needs them, and this
    # step is otherwise one thread (Parquet decoding and the copies run without the GIL).
    with ThreadPoolExecutor(1, thread_name_prefix="faceloop-identities") as pool:
        identities = pool.submit(_stored_identities, store, full)
        return _merge_step(settings, store, run_id, changed, full, views, identities)


def _stored_identities(
    store: ObjectStore, full: bool
) -> tuple[pa.Table | None, np.ndarray, list[str], np.ndarray, dict[str, list], list[str]]:
    """merge_step's previous identities: (the stored file or None, its sums, the names, sums
    and scalar columns with the stored delta applied, the names in that delta)."""
    from storage import layout

    ident_base: pa.Table | None = None
    base_usum = np.zeros((0, 1), np.float32)
    old_names: list[str] = []
    old_usum = np.zeros((0, 512), np.float32)
    old_cols: dict[str, list] = {c: [] for c in ("size", "dup_id", "dup_sim", "cohesion")}
    delta_names: list[str] = []
    if not full and store.exists(layout.LABEL_IDENTITIES):
        ident_base = store.read_parquet_file(layout.LABEL_IDENTITIES)
        base_usum = _list_matrix(ident_base.column("usum"))
        old_delta = store.read_parquet(
            layout.LABEL_IDENTITIES_DELTA, schema=IDENTITIES_DELTA_SCHEMA
        )
        delta_names = old_delta.column("identity_id").to_pylist()
        it, old_usum = (
            _identities_with_delta(ident_base, old_delta)
            if old_delta.num_rows
            else (ident_base, base_usum)
        )
        old_names = it.column("identity_id").to_pylist()
        old_cols = {c: it.column(c).to_pylist() for c in old_cols}
    return ident_base, base_usum, old_names, old_usum, old_cols, delta_names


def _merge_step(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    changed: list[str],
    full: bool,
    views: dict | None,
    identities: Future,
) -> dict:
    import json

    import faiss

    from storage import layout
    from tasks.cluster import merge_clusters, normalize
    from tasks.purity import _DUP_K, _duplicate_of, flagged_in_pair

    th = settings.thresholds
    changed_set = set(changed)
    meta: dict = {}
    # ---- the previous state
    units_old = _UnitRows(None)
    units_base_rows = 0
    old_units_delta = UNITS_DELTA_SCHEMA.empty_table()
    if not full:
        meta = json.loads(store.read_bytes(layout.LABEL_META))
        units_base = store.read_parquet_file(layout.LABEL_UNITS)
        units_base_rows = units_base.num_rows
        old_units_delta = store.read_parquet(layout.LABEL_UNITS_DELTA, schema=UNITS_DELTA_SCHEMA)
        units_old = _UnitRows(_units_with_delta(units_base, old_units_delta))
        del units_base
    removed = units_old.in_albums(changed_set)

    # ---- this run's units of the changed albums
    new_units: dict[str, dict] = {}
    for key in sorted(changed_set):
        rel = layout.staging_label_file(run_id, layout.label_clusters(ALBUM, key))
        for row in _read_clusters(store, rel, _UNIT_SCALARS).to_pylist():
            u = row["unit"]
            cur = new_units.get(u)
            if cur is None:
                new_units[u] = row | {"albums": [key], "votes": Counter(json.loads(row["votes"]))}
            else:  # human identity in several changed albums
                cur["count"] += row["count"]
                cur["ncount"] += row["ncount"]
                cur["min_face_id"] = min(cur["min_face_id"], row["min_face_id"])
                cur["votes"].update(json.loads(row["votes"]))
                cur["albums"].append(key)
    # Human identities with parts both in changed and unchanged albums: the unchanged parts.
    for u in sorted(removed):
        if u.startswith("human:"):
            old = units_old[u]
            rest = [a for a in old["albums"] if a not in changed_set]
            if rest:
                cur = new_units.setdefault(
                    u,
                    {
                        "unit": u,
                        "count": 0,
                        "ncount": 0,
                        "min_face_id": None,
                        "votes": Counter(),
                        "albums": [],
                    },
                )
                cur["albums"] += rest
                cur["_rest"] = rest
    # Counts of the unchanged parts come from their albums' files (read below with vectors).
    wanted: dict[str, set[str]] = defaultdict(set)
    for u, row in new_units.items():
        for a in row["albums"]:
            wanted[a].add(u)
    vec = _unit_vectors(store, run_id, wanted, changed_set)
    for u, row in new_units.items():
        for a in row.pop("_rest", []):
            part = _read_clusters(store, layout.label_clusters(ALBUM, a), _UNIT_SCALARS).filter(
                pc.equal(pc.field("unit"), u)
            )
            for p in part.to_pylist():
                row["count"] += p["count"]
                row["ncount"] += p["ncount"]
                m = row["min_face_id"]
                row["min_face_id"] = p["min_face_id"] if m is None else min(m, p["min_face_id"])
                row["votes"].update(json.loads(p["votes"]))

    # ---- the merge threshold: a full build measures it on the store (one album's clusters
    # are its impostor sample); a refresh keeps the one measured when the index was built.
    merge_th = float(meta.get("merge_threshold", th.merge))
    if full:
        merge_th = _gallery_threshold(
            settings,
            {u: vec[u][0] for u in new_units},
            {u: row["albums"] for u, row in new_units.items()},
            len(new_units),
        )

    # ---- the index: drop the replaced units, query with the new ones
    index: Any = None
    delta = _IndexDelta()
    next_cid = int(meta.get("next_cid", 0))
    if not full and store.exists(layout.LABEL_INDEX):
        index, delta = _open_index(store)
        gone = [units_old.cid[units_old.pos[u]] for u in removed]
        _remove_ids(index, gone)
        delta.remove(gone)
    cid_unit = {
        c: u for u, c in zip(units_old.names, units_old.cid, strict=True) if u not in removed
    }
    new_keys = sorted(new_units)
    affected: set[str] = {units_old.identity[units_old.pos[u]] for u in removed}
    if index is not None and index.ntotal and new_keys:
        q = normalize(np.stack([vec[u][0] for u in new_keys]))
        sims, nbrs = index.search(q, KNN_K)
        for s_row, n_row in zip(sims.tolist(), nbrs.tolist(), strict=True):
            for s, c in zip(s_row, n_row, strict=True):
                if c >= 0 and s >= merge_th and c in cid_unit:
                    affected.add(units_old.identity[units_old.pos[cid_unit[c]]])
    sub_old = sorted({u for i in affected for u in units_old.units_of(i)} - removed)
    if sub_old:
        wanted = defaultdict(set)
        for u in sub_old:
            for a in units_old[u]["albums"]:
                wanted[a].add(u)
        vec.update(_unit_vectors(store, run_id, wanted, set()))

    # ---- merge the affected units again, ids by the same majority rule
    sub = sorted(set(sub_old) | set(new_keys))
    rows_of = {u: (new_units[u] if u in new_units else units_old[u]) for u in sub}
    if sub:
        cents = np.stack([vec[u][0] for u in sub])
        counts = np.array([rows_of[u]["count"] for u in sub])
        comps = merge_clusters(cents, counts, sub, merge_th)
        votes: list[Mapping[str, int]] = []
        for u in sub:
            if u in new_units:
                votes.append(new_units[u]["votes"])
            elif u.startswith("human:"):
                votes.append(Counter(json.loads(units_old[u]["votes"])))
            else:  # every face of an unchanged machine unit holds its identity
                votes.append(Counter({units_old[u]["identity_id"]: units_old[u]["count"]}))
        reserved = set(units_old.identity)
        for v in votes:
            reserved |= set(v)
        ids = assign_identity_ids_from_votes(
            comps, votes, counts.tolist(), [rows_of[u]["min_face_id"] for u in sub], reserved
        )
    else:
        comps, ids = np.zeros(0, np.int64), []

    # ---- the new units table
    sub_set = set(sub)
    units_new: dict[str, dict] = {}  # the rows of ``sub``; the others are kept as they are
    add_ids: list[int] = []
    add_vecs: list[np.ndarray] = []
    for u, comp in zip(sub, comps.tolist(), strict=True):
        row = rows_of[u]
        ident = ids[comp]
        if u in new_units:
            cid = next_cid
            next_cid += 1
            add_ids.append(cid)
            add_vecs.append(vec[u][0])
        else:
            cid = units_old[u]["cid"]
        v = (
            dict(row["votes"])
            if u in new_units and u.startswith("human:")
            else json.loads(units_old[u]["votes"])
            if u.startswith("human:")
            else {ident: row["count"]}
        )
        units_new[u] = {
            "unit": u,
            "albums": sorted(row["albums"]),
            "count": int(row["count"]),
            "ncount": int(row["ncount"]),
            "min_face_id": row["min_face_id"],
            "votes": json.dumps(dict(sorted(v.items()))),
            "identity_id": ident,
            "cid": cid,
        }

    kept = units_old.table_without(removed | sub_set)
    units_rows = pa.Table.from_pylist(list(units_new.values()), schema=UNITS_SCHEMA)
    units_table = pa.concat_tables([kept, units_rows])
    units_table = units_table.take(pc.sort_indices(units_table, [("unit", "ascending")]))

    # ---- the index: add the new units; train again when it outgrew its kind
    n_units = units_table.num_rows
    trained_n = int(meta.get("index_trained_n", 0))
    kind_now = meta.get("index_kind")
    want_ivf = n_units > INDEX_FLAT_MAX
    rebuild = _index_outgrown(index is not None, n_units, kind_now, trained_n)
    if rebuild:
        all_units = units_table.column("unit").to_pylist()
        missing: dict[str, set[str]] = defaultdict(set)
        for u, in_albums in zip(all_units, units_table.column("albums").to_pylist(), strict=True):
            if u not in vec:
                for a in in_albums:
                    missing[a].add(u)
        vec.update(_unit_vectors(store, run_id, missing, changed_set))
        mat = (
            normalize(np.stack([vec[u][0] for u in all_units]))
            if all_units
            else np.zeros((0, 512), np.float32)
        )
        index = _build_index(
            mat, units_table.column("cid").to_numpy(zero_copy_only=False).astype(np.int64)
        )
        if not full:  # the next refreshes search this index: their threshold, from its units
            merge_th = _gallery_threshold(
                settings,
                {u: vec[u][0] for u in all_units},
                dict(zip(all_units, units_table.column("albums").to_pylist(), strict=True)),
                n_units,
            )
        trained_n = n_units
        kind_now = "ivf" if want_ivf else "flat"
        delta = _IndexDelta()
    elif add_ids and index is not None:
        vecs = normalize(np.stack(add_vecs))
        index.add_with_ids(vecs, np.asarray(add_ids, np.int64))
        delta.add(add_ids, vecs)
    # The index file is written again when it was rebuilt, or when the changes since it was
    # written reach INDEX_DELTA_SHARE of it; otherwise only those changes are (a refresh that
    # replaced a few units writes a few vectors, not the index of the whole store).
    write_base = rebuild or delta.size() > INDEX_DELTA_SHARE * max(index.ntotal, 1)
    if write_base:
        delta = _IndexDelta()

    # ---- identities: sums and sizes of the touched ones, the look-alike check. The state
    # is held as columns and one matrix (no row dict per identity: at 10^6 faces building
    # and stacking 43,000 of them was most of this step).
    ident_base, base_usum, old_names, old_usum, old_cols, delta_names = identities.result()
    # The identities whose row can differ from the stored file's: those of its delta, the
    # touched ones and those whose look-alike is checked (the delta compares only these).
    may_differ: set[str] = set(delta_names)
    old_pos = {name: k for k, name in enumerate(old_names)}
    touched_new: dict[str, list[str]] = defaultdict(list)
    for u, comp in zip(sub, comps.tolist(), strict=True):
        touched_new[ids[comp]].append(u)
    keep = [k for k, i in enumerate(old_names) if i not in affected and i not in touched_new]
    new_names: list[str] = []
    new_sizes: list[int] = []
    new_usums: list[np.ndarray] = []
    for ident, us in touched_new.items():
        size = sum(int(units_new[u]["ncount"]) for u in us)
        if size == 0:
            # Every face of it a person's (an annotator confirmed it): no machine label to
            # purify, but a person a loose face may be. Kept at size 0 with the direction of its
            # faces (their units' quality-weighted sums): without it, confirming an identity in
            # review rejected every later single photo of that person (no centroid to be near).
            direction = np.sum(
                [
                    l2_normalize(vec[u][0][None, :])[0] * float(units_new[u]["count"])
                    for u in sorted(us)
                ],
                axis=0,
            ).astype(np.float32)
            if not np.any(direction):
                continue
            new_names.append(ident)
            new_sizes.append(0)
            new_usums.append(direction)
            continue
        new_names.append(ident)
        new_sizes.append(size)
        new_usums.append(np.sum([vec[u][1] for u in sorted(us)], axis=0).astype(np.float32))
    every = [old_names[k] for k in keep] + new_names
    order = sorted(range(len(every)), key=every.__getitem__)
    names = [every[k] for k in order]
    # Where each identity's row comes from: its row of the old state, or -1 (new sums).
    src = np.asarray(keep + [-1] * len(new_names), np.int64)[order]
    usums = _ordered_rows(old_usum, src, new_usums, np.asarray(order, np.int64) - len(keep))

    def _col(c: str, fresh: Callable[[int], Any]) -> list:
        vals = old_cols[c]
        return [vals[k] if k >= 0 else fresh(j) for j, k in zip(order, src.tolist(), strict=True)]

    n_keep = len(keep)
    sizes = np.array(_col("size", lambda j: new_sizes[j - n_keep]), np.int64)
    dup_id: list[str | None] = _col("dup_id", lambda j: None)
    dup_sim: list[float | None] = _col("dup_sim", lambda j: None)
    cohesion: list[float | None] = _col("cohesion", lambda j: None)
    cents = _unit_rows(usums)
    pos = {i: k for k, i in enumerate(names)}
    redo = {i for i in touched_new if i in pos}
    if full or not names:
        # A rebuild keeps the look-alike flags of the state it replaces where they still hold
        # (tasks.purity.flagged_in_pair); a first run has none.
        was = _previous_look_alikes(store) if full else {}
        before = np.array([pos.get(was.get(i) or "", -1) for i in names], np.int64) if was else None
        d_idx, d_sim = _duplicate_of(cents, sizes, th.duplicate, before)
        for k in range(len(names)):
            dup_id[k] = names[d_idx[k]] if d_idx[k] >= 0 else None
            dup_sim[k] = float(d_sim[k]) if d_idx[k] >= 0 else None
    else:
        # Each identity's look-alike flag before this run (tasks.purity.flagged_in_pair: a
        # flag stays where it is until the identity carrying it outgrows the other).
        def had(name: str) -> str | None:
            k = old_pos.get(name)
            return None if k is None else old_cols["dup_id"][k]

        def look_alike(k: int, s: np.ndarray) -> tuple[str | None, float | None]:
            # ``s``: every centroid's cosine to centroid k. The first of its _DUP_K nearest (by
            # cosine, then index) that qualifies; only cosines >= th.duplicate can, and they
            # rank before every other, so those few are all that is sorted (a full argsort of
            # every identity per checked one was most of this step at 10^6 faces).
            cand = np.flatnonzero(s >= th.duplicate)
            top = cand[np.lexsort((cand, -s[cand]))][:_DUP_K]
            for j in top.tolist():
                if j != k and flagged_in_pair(
                    int(sizes[k]),
                    int(sizes[j]),
                    had(names[k]) == names[j],
                    had(names[j]) == names[k],
                ):
                    return names[j], float(s[j])
            return None, None

        may_differ.update(touched_new)

        def recheck(k: int, s: np.ndarray) -> None:
            i = names[k]
            may_differ.add(i)
            flag, flag_sim = look_alike(k, s)
            was_id = dup_id[k]
            dup_id[k], dup_sim[k] = flag, flag_sim
            if i not in redo and was_id != flag:
                # Its faces' decisions change; the similarity alone moving changes a figure of
                # their reasons, which is not a new decision (faceloop.vocab.reason_key).
                redo.add(i)

        # The identities that changed, then every identity within th.duplicate of one of them
        # (its look-alike may be one of them now); one product per block of checked identities,
        # each column used for the check and for finding the second set.
        first = sorted(pos[i] for i in redo)
        near: set[int] = set()
        for lo in range(0, len(first), _LOOK_ALIKE_BLOCK):
            ks = first[lo : lo + _LOOK_ALIKE_BLOCK]
            block = cents @ cents[ks].T
            near.update(np.flatnonzero((block >= th.duplicate).any(axis=1)).tolist())
            for col, k in enumerate(ks):
                recheck(k, block[:, col])
        second = sorted(near - set(first))
        for lo in range(0, len(second), _LOOK_ALIKE_BLOCK):
            ks = second[lo : lo + _LOOK_ALIKE_BLOCK]
            block = cents @ cents[ks].T
            for col, k in enumerate(ks):
                recheck(k, block[:, col])

    # ---- which albums to decide again, and which of them pass B must read: an identity whose
    # members did not change (only its look-alike flag moved) keeps its recorded cohesion.
    kept_cohesion = {
        i: float(c) for i in redo if i not in touched_new and (c := cohesion[pos[i]]) is not None
    }
    albums: set[str] = set(changed_set)
    cohesion_albums: set[str] = set(changed_set)
    for i in redo:
        for u in units_old.units_of(i) if i not in touched_new else touched_new[i]:
            row = (
                units_new[u]
                if u in units_new
                else units_old[u]
                if u in units_old and u not in removed
                else None
            )
            if row is not None:
                albums.update(row["albums"])
                if i not in kept_cohesion:
                    cohesion_albums.update(row["albums"])

    # ---- the albums of the rejected loose faces near an identity whose members changed (its
    # new centroid): they are proposed for it now (see "loose faces")
    if not full:
        moved = sorted(pos[i] for i in set(touched_new) | affected if i in pos)
        albums.update(loose_albums_near(store, cents[moved], th.outlier))

    # ---- stage the state: the units file in full, or the units that changed since it was
    # written (as the identities below)
    units_delta = _units_delta(old_units_delta, units_rows, removed - sub_set)
    units_written = (
        full or not units_base_rows or units_delta.num_rows > INDEX_DELTA_SHARE * units_base_rows
    )
    staged_units = layout.staging_label_file(run_id, layout.LABEL_UNITS)
    if units_written:
        store.write_parquet(staged_units, units_table)
        units_delta = UNITS_DELTA_SCHEMA.empty_table()
    else:
        store.delete(staged_units)  # none left by an earlier attempt of this run
    store.write_parquet(layout.staging_label_file(run_id, layout.LABEL_UNITS_DELTA), units_delta)
    ident_table = pa.table(
        {
            "identity_id": pa.array(names, pa.string()),
            "size": pa.array(sizes, pa.int64()),
            "usum": _list_column(usums),
            "dup_id": pa.array(dup_id, pa.string()),
            "dup_sim": pa.array(dup_sim, pa.float32()),
            "cohesion": pa.array(cohesion, pa.float64()),
        },
        schema=IDENTITIES_SCHEMA,
    )
    ident_delta = IDENTITIES_DELTA_SCHEMA.empty_table()
    ident_written = ident_base is None
    if ident_base is not None:
        ident_delta = _identity_delta(ident_base, base_usum, ident_table, usums, may_differ)
        ident_written = ident_delta.num_rows > INDEX_DELTA_SHARE * max(ident_base.num_rows, 1)
    staged_base = layout.staging_label_file(run_id, layout.LABEL_IDENTITIES)
    if ident_written:
        store.write_parquet(staged_base, ident_table)
        ident_delta = IDENTITIES_DELTA_SCHEMA.empty_table()
    else:
        # The passes read the staged file when there is one: none may be left by an earlier
        # attempt of this run that did write it.
        store.delete(staged_base)
    store.write_parquet(
        layout.staging_label_file(run_id, layout.LABEL_IDENTITIES_DELTA), ident_delta
    )
    if write_base:
        store.write_bytes(
            layout.staging_label_file(run_id, layout.LABEL_INDEX),
            faiss.serialize_index(_index_to_write(index)).tobytes(),
        )
    store.write_parquet(layout.staging_label_file(run_id, layout.LABEL_INDEX_DELTA), delta.table())
    if views is not None:
        views.update(
            units=units_table.select(["unit", "identity_id"]),
            identities=ident_table.select(["identity_id", "size", "dup_id", "dup_sim"]),
            usum=usums,
            cents=cents,  # each worker of passes B and C normalised the sums again (0.14 s)
        )
    return {
        "albums": sorted(albums),
        "cohesion_albums": sorted(cohesion_albums),
        "identities": sorted(redo),
        "cohesion_kept": kept_cohesion,
        "units": n_units,
        "identities_total": len(names),
        "units_merged": len(sub),
        "units_queried": len(new_keys) if not full else 0,
        "next_cid": next_cid,
        "index_kind": kind_now,
        "index_trained_n": trained_n,
        "merge_threshold": merge_th,
        "index_written": write_base,
        "identities_written": ident_written,
        "units_written": units_written,
    }


# ---------------------------------------------------------------- loose faces
# An album face in no identity is decided against the nearest identity centroid of the whole
# store: ``unclustered_near_identity`` (review, that identity proposed) when within
# thresholds.outlier, else ``unclustered_singleton`` (rejected). An identity that forms or
# grows in some albums can bring a rejected face of an album the refresh did not touch within
# reach: a person seen once in an old album and ten times in a new one. The rejected loose
# faces are therefore kept in a faiss index (their unit embeddings; file + delta, exact up to
# INDEX_FLAT_MAX and IVF beyond, as the centroids'), which the merge step queries with the
# new centroid of every identity whose members changed; the albums holding a face within
# thresholds.outlier of one are decided again. Every indexed face is below thresholds.outlier
# from every centroid as it stood when the face was last decided, and every centroid that
# moved since was such a query, so the hits are exactly the faces to propose now (an IVF index
# only finds those in the cells it probes). A face already proposed for an identity stays
# proposed for it until its album is decided again (its annotator's answer, or the next change
# to the album, settles it): following every proposal's identity as it moves re-decided two
# to three times the albums of a 10^6-face increment for figures that seldom change a status.
# A loose face's id carries its album (:func:`loose_id`); LABEL_LOOSE_ALBUMS maps the album
# part back to the album. The decide pass records each album's rejected loose faces that came
# and went; :func:`stage_loose` folds them in after it. (A rejected face's "best" similarity
# is as of its last decision: a drifting figure is not a new decision, faceloop.vocab.reason_key.)
LOOSE_CODES = frozenset({"unclustered_singleton"})
# Cells probed per query of an IVF loose index: a range search down to thresholds.outlier
# reaches further from the query than the merge's nearest neighbours, and the queries are few
# (the changed identities' centroids), so far more cells than NPROBE are probed.
LOOSE_NPROBE = 64
_LOOSE_FACE_BITS = 35  # below them, the album's 28 bits: ids stay positive int64
LOOSE_CHANGES_SCHEMA = pa.schema(
    [
        ("lid", pa.int64()),
        ("album", pa.string()),
        ("vector", _F32_LIST),  # null: the face left the loose index
    ]
)
LOOSE_ALBUMS_SCHEMA = pa.schema([("album_hash", pa.int64()), ("album", pa.string())])


def _hash_bits(text: str, bits: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> (
        64 - bits
    )


def loose_id(key: str, face_id: str) -> int:
    """The loose index's id of album ``key``'s face ``face_id``: the album's hash above the
    face's (two albums sharing a hash only cost a needless decision)."""
    return (_hash_bits(key, 63 - _LOOSE_FACE_BITS) << _LOOSE_FACE_BITS) | _hash_bits(
        face_id, _LOOSE_FACE_BITS
    )


def _loose_changes_dir(run_id: str) -> str:
    from storage import layout

    return f"{layout.staging_label(run_id)}/loose-changes"


def _loose_changes(
    store: ObjectStore,
    run_id: str,
    key: str,
    old: Collection[str],
    now: Mapping[str, np.ndarray],
) -> int:
    """Stage album ``key``'s loose faces that went (in ``old``, not ``now``) and came (``now``:
    face id -> unit embedding, not in ``old``) for :func:`stage_loose`; how many."""
    gone = sorted({loose_id(key, f) for f in old if f not in now})
    came: dict[int, np.ndarray] = {}
    for f in sorted(now):
        if f not in old:
            came.setdefault(loose_id(key, f), now[f])  # an id two faces share: the first
    gone = [c for c in gone if c not in came]
    if not gone and not came:
        return 0
    vecs = np.stack(list(came.values())) if came else np.zeros((0, 1), np.float32)
    store.write_parquet(
        f"{_loose_changes_dir(run_id)}/{key}.parquet",
        pa.table(
            {
                "lid": pa.array([*gone, *came], pa.int64()),
                "album": pa.array([key] * (len(gone) + len(came)), pa.string()),
                "vector": pa.chunked_array(
                    [pa.nulls(len(gone), _F32_LIST), *_list_column(vecs).chunks], _F32_LIST
                ),
            },
            schema=LOOSE_CHANGES_SCHEMA,
        ),
    )
    return len(gone) + len(came)


def _index_contents(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every (id, vector) of a faiss index as :func:`_build_index` makes them (or of a
    :class:`_MappedIndex`), to build it again at another size."""
    import faiss

    index = _index_to_write(index)
    if isinstance(index, faiss.IndexIDMap2):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        return ids, index.index.reconstruct_n(0, index.ntotal)
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    assert inv is not None
    ids_l: list[np.ndarray] = [np.zeros(0, np.int64)]
    vecs_l: list[np.ndarray] = [np.zeros((0, ivf.d), np.float32)]
    for cell in range(ivf.nlist):
        n = inv.list_size(cell)
        if n:
            ids_l.append(faiss.rev_swig_ptr(inv.get_ids(cell), n).astype(np.int64))
            codes = faiss.rev_swig_ptr(inv.get_codes(cell), n * ivf.code_size)
            vecs_l.append(np.frombuffer(codes.tobytes(), np.float32).reshape(n, ivf.d))
    return np.concatenate(ids_l), np.concatenate(vecs_l)


def stage_loose(store: ObjectStore, run_id: str, full: bool, meta: Mapping[str, Any]) -> dict:
    """Fold the decide pass's loose changes into the loose index (a new one when ``full``) and
    stage its files; the state files staged and the index's kind for meta.json."""
    import faiss

    from storage import layout

    files = sorted(o.rel for o in store.list(_loose_changes_dir(run_id)))
    changes = (
        pa.concat_tables([store.read_parquet_file(f) for f in files])
        if files
        else LOOSE_CHANGES_SCHEMA.empty_table()
    )
    valid = pc.is_valid(changes.column("vector")).to_numpy(zero_copy_only=False)
    lids = changes.column("lid").to_numpy()
    gone = lids[~valid].tolist()
    came_rows = np.flatnonzero(valid)
    came = lids[came_rows]
    came_vecs = (
        _list_matrix(changes.column("vector"), came_rows.tolist())
        if len(came_rows)
        else np.zeros((0, 512), np.float32)
    )
    has_index = not full and store.exists(layout.LABEL_LOOSE)
    kind = meta.get("loose_kind") if has_index else None
    trained_n = int(meta.get("loose_trained_n", 0)) if has_index else 0
    index: Any = None
    delta = _IndexDelta()
    if has_index:
        index, delta = _open_index(store, layout.LABEL_LOOSE, layout.LABEL_LOOSE_DELTA)
        _remove_ids(index, gone)
        delta.remove(gone)
        if len(came):
            index.add_with_ids(came_vecs, came)
            delta.add(came.tolist(), came_vecs)
    n = int(index.ntotal) if index is not None else len(came)
    want_ivf = n > INDEX_FLAT_MAX
    rebuild = _index_outgrown(index is not None, n, kind, trained_n)
    if rebuild:
        ids, vecs = (came, came_vecs) if index is None else _index_contents(index)
        index = _build_index(vecs, ids)
        kind, trained_n, delta = ("ivf" if want_ivf else "flat"), n, _IndexDelta()
    staged: list[str] = [layout.LABEL_LOOSE_DELTA]
    if rebuild or delta.size() > INDEX_DELTA_SHARE * max(index.ntotal, 1):
        store.write_bytes(
            layout.staging_label_file(run_id, layout.LABEL_LOOSE),
            faiss.serialize_index(_index_to_write(index)).tobytes(),
        )
        staged.append(layout.LABEL_LOOSE)
        delta = _IndexDelta()
    store.write_parquet(layout.staging_label_file(run_id, layout.LABEL_LOOSE_DELTA), delta.table())
    # The albums the new ids point at.
    # The albums the ids point at (a hash two albums share names both).
    albums: set[tuple[int, str]] = set()
    if not full and store.exists(layout.LABEL_LOOSE_ALBUMS):
        t = store.read_parquet_file(layout.LABEL_LOOSE_ALBUMS)
        albums = set(
            zip(t.column("album_hash").to_pylist(), t.column("album").to_pylist(), strict=True)
        )
    added = {
        (int(c) >> _LOOSE_FACE_BITS, a)
        for c, a in zip(
            came.tolist(), changes.column("album").take(came_rows).to_pylist(), strict=True
        )
    }
    if full or not added <= albums:
        rows = sorted(albums | added)
        store.write_parquet(
            layout.staging_label_file(run_id, layout.LABEL_LOOSE_ALBUMS),
            pa.table(
                {
                    "album_hash": pa.array([h for h, _ in rows], pa.int64()),
                    "album": pa.array([a for _, a in rows], pa.string()),
                },
                schema=LOOSE_ALBUMS_SCHEMA,
            ),
        )
        staged.append(layout.LABEL_LOOSE_ALBUMS)
    store.delete_prefix(_loose_changes_dir(run_id))
    return {
        "staged": staged,
        "loose_kind": kind,
        "loose_trained_n": trained_n,
        "loose_faces": int(index.ntotal),
        "loose_changes": len(lids),
    }


def loose_albums_near(store: ObjectStore, q: np.ndarray, radius: float) -> set[str]:
    """The albums holding a loose face at cosine ``radius`` or more from a row of ``q``."""
    from storage import layout

    if not len(q) or not store.exists(layout.LABEL_LOOSE):
        return set()
    index, _ = _open_index(store, layout.LABEL_LOOSE, layout.LABEL_LOOSE_DELTA)
    hits = range_hits(index, q, radius, LOOSE_NPROBE)
    if not len(hits):
        return set()
    t = store.read_parquet_file(layout.LABEL_LOOSE_ALBUMS)
    wanted = pa.array(np.unique(hits >> _LOOSE_FACE_BITS), pa.int64())
    t = t.filter(pc.is_in(t.column("album_hash"), value_set=wanted))
    return set(t.column("album").to_pylist())


# ---------------------------------------------------------------- passes B and C


_CACHE: dict[tuple[str, str], Any] = {}
# Albums read by pass B (faces without crops, face -> unit), kept for pass C of the same call
# in the same process (in-process always; on Ray when the same worker gets the album), which
# takes them out. Filled until _ALBUM_CACHE_BYTES and never evicted otherwise: both passes walk
# the albums in the same order, and an LRU would evict each album just before pass C asks for
# it. What another worker decided stays until the next label call in this process.
_ALBUM_CACHE: dict[tuple[str, str, str, bool], tuple[pa.Table, int, dict[str, str]]] = {}
_ALBUM_CACHE_BYTES = 256 << 20
_ALBUM_CACHED = [0]  # bytes held
# The gates' verdicts (_AlbumRows.may_gate, copy_of) of an album _ALBUM_CACHE holds, found by
# pass B, for pass C: the copy check costs about as much as reading the album.
_ALBUM_GATES: dict[tuple[str, str, str, bool], tuple[np.ndarray | None, dict[int, int]]] = {}


class _IdentityRows(Mapping[str, dict]):
    """The identities of a label call by name, a row made a dict only when asked for (a pass
    looks at the identities of its albums: building 43,000 dicts per process at 10^6 faces took
    a quarter of a second)."""

    def __init__(self, t: pa.Table, usum: np.ndarray) -> None:
        self.names: list[str] = t.column("identity_id").to_pylist()
        self.pos = {n: k for k, n in enumerate(self.names)}
        self.size: list[int] = t.column("size").to_pylist()
        self.dup_id: list[str | None] = t.column("dup_id").to_pylist()
        self.dup_sim: list[float | None] = t.column("dup_sim").to_pylist()
        self.usum = usum

    def __getitem__(self, name: str) -> dict:
        k = self.pos[name]
        return {
            "size": self.size[k],
            "usum": self.usum[k],
            "dup_id": self.dup_id[k],
            "dup_sim": self.dup_sim[k],
        }

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.pos


def _state_views(
    store: ObjectStore, run_id: str, scope: str | None = None, views: Any = None
) -> tuple[dict[str, str], _IdentityRows, np.ndarray, list[str]]:
    """(unit -> identity, identity -> row, identity centroids in sorted-name order, names) of
    this run's staged state; cached per process (a Ray worker decides many albums) for the
    label call ``scope`` names (None: the run; a retried run stages its state again). Built
    from ``views`` (what merge_step handed on: a dict, or the Ray object holding it, whose
    arrays a worker maps from the node's object store without a copy) when given, else read
    back from the store."""
    from storage import layout

    key = (store.root, scope or run_id)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    _CACHE.clear()
    cents: np.ndarray | None = None
    if views is not None:
        if not isinstance(views, dict):
            import ray

            views = ray.get(views)
        units, it, usum = views["units"], views["identities"], views["usum"]
        cents = views.get("cents")
    else:
        # This call's units: the file merge_step staged when it wrote one in full, else the
        # store's file, with the changes it staged.
        staged_units = layout.staging_label_file(run_id, layout.LABEL_UNITS)
        units = _units_with_delta(
            store.read_parquet_file(
                staged_units if store.exists(staged_units) else layout.LABEL_UNITS,
                columns=["unit", "identity_id"],
            ),
            store.read_parquet(
                layout.staging_label_file(run_id, layout.LABEL_UNITS_DELTA),
                columns=["unit", "identity_id", "removed"],
                schema=UNITS_DELTA_SCHEMA,
            ),
        )
        # This call's identities: the file merge_step staged when it wrote one in full, else
        # the store's file with the changes it staged; by name, as merge_step's.
        staged = layout.staging_label_file(run_id, layout.LABEL_IDENTITIES)
        it, usum = _identities_with_delta(
            store.read_parquet_file(staged if store.exists(staged) else layout.LABEL_IDENTITIES),
            store.read_parquet(
                layout.staging_label_file(run_id, layout.LABEL_IDENTITIES_DELTA),
                schema=IDENTITIES_DELTA_SCHEMA,
            ),
            by_name=True,
        )
    unit_identity = dict(
        zip(units.column("unit").to_pylist(), units.column("identity_id").to_pylist(), strict=True)
    )
    rows = _IdentityRows(it, usum)
    if cents is None:
        cents = _unit_rows(usum)
    out = (unit_identity, rows, cents, rows.names)
    _CACHE[key] = out
    return out


def _album_units(store: ObjectStore, run_id: str, key: str, staged: bool) -> dict[str, str]:
    """face id -> unit for one album's machine-labelled faces."""
    from storage import layout

    rel = layout.label_clusters(ALBUM, key)
    t = _read_clusters(
        store, layout.staging_label_file(run_id, rel) if staged else rel, ["unit", "members"]
    )
    out: dict[str, str] = {}
    for u, members in zip(
        t.column("unit").to_pylist(), t.column("members").to_pylist(), strict=True
    ):
        if not u.startswith("human:"):
            for f in members:
                out[f] = u
    return out


def _stored_units(t: pa.Table) -> dict[str, str]:
    """face id -> unit for the machine-labelled faces of an album that was not clustered again
    in this run, from its faces' ``cluster_id``: the last decide pass wrote each eligible face's
    unit there, from the clusters file that is still the album's (the label state is valid only
    while the faces are as that pass left them: label_run's ``valid``), so reading the clusters
    file again (a third Parquet read per album in the cohesion and decide passes) gives the same
    map. ``human:`` units are left out, as :func:`_album_units` leaves them out."""
    return {
        f: u
        for f, u in zip(
            t.column("face_id").to_pylist(), t.column("cluster_id").to_pylist(), strict=True
        )
        if u is not None and not u.startswith("human:")
    }


def _album_ck(
    store: ObjectStore, run_id: str, key: str, staged: bool, scope: str | None
) -> tuple[str, str, str, bool]:
    return (store.root, scope or run_id, key, staged)


def _album_read(
    store: ObjectStore, run_id: str, key: str, staged: bool, scope: str | None, last: bool
) -> tuple[pa.Table, int, dict[str, str]]:
    """One album's faces without crops (:func:`_group_faces`), how many were stored before this
    run, and face -> unit (:func:`_album_units`); kept for the next pass (_ALBUM_CACHE) of the
    label call ``scope`` names (as :func:`_state_views`) unless this is the ``last`` pass to
    read it, which takes it out."""
    ck = _album_ck(store, run_id, key, staged, scope)
    hit = _ALBUM_CACHE.pop(ck, None) if last else _ALBUM_CACHE.get(ck)
    if hit is not None:
        if last:
            _ALBUM_CACHED[0] -= hit[0].get_total_buffer_size()
        return hit
    if _ALBUM_CACHE and next(iter(_ALBUM_CACHE))[:2] != ck[:2]:
        _ALBUM_CACHE.clear()  # another call's
        _ALBUM_GATES.clear()
        _ALBUM_CACHED[0] = 0
    # A stored album is written again as a label overlay at most: only the columns the passes
    # and the overlay use are read (its faces file without crops: 2.7-2.9 -> 2.4-2.5 ms).
    t, n_old = _group_faces(store, run_id, key, NO_CROP if staged else _PASS_COLUMNS)
    out = (t, n_old, _album_units(store, run_id, key, staged) if staged else _stored_units(t))
    size = t.get_total_buffer_size()  # Table.nbytes walks the list offsets: far slower
    if not last and _ALBUM_CACHED[0] + size <= _ALBUM_CACHE_BYTES:
        _ALBUM_CACHE[ck] = out
        _ALBUM_CACHED[0] += size
    return out


def _album_identities(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    scope: str | None,
    t: pa.Table,
    face_unit: dict[str, str],
    read: tuple[str, bool, bool],
) -> tuple[_AlbumRows, list[int], list[str | None]]:
    """The album's rows, its eligible faces and their identities. ``read``: the album's key,
    ``staged`` and ``last`` as :func:`_album_read` was called: the gates' verdicts pass B found
    for an album it left in _ALBUM_CACHE are taken by pass C."""
    r = _album_rows(t)
    key, staged, last = read
    ck = _album_ck(store, run_id, key, staged, scope)
    if last and (hit := _ALBUM_GATES.pop(ck, None)) is not None:
        r.may_gate, r.copy_of = hit
    unit_identity, _, _, _ = _state_views(store, run_id, scope)
    eligible = [i for i in range(len(r.fid)) if not r.human[i] and _gated(settings, r, i) is None]
    if not last and ck in _ALBUM_CACHE:
        _ALBUM_GATES[ck] = (r.may_gate, r.copy_of)
    ident = [unit_identity.get(face_unit.get(r.fid[i], ""), None) for i in eligible]
    return r, eligible, ident


def cohesion_group(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    key: str,
    staged: bool,
    wanted: set[str] | None,
    scope: str | None = None,
    views: Any = None,
) -> dict:
    """Pass B for one album: identity -> [sum of leave-one-out similarities, faces] over its
    faces of the identities in ``wanted`` (None: all). ``views``: see :func:`_state_views`."""
    from tasks.purity import loo_similarity

    _state_views(store, run_id, scope, views)

    t, _, face_unit = _album_read(store, run_id, key, staged, scope, last=False)
    r, eligible, ident = _album_identities(
        settings, store, run_id, scope, t, face_unit, (key, staged, False)
    )
    _, rows, _, _ = _state_views(store, run_id, scope)
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, name in zip(eligible, ident, strict=True):
        if name is not None and name in rows and (wanted is None or name in wanted):
            by_id[name].append(i)
    out: dict[str, list[float]] = {}
    for name, idx in by_id.items():
        if rows[name]["size"] == 1:
            out[name] = [float(len(idx)), float(len(idx))]
            continue
        s = loo_similarity(l2_normalize(r.emb[idx]), rows[name]["usum"])
        out[name] = [float(s.astype(np.float64).sum()), float(len(idx))]
    return {"key": key, "loo": out}


# Albums per item of the decide pass (fewer when there are few albums, so that they spread).
_DECIDE_CHUNK = 32


def _decide_chunk(n_albums: int) -> int:
    return max(1, min(_DECIDE_CHUNK, n_albums // 8))


def decide_groups(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    keys: list[str],
    staged: set[str],
    cohesion: dict[str, float],
    scope: str | None = None,
    views: Any = None,
    loose_all: bool = False,
) -> list[dict]:
    """Pass C for the albums ``keys``: decisions for each one's machine-labelled faces (the
    identities in ``cohesion`` and the unclustered ones; faces of other identities keep
    theirs); an album's group file is staged when one of its rows changed. The unclustered
    faces of all the albums meet the identity centroids in one product, and their changes are
    staged for :func:`stage_loose` (``loose_all``: every one, for a new loose index). Per
    album: the staged (tmp, rel) or None, and counts. ``views``: see :func:`_state_views`."""
    _state_views(store, run_id, scope, views)
    loaded = [_decide_load(settings, store, run_id, k, k in staged, scope) for k in keys]
    from tasks.purity import nearest_centroid

    x = [a.x_all[a.loose] for a in loaded if a.loose]
    _, _, cents, _ = _state_views(store, run_id, scope)
    near_k, near_s = nearest_centroid(
        np.concatenate(x) if x else np.zeros((0, cents.shape[1]), np.float32), cents
    )
    out, at = [], 0
    for a in loaded:
        n = len(a.loose)
        out.append(
            _decide_finish(
                settings,
                store,
                run_id,
                scope,
                a,
                cohesion,
                near_k[at : at + n],
                near_s[at : at + n],
                loose_all,
            )
        )
        at += n
    return out


@dataclass
class _Loaded:
    """One album read for pass C: its rows, the eligible faces' identities and unit vectors,
    and which of them are in no identity (``loose``, positions in ``eligible``)."""

    key: str
    t: pa.Table
    n_old: int
    r: _AlbumRows
    eligible: list[int]
    ident: list[str | None]
    face_unit: dict[str, str]
    x_all: np.ndarray
    loose: list[int]


def _decide_load(
    settings: Settings, store: ObjectStore, run_id: str, key: str, staged: bool, scope: str | None
) -> _Loaded:
    # Decided without the crops (most of a group file's bytes); they are read only when the
    # group must be written.
    t, n_old, face_unit = _album_read(store, run_id, key, staged, scope, last=True)
    r, eligible, ident = _album_identities(
        settings, store, run_id, scope, t, face_unit, (key, staged, True)
    )
    _, rows, _, _ = _state_views(store, run_id, scope)
    x_all = l2_normalize(r.emb[eligible]) if eligible else np.zeros((0, 1), np.float32)
    loose = [j for j, name in enumerate(ident) if name is None or name not in rows]
    return _Loaded(key, t, n_old, r, eligible, ident, face_unit, x_all, loose)


def _decide_finish(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    scope: str | None,
    a: _Loaded,
    cohesion: dict[str, float],
    near_k: np.ndarray,
    near_s: np.ndarray,
    loose_all: bool = False,
) -> dict:
    """Decisions for one loaded album (``near_k`` / ``near_s``: its loose faces' nearest
    identity centroid, from :func:`tasks.purity.nearest_centroid`); stages its group file when they
    changed a row, and its loose faces' changes (:func:`_loose_changes`)."""
    from storage import layout
    from tasks.purity import decide_face, loo_similarity, one_face_per_photo, problems_of_identity

    th, qs = settings.thresholds, settings.quality
    key, t, n_old, r, eligible = a.key, a.t, a.n_old, a.r, a.eligible
    _, rows, _, names = _state_views(store, run_id, scope)
    decisions: dict[str, Decision] = {}
    clusters: dict[str, str | None] = {}
    for i in range(len(r.fid)):
        if r.human[i]:
            continue
        clusters[r.fid[i]] = None
        if (d := _gated(settings, r, i)) is not None:
            decisions[r.fid[i]] = d
    by_id: dict[str, list[int]] = defaultdict(list)
    loose = set(a.loose)
    for j, (i, name) in enumerate(zip(eligible, a.ident, strict=True)):
        clusters[r.fid[i]] = a.face_unit.get(r.fid[i])
        if j not in loose and name in cohesion:
            by_id[name].append(j)
    for name, js in by_id.items():
        row = rows[name]
        size = int(row["size"])
        loo = (
            np.ones(len(js), np.float32) if size == 1 else loo_similarity(a.x_all[js], row["usum"])
        )
        probs = problems_of_identity(
            size, cohesion[name], row["dup_id"], float(row["dup_sim"] or 0.0), th, settings.cluster
        )
        at = [eligible[j] for j in js]
        decided = [
            decide_face(
                r.fid[i], float(r.q[i]), name, size, float(np.float32(s)), probs, None, 0.0, th, qs
            )
            for i, s in zip(at, loo.tolist(), strict=True)
        ]
        photo = {r.fid[i]: r.photo[i] for i in at}
        for d in one_face_per_photo(decided, photo, {r.fid[i]: r.px[i] for i in at}):
            decisions[d.face_id] = d
    for m, j in enumerate(a.loose):
        i = eligible[j]
        kk = int(near_k[m])
        decisions[r.fid[i]] = decide_face(
            r.fid[i],
            float(r.q[i]),
            None,
            0,
            1.0,
            [],
            names[kk] if kk >= 0 else None,
            float(near_s[m]),
            th,
            qs,
        )
    # The album's rejected loose faces now and before (see "loose faces").
    old_codes = [
        row_reason_code({"reason_code": c, "reason": why})
        for c, why in zip(
            t.column("reason_code").slice(0, n_old).to_pylist(),
            t.column("reason").slice(0, n_old).to_pylist(),
            strict=True,
        )
    ]
    was_loose = (
        set()
        if loose_all
        else {r.fid[i] for i in range(n_old) if not r.human[i] and old_codes[i] in LOOSE_CODES}
    )
    loose_changes = _loose_changes(
        store,
        run_id,
        key,
        was_loose,
        {f: a.x_all[j] for j in a.loose if decisions[f := r.fid[eligible[j]]].code in LOOSE_CODES},
    )
    # What changed, and the staged group file.
    changed = relabelled = len(r.fid) - n_old
    old_cols = {c: t.column(c).slice(0, n_old).to_pylist() for c in LABEL_COLUMNS}
    for k in _touched(r.fid[:n_old], r.prev_cluster[:n_old], decisions, clusters):
        f = r.fid[k]
        before = {c: old_cols[c][k] for c in LABEL_COLUMNS}
        if not r.human[k] and _changed(
            after := _new_labels(f, before, decisions, clusters), before
        ):
            changed += 1
            relabelled += _changed(after, before, RELABEL_COLUMNS)
    staged_pair = None
    base_id = write_id(t)
    if changed and n_old == len(r.fid) and base_id is not None:
        # Only labels changed: a label overlay (face_id and the label columns, a few KB)
        # instead of the group's embeddings and crops written again.
        rel = layout.labels_of(_group_rel(key))
        tmp = layout.staging_label_file(run_id, rel)
        labels = _apply(t.select(LABELS_SCHEMA.names), decisions, clusters, run_id)
        store.write_parquet(tmp, label_overlay(labels, base_id))
        staged_pair = [tmp, rel]
    elif changed:
        rel = _group_rel(key)
        tmp = layout.staging_label_file(run_id, rel)
        # The crops, and the columns a stored album's read left out (_PASS_COLUMNS).
        extra = [c for c in FACES_SCHEMA.names if c not in t.column_names]
        rest, n_old_rest = _group_faces(store, run_id, key, ["face_id", *extra])
        if n_old_rest != n_old or not rest.column("face_id").equals(t.column("face_id")):
            raise RuntimeError(f"album {key}: its faces changed while it was being decided")
        full = t
        for c in extra:
            full = full.append_column(FACES_SCHEMA.field(c), rest.column(c))
        table = _apply(full.select(FACES_SCHEMA.names), decisions, clusters, run_id)
        store.write_parquet(tmp, with_write_id(table.cast(FACES_SCHEMA)))
        staged_pair = [tmp, rel]
    status = Counter(str(d.status) for d in decisions.values())
    codes = Counter(d.code for d in decisions.values())
    return {
        "key": key,
        "staged": staged_pair,
        "changed": relabelled,
        "new": len(r.fid) - n_old,
        "loose_changes": loose_changes,
        "status": dict(status),
        "codes": dict(codes),
    }
