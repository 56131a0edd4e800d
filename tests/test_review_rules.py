"""Unit tests of the pure review rules (annotate/review.py): items, conflicts, apply, propagate."""

from __future__ import annotations

import numpy as np
import pytest

from annotate import review as rv
from faceloop.config import PolicyThresholds, QualitySettings
from faceloop.vocab import is_human

T = PolicyThresholds()


def _emb(angle: float) -> list[float]:
    v = np.zeros(8, dtype=np.float32)
    v[0], v[1] = np.cos(angle), np.sin(angle)
    return v.tolist()


def face(fid: str, **kw) -> dict:
    row = {
        "face_id": fid,
        "source_kind": "album",
        "source_group": "a1",
        "role": "album",
        "identity_id": None,
        "status": "auto",
        "reason": "auto: ok",
        "score": 0.9,
        "quality": 0.8,
        "det_score": 0.9,
        "embedding": _emb(0.0),
        "labelled_run_id": "r0",
    }
    row.update(kw)
    return row


def scene() -> list[dict]:
    return [
        # ID subject s1: id face + a live face in review
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
        # identity A with one outlier
        face("a1", identity_id="A"),
        face("a2", identity_id="A"),
        face(
            "a3",
            identity_id="A",
            status="review",
            reason="outlier: similarity 0.21 < 0.30",
            score=0.21,
            embedding=_emb(1.2),
        ),
        # identity B maybe the same as A
        face("b1", identity_id="B", status="review", reason="possible_duplicate_of A: 0.5"),
        # waiting faces
        face("w1", status="review", reason="unclustered: noise", embedding=_emb(0.05)),
        face("w2", status="review", reason="too_few_faces: 1 < 2", embedding=_emb(1.5)),
    ]


def test_plan_items_kinds_keys_and_skips():
    items, skipped = rv.plan_items(scene(), thresholds=T)
    kinds = {i.kind: i for i in items}
    assert set(kinds) == {"idcard_pair", "cluster_check", "duplicate"}
    assert kinds["idcard_pair"].shown == ("id1", "live1")
    assert kinds["idcard_pair"].proposal == rv.SAME
    assert kinds["cluster_check"].suspects == ("a3",)
    assert set(kinds["cluster_check"].shown) == {"a1", "a2", "a3"}
    assert kinds["duplicate"].key == "duplicate:A:B"
    assert skipped == {"unclustered": 1, "too_few_faces": 1}
    # deterministic keys: the same faces, the same questions
    again, _ = rv.plan_items(list(reversed(scene())), thresholds=T)
    assert sorted(i.key for i in again) == sorted(i.key for i in items)


def test_duplicate_task_shows_each_identity_in_its_own_half():
    """The duplicate view shows shown[:k] as identity A and shown[k:] as B: equal halves."""
    faces = [face(f"a{i}", identity_id="A") for i in range(5)]
    faces += [
        face("b0", identity_id="B", status="review", reason="possible_duplicate_of A: 0.5"),
        face("b1", identity_id="B"),
    ]
    (item,) = [i for i in rv.plan_items(faces, thresholds=T)[0] if i.kind == "duplicate"]
    half = len(item.shown) // 2
    assert len(item.shown) == 2 * half == 4
    assert all(f.startswith("a") for f in item.shown[:half])
    assert all(f.startswith("b") for f in item.shown[half:])


def test_a_look_alike_with_no_faces_left_is_not_asked_about():
    """`faceloop forget --identity A` then a push before the next refresh: B's faces still read
    "possible_duplicate_of A"; the task showed B's one crop on both sides, and an annotator's
    "same person" made B's faces human. They wait for the label run that decides them again."""
    faces = [
        face("b0", identity_id="B", status="review", reason="possible_duplicate_of A: 0.5"),
        face("b1", identity_id="B", status="review", reason="possible_duplicate_of A: 0.5"),
    ]
    items, skipped = rv.plan_items(faces, thresholds=T)
    assert [i for i in items if i.kind == "duplicate"] == []
    assert skipped == {"possible_duplicate_of": 2}


def ans(
    key, kind, decision, aid, who="ann1", at="2026-01-01T00:00:00Z", marked=(), cancelled=False
):
    return rv.Answer(key, kind, aid, who, at, decision, tuple(marked), cancelled)


def test_conflict_rules():
    a = ans("k", "idcard_pair", rv.SAME, 1, "x", "2026-01-01T00:00:01Z")
    b = ans("k", "idcard_pair", rv.DIFFERENT, 2, "y", "2026-01-01T00:00:02Z")
    (r,) = rv.resolve([a, b], "new_task")
    assert r.conflict and r.decision is None
    (r,) = rv.resolve([a, b], "latest")
    assert r.conflict and r.decision == rv.DIFFERENT
    (r,) = rv.resolve([a, ans("k", "idcard_pair", rv.SAME, 3, "y")], "new_task")
    assert not r.conflict and r.decision == rv.SAME and r.annotators == ("x", "y")
    # a skipped annotation is no opinion
    (r,) = rv.resolve([a, ans("k", "idcard_pair", "", 4, cancelled=True)], "new_task")
    assert r.decision == rv.SAME


def _apply(faces, decisions, items=None):
    items = items or {i.key: i for i in rv.plan_items(faces, thresholds=T)[0]}
    by_kind = {i.kind: i for i in items.values()}
    answers = [ans(by_kind[k].key, k, d, n, marked=m) for n, (k, d, m) in enumerate(decisions)]
    return rv.apply_resolutions(faces, items, rv.resolve(answers), run_id="r1")


def test_apply_idcard_same_and_reject():
    faces = scene()
    changed, rep = _apply(faces, [("idcard_pair", rv.SAME, ())])
    live = next(f for f in faces if f["face_id"] == "live1")
    assert live["status"] == "human" and live["identity_id"] == "P1"
    assert live["reason"].startswith("human_same_person") and is_human(live)
    assert changed == {"live1"} and rep.settled and rep.human == 1
    faces = scene()
    _apply(faces, [("idcard_pair", rv.NOT_USABLE, ())])
    live = next(f for f in faces if f["face_id"] == "live1")
    assert live["status"] == "rejected" and is_human(live)


def test_an_id_pair_answered_after_its_live_photo_was_refiled_is_stale() -> None:
    """The live photo moved to another subject's folder before the annotator answered: "same"
    would have made it a confirmed face of the old subject, inside the new one."""
    faces = scene()
    items = {i.key: i for i in rv.plan_items(faces, thresholds=T)[0]}
    live = next(f for f in faces if f["face_id"] == "live1")
    live.update(source_group="s2", status=None, reason=None, identity_id=None)
    changed, rep = _apply(faces, [("idcard_pair", rv.SAME, ())], items)
    assert live["status"] is None and not changed and rep.stale == 1


def test_apply_cluster_outlier_removed_and_idempotent():
    faces = scene()
    items = {i.key: i for i in rv.plan_items(faces, thresholds=T)[0]}
    _changed, rep = _apply(faces, [("cluster_check", rv.REMOVE_MARKED, ("a3",))], items)
    by = {f["face_id"]: f for f in faces}
    assert by["a3"]["identity_id"] is None and by["a3"]["status"] == "human"
    assert by["a1"]["status"] == "human" and by["a1"]["identity_id"] == "A"
    assert rep.removed_from_identity == 1
    changed2, _ = _apply(faces, [("cluster_check", rv.REMOVE_MARKED, ("a3",))], items)
    assert changed2 == set()


def test_apply_duplicate_merges_into_larger():
    faces = scene()
    _, rep = _apply(faces, [("duplicate", rv.SAME, ())])
    by = {f["face_id"]: f for f in faces}
    assert by["b1"]["identity_id"] == "A" and by["b1"]["status"] == "human"
    assert rep.merged_identities == 1
    assert not any(f.get("identity_id") == "B" for f in faces)


def test_propagation_settles_near_faces_only():
    faces = scene()
    changed, _ = _apply(faces, [("cluster_check", rv.CONFIRM, ())])
    counts = rv.propagate(faces, changed, attach=T.attach, min_quality=0.35, run_id="r1")
    by = {f["face_id"]: f for f in faces}
    assert by["w1"]["status"] == "auto" and by["w1"]["identity_id"] == "A"
    assert by["w1"]["reason"].startswith("propagated")
    assert by["w2"]["status"] == "review"  # far away: still waiting
    assert sum(counts.values()) == 1
    # human decisions are not touched by propagation
    assert by["a3"]["status"] == "human"


def test_plan_reads_the_stored_reason_code_and_parses_old_rows() -> None:
    """The reason_code column decides the task kind; rows of old stores (no code) fall back to
    the code their reason starts with."""
    stored = face("o1", identity_id="A", status="review", reason="x", reason_code="outlier")
    old = face("o2", identity_id="A", status="review", reason="outlier: 0.2", reason_code=None)
    faces = [face("a1", identity_id="A"), stored, old]
    items, skipped = rv.plan_items(faces, thresholds=T)
    assert [i.kind for i in items] == ["cluster_check"] and not skipped
    assert set(items[0].face_ids) == {"o1", "o2"}


def test_applied_answers_store_their_reason_code() -> None:
    faces = scene()
    items = {i.key: i for i in rv.plan_items(faces, thresholds=T)[0]}
    key = next(k for k, i in items.items() if i.kind == "idcard_pair")
    res = rv.Resolution(key, items[key].kind, rv.SAME, (), ("ann",))
    changed, _ = rv.apply_resolutions(faces, items, [res], run_id="r1")
    for r in faces:
        if r["face_id"] in changed:
            assert r["reason_code"] == "human_same_person"
            assert r["reason"].startswith("human_same_person: ")


# -- what the prediction says, and how sure it is -----------------------------------------------


def test_confidence_is_distance_from_the_deciding_threshold() -> None:
    th = T.idcard_review
    assert rv.confidence(th, th) == 0.0
    assert rv.confidence(None, th) == 0.0
    # A confident "different person" (far below) is easier than a borderline one.
    assert rv.confidence(0.107, th) > rv.confidence(th - 0.01, th)
    values = [rv.confidence(s, th) for s in np.linspace(-1, 1, 41)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert rv.confidence(0.95, th) > 0.99 and rv.confidence(-0.5, th) > 0.99
    # Symmetric: the same distance either side, the same confidence.
    assert abs(rv.confidence(th + 0.1, th) - rv.confidence(th - 0.1, th)) < 1e-9


def test_task_scores_are_confidence_in_0_1_and_hardest_is_lowest() -> None:
    faces = [
        *scene(),
        face(
            "live2",
            source_kind="idcard",
            source_group="s2",
            role="live",
            identity_id="P2",
            status="review",
            reason="idcard_unconfirmed: cosine 0.11",
            score=0.107,
        ),
        face("id2", source_kind="idcard", source_group="s2", role="id", identity_id="P2"),
    ]
    items, _ = rv.plan_items(faces, thresholds=T)
    assert all(0.0 <= i.score <= 1.0 for i in items)
    pairs = {i.subject: i for i in items if i.kind == "idcard_pair"}
    assert pairs["s2"].proposal == rv.DIFFERENT
    # 0.107 is a clear "different" (0.14 below 0.25); 0.31 is 0.06 above: harder, so lower.
    assert pairs["s1"].score < pairs["s2"].score
    assert pairs["s1"].evidence == 0.31


def _lowq(fid: str, q: float, score: float, **kw) -> dict:
    return face(
        fid,
        identity_id="A",
        status="review",
        reason=f"low_quality: {q:.2f} < auto minimum 0.15",
        reason_code="low_quality",
        quality=q,
        score=score,
        **kw,
    )


def test_quality_only_face_is_asked_usable_never_premarked() -> None:
    """The reported case: a face in review only for a poor crop, cosine 0.95 to its identity."""
    faces = [face("a1", identity_id="A"), face("a2", identity_id="A"), _lowq("q1", 0.14, 0.95)]
    band = QualitySettings(min_quality=0.10, auto_min_quality=0.15)  # a config with a band
    items, skipped = rv.plan_items(faces, thresholds=T, quality=band)
    (item,) = items
    assert not skipped
    assert item.kind == "quality_check" and item.face_ids == ("q1",)
    assert item.shown[0] == "q1" and set(item.shown[1:]) == {"a1", "a2"}
    assert item.proposal == rv.USABLE  # upper half of the [0.10, 0.15) band
    assert not item.suspects
    low, _ = rv.plan_items([*faces[:2], _lowq("q2", 0.101, 0.95)], thresholds=T, quality=band)
    assert low[0].proposal == rv.NOT_USABLE and low[0].score > 0.9


def test_cluster_check_premarks_only_faces_below_outlier() -> None:
    faces = [
        face("a1", identity_id="A"),
        face("a2", identity_id="A"),
        # A poor crop that also does not look like A: the belonging question, pre-marked.
        face(
            "x1",
            identity_id="A",
            status="review",
            reason="low_quality: 0.12 < auto minimum 0.15; outlier: similarity 0.10 < 0.30",
            reason_code="low_quality",
            quality=0.12,
            score=0.10,
        ),
        # Held back because the identity is small, but it matches: asked, not pre-marked.
        face(
            "s1",
            identity_id="A",
            status="review",
            reason="too_few_faces: 3 < 4",
            reason_code="too_few_faces",
            score=0.8,
        ),
    ]
    (item,) = rv.plan_items(faces, thresholds=T)[0]
    assert item.kind == "cluster_check" and set(item.face_ids) == {"x1", "s1"}
    assert item.suspects == ("x1",) and item.proposal == rv.REMOVE_MARKED
    assert item.score == pytest.approx(rv.confidence(0.10, T.outlier))
    only_small = [f for f in faces if f["face_id"] != "x1"]
    (item,) = rv.plan_items(only_small, thresholds=T)[0]
    assert item.suspects == () and item.proposal == rv.CONFIRM


def test_cluster_check_premarks_the_smaller_face_of_a_shared_photo() -> None:
    """A ``same_photo`` face matches its identity (it passed every check) but a larger face of
    its photo is the identity's: the model believes it is someone else, so it is pre-marked and
    an annotator who accepts the prediction takes it out of the identity."""
    faces = [
        face("a1", identity_id="A"),
        face("a2", identity_id="A"),
        face(
            "t1",
            identity_id="A",
            status="review",
            reason="same_photo: a larger face of this photo (95 px against 68) is A",
            reason_code="same_photo",
            score=0.72,
        ),
    ]
    (item,) = rv.plan_items(faces, thresholds=T)[0]
    assert item.kind == "cluster_check" and item.face_ids == ("t1",)
    assert item.suspects == ("t1",) and item.proposal == rv.REMOVE_MARKED


def test_one_item_per_key() -> None:
    """An ID face and its live face both in review ask one question, not two with one key."""
    faces = [
        face(
            "id1",
            source_kind="idcard",
            source_group="s1",
            role="id",
            identity_id="P1",
            status="review",
            reason="idcard_review: cosine 0.31",
            score=0.31,
        ),
        face(
            "live1",
            source_kind="idcard",
            source_group="s1",
            role="live",
            identity_id="P1",
            status="review",
            reason="idcard_review: cosine 0.31",
            score=0.31,
        ),
    ]
    items, _ = rv.plan_items(faces, thresholds=T)
    assert len(items) == len({i.key for i in items}) == 1
    assert set(items[0].face_ids) == {"id1", "live1"}


def _model_scene() -> list[dict]:
    """Faces of every kind of question, auto faces around them."""
    return [
        *scene(),
        face("a4", identity_id="A", quality=0.9),
        _lowq("q1", 0.14, 0.95),
        _lowq("q2", 0.11, 0.9),
        face(
            "s1",
            identity_id="C",
            status="review",
            reason="too_few_faces: 2 < 3",
            reason_code="too_few_faces",
            score=0.85,
        ),
        face(
            "s2",
            identity_id="C",
            status="review",
            reason="too_few_faces: 2 < 3",
            reason_code="too_few_faces",
            score=0.85,
        ),
        face(
            "n1",
            status="review",
            identity_id="A",
            reason="unclustered_near_identity A: similarity 0.60 >= 0.30",
            reason_code="unclustered_near_identity",
            score=0.6,
        ),
    ]


def test_accepting_every_prediction_never_changes_a_face_the_model_keeps() -> None:
    """Plan tasks, render each as Label Studio gets it, answer with its own prediction, apply:
    no auto face leaves its identity or its status; no face the model matched to its identity
    (similarity >= outlier) is taken out of it."""
    from annotate import render

    faces = _model_scene()
    before = {f["face_id"]: dict(f) for f in faces}
    items, _ = rv.plan_items(faces, thresholds=T)
    crops = {f["face_id"]: _jpeg() for f in faces}
    answers = []
    for n, item in enumerate(items):
        task = render.build_task(item, crops, "m")
        (pred,) = task["predictions"]
        ann = {"id": n + 1, "result": pred["result"], "completed_by": {"email": "accept@x"}}
        ann["updated_at"] = "2026-01-01T00:00:00Z"
        answers.append(render.parse_annotation(ann, item, item.key))
    assert all(a.decision == i.proposal for a, i in zip(answers, items, strict=True))
    rv.apply_resolutions(faces, {i.key: i for i in items}, rv.resolve(answers), run_id="r1")
    after = {f["face_id"]: f for f in faces}
    for fid, old in before.items():
        new = after[fid]
        if old["status"] == "auto":
            # auto stays auto, or becomes human-confirmed in the same identity when shown
            assert new["status"] in ("auto", "human"), fid
            assert new["identity_id"] == old["identity_id"], fid
        kept = old["status"] == "review" and (old["score"] or 0) >= T.outlier
        if kept and not old["reason"].startswith(("idcard", "possible_duplicate")):
            assert new["identity_id"] == old["identity_id"], fid
    assert after["q1"]["status"] == "human" and after["q1"]["identity_id"] == "A"
    assert after["a3"]["identity_id"] is None  # the real outlier (0.21 < 0.30) was marked
    assert after["s1"]["identity_id"] == "C" and after["n1"]["identity_id"] == "A"


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (120, 90, 60)).save(buf, "JPEG")
    return buf.getvalue()


def test_quality_check_answers_apply() -> None:
    for decision, status, ident in (
        (rv.USABLE, "human", "A"),
        (rv.NOT_USABLE, "rejected", "A"),
        (rv.DIFFERENT, "human", None),
    ):
        faces = [face("a1", identity_id="A"), _lowq("q1", 0.12, 0.9)]
        items = {i.key: i for i in rv.plan_items(faces, thresholds=T)[0]}
        (key,) = items
        res = rv.Resolution(key, items[key].kind, decision, (), ("ann",))
        changed, _ = rv.apply_resolutions(faces, items, [res], run_id="r1")
        q = faces[1]
        assert changed == {"q1"} and q["status"] == status and q["identity_id"] == ident
        assert is_human(q)
        assert faces[0]["status"] == "auto"  # the reference face is not touched


def test_every_store_has_its_own_projects(tmp_path) -> None:
    from annotate.render import project_title
    from storage.identity import store_id, store_scope
    from storage.objectstore import open_store

    a, b = open_store(str(tmp_path / "demo")), open_store(str(tmp_path / "other" / "demo"))
    assert (
        store_id(a)
        == store_id(a)
        == open_store(str(tmp_path / "demo")).read_bytes("state/store_id").decode()
    )
    assert store_id(a) != store_id(b)
    sa, sb = store_scope(a), store_scope(b)
    assert sa.startswith("demo ") and sb.startswith("demo ") and sa != sb
    titles = {project_title("faceloop", k, s) for k in rv.TASK_KINDS for s in (sa, sb)}
    assert len(titles) == 2 * len(rv.TASK_KINDS)
    assert project_title("faceloop", "cluster_check", sa) == f"faceloop [{sa}]: Cluster check"
    # Label Studio's 50-character limit: the name gives way, the store id stays.
    long = project_title("faceloop-test-0123456789", "duplicate", "a-very-long-store-name 1a2b3c4d")
    assert len(long) <= 50 and "1a2b3c4d]" in long and long.startswith("faceloop-test-0123456789 [")
    assert all(len(t) <= 50 for t in titles)
    # The longest prefix the settings take still keeps the store id and four different titles
    # (a longer one put every kind of task, each with its own labelling config, in one project).
    from faceloop.config import PROJECT_PREFIX_MAX, ReviewSettings

    widest = "p" * PROJECT_PREFIX_MAX
    kept = {project_title(widest, k, "a-very-long-store-name 1a2b3c4d") for k in rv.TASK_KINDS}
    assert len(kept) == len(rv.TASK_KINDS) and all("[1a2b3c4d]: " in t for t in kept)
    with pytest.raises(ValueError, match="at most 28 characters"):
        ReviewSettings(project_prefix=widest + "p")


def test_a_cluster_check_answer_that_contradicts_itself_is_not_applied() -> None:
    """ "Marked faces do not belong" with no face marked (a number forgotten), or "all belong"
    with faces marked: the answer is not understood (no decision, nothing marked) and changes
    no face; it used to confirm every shown face as human (never overridden later)."""
    from annotate import render

    faces = _model_scene()
    items, _ = rv.plan_items(faces, thresholds=T)
    item = next(i for i in items if i.kind == rv.TaskKind.CLUSTER_CHECK)

    def answer(verdict: str, numbers: list[str]) -> rv.Answer:
        result = [render.choice("verdict", "grid", [verdict])]
        if numbers:
            result.append(render.choice("outliers", "grid", numbers))
        ann = {"id": 1, "result": result, "updated_at": "2026-01-01T00:00:00Z"}
        return render.parse_annotation(ann, item, item.key)

    for bad in (answer(rv.REMOVE_MARKED, []), answer(rv.CONFIRM, ["1"])):
        assert (bad.decision, bad.marked) == ("", ())
        before = [dict(f) for f in faces]
        rv.apply_resolutions(faces, {item.key: item}, rv.resolve([bad]), run_id="r1")
        assert faces == before
    good = answer(rv.REMOVE_MARKED, ["1"])
    assert good.decision == rv.REMOVE_MARKED and good.marked == (item.shown[0],)
    assert answer(rv.CONFIRM, []).decision == rv.CONFIRM


def _dup(key: str, a: str, b: str, shown: tuple[str, ...]) -> rv.ReviewItem:
    return rv.ReviewItem(
        rv.TaskKind.DUPLICATE, key, shown, shown, rv.SAME, 0.5, identity_ids=(a, b)
    )


@pytest.mark.parametrize("order", [("t7", "t10"), ("t10", "t7")])
def test_same_person_answers_merge_transitively_in_any_order(order) -> None:
    """Task 7 (X = B) was still open when task 10 (Y = B) was answered and applied; answering
    task 7 later moved only its own faces: one person ended in two identities (two classes)."""
    faces = [
        face("x1", identity_id="X"),
        face("x2", identity_id="X"),
        face("y1", identity_id="Y"),
        face("y2", identity_id="Y"),
        face("y3", identity_id="Y"),
        face("b1", identity_id="B", status="review", reason="possible_duplicate_of Y: 0.6"),
    ]
    items = {"t7": _dup("t7", "X", "B", ("b1", "x1")), "t10": _dup("t10", "Y", "B", ("b1", "y1"))}
    answers = [
        ans(k, "duplicate", rv.SAME, n, at=f"2026-01-01T00:00:0{n}Z") for n, k in enumerate(order)
    ]
    _, rep = rv.apply_resolutions(faces, items, rv.resolve(answers), run_id="r1")
    assert {f["identity_id"] for f in faces} == {"Y"}, [
        (f["face_id"], f["identity_id"]) for f in faces
    ]
    assert rep.merged_identities == 2
    again = rv.apply_resolutions(faces, items, rv.resolve(answers), run_id="r2")
    assert again[0] == set() and again[1].merged_identities == 0  # no merge to report twice


def _cluster_check(
    key: str, asked: tuple[str, ...], shown: tuple[str, ...], identity: str
) -> rv.ReviewItem:
    """A pushed cluster check of ``identity`` asking about ``asked`` among ``shown``."""
    return rv.ReviewItem(
        rv.TaskKind.CLUSTER_CHECK, key, asked, shown, rv.CONFIRM, 0.5, identity_ids=(identity,)
    )


def test_an_older_cluster_check_does_not_undo_a_later_placement() -> None:
    """A cluster check of identity E (pushed first) answered after a person had confirmed two of
    its faces in identity N (a newer task): the old answer took them out of N ("removed from
    E", no identity), undoing the newer decision, with no conflict reported."""
    faces = [
        face("n1", identity_id="N", status="human", reason="human_confirmed: belongs to N (by b)"),
        face("n2", identity_id="N", status="human", reason="human_confirmed: belongs to N (by b)"),
        face("e1", identity_id="E"),
        face("e2", identity_id="E", status="review", reason="outlier: similarity 0.2 < 0.3"),
    ]
    old = _cluster_check("cc-E", ("e2",), ("e1", "e2", "n1", "n2"), "E")
    answer = ans("cc-E", "cluster_check", rv.REMOVE_MARKED, 1, marked=("n1", "n2", "e2"))
    changed, rep = rv.apply_resolutions(faces, {"cc-E": old}, rv.resolve([answer]), run_id="r1")
    by = {f["face_id"]: f for f in faces}
    assert by["n1"]["identity_id"] == "N" and by["n2"]["identity_id"] == "N"
    assert rep.stale == 2 and changed == {"e1", "e2"}
    assert by["e2"]["identity_id"] is None and by["e1"]["status"] == "human"
    # A removed face put back by an edited answer of the same task still goes back.
    edited = ans("cc-E", "cluster_check", rv.CONFIRM, 1, at="2026-01-01T00:01:00Z")
    rv.apply_resolutions(faces, {"cc-E": old}, rv.resolve([edited]), run_id="r2")
    assert by["e2"]["identity_id"] == "E" and by["n1"]["identity_id"] == "N"


def test_a_cluster_check_of_an_identity_merged_away_since_acts_on_the_one_it_became() -> None:
    """A cluster check of identity F (pushed), then a refresh merged F's faces into G (auto),
    then the answer: two faces marked, the rest confirmed. The confirmed faces went back to
    F, a class of their own beside G: one person, two labels in the next dataset."""
    faces = [
        face("f1", identity_id="G"),
        face("f2", identity_id="G"),
        face("f3", identity_id="G"),
        face("g1", identity_id="G"),
    ]
    old = _cluster_check("cc-F", ("f3",), ("f1", "f2", "f3"), "F")
    answer = ans("cc-F", "cluster_check", rv.REMOVE_MARKED, 1, marked=("f3",))
    rv.apply_resolutions(faces, {"cc-F": old}, rv.resolve([answer]), run_id="r1")
    by = {f["face_id"]: f for f in faces}
    assert {by[f]["identity_id"] for f in ("f1", "f2", "g1")} == {"G"}
    assert by["f1"]["status"] == "human" and "belongs to G" in by["f1"]["reason"]
    assert by["f3"]["identity_id"] is None and "removed from G" in by["f3"]["reason"]
    # While the task's identity still has a shown face, the answer is about it.
    faces = [face("f1", identity_id="F"), face("f2", identity_id="G"), face("f3", identity_id="G")]
    rv.apply_resolutions(faces, {"cc-F": old}, rv.resolve([answer]), run_id="r1")
    assert faces[0]["identity_id"] == "F" and faces[1]["identity_id"] == "G"


def test_a_conflict_takes_the_disputed_faces_out_of_the_dataset_until_it_is_settled() -> None:
    """One annotator's "all belong" was applied (the faces human, published); a second
    annotator then marked a face: the conflict was re-asked while the disputed face stayed
    confirmed and published. Now it waits in review (a human_ reason: no automatic run takes
    it back) until the question asked again is answered; the undisputed faces keep theirs."""
    faces = [
        face("e1", identity_id="E"),
        face("e2", identity_id="E"),
        face("e3", identity_id="E", status="review", reason="outlier: similarity 0.2 < 0.3"),
    ]
    item = _cluster_check("cc-E", ("e3",), ("e1", "e2", "e3"), "E")
    first = ans("cc-E", "cluster_check", rv.CONFIRM, 1, who="b")
    rv.apply_resolutions(faces, {"cc-E": item}, rv.resolve([first]), run_id="r1")
    by = {f["face_id"]: f for f in faces}
    assert all(by[f]["status"] == "human" for f in ("e1", "e2", "e3"))
    second = ans("cc-E", "cluster_check", rv.REMOVE_MARKED, 2, who="a", marked=("e2",))
    (res,) = rv.resolve([first, second])
    assert res.decision is None and res.disputed == ("e2",)
    changed, rep = rv.apply_resolutions(faces, {"cc-E": item}, [res], run_id="r2")
    assert changed == {"e2"} and rep.held == 1 and rep.conflicts == 1
    assert by["e2"]["status"] == "review" and by["e2"]["identity_id"] == "E"
    assert is_human(by["e2"]) and by["e2"]["reason"].startswith("human_conflict")
    assert by["e1"]["status"] == by["e3"]["status"] == "human"
    again, rep = rv.apply_resolutions(faces, {"cc-E": item}, [res], run_id="r3")
    assert again == set() and rep.held == 0  # idempotent
    # The question asked again settles it.
    round2 = _cluster_check("cc-E#round2", ("e3",), ("e1", "e2", "e3"), "E")
    third = ans("cc-E#round2", "cluster_check", rv.REMOVE_MARKED, 3, who="c", marked=("e2",))
    rv.apply_resolutions(faces, {"cc-E#round2": round2}, rv.resolve([third]), run_id="r4")
    assert by["e2"]["status"] == "human" and by["e2"]["identity_id"] is None


def test_a_disputed_face_still_in_review_is_held_and_not_propagated() -> None:
    """Two annotators disagreed about a face still waiting in review (one confirmed it, one
    marked it): the pull reported the conflict but left the face its automatic reason, and
    the same pull's propagation (another identity confirmed nearby) labelled it auto and
    published it before the question asked again was answered."""
    faces = [
        face("e1", identity_id="E"),
        face("e3", identity_id="E", status="review", reason="outlier: similarity 0.2 < 0.3"),
        face("p1", identity_id="P", embedding=_emb(0.01)),
    ]
    by = {f["face_id"]: f for f in faces}
    by["e3"]["embedding"] = _emb(0.02)  # near P's faces: propagation would take it
    cc = _cluster_check("cc-E", ("e3",), ("e1", "e3"), "E")
    cp = _cluster_check("cc-P", (), ("p1",), "P")
    answers = [
        ans("cc-E", "cluster_check", rv.CONFIRM, 1, who="a"),
        ans("cc-E", "cluster_check", rv.REMOVE_MARKED, 2, who="b", marked=("e3",)),
        ans("cc-P", "cluster_check", rv.CONFIRM, 3, who="a"),
    ]
    changed, rep = rv.apply_resolutions(
        faces, {"cc-E": cc, "cc-P": cp}, rv.resolve(answers), run_id="r1"
    )
    assert rep.conflicts == 1 and rep.held == 1 and "e3" in changed
    assert by["e3"]["status"] == "review" and by["e3"]["reason"].startswith("human_conflict")
    settled = rv.propagate(faces, changed, attach=0.5, min_quality=0.0, run_id="r1")
    assert by["e3"]["status"] == "review" and not settled


def test_the_latest_of_conflicting_answers_is_credited_to_its_annotator_alone() -> None:
    a = ans("k", "idcard_pair", rv.SAME, 1, "x", "2026-01-01T00:00:01Z")
    b = ans("k", "idcard_pair", rv.DIFFERENT, 2, "y", "2026-01-01T00:00:02Z")
    (r,) = rv.resolve([a, b], "latest")
    assert r.decision == rv.DIFFERENT and r.annotators == ("y",) and r.conflict


def test_a_conflict_settled_under_latest_stays_settled_when_the_rule_switches(tmp_path) -> None:
    """An annotation lead ran one pull under `conflict_rule: latest` (two annotators disagreed,
    the later answer was applied and published) and went back to `new_task`: the settled
    conflict reopened, and its faces were taken out of the dataset again."""
    from annotate import records
    from annotate.sync import _resolve
    from storage.objectstore import open_store

    st = open_store(str(tmp_path / "store"))
    rows = [
        {
            "task_key": "k",
            "kind": "idcard_pair",
            "project_id": 1,
            "task_id": 1,
            "annotation_id": aid,
            "annotator": who,
            "updated_at": at,
            "cancelled": False,
            "decision": decision,
            "marked": [],
            "raw_json": "{}",
            "pulled_at": at,
        }
        for aid, who, at, decision in (
            (1, "x", "2026-01-01T00:00:01Z", rv.SAME),
            (2, "y", "2026-01-01T00:00:02Z", rv.DIFFERENT),
        )
    ]
    records.write_answers(st, rows)
    (open_,) = _resolve(st, "new_task")
    assert open_.conflict and open_.decision is None
    (applied,) = _resolve(st, "latest")
    records.record_applied(st, [applied], {"k": 1}, "r1")
    (after,) = _resolve(st, "new_task")
    assert after.decision == rv.DIFFERENT and after.annotators == ("y",)
    # A third answer is a new disagreement: the rule in force decides it.
    records.write_answers(st, [rows[0] | {"annotation_id": 3, "annotator": "z"}])
    (again,) = _resolve(st, "new_task")
    assert again.conflict and again.decision is None


def test_the_scheduled_pull_skips_when_review_is_off(tmp_path, monkeypatch) -> None:
    """prefect.yaml schedules `review-pull` every 10 minutes; with `review.enabled: false` it
    failed each time ("no Label Studio token"), an alert every 10 minutes. It skips, as the
    refresh's push does."""
    from flows.review import review_pull_flow
    from storage.objectstore import open_store

    open_store(str(tmp_path / "store")).write_bytes("state/.keep", b"")
    monkeypatch.setenv("FACELOOP_REVIEW__ENABLED", "false")
    for name in ("FACELOOP_REVIEW__TOKEN", "LABEL_STUDIO_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    out = review_pull_flow.fn(store=str(tmp_path / "store"))
    assert out == {"skipped": "review disabled"}


def test_answers_from_a_fresh_label_studio_database_keep_the_earlier_ones(tmp_path) -> None:
    """Label Studio restarted on a fresh database numbers annotations from 1 again: a new
    answer (id 1, to another task) was taken for a later version of the recorded answer with id
    1, which vanished: a conflict on that task read as settled by the other annotator alone.
    An annotation is its id and when it was made; rows recorded before that column have it in
    their verbatim JSON."""
    import json

    from annotate import records
    from annotate.sync import _resolve
    from storage.objectstore import open_store

    st = open_store(str(tmp_path / "store"))

    def row(key: str, aid: int, who: str, made: str, decision: str, column: bool = True) -> dict:
        out = {
            "task_key": key,
            "kind": "idcard_pair",
            "project_id": 1,
            "task_id": 1,
            "annotation_id": aid,
            "annotator": who,
            "updated_at": made,
            "cancelled": False,
            "decision": decision,
            "marked": [],
            "raw_json": json.dumps({"id": aid, "created_at": made}),
            "pulled_at": made,
        }
        return out | ({"created_at": made} if column else {})

    # The old database: two annotators disagree on task "k" (recorded by an older faceloop,
    # without the created_at column).
    records.write_answers(
        st,
        [
            row("k", 1, "x", "2026-01-01T00:00:01Z", rv.SAME, column=False),
            row("k", 2, "y", "2026-01-01T00:00:02Z", rv.DIFFERENT, column=False),
        ],
    )
    (open_,) = _resolve(st, "new_task")
    assert open_.conflict and open_.decision is None
    # The fresh database: annotation 1 again, to task "other".
    records.write_answers(st, [row("other", 1, "x", "2026-02-01T00:00:01Z", rv.SAME)])
    got = {(a.task_key, a.annotation_id) for a in records.all_answers(st)}
    assert got == {("k", 1), ("k", 2), ("other", 1)}
    by_key = {r.task_key: r for r in _resolve(st, "new_task")}
    assert by_key["k"].conflict and by_key["k"].decision is None
    assert by_key["other"].decision == rv.SAME
    # A pull would not take the new annotation for one already recorded, nor the reverse.
    seen = records.recorded_answer_versions(st)
    assert ((1, "2026-02-01T00:00:01Z"), "2026-02-01T00:00:01Z") in seen
    assert ((1, "2026-01-01T00:00:01Z"), "2026-01-01T00:00:01Z") in seen


def test_an_answer_marking_faces_without_a_verdict_it_knows_is_not_understood() -> None:
    """A cluster check answered with faces marked and a verdict the task does not have (or a
    face number it does not show) was kept with its marks and applied to nothing, and the pull
    did not list it as not understood: the task waited with no word of why."""
    from annotate import render

    item = rv.ReviewItem(
        kind=rv.TaskKind.CLUSTER_CHECK,
        key="cc:id-1:r1",
        face_ids=("f1", "f2"),
        shown=("f1", "f2"),
        proposal=rv.CONFIRM,
        score=0.5,
    )

    def answer(verdict: str, marks: list[str]) -> rv.Answer:
        ann = {
            "id": 7,
            "created_at": "2026-01-01T00:00:00Z",
            "result": [
                {"from_name": "verdict", "value": {"choices": [verdict]}},
                {"from_name": "outliers", "value": {"choices": marks}},
            ],
        }
        return render.parse_annotation(ann, item, item.key)

    assert (answer("bogus", ["1"]).decision, answer("bogus", ["1"]).marked) == ("", ())
    assert answer(rv.REMOVE_MARKED, ["1", "99"]).decision == ""
    ok = answer(rv.REMOVE_MARKED, ["2"])
    assert (ok.decision, ok.marked, ok.created_at) == (
        rv.REMOVE_MARKED,
        ("f2",),
        "2026-01-01T00:00:00Z",
    )


@pytest.mark.parametrize("same_first", [True, False])
def test_an_id_face_a_live_photo_matched_stays_confirmed_whatever_the_other_pairs_say(
    same_first,
) -> None:
    """Two live photos of one subject asked with its ID face: one "same person", the other
    "different person" (the pair that also carried the ID face's own question). The ID face
    ended rejected either way (confirmed, then rejected; or rejected, then not confirmed
    because it was no longer in review), beside a live face a person had matched to it."""
    idf = dict(source_kind="idcard", source_group="s1", identity_id="P1")
    faces = [
        face("id1", role="id", status="review", reason="idcard_review: cosine 0.31", **idf),
        face("live1", role="live", status="review", reason="idcard_review: cosine 0.3", **idf),
        face("live2", role="live", status="review", reason="idcard_review: cosine 0.3", **idf),
    ]
    k_same, k_diff = ("k1", "k2") if same_first else ("k2", "k1")
    items = {
        k_same: rv.ReviewItem(
            kind=rv.TaskKind.IDCARD_PAIR,
            key=k_same,
            face_ids=("live1",),
            shown=("id1", "live1"),
            proposal=rv.SAME,
            score=0.5,
            subject="s1",
        ),
        k_diff: rv.ReviewItem(
            kind=rv.TaskKind.IDCARD_PAIR,
            key=k_diff,
            face_ids=("id1", "live2"),
            shown=("id1", "live2"),
            proposal=rv.SAME,
            score=0.5,
            subject="s1",
        ),
    }
    answers = [
        ans(k_same, "idcard_pair", rv.SAME, 1),
        ans(k_diff, "idcard_pair", rv.DIFFERENT, 2),
    ]
    rv.apply_resolutions(faces, items, rv.resolve(answers), run_id="r1")
    status = {f["face_id"]: f["status"] for f in faces}
    assert status == {"id1": "human", "live1": "human", "live2": "rejected"}
