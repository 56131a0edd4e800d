"""``faceloop doctor`` on a store with a damaged table file: a failed check naming the file,
and the other checks run on the rest (it used to stop at the first unreadable file, with the
error a refresh stops on, and report nothing)."""

from __future__ import annotations

import pyarrow as pa

from faceloop.commands.doctor import run_checks
from faceloop.schema import FACES_SCHEMA
from storage.objectstore import open_store
from storage.tables import append_images, faces_files, write_group


def _faces(album: str, n: int) -> pa.Table:
    rows = [
        {
            "face_id": f"{album}-{i}",
            "image_uri": f"/in/{album}/{i}.jpg",
            "image_sha256": f"sha-{album}-{i}",
            "source_kind": "album",
            "source_group": album,
            "status": "auto",
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=FACES_SCHEMA)


def _two_albums(tmp_path, extra: list[dict] | None = None, **image_fields: object):
    """A store of albums a1 (3 faces) and a2 (2), an ok image row per face (with
    ``image_fields``) and the ``extra`` image rows."""
    store = open_store(str(tmp_path / "store"))
    for album, n in (("a1", 3), ("a2", 2)):
        write_group(store, "album", album, _faces(album, n))
    images = [
        {"image_uri": f"/in/{a}/{i}.jpg", "image_sha256": f"sha-{a}-{i}", "status": "ok"}
        | image_fields
        for a, n in (("a1", 3), ("a2", 2))
        for i in range(n)
    ]
    append_images(store, "20261206T000000Z-aaaaaa", pa.Table.from_pylist(images + (extra or [])))
    return store


def test_doctor_names_an_unreadable_table_file_and_checks_the_rest(tmp_path) -> None:
    store = _two_albums(tmp_path)
    checks = {c["check"]: c for c in run_checks(store)}
    assert all(c["ok"] for c in checks.values()), checks

    cut = faces_files(store)[0]
    path = tmp_path / "store" / cut
    path.write_bytes(path.read_bytes()[:200])  # cut short, as by a full disk or a bad copy
    checks = {c["check"]: c for c in run_checks(store)}
    assert not checks["table files readable"]["ok"]
    assert checks["table files readable"]["detail"] == f"1 not: {cut} (StorageError)"
    # The other checks ran on what could be read: the 2 or 3 faces of the intact album.
    assert checks["unique face ids"]["ok"] and checks["faces have image rows"]["ok"]
    assert checks["unique face ids"]["detail"] in (
        "2 faces, 0 duplicate ids",
        "3 faces, 0 duplicate ids",
    )
    # With every images file cut too, the checks still run (on no image rows).
    for o in store.list("tables/images"):
        p = tmp_path / "store" / o.rel
        p.write_bytes(p.read_bytes()[:100])
    checks = {c["check"]: c for c in run_checks(store)}
    assert checks["table files readable"]["detail"].startswith("2 not: ")
    assert not checks["faces have image rows"]["ok"]


def test_doctor_finds_photos_whose_faces_file_was_deleted(tmp_path) -> None:
    """A faces file deleted by hand: every check passed, and the next refresh published a
    version without those faces."""
    empty = {"image_uri": "/in/e.jpg", "image_sha256": "e", "status": "no_face", "n_faces": 0}
    store = _two_albums(tmp_path, [empty], n_faces=1)
    checks = {c["check"]: c for c in run_checks(store)}
    assert checks["images keep their faces"] == {
        "check": "images keep their faces",
        "ok": True,
        "detail": "5 photos with faces",
    }
    a2 = next(
        rel
        for rel in faces_files(store)
        if "a2" in store.read_parquet_file(rel).column("source_group").to_pylist()
    )
    store.delete(a2)
    checks = {c["check"]: c for c in run_checks(store)}
    assert not checks["images keep their faces"]["ok"]
    assert "2 of them without any face row" in checks["images keep their faces"]["detail"]


def test_doctor_on_a_path_that_holds_no_store_says_so(tmp_path, capsys) -> None:
    """A mistyped --store passed every check of an empty store (exit 0, all 'ok')."""
    from faceloop.cli import main

    assert main(["doctor", "--store", str(tmp_path / "typo")]) == 1
    assert f"no store at {tmp_path / 'typo'}" in capsys.readouterr().err
    st = open_store(str(tmp_path / "store"))
    append_images(
        st,
        "20261206T140024123456Z-a1b2c3",
        pa.Table.from_pylist([{"image_uri": "/in/x.jpg", "image_sha256": "s", "status": "ok"}]),
    )
    assert main(["doctor", "--store", str(tmp_path / "store")]) == 0


def test_doctor_on_an_empty_folder_says_nothing_is_there(tmp_path) -> None:
    """An empty folder (a fresh store, or an unmounted mount point) passed every check without
    a word: doctor says it holds nothing."""
    empty = tmp_path / "mnt"
    empty.mkdir()
    checks = {c["check"]: c for c in run_checks(open_store(str(empty)))}
    assert "nothing here" in checks["store made"]["detail"]
    assert all(c["ok"] for c in checks.values())


def test_doctor_flags_store_folders_other_users_can_change(tmp_path) -> None:
    """A security probe: a store made in a 0777 folder, whose runs/ another user swapped for
    a folder of its own, passed every check; the refresh wrote its run record there."""
    import os

    store = _two_albums(tmp_path)
    root = tmp_path / "store"
    checks = {c["check"]: c for c in run_checks(store)}
    assert checks["store folders private"]["ok"], checks["store folders private"]
    os.chmod(root, 0o777)
    (root / "tables" / "faces").chmod(0o773)
    check = {c["check"]: c for c in run_checks(store)}["store folders private"]
    assert not check["ok"]
    assert check["detail"].startswith("others can change . (mode 777), tables/faces (mode 773)")
    os.chmod(root, 0o1777)  # sticky: others cannot replace what is this user's
    (root / "tables" / "faces").chmod(0o750)
    assert {c["check"]: c for c in run_checks(store)}["store folders private"]["ok"]
    if os.geteuid() == 0:  # another user's folder inside the store (root can make one)
        os.chown(root / "runs" if (root / "runs").is_dir() else root / "tables", 65534, -1)
        check = {c["check"]: c for c in run_checks(store)}["store folders private"]
        assert not check["ok"] and "(owner uid 65534)" in check["detail"]


def test_doctor_reports_a_re_embed_left_half_done(tmp_path) -> None:
    """A refresh that re-embedded the stored faces with a newly registered recognizer and failed
    before relabelling them (every later one failing on the same group): doctor said all was
    well."""
    from storage import layout

    store = _two_albums(tmp_path)
    checks = {c["check"]: c for c in run_checks(store)}
    assert checks["no re-embed left half done"]["ok"]
    store.write_bytes(layout.RELABEL_PENDING, b"{}")
    checks = {c["check"]: c for c in run_checks(store)}
    assert not checks["no re-embed left half done"]["ok"]
    assert "next refresh finishes it" in checks["no re-embed left half done"]["detail"]


def test_doctor_flags_a_store_copied_without_its_modes(tmp_path) -> None:
    """`cp -r --no-preserve=all store copy` (0644 files, 0755 folders: the crops, embeddings
    and the secret readable by every user) passed doctor's "store folders private"."""
    import shutil
    import subprocess

    from faceloop.cli import main

    _two_albums(tmp_path)
    root = tmp_path / "store"
    assert {c["check"]: c for c in run_checks(open_store(str(root)))}["store unreadable to others"][
        "ok"
    ]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # modes from the umask
    subprocess.run(["chmod", "-R", "u=rwX,go=rX", str(copy)], check=True)
    check = {c["check"]: c for c in run_checks(open_store(str(copy)))}["store unreadable to others"]
    assert not check["ok"] and ("(mode 644)" in check["detail"] or "(mode 755)" in check["detail"])
    assert "chmod -R o-rwx" in check["detail"]
    # A store shared on purpose (storage.file_mode / dir_mode that let others read) passes.
    assert {c["check"]: c for c in run_checks(open_store(str(copy)), 0o644, 0o755)}[
        "store unreadable to others"
    ]["ok"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store: {copy}\nstorage:\n  file_mode: '0644'\n  dir_mode: '0755'\n")
    assert main(["doctor", "--store", str(copy)]) == 1
    assert main(["doctor", "--config", str(cfg)]) == 0
    subprocess.run(["chmod", "-R", "o-rwx", str(copy)], check=True)
    assert {c["check"]: c for c in run_checks(open_store(str(copy)))}["store unreadable to others"][
        "ok"
    ]


def test_doctor_finds_a_forget_audit_edited_truncated_or_removed(tmp_path) -> None:
    """The forget audit log could be edited (a count changed), cut (`sed -i 1d`) or removed,
    and doctor still passed: nothing in it could be checked."""
    import json

    from faceloop.cli import main
    from storage import layout
    from storage.privacy import audit, read_audit

    store = str(tmp_path / "store")
    st = open_store(store)
    st.write_bytes("state/.keep", b"")
    for subject in ("S1", "S2", "S3"):
        assert main(["forget", "--store", store, "--subject", subject, "--yes"]) == 1

    def check() -> dict:
        return {c["check"]: c for c in run_checks(open_store(store))}["forget audit"]

    good = st.read_bytes(layout.AUDIT_FORGET)
    assert check()["ok"] and check()["detail"] == "3 lines verify"
    lines = good.splitlines(keepends=True)
    st.write_bytes(layout.AUDIT_FORGET, b"".join(lines[1:]))  # sed -i 1d
    assert not check()["ok"] and check()["detail"].startswith("line 1 of audit/forget.jsonl")
    second = json.loads(lines[1])
    second["request"]["subject"] = 2  # a count changed
    edited = json.dumps(second, sort_keys=True).encode() + b"\n"
    st.write_bytes(layout.AUDIT_FORGET, lines[0] + edited + lines[2])
    assert not check()["ok"] and check()["detail"].startswith("line 2 ")
    st.write_bytes(layout.AUDIT_FORGET, lines[0] + lines[2])  # a line in the middle
    assert not check()["ok"] and check()["detail"].startswith("line 2 ")
    st.delete(layout.AUDIT_FORGET)  # removed, the tombstones left
    assert not check()["ok"] and "audit/forget.jsonl is missing" in check()["detail"]
    assert main(["doctor", "--store", store]) == 1

    # Lines of an earlier faceloop (no MAC) are a prefix taken as it is, and the chain that
    # follows covers them: one edited after that is found.
    old = [{"at": "2026-01-01T00:00:00+00:00", "action": "forget", "n": i} for i in range(2)]
    legacy = b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in old)
    st.write_bytes(layout.AUDIT_FORGET, legacy)
    assert check()["ok"] and "the first 2 lines, written before" in check()["detail"]
    audit(st, {"action": "lift", "lifted": 0})
    assert check()["ok"] and check()["detail"].startswith("1 lines verify; the first 2 lines")
    assert [e.get("n") for e in read_audit(st)] == [0, 1, None]
    chained = st.read_bytes(layout.AUDIT_FORGET)
    st.write_bytes(layout.AUDIT_FORGET, chained.replace(b'"n": 1', b'"n": 7'))
    assert not check()["ok"] and check()["detail"].startswith("line 3 ")
    # A MAC stripped off a line does not make it a legacy one: the line after it fails.
    st.write_bytes(layout.AUDIT_FORGET, chained)
    audit(st, {"action": "lift", "lifted": 0})
    lines = st.read_bytes(layout.AUDIT_FORGET).splitlines(keepends=True)
    third = json.loads(lines[2])
    del third["mac"]
    stripped = json.dumps(third, sort_keys=True).encode() + b"\n"
    st.write_bytes(layout.AUDIT_FORGET, b"".join([*lines[:2], stripped, lines[3]]))
    assert not check()["ok"] and check()["detail"].startswith("line 4 ")
