"""SCRFD's pre- and post-processing for a batch of images, in numpy and OpenCV.

insightface's ``SCRFD.detect`` takes one image per call. Batching images per detector call is
what pays on a GPU, so the refresh's backend (``tasks.backends.InsightFaceBackend.detect_batch``)
and the GPU bench (``benchmarks.gpu.Engine``, which must run without insightface) share these
steps, each insightface's own:

- :func:`letterbox` (``SCRFD._detect_candidates``): resize into the input keeping the aspect
  ratio, top-left aligned on a black canvas;
- :func:`blob` (``SCRFD._prepare_input_blob`` for many images), optionally padded with blank
  images to a fixed batch size;
- :func:`decode` (``SCRFD.forward`` + ``detect``): per image of a batched output, the anchors
  above the score threshold, their boxes and 5 landmarks in the original image's pixels, sorted
  by score, then :func:`nms`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

INPUT_MEAN = 127.5
INPUT_STD = 128.0


def det_input_size(width: int, height: int, det_size: int, stride: int = 32) -> tuple[int, int]:
    """The image-sized SCRFD input (``models.det_input: image``): the longer side scaled down to
    ``det_size`` (never up), both sides rounded up to a multiple of ``stride``."""
    scale = min(1.0, det_size / max(1, width, height))

    def up(v: float) -> int:
        return max(stride, math.ceil(v / stride) * stride)

    return up(width * scale), up(height * scale)


def fit_input_size(width: int, height: int, det_size: int, stride: int = 32) -> tuple[int, int]:
    """The SCRFD input of ``models.det_input: fit``: the letterbox of a ``det_size`` square
    (the same scale, the same image placement, the same padding up to the next multiple of
    ``stride``), without the rest of the square's padding. Detection then sees the image as
    the square letterbox does at the pixels it spends on the image; a 3:2 photo costs 0.70 of
    the square's detector pixels, a square photo the same.

    :func:`letterbox` fits an image by its height when its aspect ratio (h / w) is above the
    input's and by its width otherwise, as in the square; the short side is rounded so that
    the same branch is taken (for a portrait image strictly wider than the image needs)."""
    if height > width:  # fit by height: det_size / W < h / w, W a multiple of stride
        w_need = det_size * width / height
        w = (math.floor(w_need / stride) + 1) * stride
        return min(w, det_size), det_size
    h = max(stride, math.ceil(det_size * height / max(1, width) / stride) * stride)
    return det_size, min(h, det_size)


def input_size(mode: str, width: int, height: int, det_size: int) -> tuple[int, int]:
    """SCRFD input (width, height) for an image by ``models.det_input`` ``mode``: "image"
    (:func:`det_input_size`), "fit" (:func:`fit_input_size`), else the ``det_size`` square."""
    if mode == "image":
        return det_input_size(width, height, det_size)
    if mode == "fit":
        return fit_input_size(width, height, det_size)
    return det_size, det_size


def _fitted(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of an image of ``shape`` resized into ``size`` keeping its aspect."""
    iw, ih = size
    im_ratio = float(shape[0]) / shape[1]
    # at least one pixel: a 20000x10 strip scaled to 640 wide would be 0 rows (cv2 refuses)
    if im_ratio > float(ih) / iw:
        return max(1, int(ih / im_ratio)), ih
    return iw, max(1, int(iw * im_ratio))


def letterbox(img: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """(canvas of ``size`` = (width, height), scale from the image to the canvas)."""
    iw, ih = size
    new_w, new_h = _fitted(img.shape, size)
    canvas = np.zeros((ih, iw, 3), dtype=np.uint8)
    canvas[:new_h, :new_w, :] = cv2.resize(img, (new_w, new_h))
    return canvas, float(new_h) / img.shape[0]


def blob_uint8(
    images: Sequence[np.ndarray], size: tuple[int, int], pad_to: int = 0
) -> tuple[np.ndarray, list[float]]:
    """(NHWC uint8 of the letterboxed BGR ``images``, black images after them up to ``pad_to``
    rows; each image's scale): the input of a detector graph that normalises its pixels itself
    (:func:`faceloop.onnx_input.uint8_input`), a quarter of :func:`blob`'s bytes. Each image is
    resized straight into its row: the canvases of :func:`letterbox`, without their copy."""
    iw, ih = size
    out = np.zeros((max(len(images), pad_to), ih, iw, 3), np.uint8)
    scales = []
    for i, img in enumerate(images):
        new_w, new_h = _fitted(img.shape, size)
        out[i, :new_h, :new_w] = cv2.resize(img, (new_w, new_h))
        scales.append(float(new_h) / img.shape[0])
    return out, scales


def blob(
    images: Sequence[np.ndarray],
    size: tuple[int, int],
    pad_to: int = 0,
    mean: float = INPUT_MEAN,
    std: float = INPUT_STD,
) -> tuple[np.ndarray, list[float]]:
    """(NCHW float32 input of the letterboxed BGR ``images``, padded with zero images up to
    ``pad_to`` rows; each image's scale)."""
    boxed = [letterbox(im, size) for im in images]
    return normalize([c for c, _ in boxed], mean, std, pad_to), [s for _, s in boxed]


def normalize(
    canvases: Sequence[np.ndarray],
    mean: float = INPUT_MEAN,
    std: float = INPUT_STD,
    pad_to: int = 0,
) -> np.ndarray:
    """NCHW float32 of equally sized BGR uint8 ``canvases`` in RGB order, ``(x - mean) / std``,
    with zero images after them up to ``pad_to`` rows: the values of
    ``cv2.dnn.blobFromImages(canvases, 1 / std, size, (mean,) * 3, swapRB=True)`` (equal to
    the bit for SCRFD's 127.5 / 128), at under half its cost where the canvases are not in the
    cache, as in a batch: 32 canvases of 640x640 took 1.64 ms each on one core of an AMD EPYC
    against OpenCV's 3.63 ms, which converts and transposes pixel by pixel. On the H100
    (2026-12-05) batched detection at 640x640 cost a worker 5.9 ms per photo in all. (One
    canvas just written, as a single-image call makes it, costs OpenCV 1.3 ms: there
    the difference is too small to matter.)"""
    n = len(canvases)
    h, w = canvases[0].shape[:2]
    out = np.empty((max(n, pad_to), 3, h, w), np.float32)
    for i, canvas in enumerate(canvases):
        for ch in range(3):  # RGB from BGR
            np.subtract(canvas[:, :, 2 - ch], mean, out=out[i, ch], dtype=np.float32)
    out[:n] *= np.float32(1.0 / std)
    out[n:] = 0.0
    return out


_CENTERS: dict[tuple[int, int, int, int], np.ndarray] = {}


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(x, y) of every anchor of a ``height`` x ``width`` feature map, each cell's centre once
    per anchor as ``SCRFD.forward`` lays them out (cached per shape)."""
    key = (height, width, stride, num_anchors)
    c = _CENTERS.get(key)
    if c is None:
        yx = np.mgrid[:height, :width]
        c = (np.stack([yx[1], yx[0]], axis=-1).astype(np.float32) * stride).reshape((-1, 2))
        if num_anchors > 1:
            c = np.repeat(c, num_anchors, axis=0)
        if len(_CENTERS) < 100:
            _CENTERS[key] = c
    return c


def nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Rows of ``dets`` (x1, y1, x2, y2, score) kept by greedy NMS at IoU ``thresh``
    (``SCRFD.nms``)."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def decode(
    outs: Sequence[np.ndarray],
    b: int,
    scale: float,
    size: tuple[int, int],
    *,
    strides: Sequence[int],
    num_anchors: int,
    thresh: float,
    nms_thresh: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``b`` of a batched SCRFD output ``outs`` (scores, boxes, landmarks per stride, in
    that order): (N, 5) boxes + score and (N, 5, 2) landmarks in the original image's pixels
    (``scale``: :func:`letterbox`'s), highest score first, after NMS."""
    fmc = len(strides)
    iw, ih = size
    scores_l, boxes_l, kps_l = [], [], []
    for k, stride in enumerate(strides):
        scores = outs[k][b].reshape(-1)
        pos = np.where(scores >= thresh)[0]
        if pos.size == 0:
            continue
        c = anchor_centers(ih // stride, iw // stride, stride, num_anchors)[pos]
        d = outs[k + fmc][b][pos] * stride
        boxes_l.append(
            np.stack(
                [c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], -1
            )
        )
        kps_l.append((np.tile(c, 5) + outs[k + 2 * fmc][b][pos] * stride).reshape(-1, 5, 2))
        scores_l.append(scores[pos])
    if not scores_l:
        return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
    scores = np.concatenate(scores_l)
    order = np.argsort(-scores, kind="stable")
    dets = np.hstack([np.concatenate(boxes_l) / scale, scores[:, None]]).astype(np.float32)[order]
    kps = (np.concatenate(kps_l) / scale).astype(np.float32)[order]
    keep = nms(dets, nms_thresh)
    return dets[keep], kps[keep]
