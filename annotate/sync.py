"""Push review items to Label Studio and pull the answers back into the faces table.

Promises: :func:`push_review` turns every status=review face that has a task kind into one
Label Studio task, once (idempotent by item key, an interrupted push is repaired on the next
one); :func:`pull_and_apply` records every new annotation verbatim, then re-applies *all*
recorded answers to the faces (so a human decision outlives an automatic run that touched the
face), propagates, writes only the source groups that changed, and re-asks conflicting tasks
under rule ``new_task``. Both are safe to re-run any number of times; a failure leaves the store
consistent (the pull cursor moves only after the answers are stored).

Plain functions (no Prefect): flows/review.py and the CLI call them. The rules are in
:mod:`annotate.review`, the payloads in :mod:`annotate.render`, the HTTP in
:mod:`annotate.client`, the records in :mod:`annotate.records`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from annotate import review as rv
from annotate.client import ReviewClient, sdk_id
from annotate.records import (
    all_answers,
    annotation_key,
    answer_row,
    item_from_record,
    new_tasks_file,
    now,
    read_applied,
    read_state,
    read_task_records,
    record_applied,
    recorded_answer_versions,
    task_record,
    write_answers,
    write_state,
    write_task_records,
)
from annotate.render import KEY_FIELD, build_task, parse_annotation
from faceloop.config import Settings
from storage import layout
from storage.objectstore import ObjectStore
from storage.secret import pseudonym

log = logging.getLogger(__name__)


def conflict_key(key: str, round_: int) -> str:
    """Key of the fresh task that re-asks a question after conflicting answers."""
    return f"{key.split('#', 1)[0]}#round{round_}"


def _load_crops(store: ObjectStore, face_ids: set[str]) -> dict[str, bytes]:
    """The aligned JPEG crop of each of ``face_ids`` that has one."""
    from storage.tables import iter_faces

    crops: dict[str, bytes] = {}
    for t in iter_faces(store, columns=["face_id", "aligned_jpeg"]):
        crops.update(
            {
                f: j
                for f, j in zip(
                    t.column("face_id").to_pylist(),
                    t.column("aligned_jpeg").to_pylist(),
                    strict=False,
                )
                if f in face_ids and j
            }
        )
    return crops


# -- push -----------------------------------------------------------------------------------


def ls_key(store: ObjectStore, key: str) -> str:
    """The task key Label Studio sees: a pseudonym of the item key (which names the subject)."""
    return pseudonym(store, "task", key)


def ls_item(store: ObjectStore, item: rv.ReviewItem) -> rv.ReviewItem:
    """``item`` as Label Studio may see it: crops only, no subject or identity ids. The key,
    the subject and the identity ids (an ID subject's identity is its subject id) become store
    pseudonyms (storage/secret.py); the store's task records keep the real ones."""
    from dataclasses import replace

    return replace(
        item,
        key=ls_key(store, item.key),
        subject=pseudonym(store, "subject", item.subject) if item.subject else None,
        identity_ids=tuple(pseudonym(store, "identity", i) for i in item.identity_ids),
    )


@dataclass
class PushResult:
    created: int = 0
    already_pushed: int = 0
    repaired: int = 0
    # Tasks recorded as pushed that Label Studio no longer has, pushed again.
    pushed_again: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    not_pushed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def task_counts(client: ReviewClient, projects: Iterable[int | None]) -> dict[int, int | None]:
    """Each recorded project's task count in Label Studio; None for a project it no longer
    has (deleted in its UI, or a Label Studio with a new database). One request per project."""
    return {p: client.project_task_count(p) for p in sorted({p for p in projects if p is not None})}


def _lost_tasks(
    client: ReviewClient, confirmed: Sequence[Mapping[str, Any]], counts: Mapping[int, int | None]
) -> set[str]:
    """Keys whose recorded task Label Studio no longer has: every key of a project that is
    gone, and in a project holding fewer tasks than were recorded for it (tasks deleted, or a
    new database whose project got the old id) the keys whose task id it does not list."""
    by_project: dict[int, list[Mapping[str, Any]]] = {}
    for r in confirmed:
        by_project.setdefault(r["project_id"], []).append(r)
    lost: set[str] = set()
    for project, rs in by_project.items():
        held = counts.get(project)
        if held is None:
            lost |= {r["key"] for r in rs}
        elif held < len(rs):
            there = client.task_ids(project)
            lost |= {r["key"] for r in rs if r["task_id"] not in there}
    return lost


def _reused_ids(
    client: ReviewClient,
    store: ObjectStore,
    confirmed: Sequence[Mapping[str, Any]],
    counts: Mapping[int, int | None],
) -> set[str]:
    """Keys whose recorded task id another key's task holds now: Label Studio gives a deleted
    task's id to the next task it creates, so a lost task (a re-asked conflict deleted in its
    UI) looked present once another question was pushed into its id, and was never asked
    again. Only ids two keys claim are looked up (by key, one query per key)."""
    claims: dict[tuple[int, int], list[Mapping[str, Any]]] = {}
    for r in confirmed:
        claims.setdefault((r["project_id"], r["task_id"]), []).append(r)
    lost: set[str] = set()
    for (project, tid), rs in claims.items():
        if len(rs) < 2 or counts.get(project) is None:
            continue
        shown = {ls_key(store, r["key"]): r["key"] for r in rs}
        found = client.task_ids_for_keys(project, shown)
        lost |= {key for lk, key in shown.items() if found.get(lk) != tid}
    return lost


def _repair_unconfirmed(
    client: ReviewClient, store: ObjectStore, unconfirmed: Sequence[Mapping[str, Any]]
) -> set[str]:
    """Keys recorded as importing whose batch may or may not have reached Label Studio: look
    them up there, record the ids of those found, and return their keys."""
    by_project: dict[int, list[Mapping[str, Any]]] = {}
    for r in unconfirmed:
        by_project.setdefault(r["project_id"], []).append(r)
    fixed: list[dict[str, Any]] = []
    for project, rs in by_project.items():
        shown = {ls_key(store, r["key"]): r["key"] for r in rs}
        found = {shown.get(k, k): v for k, v in client.task_ids_for_keys(project, shown).items()}
        # Pushed before keys were pseudonymised: the raw key.
        found.update(
            client.task_ids_for_keys(project, [r["key"] for r in rs if r["key"] not in found])
        )
        fixed += [{**r, "task_id": found[r["key"]]} for r in rs if r["key"] in found]
    if fixed:
        write_task_records(store, new_tasks_file("repair-"), fixed)
    return {r["key"] for r in fixed}


def _push_batch(
    client: ReviewClient,
    store: ObjectStore,
    project: int,
    batch: Sequence[rv.ReviewItem],
    crops: Mapping[str, bytes],
    model_version: str,
) -> None:
    """Record ``batch`` as importing, import it, record it again with the task ids."""
    at = now()
    rel = new_tasks_file()
    write_task_records(
        store, rel, [task_record(i, project, None, model_version, at) for i in batch]
    )
    ids = client.import_tasks(
        project, [build_task(ls_item(store, i), crops, model_version) for i in batch]
    )
    write_task_records(
        store,
        rel,
        [
            task_record(i, project, tid, model_version, at)
            for i, tid in zip(batch, ids, strict=False)
        ],
    )


def push_items(
    client: ReviewClient,
    store: ObjectStore,
    items: Sequence[rv.ReviewItem],
    model_version: str,
) -> PushResult:
    """Create one task per item whose key was never pushed, or whose task Label Studio no
    longer has; idempotent. Only the crops of the tasks created are read.

    Each batch is recorded in the store *before* the import (task ids null) and again after
    it, so an interrupted push is repaired on the next call instead of duplicating tasks.
    Tasks go to this store's own projects (titles carry :func:`storage.identity.store_scope`):
    the records that make a push idempotent are per store, so a project shared by two stores
    could hold one key twice.
    """
    from storage.identity import store_scope

    t0 = time.monotonic()
    scope = store_scope(store)
    result = PushResult()
    records = read_task_records(store).to_pylist()
    confirmed = [r for r in records if r["task_id"] is not None]
    counts = task_counts(client, (r["project_id"] for r in records))
    lost = _lost_tasks(client, confirmed, counts) | _reused_ids(client, store, confirmed, counts)
    done = {r["key"] for r in confirmed} - lost
    unconfirmed = [
        r for r in records if r["task_id"] is None and counts.get(r["project_id"]) is not None
    ]
    if unconfirmed:
        repaired = _repair_unconfirmed(client, store, unconfirmed)
        done |= repaired
        result.repaired = len(repaired)
    todo: list[rv.ReviewItem] = []
    for i in items:  # one task per key, whatever the caller passed
        if i.key not in done:
            done.add(i.key)
            todo.append(i)
    result.already_pushed = len(items) - len(todo)
    crops = _load_crops(store, {f for i in todo for f in i.shown}) if todo else {}
    missing = [i for i in todo if any(f not in crops for f in i.shown)]
    if missing:
        log.warning("%d review items skipped: crops missing", len(missing))
        todo = [i for i in todo if i not in missing]
    result.pushed_again = sum(1 for i in todo if i.key in lost)
    if result.pushed_again:
        log.warning(
            "%d review tasks were no longer in Label Studio (a deleted project, or a Label "
            "Studio with a new database): pushed again; answers given to the old ones are lost",
            result.pushed_again,
        )
    bs = max(1, client.settings.batch_size)
    for kind in rv.TASK_KINDS:
        kind_items = [i for i in todo if i.kind == kind]
        if not kind_items:
            continue
        project = client.ensure_project(kind, scope)
        for start in range(0, len(kind_items), bs):
            batch = kind_items[start : start + bs]
            _push_batch(client, store, project, batch, crops, model_version)
            result.created += len(batch)
            result.by_kind[kind] = result.by_kind.get(kind, 0) + len(batch)
            log.info("pushed %d %s tasks to project %d", len(batch), kind, project)
    result.seconds = time.monotonic() - t0
    return result


def model_version(faces: Iterable[Mapping[str, Any]], config_hash: str) -> str:
    """The prediction's model version: the (first) detection model and the config hash."""
    models = sorted({str(f.get("model")) for f in faces if f.get("model")})
    return f"{models[0] if models else 'faceloop'}|config:{config_hash[:12]}"


def push_review(
    settings: Settings, store: ObjectStore, client: ReviewClient | None = None
) -> PushResult:
    """Every status=review face with a task kind becomes a task (once). See annotate/review.py
    for which reasons map to which kind; the rest are counted in ``not_pushed``."""
    from storage.recovery import refuse_half_labelled
    from storage.tables import faces_generation, read_faces
    from tasks.reembed import judged_as_stored

    refuse_half_labelled(store, "pushing review tasks")
    settings = judged_as_stored(settings, store)
    client = client or ReviewClient(settings.review)
    generation = faces_generation(store)  # before the read: a later write makes it stale
    faces = read_faces(store, columns=rv.PLAN_COLUMNS).to_pylist()
    items, skipped = rv.plan_items(
        faces,
        thresholds=settings.thresholds,
        max_grid_faces=settings.review.max_grid_faces,
        quality=settings.quality,
    )
    result = push_items(client, store, items, model_version(faces, settings.config_hash()))
    result.not_pushed = skipped
    store.write_bytes(layout.REVIEW_PUSHED, generation.encode())
    return result


def review_pushed_current(store: ObjectStore) -> bool:
    """Whether Label Studio has a task for every face in review as the faces are now: the last
    successful push read this faces generation."""
    from storage.tables import faces_generation

    try:
        pushed = store.read_bytes(layout.REVIEW_PUSHED).decode().strip()
    except FileNotFoundError:
        return False
    return pushed == faces_generation(store)


# -- pull -----------------------------------------------------------------------------------


@dataclass
class PullResult:
    answers: list[rv.Answer]
    raw_rows: list[dict[str, Any]]
    cursor: dict[str, str]
    # Recorded projects Label Studio no longer has (skipped).
    projects_gone: list[int] = field(default_factory=list)
    # Label Studio ids of tasks with an answer whose choice the task's kind does not have.
    not_understood: list[int] = field(default_factory=list)
    # Label Studio ids of tasks whose key is not the one pushed with them (data edited).
    edited: list[int] = field(default_factory=list)


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _since(cursor: str | None) -> str | None:
    """The filter bound for a project whose cursor is ``cursor``: 2 s earlier, so a task updated
    during the last pull is not missed, in exactly the format Label Studio's filter parser
    wants (UTC, 'Z')."""
    if not cursor:
        return cursor
    return (_ts(cursor) - timedelta(seconds=2)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pull_answers(client: ReviewClient, store: ObjectStore) -> PullResult:
    """Fetch annotations of tasks changed since the stored cursor (with a 2 s overlap, so a
    task updated during the last pull is not missed; already-recorded answers are dropped).
    Does not move the cursor: :func:`record_pull` does, after the answers are stored."""
    state = read_state(store)
    cursor: dict[str, str] = dict(state.get("cursor", {}))
    rows = read_task_records(store).to_pylist()
    records = {r["key"]: r for r in rows}
    # Tasks carry the pseudonymous key (ls_key); older ones the raw key.
    records.update({ls_key(store, k): r for k, r in list(records.items())})
    # A task is the question the store recorded under its Label Studio id: its data (the key
    # included) is editable by every account, so a key moved onto another task must not carry
    # an answer to that task's faces.
    by_task: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        if r["task_id"] is not None and r["project_id"] is not None:
            by_task.setdefault((int(r["project_id"]), int(r["task_id"])), []).append(r)
    edited: list[int] = []
    seen = recorded_answer_versions(store)
    answers: list[rv.Answer] = []
    raw_rows: list[dict[str, Any]] = []
    counts = task_counts(client, (r["project_id"] for r in records.values()))
    gone = sorted(p for p, n in counts.items() if n is None)
    newly_gone = sorted(set(gone) - set(state.get("projects_gone", [])))
    if newly_gone:  # once; the pull's output lists them every time
        log.warning(
            "Label Studio no longer has project(s) %s: their answers cannot be pulled; "
            "`faceloop review push` pushes the faces still in review again",
            ", ".join(map(str, newly_gone)),
        )
    for p in gone:
        cursor.pop(str(p), None)
    not_understood: list[int] = []
    pulled_at = now()
    for project in (p for p, n in counts.items() if n is not None):
        since = _since(cursor.get(str(project)))
        newest = cursor.get(str(project))
        for task in client.changed_tasks(project, since):
            key = (task.data or {}).get(KEY_FIELD)
            rec = records.get(key)
            # Not declared on the SDK's annotator-role task model; always sent to the owner.
            updated_at = getattr(task, "updated_at", None)
            upd = str(updated_at) if updated_at else None
            if upd and (newest is None or _ts(upd) > _ts(newest)):
                newest = upd
            claimed = by_task.get((project, sdk_id(task.id)), [])
            if claimed and not any(r is rec for r in claimed):
                # Not the key this task was pushed with: the task's own question counts.
                edited.append(sdk_id(task.id))
                rec = claimed[0]
            if rec is None:
                continue
            item = item_from_record(rec)
            key = rec["key"]
            for ann in task.annotations or []:
                ann = ann if isinstance(ann, dict) else ann.dict()
                a = parse_annotation(ann, item, key)
                if (annotation_key(a), a.updated_at) in seen:
                    continue
                if not (a.cancelled or a.decision):
                    # A choice this task kind does not have (a labelling config edited in
                    # Label Studio's UI), faces marked without a verdict: kept verbatim,
                    # applied to nothing.
                    not_understood.append(sdk_id(task.id))
                answers.append(a)
                raw_rows.append(answer_row(a, ann, project, sdk_id(task.id), pulled_at))
        if newest:
            cursor[str(project)] = newest
    if edited:
        log.warning(
            "%d Label Studio tasks carry another key than the one they were pushed with (task "
            "data edited, ids %s): their answers are taken as answers to the questions pushed "
            "as those tasks",
            len(edited),
            ", ".join(map(str, sorted(set(edited))[:20])),
        )
    if not_understood:
        log.warning(
            "%d answers have no choice this task kind knows (Label Studio task ids %s); "
            "they are recorded and not applied",
            len(not_understood),
            ", ".join(map(str, sorted(set(not_understood))[:20])),
        )
    return PullResult(
        answers=answers,
        raw_rows=raw_rows,
        cursor=cursor,
        projects_gone=gone,
        not_understood=sorted(set(not_understood)),
        edited=sorted(set(edited)),
    )


def record_pull(store: ObjectStore, pull: PullResult) -> str | None:
    """Store the answers verbatim, then move the cursor (in that order: nothing is lost)."""
    rel = write_answers(store, pull.raw_rows)
    state = read_state(store)
    state["cursor"] = pull.cursor
    state["projects_gone"] = pull.projects_gone
    write_state(store, state)
    return rel


# -- apply ----------------------------------------------------------------------------------


@dataclass
class ApplyResult:
    new_answers: int
    # Tasks whose answers disagree and whose question asked again has no answer yet (open
    # conflicts, counted at every pull until settled; not this pull's new ones).
    conflicts: int
    report: rv.ApplyReport
    settled_per_answer: dict[str, int]
    propagated: dict[str, int]
    reasked: int
    answers_file: str | None
    # Faces whose status, reason or identity this apply changed: with no new answer, those of
    # answers recorded before (a pull killed half-way, an automatic run that overrode a person).
    faces_changed: int = 0
    projects_gone: list[int] = field(default_factory=list)
    not_understood: list[int] = field(default_factory=list)
    # Label Studio ids of tasks whose data named another task's key (answers taken as the
    # task's own question's).
    edited: list[int] = field(default_factory=list)

    @property
    def publishes(self) -> bool:
        """Whether a dataset version should follow this apply (the pull flow, the CLI and the
        webhook publish on it): new answers, or faces changed by answers recorded before."""
        return bool(self.new_answers or self.faces_changed)


@dataclass
class _Applied:
    """The faces table after applying resolutions, and what it takes to write it back."""

    faces: list[rv.Row]
    schema: pa.Schema
    before: dict[str, tuple[Any, Any, Any]]  # face id → (status, reason, identity_id)
    changed: set[str]
    report: rv.ApplyReport
    settled_by: dict[str, str]  # face id → the task key that settled it


def _read_answers(client: ReviewClient, store: ObjectStore) -> tuple[PullResult, str | None]:
    """Pull new answers and record them (answers first, then the cursor)."""
    pull = pull_answers(client, store)
    return pull, record_pull(store, pull)


def _resolve(store: ObjectStore, rule: str) -> list[rv.Resolution]:
    """Resolve every recorded answer; a conflict is dropped once the question re-asked after it
    has an answer (the original key's conflict is moot). A conflict that the ``latest`` rule
    settled and applied (with these same answers) stays settled under another rule: a switch of
    ``review.conflict_rule`` holds for conflicts to come, it does not take published faces back
    into review."""
    answers = all_answers(store)
    resolutions = rv.resolve(answers, rule)
    if rule != "latest" and any(r.conflict and r.decision is None for r in resolutions):
        applied = read_applied(store)
        settled = {
            (k, tuple(sorted(ids or ())))
            for k, d, c, ids in zip(
                *(
                    applied.column(c).to_pylist()
                    for c in ("task_key", "decision", "conflict", "annotation_ids")
                ),
                strict=True,
            )
            if d and c
        }
        if settled:
            latest = {r.task_key: r for r in rv.resolve(answers, "latest")}
            resolutions = [
                latest[r.task_key]
                if r.conflict
                and r.decision is None
                and (r.task_key, tuple(sorted(r.annotation_ids))) in settled
                else r
                for r in resolutions
            ]
    answered_rounds = {
        r.task_key.split("#", 1)[0] for r in resolutions if "#" in r.task_key and r.decision
    }
    return [
        r
        for r in resolutions
        if not (
            r.conflict and r.decision is None and r.task_key.split("#", 1)[0] in answered_rounds
        )
    ]


def _apply(
    store: ObjectStore,
    items: Mapping[str, rv.ReviewItem],
    active: Sequence[rv.Resolution],
    run_id: str,
) -> _Applied:
    """Apply ``active`` to the faces table (in memory) and note which task settled each face."""
    from storage.tables import read_faces

    table = read_faces(store)
    faces = table.to_pylist()
    before = {f["face_id"]: (f["status"], f["reason"], f["identity_id"]) for f in faces}
    changed, report = rv.apply_resolutions(faces, items, active, run_id=run_id)
    settled_by: dict[str, str] = {}
    for r in active:
        item = items.get(r.task_key)
        if item:
            for fid in set(item.face_ids) | set(item.shown):
                if fid in changed:
                    settled_by.setdefault(fid, r.task_key)
    return _Applied(faces, table.schema, before, changed, report, settled_by)


def _propagate(settings: Settings, applied: _Applied, run_id: str) -> dict[str, int]:
    """Settle waiting faces near the identities people just confirmed; faces per task key."""
    propagated = rv.propagate(
        applied.faces,
        applied.changed,
        attach=settings.thresholds.attach,
        min_quality=settings.quality.auto_min_quality,
        run_id=run_id,
        settled_by=applied.settled_by,
    )
    applied.report.propagated = sum(propagated.values())
    return propagated


def _write_changed_groups(store: ObjectStore, applied: _Applied) -> None:
    """Rewrite the source groups that have a face whose status, reason or identity changed."""
    from storage.tables import write_group

    faces = applied.faces
    dirty = {
        (f["source_kind"], f["source_group"])
        for f in faces
        if (f["status"], f["reason"], f["identity_id"]) != applied.before[f["face_id"]]
    }
    if not dirty:
        return
    by_group: dict[tuple[str, str], list[rv.Row]] = {}
    for f in faces:
        if (f["source_kind"], f["source_group"]) in dirty:
            by_group.setdefault((f["source_kind"], f["source_group"]), []).append(f)
    for (kind, group), rows in sorted(by_group.items()):
        write_group(store, kind, group, pa.Table.from_pylist(rows, schema=applied.schema))


def _reask_conflicts(
    client: ReviewClient,
    store: ObjectStore,
    active: Sequence[rv.Resolution],
    records: Mapping[str, Mapping[str, Any]],
    items: Mapping[str, rv.ReviewItem],
) -> int:
    """Rule new_task: ask each unresolved conflict once more in a fresh task (a third
    opinion), again if that task was deleted in Label Studio; returns how many tasks were
    created."""
    asks = []
    for r in active:
        if not (r.conflict and r.decision is None):
            continue
        base, _, rnd = r.task_key.partition("#round")
        nxt = conflict_key(base, int(rnd or 1) + 1)
        # Asked already: push_items skips it, unless Label Studio lost it (deleted there).
        if base in items:
            b = items[base]
            asks.append(
                rv.ReviewItem(
                    kind=b.kind,
                    key=nxt,
                    face_ids=b.face_ids,
                    shown=b.shown,
                    proposal=b.proposal,
                    score=b.score,
                    identity_ids=b.identity_ids,
                    suspects=b.suspects,
                    subject=b.subject,
                    evidence=b.evidence,
                    reason=b.reason,
                )
            )
    if not asks:
        return 0
    return push_items(client, store, asks, "faceloop-conflict").created


def pull_and_apply(
    settings: Settings, store: ObjectStore, run_id: str, client: ReviewClient | None = None
) -> ApplyResult:
    """Pull answers changed since the last pull, record them verbatim, resolve every recorded
    answer (so human decisions are re-asserted even if an automatic run touched the faces),
    apply them to the faces table, propagate, and re-ask conflicting tasks (rule new_task).

    Writes only the source groups whose faces changed. Safe to run any number of times.
    """
    from storage.recovery import refuse_half_labelled
    from tasks.reembed import judged_as_stored

    refuse_half_labelled(store, "applying review answers")
    settings = judged_as_stored(settings, store)
    client = client or ReviewClient(settings.review)
    pull, answers_file = _read_answers(client, store)
    records = {r["key"]: r for r in read_task_records(store).to_pylist()}
    items = {k: item_from_record(r) for k, r in records.items()}
    active = _resolve(store, settings.review.conflict_rule)
    applied = _apply(store, items, active, run_id)
    propagated = _propagate(settings, applied, run_id)
    _write_changed_groups(store, applied)
    report = applied.report
    settled = {k: v + propagated.get(k, 0) for k, v in report.settled.items()}
    # Resolutions never recorded with these answers (new ones, and those of a pull killed
    # before it recorded them), and recorded ones that changed faces again (an automatic run
    # had overridden a person): the audit says when each took hold.
    applied_rows = read_applied(store)
    recorded = set(
        zip(
            applied_rows.column("task_key").to_pylist(),
            (tuple(sorted(ids or ())) for ids in applied_rows.column("annotation_ids").to_pylist()),
            strict=True,
        )
    )
    record_applied(
        store,
        [
            r
            for r in active
            if (r.task_key, tuple(sorted(r.annotation_ids))) not in recorded
            or settled.get(r.task_key)
        ],
        settled,
        run_id,
    )
    reasked = 0
    if settings.review.conflict_rule == "new_task":
        reasked = _reask_conflicts(client, store, active, records, items)
    log.info(
        "review pull: %d new answers, %d faces changed, %d propagated, %d open conflicts, "
        "%d re-asked, "
        "%d faces left alone (placed in another identity by a person since the task was pushed)",
        len(pull.answers),
        len(applied.changed),
        report.propagated,
        report.conflicts,
        reasked,
        report.stale,
    )
    return ApplyResult(
        new_answers=len(pull.answers),
        conflicts=report.conflicts,
        report=report,
        settled_per_answer=settled,
        propagated=propagated,
        reasked=reasked,
        answers_file=answers_file,
        faces_changed=len(applied.changed),
        projects_gone=pull.projects_gone,
        not_understood=pull.not_understood,
        edited=pull.edited,
    )
