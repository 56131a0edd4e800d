"""Prefect flows (compose only). Importing them, as `faceloop` does and as code calling
``flows.refresh.run_refresh`` does, turns off what would phone home (Prefect's telemetry, which
its temporary server runs; Ray's usage stats) unless the environment already says otherwise."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
