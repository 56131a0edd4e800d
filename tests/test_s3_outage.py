"""An S3 outage during the face stage fails the refresh within ``storage.deadline_seconds`` with
one clear line, and the first run after the outage completes with nothing lost.

A dedicated SeaweedFS (not the session's: this test kills it) holds the store. The refresh runs
as ``python -m faceloop.cli refresh`` in its own process group; the test watches the store for
the run's work list (``staging/<run>/pending.parquet``, written by discovery just before the
face stage starts) and SIGKILLs the server the moment it appears, so the outage lands inside
the face stage. The server is then restarted on the same data folder, ports and credentials.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from faceloop.samples import sample_photos
from tests.plugins.s3 import S3Server, _stop, _try_start, _weed_binary, probe_client

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 20
PREFIX = "outage"


@pytest.fixture
def album(tmp_path: Path) -> Path:
    root = tmp_path / "albums"
    group = root / "group"
    group.mkdir(parents=True)
    t1 = Image.open(sample_photos()["t1"]).convert("RGB")
    for i, angle in enumerate((0, 3, -3, 6)):
        t1.rotate(angle).save(group / f"{i}.jpg")
    return root


@pytest.fixture
def weed_dir() -> Iterator[Path]:
    # Short: SeaweedFS and Ray put unix sockets under it.
    d = Path(tempfile.mkdtemp(prefix="flo-", dir="/tmp"))
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _env(server: S3Server, prefect_server: str, model_root: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FACELOOP_"))}
    env.update(server.env())
    env.update(
        PYTHONPATH=str(REPO),
        PREFECT_API_URL=prefect_server,
        FACELOOP_MODELS__ROOT=str(model_root),
        FACELOOP_REVIEW__ENABLED="false",
        FACELOOP_RAY__ACTORS="1",
        FACELOOP_STORAGE__DEADLINE_SECONDS=str(DEADLINE_S),
        TMPDIR=str(tmp),
    )
    return env


def _start_refresh(store: str, album: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "faceloop.cli",
            "refresh",
            "--store",
            store,
            "--source",
            f"album={album}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"refresh did not finish within {timeout:.0f} s:\n{err[-3000:]}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray helpers go with it
    return proc.returncode, out, err


def _wait_for_work_list(server: S3Server, proc: subprocess.Popen[str], timeout: float) -> None:
    client = probe_client(server)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"refresh ended before the face stage: {proc.communicate()}")
        with contextlib.suppress(Exception):
            listed = client.list_objects_v2(Bucket=server.bucket, Prefix=f"{PREFIX}/staging/")
            if any(o["Key"].endswith("pending.parquet") for o in listed.get("Contents", [])):
                return
        time.sleep(0.1)
    raise AssertionError("the refresh never reached the face stage")


# The face stage of these 4 images in the driver (ray.face_min_images' default) and on Ray.
@pytest.mark.parametrize("min_images", ["64", "0"], ids=["driver", "ray"])
def test_outage_in_the_face_stage_fails_in_time_and_the_next_run_completes(
    prefect_server: str, model_root: Path, album: Path, weed_dir: Path, min_images: str
) -> None:
    weed = _weed_binary()
    proc_s3, server = _try_start(weed_dir / "weed", weed)
    (weed_dir / "tmp").mkdir()
    env = _env(server, prefect_server, model_root, weed_dir / "tmp")
    env["FACELOOP_RAY__FACE_MIN_IMAGES"] = min_images
    store = f"s3://{server.bucket}/{PREFIX}"
    try:
        run = _start_refresh(store, album, env)
        _wait_for_work_list(server, run, timeout=300)
        killed_at = time.monotonic()
        os.killpg(proc_s3.pid, signal.SIGKILL)
        proc_s3.wait(timeout=10)

        rc, _out, err = _finish(run, timeout=DEADLINE_S + 240)
        took = time.monotonic() - killed_at
        assert rc == 1, err[-3000:]
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("faceloop: error:")]
        assert len(lines) == 1, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert "unreachable" in lines[0] and "rerun after the outage" in lines[0], lines[0]
        # Bounded: the deadline plus probing, Ray's shutdown and the CLI's exit; never a hang.
        assert took < DEADLINE_S + 180, (took, lines[0])

        # The outage ends: the next run completes and every image is recorded with its faces.
        proc_s3, server = _try_start(weed_dir / "weed", weed, like=server)
        run = _start_refresh(store, album, env)
        rc, _out, err = _finish(run, timeout=600)
        assert rc == 0, err[-3000:]

        from storage.objectstore import open_store
        from storage.tables import read_faces, read_images

        old = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            st = open_store(store)
            images = read_images(st, columns=["image_uri", "status"]).to_pylist()
            faces = read_faces(st, columns=["face_id", "image_uri"]).to_pylist()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        uris = {r["image_uri"] for r in images}
        assert len(uris) == 4, images
        assert {r["image_uri"] for r in faces} == uris

        doctor = subprocess.run(
            [sys.executable, "-m", "faceloop.cli", "doctor", "--store", store],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    finally:
        _stop(proc_s3, server.ports)
