"""Per-image face processing: read -> decode -> detect -> align -> quality -> embed.

``process_images`` is the plain core (a list of PENDING rows in, a list of DETECTIONS rows
out); ``FaceProcessor`` wraps it as the callable class Ray Data's ``map_batches`` wants: it
loads the backend once per actor and maps a batch of columns to a batch of columns.

Output rows (``faceloop.schema.DETECTIONS_SCHEMA``):

- one row per detected face, ``image_status = "ok"``, ``face_index`` 0..n-1 by detector score;
- one row with ``face_index = -1`` for an image without faces (``no_face``) or one that cannot
  be used (``quarantined``, ``image_reason`` = ``"<code>: <detail>"``, codes from
  :mod:`tasks.decode` plus ``unreadable`` and ``detector_failed``: the detector raised on this
  image while it still detects on a plain one, see :func:`_detect_guarded`);
  ``image_reason_code`` holds the code alone.

``face_id`` = ``sha1("<image_sha256>:<x1>,<y1>,<x2>,<y2>")[:20]`` with the bbox rounded to whole
pixels: the same image run through the same detector always gives the same ids, and two faces
of one image differ because their boxes do. A different detector (or provider with different
float rounding) may move a box by a pixel and so give new ids; that is intended, since the
detections then differ.

All faces of a batch are embedded in ONE recognizer call: batching is where the recognizer's
per-call overhead goes away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from faceloop.arrays import l2_normalize
from faceloop.config import InputLimits, Settings
from faceloop.errors import BadInputError, StorageError, TransientStorageError
from faceloop.hashing import is_sha256, phash64
from faceloop.schema import (
    DETECTIONS_SCHEMA,
    IMG_NO_FACE,
    IMG_OK,
    IMG_QUARANTINED,
    PENDING_SCHEMA,
    ROLE_ID,
    ROLE_LIVE,
)
from faceloop.vocab import ImageStatus, InputCode, Reason, unread_hash
from storage.objectstore import ObjectStore, conform, read_uri_bytes
from tasks.align import alignment_matrix, alignment_scale, warp_to_template
from tasks.backends import (
    PASS_MERGE_IOU,
    Detections,
    FaceBackend,
    detect_padded_many,
    load_backend,
    take_ahead,
)
from tasks.decode import HoldsNoFace, decode_image, rgb_to_bgr
from tasks.quality import face_size, gate, pose_from_landmarks, quality_score, sharpness

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "detect", "align", "quality", "embed", "encode")
# Decoded pixels one chunk of images may hold before it is detected and finished (with
# models.det_batch > 1 a chunk is up to det_batch images; a 50-megapixel photo is 150 MB).
CHUNK_DECODED_BYTES = 512 << 20
DETECTION_COLUMNS = tuple(DETECTIONS_SCHEMA.names)
_PASS_THROUGH = ("image_uri", "image_sha256", "source_kind", "source_group", "role", "run_id")


def face_id_for(image_sha256: str, bbox: np.ndarray) -> str:
    """Stable face id: sha1 of the image hash and the bbox rounded to whole pixels (module doc)."""
    x1, y1, x2, y2 = (round(float(v)) for v in bbox[:4])
    return hashlib.sha1(f"{image_sha256}:{x1},{y1},{x2},{y2}".encode()).hexdigest()[:20]


def _image_row(
    row: Mapping[str, Any],
    status: ImageStatus,
    reason: Reason | None,
    width: int | None,
    height: int | None,
    n_faces: int,
    phash: int | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {c: None for c in DETECTION_COLUMNS}
    for c in _PASS_THROUGH:
        v = row.get(c)
        out[c] = None if v is None else str(v)
    out.update(
        image_status=status,
        image_reason=reason.text if reason else None,
        image_reason_code=reason.code if reason else None,
        width=width,
        height=height,
        n_faces=n_faces,
        image_phash=phash,
        face_index=-1,
    )
    return out


def _as_str(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_decode(
    row: Mapping[str, Any], limits: InputLimits, t: dict[str, float]
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(RGB pixels, {}) of one PENDING row, or (None, its quarantined row) when the file is too
    large, unreadable or not a usable image, or (None, its no_face row) when its header
    declares a strip (tasks.decode.HoldsNoFace). Transient storage errors propagate."""
    uri = _as_str(row["image_uri"])
    size = row.get("size_bytes")
    try:
        if size is not None and int(size) > limits.max_image_bytes:
            # Don't even read it: the size recorded at discovery already disqualifies it.
            raise BadInputError("too_large_bytes", f"{int(size)} bytes > {limits.max_image_bytes}")
        t0 = time.perf_counter()
        try:
            data = read_uri_bytes(uri)
        except TransientStorageError:
            raise  # the caller's retry logic owns these
        except FileNotFoundError:
            raise BadInputError(InputCode.VANISHED, "listed, then gone when read") from None
        except (OSError, ValueError, StorageError) as exc:
            raise BadInputError("unreadable", f"{type(exc).__name__}: {exc}") from exc
        want = _as_str(row.get("image_sha256") or "")
        if is_sha256(want) and hashlib.sha256(data).hexdigest() != want:
            # Written to (or swapped) since discovery hashed it: these faces would be filed
            # under content the file no longer holds.
            raise BadInputError(
                InputCode.CHANGED_WHILE_READ,
                "its bytes changed after discovery hashed them; the next refresh reads it again",
            )
        t1 = time.perf_counter()
        try:
            rgb = decode_image(data, limits, strips=False)
        except HoldsNoFace as strip:
            return None, _image_row(
                row, IMG_NO_FACE, Reason("no_face", str(strip)), strip.width, strip.height, 0
            )
        t2 = time.perf_counter()
        t["read"] += t1 - t0
        t["decode"] += t2 - t1
        return rgb, {}
    except BadInputError as exc:
        # The image row carries the URI (`faceloop explain` finds it); a log line must not:
        # a photo's path often names the person.
        log.debug("quarantined an image: %s", exc.reason)
        why = Reason(exc.reason, exc.detail)  # renders as str(exc)
        out = _image_row(row, IMG_QUARANTINED, why, None, None, 0)
        if exc.reason in RETRIED_CODES:
            # Not a verdict on the bytes discovery hashed: recorded as discovery records a file
            # it could not read, so the next refresh reads it again (tasks/discover.py).
            out["image_sha256"] = unread_hash(exc.reason)
        return None, out


# Failures of the face stage's own read of a file: the file, not its content, is at fault.
RETRIED_CODES = frozenset({"unreadable", InputCode.VANISHED, InputCode.CHANGED_WHILE_READ})


DETECTOR_FAILED = "detector_failed"
# An ID photo scanned sideways or upside down (no EXIF orientation to undo) still yields a face
# with a good score and landmarks placed as if it were upright, whose embedding matches no
# live photo of its subject. Its upright turn scores higher: on 450 simulated lfw-dev chips
# (102x126, JPEG 35) the upright chip scored highest of the four turns every time (by 0.023 or
# more), no turned chip reached 0.82, and 74% of upright chips score 0.83 or more. So an ID
# photo whose best face scores below ID_UPRIGHT_SCORE is detected in its three other turns too,
# and read in the turn that scores highest (docs/QUALITY.md, "An ID photo turned on its side").
ID_UPRIGHT_SCORE = 0.83
_TURNS = (cv2.ROTATE_90_CLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_COUNTERCLOCKWISE)
_PLAIN = np.zeros((64, 64, 3), np.uint8)  # an image every detector takes (and finds nothing in)


def _detect_guarded(
    backend: FaceBackend, images: list[np.ndarray], pads: list[bool]
) -> tuple[list[Detections], dict[int, str]]:
    """``detect_padded_many``'s faces, and the images it raised on (index -> why) when the
    detector still works on a plain image: one such file (a shape a model's preprocessing never
    met) would otherwise fail every refresh. When the plain image fails too, the detector is
    what failed (a lost GPU, a broken model): that error propagates."""
    try:
        return detect_padded_many(backend, images, pads), {}
    except TransientStorageError:
        raise
    except Exception as exc:
        first: Exception = exc
    found: list[Detections] = []
    failed: dict[int, str] = {}
    for j, (img, pad) in enumerate(zip(images, pads, strict=True)):
        try:
            found.append(detect_padded_many(backend, [img], [pad])[0])
        except Exception as exc:
            try:
                detect_padded_many(backend, [_PLAIN], [False])
            except Exception:
                raise first from None
            failed[j] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("detector failed on one image (%dx%d): %s", img.shape[1], img.shape[0], exc)
            found.append(Detections.empty())
    return found, failed


def _best_score(d: Detections) -> float:
    return float(d.scores.max()) if len(d) else 0.0


def _turn_id_photos(
    backend: FaceBackend,
    decoded: list[tuple[int, np.ndarray, str, int | None]],
    found: list[Detections],
) -> None:
    """Each ID photo of ``decoded`` whose best face scores below :data:`ID_UPRIGHT_SCORE`
    detected in its other three turns (one detector call); where a turn scores higher, the
    photo is read turned (its pixels and faces replaced in place: boxes, landmarks, the image's
    width and height are those of the upright photo, as for an EXIF orientation)."""
    todo = [
        j
        for j, (_, _, role, _) in enumerate(decoded)
        if role == ROLE_ID and _best_score(found[j]) < ID_UPRIGHT_SCORE
    ]
    if not todo:
        return
    turned = [cv2.rotate(decoded[j][1], code) for j in todo for code in _TURNS]
    again, failed = _detect_guarded(backend, turned, [True] * len(turned))
    for n, j in enumerate(todo):
        best, pick = _best_score(found[j]), None
        for k in range(n * len(_TURNS), (n + 1) * len(_TURNS)):
            if k not in failed and _best_score(again[k]) > best:
                best, pick = _best_score(again[k]), k
        if pick is not None:
            slot, _, role, phash = decoded[j]
            decoded[j] = (slot, turned[pick], role, phash)
            found[j] = again[pick]


def process_images(
    rows: Sequence[Mapping[str, Any]],
    backend: FaceBackend,
    settings: Settings,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Turn PENDING rows into DETECTIONS rows (see module doc).

    A bad image never raises: it becomes one quarantined row and the other rows are unaffected.
    Only errors that retrying may fix (:class:`TransientStorageError`) and model failures
    propagate. ``timings``, when given, accumulates seconds per stage (:data:`STAGES`) plus the
    counters ``images`` and ``faces``.
    """
    t = timings if timings is not None else {}
    for k in (*STAGES, "images", "faces"):
        t.setdefault(k, 0.0)
    limits, qs = settings.limits, settings.quality
    jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, int(settings.dataset.jpeg_quality)]
    det_thresh = settings.models.det_thresh
    embed_gated = settings.models.embed_gated

    flip_roles = (ROLE_ID, ROLE_LIVE) if settings.models.idcard_flip_on() else ()
    out: list[dict[str, Any]] = []
    pending_faces: list[dict[str, Any]] = []  # face rows waiting for their embedding
    crops: list[np.ndarray] = []
    flips: list[bool] = []  # per crop: embed it with flip test-time augmentation
    # Images go through in chunks of the detector's batch (models.det_batch; 1 on CPU): decode
    # the chunk, detect it in one call, then align, score and encode its faces. A chunk also
    # ends once its decoded pixels pass CHUNK_DECODED_BYTES, so large photos never pile up in
    # an actor's memory. Rows come out in input order whatever the chunk size.
    chunk = max(1, int(getattr(backend, "det_batch", 1)))
    next_row = 0
    while next_row < len(rows):
        part: list[Mapping[str, Any]] = []
        slots: list[list[dict[str, Any]]] = []
        decoded: list[tuple[int, np.ndarray, str, int | None]] = []  # slot, bgr, role, phash
        held = 0
        while next_row < len(rows) and len(decoded) < chunk and held < CHUNK_DECODED_BYTES:
            row = rows[next_row]
            next_row += 1
            slot_i = len(part)
            part.append(row)
            slots.append([])
            t["images"] += 1
            rgb, verdict = _read_decode(row, limits, t)
            if rgb is None:
                slots[slot_i].append(verdict)  # quarantined, or a strip: no face
                continue
            role = _as_str(row.get("role") or "")
            # ID-card photos get a perceptual hash: the label stage finds one photo claimed by
            # two subjects with it (duplicate_claim), re-encoded or resized copies included.
            phash = phash64(rgb) if role in (ROLE_ID, ROLE_LIVE) else None
            bgr = rgb_to_bgr(rgb)
            decoded.append((slot_i, bgr, role, phash))
            held += bgr.nbytes
            del rgb, bgr

        t0 = time.perf_counter()
        # ID photos are tight crops at any resolution: always pad them; others only when small.
        found, failed = _detect_guarded(
            backend, [bgr for _, bgr, _, _ in decoded], [r == ROLE_ID for _, _, r, _ in decoded]
        )
        for j, why in failed.items():
            slot_i, bgr = decoded[j][0], decoded[j][1]
            slots[slot_i].append(
                _image_row(
                    part[slot_i],
                    IMG_QUARANTINED,
                    Reason(DETECTOR_FAILED, why),
                    bgr.shape[1],
                    bgr.shape[0],
                    0,
                    decoded[j][3],
                )
            )
        if failed:
            found = [d for j, d in enumerate(found) if j not in failed]
            decoded = [d for j, d in enumerate(decoded) if j not in failed]
        _turn_id_photos(backend, decoded, found)
        # A face that fills the frame (a selfie, a tight crop) defeats the detector's anchors
        # as ID photos do; one padded retry is cheap next to losing the image.
        retry = [j for j, d in enumerate(found) if len(d) == 0 and decoded[j][2] != ROLE_ID]
        if retry:
            again = detect_padded_many(backend, [decoded[j][1] for j in retry], [True] * len(retry))
            for j, d in zip(retry, again, strict=True):
                found[j] = d
        # A live capture's own face can fill the frame and be missed while a smaller face
        # behind it is found, so the retry above does not run and the ID check meets only the
        # bystander (lfw-dev eval seed 0: 2 of 479 live photos). When no face found in a live
        # photo covers its centre, the faces a padded pass adds are appended: a few live photos
        # pay a second detector call, and the first pass's faces stay as they were.
        centre = [
            j
            for j, d in enumerate(found)
            if len(d)
            and decoded[j][2] == ROLE_LIVE
            and not d.covers(decoded[j][1].shape[1] / 2, decoded[j][1].shape[0] / 2)
        ]
        if centre:
            again = detect_padded_many(
                backend, [decoded[j][1] for j in centre], [True] * len(centre)
            )
            for j, d in zip(centre, again, strict=True):
                found[j] = found[j].with_new(d, PASS_MERGE_IOU)
        t["detect"] += time.perf_counter() - t0

        for (slot_i, bgr, role, phash), dets in zip(decoded, found, strict=True):
            row = part[slot_i]
            height, width = bgr.shape[:2]
            n = len(dets)
            if n == 0:
                slots[slot_i].append(
                    _image_row(
                        row,
                        IMG_NO_FACE,
                        Reason("no_face", f"detector found nothing above {det_thresh:.2f}"),
                        width,
                        height,
                        0,
                        phash,
                    )
                )
                continue
            sha = _as_str(row.get("image_sha256") or "")
            for i in range(n):
                box, lm, score = dets.boxes[i], dets.landmarks[i], float(dets.scores[i])
                t0 = time.perf_counter()
                m = alignment_matrix(lm)
                aligned = warp_to_template(bgr, m)
                t1 = time.perf_counter()
                px = face_size(box)
                blur = sharpness(aligned, alignment_scale(m))
                yaw, pitch = pose_from_landmarks(lm)
                q = quality_score(px, blur, yaw, pitch, score, qs)
                t2 = time.perf_counter()
                ok, buf = cv2.imencode(".jpg", aligned, jpeg_params)
                t3 = time.perf_counter()
                t["align"] += t1 - t0
                t["quality"] += t2 - t1
                t["encode"] += t3 - t2
                if not ok:  # pragma: no cover - cv2 encodes any 112x112x3 uint8
                    raise RuntimeError("JPEG encoding of an aligned crop failed")
                face = _image_row(row, IMG_OK, None, width, height, n, phash)
                face.update(
                    face_index=i,
                    face_id=face_id_for(sha, box),
                    bbox=[float(v) for v in box],
                    landmarks=[float(v) for v in lm.reshape(-1)],
                    det_score=score,
                    face_px=float(px),
                    blur=float(blur),
                    yaw=float(yaw),
                    pitch=float(pitch),
                    quality=float(q),
                    aligned_jpeg=buf.tobytes(),
                    model=backend.recognizer_tag,
                    detector=backend.detector_tag,
                )
                slots[slot_i].append(face)
                # A gated face is rejected before any comparison: its embedding would be paid
                # for and never used, so it stays null (models.embed_gated embeds it anyway).
                if embed_gated or gate(_as_str(row.get("source_kind") or ""), px, q, qs) is None:
                    pending_faces.append(face)
                    crops.append(aligned)
                    flips.append(role in flip_roles)
        for slot in slots:
            out.extend(slot)
        del decoded, found

    if crops:
        t0 = time.perf_counter()
        emb = embed_crops(backend, crops, flips)
        t["embed"] += time.perf_counter() - t0
        for face, vec in zip(pending_faces, emb, strict=False):
            face["embedding"] = vec.astype(np.float32).tolist()
        t["faces"] += len(crops)
    return out


def read_work_list(store: ObjectStore, pending_rel: str) -> pa.Table:
    """The face stage's work list (PENDING_SCHEMA). A missing one is an error: read as a folder
    with its schema it was an empty list, so a mistyped path meant "no faces", silently. (Read
    where the stage reads it, inside its storage deadline: an outage is reported as one.)"""
    try:
        return conform(store.read_parquet_file(pending_rel), PENDING_SCHEMA)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the face stage's work list {store.uri(pending_rel)} is missing"
        ) from None


def detect_pending(
    settings: Settings,
    store: ObjectStore,
    pending_rel: str,
    run_id: str,
    *,
    threads: int = 1,
    providers: Sequence[object] | None = None,
    stop: Any = None,
) -> str:
    """The face stage in this process, without Ray: the PENDING rows of ``pending_rel`` through
    :func:`process_images` in batches of ``ray.batch_size``, on ``threads`` threads with one
    backend each (``providers`` as for :func:`~tasks.backends.load_backend`), every batch
    written as its own part (:func:`detections_part_rel`, the name the Ray actors give it)
    under ``layout.staging_detections(run_id)``, which is returned. A backend the run loaded
    ahead (:func:`~tasks.backends.load_ahead`) is used instead of a load: by every thread when
    the backend takes concurrent calls (``thread_safe``: its sessions are onnxruntime's; the
    same detections and embeddings, each call being the same call), else by the first.

    onnxruntime, OpenCV's decode and warp and the JPEG codecs release the GIL, so two threads
    with one single-threaded backend each use two cores as two Ray actors do (200 photos: 8.1-
    8.9 s on two threads against 15.3-16.2 s on one, docs/SCALING.md) without Ray's start.
    The driver holds one batch per thread, whatever the run's size. With
    ``FACELOOP_STAGE_TIMINGS_DIR`` set (``faceloop bench``) the stage's timings and this
    process's CPU seconds during it are written there, as the actors write theirs. ``stop``
    (a ``threading.Event``): once set, no batch is started or written (the run was interrupted:
    its staging is being removed, and a part written after that was left behind)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from storage import layout

    cpu0 = os.times()
    out_rel = layout.staging_detections(run_id)
    rows = read_work_list(store, pending_rel).to_pylist()
    chunks = work_chunks(len(rows), settings.ray.batch_size)
    threads = max(1, min(threads, len(chunks)))
    local = threading.local()
    lock = threading.Lock()
    timings: list[dict[str, float]] = []
    ahead = take_ahead(run_id, settings.models, providers) if rows else None
    shared = ahead if getattr(ahead, "thread_safe", False) else None
    spare = [ahead] if ahead is not None and shared is None else []

    def backend() -> FaceBackend:
        if shared is not None:
            return shared
        with lock:
            if spare:
                return spare.pop()
        return load_backend(settings.models, providers)  # each thread its own, in parallel

    def run(chunk: tuple[int, int]) -> int:
        if not hasattr(local, "backend"):
            local.backend = backend()
            local.timings = {}
            with lock:
                timings.append(local.timings)
        if stop is not None and stop.is_set():
            raise InterruptedError("the face stage was stopped")
        part = rows[chunk[0] : chunk[1]]
        out = process_images(part, local.backend, settings, local.timings)
        if stop is not None and stop.is_set():
            raise InterruptedError("the face stage was stopped")
        return write_detections_part(store, out_rel, part, rows_to_columns(out))

    t0 = time.perf_counter()
    if threads == 1:
        written = sum(run(c) for c in chunks)
    else:
        # A batch that fails (a store error) ends the stage: map's iterator cancels the
        # batches no thread has started yet as the error leaves it.
        with ThreadPoolExecutor(threads, thread_name_prefix="faceloop-faces") as pool:
            written = sum(pool.map(run, chunks))
    if not rows:  # an empty work list still leaves a (valid, empty) detections folder
        store.write_parquet(f"{out_rel}/part-empty.parquet", DETECTIONS_SCHEMA.empty_table())
    tdir = os.environ.get("FACELOOP_STAGE_TIMINGS_DIR")
    if tdir:
        total: dict[str, float] = {}
        for t in timings:
            for k, v in t.items():
                total[k] = total.get(k, 0.0) + v
        cpu = os.times()
        total["batch"] = time.perf_counter() - t0
        total["cpu_s"] = (cpu.user + cpu.system) - (cpu0.user + cpu0.system)
        total["threads"] = threads
        (Path(tdir) / f"{os.getpid()}-driver.json").write_text(json.dumps(total))
    log.debug("detect_pending: %d rows written under %s on %d threads", written, out_rel, threads)
    return out_rel


# The last this many batches of the driver's work list are cut into shrinking ranges.
TAIL_BATCHES = 2


def work_chunks(n: int, batch: int) -> list[tuple[int, int]]:
    """``(start, end)`` row ranges of a work list of ``n`` rows, for threads that each take
    the next range as they finish one: ``batch`` rows each, except that the last
    :data:`TAIL_BATCHES` batches' rows are cut into ranges that shrink towards one row. So the
    thread that ends first waits for a short range, not a whole batch (200 photos on two
    threads: one ended 0.42 s before the other with whole batches), while every range but the
    last few keeps the batch's recognizer calls. The ranges depend on ``n`` and ``batch``
    alone: any number of threads embeds the same crops in the same calls, so gives the same
    embeddings to the bit."""
    batch = max(1, batch)
    out: list[tuple[int, int]] = []
    lo = 0
    tail = n - TAIL_BATCHES * batch  # whole batches up to here
    while lo < n:
        size = batch if lo < tail else max(1, min(batch, -(-(n - lo) // (2 * TAIL_BATCHES))))
        out.append((lo, min(n, lo + size)))
        lo += size
    return out


def embed_crops(
    backend: FaceBackend, crops: Sequence[np.ndarray], flip: Sequence[bool]
) -> np.ndarray:
    """Embeddings of aligned crops in one recognizer call; a crop with ``flip`` set is embedded
    as the L2-normalised mean of itself and its mirror image (test-time augmentation: a
    frontal face's two halves vote, which steadies a poor or slightly turned one)."""
    flipped = [i for i, f in enumerate(flip) if f]
    batch = list(crops) + [np.ascontiguousarray(crops[i][:, ::-1]) for i in flipped]
    emb = backend.embed(batch)
    out = np.array(emb[: len(crops)], dtype=np.float32)
    if flipped:
        out[flipped] = l2_normalize(out[flipped] + emb[len(crops) :])
    return out


def rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Row dicts -> column dict with every DETECTIONS_SCHEMA column (lists, Arrow-ready)."""
    return {c: [r.get(c) for r in rows] for c in DETECTION_COLUMNS}


def _batch_rows(batch: Any) -> list[dict[str, Any]]:
    """Rows of a Ray Data batch: dict of numpy arrays / lists, or a pyarrow Table."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    cols = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(cols.values()))) if cols else 0
    return [
        {k: (v[i].item() if isinstance(v[i], np.generic) else v[i]) for k, v in cols.items()}
        for i in range(n)
    ]


class FaceProcessor:
    """Callable for ``ray.data.Dataset.map_batches``: PENDING batch -> DETECTIONS batch.

    ``settings`` is ``Settings.model_dump()`` (a plain dict travels to Ray actors; the Settings
    object is rebuilt here). ``providers``: onnxruntime providers, e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]``; default CPU. ``output="arrow"`` returns a ``pyarrow.Table`` with
    DETECTIONS_SCHEMA instead of a dict of lists (exact Arrow types whatever Ray infers).
    ``output_rel`` (a store folder) writes each batch's DETECTIONS there as one Parquet part and
    returns only its row count (see :func:`detections_part_rel`). ``alive_rel``: a store file
    the run keeps while it wants detections (its work list): once it is gone the run was
    stopped and its staging removed, and a batch still running on a cluster's node writes
    nothing (it left an orphan staging behind the stopped run). Gone with the store's format
    record too, the store is not the run's here (a node that cannot see it): the batch fails
    (:func:`check_store_seen`) instead of dropping its images.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        providers: Sequence[object] | None = None,
        output: str = "dict",
        output_rel: str | None = None,
        alive_rel: str | None = None,
    ) -> None:
        self.settings = Settings(**{k: v for k, v in settings.items() if k != "yaml_file"})
        from storage.objectstore import use_store_modes

        use_store_modes(self.settings)
        self.backend = load_backend(self.settings.models, providers)
        self.output = output
        self.output_rel = output_rel
        self.alive_rel = alive_rel
        self._store: ObjectStore | None = None
        self.timings: dict[str, float] = {k: 0.0 for k in (*STAGES, "images", "faces")}
        # `faceloop bench` sets this: each actor keeps its cumulative stage timings in a file there.
        tdir = os.environ.get("FACELOOP_STAGE_TIMINGS_DIR")
        self._timings_file = Path(tdir) / f"{os.getpid()}-{id(self)}.json" if tdir else None

    def __call__(self, batch: Any) -> Any:
        rows = _batch_rows(batch)
        missing = [c for c in ("image_uri", "image_sha256") if rows and c not in rows[0]]
        if missing:
            raise ValueError(
                f"batch lacks PENDING_SCHEMA columns {missing}; expected {PENDING_SCHEMA.names}"
            )
        t0 = time.perf_counter()
        out = rows_to_columns(process_images(rows, self.backend, self.settings, self.timings))
        if self._timings_file is not None:
            self.timings["batch"] = self.timings.get("batch", 0.0) + time.perf_counter() - t0
            # This actor process's CPU seconds so far (model loading included): the bench's
            # CPU busy share of the face stage.
            cpu = os.times()
            self.timings["cpu_s"] = cpu.user + cpu.system
            self._timings_file.write_text(json.dumps(self.timings))
        if self.output_rel is not None:
            if self._store is None:
                from storage.objectstore import open_store

                self._store = open_store(self.settings.store)
            if self.alive_rel is not None and not self._store.exists(self.alive_rel):
                check_store_seen(self._store, self.alive_rel)
                log.warning(
                    "face stage: the run stopped (%s is gone): batch not written", self.alive_rel
                )
                return pa.table({"rows": pa.array([0], pa.int64())})
            written = write_detections_part(self._store, self.output_rel, rows, out)
            return pa.table({"rows": pa.array([written], pa.int64())})
        if self.output == "arrow":
            return pa.Table.from_pydict(out, schema=DETECTIONS_SCHEMA)
        return out


def check_store_seen(store: ObjectStore, alive_rel: str) -> None:
    """:class:`StorageError` when ``store``, as this process opens it, is not the run's store:
    its work list ``alive_rel`` is missing and so is the format record every writer holds
    (storage/format.py: written when it takes the store lock, never removed), so the store's
    path is another folder here (a Ray node without the store's mount). A run that stopped
    removed its staging from a store that keeps the record: that is no error."""
    from storage import layout

    if store.exists(layout.STORE_FORMAT):
        return
    raise StorageError(
        f"face stage on node {socket.gethostname()}: the store {store.uri('')} is not "
        f"reachable from this node (neither the run's work list {alive_rel} nor "
        f"{layout.STORE_FORMAT} is there): every Ray node must see the store at the same "
        "path (a shared mount) or use an S3 store"
    )


def write_detections_part(
    store: ObjectStore,
    folder: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Mapping[str, Sequence[Any]],
) -> int:
    """Write one batch's DETECTIONS ``columns`` (of the PENDING ``rows``) as its part under
    ``folder`` (:func:`detections_part_rel`); returns the rows written. The Ray actors and the
    driver's threads write their batches through it alike."""
    table = pa.Table.from_pydict(dict(columns), schema=DETECTIONS_SCHEMA)
    store.write_parquet(detections_part_rel(folder, rows), table)
    return table.num_rows


def detections_part_rel(folder: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Where a face actor writes one batch's detections: named by the batch's images (their
    URIs and content hashes), so a batch that Ray retries after a worker died replaces its
    own part instead of adding a second copy of its rows."""
    h = hashlib.sha256()
    for row in rows:
        h.update(_as_str(row.get("image_uri") or "").encode())
        h.update(b"\0")
        h.update(_as_str(row.get("image_sha256") or "").encode())
        h.update(b"\n")
    return f"{folder}/part-{h.hexdigest()[:24]}.parquet"
