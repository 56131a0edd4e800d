"""benchmarks/compare_stores.py: matching two refreshes' faces and comparing their labels."""

from __future__ import annotations

import pytest

from benchmarks.compare_stores import compare_faces, match_faces


def _face(fid: str, img: str, x: float, status: str = "auto", ident: str | None = "p") -> dict:
    return {
        "face_id": fid,
        "image_sha256": img,
        "bbox": [x, 10.0, x + 40.0, 60.0],
        "status": status,
        "identity_id": ident,
    }


def test_match_by_id_then_by_nearest_box_of_the_same_image() -> None:
    a = [_face("f1", "i1", 0), _face("f2", "i1", 100), _face("f3", "i2", 0)]
    # f2's box moved by one rounding step (a new id); f3 is in another image than g3.
    b = [_face("g2", "i1", 101), _face("f1", "i1", 0), _face("g3", "i3", 0)]
    assert sorted(match_faces(a, b)) == [(0, 1), (1, 0)]
    assert match_faces(a, b, max_shift=0.5) == [(0, 1)]


def test_same_labels_and_a_split() -> None:
    a = [
        _face("f1", "i1", 0, ident="x"),
        _face("f2", "i2", 0, ident="x"),
        _face("f3", "i3", 0, ident="x"),
        _face("f4", "i4", 0, status="rejected", ident=None),
    ]
    same = [dict(f, identity_id=("y" if f["identity_id"] else None)) for f in a]
    res = compare_faces(a, same)  # other identity ids, the same partition
    assert res["matched"] == res["matched_by_face_id"] == 4
    assert res["identical_partition"] and res["status_agreement"] == 1.0
    split = [*same[:2], dict(same[2], identity_id="z", status="review"), same[3]]
    res = compare_faces(a, split)
    assert not res["identical_partition"]
    assert res["same_identity_pairwise_precision"] == 1.0
    assert res["same_identity_pairwise_recall"] == pytest.approx(1 / 3, abs=1e-6)  # 1 of 3
    assert res["status_agreement"] == 0.75
    assert res["status_b"] == {"auto": 2, "rejected": 1, "review": 1}
