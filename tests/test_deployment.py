"""prefect.yaml really deploys: create the pool, deploy, trigger a run, let a worker run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from faceloop.samples import sample_photos

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _prefect(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    proc = subprocess.run(
        [str(exe), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_deployment_runs_refresh_on_a_worker(prefect_server, model_root, tmp_path):
    album = tmp_path / "inputs" / "albums" / "group"
    album.mkdir(parents=True)
    t1 = Image.open(sample_photos()["t1"]).convert("RGB")
    t1.save(album / "a.jpg")
    t1.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(album / "b.jpg")
    store = tmp_path / "store"
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "FACELOOP_HOME": str(REPO),
        "FACELOOP_MODELS__ROOT": str(model_root),
        "FACELOOP_REVIEW__ENABLED": "false",
        "FACELOOP_RAY__ACTORS": "1",
    }
    pool = f"faceloop-test-{os.getpid()}"
    _prefect(["work-pool", "create", pool, "--type", "process"], env)
    _prefect(["--no-prompt", "deploy", "--name", "refresh", "--pool", pool], env)
    # prefect.yaml schedules the refresh hourly at :17. Near that minute the server has an
    # auto-scheduled run (default parameters, configs/demo.yaml's store) due, the worker takes
    # it, and ours waits behind the deployment's concurrency limit of one. Clearing the schedules
    # deletes the auto-scheduled runs, so the worker runs only the run this test triggers.
    _prefect(["deployment", "schedule", "clear", "faceloop-refresh/refresh", "-y"], env)
    params = [
        "--param",
        f"store={store}",
        "--param",
        "sources=" + json.dumps([f"album={tmp_path / 'inputs' / 'albums'}"]),
    ]
    created = _prefect(["deployment", "run", "faceloop-refresh/refresh", *params], env)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", created.stdout)
    assert run_id, created.stdout
    out = _prefect(["worker", "start", "--pool", pool, "--run-once"], env, timeout=600)
    log = out.stdout + out.stderr
    assert run_id.group(1) in log, log[-3000:]
    assert "Finished in state Completed()" in log, log[-3000:]
    runs = list((store / "runs").glob("*.json"))
    assert len(runs) == 1
    summary = json.loads(runs[0].read_text())
    assert summary["run"]["new_images"] == 2
    assert summary["totals"]["faces"] >= 10
