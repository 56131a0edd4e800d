"""A real Prefect server on 127.0.0.1 for the test session.

Ephemeral mode would start a temporary server per process; a real one is what users and the
deployment run against. If PREFECT_API_URL is already set and healthy (e.g. by a developer), it
is used. The server is the one `faceloop bench` starts (benchmarks.bench.start_prefect_server).
"""

from __future__ import annotations

import os

import pytest

from faceloop.localnet import health


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """Yield the API URL of a running Prefect server; Prefect in this process talks to it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from benchmarks.bench import start_prefect_server

    existing = os.environ.get("PREFECT_API_URL")
    if existing and health(existing, timeout=2):
        with temporary_settings(updates={PREFECT_API_URL: existing}):
            yield existing
        return
    server = start_prefect_server(tmp_path_factory.mktemp("prefect-home"), timeout=300)
    try:
        os.environ["PREFECT_API_URL"] = server.url
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            yield server.url
    finally:
        # This process's flow logs still queued for the API go first: once the server is gone
        # its log worker would retry them at exit for over a minute.
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()
