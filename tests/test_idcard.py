"""ID-card rules, one case each, on synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.synthetic import random_centres, sample_faces
from faceloop.arrays import l2_normalize as normalize
from faceloop.config import PolicyThresholds, QualitySettings
from faceloop.vocab import reason_code
from tasks.idcard import FaceInfo, verify_subject

TH = PolicyThresholds()
QS = QualitySettings()


@pytest.fixture
def people():
    rng = np.random.default_rng(31)
    return rng, random_centres(3, 512, rng)


def _face(fid, emb, area=10_000.0, quality=0.9, det=0.9):
    return FaceInfo(fid, np.asarray(emb, np.float32), area, quality, det)


def _at_cosine(ref, cos, rng):
    """A unit vector with exactly cosine ``cos`` to unit ``ref``."""
    v = rng.standard_normal(ref.shape).astype(np.float32)
    v -= (v @ ref) * ref
    v /= np.linalg.norm(v)
    return normalize((cos * ref + np.sqrt(1 - cos * cos) * v)[None])[0]


def _by_id(decisions):
    return {d.face_id: d for d in decisions}


def test_match_is_auto_and_confirms_the_id_face(people):
    rng, c = people
    idf = _face("id", sample_faces(c[0], np.array([1.0]), rng)[0])
    live = [[_face("l1", sample_faces(c[0], np.array([0.9]), rng)[0])]]
    out = _by_id(verify_subject([idf], live, TH, QS, "subj-1"))
    assert out["l1"].status == "auto" and out["l1"].identity_id == "subj-1"
    assert reason_code(out["l1"].reason) == "idcard_accept" and out["l1"].score >= TH.idcard_accept
    assert out["id"].status == "auto" and out["id"].identity_id == "subj-1"


def test_thresholds_split_auto_review_rejected(people):
    rng, c = people
    ref = c[0]
    live = [[_face(f"l{i}", _at_cosine(ref, cos, rng))] for i, cos in enumerate([0.5, 0.3, 0.12])]
    out = _by_id(verify_subject([_face("id", ref)], live, TH, QS, "s"))
    assert out["l0"].status == "auto"
    assert out["l1"].status == "review" and reason_code(out["l1"].reason) == "idcard_review"
    assert out["l2"].status == "rejected" and out["l2"].identity_id is None
    assert out["l2"].reason == "idcard_mismatch: cosine 0.12 < 0.25"


def test_no_face_in_id_photo_quarantines_live_faces(people):
    _, c = people
    live = [[_face("l1", c[0])], [_face("l2", c[0]), _face("l3", c[1], area=10.0)]]
    out = verify_subject([], live, TH, QS, "s")
    assert {d.face_id for d in out} == {"l1", "l2", "l3"}
    assert all(
        d.status == "quarantined" and d.reason.startswith("idcard_no_face_in_id_photo") for d in out
    )


def test_only_the_largest_live_face_is_the_subject(people):
    rng, c = people
    live = [[_face("small", c[0], area=900.0), _face("big", _at_cosine(c[0], 0.7, rng), area=4e4)]]
    out = _by_id(verify_subject([_face("id", c[0])], live, TH, QS, "s"))
    assert out["big"].status == "auto"
    # The smaller face is rejected even though it matches the ID better.
    assert out["small"].status == "rejected"
    assert reason_code(out["small"].reason) == "not_the_largest_face_in_live_photo"


def test_dominant_id_face_is_used_and_the_ghost_portrait_rejected(people):
    rng, c = people
    ids = [_face("ghost", c[0], area=2_000.0), _face("main", c[0], area=20_000.0)]
    out = _by_id(verify_subject(ids, [[_face("l1", _at_cosine(c[0], 0.6, rng))]], TH, QS, "s"))
    assert out["main"].status == "auto" and out["l1"].status == "auto"
    assert out["ghost"].status == "rejected"
    assert reason_code(out["ghost"].reason) == "idcard_secondary_face_in_id_photo"


def test_a_ghost_of_someone_else_sends_the_subject_to_review(people):
    """A user probe: a card whose main portrait was replaced by the impostor's, the holder's
    ghost left as it was (and a selfie of the impostor holding the holder's card, filed as the
    ID photo): the ghost was rejected as "a ghost portrait" and the impostor auto-accepted."""
    rng, c = people
    ids = [_face("ghost", c[1], area=2_000.0), _face("main", c[0], area=20_000.0)]
    live = [[_face("l1", _at_cosine(c[0], 0.6, rng))], [_face("l2", _at_cosine(c[2], 0.0, rng))]]
    out = _by_id(verify_subject(ids, live, TH, QS, "s"))
    for fid in ("main", "ghost", "l1"):
        assert out[fid].status == "review" and out[fid].identity_id == "s", fid
        assert reason_code(out[fid].reason) == "idcard_id_faces_disagree"
    assert out["l2"].status == "rejected" and reason_code(out["l2"].reason) == "idcard_mismatch"
    # The holder's own ghost, degraded but the same person: as before.
    ids = [_face("ghost", _at_cosine(c[0], 0.8, rng), area=2_000.0), _face("main", c[0], area=2e4)]
    out = _by_id(verify_subject(ids, [[_face("l1", _at_cosine(c[0], 0.6, rng))]], TH, QS, "s"))
    assert out["main"].status == "auto" and out["l1"].status == "auto"
    assert reason_code(out["ghost"].reason) == "idcard_secondary_face_in_id_photo"
    # A face cut by the photo's edge is a bystander half in a tight crop (an lfw-dev eval chip
    # of a photo with a neighbour at its side), no printed portrait.
    cut = FaceInfo("edge", np.asarray(c[1], np.float32), 2_000.0, 0.9, 0.9, cut=True)
    out = _by_id(
        verify_subject(
            [cut, _face("main", c[0], area=2e4)],
            [[_face("l1", _at_cosine(c[0], 0.6, rng))]],
            TH,
            QS,
            "s",
        )
    )
    assert out["main"].status == "auto" and out["edge"].status == "rejected"
    # Each says why it is set aside: it was called "the holder's" at a cosine that said not.
    assert "cut by the ID photo's edge" in out["edge"].reason
    assert "the holder's" not in out["edge"].reason
    # A ghost too poor to judge says nothing.
    poor = QS.idcard_min_quality / 2
    ids = [_face("ghost", c[1], area=2_000.0, quality=poor), _face("main", c[0], area=2e4)]
    out = _by_id(verify_subject(ids, [[_face("l1", _at_cosine(c[0], 0.6, rng))]], TH, QS, "s"))
    assert out["main"].status == "auto" and out["ghost"].status == "rejected"
    assert "too poor to judge" in out["ghost"].reason and "the holder's" not in out["ghost"].reason


def test_a_large_ghost_of_the_holder_is_the_holder(people):
    """Two faces on the ID photo, the second 1/1.9 of the first's area (a large ghost): the
    subject went to review though both faces are one person."""
    rng, c = people
    ids = [
        _face("ghost", _at_cosine(c[0], 0.9, rng), area=10_000.0),
        _face("main", c[0], area=19e3),
    ]
    out = _by_id(verify_subject(ids, [[_face("l1", _at_cosine(c[0], 0.6, rng))]], TH, QS, "s"))
    assert out["main"].status == "auto" and out["l1"].status == "auto"
    assert reason_code(out["ghost"].reason) == "idcard_secondary_face_in_id_photo"


def test_two_similar_sized_id_faces_go_to_review(people):
    rng, c = people
    ids = [_face("a", c[0], area=10_000.0), _face("b", c[1], area=9_000.0)]
    # l2 is orthogonal to both ID faces: it matches neither.
    q, _ = np.linalg.qr(np.stack([c[0], c[1], c[2]]).T.astype(np.float64))
    live = [[_face("l1", _at_cosine(c[1], 0.7, rng))], [_face("l2", q[:, 2])]]
    out = _by_id(verify_subject(ids, live, TH, QS, "s"))
    for fid in ("a", "b", "l1"):
        assert out[fid].status == "review"
        assert reason_code(out[fid].reason) == "idcard_multiple_faces_in_id_photo"
    assert out["l1"].score == pytest.approx(0.7, abs=1e-4)  # best over both ID faces
    assert out["l2"].status == "rejected" and reason_code(out["l2"].reason) == "idcard_mismatch"


def test_low_quality_blocks_auto(people):
    _, c = people
    between = (QS.idcard_min_quality + QS.idcard_low_quality) / 2  # compared, not auto-accepted
    live = [
        [_face("lq", c[0], quality=between)],
        [_face("vlq", c[0], quality=QS.idcard_min_quality / 2)],
    ]
    out = _by_id(verify_subject([_face("id", c[0])], live, TH, QS, "s"))
    assert out["lq"].status == "review" and reason_code(out["lq"].reason) == "idcard_low_quality"
    assert out["vlq"].status == "rejected" and reason_code(out["vlq"].reason) == "low_quality"
    assert out["id"].status == "review" and reason_code(out["id"].reason) == "idcard_unconfirmed"
    # A poor ID face makes even a perfect match a review.
    out = _by_id(
        verify_subject([_face("id", c[0], quality=between)], [[_face("l", c[0])]], TH, QS, "s")
    )
    assert out["l"].status == "review" and "ID face quality" in out["l"].reason


def test_id_face_without_live_faces(people):
    _, c = people
    out = verify_subject([_face("id", c[0])], [[], []], TH, QS, "s")
    assert len(out) == 1 and out[0].status == "review"
    assert reason_code(out[0].reason) == "idcard_no_live_face"
    assert verify_subject([], [], TH, QS, "s") == []


def test_missing_or_unusable_id_photo_names_the_photo_not_the_detector(people):
    """An empty or missing id.jpg is not "the ID photo has no detectable face"."""
    from faceloop.vocab import Reason

    _, c = people
    live = [[_face("l1", c[0])]]
    why = Reason("idcard_no_id_photo", "id.jpg is unusable (empty_file: 0 bytes)")
    out = verify_subject([], live, TH, QS, "s", no_id_photo=why)
    assert [(d.status, d.code, d.reason) for d in out] == [
        ("quarantined", "idcard_no_id_photo", why.text)
    ]
    assert verify_subject([], live, TH, QS, "s")[0].code == "idcard_no_face_in_id_photo"


def test_the_largest_matching_live_face_is_the_subject(people):
    """A bystander nearer the camera (larger, not matching) no longer hides the subject."""
    rng, c = people
    live = [
        [
            _face("bystander", _at_cosine(c[0], 0.05, rng), area=4e4),
            _face("subject", _at_cosine(c[0], 0.6, rng), area=900.0),
            _face("far", _at_cosine(c[0], 0.7, rng), area=100.0),
        ]
    ]
    out = _by_id(verify_subject([_face("id", c[0])], live, TH, QS, "s"))
    assert out["subject"].status == "auto" and out["subject"].identity_id == "s"
    for other in ("bystander", "far"):
        assert out[other].status == "rejected"
        assert out[other].code == "not_the_matching_face_in_live_photo"
    # No face matches: the largest is the claimed one, and it is a mismatch.
    live = [
        [
            _face("big", _at_cosine(c[0], 0.05, rng), area=4e4),
            _face("small", _at_cosine(c[0], 0.0, rng), area=900.0),
        ]
    ]
    out = _by_id(verify_subject([_face("id", c[0])], live, TH, QS, "s"))
    assert out["big"].code == "idcard_mismatch"
    assert out["small"].code == "not_the_largest_face_in_live_photo"


def test_a_face_that_matches_outright_beats_a_larger_one_in_the_review_band(people):
    """A larger bystander scoring in the review band by chance (a stranger pasted into the
    photo, as the eval's live photos have) does not hide the subject who reaches the accept
    threshold; with no face at that level, the largest matching face is still the claimed one."""
    rng, c = people
    band = (TH.idcard_review + TH.idcard_accept) / 2
    live = [
        [
            _face("bystander", _at_cosine(c[0], band, rng), area=4e4),
            _face("subject", _at_cosine(c[0], TH.idcard_accept + 0.1, rng), area=900.0),
        ]
    ]
    out = _by_id(verify_subject([_face("id", c[0])], live, TH, QS, "s"))
    assert out["subject"].status == "auto" and out["subject"].identity_id == "s"
    assert out["bystander"].status == "rejected"
    assert out["bystander"].code == "not_the_matching_face_in_live_photo"
    assert out["id"].status == "auto"
    # Both only in the band: the larger matching face is claimed and goes to review.
    live[0][1] = _face("subject", _at_cosine(c[0], band, rng), area=900.0)
    out = _by_id(verify_subject([_face("id", c[0])], live, TH, QS, "s"))
    assert out["bystander"].status == "review" and out["bystander"].code == "idcard_review"
    assert out["subject"].code == "not_the_largest_face_in_live_photo"


def test_low_quality_pairs_auto_only_at_their_stricter_threshold(people):
    """With ``idcard_accept_low_quality`` set, a poor pair (either face below idcard_low_quality)
    is auto at that threshold and reviewed or rejected below it, as before."""
    rng, c = people
    th = TH.model_copy(update={"idcard_accept": 0.40, "idcard_accept_low_quality": 0.55})
    poor = QS.idcard_min_quality / 2  # below even idcard_min_quality
    between = (QS.idcard_min_quality + QS.idcard_low_quality) / 2
    live = [
        [_face("poor_high", _at_cosine(c[0], 0.60, rng), quality=poor)],
        [_face("poor_mid", _at_cosine(c[0], 0.50, rng), quality=poor)],
        [_face("between_mid", _at_cosine(c[0], 0.50, rng), quality=between)],
        [_face("good_mid", _at_cosine(c[0], 0.50, rng))],
    ]
    out = _by_id(verify_subject([_face("id", c[0])], live, th, QS, "s"))
    assert out["poor_high"].status == "auto" and out["poor_high"].identity_id == "s"
    assert "low-quality pair" in out["poor_high"].reason
    assert out["poor_mid"].status == "rejected" and out["poor_mid"].code == "low_quality"
    assert out["between_mid"].status == "review"
    assert out["between_mid"].code == "idcard_low_quality" and "< 0.55" in out["between_mid"].reason
    assert out["good_mid"].status == "auto" and "low-quality" not in out["good_mid"].reason
    # A poor ID face: every pair is a low-quality pair.
    live = [[_face("a", _at_cosine(c[0], 0.60, rng))], [_face("b", _at_cosine(c[0], 0.50, rng))]]
    out = _by_id(verify_subject([_face("id", c[0], quality=between)], live, th, QS, "s"))
    assert out["a"].status == "auto"
    assert out["b"].status == "review" and "ID face quality" in out["b"].reason
    # Without the setting (None) a poor pair is never auto, whatever its cosine.
    out = _by_id(verify_subject([_face("id", c[0], quality=between)], live, TH, QS, "s"))
    assert out["a"].status == "review" and out["id"].status == "review"


def test_a_poor_face_above_its_threshold_is_the_matching_face(people):
    """A face below min_quality matches only at the low-quality threshold: it is then the
    claimed face even when a larger bystander is in the photo."""
    rng, c = people
    th = TH.model_copy(update={"idcard_accept": 0.40, "idcard_accept_low_quality": 0.55})
    poor = QS.min_quality / 2
    live = [
        [
            _face("bystander", _at_cosine(c[0], 0.05, rng), area=4e4),
            _face("subject", _at_cosine(c[0], 0.6, rng), area=900.0, quality=poor),
        ]
    ]
    out = _by_id(verify_subject([_face("id", c[0])], live, th, QS, "s"))
    assert out["subject"].status == "auto"
    assert out["bystander"].code == "not_the_matching_face_in_live_photo"
    # Below its threshold the poor face does not match: the largest face is the claimed one.
    live[0][1] = _face("subject", _at_cosine(c[0], 0.5, rng), area=900.0, quality=poor)
    out = _by_id(verify_subject([_face("id", c[0])], live, th, QS, "s"))
    assert out["bystander"].code == "idcard_mismatch"
    assert out["subject"].code == "not_the_largest_face_in_live_photo"


def test_an_accepted_live_photo_vouches_for_a_matching_one_in_the_review_band(people):
    """idcard_live_match: a review-band live face matching another live photo of the subject
    that was auto on its own becomes auto; one that does not match stays in review."""
    rng, c = people
    th = TH.model_copy(update={"idcard_accept": 0.40, "idcard_live_match": 0.45})
    strong = _at_cosine(c[0], 0.6, rng)
    # A second photo of the same person: cosine 0.3 to the ID (review band), 0.58 to `strong`.
    u = (strong - 0.6 * c[0]) / 0.8  # unit, orthogonal to the ID
    v = rng.standard_normal(c[0].shape).astype(np.float32)
    v -= (v @ c[0]) * c[0] + (v @ u) * u
    v /= np.linalg.norm(v)
    weak = normalize((0.3 * c[0] + 0.5 * u + np.sqrt(1 - 0.09 - 0.25) * v)[None])[0]
    cos_id, cos_live = float(weak @ c[0]), float(weak @ strong)
    assert TH.idcard_review <= cos_id < 0.40 and cos_live >= 0.45
    stranger = _at_cosine(c[0], 0.3, rng)  # same band, unrelated to `strong`
    assert float(stranger @ strong) < 0.45
    live = [[_face("strong", strong)], [_face("weak", weak)], [_face("stranger", stranger)]]
    out = _by_id(verify_subject([_face("id", c[0])], live, th, QS, "s"))
    assert out["strong"].status == "auto"
    assert out["weak"].status == "auto" and "corroborated" in out["weak"].reason
    assert out["weak"].code == "idcard_accept" and out["weak"].identity_id == "s"
    assert out["stranger"].status == "review" and out["stranger"].code == "idcard_review"
    # Off by default; and without a photo auto on its own nothing vouches.
    out = _by_id(
        verify_subject(
            [_face("id", c[0])], live, TH.model_copy(update={"idcard_accept": 0.40}), QS, "s"
        )
    )
    assert out["weak"].status == "review"
    out = _by_id(verify_subject([_face("id", c[0])], live[1:], th, QS, "s"))
    assert out["weak"].status == "review" and out["id"].status == "review"


def test_a_live_face_that_is_the_id_picture_re_photographed_goes_to_review(people):
    """A phone photo of the ID card (or of a screen showing it) embeds like a capture and was
    auto-accepted; its aligned crop is the ID picture pixel for pixel. Such a face, and the ID
    face it alone confirmed, go to review; another capture of the subject is still auto."""
    from tasks.idcard import REPHOTO_SCORE

    rng, c = people
    idf = _face("id", sample_faces(c[0], np.array([1.0]), rng)[0])
    rephoto = [_face("l1", _at_cosine(idf.embedding, 0.9, rng))]
    capture = [_face("l2", _at_cosine(idf.embedding, 0.7, rng))]
    score = {"l1": 0.93, "l2": 0.31}
    seen: list[tuple[str, str]] = []

    def same_picture(a: str, b: str) -> float:
        seen.append((a, b))
        return score[b]

    out = _by_id(verify_subject([idf], [rephoto], TH, QS, "s", same_picture=same_picture))
    assert out["l1"].status == "review" and out["l1"].code == "idcard_live_rephotographed"
    assert f"0.93 >= {REPHOTO_SCORE:.2f}" in out["l1"].reason
    assert out["id"].status == "review" and out["id"].code == "idcard_live_rephotographed"
    out = _by_id(verify_subject([idf], [rephoto, capture], TH, QS, "s", same_picture=same_picture))
    assert out["l1"].code == "idcard_live_rephotographed"
    assert out["l2"].status == "auto" and out["id"].status == "auto"
    # Only faces that would be auto are looked at; without the test, the cosine decides.
    low = [_face("l3", _at_cosine(idf.embedding, 0.1, rng))]
    seen.clear()
    verify_subject([idf], [low], TH, QS, "s", same_picture=same_picture)
    assert seen == []
    assert _by_id(verify_subject([idf], [rephoto], TH, QS, "s"))["l1"].status == "auto"


def test_the_same_picture_score_tells_a_re_photo_from_another_picture() -> None:
    """tasks.idcard.same_picture_score: the ID crop's picture moved by a pixel, turned a degree,
    lit and blurred otherwise scores high; another picture of similar texture scores low; the
    black padding beyond a tight chip's edge does not count."""
    import cv2

    from tasks.align import ARCFACE_DST
    from tasks.idcard import REPHOTO_SCORE, same_picture_score

    rng = np.random.default_rng(5)

    def picture() -> np.ndarray:
        noise = rng.standard_normal((112, 112)).astype(np.float32)
        img = cv2.GaussianBlur(noise, (0, 0), 2.0)
        img = (img - img.min()) / (img.max() - img.min()) * 200 + 20
        return np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)

    a, b = picture(), picture()
    # The ID photo is the crop itself (landmarks where alignment puts them): no padding.
    lm = np.asarray(ARCFACE_DST, np.float64)
    turn = cv2.getRotationMatrix2D((57, 55), 1.0, 1.0)
    re = cv2.warpAffine(a, turn, (112, 112), borderMode=cv2.BORDER_REFLECT)
    re = cv2.GaussianBlur(cv2.convertScaleAbs(re, alpha=0.8, beta=30), (0, 0), 0.6)
    assert same_picture_score(a, lm, (112, 112), re) >= 0.9 > REPHOTO_SCORE
    # The picture mirrored (a front camera's photo of the card) is the same picture.
    assert same_picture_score(a, lm, (112, 112), re[:, ::-1]) >= 0.9
    assert same_picture_score(a, lm, (112, 112), b) < 0.3
    # A chip whose left half lies beyond its photo: only the pixels inside it are compared.
    half = a.copy()
    half[:, :56] = 0
    other = re.copy()
    other[:, :56] = rng.integers(0, 255, (112, 56, 3), dtype=np.uint8)
    inside = lm - [56.0, 0.0]  # the photo covers crop columns 56-111 only
    assert same_picture_score(half, inside, (56, 112), other) >= 0.9


def _subject_a(tmp_path, sample_photos, model_root):
    """An ID-card source with subject A (Yao Ming's photo as its ID photo) and its settings."""
    import shutil

    from faceloop.config import SourceSpec, load_settings

    ids = tmp_path / "in" / "idcards"
    (ids / "A").mkdir(parents=True)
    shutil.copyfile(sample_photos["yaoming"], ids / "A" / "id.jpg")
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[SourceSpec(kind="idcard", uri=str(ids))],
        models={"root": str(model_root)},
        review={"enabled": False},
    )
    return ids, settings


def test_new_id_thresholds_verify_stored_subjects_again(tmp_path, sample_photos, model_root):
    """A refresh under new ID thresholds (a new `faceloop calibrate`, say) decides the stored
    subjects again, though none of them has a new photo: the label state's fingerprint changed.
    Then a refresh with the same settings changes nothing."""
    import shutil

    from faceloop.commands.evaluate import _refresh_inline
    from storage.objectstore import open_store
    from storage.tables import read_faces

    ids, settings = _subject_a(tmp_path, sample_photos, model_root)
    shutil.copyfile(sample_photos["players"], ids / "A" / "live1.jpg")  # Yao Ming among others
    store = open_store(settings.store)

    def claimed() -> tuple[str, str]:
        rows = read_faces(store, columns=["role", "status", "reason"]).to_pylist()
        live = [r for r in rows if r["role"] == "live" and r["status"] != "rejected"]
        assert len(live) == 1, rows
        return live[0]["status"], live[0]["reason"]

    _refresh_inline(settings)
    assert claimed()[0] == "auto"
    strict = settings.thresholds.model_copy(
        update={"idcard_accept": 0.95, "idcard_accept_low_quality": 0.97}
    )
    stricter = settings.model_copy(
        update={"policy": {**settings.policy, settings.thresholds_key: strict}}
    )
    _refresh_inline(stricter)
    status, reason = claimed()
    assert status == "review" and "< 0.95" in reason
    before = read_faces(store, columns=["face_id", "status", "reason", "labelled_run_id"])
    _refresh_inline(stricter)
    assert read_faces(store, columns=["face_id", "status", "reason", "labelled_run_id"]).equals(
        before
    )


def _phone_photo_of(src, out, tilt_deg: float, blur: float) -> None:
    """``src`` printed on a light card, photographed at an angle (a perspective turn of about
    ``tilt_deg``), out of focus (Gaussian ``blur``), darker and washed out, JPEG 85."""
    import cv2

    img = cv2.imread(str(src))
    h, w = img.shape[:2]
    card = np.full((int(h * 1.6), int(w * 1.6), 3), 225, np.uint8)
    y0, x0 = int(h * 0.3), int(w * 0.3)
    card[y0 : y0 + h, x0 : x0 + w] = img
    height, width = card.shape[:2]
    d = np.tan(np.radians(tilt_deg)) * width * 0.25
    corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    moved = np.float32([[d, 0], [width - d, d * 0.4], [width, height], [0, height - d * 0.4]])
    shot = cv2.warpPerspective(
        card, cv2.getPerspectiveTransform(corners, moved), (width, height), borderValue=(60, 70, 80)
    )
    shot = cv2.convertScaleAbs(cv2.GaussianBlur(shot, (0, 0), blur), alpha=0.85, beta=25)
    cv2.imwrite(str(out), shot, [cv2.IMWRITE_JPEG_QUALITY, 85])


def test_a_phone_photo_of_the_id_card_is_not_taken_for_a_capture(
    tmp_path, sample_photos, model_root
):
    """A subject's "live" photo that is a phone photo of its ID picture (at an angle, blurred:
    cosine 0.97 to the ID face, under the copy rule's 0.975) was auto-accepted and published as
    a capture. It goes to review now; another capture of the person is still auto."""
    import shutil

    from faceloop.commands.evaluate import _refresh_inline
    from storage.objectstore import open_store
    from storage.tables import read_faces

    ids, settings = _subject_a(tmp_path, sample_photos, model_root)
    _phone_photo_of(sample_photos["yaoming"], ids / "A" / "live1.jpg", 15, 1.6)
    store = open_store(settings.store)

    def faces() -> dict[str, tuple[str, str]]:
        rows = read_faces(store, columns=["image_uri", "role", "status", "reason"]).to_pylist()
        return {
            r["image_uri"].rsplit("/", 1)[-1]: (r["status"], r["reason"])
            for r in rows
            if r["role"] == "id" or not r["reason"].startswith(("too_small", "not_the_"))
        }

    _refresh_inline(settings)
    assert not list(store.list("staging"))  # the eval's inline refresh cleans up as the flow does
    got = faces()
    assert got["live1.jpg"][0] == "review", got
    assert got["live1.jpg"][1].startswith("idcard_live_rephotographed: "), got
    assert got["id.jpg"][0] == "review" and "rephotographed" in got["id.jpg"][1], got
    shutil.copyfile(sample_photos["players"], ids / "A" / "live2.jpg")  # a capture of him
    _refresh_inline(settings)
    got = faces()
    assert got["live1.jpg"][1].startswith("idcard_live_rephotographed: "), got
    assert got["live2.jpg"][0] == "auto" and got["id.jpg"][0] == "auto", got
