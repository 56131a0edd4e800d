"""ONNX inference of a registered recognizer with onnxruntime, without torch: what the refresh
needs to re-embed stored faces with a newly trained model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from faceloop.arrays import l2_normalize
from faceloop.errors import ConfigError
from faceloop.onnx_batch import takes_batches, with_batch_axis

ONNX_INPUT = "input.1"  # the name insightface's own recognizers use
ONNX_OUTPUT = "embedding"


def onnx_session(onnx_path: str | Path, device: str = "cpu", threads: int = 0) -> Any:
    """An onnxruntime session for ``onnx_path`` on ``device`` (``cpu``, ``cuda`` or
    ``cuda:N``); :class:`ConfigError` when CUDA is asked for and onnxruntime has none."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    providers: list[Any] = ["CPUExecutionProvider"]
    cuda = device.startswith("cuda")
    if cuda:
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
    sess = ort.InferenceSession(str(onnx_path), so, providers=providers)
    if cuda and "CUDAExecutionProvider" not in sess.get_providers():
        raise ConfigError("asked for CUDA but onnxruntime has no CUDAExecutionProvider here")
    # A graph that fixes the batch at 1 inside (EdgeFace's) is freed when a probe agrees.
    return with_batch_axis(
        sess, onnx_path, lambda data: ort.InferenceSession(data, so, providers=providers)
    )[0]


def batch_runner(sess: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``blob (N, 3, 112, 112) -> (N, D)`` raw outputs of a recognizer's session: one call when
    its graph takes batches (:func:`takes_batches`), else one call per crop."""
    name = sess.get_inputs()[0].name

    def run(blob: np.ndarray) -> np.ndarray:
        return np.asarray(sess.run(None, {name: blob})[0])

    if takes_batches(sess):
        return run
    return lambda blob: np.concatenate([run(blob[i : i + 1]) for i in range(len(blob))])


def onnx_embed_fn(
    onnx_path: str | Path, threads: int = 1
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """An ``embed_fn`` for :func:`tasks.reembed.reembed_faces` from an exported recognizer: a
    list of 112x112 BGR uint8 crops -> ``(N, D)`` float32 L2-normalised, preprocessed as
    insightface's ``ArcFaceONNX`` does."""
    sess = onnx_session(onnx_path, "cpu", threads)
    run = batch_runner(sess)

    def embed(crops: Sequence[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, sess.get_outputs()[0].shape[1]), np.float32)
        blob = cv2.dnn.blobFromImages(
            list(crops), 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True
        ).astype(np.float32)
        return l2_normalize(run(blob))

    return embed
