"""Copies of one capture in an album (tasks/cluster.capture_copies): another file of one photo
(exported to another format, its metadata edited by a photo app) brought its faces in again, so
that two bystanders seen once each became identities of two crops of one capture, and the
training set held every crop of the photo twice."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.cluster import capture_copies
from tests.plugins.samples import inline_settings


def _face(x: float, y: float, s: float = 100.0) -> list[float]:
    box = [x, y, x + s, y + s]
    marks = [x + 30, y + 40, x + 70, y + 40, x + 50, y + 60, x + 35, y + 80, x + 65, y + 80]
    return box + marks


def test_copies_are_the_photos_whose_every_face_lies_where_the_kept_ones_do():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(4, 32)).astype(np.float32)
    rows = [
        ("A", "r2", _face(10, 10), e[0]),  # A: two faces, seen in run r2
        ("A", "r2", _face(200, 10), e[1]),
        ("B", "r1", _face(10.6, 9.7), e[0] + 0.02),  # B: A's faces (re-encoded), seen first
        ("B", "r1", _face(200.4, 10.3), e[1]),
        ("C", "r1", _face(10, 10), e[0]),  # C: one of A's two faces only: another photo
        ("D", "r3", _face(10, 10), e[0]),  # D and E: A's layout, but a face moved / another person
        ("D", "r3", _face(206, 10), e[1]),
        ("E", "r3", _face(10, 10), e[0]),
        ("E", "r3", _face(200, 10), e[2]),
        ("F", "r4", _face(10.2, 10), e[0]),  # F: a copy again, of a copy
        ("F", "r4", _face(200, 10.1), e[1]),
    ]
    photo = [r[0] for r in rows]
    run = [r[1] for r in rows]
    geometry = np.array([r[2] for r in rows])
    emb = np.stack([r[3] for r in rows])
    has = np.ones(len(rows), bool)
    got = capture_copies(photo, run, geometry, emb, has)
    # B was seen first: A's and F's faces are copies of B's, face for face.
    assert got == {0: 2, 1: 3, 9: 2, 10: 3}
    # The same with the rows in another order.
    perm = rng.permutation(len(rows))
    back = {int(np.flatnonzero(perm == i)[0]): i for i in range(len(rows))}
    shuffled = capture_copies(
        [photo[i] for i in perm], [run[i] for i in perm], geometry[perm], emb[perm], has[perm]
    )
    assert {perm[i]: perm[j] for i, j in shuffled.items()} == got
    assert back  # (every row kept its place in the map)
    # Unknown geometry (a synthetic store's faces) matches nothing.
    assert capture_copies(photo, run, np.full_like(geometry, np.nan), emb, has) == {}
    # A different face at the same place (cosine < CAPTURE_COSINE) is no copy.
    other = emb.copy()
    other[0] = e[3]
    assert 0 not in capture_copies(photo, run, geometry, other, has)


def _with_xmp_rating(path: Path) -> None:
    """What a photo app does when it stars a photo: an XMP APP1 segment, pixels untouched."""
    b = path.read_bytes()
    xmp = (
        b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF "
        b"xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description "
        b"xmlns:xmp='http://ns.adobe.com/xap/1.0/' xmp:Rating='5'/></rdf:RDF></x:xmpmeta>"
    )
    path.write_bytes(b[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + b[2:])


def test_an_export_and_a_metadata_edit_add_no_sighting(tmp_path, sample_photos, model_root):
    from faceloop.commands.evaluate import _refresh_inline
    from faceloop.vocab import SAME_CAPTURE
    from storage.objectstore import open_store
    from storage.tables import read_faces

    albums = tmp_path / "in" / "albums"
    (albums / "X").mkdir(parents=True)
    shutil.copyfile(sample_photos["t1"], albums / "X" / "a.jpg")  # six people, seen once each
    settings = inline_settings(tmp_path / "store", model_root, album=albums)
    store = open_store(settings.store)

    def statuses() -> dict[str, list[tuple[str, str | None]]]:
        out: dict[str, list[tuple[str, str | None]]] = {}
        for r in read_faces(store).to_pylist():
            out.setdefault(Path(r["image_uri"]).name, []).append((r["status"], r["reason_code"]))
        return out

    _refresh_inline(settings, publish=True)
    first = statuses()
    assert len(first["a.jpg"]) == 6 and all(s == "rejected" for s, _ in first["a.jpg"])
    # The photo exported as PNG beside it, and then starred in a photo app.
    Image.open(albums / "X" / "a.jpg").save(albums / "X" / "a.png")
    _refresh_inline(settings, publish=True)
    _with_xmp_rating(albums / "X" / "a.jpg")
    _refresh_inline(settings, publish=True)
    faces = read_faces(store).to_pylist()
    assert len(faces) == 18  # three files of one capture, each decoded
    kept = {r["face_id"] for r in faces if r["run_id"] == faces[0]["run_id"]}
    copies = [r for r in faces if r["face_id"] not in kept]
    assert len(copies) == 12
    for r in copies:
        assert r["status"] == "rejected" and r["reason_code"] == SAME_CAPTURE, r["reason"]
        assert r["reason"].split("the same face as ")[1].split(",")[0] in kept
    # The bystanders stay strangers seen once: no identity, nothing published.
    assert not any(r["identity_id"] for r in faces)
    assert [r for r in faces if r["face_id"] in kept] == [
        r for r in faces if r["face_id"] in kept and r["status"] == "rejected"
    ]
