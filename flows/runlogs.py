"""faceloop's own log lines in the Prefect flow run's log.

The stages log through module loggers (``tasks.discover``, ``storage.lock``, ...), which reached
only the process's console: in a deployment that is the worker's stdout, so an operator reading
``prefect flow-run logs`` (or the UI) never saw "store ... holds no earlier run: starting a new
store", "no sources are configured", "store lock: took over from ..." or a recovery's line.
:func:`run_logs` sends them to the flow run's log too, for the duration of a flow run, at the
level the loggers already log at (a deployment's warnings; ``-v`` adds the info lines). Lines
logged outside the flow run's context (a thread of a pool, a Ray worker) stay on the console
only. A logger Prefect already sends (``PREFECT_LOGGING_EXTRA_LOGGERS``) is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

# The packages whose module loggers a flow run's work logs through.
OURS = ("faceloop", "flows", "tasks", "storage", "annotate", "evaluation", "training")


def _handler() -> logging.Handler:
    from prefect.exceptions import MissingContextError
    from prefect.logging.handlers import APILogHandler

    class RunLogHandler(APILogHandler):
        """Prefect's API log handler, silent for a line logged outside a flow run's context
        (Prefect's warns on each, asking for PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW)."""

        def handleError(self, record: logging.LogRecord) -> None:
            if isinstance(sys.exc_info()[1], MissingContextError):
                return
            super().handleError(record)

    return RunLogHandler()


@contextlib.contextmanager
def run_logs() -> Iterator[None]:
    """Within: faceloop's module loggers also write to the current Prefect flow run's log."""
    from prefect.logging.handlers import APILogHandler

    handler = _handler()
    loggers = [
        lg
        for lg in (logging.getLogger(name) for name in OURS)
        if not any(isinstance(h, APILogHandler) for h in lg.handlers)
    ]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
