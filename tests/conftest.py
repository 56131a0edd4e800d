"""Shared test setup. Area fixtures live in tests/plugins/<area>.py.

Two tiers: a test that uses a server fixture (Prefect, SeaweedFS S3, Label Studio) or is marked
``integration`` by its module is in the integration tier; every other test is in the unit tier
(``make test-unit`` = ``pytest -m "not integration"``: no servers, no Ray cluster).
"""

from __future__ import annotations

import os

import pytest

# Nothing in the test suite may phone home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = [
    "tests.plugins.samples",
    "tests.plugins.s3",
    "tests.plugins.labelstudio",
    "tests.plugins.prefect",
]

# Fixtures that start a real server: a test that asks for one is an integration test.
SERVER_FIXTURES = frozenset({"prefect_server", "s3_server", "s3_env", "s3_root", "labelstudio"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def faces_file_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The faces files read through ``storage.tables.read_faces_file`` from now on, in order
    (every reader of one faces file goes through it)."""
    import storage.tables

    real = storage.tables.read_faces_file
    reads: list[str] = []

    def counting(st, rel, columns=None, overlays=None):
        reads.append(rel)
        return real(st, rel, columns, overlays)

    monkeypatch.setattr(storage.tables, "read_faces_file", counting)
    return reads
