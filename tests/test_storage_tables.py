"""faces/images tables on a local folder and on real S3."""

from __future__ import annotations

import pyarrow as pa
import pytest

from faceloop.schema import FACES_SCHEMA, IMAGES_SCHEMA
from storage.objectstore import open_store
from storage.tables import (
    append_images,
    faces_rel,
    group_key,
    iter_faces,
    latest_images,
    read_faces,
    read_images,
    write_group,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_root"))


def faces(kind: str, group: str, ids: list[str], identity: str | None = "p1") -> pa.Table:
    return pa.table(
        {
            "face_id": ids,
            "source_kind": [kind] * len(ids),
            "source_group": [group] * len(ids),
            "identity_id": [identity] * len(ids),
            "status": ["auto"] * len(ids),
            "aligned_jpeg": [b"\xff\xd8" + i.encode() for i in ids],
        }
    )


def test_group_key_is_stable_and_checked():
    assert group_key("album", "trip") == group_key("album", "trip") != group_key("album", "trip2")
    assert len(group_key("album", "x")) == 16
    assert faces_rel("idcard", "s1") == f"tables/faces/idcard/{group_key('idcard', 's1')}.parquet"
    with pytest.raises(ValueError):
        group_key("video", "x")


def test_faces_groups_replace_and_filter(store):
    assert read_faces(store).schema == FACES_SCHEMA and read_faces(store).num_rows == 0
    write_group(store, "album", "a1", faces("album", "a1", ["f1", "f2"]))
    write_group(store, "album", "a2", faces("album", "a2", ["f3"]))
    write_group(store, "idcard", "s1", faces("idcard", "s1", ["f4"], identity=None))
    assert sorted(read_faces(store, columns=["face_id"]).column("face_id").to_pylist()) == [
        "f1",
        "f2",
        "f3",
        "f4",
    ]
    # whole-group replace
    write_group(store, "album", "a1", faces("album", "a1", ["f5"], identity="p2"))
    t = read_faces(store, columns=["face_id", "identity_id", "embedding"], kinds=["album"])
    assert t.schema.names == ["face_id", "identity_id", "embedding"]
    assert sorted(
        zip(t.column("face_id").to_pylist(), t.column("identity_id").to_pylist(), strict=False)
    ) == [
        ("f3", "p1"),
        ("f5", "p2"),
    ]
    assert t.column("embedding").null_count == 2
    only = read_faces(store, columns=["face_id"], groups=[("idcard", "s1"), ("album", "missing")])
    assert only.column("face_id").to_pylist() == ["f4"]
    assert [b.num_rows for b in iter_faces(store, columns=["face_id"])] == [1, 1, 1]
    with pytest.raises(ValueError, match="other groups"):
        write_group(store, "album", "a1", faces("album", "a2", ["f9"]))
    with pytest.raises(ValueError, match="unknown columns"):
        read_faces(store, columns=["nope"])


def test_images_append_per_run(store):
    assert read_images(store).schema == IMAGES_SCHEMA
    row = {"image_uri": "/x/a.jpg", "image_sha256": "aa", "size_bytes": 3, "status": "ok"}
    append_images(store, "run-1", pa.Table.from_pylist([row]))
    append_images(store, "run-2", pa.Table.from_pylist([{**row, "image_uri": "/x/b.jpg"}]))
    append_images(store, "run-2", pa.Table.from_pylist([{**row, "image_uri": "/x/c.jpg"}]))  # retry
    append_images(store, "run-3", IMAGES_SCHEMA.empty_table())
    t = read_images(store, columns=["image_uri", "image_sha256"])
    assert sorted(t.column("image_uri").to_pylist()) == ["/x/a.jpg", "/x/c.jpg"]
    with pytest.raises(ValueError):
        append_images(store, "../evil", pa.Table.from_pylist([row]))


def test_latest_images_keeps_each_uris_newest_run(tmp_path):
    """One row per URI, the latest run's (run ids sort by time), whichever run file holds it and
    in whatever order; a URI seen once keeps its only row."""
    store = open_store(str(tmp_path / "store"))
    assert latest_images(store).num_rows == 0

    def append(run: str, uris: list[str], status: str) -> None:
        append_images(
            store,
            run,
            pa.Table.from_pylist(
                [{"image_uri": u, "image_sha256": u, "status": status, "run_id": run} for u in uris]
            ),
        )

    append("2026-12-02T10", ["/b", "/a", "/c"], "ok")
    append("2026-12-02T12", ["/c", "/d"], "quarantined")
    append("2026-12-02T11", ["/a", "/c"], "duplicate")
    t = latest_images(store, columns=["image_uri", "status", "run_id"]).sort_by("image_uri")
    assert t.to_pylist() == [
        {"image_uri": "/a", "status": "duplicate", "run_id": "2026-12-02T11"},
        {"image_uri": "/b", "status": "ok", "run_id": "2026-12-02T10"},
        {"image_uri": "/c", "status": "quarantined", "run_id": "2026-12-02T12"},
        {"image_uri": "/d", "status": "quarantined", "run_id": "2026-12-02T12"},
    ]
    assert latest_images(store, columns=["status"]).column_names == ["status"]


def _overlay_for(store, kind: str, group: str, status: str) -> str:
    """Write a label overlay giving every face of the group ``status``; its key."""
    from storage import layout
    from storage.tables import label_overlay, read_faces_group, write_id

    rel = faces_rel(kind, group)
    t = read_faces_group(store, rel)
    t = t.set_column(
        t.schema.get_field_index("status"), "status", pa.array([status] * t.num_rows, pa.string())
    )
    wid = write_id(t)
    assert wid is not None
    store.write_parquet(layout.labels_of(rel), label_overlay(t, wid))
    return layout.labels_of(rel)


def _statuses(store, **kw) -> dict[str, str]:
    t = read_faces(store, columns=["face_id", "status"], **kw)
    return dict(zip(t.column("face_id").to_pylist(), t.column("status").to_pylist(), strict=True))


def test_a_label_overlay_replaces_the_labels_of_its_faces_file_write_only(store):
    """A label overlay (what the label stage writes when only labels changed) is what every
    reader sees, whole table or one group, labels asked for or not; crops and embeddings stay
    the faces file's. A new write of the faces file makes it stale (ignored), and removes it."""
    from storage import layout
    from storage.tables import read_faces_file

    write_group(store, "album", "a1", faces("album", "a1", ["f1", "f2"]))
    write_group(store, "album", "a2", faces("album", "a2", ["f3"]))
    ov = _overlay_for(store, "album", "a1", "review")
    want = {"f1": "review", "f2": "review", "f3": "auto"}
    assert _statuses(store) == want  # one listing of the overlays
    assert _statuses(store, groups=[("album", "a1"), ("album", "a2")]) == want  # one by one
    one = read_faces_file(store, faces_rel("album", "a1"), columns=["status"])
    assert one.column("status").to_pylist() == ["review", "review"]
    assert one.schema.metadata is None and one.column_names == ["status"]
    crops = read_faces(store, columns=["face_id", "aligned_jpeg"], groups=[("album", "a1")])
    assert crops.column("aligned_jpeg").to_pylist() == [b"\xff\xd8f1", b"\xff\xd8f2"]

    # The faces file written again (as every writer does: from the merged rows) folds the
    # overlay in; the overlay goes, and one put back by hand no longer applies.
    stale = store.read_bytes(ov)
    write_group(store, "album", "a1", faces("album", "a1", ["f1", "f2"], identity="p9"))
    assert not store.exists(ov)
    store.write_bytes(ov, stale)
    assert _statuses(store) == {"f1": "auto", "f2": "auto", "f3": "auto"}
    assert layout.faces_of(ov) == faces_rel("album", "a1")


def test_a_label_overlay_for_other_faces_is_ignored(store):
    """An overlay must list the faces of its file in the same order: one whose rows differ
    (a file rewritten by a writer that kept the old metadata) is not applied."""
    from storage import layout
    from storage.tables import label_overlay, read_faces_group, write_id

    write_group(store, "album", "a1", faces("album", "a1", ["f1", "f2"]))
    rel = faces_rel("album", "a1")
    t = read_faces_group(store, rel)
    wid = write_id(t)
    assert wid is not None
    other = t.slice(0, 1).set_column(
        t.schema.get_field_index("status"), "status", pa.array(["rejected"], pa.string())
    )
    store.write_parquet(layout.labels_of(rel), label_overlay(other, wid))
    assert _statuses(store) == {"f1": "auto", "f2": "auto"}
