"""The store's format: which layout of tables and state a store holds, so that a faceloop that
does not know it never writes into it.

``state/store_format.json`` holds ``{"format": N, "written_by": "faceloop <version>"}``. Every
writer checks it as soon as it holds the store lock (:func:`storage.lock.store_lock`), before
recovery rolls anything back: a store whose format is newer than this faceloop's
:data:`FORMAT` is refused with a :class:`ConfigError` (exit 2) naming both versions. Without
it, an older release run on a store an upgrade had changed mixed its old rules with the new
state (its recovery and label stage work from what they know of the layout). A store with no
record, or an older format, gets this faceloop's record; a future release that changes the
layout incompatibly raises :data:`FORMAT` and migrates what it finds below it.

Read-only commands (status, explain, doctor, the training reader) do not write the record;
``faceloop doctor`` reports a newer format as a failed check.
"""

from __future__ import annotations

import json
from typing import Any

from faceloop.errors import ConfigError, StorageError
from storage import layout
from storage.objectstore import ObjectStore

#: The layout this faceloop reads and writes. Raise it only with a migration of the older ones.
FORMAT = 1


def _this_faceloop() -> str:
    from faceloop import version

    return f"faceloop {version()}"


def read_format(store: ObjectStore) -> dict[str, Any] | None:
    """The store's format record; None when it has none (a fresh store, or one written before
    the record existed: format 1). StorageError when it cannot be read as one."""
    try:
        raw = store.read_bytes(layout.STORE_FORMAT)
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        n = doc["format"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"format {n!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(
            f"{store.uri(layout.STORE_FORMAT)} is not a store format record ({exc}); a faceloop "
            "that knows this store wrote it: run that version, or restore the file"
        ) from None
    return dict(doc)


def too_new(doc: dict[str, Any] | None) -> str | None:
    """Why this faceloop must not write a store with format record ``doc``; None when it may."""
    if doc is None or doc["format"] <= FORMAT:
        return None
    by = doc.get("written_by") or "a newer faceloop"
    return (
        f"the store has format {doc['format']} (written by {by}); {_this_faceloop()} knows "
        f"format {FORMAT} at most: run the newer faceloop on it (an older one would mix its "
        "rules with state it does not know)"
    )


def check_and_record(store: ObjectStore) -> None:
    """Refuse a store in a newer format; record this faceloop's format where the store has none
    or an older one. Called with the store lock held."""
    doc = read_format(store)
    why = too_new(doc)
    if why is not None:
        raise ConfigError(f"{store.uri('')}: {why}")
    if doc is None or doc["format"] < FORMAT:
        record = {"format": FORMAT, "written_by": _this_faceloop()}
        store.write_bytes(layout.STORE_FORMAT, json.dumps(record).encode())
