"""Unit tests of the pure review rules (annotate/review.py): items, conflicts, apply, propagate."""

from __future__ import annotations

import numpy as np

from annotate import review as rv
from faceloop.config import PolicyThresholds
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
