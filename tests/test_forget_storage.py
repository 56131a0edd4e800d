"""Unit tier of forgetting: version rewrite stays verifiable, retention, keyed digests, the
store secret's mode, and discovery skipping tombstoned content and subjects."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from faceloop.config import SourceSpec, load_settings
from faceloop.vocab import InputCode
from storage import layout
from storage.forget import Matcher
from storage.objectstore import open_store
from storage.privacy import Keyed, Tombstones, write_tombstones
from storage.versions import (
    DatasetWriter,
    list_versions,
    prune_superseded,
    read_shards,
    read_table,
    rewrite_version,
    verify_version,
)


def _publish(store, rows):
    ids = [r["identity_id"] for r in rows]
    with DatasetWriter(store, "faces", shard_rows=2, identities=ids) as w:
        w.write(pa.Table.from_pylist(rows))


def _row(fid: str, ident: str) -> dict:
    return {"face_id": fid, "identity_id": ident, "image": b"jpeg" + fid.encode(), "quality": 1.0}


def _id_photos(st, *photos: tuple[str, str, str, str, dict]) -> None:
    """ID-card photos (subject, file, sha256, face id, other face columns), each with one face,
    as a run "r1" that decoded them records them: image rows, one faces file per subject."""
    from storage.tables import append_images, write_group

    rows, faces = [], {}
    for subject, file, sha, face_id, more in photos:
        role = "id" if file.startswith("id.") else "live"
        row = {"image_uri": f"/ids/{subject}/{file}", "image_sha256": sha}
        row |= {"source_kind": "idcard", "source_group": subject, "role": role, "run_id": "r1"}
        rows.append(row | {"status": "ok"})
        faces.setdefault(subject, []).append(row | {"face_id": face_id} | more)
    append_images(st, "r1", pa.Table.from_pylist(rows))
    for subject, group in faces.items():
        write_group(st, "idcard", subject, pa.Table.from_pylist(group))


def test_rewrite_version_drops_rows_and_verifies(tmp_path: Path):
    st = open_store(str(tmp_path))
    _publish(st, [_row("a" * 20, "id-a"), _row("b" * 20, "id-b"), _row("c" * 20, "id-b")])
    _publish(st, [_row("a" * 20, "id-a"), _row("b" * 20, "id-b"), _row("d" * 20, "id-c")])
    keyed = Keyed.of(st)
    assert keyed is not None
    m = Matcher(keyed, {keyed.digest("token", "a" * 20)})
    assert sum(rewrite_version(st, "faces", v, m.hit) for v in list_versions(st, "faces")) == 2
    for v in (1, 2):
        assert verify_version(st, "faces", v) == []
        t = read_shards(st, "faces", v)
        assert "a" * 20 not in t.column("face_id").to_pylist()
        classes = read_table(st, "faces", v, "classes").to_pylist()
        assert "id-a" not in {c["identity_id"] for c in classes}
        assert sorted(set(t.column("label").to_pylist())) == list(range(len(classes)))
        assert "a" * 20 not in read_table(st, "faces", v, "changes").column("face_id").to_pylist()
    files = b"".join(p.read_bytes() for p in (tmp_path / "datasets").rglob("*") if p.is_file())
    assert b"a" * 20 not in files
    assert (tmp_path / layout.STORE_SECRET).stat().st_mode & 0o777 == 0o600
    assert rewrite_version(st, "faces", 2, m.hit) == 0  # idempotent


def test_prune_superseded_keeps_latest(tmp_path: Path):
    st = open_store(str(tmp_path))
    for i in range(4):
        _publish(st, [_row(f"{i:020d}", "id-a")])
    removed = prune_superseded(st, "faces", keep=1)
    assert len(removed) == 2
    assert list_versions(st, "faces") == [3, 4]
    assert prune_superseded(st, "faces", keep=None, days=None) == []


def _photo_a_and_s1_forgotten(tmp_path: Path, src: Path):
    """A store under ``tmp_path/store`` whose tombstones keep out the content b"photo-a" and
    subject S1, with the album and ID-card sources of ``src``: (store, settings, its keyed
    digests, photo-a's sha256)."""
    import hashlib

    st = open_store(str(tmp_path / "store"))
    keyed = Keyed.of(st)
    assert keyed is not None
    sha_a = hashlib.sha256(b"photo-a").hexdigest()
    write_tombstones(
        st,
        Tombstones(images={keyed.digest("image", sha_a)}, subjects={keyed.digest("subject", "S1")}),
    )
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[
            SourceSpec(kind="album", uri=str(src / "albums")),
            SourceSpec(kind="idcard", uri=str(src / "idcards")),
        ],
    )
    return st, settings, keyed, sha_a


def test_discover_skips_tombstoned(tmp_path: Path):

    from tasks.discover import discover

    src = tmp_path / "src"
    (src / "albums" / "trip").mkdir(parents=True)
    (src / "idcards" / "S1").mkdir(parents=True)
    (src / "albums" / "trip" / "a.jpg").write_bytes(b"photo-a")
    (src / "albums" / "trip" / "b.jpg").write_bytes(b"photo-b")
    (src / "idcards" / "S1" / "id.jpg").write_bytes(b"id-1")
    for p in src.rglob("*.jpg"):  # old photos: discovery remembers their stamps
        os.utime(p, (1_600_000_000, 1_600_000_000))
    st, settings, keyed, sha_a = _photo_a_and_s1_forgotten(tmp_path, src)
    res = discover(settings, st, "20250101T000000Z-abcdef")
    assert res.new == 1 and res.forgotten == 2 and res.quarantined == 2
    for row in res.quarantined_rows:
        assert row["reason_code"] == "forgotten"
        assert row["image_uri"].startswith("forgotten:") and row["source_group"] == ""
        assert sha_a not in str(row) and "S1" not in str(row)
    # Discovery's stat cache remembers the file it may see again, never a forgotten one.
    from tasks.discover import read_stamps

    stamps = read_stamps(st)
    raw = {u for u in stamps if not u.startswith("forgotten:")}
    assert raw == {str(src / "albums" / "trip" / "b.jpg")}
    assert sha_a not in str(stamps) and "S1" not in str(stamps)
    # The forgotten files are remembered under keyed names: a refresh with nothing changed
    # reads none of them again (each one was hashed at every refresh).
    again = discover(settings, st, "20250102T000000Z-abcdef")
    assert (again.hashed, again.forgotten, again.new) == (0, 2, 1)
    # Lifted, the subject's file is read and taken in like any other.
    write_tombstones(st, Tombstones(images={keyed.digest("image", sha_a)}))
    lifted = discover(settings, st, "20250103T000000Z-abcdef")
    assert (lifted.hashed, lifted.forgotten, lifted.new) == (1, 1, 2)


def test_explain_of_a_forgotten_subject_says_it_was_forgotten(tmp_path: Path, capsys):
    """An access request for an ID subject `faceloop forget` took: explain said only "no face
    or image", as for a name the store never held."""
    from faceloop.cli import main

    src = tmp_path / "src"
    (src / "albums").mkdir(parents=True)
    (src / "idcards").mkdir(parents=True)
    _photo_a_and_s1_forgotten(tmp_path, src)
    capsys.readouterr()
    assert main(["explain", "S1", "--store", str(tmp_path / "store")]) == 1
    assert "ID subject 'S1' was forgotten" in capsys.readouterr().err
    assert main(["explain", "S2", "--store", str(tmp_path / "store")]) == 1
    assert "no face or image 'S2'" in capsys.readouterr().err


def test_a_store_restored_without_its_secret_is_refused_not_given_a_new_one(tmp_path: Path):
    """A backup that left state/secret out: doctor said all ok, and the refresh made a new
    secret without a word, under which the tombstones matched nothing: forgotten people's
    photos were taken in again."""
    from faceloop.commands.doctor import run_checks
    from faceloop.errors import StorageError
    from storage.secret import _cache
    from tasks.discover import discover

    src = tmp_path / "src"
    (src / "albums" / "trip").mkdir(parents=True)
    (src / "idcards" / "S1").mkdir(parents=True)
    (src / "albums" / "trip" / "a.jpg").write_bytes(b"photo-a")
    (src / "idcards" / "S1" / "id.jpg").write_bytes(b"id-1")
    st, settings, _, _ = _photo_a_and_s1_forgotten(tmp_path, src)
    assert {c["check"]: c["ok"] for c in run_checks(st)}["store secret"] is True
    st.delete(layout.STORE_SECRET)
    _cache.clear()  # a new process
    check = {c["check"]: c for c in run_checks(st)}["store secret"]
    assert not check["ok"] and "tombstones" in check["detail"]
    with pytest.raises(StorageError, match=r"state/secret is missing, but state/tombstones"):
        discover(settings, st, "20250101T000000Z-abcdef")
    assert not st.exists(layout.STORE_SECRET)
    # A store nothing is keyed in yet makes its secret on first use, as before.
    fresh = open_store(str(tmp_path / "fresh"))
    from storage.secret import store_secret

    assert len(store_secret(fresh)) == 32


def test_gc_applies_retention_by_age_and_count(tmp_path: Path):
    """`datasets gc` with `retention:` removes run records and reports older than their bound
    (by the run id's time) and superseded versions beyond the count; recent ones stay."""
    from faceloop.cli import main
    from faceloop.runids import new_run_id

    root = tmp_path / "store"
    st = open_store(str(root))
    old, new = "20200101T000000Z-aaaaaa", new_run_id()
    for run in (old, new):
        st.write_bytes(layout.run_record(run), b"{}")
        st.write_bytes(layout.run_report(run), b"<html></html>")
    for i in range(3):
        _publish(st, [_row(f"{i:020d}", "id-a")])
    cfg = tmp_path / "retention.yaml"
    cfg.write_text(
        "retention: {run_records_days: 30, reports_days: 30, superseded_versions_keep: 1}\n"
    )
    args = ["datasets", "gc", "--store", str(root), "--config", str(cfg)]
    assert main([*args, "--dry-run"]) == 0
    assert st.exists(layout.run_record(old)) and list_versions(st, "faces") == [1, 2, 3]
    assert main(args) == 0
    assert not st.exists(layout.run_record(old)) and not st.exists(layout.run_report(old))
    assert st.exists(layout.run_record(new)) and st.exists(layout.run_report(new))
    assert list_versions(st, "faces") == [2, 3]
    assert all(verify_version(st, "faces", v) == [] for v in (2, 3))
    # The newest record and report stay whatever their age: gc on a store whose last run was
    # long ago left `status` saying "runs: none yet".
    st.delete(layout.run_record(new))
    st.delete(layout.run_report(new))
    older = "20200102T000000Z-bbbbbb"
    for run in (old, older):
        st.write_bytes(layout.run_record(run), b"{}")
        st.write_bytes(layout.run_report(run), b"<html></html>")
    assert main(args) == 0
    assert not st.exists(layout.run_record(old)) and not st.exists(layout.run_report(old))
    assert st.exists(layout.run_record(older)) and st.exists(layout.run_report(older))


def test_scrub_reads_faces_with_their_label_overlays(tmp_path: Path):
    """Forget removes a face from a group whose labels live in an overlay: the group is
    written back with the overlay's labels folded in (none lost, none of the forgotten face
    left in either file), and an overlay whose faces file had no hit is scrubbed too."""
    import pyarrow as pa

    from storage import layout
    from storage.forget import Matcher, scrub
    from storage.privacy import Keyed
    from storage.tables import (
        faces_rel,
        label_overlay,
        read_faces,
        read_faces_group,
        write_group,
        write_id,
    )

    # The forgotten face's id: long enough that no file's random write id can hold it (a
    # two-letter "f2" matched the uuid in the other group's file about one run in three).
    gone = "face-to-forget"
    store = open_store(str(tmp_path / "store"))

    def group(name: str, ids: list[str]) -> pa.Table:
        n = len(ids)
        return pa.table(
            {
                "face_id": ids,
                "source_kind": ["album"] * n,
                "source_group": [name] * n,
                "identity_id": ["p1"] * n,
                "status": ["auto"] * n,
            }
        )

    for name, ids in (("a1", ["f1", gone, "f3"]), ("a2", ["f4"])):
        write_group(store, "album", name, group(name, ids))
        rel = faces_rel("album", name)
        t = read_faces_group(store, rel)
        t = t.set_column(
            t.schema.get_field_index("identity_id"),
            "identity_id",
            pa.array(["p7"] * t.num_rows, pa.string()),
        )
        store.write_parquet(layout.labels_of(rel), label_overlay(t, str(write_id(t))))
    keyed = Keyed.of(store)
    assert keyed is not None
    m = Matcher(keyed, [])
    m.add(gone)
    m.add("p9")  # in no file
    counts = scrub(store, m, None)
    assert counts.face_rows == 1
    faces = read_faces(store, columns=["face_id", "identity_id"]).to_pylist()
    assert sorted(faces, key=lambda r: r["face_id"]) == [
        {"face_id": "f1", "identity_id": "p7"},
        {"face_id": "f3", "identity_id": "p7"},
        {"face_id": "f4", "identity_id": "p7"},
    ]
    assert not store.exists(layout.labels_of(faces_rel("album", "a1")))
    assert store.exists(layout.labels_of(faces_rel("album", "a2")))
    for o in store.list("tables"):
        assert gone.encode() not in store.read_bytes(o.rel)


def test_a_scrub_that_lost_the_lock_writes_nothing_more(tmp_path: Path):
    """A forget resumed after another writer took its lock over went on writing and removed
    that writer's staging: scrub asks the lock before each file it writes or removes."""
    import pyarrow as pa

    from faceloop.errors import StoreLockedError
    from storage import layout
    from storage.forget import Matcher, scrub
    from storage.privacy import Keyed
    from storage.tables import read_faces, write_group

    store = open_store(str(tmp_path / "store"))
    for name in ("a1", "a2"):
        ids = [f"face-{name}-{k}" for k in range(2)]
        write_group(
            store,
            "album",
            name,
            pa.table({"face_id": ids, "source_kind": ["album"] * 2, "source_group": [name] * 2}),
        )
    store.write_bytes(layout.staging_dir("run-live") + "/pending.parquet", b"the taker's")
    keyed = Keyed.of(store)
    assert keyed is not None
    m = Matcher(keyed, [])
    m.add("face-a1-0")
    m.add("face-a2-0")
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 1:
            raise StoreLockedError("lost the store lock to refresh run run-live")

    with pytest.raises(StoreLockedError):
        scrub(store, m, None, check=check)
    left = set(read_faces(store, columns=["face_id"]).column(0).to_pylist())
    assert len(left & {"face-a1-0", "face-a2-0"}) == 1  # one file scrubbed, then it stopped
    assert store.exists(layout.staging_dir("run-live") + "/pending.parquet")


def test_gc_dry_run_counts_the_forgotten_rows_it_would_remove(tmp_path: Path):
    """`datasets gc --dry-run` said nothing of the versions it would rewrite for tombstoned
    faces; the real gc then removed 37 rows."""
    from storage.forget import face_matcher, tombstoned_faces_in_datasets

    st = open_store(str(tmp_path))
    _publish(st, [_row("a" * 20, "id-a"), _row("b" * 20, "id-b")])
    _publish(st, [_row("a" * 20, "id-a"), _row("c" * 20, "id-c")])
    keyed = Keyed.of(st)
    assert keyed is not None
    tomb = Tombstones()
    tomb.faces.add(keyed.digest("face", "a" * 20))
    write_tombstones(st, tomb)
    m = face_matcher(st)
    assert m is not None
    before = {p: p.read_bytes() for p in (tmp_path / "datasets").rglob("*") if p.is_file()}
    assert tombstoned_faces_in_datasets(st, m, dry_run=True) == 2
    assert {p: p.read_bytes() for p in (tmp_path / "datasets").rglob("*") if p.is_file()} == before
    # doctor said "ok" to versions holding a forgotten face (one copied back from a backup).
    from faceloop.commands.doctor import run_checks

    def forgotten_check() -> dict:
        (c,) = [c for c in run_checks(st) if c["check"] == "no forgotten face in a dataset version"]
        return c

    c = forgotten_check()
    assert not c["ok"] and "v1: 1 rows" in c["detail"] and "datasets gc" in c["detail"]
    assert tombstoned_faces_in_datasets(st, m) == 2
    assert tombstoned_faces_in_datasets(st, m, dry_run=True) == 0
    assert forgotten_check()["ok"]


def test_forgetting_a_content_keeps_the_photo_that_replaced_it_at_its_path(tmp_path: Path):
    """`forget --image <sha256>` of an old ID photo also removed the new ID photo written over
    it at the same path (its rows and faces matched by the shared URI), and the next refresh
    detected it again from scratch, any label on it lost."""
    import pyarrow as pa

    from storage.forget import Matcher, plan, scrub
    from storage.privacy import Keyed, digests
    from storage.tables import append_images, read_faces, read_images, write_group

    store = open_store(str(tmp_path / "store"))
    uri, old, new = "/ids/S09/id.jpg", "a" * 64, "b" * 64
    for run, sha in (("r1", old), ("r2", new)):
        append_images(
            store,
            run,
            pa.Table.from_pylist(
                [
                    {
                        "image_uri": uri,
                        "image_sha256": sha,
                        "source_kind": "idcard",
                        "source_group": "S09",
                        "role": "id",
                        "status": "ok",
                        "run_id": run,
                    }
                ]
            ),
        )
    faces = [
        {
            "face_id": f"face-{sha[:1]}-000000001",
            "image_uri": uri,
            "image_sha256": sha,
            "source_kind": "idcard",
            "source_group": "S09",
            "role": "id",
            "run_id": run,
        }
        for run, sha in (("r1", old), ("r2", new))
    ]
    write_group(store, "idcard", "S09", pa.Table.from_pylist(faces))
    p = plan(store, images=[old])
    assert p.face_ids == {"face-a-000000001"} and uri not in p.uris
    keyed = Keyed.of(store)
    assert keyed is not None
    scrub(store, Matcher(keyed, digests(keyed, "token", p.tokens)), None)
    assert [r["face_id"] for r in read_faces(store, columns=["face_id"]).to_pylist()] == [
        "face-b-000000001"
    ]
    assert read_images(store).column("image_sha256").to_pylist() == [new]
    # Asked by path, the path's every content goes.
    assert plan(store, images=[uri]).face_ids == {"face-b-000000001"}


def test_another_file_of_a_forgotten_photo_goes_with_it(tmp_path: Path):
    """A re-encoded copy of a photo: its face is rejected as `same_capture`, "the same face as
    <the photo's face id>". Forgetting the photo (or its identity) deleted the copy's face row,
    whose reason held the forgotten id, but not the copy's image row: uncounted by the dry run,
    no tombstone, and `doctor` failed for good on an image without its face."""
    import pyarrow as pa

    from faceloop.vocab import SAME_CAPTURE
    from storage.forget import plan, scrub
    from storage.privacy import digests
    from storage.tables import append_images, read_faces, read_images, write_group

    store = open_store(str(tmp_path / "store"))
    photos = {"/albums/A/p0.jpg": "a" * 64, "/albums/A/p0_again.jpg": "b" * 64}
    photos["/albums/A/other.jpg"] = "c" * 64
    append_images(
        store,
        "r1",
        pa.Table.from_pylist(
            [
                {
                    "image_uri": uri,
                    "image_sha256": sha,
                    "source_kind": "album",
                    "source_group": "A",
                    "role": "album",
                    "status": "ok",
                    "run_id": "r1",
                }
                for uri, sha in photos.items()
            ]
        ),
    )

    def face(uri: str, fid: str, ident: str | None, **kw: str) -> dict:
        return {
            "face_id": fid,
            "image_uri": uri,
            "image_sha256": photos[uri],
            "source_kind": "album",
            "source_group": "A",
            "role": "album",
            "identity_id": ident,
            "run_id": "r1",
            "reason": None,
            "reason_code": None,
            **kw,
        }

    orig = "f" + "1" * 31
    write_group(
        store,
        "album",
        "A",
        pa.Table.from_pylist(
            [
                face("/albums/A/p0.jpg", orig, "P0", status="auto"),
                face(
                    "/albums/A/p0_again.jpg",
                    "f" + "2" * 31,
                    None,
                    status="rejected",
                    reason=f"same_capture: the same face as {orig}, of another file of this photo",
                    reason_code=SAME_CAPTURE,
                ),
                face("/albums/A/other.jpg", "f" + "3" * 31, "P1", status="auto"),
            ]
        ),
    )
    for request in ({"identities": ["P0"]}, {"images": ["/albums/A/p0.jpg"]}):
        p = plan(store, **request)
        assert p.face_ids == {orig, "f" + "2" * 31}, request
        assert p.shas == {"a" * 64, "b" * 64}
    keyed = Keyed.of(store)
    assert keyed is not None
    scrub(store, Matcher(keyed, digests(keyed, "token", p.tokens)), None)
    assert read_faces(store, columns=["face_id"]).column("face_id").to_pylist() == ["f" + "3" * 31]
    assert read_images(store).column("image_uri").to_pylist() == ["/albums/A/other.jpg"]


def test_a_copy_of_a_forgotten_photo_keeps_the_photo_written_over_it_later(tmp_path: Path):
    """A `same_capture` copy of a photo whose path later holds another person's photo:
    forgetting the first photo took the path along (the copy went by its path, not by its
    content as byte copies do), so the other person's image row, face and a face tombstone
    were erased with it. The copy goes by its sha256; the path holding a kept photo stays."""
    import pyarrow as pa

    from faceloop.vocab import SAME_CAPTURE
    from storage.forget import plan, scrub
    from storage.privacy import digests
    from storage.tables import append_images, read_faces, read_images, write_group

    store = open_store(str(tmp_path / "store"))
    orig, copy = "/albums/A/p0.jpg", "/albums/A/p0_again.jpg"
    recorded = [(orig, "a" * 64, "r1"), (copy, "b" * 64, "r1"), (copy, "d" * 64, "r2")]
    for run in ("r1", "r2"):
        rows = [
            {"image_uri": uri, "image_sha256": sha, "source_kind": "album", "run_id": r}
            | {"source_group": "A", "role": "album", "status": "ok"}
            for uri, sha, r in recorded
            if r == run
        ]
        append_images(store, run, pa.Table.from_pylist(rows))

    def face(i: int, fid: str, ident: str | None, **kw: str) -> dict:
        uri, sha, run = recorded[i]
        row = {"face_id": fid, "image_uri": uri, "image_sha256": sha, "source_kind": "album"}
        row |= {"source_group": "A", "role": "album", "identity_id": ident, "run_id": run}
        return row | {"reason": None, "reason_code": None} | kw

    first = "f" + "1" * 31
    write_group(
        store,
        "album",
        "A",
        pa.Table.from_pylist(
            [
                face(0, first, "P0", status="auto"),
                face(
                    1,
                    "f" + "2" * 31,
                    None,
                    status="rejected",
                    reason=f"same_capture: the same face as {first}, of another file of this photo",
                    reason_code=SAME_CAPTURE,
                ),
                face(2, "f" + "4" * 31, "P2", status="auto"),
            ]
        ),
    )
    for request in ({"identities": ["P0"]}, {"images": [orig]}):
        p = plan(store, **request)
        assert p.face_ids == {first, "f" + "2" * 31}, request
        assert p.shas == {"a" * 64, "b" * 64} and p.uris == {orig}, request
    keyed = Keyed.of(store)
    assert keyed is not None
    scrub(store, Matcher(keyed, digests(keyed, "token", p.tokens)), None)
    assert read_faces(store, columns=["face_id"]).column("face_id").to_pylist() == ["f" + "4" * 31]
    assert read_images(store).column("image_sha256").to_pylist() == ["d" * 64]


def test_a_forget_killed_before_its_tombstones_is_finished_with_them(tmp_path: Path, monkeypatch):
    """A forget killed after writing its tombstones and before its pending record left every
    row of the person, `doctor` clean and `--resume` with "nothing to resume"; had it been
    killed the other way round the photos would come back. The pending record is written
    first and carries the tombstones, so resuming finishes both. The subject's tombstone is
    not its pseudonym (published classes and Label Studio show that)."""
    import storage.privacy as privacy
    from faceloop.cli import main
    from storage.forget import finish_interrupted
    from storage.secret import pseudonym
    from storage.tables import read_faces

    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("Alice_W", "id.jpg", "a" * 64, "f1", {}))

    def killed(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(privacy, "add_tombstones", killed)
    assert main(["forget", "--store", store, "--subject", "Alice_W", "--yes"]) == 130
    monkeypatch.undo()
    assert not privacy.read_tombstones(st)
    pending = privacy.read_pending(st)
    assert pending is not None and pending.tombstones.subjects
    assert finish_interrupted(st, "r2") is not None
    assert not len(read_faces(st)) and privacy.read_pending(st) is None
    # The killed forget wrote no audit line: the run that finished it says what it had asked.
    (line,) = privacy.read_audit(st)
    assert line["action"] == "resume" and line["by"] == "refresh"
    (asked,) = line["resumed"]
    assert asked["request"] == {"identity": 0, "subject": 1, "image": 0}
    assert len(asked["targets"]) == 1 and asked["found"] == {"images": 1, "faces": 1}
    assert "Alice_W" not in json.dumps(line)
    tomb = privacy.read_tombstones(st)
    keyed = Keyed.of(st)
    assert keyed is not None
    assert tomb.subjects == {privacy.subject_tombstone(keyed, "Alice_W")}
    assert not [t for t in tomb.subjects if t.startswith(pseudonym(st, "subject", "Alice_W"))]
    assert privacy.TombstoneCheck(st).subject("Alice_W")


def test_a_forget_repeated_is_done_and_one_matching_nothing_touches_nothing(tmp_path: Path, capsys):
    """Repeating a finished `forget --subject` exited 1 with "nothing found", and a request
    matching nothing (a mistyped identity) still deleted the label state, the publish keys and
    the summary cache, so the next refresh rebuilt them from every album."""
    from faceloop.cli import main

    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("S7", "id.jpg", "b" * 64, "f7", {}))
    assert main(["forget", "--store", store, "--subject", "S7", "--yes"]) == 0
    assert main(["forget", "--store", store, "--subject", "S7", "--yes"]) == 0
    assert "1 subject request(s) already carried out" in capsys.readouterr().out
    # The audit says so too (it recorded the repeat as "not found"), and so does a dry run.
    from storage.privacy import read_audit

    repeat = read_audit(st)[-1]
    assert repeat["not_found"] == {} and repeat["already_done"] == {"subject": 1}
    assert main(["forget", "--store", store, "--subject", "S7", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "already carried out" in out.out and "nothing found" not in out.err

    caches = [layout.LABEL_META, layout.SUMMARY_CACHE]
    for rel in caches:
        st.write_bytes(rel, b"{}")
    generation = (
        st.read_bytes(layout.FACES_GENERATION) if st.exists(layout.FACES_GENERATION) else None
    )
    assert main(["forget", "--store", store, "--identity", "id-typo", "--yes"]) == 1
    assert "nothing found for 1 identity request(s)" in capsys.readouterr().err
    assert all(st.exists(rel) for rel in caches)
    assert generation == (
        st.read_bytes(layout.FACES_GENERATION) if st.exists(layout.FACES_GENERATION) else None
    )


def test_forget_dry_run_counts_and_changes_nothing(tmp_path: Path, capsys):
    """A DPO asked what a forget would take before confirming it: there was no --dry-run, and
    the prompt named no photo or face count."""
    import hashlib

    from faceloop.cli import main

    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("S8", "id.jpg", "d" * 64, "f8", {}))

    def snapshot() -> dict[str, str]:
        return {
            str(p.relative_to(tmp_path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (tmp_path / "store").rglob("*")
            if p.is_file()
        }

    before = snapshot()
    assert main(["forget", "--store", store, "--subject", "S8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would forget 1 images with 1 faces" in out and "nothing was changed" in out
    assert main(["forget", "--store", store, "--subject", "nobody", "--dry-run"]) == 1
    assert snapshot() == before


def test_a_mistyped_subject_tombstone_can_be_lifted(tmp_path: Path, capsys):
    """`forget --subject` with a typo tombstoned that folder name for good: no command took it
    back, so a real subject of that name would never be taken in."""
    from faceloop.cli import main
    from storage.privacy import TombstoneCheck, read_audit

    store = str(tmp_path / "store")
    open_store(store).write_bytes("state/.keep", b"")
    assert main(["forget", "--store", store, "--subject", "S00l", "--yes"]) == 1
    assert TombstoneCheck(open_store(store)).subject("S00l")
    assert main(["forget", "--store", store, "--lift-subject", "S00l", "--yes"]) == 0
    assert not TombstoneCheck(open_store(store)).subject("S00l")
    assert read_audit(open_store(store))[-1]["action"] == "lift"
    assert main(["forget", "--store", store, "--lift-subject", "S00l", "--yes"]) == 1
    assert main(["forget", "--store", store, "--lift-subject", "x", "--subject", "y"]) == 2


def test_forget_image_reads_an_s3_object_for_its_content(s3_root: str, tmp_path: Path) -> None:
    """`forget --image s3://...` of a photo not taken in yet said "no file there" and wrote no
    tombstone: the next refresh took the photo in. Its bytes are read now, as a local file's."""
    import hashlib

    from faceloop.cli import main
    from faceloop.hashing import image_keys
    from storage.objectstore import remote_sha256
    from storage.privacy import Keyed, TombstoneCheck

    src = open_store(s3_root)
    data = b"a photo not seen yet" * 20
    src.write_bytes("src/a1/new.jpg", data)
    uri = f"{s3_root}/src/a1/new.jpg"
    assert image_keys(uri, remote_sha256) == ([uri], hashlib.sha256(data).hexdigest())
    assert image_keys(f"{s3_root}/src/a1/none.jpg", remote_sha256)[1] is None
    store = str(tmp_path / "store")
    open_store(store).write_bytes("state/store_id", b"0123456789abcdef")
    assert main(["forget", "--store", store, "--image", uri, "--yes"]) == 0
    st = open_store(store)
    assert Keyed.of(st, create=False) is not None
    assert TombstoneCheck(st).image(hashlib.sha256(data).hexdigest())


def test_a_forget_cut_short_by_the_store_says_how_it_is_finished(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """An S3 outage in a forget's store work printed only the storage error, with face rows
    already gone and dataset versions still holding the faces: nothing said it was pending."""
    import storage.forget as forget_mod
    from faceloop.cli import main
    from faceloop.errors import TransientStorageError
    from storage.privacy import read_pending

    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("S9", "id.jpg", "c" * 64, "f9", {}))

    def outage(*_a: object, **_k: object) -> None:
        raise TransientStorageError("get s3://b/k: gave up after 3 attempts")

    monkeypatch.setattr(forget_mod, "scrub", outage)
    assert main(["forget", "--store", store, "--subject", "S9", "--yes"]) != 0
    assert "forget --resume" in capsys.readouterr().err
    assert read_pending(st) is not None
    monkeypatch.undo()
    assert main(["forget", "--store", store, "--resume", "--yes"]) == 0
    assert read_pending(st) is None


def test_a_forget_killed_between_its_store_work_and_its_audit_line_is_audited(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Killed after its store work, before its audit line: the pending record was deleted with
    the work done (its requests with it), so no line ever recorded the erasure; `--resume`
    wrote one with nothing resumed, and a repeat said "nothing found"."""
    import storage.privacy as privacy
    from faceloop.cli import main
    from faceloop.commands.doctor import run_checks
    from storage.forget import finish_interrupted
    from storage.privacy import read_audit, read_pending

    real = privacy.audit

    def killed(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    for how in ("resume", "refresh"):
        store = str(tmp_path / how)
        st = open_store(store)
        _id_photos(st, ("S9", "id.jpg", "c" * 64, "f9", {}))
        monkeypatch.setattr(privacy, "audit", killed)
        assert main(["forget", "--store", store, "--subject", "S9", "--yes"]) == 130
        monkeypatch.setattr(privacy, "audit", real)
        pending = read_pending(st)
        assert pending is not None and pending.store_done and len(pending.requests) == 1
        check = next(c for c in run_checks(st) if c["check"] == "forget finished")
        assert not check["ok"] and "audit line" in check["detail"]
        if how == "resume":
            capsys.readouterr()
            assert main(["forget", "--store", store, "--resume", "--dry-run"]) == 0
            said = capsys.readouterr().out
            assert "would resume a forget: 0 Label Studio tasks" in said
            assert "the audit line of 1 request(s)" in said and read_pending(st) is not None
            assert main(["forget", "--store", store, "--resume", "--yes"]) == 0
        else:
            assert finish_interrupted(st, "r-next") is not None
        line = read_audit(st)[-1]
        assert line["action"] == "resume" and line["resumed"] == pending.requests
        assert read_pending(st) is None
        capsys.readouterr()
        assert main(["forget", "--store", store, "--subject", "S9", "--yes"]) == 0
        assert "already carried out" in capsys.readouterr().out


def test_a_forget_drops_the_shards_it_replaced_from_this_machines_reader_cache(
    tmp_path: Path, monkeypatch
) -> None:
    """After a forget rewrote the versions, the training reader's shard cache still held the
    replaced shards, forgotten faces in them (16 of 16 and 11 of 52 rows in a probe)."""
    from faceloop.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("FACELOOP_CACHE_DIR", str(cache))
    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("S5", "id.jpg", "d" * 64, "f" * 20, {}))
    _publish(st, [_row("f" * 20, "S5"), _row("g" * 20, "id-g"), _row("h" * 20, "id-h")])
    pool = st.root + "/datasets/faces/shards"
    before = {p.name for p in Path(pool).iterdir()}
    cache.mkdir()
    for name in before:  # every shard cached, as a job reading a remote store leaves them
        (cache / name).write_bytes(b"cached")
    assert main(["forget", "--store", store, "--subject", "S5", "--yes"]) == 0
    after = {p.name for p in Path(pool).iterdir()}
    replaced = before - after
    assert replaced and {p.name for p in cache.iterdir()} == before - replaced


def test_a_forget_killed_after_its_pending_record_still_frees_the_claimants(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """Killed right after its pending record, a forget never noted the subjects whose
    duplicate claim named the forgotten one for deciding again, and `--resume` never took the
    forgotten subject's pseudonym out of their reasons (the claimants lived only in memory)."""
    import storage.privacy as privacy
    from faceloop.cli import main
    from faceloop.vocab import DUPLICATE_CLAIM
    from storage.recovery import subjects_to_relabel
    from storage.secret import pseudonym
    from storage.tables import read_faces

    store = str(tmp_path / "store")
    st = open_store(store)
    claim = f"{DUPLICATE_CLAIM}: {pseudonym(st, 'subject', 'A')}"
    _id_photos(
        st,
        ("A", "live1.jpg", "a" * 64, "fa", {}),
        ("B", "live1.jpg", "b" * 64, "fb", {"status": "review", "reason": claim}),
    )
    real = privacy.write_pending

    def killed(store_: object, pending: object) -> None:
        real(store_, pending)
        raise KeyboardInterrupt

    monkeypatch.setattr(privacy, "write_pending", killed)
    assert main(["forget", "--store", store, "--subject", "A", "--yes"]) == 130
    monkeypatch.undo()
    assert subjects_to_relabel(st) == {"B"}, "noted before the pending record"
    assert main(["forget", "--store", store, "--resume", "--yes"]) == 0
    line = privacy.read_audit(st)[-1]
    assert line["action"] == "resume" and line["request"] == {
        "identity": 0,
        "subject": 0,
        "image": 0,
    }
    assert [r["request"]["subject"] for r in line["resumed"]] == [1]
    (b,) = read_faces(st, groups=[("idcard", "B")]).to_pylist()
    assert pseudonym(st, "subject", "A") not in b["reason"] and "[forgotten subject]" in b["reason"]


def test_a_scrub_killed_midway_keeps_the_label_studio_tasks_it_found(
    tmp_path: Path, monkeypatch
) -> None:
    """The Label Studio tasks showing the faces were learnt from the review task records and
    saved in the pending record only at the end: a forget killed after those records were
    scrubbed left `--resume` nothing to delete in Label Studio."""
    import storage.forget as forget_mod
    from faceloop.cli import main
    from storage import layout
    from storage.privacy import read_pending

    store = str(tmp_path / "store")
    st = open_store(store)
    fid = "ab12cd34ef56ab12cd34"
    _id_photos(st, ("S3", "live1.jpg", "e" * 64, fid, {}))
    # A record that names the face only in its key: found by the scrub's token match, not by
    # the plan (which reads face_ids, shown and subject).
    st.write_parquet(
        f"{layout.REVIEW_TASKS}/r1.parquet",
        pa.Table.from_pylist(
            [{"key": f"quality_check:{fid}", "face_ids": [], "project_id": 7, "task_id": 42}]
        ),
    )

    def killed(*_a: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(forget_mod, "_scrub_faces_file", killed)
    assert main(["forget", "--store", store, "--subject", "S3", "--yes"]) == 130
    pending = read_pending(st)
    assert pending is not None and (7, 42) in pending.ls_tasks


def test_forgetting_a_path_keeps_the_photo_swapped_away_from_it(tmp_path: Path) -> None:
    """Two photos swapped names; `forget --image <path>` of one took the other too (the path
    had held it before the swap): a photo the user never named, forgotten for good. By path,
    the photo there now goes, with the earlier versions of it that are at no other path."""
    from storage.forget import plan
    from storage.tables import append_images, write_group

    st = open_store(str(tmp_path / "store"))
    a, b = "/albums/fam/a.jpg", "/albums/fam/b.jpg"
    x, y, z = "1" * 64, "2" * 64, "3" * 64

    def row(uri: str, sha: str, run: str) -> dict:
        return {
            "image_uri": uri,
            "image_sha256": sha,
            "source_kind": "album",
            "source_group": "fam",
            "status": "ok",
            "run_id": run,
        }

    append_images(st, "r1", pa.Table.from_pylist([row(a, x, "r1"), row(b, y, "r1")]))
    append_images(st, "r2", pa.Table.from_pylist([row(a, y, "r2"), row(b, x, "r2")]))  # swapped
    append_images(st, "r3", pa.Table.from_pylist([row(a, z, "r3")]))  # a.jpg edited in place
    faces = [
        {"face_id": f"face-{sha[0]}", "image_uri": uri, "image_sha256": sha, "source_kind": "album"}
        | {"source_group": "fam", "run_id": "r1"}
        for uri, sha in ((a, x), (b, y), (a, z))
    ]
    write_group(st, "album", "fam", pa.Table.from_pylist(faces))
    p = plan(st, images=[a])
    # z (there now) and y (held before the edit, now nowhere else); not x, which is at b now.
    assert p.shas == {y, z} and b not in p.uris
    assert p.face_ids == {"face-2", "face-3"}
    assert plan(st, images=[b]).shas == {x}  # b's own: y moved on to a, then was edited away
    from storage.forget import Matcher, scrub
    from storage.privacy import Keyed, digests
    from storage.tables import read_faces, read_images

    keyed = Keyed.of(st)
    assert keyed is not None
    scrub(st, Matcher(keyed, digests(keyed, "token", p.tokens)), None)
    assert read_faces(st, columns=["face_id"]).column(0).to_pylist() == ["face-1"]
    assert {(r["image_uri"], r["image_sha256"]) for r in read_images(st).to_pylist()} == {
        (a, x),
        (b, x),
    }


def test_a_killed_forget_repeated_is_already_carried_out_not_nothing_found(tmp_path: Path):
    """A `forget --identity X` killed after its store work began, then run again: the repeat
    finished the work but said "nothing found ... check the id" (exit 1), and so did every
    repeat after it, since the killed request's own audit line was never written."""
    from types import SimpleNamespace

    from faceloop.commands.forget import _carried_out
    from storage.privacy import audit

    st = open_store(str(tmp_path / "store"))
    keyed = Keyed.of(st)
    assert keyed is not None
    target = keyed.digest("request", "identity:id-x")
    killed = {"request": {"identity": 1}, "targets": [target], "found": {"images": 5}}
    p = SimpleNamespace(missing=[("identity", "id-x")])
    # The repeat that finishes the killed forget's work (its request is pending) ...
    assert _carried_out(st, keyed, p, [killed]) == [("identity", "id-x")]
    # ... and every repeat after it (the finishing line names it among what it resumed; its
    # tombstones were written first).
    write_tombstones(st, Tombstones())
    audit(st, {"action": "forget", "found_targets": [], "resumed": [killed]})
    assert _carried_out(st, keyed, p) == [("identity", "id-x")]
    # A request that had found nothing is still "nothing found".
    nothing = {"targets": [target], "found": {"images": 0, "faces": 0}}
    st2 = open_store(str(tmp_path / "store2"))
    k2 = Keyed.of(st2)
    assert k2 is not None
    write_tombstones(st2, Tombstones())
    audit(st2, {"action": "forget", "found_targets": [], "resumed": [nothing]})
    assert _carried_out(st2, k2, p) == []


def test_a_forgotten_path_taken_in_again_counts_once(tmp_path: Path):
    """A path kept out as forgotten (its content tombstoned, or its ID-card subject) and later
    taken in (new bytes written there, the subject's tombstone lifted): the placeholder row
    (``forgotten:<keyed digest of the uri>``) stayed beside the path's new row, which holds
    the raw uri, so the store counted that path twice, for good. The placeholder is now
    marked taken in, at the placeholder itself: no raw uri, hash or subject name is written."""

    from storage.tables import append_images
    from tasks.discover import discover
    from tasks.summary import store_counts

    def record(res) -> None:
        decoded = st.read_parquet(res.pending_rel).to_pylist() if res.pending_rel else []
        rows = [*res.quarantined_rows, *({**r, "status": "ok", "n_faces": 1} for r in decoded)]
        keys = ("image_uri", "image_sha256", "source_kind", "source_group", "role", "status")
        more = ("reason", "reason_code", "n_faces", "moved_from")
        append_images(
            st,
            res.run_id,
            pa.Table.from_pylist(
                [{k: r.get(k) for k in (*keys, *more)} | {"run_id": res.run_id} for r in rows]
            ),
        )

    src = tmp_path / "src"
    photos = {
        src / "albums" / "trip" / "a.jpg": b"photo-a",
        src / "albums" / "trip" / "b.jpg": b"photo-b",
        src / "idcards" / "S1" / "id.jpg": b"id-1",
        src / "idcards" / "S1" / "live1.jpg": b"live-1",
    }
    for p, data in photos.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (1_600_000_000, 1_600_000_000))
    st, settings, _, sha_a = _photo_a_and_s1_forgotten(tmp_path, src)
    record(discover(settings, st, "20250101T000000Z-abcdef"))
    assert (store_counts(st).images, store_counts(st).quarantined) == (4, 3)
    # Another photo written at the forgotten photo's path: one image there, not two.
    (src / "albums" / "trip" / "a.jpg").write_bytes(b"another photo at a")
    overwritten = discover(settings, st, "20250102T000000Z-abcdef")
    assert (overwritten.new, overwritten.quarantined, overwritten.forgotten) == (1, 0, 2)
    record(overwritten)
    assert (store_counts(st).images, store_counts(st).quarantined) == (4, 2)
    (mark,) = overwritten.quarantined_rows
    assert mark["reason_code"] == InputCode.FORGOTTEN_TAKEN_IN
    assert mark["image_uri"].startswith("forgotten:")
    # The subject's tombstone lifted (the last tombstone: none stands any more).
    write_tombstones(st, Tombstones())
    lifted = discover(settings, st, "20250103T000000Z-abcdef")
    assert (lifted.new, lifted.forgotten) == (2, 0)
    record(lifted)
    assert (store_counts(st).images, store_counts(st).quarantined) == (4, 0)
    marks = [r for r in lifted.quarantined_rows if r["image_uri"].startswith("forgotten:")]
    assert [r["reason_code"] for r in marks] == [InputCode.FORGOTTEN_TAKEN_IN] * 2
    # What the marks hold: placeholders only.
    for row in [mark, *marks]:
        assert str(src) not in str(row) and "S1" not in str(row) and sha_a not in str(row)
    # Nothing changed: nothing recorded again.
    again = discover(settings, st, "20250104T000000Z-abcdef")
    assert (again.quarantined_rows, again.pending_rel) == ([], None)


def test_forget_keeps_the_label_settings_fingerprint(tmp_path: Path):
    """A forget dropped the label state whole, its meta.json with it: the store then counted as
    never labelled, and a label settings change made after it was never applied (a refresh with
    nothing new ran no label stage; one that did rebuilt the state as if nothing changed)."""
    from faceloop.cli import main
    from tasks.label import label_settings_changed, state_fingerprint

    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("S9", "id.jpg", "e" * 64, "f9", {}))
    settings = load_settings(None, store=store)
    meta = {"generation": "g1", "fingerprint": state_fingerprint(settings), "units": 3}
    st.write_bytes(layout.LABEL_META, json.dumps(meta).encode())
    st.write_bytes(layout.LABEL_UNITS, b"face ids and centroid sums")
    st.write_bytes(layout.label_clusters("album", "a1"), b"face ids")
    assert main(["forget", "--store", store, "--subject", "S9", "--yes"]) == 0

    assert [o.rel for o in st.list(layout.LABEL_STATE)] == [layout.LABEL_META]
    assert json.loads(st.read_bytes(layout.LABEL_META)) == {"fingerprint": meta["fingerprint"]}
    assert not label_settings_changed(st, settings)
    other = settings.cluster.model_copy(update={"min_cluster_size": 3})
    strict = settings.model_copy(update={"cluster": other})
    assert label_settings_changed(st, strict)


def test_forgetting_a_subject_takes_the_album_faces_attached_to_it(tmp_path: Path, capsys):
    """A reviewer attached an album face to an ID-card subject (its identity is the subject
    id). `forget --subject` removed only the subject's ID-card photos: the album face stayed,
    and the next publish named its class by the raw subject id (the folder name) since no
    ID-card file of that name was left. Its photo goes as an `--identity` forget's do, with
    a bystander on it; other album photos stay."""
    from faceloop.cli import main
    from storage.privacy import digests, read_tombstones
    from storage.tables import append_images, read_faces, read_images, write_group

    store = str(tmp_path / "store")
    st = open_store(store)
    _id_photos(st, ("S004", "id.jpg", "1" * 64, "f" + "1" * 31, {"identity_id": "S004"}))
    photos = {"/albums/A/p1.jpg": "2" * 64, "/albums/A/p2.jpg": "3" * 64}
    base = {"source_kind": "album", "source_group": "A", "role": "album", "run_id": "r1"}
    append_images(
        st,
        "r1",
        pa.Table.from_pylist(
            [{"image_uri": u, "image_sha256": s, "status": "ok"} | base for u, s in photos.items()]
        ),
    )
    attached, bystander, other = "f" + "2" * 31, "f" + "3" * 31, "f" + "4" * 31

    def face(uri: str, fid: str, ident: str, status: str) -> dict:
        return (
            {"image_uri": uri, "image_sha256": photos[uri], "face_id": fid}
            | base
            | {
                "identity_id": ident,
                "status": status,
            }
        )

    write_group(
        st,
        "album",
        "A",
        pa.Table.from_pylist(
            [
                face("/albums/A/p1.jpg", attached, "S004", "human"),
                face("/albums/A/p1.jpg", bystander, "id-bbb", "auto"),
                face("/albums/A/p2.jpg", other, "id-bbb", "auto"),
            ]
        ),
    )
    assert main(["forget", "--store", store, "--subject", "S004", "--dry-run"]) == 0
    assert "would forget 2 images with 3 faces" in capsys.readouterr().out
    assert main(["forget", "--store", store, "--subject", "S004", "--yes"]) == 0
    assert read_faces(st, columns=["face_id"]).column("face_id").to_pylist() == [other]
    assert read_images(st).column("image_uri").to_pylist() == ["/albums/A/p2.jpg"]
    keyed = Keyed.of(st)
    assert keyed is not None
    assert digests(keyed, "face", {attached, bystander}) <= read_tombstones(st).faces

    # A store an earlier faceloop left so (the subject's photos gone, the album face kept):
    # asking again finds the face, rather than "already carried out".
    write_group(
        st,
        "album",
        "B",
        pa.Table.from_pylist(
            [face("/albums/A/p1.jpg", attached, "S004", "human") | {"source_group": "B"}]
        ),
    )
    assert main(["forget", "--store", store, "--subject", "S004", "--yes"]) == 0
    assert "forgot 1 images with 1 faces" in capsys.readouterr().out
    assert read_faces(st, columns=["face_id"]).column("face_id").to_pylist() == [other]


def test_a_store_restored_without_its_tombstones_is_refused_not_emptied(tmp_path: Path, capsys):
    """state/tombstones.json deleted (a restore, or a hand that took state/ for caches): the
    next refresh took the forgotten people's photos back in, and doctor passed."""
    from faceloop.cli import main
    from faceloop.commands.doctor import run_checks
    from faceloop.errors import StorageError
    from tasks.discover import discover

    src = tmp_path / "src"
    (src / "albums" / "trip").mkdir(parents=True)
    (src / "idcards" / "S1").mkdir(parents=True)
    (src / "idcards" / "S1" / "id.jpg").write_bytes(b"id-1")
    store = str(tmp_path / "store")
    open_store(store).write_bytes("state/.keep", b"")
    assert main(["forget", "--store", store, "--subject", "S1", "--yes"]) == 1  # not taken in
    st, settings, _, _ = _photo_a_and_s1_forgotten(tmp_path, src)
    st.delete(layout.TOMBSTONES)
    checks = {c["check"]: c for c in run_checks(st)}
    assert not checks["forget tombstones"]["ok"]
    assert "state/tombstones.json" in checks["forget tombstones"]["detail"]
    with pytest.raises(StorageError, match=r"state/tombstones.json is missing.*restore"):
        discover(settings, st, "20250101T000000Z-abcdef")
    assert not st.exists(layout.TOMBSTONES)
    # A forget that tombstoned nothing (a mistyped identity) needs no tombstones file.
    other = str(tmp_path / "other")
    open_store(other).write_bytes("state/.keep", b"")
    assert main(["forget", "--store", other, "--identity", "id-typo", "--yes"]) == 1
    assert not open_store(other).exists(layout.TOMBSTONES)
    assert {c["check"]: c["ok"] for c in run_checks(open_store(other))}["forget tombstones"]
    discover(
        settings.model_copy(update={"store": other}), open_store(other), "20250101T000000Z-abcdef"
    )
