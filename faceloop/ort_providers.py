"""onnxruntime provider entries shared by the face stage and ``benchmarks.gpu`` (no imports
beyond the standard library, so the GPU bench runs with numpy, cv2 and onnxruntime alone)."""

from __future__ import annotations

import os

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# onnxruntime's CUDA provider searches cuDNN's convolution algorithms EXHAUSTIVE-ly by default:
# every conv is timed for every new input shape. The face stage meets a new shape at each
# recognizer batch size and (with image-sized detector input) each image size, so that search
# ran again and again inside the timed work. HEURISTIC asks cuDNN for its pick instead.
CUDNN_SEARCH_ENV = "FACELOOP_CUDNN_CONV_ALGO_SEARCH"
CUDNN_SEARCH_DEFAULT = "HEURISTIC"


def cudnn_search() -> str:
    value = os.environ.get(CUDNN_SEARCH_ENV, CUDNN_SEARCH_DEFAULT).upper()
    if value not in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        raise ValueError(f"{CUDNN_SEARCH_ENV}={value!r}: expected EXHAUSTIVE, HEURISTIC or DEFAULT")
    return value


def with_cuda_options(providers: list[object]) -> list[object]:
    """``providers`` with a bare ``"CUDAExecutionProvider"`` given faceloop's CUDA options."""
    return [
        (CUDA, {"cudnn_conv_algo_search": cudnn_search()}) if p == CUDA else p for p in providers
    ]
