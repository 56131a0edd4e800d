"""tasks/decode.py: formats, modes, EXIF orientation and every refusal reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from faceloop.config import InputLimits
from faceloop.errors import BadInputError
from tasks.decode import decode_image, rgb_to_bgr

LIMITS = InputLimits()


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(w: int = 40, h: int = 30) -> np.ndarray:
    """RGB image with distinct channels, so colour order mistakes show."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 6 % 256, y * 8 % 256, np.full_like(x, 200)], -1).astype(np.uint8)


@pytest.mark.parametrize(
    "fmt,kw", [("PNG", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 100})]
)
def test_formats_decode_to_rgb_uint8(fmt, kw):
    arr = _gradient()
    out = decode_image(_encode(Image.fromarray(arr), fmt, **kw), LIMITS)
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    tol = 8 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - arr).max() <= tol
    assert rgb_to_bgr(out)[0, 0, 0] == out[0, 0, 2]


def test_modes_are_converted():
    gray = decode_image(_encode(Image.new("L", (10, 6), 77), "PNG"), LIMITS)
    assert gray.shape == (6, 10, 3) and (gray == 77).all()
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert (decode_image(_encode(rgba, "PNG"), LIMITS) == 255).all()
    pal = Image.new("P", (5, 5))
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.paste(1, (0, 0, 5, 5))
    assert decode_image(_encode(pal, "PNG"), LIMITS)[0, 0].tolist() == [10, 20, 30]
    deep = Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16))
    assert (decode_image(_encode(deep, "PNG"), LIMITS) == 255).all()


def test_exif_orientation_is_applied():
    upright = _gradient(40, 30)
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # 30 wide, 40 high, rotated CCW
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(Image.fromarray(stored), "JPEG", quality=100, exif=exif.tobytes())
    out = decode_image(data, LIMITS)
    assert out.shape == upright.shape
    assert np.abs(out.astype(int) - upright).mean() < 3


def _heic(img: Image.Image, **kw) -> bytes:
    """HEIC bytes by pillow-heif's encoder (a test dependency; its opener is not registered, so
    decoding goes through the pipeline's pi-heif)."""
    import pillow_heif

    buf = io.BytesIO()
    pillow_heif.from_pillow(img).save(buf, **kw)
    return buf.getvalue()


def test_phone_formats_decode_upright():
    """HEIC (iPhone cameras' default) and AVIF photos decode like JPEG; a HEIC stored sideways
    with EXIF orientation 6 comes out upright, turned once (not twice)."""
    upright = _gradient(40, 30)
    heic = _heic(Image.fromarray(upright), quality=95)
    assert heic[4:12] == b"ftypheic"
    out = decode_image(heic, LIMITS)
    assert out.shape == upright.shape and np.abs(out.astype(int) - upright).mean() < 4

    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_heic(stored, quality=95, exif=exif.tobytes()), LIMITS)
    assert out.shape == upright.shape and np.abs(out.astype(int) - upright).mean() < 4

    out = decode_image(_encode(Image.fromarray(upright), "AVIF", quality=95), LIMITS)
    assert out.shape == upright.shape and np.abs(out.astype(int) - upright).mean() < 6


def test_phone_formats_keep_the_limits():
    big = _heic(Image.fromarray(_gradient(400, 300)), quality=50)
    with pytest.raises(BadInputError) as e:
        decode_image(big, InputLimits(max_image_pixels=400 * 300 - 1))
    assert e.value.reason == "decompression_bomb"
    with pytest.raises(BadInputError) as e:
        decode_image(big[: len(big) // 2], LIMITS)
    assert e.value.reason == "truncated"


def test_every_bad_file_kind_gives_its_reason(bad_files, bad_file_limits):
    files = bad_files()
    assert set(files) == {
        "empty_file",
        "too_large_bytes",
        "not_an_image",
        "unsupported_format",
        "decompression_bomb",
        "truncated",
        "corrupt",
    }
    for reason, path in files.items():
        with pytest.raises(BadInputError) as err:
            decode_image(path.read_bytes(), bad_file_limits)
        assert err.value.reason == reason, (reason, str(err.value))


def test_pil_bomb_error_is_a_decompression_bomb_too():
    # Above PIL's own hard limit (2 x MAX_IMAGE_PIXELS) while ours is set higher still.
    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )
    from faceloop.config import PILLOW_MAX_PIXELS

    with pytest.raises(BadInputError) as err:
        decode_image(png, InputLimits(max_image_pixels=PILLOW_MAX_PIXELS))
    assert err.value.reason == "decompression_bomb"
    # Named in our limit's terms (it named Pillow's number, which no setting changes).
    assert str(err.value) == (
        f"decompression_bomb: 200000000 px > {PILLOW_MAX_PIXELS} (limits.max_image_pixels)"
    )
    # A limit Pillow would never let take effect is refused where it is set.
    with pytest.raises(ValueError, match="less than or equal to 178956970"):
        InputLimits(max_image_pixels=PILLOW_MAX_PIXELS + 1)
    assert Image.MAX_IMAGE_PIXELS * 2 == PILLOW_MAX_PIXELS  # the Pillow this runs on


def test_a_file_cut_short_in_its_header_is_truncated_with_the_decoder_message():
    """A phone JPEG with a large EXIF block cut inside its header was reported as
    "corrupt: header unreadable: OSError", the decoder's "truncated" message dropped."""
    jpeg = _encode(
        Image.fromarray(_gradient(400, 300)), "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 30000
    )
    with pytest.raises(BadInputError) as err:
        decode_image(jpeg[:5000], LIMITS)
    assert err.value.reason == "truncated"
    assert str(err.value) == "truncated: header unreadable: OSError: Truncated File Read"


def test_pixel_limit_is_inclusive_and_checked_before_decoding():
    img = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(img, InputLimits(max_image_pixels=10_000)).shape == (100, 100, 3)
    with pytest.raises(BadInputError, match="10000 px > 9999"):
        decode_image(img, InputLimits(max_image_pixels=9_999))
