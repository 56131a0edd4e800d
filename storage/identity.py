"""A store's identity: a name people recognise and a random id written once.

Promises: :func:`store_id` returns the same id for the life of a store (created on first call
with a conditional write, so two processes racing to create it agree on one); a new or wiped
store gets a new id. :func:`store_scope` is ``"<name> <id[:8]>"``, the label that keeps one
store's Label Studio projects apart from every other store's (annotate/render.project_title).
"""

from __future__ import annotations

import secrets
from pathlib import PurePosixPath

from storage import layout
from storage.objectstore import ObjectStore, PreconditionFailed


def store_id(store: ObjectStore) -> str:
    """The store's random id (32 hex digits), created on first use."""
    if store.exists(layout.STORE_ID):
        return store.read_bytes(layout.STORE_ID).decode().strip()
    new = secrets.token_hex(16)
    try:
        store.write_if(layout.STORE_ID, new.encode(), None)
    except PreconditionFailed:  # someone else created it first: theirs wins
        return store.read_bytes(layout.STORE_ID).decode().strip()
    return new


def store_name(store: ObjectStore) -> str:
    """The store's last path component (``/data/faceloop-store`` -> ``faceloop-store``;
    ``s3://bucket/prefix`` -> ``prefix``, or ``bucket`` without one)."""
    root = store.root.rstrip("/")
    if root.startswith("s3://"):
        root = root[len("s3://") :]
    return PurePosixPath(root).name or root or "store"


def store_scope(store: ObjectStore) -> str:
    """``"<store name> <short id>"``: what a Label Studio project title names its store by."""
    return f"{store_name(store)} {store_id(store)[:8]}"
