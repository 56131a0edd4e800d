"""Thin Prefect tasks over the plain functions in tasks/. Retries only where I/O can be transient.

Tasks hand each other store-relative paths and small dataclasses, never arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from faceloop.config import Settings
from faceloop.errors import TransientStorageError
from storage.objectstore import open_store

if TYPE_CHECKING:  # the stages are imported lazily: a flow module loads no models or Ray
    from tasks.discover import DiscoverResult
    from tasks.label import LabelResult
    from tasks.ray_faces import FaceStageResult


def _transient(task: Any, task_run: Any, state: State) -> bool:
    try:
        state.result()
    except TransientStorageError:
        return True
    except Exception:
        return False
    return False


@task(
    name="discover",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_transient,
)
def discover_step(
    settings: Settings,
    run_id: str,
    on_hashing: Callable[[int], None] | None = None,
    rehash: bool = False,
) -> DiscoverResult:
    from tasks.discover import discover

    return discover(settings, open_store(settings.store), run_id, on_hashing, rehash=rehash)


@task(name="detect-align-embed", cache_policy=NO_CACHE)
def faces_step(settings: Settings, run_id: str, pending_rel: str, n_images: int) -> FaceStageResult:
    from tasks.ray_faces import run_face_stage

    return run_face_stage(settings, open_store(settings.store), pending_rel, run_id, n_images)


@task(name="label", cache_policy=NO_CACHE)
def label_step(
    settings: Settings,
    run_id: str,
    detections_rel: str | None,
    quarantined_rows: list[dict],
    relabel_all: bool = False,
) -> LabelResult:
    from tasks.label import label_run

    return label_run(
        settings, open_store(settings.store), run_id, detections_rel, quarantined_rows, relabel_all
    )


@task(name="re-embed", cache_policy=NO_CACHE)
def reembed_step(settings: Settings, recognizer_tag: str) -> int:
    """Re-embed stored faces of another recognizer than ``recognizer_tag`` (this run's: a
    registered or built-in one, or the backend's own)."""
    from tasks.reembed import note_recognizer, reembed_store

    store = open_store(settings.store)
    if note_recognizer(store, recognizer_tag):  # one read of the record, not one per function
        return 0
    return reembed_store(settings, store, recognizer_tag)


@task(
    name="publish",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=_transient,
)
def publish_step(
    settings: Settings, run_id: str, models: list[dict]
) -> tuple[dict[str, Any] | None, int]:
    """(the new version's manifest or None, how many Ray nodes wrote its shards: 0 when they
    were written in this process)."""
    from tasks.publish import publish_dataset

    nodes: set[str] = set()
    manifest = publish_dataset(settings, open_store(settings.store), run_id, models, nodes=nodes)
    return manifest, len(nodes)
