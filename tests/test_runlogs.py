"""faceloop's module loggers in the Prefect flow run's log (flows/runlogs.py): a deployment's
operator reads `prefect flow-run logs`, where the stages' warnings ("starting a new store", "no
sources are configured", a lock takeover) never appeared: they went to the worker's stdout."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import warnings


def test_the_stages_warnings_reach_the_flow_run_log(prefect_server) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.runlogs import run_logs

    @flow(name="runlogs-probe")
    def probe() -> str:
        from prefect.runtime import flow_run

        with run_logs():
            logging.getLogger("storage.probe").warning("store probe: starting a new store")
            # A line from another thread has no run context: console only, and no warning.
            t = threading.Thread(
                target=lambda: logging.getLogger("tasks.probe").warning("from a pool thread")
            )
            t.start()
            t.join()
        logging.getLogger("storage.probe").warning("after the flow's work: console only")
        return str(flow_run.id)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_id = probe()
    assert not [w for w in seen if "without a flow run id" in str(w.message)]
    APILogHandler().flush()

    async def messages() -> list[str]:
        async with get_client() as client:
            got = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id]))
            )
            return [g.message for g in got]

    logged = asyncio.run(messages())
    assert any("store probe: starting a new store" in m for m in logged), logged
    assert not any("from a pool thread" in m or "console only" in m for m in logged), logged
    assert not logging.getLogger("storage").handlers  # taken off again


def test_the_deployed_flows_log_under_our_names() -> None:
    """A deployment's worker loads each prefect.yaml entrypoint by its path (Prefect's
    load_script_as_module), as a module named ``refresh`` or ``review``, not ``flows.refresh``:
    loggers named ``__name__`` there fell outside OURS, and the flow's own warnings ("store ...
    holds no earlier run") never reached the flow run's log."""
    from pathlib import Path

    import yaml
    from prefect.flows import load_flow_from_entrypoint

    from flows.runlogs import OURS

    repo = Path(__file__).resolve().parents[1]
    entrypoints = [
        d["entrypoint"] for d in yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]
    ]
    assert entrypoints
    for entrypoint in entrypoints:
        fn = load_flow_from_entrypoint(str(repo / entrypoint)).fn
        loggers = [v for v in vars(inspect.getmodule(fn)).values() if isinstance(v, logging.Logger)]
        assert loggers, entrypoint
        for lg in loggers:
            assert lg.name.split(".")[0] in OURS, (entrypoint, lg.name)
