"""SCRFD and ArcFace-convention recognizer sessions, without importing insightface.

``import insightface`` costs ~0.3 s of CPU in every process that loads the models (the driver
of a small refresh, every Ray face actor, every eval and test process): its package imports its
FaceAnalysis app, whose liveness add-on imports scikit-image's transforms and with them SciPy's
spatial module. The refresh uses none of that. Its backend runs the two onnxruntime sessions
itself (:mod:`faceloop.scrfd` decodes SCRFD's output), and from insightface's model objects it
needs only what their constructors read off the graphs. :func:`load_scrfd` and
:func:`load_arcface` read the same, the same way, as insightface 2.1's ``SCRFD`` and
``ArcFaceONNX`` (``insightface/model_zoo/scrfd.py`` ``_init_vars``, ``arcface_onnx.py``
``__init__`` / ``get_feat``): the same sessions (``onnxruntime.InferenceSession(path,
sess_options, providers)``, as the model zoo's ``PickableInferenceSession``), the same input
normalisation, strides and anchors, hence the same detections and embeddings to the bit
(tests/test_models.py compares them with insightface's own objects).

A detector graph without a batch axis or landmark head is left to insightface's own detect path
(:func:`tasks.backends.InsightFaceBackend`): this module only describes the SCRFD graphs the
backend decodes itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faceloop.errors import ModelLoadError
from faceloop.ort_providers import CUDA, provider_names

# insightface's SCRFD: outputs per graph -> (feature strides, anchors per position, landmarks)
_SCRFD_HEADS: dict[int, tuple[tuple[int, ...], int, bool]] = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}

_PRELOADED = [False]
_PRELOAD_LOCK = threading.Lock()


def session(path: Path | str | bytes, options: Any, providers: Sequence[object]) -> Any:
    """An onnxruntime session of ``path`` (or serialized model bytes), as insightface's model
    zoo makes one: onnxruntime's CUDA and cuDNN libraries preloaded first when ``providers``
    name CUDA (``onnxruntime.preload_dlls``, once per process)."""
    import onnxruntime as ort

    if CUDA in provider_names(providers) and not _PRELOADED[0]:
        preload = getattr(ort, "preload_dlls", None)
        with _PRELOAD_LOCK:
            if callable(preload) and not _PRELOADED[0]:
                preload()
            _PRELOADED[0] = True
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=list(providers))


class ScrfdModel:
    """An SCRFD detector graph: its session and what insightface's ``SCRFD`` reads off it."""

    taskname = "detection"

    def __init__(self, model_file: str, sess: Any) -> None:
        self.model_file = model_file
        self.session = sess
        inp = sess.get_inputs()[0]
        outputs = sess.get_outputs()
        self.input_name: str = inp.name
        self.output_names: list[str] = [o.name for o in outputs]
        self.input_mean = 127.5
        self.input_std = 128.0
        self.nms_thresh = 0.4
        self.det_thresh = 0.5
        self.batched = len(outputs[0].shape) == 3
        strides, anchors, kps = _SCRFD_HEADS.get(len(outputs), ((), 1, False))
        self._feat_stride_fpn = list(strides)
        self._num_anchors = anchors
        self.fmc = len(strides)
        self.use_kps = kps

    def prepare(self, ctx_id: int, **kwargs: Any) -> None:
        """insightface's ``SCRFD.prepare`` for the settings the backend passes (the input size
        is the backend's own, per call)."""
        if kwargs.get("nms_thresh") is not None:
            self.nms_thresh = float(kwargs["nms_thresh"])
        if kwargs.get("det_thresh") is not None:
            self.det_thresh = float(kwargs["det_thresh"])


class ArcFaceModel:
    """A recognizer graph of insightface's ArcFace convention (square BGR crops of 112 px or
    more, RGB inside, one embedding output): its session and ``get_feat``."""

    taskname = "recognition"

    def __init__(self, model_file: str, sess: Any, first_nodes: Sequence[str]) -> None:
        self.model_file = model_file
        self.session = sess
        self.first_nodes = list(first_nodes[:8])  # what the input convention is read from
        # insightface: a graph that subtracts and scales its input itself (MXNet exports) takes
        # raw pixels; any other (x - 127.5) / 127.5.
        sub = any(n.startswith(("Sub", "_minus")) for n in self.first_nodes)
        mul = any(n.startswith(("Mul", "_mul")) for n in self.first_nodes)
        self.input_mean, self.input_std = (0.0, 1.0) if sub and mul else (127.5, 127.5)
        inp = sess.get_inputs()[0]
        outputs = sess.get_outputs()
        if len(outputs) != 1:
            raise ModelLoadError(
                f"recognizer {model_file} has {len(outputs)} outputs; an ArcFace-convention "
                "graph has one (the embedding)"
            )
        self.input_name: str = inp.name
        self.input_shape = inp.shape
        self.input_size: tuple[int, int] = (int(inp.shape[3]), int(inp.shape[2]))
        self.output_names: list[str] = [outputs[0].name]
        self.output_shape = outputs[0].shape

    def prepare(self, ctx_id: int, **kwargs: Any) -> None:
        """Nothing to do: the session is made with the providers asked for."""

    def get_feat(self, imgs: Sequence[np.ndarray]) -> np.ndarray:
        """Raw (not normalised) embeddings of BGR crops, one row each: insightface's
        ``ArcFaceONNX.get_feat``."""
        import cv2

        blob = cv2.dnn.blobFromImages(
            list(imgs),
            1.0 / self.input_std,
            self.input_size,
            (self.input_mean, self.input_mean, self.input_mean),
            swapRB=True,
        )
        blob = np.ascontiguousarray(blob, dtype=np.float32)
        return self.session.run(self.output_names, {self.input_name: blob})[0]


def first_node_names(path: Path | str, n: int = 8) -> list[str]:
    """The names of a graph's first ``n`` nodes (the weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [node.name for node in model.graph.node[:n]]


def load_scrfd(path: Path | str, options: Any, providers: Sequence[object]) -> ScrfdModel:
    """The SCRFD detector at ``path``; fails like insightface's model zoo would route it
    elsewhere when the graph is not a detector (fewer than 5 outputs)."""
    sess = session(path, options, providers)
    if len(sess.get_outputs()) < 5:
        raise ModelLoadError(f"{path} is not an SCRFD detector graph (fewer than 5 outputs)")
    return ScrfdModel(str(path), sess)


def is_arcface_input(shape: Sequence[Any]) -> bool:
    """insightface's model zoo routes a graph to ``ArcFaceONNX`` by its input: square, at least
    112 px, a multiple of 16, and not 192 px (its landmark model's)."""
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:4]):
        return False
    return shape[2] == shape[3] and shape[2] >= 112 and shape[2] % 16 == 0 and shape[2] != 192


def load_arcface(
    path: Path | str,
    options: Any,
    providers: Sequence[object],
    graph: bytes | None = None,
    first_nodes: list[str] | None = None,
) -> ArcFaceModel:
    """The ArcFace-convention recognizer at ``path``; ``graph``, when given, is the graph to
    run instead of the file's (a rewrite of it with the same weights, faceloop.onnx_batch),
    with the file's ``first_nodes`` (:func:`first_node_names`)."""
    sess = session(path if graph is None else graph, options, providers)
    inp = sess.get_inputs()[0]
    if len(sess.get_outputs()) >= 5 or not is_arcface_input(inp.shape):
        raise ModelLoadError(
            f"{path} is not an ArcFace-convention recognizer graph (input {inp.shape})"
        )
    return ArcFaceModel(
        str(path), sess, first_nodes if first_nodes is not None else first_node_names(path)
    )
