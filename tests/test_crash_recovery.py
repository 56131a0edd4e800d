"""A crash anywhere in a refresh is recovered by the very next run (storage/recovery.py).

Each fault runs ``python -m faceloop.cli refresh`` in its own process group with
``FACELOOP_TEST_CRASH_AT=<point>`` (faceloop/crashpoints.py), which SIGKILLs the group at that
point: inside the face stage (detections written), the label stage (first group file
replaced) and publish (first shard uploaded). Then ``faceloop doctor`` must see the damage, the
next refresh must succeed at once (no stale-marker wait, no lock wait) and leave exactly the
faces of a clean run, and doctor must pass: no staging, no temp files, lock free.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
from storage.objectstore import open_store
from storage.tables import read_faces

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
FACE_COLUMNS = ["face_id", "status", "identity_id", "reason_code", "reason"]


@pytest.fixture(scope="module")
def album(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash-inputs") / "albums"
    group = root / "group"
    group.mkdir(parents=True)
    t1 = Image.open(sample_photos()["t1"]).convert("RGB")
    t1.save(group / "a.jpg")
    t1.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(group / "b.jpg")
    return root


@pytest.fixture(scope="module")
def short_tmp() -> Iterator[Path]:
    # The children's TMPDIR: isolates their faceloop temp dirs, short enough for Ray's sockets.
    d = Path(tempfile.mkdtemp(prefix="flc-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(prefect_server: str, model_root: Path, tmp: Path, crash: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_API_URL": prefect_server,
        "FACELOOP_MODELS__ROOT": str(model_root),
        "FACELOOP_REVIEW__ENABLED": "false",
        "FACELOOP_RAY__ACTORS": "1",
        "TMPDIR": str(tmp),
        # A native abort in a child comes with every thread's Python stack. (Once in CI:
        # "terminate called without an active exception" after doctor had printed its report,
        # a pyarrow scanner thread releasing Python bytes at shutdown: docs/DESIGN.md, "Parquet
        # held in memory".)
        "PYTHONFAULTHANDLER": "1",
    }
    env.pop("FACELOOP_TEST_CRASH_AT", None)
    if crash:
        env["FACELOOP_TEST_CRASH_AT"] = crash
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "faceloop.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"faceloop {args[0]} timed out:\n{out[-3000:]}") from None
    finally:
        # Whatever the child started in its group (Ray) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, time.monotonic() - t0


def _refresh(store: Path, album: Path, env: dict[str, str]) -> tuple[int, str, float]:
    return _cli(["refresh", "--store", str(store), "--source", f"album={album}", "--json"], env)


def _doctor(store: Path, env: dict[str, str]) -> tuple[int, dict]:
    rc, out, _ = _cli(["doctor", "--store", str(store), "--json"], env, timeout=120)
    report, end = json.JSONDecoder().raw_decode(out, out.index("{"))
    # Nothing after the report: a crash at exit would change the exit code, not the report.
    assert not out[end:].strip(), f"doctor printed after its report (rc {rc}):\n{out[-5000:]}"
    return rc, report


def _faces(store: Path) -> list[dict]:
    t = read_faces(open_store(str(store)), columns=FACE_COLUMNS)
    return t.sort_by("face_id").to_pylist()


@pytest.fixture(scope="module")
def clean_run(prefect_server, model_root, album, short_tmp, tmp_path_factory) -> list[dict]:
    store = tmp_path_factory.mktemp("clean") / "store"
    env = _env(prefect_server, model_root, short_tmp, None)
    rc, out, _ = _refresh(store, album, env)
    assert rc == 0, out[-3000:]
    rc, report = _doctor(store, env)
    assert rc == 0, report
    assert not (store / "staging").exists() or not any((store / "staging").iterdir())
    faces = _faces(store)
    assert faces and any(f["status"] == "auto" for f in faces)  # publish has shards to write
    return faces


@pytest.mark.parametrize("point", ["faces", "label", "publish"])
def test_crash_is_recovered_by_the_next_run(
    point, clean_run, prefect_server, model_root, album, short_tmp, tmp_path
):
    store = tmp_path / "store"
    rc, out, _ = _refresh(store, album, _env(prefect_server, model_root, short_tmp, point))
    assert rc == -signal.SIGKILL, f"crash point {point} not reached (rc {rc}):\n{out[-3000:]}"
    env = _env(prefect_server, model_root, short_tmp, None)
    rc, report = _doctor(store, env)
    assert rc == 1, report  # a dead lock holder, its staging, ...
    failed = {c["check"] for c in report["checks"] if not c["ok"]}
    assert "lock" in failed, report
    if point == "publish":
        assert "no half-written versions" in failed, report

    rc, out, _ = _refresh(store, album, env)
    assert rc == 0, out[-3000:]
    assert "is locked by" not in out and "ConcurrentWriteError" not in out
    assert _faces(store) == clean_run
    if point != "publish":
        # The killed run has no record: its faces are this run's new ones (the faces a label
        # commit cut short had stored were not counted by any run).
        summary, _ = json.JSONDecoder().raw_decode(out, out.index("{"))
        assert summary["run"]["new_faces"] == len(clean_run)
    from tasks.summary import review_queue_current

    assert review_queue_current(open_store(str(store)))  # the queue of the faces as they are
    rc, report = _doctor(store, env)
    assert rc == 0, report
    assert not list(store.rglob("*.tmp-*"))
    assert not [p for p in short_tmp.iterdir() if p.name.startswith("faceloop-")]
    assert not (store / "staging").exists() or not any((store / "staging").iterdir())
    # Every run that recorded images has its record: the killed one's says it was cut short.
    recorded = {p.stem for p in (store / "tables" / "images").glob("*.parquet")}
    records = {p.stem: json.loads(p.read_text()) for p in (store / "runs").glob("*.json")}
    assert recorded <= set(records)
    cut_short = [r for r in records.values() if "interrupted" in r]
    # Only the publish point dies after the killed run's image rows are in (the label point
    # dies inside its commit, whose images the next run records again).
    assert len(cut_short) == (point == "publish")
    for r in cut_short:
        assert r["run"]["images_recorded"] == 2 and r["found_by"] in records
