"""OpenVINO behind an onnxruntime session's ``run``: the face models in bf16 on CPUs with AMX.

``models.runtime: openvino-bf16`` runs the same ONNX files through OpenVINO's CPU plugin with
``INFERENCE_PRECISION_HINT=bf16``. On an Intel Xeon with AMX (2 cores) SCRFD-500M at 640x640 took
9.1 ms against onnxruntime's 17.5 ms and EdgeFace-S 3.7 against 6.6-7.0 ms a face, with
embeddings at cosine >= 0.998 to onnxruntime's f32 ones (docs/SCALING.md, thirty-fifth session).

:class:`OpenVINOSession` wraps the onnxruntime session insightface's model objects and
faceloop's batching already hold: the metadata (inputs, outputs, providers) stay the
onnxruntime session's, ``run`` goes to OpenVINO, compiled once per input shape (static shapes
are what bf16 kernels are fast on; a run sees a handful: the detector's sizes, the recognizer's
batch sizes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from typing import Any

import numpy as np

PRECISION = "bf16"

# The first model call of the process runs alone: openvino's bindings set up numpy's C API on
# first use under a once-guard, and two threads arriving there together (the face stage's two
# driver threads, each with its own backend) deadlocked on it.
_FIRST_CALL = threading.Lock()
_first_done = threading.Event()

# Compiled models by (model, input shape), shared by the sessions of a process (the driver's
# threads each hold a backend): a compile costs ~0.1-1 s, an infer request is per session.
_COMPILED: dict[tuple[str, tuple[int, ...]], Any] = {}
_COMPILE_LOCK = threading.Lock()


def _padded(n: int) -> int:
    """The batch a call of ``n`` inputs runs at on a model whose batch axis is free: the next
    power of two, so a run compiles a handful of shapes, not one per batch size."""
    return 1 << max(0, (n - 1).bit_length())


def available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVINOSession:
    """``run(output_names, feed)`` on OpenVINO for the model ``source`` (an ONNX path or its
    bytes); everything else is the onnxruntime session ``ort_session``'s."""

    def __init__(self, ort_session: Any, source: str | bytes, threads: int) -> None:
        import openvino as ov

        self._ort = ort_session
        self._core = ov.Core()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if isinstance(source, bytes):
            # OpenVINO reads ONNX from a file; the graph with its batch axis freed
            # (faceloop.onnx_batch) exists only in memory.
            self._tmp = tempfile.TemporaryDirectory(prefix="faceloop-ov-")
            path = os.path.join(self._tmp.name, "model.onnx")
            with open(path, "wb") as f:
                f.write(source)
            source = path
        self._path = source
        with open(source, "rb") as f:
            self._key = hashlib.sha256(f.read()).hexdigest()
        batch_dim = ort_session.get_inputs()[0].shape[0]
        self._free_batch = not isinstance(batch_dim, int)
        self._requests: dict[tuple[int, ...], tuple[Any, Any]] = {}
        self._config = {
            "INFERENCE_NUM_THREADS": str(max(1, int(threads))),
            "INFERENCE_PRECISION_HINT": PRECISION,
            "PERFORMANCE_HINT": "LATENCY",
            # Not pinned: two actors (or driver threads) each with one inference thread were
            # pinned to the same core, and the face stage left the other one idle.
            "ENABLE_CPU_PINNING": "NO",
        }
        self._lock = threading.Lock()
        self._output_names = [o.name for o in ort_session.get_outputs()]

    # -- onnxruntime's metadata ------------------------------------------------------------------

    def get_inputs(self) -> Any:
        return self._ort.get_inputs()

    def get_outputs(self) -> Any:
        return self._ort.get_outputs()

    def get_providers(self) -> Any:
        return self._ort.get_providers()

    def get_provider_options(self) -> Any:
        return self._ort.get_provider_options()

    def set_providers(self, *args: Any, **kwargs: Any) -> Any:
        return self._ort.set_providers(*args, **kwargs)

    # -- the model call --------------------------------------------------------------------------

    def _request(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        with self._lock:
            entry = self._requests.get(shape)
            if entry is None:
                with _COMPILE_LOCK:
                    compiled = _COMPILED.get((self._key, shape))
                    if compiled is None:
                        import openvino as ov

                        model = self._core.read_model(self._path)
                        model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
                        compiled = self._core.compile_model(model, "CPU", self._config)
                        _COMPILED[(self._key, shape)] = compiled
                entry = (compiled, compiled.create_infer_request())
                self._requests[shape] = entry
            return entry

    def run(
        self, output_names: list[str] | None, feed: dict[str, Any], run_options: Any = None
    ) -> list[np.ndarray]:
        if len(feed) != 1:
            raise ValueError("OpenVINOSession runs models of one input")
        (x,) = feed.values()
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        pad = _padded(n) - n if self._free_batch else 0
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
        shape = tuple(int(d) for d in x.shape)
        if not _first_done.is_set():
            with _FIRST_CALL:
                out = self._infer(*self._request(shape), x, output_names)
                _first_done.set()
        else:
            out = self._infer(*self._request(shape), x, output_names)
        return [o[:n] for o in out] if pad else out

    def _infer(
        self, compiled: Any, request: Any, x: np.ndarray, output_names: list[str] | None
    ) -> list[np.ndarray]:
        request.infer({0: x})
        names = output_names or self._output_names
        return [np.array(request.get_tensor(compiled.output(n)).data, copy=True) for n in names]
