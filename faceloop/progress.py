"""Terminal progress for long stages, and the one-line-per-stage log.

Promises: :func:`iterate` wraps an iterable in a tqdm bar (rate and, with a known total, ETA)
only when stderr is a terminal and ``FACELOOP_PROGRESS`` is not ``0``; otherwise it returns the
iterable unchanged, so logs, CI and Prefect workers get no bar noise. :data:`stages` is the
``faceloop.stages`` logger: one INFO line of counts per stage, which ``faceloop refresh`` shows
by default (faceloop/cli.py sets the ``faceloop`` logger to INFO for it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

stages = logging.getLogger("faceloop.stages")


def enabled() -> bool:
    """Bars are drawn only on a terminal (stderr) and unless FACELOOP_PROGRESS=0."""
    if os.environ.get("FACELOOP_PROGRESS", "") == "0":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def iterate(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterable[T]:
    """``items`` with a progress bar on a terminal, unchanged elsewhere."""
    if not enabled():
        return items
    from tqdm import tqdm

    return _closing(tqdm(items, desc=desc, total=total, unit=unit, leave=True, file=sys.stderr))


def _closing(bar: Iterable[T]) -> Iterator[T]:
    try:
        yield from bar
    finally:
        close = getattr(bar, "close", None)
        if close:
            close()
