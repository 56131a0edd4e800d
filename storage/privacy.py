"""Keyed digests, tombstones, the forget audit log and the pending-work record.

Nothing here stores a raw identifier (face id, image sha256, URI, subject folder name): what must
be remembered about a forgotten person is kept as ``HMAC-SHA256(store secret, "<kind>:<value>")``.
Without the secret a digest cannot be tested against a guessed value, so the tombstones and the
audit log do not themselves say who was forgotten.

- ``state/secret`` (:data:`storage.layout.STORE_SECRET`): the store's key, shared with the Label
  Studio pseudonyms (:mod:`storage.secret`: 32 random bytes, created once with a conditional
  write, mode 0600 in a local store).
- ``state/tombstones.json``: ``{"images": [...], "subjects": [...], "faces": [...]}`` digests.
  Discovery skips files whose content (``image:<sha256>``) or ID-card subject
  (``subject:<folder>``) is tombstoned; gc and forget keep dataset versions free of tombstoned
  faces (``face:<face_id>``).
- ``audit/forget.jsonl``: one JSON object per forget run (when, OS user, kinds and counts), each
  with an HMAC chained over the line before it (:func:`check_audit`: tamper-evident).
- ``state/forget_pending.json``: what a forget has still to do: token digests whose rows must
  still go, and Label Studio task ids still to delete (ids of LS objects, not of people).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from faceloop.errors import StorageError
from storage import layout, secret
from storage.objectstore import ObjectStore


def _now() -> str:
    return datetime.now(UTC).isoformat()


def store_secret(store: ObjectStore, create: bool = True) -> bytes | None:
    """The store's HMAC key (:func:`storage.secret.store_secret`, the same key the Label Studio
    pseudonyms use), created on first use when ``create`` (else None if there is none).
    StorageError when it is missing from a store whose tombstones or audit it keys
    (:func:`storage.secret.lost_secret`): without it they match nothing."""
    if not create:
        try:
            store.read_bytes(layout.STORE_SECRET)
        except FileNotFoundError:
            if (why := secret.lost_secret(store)) is not None:
                raise StorageError(why) from None
            return None
    return secret.store_secret(store)


class Keyed:
    """``digest(kind, value)``: HMAC-SHA256 hex of ``"<kind>:<value>"`` under the store key."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._cache: dict[str, str] = {}

    def digest(self, kind: str, value: str) -> str:
        msg = f"{kind}:{value}"
        d = self._cache.get(msg)
        if d is None:
            d = hmac.new(self.key, msg.encode(), hashlib.sha256).hexdigest()
            if len(self._cache) < 1_000_000:
                self._cache[msg] = d
        return d

    @classmethod
    def of(cls, store: ObjectStore, create: bool = True) -> Keyed | None:
        key = store_secret(store, create=create)
        return cls(key) if key is not None else None


def subject_tombstone(keyed: Keyed, name: str) -> str:
    """The tombstone of an ID-card subject's folder name. Its own domain: the plain
    ``digest("subject", name)`` is what :func:`storage.secret.pseudonym` shortens into the
    subject's pseudonym (published classes, Label Studio), so a tombstone made that way told
    anyone holding an old dataset which pseudonymous subject was erased. Tombstones written
    that way before are still honoured (:meth:`TombstoneCheck.subject`)."""
    return keyed.digest("tombstone-subject", name)


@dataclass
class Tombstones:
    images: set[str] = field(default_factory=set)
    subjects: set[str] = field(default_factory=set)
    faces: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.images or self.subjects or self.faces)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": "faceloop.tombstones/1",
                "images": sorted(self.images),
                "subjects": sorted(self.subjects),
                "faces": sorted(self.faces),
            },
            indent=1,
        ).encode()


def _tombstoned(entry: Any) -> bool:
    """Whether audit line ``entry`` records a forget that wrote tombstones: it found photos,
    asked for a subject (tombstoned found or not), tombstoned a content the store had not
    seen, or finished killed forgets (whose tombstones their pending record carried)."""
    if not isinstance(entry, dict) or entry.get("action") not in ("forget", "resume"):
        return False
    return bool(
        any((entry.get("found") or {}).values())
        or (entry.get("request") or {}).get("subject")
        or (entry.get("not_found") or {}).get("image_content_only")
        or entry.get("resumed")
    )


def lost_tombstones(store: ObjectStore) -> str | None:
    """Why the store must not go on without tombstones: ``state/tombstones.json`` is missing
    while the forget audit records forgets that wrote some (a restore, or a hand that took
    ``state/`` for caches): an empty set of tombstones lets the forgotten people's photos back
    in at the next refresh. None when the file is there, or when no forget tombstoned anything."""
    if store.exists(layout.TOMBSTONES):
        return None
    try:
        data = store.read_bytes(layout.AUDIT_FORGET)
    except FileNotFoundError:
        return None
    n = 0
    for raw in data.splitlines():
        with contextlib.suppress(ValueError):
            n += _tombstoned(json.loads(raw))
    if not n:
        return None
    return (
        f"{store.uri(layout.TOMBSTONES)} is missing, but {layout.AUDIT_FORGET} records {n} "
        f"forget{'' if n == 1 else 's'} that wrote tombstones (a backup or copy that left it "
        "out, or state/ taken for caches?): restore state/tombstones.json from where the store "
        'came from (lost for good: write {"images": [], "subjects": [], "faces": []} '
        "there and run those forget requests again); without it the forgotten people's photos "
        "are taken in again"
    )


def read_tombstones(store: ObjectStore) -> Tombstones:
    """The tombstones (none when nothing was forgotten); StorageError when the file is missing
    from a store whose audit records forgets (:func:`lost_tombstones`)."""
    try:
        d = json.loads(store.read_bytes(layout.TOMBSTONES))
    except FileNotFoundError:
        if (why := lost_tombstones(store)) is not None:
            raise StorageError(why) from None
        return Tombstones()
    return Tombstones(set(d.get("images", [])), set(d.get("subjects", [])), set(d["faces"]))


def write_tombstones(store: ObjectStore, t: Tombstones) -> None:
    store.write_bytes(layout.TOMBSTONES, t.to_json())


class TombstoneCheck:
    """What discovery asks: is this file's content, or its ID-card subject, forgotten? And the
    keyed digest it records instead of a forgotten file's URI and hash."""

    def __init__(self, store: ObjectStore) -> None:
        self.t = read_tombstones(store)
        self.keyed = Keyed.of(store, create=False) if self.t else None

    def __bool__(self) -> bool:
        return self.keyed is not None

    def image(self, sha256: str) -> bool:
        return self.keyed is not None and self.image_mark(sha256) in self.t.images

    def image_mark(self, sha256: str) -> str:
        """The tombstone a forgotten content has (it is in ``t.images`` while it stands)."""
        assert self.keyed is not None
        return self.keyed.digest("image", sha256)

    def subject(self, name: str) -> bool:
        if self.keyed is None:
            return False
        return bool(
            {subject_tombstone(self.keyed, name), self.keyed.digest("subject", name)}
            & self.t.subjects
        )

    def placeholder(self, kind: str, value: str) -> str:
        """``forgotten:<digest>``: what the images table holds instead of a raw uri or hash."""
        assert self.keyed is not None
        return "forgotten:" + self.keyed.digest(f"row-{kind}", value)


# -- pending work --------------------------------------------------------------------------


@dataclass
class Pending:
    """Unfinished forget work. ``tokens``: digests (``token:<value>``) of face ids, image hashes,
    URIs and review task keys whose rows must still leave the store; ``ls_tasks``: Label Studio
    ``[project_id, task_id]`` still to delete."""

    tokens: set[str] = field(default_factory=set)
    ls_tasks: set[tuple[int, int]] = field(default_factory=set)
    store_done: bool = False
    reports_from: str | None = None  # run id: reports of this run and later are deleted
    since: str = field(default_factory=_now)
    # The tombstones this forget adds, written here before the tombstones file: a forget killed
    # between the two is finished (tombstones included) by `--resume` or the next refresh.
    tombstones: Tombstones = field(default_factory=lambda: Tombstones())
    # What each forget whose work this is asked (its audit fields: counts and keyed digests,
    # never names), so that the run which finishes the work of a killed forget audits it.
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        # ``requests`` alone: the store work is done, the audit line not written yet (a forget
        # killed between the two left no record of the erasure at all).
        return (
            bool(self.tokens) or bool(self.ls_tasks) or not self.store_done or bool(self.requests)
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": "faceloop.forget-pending/1",
                "since": self.since,
                "store_done": self.store_done,
                "reports_from": self.reports_from,
                "tokens": sorted(self.tokens),
                "labelstudio_tasks": sorted([list(t) for t in self.ls_tasks]),
                "requests": self.requests,
                "tombstones": {
                    "images": sorted(self.tombstones.images),
                    "subjects": sorted(self.tombstones.subjects),
                    "faces": sorted(self.tombstones.faces),
                },
            },
            indent=1,
        ).encode()


def read_pending(store: ObjectStore) -> Pending | None:
    try:
        d = json.loads(store.read_bytes(layout.FORGET_PENDING))
    except FileNotFoundError:
        return None
    return Pending(
        tokens=set(d.get("tokens", [])),
        ls_tasks={(int(p), int(t)) for p, t in d.get("labelstudio_tasks", [])},
        store_done=bool(d.get("store_done", False)),
        reports_from=d.get("reports_from"),
        since=str(d.get("since", _now())),
        tombstones=Tombstones(
            *(set((d.get("tombstones") or {}).get(k, [])) for k in ("images", "subjects", "faces"))
        ),
        requests=[r for r in d.get("requests") or [] if isinstance(r, dict)],
    )


def add_tombstones(store: ObjectStore, new: Tombstones) -> None:
    """Union ``new`` into the tombstones file (idempotent)."""
    if not new:
        return
    t = read_tombstones(store)
    merged = Tombstones(t.images | new.images, t.subjects | new.subjects, t.faces | new.faces)
    if merged != t:
        write_tombstones(store, merged)


def write_pending(store: ObjectStore, p: Pending | None) -> None:
    """Replace the pending record, or remove it when ``p`` is None or has nothing left."""
    if p is None or not p:
        if store.exists(layout.FORGET_PENDING):
            store.delete(layout.FORGET_PENDING)
        return
    store.write_bytes(layout.FORGET_PENDING, p.to_json())


# -- audit ---------------------------------------------------------------------------------


# Each audit line carries ``mac``: HMAC-SHA256 under the store secret of the line's other
# fields (sorted-key JSON) chained over the MAC of the line before it, in its own domain (no
# keyed digest is one). A line edited, removed or moved breaks the chain at the line after it.
# Lines written before the chain (no ``mac``) are a legacy prefix: the first chained line is
# chained over their bytes, so they cannot be changed either once a chained line follows.
AUDIT_MAC = "mac"


def _audit_mac(key: bytes, prev: str, fields: dict[str, Any]) -> str:
    msg = f"forget-audit:{prev}:".encode() + json.dumps(fields, sort_keys=True).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _legacy_mac(key: bytes, lines: list[bytes]) -> str:
    """What the first chained line is chained over: the legacy lines before it ("" if none)."""
    if not lines:
        return ""
    msg = b"forget-audit-legacy:" + b"\n".join(lines)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


@dataclass
class AuditCheck:
    """What :func:`check_audit` found: ``bad``, the number of the first line (1-based, in the
    file) that does not verify, or None; ``legacy``: lines written before the chain (not
    verifiable), ``chained``: lines that verify."""

    bad: int | None = None
    legacy: int = 0
    chained: int = 0


def check_audit(data: bytes, key: bytes) -> AuditCheck:
    """Verify the MAC chain of the audit log's bytes ``data`` under the store secret ``key``."""
    c = AuditCheck()
    legacy: list[bytes] = []
    prev: str | None = None  # None: still in the legacy prefix
    for no, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
        except ValueError:
            fields = None
        mac = fields.pop(AUDIT_MAC, None) if isinstance(fields, dict) else None
        if mac is None and prev is None and isinstance(fields, dict):
            legacy.append(raw)
            c.legacy += 1
            continue
        if prev is None:
            prev = _legacy_mac(key, legacy)
        if not isinstance(mac, str) or not hmac.compare_digest(
            mac, _audit_mac(key, prev, fields or {})
        ):
            c.bad = no
            return c
        prev = mac
        c.chained += 1
    return c


def _chain_head(data: bytes, key: bytes) -> str:
    """The MAC the next line is chained over: the last line's, or the legacy lines'."""
    lines = [x for x in data.splitlines() if x.strip()]
    for raw in reversed(lines):
        with contextlib.suppress(ValueError):
            d = json.loads(raw)
            if isinstance(d, dict) and isinstance(d.get(AUDIT_MAC), str):
                return str(d[AUDIT_MAC])
        break
    return _legacy_mac(key, lines)


def audit(store: ObjectStore, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` (counts and digests only) with ``at``, ``user`` and its chained MAC
    (:data:`AUDIT_MAC`) to the audit log. The caller holds the store lock (the log is read and
    rewritten whole)."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = f"uid:{os.getuid()}"
    line = {"at": _now(), "user": user, **entry}
    line.pop(AUDIT_MAC, None)
    try:
        old = store.read_bytes(layout.AUDIT_FORGET)
    except FileNotFoundError:
        old = b""
    key = secret.store_secret(store)
    line[AUDIT_MAC] = _audit_mac(key, _chain_head(old, key), line)
    store.write_bytes(layout.AUDIT_FORGET, old + json.dumps(line, sort_keys=True).encode() + b"\n")
    return line


def read_audit(store: ObjectStore) -> list[dict[str, Any]]:
    try:
        data = store.read_bytes(layout.AUDIT_FORGET)
    except FileNotFoundError:
        return []
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def digests(keyed: Keyed, kind: str, values: Iterable[str]) -> set[str]:
    return {keyed.digest(kind, v) for v in values}
