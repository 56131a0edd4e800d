"""Shared fixtures: sample face photos, a fetched model store, and broken files of every kind.

- ``sample_photos`` (session): name -> Path of photos shipped in installed packages
  (see :func:`faceloop.samples.sample_photos`).
- ``model_root`` (session): a temporary model root filled once by ``fetch_models`` for both
  backends and the default built-in recognizer (EdgeFace-S); point
  ``ModelSettings(root=str(model_root))`` at it.
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

import numpy as np
import pytest
from PIL import Image

from faceloop.config import InputLimits

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
