"""SHA-256 of streamed bytes and of files: the one digest helper every room uses."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

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
