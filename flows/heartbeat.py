"""faceloop's flows end when their work ends, not on the heartbeat thread's next tick.

Prefect 3.9 sends flow-run heartbeats by default (every 180 s,
``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``) from a daemon thread that sleeps in one-second steps,
and the synchronous flow engine joins that thread when the flow function returns
(``prefect.flow_engine._send_heartbeats``, ``join_on_exit=True``). The join waits for the
current one-second step to end, so every sync flow run's wall time is rounded up towards the
next whole second from its start: 0.4-0.45 s of a 200-photo refresh on average
(docs/SCALING.md, "Forty-ninth session"). Prefect's own async engine does not join
(``join_on_exit=False``): once told to stop, the thread returns at its next step without
emitting, and it checks the run's state before every heartbeat.

:func:`no_wait_at_end` gives faceloop's flows the async engine's behaviour: heartbeats are sent
exactly as Prefect configures them (same events, same interval, still on by default); only the
wait at the end is dropped. Other flows in the same process keep Prefect's behaviour. The
engine's heartbeat function is private, so this wraps it only when it has the expected
``join_on_exit`` parameter (Prefect is pinned in pyproject.toml; tests/test_heartbeat.py fails
when a new pin changes it) and otherwise leaves Prefect as it is.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F")

# Names of the flows whose runs do not wait for the heartbeat thread at their end.
_NO_WAIT: set[str] = set()
_INSTALL_LOCK = threading.Lock()
_MARK = "_faceloop_no_wait_at_end"
# Prefect's own function, once wrapped (looked up at each call).
_original: Callable[..., Any] | None = None


def _install() -> bool:
    """Wrap ``prefect.flow_engine._send_heartbeats`` once (idempotent); False when it is not
    there or does not take ``join_on_exit`` (then Prefect is left unchanged)."""
    global _original
    import prefect.flow_engine as engine_mod

    with _INSTALL_LOCK:
        current = getattr(engine_mod, "_send_heartbeats", None)
        if current is None:
            log.debug("prefect.flow_engine has no _send_heartbeats: flows keep Prefect's exit")
            return False
        if getattr(current, _MARK, False):
            return True
        if "join_on_exit" not in inspect.signature(current).parameters:
            log.debug("_send_heartbeats takes no join_on_exit: flows keep Prefect's exit")
            return False
        _original = current
        setattr(_send_heartbeats, _MARK, True)
        engine_mod._send_heartbeats = _send_heartbeats
        return True


def _send_heartbeats(engine: Any, join_on_exit: bool = True) -> Any:
    """Prefect's heartbeat context for ``engine``'s flow run, not joined at its end when the
    flow is one of :data:`_NO_WAIT`."""
    assert _original is not None  # installed before it is called
    if getattr(getattr(engine, "flow", None), "name", None) in _NO_WAIT:
        join_on_exit = False
    return _original(engine, join_on_exit=join_on_exit)


def no_wait_at_end(flow: F) -> F:
    """Decorator for a Prefect flow (put it above ``@flow``): its runs stop their heartbeat
    thread without waiting for it. Returns the flow unchanged."""
    name = getattr(flow, "name", None)
    if not isinstance(name, str):
        raise TypeError(f"no_wait_at_end takes a Prefect flow, got {type(flow).__name__}")
    _NO_WAIT.add(name)
    _install()
    return flow
