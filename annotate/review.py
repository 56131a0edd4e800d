"""Pure decision rules of human review: which faces become which review task, how answers
turn into face updates, what happens when annotators disagree, and propagation.

No I/O and no Label Studio here: annotate/render.py turns :class:`ReviewItem` into tasks and
annotations back into :class:`Answer`; annotate/sync.py reads and writes the store.

Reason codes of status=review faces and what review does with them:

==========================  ======================  =========================================
reason code (prefix)        task kind               answer → faces
==========================  ======================  =========================================
``idcard_review``,         ``idcard_pair``         same → human (identity of the ID face);
``idcard_low_quality``,                             different / not_usable → rejected
``idcard_unconfirmed``
``outlier``, ``low_cohesion``  ``cluster_check``    confirm → reviewed faces human; marked
``too_few_faces``,                                  faces leave the identity (human, no id)
``unclustered_near_identity``,
``same_photo``
``low_quality`` and no      ``quality_check``       usable → human (its identity); not_usable →
other doubt                                         rejected; different_person → human, no id
``possible_duplicate_of X`` ``duplicate``           same → merge into the larger identity;
                                                    different → both stay, faces human
faces without a proposed     not pushed              wait: propagation may settle them once a
identity, ``unclustered``,                          nearby identity is confirmed by a person;
``idcard_no_live_face``,                            otherwise they stay in review
``idcard_live_is_id_photo``,
``idcard_live_rephotographed``,
others
==========================  ======================  =========================================

The prediction shown with a task is what the model believes, so that an annotator who accepts
it unchanged never deletes a face the model would keep: a cluster check pre-marks only faces
whose similarity to the identity is below ``outlier`` and smaller faces of a photo whose
larger face is the identity's (``same_photo``; a face held back for a poor crop or a small
identity is not pre-marked); a poor crop that matches its identity is a quality check,
pre-filled from its quality. A task's ``score`` is the confidence in that prediction in [0, 1]
(:func:`confidence`: how far the similarity, or quality, lies from the threshold that decides
the proposal), so Label Studio's lowest-score-first order is hardest-first.

Every face a person decided on carries a reason starting with ``human_``; :func:`is_human`
is the test other stages use so an automatic run never overrides it.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from faceloop.config import PolicyThresholds, QualitySettings
from faceloop.schema import AUTO, HUMAN, REJECTED, REVIEW, ROLE_ID, ROLE_LIVE
from faceloop.vocab import (
    DUPLICATE_CLAIM,
    HUMAN_PREFIX,
    SAME_PHOTO,
    SEVERAL_ID_PHOTOS,
    Reason,
    TaskKind,
    is_human,
    reason_codes,
    row_reason_code,
    task_kind_for_code,
)

TASK_KINDS: tuple[TaskKind, ...] = tuple(TaskKind)

# The columns of the faces table that planning review items reads.
PLAN_COLUMNS = [
    "face_id",
    "source_kind",
    "source_group",
    "role",
    "identity_id",
    "status",
    "reason",
    "reason_code",
    "score",
    "quality",
    "det_score",
    "model",
]

# Decisions an annotator can give, per task kind (the Choice values of the labelling configs).
SAME, DIFFERENT, NOT_USABLE = "same_person", "different_person", "not_usable"
CONFIRM, REMOVE_MARKED = "all_belong", "marked_do_not_belong"
USABLE = "usable"
DECISIONS: dict[TaskKind, tuple[str, ...]] = {
    TaskKind.IDCARD_PAIR: (SAME, DIFFERENT, NOT_USABLE),
    TaskKind.CLUSTER_CHECK: (CONFIRM, REMOVE_MARKED),
    TaskKind.DUPLICATE: (SAME, DIFFERENT),
    TaskKind.QUALITY_CHECK: (USABLE, NOT_USABLE, DIFFERENT),
}
# Reference faces of the identity shown beside a quality-check face.
QUALITY_REFERENCES = 5
# How fast confidence grows with the distance from the deciding threshold (cosine units):
# 0.1 away = 0.63, 0.2 away = 0.86, 0.3 away = 0.95.
CONFIDENCE_SCALE = 0.1

Row = dict[str, Any]


@dataclass(frozen=True)
class ReviewItem:
    """One question for a person. ``key`` is stable for the same question (idempotent push);
    ``face_ids`` are the faces the answer settles; ``shown`` the crops displayed, in order."""

    kind: TaskKind
    key: str
    face_ids: tuple[str, ...]
    shown: tuple[str, ...]
    proposal: str  # the model's answer, one of DECISIONS[kind]
    score: float  # confidence in the proposal, [0, 1] (:func:`confidence`); low = hard
    identity_ids: tuple[str, ...] = ()
    suspects: tuple[str, ...] = ()  # cluster_check: faces pre-marked as not belonging
    subject: str | None = None  # idcard_pair: the ID subject (source_group)
    # What the proposal rests on, shown to the annotator (not stored in the task records):
    # the similarity (cluster check: the lowest of the asked faces; quality check: the quality).
    evidence: float | None = None
    # Why the face is in review when the similarity alone does not say it (duplicate_claim:
    # "duplicate_claim: <other subject's pseudonym>"); shown to the annotator with the task.
    reason: str = ""


def confidence(value: float | None, threshold: float, scale: float = CONFIDENCE_SCALE) -> float:
    """Confidence in [0, 1] of a proposal decided by ``value`` against ``threshold``: 0 at the
    threshold (a coin flip), growing with the distance either side (``1 - exp(-d / scale)``).
    ``None`` (nothing measured) is 0: such a task is as hard as it gets."""
    if value is None or math.isnan(value):
        return 0.0
    return float(1.0 - math.exp(-abs(float(value) - threshold) / scale))


def quality_proposal(quality: float | None, qs: QualitySettings) -> tuple[str, float]:
    """The quality check's pre-filled answer and its confidence: faces in review for quality lie
    between ``min_quality`` (rejected below) and ``auto_min_quality`` (auto above); the upper
    half of that band is proposed usable, the lower half not, confidence growing towards the
    band's ends."""
    lo, hi = qs.min_quality, qs.auto_min_quality
    mid, half = (lo + hi) / 2, max((hi - lo) / 2, 1e-6)
    q = float(quality or 0.0)
    return (USABLE if q >= mid else NOT_USABLE), min(1.0, abs(q - mid) / half)


def _quality_only(row: Row) -> bool:
    """A review face held back only for a poor crop (no other doubt in its reason)."""
    others = reason_codes(row.get("reason"))[1:]  # the deciding code is the stored one
    return {row_reason_code(row), *others} == {"low_quality"}


def _digest(ids: Iterable[str]) -> str:
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:12]


def _dup_target(reason: str) -> str | None:
    parts = reason.replace(":", " ").split()
    return parts[1] if len(parts) > 1 else None


def plan_items(
    faces: Sequence[Row],
    *,
    thresholds: PolicyThresholds,
    max_grid_faces: int = 24,
    quality: QualitySettings | None = None,
) -> tuple[list[ReviewItem], dict[str, int]]:
    """Review items for every status=review face whose reason has a task kind.

    Returns the items and counts of review faces not pushed, by reason code. Deterministic:
    the same faces give the same keys, so pushing twice asks nothing twice, and a key is
    planned at most once (two faces asking the same question share one item).
    """
    qs = quality or QualitySettings()
    by_id = {r["face_id"]: r for r in faces}
    by_identity: dict[str, list[Row]] = defaultdict(list)
    by_subject: dict[str, list[Row]] = defaultdict(list)
    for r in faces:
        if r.get("identity_id"):
            by_identity[r["identity_id"]].append(r)
        if r.get("source_kind") == "idcard":
            by_subject[r["source_group"]].append(r)

    items: list[ReviewItem] = []
    skipped: dict[str, int] = defaultdict(int)
    cluster_suspects: dict[str, list[Row]] = defaultdict(list)
    dup_pairs: dict[tuple[str, str], list[Row]] = defaultdict(list)

    for r in faces:
        if r.get("status") != REVIEW:
            continue
        code = row_reason_code(r)
        kind = task_kind_for_code(code)
        if kind == TaskKind.QUALITY_CHECK and not _quality_only(r):
            kind = TaskKind.CLUSTER_CHECK  # a poor crop and another doubt: does it belong?
        if kind == TaskKind.IDCARD_PAIR:
            subject = r["source_group"]
            group = by_subject[subject]
            id_faces = [f for f in group if f.get("role") == ROLE_ID]
            if r.get("role") == ROLE_ID:
                partners = sorted(
                    (f for f in group if f.get("role") == ROLE_LIVE),
                    key=lambda f: -(f.get("score") or 0.0),
                )
                if not partners:
                    skipped["idcard_review_no_live"] += 1
                    continue
                id_face, live = r, partners[0]
            else:
                if not id_faces:
                    skipped["idcard_review_no_id"] += 1
                    continue
                id_face = max(id_faces, key=lambda f: f.get("det_score") or 0.0)
                live = r
            items.append(
                ReviewItem(
                    kind=TaskKind.IDCARD_PAIR,
                    key=f"idcard_pair:{subject}:{id_face['face_id']}:{live['face_id']}",
                    face_ids=(r["face_id"],),
                    shown=(id_face["face_id"], live["face_id"]),
                    proposal=SAME
                    if (r.get("score") or 0.0) >= thresholds.idcard_review
                    else DIFFERENT,
                    score=confidence(r.get("score"), thresholds.idcard_review),
                    identity_ids=tuple(x for x in [id_face.get("identity_id")] if x),
                    subject=subject,
                    evidence=r.get("score"),
                    reason=r.get("reason") or ""
                    if code in (DUPLICATE_CLAIM, SEVERAL_ID_PHOTOS)
                    else "",
                )
            )
        elif kind == TaskKind.QUALITY_CHECK and r.get("identity_id"):
            refs = sorted(
                (
                    f
                    for f in by_identity[r["identity_id"]]
                    if f.get("status") in (AUTO, HUMAN) and f["face_id"] != r["face_id"]
                ),
                key=lambda f: (-(f.get("quality") or 0.0), f["face_id"]),
            )[:QUALITY_REFERENCES]
            proposal, conf = quality_proposal(r.get("quality"), qs)
            items.append(
                ReviewItem(
                    kind=TaskKind.QUALITY_CHECK,
                    key=f"quality_check:{r['face_id']}",
                    face_ids=(r["face_id"],),
                    shown=(r["face_id"], *(f["face_id"] for f in refs)),
                    proposal=proposal,
                    score=conf,
                    identity_ids=(r["identity_id"],),
                    evidence=r.get("quality"),
                )
            )
        elif kind == TaskKind.CLUSTER_CHECK and r.get("identity_id"):
            cluster_suspects[r["identity_id"]].append(r)
        elif kind == TaskKind.DUPLICATE and r.get("identity_id") and _dup_target(r["reason"]):
            a, b = sorted((r["identity_id"], _dup_target(r["reason"]) or ""))
            dup_pairs[(a, b)].append(r)
        else:
            skipped[code or "no_reason"] += 1

    for identity, asked in sorted(cluster_suspects.items()):
        asked = sorted(asked, key=lambda f: (f.get("score") or 0.0, f["face_id"]))
        asked = asked[:max_grid_faces]
        members = sorted(
            (f for f in by_identity[identity] if f.get("status") in (AUTO, HUMAN)),
            key=lambda f: (-(f.get("quality") or 0.0), f["face_id"]),
        )[: max(0, max_grid_faces - len(asked))]
        asked_ids = tuple(f["face_id"] for f in asked)
        # Pre-marked: only the faces the model believes are someone else (similarity to the
        # identity below ``outlier``, or a smaller face of a photo whose larger face is the
        # identity's: ``same_photo``); a face asked about for another doubt (small or mixed
        # identity, poor crop, a lone face near the identity) is proposed as belonging.
        marked = tuple(
            f["face_id"]
            for f in asked
            if (f.get("score") is not None and f["score"] < thresholds.outlier)
            or row_reason_code(f) == SAME_PHOTO
        )
        sims = [f.get("score") for f in asked]
        # Suspects are shown among the members, not first, so the grid does not give the answer
        # away; the order is still deterministic.
        shown = tuple(sorted(asked_ids + tuple(f["face_id"] for f in members)))
        items.append(
            ReviewItem(
                kind=TaskKind.CLUSTER_CHECK,
                key=f"cluster_check:{identity}:{_digest(asked_ids)}",
                face_ids=asked_ids,
                shown=shown,
                proposal=REMOVE_MARKED if marked else CONFIRM,
                # The hardest face decides how hard the task is.
                score=min(confidence(s, thresholds.outlier) for s in sims),
                identity_ids=(identity,),
                suspects=marked,
                evidence=min((s for s in sims if s is not None), default=None),
            )
        )

    half = max(1, max_grid_faces // 2)
    for (a, b), rows in sorted(dup_pairs.items()):
        ranked = [
            sorted(
                by_identity.get(ident, []), key=lambda f: (-(f.get("quality") or 0.0), f["face_id"])
            )
            for ident in (a, b)
        ]
        if not all(ranked):
            # A look-alike with no faces left (`faceloop forget` took them since the last
            # label run, which decides these faces again): nothing to compare them with. The
            # task showed one identity's crop on both sides, and "same person" made its faces
            # human.
            for f in rows:
                skipped[row_reason_code(f) or "no_reason"] += 1
            continue
        # The same number from each identity: the task shows the first half of ``shown`` as
        # identity a and the second half as b, so unequal samples would put a's faces under b.
        k = min(half, max(1, min(len(m) for m in ranked)))
        sample: list[str] = [f["face_id"] for m in ranked for f in m[:k]]
        items.append(
            ReviewItem(
                kind=TaskKind.DUPLICATE,
                key=f"duplicate:{a}:{b}",
                face_ids=tuple(sorted(f["face_id"] for f in rows)),
                shown=tuple(sample),
                proposal=SAME,
                score=confidence(max((f.get("score") or 0.0) for f in rows), thresholds.duplicate),
                identity_ids=(a, b),
                evidence=max((f.get("score") or 0.0) for f in rows),
            )
        )
    # Faces that name an ID of a face no longer present cannot be shown.
    items = [i for i in items if all(s in by_id for s in i.shown)]
    return _one_per_key(items), dict(skipped)


def _refused_with_a_live(row: Row) -> bool:
    """An ID face an ID-pair answer rejected with one of its subject's live photos (different
    person, not usable)."""
    return row.get("status") == REJECTED and row_reason_code(row) in (
        f"{HUMAN_PREFIX}{DIFFERENT}",
        f"{HUMAN_PREFIX}{NOT_USABLE}",
    )


def _one_per_key(items: Sequence[ReviewItem]) -> list[ReviewItem]:
    """One item per key: an ID face and its best live face both in review ask the same
    question (``idcard_pair:<subject>:<id>:<live>``); the one item settles both faces."""
    out: dict[str, ReviewItem] = {}
    for i in items:
        if i.key in out:
            first = out[i.key]
            fids = tuple(sorted(set(first.face_ids) | set(i.face_ids)))
            out[i.key] = replace(first, face_ids=fids)
        else:
            out[i.key] = i
    return list(out.values())


@dataclass(frozen=True)
class Answer:
    """One completed annotation, normalised. ``marked`` are face ids the annotator marked as
    not belonging (cluster_check)."""

    task_key: str
    kind: TaskKind
    annotation_id: int
    annotator: str
    updated_at: str  # ISO-8601, sortable
    decision: str
    marked: tuple[str, ...] = ()
    cancelled: bool = False
    # When Label Studio made the annotation: with ``annotation_id``, what tells two annotations
    # apart (Label Studio numbers them again from 1 on a fresh database). "" when unknown.
    created_at: str = ""


@dataclass(frozen=True)
class Resolution:
    """What to do with one task: ``decision`` None means a conflict that was not applied."""

    task_key: str
    kind: TaskKind
    decision: str | None
    marked: tuple[str, ...]
    annotators: tuple[str, ...]
    conflict: bool = False
    annotation_ids: tuple[int, ...] = ()
    # A conflict not applied: the faces the answers disagree about (a cluster check's faces
    # marked by some answers and not others); empty: every face the task settles.
    disputed: tuple[str, ...] = ()


def resolve(answers: Iterable[Answer], rule: str = "new_task") -> list[Resolution]:
    """Combine each task's answers into one resolution.

    Skipped (cancelled) annotations do not count. Answers agree when decision and marked faces
    are equal. On disagreement: rule ``new_task`` applies nothing and flags ``conflict`` (the
    bridge then asks again in a fresh task that shows the disagreement, and only that task's
    answer is applied); rule ``latest`` applies the most recently updated answer.
    """
    by_task: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        if not a.cancelled and a.decision:
            by_task[a.task_key].append(a)
    out: list[Resolution] = []
    for key, group in sorted(by_task.items()):
        group.sort(key=lambda a: (a.updated_at, a.annotation_id))
        opinions = {(a.decision, tuple(sorted(a.marked))) for a in group}
        annotators = tuple(sorted({a.annotator for a in group}))
        ids = tuple(a.annotation_id for a in group)
        if len(opinions) == 1 or rule == "latest":
            last = group[-1]
            out.append(
                Resolution(
                    key,
                    last.kind,
                    last.decision,
                    tuple(sorted(last.marked)),
                    # The latest of conflicting answers is its annotator's alone.
                    annotators if len(opinions) == 1 else (last.annotator,),
                    conflict=len(opinions) > 1,
                    annotation_ids=ids,
                )
            )
        else:
            marks = [set(m) for _, m in opinions]
            disputed = set[str]().union(*marks) - marks[0].intersection(*marks[1:])
            out.append(
                Resolution(
                    key,
                    group[0].kind,
                    None,
                    (),
                    annotators,
                    conflict=True,
                    annotation_ids=ids,
                    disputed=tuple(sorted(disputed)),
                )
            )
    return out


@dataclass
class ApplyReport:
    """Counts of one apply: faces settled per task key, and totals by outcome."""

    settled: dict[str, int] = field(default_factory=dict)
    human: int = 0
    rejected: int = 0
    removed_from_identity: int = 0
    merged_identities: int = 0
    conflicts: int = 0
    # Faces this apply took out of the dataset (status review) while their answers conflict.
    held: int = 0
    propagated: int = 0
    # Faces an answer left alone because a person has since put them in another identity
    # (an older task answered after a newer one about the same faces).
    stale: int = 0


def _set_reason(row: Row, why: Reason) -> None:
    row["reason"], row["reason_code"] = why.text, why.code


def _refiled(live: Row, id_face: Row | None) -> bool:
    """The live face of an ID-pair question sits in another subject than its ID face now (its
    photo was moved to another subject's folder, tasks.label.refile_faces)."""
    return id_face is not None and live.get("source_group") != id_face.get("source_group")


def _human(row: Row, why: Reason, run_id: str, identity: str | None = ...) -> None:  # type: ignore[assignment]
    row["status"] = HUMAN
    _set_reason(row, why)
    row["labelled_run_id"] = run_id
    if identity is not ...:
        row["identity_id"] = identity


def apply_resolutions(
    faces: list[Row],
    items: Mapping[str, ReviewItem],
    resolutions: Iterable[Resolution],
    *,
    run_id: str,
) -> tuple[set[str], ApplyReport]:
    """Apply resolutions to ``faces`` in place; returns the changed face ids and a report.

    ``items`` maps task key → the item that was pushed. Rules: labels become status=human with
    ``human_<decision>`` as reason; rejections set status=rejected with a ``human_`` reason;
    "same person" merges the smaller identity into the larger (ties: smaller id); marked
    outliers leave the identity (status human, identity_id None: a person said "not this one",
    so no automatic run may re-attach them). Idempotent: applying twice changes nothing more.
    """
    report = ApplyReport()
    changed: set[str] = set()
    by_id = {r["face_id"]: r for r in faces}
    before = {
        fid: (r.get("status"), r.get("reason"), r.get("identity_id")) for fid, r in by_id.items()
    }
    touched_by_key: dict[str, set[str]] = {}
    held: set[str] = set()  # faces taken out of the dataset while their answers conflict
    # "Same person" answers merge transitively, whatever order they are applied in: a task
    # about an identity merged away since acts on the identity it is now part of (two answers
    # A=B and C=B made A+B and C, one person in two classes).
    merged_into: dict[str, str] = {}

    def find(ident: str | None) -> str | None:
        seen = set()
        while ident is not None and ident in merged_into and ident not in seen:
            seen.add(ident)
            ident = merged_into[ident]
        return ident

    def became(ident: str | None, shown: Iterable[str]) -> str | None:
        """The identity an answer about ``ident`` acts on: ``ident`` (after the answers'
        merges) while one of the ``shown`` faces still carries it; once a refresh merged it
        away (none does), the identity most of those faces are in now. A cluster check of an
        identity merged since confirmed its faces back into the vanished id: one person in
        two classes."""
        ident = find(ident)
        now: Counter[str] = Counter()
        for fid in shown:
            cur = find((by_id.get(fid) or {}).get("identity_id"))
            if cur is not None:
                now[cur] += 1
        if ident is None or ident in now or not now:
            return ident
        return min(now.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    def placed_elsewhere(row: Row, ident: str | None) -> bool:
        """A person put this face in another identity: an answer about ``ident`` (pushed
        before that, answered after it) must not take it back."""
        if row.get("status") != HUMAN or row.get("identity_id") is None:
            return False
        if find(row["identity_id"]) == find(ident):
            return False
        report.stale += 1
        return True

    for res in resolutions:
        item = items.get(res.task_key)
        if item is None:
            continue
        if res.decision is None:
            report.conflicts += 1
            # Out of the dataset until the question asked again is answered: a decision an
            # earlier answer applied (auto or human) stays published otherwise. The human_
            # reason keeps automatic runs off them meanwhile.
            asked = res.disputed if item.kind == TaskKind.CLUSTER_CHECK else item.face_ids
            for fid in asked:
                row = by_id.get(fid)
                # A face still in review is held too: with its automatic reason a refresh or
                # a propagation could label it (and publish it) before the question is answered.
                if row is not None and row.get("status") in (AUTO, HUMAN, REVIEW):
                    row["status"] = REVIEW
                    _set_reason(
                        row,
                        Reason(
                            f"{HUMAN_PREFIX}conflict",
                            f"annotators disagree ({', '.join(res.annotators)}): asked again",
                        ),
                    )
                    row["labelled_run_id"] = run_id
                    held.add(fid)
            continue
        who = ",".join(res.annotators)
        touched: set[str] = set()
        if item.kind == TaskKind.IDCARD_PAIR:
            id_face = by_id.get(item.shown[0])
            ident = (id_face or {}).get("identity_id")
            for fid in item.face_ids:
                row = by_id.get(fid)
                if row is None:
                    continue
                if fid != item.shown[0] and _refiled(row, id_face):
                    # The live photo was moved to another subject's folder since: the answer
                    # compared it with an ID photo that is no longer its subject's.
                    report.stale += 1
                    continue
                if res.decision == SAME:
                    same = Reason(f"{HUMAN_PREFIX}same_person", f"ID and live match (by {who})")
                    _human(row, same, run_id, ident or row.get("identity_id"))
                    if id_face is not None and (
                        id_face.get("status") == REVIEW or _refused_with_a_live(id_face)
                    ):
                        # (Refused with another live photo: this one matches the ID photo.)
                        _human(id_face, same, run_id)
                        touched.add(id_face["face_id"])
                elif fid == item.shown[0] and row.get("status") == HUMAN:
                    # The ID face, which a live photo of its subject matched (another pair's
                    # answer): this live photo is not the holder, the ID photo still is. The
                    # answers are applied in task-key order: without this the ID face ended
                    # rejected or confirmed by which pair's key sorted last.
                    continue
                else:
                    row["status"] = REJECTED
                    _set_reason(
                        row, Reason(f"{HUMAN_PREFIX}{res.decision}", f"ID vs live (by {who})")
                    )
                    row["labelled_run_id"] = run_id
                touched.add(fid)
        elif item.kind == TaskKind.CLUSTER_CHECK:
            identity = became(item.identity_ids[0], item.shown)
            marked = set(res.marked) if res.decision == REMOVE_MARKED else set()
            for fid in item.shown:
                row = by_id.get(fid)
                if row is None or placed_elsewhere(row, identity):
                    continue
                if fid in marked:
                    _human(
                        row,
                        Reason(
                            f"{HUMAN_PREFIX}not_in_identity", f"removed from {identity} (by {who})"
                        ),
                        run_id,
                        None,
                    )
                    touched.add(fid)
                elif fid in item.face_ids or find(row.get("identity_id")) == identity:
                    # Shown and not marked: the annotator confirmed it belongs.
                    _human(
                        row,
                        Reason(f"{HUMAN_PREFIX}confirmed", f"belongs to {identity} (by {who})"),
                        run_id,
                        identity,
                    )
                    touched.add(fid)
        elif item.kind == TaskKind.QUALITY_CHECK:
            proposed = became(item.identity_ids[0], item.shown[1:]) if item.identity_ids else None
            for fid in item.face_ids:
                row = by_id.get(fid)
                if row is None or (proposed is not None and placed_elsewhere(row, proposed)):
                    continue
                if res.decision == USABLE:
                    why = Reason(f"{HUMAN_PREFIX}usable", f"usable as {proposed} (by {who})")
                    _human(row, why, run_id, proposed or row.get("identity_id"))
                elif res.decision == DIFFERENT:
                    why = Reason(f"{HUMAN_PREFIX}not_in_identity", f"not {proposed} (by {who})")
                    _human(row, why, run_id, None)
                else:
                    row["status"] = REJECTED
                    _set_reason(row, Reason(f"{HUMAN_PREFIX}not_usable", f"poor crop (by {who})"))
                    row["labelled_run_id"] = run_id
                touched.add(fid)
        elif item.kind == TaskKind.DUPLICATE:
            a, b = (find(i) or i for i in item.identity_ids)
            if res.decision == SAME:
                count: defaultdict[str, int] = defaultdict(int)
                for r in faces:
                    if r.get("identity_id") in (a, b):
                        count[r["identity_id"]] += 1
                keep, drop = sorted((a, b), key=lambda i: (-count[i], i))
                merged = Reason(
                    f"{HUMAN_PREFIX}same_person", f"{drop} merged into {keep} (by {who})"
                )
                if drop != keep:
                    merged_into[drop] = keep
                    for r in faces:
                        if r.get("identity_id") == drop:
                            r["identity_id"] = keep
                            r["labelled_run_id"] = run_id
                            touched.add(r["face_id"])
                            if r.get("status") == REVIEW or r["face_id"] in item.face_ids:
                                _human(r, merged, run_id)
                for fid in item.face_ids:
                    r = by_id[fid]
                    if find(r.get("identity_id")) not in (keep, None):
                        report.stale += 1  # a person has put it in a third identity since
                        continue
                    _human(r, merged, run_id)
                    touched.add(fid)
                if drop != keep and count[drop]:
                    report.merged_identities += 1
            else:
                for fid in item.face_ids:
                    row = by_id.get(fid)
                    if row is not None:
                        _human(
                            row,
                            Reason(f"{HUMAN_PREFIX}different_people", f"{a} and {b} (by {who})"),
                            run_id,
                        )
                        touched.add(fid)
        touched_by_key[res.task_key] = touched

    for key, touched in touched_by_key.items():
        real = {
            f
            for f in touched
            if (by_id[f].get("status"), by_id[f].get("reason"), by_id[f].get("identity_id"))
            != before[f]
        }
        changed |= real
        report.settled[key] = len(real)
    held = {
        f
        for f in held
        if (by_id[f]["status"], by_id[f]["reason"], by_id[f].get("identity_id")) != before[f]
    }
    changed |= held
    report.held = len(held)
    for fid in changed:
        row = by_id[fid]
        if row["status"] == HUMAN and row.get("identity_id"):
            report.human += 1
        elif row["status"] == HUMAN:
            report.removed_from_identity += 1
        elif row["status"] == REJECTED:
            report.rejected += 1
    return changed, report


def propagate(
    faces: list[Row],
    changed: set[str],
    *,
    attach: float,
    min_quality: float,
    run_id: str,
    settled_by: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Re-evaluate waiting faces after corrections; returns faces settled per source.

    For every identity that gained a human-confirmed face in ``changed``, the centroid of its
    human-confirmed faces is compared with each status=review face that has no open question
    of its own kind (reason without a task kind, or outlier of this identity); a face with
    cosine similarity >= ``attach`` and quality >= ``min_quality`` joins that identity with
    status ``auto`` and a ``propagated:`` reason. ``settled_by`` maps face id → task key for
    attribution (defaults to the identity). Faces in ``changed`` are left alone.
    """
    by_id = {r["face_id"]: r for r in faces}
    identities = {
        by_id[f]["identity_id"]
        for f in changed
        if by_id[f].get("status") == HUMAN and by_id[f].get("identity_id")
    }
    if not identities:
        return {}
    centroids: dict[str, np.ndarray] = {}
    for ident in sorted(identities):
        embs = [
            r["embedding"]
            for r in faces
            if r.get("identity_id") == ident
            and r.get("status") == HUMAN
            and r.get("embedding") is not None
        ]
        if embs:
            c = np.asarray(embs, dtype=np.float32).mean(axis=0)
            n = float(np.linalg.norm(c))
            if n > 0:
                centroids[ident] = c / n
    if not centroids:
        return {}
    names = list(centroids)
    mat = np.stack([centroids[n] for n in names])
    source: dict[str, str] = {}
    for fid in changed:
        ident = by_id[fid].get("identity_id")
        if ident in centroids:
            source.setdefault(ident, (settled_by or {}).get(fid, ident))
    counts: dict[str, int] = defaultdict(int)
    for r in faces:
        if r["face_id"] in changed or r.get("status") != REVIEW or r.get("embedding") is None:
            continue
        if task_kind_for_code(row_reason_code(r)) in (TaskKind.IDCARD_PAIR, TaskKind.DUPLICATE):
            continue  # these wait for their own question
        if is_human(r):
            continue  # held by people (annotators who disagree): their question decides it
        if (r.get("quality") or 0.0) < min_quality:
            continue
        emb = np.asarray(r["embedding"], dtype=np.float32)
        norm = float(np.linalg.norm(emb))
        if norm == 0:
            continue
        sims = mat @ (emb / norm)
        best = int(np.argmax(sims))
        if float(sims[best]) >= attach:
            ident = names[best]
            r["status"] = AUTO
            r["identity_id"] = ident
            r["score"] = float(sims[best])
            _set_reason(
                r,
                Reason(
                    "propagated",
                    f"similarity {sims[best]:.2f} >= {attach:.2f} to human-confirmed {ident}",
                ),
            )
            r["labelled_run_id"] = run_id
            counts[source.get(ident, ident)] += 1
    return dict(counts)
