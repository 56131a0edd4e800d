"""``faceloop explain FACE_ID|IMAGE``: why a face has its status, without a Parquet query.

For a face id: its status, reason (code and text), score, identity, cluster, quality figures,
models, run ids and review history (tasks pushed, answers, resolutions applied). For an image
(path, URI or sha256): its record(s) in ``tables/images`` and each of its faces. For a person
(an ID-card subject's id, an identity id, or a pseudonym Label Studio or a dataset class shows):
their faces, photos, review tasks and the dataset versions whose classes hold them (a subject
access request). Read-only: it writes nothing to the store. Exit 1 when nothing matches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import posixpath
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from faceloop.commands import shown
from faceloop.errors import FaceloopError
from faceloop.schema import IMG_QUARANTINED

# Every faces column but the heavy ones (embedding, crop, landmarks).
FACE_COLUMNS = [
    "face_id",
    "image_uri",
    "image_sha256",
    "source_kind",
    "source_group",
    "role",
    "face_index",
    "bbox",
    "det_score",
    "face_px",
    "blur",
    "yaw",
    "pitch",
    "quality",
    "model",
    "detector",
    "cluster_id",
    "identity_id",
    "status",
    "reason",
    "reason_code",
    "score",
    "run_id",
    "labelled_run_id",
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="why a face (or an image's faces) got its status: reason, scores, review; or what "
        "the store holds of a person",
    )
    p.add_argument(
        "target",
        metavar="FACE_ID|IMAGE|PERSON",
        help="a face id; an image's path, URI or sha256; or a person: an ID subject's id, an "
        "identity id, or the pseudonym Label Studio or a dataset class shows",
    )
    p.add_argument(
        "--store", help="store root: a directory or s3://bucket/prefix (default: from --config)"
    )
    p.add_argument("--config", help="YAML config supplying the default of --store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_explain)


# --------------------------------------------------------------------------------------------
# lookup (pure: a store in, dicts out)


def _faces_where(store: Any, expr: pc.Expression) -> list[dict[str, Any]]:
    from storage.tables import iter_faces

    rows: list[dict[str, Any]] = []
    for part in iter_faces(store, columns=FACE_COLUMNS):
        rows += part.filter(expr).to_pylist()
    return sorted(rows, key=lambda r: (r["image_uri"] or "", r["face_index"] or 0))


def _review_history(store: Any, face_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The review tasks that showed any of ``face_ids``, each with its answers and what was
    applied from it."""
    from annotate.records import all_answers, read_applied, read_task_records

    wanted = set(face_ids)
    tasks = [
        t
        for t in read_task_records(store).to_pylist()
        if wanted & set((t["face_ids"] or []) + (t["shown"] or []))
    ]
    if not tasks:
        return []
    keys = {t["key"] for t in tasks}
    answers = [a for a in all_answers(store) if a.task_key in keys]
    applied = [r for r in read_applied(store).to_pylist() if r["task_key"] in keys]
    out = []
    for t in sorted(tasks, key=lambda t: t["pushed_at"] or ""):
        out.append(
            {
                "task": t["key"],
                "kind": t["kind"],
                "project_id": t["project_id"],
                "task_id": t["task_id"],
                "pushed_at": t["pushed_at"],
                "proposal": t["proposal"],
                "score": t["score"],
                "model_version": t["model_version"],
                "answers": [
                    {
                        "annotator": a.annotator,
                        "decision": a.decision,
                        "marked": list(a.marked),
                        "cancelled": a.cancelled,
                        "updated_at": a.updated_at,
                    }
                    for a in sorted(answers, key=lambda a: a.updated_at)
                    if a.task_key == t["key"]
                ],
                "applied": [
                    {
                        "decision": r["decision"],
                        "conflict": r["conflict"],
                        "settled": r["settled"],
                        "run_id": r["run_id"],
                        "applied_at": r["applied_at"],
                    }
                    for r in sorted(applied, key=lambda r: r["applied_at"] or "")
                    if r["task_key"] == t["key"]
                ],
            }
        )
    return out


def _face_view(row: dict[str, Any], shown_as: Any = None) -> dict[str, Any]:
    from faceloop.vocab import row_reason_code

    out = dict(row)
    out["reason_code"] = row_reason_code(row) or None
    if shown_as is not None and row.get("identity_id"):
        out["identity_in_review"] = shown_as(row["identity_id"])
    return out


def _pseudonyms(store: Any) -> Any:
    """identity id -> the pseudonym Label Studio shows for it (annotate.sync.ls_item): an ID
    subject's identity (its subject id) as its ID-pair tasks and the dataset's class
    ``subject-<pseudonym>`` name it, any other as the identity tasks' titles do; None when the
    store has no secret yet (explain creates nothing)."""
    from storage.privacy import store_secret
    from storage.secret import pseudonym
    from storage.tables import faces_files, group_key, subject_keys

    if store_secret(store, create=False) is None:
        return None
    subjects = subject_keys(faces_files(store, kinds=["idcard"]))
    return lambda ident: pseudonym(
        store, "subject" if group_key("idcard", ident) in subjects else "identity", ident
    )


def _subject_of_pseudonym(store: Any, target: str) -> str | None:
    """The ID-card subject whose store pseudonym is ``target`` (as a ``duplicate_claim``
    reason names the other subject, and its ID-pair tasks in Label Studio; ``subject-<pseudonym>``,
    the class a dataset names it by; or its identity's pseudonym, as an identity task's title
    shows it), else None."""
    import re

    from storage.privacy import store_secret
    from storage.secret import PSEUDONYM_HEX, pseudonym
    from storage.tables import read_images

    target = target.removeprefix("subject-")
    if (
        not re.fullmatch(f"[0-9a-f]{{{PSEUDONYM_HEX}}}", target)
        or store_secret(store, create=False) is None
    ):
        return None
    subjects = read_images(
        store, columns=["source_kind", "source_group"], where=pc.field("source_kind") == "idcard"
    ).column("source_group")
    for s in sorted(set(subjects.to_pylist()) - {None}):
        if target in (pseudonym(store, "subject", s), pseudonym(store, "identity", s)):
            return str(s)
    return None


def _person_of(store: Any, target: str) -> tuple[str | None, str | None] | None:
    """``(subject, None)`` when ``target`` is an ID-card subject's id (its folder name),
    ``(None, identity)`` when it is an identity id or the pseudonym Label Studio shows for one
    (an ID subject's pseudonyms are :func:`_subject_of_pseudonym`'s), else None."""
    import re

    from storage.privacy import store_secret
    from storage.secret import PSEUDONYM_HEX, pseudonym
    from storage.tables import iter_faces, read_images

    is_subject = (pc.field("source_kind") == "idcard") & (pc.field("source_group") == target)
    if read_images(store, columns=["source_group"], where=is_subject).num_rows:
        return target, None
    hashed = (
        re.fullmatch(f"[0-9a-f]{{{PSEUDONYM_HEX}}}", target) is not None
        and store_secret(store, create=False) is not None
    )
    seen: set[str] = set()
    for part in iter_faces(store, columns=["identity_id"]):
        ids = set(pc.unique(part.column("identity_id")).to_pylist()) - {None}
        if target in ids:
            return None, target
        if hashed:
            seen |= ids
    for ident in sorted(seen):
        if pseudonym(store, "identity", ident) == target:
            return None, ident
    return None


def _explain_person(store: Any, subject: str | None, identity: str | None) -> dict[str, Any]:
    """What the store holds of one person, an ID subject (its photos' faces, and every face
    of its identity, the subject id) or an identity (its faces): the faces, their photos, the
    review tasks that showed them and the dataset versions whose classes hold them."""
    from storage.tables import read_images

    ident = identity or subject
    expr = pc.field("identity_id") == ident
    photos = None
    if subject is not None:
        photos = (pc.field("source_kind") == "idcard") & (pc.field("source_group") == subject)
        expr = expr | photos
    faces = _faces_where(store, expr)
    shas = sorted({f["image_sha256"] for f in faces if f["image_sha256"]})
    where = pc.field("image_sha256").isin(pa.array(shas, pa.string()))
    images = read_images(store).filter(where if photos is None else where | photos).to_pylist()
    _where_now(store, images)
    shown = _pseudonyms(store)
    ids = [f["face_id"] for f in faces]
    return {
        "kind": "person",
        "subject": subject,
        "identity": ident,
        "identity_in_review": shown(ident) if shown is not None and ident else None,
        "images": sorted(images, key=lambda r: (r["run_id"] or "", r["image_uri"] or "")),
        "faces": [_face_view(f, shown) for f in faces],
        "datasets": _datasets_holding(store, ids),
        "review": _review_history(store, ids),
    }


def _datasets_holding(store: Any, face_ids: list[str]) -> list[dict[str, Any]]:
    """``{"dataset", "version", "class", "faces"}`` for each class of each committed dataset
    version that holds any of ``face_ids`` (the keys of every version's shards are read)."""
    from collections import Counter

    from storage.manifest import list_versions
    from storage.recovery import dataset_names
    from storage.versions import shard_keys

    if not face_ids:
        return []
    wanted = pa.array(sorted(set(face_ids)), pa.string())
    out: list[dict[str, Any]] = []
    for name in dataset_names(store):
        for version in list_versions(store, name):
            held: Counter[str] = Counter()
            for _shard, keys in shard_keys(store, name, version):
                hit = keys.filter(pc.is_in(keys.column("face_id"), value_set=wanted))
                held.update(str(c) for c in hit.column("identity_id").to_pylist())
            out += [
                {"dataset": name, "version": version, "class": c, "faces": n}
                for c, n in sorted(held.items())
            ]
    return out


def _on_disk(uri: str | None) -> bool | None:
    """Whether a local image's file is still there (None: not a local path, or a placeholder)."""
    import os

    if not uri or "://" in uri or not uri.startswith("/"):
        return None
    if os.path.lexists(uri):  # a FIFO, a folder or a dangling link is there too
        return True
    if "\\x" in uri:
        # A name that is not valid UTF-8, recorded with its bytes written \xNN: the file is
        # the one whose name holds those bytes ("no longer there" was said of it).
        import codecs

        with contextlib.suppress(ValueError, UnicodeError):
            return os.path.lexists(codecs.escape_decode(uri.encode("utf-8"))[0])
    return False


def explain(store: Any, target: str, settings: Any = None) -> dict[str, Any]:
    """``{"kind": "face", "face": {...}, "image": [...], "review": [...]}`` or ``{"kind":
    "image", "images": [...], "faces": [...], "review": [...]}`` or, for a person,
    ``{"kind": "person", ..., "datasets": [...]}`` (:func:`_explain_person`); FaceloopError
    when nothing in the store matches ``target``. ``settings`` (faceloop.config.Settings): its
    sources and ``limits.ignore`` say why a path is not in the store; without it, the
    defaults'."""
    from storage.objectstore import _non_utf8
    from storage.tables import read_images

    # A file name that is not valid UTF-8 (its bytes as lone surrogates) is no face id, and no
    # Arrow string can hold it: it is looked up below as discovery recorded it (\xNN).
    faces = [] if _non_utf8(target) else _faces_where(store, pc.field("face_id") == target)
    if faces:
        face = faces[0]
        rows = (
            read_images(store)
            .filter(
                (pc.field("image_uri") == face["image_uri"])
                & (pc.field("image_sha256") == face["image_sha256"])
            )
            .to_pylist()
        )
        # A face keeps the path its photo was decoded at: a photo moved since (an album
        # renamed, two files swapped) is said to be elsewhere now, as for an image.
        _where_now(store, rows, replaced=True)
        return {
            "kind": "face",
            "face": _face_view(face, _pseudonyms(store)),
            "image": rows,
            "review": _review_history(store, [target]),
        }
    from faceloop.hashing import image_keys
    from storage.objectstore import remote_sha256

    subject = _subject_of_pseudonym(store, target)
    if subject is not None:
        # A duplicate claim's reason names the other subject by pseudonym: its photos.
        return _explain_person(store, subject, None)
    uris, sha = image_keys(target, remote_sha256)
    # A name that is not valid UTF-8 (undecodable bytes as lone surrogates): recorded as
    # discovery records it, with those bytes written \xNN (the raw form failed to encode).
    uris = sorted({_non_utf8(u) or u for u in uris})
    expr = pc.field("image_uri").isin(pa.array(uris, pa.string()))
    if sha is not None:
        expr = expr | (pc.field("image_sha256") == sha)
    images = read_images(store).filter(expr).to_pylist()
    # A copy's or a move's row names the content whose faces it reuses: those faces are this
    # image's (an S3 URI is not read to hash it, so its rows are the only way to them).
    shas = sorted({r["image_sha256"] for r in images if r.get("image_sha256")} - {sha})
    if shas:
        expr = expr | pc.field("image_sha256").isin(pa.array(shas, pa.string()))
    faces = _faces_where(store, expr)
    if not images and not faces:
        # A subject access request: an ID subject's id, an identity id or the pseudonym Label
        # Studio shows for an identity.
        person = None if _non_utf8(target) else _person_of(store, target)
        if person is not None:
            return _explain_person(store, *person)
        from storage.privacy import TombstoneCheck

        tomb = TombstoneCheck(store)
        if tomb and sha is not None and tomb.image(sha):
            # Its rows are gone with it; only the keyed digest of its content is left.
            raise FaceloopError(
                f"{target!r} was forgotten (`faceloop forget`): the store keeps nothing of it "
                "but a keyed digest of its content, and no refresh takes it in"
            )
        if tomb and tomb.subject(target):
            # An access request for an ID subject that was forgotten ("no face or image").
            raise FaceloopError(
                f"ID subject {target!r} was forgotten (`faceloop forget --subject`): the store "
                "keeps nothing of it but a keyed digest of its name, and no refresh takes its "
                "folder in"
            )
        # A path a refresh never lists (limits.ignore: .DS_Store, ._x.jpg, Thumbs.db, *.part,
        # a @eaDir folder, ...): said so, not only "not in the store".
        why = (
            " (its name is one a refresh does not list: limits.ignore)"
            if _ignored_path(target, settings)
            else ""
        )
        raise FaceloopError(f"no face or image {target!r} in the store {store.root}{why}")
    _where_now(store, images)
    shown = _pseudonyms(store)
    here = [r for r in images if r["image_uri"] in uris]
    return {
        "kind": "image",
        # The file holds bytes none of its path's rows names: rewritten in place with its size
        # and mtime kept, which a refresh does not see (README: `refresh --rehash`); the rows
        # and faces shown are what it held.
        # Rows whose content was never read (quarantined by name, size or place: a placeholder
        # digest) say nothing of the bytes: they were "rewritten" to every file.
        "unrecorded_bytes": bool(
            sha is not None
            and any(_read(r) for r in here)
            and all(r["image_sha256"] != sha for r in here if _read(r))
        ),
        "images": sorted(images, key=lambda r: r["run_id"] or ""),
        "faces": [_face_view(f, shown) for f in faces],
        "review": _review_history(store, [f["face_id"] for f in faces]),
    }


def _ignored_path(target: str, settings: Any) -> bool:
    """Whether a refresh leaves ``target`` unlisted by ``limits.ignore``: the parts of its path
    below the source that holds it, else its name alone (the folders above a source's root
    are no business of the patterns)."""
    from faceloop.config import InputLimits
    from tasks.discover import ignored

    patterns = (settings.limits if settings is not None else InputLimits()).ignore
    path = target.rstrip("/")
    for src in settings.sources if settings is not None else []:
        root = src.uri.rstrip("/") + "/"
        if path.startswith(root):
            return ignored(path[len(root) :], patterns)
    if "://" in path[:10]:
        return False
    return ignored(path.rsplit("/", 1)[-1], patterns)


def _read(row: dict[str, Any]) -> bool:
    """Whether an image row names its content's digest (not a placeholder: a file quarantined
    by its name, size or place, whose bytes were never read)."""
    from faceloop.hashing import is_sha256

    return is_sha256(row.get("image_sha256") or "")


def _other_bytes(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows of one path name different contents (both read)."""
    return _read(a) and _read(b) and a["image_sha256"] != b["image_sha256"]


def _where_now(store: Any, images: list[dict[str, Any]], replaced: bool = False) -> None:
    """Mark each image row ``on_disk`` (True/False, None: not a local path) and, for one no
    longer at its path, ``now_at``: where a later row of its bytes is, still there (its faces
    are that file's now, and forgetting them would take it too). With ``replaced``, a path that
    holds other bytes since (two files swapped) counts as one the photo left
    (``replaced_in``: the run that recorded them)."""
    from storage.tables import read_images

    for r in images:
        r["on_disk"] = _on_disk(r["image_uri"])
    if replaced and images:
        at = (
            read_images(store)
            .filter(pc.field("image_uri").isin(pa.array(sorted({r["image_uri"] for r in images}))))
            .to_pylist()
        )
        for r in images:
            newer = [
                o
                for o in at
                if o["image_uri"] == r["image_uri"]
                and _other_bytes(o, r)
                and (o["run_id"] or "") > (r["run_id"] or "")
            ]
            if newer:
                r["replaced_in"] = max(o["run_id"] or "" for o in newer)
    gone = {r["image_sha256"] for r in images if r["on_disk"] is False or r.get("replaced_in")}
    if not gone:
        return
    later = (
        read_images(store).filter(pc.field("image_sha256").isin(pa.array(sorted(gone)))).to_pylist()
    )
    for r in images:
        if r["on_disk"] is False or r.get("replaced_in"):
            r["now_at"] = sorted(
                o["image_uri"]
                for o in later
                if o["image_sha256"] == r["image_sha256"]
                and o["image_uri"] != r["image_uri"]
                and (o["run_id"] or "") > (r["run_id"] or "")
                and _on_disk(o["image_uri"])
            )


# --------------------------------------------------------------------------------------------
# rendering


def _num(value: Any, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _place(role: str | None, kind: str | None, group: str | None) -> str:
    """``in album 'x'``, ``live photo of ID subject 'S1'`` (it read "album in album 'x'")."""
    if kind == "idcard":
        return f"{role or 'a'} photo of ID subject {group!r}" if group else "in no subject folder"
    return f"in album {group!r}" if group else "in no album"


def _face_lines(f: dict[str, Any], indent: str = "") -> list[str]:
    code = f["reason_code"] or "-"
    quality = [f"quality {_num(f['quality'])}", f"det_score {_num(f['det_score'])}"]
    if f["face_px"] is not None:
        quality.append(f"size {_num(f['face_px'], '.0f')} px")
    if f["blur"] is not None:
        quality.append(f"sharpness {_num(f['blur'], '.1f')}")
    if f["yaw"] is not None or f["pitch"] is not None:
        quality.append(f"pose yaw {_num(f['yaw'], '.1f')} pitch {_num(f['pitch'], '.1f')} deg")
    return [
        f"{indent}face {f['face_id']}",
        f"{indent}  status:    {f['status']}",
        f"{indent}  reason:    {code}  ({f['reason'] or 'no reason recorded'})",
        f"{indent}  score:     {_num(f['score'])}",
        f"{indent}  identity:  {f['identity_id'] or '-'}"
        + (f" (Label Studio: {f['identity_in_review']})" if f.get("identity_in_review") else "")
        + f"   cluster: {f['cluster_id'] or '-'}",
        f"{indent}  quality:   {', '.join(quality)}",
        f"{indent}  image:     {f['image_uri']} (face #{f['face_index']}, "
        f"{_place(f['role'], f['source_kind'], f['source_group'])})",
        f"{indent}  model:     {f['model'] or '-'}",
        f"{indent}  detector:  {f['detector'] or '-'}",
        f"{indent}  runs:      detected in {f['run_id'] or '-'}, last labelled in "
        f"{f['labelled_run_id'] or '-'}",
    ]


def _image_lines(img: dict[str, Any]) -> list[str]:
    size = f"{img['width']}x{img['height']}" if img["width"] else "pixel size unknown (not decoded)"
    why = f", {img['reason']}" if img["reason"] else ""
    gone = []
    # (An unusable file that moved has no faces to take along.)
    went = "" if img["status"] == IMG_QUARANTINED else " (its faces went with it)"
    if img.get("replaced_in"):
        where = (
            f"this photo is at {img['now_at'][0]} now{went}"
            if img.get("now_at")
            else "this photo is at no other path now"
        )
        gone = [f"  file:      this path holds other bytes since run {img['replaced_in']}; {where}"]
    elif img.get("on_disk") is False and img.get("now_at"):
        gone = [f"  file:      moved to {img['now_at'][0]}{went}"]
    elif img.get("on_disk") is False:
        gone = [
            "  file:      no longer there (its faces and labels stay in the store and its datasets;"
            " `faceloop forget --image` removes them)"
        ]
    return [
        f"image {img['image_uri']}",
        f"  status:    {img['status']}{why}",
        *gone,
        f"  sha256:    {img['image_sha256']}",
        f"  details:   {size}, {img['n_faces']} face(s), "
        f"{_place(img['role'], img['source_kind'], img['source_group'])}, "
        f"seen in run {img['run_id']}",
    ]


def _review_lines(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return ["review: none (never pushed to Label Studio)"]
    lines = ["review:"]
    for t in history:
        lines.append(
            f"  task {t['task']} ({t['kind']}, project {t['project_id']}, task id "
            f"{t['task_id']}), pushed {t['pushed_at']}: proposal {t['proposal'] or '-'}, "
            f"score {_num(t['score'])}"
        )
        for a in t["answers"]:
            marked = f", marked {', '.join(a['marked'])}" if a["marked"] else ""
            state = (
                "cancelled"
                if a["cancelled"]
                else a["decision"]
                or ("marked faces, no verdict" if a["marked"] else "")
                or "not understood (no choice this task asks for; not applied)"
            )
            lines.append(f"    answer by {a['annotator']} at {a['updated_at']}: {state}{marked}")
        if not t["answers"]:
            lines.append("    no answer yet")
        for r in t["applied"]:
            what = (
                f"applied {r['decision']}"
                + (" (the latest of conflicting answers)" if r["conflict"] else "")
                if r["decision"]
                else "held as a conflict"
                if r["conflict"]
                else "nothing applied"
            )
            # A conflict settles nothing: the faces it held are counted in the pull's report.
            count = "" if r["conflict"] and not r["decision"] else f" ({r['settled']} faces)"
            lines.append(f"    {what} in run {r['run_id']} at {r['applied_at']}{count}")
    return lines


def _person_lines(result: dict[str, Any]) -> list[str]:
    shown = result["identity_in_review"]
    who = (
        f"ID subject {result['subject']!r}, identity {result['identity']}"
        if result["subject"] is not None
        else f"identity {result['identity']}"
    )
    return [
        f"person: {who}" + (f" (Label Studio: {shown})" if shown else ""),
        f"  holds:     {len(result['faces'])} face(s) in "
        f"{len({r['image_sha256'] for r in result['images']})} photo(s)",
    ]


def _dataset_lines(datasets: list[dict[str, Any]]) -> list[str]:
    if not datasets:
        return ["datasets: none holds these faces"]
    return ["datasets:"] + [
        f"  {d['dataset']} v{d['version']}: class {d['class']} ({d['faces']} face(s))"
        for d in datasets
    ]


def render(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if result["kind"] == "face":
        lines += _face_lines(result["face"])
        for img in result["image"]:
            lines += _image_lines(img)
    else:
        person = result["kind"] == "person"
        if person:
            lines += _person_lines(result)
        images = result["images"]  # oldest first
        for n, img in enumerate(images):
            lines += _image_lines(img)
            later = next(
                (
                    o
                    for o in images[n + 1 :]
                    if o["image_uri"] == img["image_uri"] and _other_bytes(o, img)
                ),
                None,
            )
            if later is not None:
                lines.append(
                    f"  later:     this path holds other bytes since run {later['run_id']}"
                )
        if not images:
            lines.append("image: no record in tables/images")
        if result.get("unrecorded_bytes"):
            lines.append(
                "  now:       the file holds bytes no refresh has recorded (rewritten in place "
                "with its size and mtime kept?): the rows and faces here are what it held; "
                "`faceloop refresh --rehash` reads every file and takes them in"
            )
        # By content: a copy's or a moved photo's faces are its original's. A path that held
        # other bytes before (an edit, two files swapped) shows each content's faces apart,
        # what it holds now first.
        now = images[-1]["image_sha256"] if images else None
        by_content: dict[str, list[dict[str, Any]]] = {}
        for f in result["faces"]:
            by_content.setdefault(f["image_sha256"], []).append(f)
        named = {r["image_sha256"]: r["image_uri"] for r in images}  # the latest row's path
        for sha in sorted(by_content, key=lambda c: c != now):
            faces = by_content[sha]
            if person:
                # A person's photos, each at its own path (not earlier bytes of one path); an
                # ID subject's by file name (its folder is the subject's).
                name = named.get(sha) or ""
                if result["subject"] is not None:
                    name = posixpath.basename(name)
                name = name or f"{sha[:12]}..."
                lines.append(f"faces of {name} ({len(faces)}):")
            elif len(by_content) == 1 or sha == now:
                lines.append(f"faces of this content ({len(faces)}):")
            else:
                lines.append(
                    f"faces of other content this path held ({sha[:12]}..., {len(faces)}):"
                )
            for f in faces:
                lines += _face_lines(f, "  ")
    if result["kind"] == "person":
        lines += _dataset_lines(result["datasets"])
    lines += _review_lines(result["review"])
    # Names come from whoever fills a source: none may act on the terminal (a newline forged a
    # "status: ok" line, an escape sequence hid the real one).
    return "\n".join(shown(line) for line in lines)


def cmd_explain(args: argparse.Namespace) -> int:
    from faceloop.commands import open_existing_store
    from faceloop.config import load_settings

    settings = load_settings(args.config, **({"store": args.store} if args.store else {}))
    store = open_existing_store(settings.store)
    result = explain(store, args.target, settings)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(render(result))
    return 0
