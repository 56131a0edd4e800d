"""Run ids: ``20261206T140024123456Z-a1b2c3``, the run's UTC start to the microsecond and a
little randomness. They name ``runs/<run_id>.json``, the images table's per-run files and the
Prefect flow run, and they sort by time: the images table keeps a URI's row of the latest run id
(storage.tables.latest_images). Ids made before 2026-12-06 had whole seconds
(``20261206T140024Z-a1b2c3``); both forms are read."""

from __future__ import annotations

import datetime as dt
import re
import secrets
import threading

RUN_ID = re.compile(r"^\d{8}T\d{6}(\d{6})?Z-[0-9a-f]{6}$")
_STAMP = "%Y%m%dT%H%M%S%fZ"
_WHOLE = "%Y%m%dT%H%M%SZ"

_ISSUED = threading.Lock()
_last_issued: dt.datetime | None = None  # the time of the last id this process issued


def new_run_id(after: str | None = None) -> str:
    """Sortable, unique: UTC time to the microsecond plus a little randomness
    (``20261206T140024123456Z-a1b2c3``). Later than every id this process issued before, and
    than ``after`` when given (a run id of this or the older, whole-second form): the images
    table orders a URI's rows by run id (:func:`storage.tables.latest_images`)."""
    global _last_issued
    floor: list[dt.datetime] = []
    if after and (at := run_id_time(after)):
        # a whole-second id sorts after every microsecond one of its second ('Z' > digits)
        whole = len(after.split("-", 1)[0]) == len("20261206T140024Z")
        floor.append(at + dt.timedelta(seconds=1, microseconds=-1) if whole else at)
    with _ISSUED:
        t = dt.datetime.now(dt.UTC)
        if _last_issued:
            floor.append(_last_issued)
        if floor and t <= max(floor):
            t = max(floor) + dt.timedelta(microseconds=1)
        _last_issued = t
    return t.strftime(_STAMP) + "-" + secrets.token_hex(3)


def run_id_time(run_id: str) -> dt.datetime | None:
    """The UTC time a run id starts with (microseconds, or whole seconds in ids made before
    2026-12-06); None when it starts with none."""
    head = run_id.split("-", 1)[0]
    # strptime's %S takes one digit as well as two: the form is chosen by the length
    fmt = {len("20261206T140024123456Z"): _STAMP, len("20261206T140024Z"): _WHOLE}.get(len(head))
    try:
        return dt.datetime.strptime(head, fmt).replace(tzinfo=dt.UTC) if fmt else None
    except ValueError:
        return None


def checked_run_id(run_id: str) -> str:
    """``run_id`` when it has :func:`new_run_id`'s form, else ValueError."""
    if not RUN_ID.match(run_id):
        raise ValueError(
            f"run_id {run_id!r} is not a faceloop run id (like {new_run_id()}): the images "
            "table orders a file's rows by run id, which starts with the run's UTC time"
        )
    return run_id
