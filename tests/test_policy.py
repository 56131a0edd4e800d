"""Purity checks on planted problems in synthetic identities."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.synthetic import random_centres, sample_faces
from faceloop.config import ClusterSettings, PolicyThresholds, QualitySettings
from faceloop.vocab import (
    Reason,
    Status,
    TaskKind,
    join_reasons,
    reason_code,
    render_reason,
    task_kind_for_code,
)
from tasks.purity import Decision, apply_purity, one_face_per_photo, summarise

TH = PolicyThresholds()
CS = ClusterSettings()
QS = QualitySettings()


def _faces(rng, centre, n):
    return sample_faces(centre, rng.uniform(0.5, 1.0, n).astype(np.float32), rng)


def _run(members, emb, quality=None, qs=QS):
    q = np.full(len(emb), 0.9, np.float32) if quality is None else quality
    return apply_purity(members, emb, q, TH, CS, qs)


@pytest.fixture
def three_people():
    rng = np.random.default_rng(21)
    c = random_centres(3, 512, rng)
    emb = np.concatenate([_faces(rng, c[i], 6) for i in range(3)])
    members = {"id-a": range(6), "id-b": range(6, 12), "id-c": range(12, 18)}
    return rng, c, emb, members


def test_clean_identities_are_auto(three_people):
    _, _, emb, members = three_people
    out = _run(members, emb)
    assert len(out) == 18
    assert all(d.status == "auto" for d in out), summarise(out)
    assert [d.identity_id for d in out] == ["id-a"] * 6 + ["id-b"] * 6 + ["id-c"] * 6
    assert all(reason_code(d.reason) == "auto_identity" for d in out)
    assert all(0.3 < d.score <= 1.0 for d in out)


def test_auto_reason_does_not_restate_drifting_figures(three_people):
    """An identity that grows changes its faces' similarities and its size, not the decision:
    the auto reason stays the same text (a new text would rewrite the face's group file), the
    similarity is in ``score``."""
    rng, c, emb, members = three_people
    grown = np.concatenate([emb, _faces(rng, c[0], 4)])
    before = _run(members, emb)
    after = _run({**members, "id-a": [*range(6), 18, 19, 20, 21]}, grown)
    assert all(d.status == "auto" for d in before + after)
    assert [d.score for d in after[:6]] != [d.score for d in before[:6]]
    assert [d.reason for d in after[:18]] == [d.reason for d in before]
    assert before[0].reason == f"auto_identity: similarity to centroid >= {TH.outlier:.2f}"


def test_planted_outlier_goes_to_review(three_people):
    rng, _, emb, members = three_people
    stranger = _faces(rng, random_centres(1, 512, rng)[0], 1)
    emb = np.concatenate([emb, stranger])
    members = {**members, "id-a": [*range(6), 18]}
    out = _run(members, emb)
    assert out[18].status == "review"
    assert reason_code(out[18].reason) == "outlier"
    assert out[18].identity_id == "id-a" and out[18].score < TH.outlier
    # The rest of id-a is untouched by one outlier.
    assert all(d.status == "auto" for d in out[:18])


def test_planted_duplicate_identity_goes_to_review(three_people):
    rng, c, emb, members = three_people
    # A fourth identity that is really person a again (the merge missed it).
    emb = np.concatenate([emb, _faces(rng, c[0], 4)])
    members = {**members, "id-d": range(18, 22)}
    out = _run(members, emb)
    flagged = {d.identity_id for d in out if reason_code(d.reason) == "possible_duplicate_of"}
    # Only the smaller identity is held back: id-a's labels are right whatever the answer.
    assert flagged == {"id-d"}
    assert "possible_duplicate_of id-a" in out[18].reason
    assert all(d.status == "review" for d in out[18:])
    assert all(d.status == "auto" for d in out[:18])


def test_equal_sized_duplicates_both_go_to_review(three_people):
    rng, c, emb, members = three_people
    emb = np.concatenate([emb, _faces(rng, c[0], 6)])
    members = {**members, "id-d": range(18, 24)}
    out = _run(members, emb)
    flagged = {d.identity_id for d in out if reason_code(d.reason) == "possible_duplicate_of"}
    assert flagged == {"id-a", "id-d"}
    assert all(d.status == "auto" for d in out[6:18])


def test_low_cohesion_identity_goes_to_review():
    rng = np.random.default_rng(22)
    c = random_centres(6, 512, rng)
    emb = np.concatenate([_faces(rng, c[i], 1) for i in range(6)])  # six people, one label
    out = _run({"id-x": range(6)}, emb)
    assert all(d.status == "review" for d in out)
    assert all(reason_code(d.reason) == "low_cohesion" for d in out)


def test_too_few_faces_and_quality():
    rng = np.random.default_rng(23)
    c = random_centres(2, 512, rng)
    emb = np.concatenate([_faces(rng, c[0], 1), _faces(rng, c[1], 5)])
    qs = QualitySettings(min_quality=0.10, auto_min_quality=0.15)  # a config with a review band
    between = (qs.min_quality + qs.auto_min_quality) / 2
    q = np.array([0.9, 0.9, 0.9, 0.9, between, qs.min_quality / 2], np.float32)
    out = _run({"id-1": [0], "id-2": range(1, 6)}, emb, q, qs)
    assert out[0].status == "review" and reason_code(out[0].reason) == "too_few_faces"
    assert [d.status for d in out[1:4]] == ["auto"] * 3
    assert out[4].status == "review" and reason_code(out[4].reason) == "low_quality"
    assert out[5].status == "rejected" and reason_code(out[5].reason) == "low_quality"


def test_unclustered_faces(three_people):
    rng, c, emb, members = three_people
    near = _faces(rng, c[1], 1)  # person b, but left as noise
    far = _faces(rng, random_centres(1, 512, rng)[0], 1)  # a stranger
    out = _run(members, np.concatenate([emb, near, far]))
    assert out[18].status == "review" and out[18].identity_id == "id-b"
    assert reason_code(out[18].reason) == "unclustered_near_identity"
    assert out[19].status == "rejected" and out[19].identity_id is None
    assert reason_code(out[19].reason) == "unclustered_singleton"


def test_degenerate_inputs():
    assert apply_purity({}, np.zeros((0, 512), np.float32), np.zeros(0), TH, CS, QS) == []
    rng = np.random.default_rng(24)
    e = np.concatenate([_faces(rng, c, 1) for c in random_centres(3, 512, rng)])
    out = apply_purity({}, e, np.ones(3), TH, CS, QS, face_ids=["x", "y", "z"])
    assert [d.face_id for d in out] == ["x", "y", "z"]
    assert all(d.status == "rejected" and "no identities" in d.reason for d in out)
    with pytest.raises(ValueError):
        apply_purity({"a": [0, 1], "b": [1]}, e, np.ones(3), TH, CS, QS)
    with pytest.raises(ValueError):
        apply_purity({"a": [5]}, e, np.ones(3), TH, CS, QS)


def test_summarise_counts_statuses_and_codes():
    ds = [
        Decision("1", Status.AUTO, "a", "auto_identity", "x", 0.9),
        Decision("2", Status.REVIEW, "a", "possible_duplicate_of", "id-b: centroid 0.5", 0.5),
        Decision("3", Status.REVIEW, "a", "outlier", "0.1; low_quality: 0.3", 0.1),
        Decision("4", Status.REJECTED, None, "unclustered_singleton", "best 0.1", 0.1),
    ]
    assert [d.reason for d in ds] == [
        "auto_identity: x",
        "possible_duplicate_of id-b: centroid 0.5",
        "outlier: 0.1; low_quality: 0.3",
        "unclustered_singleton: best 0.1",
    ]
    assert all(reason_code(d.reason) == d.code for d in ds)
    assert summarise(ds) == {
        "status": {"auto": 1, "rejected": 1, "review": 2},
        "reason": {
            "auto_identity": 1,
            "outlier": 1,
            "possible_duplicate_of": 1,
            "unclustered_singleton": 1,
        },
    }
    assert summarise([]) == {"status": {}, "reason": {}}


def test_reasons_render_as_before() -> None:
    """(code, detail) renders to the text stores hold; the code parses back out of it."""
    assert render_reason("outlier", "0.2 < 0.3") == "outlier: 0.2 < 0.3"
    assert render_reason("too_small") == "too_small"
    dup = Reason("possible_duplicate_of", "id-b: centroid similarity 0.71 >= 0.65")
    assert dup.text == "possible_duplicate_of id-b: centroid similarity 0.71 >= 0.65"
    both = join_reasons([dup, Reason("outlier", "0.2 < 0.3")])
    assert both.code == "possible_duplicate_of"
    assert both.text == dup.text + "; outlier: 0.2 < 0.3"
    assert reason_code(both.text) == both.code


def test_every_decision_code_is_what_its_reason_starts_with(three_people) -> None:
    _, _, emb, members = three_people
    q = np.tile(np.array([0.05, 0.12, 0.9], np.float32), len(emb) // 3)
    band = QualitySettings(min_quality=0.10, auto_min_quality=0.15)  # a config with a review band
    out = apply_purity({"id-a": members["id-a"], "id-b": members["id-b"]}, emb, q, TH, CS, band)
    assert {d.status for d in out} == {"auto", "review", "rejected"}
    assert all(reason_code(d.reason) == d.code for d in out)


def test_reason_key_masks_measured_figures_only():
    """A figure that drifts as an identity grows is not a new decision (the group file is not
    rewritten for it); another code, identity or threshold is."""
    from faceloop.vocab import reason_key

    a = "possible_duplicate_of id-b: centroid similarity 0.71 >= 0.65"
    assert reason_key(a) == reason_key(a.replace("0.71", "0.69"))
    assert reason_key(a) != reason_key(a.replace("id-b", "id-c"))
    assert reason_key(a) != reason_key(a.replace("0.65", "0.60"))
    joined = "low_cohesion: mean similarity to centroid 0.41 < 0.45; outlier: similarity 0.2 < 0.3"
    assert reason_key(joined) == reason_key(joined.replace("0.41", "0.44").replace("0.2 ", "0.1 "))
    single = "unclustered_singleton: no identity within 0.35 (best -0.05)"
    assert reason_key(single) == reason_key(single.replace("-0.05", "0.21"))
    assert reason_key(single) != reason_key(single.replace("0.35", "0.30"))
    assert reason_key("too_few_faces: 2 < 3") != reason_key("low_quality: 0.2 < 0.3")
    assert reason_key(None) == ""
    # A threshold closing a parenthesis is not a measured figure.
    chip = "low_quality: live face quality 0.31 < 0.40 (cosine 0.30 < 0.35)"
    assert reason_key(chip) != reason_key(chip.replace("0.35)", "0.37)"))
    assert reason_key(chip) == reason_key(chip.replace("0.31", "0.29").replace("0.30 ", "0.33 "))


def test_a_look_alike_flag_moves_only_when_its_carrier_outgrows_the_other_twice() -> None:
    from tasks.purity import DUP_KEEP_RATIO, flagged_in_pair

    assert DUP_KEEP_RATIO == 2.0
    # A new pair: the smaller is held back, both when equal.
    assert flagged_in_pair(5, 9, False, False) and not flagged_in_pair(9, 5, False, False)
    assert flagged_in_pair(7, 7, False, False)
    # The carrier keeps its flag up to twice the other's size, and the other stays free.
    assert flagged_in_pair(18, 9, True, False) and not flagged_in_pair(9, 18, False, True)
    # Past twice, the flag moves.
    assert not flagged_in_pair(19, 9, True, False) and flagged_in_pair(9, 19, False, True)
    # A tie flagged both; both keep it while neither outgrows the other twice.
    assert flagged_in_pair(12, 7, True, True) and flagged_in_pair(7, 12, True, True)
    assert not flagged_in_pair(15, 7, True, True) and flagged_in_pair(7, 15, True, True)


def test_an_identity_keeps_one_auto_face_per_photo():
    """one_face_per_photo: of an identity's auto faces in one photo the largest stays auto
    (equal sizes: the more similar), the others go to review with the identity proposed; other
    identities, other photos, faces already in review and faces without a photo are untouched."""

    def auto(f: str, ident: str, s: float) -> Decision:
        return Decision(f, Status.AUTO, ident, "auto_identity", "", s)

    ds = [
        auto("a1", "id-a", 0.70),  # photo p: the larger face, less similar
        auto("a2", "id-a", 0.80),  # photo p: smaller
        auto("a3", "id-a", 0.75),  # photo p: as large as a4, more similar
        auto("a4", "id-a", 0.60),  # photo p
        auto("b1", "id-b", 0.70),  # photo p: another identity
        auto("a5", "id-a", 0.90),  # photo q
        Decision("a6", Status.REVIEW, "id-a", "outlier", "x", 0.2),  # photo q, in review
        auto("a7", "id-a", 0.90),  # no photo
    ]
    photo = {"a1": "p", "a2": "p", "a3": "q2", "a4": "q2", "b1": "p", "a5": "q", "a6": "q"}
    size = {"a1": 90.0, "a2": 60.0, "a3": 70.0, "a4": 70.0, "b1": 50.0, "a5": 80.0, "a6": 80.0}
    out = {d.face_id: d for d in one_face_per_photo(ds, photo, size)}
    assert [d.face_id for d in one_face_per_photo(ds, photo, size)] == [d.face_id for d in ds]
    assert out["a1"] == ds[0] and out["a3"] == ds[2]
    for f in ("a2", "a4"):
        d = out[f]
        assert (d.status, d.identity_id, d.code) == (Status.REVIEW, "id-a", "same_photo")
        assert d.score == {"a2": 0.80, "a4": 0.60}[f]  # the face's own similarity, kept
    assert out["a2"].reason == "same_photo: a larger face of this photo (90 px against 60) is id-a"
    assert task_kind_for_code(out["a2"].code) == TaskKind.CLUSTER_CHECK
    assert [out[f] for f in ("b1", "a5", "a6", "a7")] == [ds[4], ds[5], ds[6], ds[7]]
