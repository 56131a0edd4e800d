"""Shared fixtures: sample face photos, a fetched model store, and broken files of every kind.

- ``sample_photos`` (session): name -> Path of photos shipped in installed packages
  (see :func:`faceloop.samples.sample_photos`).
- ``model_root`` (session): a temporary model root filled once by ``fetch_models`` for both
  backends and the default built-in recognizer (EdgeFace-S); point
  ``ModelSettings(root=str(model_root))`` at it.
- ``labelled_people`` (session): a labelled folder (``<root>/<person>/<shot>.jpg``, 16 or
  more people) made from the faces of the sample photos, for `faceloop eval` and `loop-eval`.
- ``bad_files(tmp_path)``: a helper (function-scoped fixture returning ``make(dir) -> dict``)
  that writes one file per decode failure reason; keys are the expected ``BadInputError``
  reason codes (with the limits :data:`BAD_FILE_LIMITS`).
- ``bad_file_limits``: the :class:`InputLimits` under which every ``bad_files`` entry fails
  with its key as reason (small byte / pixel limits keep the files tiny).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from faceloop.config import InputLimits


def inline_settings(store: Path, model_root: Path, **sources: Path) -> Any:
    """Settings of a store at ``store`` fed by ``sources`` (kind -> folder), with the models of
    ``model_root``: what a test running the stages inline (`_refresh_inline`) needs."""
    from faceloop.config import SourceSpec, load_settings

    return load_settings(
        None,
        store=str(store),
        sources=[SourceSpec(kind=k, uri=str(v)) for k, v in sources.items()],
        models={"root": str(model_root)},
    )


# Limits that make tiny test files trip the size checks.
BAD_FILE_LIMITS = InputLimits(max_image_bytes=200_000, max_image_pixels=4_000_000)


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, Path]:
    from faceloop.samples import sample_photos as _photos

    return _photos()


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from faceloop.config import DEFAULT_RECOGNIZER
    from faceloop.modelstore import fetch_models, fetch_recognizer

    root = tmp_path_factory.mktemp("models")
    fetch_models(root, ("insightface", "opencv"))
    fetch_recognizer(root, DEFAULT_RECOGNIZER)  # the insightface backend's default recognizer
    return root


# Images per person of ``labelled_people``.
SHOTS = 4


def _people_from_samples(root: Path, model_root: Path) -> int:
    """``root/<person>/<shot>.jpg``: every face of the sample photos big enough to upscale,
    cropped with its surroundings, scaled so the face is ~100 px wide, and shot ``SHOTS`` times
    (crop, flip, light, rotation, recompression). Returns the number of people."""
    from faceloop.config import ModelSettings
    from faceloop.demo import augment, crop_around, face_boxes
    from faceloop.samples import sample_photos
    from tasks.backends import load_backend

    backend = load_backend(ModelSettings(root=str(model_root)))
    rng = np.random.default_rng(0)
    n = 0
    for key, path in sorted(sample_photos().items()):
        img = Image.open(path).convert("RGB")
        for box in face_boxes(img, backend.detect):
            if box.w < 36:
                continue
            crop = crop_around(img, box, 1.0)
            scale = 100.0 / box.w
            crop = crop.resize((int(crop.width * scale), int(crop.height * scale)))
            folder = root / f"person_{n:02d}"
            folder.mkdir(parents=True)
            for k in range(SHOTS):
                shot = augment(crop, rng, max_crop=0.04)
                shot.save(folder / f"{key}_{k}.jpg", quality=int(rng.integers(80, 95)))
            n += 1
    return n


@pytest.fixture(scope="session")
def labelled_people(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    assert _people_from_samples(root, model_root) >= 16
    return root


@pytest.fixture(scope="session")
def bad_file_limits() -> InputLimits:
    return BAD_FILE_LIMITS


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def _png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG (8-bit RGB) whose IHDR declares width x height, with the given IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_bad_files(directory: Path) -> dict[str, Path]:
    """Write one broken file per reason code into ``directory``; reason -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    good = _jpeg_bytes()
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(gif, "GIF")
    files = {
        "empty_file": b"",
        "too_large_bytes": b"\xff\xd8\xff" + b"\0" * (BAD_FILE_LIMITS.max_image_bytes + 1),
        "not_an_image": b"this is a text file, not a photo\n" * 10,
        "unsupported_format": gif.getvalue(),
        # Header says 10000x10000 (1e8 px); the pixel data is never reached.
        "decompression_bomb": _png(10_000, 10_000, zlib.compress(b"\0" * 16)),
        "truncated": good[: len(good) // 2],
        # JPEG decoders conceal damaged entropy data, so "corrupt" is a PNG whose complete,
        # CRC-valid IDAT is not a zlib stream.
        "corrupt": _png(64, 48, bytes(range(256)) * 20),
    }
    ext = {"unsupported_format": ".gif", "decompression_bomb": ".png", "corrupt": ".png"}
    out = {}
    for reason, data in files.items():
        path = directory / f"{reason}{ext.get(reason, '.jpg')}"
        path.write_bytes(data)
        out[reason] = path
    return out


@pytest.fixture
def bad_files(tmp_path: Path) -> Callable[[Path | None], dict[str, Path]]:
    """``bad_files()`` or ``bad_files(dir)`` -> {reason code: path of a file failing with it}."""

    def make(directory: Path | None = None) -> dict[str, Path]:
        return make_bad_files(directory or tmp_path / "bad")

    return make
