"""The Label Studio HTTP client: the SDK behind retries, plus the few calls review needs.

Promises: every call goes through :meth:`ReviewClient.call`, which retries transient failures
(connection refused, timeouts, 408/429/5xx) with exponential backoff and then raises
:class:`annotate.server.LabelStudioUnavailable`; any other answer that is an error becomes a
:class:`LabelStudioError` (its status and Label Studio's own detail, not the HTTP headers);
other exceptions propagate unchanged. Projects
(one per task kind, labelling config from :mod:`annotate.render`) are created on first use and
their config brought up to date. Nothing here reads or writes the store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from annotate.render import KEY_FIELD, LABEL_CONFIGS, project_title
from annotate.server import LabelStudioUnavailable
from faceloop.config import ReviewSettings
from faceloop.errors import FaceloopError

if TYPE_CHECKING:
    from label_studio_sdk.types import (
        AllRolesProjectList,
        LseProjectCreate,
        RoleBasedTask,
        Webhook,
    )

log = logging.getLogger(__name__)
T = TypeVar("T")


def _transient(exc: BaseException) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, ApiError) and (exc.status_code or 0) in (408, 429, 500, 502, 503, 504)


class LabelStudioError(FaceloopError):
    """Label Studio answered a request with an error that retrying will not change (a project
    or task that is not there, a refused token, ...). ``status_code`` is the HTTP status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def _refusal(what: str, url: str, exc: Exception) -> LabelStudioError | None:
    """The :class:`LabelStudioError` of an SDK ``ApiError`` (None for other exceptions): its
    status and the body's ``detail``. The SDK's own message prints every response header,
    the session cookie included."""
    from label_studio_sdk.core.api_error import ApiError

    if not isinstance(exc, ApiError):
        return None
    body = exc.body
    # Label Studio's JSON errors carry a "detail"; a page (its HTML 404) says nothing more.
    detail = body.get("detail") if isinstance(body, dict) else None
    text = " ".join(str(detail or "no detail").split())[:300]
    return LabelStudioError(
        f"{what}: Label Studio at {url} answered {exc.status_code}: {text}", exc.status_code
    )


def sdk_id(value: int | None) -> int:
    """The id of an object the server returned (the SDK's models declare every field optional;
    the server always fills it in)."""
    if value is None:
        raise TypeError("Label Studio returned an object without an id")
    return int(value)


class ReviewClient:
    """The SDK with retries: every call retries transient failures (connection refused,
    timeouts, 5xx, 429) with exponential backoff, then raises :class:`LabelStudioUnavailable`."""

    def __init__(
        self, settings: ReviewSettings, url: str | None = None, token: str | None = None
    ) -> None:
        from label_studio_sdk import LabelStudio

        token = token or settings.token_value()
        if not token:
            raise LabelStudioUnavailable(
                "no Label Studio token: set FACELOOP_REVIEW__TOKEN or LABEL_STUDIO_API_KEY, or "
                f"start it with `faceloop review up` (its token is then read from "
                f"{settings.data_dir or 'review.data_dir'}/admin-token)"
            )
        self.settings = settings
        self.url = (url or settings.url).rstrip("/")
        # The SDK's own retries off (its default: 2, with 1-4 s sleeps, connection errors
        # included): faceloop's loop in call() is the one policy. Layered, each of its
        # attempts was three, and a dead server took ~3 s per attempt to report.
        self.sdk = LabelStudio(
            base_url=self.url, api_key=token, timeout=settings.timeout_s, max_retries=0
        )
        self._projects: dict[str, int] = {}
        self._api_checked = False  # _check_api: the URL answered as Label Studio's API

    def call(self, what: str, fn: Callable[[], T]) -> T:
        s = self.settings
        for attempt in range(s.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not _transient(exc):
                    refused = _refusal(what, self.url, exc)
                    if refused is not None:
                        raise refused from exc
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

    def project_title(self, kind: str, scope: str = "") -> str:
        return project_title(self.settings.project_prefix, kind, scope)

    def ensure_project(self, kind: str, scope: str = "") -> int:
        """The project of ``kind`` for the store ``scope`` names (see
        :func:`annotate.render.project_title`), created if missing; its labelling config is
        brought up to date when it differs from :data:`annotate.render.LABEL_CONFIGS`."""
        cache = f"{scope}\0{kind}"
        if cache in self._projects:
            return self._projects[cache]
        title = self.project_title(kind, scope)
        listed: list[AllRolesProjectList] = self.call(
            "list projects", lambda: list(self.sdk.projects.list(title=title))
        )
        found = [p for p in listed if p.title == title]
        project: AllRolesProjectList | LseProjectCreate
        if found:
            project = found[0]
            if (project.label_config or "").strip() != LABEL_CONFIGS[kind].strip():
                self.call(
                    "update config",
                    lambda: self.sdk.projects.update(
                        id=sdk_id(project.id), label_config=LABEL_CONFIGS[kind]
                    ),
                )
                log.info("updated labelling config of project %s (%s)", project.id, kind)
        else:
            project = self.call(
                "create project",
                lambda: self.sdk.projects.create(
                    title=title,
                    label_config=LABEL_CONFIGS[kind],
                    description=(
                        "faceloop human review; answers are pulled by `faceloop review pull`."
                    ),
                    show_collab_predictions=True,
                    maximum_annotations=1,
                ),
            )
            log.info("created project %s (%s)", project.id, kind)
        self._projects[cache] = sdk_id(project.id)
        return self._projects[cache]

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Bulk-import ``tasks``; returns their ids in order."""
        # The SDK types ``request`` as its own models and leaves ``task_ids`` (returned when
        # return_task_ids=True) out of the response model: plain dicts in, extra field out.
        res = self.call(
            "import tasks",
            lambda: self.sdk.projects.import_tasks(
                id=project,
                request=tasks,  # type: ignore[arg-type]
                return_task_ids=True,
            ),
        )
        ids: list[int] = list(res.task_ids or [])  # type: ignore[attr-defined]
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
            for t in self.call("find task", partial(self._tasks, project, q)):
                if (t.data or {}).get(KEY_FIELD) == key:
                    out[key] = sdk_id(t.id)
        return out

    def changed_tasks(self, project: int, since: str | None) -> list[RoleBasedTask]:
        """Tasks of ``project`` updated after ``since`` (ISO-8601) that carry annotations,
        skipped ones included (Label Studio counts a skip in ``cancelled_annotations``, not in
        ``total_annotations``: a task only skipped was never pulled, nor its skip recorded)."""
        out: dict[int | None, RoleBasedTask] = {}
        for counter in ("total_annotations", "cancelled_annotations"):
            items: list[dict[str, Any]] = [
                {
                    "filter": f"filter:tasks:{counter}",
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
            for t in self.call("list changed tasks", partial(self._tasks, project, q)):
                out.setdefault(t.id, t)
        return list(out.values())

    def _tasks(self, project: int, query: str) -> list[RoleBasedTask]:
        """Every task of ``project`` matching the data-manager ``query`` (JSON), all fields."""
        return list(self.sdk.tasks.list(project=project, query=query, fields="all"))

    def delete_task(self, task_id: int) -> bool:
        """Delete a task with its annotations (``faceloop forget``); False when it was gone."""
        try:
            self.call("delete task", lambda: self.sdk.tasks.delete(id=str(task_id)))
        except LabelStudioError as exc:
            if exc.status_code == 404:
                # Gone, unless the URL is not Label Studio's API at all: then every task would
                # be taken for deleted and dropped from forget's pending record, crops kept.
                self._check_api(exc)
                return False
            raise
        return True

    def project_task_count(self, project: int) -> int | None:
        """How many tasks ``project`` holds; None when Label Studio has no such project (deleted
        in its UI, or a Label Studio whose database was replaced)."""
        try:
            found = self.call("get project", lambda: self.sdk.projects.get(id=project))
        except LabelStudioError as exc:
            if exc.status_code == 404:
                self._check_api(exc)
                # ensure_project looks it up (or creates it) again.
                self._projects = {k: v for k, v in self._projects.items() if v != project}
                return None
            raise
        return int(found.task_number or 0)

    def _check_api(self, not_found: LabelStudioError) -> None:
        """Raise when ``not_found`` (a 404) says the URL is not Label Studio's API rather than
        that the object is gone: a review.url with a wrong path (``.../labelstudio``) had every
        project taken for deleted (cursors reset, tasks "pushed again" that never were).
        Asked once per client: the answer does not change between two 404s."""
        if self._api_checked:
            return
        try:
            self.call(
                "list projects", lambda: next(iter(self.sdk.projects.list(page_size=1)), None)
            )
        except LabelStudioError as exc:
            raise LabelStudioError(
                f"review.url {self.url} does not answer as Label Studio's API "
                f"(GET {self.url}/api/projects: {exc.status_code}); check its scheme, host, port "
                "and path",
                exc.status_code,
            ) from not_found
        self._api_checked = True

    def task_ids(self, project: int) -> set[int]:
        """The ids of every task of ``project`` (one paged listing, no task data)."""
        tasks: list[RoleBasedTask] = self.call(
            "list tasks",
            lambda: list(self.sdk.tasks.list(project=project, fields="task_only")),
        )
        return {sdk_id(t.id) for t in tasks}

    def ensure_webhook(self, project: int, url: str, secret: str) -> int:
        """Register (once) a webhook that posts annotation events of ``project`` to ``url``."""
        hooks: list[Webhook] = self.call(
            "list webhooks", lambda: list(self.sdk.webhooks.list(project=str(project)))
        )
        for h in hooks:
            if h.url == url and getattr(h, "project", None) == project:
                return sdk_id(h.id)
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
        return sdk_id(h.id)
