"""Caches a refresh rebuilds (discovery's stamps, the label state) damaged or lost: a truncated
``tables/sources/stamps.parquet`` or ``state/label/units.parquet`` failed every refresh with a
bare "not a readable Parquet file", a deleted ``units.parquet`` with FileNotFoundError, and
doctor called a bad stamps file readable."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.plugins.samples import inline_settings


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_refresh_rebuilds_a_damaged_cache(tmp_path, sample_photos, model_root, damage, caplog):
    from faceloop.cli import main
    from faceloop.commands.evaluate import _refresh_inline
    from storage import layout
    from storage.objectstore import open_store
    from storage.recovery import finish_run, staging_runs
    from storage.tables import read_faces

    albums = tmp_path / "in" / "albums"
    for album, photos in (("X", ("t1", "players")), ("Y", ("yaoming", "players"))):
        (albums / album).mkdir(parents=True)
        for p in photos:
            shutil.copyfile(sample_photos[p], albums / album / f"{p}.jpg")
            os.utime(albums / album / f"{p}.jpg", (time.time() - 3600,) * 2)  # not "racy"
    settings = inline_settings(tmp_path / "store", model_root, album=albums)
    store = open_store(settings.store)
    _refresh_inline(settings, publish=True)
    before = sorted(
        (r["face_id"], r["status"], r["identity_id"]) for r in read_faces(store).to_pylist()
    )
    units = f"{layout.LABEL_STATE}/units.parquet"
    for rel in (layout.SOURCE_STAMPS, units):
        assert store.exists(rel), rel
        if damage == "truncate":
            data = store.read_bytes(rel)
            store.write_bytes(rel, data[: len(data) // 2])
        else:
            store.delete(rel)
    if damage == "truncate":
        assert main(["doctor", "--store", settings.store]) == 1
    shutil.copyfile(sample_photos["gdp"], albums / "Y" / "gdp.jpg")  # something new
    with caplog.at_level("WARNING"):
        _refresh_inline(settings, publish=True)
    if damage == "truncate":
        assert "ignoring the stamps cache" in caplog.text
        assert "its state is damaged" in caplog.text
    after = {r["face_id"]: r for r in read_faces(store).to_pylist()}
    for fid, status, identity in before:  # nothing decided before changed
        assert (after[fid]["status"], after[fid]["identity_id"]) == (status, identity)
    for run in staging_runs(store):  # (what the flow does after each run)
        finish_run(store, run)
    assert main(["doctor", "--store", settings.store]) == 0
