"""The run summary's totals and review queue come from a per-faces-file cache that reads only
the files written since it last ran (tasks.summary.group_summaries)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from faceloop.schema import AUTO, HUMAN, QUARANTINED, REJECTED, REVIEW
from storage import layout
from storage.objectstore import open_store
from storage.tables import (
    bump_faces_generation,
    faces_rel,
    label_overlay,
    read_faces,
    read_faces_group,
    write_group,
    write_id,
)
from tasks import summary


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, monkeypatch):
    import storage.tables

    monkeypatch.setattr(storage.tables, "STAMP_SETTLE_S", 0.0)  # every file counts as settled
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_root"))


def _group(album: str, rows: list[tuple[str, str | None, str, str | None]]) -> pa.Table:
    """rows: (face_id, identity_id, status, reason)."""
    n = len(rows)
    return pa.table(
        {
            "face_id": [f for f, _, _, _ in rows],
            "image_uri": [f"file:///photos/{album}/{f}.jpg" for f, _, _, _ in rows],
            "source_kind": ["album"] * n,
            "source_group": [album] * n,
            "identity_id": [i for _, i, _, _ in rows],
            "status": [s for _, _, s, _ in rows],
            "reason": [r for _, _, _, r in rows],
            "score": pa.array([0.5] * n, pa.float32()),
            "quality": pa.array([0.8] * n, pa.float32()),
        }
    )


def _truth(store) -> tuple[dict, pa.Table]:
    """Counts and review rows computed from every faces row, without the cache."""
    f = read_faces(store, columns=["face_id", "identity_id", "status", "reason"])
    status = f.column("status").to_pylist()
    accepted = [
        i
        for i, s in zip(f.column("identity_id").to_pylist(), status, strict=True)
        if s in (AUTO, HUMAN)
    ]
    counts = {s: status.count(s) for s in (AUTO, HUMAN, REVIEW, REJECTED, QUARANTINED)}
    counts["faces"] = len(status)
    counts["identities"] = len({i for i in accepted if i is not None})
    queue = f.filter(pc.equal(f.column("status"), REVIEW))
    return counts, queue.select(["face_id", "identity_id", "reason"]).sort_by("face_id")


def _check(store) -> None:
    counts, queue = _truth(store)
    totals = summary.store_counts(store)
    got = {s: getattr(totals, s) for s in (AUTO, HUMAN, REVIEW, REJECTED, QUARANTINED)}
    got |= {"faces": totals.faces, "identities": totals.identities}
    assert got == counts
    rel, n = summary.write_review_queue(store, "r-test")
    q = store.read_parquet_file(rel)
    assert n == queue.num_rows
    assert q.select(["face_id", "identity_id", "reason"]).sort_by("face_id").equals(queue)
    codes = dict(
        zip(q.column("face_id").to_pylist(), q.column("reason_code").to_pylist(), strict=True)
    )
    assert all(
        codes[f] == r.split(":")[0]
        for f, r in zip(queue["face_id"].to_pylist(), queue["reason"].to_pylist(), strict=True)
    )
    assert set(q.column("run_id").to_pylist()) <= {"r-test"}


def test_totals_and_queue_follow_every_kind_of_write_reading_only_what_changed(
    store, monkeypatch, faces_file_reads
):
    import storage.tables

    for k in range(4):
        write_group(
            store,
            "album",
            f"album{k}",
            _group(
                f"album{k}",
                [
                    (f"a{k}-1", f"p{k}", AUTO, None),
                    (f"a{k}-2", f"p{k}", HUMAN, None),
                    (f"a{k}-3", f"q{k}", REVIEW, "low_quality: 0.20 < 0.30"),
                    (f"a{k}-4", None, REJECTED, "no_face_match: 0.10"),
                    (f"a{k}-5", "p0", AUTO, None),  # p0 is in every album: counted once
                ],
            ),
        )
    _check(store)
    assert store.exists(layout.SUMMARY_CACHE)

    reads = faces_file_reads
    # Nothing written since: the cache is the answer; nothing is listed or read.
    reads.clear()
    with monkeypatch.context() as m:
        m.setattr(storage.tables, "faces_listing", lambda st: pytest.fail("listed"))
        summary.group_summaries(store)
    assert reads == []

    # A faces file rewritten: that file is read, no other.
    write_group(
        store,
        "album",
        "album1",
        _group(
            "album1", [("a1-1", "p1", REVIEW, "outlier: 0.21 < 0.30"), ("a1-9", "p9", AUTO, None)]
        ),
    )
    reads.clear()
    summary.group_summaries(store)
    assert reads == [faces_rel("album", "album1")]
    _check(store)

    # Labels changed alone (a label overlay, as the label stage writes one): that file is read.
    rel = faces_rel("album", "album2")
    base = read_faces_group(store, rel)
    relabelled = base.set_column(
        base.schema.get_field_index("status"), "status", pa.array([REVIEW] * base.num_rows)
    ).set_column(
        base.schema.get_field_index("reason"),
        "reason",
        pa.array(["possible_duplicate_of: x 0.61"] * base.num_rows),
    )
    bump_faces_generation(store)
    store.write_parquet(layout.labels_of(rel), label_overlay(relabelled, write_id(base) or ""))
    bump_faces_generation(store)
    reads.clear()
    summary.group_summaries(store)
    assert reads == [rel]
    _check(store)
    assert (
        summary.store_counts(store).review == 1 + 1 + 5 + 1
    )  # album0, album1, album2 whole, album3

    # A file removed drops out; the generation moved, nothing is read.
    bump_faces_generation(store)
    store.delete(faces_rel("album", "album3"))
    bump_faces_generation(store)
    reads.clear()
    summary.group_summaries(store)
    assert reads == []
    _check(store)


def test_a_cache_that_cannot_be_read_is_rebuilt(tmp_path, caplog):
    store = open_store(str(tmp_path / "store"))
    write_group(store, "album", "a", _group("a", [("f1", "p1", AUTO, None)]))
    store.write_bytes(layout.SUMMARY_CACHE, b"not parquet")
    assert summary.store_counts(store).auto == 1
    assert "ignoring the summary cache" in caplog.text
    assert summary.group_summaries(store).num_rows == 1  # the rebuilt cache reads back


def test_an_empty_store_has_no_faces_and_an_empty_queue(tmp_path):
    store = open_store(str(tmp_path / "store"))
    assert summary.store_counts(store).faces == 0
    rel, n = summary.write_review_queue(store, "r1")
    assert n == 0 and store.read_parquet_file(rel).num_rows == 0


def test_a_queue_written_before_the_faces_changed_is_not_current(tmp_path):
    """A refresh killed after its label commit left the review queue (and the push) of the
    faces before it; the next refresh, with nothing to label, kept that queue for good. It
    rewrites a queue the faces have moved on from."""
    store = open_store(str(tmp_path / "store"))
    assert not summary.review_queue_current(store)
    write_group(store, "album", "a", _group("a", [("f1", "p1", AUTO, None)]))
    summary.write_review_queue(store, "r1")
    assert summary.review_queue_current(store)
    write_group(store, "album", "b", _group("b", [("f2", "p2", "review", "outlier: 0.1")]))
    assert not summary.review_queue_current(store)
    _, n = summary.write_review_queue(store, "r2")
    assert n == 1 and summary.review_queue_current(store)
