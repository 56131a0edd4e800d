"""Metric functions against cases computed by hand."""

import math

import pytest

from evaluation.metrics import (
    ACCEPT,
    REJECT,
    REVIEW,
    bcubed_prf,
    f_score,
    mixed_identities,
    pairwise_prf,
    score_albums,
    score_claims,
    score_pairs,
    split_identities,
)


def test_pairwise_hand_case():
    # truth: a a a b b ; pred: 1 1 2 2 2
    # pred pairs: (0,1) (2,3) (2,4) (3,4) = 4; true among them: (0,1) (3,4) = 2
    # true pairs: 3 (a) + 1 (b) = 4
    r = pairwise_prf(list("aaabb"), [1, 1, 2, 2, 2])
    assert r.precision == pytest.approx(0.5)
    assert r.recall == pytest.approx(0.5)
    assert r.f == pytest.approx(0.5)


def test_pairwise_unlabelled_are_singletons():
    # truth a a a ; pred 1 1 None -> one correct pair claimed, 3 true pairs
    r = pairwise_prf(list("aaa"), [1, 1, None])
    assert r.precision == 1.0
    assert r.recall == pytest.approx(1 / 3)
    # two None must not be treated as one cluster
    r = pairwise_prf(list("ab"), [None, None])
    assert r.precision == 1.0  # nothing claimed
    assert r.recall == 1.0  # nothing to find


def test_pairwise_degenerate():
    assert pairwise_prf([], []).f == 1.0
    r = pairwise_prf(list("aa"), [None, None])
    assert (r.precision, r.recall, r.f) == (1.0, 0.0, 0.0)
    r = pairwise_prf(list("ab"), [1, 1])
    assert (r.precision, r.recall, r.f) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        pairwise_prf(["a"], [])


def test_bcubed_hand_case():
    # truth a a a b b ; pred 1 1 2 2 2
    # item precisions: 1,1 (cluster 1 all a); item2: 1/3, item3,4: 2/3 -> (1+1+1/3+2/3+2/3)/5
    # item recalls: a: 2/3,2/3,1/3 ; b: 1,1 -> (2/3+2/3+1/3+1+1)/5
    r = bcubed_prf(list("aaabb"), [1, 1, 2, 2, 2])
    assert r.precision == pytest.approx((1 + 1 + 1 / 3 + 2 / 3 + 2 / 3) / 5)
    assert r.recall == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1) / 5)
    assert r.f == pytest.approx(f_score(r.precision, r.recall))


def test_bcubed_perfect_and_all_singletons():
    r = bcubed_prf(list("aab"), ["x", "x", "y"])
    assert (r.precision, r.recall) == (1.0, 1.0)
    r = bcubed_prf(list("aab"), [None, None, None])
    assert r.precision == 1.0
    assert r.recall == pytest.approx((0.5 + 0.5 + 1) / 3)
    assert bcubed_prf([], []).f == 1.0


def test_split_and_mixed():
    truth = list("aaabbc")
    pred = [1, 1, 2, 2, 2, None]
    assert split_identities(truth, pred) == (1, 2)  # a over ids 1 and 2; c has no labelled face
    assert mixed_identities(truth, pred) == (1, 2)  # id 2 holds a and b
    assert split_identities([], []) == (0, 0)


def test_score_albums_coverage_review():
    truth = list("aabc")  # b, c appear once
    pred = ["x", "x", None, "y"]
    status = ["auto", "auto", "review", "auto"]
    s = score_albums(truth, pred, status)
    assert s.faces == 4
    assert s.coverage == pytest.approx(0.75)
    assert s.coverage_recurring == 1.0  # only a recurs; both its faces labelled
    assert s.review_share == pytest.approx(0.25)
    assert s.pairwise_precision == 1.0 and s.pairwise_recall == 1.0
    assert s.mixed_ids == 0 and s.split_persons == 0
    assert math.isclose(s.to_dict()["coverage"], 0.75)


def test_score_pairs():
    genuine = [True, True, True, True, False, False]
    decision = [ACCEPT, ACCEPT, REVIEW, "no_face", ACCEPT, REJECT]
    s = score_pairs(genuine, decision)
    assert (s.genuine, s.impostor) == (4, 2)
    assert s.tar == pytest.approx(0.5)
    assert s.far == pytest.approx(0.5)
    assert s.genuine_review == pytest.approx(0.25)
    assert s.impostor_review == 0.0
    assert s.review_share == pytest.approx(1 / 6)
    empty = score_pairs([], [])
    assert (empty.tar, empty.far) == (0.0, 0.0)
    with pytest.raises(ValueError):
        score_pairs([True], [])


def _face(fid, uri, kind, bbox, emb, status, ident, det=0.9):
    return {
        "face_id": fid,
        "image_uri": uri,
        "source_kind": kind,
        "bbox": bbox,
        "det_score": det,
        "embedding": emb,
        "status": status,
        "identity_id": ident,
    }


def test_score_benchmark_central_face_rule(tmp_path):
    from evaluation.metrics import score_benchmark

    root = str(tmp_path)
    centre, corner = [80, 80, 170, 170], [0, 0, 30, 30]
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    images = {
        "albums/a/1.jpg": {"person": "P", "kind": "album", "size": [250, 250], "group": "a"},
        "albums/a/2.jpg": {"person": "P", "kind": "album", "size": [250, 250], "group": "a"},
        "albums/a/3.jpg": {"person": "Q", "kind": "album", "size": [250, 250], "group": "a"},
        "idcards/s/id.jpg": {"person": "P", "kind": "id", "size": [102, 126], "group": "s"},
        "idcards/s/live1.jpg": {"person": "P", "kind": "live", "size": [250, 250], "group": "s"},
        "idcards/t/id.jpg": {"person": "Q", "kind": "id", "size": [102, 126], "group": "t"},
        "idcards/t/live1.jpg": {"person": "R", "kind": "live", "size": [250, 250], "group": "t"},
    }
    pairs = [
        {"id": "idcards/s/id.jpg", "live": "idcards/s/live1.jpg", "genuine": True},
        {"id": "idcards/t/id.jpg", "live": "idcards/t/live1.jpg", "genuine": False},
    ]
    faces = [
        _face("f1", f"{root}/albums/a/1.jpg", "album", centre, e1, "auto", "X"),
        # background face in image 1 labelled with the same id: not scored
        _face("f1b", f"{root}/albums/a/1.jpg", "album", corner, e2, "auto", "X"),
        _face("f2", f"file://{root}/albums/a/2.jpg", "album", centre, e1, "auto", "X"),
        # image 3: only a background face -> the truth face was missed
        _face("f3", f"{root}/albums/a/3.jpg", "album", corner, e2, "auto", "X"),
        _face("i1", f"{root}/idcards/s/id.jpg", "idcard", [10, 10, 90, 110], e1, "auto", "s"),
        _face("l1", f"{root}/idcards/s/live1.jpg", "idcard", centre, e1, "auto", "s"),
        _face("i2", f"{root}/idcards/t/id.jpg", "idcard", [10, 10, 90, 110], e1, "review", None),
        _face("l2", f"{root}/idcards/t/live1.jpg", "idcard", centre, e2, "review", None),
    ]
    out = score_benchmark(faces, images, pairs, root)
    fl = out["faceloop"]
    assert fl["detection"] == {
        "truth_images": 7,
        "central_face_found": 6,
        "central_face_missed": 1,
        "background_faces": 2,
    }
    assert fl["albums"]["pairwise_precision"] == 1.0  # background faces don't count
    assert fl["albums"]["pairwise_recall"] == 1.0
    assert fl["albums"]["coverage"] == pytest.approx(2 / 3)
    assert fl["idcards"]["tar"] == 1.0 and fl["idcards"]["far"] == 0.0
    assert fl["idcards"]["impostor_review"] == 1.0
    bl = out["baseline"]
    assert bl["albums"]["coverage"] == 0.0  # DBSCAN min_samples 3: two faces are noise
    assert bl["idcards"]["tar"] == 1.0 and bl["idcards"]["far"] == 0.0  # cos 1 vs cos 0


def test_baseline_dbscan_and_idcard():
    import numpy as np

    from evaluation.baseline import BaselineParams, cluster_albums, idcard_decision

    emb = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0, 1], [0.1, 0.99], [0.05, 1], [1, 0]])
    det = [0.9] * 6 + [0.5]  # the last one is below the anchor's detector score
    ids = cluster_albums([f"f{i}" for i in range(7)], emb, det)
    assert ids["f0"] == ids["f1"] == ids["f2"] is not None
    assert ids["f3"] == ids["f4"] == ids["f5"] != ids["f0"]
    assert ids["f6"] is None
    assert idcard_decision(np.array([1.0, 0]), np.array([0.3, 0.95])) == "accept"  # cos ~0.30
    assert idcard_decision(np.array([1.0, 0]), np.array([0.2, 0.98])) == "reject"
    assert idcard_decision(None, np.array([1.0, 0])) == "no_face"
    assert BaselineParams().eps == 0.5


def test_headline_puts_faceloop_beside_the_anchor_with_a_verdict():
    from evaluation.report import headline_rows
    from faceloop.commands.evaluate import format_table

    ev = {
        "faceloop": {
            "albums": {"pairwise_precision": 1.0, "pairwise_recall": 0.9, "coverage": 0.5},
            "idcards": {"tar": 0.95, "far": 0.0, "impostors_accepted": 0},
        },
        "baseline": {
            "albums": {"pairwise_precision": 1.0, "pairwise_recall": 0.7, "coverage": 0.6},
            "idcards": {"tar": 0.97, "far": 0.01, "impostors_accepted": 2},
        },
    }
    header, rows = headline_rows(ev)
    assert header == ["figure", "faceloop", "anchor", "faceloop vs anchor"]
    verdict = {r[0]: r[3] for r in rows}
    assert verdict["albums: pairwise precision"] == "equal"
    assert verdict["albums: pairwise recall"] == "better"
    assert verdict["albums: coverage (auto-labelled)"] == "WORSE"
    assert verdict["ID: genuine accepted (TAR)"] == "WORSE"
    assert verdict["ID: impostors accepted (FAR)"] == "better"  # lower is better
    assert verdict["ID: impostors accepted (pairs)"] == "better"
    # Without an anchor the figures still print, with no verdict.
    _, alone = headline_rows({"faceloop": ev["faceloop"]})
    assert {r[3] for r in alone} == {"-"}
    text = format_table(ev)
    assert "faceloop vs anchor" in text and "WORSE" in text
    assert "albums.pairwise_recall" in text  # the full table follows the headline


def test_pair_scores_count_accepted_pairs():
    s = score_pairs(
        [True, True, False, False, False], ["accept", "review", "accept", "reject", "x"]
    )
    assert (s.genuine_accepted, s.impostors_accepted) == (1, 1)


def test_duplicate_claims_scored_against_the_photos_the_subjects_were_given():
    truth = {
        "idcards/A/id.jpg": {"kind": "id", "group": "A", "source": "s-a"},
        "idcards/A/live1.jpg": {"kind": "live", "group": "A", "source": "s-x"},
        "idcards/B/id.jpg": {"kind": "id", "group": "B", "source": "s-b"},
        "idcards/B/live1.jpg": {"kind": "live", "group": "B", "source": "s-x"},  # A's photo
        "idcards/C/id.jpg": {"kind": "id", "group": "C", "source": "s-c"},
        "idcards/C/live1.jpg": {"kind": "live", "group": "C", "source": "s-y"},
        "idcards/D/live1.jpg": {"kind": "live", "group": "D", "source": "s-y"},  # C's photo
        "albums/x/1.jpg": {"kind": "album", "group": "x", "source": "s-y"},
    }
    claim = {"source_kind": "idcard", "status": "review", "reason_code": "duplicate_claim"}
    faces = [
        {**claim, "source_group": "A", "reason": "duplicate_claim: p-B"},
        {**claim, "source_group": "B", "reason": "duplicate_claim: p-A"},
        {**claim, "source_group": "E", "reason": "duplicate_claim: p-A"},  # a false one
        # an older row: the code comes from the reason
        {"source_kind": "idcard", "source_group": "C", "reason": "duplicate_claim: p-D"},
        {"source_kind": "idcard", "source_group": "D", "reason": "idcard_review: 0.30"},
        {"source_kind": "album", "source_group": "x", "reason": "duplicate_claim: p-A"},
    ]
    assert score_claims(faces, truth) == {
        "subjects_sharing_a_photo": 4,
        "claimed": 4,
        "caught": 3,
        "missed": 1,
        "false": 1,
    }
    # a truth without sources (a benchmark built before) is not scored
    assert score_claims(faces, {k: {**v, "source": None} for k, v in truth.items()}) is None


def test_cross_match_counts_every_id_against_other_peoples_live_faces():
    import numpy as np

    from evaluation.metrics import cross_match
    from faceloop.config import PolicyThresholds, QualitySettings
    from tasks.idcard import accept_threshold

    def rule(accept: float, accept_low: float | None = None, low_quality: float = 0.0):
        th = PolicyThresholds(idcard_accept=accept, idcard_accept_low_quality=accept_low)
        qs = QualitySettings(idcard_low_quality=low_quality)
        return lambda q_id, q_live: accept_threshold(th, qs, q_id, q_live)

    def unit(deg: float) -> list[float]:
        r = np.deg2rad(deg)
        return [float(np.cos(r)), float(np.sin(r))]

    # Three subjects, persons A, B, C: ID faces at 0, 90 and 180 degrees; A's live face at 5,
    # B's at 70 (a poor one), C's not found. Only A's ID meets another person's live face
    # above 0.3: B's, at cos(70) = 0.342.
    central = {
        "a/id": {"embedding": unit(0), "quality": 0.9},
        "a/live": {"embedding": unit(5), "quality": 0.9},
        "b/id": {"embedding": unit(90), "quality": 0.9},
        "b/live": {"embedding": unit(70), "quality": 0.1},  # poor: A's ID meets it at 0.34
        "c/id": {"embedding": unit(180), "quality": 0.9},
        "c/live": None,  # no face found: not a pair
    }
    pairs = [
        {"id": f"{s}/id", "live": f"{s}/live", "id_person": s.upper(), "live_person": s.upper()}
        for s in "abc"
    ]
    # 3 IDs x 2 live faces found, less the 2 same-person pairs.
    lenient = cross_match(central, pairs, rule(0.3))
    assert lenient["impostor_pairs"] == 4
    # A's ID vs B's live (0.342) and B's ID vs A's live (cos 85 = 0.087: no).
    assert lenient["accepted"] == 1 and lenient["far"] == 0.25
    # The same with a stricter threshold for poor pairs: B's live face is poor.
    strict_low = cross_match(central, pairs, rule(0.3, 0.5, 0.15))
    assert strict_low["accepted"] == 0
    never_low = cross_match(central, pairs, rule(0.3, None, 0.15))
    assert never_low["accepted"] == 0
    assert cross_match({}, pairs, rule(0.3)) == {
        "impostor_pairs": 0,
        "accepted": 0,
        "far": 0.0,
    }
