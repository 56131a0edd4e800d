"""The store lock (storage/lock.py), recovery (storage/recovery.py) and `faceloop doctor`.

Local stores here (unit tier); the same protocol on the real SeaweedFS is the last test
(integration tier, via the s3_root fixture).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from faceloop.errors import EXIT_LOCKED, StoreLockedError
from storage import layout
from storage.lock import Holder, StoreLock, lock_state, read_holder, store_lock
from storage.objectstore import ObjectStore, open_store
from storage.recovery import recover
from storage.versions import DatasetWriter, list_versions


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(store: ObjectStore, **kw: object) -> None:
    now = datetime.now(UTC).isoformat()
    rec = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "run_id": "r-planted",
        "kind": "refresh",
        "since": now,
        "heartbeat": now,
        "lease_seconds": 60.0,
        "token": "planted",
    }
    rec.update(kw)
    store.write_bytes(layout.STORE_LOCK, json.dumps(rec).encode())


def test_a_waiting_taker_says_whom_it_waits_for_once(tmp_path):
    """A scheduled run waiting up to an hour for the lock showed nothing in its flow-run log
    (the wait went to faceloop's own logger): ``on_wait`` gets the holder, once."""
    store = open_store(str(tmp_path))
    heard: list[str] = []
    with StoreLock(store, "run-a", "refresh"), pytest.raises(StoreLockedError):
        StoreLock(store, "run-b", "review", wait_seconds=0.6, on_wait=heard.append).acquire()
    assert len(heard) == 1 and "waiting for refresh run run-a" in heard[0]
    assert "up to 0.6 s" in heard[0]
    with store_lock(store, "run-c", "gc", on_wait=heard.append):
        pass
    assert len(heard) == 1  # a free lock: no wait to tell


def test_a_waiting_writer_without_a_listener_warns(tmp_path, caplog):
    """A forget, gc or models register that waited for the lock said nothing at the console
    (an info line): the operator saw a command hang."""
    store = open_store(str(tmp_path))
    with (
        caplog.at_level("INFO", logger="storage.lock"),
        StoreLock(store, "run-a", "refresh"),
        pytest.raises(StoreLockedError),
    ):
        StoreLock(store, "run-b", "forget", wait_seconds=0.3).acquire()
    waits = [r for r in caplog.records if "waiting for refresh run run-a" in r.getMessage()]
    assert [r.levelname for r in waits] == ["WARNING"]


def test_second_writer_fails_at_once_naming_the_holder(tmp_path):
    store = open_store(str(tmp_path))
    with StoreLock(store, "run-a", "refresh"):
        with pytest.raises(StoreLockedError) as err:
            StoreLock(store, "run-b", "review").acquire()
        msg = str(err.value)
        assert "\n" not in msg
        for part in ("run-a", socket.gethostname(), f"pid {os.getpid()}", "since", "refresh"):
            assert part in msg
        assert err.value.exit_code == EXIT_LOCKED == 3
        assert lock_state(store)["state"] == "held"
    assert not store.exists(layout.STORE_LOCK)
    assert lock_state(store)["state"] == "free"


def test_second_writer_waits_for_the_first(tmp_path):
    store = open_store(str(tmp_path))
    first = StoreLock(store, "run-a").acquire()
    threading.Timer(1.0, first.release).start()
    t0 = time.monotonic()
    with StoreLock(store, "run-b", wait_seconds=20):
        assert 0.5 < time.monotonic() - t0 < 10
        assert read_holder(store).run_id == "run-b"  # type: ignore[union-attr]


def test_waiting_writer_gives_up_after_wait_seconds(tmp_path):
    store = open_store(str(tmp_path))
    with StoreLock(store, "run-a"):
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError, match=r"waited 1\.5 s"):
            StoreLock(store, "run-b", wait_seconds=1.5).acquire()
        assert time.monotonic() - t0 >= 1.5


def test_dead_pid_on_this_host_is_taken_over_at_once(tmp_path):
    store = open_store(str(tmp_path))
    _plant(store, pid=_dead_pid())
    assert lock_state(store)["state"] == "dead"
    t0 = time.monotonic()
    with StoreLock(store, "run-b") as lock:
        assert time.monotonic() - t0 < 2
        assert lock.took_over is not None and lock.took_over.run_id == "r-planted"


def _written_ago(store: ObjectStore, seconds: float) -> None:
    """The lock record as the store saw it written ``seconds`` ago (a local file's mtime)."""
    path = Path(store.root) / layout.STORE_LOCK
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_holder_in_another_pid_namespace_of_the_same_host_name_goes_by_its_lease(tmp_path):
    """Two containers with one host name (a shared UTS namespace, a pod's hostname) see each
    other's pids as gone: a live holder was taken over at once ("pid ... is gone")."""
    store = open_store(str(tmp_path))
    _plant(store, pid=_dead_pid(), pidns="pid:[1]")
    with pytest.raises(StoreLockedError, match="r-planted"):
        StoreLock(store, "run-b").acquire()
    _written_ago(store, 61)
    assert "lease expired" in lock_state(store)["reason"]
    with StoreLock(store, "run-c") as lock:
        assert lock.took_over is not None and lock.took_over.pidns == "pid:[1]"


def test_expired_lease_of_another_host_is_taken_over(tmp_path):
    store = open_store(str(tmp_path))
    old = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    _plant(store, host="elsewhere", pid=1, heartbeat=old)
    _written_ago(store, 120)
    with StoreLock(store, "run-b") as lock:
        assert lock.took_over is not None


def test_a_lease_is_judged_by_the_stores_clock_not_the_holders(tmp_path):
    """A live writer on a machine whose clock runs two minutes behind renews its record every
    lease/3: it was taken over as dead (its heartbeat stamp looked 120 s old), and both
    believed they held the store. A dead writer whose clock ran an hour ahead blocked the
    store for that hour ("heartbeat -3599 s ago")."""
    store = open_store(str(tmp_path))
    behind = (datetime.now(UTC) - timedelta(seconds=125)).isoformat()
    _plant(store, host="othermachine", pid=1, heartbeat=behind)  # written just now
    with pytest.raises(StoreLockedError, match="host othermachine"):
        StoreLock(store, "run-b").acquire()
    assert lock_state(store)["state"] == "held"
    ahead = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    _plant(store, host="othermachine", pid=1, heartbeat=ahead)
    _written_ago(store, 61)  # not renewed for longer than its lease
    state = lock_state(store)
    assert state["state"] == "dead" and "lease expired (61 s" in state["reason"]
    assert "stored_age" not in state["holder"]
    with StoreLock(store, "run-c") as lock:
        assert lock.took_over is not None and lock.took_over.run_id == "r-planted"


def test_live_holder_of_another_host_is_respected(tmp_path):
    store = open_store(str(tmp_path))
    _plant(store, host="elsewhere", pid=1)
    with pytest.raises(StoreLockedError, match="host elsewhere, pid 1"):
        StoreLock(store, "run-b").acquire()


def _until(cond, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("where", ["record written", "heartbeat started"])
def test_an_acquire_interrupted_after_writing_its_record_removes_it(tmp_path, monkeypatch, where):
    """Ctrl-C or SIGTERM between the lock's record being written and acquire() returning (the
    caller's `with` block, and so its release, not yet begun) left the record, renewed by the
    heartbeat while the process lived: the next writer waited for its lease, or for ever."""
    import storage.lock

    store = open_store(str(tmp_path))
    if where == "record written":
        write_if = store.write_if

        def written_then_interrupted(*args, **kwargs):
            write_if(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(store, "write_if", written_then_interrupted)
    else:
        info = storage.lock.log.info

        def interrupted(msg, *args):
            if msg.startswith("store lock: held"):
                raise KeyboardInterrupt
            info(msg, *args)

        monkeypatch.setattr(storage.lock.log, "info", interrupted)
    lock = StoreLock(store, "run-a", "refresh", lease_seconds=0.6)
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    monkeypatch.undo()
    assert read_holder(store) is None
    assert lock._thread is None or not lock._thread.is_alive()
    with StoreLock(store, "run-b", "refresh"):  # at once: no wait
        time.sleep(0.5)  # a heartbeat of run-a's would have renewed its record meanwhile
        assert read_holder(store).run_id == "run-b"


def test_heartbeat_renews_and_a_lost_lock_is_noticed(tmp_path):
    store = open_store(str(tmp_path))
    with StoreLock(store, "run-a", lease_seconds=0.9) as lock:
        first = read_holder(store).heartbeat  # type: ignore[union-attr]
        assert _until(lambda: read_holder(store).heartbeat != first)  # type: ignore[union-attr]
        lock.check()
        _plant(store, host="elsewhere", pid=1, run_id="thief")  # someone judged us dead
        assert _until(lambda: lock._lost is not None)
        with pytest.raises(StoreLockedError, match="thief"):
            lock.check()
    assert read_holder(store).run_id == "thief"  # type: ignore[union-attr]  # not deleted


def test_a_writer_paused_past_its_lease_learns_it_lost_the_lock_before_it_writes(tmp_path):
    """A forget stopped (SIGSTOP) past its lease, its lock taken over by a refresh, went on
    writing when resumed, and removed the refresh's staging, before its heartbeat noticed.
    check() reads the record when the lease was not renewed for half of it."""
    store = open_store(str(tmp_path))
    with StoreLock(store, "run-a", lease_seconds=0.6) as lock:
        lock._stop.set()  # the heartbeat stops, as in a paused process
        lock._thread.join()  # type: ignore[union-attr]
        time.sleep(0.4)
        lock.check()  # the record is still ours: go on
        _plant(store, host="elsewhere", pid=1, run_id="taker")
        assert lock._lost is None  # no heartbeat to notice
        with pytest.raises(StoreLockedError, match=r"lost the store lock to .*taker"):
            lock.check()


def _half_written(store: ObjectStore) -> None:
    """v1 committed, v2 half-written with a fresh 'writing' marker (what kill -9 leaves)."""
    rows = pa.table(
        {
            "face_id": ["f1", "f2"],
            "identity_id": ["i1", "i1"],
            "image": [b"x", b"y"],
        }
    )
    with DatasetWriter(store, "faces", 10, identities=["i1"]) as w:
        w.write(rows)
    w2 = DatasetWriter(store, "faces", 10, identities=["i1"])
    w2._claim()  # marker "writing", heartbeat now; the writer then "dies"


def test_recovery_rolls_back_what_a_dead_writer_left(tmp_path, monkeypatch):
    root = tmp_path / "store"
    store = open_store(str(root))
    _half_written(store)
    store.write_bytes(layout.staging_pending("dead-run"), b"pending")
    (root / "state").mkdir(mode=0o700, exist_ok=True)
    (root / "state" / ".faces_generation.tmp-abc123").write_bytes(b"x")
    (root / "state" / ".faces_generation.tmp-abc123").chmod(0o600)  # as the store writes
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = tmp / f"faceloop-shard-{_dead_pid()}-abcd"
    live = tmp / f"faceloop-shard-{os.getpid()}-abcd"
    dead.mkdir()
    live.mkdir()
    _plant(store, pid=_dead_pid())

    from faceloop.commands.doctor import run_checks

    checks = run_checks(store)
    failed = {c["check"] for c in checks if not c["ok"]}
    assert failed == {
        "no half-written versions",
        "no orphan staging",
        "no stale temp files",
        "lock",
    }
    (half,) = [c["detail"] for c in checks if c["check"] == "no half-written versions"]
    assert half.startswith("faces v2 (left by a stopped writer: the next refresh "), half
    with store_lock(store, "new-run", "refresh"):
        assert not (root / "staging" / "dead-run").exists()
        assert not (root / "datasets" / "faces" / "v2").exists()
        assert list_versions(store, "faces") == [1]
        assert not (root / "state" / ".faces_generation.tmp-abc123").exists()
        assert not dead.exists() and live.exists()
    assert all(c["ok"] for c in run_checks(store)), run_checks(store)
    # Without recovery a fresh marker blocks the next writer (the 15-minute wait reported);
    # recovery under the lock removes it at once.
    _half_written(store)
    from storage.versions import ConcurrentWriteError

    with pytest.raises(ConcurrentWriteError):
        DatasetWriter(store, "faces", 10, identities=["i1"])._claim()
    assert recover(store) and list_versions(store, "faces") == [1, 2]
    assert not (root / "datasets" / "faces" / "v3").exists()


def test_doctor_cli_exit_codes_and_json(tmp_path):
    root = tmp_path / "store"
    root.mkdir()  # a fresh store: an empty folder (a path without one is refused: test_cli)
    store = open_store(str(root))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env["TMPDIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "faceloop.cli", "doctor", "--store", str(root)]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = ok.stdout.strip().splitlines()
    # One line per check (the forget check included); every one holds on a fresh store.
    assert len(lines) >= 8 and all(line.startswith("ok ") for line in lines), lines
    store.write_bytes(layout.staging_pending("dead-run"), b"pending")
    bad = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [c["check"] for c in report["checks"] if not c["ok"]] == ["no orphan staging"]


def test_datasets_gc_removes_what_a_writer_killed_minutes_ago_left(tmp_path, capsys):
    """A refresh killed (SIGKILL) during publish, then `datasets gc`: gc took the dead writer's
    lock over, then kept its half-written version ("being written") and its staging for 15
    minutes: "removed: 0 half-written version directories", and doctor still failed."""
    from faceloop.cli import main

    store = open_store(str(tmp_path))
    _half_written(store)
    store.write_bytes(layout.staging_pending("dead-run"), b"pending")
    _plant(store, pid=_dead_pid(), run_id="dead-run")
    assert main(["datasets", "gc", "--store", str(tmp_path), "--name", "faces"]) == 0
    out = capsys.readouterr().out
    assert "1 half-written version directory" in out or "what a dead writer left" in out, out
    assert list_versions(store, "faces") == [1]
    assert not (tmp_path / "datasets" / "faces" / "v2").exists()
    assert not store.exists(layout.staging_pending("dead-run"))


def test_doctor_says_a_refresh_completes_a_label_commit_stopped_half_way(tmp_path, capsys):
    """SIGTERM inside a label commit: doctor failed 'faces have image rows' with no word that
    the next refresh completes it (review push and pull said so)."""
    from faceloop.cli import main
    from storage.tables import write_group

    store = open_store(str(tmp_path))
    t = pa.table({"face_id": ["f1"], "source_kind": ["album"], "source_group": ["a"]})
    write_group(store, "album", "a", t)
    store.write_bytes(layout.LABEL_COMMIT_OPEN, json.dumps({"run_id": "run-x"}).encode())
    assert main(["doctor", "--store", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "faces have image rows" in x)
    assert "run run-x stopped inside its label commit" in line and "faceloop refresh" in line


def test_doctor_reports_a_version_it_cannot_read_among_its_checks(tmp_path, monkeypatch):
    """A manifest without read permission stopped doctor with one error line and no check."""
    import storage.versions
    from faceloop.commands.doctor import run_checks

    store = open_store(str(tmp_path))
    _half_written(store)  # v1 committed

    def denied(store, name, version):
        raise PermissionError(13, "Permission denied", f"{name}/v{version}/manifest.json")

    monkeypatch.setattr(storage.versions, "verify_version", denied)
    checks = {c["check"]: c for c in run_checks(store)}
    bad = checks["dataset versions verify"]
    assert not bad["ok"] and "faces v1: cannot be read (PermissionError" in bad["detail"]
    assert len(checks) >= 10  # every other check still ran


def test_store_lock_on_s3(s3_root):
    store = open_store(s3_root)
    with StoreLock(store, "run-a", lease_seconds=3) as lock:
        with pytest.raises(StoreLockedError, match="run-a"):
            StoreLock(store, "run-b").acquire()
        time.sleep(1.5)  # a heartbeat went through the conditional write
        lock.check()
    assert not store.exists(layout.STORE_LOCK)
    _plant(store, pid=_dead_pid())
    with StoreLock(store, "run-c") as lock:
        assert lock.took_over is not None
        assert read_holder(store).run_id == "run-c"  # type: ignore[union-attr]
    assert isinstance(Holder, type)
    # Another host's holder, its clock two minutes behind: alive while the server saw it
    # written within its lease (Last-Modified against the server's Date), dead after.
    behind = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    _plant(store, host="othermachine", pid=1, heartbeat=behind, lease_seconds=2.0)
    with pytest.raises(StoreLockedError, match="host othermachine"):
        StoreLock(store, "run-d").acquire()
    time.sleep(3.5)
    with StoreLock(store, "run-e") as lock:
        assert lock.took_over is not None and lock.took_over.host == "othermachine"


def test_review_push_waits_its_turn_for_the_store(tmp_path):
    """`faceloop review push` takes the store lock like the refresh (whose own push runs under
    it) and `review pull`: two pushes at once would each create the same task."""
    from faceloop.cli import main

    store = open_store(str(tmp_path))
    with StoreLock(store, "run-a", "refresh"):
        assert main(["review", "push", "--store", str(tmp_path)]) == EXIT_LOCKED


def test_a_store_in_a_newer_format_is_refused_before_recovery_touches_it(tmp_path, capsys):
    """An older release run on a store an upgrade had changed went on as if it knew it: its
    recovery and stages worked from their own idea of the layout (a recognizer mixed in, a
    forgotten photo taken in again). The store now records its format under the lock; a writer
    that knows an older one refuses the store, exit 2, before recovery rolls anything back."""
    from faceloop.cli import main
    from faceloop.commands.doctor import run_checks
    from faceloop.errors import ConfigError, StorageError
    from storage.format import FORMAT, read_format

    root = tmp_path / "store"
    store = open_store(str(root))
    with store_lock(store, "run-a", "refresh"):
        pass
    doc = read_format(store)
    assert doc is not None and doc["format"] == FORMAT and doc["written_by"].startswith("faceloop")
    assert {c["check"]: c["ok"] for c in run_checks(store)}["store format"] is True

    newer = {"format": FORMAT + 1, "written_by": "faceloop 9.0"}
    store.write_bytes(layout.STORE_FORMAT, json.dumps(newer).encode())
    store.write_bytes(layout.staging_pending("dead-run"), b"pending")
    newer_said = rf"format {FORMAT + 1} \(written by faceloop 9.0\)"
    with pytest.raises(ConfigError, match=newer_said), store_lock(store, "run-b", "refresh"):
        raise AssertionError("a newer store was written")
    assert store.exists(layout.staging_pending("dead-run"))  # recovery did not run
    assert not store.exists(layout.STORE_LOCK)  # the lock was released
    assert read_format(store) == newer
    check = {c["check"]: c for c in run_checks(store)}["store format"]
    assert not check["ok"] and "knows format" in check["detail"]
    assert main(["datasets", "gc", "--store", str(root), "--name", "faces"]) == 2
    assert "run the newer faceloop" in capsys.readouterr().err

    store.write_bytes(layout.STORE_FORMAT, b"not json")
    with (
        pytest.raises(StorageError, match="not a store format record"),
        store_lock(store, "run-c", "refresh"),
    ):
        pass
    assert not {c["check"]: c for c in run_checks(store)}["store format"]["ok"]
