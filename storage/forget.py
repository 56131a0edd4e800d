"""Remove every trace of forgotten images from the store (the store half of ``faceloop forget``).

Two steps, both under the store lock (the caller holds it):

1. :func:`plan` turns the request (identity ids, ID-card subjects, image hashes or URIs) into
   the *images* to forget: an identity's images are all images that show one of its faces, a
   subject's are all files of its folder, an image is every copy of its content. The unit is the
   photo: other faces on those photos (bystanders) go with it, since the photo's hash itself
   identifies it. The plan lists the raw *tokens* (face ids, sha256s, URIs, review task keys)
   whose rows must go, the tombstones to add and the Label Studio tasks to delete; only keyed
   digests of them are ever written (:mod:`storage.privacy`).
2. :func:`scrub` removes every row holding a token: faces groups, image rows, the review queue,
   review task/answer/applied records, every other Parquet file under ``tables/``; dataset
   versions are rewritten without those faces (:func:`storage.versions.rewrite_version`); run
   reports rendered since the forgotten faces were first detected are deleted (their contact
   sheets may show them; the plots are aggregates); run records are scrubbed of any token and
   of links to deleted reports; staging is removed. It matches by keyed digest, so it runs the
   same from a fresh plan or from the pending record of an interrupted forget (``--resume``).

A string value holds a token when its digest is one (a URI, a task key) or when one of its hex
runs of 20 to 64 characters is (face ids and sha256s inside task keys or raw JSON).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from faceloop.errors import StorageError
from faceloop.hashing import image_keys, is_sha256
from faceloop.runids import run_id_time
from faceloop.vocab import SAME_CAPTURE, row_reason_code
from storage import layout
from storage.objectstore import ObjectStore, remote_sha256
from storage.privacy import Keyed, Pending, write_pending
from storage.tables import bump_faces_generation, drop_overlays, read_faces, read_images

log = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{20,64}")


@dataclass
class Plan:
    """What one forget request resolves to (raw values: kept in memory only)."""

    shas: set[str] = field(default_factory=set)
    uris: set[str] = field(default_factory=set)
    face_ids: set[str] = field(default_factory=set)
    task_keys: set[str] = field(default_factory=set)
    ls_tasks: set[tuple[int, int]] = field(default_factory=set)
    subjects: set[str] = field(default_factory=set)
    # Subjects whose faces are in review for a duplicate claim with a subject that loses
    # photos here (decided again by the next refresh), and the pseudonyms those claims name
    # that must leave their reasons now.
    claimants: set[str] = field(default_factory=set)
    claim_names: set[str] = field(default_factory=set)
    # Subjects left with no photo at all (never decided again).
    subjects_gone: set[str] = field(default_factory=set)
    first_run: str | None = None  # earliest run that detected a forgotten face
    not_found: dict[str, int] = field(default_factory=dict)
    # The requests that matched nothing: (kind, value), kind identity / subject / image.
    missing: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tokens(self) -> set[str]:
        return self.shas | self.uris | self.face_ids | self.task_keys


class Matcher:
    """Does a value hold a token? Compares keyed digests (``token:<value>``) only."""

    def __init__(self, keyed: Keyed, digests: Iterable[str], kind: str = "token") -> None:
        self.keyed, self.kind, self.digests = keyed, kind, set(digests)
        self._memo: dict[str, bool] = {}

    def add(self, value: str) -> None:
        self.digests.add(self.keyed.digest(self.kind, value))
        self._memo.clear()

    def __bool__(self) -> bool:
        return bool(self.digests)

    def exact(self, value: str) -> bool:
        return self.keyed.digest(self.kind, value) in self.digests

    def hit(self, value: str | None) -> bool:
        if not value or not self.digests:
            return False
        r = self._memo.get(value)
        if r is None:
            r = self.exact(value) or any(self.exact(h) for h in _HEX.findall(value))
            if len(self._memo) < 1_000_000:
                self._memo[value] = r
        return r


def _string_columns(t: pa.Table) -> list[str]:
    out = []
    for f in t.schema:
        ty = f.type
        if pa.types.is_list(ty) or pa.types.is_large_list(ty):
            ty = ty.value_type
        if pa.types.is_string(ty) or pa.types.is_large_string(ty):
            out.append(f.name)
    return out


def row_hits(t: pa.Table, m: Matcher) -> list[bool]:
    """Per row: does any string (or list-of-string) value hold a token?"""
    hits = [False] * t.num_rows
    for name in _string_columns(t):
        for i, v in enumerate(t.column(name).to_pylist()):
            if hits[i] or v is None:
                continue
            if isinstance(v, list):
                hits[i] = any(m.hit(x) for x in v)
            else:
                hits[i] = m.hit(v)
    return hits


def _keep_published_files(store: ObjectStore, name: str) -> None:
    """Write :func:`storage.layout.published_files` for ``name``: the faces files its keys
    cache (and an earlier such list) names with published faces that exist now (this forget
    has removed its own). File paths only: no face or identity id."""
    held: set[str] = set()
    with contextlib.suppress(FileNotFoundError, ValueError):
        held |= set(json.loads(store.read_bytes(layout.published_files(name))).get("files") or [])
    for rel in (layout.published_keys(name), layout.published_keys_delta(name)):
        try:
            t = store.read_parquet_file(rel, columns=["rel", "face_id"])
        except (FileNotFoundError, StorageError, ValueError, pa.ArrowException):
            continue
        t = t.filter(pc.is_valid(t.column("face_id")))
        held |= {str(r) for r in t.column("rel").to_pylist() if r}
    files = sorted(r for r in held if store.exists(r))
    if files:
        store.write_bytes(layout.published_files(name), json.dumps({"files": files}).encode())
    else:
        store.delete(layout.published_files(name))


def scrub_parquet(store: ObjectStore, rel: str, m: Matcher, keep_empty: bool = False) -> int:
    """Rewrite ``rel`` without the rows that hold a token (deleted when none is left, unless
    ``keep_empty``); the rows removed."""
    t = store.read_parquet_file(rel)
    hits = row_hits(t, m)
    n = sum(hits)
    if not n:
        return 0
    kept = t.filter(pa.array([not h for h in hits], pa.bool_()))
    if kept.num_rows or keep_empty:
        store.write_parquet(rel, kept)
    else:
        store.delete(rel)
    return n


def _scrub_faces_file(store: ObjectStore, rel: str, m: Matcher) -> int:
    """:func:`scrub_parquet` for a faces group file, on its rows as readers see them (label
    overlay applied); a rewritten file takes its overlay in, and the overlay goes."""
    from storage.tables import drop_overlays, read_faces_file, with_write_id

    t = read_faces_file(store, rel)
    hits = row_hits(t, m)
    n = sum(hits)
    if not n:
        return 0
    kept = t.filter(pa.array([not h for h in hits], pa.bool_()))
    if kept.num_rows:
        store.write_parquet(rel, with_write_id(kept))
    else:
        store.delete(rel)
    drop_overlays(store, [rel])
    return n


# -- plan ----------------------------------------------------------------------------------


def plan(
    store: ObjectStore,
    identities: Iterable[str] = (),
    subjects: Iterable[str] = (),
    images: Iterable[str] = (),
) -> Plan:
    """Resolve a request against the tables (see the module docstring)."""
    p = Plan(subjects=set(subjects))
    fcols = ["face_id", "image_uri", "image_sha256", "source_kind", "source_group"]
    faces = read_faces(
        store, columns=[*fcols, "identity_id", "run_id", "reason", "reason_code"]
    ).to_pylist()
    rows = read_images(
        store, columns=["image_uri", "image_sha256", "source_kind", "source_group", "run_id"]
    ).to_pylist()
    for ident in identities:
        shas = {f["image_sha256"] for f in faces if f["identity_id"] == ident}
        if not shas:
            p.not_found["identity"] = p.not_found.get("identity", 0) + 1
            p.missing.append(("identity", ident))
        p.shas |= shas
    for subj in p.subjects:
        mine = [
            r for r in [*rows, *faces] if r["source_kind"] == "idcard" and r["source_group"] == subj
        ]
        # The person's faces elsewhere too (an album face a reviewer attached to the subject,
        # or merged into it): its identity is the subject id. Their photos go as an
        # identity's do; left behind, they were published under the raw subject id.
        theirs = {f["image_sha256"] for f in faces if f["identity_id"] == subj}
        if not mine and not theirs:
            p.not_found["subject"] = p.not_found.get("subject", 0) + 1
            p.missing.append(("subject", subj))
        p.uris |= {r["image_uri"] for r in mine}
        p.shas |= {r["image_sha256"] for r in mine} | theirs
    known = {r["image_sha256"] for r in rows}
    for img in images:
        # As `faceloop explain` reads it: a relative path, file://, a sha256 in any case, and
        # a readable file's content (tombstoned even when the store has not seen it yet).
        uris, sha = image_keys(img, remote_sha256)
        at = [r for r in rows if r["image_uri"] in uris]
        hashes = _held_here(at, rows)
        if sha is not None:
            p.shas.add(sha)
            if sha in known:
                hashes.add(sha)
        # The path itself goes only when every content it held goes: one that held a photo
        # kept (swapped away, now at another path) keeps that photo's rows and faces, which
        # carry the path they were decoded at; the forgotten contents go by their sha256.
        p.uris |= {
            u
            for u in {r["image_uri"] for r in at}
            if all(
                r["image_sha256"] in hashes
                for r in at
                if r["image_uri"] == u and is_sha256(r["image_sha256"] or "")
            )
        }
        p.shas |= hashes
        if not hashes:
            # Content tombstoned without a store match: a photo forgotten before it was taken.
            kind = "image" if sha is None else "image_content_only"
            p.not_found[kind] = p.not_found.get(kind, 0) + 1
            if sha is None:
                p.missing.append(("image", img))
    # Pseudo-digests ("unread:<code>", "size:<n>") are shared by unrelated files: not tokens.
    p.shas = {s for s in p.shas if s and is_sha256(s)}
    p.uris |= _places(p, rows, faces)
    gone = [f for f in faces if f["image_sha256"] in p.shas or f["image_uri"] in p.uris]
    # Other files of a forgotten photo (re-encoded, its metadata edited): their faces are
    # rejected as the same face as a forgotten one, which their reasons name. They are that
    # picture of the person, and go with it as byte copies do: their face rows went with the
    # forgotten face ids their reasons hold, leaving their image rows face-less, uncounted by
    # the dry run and failing `faceloop doctor` for good. By their content, as byte copies: a
    # copy's path that now holds a photo kept (another one written over it since) stays.
    copies = [f for f in faces if row_reason_code(f) == SAME_CAPTURE]
    while copies:
        ids = {f["face_id"] for f in gone}
        more = [f for f in copies if any(i in (f.get("reason") or "") for i in ids)]
        if not more:
            break
        copies = [f for f in copies if f not in more]
        p.shas |= {f["image_sha256"] for f in more if is_sha256(f["image_sha256"] or "")}
        p.uris |= _places(p, rows, faces)
        gone = [f for f in faces if f["image_sha256"] in p.shas or f["image_uri"] in p.uris]
    p.face_ids = {f["face_id"] for f in gone}
    runs = [f["run_id"] for f in gone if f["run_id"]]
    p.first_run = min(runs) if runs else None
    claim_faces = _claims_on(store, p, rows, faces)
    # Review tasks that show any of these faces (or ask about a forgotten subject).
    tasks_rel = layout.REVIEW_TASKS
    for rel in store.parquet_files(tasks_rel):
        t = store.read_parquet_file(rel).to_pylist()
        for r in t:
            shown = set(r.get("face_ids") or ()) | set(r.get("shown") or ())
            if (
                shown & p.face_ids
                or (r.get("subject") and r["subject"] in p.subjects)
                # an open claim task naming a forgotten subject: asked again once decided again
                or set(r.get("face_ids") or ()) & claim_faces
            ):
                p.task_keys.add(r["key"])
                if r.get("task_id") is not None and r.get("project_id") is not None:
                    p.ls_tasks.add((int(r["project_id"]), int(r["task_id"])))
    return p


def _places(p: Plan, rows: list[dict], faces: list[dict]) -> set[str]:
    """Every place the contents ``p.shas`` were recorded at, except a place that also held
    content this request keeps (a photo replaced at the same path): its rows and faces are
    another photo's, and the forgotten bytes' rows go by their sha256. ``rows``: every image
    row, ``faces``: every face row."""
    places = {r["image_uri"] for r in [*rows, *faces] if r["image_sha256"] in p.shas}
    kept_at = {
        r["image_uri"]
        for r in [*rows, *faces]
        if r["image_uri"] in places
        and r["image_uri"] not in p.uris
        and r["image_sha256"] not in p.shas
        and is_sha256(r["image_sha256"] or "")
    }
    return places - kept_at


def _held_here(at: list[dict], rows: list[dict]) -> set[str]:
    """The contents a path asked for by ``forget --image`` stands for: the one it holds now,
    and the earlier ones it held (versions of the photo edited in place) unless such a content
    is recorded at another path after it left this one (moved or swapped there: another
    photo now, which forgetting this path took along). ``at``: the path's image rows,
    ``rows``: every image row."""
    if not at:
        return set()
    here = {r["image_uri"] for r in at}
    latest = max(at, key=lambda r: r.get("run_id") or "")
    out = {latest["image_sha256"]}
    for sha in {r["image_sha256"] for r in at} - out:
        left = max((r.get("run_id") or "") for r in at if r["image_sha256"] == sha)
        moved_on = any(
            r["image_sha256"] == sha
            and r["image_uri"] not in here
            and (r.get("run_id") or "") > left
            for r in rows
        )
        if not moved_on:
            out.add(sha)
    return out


def _claims_on(store: ObjectStore, p: Plan, rows: list[dict], faces: list[dict]) -> set[str]:
    """Fill ``p.claimants``, ``p.claim_names`` and ``p.subjects_gone``; the claimants' faces
    whose reason names a subject losing photos (``duplicate_claim: <pseudonym>, ...``)."""
    from faceloop.vocab import DUPLICATE_CLAIM
    from storage.secret import pseudonym

    ids = [r for r in [*rows, *faces] if r["source_kind"] == "idcard"]
    losing = {
        r["source_group"] for r in ids if r["image_sha256"] in p.shas or r["image_uri"] in p.uris
    } | p.subjects
    kept = {
        r["source_group"]
        for r in ids
        if r["image_sha256"] not in p.shas and r["image_uri"] not in p.uris
    }
    p.subjects_gone = (losing - kept) | p.subjects
    prefix = f"{DUPLICATE_CLAIM}: "
    if not losing or not any((f.get("reason") or "").startswith(prefix) for f in faces):
        return set()  # (no claim anywhere: no pseudonym to make, no store secret to create)
    names = {pseudonym(store, "subject", s) for s in losing}
    out: set[str] = set()
    for f in faces:
        reason = f.get("reason") or ""
        if f["face_id"] in p.face_ids or not reason.startswith(prefix):
            continue
        named = names & set(reason[len(prefix) :].split(", "))
        if named and f["source_group"] not in p.subjects_gone:
            p.claimants.add(f["source_group"])
            p.claim_names |= named
            out.add(f["face_id"])
    return out


def _claimed(reason: str | None) -> list[str]:
    """The pseudonyms a ``duplicate_claim: a, b`` reason names ([] for any other reason)."""
    from faceloop.vocab import DUPLICATE_CLAIM

    prefix = f"{DUPLICATE_CLAIM}: "
    if not reason or not reason.startswith(prefix):
        return []
    return reason[len(prefix) :].split(", ")


def redact_claims(store: ObjectStore, claimants: set[str], names: set[str]) -> int:
    """Take ``names`` (pseudonyms of subjects that lost photos) out of the duplicate-claim
    reasons of ``claimants``' faces and of the review queue, at once: the next refresh decides
    those subjects again (layout.RELABEL_SUBJECTS) and writes their reasons anew. Rows changed."""
    from faceloop.vocab import DUPLICATE_CLAIM
    from storage.tables import faces_rel, read_faces_file, with_write_id

    if not claimants or not names:
        return 0
    prefix = f"{DUPLICATE_CLAIM}: "

    def redacted(reason: str | None) -> str | None:
        others = _claimed(reason)
        if not names & set(others):
            return reason
        kept = sorted({o for o in others if o not in names})
        return prefix + ", ".join([*kept, FORGOTTEN_SUBJECT])

    def rewrite(t: pa.Table) -> tuple[pa.Table, int]:
        if "reason" not in t.column_names:
            return t, 0
        old = t.column("reason").to_pylist()
        new = [redacted(r) for r in old]
        n = sum(a != b for a, b in zip(old, new, strict=True))
        if n:
            i = t.column_names.index("reason")
            t = t.set_column(i, t.schema.field(i), pa.array(new, pa.string()))
        return t, n

    changed = 0
    bump_faces_generation(store)
    for subject in sorted(claimants):
        rel = faces_rel("idcard", subject)
        if not store.exists(rel):
            continue
        t, n = rewrite(read_faces_file(store, rel))
        if n:
            store.write_parquet(rel, with_write_id(t))
            drop_overlays(store, [rel])
            changed += n
    bump_faces_generation(store)
    store.delete(layout.SUMMARY_CACHE)  # its review rows hold the old reasons
    if store.exists(layout.REVIEW_QUEUE):
        t, n = rewrite(store.read_parquet_file(layout.REVIEW_QUEUE))
        if n:
            store.write_parquet(layout.REVIEW_QUEUE, t)
            changed += n
    return changed


# What a duplicate claim names in place of a subject forgotten since (until it is decided again).
FORGOTTEN_SUBJECT = "[forgotten subject]"


def redact_stale_claims(store: ObjectStore) -> int:
    """:func:`redact_claims` for a forget finished after it was killed (``--resume``, the next
    refresh): the subjects waiting to be decided again (layout.RELABEL_SUBJECTS, noted before
    the forget's pending record) lose from their claim reasons every pseudonym that is no
    current ID-card subject's. The killed run's own names are not kept anywhere: the pending
    record holds no pseudonym of the person it forgets."""
    from storage.recovery import subjects_to_relabel
    from storage.secret import pseudonym
    from storage.tables import faces_files

    claimants = subjects_to_relabel(store)
    if not claimants:
        return 0
    groups = [("idcard", c) for c in claimants]
    named = {
        n
        for r in read_faces(store, ["reason"], groups=groups)["reason"].to_pylist()
        for n in _claimed(r)
    }
    named.discard(FORGOTTEN_SUBJECT)
    if not named:
        return 0
    current = {
        pseudonym(store, "subject", rel.rsplit("/", 1)[-1].removesuffix(".parquet"))
        for rel in faces_files(store, kinds=["idcard"])
    }
    return redact_claims(store, claimants, named - current)


# -- scrub ---------------------------------------------------------------------------------


@dataclass
class ScrubCounts:
    face_rows: int = 0
    image_rows: int = 0
    review_rows: int = 0
    other_rows: int = 0
    dataset_rows: int = 0
    versions_rewritten: int = 0
    reports_deleted: int = 0
    run_records_scrubbed: int = 0
    staging_removed: int = 0
    ls_tasks_found: set[tuple[int, int]] = field(default_factory=set)

    def to_dict(self) -> dict[str, int]:
        d = {k: v for k, v in self.__dict__.items() if isinstance(v, int)}
        return d


def _run_of(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def scrub(
    store: ObjectStore,
    m: Matcher,
    reports_from: str | None,
    save: Callable[[set[str], set[tuple[int, int]]], None] | None = None,
    check: Callable[[], None] | None = None,
) -> ScrubCounts:
    """Remove every row, version row, report and record holding a token of ``m``. ``save``
    is given the tokens and Label Studio tasks learnt from the review task records before
    anything is removed (a scrub killed after those records went would lose them). ``check``
    (the store lock's) is called before each file is written or removed: a scrub that lost the
    lock stops there (the pending record lets the new holder finish it)."""
    check = check or (lambda: None)
    from storage.manifest import list_versions
    from storage.recovery import dataset_names, drop_label_state, staging_runs
    from storage.versions import rewrite_version

    c = ScrubCounts()
    # Review task records first: the keys of the tasks they drop become tokens too (a
    # cluster_check key names an identity and a digest, not its faces).
    for rel in store.parquet_files(layout.REVIEW_TASKS):
        t = store.read_parquet_file(rel)
        hits = row_hits(t, m)
        for r, h in zip(t.to_pylist(), hits, strict=True):
            if h:
                m.add(r["key"])
                if r.get("task_id") is not None and r.get("project_id") is not None:
                    c.ls_tasks_found.add((int(r["project_id"]), int(r["task_id"])))
    if save is not None:
        save(set(m.digests), set(c.ls_tasks_found))
    bump_faces_generation(store)
    # Faces files first, each read with its label overlay (a token may sit in the newer labels
    # only) and written back whole with the overlay folded in; the overlays left after that
    # (of files without a hit, or stale) are scrubbed row by row like every other table.
    rels = store.parquet_files("tables")
    for rel in rels:
        if rel.startswith(layout.FACES + "/"):
            check()
            c.face_rows += _scrub_faces_file(store, rel, m)
    for rel in rels:
        if rel.startswith(layout.FACES + "/"):
            continue
        check()
        if rel.startswith(layout.LABELS + "/") and not store.exists(rel):
            continue  # gone with its faces file
        n = scrub_parquet(store, rel, m, keep_empty=rel == layout.REVIEW_QUEUE)
        if rel.startswith(layout.IMAGES + "/"):
            c.image_rows += n
        elif rel.startswith(layout.REVIEWS + "/") or rel == layout.REVIEW_QUEUE:
            c.review_rows += n
        else:
            c.other_rows += n
    bump_faces_generation(store)
    # The label stage's state holds centroid sums and face ids of every album: drop it, all
    # but the label settings' fingerprint (the faces generation moved, so the next refresh
    # would rebuild it anyway; a settings change since is still seen).
    drop_label_state(store)
    # So does the run summary's per-file cache (review rows: face ids, URIs, identities).
    store.delete(layout.SUMMARY_CACHE)

    for name in dataset_names(store):
        # Publish's keys cache names face and identity ids; the next publish rebuilds it. What
        # it guarded goes on in its stead: the faces files that held published faces and are
        # still there (one deleted outside faceloop after this forget was dropped from the next
        # version without a word).
        _keep_published_files(store, name)
        store.delete(layout.published_keys(name))
        store.delete(layout.published_keys_delta(name))
        for v in list_versions(store, name):
            check()
            n = rewrite_version(store, name, v, m.hit, note={"reason": "forget"})
            if n:
                c.dataset_rows += n
                c.versions_rewritten += 1

    deleted: set[str] = set()
    if reports_from:
        for o in store.list(layout.REPORTS):
            if _run_of(o.rel) >= reports_from:
                store.delete(o.rel)
                deleted.add(o.rel)
    c.reports_deleted = len(deleted)
    for o in store.list(layout.RUNS):
        if not o.rel.endswith(".json"):
            continue
        data = json.loads(store.read_bytes(o.rel))
        new = _scrub_json(data, m, {store.uri(r) for r in deleted} | deleted)
        if new != data:
            store.write_bytes(o.rel, json.dumps(new, indent=1).encode())
            c.run_records_scrubbed += 1
    for run in staging_runs(store):  # the caller holds the lock: every staging is dead
        check()  # (unless another writer took the lock over: then it is that writer's)
        store.delete_prefix(layout.staging_dir(run))
        c.staging_removed += 1
    return c


def _scrub_json(v: Any, m: Matcher, deleted: set[str]) -> Any:
    if isinstance(v, dict):
        return {k: _scrub_json(x, m, deleted) for k, x in v.items()}
    if isinstance(v, list):
        return [_scrub_json(x, m, deleted) for x in v]
    if isinstance(v, str):
        if v in deleted:
            return None
        return "[forgotten]" if m.hit(v) else v
    return v


def tombstoned_faces_in_datasets(store: ObjectStore, m: Matcher, dry_run: bool = False) -> int:
    """Rewrite every dataset version that holds a tombstoned face (``m`` of kind ``face``);
    rows removed (``dry_run``: the rows that would be, nothing written). What ``datasets gc``
    runs so no retained version keeps a forgotten face."""
    from storage.manifest import list_versions
    from storage.recovery import dataset_names
    from storage.versions import rewrite_version

    if not m:
        return 0
    if dry_run:
        return sum(
            forgotten_rows(store, m, name, v)
            for name in dataset_names(store)
            for v in list_versions(store, name)
        )
    return sum(
        rewrite_version(store, name, v, m.exact, note={"reason": "tombstone"})
        for name in dataset_names(store)
        for v in list_versions(store, name)
    )


def forgotten_rows(store: ObjectStore, m: Matcher, name: str, version: int) -> int:
    """How many rows of version ``version`` of dataset ``name`` hold a tombstoned face (``m`` of
    kind ``face``)."""
    from storage.versions import read_shards

    ids = read_shards(store, name, version, ["face_id"]).column(0).to_pylist()
    return sum(m.exact(f) for f in ids)


def face_matcher(store: ObjectStore) -> Matcher | None:
    """A matcher of the tombstoned face ids, or None when nothing was ever forgotten."""
    from storage.privacy import read_tombstones

    t = read_tombstones(store)
    keyed = Keyed.of(store, create=False) if t.faces else None
    return Matcher(keyed, t.faces, kind="face") if keyed else None


def retention_cleanup(
    store: ObjectStore,
    run_records_days: float | None,
    reports_days: float | None,
    dry_run: bool = False,
) -> list[str]:
    """Delete run records and reports older than their bound (by the run id's UTC time; 0 or
    None = keep forever); the newest of each is kept whatever its age (a store whose last run
    was long ago said "runs: none yet" in `faceloop status`). Returns the keys removed (or that
    would be)."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    out = []
    for prefix, days in ((layout.RUNS, run_records_days), (layout.REPORTS, reports_days)):
        if not days:
            continue
        dated = [(when, o.rel) for o in store.list(prefix) if (when := run_id_time(_run_of(o.rel)))]
        newest = max(dated)[1] if dated else None
        for when, rel in sorted(dated):
            if rel != newest and (now - when).total_seconds() > days * 86400:
                if not dry_run:
                    store.delete(rel)
                out.append(rel)
    return out


def faces_left(store: ObjectStore, face_ids: set[str]) -> int:
    """How many of ``face_ids`` the faces table still holds (for checks)."""
    if not face_ids:
        return 0
    t = read_faces(store, columns=["face_id"])
    return int(
        pc.sum(pc.is_in(t.column("face_id"), value_set=pa.array(sorted(face_ids)))).as_py() or 0
    )


def finish_store_work(
    store: ObjectStore, pending: Pending, check: Any = None, redact_stale: bool = True
) -> dict[str, int]:
    """The store work of a forget whose tombstones and pending record are written
    (``pending.store_done`` False): every row, version row, report and record holding one of
    its tokens removed, then the record marked done (its Label Studio tasks stay listed).
    ``check`` (the lock's) is called first. The removal counts; {} when nothing was left."""
    from storage.privacy import Tombstones, add_tombstones

    if pending.store_done:
        return {}
    if check is not None:
        check()
    keyed = Keyed.of(store)
    assert keyed is not None
    add_tombstones(store, pending.tombstones)  # (again: a forget killed before it wrote them)

    def save(tokens: set[str], ls_tasks: set[tuple[int, int]]) -> None:
        if tokens - pending.tokens or ls_tasks - pending.ls_tasks:
            pending.tokens |= tokens
            pending.ls_tasks |= ls_tasks
            write_pending(store, pending)

    counts = scrub(store, Matcher(keyed, pending.tokens), pending.reports_from, save, check)
    pending.ls_tasks |= counts.ls_tasks_found
    out = counts.to_dict()
    # Claims on the forgotten photos: redacted here too, for a forget killed before its own
    # redaction (the subjects were noted for relabelling before the pending record). Not when
    # the caller redacts this forget's own claim names itself and nothing earlier was pending
    # (``redact_stale`` False): that pass lists every ID-card subject.
    if redact_stale and (redacted := redact_stale_claims(store)):
        out["claim_reasons_redacted"] = redacted
    pending.tokens, pending.store_done, pending.reports_from = set(), True, None
    pending.tombstones = Tombstones()
    write_pending(store, pending)
    return out


# The audit fields of a killed forget whose pending record an earlier faceloop wrote (it kept
# no requests).
UNKNOWN_REQUEST = {"request": "unknown: its pending record was written by an earlier faceloop"}


def finish_interrupted(
    store: ObjectStore, run_id: str, check: Any = None
) -> tuple[dict[str, int], int] | None:
    """What a refresh does first: the store work of a `faceloop forget` killed after writing
    its tombstones (rows, dataset versions and reports that still hold the forgotten faces),
    audited as a resume by that run. ``(removed counts, Label Studio tasks left for
    `forget --resume`)``, or None when no forget was interrupted."""
    from storage.privacy import audit, read_pending

    pending = read_pending(store)
    if pending is None or (pending.store_done and not pending.requests):
        return None  # (store work done, requests left: killed before its audit line)
    removed = finish_store_work(store, pending, check)
    left = len(pending.ls_tasks)
    audit(
        store,
        {
            "action": "resume",
            "by": "refresh",
            "run_id": run_id,
            # What the killed forget(s) had asked (their own line was never written).
            "resumed": pending.requests or [UNKNOWN_REQUEST],
            "removed": removed,
            "labelstudio": {"deleted": 0, "left": left},
        },
    )
    pending.requests = []
    write_pending(store, pending)
    return removed, left
