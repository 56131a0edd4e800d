"""The perceptual hash that finds one photo filed twice: re-encoded or resized copies stay within
PHASH_NEAR_BITS, different photos (the packages' sample photos) do not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from faceloop.hashing import PHASH_NEAR_BITS, hamming64, hamming_matrix, phash64


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _jpeg(arr: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return _rgb(io.BytesIO(buf.getvalue()))


def _resize(arr: np.ndarray, f: float) -> np.ndarray:
    im = Image.fromarray(arr)
    size = (max(1, round(im.width * f)), max(1, round(im.height * f)))
    return np.asarray(im.resize(size, Image.Resampling.BICUBIC))


def test_hamming():
    assert hamming64(0, 0) == 0
    assert hamming64(-1, 0) == 64  # signed int64 storage of all ones
    assert hamming64(0b1011, 0b0001) == 2
    m = hamming_matrix([0, -1, 5], [0, 3])
    assert m.tolist() == [[0, 2], [64, 62], [2, 2]]


@pytest.mark.parametrize(
    "change",
    [
        lambda a: _jpeg(a, 35),
        lambda a: _jpeg(a, 90),
        lambda a: _resize(a, 0.5),
        lambda a: _resize(a, 2.0),
        lambda a: _jpeg(_resize(a, 0.7), 40),
        lambda a: np.ascontiguousarray(a[:, :, ::-1]),  # BGR: channel order does not matter
    ],
    ids=["q35", "q90", "half", "double", "resize_q40", "bgr"],
)
def test_copies_are_near(sample_photos, change):
    for name in ("yaoming", "gdp", "t1", "players"):
        a = _rgb(sample_photos[name])
        assert hamming64(phash64(a), phash64(change(a))) <= PHASH_NEAR_BITS, name


def test_different_photos_are_far(sample_photos):
    hashes = {name: phash64(_rgb(p)) for name, p in sorted(sample_photos.items())}
    names = sorted(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert hamming64(hashes[a], hashes[b]) > PHASH_NEAR_BITS, (a, b)
    # a grey image and a mirrored photo are not the photo either
    a = _rgb(sample_photos["yaoming"])
    assert hamming64(phash64(a), phash64(a[:, ::-1])) > PHASH_NEAR_BITS


def test_stored_as_int64():
    h = phash64(np.full((40, 30), 200, np.uint8))
    assert -(1 << 63) <= h < (1 << 63)
    assert phash64(np.zeros((5, 5, 3), np.uint8)) == phash64(np.zeros((50, 50), np.uint8))


def test_a_file_uri_names_the_file_s_content_as_its_path_does(tmp_path) -> None:
    """`forget --image file:///...` of a photo the store had not seen yet tombstoned nothing
    ("no file there") while the plain path tombstoned its content, and `explain file://...`
    of a forgotten photo did not say it was forgotten: the URI was never read."""
    import hashlib

    from faceloop.hashing import image_keys

    photo = tmp_path / "my photos" / "a.jpg"
    photo.parent.mkdir()
    photo.write_bytes(b"jpeg bytes")
    sha = hashlib.sha256(b"jpeg bytes").hexdigest()
    uris, got = image_keys(photo.as_uri())
    assert got == sha == image_keys(str(photo))[1]
    assert str(photo) in uris and photo.as_uri() in uris
    assert image_keys("file:///no/such/file.jpg") == (
        ["/no/such/file.jpg", "file:///no/such/file.jpg"],
        None,
    )
