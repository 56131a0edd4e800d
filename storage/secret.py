"""The store's secret and the pseudonyms keyed by it.

``state/secret`` (:data:`storage.layout.STORE_SECRET`) holds 32 random bytes, created on first
use with a conditional write (two processes creating it at once agree on one) and, in a local
store, mode 0600 like every store file. Whoever can read the store can read it: it keeps
identifiers away from systems that see *only* what faceloop sends them (Label Studio), not from
the store's readers.

``pseudonym(store, kind, value)`` is the first 16 hex digits of
``HMAC-SHA256(secret, f"{kind}:{value}")``: stable for one store (the same subject gets the same
pseudonym on every push), unlinkable across stores, and not reversible without the secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import weakref

from storage import layout
from storage.objectstore import ObjectStore, PreconditionFailed

SECRET_BYTES = 32
PSEUDONYM_HEX = 16

# Store object -> its secret, read once per opened store. Not per store URI and process: a
# store deleted and made again at the same path in one process (a notebook) kept the old one's
# secret, never wrote its own, and a Ray worker that wrote one named the subjects otherwise
# than the driver (publish failed on every later run, in fresh processes too).
_cache: weakref.WeakKeyDictionary[ObjectStore, bytes] = weakref.WeakKeyDictionary()


def store_secret(store: ObjectStore) -> bytes:
    """The store's secret, created on first use."""
    hit = _cache.get(store)
    if hit is not None:
        return hit
    try:
        data = store.read_bytes(layout.STORE_SECRET)
    except FileNotFoundError:
        # Conditional create: if another process created it first, use theirs.
        with contextlib.suppress(PreconditionFailed):
            store.write_if(layout.STORE_SECRET, secrets.token_bytes(SECRET_BYTES), None)
        data = store.read_bytes(layout.STORE_SECRET)
    if len(data) < 16:
        raise ValueError(f"{store.uri(layout.STORE_SECRET)}: too short to be a store secret")
    _cache[store] = data
    return data


def pseudonym(store: ObjectStore, kind: str, value: str) -> str:
    """A stable pseudonym of ``value`` (e.g. kind ``"subject"``) for this store (module doc)."""
    mac = hmac.new(store_secret(store), f"{kind}:{value}".encode(), hashlib.sha256)
    return mac.hexdigest()[:PSEUDONYM_HEX]
