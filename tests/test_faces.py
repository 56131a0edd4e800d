"""tasks/faces.py: PENDING rows -> DETECTIONS rows with real models, bad inputs, EXIF, Arrow."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from faceloop.config import DEFAULT_RECOGNIZER, ModelSettings, Settings
from faceloop.modelstore import BUILTIN_RECOGNIZERS
from faceloop.schema import DETECTIONS_SCHEMA, PENDING_SCHEMA
from tasks import faces as faces_mod
from tasks.backends import detect_padded_many, load_backend
from tasks.faces import FaceProcessor, face_id_for, process_images, rows_to_columns
from tests.plugins.samples import BAD_FILE_LIMITS

EDGEFACE = BUILTIN_RECOGNIZERS[DEFAULT_RECOGNIZER]


def _settings(model_root: Path, backend: str = "insightface") -> Settings:
    return Settings(
        models=ModelSettings(backend=backend, root=str(model_root)), limits=BAD_FILE_LIMITS
    )


def _row(path: Path | str, role: str = "album", group: str = "a1") -> dict:
    p = Path(str(path).removeprefix("file://"))
    data = p.read_bytes() if p.is_file() else b""
    return {
        "image_uri": str(path),
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "source_kind": "idcard" if role != "album" else "album",
        "source_group": group,
        "role": role,
        "run_id": "r1",
    }


@pytest.fixture(scope="module")
def insight(model_root):
    return load_backend(ModelSettings(backend="insightface", root=str(model_root)))


def _exif_rotated_copy(src: Path, dst: Path) -> None:
    """Store the photo rotated 90 degrees CCW with an EXIF tag that says 'rotate back'."""
    upright = Image.open(src).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(dst, "JPEG", quality=85, exif=exif.tobytes())


def _id_chip(t1: Path, dst: Path, backend) -> None:
    bgr = cv2.imread(str(t1))
    x1, y1, x2, y2 = backend.detect(bgr).boxes[0]
    cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1
    tight = bgr[int(cy - 0.6 * s) : int(cy + 0.65 * s), int(cx - 0.5 * s) : int(cx + 0.5 * s)]
    cv2.imwrite(str(dst), cv2.resize(tight, (102, 126), interpolation=cv2.INTER_AREA))


def test_batch_with_faces_bad_files_exif_and_id_chip(
    tmp_path, model_root, sample_photos, bad_files, insight
):
    settings = _settings(model_root)
    rotated = tmp_path / "rotated.jpg"
    _exif_rotated_copy(sample_photos["t1"], rotated)
    chip = tmp_path / "id.jpg"
    _id_chip(sample_photos["t1"], chip, insight)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (128, 128, 128)).save(blank)
    bad = bad_files()
    rows = [_row(sample_photos["t1"])]
    rows += [_row(p) for p in bad.values()]
    rows += [
        _row("file://" + str(rotated)),
        _row(chip, role="id", group="s1"),
        _row(blank),
        _row(tmp_path / "gone.jpg"),
    ]
    timings: dict[str, float] = {}
    out = process_images(rows, insight, settings, timings)

    by_uri: dict[str, list[dict]] = {}
    for r in out:
        by_uri.setdefault(r["image_uri"], []).append(r)
    assert len(by_uri) == len(rows)  # every input image is accounted for

    t1 = by_uri[str(sample_photos["t1"])]
    assert len(t1) == 6 and [r["face_index"] for r in t1] == list(range(6))
    assert all(r["image_status"] == "ok" and r["n_faces"] == 6 for r in t1)
    assert (t1[0]["width"], t1[0]["height"]) == (1280, 886)
    assert len({r["face_id"] for r in t1}) == 6
    assert t1[0]["face_id"] == face_id_for(rows[0]["image_sha256"], np.array(t1[0]["bbox"]))
    for r in t1:
        assert len(r["embedding"]) == 512 and abs(np.linalg.norm(r["embedding"]) - 1) < 1e-4
        crop = cv2.imdecode(np.frombuffer(r["aligned_jpeg"], np.uint8), cv2.IMREAD_COLOR)
        assert crop.shape == (112, 112, 3)
        assert 0 <= r["quality"] <= 1 and r["face_px"] > 20 and r["blur"] > 0
        # The insightface backend's default recognizer, EdgeFace-S, with its pinned sha256.
        assert r["model"] == f"{EDGEFACE.file}@sha256:{EDGEFACE.sha256}"
        assert r["detector"].startswith("scrfd_500m_bnkps.onnx@sha256:")

    # Every broken file: one quarantined row with its reason code; the batch went on.
    for reason, path in bad.items():
        (r,) = by_uri[str(path)]
        assert r["image_status"] == "quarantined" and r["face_index"] == -1
        assert r["image_reason"].startswith(reason + ":"), r["image_reason"]
        assert r["embedding"] is None and r["face_id"] is None
    (gone,) = by_uri[str(tmp_path / "gone.jpg")]
    assert gone["image_reason"].startswith("vanished:")  # as discovery names it
    assert gone["image_sha256"] == "unread:vanished"  # read again by the next refresh
    (b,) = by_uri[str(blank)]
    assert (
        b["image_status"] == "no_face"
        and b["image_reason"] == "no_face: detector found nothing above 0.50"
        and (b["width"], b["height"]) == (320, 240)
    )

    # EXIF: the stored pixels are rotated, the upright image is t1 again: same faces, same boxes.
    rot = by_uri["file://" + str(rotated)]
    assert rot[0]["image_status"] == "ok", rot[0]["image_reason"]
    assert len(rot) == 6 and (rot[0]["width"], rot[0]["height"]) == (1280, 886)
    for a, b_ in zip(
        sorted(t1, key=lambda r: r["bbox"][0]),
        sorted(rot, key=lambda r: r["bbox"][0]),
        strict=False,
    ):
        assert np.abs(np.array(a["bbox"]) - np.array(b_["bbox"])).max() < 6
        assert float(np.dot(a["embedding"], b_["embedding"])) > 0.9

    # ID chip: a 102x126 tight crop, found thanks to padding, bbox in chip pixels.
    (idr,) = by_uri[str(chip)]
    assert idr["image_status"] == "ok" and (idr["width"], idr["height"]) == (102, 126)
    assert -15 < idr["bbox"][0] < 30 and 72 < idr["bbox"][2] < 117
    same = max(float(np.dot(idr["embedding"], r["embedding"])) for r in t1)
    assert same > 0.5

    assert timings["images"] == len(rows) and timings["faces"] == 6 + 6 + 1
    assert all(timings[k] > 0 for k in ("decode", "detect", "align", "embed"))

    table = pa.Table.from_pydict(rows_to_columns(out), schema=DETECTIONS_SCHEMA)
    assert table.num_rows == len(out)


def test_batched_detection_gives_the_same_rows_in_the_same_order(
    tmp_path, model_root, sample_photos, bad_files, insight, monkeypatch
):
    """models.det_batch > 1 (the GPU layout; here on CPU, padded calls too): images are decoded,
    detected and finished in chunks, and every row comes out as with one image per call: same
    order, statuses, reasons, boxes and embeddings, bad files and the padded retry included."""
    chip = tmp_path / "id.jpg"
    _id_chip(sample_photos["t1"], chip, insight)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (320, 240), (128, 128, 128)).save(blank)
    rows = [_row(p) for p in sample_photos.values()]
    rows.insert(1, _row(next(iter(bad_files().values()))))
    rows += [_row(chip, role="id", group="s1"), _row(blank), _row(tmp_path / "gone.jpg")]
    want = process_images(rows, insight, _settings(model_root))
    settings = _settings(model_root)
    settings.models.det_batch = 3
    settings.models.fixed_shapes = True
    batched = load_backend(settings.models)
    timings: dict[str, float] = {}
    got = process_images(rows, batched, settings, timings)
    assert [(r["image_uri"], r["face_index"], r["image_status"]) for r in got] == [
        (r["image_uri"], r["face_index"], r["image_status"]) for r in want
    ]
    assert [r["image_reason"] for r in got] == [r["image_reason"] for r in want]
    assert sum(r["face_index"] >= 0 for r in got) >= 10
    for a, b in zip(want, got, strict=True):
        if a["face_index"] < 0:
            continue
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-2)
        if a["embedding"] is not None:
            assert float(np.dot(a["embedding"], b["embedding"])) > 0.9999
    assert timings["images"] == len(rows)
    # The same with uint8 pixels into the detector (models.det_uint8, on with CUDA): the rows
    # of the float input, to the bit on this CPU provider.
    settings.models.det_uint8 = True
    u8 = process_images(rows, load_backend(settings.models), settings)
    assert [(r["face_id"], r["image_status"], r["image_reason"]) for r in u8] == [
        (r["face_id"], r["image_status"], r["image_reason"]) for r in got
    ]
    for a, b in zip(got, u8, strict=True):
        assert a["bbox"] == b["bbox"]
        assert (a["embedding"] is None) == (b["embedding"] is None)
        if a["embedding"] is not None:
            assert np.array_equal(np.asarray(a["embedding"]), np.asarray(b["embedding"]))
    settings.models.det_uint8 = None
    # A decoded-bytes budget that every image exceeds: chunks of one decoded image (plus the
    # quarantined rows before it), the same rows again.
    monkeypatch.setattr(faces_mod, "CHUNK_DECODED_BYTES", 1)
    again = process_images(rows, batched, settings)
    assert [(r["image_uri"], r["face_index"], r["face_id"]) for r in again] == [
        (r["image_uri"], r["face_index"], r["face_id"]) for r in got
    ]


def _frame_filling_face_with_bystander(t1: Path, dst: Path, backend) -> None:
    """A 250x250 live capture: one face of t1 cropped tight and filling the frame (the
    detector's anchors miss it unless the image is padded), another face of t1 pasted small in
    the top-right corner, as a bystander behind the subject."""
    bgr = cv2.imread(str(t1))
    d = backend.detect(bgr)
    a, b = np.argsort(-(d.boxes[:, 2] - d.boxes[:, 0]))[:2]
    x1, y1, x2, y2 = d.boxes[a]
    cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1
    img = cv2.resize(
        bgr[int(cy - 0.55 * s) : int(cy + 0.6 * s), int(cx - 0.5 * s) : int(cx + 0.5 * s)],
        (250, 250),
        interpolation=cv2.INTER_CUBIC,
    )
    x1, y1, x2, y2 = d.boxes[b]
    cx, cy, s = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1
    by = bgr[int(cy - 0.9 * s) : int(cy + 0.9 * s), int(cx - 0.9 * s) : int(cx + 0.9 * s)]
    img[0:80, 170:250] = cv2.resize(by, (80, 80), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(dst), img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def test_a_live_photo_keeps_its_frame_filling_face_beside_a_bystander(
    tmp_path, model_root, sample_photos, insight
):
    """A live capture whose own face fills the frame, with a small face behind it: the first
    pass finds only the bystander (so the no-face retry does not run); a padded pass adds the
    subject's face, and both come out. An album photo is detected as before."""
    live = tmp_path / "live.jpg"
    _frame_filling_face_with_bystander(sample_photos["t1"], live, insight)
    first = detect_padded_many(insight, [cv2.imread(str(live))], [False])[0]
    assert len(first) == 1 and not first.covers(125, 125)  # what the fix is for

    settings = _settings(model_root)
    got = process_images([_row(live, role="live", group="s1")], insight, settings)
    faces = [r for r in got if r["face_index"] >= 0]
    assert len(faces) == 2
    x1, y1, x2, y2 = np.array([r["bbox"] for r in faces]).T
    inside = (x1 <= 125) & (x2 >= 125) & (y1 <= 125) & (y2 >= 125)
    centre = [r for r, c in zip(faces, inside, strict=True) if c]
    assert len(centre) == 1 and centre[0]["embedding"] is not None
    corner = next(r for r in faces if r is not centre[0])
    assert corner["face_index"] == 0 and corner["bbox"] == first.boxes[0].tolist()  # as it was
    # The face found is the subject's: its embedding is nearest that person's face in t1.
    t1 = [
        r for r in process_images([_row(sample_photos["t1"])], insight, settings) if r["embedding"]
    ]
    sims = [float(np.dot(centre[0]["embedding"], r["embedding"])) for r in t1]
    widths = [r["bbox"][2] - r["bbox"][0] for r in t1]
    assert int(np.argmax(sims)) == int(np.argmax(widths)) and max(sims) > 0.5

    album = process_images([_row(live)], insight, settings)
    assert [r["face_index"] for r in album] == [0]  # albums: no extra pass


def test_all_faces_of_a_batch_are_embedded_in_one_call(model_root, sample_photos, insight):
    calls: list[int] = []

    class Counting:  # delegates to the real backend, counts recognizer calls
        def __getattr__(self, name):
            return getattr(insight, name)

        def embed(self, crops):
            calls.append(len(crops))
            return insight.embed(crops)

    rows = [_row(sample_photos["t1"]), _row(sample_photos["yaoming"]), _row(sample_photos["gdp"])]
    settings = _settings(model_root)
    out = process_images(rows, Counting(), settings)
    faces = [r for r in out if r["face_index"] >= 0]
    embedded = [r for r in faces if r["embedding"] is not None]
    assert calls == [len(embedded)] and len(embedded) >= 8
    # Only faces the label stage rejects before clustering go without an embedding ...
    qs = settings.quality
    assert all(
        r["face_px"] < qs.min_face_px or r["quality"] < qs.min_quality
        for r in faces
        if r["embedding"] is None
    )
    # ... and models.embed_gated embeds them too.
    calls.clear()
    settings.models.embed_gated = True
    out = process_images(rows, Counting(), settings)
    assert calls == [sum(r["face_index"] >= 0 for r in out)] and all(
        r["embedding"] is not None for r in out if r["face_index"] >= 0
    )


@pytest.mark.parametrize("backend", ["insightface", "opencv"])
def test_face_processor_numpy_batch_to_arrow(backend, model_root, sample_photos, bad_files):
    settings = _settings(model_root, backend)
    proc = FaceProcessor(settings.model_dump())
    rows = [_row(sample_photos["t1"]), _row(bad_files()["truncated"])]
    batch = {
        c: np.array([r[c] for r in rows], dtype=object if c != "size_bytes" else np.int64)
        for c in PENDING_SCHEMA.names
    }
    out = proc(batch)
    table = pa.Table.from_pydict(out, schema=DETECTIONS_SCHEMA)
    assert table.num_rows == 7
    assert table.column("image_status").to_pylist().count("ok") == 6
    dim = 512 if backend == "insightface" else 128
    assert {len(e) for e in table.column("embedding").to_pylist() if e is not None} == {dim}
    assert proc.timings["faces"] == 6 and proc.timings["embed"] > 0
    # Same input, same ids: face_id is stable across runs.
    again = proc(batch)
    assert again["face_id"] == out["face_id"]
    arrow_out = FaceProcessor(settings.model_dump(), output="arrow")(
        pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)
    )
    assert arrow_out.schema.equals(DETECTIONS_SCHEMA) and arrow_out.num_rows == 7


def test_face_processor_writes_each_batch_once_under_a_name_of_its_images(
    model_root, sample_photos, bad_files, tmp_path
):
    """With ``output_rel`` the actor writes its batch's detections to the store and returns
    the row count; the part is named by the batch's images, so a batch run again (Ray retrying
    it on a new worker) replaces its part instead of duplicating its rows."""
    from storage.format import check_and_record
    from storage.objectstore import open_store
    from tasks.faces import detections_part_rel

    settings = _settings(model_root).model_copy(update={"store": str(tmp_path / "store")})
    rows = [_row(sample_photos["t1"]), _row(bad_files()["truncated"])]
    batch = pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)
    folder = "staging/r1/detections"
    proc = FaceProcessor(settings.model_dump(mode="json"), output="arrow", output_rel=folder)
    assert proc(batch).to_pylist() == [{"rows": 7}]
    assert proc(batch).to_pylist() == [{"rows": 7}]  # again: the same part, replaced
    store = open_store(settings.store)
    assert store.parquet_files(folder) == [detections_part_rel(folder, rows)]
    written = store.read_parquet(folder)
    expected = FaceProcessor(settings.model_dump(mode="json"), output="arrow")(batch)
    assert written.schema.equals(DETECTIONS_SCHEMA)
    assert written.equals(expected)
    # Another batch, another part; the name follows the images, not their order in a run.
    assert detections_part_rel(folder, rows[:1]) != detections_part_rel(folder, rows)
    # A batch still running on a cluster's node after its run stopped (its staging, work list
    # included, removed) wrote its part into a staging no one would clean up but the next run.
    alive = "staging/r2/pending.parquet"
    check_and_record(store)  # as every writer does when it takes the lock (the store is there)
    store.write_bytes(alive, b"work list")
    late = FaceProcessor(
        settings.model_dump(mode="json"),
        output="arrow",
        output_rel="staging/r2/detections",
        alive_rel=alive,
    )
    assert late(batch).to_pylist() == [{"rows": 7}]
    store.delete_prefix("staging/r2")
    assert late(batch).to_pylist() == [{"rows": 0}]
    assert not store.list("staging/r2")


def test_face_processor_on_a_node_that_cannot_see_the_store_fails_its_batch(
    model_root, sample_photos, bad_files, tmp_path, caplog
):
    """A Ray node that could not see the store (not mounted there: another folder at its path)
    found the run's work list missing, took the run for stopped and wrote nothing: the refresh
    ended with exit 0 and that node's share of the images not processed, the only trace a
    warning in the node's worker log. The batch fails, naming the store and the node; a run
    that really stopped (its staging removed from a store the node sees) stays quiet."""
    import socket

    from faceloop.errors import StorageError
    from storage.format import check_and_record
    from storage.objectstore import open_store

    settings = _settings(model_root).model_copy(update={"store": str(tmp_path / "store")})
    rows = [_row(sample_photos["t1"]), _row(bad_files()["truncated"])]
    batch = pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)
    store = open_store(settings.store)
    check_and_record(store)  # every writer records the store's format as it takes the lock
    alive = "staging/r3/pending.parquet"
    store.write_bytes(alive, b"work list")
    # The node's view: the store's path holds an empty folder (a mount missing on that node).
    blind = settings.model_copy(update={"store": str(tmp_path / "node2" / "store")})
    (tmp_path / "node2" / "store").mkdir(parents=True)
    proc = FaceProcessor(
        blind.model_dump(mode="json"),
        output="arrow",
        output_rel="staging/r3/detections",
        alive_rel=alive,
    )
    with pytest.raises(StorageError, match="not reachable from this node") as err:
        proc(batch)
    assert socket.gethostname() in str(err.value) and blind.store in str(err.value)
    assert not open_store(blind.store).list("staging")  # nothing written on the node's side
    # The same node seeing the store, its run stopped: no part, no error.
    seeing = FaceProcessor(
        settings.model_dump(mode="json"),
        output="arrow",
        output_rel="staging/r3/detections",
        alive_rel=alive,
    )
    store.delete_prefix("staging/r3")
    assert seeing(batch).to_pylist() == [{"rows": 0}]
    assert not store.list("staging/r3")


def test_idcard_flip_averages_id_card_faces_with_their_mirror_image(
    model_root, sample_photos, insight
):
    """models.idcard_flip: ID-card faces are embedded as the mean of the crop and its mirror
    image (in the same recognizer call); album faces keep their plain embedding."""
    from faceloop.arrays import l2_normalize
    from tasks.align import align_face
    from tasks.decode import decode_image, rgb_to_bgr

    rows = [_row(sample_photos["t1"]), _row(sample_photos["t1"], role="live", group="s1")]
    settings = _settings(model_root)
    assert settings.models.idcard_flip_on()  # insightface: on by default
    assert not ModelSettings(backend="opencv").idcard_flip_on()  # calibrated without it
    settings.models.idcard_flip = False
    plain = [r for r in process_images(rows, insight, settings) if r["face_index"] == 0]
    settings.models.idcard_flip = True
    flipped = [r for r in process_images(rows, insight, settings) if r["face_index"] == 0]
    album0, live0 = plain
    album1, live1 = flipped
    assert album1["embedding"] == album0["embedding"]  # album faces: untouched
    assert live0["embedding"] == album0["embedding"]  # same photo, same face
    cos = float(np.dot(live0["embedding"], live1["embedding"]))
    assert 0.8 < cos < 0.9999  # a different vector, of the same face
    # It is exactly the normalised mean of the crop's and its mirror's embeddings.
    bgr = rgb_to_bgr(decode_image(Path(sample_photos["t1"]).read_bytes(), settings.limits))
    crop = align_face(bgr, np.asarray(live1["landmarks"], np.float32).reshape(5, 2))
    e = insight.embed([crop, np.ascontiguousarray(crop[:, ::-1])])
    want = l2_normalize(e[0] + e[1])
    np.testing.assert_allclose(live1["embedding"], want, atol=2e-3)
    assert abs(float(np.linalg.norm(live1["embedding"])) - 1) < 1e-5


# Decoded (a side of 10 px or more, at most 1:100) and not (tasks.decode.HoldsNoFace).
SHAPES = [(15, 1500), (1500, 15), (40, 4000), (10, 10), (10, 20000), (20000, 10), (1, 1), (1, 5000)]
SHAPES += [(5000, 1), (3, 3), (2, 9000)]


@pytest.mark.parametrize(
    ("backend", "det_input"),
    [("insightface", "square"), ("insightface", "fit"), ("insightface", "image"), ("opencv", None)],
)
def test_strips_and_specks_are_images_without_faces(backend, det_input, model_root, tmp_path):
    """A 20000x10 strip made SCRFD's letterbox resize to 0 rows (cv2 raised, the whole face
    stage failed, and so did every later refresh); YuNet returned a face of inf / NaN corners
    at score 1.0 for inputs 32 rows high or less. Each is an image without a face now."""
    models = {"backend": backend, "root": str(model_root)}
    if det_input:
        models["det_input"] = det_input
    settings = Settings(models=ModelSettings(**models), limits=BAD_FILE_LIMITS)
    rows = []
    for h, w in SHAPES:
        p = tmp_path / f"{h}x{w}.png"
        Image.new("RGB", (w, h), (128, 128, 128)).save(p)
        rows.append(_row(p))
    out = process_images(rows, load_backend(settings.models), settings)
    assert [(r["image_status"], r["face_index"]) for r in out] == [("no_face", -1)] * len(rows)
    assert [(r["height"], r["width"]) for r in out] == SHAPES


def test_a_strip_is_known_faceless_from_its_header_and_never_decoded(model_root, tmp_path):
    """A security probe: a 95 KB PNG of 1 x 49,000,000 px (under the 50 MP limit) took 1.6 GB
    and 5 s in the face stage to find no face; four of them 3.7 GB."""
    settings = Settings(models=ModelSettings(root=str(model_root)))  # the default limits
    p = tmp_path / "strip.png"
    Image.new("RGB", (1, 49_000_000), (128, 128, 128)).save(p)
    timings: dict[str, float] = {}
    (row,) = process_images([_row(p)], load_backend(settings.models), settings, timings)
    assert (row["image_status"], row["width"], row["height"]) == ("no_face", 1, 49_000_000)
    assert row["image_reason"] == "no_face: a 1x49000000 px strip holds no face (not decoded)"
    assert timings["decode"] == 0 and timings["detect"] < 0.01  # no detector call


class _FailsOn:
    """The real backend, whose detector raises on images of one shape (or on every image):
    what an unforeseen file, or a lost GPU, does to the face stage."""

    def __init__(self, backend, shape: tuple[int, int] | None) -> None:
        self._backend, self._shape = backend, shape

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def detect(self, bgr):
        if self._shape is None or bgr.shape[:2] == self._shape:
            raise cv2.error("(-215:Assertion failed) inv_scale_x > 0 in function 'resize'")
        return self._backend.detect(bgr)

    def detect_batch(self, images):
        return [self.detect(im) for im in images]


def test_an_image_the_detector_fails_on_is_quarantined_and_a_failing_detector_fails(
    tmp_path, model_root, sample_photos, insight
):
    settings = _settings(model_root)
    odd = tmp_path / "odd.png"
    Image.new("RGB", (737, 523), (128, 128, 128)).save(odd)
    rows = [_row(sample_photos["t1"]), _row(odd), _row(sample_photos["yaoming"])]
    out = process_images(rows, _FailsOn(insight, (523, 737)), settings)
    by_uri: dict[str, list[dict]] = {}
    for r in out:
        by_uri.setdefault(r["image_uri"], []).append(r)
    assert list(by_uri) == [r["image_uri"] for r in rows]  # input order kept
    assert len(by_uri[str(sample_photos["t1"])]) == 6
    assert by_uri[str(sample_photos["yaoming"])][0]["image_status"] == "ok"
    (q,) = by_uri[str(odd)]
    assert (q["image_status"], q["image_reason_code"]) == ("quarantined", "detector_failed")
    assert "inv_scale_x" in q["image_reason"] and (q["width"], q["height"]) == (737, 523)
    # the detector fails on a plain image too: the model failed, not the file
    with pytest.raises(cv2.error):
        process_images(rows, _FailsOn(insight, None), settings)


@pytest.mark.parametrize("turn", [cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE])
def test_an_id_photo_scanned_upside_down_or_sideways_is_read_upright(
    turn, tmp_path, model_root, sample_photos, insight
):
    """A turned ID chip without EXIF orientation: the detector still finds a face in it, with
    landmarks placed as if it were upright, and its embedding matched none of the subject's
    live photos (idcard_mismatch). It is read in the turn that scores highest."""
    settings = _settings(model_root)
    chip = tmp_path / "id.jpg"
    _id_chip(sample_photos["t1"], chip, insight)
    turned = tmp_path / "id_turned.jpg"
    cv2.imwrite(str(turned), cv2.rotate(cv2.imread(str(chip)), turn))
    t1 = [r for r in process_images([_row(sample_photos["t1"])], insight, settings)]
    (up,) = process_images([_row(chip, role="id", group="s1")], insight, settings)
    (got,) = process_images([_row(turned, role="id", group="s1")], insight, settings)
    assert got["image_status"] == "ok" and (got["width"], got["height"]) == (102, 126)
    assert np.abs(np.array(got["bbox"]) - np.array(up["bbox"])).max() < 4
    assert float(np.dot(got["embedding"], up["embedding"])) > 0.9
    assert max(float(np.dot(got["embedding"], r["embedding"])) for r in t1) > 0.5
    # An album photo is never turned: its faces are as the detector found them.
    (album,) = process_images([_row(turned)], insight, settings)
    assert album["embedding"] is None or float(np.dot(album["embedding"], up["embedding"])) < 0.5
