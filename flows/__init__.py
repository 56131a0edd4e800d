"""Prefect flows (compose only). Importing them, as `faceloop` does and as code calling
``flows.refresh.run_refresh`` does, turns off what would phone home (Prefect's telemetry, which
its temporary server runs; Ray's usage stats) unless the environment already says otherwise."""

from faceloop.localnet import no_phoning_home

no_phoning_home()
