"""Deterministic crash points for the fault tests (tests only; never set in production).

``FACELOOP_TEST_CRASH_AT=<point>`` makes the process SIGKILL itself (its whole process group
when it leads one, so Ray's helper processes die with it) the first time it reaches
:func:`crash_point` with that name: no ``finally``, no ``atexit``, exactly what ``kill -9`` or a
lost machine leaves behind. Points: ``faces`` (the face stage wrote its detections), ``label``
(the first faces group file was replaced), ``publish`` (the first dataset shard was uploaded).
Unset (always, outside tests): a no-op.
"""

from __future__ import annotations

import os
import signal

ENV = "FACELOOP_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) != name:
        return
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
