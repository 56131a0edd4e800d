"""The simulated review round of `faceloop eval` (evaluation/review_round.py): each task kind is
answered from the truth through the real review rules, and what it cannot know it does not
confirm."""

from __future__ import annotations

from annotate import review as rv
from evaluation.review_round import answer, face_persons, review_round
from faceloop.config import Settings
from faceloop.vocab import TaskKind
from tests.test_review_rules import _emb, face


def scene() -> list[dict]:
    return [
        face("id1", source_kind="idcard", source_group="s1", role="id", identity_id="P1"),
        face(
            "live1",
            source_kind="idcard",
            source_group="s1",
            role="live",
            identity_id="P1",
            status="review",
            reason="idcard_review: cosine 0.31 in [0.25, 0.40)",
            score=0.31,
        ),
        face(
            "live2",
            source_kind="idcard",
            source_group="s2",
            role="live",
            status="review",
            reason="idcard_review: cosine 0.30 in [0.25, 0.40)",
            score=0.30,
        ),
        face("id2", source_kind="idcard", source_group="s2", role="id", identity_id="P2"),
        # identity A (person p): one face of another person asked as an outlier, and a face of
        # an unknown person asked too
        face("a1", identity_id="A"),
        face("a2", identity_id="A"),
        face("a3", identity_id="A", status="review", reason="outlier: 0.21 < 0.43", score=0.21),
        face("a4", identity_id="A", status="review", reason="outlier: 0.40 < 0.43", score=0.40),
        # identity B is person p too: the same person split in two
        face("b1", identity_id="B", status="review", reason="possible_duplicate_of A: 0.6"),
        # identity C is person r, a look-alike of A
        face("c1", identity_id="C", status="review", reason="possible_duplicate_of A: 0.55"),
        # a face waiting without a task of its own, close to A
        face("w1", status="review", reason="unclustered: noise", embedding=_emb(0.05)),
    ]


PERSON = {
    "id1": "p1",
    "live1": "p1",
    "id2": "p2",
    "live2": "p3",  # an impostor
    "a1": "p",
    "a2": "p",
    "a3": "q",
    "b1": "p",
    "c1": "r",
    "w1": "p",
}


def _by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["face_id"]: r for r in rows}


def test_each_task_kind_is_answered_from_the_truth_through_the_review_rules():
    faces = scene()
    rnd = review_round(faces, PERSON, Settings())
    after = _by_id(rnd.faces)
    assert rnd.tasks_by_kind == {"cluster_check": 1, "duplicate": 2, "idcard_pair": 2}
    assert rnd.unanswerable == 0 and rnd.not_pushed == 1
    # ID pairs: the genuine one is accepted by a person, the impostor rejected
    assert after["live1"]["status"] == "human" and after["live1"]["identity_id"] == "P1"
    assert after["live2"]["status"] == "rejected"
    # cluster check: the other person's face and the unknown one leave A; A's own are confirmed
    assert after["a3"]["status"] == "human" and after["a3"]["identity_id"] is None
    assert after["a4"]["status"] == "human" and after["a4"]["identity_id"] is None
    assert after["a1"]["status"] == "human" and after["a1"]["identity_id"] == "A"
    # duplicates: the split person is merged, the look-alike stays apart
    assert after["b1"]["identity_id"] == "A"
    assert after["c1"]["identity_id"] == "C" and after["c1"]["status"] == "human"
    # the waiting face near the confirmed identity is settled by propagation
    assert after["w1"]["status"] == "auto" and after["w1"]["identity_id"] == "A"
    assert rnd.propagated == 1
    # the input rows are not modified
    assert faces[1]["status"] == "review" and faces[6]["identity_id"] == "A"


def test_what_the_truth_cannot_say_is_not_confirmed():
    items, _ = rv.plan_items(scene(), thresholds=Settings().thresholds)
    by_kind: dict[str, list[rv.ReviewItem]] = {}
    for i in items:
        by_kind.setdefault(str(i.kind), []).append(i)
    (check,) = by_kind["cluster_check"]
    # an identity with no known person: no answer
    assert answer(check, {}, {}) is None
    # a duplicate pair whose persons are unknown: no answer
    assert all(answer(i, PERSON, {"A": "p"}) is None for i in by_kind["duplicate"])
    # an ID pair whose live face nobody knows is not accepted
    (pair,) = [i for i in by_kind["idcard_pair"] if i.subject == "s1"]
    assert answer(pair, {"id1": "p1"}, {}) == (rv.DIFFERENT, ())
    quality = rv.ReviewItem(TaskKind.QUALITY_CHECK, "q", ("x",), ("x",), rv.USABLE, 0.5, ("A",))
    assert answer(quality, {}, {"A": "p"}) == (rv.NOT_USABLE, ())
    assert answer(quality, {"x": "p"}, {"A": "p"}) == (rv.USABLE, ())
    assert answer(quality, {"x": "q"}, {"A": "p"}) == (rv.DIFFERENT, ())


def test_persons_come_from_the_scored_face_of_each_truth_image(tmp_path):
    root = tmp_path / "bench"
    img = root / "albums" / "a" / "x.jpg"
    truth = {"albums/a/x.jpg": {"person": "p", "kind": "album", "size": [100, 100]}}
    faces = [
        {"face_id": "centre", "image_uri": str(img), "bbox": [35.0, 35.0, 65.0, 65.0]},
        {"face_id": "corner", "image_uri": str(img), "bbox": [0.0, 0.0, 20.0, 20.0]},
    ]
    assert face_persons(faces, truth, str(root)) == {"centre": "p"}


def test_the_review_table_sets_the_automatic_figures_beside_the_reviewed_ones():
    from evaluation.report import review_rows

    auto = {"faceloop": {"albums": {"pairwise_recall": 0.8}, "idcards": {"tar": 0.9}}}
    auto["faceloop"]["albums"]["coverage"] = 0.7
    reviewed = {"albums": {"pairwise_recall": 0.85, "coverage": 0.75}, "idcards": {}}
    header, rows = review_rows(auto, reviewed)
    assert header == ["figure", "automatic", "after review"]
    assert rows == [
        ["albums: pairwise recall", 0.8, 0.85],
        ["albums: coverage (labelled)", 0.7, 0.75],
    ]


def test_an_identity_is_the_person_of_its_members_not_of_the_faces_proposed_for_it():
    from evaluation.review_round import _identity_persons

    faces = [
        face("m1", identity_id="A"),
        face("r1", identity_id="A", status="review", reason="unclustered_near_identity A: 0.5"),
        face("r2", identity_id="A", status="review", reason="unclustered_near_identity A: 0.5"),
        face("r3", identity_id="B", status="review", reason="too_few_faces: 1 < 2"),
    ]
    persons = {"m1": "p", "r1": "q", "r2": "q", "r3": "s"}
    assert _identity_persons(faces, persons) == {"A": "p", "B": "s"}
