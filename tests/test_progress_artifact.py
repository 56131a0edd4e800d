"""The refresh's progress artifact moves at most every PROGRESS_MIN_INTERVAL_S seconds at a
stage's end, and always to 100% at the run's end (flows/refresh.py, ``_Progress``)."""

from __future__ import annotations

from uuid import UUID

import pytest


@pytest.fixture
def counted_updates(monkeypatch):
    """The real ``update_progress_artifact``, with its calls recorded."""
    import flows.refresh as refresh

    calls: list[float] = []
    real = refresh.update_progress_artifact

    def update(artifact_id, progress, **kw):
        calls.append(progress)
        return real(artifact_id, progress, **kw)

    monkeypatch.setattr(refresh, "update_progress_artifact", update)
    return calls


def _artifact_progress(artifact_id: str) -> float:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[UUID(artifact_id)]))
        )
    return float(art.data)


def _run_stages(stages: list[str]):
    """The artifact of a flow run that ends ``stages`` and then finishes (its id, as a str)."""
    from prefect import flow

    from flows.refresh import _Progress

    @flow(name="progress-test")
    def stages_flow() -> str:
        progress = _Progress("run-test")
        assert progress.artifact is not None
        for stage in stages:
            progress.done(stage, "0 things", 0.0)
        progress.finish(None)  # type: ignore[arg-type]
        return str(progress.artifact)

    return stages_flow()


def test_quick_stages_move_the_artifact_once_at_the_end(prefect_server, counted_updates):
    artifact = _run_stages(["re-embed", "discover", "faces", "label", "publish"])
    assert counted_updates == [100.0]  # every stage ended within the interval; the end moved it
    assert _artifact_progress(artifact) == 100.0


def test_a_stage_ending_after_the_interval_moves_it(prefect_server, counted_updates, monkeypatch):
    import flows.refresh as refresh

    monkeypatch.setattr(refresh, "PROGRESS_MIN_INTERVAL_S", 0.0)
    artifact = _run_stages(["discover", "faces"])
    assert counted_updates == [10.0, 70.0, 100.0]
    assert _artifact_progress(artifact) == 100.0
