"""Face detector + recognizer backends behind one small protocol.

Two real backends, both offline and loaded from the verified model store
(:mod:`faceloop.modelstore`):

- ``insightface``: SCRFD-500M detector + an ArcFace-convention recognizer (EdgeFace-S by
  default, or the shipped MobileFaceNet w600k_mbf, 512-d), on onnxruntime sessions that
  :mod:`faceloop.onnx_models` makes and reads as insightface's model zoo would, without
  importing insightface (~0.3 s of CPU per loading process). A detector graph without a batch
  axis or landmark head falls back to insightface's own SCRFD object. Offline path:
  ``insightface.model_zoo.get_model(<absolute .onnx path>, providers=..., sess_options=...)``
  **without** ``model_task``. insightface 2.1 only consults its package manifests / signed
  ``MODEL.LICENSE`` machinery when given a package name/directory or an explicit
  ``model_task``; a bare ``.onnx`` path takes the legacy shape-based ``ModelRouter`` and never
  downloads (``download`` defaults to False). Weights are non-commercial research only (see
  ``faceloop.modelstore.LICENCES``).
- ``opencv``: YuNet detector (``cv2.FaceDetectorYN``) + SFace 128-d (``cv2.FaceRecognizerSF``),
  MIT / Apache-2.0. SFace's own ``alignCrop`` uses the ArcFace 5-point template; our
  :func:`tasks.align.align_face` output matched it to < 1e-4 mean grey level on t1.jpg, so
  SFace gets the same aligned crop as ArcFace. This backend runs on CPU only.

Both return landmarks in insightface's order (image-left eye first, i.e. the subject's right
eye): left eye, right eye, nose, mouth left, mouth right, in image pixels. YuNet emits the same
order (checked on t1.jpg).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from faceloop import scrfd
from faceloop.arrays import l2_normalize
from faceloop.config import ModelSettings
from faceloop.errors import ConfigError, ModelLoadError
from faceloop.modelstore import ModelInfo, ensure_model_infos, model_path
from faceloop.ort_providers import (
    CPU,
    CUDA,
    cuda_fallback_hint,
    provider_names,
    with_cuda_options,
)
from faceloop.scrfd import input_size

log = logging.getLogger(__name__)

# Small, tight crops (ID chip photos ~100x130 that are all face) defeat detectors tuned for
# faces that are a fraction of the frame: below this shorter side, pad before detecting.
PAD_BELOW_PX = 200
PAD_FRACTION = 0.5
# YuNet's NMS IoU, inside one pass and between the two passes of a large photo.
YUNET_NMS_IOU = 0.3
# Two passes over one image (a padded pass added to the first): a box of the second overlapping
# one of the first by more than this (intersection over union) is the same face (SCRFD's own
# NMS threshold).
PASS_MERGE_IOU = 0.4


def _area(b: np.ndarray) -> np.ndarray:
    """Areas of x1, y1, x2, y2 boxes (last axis)."""
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


@dataclass
class Detections:
    """Faces found in one image. Coordinates are pixels of the image passed to ``detect``."""

    boxes: np.ndarray  # float32 (N, 4) x1, y1, x2, y2
    scores: np.ndarray  # float32 (N,)
    landmarks: np.ndarray  # float32 (N, 5, 2) left eye, right eye, nose, mouth left, mouth right

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0, 5, 2), np.float32),
        )

    def merged(self, other: Detections, iou: float) -> Detections:
        """These faces and ``other``'s in one set, highest score first: where a box of one
        overlaps a box of the other by more than ``iou``, only the higher-scored is kept (the
        same greedy NMS the detector applies within one pass)."""
        if not len(other):
            return self
        if not len(self):
            return other
        boxes = np.concatenate([self.boxes, other.boxes])
        scores = np.concatenate([self.scores, other.scores])
        keep = np.asarray(scrfd.nms(np.hstack([boxes, scores[:, None]]), iou), np.int64)
        return Detections(
            boxes[keep],
            scores[keep],
            np.concatenate([self.landmarks, other.landmarks])[keep],
        )

    def with_new(self, other: Detections, iou: float) -> Detections:
        """These faces as they are, followed by ``other``'s faces that overlap none of them by
        more than ``iou`` (a second pass over the same image adds only what the first missed)."""
        if not len(other) or not len(self):
            return other if not len(self) else self
        a, b = self.boxes[:, None, :], other.boxes[None, :, :]
        w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
        h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
        inter = w * h
        union = _area(a) + _area(b) - inter
        new = ~(inter > iou * np.maximum(union, 1e-9)).any(axis=0)
        return Detections(
            np.concatenate([self.boxes, other.boxes[new]]),
            np.concatenate([self.scores, other.scores[new]]),
            np.concatenate([self.landmarks, other.landmarks[new]]),
        )

    def covers(self, x: float, y: float) -> bool:
        """Whether some face's box contains the point (x, y)."""
        b = self.boxes
        return bool(np.any((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3])))

    def shifted(self, dx: float, dy: float) -> Detections:
        """The same detections with (dx, dy) added to every coordinate."""
        off = np.array([dx, dy], dtype=np.float32)
        return Detections(self.boxes + np.tile(off, 2), self.scores.copy(), self.landmarks + off)


@runtime_checkable
class FaceBackend(Protocol):
    name: str
    infos: list[ModelInfo]
    embedding_dim: int

    @property
    def detector_tag(self) -> str: ...

    @property
    def recognizer_tag(self) -> str: ...

    def detect(self, bgr: np.ndarray) -> Detections: ...

    def embed(self, aligned_bgr: Sequence[np.ndarray]) -> np.ndarray: ...


# Under <models.root>/<backend>/: recognizer graphs whose batch axis was freed and probed
# (faceloop.onnx_batch.keep_freed), by the source graph's sha256, onnxruntime and providers.
KEPT_GRAPHS = "batch-freed"


def _info(infos: list[ModelInfo], role: str) -> ModelInfo:
    return next(i for i in infos if i.role == role)


def fine_pass_wanted(
    height: int, width: int, det_size: int, fine_size: int, fine_above: int
) -> bool:
    """Whether an image gets the second, finer detector pass (``models.det_fine_size``): its
    longer side is more than ``fine_above`` and the fine input is larger than ``det_size``."""
    return fine_size > det_size and max(height, width) > max(fine_above, det_size)


class _TaggedBackend:
    name = ""
    infos: list[ModelInfo]

    @property
    def detector_tag(self) -> str:
        return _info(self.infos, "detector").tag

    @property
    def recognizer_tag(self) -> str:
        return _info(self.infos, "recognizer").tag


def _insightface_model(path: Path, providers: Sequence[object], options: Any) -> Any:
    """insightface's model-zoo object for ``path`` (its own detect path, for an SCRFD graph
    without a batch axis or landmark head). Offline: a bare ``.onnx`` path, no ``model_task``
    (see the module's docstring)."""
    from insightface.model_zoo import get_model

    model = get_model(str(path), providers=list(providers), sess_options=options)
    if model is None:
        raise ModelLoadError(f"insightface's model zoo did not recognise {path}")
    return model


class InsightFaceBackend(_TaggedBackend):
    """SCRFD + ArcFace on onnxruntime: insightface's models and conventions, the sessions made
    and decoded by faceloop (:mod:`faceloop.onnx_models`, :mod:`faceloop.scrfd`). insightface
    itself is imported only for a detector graph the backend does not decode (no batch axis or
    no landmark head)."""

    name = "insightface"

    def __init__(self, settings: ModelSettings, providers: Sequence[object] | None = None) -> None:
        import onnxruntime as ort

        from faceloop.onnx_batch import graph_key, keep_freed, kept_freed, with_batch_axis
        from faceloop.onnx_models import load_arcface, load_scrfd
        from faceloop.onnx_models import session as onnx_session

        root = Path(settings.root)
        self.infos = model_infos(settings)  # a registered recognizer replaces the shipped one
        self.providers = with_cuda_options(list(providers) if providers else [CPU])
        names = provider_names(self.providers)
        self.uses_cuda = CUDA in names

        def session_options() -> ort.SessionOptions:
            so = ort.SessionOptions()
            so.intra_op_num_threads = settings.threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            return so

        rec_path = (
            Path(settings.recognizer).absolute()
            if settings.recognizer
            else model_path(root, self.name, _info(self.infos, "recognizer"))
        )
        det_path = model_path(root, self.name, _info(self.infos, "detector"))
        try:
            self.detector: Any = load_scrfd(det_path, session_options(), self.providers)
            if not (self.detector.batched and self.detector.use_kps):
                # A graph this backend does not decode itself: insightface's own detect path.
                self.detector = _insightface_model(det_path, self.providers, session_options())
            # A recognizer whose batch axis was freed before (faceloop.onnx_batch) under this
            # onnxruntime and these providers: the kept graph, no probe.
            kept_key = graph_key(_info(self.infos, "recognizer").sha256, names)
            kept_dir = root / self.name / KEPT_GRAPHS
            kept = kept_freed(kept_dir, kept_key) if settings.embed_batch > 1 else None
            recognizer = None
            if kept is not None and isinstance(first := kept[1].get("first_nodes"), list):
                try:
                    recognizer = load_arcface(
                        rec_path, session_options(), self.providers, kept[0], first
                    )
                except Exception as exc:  # onnxruntime's own types; the source graph decides
                    log.info("the kept recognizer graph %s did not load (%s)", kept_key, exc)
            if recognizer is None:
                kept = None
                recognizer = load_arcface(rec_path, session_options(), self.providers)
            self.recognizer = recognizer
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"insightface models failed to load: {exc}") from exc
        if self.detector.taskname != "detection" or self.recognizer.taskname != "recognition":
            raise ModelLoadError("the model files are not a detector and a recognizer")
        # ctx_id >= 0: insightface's prepare keeps the session as made above (< 0 would make it
        # again with the CPU provider alone: ~0.08 s of every load).
        ctx_id = 0
        self.detector.prepare(
            ctx_id,
            input_size=(settings.det_size, settings.det_size),
            det_thresh=settings.det_thresh,
        )
        self.recognizer.prepare(ctx_id)
        batches = True
        if settings.embed_batch > 1 and kept is None:
            # A graph that fixes the batch at 1 inside (EdgeFace's) is used with its batch axis
            # freed when a probe embeds the same in one call (faceloop.onnx_batch); the freed
            # graph is kept for the next load.
            self.recognizer.session, batches, freed = with_batch_axis(
                self.recognizer.session,
                rec_path,
                lambda b: onnx_session(b, session_options(), self.providers),
            )
            if freed is not None:
                keep_freed(kept_dir, kept_key, freed, {"first_nodes": self.recognizer.first_nodes})
        self.det_size = int(settings.det_size)
        self.det_fine_size = int(settings.det_fine_size)
        self.det_fine_above = int(settings.det_fine_above)
        self.det_input = getattr(settings, "det_input", "square")
        if self.det_input in ("image", "fit") and hasattr(self.detector, "static_shape_sessions"):
            # insightface's own detector (the fallback above) builds one static-shape ONNX
            # session per input size it meets; with image-sized inputs that would be a session
            # per image shape. The model's own graph takes any size: route every size to it.
            self.detector.static_shape_sessions = False
            self.detector._reset_resolution_session_pool()
        if self.uses_cuda:
            for model in (self.detector, self.recognizer):
                if CUDA not in model.session.get_providers():
                    raise ModelLoadError(
                        "asked for CUDA but onnxruntime fell back to CPU "
                        f"(session providers {model.session.get_providers()}): "
                        f"{cuda_fallback_hint()}"
                    )
        self.embedding_dim = int(self.recognizer.output_shape[1])
        self.embed_batch = settings.embed_batch
        if not batches:
            # A graph that fixes the batch at 1 inside and could not be freed: one crop per call.
            log.info("the recognizer's graph takes one crop per call: models.embed_batch -> 1")
            self.embed_batch = 1
        self.det_batch = settings.det_batch
        self.fixed_shapes = (
            self.uses_cuda if settings.fixed_shapes is None else settings.fixed_shapes
        )
        if self.det_batch > 1 and not self.detector.batched:
            raise ModelLoadError(
                f"models.det_batch {self.det_batch}: the detector's graph has no batch axis; "
                "use det_batch 1 with it"
            )
        # Batched calls on a copy of the detector graph that takes uint8 pixels
        # (models.det_uint8; faceloop/onnx_input.py). Single-image calls keep the float input.
        self.det_uint8_session: Any = None
        self.det_uint8_input = ""
        det_uint8 = self.uses_cuda if settings.det_uint8 is None else settings.det_uint8
        if det_uint8 and self.det_batch > 1:
            from faceloop.onnx_input import uint8_input

            d = self.detector
            try:
                self.det_uint8_session = onnx_session(
                    uint8_input(det_path, float(d.input_mean), float(d.input_std)),
                    session_options(),
                    self.providers,
                )
            except Exception as exc:
                raise ModelLoadError(f"detector with uint8 input failed to load: {exc}") from exc
            self.det_uint8_input = self.det_uint8_session.get_inputs()[0].name
            got = self.det_uint8_session.get_providers()
            if self.uses_cuda and CUDA not in got:
                raise ModelLoadError(
                    "asked for CUDA but onnxruntime fell back to CPU (uint8-input detector "
                    f"session providers {got}): {cuda_fallback_hint()}"
                )
        # detect / embed only run onnxruntime sessions (which take concurrent run calls) on
        # arguments and locals, so threads may share this backend. insightface's own detect path,
        # kept for a graph without a batch axis or landmarks (_detect_one), is not relied on to be.
        self.thread_safe = bool(self.detector.batched and self.detector.use_kps)

    def _input_size(self, bgr: np.ndarray, side: int | None = None) -> tuple[int, int]:
        """SCRFD input (width, height) for an image (see ``models.det_input``) at ``side``
        (default ``det_size``)."""
        return input_size(self.det_input, bgr.shape[1], bgr.shape[0], side or self.det_size)

    def _with_fine_pass(self, bgr: np.ndarray, found: Detections) -> Detections:
        """``found`` merged with a pass at ``models.det_fine_size`` for a large image."""
        h, w = bgr.shape[:2]
        if not fine_pass_wanted(h, w, self.det_size, self.det_fine_size, self.det_fine_above):
            return found
        fine = self._detect_one(bgr, self._input_size(bgr, self.det_fine_size))
        return found.merged(fine, float(self.detector.nms_thresh))

    @staticmethod
    def _as_detections(det: np.ndarray | None, kpss: np.ndarray | None) -> Detections:
        if det is None or det.shape[0] == 0:
            return Detections.empty()
        if kpss is None:
            raise ModelLoadError("SCRFD model has no keypoint head (need a *_kps model)")
        return Detections(
            det[:, :4].astype(np.float32),
            det[:, 4].astype(np.float32),
            kpss.astype(np.float32).reshape(-1, 5, 2),
        )

    def detect(self, bgr: np.ndarray) -> Detections:
        """Faces in a BGR uint8 image (any size; SCRFD letterboxes it to its input size, see
        :func:`faceloop.scrfd.input_size`; a large image gets a second pass,
        ``models.det_fine_size``)."""
        return self._with_fine_pass(bgr, self._detect_one(bgr, self._input_size(bgr)))

    def _detect_one(self, bgr: np.ndarray, size: tuple[int, int]) -> Detections:
        """One SCRFD call for one image at input ``size`` = (width, height): insightface's
        letterbox and decoding (:mod:`faceloop.scrfd`), which decodes only the anchors over the
        score threshold where insightface's ``SCRFD.detect`` decodes every anchor and builds its
        input with ``cv2.dnn.blobFromImage``: the same detections to the bit, 22 against 26 ms
        of CPU per photo (the bench's photos at 640x640, one thread; docs/SCALING.md). A graph
        without a batch axis or landmarks keeps insightface's own path."""
        d = self.detector
        if not (d.batched and d.use_kps):
            det, kpss = d.detect(bgr, input_size=size, max_num=0)
            return self._as_detections(det, kpss)
        x, scales = scrfd.blob([bgr], size, 0, d.input_mean, d.input_std)
        outs = d.session.run(d.output_names, {d.input_name: x})
        return self._decoded(outs, 0, scales[0], size)

    def _decoded(
        self, outs: Sequence[np.ndarray], b: int, scale: float, size: tuple[int, int]
    ) -> Detections:
        """Image ``b``'s faces in a (batched) SCRFD output."""
        d = self.detector
        return self._as_detections(
            *scrfd.decode(
                outs,
                b,
                scale,
                size,
                strides=d._feat_stride_fpn,
                num_anchors=d._num_anchors,
                thresh=d.det_thresh,
                nms_thresh=d.nms_thresh,
            )
        )

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """:meth:`detect` for several images, in SCRFD calls of up to ``models.det_batch``
        images that share an input size (padded to ``det_batch`` with ``fixed_shapes``). With
        ``det_batch`` 1 it is :meth:`detect` per image. The letterbox, decoding and NMS are
        insightface's own steps (:mod:`faceloop.scrfd`, shared with the GPU bench) applied per
        image of the batch, so the boxes are those of :meth:`detect` up to float rounding of
        the batched call (tests/test_models.py)."""
        if self.det_batch <= 1:
            return [self.detect(im) for im in images]
        out: list[Detections] = [Detections.empty()] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            by_size.setdefault(self._input_size(im), []).append(i)
        for size, idx in by_size.items():
            for lo in range(0, len(idx), self.det_batch):
                part = idx[lo : lo + self.det_batch]
                found = self._detect_together([images[i] for i in part], size)
                for i, d in zip(part, found, strict=True):
                    out[i] = self._with_fine_pass(images[i], d)
        return out

    def _detect_together(
        self, images: Sequence[np.ndarray], size: tuple[int, int]
    ) -> list[Detections]:
        """One SCRFD call for ``images`` (same input ``size`` = (width, height))."""
        d = self.detector
        pad = self.det_batch if self.fixed_shapes else 0
        if self.det_uint8_session is not None:
            u8, scales = scrfd.blob_uint8(images, size, pad)
            outs = self.det_uint8_session.run(d.output_names, {self.det_uint8_input: u8})
        else:
            x, scales = scrfd.blob(images, size, pad, d.input_mean, d.input_std)
            outs = d.session.run(d.output_names, {d.input_name: x})
        return [self._decoded(outs, b, scale, size) for b, scale in enumerate(scales)]

    def embed(self, aligned_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 512) float32 L2-normalised embeddings of 112x112 BGR aligned crops, in
        recognizer calls of at most ``models.embed_batch`` crops (bounded memory); with
        ``fixed_shapes`` every call is padded to ``embed_batch`` crops."""
        if len(aligned_bgr) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        crops = list(aligned_bgr)
        step = max(1, self.embed_batch)
        parts = []
        for i in range(0, len(crops), step):
            part = crops[i : i + step]
            n = len(part)
            if self.fixed_shapes and n < step:
                part = part + [np.zeros_like(part[0])] * (step - n)
            parts.append(self.recognizer.get_feat(part)[:n])
        return l2_normalize(np.concatenate(parts))


YUNET_MIN_SIDE = 64  # pixels: a smaller input side is padded (OpenCVBackend._detect_at)


class OpenCVBackend(_TaggedBackend):
    """YuNet + SFace via OpenCV's DNN module (CPU)."""

    name = "opencv"
    # cv2.FaceDetectorYN keeps its input size between calls (setInputSize): one per thread.
    thread_safe = False

    def __init__(self, settings: ModelSettings, providers: Sequence[object] | None = None) -> None:
        if settings.recognizer:
            raise ConfigError(
                "a registered recognizer follows insightface's ArcFace ONNX "
                "convention: use models.backend: insightface with it"
            )
        if CUDA in provider_names(providers):
            raise ModelLoadError(
                "asked for CUDA but the opencv backend runs on CPU only "
                "(opencv-python-headless has no CUDA DNN backend)"
            )
        root = Path(settings.root)
        self.infos = ensure_model_infos(root, self.name)
        self.uses_cuda = False
        # OpenCV's thread pool is process-wide; an actor owns its process, so this is its budget.
        cv2.setNumThreads(max(1, settings.threads))
        self.det_thresh = settings.det_thresh
        self.det_size = settings.det_size
        self.det_fine_size = settings.det_fine_size
        self.det_fine_above = settings.det_fine_above
        try:
            self.detector = cv2.FaceDetectorYN.create(
                str(model_path(root, self.name, _info(self.infos, "detector"))),
                "",
                (320, 320),
                settings.det_thresh,
                YUNET_NMS_IOU,
                5000,
            )
            self.recognizer = cv2.FaceRecognizerSF.create(
                str(model_path(root, self.name, _info(self.infos, "recognizer"))), ""
            )
        except cv2.error as exc:
            raise ModelLoadError(f"OpenCV could not load YuNet/SFace: {exc}") from exc
        self.embedding_dim = 128

    def detect(self, bgr: np.ndarray) -> Detections:
        """Faces in a BGR uint8 image. Images whose longer side exceeds ``det_size`` are
        downscaled to it first (as SCRFD's letterbox does), so cost does not grow with
        megapixels; a large image also gets a pass at ``models.det_fine_size``, merged by NMS.
        Coordinates are returned in the input image's pixels."""
        h, w = bgr.shape[:2]
        found = self._detect_at(bgr, self.det_size)
        if fine_pass_wanted(h, w, self.det_size, self.det_fine_size, self.det_fine_above):
            found = found.merged(self._detect_at(bgr, self.det_fine_size), YUNET_NMS_IOU)
        return found

    def _detect_at(self, bgr: np.ndarray, side: int) -> Detections:
        """YuNet on ``bgr`` downscaled so that its longer side is at most ``side``."""
        h, w = bgr.shape[:2]
        scale = min(1.0, side / max(h, w))
        img = bgr
        if scale < 1.0:
            img = cv2.resize(
                bgr,
                (max(1, round(w * scale)), max(1, round(h * scale))),
                interpolation=cv2.INTER_AREA,
            )
        # YuNet returns one face of garbage (inf / NaN or ~1e29 corners at score 1.0) for an
        # input 32 rows high or less (a 20000x10 strip scaled to 640x1): a side under 64 is
        # padded with black at the bottom / right, where coordinates do not move.
        pad_h, pad_w = max(0, YUNET_MIN_SIDE - img.shape[0]), max(0, YUNET_MIN_SIDE - img.shape[1])
        if pad_h or pad_w:
            img = cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=0)
        self.detector.setInputSize((img.shape[1], img.shape[0]))
        _, found = self.detector.detect(np.ascontiguousarray(img))
        if found is None or len(found) == 0:
            return Detections.empty()
        faces = np.asarray(found, dtype=np.float32)
        # and whatever else is not a face in this image is dropped, never aligned
        faces = faces[np.isfinite(faces[:, :15]).all(axis=1)]
        faces = faces[
            (faces[:, 2] > 0)
            & (faces[:, 3] > 0)
            & (faces[:, 0] < img.shape[1])
            & (faces[:, 1] < img.shape[0])
            & (faces[:, 0] + faces[:, 2] > 0)
            & (faces[:, 1] + faces[:, 3] > 0)
        ]
        if len(faces) == 0:
            return Detections.empty()
        faces[:, :14] /= scale
        boxes = faces[:, :4].copy()
        boxes[:, 2] += boxes[:, 0]  # YuNet gives x, y, w, h
        boxes[:, 3] += boxes[:, 1]
        order = np.argsort(-faces[:, 14], kind="stable")
        return Detections(
            boxes[order], faces[order, 14].copy(), faces[order, 4:14].reshape(-1, 5, 2).copy()
        )

    def embed(self, aligned_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 128) float32 L2-normalised SFace embeddings of 112x112 BGR aligned crops.

        cv2.FaceRecognizerSF takes one crop per call; the loop is the batch."""
        if len(aligned_bgr) == 0:
            return np.zeros((0, self.embedding_dim), np.float32)
        feats = [
            np.asarray(self.recognizer.feature(np.ascontiguousarray(a))).reshape(-1)
            for a in aligned_bgr
        ]
        return l2_normalize(np.stack(feats))


BACKENDS: dict[str, type[InsightFaceBackend] | type[OpenCVBackend]] = {
    "insightface": InsightFaceBackend,
    "opencv": OpenCVBackend,
}


def _registered_info(path: Path, sha256: str | None, name: str | None) -> ModelInfo:
    """ModelInfo of a registered recognizer file, its sha256 checked when one is given."""
    from faceloop.hashing import sha256_file
    from faceloop.modelstore import BUILTIN_RECOGNIZERS, RECOGNIZERS_DIR, fetch_recognizer

    builtin = next(
        (
            b
            for b in BUILTIN_RECOGNIZERS.values()
            if path.parent.name == RECOGNIZERS_DIR and b.file == path.name
        ),
        None,
    )
    if builtin is not None and not path.is_file():
        # A built-in recognizer (models.recognizer named it) not fetched yet into this root.
        fetch_recognizer(path.parent.parent, builtin.name)
    if not path.is_file():
        raise ModelLoadError(f"registered recognizer not found: {path}")
    actual = sha256_file(path)
    if sha256 and actual != sha256:
        raise ModelLoadError(
            f"registered recognizer {path} has sha256 {actual[:12]}…, "
            f"the registry says {sha256[:12]}…"
        )
    return ModelInfo(
        role="recognizer",
        name=name or path.stem,
        file=path.name,
        sha256=actual,
        package=builtin.dist if builtin is not None else "registered",
    )


def model_infos(model_settings: ModelSettings) -> list[ModelInfo]:
    """The verified models a run with these settings uses (a registered recognizer, when set,
    in place of the backend's): what dataset manifests record."""
    infos = ensure_model_infos(Path(model_settings.root), model_settings.backend)
    if model_settings.recognizer:
        infos = [i for i in infos if i.role != "recognizer"] + [
            _registered_info(
                Path(model_settings.recognizer),
                model_settings.recognizer_sha256,
                model_settings.recognizer_name,
            )
        ]
    return infos


def load_backend(
    model_settings: ModelSettings, providers: Sequence[object] | None = None
) -> FaceBackend:
    """Load the configured backend's verified models. ``providers``: onnxruntime provider list
    (default CPU only); one naming CUDA makes loading fail unless CUDA is really used."""
    cls = BACKENDS.get(model_settings.backend)
    if cls is None:
        raise ConfigError(
            f"unknown model backend {model_settings.backend!r}; known: {sorted(BACKENDS)}"
        )
    backend = cls(model_settings, providers)
    log.info(
        "loaded %s backend (%s, %s)",
        backend.name,
        backend.detector_tag.split("@")[0],
        backend.recognizer_tag.split("@")[0],
    )
    return backend


# ---------------------------------------------------------------- a backend loaded ahead


@dataclass
class _Ahead:
    key: str
    thread: threading.Thread
    backend: FaceBackend | None = None


# Backends loading or loaded ahead, by owner (a run id): load_ahead / take_ahead / drop_ahead.
_AHEAD: dict[str, _Ahead] = {}
_AHEAD_LOCK = threading.Lock()


def _ahead_key(model_settings: ModelSettings, providers: Sequence[object] | None) -> str:
    return model_settings.model_dump_json() + repr(provider_names(providers))


def load_ahead(
    owner: str, model_settings: ModelSettings, providers: Sequence[object] | None = None
) -> None:
    """Start loading a backend for ``owner`` (a run id) on a daemon thread, for
    :func:`take_ahead` to hand over once it is needed. The refresh starts it once discovery has
    listed new files, while hashing them keeps one core busy, so the models are ready when a
    small run's face stage begins instead of being loaded then (docs/SCALING.md). A load
    that fails leaves nothing behind: the stage then loads, and fails, on its own.
    :func:`drop_ahead` frees a backend nobody took."""
    slot = _Ahead(_ahead_key(model_settings, providers), threading.Thread())

    def run() -> None:
        try:
            slot.backend = load_backend(model_settings, providers)
        except Exception as exc:  # the stage's own load reports it
            log.debug("backend not loaded ahead: %s", exc)

    slot.thread = threading.Thread(target=run, name="faceloop-load-ahead", daemon=True)
    drop_ahead(owner)
    with _AHEAD_LOCK:
        _AHEAD[owner] = slot
    slot.thread.start()


def take_ahead(
    owner: str, model_settings: ModelSettings, providers: Sequence[object] | None = None
) -> FaceBackend | None:
    """The backend :func:`load_ahead` loaded for ``owner`` (waiting for its load to end), or
    None when none was started, its load failed or it was loaded for other settings. It is
    handed over once: the registry no longer holds it."""
    slot = _pop_ahead(owner)
    if slot is None or slot.key != _ahead_key(model_settings, providers):
        return None
    return slot.backend


def drop_ahead(owner: str) -> None:
    """Free ``owner``'s backend loaded ahead, if any nobody took (waits for a load in flight,
    so that no model is being loaded when the process moves on or exits)."""
    _pop_ahead(owner)


def _pop_ahead(owner: str) -> _Ahead | None:
    """``owner``'s slot, out of the registry, once its load has ended (None: there is none)."""
    with _AHEAD_LOCK:
        slot = _AHEAD.pop(owner, None)
    if slot is not None:
        slot.thread.join()
    return slot


def detect_images(backend: FaceBackend, images: Sequence[np.ndarray]) -> list[Detections]:
    """``backend.detect`` of each image; through the backend's ``detect_batch`` when it has one
    (insightface: SCRFD calls of ``models.det_batch`` images)."""
    batch = getattr(backend, "detect_batch", None)
    if batch is not None:
        return list(batch(images))
    return [backend.detect(im) for im in images]


def _padded(
    bgr: np.ndarray, always: bool, pad_below: int, fraction: float
) -> tuple[np.ndarray, int, int]:
    """(the image the detector sees, x and y border added): :func:`detect_padded`'s rule."""
    h, w = bgr.shape[:2]
    if not always and min(h, w) >= pad_below:
        return bgr, 0, 0
    px, py = round(w * fraction), round(h * fraction)
    padded = cv2.copyMakeBorder(bgr, py, py, px, px, cv2.BORDER_CONSTANT, value=(127, 127, 127))
    return padded, px, py


def detect_padded_many(
    backend: FaceBackend,
    images: Sequence[np.ndarray],
    always: Sequence[bool],
    pad_below: int = PAD_BELOW_PX,
    fraction: float = PAD_FRACTION,
) -> list[Detections]:
    """:func:`detect_padded` of each image (``always[i]`` for image i), the detector called
    once for all of them (:func:`detect_images`)."""
    prepared = [
        _padded(bgr, pad, pad_below, fraction) for bgr, pad in zip(images, always, strict=True)
    ]
    found = detect_images(backend, [img for img, _, _ in prepared])
    return [
        d.shifted(-px, -py) if px or py else d
        for d, (_, px, py) in zip(found, prepared, strict=True)
    ]


def detect_padded(
    backend: FaceBackend,
    bgr: np.ndarray,
    pad_below: int = PAD_BELOW_PX,
    fraction: float = PAD_FRACTION,
    always: bool = False,
) -> Detections:
    """Detect, padding small (or, with ``always``, any) images first; coordinates are those of
    the unpadded ``bgr``.

    When the shorter side is below ``pad_below`` px (or ``always``), the image gets a constant
    grey border of ``fraction`` of its width/height on each side, so a face that fills the frame
    becomes a face of normal relative size for the detector. Boxes may then extend past the
    image edge (a face cut by the frame); they are not clipped. Otherwise the image is detected
    as it is.
    """
    img, px, py = _padded(bgr, always, pad_below, fraction)
    found = backend.detect(img)
    return found.shifted(-px, -py) if px or py else found
