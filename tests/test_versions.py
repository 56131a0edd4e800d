"""Dataset versions: atomic commit, crash recovery, verify, gc, labels; local and real S3."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.objectstore import open_store
from storage.versions import (
    ConcurrentWriteError,
    DatasetWriter,
    class_index,
    diff_assignments,
    gc,
    latest_version,
    list_versions,
    read_manifest,
    read_shards,
    read_table,
    verify_version,
    version_prefix,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_root"))


def rows(face_ids: list[str], identities: list[str]) -> pa.Table:
    return pa.table(
        {
            "face_id": face_ids,
            "identity_id": identities,
            "image": [b"\xff\xd8jpeg-" + f.encode() for f in face_ids],
            "quality": pa.array([0.9] * len(face_ids), pa.float32()),
            "source_kind": ["album"] * len(face_ids),
        }
    )


FACES = [f"f{i:03d}" for i in range(10)]
IDS = ["zed", "amy", "bob", "amy", "zed", "bob", "cat", "amy", "zed", "bob"]


def write_version(store, faces=FACES, ids=IDS, shard_rows=4, meta=None, **kw):
    with DatasetWriter(
        store, "ds", shard_rows, meta or {"run_id": "r1"}, identities=ids, **kw
    ) as w:
        t = rows(faces, ids)
        w.write(t.slice(0, 3))
        w.write(t.slice(3).to_batches()[0])
    return w.manifest


def test_write_read_manifest_labels(store):
    m = write_version(store)
    assert list_versions(store, "ds") == [1] and latest_version(store, "ds") == 1
    assert m == read_manifest(store, "ds", "latest") == read_manifest(store, "ds", "v1")
    assert m["format"] == "faceloop.dataset/2" and m["parent"] is None and m["run_id"] == "r1"
    assert [s["rows"] for s in m["shards"]] == [4, 4, 2] and m["num_rows"] == 10
    # Shards live in the dataset's pool, named by the sha256 of their bytes.
    assert [s["file"] for s in m["shards"]] == [
        f"shards/{s['sha256']}.parquet" for s in m["shards"]
    ]
    for s in m["shards"]:
        assert (
            hashlib.sha256(store.read_bytes(f"datasets/ds/{s['file']}")).hexdigest() == s["sha256"]
        )
    # The shards store no label (a shard serves versions with different class lists).
    raw = store.read_parquet_file(f"datasets/ds/{m['shards'][0]['file']}")
    assert raw.column("label").null_count == raw.num_rows
    assert m["num_classes"] == 4 and m["changes"]["added"] == 10 and m["changes"]["removed"] == 0
    assert store.read_bytes("datasets/ds/latest") == b"v1"
    assert not store.exists(f"{version_prefix('ds', 1)}/_writing.json")
    t = read_shards(store, "ds")
    assert t.column("face_id").to_pylist() == FACES
    # labels: contiguous, in identity order, consistent with classes.parquet
    names = ["amy", "bob", "cat", "zed"]
    assert t.column("label").to_pylist() == [names.index(i) for i in IDS]
    classes = read_table(store, "ds", 1, "classes").to_pylist()
    assert classes == [
        {"label": i, "identity_id": n, "count": IDS.count(n)} for i, n in enumerate(names)
    ]
    assert verify_version(store, "ds", 1) == []


def test_tampered_shard_detected(store):
    m = write_version(store)
    file = m["shards"][1]["file"]
    rel = f"datasets/ds/{file}"
    data = bytearray(store.read_bytes(rel))
    data[10] ^= 0xFF
    store.write_bytes(rel, bytes(data))
    problems = verify_version(store, "ds", 1)
    assert any(f"{file}: sha256 mismatch" in p for p in problems)
    store.delete(rel)
    assert any(f"{file}: missing" in p for p in verify_version(store, "ds", 1))
    assert verify_version(store, "ds", 7) and verify_version(store, "nope", "latest")


def test_format_1_version_still_reads_and_verifies(store):
    """A version written before the pool (shards in v<N>/shards with their labels) reads,
    verifies and flags stray files as before."""
    write_version(store)
    m = json.loads(store.read_bytes("datasets/ds/v1/manifest.json"))
    t = read_shards(store, "ds", 1)
    data = t.slice(0, 6), t.slice(6)
    shards = []
    for i, part in enumerate(data):
        buf = pa.BufferOutputStream()
        pq.write_table(part, buf)
        b = buf.getvalue().to_pybytes()
        store.write_bytes(f"datasets/ds/v1/shards/part-{i:05d}.parquet", b)
        shards.append(
            {
                "file": f"shards/part-{i:05d}.parquet",
                "rows": part.num_rows,
                "bytes": len(b),
                "sha256": hashlib.sha256(b).hexdigest(),
            }
        )
    m |= {"format": "faceloop.dataset/1", "shards": shards}
    store.write_bytes("datasets/ds/v1/manifest.json", json.dumps(m).encode())
    assert verify_version(store, "ds", 1) == []
    assert read_shards(store, "ds", 1).equals(t)
    store.write_bytes("datasets/ds/v1/shards/part-00009.parquet", b"x")
    assert any(
        "part-00009.parquet: not in the manifest" in p for p in verify_version(store, "ds", 1)
    )


def test_crash_between_shards_is_invisible_and_next_write_succeeds(store):
    write_version(store)
    with (
        pytest.raises(RuntimeError, match="boom"),
        DatasetWriter(store, "ds", 4, {"run_id": "r2"}, identities=IDS) as w,
    ):
        w.write(rows(FACES, IDS))  # shards 0 and 1 written (pooled already: v1's), 2 buffered
        marker = json.loads(store.read_bytes(f"{version_prefix('ds', 2)}/_writing.json"))
        assert len(marker["shards"]) == 2
        raise RuntimeError("boom")
    assert list_versions(store, "ds") == [1] and latest_version(store, "ds") == 1
    assert not store.list(version_prefix("ds", 2))  # its writer removed it
    with pytest.raises(FileNotFoundError):
        read_manifest(store, "ds", 2)
    m = write_version(store, ids=["amy"] * 10, meta={"run_id": "r3"})
    assert m["version"] == 2 and m["parent"] == 1 and m["run_id"] == "r3"
    assert m["changes"]["relabelled"] == 7 and m["changes"]["added"] == 0
    assert verify_version(store, "ds", 2) == [] and latest_version(store, "ds") == 2


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit, ValueError])
def test_a_writer_stopped_mid_version_removes_it_and_the_shards_it_uploaded(
    store, monkeypatch, stop
):
    """Ctrl-C or SIGTERM in a publish (or its failure) left v<N>/_writing.json, marked aborted,
    until the next refresh or `datasets gc`: `faceloop doctor` failed "no half-written
    versions" in between. The writer removes its directory and the pool shards it uploaded
    for it; those it shares with a committed version stay."""
    import storage.versions
    from storage.recovery import half_written_versions

    m1 = write_version(store)
    pool = {o.rel for o in store.list("datasets/ds/shards")}
    shards = []

    def stopped(point: str) -> None:  # (faceloop/crashpoints.py: a shard is listed)
        shards.append(point)
        if len(shards) == 3:
            raise stop()

    monkeypatch.setattr(storage.versions, "crash_point", stopped)
    with pytest.raises(stop), DatasetWriter(store, "ds", 4, {}, identities=[*IDS, "new"]) as w:
        w.write(rows(FACES[:8], IDS[:8]))  # two shards v1 lists (the pool holds them)
        w.write(rows(["x1", "x2", "x3", "x4"], ["new"] * 4))  # a new shard uploaded, then stop
    assert w.bytes_written > 0 and shards == ["publish"] * 3
    assert half_written_versions(store) == []
    assert not store.list(version_prefix("ds", 2))
    assert {o.rel for o in store.list("datasets/ds/shards")} == pool
    assert verify_version(store, "ds", 1) == [] and list_versions(store, "ds") == [1]
    monkeypatch.undo()
    assert write_version(store, meta={"run_id": "r2"})["version"] == 2
    assert read_manifest(store, "ds", 2)["shards"] == m1["shards"]


def test_hard_crash_live_marker_blocks_then_stale_is_replaced(store):
    write_version(store)
    w = DatasetWriter(store, "ds", 4, {}, identities=IDS).__enter__()  # process "dies" inside
    w.write(rows(FACES, IDS))
    with pytest.raises(ConcurrentWriteError):
        write_version(store)  # fresh heartbeat: another writer looks alive
    assert gc(store, "ds") == []  # the newest in-progress dir is kept
    assert gc(store, "ds", stale_after_s=0, dry_run=True) == [store.uri(version_prefix("ds", 2))]
    assert store.list(version_prefix("ds", 2))
    m = write_version(store, stale_after_s=0)
    assert m["version"] == 2 and verify_version(store, "ds", 2) == []
    w._spool.cleanup()


def test_gc_removes_half_written(store, monkeypatch):
    write_version(store)
    # A writer that could not remove its version (the store unreachable then) marks it aborted.
    monkeypatch.setattr(DatasetWriter, "_remove_own", lambda self: False)
    with pytest.raises(RuntimeError), DatasetWriter(store, "ds", 4, {}, identities=IDS) as w:
        w.write(rows(FACES, IDS))
        raise RuntimeError("crash")
    marker = json.loads(store.read_bytes(f"{version_prefix('ds', 2)}/_writing.json"))
    assert marker["state"] == "aborted"
    store.write_bytes(f"{version_prefix('ds', 5)}/shards/part-00000.parquet", b"junk")  # no marker
    assert gc(store, "ds", dry_run=True) == [store.uri(version_prefix("ds", v)) for v in (2, 5)]
    assert gc(store, "ds") == [store.uri(version_prefix("ds", v)) for v in (2, 5)]
    assert {o.rel.split("/")[2] for o in store.list("datasets/ds")} == {"latest", "v1", "shards"}
    assert list_versions(store, "ds") == [1] and verify_version(store, "ds", 1) == []


def test_manifest_without_latest_move(store):
    write_version(store)
    m2 = write_version(store, ids=["bob"] * 10)
    store.write_bytes("datasets/ds/latest", b"v1")  # died between manifest and pointer
    assert latest_version(store, "ds") == 1
    m3 = write_version(store, ids=["cat"] * 10)
    assert (m2["version"], m3["version"], m3["parent"]) == (2, 3, 2)
    assert latest_version(store, "ds") == 3


def test_reader_resolves_latest_like_the_writer(store):
    """storage.dataset (the training reader) and storage.versions agree on 'latest': the
    pointer when it names a committed version, else the newest committed one."""
    from storage.dataset import load_version

    root = store.uri("").rstrip("/")
    write_version(store)
    m2 = write_version(store, ids=["bob"] * 10)
    info = load_version(root, "ds")
    assert info.version == latest_version(store, "ds") == 2
    assert info.manifest.to_dict() == m2 == read_manifest(store, "ds", "latest")
    assert [s.to_dict() for s in info.shards] == m2["shards"]
    store.write_bytes("datasets/ds/latest", b"v1")  # died between manifest and pointer
    assert load_version(root, "ds").version == latest_version(store, "ds") == 1
    store.write_bytes("datasets/ds/latest", b"v7")  # names nothing committed
    assert load_version(root, "ds").version == latest_version(store, "ds") == 2
    store.delete("datasets/ds/latest")
    assert load_version(root, "ds").version == latest_version(store, "ds") == 2


def test_writer_rejects_unknown_identity_and_empty_class(tmp_path):
    store = open_store(str(tmp_path))
    with (
        pytest.raises(ValueError, match="not in the class list"),
        DatasetWriter(store, "ds", 4, {}, identities=["amy"]) as w,
    ):
        w.write(rows(["f1"], ["bob"]))
    with (
        pytest.raises(ValueError, match="no rows"),
        DatasetWriter(store, "ds", 4, {}, identities=["amy", "bob"]) as w,
    ):
        w.write(rows(["f1"], ["amy"]))
    with pytest.raises(ConcurrentWriteError):
        DatasetWriter(store, "ds", 4, {}, identities=["amy"], parent=3).__enter__()
    assert list_versions(store, "ds") == []
    manifest_path = tmp_path / "datasets" / "ds" / "v1" / "manifest.json"
    assert not manifest_path.exists()
    write_version(store)
    assert json.loads(manifest_path.read_text())["version"] == 1


def test_class_index_and_diff():
    assert class_index(pa.array(["b", None, "a", "b"])).to_pylist() == ["a", "b"]
    old = pa.table({"face_id": ["1", "2", "3"], "identity_id": ["a", "a", "b"]})
    new = pa.table({"face_id": ["2", "3", "4"], "identity_id": ["a", "c", "c"]})
    assert diff_assignments(old, new).to_pylist() == [
        {"face_id": "1", "change": "removed", "old_identity_id": "a", "new_identity_id": None},
        {"face_id": "3", "change": "relabelled", "old_identity_id": "b", "new_identity_id": "c"},
        {"face_id": "4", "change": "added", "old_identity_id": None, "new_identity_id": "c"},
    ]
    assert diff_assignments(new, new).num_rows == 0


def test_recovery_sweeps_the_pool_shards_of_a_dead_writer(tmp_path):
    """A writer killed after uploading a new pooled shard leaves it unlisted; taking the store
    over (storage.recovery.recover) removes its directory and that shard, and keeps every shard
    a committed version lists."""
    from storage.recovery import recover

    store = open_store(str(tmp_path / "store"))
    m1 = write_version(store)
    w = DatasetWriter(store, "ds", 4, {}, identities=["amy"]).__enter__()  # dies inside
    w.write(rows(["x1", "x2", "x3", "x4"], ["amy"] * 4))  # one new shard in the pool
    pool = {o.rel for o in store.list("datasets/ds/shards")}
    listed = {f"datasets/ds/{s['file']}" for s in m1["shards"]}
    assert len(pool - listed) == 1
    recover(store)
    assert {o.rel for o in store.list("datasets/ds/shards")} == listed
    assert list_versions(store, "ds") == [1] and verify_version(store, "ds", 1) == []
    w._spool.cleanup()


def test_a_commit_killed_before_it_moved_latest_is_finished_by_the_next_writer(
    tmp_path, monkeypatch
):
    """Killed between writing v2's manifest and moving `latest`: readers of "latest" got v1
    for good (the next refresh said "dataset unchanged"), v2 kept its writer's marker, and
    `datasets gc` with retention deleted v2, the newest version, as superseded."""
    from storage.recovery import recover
    from storage.versions import finish_commits, prune_superseded

    store = open_store(str(tmp_path / "store"))
    write_version(store)

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "_move_latest", killed)
    with pytest.raises(KeyboardInterrupt):
        write_version(store, FACES[:8], IDS[:8])
    monkeypatch.undo()
    assert list_versions(store, "ds") == [1, 2] and latest_version(store, "ds") == 1
    # Retention never takes the newest committed version, whatever the pointer says (nor the
    # pointer's, until the commit is finished).
    assert prune_superseded(store, "ds", keep=None, days=1e-9, dry_run=True) == []
    from faceloop.commands.doctor import run_checks

    failed = {c["check"] for c in run_checks(store) if not c["ok"]}
    assert "latest is the newest version" in failed
    assert recover(store)  # what a writer runs under the store lock first
    assert "latest is the newest version" not in {
        c["check"] for c in run_checks(store) if not c["ok"]
    }
    assert latest_version(store, "ds") == 2
    assert not store.exists(f"{version_prefix('ds', 2)}/_writing.json")
    assert finish_commits(store, "ds") == []


def test_a_version_removed_by_hand_leaves_its_number_unused(tmp_path):
    """A corrupt v2 removed as its error said: the next publish wrote another v2, and a
    training job that had pinned v2 would read other samples under the same number."""
    st = open_store(str(tmp_path / "store"))
    write_version(st)
    write_version(st, faces=FACES[:6], ids=IDS[:6])
    assert list_versions(st, "ds") == [1, 2]
    st.delete_prefix(version_prefix("ds", 2))  # `latest` still names v2
    assert write_version(st, faces=FACES[:4], ids=IDS[:4])["version"] == 3
    assert list_versions(st, "ds") == [1, 3] and latest_version(st, "ds") == 3
    assert read_manifest(st, "ds", 3)["parent"] == 1


def test_the_record_of_a_run_stopped_after_its_publish_says_what_it_published(tmp_path):
    """A refresh stopped after its publish and before its run record (Ctrl-C in a notebook):
    the record recovery writes for it said "the next refresh publishes them" of a run that had
    published its version."""
    from storage import layout
    from storage.recovery import record_interrupted_run
    from storage.tables import append_images

    store = open_store(str(tmp_path / "store"))
    run = "20260101T000000000000Z-aaaaaa"
    image = {"image_uri": "/in/a.jpg", "image_sha256": "a" * 64, "status": "ok", "run_id": run}
    append_images(store, run, pa.Table.from_pylist([image]))
    write_version(store, meta={"run_id": run})
    record_interrupted_run(store, run, "r-next")
    doc = json.loads(store.read_bytes(layout.run_record(run)))
    assert doc["interrupted"].endswith("it had published them (ds v1)")
    other = "20260101T000000000001Z-bbbbbb"
    append_images(store, other, pa.Table.from_pylist([image | {"run_id": other}]))
    record_interrupted_run(store, other, "r-next")
    doc = json.loads(store.read_bytes(layout.run_record(other)))
    assert doc["interrupted"].endswith("the next refresh publishes them")
