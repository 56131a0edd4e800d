"""Discover new images in the configured sources.

An image is identified by its content (sha256) and where it lives (URI). Images whose
(uri, sha256) pair is already in the images table were processed by an earlier run and are
skipped, so a rerun over unchanged sources has nothing to do. A file whose content changed is a
new image. Files that break the source layout are recorded as quarantined right here, with the
reason, and never reach the models.

Listing reads no file bytes. Every regular file comes with a stamp from the listing alone
(``size:mtime_ns:inode`` locally, ``size:ETag`` on S3, :class:`storage.objectstore.SourceEntry`);
``tables/sources/stamps.parquet`` remembers the sha256 each URI had under its stamp, so only a
file that is new, or whose stamp changed, is opened and hashed: in the driver when few are, as
a Ray Data map when at least ``ray.hash_min_files`` are. A local stamp whose mtime lies within
:data:`RACY_SECONDS` of the listing is not remembered (a write in the same timestamp tick
could go unseen), so such a file is hashed again next time. The cache is only a memo of
uri+stamp -> sha256: a run that dies after writing it loses nothing (the images table decides
what is seen), ``faceloop forget`` scrubs it like every table, and a forgotten file (tombstoned
content or subject) is never put back in it under its path: a listed one is remembered under a
keyed name with its placeholder and the tombstone that keeps it out, so an unchanged forgotten
file is not read again while that tombstone stands.

Content-addressed model work: a file whose bytes a model already decoded (a known sha256) is
never sent to the models, wherever it now lives. Its images-table row points at the known faces
through ``image_sha256`` and takes the original's status, size and face count; the face rows
themselves are not copied. Face ids are a function of the bytes (``sha1(sha256:box)``,
tasks/faces.py), so there is exactly one face row per face of a content however many paths
show it: ids stay unique, and the face's identity and status (auto, review, human) are the same
for every path by construction. The row's reason code says which case it is:

- ``moved``: no URI the store recorded for these bytes is listed any more (a moved or renamed
  file or album folder): the new path is the image's home now and is counted as ``moved``;
- ``duplicate_content``: the bytes are also still listed under another URI (a copy): counted as
  a duplicate, as before; but an album photo whose bytes a copy still shows, where a recorded
  place of them is gone (a copy moved or renamed, or the original moved while a copy stays),
  is ``moved`` out of that one place, named in the row's ``moved_from``: that place stops
  counting as an image and the copy does not (tasks.summary.current_images).
- ``restored``: a path holds bytes it held before it held others (an edit reverted).

Bytes the decoder quarantined (:data:`VERDICT_CODES`: corrupt, truncated, not an image, ...)
are known content too: moved or restored, their row is ``moved`` / ``restored`` with status
quarantined and that verdict in its reason, and they are not read again; a copy of them beside
a place still listed is judged as a new file (its own quarantine row). A file quarantined from
the listing alone (:data:`LISTING_CODES`: its extension, or a size too large to read) has no
verdict on its bytes to reuse: moved, its row is ``moved`` (status quarantined, the listing's
verdict in its reason) out of the one recorded place of the same hash that is no longer listed,
named in ``moved_from``.

A file whose (path, bytes) pair is recorded is "seen" and writes nothing, except when the
record has moved on since (:class:`_Returned`): the path's latest row holds other bytes
(``restored``), or the bytes' latest ``moved`` row took them to another path, which they have
left again (an album folder renamed and renamed back: ``moved`` back), or a later move out of
this one path (``moved_from``) took them elsewhere (a copy, or a video, moved away and back:
``moved`` out of the place it went to). Without a new row the path's latest row would name the
edit, or the folder it is no longer in.

The faces keep the ``image_uri`` / ``source_group`` where their bytes were first decoded
(provenance: which album's clustering they took part in); the images table holds every path.
An ID-card photo moved into another subject's folder is the exception: its subject is its
label, so the label stage moves its faces to the new subject (tasks.label.refile_faces).

A source that lists no file while the store holds images from it (a failed mount: the mount
point is there, empty) is warned about and named in the run's summary (``empty_sources``). Its
images are left as they were, like those of deleted files, and so are their stamps: the mount
back, nothing of it is read again.

Hidden and system names (``limits.ignore``: ``.*``, ``@eaDir``, ``Thumbs.db``, ...) are not listed
at all; the run counts them. Every other entry a source lists ends in exactly one images-table
row and none stops the run. Entries
that are not regular files (FIFOs, sockets, devices, symlinks to folders), dangling symlinks and
symlinks that resolve outside the source root are quarantined from ``lstat``/``stat`` alone and
never opened; a file that cannot be read or that vanishes before it is hashed is quarantined with
its reason. Such rows carry ``unread:<code>`` instead of a sha256, and their stamps are not
remembered, so a rerun reads the file again (then its real hash makes it a new image). A file
that still cannot be read (``unreadable``: permission denied, an I/O error, which pass) is
quarantined again, with this run's reason, by every run until it can be read (counted "already
seen", no refresh after the first mentioned it); a verdict on bytes that were read (``corrupt``)
is given once. Known content keeps the original's status, size and pHash (moved or
duplicate_content, below). Copies of new content within one run reach the models once: the file
that sorts first by URI is processed, the others wait for its verdict (``duplicate_content``,
decided by the label stage).

Files quarantined by a limit of the settings (``unsupported_extension``: ``limits.extensions``;
``decompression_bomb``: ``limits.max_image_pixels``) are looked at again once those settings
change: a file such a row names is not "seen" while the row is its only record, so it is
processed (or quarantined again, under the new limits) by the first refresh after the change.
So is such a file moved since: its row at the new path is ``moved`` (quarantined), and bytes
that a limit's row holds are looked at again there too.
``state/input_limits.json`` keeps the limits of the last successful refresh (the flow writes it
at the end, :func:`note_input_limits`: a run that dies first retries them again). A file too
large to hash (``too_large_bytes``) is recorded under ``size:<n>`` instead of a hash, so its
real hash makes it new once ``limits.max_image_bytes`` lets it be read.

A file quarantined for its place in a source (``wrong_layout``: ``Year/Event/photo.jpg`` under
an album source; ``unexpected_file_in_idcard_subject``) is taken in once a source lists it where
the layout expects it (the ``Year`` folder added as a source): its quarantine is a verdict on
the path it was listed under, not on its bytes.

Forgotten people (``faceloop forget``, storage/privacy.py): a file whose content is tombstoned
(keyed digest of its sha256) or that lies in a tombstoned ID-card subject folder is never
processed. It is recorded once as a ``quarantined`` row with reason code ``forgotten`` whose
``image_uri`` and ``image_sha256`` are ``forgotten:<keyed digest>`` placeholders, with no group
and no size: the images table never takes the raw hash, URI or subject name back, and a rerun
finds the placeholder pair and counts the file as seen. A path kept out so and taken in later
(other bytes written there, its subject's tombstone lifted) counts under its own row: a
``forgotten_taken_in`` row at its placeholder (never naming the path) stops the placeholder
counting (:func:`_forgotten_taken_in`).
"""

from __future__ import annotations

import copy
import functools
import logging
import posixpath
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from faceloop.config import Settings, SourceSpec
from faceloop.errors import (
    BadInputError,
    ConfigError,
    SourceError,
    StorageError,
    TransientStorageError,
)
from faceloop.progress import iterate
from faceloop.schema import (
    IMG_NO_FACE,
    IMG_OK,
    IMG_QUARANTINED,
    PENDING_SCHEMA,
    ROLE_ALBUM,
    ROLE_ID,
    ROLE_LIVE,
)
from faceloop.vocab import InputCode, Reason, Role, unread_hash
from storage import layout
from storage.objectstore import (
    ObjectStore,
    SourceEntry,
    list_source,
    sha256_uri,
    use_store_modes,
)
from storage.privacy import Keyed, TombstoneCheck
from storage.tables import check_run_id, read_images, run_committed

log = logging.getLogger(__name__)

FORGOTTEN = Reason("forgotten", "a person asked to be forgotten (tombstone)")
# What the images table holds instead of a forgotten file's uri and hash (TombstoneCheck).
FORGOTTEN_PREFIX = "forgotten:"
TAKEN_IN = Reason(
    InputCode.FORGOTTEN_TAKEN_IN,
    "this forgotten file's path was taken in again (other bytes at it, or its subject's "
    "tombstone lifted): it counts under its own row",
)


@dataclass
class DiscoverResult:
    """What one discovery pass found. ``pending_rel`` is None when there is nothing new.

    ``listed == seen + new + moved + restored + duplicates + quarantined`` (``forgotten`` files
    count as
    quarantined the first time, as seen afterwards; ``forgotten`` counts them either way).
    ``quarantined_rows`` holds every images-table row discovery decided itself (the
    quarantined files, the moved files and the duplicates); the label stage writes them with
    the run's other image rows. ``hashed``: files whose bytes were read to hash them (the
    others' stamps vouched for their known sha256).
    """

    run_id: str
    listed: int = 0
    seen: int = 0
    new: int = 0
    moved: int = 0
    restored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    forgotten: int = 0
    hashed: int = 0
    # Entries not listed at all: hidden or system files and folders (limits.ignore); not in
    # ``listed``.
    ignored: int = 0
    pending_rel: str | None = None
    quarantined_rows: list[dict] = field(default_factory=list)
    # The limits differ from those of the last successful refresh (the flow records the new
    # ones at the end of the run: note_input_limits).
    limits_changed: bool = False
    retried: int = 0  # files quarantined by a limit before, looked at again under the new ones
    # Files quarantined for their place in a source, listed now where the layout expects them.
    in_place_again: int = 0
    # Known paths whose new content is new to the store (sent to the models as new images;
    # counted, never logged by path: a photo's path often names the person).
    content_changed: int = 0
    # This run's quarantined files by reason code (``quarantined`` in all).
    quarantined_by: dict[str, int] = field(default_factory=dict)
    # New photos in a renamed album folder, clustered with the album's earlier photos
    # (_renamed_albums).
    renamed_album_photos: int = 0
    # Sources that listed no file while the store holds current images from them (a failed
    # mount, an emptied bucket prefix): source URI -> those images (_held_from_empty).
    empty_sources: dict[str, int] = field(default_factory=dict)

    def quarantine(self, row: dict) -> None:
        self.count_quarantined(str(row["reason_code"]))
        self.quarantined_rows.append(row)

    def count_quarantined(self, code: str) -> None:
        """One more quarantined file, for reason ``code``."""
        self.quarantined += 1
        self.quarantined_by[code] = self.quarantined_by.get(code, 0) + 1


# The key of a discovery row that waits for its original's verdict (see _hold_back_copies).
COPY_OF = "copy_of"


def _hold_back_copies(pending: list[dict], result: DiscoverResult) -> list[dict]:
    """The work list with one row per content: of new files with the same bytes, only the
    first by URI reaches the models; the others (copies) join ``result.quarantined_rows`` as
    ``duplicate_content`` rows naming it under :data:`COPY_OF`, and the label stage gives each
    the original's verdict (:func:`tasks.label.copies_decided`), as it would after
    decoding the same bytes twice."""
    first: dict[str, str] = {}
    for row in sorted(pending, key=lambda r: r["image_uri"]):
        first.setdefault(row["image_sha256"], row["image_uri"])
    kept = []
    for row in pending:
        original = first[row["image_sha256"]]
        if original == row["image_uri"]:
            kept.append(row)
            continue
        why = Reason(InputCode.DUPLICATE_CONTENT, f"same bytes as {original}")
        result.duplicates += 1
        result.quarantined_rows.append(
            {**row, "reason": why.text, "reason_code": why.code, COPY_OF: original}
        )
    return kept


def _relative(root: str, uri: str) -> str:
    return uri[len(root) :].lstrip("/") if uri.startswith(root) else posixpath.basename(uri)


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether a path below a source's root has a part that one of ``patterns`` matches
    (``limits.ignore``: fnmatch globs, ignoring case)."""
    return bool(patterns) and _ignore_regex(tuple(patterns)).search(rel) is not None


@functools.lru_cache(maxsize=8)
def _ignore_regex(patterns: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for all the globs, each bound to one whole part of a path: ~0.7 s per 10^6
    paths, where fnmatch per part and pattern took 11 s."""
    alternatives = "|".join(_glob_part(p) for p in patterns)
    return re.compile(rf"(?:^|/)(?=[^/])(?:{alternatives})(?=/|$)", re.IGNORECASE)


def _glob_part(glob: str) -> str:
    """An fnmatch glob as a regex that stays inside one path part (``*`` and ``?`` and a
    negated class match no ``/``)."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        end = -1
        if c == "[":  # as fnmatch: a "]" right after "[" or "[!" is a member, not the end
            j = i + 1 + (glob[i + 1 : i + 2] == "!")
            end = glob.find("]", j + (glob[j : j + 1] == "]"))
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end != -1:
            body = glob[i + 1 : end]
            negated = body.startswith("!")
            body = re.sub(r"([\\\]^])", r"\\\1", body[1:] if negated else body)
            out.append(f"[^/{body}]" if negated else f"[{body}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def classify(
    source: SourceSpec, rel: str, extensions: list[str]
) -> tuple[str, Role | str, Reason | None]:
    """Map a file's path relative to its source root to (group, role, quarantine reason); the
    role is ``""`` for a quarantined file.

    Albums are ``<album_id>/<image>``; ID-card subjects are ``<subject_id>/id.<ext>`` plus
    ``live*.<ext>``. Anything else is quarantined with a reason naming the expected layout.
    """
    parts = [p for p in rel.split("/") if p]
    name = parts[-1] if parts else rel
    stem, ext = posixpath.splitext(name.lower())
    group = parts[0] if len(parts) > 1 else ""
    if len(parts) != 2:
        album = source.kind == "album"
        expected = "<album_id>/<image>" if album else "<subject_id>/id.<ext> or live*.<ext>"
        folder = "album" if album else "subject"
        if len(parts) < 2:
            hint = f"a file right in the source's folder belongs to no {folder}: move it into one"
        elif not album:
            # S1/old/live2.jpg (a folder inside a subject) or Batch/S1/id.jpg (the source one
            # level too high): the file alone cannot tell which; both ways out are named.
            hint = (
                "a subject's photos lie right in its folder: if "
                f"{parts[-2]!r} is a subject, give {'/'.join(parts[:-2])!r} as the source "
                f"instead of this one; if it is a folder inside subject {parts[0]!r}, move its "
                "photos up into the subject's folder"
            )
        else:
            # Year/Event/photo.jpg under the source: the source is one level too high.
            hint = (
                f"{folder}s are the folders right below the source: to take the folders of "
                f"{'/'.join(parts[:-2])!r} as {folder}s, give it as a source instead of this "
                "one (sources may not overlap)"
            )
        return group, "", Reason("wrong_layout", f"{rel!r} is not {expected}; {hint}")
    if ext not in extensions:
        return (
            group,
            "",
            Reason(
                "unsupported_extension",
                f"{ext!r} not in {', '.join(extensions)} (limits.extensions)"
                if ext
                else f"no extension (limits.extensions: {', '.join(extensions)})",
            ),
        )
    if source.kind == "album":
        return group, ROLE_ALBUM, None
    if stem == "id":
        return group, ROLE_ID, None
    if stem.startswith("live"):
        return group, ROLE_LIVE, None
    return (
        group,
        "",
        Reason(
            "unexpected_file_in_idcard_subject", f"{name!r} is neither id.<ext> nor live*.<ext>"
        ),
    )


def _hash(entry: SourceEntry) -> tuple[str, Reason | None]:
    """``(sha256, None)`` of a listed file, or ``("unread:<code>", reason)`` when it cannot be
    read (errors that retrying may fix propagate to the task's retries)."""
    # An S3 object is hashed only at the ETag its listing gave (its stamp "<size>:<ETag>"):
    # one written over in between is read again by the next refresh.
    etag = entry.stamp.split(":", 1)[1] if entry.uri.startswith("s3://") and entry.stamp else ""
    try:
        return sha256_uri(entry.uri, etag or None)[0], None
    except TransientStorageError:
        raise
    except FileNotFoundError:
        why = Reason(InputCode.VANISHED, "listed, then gone when read")
    except BadInputError as exc:
        why = Reason(exc.reason, exc.detail)
    except OSError as exc:
        why = Reason(InputCode.UNREADABLE, exc.strerror or type(exc).__name__)
    except StorageError as exc:
        why = Reason(InputCode.UNREADABLE, str(exc))
    return unread_hash(why.code), why


# The images-table hash of a file whose bytes changed between discovery and the face stage
# (tasks.faces: recorded as unread, read again by the next refresh).
_CHANGED = unread_hash(InputCode.CHANGED_WHILE_READ)

RACY_SECONDS = 2.0  # a local stamp this close to the listing may miss a write in the same tick


def _settled(mtime: float | None, now: float) -> bool:
    """Whether a file's stamp may be remembered: its mtime not within RACY_SECONDS of the
    listing, before or after it (a clock ahead, ``touch -d 2030``: a write from now on sets an
    mtime of now, which differs from it; such a file was read again at every refresh)."""
    return mtime is None or abs(now - mtime) > RACY_SECONDS


STAMPS_SCHEMA = pa.schema(
    [("image_uri", pa.string()), ("stamp", pa.string()), ("image_sha256", pa.string())]
)


def read_stamps(store: ObjectStore) -> dict[str, tuple[str, str]]:
    """uri -> (stamp, sha256) of every file an earlier discovery hashed (module doc). Only a
    cache: an unreadable one (a truncated copy) is ignored with a warning and every listed file
    is hashed again (it failed every refresh with a bare "not a readable Parquet file")."""
    try:
        t = store.read_parquet(layout.SOURCE_STAMPS, schema=STAMPS_SCHEMA)
    except (StorageError, OSError, pa.ArrowInvalid) as exc:
        if isinstance(exc, (FileNotFoundError, TransientStorageError)):
            raise  # (an outage is not damage: the next refresh reads it)
        log.warning(
            "discover: ignoring the stamps cache %s (%s): every listed file is hashed again",
            store.uri(layout.SOURCE_STAMPS),
            exc,
        )
        return {}
    return {
        u: (st, h)
        for u, st, h in zip(
            t.column("image_uri").to_pylist(),
            t.column("stamp").to_pylist(),
            t.column("image_sha256").to_pylist(),
            strict=True,
        )
    }


def _write_stamps(store: ObjectStore, stamps: dict[str, tuple[str, str]]) -> None:
    uris = sorted(stamps)
    store.write_parquet(
        layout.SOURCE_STAMPS,
        pa.table(
            {
                "image_uri": uris,
                "stamp": [stamps[u][0] for u in uris],
                "image_sha256": [stamps[u][1] for u in uris],
            },
            schema=STAMPS_SCHEMA,
        ),
    )


def _hash_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Ray Data map: a batch of ``uri`` -> ``digest`` and ``code`` / ``detail`` of the reason
    (empty when read)."""
    digests, codes, details = [], [], []
    for uri, stamp in zip(batch["uri"], batch["stamp"], strict=True):
        digest, why = _hash(SourceEntry(str(uri), 0, stamp=str(stamp)))
        digests.append(digest)
        codes.append(why.code if why else "")
        details.append(why.detail if why else "")
    return {"uri": list(batch["uri"]), "digest": digests, "code": codes, "detail": details}


def hash_entries(
    entries: list[SourceEntry], settings: Settings
) -> dict[str, tuple[str, Reason | None]]:
    """uri -> :func:`_hash` of every entry: on Ray Data when there are at least
    ``ray.hash_min_files`` of them (the bytes are read by the workers, only digests come back),
    else here, one after the other."""
    if len(entries) < max(1, settings.ray.hash_min_files):
        return {
            e.uri: _hash(e) for e in iterate(entries, "discover/hash", len(entries), unit="file")
        }
    import ray

    from tasks.ray_faces import init_ray

    init_ray(settings.ray)
    blocks = max(1, min(len(entries) // 256 + 1, 64))
    ds = ray.data.from_items(
        [{"uri": e.uri, "stamp": e.stamp} for e in entries], override_num_blocks=blocks
    )
    out: dict[str, tuple[str, Reason | None]] = {}
    for r in ds.map_batches(_hash_batch, batch_size=256, batch_format="numpy").iter_rows():
        why = Reason(str(r["code"]), str(r["detail"])) if r["code"] else None
        out[str(r["uri"])] = (str(r["digest"]), why)
    log.info("hashed %d files on Ray Data", len(out))
    return out


# Quarantine codes that a change of the `limits` settings can lift (module doc).
LIMIT_CODES = frozenset({"unsupported_extension", "decompression_bomb"})
# Quarantines that are the decoder's verdict on the bytes alone (tasks/decode.py): the same
# bytes under another path get the same verdict, so a moved unusable file is recorded as moved,
# with that verdict, instead of being judged again as a new file while its old place still
# counts (a source root moved: every quarantined file counted twice). With the limits unchanged,
# the limit's verdict on the bytes too (decompression_bomb).
VERDICT_CODES = frozenset(
    {"empty_file", "not_an_image", "truncated", "corrupt", "unsupported_format"}
)
# Codes of a file's place in its source, not of its bytes: a source that lists the same file
# where the layout expects it (its folder added as a source, the kind corrected) takes it in.
PLACE_CODES = frozenset({"wrong_layout", "unexpected_file_in_idcard_subject"})
# Quarantines decided from the listing alone, by the file's name or size (its bytes are not
# decoded; a too large one is not even read, its hash is ``size:<n>``): not a verdict on bytes
# that a known owner row could carry, so a moved such file is found by a recorded place of the
# same hash that is no longer listed (:func:`_moved_from_places_gone`).
LISTING_CODES = frozenset({"unsupported_extension", "too_large_bytes"})


def _limits_doc(settings: Settings) -> dict[str, Any]:
    # ``ignore`` decides what is listed, not what a limit quarantined: not part of the record
    return dict(settings.limits.model_dump(mode="json", exclude={"ignore"}))


def _recorded_limits(store: ObjectStore) -> dict[str, Any] | None:
    """The limits of the last successful refresh; None before the first one kept them."""
    import json

    try:
        return dict(json.loads(store.read_bytes(layout.INPUT_LIMITS)))
    except FileNotFoundError:
        return None


def limits_changed(store: ObjectStore, settings: Settings) -> bool:
    """Whether ``settings.limits`` differ from the last successful refresh's (False for a
    store without the record: nothing was quarantined under other limits it knows of)."""
    before = _recorded_limits(store)
    return before is not None and before != _limits_doc(settings)


def note_input_limits(store: ObjectStore, settings: Settings) -> None:
    """Record the limits a refresh completed under (written when they differ or are missing)."""
    import json

    doc = _limits_doc(settings)
    if _recorded_limits(store) != doc:
        store.write_bytes(layout.INPUT_LIMITS, json.dumps(doc, sort_keys=True).encode())


def _quarantined_only(
    images: pa.Table, codes: frozenset[str], moved: bool = False
) -> set[tuple[str, str]]:
    """(uri, sha256) pairs of ``images`` (the images table with ``status`` and
    ``reason_code``) whose only rows are quarantines with a reason in ``codes``: by a limit
    (:data:`LIMIT_CODES`) or for the file's place in a source (:data:`PLACE_CODES`). With
    ``moved``, a quarantined ``moved`` row of bytes that a row quarantined for one of ``codes``
    holds is such a row too: a file quarantined by a limit, then moved, is recorded ``moved``
    with that verdict at its new path (the limit's verdict on its bytes), and must be looked at
    again under new limits like the file it was. One vectorised test when there are none (the
    usual case)."""
    import pyarrow.compute as pc

    quarantined = pc.equal(images.column("status"), str(IMG_QUARANTINED))
    code = images.column("reason_code")
    hit = pc.fill_null(pc.and_(quarantined, pc.is_in(code, pa.array(sorted(codes)))), False)
    if moved and pc.any(hit).as_py():
        judged = images.filter(hit).column("image_sha256").combine_chunks().unique()
        hit = pc.or_(
            hit,
            pc.fill_null(
                pc.and_(
                    pc.and_(quarantined, pc.equal(code, InputCode.MOVED.value)),
                    pc.is_in(images.column("image_sha256"), value_set=judged),
                ),
                False,
            ),
        )
    if not pc.any(hit).as_py():
        return set()

    def keys(t: pa.Table) -> set[tuple[str, str]]:
        return set(
            zip(
                t.column("image_uri").to_pylist(), t.column("image_sha256").to_pylist(), strict=True
            )
        )

    only = keys(images.filter(hit))
    other = images.filter(pc.invert(hit))
    other = other.filter(pc.is_in(other.column("image_uri"), pa.array(sorted(u for u, _ in only))))
    return only - keys(other)


# The images table's columns discovery reads, once: the seen set, the quarantines it may
# take again, and the rows whose faces known content reuses (_decoded_rows).
_DECODED = (IMG_OK, IMG_NO_FACE)
_IMAGE_COLUMNS = [
    "image_uri",
    "image_sha256",
    "status",
    "reason_code",
    "width",
    "height",
    "n_faces",
    "phash",
    "source_kind",
    "source_group",
    "moved_from",
    "run_id",
]


def _decoded_rows(
    images: pa.Table, digests: Collection[str], verdicts: Collection[str] = ()
) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """``(owners, locations)`` for the contents ``digests`` (sha256): sha256 -> the first row of
    the images table ``images`` whose content a model decoded (status ok / no_face; a copy's or
    a move's row carries the original's status, size and face count, so any of them will do),
    and sha256 -> every URI recorded with it. Contents never decoded but quarantined with a
    reason in ``verdicts`` (the decoder's verdict on the bytes, :data:`VERDICT_CODES`) have
    such a quarantined row as owner and its URIs as locations. Only those rows become Python
    objects (a refresh that found nothing new makes none)."""
    owners: dict[str, dict] = {}
    locations: dict[str, set[str]] = {}
    if not digests or not images.num_rows:
        return owners, locations
    wanted = pa.array(sorted(digests), pa.string())
    rows = images.filter(pc.is_in(images.column("image_sha256"), value_set=wanted))
    judged: dict[str, dict] = {}
    every: dict[str, set[str]] = {}  # (for bytes never decoded: their rows are all quarantines)
    for r in rows.to_pylist():
        sha = r["image_sha256"]
        every.setdefault(sha, set()).add(r["image_uri"])
        if r["status"] in (IMG_OK, IMG_NO_FACE):
            owners.setdefault(sha, r)
            locations.setdefault(sha, set()).add(r["image_uri"])
        elif r["status"] == IMG_QUARANTINED and r["reason_code"] in verdicts:
            judged.setdefault(sha, r)
    for sha, r in judged.items():
        if sha not in owners:
            owners[sha], locations[sha] = r, every[sha]
    return owners, locations


def _row(
    uri: str, digest: str, size: int, kind: str, group: str, role: str, run_id: str
) -> dict[str, Any]:
    """The columns every images row discovery writes has, whatever its verdict."""
    return {
        "image_uri": uri,
        "image_sha256": digest,
        "size_bytes": int(size),
        "source_kind": kind,
        "source_group": group,
        "role": role,
        "run_id": run_id,
    }


def _known(
    row: dict[str, Any], owner: dict[str, Any], why: Reason, moved_from: str | None = None
) -> dict[str, Any]:
    """``row`` (:func:`_row`) as known content: the verdict, size, face count and pHash of its
    bytes' recorded row ``owner``, for reason ``why``."""
    return {
        **row,
        "status": owner["status"],
        "reason": why.text,
        "reason_code": why.code,
        "width": owner["width"],
        "height": owner["height"],
        "n_faces": owner["n_faces"],
        "phash": owner.get("phash"),
        "moved_from": moved_from,
    }


def _quarantined(row: dict[str, Any], why: Reason) -> dict[str, Any]:
    """``row`` (:func:`_row`) as a quarantine with its reason."""
    return {
        **row,
        "status": IMG_QUARANTINED,
        "reason": why.text,
        "reason_code": why.code,
        "width": None,
        "height": None,
        "n_faces": 0,
    }


def _decoded_since(images: pa.Table, keys: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (uri, sha256) ``keys`` whose bytes have a decoded row (status ok / no_face) recorded
    by a later run than the path's latest row."""
    if not keys:
        return set()
    rows = images.filter(
        pc.or_(
            pc.is_in(
                images.column("image_sha256"), value_set=pa.array(sorted({d for _, d in keys}))
            ),
            pc.is_in(images.column("image_uri"), value_set=pa.array(sorted({u for u, _ in keys}))),
        )
    )
    last_run: dict[str, str] = {}
    decoded_run: dict[str, str] = {}
    for u, d, st, run in zip(
        rows.column("image_uri").to_pylist(),
        rows.column("image_sha256").to_pylist(),
        rows.column("status").to_pylist(),
        rows.column("run_id").to_pylist(),
        strict=True,
    ):
        last_run[u] = max(last_run.get(u, ""), run or "")
        if st in _DECODED:
            decoded_run[d] = max(decoded_run.get(d, ""), run or "")
    return {(u, d) for u, d in keys if decoded_run.get(d, "") > last_run.get(u, "")}


def _forgotten_taken_in(
    images: pa.Table,
    tomb: TombstoneCheck,
    store: ObjectStore,
    listed: Collection[str],
    kept_out: Collection[str],
    run_id: str,
) -> list[dict[str, Any]]:
    """A :data:`TAKEN_IN` row for each placeholder row of the images table ``images`` that is
    still counted (its latest row is ``forgotten``) and stands for a path of ``listed`` that
    this run does not keep out (not in ``kept_out``): new bytes written at a forgotten photo's
    path, a subject folder whose tombstone was lifted. The placeholder is keyed
    (``forgotten:<digest of the uri>``) and the path's own row holds the raw uri, so the two
    never met as one path: the path counted twice, for good. The row is written at the
    placeholder, never naming the path, so the table still holds no raw uri or hash of a
    forgotten file; the count skips it (:func:`tasks.summary.current_images`). Costs one keyed
    digest per listed path, and only while some placeholder row is counted."""
    if not images.num_rows or not listed:
        return []
    rows = images.filter(
        pc.fill_null(pc.starts_with(images.column("image_uri"), FORGOTTEN_PREFIX), False)
    )
    if not rows.num_rows:
        return []
    latest = {
        r["image_uri"]: r
        for r in rows.select(
            ["image_uri", "image_sha256", "reason_code", "source_kind"]
        ).to_pylist()
    }  # the table is in run order
    standing = {u: r for u, r in latest.items() if r["reason_code"] == FORGOTTEN.code}
    if not standing:
        return []
    namer = tomb
    if not namer:  # no tombstone stands any more (the last one lifted): the key still does
        namer = copy.copy(tomb)
        namer.keyed = Keyed.of(store, create=False)
        if namer.keyed is None:
            return []
    out = []
    for uri in sorted(listed):
        if uri in kept_out:
            continue
        was = standing.pop(namer.placeholder("uri", uri), None)
        if was is None:
            continue
        out.append(
            {
                "image_uri": was["image_uri"],
                "image_sha256": was["image_sha256"],
                "size_bytes": None,
                "source_kind": was["source_kind"],
                "source_group": "",
                "role": "",
                "run_id": run_id,
                "status": IMG_QUARANTINED,
                "reason": TAKEN_IN.text,
                "reason_code": TAKEN_IN.code,
                "width": None,
                "height": None,
                "n_faces": 0,
            }
        )
        if not standing:
            break
    return out


class _PlacesLeft:
    """Which recorded places of known bytes a listing no longer shows and were still theirs
    when last recorded: the place's latest row holds them (a place that held other bytes since
    is not where the photo was), no later move out of a set of copies (``moved_from``) took
    them from it, and no later move of the bytes that left none of their places listed (a
    renamed album: a copy made since is a copy, not a move out of the album's old name). Built
    on first use, for every unlisted place of ``locations`` at once (a filter over the images
    table per new path cost ~10 ms each at 10^6 rows)."""

    def __init__(
        self, images: pa.Table, locations: dict[str, set[str]], listed: Collection[str]
    ) -> None:
        self._images, self._locations, self._listed = images, locations, listed
        self._latest: dict[str, tuple[int, str]] | None = None
        self._left: dict[tuple[str, str], int] = {}
        self._moved: dict[str, int] = {}  # bytes -> their latest move that left no place listed
        self.taken: set[str] = set()  # places a move of this run took a photo from

    def _build(self) -> dict[str, tuple[int, str]]:
        gone = sorted({u for us in self._locations.values() for u in us} - set(self._listed))
        self._latest = {}
        if not gone:
            return self._latest
        at = pa.array(gone, pa.string())
        t = self._images.append_column(
            "_i", pa.array(np.arange(self._images.num_rows, dtype=np.int64))
        )
        rows = t.filter(pc.is_in(t.column("image_uri"), value_set=at))
        # place -> (its latest row, the bytes that row holds): the table is in run order
        for u, d, i in zip(
            rows.column("image_uri").to_pylist(),
            rows.column("image_sha256").to_pylist(),
            rows.column("_i").to_pylist(),
            strict=True,
        ):
            self._latest[u] = (i, d)
        outs = t.filter(pc.fill_null(pc.is_in(t.column("moved_from"), value_set=at), False))
        for u, d, i in zip(
            outs.column("moved_from").to_pylist(),
            outs.column("image_sha256").to_pylist(),
            outs.column("_i").to_pylist(),
            strict=True,
        ):
            self._left[(u, d)] = i
        shas = pa.array(sorted(self._locations), pa.string())
        whole = t.filter(
            pc.fill_null(
                pc.and_(
                    pc.and_(
                        pc.equal(t.column("reason_code"), InputCode.MOVED.value),
                        pc.is_null(t.column("moved_from")),
                    ),
                    pc.is_in(t.column("image_sha256"), value_set=shas),
                ),
                False,
            )
        )
        for d, i in zip(
            whole.column("image_sha256").to_pylist(), whole.column("_i").to_pylist(), strict=True
        ):
            self._moved[d] = i
        return self._latest

    def first(self, sha: str, uri: str) -> str | None:
        """The first such place of ``sha`` other than ``uri`` that no move of this run took."""
        places = sorted(
            u
            for u in self._locations.get(sha, ())
            if u != uri and u not in self._listed and u not in self.taken
        )
        if not places:
            return None
        latest = self._latest if self._latest is not None else self._build()
        for u in places:
            row = latest.get(u)
            if (
                row is not None
                and row[1] == sha
                and self._left.get((u, sha), -1) < row[0]
                and self._moved.get(sha, -1) <= row[0]  # the move's own place holds them
            ):
                return u
        return None


def _moved_from_places_gone(
    images: pa.Table, rows: list[dict[str, Any]], listed: Collection[str], taken: set[str]
) -> None:
    """Make each of this run's new rows ``rows``, quarantined from the listing alone
    (:data:`LISTING_CODES`: a ``.MOV``, a file too large to read), a move out of a recorded
    place of its hash that is no longer listed, if there is one: ``reason_code`` ``moved``
    with that place in ``moved_from``, the verdict in its reason (status quarantined still).

    Such a file is never matched with an owner row (it has no decoded bytes to reuse), so a
    renamed album folder holding a video recorded it anew while the place it left kept its
    quarantined row: the store counted it twice. A place qualifies when its latest row holds
    the same hash, is quarantined, and no later move left it already; each place is taken by
    one row (two too large files of one size moved: two places). ``moved_from`` makes
    :func:`tasks.summary.current_images` drop that one place, never other rows of the hash
    (a ``size:<n>`` hash is shared by every too large file of that size). ``taken``: places
    this run's other moves took; those taken here are added."""
    digests = sorted({r["image_sha256"] for r in rows})
    if not images.num_rows or not digests:
        return
    t = images.select(
        ["image_uri", "image_sha256", "status", "reason_code", "moved_from"]
    ).append_column("_i", pa.array(np.arange(images.num_rows, dtype=np.int64)))
    held = t.filter(pc.is_in(t.column("image_sha256"), value_set=pa.array(digests, pa.string())))
    gone = sorted(
        {u for u in held.column("image_uri").to_pylist() if u not in listed and u not in taken}
    )
    if not gone:
        return
    at = pa.array(gone, pa.string())
    latest: dict[str, tuple[int, str, str]] = {}  # place -> (latest row, its hash, its status)
    rows_at = t.filter(pc.is_in(t.column("image_uri"), value_set=at))
    for u, d, st, i in zip(
        *(rows_at.column(c).to_pylist() for c in ("image_uri", "image_sha256", "status", "_i")),
        strict=True,
    ):
        latest[u] = (i, d, st)  # the table is in run order
    left: dict[tuple[str, str], int] = {}  # (place, hash) -> the latest move out of it
    outs = t.filter(pc.fill_null(pc.is_in(t.column("moved_from"), value_set=at), False))
    for u, d, i in zip(
        *(outs.column(c).to_pylist() for c in ("moved_from", "image_sha256", "_i")), strict=True
    ):
        left[(u, d)] = i
    whole: dict[str, int] = {}  # hash -> its latest move that left no place of it listed
    moves = held.filter(
        pc.fill_null(
            pc.and_(
                pc.equal(held.column("reason_code"), InputCode.MOVED.value),
                pc.is_null(held.column("moved_from")),
            ),
            False,
        )
    )
    for d, i in zip(*(moves.column(c).to_pylist() for c in ("image_sha256", "_i")), strict=True):
        whole[d] = i
    free: dict[str, list[str]] = {}
    for u in gone:
        i, d, st = latest[u]
        if st == IMG_QUARANTINED and left.get((u, d), -1) < i and whole.get(d, -1) <= i:
            free.setdefault(d, []).append(u)
    for row in sorted(rows, key=lambda r: r["image_uri"]):
        places = free.get(row["image_sha256"])
        if not places:
            continue
        place = places.pop(0)
        taken.add(place)
        same = "size" if row["image_sha256"].startswith("size:") else "bytes"
        why = Reason(
            InputCode.MOVED,
            f"same {same} as {place}, which is no longer listed; quarantined: {row['reason']}",
        )
        row.update(reason=why.text, reason_code=why.code, moved_from=place)


class _Returned:
    """Which recorded (path, bytes) pairs a listing finds again after their record moved on
    (module doc): ``returned(uri, sha256)``. Built from the images table's rows, oldest first
    (its files are read in run-id order, and run ids sort by time)."""

    def __init__(self, images: pa.Table, several: bool = True) -> None:
        """``several``: some path has more than one row (False skips looking for them)."""
        self._last: dict[str, tuple[int, str]] = {}
        self._moved: dict[str, tuple[int, str]] = {}
        self._left: dict[tuple[str, str], int] = {}  # (path, bytes) -> the latest move out
        if not images.num_rows:
            return
        # A move out of a set of copies (``moved_from``) takes one path's place, not the bytes'.
        code = pc.equal(images.column("reason_code"), InputCode.MOVED.value)
        moved = pc.fill_null(pc.and_(code, pc.is_null(images.column("moved_from"))), False)
        out = pc.fill_null(pc.and_(code, pc.is_valid(images.column("moved_from"))), False)
        outs = images.select(["moved_from", "image_sha256"]).append_column(
            "_i", pa.array(np.arange(images.num_rows, dtype=np.int64))
        )
        outs = outs.filter(out)
        for u, d, i in zip(*(outs.column(c).to_pylist() for c in outs.column_names), strict=True):
            self._left[(u, d)] = i  # the table is in run order
        if not (several or self._left or pc.any(moved).as_py()):
            return
        # Only paths with more than one row, the paths of moved bytes and the paths a move out
        # of one place left can be returned to: they alone become Python objects (a store's
        # other rows are one row per path).
        t = (
            images.select(["image_uri", "image_sha256", "reason_code"])
            .append_column("_i", pa.array(np.arange(images.num_rows, dtype=np.int64)))
            .append_column("_moved", moved)
        )
        wanted = pc.or_(
            pc.is_in(
                t.column("image_sha256"),
                value_set=t.filter(moved).column("image_sha256").combine_chunks(),
            ),
            pc.is_in(
                t.column("image_uri"),
                value_set=pa.array(sorted({u for u, _ in self._left}), pa.string()),
            ),
        )
        if several:
            rows = t.group_by("image_uri").aggregate([("_i", "count")])
            paths = rows.filter(pc.greater(rows.column("_i_count"), 1)).column("image_uri")
            wanted = pc.or_(
                wanted, pc.is_in(t.column("image_uri"), value_set=paths.combine_chunks())
            )
        t = t.filter(wanted)
        uris, shas, flags, index = (
            t.column(c).to_pylist() for c in ("image_uri", "image_sha256", "_moved", "_i")
        )
        # path -> (its latest row, the bytes that row holds)
        self._last = {u: (i, d) for i, u, d in sorted(zip(index, uris, shas, strict=True))}
        # bytes -> (their latest "moved" row, the path it took them to)
        for i, u, d, m in sorted(zip(index, uris, shas, flags, strict=True)):
            if m:
                self._moved[d] = (i, u)

    def __call__(self, uri: str, sha: str) -> bool:
        last = self._last.get(uri)
        if last is None:
            return False
        if last[1] != sha or self._left.get((uri, sha), -1) > last[0]:
            return True
        m = self._moved.get(sha)
        return m is not None and m[1] != uri and m[0] > last[0]

    def held_other(self, uri: str, sha: str) -> bool:
        """``uri``'s latest row holds other bytes than ``sha``."""
        return self._last[uri][1] != sha

    def moved_to(self, sha: str) -> str | None:
        m = self._moved.get(sha)
        return m[1] if m else None


def _renamed_albums(
    pending: list[dict], album_contents: dict[str, set[str]], images: pa.Table
) -> dict[str, str]:
    """Album folder -> the album its new photos are clustered in, for folders that continue an
    album under a new name.

    The faces of a moved photo keep the ``source_group`` where their bytes were first decoded
    (module doc). When an album folder is renamed (``2024/Trip`` -> ``2024/Trip to Rome``),
    every photo in it is ``moved`` and keeps album ``Trip``'s faces; photos added to the folder
    later would form an album of their own, ``Trip to Rome``, and be clustered apart from the
    album's earlier photos of the same people (only the cross-album merge could join them).
    A folder with new photos continues album H when every other content listed in it was first
    decoded in album H, none in the folder itself, and no listed folder is called H any more (a
    rename, not a split: while H is listed, the folder is an album of its own). A merge of two
    albums' photos into one folder has two such albums and stays itself. The new photos' rows
    (and so their faces) then carry H; in later runs the folder's contents still all point at
    H, so it keeps continuing it. Only the contents of folders with new photos are looked up.
    """
    folders = {r["source_group"] for r in pending if r["source_kind"] == "album"}
    if not folders or not images.num_rows:
        return {}
    new = {r["image_sha256"] for r in pending}
    wanted = {d for g in folders for d in album_contents.get(g, ()) if d not in new}
    if not wanted:
        return {}
    rows = images.filter(
        pc.is_in(images.column("image_sha256"), value_set=pa.array(sorted(wanted), pa.string()))
    )
    decoded_in: dict[str, set[tuple[str, str]]] = {}  # content -> (kind, album) it was decoded in
    copied = {InputCode.MOVED.value, InputCode.DUPLICATE_CONTENT.value}
    for sha, status, code, kind, group in zip(
        *(
            rows.column(c).to_pylist()
            for c in ("image_sha256", "status", "reason_code", "source_kind", "source_group")
        ),
        strict=True,
    ):
        if status in (IMG_OK, IMG_NO_FACE) and code not in copied:
            decoded_in.setdefault(sha, set()).add((kind, group))
    renamed: dict[str, str] = {}
    for folder in folders:
        homes = set().union(*(decoded_in.get(d, set()) for d in album_contents.get(folder, ())))
        if len(homes) != 1:
            continue
        ((kind, home),) = homes
        if kind == "album" and home and home != folder and home not in album_contents:
            renamed[folder] = home
    return renamed


# The key of a discovery row that records an earlier state of a path this run also records
# (see _edited_in_renamed): the label stage writes such rows before the run's others.
EARLIER = "earlier_state"


def _edited_in_renamed(
    pending: list[dict],
    renamed: dict[str, str],
    images: pa.Table,
    listed: Collection[str],
    listed_now: Collection[str],
    run_id: str,
) -> list[dict]:
    """``moved`` rows for the photos of renamed album folders (``renamed``: folder -> album)
    that one run sees renamed and edited: a new file ``<folder>/<name>`` whose place in the
    album's old folder, ``<album>/<name>``, is no longer listed and held bytes that no listed
    file holds now. Two runs would have recorded the rename (the photo ``moved``) and then the
    edit (new bytes at the same path); one run recorded only the new bytes, so the old place
    kept counting as a photo deleted from its source and ``faceloop forget --image`` of the
    new path left the original behind. Each row is that move, written before the edit's row
    (:data:`EARLIER`): the path's history is what two runs would have made it."""
    olds: dict[str, dict] = {}
    for row in pending:
        home = renamed.get(row["source_group"]) if row["source_kind"] == "album" else None
        if home is None:
            continue
        uri = row["image_uri"]
        folder = posixpath.dirname(uri)
        old = f"{posixpath.dirname(folder)}/{home}/{posixpath.basename(uri)}"
        if posixpath.basename(folder) == row["source_group"] and old not in listed:
            olds[old] = row
    if not olds:
        return []
    t = images.filter(pc.is_in(images.column("image_uri"), value_set=pa.array(sorted(olds))))
    latest = {r["image_uri"]: r for r in t.to_pylist()}  # the table is in run order
    out = []
    for old, row in sorted(olds.items()):
        was = latest.get(old)
        if was is None or was["status"] not in _DECODED or was["image_sha256"] in listed_now:
            continue
        why = Reason(
            InputCode.MOVED,
            f"same bytes as {old}, which is no longer listed (then edited: the path's next row)",
        )
        at = _row(
            row["image_uri"],
            was["image_sha256"],
            0,
            row["source_kind"],
            row["source_group"],
            row["role"],
            run_id,
        )
        out.append(_known(at, was, why) | {"size_bytes": None, EARLIER: True})
    return out


def _under(uri: str, root: str) -> bool:
    """Whether ``uri`` is the source ``root`` (a source naming one file) or a path below it."""
    return uri == root or uri.startswith(f"{root}/")


def _held_from_empty(
    store: ObjectStore, roots: list[str], rows: list[dict[str, Any]]
) -> dict[str, int]:
    """The current images (tasks.summary.current_images) the store holds under each of the
    source ``roots`` that listed no file, but for contents this run's ``rows`` moved elsewhere
    (every photo of a source moved to another one); only the roots that hold any. Each is
    warned about: such a source is most likely not mounted. Its images are left as they are, as
    a deleted file's are (its faces stay in the store and its datasets)."""
    from tasks.summary import current_images

    t = current_images(store, ["image_uri", "image_sha256"])
    moved = [r["image_sha256"] for r in rows if r["reason_code"] == InputCode.MOVED]
    if moved:
        t = t.filter(pc.invert(pc.is_in(t.column("image_sha256"), value_set=pa.array(moved))))
    uris = t.column("image_uri")
    held: dict[str, int] = {}
    for root in roots:
        under = pc.or_(pc.equal(uris, root), pc.starts_with(uris, f"{root}/"))
        if n := int(pc.sum(pc.fill_null(under, False)).as_py() or 0):
            held[root] = n
            log.warning(
                "source %s listed no files, the store holds %d images from it: is it mounted? "
                "Its images stay as they were (in the store and its datasets); a source emptied "
                "on purpose can be taken out of the sources",
                root,
                n,
            )
    return held


def check_local_sources(settings: Settings) -> None:
    """SourceError for a local source whose root is missing or unreadable (S3 prefixes are
    listed by :func:`discover`: one without objects is empty, not missing)."""
    import stat

    from storage.objectstore import local_source_stat

    for source in settings.sources:
        if source.uri.startswith("s3://"):
            continue
        if not stat.S_ISDIR(local_source_stat(source.uri).st_mode):
            held = "album folders" if source.kind == "album" else "subject folders"
            raise SourceError(
                f"source {source.uri} is not a folder: an {source.kind} source is a folder of "
                f"{held}; give the folder that holds them"
            )


def discover(
    settings: Settings,
    store: ObjectStore,
    run_id: str,
    on_hashing: Callable[[int], None] | None = None,
    *,
    rehash: bool = False,
) -> DiscoverResult:
    """List every source, hash what is new or changed and write the work list of new images.

    Writes ``staging/<run_id>/pending.parquet`` (PENDING_SCHEMA) when there is anything new.
    Layout errors and unreadable entries are returned as images-table rows (status
    quarantined), known content under a new URI as ``moved`` / ``duplicate_content`` rows (no
    model work), all in ``quarantined_rows``; the label stage appends them with the run's other
    image rows. Raises :class:`faceloop.errors.SourceError` when a source is missing or cannot
    be listed. ``on_hashing``, when given, is called with the number of new or changed files
    once the listing has found any, before they are hashed (the refresh starts loading the
    models then). ``rehash``: no stamp vouches for a file: every listed file is read and hashed
    (a file rewritten in place with its size and mtime restored is found changed).
    """
    check_run_id(run_id)
    if run_committed(store, run_id):
        # A run that committed: its images file would be replaced by this run's, and its rows
        # lost (a re-run notebook cell). The refresh flow gives such a run a new id itself.
        raise ConfigError(
            f"run id {run_id!r} names a run that already recorded its images: give each run "
            "its own id (faceloop.runids.new_run_id())"
        )
    use_store_modes(settings)
    seen_tbl = read_images(store, columns=_IMAGE_COLUMNS)
    seen = set(
        zip(
            seen_tbl.column("image_uri").to_pylist(),
            seen_tbl.column("image_sha256").to_pylist(),
            strict=False,
        )
    )
    seen_uris = {u for u, _ in seen}
    returned = _Returned(seen_tbl, several=len(seen_uris) < seen_tbl.num_rows)
    misplaced = _quarantined_only(seen_tbl, PLACE_CODES)
    result = DiscoverResult(run_id=run_id, limits_changed=limits_changed(store, settings))
    retry = _quarantined_only(seen_tbl, LIMIT_CODES, moved=True) if result.limits_changed else set()
    tomb = TombstoneCheck(store)
    pending: list[dict] = []
    queued: set[tuple[str, str]] = set()

    if not settings.sources:
        log.warning(
            "no sources are configured (sources: in the config, FACELOOP_SOURCES, or --source "
            "KIND=URI): nothing to discover"
        )
    # 1. List (stat / LIST only, no bytes), 2. hash what the stamps cannot vouch for.
    listing: list[tuple[SourceSpec, str, SourceEntry]] = []
    empty_roots: list[str] = []
    for source in settings.sources:
        root = source.uri.rstrip("/")
        before = len(listing)
        for e in list_source(root):
            if ignored(_relative(root, e.uri), settings.limits.ignore):
                result.ignored += 1
            else:
                listing.append((source, root, e))
        if len(listing) == before:
            empty_roots.append(root)
    listed_uris = {e.uri for _, _, e in listing}
    old_stamps = read_stamps(store)
    known: dict[str, tuple[str, Reason | None]] = {}
    to_hash: list[SourceEntry] = []
    # Forgotten files the cache remembers under keyed names (a forgotten file's raw path and
    # hash are never kept): uri -> (placeholder sha256, image tombstone or "").
    kept_out: dict[str, tuple[str, str]] = {}
    for source, root, e in listing:
        if e.problem is not None or e.size > settings.limits.max_image_bytes:
            continue
        cached = None if rehash else old_stamps.get(e.uri)
        if (
            e.stamp
            and cached is not None
            and cached[0] == e.stamp
            # Not a stamp whose bytes the face stage found changed and that never got decoded:
            # the file changed under the same size and mtime (a swap that kept them).
            and not ((e.uri, _CHANGED) in seen and (e.uri, cached[1]) not in seen)
        ):
            known[e.uri] = (cached[1], None)
            continue
        memo = (
            old_stamps.get(tomb.placeholder("stamp", e.uri))
            if tomb and e.stamp and not rehash
            else None
        )
        if memo is not None and memo[0] == e.stamp:
            placeholder, _, image = memo[1].partition("|")
            group = classify(source, _relative(root, e.uri), settings.limits.extensions)[0]
            if (image and image in tomb.t.images) or (
                not image and source.kind == "idcard" and group and tomb.subject(group)
            ):
                kept_out[e.uri] = (placeholder, image)
                known[e.uri] = (placeholder, None)
                continue
        to_hash.append(e)
    if on_hashing is not None:
        # New paths, and known paths whose stamp changed; not a known path hashed again only
        # because its stamp was too fresh to remember (most likely unchanged).
        # Under rehash, a path whose stamp is unchanged is most likely unchanged too.
        fresh = sum(
            e.uri not in seen_uris
            or ((c := old_stamps.get(e.uri)) is not None and not (rehash and c[0] == e.stamp))
            for e in to_hash
        )
        if fresh:
            on_hashing(fresh)
    known |= hash_entries(to_hash, settings)
    result.hashed = len(to_hash)
    # The rows of the contents this run may take (not seen where listed, or a quarantine it
    # looks at again): a known one's faces are reused.
    back = {(uri, d) for uri, (d, _) in known.items() if (uri, d) in seen and returned(uri, d)}
    owners, locations = _decoded_rows(
        seen_tbl,
        {
            d
            for uri, (d, _) in known.items()
            if (uri, d) not in seen or (uri, d) in retry or (uri, d) in misplaced
        }
        | {d for _, d in back},
        VERDICT_CODES if result.limits_changed else VERDICT_CODES | {"decompression_bomb"},
    )
    now = time.time()
    forgotten_uris: set[str] = set()  # never remembered: the cache holds raw URIs and hashes

    moved_to: dict[str, str] = {}  # sha256 -> the URI this run moved it to
    # Files still quarantined for their place, seen again where they were: (row, reason)
    stray: list[tuple[dict[str, Any], Reason]] = []
    places_left = _PlacesLeft(seen_tbl, locations, listed_uris)
    album_contents: dict[str, set[str]] = {}  # album folder -> the contents listed in it
    listing_quarantined: list[dict[str, Any]] = []  # new rows quarantined by LISTING_CODES
    for source, root, entry in listing:
        uri, size = entry.uri, entry.size
        result.listed += 1
        rel = _relative(root, uri)
        group, role, bad = classify(source, rel, settings.limits.extensions)
        placed = bad is None
        read_failed = False  # this run read the file and could not (module doc)
        if entry.problem is not None:
            # Never opened: what it is (or where it points) is reason enough.
            digest, bad = unread_hash(entry.problem.code), entry.problem
        elif size > settings.limits.max_image_bytes:
            # Don't even read it: the hash would cost as much as the file is big.
            digest = f"size:{size}"
            bad = bad or Reason(
                "too_large_bytes",
                f"{size} bytes > {settings.limits.max_image_bytes} (limits.max_image_bytes)",
            )
        else:
            digest, unread = known[uri]
            bad = unread or bad
            read_failed = unread is not None and unread.code == InputCode.UNREADABLE
            if source.kind == "album" and placed and unread is None and uri not in kept_out:
                album_contents.setdefault(group, set()).add(digest)
        by_subject = bool(tomb and source.kind == "idcard" and group and tomb.subject(group))
        if uri in kept_out or (tomb and (by_subject or tomb.image(digest))):
            result.forgotten += 1
            forgotten_uris.add(uri)
            if uri in kept_out:
                sha_key = kept_out[uri][0]
            else:
                sha_key = tomb.placeholder("sha256", digest)
                image = "" if by_subject else tomb.image_mark(digest)
                kept_out[uri] = (sha_key, image)
            key = (tomb.placeholder("uri", uri), sha_key)
            if key in seen or key in queued:
                result.seen += 1
                continue
            queued.add(key)
            result.quarantine(
                {
                    "image_uri": key[0],
                    "image_sha256": key[1],
                    "size_bytes": None,
                    "source_kind": source.kind,
                    "source_group": "",
                    "role": "",
                    "run_id": run_id,
                    "status": IMG_QUARANTINED,
                    "reason": FORGOTTEN.text,
                    "reason_code": FORGOTTEN.code,
                    "width": None,
                    "height": None,
                    "n_faces": 0,
                }
            )
            continue
        key = (uri, digest)
        if key in retry and not (bad is not None and bad.code == "unsupported_extension"):
            # Quarantined by a limit that changed since (module doc): look at it again.
            result.retried += 1
        elif key in misplaced and placed and key not in queued:
            # Quarantined where it was listed before (Year/Event/photo under one source); this
            # source lists it where the layout expects it.
            result.in_place_again += 1
        elif key in queued or (
            key in seen
            and not (key in back and digest in owners and not bad)
            # Quarantined from the listing alone where a move had left (module doc): moved back.
            and not (bad is not None and bad.code in LISTING_CODES and returned(uri, digest))
            and not read_failed
        ):
            result.seen += 1
            if key in misplaced and bad is not None and key not in queued:
                stray.append((_row(uri, digest, size, source.kind, group, role, run_id), bad))
            continue
        queued.add(key)
        row = _row(uri, digest, size, source.kind, group, role, run_id)
        owner = owners.get(digest) if not bad else None
        if owner is not None:
            # Still there: a recorded place of these bytes that is listed and holds them now (two
            # files swapped by name hold each other's old bytes: both moved, neither a copy).
            still = sorted(
                u
                for u in locations.get(digest, ())
                if u != uri and u in listed_uris and known.get(u, ("",))[0] == digest
            )
            if digest in moved_to:
                still.insert(0, moved_to[digest])
            moved_from = None
            if still and source.kind == "album" and digest not in moved_to:
                # A copy stays listed, but a place of these bytes is gone: the photo left that
                # place for this one (a copy moved or renamed), so the place stops counting.
                # (ID-card copies stay claims: a photo under two subjects is decided as such. A
                # move of this run that found no place listed took every place already.)
                moved_from = places_left.first(digest, uri)
            if owner["status"] == IMG_QUARANTINED and still and moved_from is None:
                # A copy of an unusable file whose places are all still listed: judged as a file
                # of its own, as before (below: its own quarantine row, the decoder's reason).
                owner = None
        if owner is not None:
            # Known content: its faces are reused, nothing reaches the models (module doc).
            if moved_from is not None:
                places_left.taken.add(moved_from)
                why = Reason(
                    InputCode.MOVED, f"same bytes as {moved_from}, which is no longer listed"
                )
            elif still:
                why = Reason(InputCode.DUPLICATE_CONTENT, f"same bytes as {still[0]}")
            elif key in back and returned.held_other(uri, digest):
                why = Reason(InputCode.RESTORED, "bytes this path held before it held others")
            else:
                was = sorted(
                    u for u in locations.get(digest, {owner["image_uri"]}) if u != uri
                ) or [owner["image_uri"]]
                if key in back:  # moved back from the path it was last moved to
                    was = [returned.moved_to(digest) or was[0]]
                was = was[0]
                # "no longer listed" read wrong after a swap of two names: the old path is
                # listed, holding the other photo.
                # ("which": the old path is the one gone, not this one.)
                gone = "holds other bytes now" if was in listed_uris else "is no longer listed"
                why = Reason(InputCode.MOVED, f"same bytes as {was}, which {gone}")
                moved_to[digest] = uri
            if owner["status"] == IMG_QUARANTINED:
                # Unusable bytes moved (or back): one quarantined file, at its new place, with
                # the verdict its bytes got where they were (VERDICT_CODES).
                code = str(owner["reason_code"])
                why = Reason(why.code, f"{why.detail}; quarantined there: {code}")
                result.count_quarantined(code)
            elif why.code == InputCode.DUPLICATE_CONTENT:
                result.duplicates += 1
            elif why.code == InputCode.RESTORED:
                result.restored += 1
            else:
                result.moved += 1
            result.quarantined_rows.append(_known(row, owner, why, moved_from))
            continue
        if bad:
            result.quarantine(_quarantined(row, bad))
            if bad.code in LISTING_CODES:
                listing_quarantined.append(result.quarantined_rows[-1])
            continue
        if uri in seen_uris and key not in seen:
            # (A recorded pair looked at again, under changed limits or in its place, is not.)
            result.content_changed += 1
        pending.append(row)
    if listing_quarantined:
        _moved_from_places_gone(seen_tbl, listing_quarantined, listed_uris, places_left.taken)
    # A misplaced file still listed where it was, whose bytes are decoded elsewhere in this run
    # or were since its quarantine (a copy put in its album, the stray left in place): recorded
    # again, so that it still counts as quarantined (a decoded place of its bytes after its
    # quarantine says it was put where it belongs: tasks.summary.current_images).
    if stray:
        decoded_now = {r["image_sha256"] for r in pending} | {
            r["image_sha256"] for r in result.quarantined_rows if r["status"] in _DECODED
        }
        since = _decoded_since(seen_tbl, {(r["image_uri"], r["image_sha256"]) for r, _ in stray})
        for base, bad in stray:
            if base["image_sha256"] in decoded_now or (
                (base["image_uri"], base["image_sha256"]) in since
            ):
                result.seen -= 1
                result.quarantine(_quarantined(base, bad))
    # Listed paths kept out as forgotten before and taken in now: their placeholder rows stop
    # counting (else the path counted twice, for good).
    result.quarantined_rows.extend(
        _forgotten_taken_in(seen_tbl, tomb, store, listed_uris, forgotten_uris, run_id)
    )
    if empty_roots:
        result.empty_sources = _held_from_empty(store, empty_roots, result.quarantined_rows)
    new_stamps = {
        e.uri: (e.stamp, known[e.uri][0])
        for _, _, e in listing
        if e.uri in known
        and known[e.uri][1] is None
        and e.stamp
        and e.uri not in forgotten_uris
        and _settled(e.mtime, now)
    }
    # Forgotten files still listed: remembered by keyed path with their placeholder and the
    # tombstone that keeps them out, so an unchanged one is not read again (while that
    # tombstone stands: `forget --lift-subject` makes it a file like any other).
    new_stamps |= {
        tomb.placeholder("stamp", e.uri): (e.stamp, "|".join(kept_out[e.uri]))
        for _, _, e in listing
        if e.uri in kept_out and e.stamp and _settled(e.mtime, now)
    }
    if result.empty_sources:
        # An empty source's files are kept as they were, stamps too: back on its mount, its
        # files are not all read again.
        new_stamps |= {
            uri: stamp
            for uri, stamp in old_stamps.items()
            if any(_under(uri, root) for root in result.empty_sources)
        }
    if new_stamps != old_stamps:
        _write_stamps(store, new_stamps)
    pending = _hold_back_copies(pending, result)
    renamed = _renamed_albums(pending, album_contents, seen_tbl)
    if renamed:
        listed_now = {d for uri in listed_uris if (d := known.get(uri, ("",))[0])}
        result.quarantined_rows[:0] = _edited_in_renamed(
            pending, renamed, seen_tbl, listed_uris, listed_now, run_id
        )
        for row in pending:
            if row["source_kind"] == "album" and row["source_group"] in renamed:
                row["source_group"] = renamed[row["source_group"]]
                result.renamed_album_photos += 1
    result.new = len(pending)
    if pending:
        result.pending_rel = layout.staging_pending(run_id)
        store.write_parquet(
            result.pending_rel, pa.Table.from_pylist(pending, schema=PENDING_SCHEMA)
        )
    log.info(
        "discovered %d files (%d hashed): %d new, %d already seen, %d moved, %d duplicates, "
        "%d quarantined, %d forgotten; %d ignored",
        result.listed,
        result.hashed,
        result.new,
        result.seen,
        result.moved,
        result.duplicates,
        result.quarantined,
        result.forgotten,
        result.ignored,
    )
    return result
