"""Deletion vectors (dataset format /3): a version reuses a parent shard minus some rows.

The writer records them, every reader (iter_shards/read_shards, shard_keys, the training
reader) leaves the rows out, verify checks them, and forgetting a face that only a deletion
hides still removes it from the shard files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from faceloop.errors import StorageError
from storage.dataset import FaceShardReader, load_version
from storage.objectstore import open_store
from storage.versions import (
    DatasetWriter,
    read_shards,
    rewrite_version,
    shard_keys,
    sweep_pool,
    verify_version,
)
from tasks.publish import plan_reuse
from tests.test_versions import rows

FACES = [f"f{i:03d}" for i in range(12)]
IDS = ["amy", "bob", "cat"] * 4


def _assignments(t: pa.Table) -> dict[str, str]:
    return dict(
        zip(t.column("face_id").to_pylist(), t.column("identity_id").to_pylist(), strict=True)
    )


@pytest.fixture
def two_versions(tmp_path):
    """v1: 12 faces in three 4-row shards; v2: f001 relabelled amy and f006 removed, each
    shard reused minus those rows, the relabelled face written into a new shard."""
    store = open_store(str(tmp_path / "store"))
    with DatasetWriter(store, "ds", 4, {"run_id": "r1"}, identities=IDS) as w:
        w.write(rows(FACES, IDS))
    now_ids = dict(zip(FACES, IDS, strict=True)) | {"f001": "amy"}
    del now_ids["f006"]
    current = pa.table({"face_id": list(now_ids), "identity_id": list(now_ids.values())})
    parent = shard_keys(store, "ds", 1)
    reuse, to_write = plan_reuse(parent, current, 4, 8, max_deleted_share=0.5)
    assert [len(r.deleted) for r in reuse] == [1, 1, 0] and to_write.to_pylist() == ["f001"]
    with DatasetWriter(store, "ds", 4, {"run_id": "r2"}, identities=list(now_ids.values())) as w:
        for r in reuse:
            w.reuse(r.shard, r.keys, r.deleted)
        w.write(rows(["f001"], ["amy"]))
    return store, now_ids, w.manifest


def test_version_with_deletions_reads_verifies_and_streams_each_face_once(two_versions):
    store, now_ids, m2 = two_versions
    assert m2["format"] == "faceloop.dataset/3" and m2["deletions"]["rows"] == 2
    assert [s.get("deleted", 0) for s in m2["shards"]] == [1, 1, 0, 0]
    assert m2["num_rows"] == 11 and m2["changes"]["relabelled"] == 1
    assert m2["changes"]["removed"] == 1
    assert verify_version(store, "ds", 2) == [] and verify_version(store, "ds", 1) == []
    assert _assignments(read_shards(store, "ds", 2, ["face_id", "identity_id"])) == now_ids
    # shard_keys: the rows v2 holds, with their positions in the file.
    keys = shard_keys(store, "ds", 2)
    assert [k.column("_row").to_pylist() for _, k in keys][:2] == [[0, 2, 3], [0, 1, 3]]
    # The training reader: each face once per epoch over two ranks, with v2's labels.
    classes = sorted(set(now_ids.values()))
    seen: dict[str, int] = {}
    for rank in (0, 1):
        reader = FaceShardReader(
            store.root, "ds", 2, rank=rank, world_size=2, seed=3, shuffle_window=2
        )
        assert reader.num_samples == [5, 6][rank]  # 11 samples: [0, 5) and [5, 11)
        for _, label, jpeg in reader.iter_ids():
            face = bytes(jpeg)[len(b"\xff\xd8jpeg-") :].decode()
            assert face not in seen
            seen[face] = label
    assert seen == {f: classes.index(i) for f, i in now_ids.items()}
    assert load_version(store.root, "ds", 2).num_rows == 11
    # The parent still reads all of its rows from the same files.
    assert read_shards(store, "ds", 1).num_rows == 12


def test_tampered_deletions_are_refused(two_versions):
    store, _, m2 = two_versions
    rel = f"datasets/ds/v2/{m2['deletions']['file']}"
    store.write_bytes(rel, store.read_bytes(rel) + b"x")
    assert any("deletions" in p for p in verify_version(store, "ds", 2))
    with pytest.raises(StorageError):
        load_version(store.root, "ds", 2)
    with pytest.raises(StorageError):
        read_shards(store, "ds", 2)


def test_manifest_counts_must_match_and_unknown_formats_are_refused(two_versions):
    store, _, _ = two_versions
    rel = "datasets/ds/v2/manifest.json"
    good = store.read_bytes(rel)
    bad = json.loads(good)
    bad["shards"][0]["deleted"] = 2
    bad["num_rows"] = 10
    store.write_bytes(rel, json.dumps(bad).encode())
    with pytest.raises(StorageError, match="do not match"):
        load_version(store.root, "ds", 2)
    newer = json.loads(good) | {"format": "faceloop.dataset/9"}
    store.write_bytes(rel, json.dumps(newer).encode())
    with pytest.raises(StorageError, match="newer than this faceloop reads"):
        load_version(store.root, "ds", 2)


def test_forgetting_a_face_only_a_deletion_hides_removes_it_from_the_files(two_versions):
    """f006 is no longer in v2 but its bytes are in a shard v2 reuses: forgetting it must
    replace that shard in v2 (and v1), so no file of the dataset holds it afterwards."""
    store, now_ids, _ = two_versions
    for v in (1, 2):
        rewrite_version(store, "ds", v, lambda f: f == "f006", note={"reason": "test"})
        assert verify_version(store, "ds", v) == []
    sweep_pool(store, "ds")
    for o in store.list("datasets/ds/shards"):
        t = store.read_parquet_file(o.rel, columns=["face_id"])
        assert "f006" not in t.column("face_id").to_pylist()
    assert _assignments(read_shards(store, "ds", 2, ["face_id", "identity_id"])) == now_ids
    m2 = json.loads(store.read_bytes("datasets/ds/v2/manifest.json"))
    # The shard that held f006 was replaced by one without it; the other keeps its deletion.
    assert [s.get("deleted", 0) for s in m2["shards"]] == [1, 0, 0, 0]
    assert m2["format"] == "faceloop.dataset/3" and m2["num_rows"] == 11


def test_plan_reuse_rewrites_a_shard_past_the_deleted_share():
    from storage.manifest import ShardInfo

    info = ShardInfo("shards/x.parquet", 4, 10, "x")
    keys = pa.table(
        {
            "face_id": ["a", "b", "c", "d"],
            "identity_id": ["p", "p", "q", "q"],
            "_row": pa.array(np.arange(4, dtype=np.int32)),
        }
    )
    cur = pa.table({"face_id": ["a", "b", "c", "d"], "identity_id": ["p", "r", "r", "q"]})
    reuse, write = plan_reuse([(info, keys)], cur, 4, 8, max_deleted_share=0.25)
    assert reuse == [] and sorted(write.to_pylist()) == ["a", "b", "c", "d"]
    reuse, write = plan_reuse([(info, keys)], cur, 4, 8, max_deleted_share=0.5)
    assert [r.deleted.tolist() for r in reuse] == [[1, 2]]
    assert sorted(write.to_pylist()) == ["b", "c"]
    assert reuse[0].keys.column("face_id").to_pylist() == ["a", "d"]
