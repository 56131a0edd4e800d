"""Discover new images in the configured sources.

An image is identified by its content (sha256) and where it lives (URI). Images whose
(uri, sha256) pair is already in the images table were processed by an earlier run and are
skipped, so a rerun over unchanged sources has nothing to do. A file whose content changed is a
new image. Files that break the source layout are recorded as quarantined right here, with the
reason, and never reach the models.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa

from faceloop.config import Settings, SourceSpec
from faceloop.schema import (
    IMG_QUARANTINED,
    PENDING_SCHEMA,
    ROLE_ALBUM,
    ROLE_ID,
    ROLE_LIVE,
)
from faceloop.vocab import Reason, Role
from storage import layout
from storage.objectstore import ObjectStore, list_uri, read_uri_bytes
from storage.tables import read_images

log = logging.getLogger(__name__)


@dataclass
class DiscoverResult:
    """What one discovery pass found. ``pending_rel`` is None when there is nothing new."""

    run_id: str
    listed: int = 0
    seen: int = 0
    new: int = 0
    quarantined: int = 0
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


def discover(settings: Settings, store: ObjectStore, run_id: str) -> DiscoverResult:
    """List every source, hash what is there and write the work list of new images.

    Writes ``staging/<run_id>/pending.parquet`` (PENDING_SCHEMA) when there is anything new.
    Layout errors are returned as images-table rows (status quarantined) in
    ``quarantined_rows``; the label stage appends them with the run's other image rows.
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
    result = DiscoverResult(run_id=run_id)
    pending: list[dict] = []
    queued: set[tuple[str, str]] = set()
    for source in settings.sources:
        root = source.uri.rstrip("/")
        for uri, size in list_uri(root):
            result.listed += 1
            rel = uri[len(root) :].lstrip("/") if uri.startswith(root) else posixpath.basename(uri)
            group, role, bad = classify(source, rel, settings.limits.extensions)
            if size > settings.limits.max_image_bytes:
                # Don't even read it: the hash would cost as much as the file is big.
                digest = f"size:{size}"
                bad = bad or Reason(
                    "too_large_bytes", f"{size} > {settings.limits.max_image_bytes}"
                )
            else:
                digest = hashlib.sha256(read_uri_bytes(uri)).hexdigest()
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
        "discovered %d files: %d new, %d already seen, %d quarantined",
        result.listed,
        result.new,
        result.seen,
        result.quarantined,
    )
    return result
