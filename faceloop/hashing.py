"""SHA-256 of streamed bytes and of files: the one digest helper every room uses; and the 64-bit
perceptual hash (pHash) that finds the same photo re-encoded or resized."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable

import numpy as np

CHUNK = 1 << 20


def sha256_chunks(chunks: Iterable[bytes]) -> tuple[str, int]:
    """``(hex sha256, total size)`` of the concatenated ``chunks``, read once, in order."""
    digest = hashlib.sha256()
    n = 0
    for chunk in chunks:
        digest.update(chunk)
        n += len(chunk)
    return digest.hexdigest(), n


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    with open(path, "rb") as fh:
        return sha256_chunks(iter(lambda: fh.read(CHUNK), b""))[0]


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> bool:
    """64 lowercase hex digits (a sha256 as the store writes it)."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def image_keys(
    target: str, remote: Callable[[str], str | None] | None = None
) -> tuple[list[str], str | None]:
    """How an image named on the command line may be stored: the URIs (an URI as given; a
    path as given, absolute and resolved, so ``./in/a.jpg`` finds ``/data/in/a.jpg``) and its
    sha256 when it is one (any case) or a readable local file (its content), or, through
    ``remote`` (:func:`storage.objectstore.remote_sha256`), an object's."""
    from pathlib import Path
    from urllib.parse import unquote

    if target.startswith("file://"):  # the store records local files by their path
        uris, sha = image_keys(unquote(target.removeprefix("file://")), remote)
        return sorted({target.rstrip("/"), *uris}), sha
    if target.startswith("s3://"):
        # Its content as it is now, as for a local file: a photo not taken in yet (or written
        # over since) is found by its bytes wherever the store holds them, and tombstoned.
        return [target.rstrip("/")], remote(target.rstrip("/")) if remote else None
    if "://" in target:
        return [target.rstrip("/")], None
    if is_sha256(target.lower()):
        return [], target.lower()
    path = Path(target).expanduser()
    try:
        resolved = str(path.resolve())
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13)
        resolved = str(path.absolute())
    uris = sorted({target, str(path.absolute()), resolved})
    try:
        sha = sha256_file(path) if path.is_file() else None
    except OSError:  # unreadable here (its permissions, a loop): found by its path alone
        sha = None
    return uris, sha


# --- perceptual hash -------------------------------------------------------------------------

PHASH_SIDE = 32  # the picture is reduced to this many pixels a side before the DCT
PHASH_BAND = 8  # the 8x8 lowest frequencies (DC excluded from the median) make the 64 bits
# Two pictures whose pHashes differ in at most this many of 64 bits are taken for the same photo
# (re-encoded, resized). Measured on 1,500 LFW photos (docs/QUALITY.md): re-encodes at JPEG
# quality 30-95 and resizes to 0.5-2x moved at most 6 bits (99th percentile 4); distinct photos
# were >= 10 bits apart, and simulated ID chips (tight 102x126 q35 crops, which all look alike)
# of different people >= 8 (10 of 1.1M pairs at 8, none below). A crop that cuts a few pixels
# off can move 10 bits: it is not caught. Today's harder chips (JPEG 30-40, tight 0.5 crop) of
# different people come closer (2 of 2.0M pairs at 6 bits, 27 within 8), so a duplicate claim
# also asks the recognizer (tasks/label.ClaimFaces).
PHASH_NEAR_BITS = 6
# With the recognizer's confirmation, up to this many bits: a chip resized to 0.5x and saved at
# JPEG 40 moved 7-8 bits in 6 of 1,500 chips (docs/QUALITY.md, "Duplicate claims").
PHASH_VERIFIED_BITS = 8
# Two *live* photos up to this many bits apart are the same capture when their faces are nearly
# identical too (tasks/label.COPY_COSINE): a live photo filed again with a stranger's face pasted
# into a corner moved 2-20 bits (median 10, 90th percentile 16; 350 lfw-dev photos, the eval's
# own compositing), while other photos of the same person are 8-58 bits apart (5th percentile
# 18) and 0.27% of different people's photos come within 16 bits (2,000 lfw-dev photos):
# the candidates the recognizer is asked about stay few (docs/QUALITY.md, "Duplicate claims").
PHASH_COPY_BITS = 16
# Beyond PHASH_COPY_BITS, up to this many bits, two live photos are the same capture only when
# their *main* (largest) faces are nearly identical: 2.7% of different people's photos come
# within 20 bits, and a share of live photos carries a bystander, so chance pairs that hold the
# same bystander's face appear there (two on eval seed 8 at 20 bits, 0.985). A pasted copy's main
# face is the original's: 13 of the 17 composites of 400 at 17-20 bits are caught this way, and
# none of the 53 same-person photo pairs there (docs/QUALITY.md, "Held-out seed 9").
PHASH_MAIN_COPY_BITS = 20


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n x n): ``D @ x`` is the DCT of the column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT = _dct_matrix(PHASH_SIDE)


def phash64(pixels: np.ndarray) -> int:
    """64-bit perceptual hash (DCT pHash) of an image given as a uint8 array (H x W grey, or
    H x W x 3 RGB/BGR: channels are averaged, so the channel order does not matter).

    The picture is reduced to 32x32 grey by box averaging, its 2-D DCT taken, and each of the
    8x8 lowest-frequency coefficients becomes one bit: 1 when above the median of those 64
    (the DC term left out of the median). Returned as a signed 64-bit int (Parquet int64);
    compare two with :func:`hamming64`."""
    from PIL import Image

    arr = np.asarray(pixels)
    grey = arr.mean(axis=2) if arr.ndim == 3 else arr.astype(np.float64)
    small = Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), mode="L").resize(
        (PHASH_SIDE, PHASH_SIDE), Image.Resampling.BOX
    )
    x = np.asarray(small, dtype=np.float64)
    coeffs = (_DCT @ x @ _DCT.T)[:PHASH_BAND, :PHASH_BAND].ravel()
    bits = coeffs > np.median(coeffs[1:])
    value = int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming64(a: int, b: int) -> int:
    """Number of differing bits of two 64-bit hashes (signed or unsigned ints)."""
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


def hamming_matrix(a: Iterable[int], b: Iterable[int]) -> np.ndarray:
    """(len(a), len(b)) int array of :func:`hamming64` distances, vectorised."""
    x = np.asarray(list(a), dtype=np.int64).view(np.uint64)
    y = np.asarray(list(b), dtype=np.int64).view(np.uint64)
    z = x[:, None] ^ y[None, :]
    out = np.zeros(z.shape, dtype=np.int64)
    for shift in range(0, 64, 8):
        out += _POPCOUNT8[((z >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.intp)]
    return out


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
