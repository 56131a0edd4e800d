"""The Label Studio bridge: projects and labelling configs per task kind, bulk push with
predictions, incremental pull of answers, webhook registration — plus the records in the store.

Images travel **inside the task as data URIs** (112x112 JPEG crops, or one grid JPEG per
identity): Label Studio needs no file serving (local-files serving stays off), no other file of
the machine or the store is reachable through it, it works the same with a local or an S3 store
and with a Label Studio on another host, and the crops are only shown to users logged into the
project. The price is task size (~6 KB per crop in base64), acceptable at review volumes.

Store records (all under ``<store>/tables/reviews/``):

- ``tasks/<batch>.parquet``   one row per task pushed (key, project, task id, faces); written
  *before* import with ``task_id`` null and rewritten with the ids after it, so a crash between
  the two is repaired on the next push by looking the keys up in Label Studio.
- ``answers/<pull>.parquet``  each completed annotation verbatim (JSON) plus its parsed decision.
- ``applied/<pull>.parquet``  each resolution applied (or held as a conflict) and faces settled.
- ``state.json``              the pull cursor per project (``updated_at`` of the newest task seen).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import pyarrow as pa
from PIL import Image, ImageDraw

from annotate import review as rv
from annotate.server import LabelStudioUnavailable
from faceloop.config import ReviewSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

REVIEWS = "tables/reviews"
KEY_FIELD = "faceloop_key"
CELL = 112

TITLES = {
    "idcard_pair": "ID card vs live photo",
    "cluster_check": "Cluster check",
    "duplicate": "Possible duplicate identities",
}

# One labelling config per kind. Choice values are the decisions of annotate/review.py.
LABEL_CONFIGS: dict[str, str] = {
    "idcard_pair": """<View>
  <Header value="Is the person on the ID card the same as in the live photo?"/>
  <View style="display:flex;gap:24px">
    <View><Header value="ID card" size="6"/><Image name="id_face" value="$id_image" width="224px"/></View>
    <View><Header value="Live photo" size="6"/><Image name="live_face" value="$live_image" width="224px"/></View>
  </View>
  <Choices name="decision" toName="live_face" choice="single" required="true" showInline="true">
    <Choice value="same_person" alias="same_person" hotkey="1"/>
    <Choice value="different_person" alias="different_person" hotkey="2"/>
    <Choice value="not_usable" alias="not_usable" hotkey="3"/>
  </Choices>
</View>""",
    "cluster_check": """<View>
  <Header value="$title"/>
  <Text name="hint" value="$hint"/>
  <Image name="grid" value="$grid"/>
  <Header value="Faces that do NOT belong (numbers):" size="6"/>
  <Choices name="outliers" toName="grid" choice="multiple" showInline="true" value="$faces"/>
  <Choices name="verdict" toName="grid" choice="single" required="true" showInline="true">
    <Choice value="all_belong" hotkey="1"/>
    <Choice value="marked_do_not_belong" hotkey="2"/>
  </Choices>
</View>""",
    "duplicate": """<View>
  <Header value="Are these two groups the same person?"/>
  <View style="display:flex;gap:24px">
    <View><Header value="$label_a" size="6"/><Image name="grid_a" value="$grid_a"/></View>
    <View><Header value="$label_b" size="6"/><Image name="grid_b" value="$grid_b"/></View>
  </View>
  <Choices name="decision" toName="grid_a" choice="single" required="true" showInline="true">
    <Choice value="same_person" hotkey="1"/>
    <Choice value="different_person" hotkey="2"/>
  </Choices>
</View>""",
}


# -- images ---------------------------------------------------------------------------------


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def grid_jpeg(crops: Sequence[bytes], columns: int = 6, numbered: bool = True) -> bytes:
    """One JPEG with the crops in a grid, each numbered 1..N in its top-left corner."""
    n = max(1, len(crops))
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    canvas = Image.new("RGB", (cols * CELL, rows * CELL), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for i, jpeg in enumerate(crops):
        x, y = (i % cols) * CELL, (i // cols) * CELL
        with Image.open(io.BytesIO(jpeg)) as im:
            canvas.paste(im.convert("RGB").resize((CELL, CELL)), (x, y))
        if numbered:
            draw.rectangle([x, y, x + 22, y + 14], fill=(0, 0, 0))
            draw.text((x + 3, y + 2), str(i + 1), fill=(255, 255, 0))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=88)
    return buf.getvalue()


# -- tasks ----------------------------------------------------------------------------------


def _choice(name: str, to: str, values: Sequence[str]) -> dict[str, Any]:
    return {"from_name": name, "to_name": to, "type": "choices", "value": {"choices": list(values)}}


def build_task(
    item: rv.ReviewItem, crops: Mapping[str, bytes], model_version: str
) -> dict[str, Any]:
    """The Label Studio task for ``item``: data (images as data URIs, the idempotency key) and
    one prediction with the model's proposal, its score and ``model_version``."""
    data: dict[str, Any] = {KEY_FIELD: item.key, "kind": item.kind, "score": round(item.score, 4)}
    if item.kind == "idcard_pair":
        data["id_image"] = data_uri(crops[item.shown[0]])
        data["live_image"] = data_uri(crops[item.shown[1]])
        data["subject"] = item.subject or ""
        result = [_choice("decision", "live_face", [item.proposal])]
    elif item.kind == "cluster_check":
        data["grid"] = data_uri(grid_jpeg([crops[f] for f in item.shown]))
        data["faces"] = [{"value": str(i + 1)} for i in range(len(item.shown))]
        data["title"] = f"Identity {item.identity_ids[0]}: do all faces show the same person?"
        data["hint"] = "Tick the numbers of faces that do not belong, then choose a verdict."
        marked = [str(item.shown.index(f) + 1) for f in item.suspects if f in item.shown]
        result = [_choice("outliers", "grid", marked), _choice("verdict", "grid", [item.proposal])]
    else:
        a, b = item.identity_ids
        half = len(item.shown) // 2 or 1
        data["grid_a"] = data_uri(grid_jpeg([crops[f] for f in item.shown[:half]], 4, False))
        data["grid_b"] = data_uri(
            grid_jpeg([crops[f] for f in item.shown[half:]] or [crops[item.shown[0]]], 4, False)
        )
        data["label_a"], data["label_b"] = f"Identity {a}", f"Identity {b}"
        result = [_choice("decision", "grid_a", [item.proposal])]
    return {
        "data": data,
        "predictions": [
            {"model_version": model_version, "score": float(item.score), "result": result}
        ],
    }


def _annotator(ann: Mapping[str, Any]) -> str:
    """Who answered: the account's e-mail when the annotation says it, else the user id.

    Label Studio gives ``completed_by`` as an id and ``created_username`` as
    ``"<first> <last> <email>, <id>"``; an e-mail is what an operator recognises in an audit.
    """
    who = ann.get("completed_by")
    if isinstance(who, dict):
        return str(who.get("email") or who.get("id"))
    name = str(ann.get("created_username") or "").rpartition(",")[0]
    emails = [w for w in name.split() if "@" in w]
    return emails[-1] if emails else str(who)


def parse_annotation(ann: Mapping[str, Any], item: rv.ReviewItem, task_key: str) -> rv.Answer:
    """An annotation's result → :class:`annotate.review.Answer` (marked numbers → face ids)."""
    decision, marked = "", []
    for r in ann.get("result") or []:
        choices = (r.get("value") or {}).get("choices") or []
        if r.get("from_name") in ("decision", "verdict") and choices:
            decision = choices[0]
        elif r.get("from_name") == "outliers":
            for c in choices:
                if str(c).isdigit() and 1 <= int(c) <= len(item.shown):
                    marked.append(item.shown[int(c) - 1])
    annotator = _annotator(ann)
    if decision not in rv.DECISIONS[item.kind]:
        decision = ""
    return rv.Answer(
        task_key=task_key,
        kind=item.kind,
        annotation_id=int(ann["id"]),
        annotator=annotator,
        updated_at=str(ann.get("updated_at") or ann.get("created_at")),
        decision=decision,
        marked=tuple(sorted(marked)),
        cancelled=bool(ann.get("was_cancelled")),
    )


# -- client ---------------------------------------------------------------------------------


def _transient(exc: BaseException) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, ApiError) and (exc.status_code or 0) in (408, 429, 500, 502, 503, 504)


class ReviewClient:
    """The SDK with retries: every call retries transient failures (connection refused,
    timeouts, 5xx, 429) with exponential backoff, then raises :class:`LabelStudioUnavailable`."""

    def __init__(
        self, settings: ReviewSettings, url: str | None = None, token: str | None = None
    ) -> None:
        from label_studio_sdk import LabelStudio

        token = token or settings.token
        if not token:
            raise LabelStudioUnavailable(
                "no Label Studio token: set FACELOOP_REVIEW__TOKEN or LABEL_STUDIO_API_KEY"
            )
        self.settings = settings
        self.url = (url or settings.url).rstrip("/")
        self.sdk = LabelStudio(base_url=self.url, api_key=token, timeout=settings.timeout_s)
        self._projects: dict[str, int] = {}

    def call(self, what: str, fn: Callable[[], T]) -> T:
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt >= s.retries:
                    raise LabelStudioUnavailable(
                        f"{what}: Label Studio at {self.url} unavailable after {s.retries + 1} "
                        f"attempts: {type(exc).__name__}: {exc}"
                    ) from exc
                delay = s.backoff_s * 2**attempt
                log.warning(
                    "%s: %s, retry %d/%d in %.1f s",
                    what,
                    type(exc).__name__,
                    attempt + 1,
                    s.retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def project_title(self, kind: str) -> str:
        return f"{self.settings.project_prefix}: {TITLES[kind]}"

    def ensure_project(self, kind: str) -> int:
        """The project of ``kind``, created if missing; its labelling config is brought up to
        date when it differs from :data:`LABEL_CONFIGS`."""
        if kind in self._projects:
            return self._projects[kind]
        title = self.project_title(kind)
        found = [
            p
            for p in self.call("list projects", lambda: list(self.sdk.projects.list(title=title)))
            if p.title == title
        ]
        if found:
            project = found[0]
            if (project.label_config or "").strip() != LABEL_CONFIGS[kind].strip():
                self.call(
                    "update config",
                    lambda: self.sdk.projects.update(
                        id=project.id, label_config=LABEL_CONFIGS[kind]
                    ),
                )
                log.info("updated labelling config of project %s (%s)", project.id, kind)
        else:
            project = self.call(
                "create project",
                lambda: self.sdk.projects.create(
                    title=title,
                    label_config=LABEL_CONFIGS[kind],
                    description="faceloop human review; answers are pulled by `faceloop review pull`.",
                    show_collab_predictions=True,
                    maximum_annotations=1,
                ),
            )
            log.info("created project %s (%s)", project.id, kind)
        self._projects[kind] = int(project.id)
        return int(project.id)

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Bulk-import ``tasks``; returns their ids in order."""
        res = self.call(
            "import tasks",
            lambda: self.sdk.projects.import_tasks(id=project, request=tasks, return_task_ids=True),
        )
        ids = list(res.task_ids or [])
        if len(ids) != len(tasks):
            raise LabelStudioUnavailable(f"import returned {len(ids)} ids for {len(tasks)} tasks")
        return ids

    def task_ids_for_keys(self, project: int, keys: Iterable[str]) -> dict[str, int]:
        """Look tasks up by their faceloop key (used to repair an interrupted push)."""
        out: dict[str, int] = {}
        for key in keys:
            q = json.dumps(
                {
                    "filters": {
                        "conjunction": "and",
                        "items": [
                            {
                                "filter": f"filter:tasks:data.{KEY_FIELD}",
                                "operator": "equal",
                                "type": "String",
                                "value": key,
                            }
                        ],
                    }
                }
            )
            found = self.call(
                "find task",
                lambda q=q: list(self.sdk.tasks.list(project=project, query=q, fields="all")),
            )
            for t in found:
                if (t.data or {}).get(KEY_FIELD) == key:
                    out[key] = int(t.id)
        return out

    def changed_tasks(self, project: int, since: str | None) -> list[Any]:
        """Tasks of ``project`` updated after ``since`` (ISO-8601) that carry annotations."""
        items = [
            {
                "filter": "filter:tasks:total_annotations",
                "operator": "greater",
                "type": "Number",
                "value": 0,
            }
        ]
        if since:
            items.append(
                {
                    "filter": "filter:tasks:updated_at",
                    "operator": "greater",
                    "type": "Datetime",
                    "value": since,
                }
            )
        q = json.dumps({"filters": {"conjunction": "and", "items": items}})
        return self.call(
            "list changed tasks",
            lambda: list(self.sdk.tasks.list(project=project, query=q, fields="all")),
        )

    def ensure_webhook(self, project: int, url: str, secret: str) -> int:
        """Register (once) a webhook that posts annotation events of ``project`` to ``url``."""
        hooks = self.call(
            "list webhooks", lambda: list(self.sdk.webhooks.list(project=str(project)))
        )
        for h in hooks:
            if h.url == url and getattr(h, "project", None) == project:
                return int(h.id)
        h = self.call(
            "create webhook",
            lambda: self.sdk.webhooks.create(
                url=url,
                project=project,
                send_payload=True,
                send_for_all_actions=False,
                headers={"Authorization": f"Bearer {secret}"},
                actions=["ANNOTATION_CREATED", "ANNOTATION_UPDATED"],
            ),
        )
        return int(h.id)


# -- store records --------------------------------------------------------------------------

TASKS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),
        ("project_id", pa.int64()),
        ("task_id", pa.int64()),
        ("face_ids", pa.list_(pa.string())),
        ("shown", pa.list_(pa.string())),
        ("identity_ids", pa.list_(pa.string())),
        ("suspects", pa.list_(pa.string())),
        ("proposal", pa.string()),
        ("score", pa.float32()),
        ("subject", pa.string()),
        ("model_version", pa.string()),
        ("pushed_at", pa.string()),
    ]
)
ANSWERS_SCHEMA = pa.schema(
    [
        ("task_key", pa.string()),
        ("kind", pa.string()),
        ("project_id", pa.int64()),
        ("task_id", pa.int64()),
        ("annotation_id", pa.int64()),
        ("annotator", pa.string()),
        ("updated_at", pa.string()),
        ("cancelled", pa.bool_()),
        ("decision", pa.string()),
        ("marked", pa.list_(pa.string())),
        ("raw_json", pa.string()),
        ("pulled_at", pa.string()),
    ]
)
APPLIED_SCHEMA = pa.schema(
    [
        ("task_key", pa.string()),
        ("kind", pa.string()),
        ("decision", pa.string()),
        ("conflict", pa.bool_()),
        ("annotators", pa.list_(pa.string())),
        ("annotation_ids", pa.list_(pa.int64())),
        ("settled", pa.int64()),
        ("run_id", pa.string()),
        ("applied_at", pa.string()),
    ]
)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _new_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def read_task_records(store: Any) -> pa.Table:
    """All pushed-task rows (latest record per key wins)."""
    t = store.read_parquet(f"{REVIEWS}/tasks", schema=TASKS_SCHEMA)
    rows: dict[str, dict[str, Any]] = {}
    for r in t.to_pylist():
        prev = rows.get(r["key"])
        if prev is None or prev["task_id"] is None:
            rows[r["key"]] = r
    return pa.Table.from_pylist(list(rows.values()), schema=TASKS_SCHEMA)


def item_from_record(r: Mapping[str, Any]) -> rv.ReviewItem:
    return rv.ReviewItem(
        kind=r["kind"],
        key=r["key"],
        face_ids=tuple(r["face_ids"] or ()),
        shown=tuple(r["shown"] or ()),
        proposal=r["proposal"] or "",
        score=float(r["score"] or 0.0),
        identity_ids=tuple(r["identity_ids"] or ()),
        suspects=tuple(r["suspects"] or ()),
        subject=r["subject"],
    )


def _record(
    item: rv.ReviewItem, project: int, task_id: int | None, mv: str, at: str
) -> dict[str, Any]:
    return {
        "key": item.key,
        "kind": item.kind,
        "project_id": project,
        "task_id": task_id,
        "face_ids": list(item.face_ids),
        "shown": list(item.shown),
        "identity_ids": list(item.identity_ids),
        "suspects": list(item.suspects),
        "proposal": item.proposal,
        "score": item.score,
        "subject": item.subject,
        "model_version": mv,
        "pushed_at": at,
    }


def read_state(store: Any) -> dict[str, Any]:
    rel = f"{REVIEWS}/state.json"
    return json.loads(store.read_bytes(rel)) if store.exists(rel) else {"cursor": {}}


def write_state(store: Any, state: Mapping[str, Any]) -> None:
    store.write_bytes(f"{REVIEWS}/state.json", json.dumps(state, indent=1, sort_keys=True).encode())


@dataclass
class PushResult:
    created: int = 0
    already_pushed: int = 0
    repaired: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    not_pushed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def push_items(
    client: ReviewClient,
    store: Any,
    items: Sequence[rv.ReviewItem],
    crops: Mapping[str, bytes],
    model_version: str,
) -> PushResult:
    """Create one task per item whose key was never pushed; idempotent.

    Each batch is recorded in the store *before* the import (task ids null) and again after
    it, so an interrupted push is repaired on the next call instead of duplicating tasks.
    """
    t0 = time.monotonic()
    result = PushResult()
    records = read_task_records(store).to_pylist()
    done = {r["key"] for r in records if r["task_id"] is not None}
    unconfirmed = [r for r in records if r["task_id"] is None]
    # Repair: keys recorded as importing whose batch may or may not have reached Label Studio.
    if unconfirmed:
        by_project: dict[int, list[dict[str, Any]]] = {}
        for r in unconfirmed:
            by_project.setdefault(r["project_id"], []).append(r)
        fixed = []
        for project, rs in by_project.items():
            found = client.task_ids_for_keys(project, [r["key"] for r in rs])
            for r in rs:
                if r["key"] in found:
                    fixed.append({**r, "task_id": found[r["key"]]})
                    done.add(r["key"])
        if fixed:
            store.write_parquet(
                f"{REVIEWS}/tasks/repair-{_new_id()}.parquet",
                pa.Table.from_pylist(fixed, schema=TASKS_SCHEMA),
            )
            result.repaired = len(fixed)
    todo = [i for i in items if i.key not in done]
    result.already_pushed = len(items) - len(todo)
    bs = max(1, client.settings.batch_size)
    for kind in rv.TASK_KINDS:
        kind_items = [i for i in todo if i.kind == kind]
        if not kind_items:
            continue
        project = client.ensure_project(kind)
        for start in range(0, len(kind_items), bs):
            batch = kind_items[start : start + bs]
            at = _now()
            rel = f"{REVIEWS}/tasks/{_new_id()}.parquet"
            store.write_parquet(
                rel,
                pa.Table.from_pylist(
                    [_record(i, project, None, model_version, at) for i in batch],
                    schema=TASKS_SCHEMA,
                ),
            )
            ids = client.import_tasks(project, [build_task(i, crops, model_version) for i in batch])
            store.write_parquet(
                rel,
                pa.Table.from_pylist(
                    [
                        _record(i, project, tid, model_version, at)
                        for i, tid in zip(batch, ids, strict=False)
                    ],
                    schema=TASKS_SCHEMA,
                ),
            )
            result.created += len(batch)
            result.by_kind[kind] = result.by_kind.get(kind, 0) + len(batch)
            log.info("pushed %d %s tasks to project %d", len(batch), kind, project)
    result.seconds = time.monotonic() - t0
    return result


@dataclass
class PullResult:
    answers: list[rv.Answer]
    raw_rows: list[dict[str, Any]]
    cursor: dict[str, str]


def pull_answers(client: ReviewClient, store: Any) -> PullResult:
    """Fetch annotations of tasks changed since the stored cursor (with a 2 s overlap, so a
    task updated during the last pull is not missed; already-recorded answers are dropped).
    Does not move the cursor: :func:`record_pull` does, after the answers are stored."""
    state = read_state(store)
    cursor: dict[str, str] = dict(state.get("cursor", {}))
    records = {r["key"]: r for r in read_task_records(store).to_pylist()}
    seen = {
        (r["annotation_id"], r["updated_at"])
        for r in store.read_parquet(
            f"{REVIEWS}/answers", columns=["annotation_id", "updated_at"], schema=ANSWERS_SCHEMA
        ).to_pylist()
    }
    answers: list[rv.Answer] = []
    raw_rows: list[dict[str, Any]] = []
    projects = sorted({r["project_id"] for r in records.values() if r["project_id"] is not None})
    pulled_at = _now()
    for project in projects:
        since = cursor.get(str(project))
        if since:
            # Label Studio's filter parser wants exactly this format (UTC, 'Z').
            since = (
                (_ts(since) - timedelta(seconds=2))
                .astimezone(UTC)
                .strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            )
        newest = cursor.get(str(project))
        for task in client.changed_tasks(project, since):
            key = (task.data or {}).get(KEY_FIELD)
            rec = records.get(key)
            upd = str(task.updated_at) if task.updated_at else None
            if upd and (newest is None or _ts(upd) > _ts(newest)):
                newest = upd
            if rec is None:
                continue
            item = item_from_record(rec)
            for ann in task.annotations or []:
                ann = ann if isinstance(ann, dict) else ann.dict()
                a = parse_annotation(ann, item, key)
                if (a.annotation_id, a.updated_at) in seen:
                    continue
                answers.append(a)
                raw_rows.append(
                    {
                        "task_key": key,
                        "kind": item.kind,
                        "project_id": project,
                        "task_id": int(task.id),
                        "annotation_id": a.annotation_id,
                        "annotator": a.annotator,
                        "updated_at": a.updated_at,
                        "cancelled": a.cancelled,
                        "decision": a.decision,
                        "marked": list(a.marked),
                        "raw_json": json.dumps(ann, sort_keys=True, default=str),
                        "pulled_at": pulled_at,
                    }
                )
        if newest:
            cursor[str(project)] = newest
    return PullResult(answers=answers, raw_rows=raw_rows, cursor=cursor)


def _ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def record_pull(store: Any, pull: PullResult) -> str | None:
    """Store the answers verbatim, then move the cursor (in that order: nothing is lost)."""
    rel = None
    if pull.raw_rows:
        rel = f"{REVIEWS}/answers/{_new_id()}.parquet"
        store.write_parquet(rel, pa.Table.from_pylist(pull.raw_rows, schema=ANSWERS_SCHEMA))
    state = read_state(store)
    state["cursor"] = pull.cursor
    write_state(store, state)
    return rel


def all_answers(store: Any) -> list[rv.Answer]:
    """Every answer ever recorded, latest version per annotation."""
    latest: dict[int, rv.Answer] = {}
    for r in store.read_parquet(f"{REVIEWS}/answers", schema=ANSWERS_SCHEMA).to_pylist():
        a = rv.Answer(
            r["task_key"],
            r["kind"],
            r["annotation_id"],
            r["annotator"],
            r["updated_at"],
            r["decision"] or "",
            tuple(r["marked"] or ()),
            bool(r["cancelled"]),
        )
        prev = latest.get(a.annotation_id)
        if prev is None or (a.updated_at, a.annotation_id) >= (prev.updated_at, prev.annotation_id):
            latest[a.annotation_id] = a
    return list(latest.values())


def record_applied(
    store: Any, resolutions: Sequence[rv.Resolution], settled: Mapping[str, int], run_id: str
) -> str | None:
    if not resolutions:
        return None
    at = _now()
    rows = [
        {
            "task_key": r.task_key,
            "kind": r.kind,
            "decision": r.decision,
            "conflict": r.conflict,
            "annotators": list(r.annotators),
            "annotation_ids": list(r.annotation_ids),
            "settled": int(settled.get(r.task_key, 0)),
            "run_id": run_id,
            "applied_at": at,
        }
        for r in resolutions
    ]
    rel = f"{REVIEWS}/applied/{_new_id()}.parquet"
    store.write_parquet(rel, pa.Table.from_pylist(rows, schema=APPLIED_SCHEMA))
    return rel


def conflict_key(key: str, round_: int) -> str:
    """Key of the fresh task that re-asks a question after conflicting answers."""
    return f"{key.split('#', 1)[0]}#round{round_}"


# -- whole steps (called by flows/review.py and the CLI) -------------------------------------


def _model_version(faces: Sequence[Mapping[str, Any]], config_hash: str) -> str:
    models = sorted({str(f.get("model")) for f in faces if f.get("model")})
    return f"{models[0] if models else 'faceloop'}|config:{config_hash[:12]}"


def push_review(settings: Any, store: Any, client: ReviewClient | None = None) -> PushResult:
    """Every status=review face with a task kind becomes a task (once). See annotate/review.py
    for which reasons map to which kind; the rest are counted in ``not_pushed``."""
    from storage.tables import read_faces

    client = client or ReviewClient(settings.review)
    faces = read_faces(
        store,
        columns=[
            "face_id",
            "source_kind",
            "source_group",
            "role",
            "identity_id",
            "status",
            "reason",
            "score",
            "quality",
            "det_score",
            "model",
        ],
    ).to_pylist()
    items, skipped = rv.plan_items(
        faces, thresholds=settings.thresholds, max_grid_faces=settings.review.max_grid_faces
    )
    # Crops only for the faces shown, and only for tasks not pushed yet.
    done = {r["key"] for r in read_task_records(store).to_pylist() if r["task_id"] is not None}
    needed = {f for i in items if i.key not in done for f in i.shown}
    crops: dict[str, bytes] = {}
    if needed:
        for part in _iter_crops(store, needed):
            crops.update(part)
    missing = [i for i in items if i.key not in done and any(f not in crops for f in i.shown)]
    if missing:
        log.warning("%d review items skipped: crops missing", len(missing))
        items = [i for i in items if i not in missing]
    result = push_items(client, store, items, crops, _model_version(faces, settings.config_hash()))
    result.not_pushed = skipped
    return result


def _iter_crops(store: Any, face_ids: set[str]) -> Iterable[dict[str, bytes]]:
    from storage.tables import iter_faces

    for t in iter_faces(store, columns=["face_id", "aligned_jpeg"]):
        yield {
            f: j
            for f, j in zip(
                t.column("face_id").to_pylist(), t.column("aligned_jpeg").to_pylist(), strict=False
            )
            if f in face_ids and j
        }


@dataclass
class ApplyResult:
    new_answers: int
    conflicts: int
    report: rv.ApplyReport
    settled_per_answer: dict[str, int]
    propagated: dict[str, int]
    reasked: int
    answers_file: str | None


def pull_and_apply(
    settings: Any, store: Any, run_id: str, client: ReviewClient | None = None
) -> ApplyResult:
    """Pull answers changed since the last pull, record them verbatim, resolve every recorded
    answer (so human decisions are re-asserted even if an automatic run touched the faces),
    apply them to the faces table, propagate, and re-ask conflicting tasks (rule new_task).

    Writes only the source groups whose faces changed. Safe to run any number of times.
    """
    from storage.tables import read_faces, write_group

    client = client or ReviewClient(settings.review)
    pull = pull_answers(client, store)
    answers_file = record_pull(store, pull)
    records = {r["key"]: r for r in read_task_records(store).to_pylist()}
    items = {k: item_from_record(r) for k, r in records.items()}
    answers = all_answers(store)
    resolutions = rv.resolve(answers, settings.review.conflict_rule)
    # A question re-asked after a conflict settles it: the original key's conflict is moot.
    answered_rounds = {
        r.task_key.split("#", 1)[0] for r in resolutions if "#" in r.task_key and r.decision
    }
    active = [
        r
        for r in resolutions
        if not (
            r.conflict and r.decision is None and r.task_key.split("#", 1)[0] in answered_rounds
        )
    ]
    table = read_faces(store)
    faces = table.to_pylist()
    before = {f["face_id"]: (f["status"], f["reason"], f["identity_id"]) for f in faces}
    changed, report = rv.apply_resolutions(faces, items, active, run_id=run_id)
    settled_by = {}
    for r in active:
        item = items.get(r.task_key)
        if item:
            for fid in set(item.face_ids) | set(item.shown):
                if fid in changed:
                    settled_by.setdefault(fid, r.task_key)
    th = settings.thresholds
    propagated = rv.propagate(
        faces,
        changed,
        attach=th.attach,
        min_quality=settings.quality.auto_min_quality,
        run_id=run_id,
        settled_by=settled_by,
    )
    report.propagated = sum(propagated.values())
    dirty = {
        (f["source_kind"], f["source_group"])
        for f in faces
        if (f["status"], f["reason"], f["identity_id"]) != before[f["face_id"]]
    }
    if dirty:
        by_group: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for f in faces:
            if (f["source_kind"], f["source_group"]) in dirty:
                by_group.setdefault((f["source_kind"], f["source_group"]), []).append(f)
        for (kind, group), rows in sorted(by_group.items()):
            write_group(store, kind, group, pa.Table.from_pylist(rows, schema=table.schema))
    settled = {k: v + propagated.get(k, 0) for k, v in report.settled.items()}
    new_keys = {a.task_key for a in pull.answers}
    record_applied(store, [r for r in active if r.task_key in new_keys], settled, run_id)
    # Conflicts under rule new_task: ask once more in a fresh task (a third opinion).
    reasked = 0
    if settings.review.conflict_rule == "new_task":
        asks = []
        for r in active:
            if not (r.conflict and r.decision is None):
                continue
            base, _, rnd = r.task_key.partition("#round")
            nxt = conflict_key(base, int(rnd or 1) + 1)
            if nxt not in records and base in items:
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
                    )
                )
        if asks:
            crops: dict[str, bytes] = {}
            for part in _iter_crops(store, {f for a in asks for f in a.shown}):
                crops.update(part)
            asks = [a for a in asks if all(f in crops for f in a.shown)]
            reasked = push_items(client, store, asks, crops, "faceloop-conflict").created
    log.info(
        "review pull: %d new answers, %d faces changed, %d propagated, %d conflicts, %d re-asked",
        len(pull.answers),
        len(changed),
        report.propagated,
        report.conflicts,
        reasked,
    )
    return ApplyResult(
        new_answers=len(pull.answers),
        conflicts=report.conflicts,
        report=report,
        settled_per_answer=settled,
        propagated=propagated,
        reasked=reasked,
        answers_file=answers_file,
    )
