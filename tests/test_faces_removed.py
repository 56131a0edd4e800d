"""Faces files that leave the store, and publish's check for those lost outside faceloop
(tasks/publish._refuse_vanished_files):

- a subject folder renamed after a publish: the label commit removes the old subject's faces
  file (its faces moved), and every later refresh refused to publish, asking to restore a file
  faceloop had deleted itself;
- a faces file deleted by hand on a store with one published version: the first publish had
  cached no file (all were written just before it), so the next one dropped the file's faces
  from the training set without a word."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.plugins.samples import inline_settings


def _demo_inputs(tmp_path: Path, model_root: Path, copies: int) -> Path:
    """The demo's sample albums and ID-card subjects under ``tmp_path/in``."""
    from faceloop.config import ModelSettings
    from faceloop.demo import build_demo_inputs
    from tasks.backends import load_backend

    detect = load_backend(ModelSettings(root=str(model_root))).detect
    build_demo_inputs(tmp_path / "in", detect, copies=copies, bad_files=False)
    return tmp_path / "in"


def test_a_renamed_subject_folder_publishes(tmp_path, model_root):
    from faceloop.commands.evaluate import _refresh_inline
    from storage.objectstore import open_store
    from storage.tables import faces_rel, faces_removed, read_faces

    ids = _demo_inputs(tmp_path, model_root, copies=1) / "idcards"
    settings = inline_settings(tmp_path / "store", model_root, idcard=ids)
    store = open_store(settings.store)
    _refresh_inline(settings, publish=True)
    assert store.exists(faces_rel("idcard", "S002"))
    shutil.move(ids / "S002", ids / "S002b")
    _refresh_inline(settings, publish=True)  # refused before: "faces files ... are gone"
    groups = {r["source_group"] for r in read_faces(store, columns=["source_group"]).to_pylist()}
    assert "S002b" in groups and "S002" not in groups
    assert faces_removed(store) == {faces_rel("idcard", "S002")}
    _refresh_inline(settings, publish=True)
    shutil.move(ids / "S002b", ids / "S002")  # back: the file is written again, off the record
    _refresh_inline(settings, publish=True)
    assert faces_rel("idcard", "S002") not in faces_removed(store)


def test_a_faces_file_lost_after_the_first_publish_is_refused(tmp_path, sample_photos, model_root):
    from faceloop.commands.evaluate import _refresh_inline
    from faceloop.errors import StorageError
    from storage.objectstore import open_store
    from storage.tables import faces_rel, read_faces

    albums = _demo_inputs(tmp_path, model_root, copies=2) / "albums"
    settings = inline_settings(tmp_path / "store", model_root, album=albums)
    store = open_store(settings.store)
    _refresh_inline(settings, publish=True)
    auto = sorted(
        {
            r["source_group"]
            for r in read_faces(store, columns=["source_group", "status"]).to_pylist()
            if r["status"] == "auto"
        }
    )
    assert auto
    store.delete(faces_rel("album", auto[0]))
    (albums / "new").mkdir()
    shutil.copyfile(sample_photos["gdp"], albums / "new" / "0.jpg")
    with pytest.raises(StorageError, match="gone from the store"):
        _refresh_inline(settings, publish=True)


def test_a_faces_file_lost_after_a_forget_is_refused(tmp_path, sample_photos, model_root):
    """`faceloop forget` drops publish's keys cache (it names face and identity ids): a faces
    file deleted by hand after any forget was then dropped from the next version without a
    word. The files the cache guarded are guarded through the forget."""
    from faceloop.cli import main
    from faceloop.commands.evaluate import _refresh_inline
    from faceloop.errors import StorageError
    from storage import layout
    from storage.objectstore import open_store
    from storage.tables import faces_rel, read_faces, read_images

    albums = _demo_inputs(tmp_path, model_root, copies=2) / "albums"
    settings = inline_settings(tmp_path / "store", model_root, album=albums)
    store = open_store(settings.store)
    _refresh_inline(settings, publish=True)
    faces = read_faces(store, columns=["source_group", "status", "image_uri"]).to_pylist()
    auto = sorted({r["source_group"] for r in faces if r["status"] == "auto"})
    assert len(auto) >= 2
    photo = next(r["image_uri"] for r in faces if r["source_group"] == auto[1])
    assert main(["forget", "--store", settings.store, "--image", photo, "--yes"]) == 0
    assert not store.exists(layout.published_keys("faces"))
    assert store.exists(layout.published_files("faces"))
    store.delete(faces_rel("album", auto[0]))
    with pytest.raises(StorageError, match="gone from the store"):
        _refresh_inline(settings, publish=True)
    assert read_images(store).num_rows  # (the refused publish changed nothing)
