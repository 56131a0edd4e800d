"""faceloop's flows stop Prefect's flow-run heartbeat thread without waiting for its next
one-second step (flows/heartbeat.py); heartbeats themselves are sent as Prefect configures them,
and other flows keep Prefect's behaviour. Against a real Prefect server."""

from __future__ import annotations

import inspect
import threading

import pytest


@pytest.fixture
def heartbeat_calls(monkeypatch):
    """(flow name, join_on_exit) of every heartbeat context a flow run opens, and an event set
    once a heartbeat has been emitted."""
    import prefect.flow_engine as engine_mod

    import flows.heartbeat as hb
    import flows.refresh  # noqa: F401 - its flow installs the wrapper

    calls: list[tuple[str, bool]] = []
    emitted = threading.Event()
    real = hb._original
    assert real is not None, "faceloop's flows did not install the heartbeat wrapper"

    def spy(engine, join_on_exit=True):
        calls.append((engine.flow.name, join_on_exit))
        return real(engine, join_on_exit=join_on_exit)

    real_emit = engine_mod.FlowRunEngine._emit_flow_run_heartbeat

    def emit(self, *args, **kwargs):
        out = real_emit(self, *args, **kwargs)
        emitted.set()
        return out

    monkeypatch.setattr(hb, "_original", spy)
    monkeypatch.setattr(engine_mod.FlowRunEngine, "_emit_flow_run_heartbeat", emit)
    return calls, emitted


def test_the_pinned_prefect_has_the_heartbeat_function_this_wraps():
    import prefect.flow_engine as engine_mod

    import flows.refresh  # noqa: F401 - installs the wrapper
    from flows.heartbeat import _original, _send_heartbeats

    assert engine_mod._send_heartbeats is _send_heartbeats
    assert _original is not None
    assert "join_on_exit" in inspect.signature(_original).parameters


def test_faceloop_flows_send_heartbeats_and_do_not_wait_for_the_thread(
    prefect_server, heartbeat_calls
):
    from prefect import flow

    import flows.refresh
    import flows.review
    from flows.heartbeat import _NO_WAIT, no_wait_at_end

    assert {flows.refresh.refresh_flow.name, flows.review.review_pull_flow.name} <= _NO_WAIT
    calls, emitted = heartbeat_calls

    @no_wait_at_end
    @flow(name="heartbeat-no-wait-test")
    def no_wait() -> bool:
        return emitted.wait(30)  # the run's heartbeat thread emits while the flow runs

    @flow(name="heartbeat-default-test")
    def default() -> int:
        return 2

    assert no_wait() is True
    assert default() == 2
    assert calls == [("heartbeat-no-wait-test", False), ("heartbeat-default-test", True)]


def test_no_wait_at_end_takes_flows_only():
    from flows.heartbeat import no_wait_at_end

    with pytest.raises(TypeError, match="Prefect flow"):
        no_wait_at_end(lambda: None)
