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

from faceloop.errors import StorageError
from storage import layout
from storage.objectstore import ObjectStore, PreconditionFailed

SECRET_BYTES = 32
PSEUDONYM_HEX = 16

# Store object -> its secret, read once per opened store. Not per store URI and process: a
# store deleted and made again at the same path in one process (a notebook) kept the old one's
# secret, never wrote its own, and a Ray worker that wrote one named the subjects otherwise
# than the driver (publish failed on every later run, in fresh processes too).
_cache: weakref.WeakKeyDictionary[ObjectStore, bytes] = weakref.WeakKeyDictionary()


# What is keyed by the secret and would no longer match under a new one: a store holding any
# of these and no secret lost its secret (a backup or copy that left ``state/secret`` out).
_KEYED = (layout.TOMBSTONES, layout.FORGET_PENDING, layout.AUDIT_FORGET)


def lost_secret(store: ObjectStore) -> str | None:
    """Why the store's secret must not be made anew: ``state/secret`` is missing while files
    keyed by it are there (with a new one, forgotten people's photos stop matching their
    tombstones and a refresh takes them in again). None when the secret is there, or when
    nothing depends on it yet."""
    if store.exists(layout.STORE_SECRET):
        return None
    keyed = [rel for rel in _KEYED if store.exists(rel)]
    if not keyed:
        return None
    return (
        f"{store.uri(layout.STORE_SECRET)} is missing, but {', '.join(keyed)} "
        f"{'is' if len(keyed) == 1 else 'are'} keyed by it (a backup or copy that left it "
        "out?): restore state/secret from where the store came from; a new secret would let "
        "forgotten people's photos back in"
    )


def store_secret(store: ObjectStore) -> bytes:
    """The store's secret, created on first use; StorageError when it is missing from a store
    that has used it (:func:`lost_secret`)."""
    hit = _cache.get(store)
    if hit is not None:
        return hit
    try:
        data = store.read_bytes(layout.STORE_SECRET)
    except FileNotFoundError:
        why = lost_secret(store)
        if why is not None:
            raise StorageError(why) from None
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
