"""Hostile inputs and a hostile store: nothing a source holds, and no full or read-only store,
may stop a run with a traceback or leave the store inconsistent.

Unit tier: discovery over FIFOs, sockets, devices, dangling and out-of-root symlinks, unreadable
and vanishing files (no models); a missing source; a store under a regular file; the count of
images per URI. Integration tier (real Prefect server, local Ray, real models): the same inputs
through two refreshes, a copy filed after the fact, a missing source and an unwritable store
through the flow, and ENOSPC in the label stage followed by a run that completes consistently.

Running as root, ``chmod 000`` does not stop reads; the unreadable file is then made unreadable
by patching ``os.open`` for that one path to raise PermissionError (the error a real unreadable
file raises), everywhere else a real ``chmod 000`` file is used.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from faceloop.config import SourceSpec, load_settings
from faceloop.errors import EXIT_FAILED, SourceError, StorageError
from faceloop.vocab import InputCode
from storage.objectstore import LocalStore, open_store
from storage.tables import faces_files, latest_images, read_faces, read_images

UNREADABLE = "unreadable.jpg"
VANISHING = "vanish.jpg"


# --------------------------------------------------------------------------------------------
# Building the hostile tree


def make_unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` unreadable for this process: chmod 000, or as root (where chmod does not
    stop reads) patch ``os.open`` to raise PermissionError for that path only."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = os.open
    target = str(path)

    def deny(p: str | os.PathLike[str], flags: int, *args: object, **kwargs: object) -> int:
        if os.fspath(p) == target:
            raise PermissionError(errno.EACCES, "Permission denied", target)
        return real_open(p, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)


def vanish_after_listing(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Delete ``path`` right after discovery lists the sources (before it reads them)."""
    import tasks.discover as discover_mod

    real = discover_mod.list_source

    def listing(uri: str) -> list:
        out = real(uri)
        path.unlink(missing_ok=True)
        return out

    monkeypatch.setattr(discover_mod, "list_source", listing)


def build_hostile(
    root: Path, photos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str | None]:
    """Albums and ID-card subjects holding one of each hostile entry.

    Returns the path relative to ``root`` of every entry a source lists -> the reason code its
    single images-table record must carry (None: a normal image, no reason).
    """
    albums, idcards, outside = root / "albums", root / "idcards", root / "outside"
    for d in (albums / "a1", albums / "a2", idcards / "S1", idcards / "S2", outside):
        d.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    shutil.copy(photos["t1"], albums / "a1" / "group.jpg")
    shutil.copy(photos["yaoming"], albums / "a1" / "portrait.jpg")
    expected |= {"albums/a1/group.jpg": None, "albums/a1/portrait.jpg": None}
    # Byte-identical copies: one in another album, one through a symlink inside the root.
    shutil.copy(photos["t1"], albums / "a2" / "group_copy.jpg")
    (albums / "a1" / "zz_link.jpg").symlink_to(albums / "a1" / "portrait.jpg")
    expected |= {
        "albums/a2/group_copy.jpg": InputCode.DUPLICATE_CONTENT,
        "albums/a1/zz_link.jpg": InputCode.DUPLICATE_CONTENT,
    }
    # Not regular files: never opened.
    os.mkfifo(albums / "a1" / "fifo.jpg")
    expected["albums/a1/fifo.jpg"] = InputCode.NOT_A_REGULAR_FILE
    sock_path = albums / "a1" / "sock.jpg"
    if len(str(sock_path)) < 100:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(sock_path))
    else:
        os.mknod(sock_path, stat.S_IFSOCK | 0o600)
    expected["albums/a1/sock.jpg"] = InputCode.NOT_A_REGULAR_FILE
    try:
        os.mknod(albums / "a1" / "dev.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        expected["albums/a1/dev.jpg"] = InputCode.NOT_A_REGULAR_FILE
    except PermissionError:
        pass  # no CAP_MKNOD here: the FIFO and the socket cover "not a regular file"
    # Symlinks: dangling, out of the root (a file and a folder).
    (albums / "a1" / "dangling.jpg").symlink_to(albums / "a1" / "gone.jpg")
    shutil.copy(photos["players"], outside / "secret.jpg")
    (albums / "a1" / "outside.jpg").symlink_to(outside / "secret.jpg")
    (albums / "a1" / "outside_dir").symlink_to(outside)
    expected |= {
        "albums/a1/dangling.jpg": InputCode.DANGLING_SYMLINK,
        "albums/a1/outside.jpg": InputCode.OUTSIDE_SOURCE_ROOT,
        "albums/a1/outside_dir": InputCode.OUTSIDE_SOURCE_ROOT,
    }
    # Unreadable, and gone between listing and reading.
    shutil.copy(photos["gdp"], albums / "a1" / UNREADABLE)
    make_unreadable(albums / "a1" / UNREADABLE, monkeypatch)
    (albums / "a1" / VANISHING).write_bytes(b"\xff\xd8 listed, then deleted")
    vanish_after_listing(monkeypatch, albums / "a1" / VANISHING)
    expected |= {
        f"albums/a1/{UNREADABLE}": InputCode.UNREADABLE,
        f"albums/a1/{VANISHING}": InputCode.VANISHED,
    }
    # Names that are not UTF-8 (Latin-1 bytes from an old archive): a photo, and an album
    # folder holding one. One record each under the escaped name; the folder is not walked.
    # (Before, one such name failed every refresh: no Parquet string can hold it.)
    try:
        bad_file = os.fsencode(albums / "a1") + b"/caf\xe9.jpg"
        bad_dir = os.fsencode(albums) + b"/\xe9t\xe9"
        shutil.copy(photos["yaoming"], bad_file)
        os.mkdir(bad_dir)
        shutil.copy(photos["yaoming"], bad_dir + b"/inside.jpg")
        expected |= {
            "albums/a1/caf\\xe9.jpg": InputCode.NON_UTF8_NAME,
            "albums/\\xe9t\\xe9": InputCode.NON_UTF8_NAME,
        }
    except OSError:  # a file system that refuses such names (not Linux's): nothing to test
        pass
    # ID-card subjects: an empty id.jpg, and no id.jpg at all.
    (idcards / "S1" / "id.jpg").write_bytes(b"")
    Image.open(photos["yaoming"]).rotate(2).save(idcards / "S1" / "live1.jpg", quality=92)
    Image.open(photos["yaoming"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        idcards / "S2" / "live1.jpg", quality=92
    )
    expected |= {
        "idcards/S1/id.jpg": "empty_file",
        "idcards/S1/live1.jpg": None,
        "idcards/S2/live1.jpg": None,
    }
    return expected


def hostile_settings(store: Path, inputs: Path, **kw: object):
    return load_settings(
        None,
        store=str(store),
        sources=[
            SourceSpec(kind="album", uri=str(inputs / "albums")),
            SourceSpec(kind="idcard", uri=str(inputs / "idcards")),
        ],
        review={"enabled": False},
        **kw,
    )


def rows_by_rel(store: str, inputs: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in read_images(open_store(store)).to_pylist():
        out.setdefault(str(Path(r["image_uri"]).relative_to(inputs)), []).append(r)
    return out


# --------------------------------------------------------------------------------------------
# Unit tier: discovery alone


@pytest.fixture
def hostile(tmp_path, sample_photos, monkeypatch) -> Iterator[tuple[Path, dict]]:
    inputs = tmp_path / "inputs"
    yield inputs, build_hostile(inputs, sample_photos, monkeypatch)


def test_discovery_records_every_hostile_entry_once(hostile, tmp_path):
    from tasks.discover import COPY_OF, discover

    inputs, expected = hostile
    settings = hostile_settings(tmp_path / "store", inputs)
    res = discover(settings, open_store(settings.store), "run-1")
    assert res.listed == len(expected)
    assert res.listed == res.seen + res.new + res.duplicates + res.quarantined
    recorded = {str(Path(r["image_uri"]).relative_to(inputs)): r for r in res.quarantined_rows}
    pending = open_store(settings.store).read_parquet(res.pending_rel).to_pylist()
    queued = {str(Path(r["image_uri"]).relative_to(inputs)) for r in pending}
    assert not recorded.keys() & queued, "one record per file"
    assert recorded.keys() | queued == set(expected)
    for rel, code in expected.items():
        if code in (None, "empty_file"):
            assert rel in queued, rel  # decoded (or found empty) by the model stage
        elif code == InputCode.DUPLICATE_CONTENT:
            # an in-run copy: not queued, it waits for its original's verdict (label stage)
            assert recorded[rel]["reason_code"] == code and recorded[rel][COPY_OF] in {
                str(inputs / q) for q in queued
            }, (rel, recorded[rel])
        else:
            assert recorded[rel]["reason_code"] == code, (rel, recorded[rel])
            assert recorded[rel]["status"] == "quarantined"
            assert recorded[rel]["image_sha256"] == f"unread:{code}"
    assert not any("secret" in r["image_uri"] for r in pending), "symlink out of the root"


def test_fifo_swapped_in_after_listing_is_not_read(tmp_path):
    """A regular file replaced by a FIFO between listing and reading: the read must refuse it
    without blocking (a blocking open would hang here for ever)."""
    from faceloop.errors import BadInputError
    from storage.objectstore import read_uri_bytes, sha256_uri

    os.mkfifo(tmp_path / "x.jpg")
    for fn in (sha256_uri, read_uri_bytes):
        with pytest.raises(BadInputError) as exc:
            fn(str(tmp_path / "x.jpg"))
        assert exc.value.reason == InputCode.NOT_A_REGULAR_FILE


def test_missing_source_is_one_clear_error(tmp_path):
    from tasks.discover import discover

    (tmp_path / "albums").mkdir()
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[
            SourceSpec(kind="album", uri=str(tmp_path / "albums")),
            SourceSpec(kind="idcard", uri=str(tmp_path / "no-such-dir")),
        ],
    )
    with pytest.raises(SourceError) as exc:
        discover(settings, open_store(settings.store), "run-1")
    msg = str(exc.value)
    assert str(tmp_path / "no-such-dir") in msg and "does not exist" in msg
    assert "\n" not in msg and exc.value.exit_code == EXIT_FAILED


def test_store_under_a_regular_file_is_one_clear_error(tmp_path):
    """As root chmod cannot make a folder read-only, so the store is put where no folder can
    be made: under a regular file (mkdir fails with ENOTDIR, as on a read-only mount)."""
    (tmp_path / "file").write_bytes(b"not a folder")
    store = open_store(str(tmp_path / "file" / "store"))
    with pytest.raises(StorageError) as exc:
        store.write_parquet("tables/x.parquet", pa.table({"a": [1]}))
    msg = str(exc.value)
    assert str(tmp_path / "file" / "store") in msg
    assert "writable" in msg and "\n" not in msg and exc.value.exit_code == EXIT_FAILED
    # Reads through a file find nothing (no object there) rather than failing.
    with pytest.raises(FileNotFoundError):
        store.read_bytes("models/registry.json")


@pytest.mark.parametrize("in_memory", [True, False])
def test_enospc_is_one_clear_error(tmp_path, monkeypatch, in_memory):
    """Both ways a Parquet object reaches the store (encoded in memory, or through a local
    temporary file when large) turn a full disk into one clear error and leave no temp file."""
    from pathlib import Path

    from storage import objectstore

    store = open_store(str(tmp_path / "store"))

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if not in_memory:
        monkeypatch.setattr(objectstore, "PARQUET_IN_MEMORY_MAX", 0)
    monkeypatch.setattr(shutil, "copyfile", full)
    monkeypatch.setattr(Path, "write_bytes", full)
    monkeypatch.setattr(objectstore, "write_chunked", full)  # the store's own writes
    with pytest.raises(StorageError) as exc:
        store.write_parquet("tables/x.parquet", pa.table({"a": [1]}))
    assert "no space left" in str(exc.value) and str(tmp_path / "store") in str(exc.value)
    assert not list((tmp_path / "store").rglob("*.tmp-*")), "no temp file left behind"


def test_images_are_counted_once_per_uri(tmp_path):
    """The images table keeps history (a rerun that raced another, a changed file); counts
    take each URI once, in its latest state."""
    from storage.tables import append_images
    from tasks.summary import store_counts

    store = open_store(str(tmp_path / "store"))

    def rows(run: str, sha: str, status: str) -> pa.Table:
        return pa.Table.from_pylist(
            [
                {"image_uri": f"/in/{i}.jpg", "image_sha256": sha, "status": status, "run_id": run}
                for i in range(3)
            ]
        )

    append_images(store, "r1", rows("r1", "a", "ok"))
    append_images(store, "r2", rows("r2", "a", "ok"))  # a second run over the same files
    append_images(store, "r3", rows("r3", "b", "quarantined"))  # changed, now broken
    assert len(read_images(store)) == 9
    latest = latest_images(store, columns=["image_uri", "status"])
    assert len(latest) == 3 and set(latest.column("status").to_pylist()) == {"quarantined"}
    totals = store_counts(store)
    assert totals.images == 3 and totals.quarantined == 3


def test_an_unreadable_file_is_quarantined_again_until_it_can_be_read(
    tmp_path, sample_photos, monkeypatch
):
    """A file that could not be read (permission denied) was quarantined by the first refresh
    only: it was counted "already seen" after that, and no refresh mentioned it again while it
    stayed unreadable. An I/O error passes: every refresh reads it again and, failing,
    quarantines it again with its reason, until it can be read. Bytes that were read and judged
    unusable (corrupt) stay quarantined once."""
    import time

    from storage.tables import IMAGES_SCHEMA, append_images
    from tasks.discover import discover

    inputs = tmp_path / "inputs"
    album = inputs / "albums" / "a1"
    album.mkdir(parents=True)
    (inputs / "idcards").mkdir()
    shutil.copy(sample_photos["t1"], album / "ok.jpg")
    shutil.copy(sample_photos["gdp"], album / UNREADABLE)
    (album / "corrupt.jpg").write_bytes(b"\xff\xd8 not a photo")
    old = time.time() - 3600  # stamps that are remembered (tasks/discover.py: RACY_SECONDS)
    for p in album.iterdir():
        os.utime(p, (old, old))
    make_unreadable(album / UNREADABLE, monkeypatch)
    settings = hostile_settings(tmp_path / "store", inputs)
    st = open_store(settings.store)

    def refresh(run_id: str):
        """A discovery, its rows recorded as the run's label stage would (the face stage
        found corrupt.jpg corrupt)."""
        res = discover(settings, st, run_id)
        rows = list(res.quarantined_rows)
        for r in st.read_parquet(res.pending_rel).to_pylist() if res.pending_rel else []:
            bad = r["image_uri"].endswith("corrupt.jpg")
            rows.append(
                r
                | {"run_id": run_id, "status": "quarantined" if bad else "ok"}
                | ({"reason_code": "corrupt", "reason": "corrupt: not a JPEG"} if bad else {})
            )
        names = IMAGES_SCHEMA.names
        append_images(
            st, run_id, pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])
        )
        assert res.listed == res.seen + res.new + res.duplicates + res.quarantined
        return res

    first = refresh("run-1")
    assert first.new == 2 and first.quarantined_by == {InputCode.UNREADABLE: 1}
    for run_id in ("run-2", "run-3"):
        again = refresh(run_id)
        assert again.seen == 2 and again.new == 0, again  # ok.jpg, and corrupt.jpg once
        assert again.quarantined_by == {InputCode.UNREADABLE: 1}
        (row,) = again.quarantined_rows
        assert row["image_uri"] == str(album / UNREADABLE) and row["run_id"] == run_id
        assert row["reason"] == "unreadable: Permission denied"
    monkeypatch.undo()  # readable now: a new image, to decode
    readable = refresh("run-4")
    assert readable.new == 1 and readable.quarantined == 0 and readable.seen == 2
    assert refresh("run-5").seen == 3


def test_a_folder_listed_again_is_counted_by_its_files_not_as_an_image(tmp_path, monkeypatch):
    """A folder that could not be listed is one quarantined row; once a later run lists its
    files, they are the images: the folder's row is no longer counted (it was one too many).
    A folder still unlisted, and one whose name only begins like it, keep their rows."""
    from storage.objectstore import list_source
    from storage.tables import append_images
    from tasks.summary import store_counts

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.jpg").write_bytes(b"x")
    real_scandir = os.scandir

    def deny(path):  # as root chmod does not stop listing a folder
        if os.fspath(path) == str(src / "a"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", deny)
    [entry] = list_source(str(src))
    monkeypatch.undo()
    assert entry.uri == str(src / "a") and entry.problem is not None
    reason = entry.problem

    def row(run: str, uri: str, status: str, code: str = "", text: str = "") -> dict:
        return {
            "image_uri": uri,
            "image_sha256": f"unread:{code}" if code else uri,
            "status": status,
            "reason_code": code,
            "reason": text,
            "run_id": run,
        }

    store = open_store(str(tmp_path / "store"))
    folder = [reason.code, reason.text]
    append_images(
        store,
        "r1",
        pa.Table.from_pylist(
            [row("r1", f"{src}/{d}", "quarantined", *folder) for d in ("a", "b", "c")]
        ),
    )
    assert store_counts(store).images == 3
    append_images(
        store,
        "r2",
        pa.Table.from_pylist(
            [
                row("r2", f"{src}/a/x.jpg", "ok"),
                row("r2", f"{src}/a/y.jpg", "no_face"),
                row("r2", f"{src}/cc/z.jpg", "ok"),  # not under c
            ]
        ),
    )
    totals = store_counts(store)
    # a's two files, b and c still unlisted, cc's file
    assert totals.images == 5 and totals.quarantined == 2


# --------------------------------------------------------------------------------------------
# Integration tier: through the real refresh (Prefect server, local Ray, real models)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _settings(model_root: Path, store: Path, inputs: Path):
    return hostile_settings(
        store,
        inputs,
        models={"root": str(model_root)},
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
    )


def test_two_refreshes_over_hostile_inputs(
    prefect_server, ray_session, model_root, sample_photos, tmp_path, monkeypatch
):
    from flows.refresh import run_refresh
    from tests.checks import assert_rerun_is_noop

    inputs = tmp_path / "inputs"
    expected = build_hostile(inputs, sample_photos, monkeypatch)
    settings = _settings(model_root, tmp_path / "store", inputs)
    first = run_refresh(settings)

    by_rel = rows_by_rel(settings.store, inputs)
    assert set(by_rel) == set(expected), "every listed entry has a record"
    for rel, code in expected.items():
        assert len(by_rel[rel]) == 1, (rel, by_rel[rel])
        row = by_rel[rel][0]
        assert row["reason_code"] == code, (rel, row)
        if code in (None, InputCode.DUPLICATE_CONTENT):
            assert row["status"] == "ok", row
        else:
            assert row["status"] == "quarantined", row
    run = first.run
    assert run.files_listed == len(expected)
    assert run.duplicates == 2
    assert run.quarantined == sum(
        c not in (None, InputCode.DUPLICATE_CONTENT) for c in expected.values()
    )
    assert run.new_images == sum(c is None for c in expected.values())
    assert run.files_listed == run.already_seen + run.new_images + run.duplicates + run.quarantined
    assert first.totals.images == len(expected)

    st = open_store(settings.store)
    faces = read_faces(
        st, columns=["image_uri", "source_group", "role", "status", "reason_code", "reason"]
    ).to_pylist()
    face_uris = {f["image_uri"] for f in faces}
    assert not any("secret" in u or "outside" in u for u in face_uris), "followed out of root"
    assert str(inputs / "albums/a2/group_copy.jpg") not in face_uris, "copy added faces"
    assert str(inputs / "albums/a1/zz_link.jpg") not in face_uris
    lives = [f for f in faces if f["role"] == "live"]
    assert {f["source_group"] for f in lives} == {"S1", "S2"}
    for f in lives:
        assert f["reason_code"] == InputCode.IDCARD_NO_ID_PHOTO, f
        assert "no detectable face" not in f["reason"], f
    s1 = [f["reason"] for f in lives if f["source_group"] == "S1"]
    assert all("id.jpg is unusable (empty_file" in r for r in s1), s1
    s2 = [f["reason"] for f in lives if f["source_group"] == "S2"]
    assert all("no id.<ext>" in r for r in s2), s2

    # Second run over the same entries: succeeds, adds no face, no version; the file still
    # unreadable is read again and quarantined again (its one new record), the rest are seen.
    images_before = read_images(st)
    second = assert_rerun_is_noop(settings)
    assert second.run.files_listed == len(expected) - 1  # the vanished file is gone for good
    assert second.run.already_seen == second.run.files_listed - 1
    assert second.run.duplicates == 0 and second.run.quarantined == 1
    added = read_images(st).filter(pc.equal(read_images(st).column("run_id"), second.run_id))
    assert read_images(st).num_rows == images_before.num_rows + 1
    assert added.column("image_uri").to_pylist() == [str(inputs / "albums/a1" / UNREADABLE)]
    assert added.column("reason_code").to_pylist() == [InputCode.UNREADABLE]
    assert second.totals.images == first.totals.images

    # A byte-identical copy filed later in another album: recorded, no model work, and the run
    # after it still succeeds (it used to fail every later refresh).
    (inputs / "albums" / "a3").mkdir()
    shutil.copy(inputs / "albums/a1/portrait.jpg", inputs / "albums/a3/again.jpg")
    faces_before = {rel: st.read_bytes(rel) for rel in faces_files(st)}
    third = run_refresh(settings)
    assert third.run.duplicates == 1 and third.run.new_images == 0
    assert "faces_s" not in third.timings, "a copy needs no model work"
    again = rows_by_rel(settings.store, inputs)["albums/a3/again.jpg"]
    assert len(again) == 1 and again[0]["reason_code"] == InputCode.DUPLICATE_CONTENT
    assert again[0]["status"] == "ok"
    assert {rel: st.read_bytes(rel) for rel in faces_files(st)} == faces_before
    assert third.totals.images == first.totals.images + 1
    fourth = run_refresh(settings)
    assert fourth.run.already_seen == fourth.run.files_listed - 1  # but the unreadable file
    assert fourth.run.quarantined == 1 and fourth.totals.images == third.totals.images


def test_files_quarantined_by_a_limit_are_looked_at_again_once_it_changes(
    prefect_server, ray_session, model_root, sample_photos, tmp_path
):
    """A JPEG under an extension the settings leave out, and a photo over the pixel limit, are
    quarantined; once `limits` let them in, the next refresh processes them (it used to count
    them as already seen for good), and the refresh after that is a no-op again."""
    from flows.refresh import run_refresh
    from tests.checks import assert_rerun_is_noop

    inputs = tmp_path / "inputs"
    (inputs / "albums" / "a1").mkdir(parents=True)
    (inputs / "idcards").mkdir()
    shutil.copy(sample_photos["yaoming"], inputs / "albums/a1/portrait.pic")  # JPEG bytes
    shutil.copy(sample_photos["gdp"], inputs / "albums/a1/gdp.jpg")
    shutil.copy(sample_photos["players"], inputs / "albums/a1/players.jpg")  # the largest
    with Image.open(inputs / "albums/a1/players.jpg") as im:
        tight = {"max_image_pixels": im.width * im.height - 1}

    def run(**limits: object):  # three quick runs, often in one second (faceloop/runids.py)
        settings = _settings(model_root, tmp_path / "store", inputs).model_copy()
        settings = settings.model_copy(update={"limits": settings.limits.model_copy(update=limits)})
        return settings, run_refresh(settings)

    def codes() -> dict[str, tuple]:
        latest = latest_images(open_store(str(tmp_path / "store")))
        return {
            Path(r["image_uri"]).name: (r["status"], r["reason_code"]) for r in latest.to_pylist()
        }

    _, first = run(**tight)
    assert codes()["portrait.pic"] == ("quarantined", "unsupported_extension")
    assert codes()["players.jpg"] == ("quarantined", "decompression_bomb")
    assert first.run.quarantined == 2
    _, same = run(**tight)  # the same limits: nothing is looked at again
    assert same.run.already_seen == 3 and "faces_s" not in same.timings

    exts = [*_settings(model_root, tmp_path / "store", inputs).limits.extensions, ".pic"]
    settings, opened = run(extensions=exts)
    assert opened.run.new_images == 2 and opened.run.images_sent_to_models == 2
    now = codes()
    assert now["portrait.pic"][0] == "ok" and now["players.jpg"][0] == "ok"
    faces = read_faces(open_store(settings.store), columns=["image_uri"]).to_pylist()
    assert {Path(f["image_uri"]).name for f in faces} >= {"portrait.pic", "players.jpg"}
    assert opened.totals.images == 3 and opened.totals.quarantined == 0
    assert_rerun_is_noop(settings)


def test_missing_source_and_unwritable_store_through_refresh(prefect_server, model_root, tmp_path):
    from flows.refresh import run_refresh

    (tmp_path / "inputs" / "albums").mkdir(parents=True)
    settings = _settings(model_root, tmp_path / "store", tmp_path / "inputs")
    with pytest.raises(SourceError, match="does not exist"):
        run_refresh(settings)  # idcards/ is missing

    (tmp_path / "inputs" / "idcards").mkdir()
    (tmp_path / "inputs" / "albums" / "a").mkdir()
    (tmp_path / "inputs" / "albums" / "a" / "notes.txt").write_text("quarantined, recorded")
    (tmp_path / "file").write_text("a regular file where the store's parent should be")
    bad = _settings(model_root, tmp_path / "file" / "store", tmp_path / "inputs")
    with pytest.raises(StorageError) as exc:
        run_refresh(bad)
    assert str(tmp_path / "file" / "store") in str(exc.value) and "writable" in str(exc.value)


def _consistent(store: str) -> None:
    """Every face has its image row (status ok), every decoded image with faces has them."""
    st = open_store(store)
    faces = read_faces(st, columns=["image_uri", "image_sha256"]).to_pylist()
    images = {
        (r["image_uri"], r["image_sha256"]): r
        for r in read_images(st).to_pylist()
        if r["reason_code"] != InputCode.DUPLICATE_CONTENT
    }
    for f in faces:
        row = images.get((f["image_uri"], f["image_sha256"]))
        assert row is not None and row["status"] == "ok", f"face without image row: {f}"
    per_image = Counter((f["image_uri"], f["image_sha256"]) for f in faces)
    for key, row in images.items():
        if row["status"] == "ok":
            assert per_image[key] == row["n_faces"], (key, row)


def test_enospc_in_label_leaves_store_consistent(
    prefect_server, ray_session, model_root, sample_photos, tmp_path, monkeypatch
):
    """A full disk while labelling: one clear error, no face without its image row, and the
    next run completes with faces and image rows consistent."""
    import tasks.label as label_mod
    from flows.refresh import run_refresh

    inputs = tmp_path / "inputs"
    for album, photo in (("a1", "t1"), ("a2", "yaoming")):
        (inputs / "albums" / album).mkdir(parents=True)
        shutil.copy(sample_photos[photo], inputs / "albums" / album / f"{photo}.jpg")
    (inputs / "idcards").mkdir()
    settings = _settings(model_root, tmp_path / "store", inputs)
    st = open_store(settings.store)
    real_label, real_replace = label_mod.label_run, LocalStore._replace

    def label_on_full_disk(after: int):
        def label_run(*args: object, **kwargs: object):
            writes = 0

            def replace(self: LocalStore, rel: str, fill):  # type: ignore[no-untyped-def]
                nonlocal writes
                writes += 1
                if writes > after:

                    def fill_full(tmp: Path) -> None:
                        raise OSError(errno.ENOSPC, "No space left on device")

                    return real_replace(self, rel, fill_full)
                return real_replace(self, rel, fill)

            monkeypatch.setattr(LocalStore, "_replace", replace)
            try:
                return real_label(*args, **kwargs)
            finally:
                monkeypatch.setattr(LocalStore, "_replace", real_replace)

        return label_run

    for after in (1, 3):  # the second group file; the token bump after all files are staged
        monkeypatch.setattr(label_mod, "label_run", label_on_full_disk(after))
        with pytest.raises(StorageError, match="no space left"):
            run_refresh(settings)
        assert faces_files(st) == [], f"after {after} writes: faces written without image rows"
        assert len(read_images(st)) == 0
        assert not [o for o in st.list("staging") if "/label/" in o.rel], "staged files left"
        _consistent(settings.store)

    monkeypatch.setattr(label_mod, "label_run", real_label)
    summary = run_refresh(settings)
    assert summary.run.new_images == 2 and summary.run.new_faces >= 7
    _consistent(settings.store)
    assert summary.totals.images == 2


def test_copies_and_id_photo_problems_from_image_rows():
    """The label stage's two image-row rules, on hand-made rows."""
    from tasks.label import id_photo_problems, mark_duplicates

    def row(uri: str, sha: str, status: str = "ok", **kw: object) -> dict:
        return {
            "image_uri": uri,
            "image_sha256": sha,
            "status": status,
            "reason": kw.get("reason"),
            "reason_code": kw.get("code"),
            "source_kind": kw.get("kind", "album"),
            "source_group": kw.get("group", "a"),
            "role": kw.get("role", "album"),
        }

    history = [row("/in/a/1.jpg", "s1"), row("/in/a/bad.jpg", "s9", "quarantined")]
    run = [row("/in/b/2.jpg", "s1"), row("/in/c/4.jpg", "s2"), row("/in/b/3.jpg", "s2")]
    run.append(row("/in/b/bad.jpg", "s9", "quarantined", reason="corrupt: x", code="corrupt"))
    copies = mark_duplicates(run, history)
    assert copies == {"/in/b/2.jpg": "/in/a/1.jpg", "/in/c/4.jpg": "/in/b/3.jpg"}
    assert [r["reason_code"] for r in run] == [
        "duplicate_content",
        "duplicate_content",
        None,
        "corrupt",
    ]
    # The same URI processed again (an earlier run lost its image row) is not a copy of itself.
    assert mark_duplicates([row("/in/a/1.jpg", "s1")], history) == {}

    idc = {"kind": "idcard"}
    rows = [
        row(
            "/i/S1/id.jpg",
            "e",
            "quarantined",
            reason="empty_file: 0 bytes",
            group="S1",
            role="id",
            **idc,
        ),
        row("/i/S1/live1.jpg", "l1", group="S1", role="live", **idc),
        row("/i/S2/live1.jpg", "l2", group="S2", role="live", **idc),
        row("/i/S3/id.jpg", "i3", "no_face", group="S3", role="id", **idc),
        row("/i/S3/live1.jpg", "l3", group="S3", role="live", **idc),
    ]
    # A scanner's id.tif, quarantined before its role was known (a user probe: the lives said
    # "no id.<ext> in the subject folder" beside it).
    tif = "unsupported_extension: .tif not in the extensions read"
    rows += [
        row("/i/S4/id.TIF", "u", "quarantined", reason=tif, group="S4", role="", **idc),
        row("/i/S4/live1.jpg", "l4", group="S4", role="live", **idc),
    ]
    problems = id_photo_problems(rows)
    assert set(problems) == {"S1", "S2", "S4"}, (
        "S3's ID photo decoded: the detector's verdict stands"
    )
    assert problems["S1"].text == "idcard_no_id_photo: id.jpg is unusable (empty_file: 0 bytes)"
    assert problems["S2"].text == "idcard_no_id_photo: no id.<ext> in the subject folder"
    assert problems["S4"].text == f"idcard_no_id_photo: id.TIF is unusable ({tif})"


def test_phone_photos_in_heic_and_avif_are_processed_like_jpeg(
    prefect_server, ray_session, model_root, sample_photos, tmp_path
):
    """An iPhone album (HEIC, the cameras' default) was quarantined whole as
    unsupported_extension; AVIF too. The same photo as JPEG, HEIC, HEIC stored sideways with
    EXIF orientation 6, and AVIF: every one decoded upright, the same faces found."""
    import pillow_heif

    from flows.refresh import run_refresh

    inputs = tmp_path / "inputs"
    for a in ("jpeg", "heic", "sideways", "avif"):
        (inputs / "albums" / a).mkdir(parents=True)
    (inputs / "idcards").mkdir()
    shutil.copy(sample_photos["t1"], inputs / "albums/jpeg/t1.jpg")
    with Image.open(sample_photos["t1"]) as im:
        img = im.convert("RGB")
    pillow_heif.from_pillow(img).save(inputs / "albums/heic/t1.HEIC", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as a phone held upright writes it
    side = img.transpose(Image.Transpose.ROTATE_90)
    pillow_heif.from_pillow(side).save(
        inputs / "albums/sideways/t1.heic", quality=90, exif=exif.tobytes()
    )
    img.save(inputs / "albums/avif/t1.avif", quality=90)

    settings = _settings(model_root, tmp_path / "store", inputs)
    summary = run_refresh(settings)
    assert summary.run.quarantined == 0 and summary.run.images_sent_to_models == 4
    rows = {rel: r[-1] for rel, r in rows_by_rel(settings.store, inputs).items()}
    ref = rows["albums/jpeg/t1.jpg"]
    assert ref["status"] == "ok" and ref["n_faces"] >= 5
    for rel in ("albums/heic/t1.HEIC", "albums/sideways/t1.heic", "albums/avif/t1.avif"):
        r = rows[rel]
        assert r["status"] == "ok", (rel, r["reason_code"])
        assert (r["width"], r["height"]) == (ref["width"], ref["height"]), rel
        assert r["n_faces"] == ref["n_faces"], rel


def test_a_file_that_changes_or_fails_after_discovery_is_read_again_next_time(
    prefect_server, ray_session, model_root, sample_photos, tmp_path, monkeypatch
):
    """The face stage read each file again and decoded whatever it held then: a photo still
    being copied in (or swapped) after discovery hashed it had the new bytes' faces filed
    under the old hash (the next refresh found them again under the new one: one face twice
    in the dataset), and one unreadable just then was quarantined "unreadable" under its real
    hash, so no later refresh looked at it again. Both are now recorded as discovery records a
    file it cannot read (``unread:<code>``) and read again by the next refresh; a copy of such
    a photo waits with it."""
    import tasks.faces as faces_mod
    from flows.refresh import run_refresh

    inputs = tmp_path / "inputs"
    for a in ("a", "b", "c"):
        (inputs / "albums" / a).mkdir(parents=True)
    (inputs / "idcards").mkdir()
    shutil.copy(sample_photos["t1"], inputs / "albums/a/t1.jpg")
    shutil.copy(sample_photos["t1"], inputs / "albums/c/t1-copy.jpg")  # waits for a/t1.jpg
    shutil.copy(sample_photos["yaoming"], inputs / "albums/b/yao.jpg")
    other = Path(sample_photos["players"]).read_bytes()
    real = faces_mod.read_uri_bytes

    def racing(uri: str) -> bytes:
        if uri.endswith("a/t1.jpg"):
            return other  # swapped between discovery's hash and the face stage's read
        if uri.endswith("b/yao.jpg"):
            raise PermissionError(errno.EACCES, "Permission denied", uri)
        return real(uri)

    monkeypatch.setattr(faces_mod, "read_uri_bytes", racing)
    settings = _settings(model_root, tmp_path / "store", inputs)
    first = run_refresh(settings)
    rows = {rel: r[-1] for rel, r in rows_by_rel(settings.store, inputs).items()}
    t1, copy, yao = rows["albums/a/t1.jpg"], rows["albums/c/t1-copy.jpg"], rows["albums/b/yao.jpg"]
    assert t1["status"] == "quarantined"
    assert t1["reason_code"] == InputCode.CHANGED_WHILE_READ
    assert t1["image_sha256"] == f"unread:{InputCode.CHANGED_WHILE_READ}"
    assert copy["image_sha256"] == t1["image_sha256"] and copy["status"] == "quarantined"
    assert yao["reason_code"] == "unreadable" and yao["image_sha256"] == "unread:unreadable"
    assert not len(read_faces(open_store(settings.store))), "no faces filed under a stale hash"
    assert first.run.quarantined == 3

    monkeypatch.setattr(faces_mod, "read_uri_bytes", real)
    run_refresh(settings)
    rows = {rel: r[-1] for rel, r in rows_by_rel(settings.store, inputs).items()}
    assert rows["albums/a/t1.jpg"]["status"] == "ok"
    assert rows["albums/b/yao.jpg"]["status"] == "ok"
    assert rows["albums/c/t1-copy.jpg"]["reason_code"] == InputCode.DUPLICATE_CONTENT
    faces = read_faces(open_store(settings.store), columns=["face_id", "image_uri"]).to_pylist()
    by_uri = Counter(Path(f["image_uri"]).name for f in faces)
    assert set(by_uri) == {"t1.jpg", "yao.jpg"}, by_uri
    assert len({f["face_id"] for f in faces}) == len(faces)


def test_a_source_that_is_a_file_is_one_clear_error(tmp_path, sample_photos):
    """A photo given as a source was taken in as a quarantined row whose reason read "'' is
    not <album_id>/<image>"; a refresh now refuses it before the store is made."""
    from tasks.discover import check_local_sources

    photo = tmp_path / "A.jpg"
    shutil.copy(sample_photos["t1"], photo)
    settings = load_settings(
        None, store=str(tmp_path / "store"), sources=[SourceSpec(kind="album", uri=str(photo))]
    )
    with pytest.raises(SourceError, match="is not a folder: an album source is a folder of album"):
        check_local_sources(settings)
