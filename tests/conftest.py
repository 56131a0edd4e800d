"""Shared test setup. Area fixtures live in tests/plugins/<area>.py."""

import os

# Nothing in the test suite may phone home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

pytest_plugins = [p for p in (
    "tests.plugins.samples",
    "tests.plugins.s3",
    "tests.plugins.labelstudio",
    "tests.plugins.prefect",
) if os.path.exists(os.path.join(os.path.dirname(__file__), "plugins", p.rsplit(".", 1)[1] + ".py"))]
