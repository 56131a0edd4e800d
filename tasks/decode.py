"""Image bytes -> RGB uint8 array, with the checks that keep hostile or broken files out.

Every refusal raises :class:`BadInputError` with one of these ``reason`` codes:

- ``empty_file``: zero bytes.
- ``too_large_bytes``: more than ``limits.max_image_bytes``.
- ``not_an_image``: no image format recognises the bytes.
- ``unsupported_format``: an image, but not JPEG/PNG/WebP/BMP/HEIF (HEIC)/AVIF.
- ``decompression_bomb``: the header declares more than ``limits.max_image_pixels`` pixels
  (checked before any pixel is decoded).
- ``truncated``: the file ends before the image data does.
- ``corrupt``: the pixel data cannot be decoded.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from faceloop.config import InputLimits
from faceloop.errors import BadInputError

log = logging.getLogger(__name__)

# MPO: multi-picture JPEG. HEIF: phones' HEIC photos (the default of iPhone cameras), decoded by
# pi-heif (libheif + libde265, decode only, LGPL); AVIF by Pillow's own plugin (Pillow >= 11.3).
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "MPO", "HEIF", "AVIF"})
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, HEIC/HEIF, AVIF"
# A strip or a speck holds no face a detector can find: a side under STRIP_SIDE_PX, or one side
# more than STRIP_ASPECT times the other (a panorama is ~1:10). Such an image is known to be
# faceless from its header: decoding a 95 KB PNG of 1 x 49,000,000 px took 1.6 GB and 5 s.
STRIP_SIDE_PX = 10
STRIP_ASPECT = 100


class HoldsNoFace(Exception):
    """An image whose header declares a strip or a speck (see STRIP_SIDE_PX): not decoded."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(f"a {width}x{height} px strip holds no face (not decoded)")
        self.width, self.height = width, height


@functools.cache
def _register_heif() -> None:
    """Let Pillow open HEIF/HEIC files (once per process, at the first file in an ISO media
    box: the import is ~20 ms that a run of JPEGs does not pay). pi-heif applies the file's own
    rotation (irot/imir) while decoding and resets the EXIF orientation to 1, so
    :func:`ImageOps.exif_transpose` does not turn the photo a second time. Without pi-heif
    HEIC files stay ``not_an_image``."""
    try:
        import pi_heif
    except ImportError:  # pragma: no cover - the pipeline install has it
        log.debug("pi-heif not installed: HEIC/HEIF photos cannot be decoded")
        return
    pi_heif.register_heif_opener()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        # 16-bit PNGs use the full 0..65535 range; map it onto 0..255 rather than clipping.
        peak = 65535 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255
        # round(x / peak * 255) in integers, in place: float64 copies of a 7000x7000 photo
        # took ~1.2 GB and 6 s (the same values to the bit).
        v = np.clip(arr, 0, peak).astype(np.uint32)
        v *= 255
        v += peak // 2
        v //= peak
        return Image.fromarray(v.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _cut_short(message: str) -> bool:
    """Whether a decoder's error says the file ends early."""
    text = message.lower()
    return "truncated" in text or "end of" in text


def _bomb_detail(exc: Exception, limits: InputLimits) -> str:
    """Pillow's own bomb error, in the terms of our limit (its message names its own)."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"{m.group(1)} px" if m else "too many pixels"
    return f"{size} > {limits.max_image_pixels} (limits.max_image_pixels)"


def decode_image(data: bytes, limits: InputLimits, strips: bool = True) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array of shape (H, W, 3), EXIF orientation applied.

    Height and width are those of the upright image (after EXIF rotation). Raises
    :class:`BadInputError` with a reason code from the module docstring for anything else, and
    :class:`HoldsNoFace` for a strip or a speck unless ``strips`` (default: decoded as any
    image).
    """
    if len(data) == 0:
        raise BadInputError("empty_file", "0 bytes")
    if len(data) > limits.max_image_bytes:
        raise BadInputError(
            "too_large_bytes",
            f"{len(data)} bytes > {limits.max_image_bytes} (limits.max_image_bytes)",
        )
    if data[4:8] == b"ftyp":  # an ISO media file: HEIF's box (AVIF's too)
        _register_heif()
    try:
        # Image.open only parses the header: size is known before any pixel is decoded.
        # PIL's own bomb warning is silenced (our limit decides); its hard error still counts.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadInputError("decompression_bomb", _bomb_detail(exc, limits)) from exc
    except UnidentifiedImageError as exc:
        raise BadInputError("not_an_image", "no known image format") from exc
    except Exception as exc:  # malformed headers raise assorted errors inside PIL
        text = str(exc)
        raise BadInputError(
            "truncated" if _cut_short(text) else "corrupt",
            f"header unreadable: {type(exc).__name__}" + (f": {text}" if text else ""),
        ) from exc

    fmt = img.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        raise BadInputError("unsupported_format", f"{fmt} is not one of {FORMAT_NAMES}")
    width, height = img.size
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise BadInputError(
            "decompression_bomb",
            f"{pixels} px > {limits.max_image_pixels} (limits.max_image_pixels)",
        )
    if width <= 0 or height <= 0:
        raise BadInputError("corrupt", f"header declares {width}x{height}")
    if not strips and (
        min(width, height) < STRIP_SIDE_PX or max(width, height) > STRIP_ASPECT * min(width, height)
    ):
        raise HoldsNoFace(width, height)

    try:
        img.load()
        upright = ImageOps.exif_transpose(img)
        rgb = _to_rgb(upright if upright is not None else img)
        arr = np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise BadInputError("decompression_bomb", _bomb_detail(exc, limits)) from exc
    except OSError as exc:
        reason = "truncated" if _cut_short(str(exc)) else "corrupt"
        raise BadInputError(reason, f"{fmt}: {exc}") from exc
    except (ValueError, SyntaxError, IndexError, struct.error) as exc:
        # libheif (pi-heif) reports a cut-off HEIC as a ValueError: "Unexpected end of file".
        reason = "truncated" if "end of file" in str(exc).lower() else "corrupt"
        raise BadInputError(reason, f"{fmt}: {type(exc).__name__}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise BadInputError("corrupt", f"decoded to shape {arr.shape}")
    return np.ascontiguousarray(arr)


def rgb_to_bgr(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) -> BGR (H, W, 3), contiguous (what OpenCV and the face models take)."""
    return np.ascontiguousarray(rgb[:, :, ::-1])
