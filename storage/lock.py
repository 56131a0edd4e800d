"""The store lock: one writer at a time (refresh, review pull/apply, datasets gc), visibly.

``state/lock.json`` (storage/layout.py) holds the holder record: ``host``, ``pid``, ``run_id``,
``kind`` (refresh | review | gc), ``since``, ``heartbeat`` (UTC ISO times), ``lease_seconds``
and a random ``token``. Every change is a conditional write (:meth:`ObjectStore.write_if`):
on S3 ``If-None-Match: *`` to create and ``If-Match: <etag>`` to renew, take over or delete
(checked against the SeaweedFS in the venv and AWS semantics); on a local store the same
compare-and-swap under an ``flock`` of a sidecar file. So two writers can never both believe
they hold the lock.

- **Acquire.** Create the record. If one exists and its holder is alive, wait (polling) up to
  ``lock.wait_seconds``, then raise :class:`StoreLockedError` (CLI exit 3) with one line naming
  the holder. A holder is **dead**, and is taken over at once, when it runs on this host and its
  pid is gone, or when its record was last renewed longer ago than its lease. That age is read
  off the store's own clock (:meth:`ObjectStore.age_seconds`: S3's Last-Modified against the
  server's Date, a local file's mtime), not the ``heartbeat`` the holder wrote with its clock:
  a live writer on a machine whose clock ran two minutes behind was taken over as dead, and a
  dead one whose clock ran an hour ahead blocked the store for that hour.
- **Heartbeat.** A daemon thread renews the heartbeat every ``lease_seconds / 3``. If the record
  is no longer ours (a taker judged us dead) the lock is marked lost; :meth:`StoreLock.check`
  raises, and the flows call it before they publish.
- **Release.** Delete the record if it is still ours; an :meth:`StoreLock.acquire` interrupted
  (Ctrl-C, SIGTERM) after writing it does too.

After acquiring, the caller runs :func:`storage.recovery.recover`: whatever a dead writer left
(staging, half-written versions, temp files) is rolled back before any new work starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from faceloop.errors import StoreLockedError
from storage import layout
from storage.objectstore import ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

_POLL_S = 1.0


def _now() -> datetime:
    return datetime.now(UTC)


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``; "" where /proc does not tell): two
    containers may share a host name, but a pid means something only inside its namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """A lock record as stored."""

    host: str
    pid: int
    run_id: str
    kind: str
    since: str
    heartbeat: str
    lease_seconds: float
    token: str
    pidns: str = ""  # the holder's pid namespace (pid_namespace); "" in older records
    # Seconds since the record was written, by the store's clock, when it was read from a
    # store that tells (read_holder); not part of the record.
    stored_age: float | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        d = json.loads(data)
        return cls(
            host=str(d["host"]),
            pid=int(d["pid"]),
            run_id=str(d.get("run_id", "")),
            kind=str(d.get("kind", "")),
            since=str(d["since"]),
            heartbeat=str(d["heartbeat"]),
            lease_seconds=float(d.get("lease_seconds", 60)),
            token=str(d.get("token", "")),
            pidns=str(d.get("pidns", "")),
        )

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True).encode()

    def as_dict(self) -> dict[str, Any]:
        """The record's fields (what the store holds)."""
        d = dict(self.__dict__)
        d.pop("stored_age", None)
        return d

    def age_s(self) -> float:
        """Seconds since the last heartbeat: by the store's clock when known, else by the
        holder's stamp against this machine's clock (never negative: a clock ahead)."""
        if self.stored_age is not None:
            return self.stored_age
        return max(0.0, (_now() - datetime.fromisoformat(self.heartbeat)).total_seconds())

    def aged(self, store: ObjectStore) -> Holder:
        """This record with its age by ``store``'s clock (itself when the store cannot tell, or
        the record is gone meanwhile)."""
        try:
            age = store.age_seconds(layout.STORE_LOCK)
        except FileNotFoundError:
            return self
        return self if age is None else replace(self, stored_age=age)

    def dead_reason(self) -> str | None:
        """Why this holder is dead (``None``: alive as far as can be told)."""
        if (
            self.host == socket.gethostname()
            and (not self.pidns or self.pidns == pid_namespace())
            and not pid_alive(self.pid)
        ):  # (a container of the same host name sees other pids: its holder goes by the lease)
            return f"pid {self.pid} is gone on {self.host}"
        if self.age_s() > self.lease_seconds:
            return (
                f"lease expired ({self.age_s():.0f} s since heartbeat > {self.lease_seconds:g} s)"
            )
        return None

    def describe(self) -> str:
        return (
            f"{self.kind or 'a writer'} run {self.run_id or '?'} (host {self.host}, pid {self.pid})"
            f" since {self.since}, heartbeat {self.age_s():.0f} s ago"
        )

    def takeover_hint(self) -> str:
        """What a refused writer can do: a live holder renews its lease; a dead one on another
        host (a pod gone, a machine lost) is taken over once the lease runs out."""
        left = max(0.0, self.lease_seconds - self.age_s())
        return (
            f"; a writer that died elsewhere is taken over once its lease of "
            f"{self.lease_seconds:g} s runs out (in about {left:.0f} s; lock.lease_seconds), and "
            "lock.wait_seconds (FACELOOP_LOCK__WAIT_SECONDS) lets a run wait for the store"
        )


def read_holder(store: ObjectStore) -> Holder | None:
    """The current record, or None (no lock, or an unreadable record)."""
    try:
        return Holder.from_json(store.read_bytes(layout.STORE_LOCK)).aged(store)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None


class StoreLock:
    """``with StoreLock(store, run_id, kind="refresh", wait_seconds=0, lease_seconds=60):``"""

    def __init__(
        self,
        store: ObjectStore,
        run_id: str,
        kind: str = "refresh",
        *,
        wait_seconds: float = 0.0,
        lease_seconds: float = 60.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        self.store, self.run_id, self.kind = store, run_id, kind
        self.wait_seconds, self.lease_seconds = wait_seconds, lease_seconds
        # Told once, with the holder's description, when this taker starts to wait (a
        # scheduled flow shows it in its run's log: a run waiting up to an hour said nothing).
        self.on_wait = on_wait
        self.token = uuid.uuid4().hex
        self.since = _now().isoformat()
        self._etag: str | None = None
        self._held = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None
        self._renewed = 0.0  # time.monotonic() of the last write of our record
        self.took_over: Holder | None = None  # the dead holder this lock replaced, if any

    # -- record ---------------------------------------------------------------------------------

    def _record(self) -> bytes:
        return Holder(
            host=socket.gethostname(),
            pid=os.getpid(),
            run_id=self.run_id,
            kind=self.kind,
            since=self.since,
            heartbeat=_now().isoformat(),
            lease_seconds=self.lease_seconds,
            token=self.token,
            pidns=pid_namespace(),
        ).to_json()

    def _try_once(self) -> Holder | None:
        """Take the lock if free or dead; returns the live holder otherwise."""
        for _ in range(5):  # a record that changes between our read and write: look again
            try:
                self._etag = self.store.write_if(layout.STORE_LOCK, self._record(), None)
                return None
            except PreconditionFailed:
                pass
            try:
                data, etag = self.store.read_versioned(layout.STORE_LOCK)
            except FileNotFoundError:
                continue  # released meanwhile
            try:
                holder: Holder | None = Holder.from_json(data)
            except (ValueError, KeyError, TypeError):
                holder = None  # unreadable record: nobody can renew it, take it over
            if holder is not None and holder.token == self.token:
                self._etag = etag  # our own record (a retried write that had succeeded)
                return None
            if holder is not None:
                holder = holder.aged(self.store)
            reason = "unreadable record" if holder is None else holder.dead_reason()
            if reason is None:
                assert holder is not None
                return holder
            try:
                self._etag = self.store.write_if(layout.STORE_LOCK, self._record(), etag)
            except PreconditionFailed:
                continue  # another taker won, or the holder renewed: look again
            self.took_over = holder
            log.warning(
                "store lock: took over from %s (%s)",
                holder.describe() if holder else "an unknown writer",
                reason,
            )
            return None
        current = read_holder(self.store)
        if current is None:
            raise StoreLockedError(f"store {self.store.uri('')}: lock record keeps changing")
        return current

    # -- lifecycle ------------------------------------------------------------------------------

    def acquire(self) -> StoreLock:
        try:
            return self._acquire()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM) or failed once our record may be written, before
            # the caller's ``with`` block (and so its release) began: the record stayed, renewed
            # by our heartbeat while this process lived, and the next writer waited for it.
            self._give_up()
            raise

    def _give_up(self) -> None:
        """Stop the heartbeat and delete the record if it is ours (best effort: else the lease
        runs out)."""
        self._stop_heartbeat()
        with self._mutex:
            self._held = False
            with contextlib.suppress(Exception):
                data, etag = self.store.read_versioned(layout.STORE_LOCK)
                if Holder.from_json(data).token == self.token:
                    self.store.delete_if(layout.STORE_LOCK, etag)

    def _acquire(self) -> StoreLock:
        deadline = time.monotonic() + max(0.0, self.wait_seconds)
        waited = False
        while True:
            holder = self._try_once()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise StoreLockedError(
                    f"store {self.store.uri('')} is locked by {holder.describe()}"
                    + (f"; waited {self.wait_seconds:g} s" if self.wait_seconds > 0 else "")
                    + holder.takeover_hint()
                )
            if not waited:
                said = (
                    f"store lock: waiting for {holder.describe()} "
                    f"(up to {self.wait_seconds:g} s, lock.wait_seconds)"
                )
                if self.on_wait is not None:
                    log.info("%s", said)
                    self.on_wait(said)
                else:  # a forget, gc or registration that waits says so (it waited mute)
                    log.warning("%s", said)
                waited = True
            time.sleep(min(_POLL_S, max(0.05, deadline - time.monotonic())))
        self._held = True
        self._renewed = time.monotonic()
        self._thread = threading.Thread(
            target=self._beat, name=f"store-lock-{self.run_id}", daemon=True
        )
        self._thread.start()
        log.info("store lock: held by %s run %s", self.kind, self.run_id)
        return self

    def _beat(self) -> None:
        interval = max(0.2, self.lease_seconds / 3)
        while not self._stop.wait(interval):
            with self._mutex:
                if not self._held or self._lost:
                    return
                try:
                    assert self._etag is not None
                    self._etag = self.store.write_if(layout.STORE_LOCK, self._record(), self._etag)
                    self._renewed = time.monotonic()
                except PreconditionFailed:
                    h = read_holder(self.store)
                    if h is not None and h.token == self.token:
                        with contextlib.suppress(Exception):
                            _, self._etag = self.store.read_versioned(layout.STORE_LOCK)
                        continue
                    self._lost = (
                        f"lost the store lock to {h.describe()}" if h else "the store lock vanished"
                    )
                    log.error("store lock: %s", self._lost)
                    return
                except Exception as exc:  # transient outage: try again at the next beat
                    log.warning("store lock: heartbeat failed (%s); retrying", exc)

    def check(self) -> None:
        """Raise StoreLockedError when this lock was lost (another writer took it over). When
        the heartbeat has not renewed the lease for half of it (this process was stopped, say:
        a SIGSTOP past the lease, and another writer took the store over meanwhile), the lock's
        record is read now rather than trusted: a forget resumed after losing the lock went on
        removing the new holder's staging before its heartbeat noticed."""
        if (
            not self._lost
            and self._held
            and (time.monotonic() - self._renewed > self.lease_seconds / 2)
        ):
            with self._mutex:
                h = read_holder(self.store)
                if h is None or h.token != self.token:
                    self._lost = (
                        f"lost the store lock to {h.describe()}" if h else "the store lock vanished"
                    )
                    log.error("store lock: %s", self._lost)
        if self._lost:
            raise StoreLockedError(f"store {self.store.uri('')}: {self._lost}")

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def release(self) -> None:
        self._stop_heartbeat()
        with self._mutex:
            if not self._held:
                return
            self._held = False
            if self._lost or self._etag is None:
                return
            try:
                self.store.delete_if(layout.STORE_LOCK, self._etag)
            except PreconditionFailed:
                log.warning("store lock: record changed before release; left as is")
            except Exception as exc:  # the lease expires on its own
                log.warning("store lock: release failed (%s); the lease will expire", exc)

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


@contextlib.contextmanager
def store_lock(
    store: ObjectStore,
    run_id: str,
    kind: str,
    *,
    wait_seconds: float = 0.0,
    lease_seconds: float = 60.0,
    recover: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[StoreLock]:
    """Hold the store lock, refuse a store in a newer format than this faceloop's
    (storage/format.py), and roll back what dead writers left (storage/recovery.py)."""
    from storage.format import check_and_record
    from storage.recovery import recover as run_recovery

    with StoreLock(
        store,
        run_id,
        kind,
        wait_seconds=wait_seconds,
        lease_seconds=lease_seconds,
        on_wait=on_wait,
    ) as lock:
        check_and_record(store)  # before recovery: it rolls back by what it knows of the layout
        if recover:
            run_recovery(store, keep_run=run_id)
        yield lock


def lock_state(store: ObjectStore) -> dict[str, Any]:
    """``{"state": free|held|dead, "holder": {...}, "reason": ...}`` for doctor and status."""
    h = read_holder(store)
    if h is None:
        if store.exists(layout.STORE_LOCK):
            return {"state": "dead", "holder": None, "reason": "unreadable lock record"}
        return {"state": "free", "holder": None, "reason": None}
    reason = h.dead_reason()
    return {
        "state": "dead" if reason else "held",
        "holder": h.as_dict(),
        "reason": reason or h.describe(),
    }
