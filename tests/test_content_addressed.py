"""Content-addressed model work (issue 10, point 1).

- Listing an unchanged source reads no file bytes: discovery trusts a file's stamp (size, mtime,
  inode locally; size + ETag on S3) and opens only new or changed files. Checked by counting the
  opens of the source's files in this process (every read of a local file goes through
  ``os.open``, storage/objectstore.py ``_iter_local``).
- Known bytes under a new path are never sent to the models: a moved file reuses its faces
  (reason ``moved``), a copy whose original is still listed is ``duplicate_content``.

The unit tier runs discovery alone on synthetic files (discovery never decodes); the integration
tier runs real refreshes (Prefect, Ray, models) over demo photos.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from faceloop.config import SourceSpec, load_settings
from faceloop.vocab import InputCode
from storage.objectstore import open_store
from storage.tables import append_images, read_faces, read_images

OLD = time.time() - 3600  # photos are old: their stamps are not "racy" (tasks/discover.py)


def _write(path: Path, data: bytes, mtime: float | None = OLD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


class OpenCounter:
    """Counts ``os.open`` calls on paths under ``root`` made by this process."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.paths: list[str] = []
        real = os.open

        def counting(p: str | os.PathLike[str], flags: int, *args: object, **kw: object) -> int:
            if os.fspath(p).startswith(self.root):
                self.paths.append(os.fspath(p))
            return real(p, flags, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", counting)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _settings(store: Path, albums: Path, **kw: object):
    return load_settings(
        None,
        store=str(store),
        sources=[SourceSpec(kind="album", uri=str(albums))],
        review={"enabled": False},
        **kw,
    )


@pytest.fixture
def albums(tmp_path: Path) -> Path:
    root = tmp_path / "inputs" / "albums"
    for a in ("a1", "a2"):
        for i in range(3):
            _write(root / a / f"p{i}.jpg", f"photo {a} {i}".encode() * 50)
    return root


# --------------------------------------------------------------------------------------------
# Unit tier: discovery alone


def test_unchanged_listing_reads_no_bytes(albums, tmp_path, monkeypatch):
    from tasks.discover import discover, read_stamps

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    first = discover(settings, st, "run-1")
    assert first.hashed == first.listed == 6
    pending1 = st.read_parquet(first.pending_rel).to_pylist()
    assert set(read_stamps(st)) == {r["image_uri"] for r in pending1}

    opens = OpenCounter(albums, monkeypatch)
    second = discover(settings, st, "run-2")
    assert opens.paths == [], "an unchanged listing opened files"
    assert second.hashed == 0 and second.listed == 6
    # The work list is the same (nothing was recorded in between): digests come from the cache.
    pending2 = st.read_parquet(second.pending_rel).to_pylist()
    assert {(r["image_uri"], r["image_sha256"]) for r in pending2} == {
        (r["image_uri"], r["image_sha256"]) for r in pending1
    }

    # New content (same size), a touched file (same bytes, new mtime) and a new file: those
    # three are read, nothing else.
    changed, touched = albums / "a1" / "p0.jpg", albums / "a2" / "p1.jpg"
    _write(changed, changed.read_bytes()[::-1], mtime=OLD + 120)
    os.utime(touched, (OLD + 60, OLD + 60))
    _write(albums / "a2" / "new.jpg", b"a new photo" * 40)
    opens.paths.clear()
    third = discover(settings, st, "run-3")
    assert third.hashed == 3
    assert sorted(opens.paths) == sorted(
        [str(changed), str(touched), str(albums / "a2" / "new.jpg")]
    )
    digests = {
        r["image_uri"]: r["image_sha256"] for r in st.read_parquet(third.pending_rel).to_pylist()
    }
    before = {r["image_uri"]: r["image_sha256"] for r in pending1}
    assert digests[str(touched)] == before[str(touched)]
    assert digests[str(changed)] != before[str(changed)]


def test_rehash_finds_a_file_rewritten_in_place_with_its_stamp_restored(albums, tmp_path):
    """``exiftool -P`` or ``rsync --inplace -t`` rewrite a file in place and put its mtime back:
    size, mtime and inode are unchanged, so the stamp vouches for the old hash. ``refresh
    --rehash`` trusts no stamp and finds the new content."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    first = discover(settings, st, "run-1")
    before = {
        r["image_uri"]: r["image_sha256"] for r in st.read_parquet(first.pending_rel).to_pylist()
    }
    edited = albums / "a1" / "p2.jpg"
    inode = edited.stat().st_ino
    _write(edited, edited.read_bytes()[::-1])  # same size, the old mtime put back
    assert edited.stat().st_ino == inode

    trusted = discover(settings, st, "run-2")
    assert trusted.hashed == 0
    got = {
        r["image_uri"]: r["image_sha256"] for r in st.read_parquet(trusted.pending_rel).to_pylist()
    }
    assert got[str(edited)] == before[str(edited)]  # the documented shortcut: not seen

    again = discover(settings, st, "run-3", rehash=True)
    assert again.hashed == again.listed == 6
    got = {
        r["image_uri"]: r["image_sha256"] for r in st.read_parquet(again.pending_rel).to_pylist()
    }
    assert got[str(edited)] == _sha(edited.read_bytes()) != before[str(edited)]
    assert {u: h for u, h in got.items() if u != str(edited)} == {
        u: h for u, h in before.items() if u != str(edited)
    }
    # Remembered under the new hash: the next plain refresh trusts the stamp again.
    assert discover(settings, st, "run-4").hashed == 0


def test_a_stamp_taken_right_after_a_write_is_not_trusted(albums, tmp_path, monkeypatch):
    """A file written within the timestamp granularity of the listing could change again in the
    same tick with the same stamp: it is hashed again until its stamp is old enough."""
    from tasks.discover import discover

    fresh = albums / "a1" / "fresh.jpg"
    _write(fresh, b"just written" * 30, mtime=None)
    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    assert discover(settings, st, "run-1").hashed == 7
    opens = OpenCounter(albums, monkeypatch)
    assert discover(settings, st, "run-2").hashed == 1
    assert opens.paths == [str(fresh)]


def test_a_file_the_face_stage_found_changed_is_hashed_again_whatever_its_stamp(
    albums, tmp_path, monkeypatch
):
    """The face stage found a file's bytes changed since discovery hashed it (recorded
    ``unread:changed_while_read``); swapped for other bytes of the same size and mtime, its
    stamp still vouched for the old hash, and every refresh sent it to the face stage again to
    find the same mismatch. Its stamp is not trusted until those bytes are decoded."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    first = discover(settings, st, "run-1")
    rows = st.read_parquet(first.pending_rel).to_pylist()
    swapped = albums / "a1" / "p0.jpg"
    _record(
        st,
        "run-1",
        [
            {k: r[k] for k in ("image_uri", "image_sha256", "source_group")}
            | (
                {
                    "image_sha256": "unread:changed_while_read",
                    "status": "quarantined",
                    "reason_code": "changed_while_read",
                }
                if r["image_uri"] == str(swapped)
                else {}
            )
            for r in rows
        ],
    )
    new = swapped.read_bytes()[::-1]  # same size, same mtime below
    _write(swapped, new)
    opens = OpenCounter(albums, monkeypatch)
    again = discover(settings, st, "run-2")
    assert opens.paths == [str(swapped)]
    (row,) = st.read_parquet(again.pending_rel).to_pylist()
    assert row["image_sha256"] == _sha(new)


def test_a_file_dated_in_the_future_is_read_once(albums, tmp_path, monkeypatch):
    """A file whose mtime is ahead of the clock (a camera's clock, ``touch -d 2030``) was hashed
    again at every refresh: its stamp never looked old enough to remember."""
    from tasks.discover import discover

    ahead = albums / "a1" / "ahead.jpg"
    _write(ahead, b"from the future" * 30, mtime=time.time() + 365 * 86400)
    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    assert discover(settings, st, "run-1").hashed == 7
    opens = OpenCounter(albums, monkeypatch)
    assert discover(settings, st, "run-2").hashed == 0
    assert opens.paths == []


def _record(store, run_id: str, rows: list[dict]) -> None:
    """Image rows as an earlier run that decoded them would have written."""
    append_images(
        store,
        run_id,
        pa.Table.from_pylist(
            [
                {
                    "size_bytes": 10,
                    "source_kind": "album",
                    "role": "album",
                    "status": "ok",
                    "width": 640,
                    "height": 480,
                    "n_faces": 2,
                    "run_id": run_id,
                    **r,
                }
                for r in rows
            ]
        ),
    )


def _discovered_and_recorded(settings, st) -> None:
    """A first discovery ("run-1"), its work list recorded as a run that decoded it would."""
    from tasks.discover import discover

    first = discover(settings, st, "run-1")
    rows = st.read_parquet(first.pending_rel).to_pylist()
    _record(
        st,
        "run-1",
        [{k: r[k] for k in ("image_uri", "image_sha256", "source_group")} for r in rows],
    )


def test_a_known_path_with_new_content_is_counted_not_logged(albums, tmp_path, caplog):
    """A known photo whose bytes changed is a new image; discovery logged its path at INFO
    (a photo's path often names the person). Now it is counted in the discovery line."""
    import logging

    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    changed = albums / "a1" / "p0.jpg"
    _write(changed, changed.read_bytes()[::-1], mtime=OLD + 120)
    with caplog.at_level(logging.DEBUG):
        again = discover(settings, st, "run-2")
    assert (again.new, again.content_changed, again.seen) == (1, 1, 5)
    assert not [r for r in caplog.records if str(albums) in r.getMessage()]


def _recorded_with_a_bomb(store: Path, albums: Path):
    """The store at ``store`` after a first run ("run-1") under ``limits.max_image_pixels``
    1000 over ``albums``: every photo recorded, a1/p0.jpg quarantined as a decompression
    bomb (no faces), and the limits it ran under noted. Returns the store."""
    from tasks.discover import note_input_limits

    settings = _settings(store, albums, limits={"max_image_pixels": 1000})
    st = open_store(settings.store)
    bomb = albums / "a1" / "p0.jpg"
    why = {"status": "quarantined", "reason": "decompression_bomb: 2000 px > 1000"}
    _record(
        st,
        "run-1",
        [
            {
                "image_uri": str(p),
                "image_sha256": _sha(p.read_bytes()),
                "source_group": p.parent.name,
            }
            | (why | {"reason_code": "decompression_bomb", "n_faces": 0} if p == bomb else {})
            for p in sorted(albums.rglob("*.jpg"))
        ],
    )
    note_input_limits(st, settings)
    return st


def test_a_file_looked_at_again_under_new_limits_is_not_new_content(albums, tmp_path):
    """After a change of limits the discovery line said "N known paths with new content, taken
    as new images" for the files it looked at again, although no file had changed."""
    from tasks.discover import discover

    st = _recorded_with_a_bomb(tmp_path / "store", albums)
    again = discover(_settings(tmp_path / "store", albums), st, "run-2")
    assert (again.retried, again.new, again.content_changed) == (1, 1, 0)


def test_a_file_over_a_limit_moved_is_looked_at_again_when_the_limit_changes(albums, tmp_path):
    """A photo over the pixel limit (decompression_bomb), then moved to another album: its new
    path is recorded ``moved`` with that verdict (the limit's verdict on its bytes), and the
    retry under new limits looked for rows coded with a limit, so the moved file stayed
    quarantined with no faces however the limit was raised."""
    from tasks.discover import discover, note_input_limits
    from tasks.summary import store_counts

    low = _settings(tmp_path / "store", albums, limits={"max_image_pixels": 1000})
    st = _recorded_with_a_bomb(tmp_path / "store", albums)
    bomb = albums / "a1" / "p0.jpg"
    bomb.rename(albums / "a2" / "big.jpg")
    moved = discover(low, st, "run-2")
    (row,) = moved.quarantined_rows
    assert (row["status"], row["reason_code"]) == ("quarantined", InputCode.MOVED)
    assert row["reason"].endswith("quarantined there: decompression_bomb")
    _recorded(st, moved)
    note_input_limits(st, low)
    assert (store_counts(st).images, store_counts(st).quarantined) == (6, 1)
    # The limit raised: the moved file is looked at again, at its new path.
    raised = discover(_settings(tmp_path / "store", albums), st, "run-3")
    assert (raised.retried, raised.new, raised.content_changed) == (1, 1, 0)
    (todo,) = st.read_parquet(raised.pending_rel).to_pylist()
    assert todo["image_uri"] == str(albums / "a2" / "big.jpg")
    # The limits unchanged: not looked at again.
    same = discover(low, st, "run-4")
    assert (same.retried, same.pending_rel, same.seen) == (0, None, 6)


def test_a_file_of_an_extension_not_taken_moved_is_taken_once_the_extension_is(albums, tmp_path):
    """The same for a file quarantined for its extension and then moved (a ``moved`` row out of
    the place it left): once ``limits.extensions`` takes it, it is read at its new path."""
    from tasks.discover import discover, note_input_limits

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _write(albums / "a1" / "download.pic", b"a JPEG saved by a browser" * 30)
    _recorded(st, discover(settings, st, "run-1"))
    note_input_limits(st, settings)
    (albums / "a1" / "download.pic").rename(albums / "a2" / "download.pic")
    moved = discover(settings, st, "run-2")
    assert [r["reason_code"] for r in moved.quarantined_rows] == [InputCode.MOVED]
    _recorded(st, moved)
    extensions = [*settings.limits.extensions, ".pic"]
    wider = _settings(tmp_path / "store", albums, limits={"extensions": extensions})
    taken = discover(wider, st, "run-3")
    assert (taken.retried, taken.new) == (1, 1)
    (todo,) = st.read_parquet(taken.pending_rel).to_pylist()
    assert todo["image_uri"] == str(albums / "a2" / "download.pic")


def test_moved_and_copied_files_reuse_known_faces(albums, tmp_path):
    """Known bytes at a new path: ``moved`` when none of their recorded paths is listed any
    more, ``duplicate_content`` while one is; neither is sent to the models."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    assert discover(settings, st, "run-2").pending_rel is None

    # a1 renamed to a1-renamed; one a2 photo copied into a3 while its original stays.
    shutil.move(albums / "a1", albums / "a1-renamed")
    (albums / "a3").mkdir()
    shutil.copy2(albums / "a2" / "p0.jpg", albums / "a3" / "p0.jpg")
    res = discover(settings, st, "run-3")
    assert res.pending_rel is None, "known bytes were queued for the models"
    assert res.new == 0
    assert (res.moved, res.duplicates, res.seen) == (3, 1, 3)
    assert res.listed == res.seen + res.new + res.moved + res.duplicates + res.quarantined
    assert res.hashed == 4, "only the files at new paths were read"
    by_uri = {r["image_uri"]: r for r in res.quarantined_rows}
    for i in range(3):
        row = by_uri[str(albums / "a1-renamed" / f"p{i}.jpg")]
        assert row["reason_code"] == InputCode.MOVED, row
        assert (row["status"], row["n_faces"], row["source_group"]) == ("ok", 2, "a1-renamed")
    copy = by_uri[str(albums / "a3" / "p0.jpg")]
    assert copy["reason_code"] == InputCode.DUPLICATE_CONTENT
    assert copy["reason"].endswith(str(albums / "a2" / "p0.jpg"))

    # Two new paths for bytes whose old path is gone, in one run: one move, one copy of it.
    _record(st, "run-3", res.quarantined_rows)
    shutil.copytree(albums / "a1-renamed", albums / "b1")
    shutil.move(albums / "a1-renamed", albums / "b2")
    res = discover(settings, st, "run-4")
    assert res.pending_rel is None
    assert (res.moved, res.duplicates) == (3, 3)
    kinds = {(r["source_group"], r["reason_code"]) for r in res.quarantined_rows}
    assert kinds == {("b1", InputCode.MOVED), ("b2", InputCode.DUPLICATE_CONTENT)}


def test_copies_of_new_content_in_one_run_reach_the_models_once(albums, tmp_path):
    """Of new files with the same bytes only the first by URI is queued; the others wait for
    its verdict as ``duplicate_content`` rows, which the label stage completes from it."""
    from tasks.discover import COPY_OF, discover
    from tasks.label import copies_decided

    for dst in ("a0/first.jpg", "a3/p0.jpg", "a3/p0-again.jpg"):
        _write(albums / dst, (albums / "a2" / "p0.jpg").read_bytes())
    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    res = discover(settings, st, "run-1")
    queued = [r["image_uri"] for r in st.read_parquet(res.pending_rel).to_pylist()]
    original = str(albums / "a0" / "first.jpg")
    assert original in queued and len(queued) == 6 and res.new == 6
    assert res.duplicates == 3
    assert res.listed == res.seen + res.new + res.moved + res.duplicates + res.quarantined
    assert {r["image_uri"] for r in res.quarantined_rows} == {
        str(albums / p) for p in ("a2/p0.jpg", "a3/p0.jpg", "a3/p0-again.jpg")
    }
    assert all(r[COPY_OF] == original for r in res.quarantined_rows)

    def verdict(status: str, code: str | None) -> dict:
        return {
            "image_uri": original,
            "status": status,
            "reason": f"{code}: why" if code else None,
            "reason_code": code,
            "width": 64,
            "height": 48,
            "n_faces": 2 if status == "ok" else 0,
            "phash": 7,
        }

    decided = copies_decided(res.quarantined_rows, [verdict("ok", None)])
    assert all(COPY_OF not in r for r in decided)
    assert {
        (r["status"], r["reason_code"], r["n_faces"], r["width"], r["phash"]) for r in decided
    } == {("ok", InputCode.DUPLICATE_CONTENT, 2, 64, 7)}
    # bytes that could not be decoded: each copy gets the same verdict, not "a copy"
    decided = copies_decided(res.quarantined_rows, [verdict("quarantined", "decode_error")])
    assert {(r["status"], r["reason_code"]) for r in decided} == {("quarantined", "decode_error")}
    with pytest.raises(RuntimeError, match="returned no row for"):
        copies_decided(res.quarantined_rows, [])


def test_hidden_and_system_files_are_ignored_not_quarantined(tmp_path):
    """.DS_Store, macOS's ._* files, Synology's @eaDir thumbnails, Thumbs.db: each made an
    images-table row (a quarantine, or for @eaDir an album of thumbnails of every photo)."""
    from tasks.discover import discover

    root = tmp_path / ".photos" / "albums"  # a hidden folder above the root does not count
    real = ["a1/p0.jpg", "a2/p1.jpg"]
    junk = [
        "a1/.DS_Store",
        "a1/._p0.jpg",
        "@eaDir/p0.jpg/SYNOPHOTO_THUMB_M.jpg",
        "#recycle/a1/p0.jpg",
        "A2/THUMBS.DB",
        ".hidden_album/p2.jpg",
        "a2/desktop.ini",
        # A sync client's or a browser's photo still coming in (quarantined for good before).
        "a1/p3.jpg.part",
        "a2/p4.jpg.!sync",
        "a2/p5.jpg.crdownload",
    ]
    for i, rel in enumerate(real + junk):
        _write(root / rel, f"bytes {i}".encode() * 40)
    settings = _settings(tmp_path / "store", root)
    res = discover(settings, open_store(settings.store), "run-1")
    assert (res.listed, res.ignored, res.new, res.quarantined) == (2, len(junk), 2, 0)
    pending = open_store(settings.store).read_parquet(res.pending_rel).to_pylist()
    queued = {r["image_uri"] for r in pending}
    assert queued == {str(root / r) for r in real}
    # limits.ignore: [] lists everything again
    everything = _settings(tmp_path / "store2", root, limits={"ignore": []})
    res = discover(everything, open_store(everything.store), "run-1")
    assert (res.listed, res.ignored) == (len(real) + len(junk), 0)


@pytest.mark.parametrize(
    "patterns",
    [
        None,  # the defaults
        ["*.tmp", "IMG_??.jpg", "[!a]*x", "[ab]c", "a[]]b", "x\\y", "^z", "[a-c]q", "[!]]z"],
        ["[", "[!", "[]", "q[!", "*", "?", "[!.]", "[^a]b"],
    ],
)
def test_ignore_patterns_match_as_fnmatch_does_on_each_part(patterns):
    """limits.ignore runs as one regex (fnmatch per part and pattern: 11 s per 10^6 paths);
    it decides as fnmatch, ignoring case, would on each part of the path."""
    import fnmatch
    import random

    from faceloop.config import InputLimits
    from tasks.discover import ignored

    pats = patterns if patterns is not None else InputLimits().ignore
    alphabet = [*"abcxyzq.?*[]!^\\#$@-_ /", "tmp", ".DS_Store", "THUMBS.db", "IMG_12.jpg", "@eaDir"]
    rnd = random.Random(7)
    for _ in range(5000):
        rel = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 12))).strip("/")
        want = any(
            fnmatch.fnmatchcase(part.casefold(), p.casefold())
            for part in rel.split("/")
            if part
            for p in pats
        )
        assert ignored(rel, pats) == want, (rel, pats)


def test_a_refresh_without_sources_says_so(tmp_path, caplog):
    """`faceloop refresh --store S` with no config: 0 files listed and a success, no word."""
    import logging

    from tasks.discover import discover

    settings = load_settings(None, store=str(tmp_path / "store"))
    logger = logging.getLogger("tasks.discover")
    logger.addHandler(caplog.handler)
    try:
        res = discover(settings, open_store(settings.store), "run-1")
    finally:
        logger.removeHandler(caplog.handler)
    assert res.listed == 0 and "no sources are configured" in caplog.text


def test_a_source_that_lists_nothing_while_the_store_holds_its_images_is_warned_about(
    albums, tmp_path, caplog
):
    """A source whose NFS mount failed (the mount point there, empty) refreshed with "0 files
    listed" and no word, and its stamps were dropped: back on its mount, every file of it was
    read again. Now discovery warns, the run names it, and its images and stamps stay as they
    were. A first run on an empty source, and a source whose photos all moved to another one,
    are not warned about."""
    import logging

    from tasks.discover import discover, read_stamps
    from tasks.summary import store_counts

    other = tmp_path / "inputs" / "more"
    other.mkdir(parents=True)
    settings = _settings(tmp_path / "store", albums)
    settings.sources.append(SourceSpec(kind="album", uri=str(other)))
    st = open_store(settings.store)
    logger = logging.getLogger("tasks.discover")
    logger.addHandler(caplog.handler)
    try:
        first = discover(settings, st, "run-1")  # `more` is empty, and holds nothing yet
        assert first.empty_sources == {} and "listed no files" not in caplog.text
        _recorded(st, first)
        stamps = read_stamps(st)
        shutil.move(albums, tmp_path / "offline")
        albums.mkdir()  # the mount point, not mounted
        down = discover(settings, st, "run-2")
        _recorded(st, down)
        assert (down.listed, down.quarantined_rows) == (0, [])
        assert down.empty_sources == {str(albums): 6}
        assert (
            f"source {albums} listed no files, the store holds 6 images from it: is it mounted?"
            in caplog.text
        )
        assert read_stamps(st) == stamps and store_counts(st).images == 6
        albums.rmdir()
        shutil.move(tmp_path / "offline", albums)
        back = discover(settings, st, "run-3")
        assert (back.listed, back.hashed, back.seen, back.empty_sources) == (6, 0, 6, {})
        # Every photo moved to the other source: moved, and nothing to warn about.
        caplog.clear()
        shutil.move(albums / "a1", other / "a1")
        shutil.move(albums / "a2", other / "a2")
        moved = discover(settings, st, "run-4")
        assert (moved.moved, moved.empty_sources) == (6, {})
        assert "listed no files" not in caplog.text
    finally:
        logger.removeHandler(caplog.handler)


# --------------------------------------------------------------------------------------------
# Integration tier: real refreshes


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.integration
def test_moving_an_album_sends_only_the_new_photo_to_the_models(
    prefect_server, ray_session, model_root, sample_photos, tmp_path, monkeypatch
):
    from PIL import Image

    from faceloop.config import ModelSettings
    from faceloop.demo import build_demo_inputs
    from flows.refresh import run_refresh
    from tasks.backends import load_backend

    inputs = tmp_path / "inputs"
    backend = load_backend(ModelSettings(root=str(model_root)))
    build_demo_inputs(inputs, backend.detect, copies=2, bad_files=False)
    for p in inputs.rglob("*"):
        if p.is_file():
            os.utime(p, (OLD, OLD))
    albums = inputs / "albums"
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[SourceSpec(kind="album", uri=str(albums))],
        models={"root": str(model_root)},
        # hash_min_files=1: the files at new paths are hashed on Ray Data.
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8, "hash_min_files": 1},
        review={"enabled": False},
    )
    first = run_refresh(settings)
    st = open_store(settings.store)
    n_images = first.run.files_listed
    assert first.run.images_sent_to_models == n_images
    assert first.run.files_hashed == n_images

    cols = ["face_id", "image_uri", "image_sha256", "identity_id", "status", "source_group"]
    before = {f["face_id"]: f for f in read_faces(st, columns=cols).to_pylist()}
    assert any(f["identity_id"] for f in before.values())

    # Move (rename) one album folder, add one new photo to it.
    album = max((p for p in albums.iterdir() if p.is_dir()), key=lambda p: len(list(p.iterdir())))
    moved_to = albums / f"{album.name}-moved"
    shutil.move(album, moved_to)
    moved_files = sorted(p for p in moved_to.iterdir())
    Image.open(sample_photos["yaoming"]).rotate(3).save(moved_to / "new_photo.jpg", quality=90)
    # ... and a copy of it in a new album, found in the same run: the models see it once
    copy = albums / "zz-copies" / "the_same_photo.jpg"
    copy.parent.mkdir()
    shutil.copy(moved_to / "new_photo.jpg", copy)
    for p in (moved_to / "new_photo.jpg", copy):
        os.utime(p, (OLD, OLD))

    second = run_refresh(settings)
    record = open_store(settings.store).read_bytes(f"runs/{second.run_id}.json").decode()
    assert '"images_sent_to_models": 1' in record
    assert second.run.images_sent_to_models == 1
    assert second.run.moved == len(moved_files)
    assert (second.run.new_images, second.run.duplicates) == (1, 1)
    assert second.run.files_hashed == len(moved_files) + 2
    rows = {r["image_uri"]: r for r in read_images(st).to_pylist()}
    for p in moved_files:
        assert rows[str(p)]["reason_code"] == InputCode.MOVED
    original = rows[str(moved_to / "new_photo.jpg")]
    assert rows[str(copy)]["reason_code"] == InputCode.DUPLICATE_CONTENT
    assert rows[str(copy)]["reason"].endswith(str(moved_to / "new_photo.jpg"))
    for k in ("status", "n_faces", "width", "height", "phash", "image_sha256"):
        assert rows[str(copy)][k] == original[k], k
    assert original["n_faces"] >= 1
    after = {f["face_id"]: f for f in read_faces(st, columns=cols).to_pylist()}
    moved_shas = {rows[str(p)]["image_sha256"] for p in moved_files}
    moved_faces = [f for f in before.values() if f["image_sha256"] in moved_shas]
    assert moved_faces, "the moved album had faces"
    for f in moved_faces:
        assert after[f["face_id"]]["identity_id"] == f["identity_id"], "identity changed"
        assert after[f["face_id"]]["status"] == f["status"], "status changed"
    assert len(after) == len(set(after)), "face ids unique"
    new_faces = set(after) - set(before)
    assert new_faces and all(
        after[f]["image_uri"] == str(moved_to / "new_photo.jpg") for f in new_faces
    )
    # The renamed folder continues its album: the new photo is clustered with the old ones.
    assert {after[f]["source_group"] for f in new_faces} == {album.name}
    assert second.run.renamed_album_photos == 1

    # Unchanged: the refresh opens none of the source files and reads no bytes.
    opens = OpenCounter(inputs, monkeypatch)
    third = run_refresh(settings)
    assert opens.paths == []
    assert third.run.files_hashed == 0 and third.run.images_sent_to_models == 0
    assert third.run.already_seen == third.run.files_listed


@pytest.mark.integration
def test_id_photos_moved_between_subject_folders_are_verified_where_they_are(
    prefect_server, ray_session, model_root, tmp_path
):
    """A KYC team refiled a misfiled live capture (S003's live1 belongs to a new subject S005)
    and renamed a subject folder (S002 -> S002b) while adding a live photo to it. The moved
    faces kept the subject they were decoded under: the refiled capture stayed S003's and was
    never compared with S005's ID photo, and S002b's new live face was quarantined as
    "idcard_no_face_in_id_photo" (its ID photo's face was still S002's). The faces follow
    their photos now."""
    from PIL import Image

    from faceloop.config import ModelSettings
    from faceloop.demo import build_demo_inputs, chip_photo, face_boxes
    from faceloop.samples import sample_photos
    from flows.refresh import run_refresh
    from tasks.backends import load_backend

    inputs = tmp_path / "inputs"
    backend = load_backend(ModelSettings(root=str(model_root)))
    build_demo_inputs(inputs, backend.detect, copies=1, bad_files=False)
    ids = inputs / "idcards"
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[SourceSpec(kind="idcard", uri=str(ids))],
        models={"root": str(model_root)},
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
        review={"enabled": False},
    )
    run_refresh(settings)
    st = open_store(settings.store)
    cols = ["face_id", "image_sha256", "source_group", "role", "status", "identity_id", "reason"]

    def faces() -> list[dict]:
        return read_faces(st, columns=cols).to_pylist()

    def content(p: Path) -> str:
        import hashlib

        return hashlib.sha256(p.read_bytes()).hexdigest()

    refiled = content(ids / "S003" / "live1.jpg")
    assert all(f["status"] != "auto" for f in faces() if f["image_sha256"] == refiled)
    t1 = Image.open(sample_photos()["t1"]).convert("RGB")
    person4 = face_boxes(t1, backend.detect)[4]  # S003's live photos show person 4
    (ids / "S005").mkdir()
    chip_photo(t1, person4).save(ids / "S005" / "id.jpg", quality=95)
    shutil.move(ids / "S003" / "live1.jpg", ids / "S005" / "live1.jpg")
    shutil.move(ids / "S002", ids / "S002b")
    Image.open(ids / "S002b" / "live1.jpg").rotate(4).save(ids / "S002b" / "live3.jpg", quality=90)

    second = run_refresh(settings)
    assert second.run.moved == 3 + 1  # S002's three photos and the refiled capture
    assert second.run.refiled_faces >= 4
    after = faces()
    mine = [f for f in after if f["image_sha256"] == refiled]
    assert {f["source_group"] for f in mine} == {"S005"}
    assert ("auto", "S005") in {(f["status"], f["identity_id"]) for f in mine}, mine
    assert [
        f for f in after if (f["source_group"], f["role"], f["status"]) == ("S005", "id", "auto")
    ]
    s002b = [f for f in after if f["source_group"] == "S002b"]
    assert not [f for f in after if f["source_group"] == "S002"]
    assert {f["identity_id"] for f in s002b if f["status"] == "auto"} == {"S002b"}
    assert not [f for f in s002b if "no_face_in_id_photo" in (f["reason"] or "")], s002b
    assert sum(f["status"] == "auto" and f["role"] == "live" for f in s002b) >= 3

    # Renamed back: the photos were "already seen" at their old paths, and their faces stayed
    # in the subject folder that was gone. They are moved back now.
    shutil.move(ids / "S002b", ids / "S002")
    third = run_refresh(settings)
    assert (third.run.moved, third.run.images_sent_to_models) == (4, 0)
    back = faces()
    assert not [f for f in back if f["source_group"] == "S002b"]
    assert {f["identity_id"] for f in back if f["source_group"] == "S002"} - {None} == {"S002"}
    assert len(back) == len(after)


def test_a_file_quarantined_for_its_place_is_taken_once_a_source_lists_it_in_place(tmp_path):
    """A library of Year/Event/photo.jpg under one album source: every photo quarantined as
    wrong_layout. Pointing a source at the year folder, as the reason says, listed them as
    "already seen" for ever: the quarantine was kept as a verdict on the bytes."""
    from tasks.discover import discover

    lib = tmp_path / "photos"
    for rel in ("2024/Birthday/a.jpg", "2024/Birthday/b.jpg", "2023/Trip/c.jpg", "loose.jpg"):
        _write(lib / rel, rel.encode() * 40)
    settings = _settings(tmp_path / "store", lib)
    st = open_store(settings.store)
    first = discover(settings, st, "run-1")
    assert (first.quarantined, first.new, first.quarantined_by) == (4, 0, {"wrong_layout": 4})
    reasons = {Path(r["image_uri"]).name: r["reason"] for r in first.quarantined_rows}
    assert (
        "give it as a source instead of this one" in reasons["a.jpg"]
        and "'2024'" in reasons["a.jpg"]
    )
    assert "belongs to no album" in reasons["loose.jpg"]
    append_images(st, "run-1", pa.Table.from_pylist(first.quarantined_rows))

    again = discover(settings, st, "run-2")  # the same sources: nothing to look at again
    assert (again.seen, again.in_place_again, again.new) == (4, 0, 0)

    year = settings.model_copy(
        update={"sources": [SourceSpec(kind="album", uri=str(lib / "2024"))]}
    )
    fixed = discover(year, st, "run-3")
    assert (fixed.in_place_again, fixed.new, fixed.quarantined) == (2, 2, 0)
    pending = st.read_parquet(fixed.pending_rel).to_pylist()
    assert {(Path(r["image_uri"]).name, r["source_group"]) for r in pending} == {
        ("a.jpg", "Birthday"),
        ("b.jpg", "Birthday"),
    }


def _recorded(st, result) -> None:
    """A discovery's rows recorded as the run that decoded its work list would (one images
    file per run)."""
    decoded = []
    if result.pending_rel:
        decoded = [
            {k: r[k] for k in ("image_uri", "image_sha256", "source_group")}
            for r in st.read_parquet(result.pending_rel).to_pylist()
        ]
    _record(st, result.run_id, [*result.quarantined_rows, *decoded])


def _groups(st, result) -> dict[str, str]:
    return {
        Path(r["image_uri"]).name: r["source_group"]
        for r in st.read_parquet(result.pending_rel).to_pylist()
    }


def test_an_edit_reverted_and_an_album_moved_back_are_where_they_are(albums, tmp_path):
    """A photo edited, then the edit reverted; an album renamed, then renamed back. Each came
    back to bytes and a path already recorded, so discovery called it "already seen" and wrote
    nothing: the path's latest row kept naming the edit (an ID photo restored this way counted
    as replaced by the edit), and the album's photos stayed counted under the name it no
    longer had. Each writes a row now, without model work."""
    from tasks.discover import discover
    from tasks.summary import current_images

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    photo = albums / "a2" / "p1.jpg"
    original = photo.read_bytes()
    _write(photo, original[::-1], mtime=OLD + 60)
    edited = discover(settings, st, "run-2")
    assert (edited.new, edited.content_changed) == (1, 1)
    _recorded(st, edited)
    shutil.move(albums / "a1", albums / "a1-renamed")
    moved = discover(settings, st, "run-3")
    assert moved.moved == 3
    _recorded(st, moved)

    _write(photo, original, mtime=OLD + 120)
    shutil.move(albums / "a1-renamed", albums / "a1")
    back = discover(settings, st, "run-4")
    assert back.pending_rel is None, "known bytes were queued for the models"
    assert (back.restored, back.moved, back.new, back.seen) == (1, 3, 0, 2)
    assert back.listed == (
        back.seen + back.new + back.moved + back.restored + back.duplicates + back.quarantined
    )
    rows = {Path(r["image_uri"]).relative_to(albums).as_posix(): r for r in back.quarantined_rows}
    assert rows["a2/p1.jpg"]["reason_code"] == InputCode.RESTORED
    assert rows["a1/p0.jpg"]["reason_code"] == InputCode.MOVED
    assert "a1-renamed/p0.jpg" in rows["a1/p0.jpg"]["reason"]
    _recorded(st, back)
    current = current_images(st, ["image_uri", "image_sha256"]).to_pylist()
    assert len(current) == 6
    assert {Path(r["image_uri"]).parent.name for r in current} == {"a1", "a2"}
    assert {r["image_sha256"] for r in current if r["image_uri"] == str(photo)} == {_sha(original)}
    again = discover(settings, st, "run-5")  # and then it is seen, as before
    assert (again.seen, again.restored, again.moved) == (6, 0, 0)


def test_new_photos_in_a_renamed_album_are_clustered_with_its_earlier_photos(albums, tmp_path):
    """An album folder renamed, then photos added to it: the moved photos keep their faces
    (and album ``a1``), and the new ones formed an album of their own (``a1-renamed``),
    clustered apart from the earlier photos of the same people. Now they join ``a1``, in the
    run of the rename and in every later run."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    shutil.move(albums / "a1", albums / "a1-renamed")
    _write(albums / "a1-renamed" / "new.jpg", b"taken after the rename" * 30)
    second = discover(settings, st, "run-2")
    assert (second.moved, second.new, second.renamed_album_photos) == (3, 1, 1)
    assert _groups(st, second) == {"new.jpg": "a1"}
    _recorded(st, second)

    _write(albums / "a1-renamed" / "later.jpg", b"a week later" * 30)
    third = discover(settings, st, "run-3")
    assert _groups(st, third) == {"later.jpg": "a1"}
    _recorded(st, third)

    # Renamed again: still the same album.
    shutil.move(albums / "a1-renamed", albums / "a1-final")
    _write(albums / "a1-final" / "last.jpg", b"the last one" * 30)
    fourth = discover(settings, st, "run-4")
    assert _groups(st, fourth) == {"last.jpg": "a1"}


def test_a_split_a_merge_and_a_copied_album_stay_albums_of_their_own(albums, tmp_path):
    """Only a rename continues an album: photos moved out of an album that is still listed
    (a split), two albums' photos in one folder (a merge) and a copy of an album whose
    folder is still there start or keep their own album."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    (albums / "a2-split").mkdir()
    shutil.move(albums / "a2" / "p0.jpg", albums / "a2-split" / "p0.jpg")  # a2 keeps p1, p2
    _write(albums / "a2-split" / "new.jpg", b"new in the split" * 30)
    shutil.copytree(albums / "a1", albums / "a1-copy")
    _write(albums / "a1-copy" / "new.jpg", b"new in the copy" * 30)
    split = discover(settings, st, "run-2")
    assert split.renamed_album_photos == 0
    assert {
        r["image_uri"]: r["source_group"] for r in st.read_parquet(split.pending_rel).to_pylist()
    } == {
        str(albums / "a2-split" / "new.jpg"): "a2-split",
        str(albums / "a1-copy" / "new.jpg"): "a1-copy",
    }
    _recorded(st, split)

    # a1's photos moved into a2 (a1 gone), one new photo there: a2 is made of two albums.
    for p in (albums / "a1").iterdir():
        shutil.move(p, albums / "a2" / f"from-a1-{p.name}")
    (albums / "a1").rmdir()
    shutil.rmtree(albums / "a1-copy")
    _write(albums / "a2" / "merged-new.jpg", b"new in the merge" * 30)
    merge = discover(settings, st, "run-3")
    assert _groups(st, merge) == {"merged-new.jpg": "a2"}


def test_the_store_counts_a_moved_photo_once(albums, tmp_path):
    """The run summary's image total counted every URI's latest row, so a renamed album of 3
    photos made 6 images (the places they left keep their rows). A copy is still an image."""
    from tasks.discover import discover
    from tasks.summary import store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    assert store_counts(st).images == 6
    shutil.move(albums / "a1", albums / "a1-renamed")
    _recorded(st, discover(settings, st, "run-2"))
    assert store_counts(st).images == 6
    shutil.copy(albums / "a2" / "p0.jpg", albums / "a2" / "p0-copy.jpg")
    _recorded(st, discover(settings, st, "run-3"))
    assert store_counts(st).images == 7
    # Moved back: the first place is current again, the second one left.
    shutil.move(albums / "a1-renamed", albums / "a1")
    _recorded(st, discover(settings, st, "run-4"))
    assert store_counts(st).images == 7


def test_a_misplaced_photo_put_in_its_album_is_no_longer_counted_quarantined(albums, tmp_path):
    """A photo dropped at the source's root (wrong_layout) and then moved into an album: the
    store's totals kept counting it as a quarantined image beside the album's copy of it."""
    from tasks.discover import discover
    from tasks.summary import store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _write(albums / "loose.jpg", b"a photo at the root" * 40)
    _recorded(st, discover(settings, st, "run-1"))
    assert (store_counts(st).images, store_counts(st).quarantined) == (7, 1)
    shutil.move(albums / "loose.jpg", albums / "a1" / "loose.jpg")
    _recorded(st, discover(settings, st, "run-2"))
    assert (store_counts(st).images, store_counts(st).quarantined) == (7, 0)


def test_a_photo_of_a_renamed_album_edited_in_the_same_run_counts_once(albums, tmp_path):
    """An album folder renamed and one of its photos edited, both seen by one refresh: the
    edit was a new photo and the place it was at before the rename kept counting (a photo
    deleted from its source), so the store counted 7 photos for 6 files, and `faceloop forget
    --image <new path>` missed the original. Seen by two refreshes, the path's history is the
    move and then the edit: one refresh now records both."""
    from storage.forget import _held_here
    from tasks.discover import EARLIER, discover
    from tasks.summary import current_images, store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    before = {r["image_uri"]: r["image_sha256"] for r in read_images(st).to_pylist()}
    shutil.move(albums / "a1", albums / "a1-renamed")
    edited = albums / "a1-renamed" / "p1.jpg"
    _write(edited, b"an edit of it" * 60, mtime=OLD + 100)
    again = discover(settings, st, "run-2")
    assert (again.moved, again.new, again.renamed_album_photos) == (2, 1, 1)
    (earlier,) = [r for r in again.quarantined_rows if r.get(EARLIER)]
    assert earlier["image_uri"] == str(edited)
    assert earlier["image_sha256"] == before[str(albums / "a1" / "p1.jpg")]
    assert earlier["reason_code"] == InputCode.MOVED
    _recorded(st, again)  # (the earlier state first, as the label stage writes them)
    assert store_counts(st).images == 6
    now = {
        r["image_uri"]: r["image_sha256"]
        for r in current_images(st, ["image_uri", "image_sha256"]).to_pylist()
    }
    assert str(albums / "a1" / "p1.jpg") not in now
    assert now[str(edited)] == _sha(edited.read_bytes())
    # Both versions are the photo at the new path's: forget --image takes both.
    rows = read_images(st).to_pylist()
    held = _held_here([r for r in rows if r["image_uri"] == str(edited)], rows)
    assert held == {before[str(albums / "a1" / "p1.jpg")], _sha(edited.read_bytes())}


def test_a_copy_made_after_its_album_was_renamed_is_a_copy(albums, tmp_path):
    """An album renamed, then a photo of it copied into another album: the copy was recorded
    as "moved: same bytes as <the album's old path>, which is no longer listed" (a move out of
    a place the rename had already left), and the run counted a move instead of a duplicate."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    shutil.move(albums / "a1", albums / "a1-renamed")
    _recorded(st, discover(settings, st, "run-2"))
    shutil.copy(albums / "a1-renamed" / "p0.jpg", albums / "a2" / "p0-copy.jpg")
    third = discover(settings, st, "run-3")
    assert (third.moved, third.duplicates) == (0, 1)
    (row,) = third.quarantined_rows
    assert row["reason_code"] == InputCode.DUPLICATE_CONTENT and row["moved_from"] is None
    assert row["reason"].endswith(str(albums / "a1-renamed" / "p0.jpg"))


def test_an_unusable_file_moved_counts_once_and_is_not_judged_again(albums, tmp_path):
    """A file the decoder quarantined (corrupt bytes), then its album renamed: the new path was
    a new file (sent to the face stage again, quarantined again) while the path it left kept
    its quarantined row, so the store counted it twice (a moved source root: every quarantined
    file twice). It is recorded as moved now, with the verdict its bytes got; a copy of it
    beside the original is still judged as a file of its own."""
    from tasks.discover import discover
    from tasks.summary import store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _write(albums / "a1" / "bad.jpg", b"\xff\xd8 not really a JPEG" * 20)
    first = discover(settings, st, "run-1")
    rows = st.read_parquet(first.pending_rel).to_pylist()
    verdict = {
        "status": "quarantined",
        "reason": "corrupt: header unreadable",
        "reason_code": "corrupt",
        "width": None,
        "height": None,
        "n_faces": 0,
    }
    _record(
        st,
        "run-1",
        [
            {k: r[k] for k in ("image_uri", "image_sha256", "source_group")}
            | (verdict if r["image_uri"].endswith("bad.jpg") else {})
            for r in rows
        ],
    )
    assert (store_counts(st).images, store_counts(st).quarantined) == (7, 1)
    shutil.move(albums / "a1", albums / "a1-renamed")
    again = discover(settings, st, "run-2")
    assert again.pending_rel is None  # nothing reaches the face stage
    assert (again.moved, again.quarantined, again.quarantined_by) == (3, 1, {"corrupt": 1})
    (bad,) = [r for r in again.quarantined_rows if r["image_uri"].endswith("bad.jpg")]
    assert (bad["status"], bad["reason_code"]) == ("quarantined", InputCode.MOVED)
    assert bad["reason"].endswith("quarantined there: corrupt")
    _recorded(st, again)
    assert (store_counts(st).images, store_counts(st).quarantined) == (7, 1)
    # A copy beside it: its own file, judged by the face stage as any new file.
    shutil.copy(albums / "a1-renamed" / "bad.jpg", albums / "a2" / "bad-copy.jpg")
    third = discover(settings, st, "run-3")
    assert [Path(r["image_uri"]).name for r in st.read_parquet(third.pending_rel).to_pylist()] == [
        "bad-copy.jpg"
    ]


def test_a_file_quarantined_for_its_name_or_size_moved_counts_once(albums, tmp_path):
    """A phone video, a GIF (unsupported_extension) and a file too large to read
    (too_large_bytes) in an album folder that was then renamed: such a file is quarantined from
    the listing alone, never matched with the place it left, so the new path was recorded anew
    while the old one kept its row: the store counted each of them twice. Each is now a move out
    of the one place it left (``moved_from``), quarantined still; another too large file of
    the same size, still listed, is not taken for it."""
    from tasks.discover import discover
    from tasks.summary import current_images, store_counts

    settings = _settings(tmp_path / "store", albums, limits={"max_image_bytes": 2000})
    st = open_store(settings.store)
    _write(albums / "a1" / "IMG_0003.MOV", b"a phone video" * 40)
    _write(albums / "a1" / "IMG_0004.GIF", b"GIF89a an animation" * 30)
    _write(albums / "a1" / "huge.jpg", b"x" * 5000)
    _write(albums / "a2" / "also-huge.jpg", b"y" * 5000)  # same size, stays where it is
    _recorded(st, discover(settings, st, "run-1"))
    assert (store_counts(st).images, store_counts(st).quarantined) == (10, 4)
    shutil.move(albums / "a1", albums / "a1-renamed")
    again = discover(settings, st, "run-2")
    assert again.pending_rel is None
    assert (again.moved, again.quarantined) == (3, 3)
    assert again.quarantined_by == {"unsupported_extension": 2, "too_large_bytes": 1}
    rows = {Path(r["image_uri"]).name: r for r in again.quarantined_rows}
    for name in ("IMG_0003.MOV", "IMG_0004.GIF", "huge.jpg"):
        row = rows[name]
        assert (row["status"], row["reason_code"]) == ("quarantined", InputCode.MOVED)
        assert row["moved_from"] == str(albums / "a1" / name)
    assert "quarantined: unsupported_extension: '.mov' not in" in rows["IMG_0003.MOV"]["reason"]
    assert rows["huge.jpg"]["reason"].startswith(f"moved: same size as {albums / 'a1'}")
    _recorded(st, again)
    assert (store_counts(st).images, store_counts(st).quarantined) == (10, 4)
    current = {u for u in current_images(st, ["image_uri"]).column("image_uri").to_pylist()}
    assert not any(u.startswith(str(albums / "a1") + "/") for u in current)
    # Nothing changed: nothing recorded. Moved on again, and one moved back: still one each.
    assert discover(settings, st, "run-3").quarantined_rows == []
    (albums / "a1-renamed" / "IMG_0003.MOV").rename(albums / "a2" / "IMG_0003.MOV")
    (albums / "a1-renamed" / "huge.jpg").rename(albums / "a2" / "huge.jpg")
    _recorded(st, discover(settings, st, "run-4"))
    assert (store_counts(st).images, store_counts(st).quarantined) == (10, 4)
    # A new too large file of a size already recorded, where nothing left: a file of its own.
    _write(albums / "a2" / "third-huge.jpg", b"z" * 5000)
    new = discover(settings, st, "run-5")
    (row,) = new.quarantined_rows
    assert (row["reason_code"], row.get("moved_from")) == ("too_large_bytes", None)
    _recorded(st, new)
    assert (store_counts(st).images, store_counts(st).quarantined) == (11, 5)


def test_a_file_moved_out_of_its_one_place_and_back_is_where_it_is(albums, tmp_path):
    """A phone video (quarantined from the listing alone) moved to another album and back, and
    a copy of a photo renamed and renamed back: each move out of one place (``moved_from``)
    was recorded, and the pair (that place, the hash) counted as seen when the file came back,
    so nothing was written: the store and `faceloop explain` kept it at the place it had left
    again, no longer listed (a photo moved back with no copy left was where it is). Each is a
    move back now."""
    from tasks.discover import discover
    from tasks.summary import current_images, store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    video = albums / "a1" / "IMG_0003.MOV"
    _write(video, b"a phone video" * 40)
    _recorded(st, discover(settings, st, "run-1"))
    video.rename(albums / "a2" / video.name)
    _recorded(st, discover(settings, st, "run-2"))
    (albums / "a2" / video.name).rename(video)
    back = discover(settings, st, "run-3")
    (row,) = back.quarantined_rows
    assert (row["image_uri"], row["status"]) == (str(video), "quarantined")
    assert (row["reason_code"], row["moved_from"]) == (
        InputCode.MOVED,
        str(albums / "a2" / video.name),
    )
    assert back.quarantined_by == {"unsupported_extension": 1} and back.seen == 6
    _recorded(st, back)
    assert (store_counts(st).images, store_counts(st).quarantined) == (7, 1)
    current = current_images(st, ["image_uri"]).column("image_uri").to_pylist()
    assert [u for u in current if u.endswith(".MOV")] == [str(video)]
    again = discover(settings, st, "run-4")  # and then it is seen, as before
    assert (again.quarantined_rows, again.seen) == ([], 7)

    shutil.copy(albums / "a1" / "p0.jpg", albums / "a2" / "c.jpg")
    _recorded(st, discover(settings, st, "run-5"))
    (albums / "a2" / "c.jpg").rename(albums / "a2" / "d.jpg")
    _recorded(st, discover(settings, st, "run-6"))
    (albums / "a2" / "d.jpg").rename(albums / "a2" / "c.jpg")
    back = discover(settings, st, "run-7")
    (row,) = back.quarantined_rows
    assert (row["image_uri"], row["reason_code"]) == (str(albums / "a2" / "c.jpg"), "moved")
    assert row["moved_from"] == str(albums / "a2" / "d.jpg") and back.moved == 1
    _recorded(st, back)
    assert store_counts(st).images == 8
    current = current_images(st, ["image_uri"]).column("image_uri").to_pylist()
    assert str(albums / "a2" / "c.jpg") in current and str(albums / "a2" / "d.jpg") not in current


def test_a_photo_moved_while_a_copy_of_it_stays_elsewhere_counts_once(albums, tmp_path):
    """A photo copied into another album, then the copy moved within that album: its new path
    was called a duplicate of the original (still listed) and the path it left kept its row,
    so every such move added an image to the store's totals."""
    from tasks.discover import discover
    from tasks.summary import current_images, store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    shutil.copy(albums / "a1" / "p0.jpg", albums / "a2" / "c.jpg")
    _recorded(st, discover(settings, st, "run-2"))
    assert store_counts(st).images == 7
    (albums / "a2" / "c.jpg").rename(albums / "a2" / "d.jpg")
    moved = discover(settings, st, "run-3")
    assert (moved.moved, moved.duplicates, moved.new) == (1, 0, 0)
    (row,) = moved.quarantined_rows
    assert row["reason_code"] == InputCode.MOVED
    assert row["reason"].endswith(
        f"same bytes as {albums / 'a2' / 'c.jpg'}, which is no longer listed"
    )
    _recorded(st, moved)
    assert store_counts(st).images == 7
    current = {
        Path(u).name for u in current_images(st, ["image_uri"]).column("image_uri").to_pylist()
    }
    assert "c.jpg" not in current and {"d.jpg", "p0.jpg"} <= current
    # Moved again, and the original itself moved: each still one image.
    (albums / "a2" / "d.jpg").rename(albums / "a2" / "e.jpg")
    _recorded(st, discover(settings, st, "run-4"))
    (albums / "a1" / "p0.jpg").rename(albums / "a1" / "p0-moved.jpg")
    _recorded(st, discover(settings, st, "run-5"))
    assert store_counts(st).images == 7


def test_a_renamed_album_whose_photo_is_then_edited_counts_each_photo_once(albums, tmp_path):
    """An album renamed (its photos moved), then one photo edited in place: the edit's row took
    the place of the move's as its path's latest, and the path the photo had left was counted
    again."""
    from tasks.discover import discover
    from tasks.summary import store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    shutil.move(albums / "a1", albums / "a1-renamed")
    _recorded(st, discover(settings, st, "run-2"))
    assert store_counts(st).images == 6
    _write(albums / "a1-renamed" / "p0.jpg", b"p0 edited" * 60)
    _recorded(st, discover(settings, st, "run-3"))
    assert store_counts(st).images == 6


def test_a_misplaced_photo_copied_into_its_album_stays_counted_quarantined(albums, tmp_path):
    """A photo at the source's root (wrong_layout) copied into an album, the misplaced file left
    where it was: the root file stopped counting as quarantined though it is still there."""
    from tasks.discover import discover
    from tasks.summary import store_counts

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _write(albums / "loose.jpg", b"a photo at the root" * 40)
    _recorded(st, discover(settings, st, "run-1"))
    assert (store_counts(st).images, store_counts(st).quarantined) == (7, 1)
    shutil.copy(albums / "loose.jpg", albums / "a1" / "loose.jpg")
    copied = discover(settings, st, "run-2")
    assert (copied.new, copied.quarantined, copied.seen) == (1, 1, 6)
    assert copied.listed == copied.seen + copied.new + copied.quarantined
    _recorded(st, copied)
    assert (store_counts(st).images, store_counts(st).quarantined) == (8, 1)
    # Nothing changed: nothing recorded again.
    again = discover(settings, st, "run-3")
    assert (again.seen, again.quarantined) == (8, 0)


def test_two_photos_swapped_by_name_are_moved_not_copies(albums, tmp_path):
    """Swapping two files' names made both ``duplicate_content`` of each other's old path
    (which now holds other bytes), and the discovery line called them new images."""
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)
    a, b = albums / "a2" / "p0.jpg", albums / "a2" / "p1.jpg"
    tmp = albums / "a2" / "swap.tmp"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    swapped = discover(settings, st, "run-2")
    assert (swapped.moved, swapped.duplicates, swapped.new) == (2, 0, 0)
    assert swapped.content_changed == 0
    reasons = {Path(r["image_uri"]).name: r for r in swapped.quarantined_rows}
    assert {r["reason_code"] for r in reasons.values()} == {InputCode.MOVED}
    assert reasons["p0.jpg"]["reason"].endswith(f"same bytes as {b}, which holds other bytes now")


def test_a_photo_in_a_folder_inside_a_subject_is_told_both_ways_out() -> None:
    """`S1/old/live2.jpg` under an ID-card source was told to give 'S1' as a source "to take
    its folders as subjects": advice for albums, which would make 'old' a subject."""
    from tasks.discover import classify

    ids = SourceSpec(kind="idcard", uri="/x")
    why = classify(ids, "S1/old/live2.jpg", [".jpg"])[2]
    assert why is not None and why.code == "wrong_layout"
    assert "if it is a folder inside subject 'S1', move its photos up" in why.detail
    assert "if 'old' is a subject, give 'S1' as the source" in why.detail
    album = classify(SourceSpec(kind="album", uri="/x"), "2020/Trip/a.jpg", [".jpg"])[2]
    assert album is not None and "to take the folders of '2020' as albums" in album.detail


def test_run_refresh_takes_rehash_as_the_command_does(monkeypatch):
    """`faceloop refresh --rehash` had no counterpart for programs calling run_refresh."""
    from flows import refresh

    got: dict = {}

    def flow(**kw):
        got.update(kw, settings=refresh._HANDED_IN[kw["settings_handle"]])
        return "summary"

    monkeypatch.setattr(refresh, "refresh_flow", flow)
    settings = load_settings(None, store="/nowhere")
    assert refresh.run_refresh(settings, rehash=True) == "summary"
    assert got["rehash"] is True and got["settings"] is settings
    refresh.run_refresh(settings)
    assert got["rehash"] is False


def test_discovery_refuses_the_id_of_a_run_that_recorded_its_images(albums, tmp_path):
    """A run id given again (a re-run notebook cell calling the stages): the second run's images
    file replaced the first's, whose rows were lost (doctor: faces without an image row; the
    next refresh sent those photos through the models again)."""
    from faceloop.errors import ConfigError
    from tasks.discover import discover

    settings = _settings(tmp_path / "store", albums)
    st = open_store(settings.store)
    _discovered_and_recorded(settings, st)  # run-1
    with pytest.raises(ConfigError, match="run-1"):
        discover(settings, st, "run-1")
    assert discover(settings, st, "run-2").seen == 6
