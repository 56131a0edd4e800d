"""One review round answered from the truth: what the human loop adds to `faceloop eval`.

`faceloop eval`'s figures are the automatic labeller's. A team that runs faceloop also answers
its review queue in Label Studio; this module measures what one round of correct answers adds,
and what it costs in tasks, through the review code itself (annotate/review.py): the tasks
``plan_items`` makes of the faces in review (what ``faceloop review push`` would send), one
answer per task, ``resolve``, ``apply_resolutions`` and ``propagate`` with the thresholds the
refresh used. Only the answers are simulated.

The simulated annotator knows what the benchmark's truth knows: the person of each truth
image's scored face (the face nearest its centre, :func:`evaluation.metrics.central_faces`).
An identity's person is the most common known person among its labelled faces (among all its
faces when none of those is known). Per task kind:

- ``idcard_pair``: same person when the ID face's and the live face's persons are known and
  equal; different otherwise (a face nobody can vouch for is not accepted).
- ``cluster_check``: every shown face whose person is known and not the identity's is marked
  as not belonging, and so is every *asked* face whose person is unknown (a background face
  is not confirmed on a guess); unknown faces that were already members stay. No answer when
  the identity has no known person.
- ``quality_check``: usable when the face is the identity's person, different person when it
  is someone else, not usable when its person is unknown.
- ``duplicate``: same person when both identities' persons are known and equal, different
  when both are known and differ; no answer otherwise.

Pure: faces in, faces out (copies), no I/O.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from annotate import review as rv
from faceloop.schema import AUTO, HUMAN
from faceloop.vocab import TaskKind

ANNOTATOR = "simulated"
# The faces-table columns the round reads: what planning reads, and the embeddings propagation
# compares.
COLUMNS: tuple[str, ...] = (*rv.PLAN_COLUMNS, "embedding")


@dataclass
class ReviewRound:
    """What one simulated round asked and changed."""

    faces: list[dict]  # the faces after the round (copies of the input rows)
    tasks: int = 0
    tasks_by_kind: dict[str, int] = field(default_factory=dict)
    unanswerable: int = 0  # tasks the truth cannot answer (left open)
    not_pushed: int = 0  # review faces without a task kind (they wait)
    faces_settled: int = 0  # faces the answers changed
    propagated: int = 0  # waiting faces settled by propagation after the answers

    def summary(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "tasks_by_kind": dict(sorted(self.tasks_by_kind.items())),
            "unanswerable": self.unanswerable,
            "not_pushed": self.not_pushed,
            "faces_settled": self.faces_settled,
            "propagated": self.propagated,
        }


def face_persons(
    faces: Sequence[Mapping[str, Any]], truth_images: Mapping[str, dict], root: str
) -> dict[str, str]:
    """face id -> truth person, for the scored face of every truth image that has one."""
    from evaluation.metrics import central_faces

    central, _ = central_faces(faces, truth_images, root)
    return {
        c["face_id"]: truth_images[rel]["person"]
        for rel, c in central.items()
        if c is not None and truth_images[rel].get("person") is not None
    }


def _identity_persons(faces: Sequence[Mapping[str, Any]], person: Mapping[str, str]) -> dict:
    """identity -> the most common known person among its labelled (auto or human) faces, or
    among all its faces when none of those is known: a face merely proposed for an identity
    (in review) does not decide who the identity is while its members can."""
    members: dict[str, Counter[str]] = defaultdict(Counter)
    proposed: dict[str, Counter[str]] = defaultdict(Counter)
    for f in faces:
        ident, p = f.get("identity_id"), person.get(f["face_id"])
        if ident and p is not None:
            (members if f.get("status") in (AUTO, HUMAN) else proposed)[ident][p] += 1
    return {
        ident: (members.get(ident) or proposed[ident]).most_common(1)[0][0]
        for ident in {*members, *proposed}
    }


def answer(
    item: rv.ReviewItem, person: Mapping[str, str], identity_person: Mapping[str, str]
) -> tuple[str, tuple[str, ...]] | None:
    """The decision (and marked faces) an annotator who knows ``person`` gives ``item``; None
    when the truth cannot answer it (see the module docstring)."""
    if item.kind == TaskKind.IDCARD_PAIR:
        p_id, p_live = (person.get(f) for f in item.shown[:2])
        same = p_id is not None and p_id == p_live
        return (rv.SAME if same else rv.DIFFERENT), ()
    if item.kind == TaskKind.CLUSTER_CHECK:
        target = identity_person.get(item.identity_ids[0])
        if target is None:
            return None
        asked = set(item.face_ids)
        marked = tuple(
            f
            for f in item.shown
            if (person.get(f) is not None and person[f] != target)
            or (f in asked and person.get(f) is None)
        )
        return (rv.REMOVE_MARKED if marked else rv.CONFIRM), marked
    if item.kind == TaskKind.QUALITY_CHECK:
        target = identity_person.get(item.identity_ids[0]) if item.identity_ids else None
        p = person.get(item.face_ids[0])
        if p is None:
            return rv.NOT_USABLE, ()
        return (rv.USABLE if p == target else rv.DIFFERENT), ()
    if item.kind == TaskKind.DUPLICATE:
        a, b = (identity_person.get(i) for i in item.identity_ids)
        if a is None or b is None:
            return None
        return (rv.SAME if a == b else rv.DIFFERENT), ()
    return None


def review_round(
    faces: Sequence[Mapping[str, Any]],
    person: Mapping[str, str],
    settings: Any,
    run_id: str = "simulated-review",
) -> ReviewRound:
    """Plan the review tasks of ``faces`` (faces-table rows with the review columns and
    embeddings), answer each from ``person``, apply the answers and propagate, as
    ``faceloop review pull`` would with those answers. ``settings``: the refresh's Settings."""
    rows = [dict(f) for f in faces]
    items, skipped = rv.plan_items(
        rows,
        thresholds=settings.thresholds,
        max_grid_faces=settings.review.max_grid_faces,
        quality=settings.quality,
    )
    out = ReviewRound(faces=rows, tasks=len(items), not_pushed=sum(skipped.values()))
    out.tasks_by_kind = dict(Counter(str(i.kind) for i in items))
    ident_person = _identity_persons(rows, person)
    answers: list[rv.Answer] = []
    for n, item in enumerate(items):
        got = answer(item, person, ident_person)
        if got is None:
            out.unanswerable += 1
            continue
        decision, marked = got
        answers.append(
            rv.Answer(item.key, item.kind, n, ANNOTATOR, "1970-01-01T00:00:00", decision, marked)
        )
    changed, _ = rv.apply_resolutions(
        rows, {i.key: i for i in items}, rv.resolve(answers), run_id=run_id
    )
    out.faces_settled = len(changed)
    propagated = rv.propagate(
        rows,
        changed,
        attach=settings.thresholds.attach,
        min_quality=settings.quality.auto_min_quality,
        run_id=run_id,
    )
    out.propagated = sum(propagated.values())
    return out
