"""Prefect wrappers of human review: a ``push_review`` task (the refresh flow calls it after
labelling) and the ``faceloop-review-pull`` flow (scheduled, CLI, or triggered by the webhook).

The work lives in annotate/sync.py (plain functions, no Prefect there). Label Studio
errors are already retried with backoff inside the bridge; a flow that still fails leaves the
store consistent and the next run catches up (pull cursor moves only after answers are stored).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from faceloop.config import Settings, load_settings
from flows.heartbeat import no_wait_at_end
from flows.runlogs import run_logs
from storage.objectstore import open_store, use_store_modes

# Named, not ``__name__``: a deployment's worker loads this file by its path (prefect.yaml's
# entrypoint) as a module named "review", and flows/runlogs.py sends only its packages' loggers
# to the flow run's log (this module's warnings stayed on the worker's console).
log = logging.getLogger("flows.review")


def _run_log() -> Any:
    """The flow run's logger inside a flow run, this module's outside one (a direct call)."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


@task(name="push-review", cache_policy=NO_CACHE)
def push_review(settings: Settings) -> dict[str, Any]:
    """Push every status=review face with a task kind to Label Studio (idempotent).

    Returns the push counts; ``{"skipped": "review disabled"}`` when ``review.enabled`` is off.
    """
    from annotate.sync import push_review as push

    if not settings.review.enabled:
        return {"skipped": "review disabled"}
    result = push(settings, open_store(settings.store))
    get_run_logger().info(
        "review push: %d created, %d already there, not pushed %s",
        result.created,
        result.already_pushed,
        result.not_pushed,
    )
    return asdict(result)


@no_wait_at_end
@flow(name="faceloop-review-pull", validate_parameters=False)
def review_pull_flow(
    config: str | None = None, store: str | None = None, run_id: str | None = None
) -> dict[str, Any]:
    """Pull new answers, record them, apply, propagate; returns counts, including how many
    faces each answer settled (``settled_per_answer``: task key → faces)."""
    with run_logs():  # the stages' own warnings in the flow run's log (flows/runlogs.py)
        return _review_pull(config, store, run_id)


def _review_pull(config: str | None, store: str | None, run_id: str | None) -> dict[str, Any]:
    """:func:`review_pull_flow`'s body."""
    from annotate import server
    from faceloop.runids import new_run_id

    # A scheduled deployment has no CLI to hand the token over: the one `review up` wrote
    # (review.data_dir), as the refresh reads it.
    settings = load_settings(config, store=store)
    if not settings.review.enabled:
        # The deployment is scheduled whatever the config says (prefect.yaml): with review off
        # it failed every 10 minutes for want of a Label Studio token.
        # In the flow run's own log (a module logger's line reached no run log).
        _run_log().info("review pull: review is off (review.enabled: false): nothing to pull")
        return {"skipped": "review disabled"}
    settings = server.with_token(settings)
    use_store_modes(settings)
    rid = run_id or new_run_id()
    with review_lock(settings, rid):
        return _pull(settings, rid)


def review_lock(settings: Settings, run_id: str) -> AbstractContextManager[Any]:
    """The store lock for a review pull/apply (and its publish): one writer at a time."""
    from prefect.context import FlowRunContext

    from storage.lock import store_lock

    # Inside a flow run the wait shows in its log (the CLI's pull logs it to the console).
    in_flow = FlowRunContext.get() is not None
    return store_lock(
        open_store(settings.store),
        run_id,
        "review",
        wait_seconds=settings.lock.wait_seconds,
        lease_seconds=settings.lock.lease_seconds,
        on_wait=get_run_logger().warning if in_flow else None,
    )


def _pull(settings: Settings, rid: str) -> dict[str, Any]:
    from annotate.sync import pull_and_apply

    result = pull_and_apply(settings, open_store(settings.store), rid)
    # Counts only: task keys name ID-card subjects, faces and identities, which Prefect's log
    # table must not hold (README, Privacy).
    settled = [n for n in result.settled_per_answer.values() if n]
    get_run_logger().info(
        "review pull %s: %d new answers, %d of them settled %d faces, %d more faces settled "
        "near the identities they confirmed",
        rid,
        result.new_answers,
        len(settled),
        sum(settled),
        sum(result.propagated.values()),
    )
    out = {"run_id": rid, **asdict(result)}
    if result.publishes:
        # Human answers change labels: publish them now rather than at the next image refresh.
        out["dataset"] = publish_after_review(settings, rid)
    return out


def publish_after_review(settings: Settings, run_id: str) -> dict[str, Any] | None:
    """Publish a dataset version with the applied answers (None when nothing changed). Plain
    function: the pull flow, the CLI and the webhook path all call it."""
    from tasks.backends import model_infos
    from tasks.publish import publish_dataset
    from tasks.reembed import stored_embeddings_current, with_registered_model

    # The manifest names the recognizer the faces were embedded with: a registered one if any.
    infos = model_infos(with_registered_model(settings).models)
    models = [i.to_dict() for i in infos]
    store = open_store(settings.store)
    tag = next(i.tag for i in infos if i.role == "recognizer")
    if not stored_embeddings_current(store, tag):
        # A recognizer registered since the faces were embedded (or a re-embed cut short):
        # a version now would name it for faces it never embedded. The answers are applied;
        # the refresh that re-embeds the faces publishes them.
        log.warning(
            "not publishing after review: the stored faces are not (all) embedded with the "
            "current recognizer yet; the next refresh re-embeds them and publishes"
        )
        return None
    manifest = publish_dataset(settings, store, run_id, models)
    if manifest is None:
        return None
    log.info(
        "published %s v%d after review (%d faces)",
        manifest["name"],
        manifest["version"],
        manifest["num_rows"],
    )
    return {k: manifest[k] for k in ("name", "version", "num_rows", "num_classes")}
