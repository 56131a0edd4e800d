"""Run ids sort by the time their runs start, to the microsecond, and a refresh that took the
store lock after a later-named run wrote it is renamed after that run (faceloop/runids.py)."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pyarrow as pa
import pytest

from faceloop.runids import RUN_ID, checked_run_id, new_run_id, run_id_time
from faceloop.schema import IMAGES_SCHEMA
from storage.objectstore import open_store
from storage.tables import append_images, image_runs, latest_images


def test_ids_issued_in_one_instant_sort_in_the_order_they_were_issued():
    ids = [new_run_id() for _ in range(2000)]  # many within one microsecond's clock tick
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(RUN_ID.match(i) for i in ids)
    t = run_id_time(ids[0])
    assert t is not None and abs((dt.datetime.now(dt.UTC) - t).total_seconds()) < 60


@pytest.mark.parametrize(
    "after",
    [
        "20990101T000000Z-abcdef",  # the older whole-second form sorts after its second's ids
        "20990101T000000999999Z-abcdef",
    ],
)
def test_an_id_made_after_another_sorts_after_it_whatever_the_clock_says(after, monkeypatch):
    import faceloop.runids as runids

    monkeypatch.setattr(runids, "_last_issued", None)  # the 2099 floor stays in this test
    new = new_run_id(after=after)
    assert new > after and RUN_ID.match(new)
    assert run_id_time(new) == dt.datetime(2099, 1, 1, 0, 0, 1, tzinfo=dt.UTC)


def test_run_id_time_reads_both_forms_and_nothing_else():
    assert run_id_time("20261206T140024Z-a1b2c3") == dt.datetime(
        2026, 12, 6, 14, 0, 24, tzinfo=dt.UTC
    )
    assert run_id_time("20261206T140024000123Z-a1b2c3") == dt.datetime(
        2026, 12, 6, 14, 0, 24, 123, tzinfo=dt.UTC
    )
    assert run_id_time("nightly-7") is None and run_id_time("") is None


def test_a_run_id_handed_in_must_have_the_sortable_form():
    assert checked_run_id("20261206T140024Z-a1b2c3") == "20261206T140024Z-a1b2c3"
    for bad in ("nightly-7", "r1", "20261206T140024Z", "20261206T140024Z-A1B2C3"):
        with pytest.raises(ValueError, match="not a faceloop run id"):
            checked_run_id(bad)


def _images(uri: str, status: str) -> pa.Table:
    return pa.Table.from_pylist(
        [{"image_uri": uri, "image_sha256": "0" * 64, "status": status}], schema=IMAGES_SCHEMA
    )


def test_a_refresh_that_waited_while_a_later_named_one_wrote_is_renamed_after_it(
    tmp_path: Path, caplog
):
    """Run A is named, then run B; B takes the lock first and records a file. A's rows must
    not sort before B's: A is renamed after B when it holds the lock."""
    from flows.refresh import _after_committed_runs

    store = open_store(str(tmp_path / "store"))
    a, b = new_run_id(), new_run_id()
    assert _after_committed_runs(store, a) == a  # an empty store: nothing to sort after
    append_images(store, b, _images("/in/x.jpg", "old"))
    logger = logging.getLogger("flows.refresh")  # Prefect's logging setup may not propagate
    logger.addHandler(caplog.handler)
    try:
        renamed = _after_committed_runs(store, a)
    finally:
        logger.removeHandler(caplog.handler)
    assert renamed > b and RUN_ID.match(renamed)
    assert f"run {a} sorts before run {b}" in caplog.text and renamed in caplog.text
    append_images(store, renamed, _images("/in/x.jpg", "new"))
    assert latest_images(store).column("status").to_pylist() == ["new"]
    assert sorted(image_runs(store)) == [b, renamed]
    # A run id whose images are recorded is a run that committed: another run given it (a
    # re-run notebook cell, a deployment run's run_id given twice) replaced its images file
    # and lost its rows. It is recorded under a new id.
    again = _after_committed_runs(store, renamed)
    assert again > renamed and RUN_ID.match(again)


def test_the_refresh_flow_refuses_a_run_id_of_another_form(tmp_path: Path):
    from flows.refresh import refresh_flow

    with pytest.raises(ValueError, match="not a faceloop run id"):
        refresh_flow.fn(store=str(tmp_path / "store"), run_id="nightly-7")


def test_the_stages_refuse_a_run_id_that_cannot_name_files_before_any_work(tmp_path: Path):
    """A library user calling the stages with their scheduler's run ids (Airflow's
    ``manual__2026-12-07T10:00:00+00:00``) got through discovery and the model work and failed
    only when the run's tables were committed; a work list named with a typo was read as an
    empty one ("no faces")."""
    from faceloop.config import SourceSpec, load_settings
    from faceloop.errors import ConfigError
    from tasks.discover import discover
    from tasks.label import label_run
    from tasks.ray_faces import run_face_stage

    (tmp_path / "albums" / "a").mkdir(parents=True)
    settings = load_settings(
        None,
        store=str(tmp_path / "store"),
        sources=[SourceSpec(kind="album", uri=str(tmp_path / "albums"))],
        review={"enabled": False},
    )
    st = open_store(settings.store)
    bad = "manual__2026-12-07T10:00:00+00:00"
    with pytest.raises(ConfigError, match="new_run_id"):
        discover(settings, st, bad)
    with pytest.raises(ConfigError, match="cannot name the run's files"):
        label_run(settings, st, bad, None, [])
    with pytest.raises(ConfigError):
        run_face_stage(settings, st, "staging/x/pending.parquet", bad, 1)
    with pytest.raises(FileNotFoundError, match="work list"):
        run_face_stage(settings, st, "staging/typo/pending.parquet", new_run_id(), 26)
    assert not list(st.list("staging"))
