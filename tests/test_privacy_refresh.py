"""Privacy end to end: a refresh on a real Prefect server with local Ray and real models, with a
Label Studio token and AWS credentials set to sentinels. Neither may reach Prefect (flow-run
parameters, its database), the Ray actors' constructor arguments, the logs or the store; every
store file is 0600 and every folder 0700."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import cloudpickle
import pytest

from faceloop.config import SourceSpec, load_settings
from faceloop.localnet import free_port

pytestmark = pytest.mark.integration

TOKEN = "LS-TOKEN-SENTINEL-b41d77"
AWS_SECRET = "AWS-SECRET-SENTINEL-0c9e21"


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory, model_root) -> Path:
    from faceloop.config import ModelSettings
    from faceloop.demo import build_demo_inputs
    from tasks.backends import load_backend

    out = tmp_path_factory.mktemp("privacy-inputs")
    build_demo_inputs(out, load_backend(ModelSettings(root=str(model_root))).detect, copies=1)
    return out


def test_refresh_keeps_secrets_and_store_private(
    prefect_server, small_inputs, model_root, tmp_path_factory, monkeypatch, caplog
):
    import ray

    import tasks.ray_faces as ray_faces
    from flows.refresh import run_refresh

    monkeypatch.setenv("FACELOOP_REVIEW__TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSENTINEL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    sent: list[bytes] = []
    real_kwargs = ray_faces.actor_kwargs

    def spy(*args, **kwargs):  # what Ray pickles to every FaceProcessor actor
        out = real_kwargs(*args, **kwargs)
        sent.append(cloudpickle.dumps(out))
        return out

    monkeypatch.setattr(ray_faces, "actor_kwargs", spy)
    store = tmp_path_factory.mktemp("privacy-store")
    staged: dict[str, tuple[int, bool]] = {}

    def after_faces(where: str) -> None:  # staging is removed after success: look at it here
        for dirpath, dnames, fnames in os.walk(store / "staging"):
            for n in (*dnames, *fnames):
                p = os.path.join(dirpath, n)
                staged[p] = (stat.S_IMODE(os.stat(p).st_mode), os.path.isdir(p))

    monkeypatch.setattr(ray_faces, "crash_point", after_faces)
    settings = load_settings(
        None,
        store=str(store),
        sources=[
            SourceSpec(kind="album", uri=str(small_inputs / "albums")),
            SourceSpec(kind="idcard", uri=str(small_inputs / "idcards")),
        ],
        models={"root": str(model_root)},
        # On Ray however few the images: what travels to the actors is the point.
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8, "face_min_images": 0},
        # Enabled but unreachable: the token travels with the settings to the push step.
        review={"url": f"http://127.0.0.1:{free_port()}", "retries": 0},
    )
    assert settings.review.token_value() == TOKEN
    caplog.set_level(logging.DEBUG)
    try:
        summary = run_refresh(settings)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert summary.totals.faces > 0
    secrets = (TOKEN.encode(), AWS_SECRET.encode())

    # Ray: the actors' constructor arguments.
    assert sent and not any(s in blob for blob in sent for s in secrets)

    # Prefect: the flow run's parameters, and the server's database.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = refresh_run_named(client, summary.run_id)
    # Prefect records every parameter of the flow, defaults included; run_id is the run's own
    # name (not a secret) and None here. What may not be there is checked on the values below.
    assert set(run.parameters) <= {
        "settings_handle",
        "config",
        "store",
        "sources",
        "run_id",
        "rehash",
    }
    assert run.parameters.get("run_id") is None
    params = json.dumps(run.parameters, default=str)
    assert TOKEN not in params and AWS_SECRET not in params and str(store) not in params
    db_files = list(Path(tmp_path_factory.getbasetemp()).glob("prefect-home*/prefect.db*"))
    # The test's own Prefect server keeps its database under the test's temp folder; without
    # it there is nothing to check, which is a failure, not a pass or a skip.
    assert db_files, "the Prefect server's database was not found under the test's temp folder"
    for f in db_files:
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f

    # Ray Data's Parquet in staging got the store's modes too.
    assert any(p.endswith(".parquet") and "/detections/" in p for p in staged)
    for p, (mode, is_dir) in staged.items():
        assert mode == (0o700 if is_dir else 0o600), (p, oct(mode))

    # Logs.
    assert TOKEN not in caplog.text and AWS_SECRET not in caplog.text

    # The store: no secret in any byte; owner-only modes.
    files, dirs = set(), set()
    for dirpath, dnames, fnames in os.walk(store):
        for d in dnames:
            dirs.add(
                (os.path.join(dirpath, d), stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode))
            )
        for name in fnames:
            p = os.path.join(dirpath, name)
            files.add((p, stat.S_IMODE(os.stat(p).st_mode)))
            data = Path(p).read_bytes()
            assert not any(s in data for s in secrets), p
    assert any("/tables/faces/" in p for p, _ in files)
    assert {m for _, m in files} == {0o600}, sorted(p for p, m in files if m != 0o600)
    assert {m for _, m in dirs} == {0o700}, sorted(p for p, m in dirs if m != 0o700)


def refresh_run_named(client, name: str):
    """The faceloop-refresh flow run named ``name`` (a refresh's flow run is named by its run
    id). Other tests run refreshes on the same server: the latest one need not be this test's."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
    )

    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=["faceloop-refresh"])),
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
    )
    assert len(runs) == 1, f"{len(runs)} faceloop-refresh runs named {name}"
    return runs[0]
