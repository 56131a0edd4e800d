"""Discover new images in the configured sources.

An image is identified by its content (sha256) and where it lives (URI). Images whose
(uri, sha256) pair is already in the images table were processed by an earlier run and are
skipped, so a rerun over unchanged sources has nothing to do. A file whose content changed is a
new image. Files that break the source layout are recorded as quarantined right here, with the
reason, and never reach the models.

Every entry a source lists ends in exactly one images-table row and none stops the run. Entries
that are not regular files (FIFOs, sockets, devices, symlinks to folders), dangling symlinks and
symlinks that resolve outside the source root are quarantined from ``lstat``/``stat`` alone and
never opened; a file that cannot be read or that vanishes before it is hashed is quarantined with
its reason. Such rows carry ``unread:<code>`` instead of a sha256, so a rerun skips them until the
file becomes readable (then its real hash makes it a new image). A file with the same bytes as an
image an earlier run decoded under another URI is recorded as ``duplicate_content`` (the
original's status, size and pHash) without model work; copies within one run are resolved by the
label stage.

Forgotten people (``faceloop forget``, storage/privacy.py): a file whose content is tombstoned
(keyed digest of its sha256) or that lies in a tombstoned ID-card subject folder is never
processed. It is recorded once as a ``quarantined`` row with reason code ``forgotten`` whose
``image_uri`` and ``image_sha256`` are ``forgotten:<keyed digest>`` placeholders, with no group
and no size: the images table never takes the raw hash, URI or subject name back, and a rerun
finds the placeholder pair and counts the file as seen.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa

from faceloop.config import Settings, SourceSpec
from faceloop.errors import BadInputError, StorageError, TransientStorageError
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
from faceloop.vocab import InputCode, Reason, Role, row_reason_code
from storage import layout
from storage.objectstore import ObjectStore, SourceEntry, list_source, sha256_uri
from storage.privacy import TombstoneCheck
from storage.tables import read_images

log = logging.getLogger(__name__)

FORGOTTEN = Reason("forgotten", "a person asked to be forgotten (tombstone)")


@dataclass
class DiscoverResult:
    """What one discovery pass found. ``pending_rel`` is None when there is nothing new.

    ``listed == seen + new + duplicates + quarantined`` (``forgotten`` files count as
    quarantined the first time, as seen afterwards; ``forgotten`` counts them either way).
    ``quarantined_rows`` holds every images-table row discovery decided itself (the
    quarantined files and the duplicates); the label stage writes them with the run's other
    image rows.
    """

    run_id: str
    listed: int = 0
    seen: int = 0
    new: int = 0
    duplicates: int = 0
    quarantined: int = 0
    forgotten: int = 0
    pending_rel: str | None = None
    quarantined_rows: list[dict] = field(default_factory=list)


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
        expected = (
            "<album_id>/<image>"
            if source.kind == "album"
            else "<subject_id>/id.<ext> or live*.<ext>"
        )
        return group, "", Reason("wrong_layout", f"{rel!r} is not {expected}")
    if ext not in extensions:
        return (
            group,
            "",
            Reason("unsupported_extension", f"{ext or 'none'} not in {', '.join(extensions)}"),
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
    try:
        return sha256_uri(entry.uri)[0], None
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
    return f"unread:{why.code}", why


def _decoded_owners(store: ObjectStore) -> dict[str, dict]:
    """sha256 -> an images-table row whose content a model decoded (status ok / no_face, not
    itself a copy): the original a byte-identical copy is a duplicate of."""
    cols = ["image_uri", "image_sha256", "status", "reason", "reason_code"]
    owners: dict[str, dict] = {}
    for r in read_images(store, columns=[*cols, "width", "height", "n_faces", "phash"]).to_pylist():
        if r["status"] not in (IMG_OK, IMG_NO_FACE):
            continue
        if row_reason_code(r) == InputCode.DUPLICATE_CONTENT:
            continue
        owners.setdefault(r["image_sha256"], r)
    return owners


def discover(settings: Settings, store: ObjectStore, run_id: str) -> DiscoverResult:
    """List every source, hash what is there and write the work list of new images.

    Writes ``staging/<run_id>/pending.parquet`` (PENDING_SCHEMA) when there is anything new.
    Layout errors and unreadable entries are returned as images-table rows (status
    quarantined), copies of decoded content as ``duplicate_content`` rows, both in
    ``quarantined_rows``; the label stage appends them with the run's other image rows. Raises
    :class:`faceloop.errors.SourceError` when a source is missing or cannot be listed.
    """
    seen_tbl = read_images(store, columns=["image_uri", "image_sha256"])
    seen = set(
        zip(
            seen_tbl.column("image_uri").to_pylist(),
            seen_tbl.column("image_sha256").to_pylist(),
            strict=False,
        )
    )
    seen_uris = {u for u, _ in seen}
    owners = _decoded_owners(store)
    tomb = TombstoneCheck(store)
    result = DiscoverResult(run_id=run_id)
    pending: list[dict] = []
    queued: set[tuple[str, str]] = set()
    for source in settings.sources:
        root = source.uri.rstrip("/")
        for entry in iterate(list_source(root), f"discover/hash {source.kind}", unit="file"):
            uri, size = entry.uri, entry.size
            result.listed += 1
            rel = uri[len(root) :].lstrip("/") if uri.startswith(root) else posixpath.basename(uri)
            group, role, bad = classify(source, rel, settings.limits.extensions)
            if entry.problem is not None:
                # Never opened: what it is (or where it points) is reason enough.
                digest, bad = f"unread:{entry.problem.code}", entry.problem
            elif size > settings.limits.max_image_bytes:
                # Don't even read it: the hash would cost as much as the file is big.
                digest = f"size:{size}"
                bad = bad or Reason(
                    "too_large_bytes", f"{size} > {settings.limits.max_image_bytes}"
                )
            else:
                digest, unread = _hash(entry)
                bad = unread or bad
            if tomb and (
                (source.kind == "idcard" and group and tomb.subject(group)) or tomb.image(digest)
            ):
                result.forgotten += 1
                key = (tomb.placeholder("uri", uri), tomb.placeholder("sha256", digest))
                if key in seen or key in queued:
                    result.seen += 1
                    continue
                queued.add(key)
                result.quarantined += 1
                result.quarantined_rows.append(
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
            if key in seen or key in queued:
                result.seen += 1
                continue
            queued.add(key)
            if uri in seen_uris:
                log.info("content changed, treating as a new image: %s", uri)
            row = {
                "image_uri": uri,
                "image_sha256": digest,
                "size_bytes": int(size),
                "source_kind": source.kind,
                "source_group": group,
                "role": role,
                "run_id": run_id,
            }
            owner = owners.get(digest) if not bad else None
            if owner is not None and owner["image_uri"] != uri:
                why = Reason(InputCode.DUPLICATE_CONTENT, f"same bytes as {owner['image_uri']}")
                result.duplicates += 1
                result.quarantined_rows.append(
                    {
                        **row,
                        "status": owner["status"],
                        "reason": why.text,
                        "reason_code": why.code,
                        "width": owner["width"],
                        "height": owner["height"],
                        "n_faces": owner["n_faces"],
                        "phash": owner["phash"],
                    }
                )
                continue
            if bad:
                result.quarantined += 1
                result.quarantined_rows.append(
                    {
                        **row,
                        "status": IMG_QUARANTINED,
                        "reason": bad.text,
                        "reason_code": bad.code,
                        "width": None,
                        "height": None,
                        "n_faces": 0,
                    }
                )
                continue
            pending.append(row)
    result.new = len(pending)
    if pending:
        result.pending_rel = layout.staging_pending(run_id)
        store.write_parquet(
            result.pending_rel, pa.Table.from_pylist(pending, schema=PENDING_SCHEMA)
        )
    log.info(
        "discovered %d files: %d new, %d already seen, %d duplicates, %d quarantined, %d forgotten",
        result.listed,
        result.new,
        result.seen,
        result.duplicates,
        result.quarantined,
        result.forgotten,
    )
    return result
