"""Console logging of the CLI: without ``-v`` a failed run ends in one ``faceloop: error:`` line.

Prefect logs a traceback for every failed task and flow run, and a dying library thread (Ray
Data's, after an outage) prints one through :data:`threading.excepthook`. Without ``-v`` the CLI
keeps those records' messages and drops their tracebacks (:func:`quiet_tracebacks`); Prefect
builds its handlers when it is first imported, inside a command, so commands that run a flow call
:func:`quiet_prefect_logs` after importing it.
"""

from __future__ import annotations

import logging
import threading

_active: list[logging.Filter] = []


class NoTraceback(logging.Filter):
    """Keep a record's message (naming the exception type), drop its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            kind = record.exc_info[0].__name__ if record.exc_info[0] else "error"
            record.msg = f"{record.getMessage()} ({kind})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_tracebacks() -> None:
    """Drop tracebacks from the root logger's handlers and from dying threads (logged at DEBUG)."""
    quiet = NoTraceback()
    _active.append(quiet)
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        logging.getLogger("faceloop").debug("thread %s ended with %s", name, args.exc_type.__name__)

    threading.excepthook = thread_hook


def quiet_prefect_logs() -> None:
    """Attach the filter to Prefect's console handlers (a no-op with ``-v``)."""
    for quiet in _active:
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
            for handler in logging.getLogger(name).handlers:
                if quiet not in handler.filters:
                    handler.addFilter(quiet)
