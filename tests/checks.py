"""Assertions shared by the refresh tests of the local and the S3 store."""

from __future__ import annotations

from faceloop.config import Settings
from storage.objectstore import open_store
from storage.tables import faces_files
from tasks.summary import RunSummary


def assert_rerun_is_noop(settings: Settings) -> RunSummary:
    """Run the refresh again on unchanged sources: no new image, no model work, every faces file
    byte-identical and the same dataset versions. Returns the run's summary."""
    from flows.refresh import run_refresh
    from storage.versions import list_versions

    st = open_store(settings.store)
    before = {rel: st.read_bytes(rel) for rel in faces_files(st)}
    versions = list_versions(st, settings.dataset.name)
    summary = run_refresh(settings)
    assert summary.run.new_images == 0
    assert "faces_s" not in summary.timings, "no model work on a rerun"
    assert {rel: st.read_bytes(rel) for rel in faces_files(st)} == before
    assert list_versions(st, settings.dataset.name) == versions
    return summary
