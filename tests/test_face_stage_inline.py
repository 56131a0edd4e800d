"""A small run's face stage runs in the driver (``ray.face_min_images``): no Ray started, the
same detections as the Ray Data pipeline gives for the same work list."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from faceloop.config import RaySettings, Settings
from faceloop.schema import PENDING_SCHEMA
from storage import layout
from storage.objectstore import open_store
from tasks.ray_faces import run_face_stage, runs_inline

pytestmark = pytest.mark.integration


def test_inline_only_below_the_threshold_and_with_a_private_ray() -> None:
    assert runs_inline(RaySettings(), 499)
    assert not runs_inline(RaySettings(), 500)
    assert runs_inline(RaySettings(address="local", face_min_images=5), 4)
    assert not runs_inline(RaySettings(face_min_images=0), 1)
    # A configured cluster always gets the work.
    assert not runs_inline(RaySettings(address="127.0.0.1:6379"), 1)
    assert not runs_inline(RaySettings(address="auto"), 1)


def _stage_settings(tmp_path: Path, model_root: Path, min_images: int) -> Settings:
    """One actor (or thread) of half a CPU, batches of 2, the store under ``tmp_path``: the
    face stage in the driver below ``min_images`` images, on Ray from it."""
    return Settings(
        store=str(tmp_path / "store"),
        models={"root": str(model_root)},
        ray={
            "actors": 1,
            "num_cpus_per_actor": 0.5,
            "batch_size": 2,
            "face_min_images": min_images,
        },
    )


def _pending(photos: list[Path], bad: Path, run_id: str) -> pa.Table:
    rows = []
    for i, p in enumerate([*photos, bad]):
        data = p.read_bytes()
        rows.append(
            {
                "image_uri": str(p),
                "image_sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
                "source_kind": "album",
                "source_group": f"a{i % 2}",
                "role": "album",
                "run_id": run_id,
            }
        )
    return pa.Table.from_pylist(rows, schema=PENDING_SCHEMA)


def test_small_run_is_processed_in_the_driver_like_on_ray(
    tmp_path: Path,
    model_root: Path,
    sample_photos: dict[str, Path],
    capfd: pytest.CaptureFixture[str],
) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    photos = [sample_photos[k] for k in sorted(sample_photos)][:4]
    st = open_store(str(tmp_path / "store"))
    out: dict[str, pa.Table] = {}
    try:
        for run_id, min_images in (("inline", 64), ("ray", 0)):
            settings = _stage_settings(tmp_path, model_root, min_images)
            rel = layout.staging_pending(run_id)
            st.write_parquet(rel, _pending(photos, bad, run_id))
            res = run_face_stage(settings, st, rel, run_id, len(photos) + 1)
            assert res.images == len(photos) + 1
            assert res.sent_to_models == len(photos)  # the broken file is quarantined
            # The inline stage starts no Ray at all; the other one does.
            assert ray.is_initialized() == (run_id == "ray")
            assert res.in_driver == (run_id == "inline")
            assert res.ray_start_seconds == 0.0 or run_id == "ray"
            # Ray Data's start-up warnings that a refresh's log should not carry: no CPUs free
            # (block metadata tasks held them when the work list went in with from_arrow), and
            # progress bars disabled (turned off on purpose off a terminal).
            err = capfd.readouterr().err
            assert "does not have any available CPUs" not in err
            assert "Progress bars disabled" not in err
            det = st.read_parquet(res.detections_rel)
            assert det.num_rows == res.rows
            out[run_id] = det.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    finally:
        if ray.is_initialized():
            ray.shutdown()
    a, b = out["inline"], out["ray"]
    assert a.num_rows == b.num_rows and a.num_rows > len(photos)
    for col in ("image_uri", "face_id", "face_index", "image_status", "image_reason_code"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    ea = np.array([e for e in a.column("embedding").to_pylist() if e is not None], np.float32)
    eb = np.array([e for e in b.column("embedding").to_pylist() if e is not None], np.float32)
    assert ea.shape == eb.shape and ea.shape[0] > 0
    np.testing.assert_allclose(ea, eb, atol=1e-5)


def test_work_chunks_cover_the_list_once_and_shrink_only_at_its_end() -> None:
    from tasks.faces import TAIL_BATCHES, work_chunks

    assert work_chunks(0, 8) == []
    for n, batch in ((1, 8), (5, 8), (6, 2), (16, 8), (17, 8), (200, 8), (1000, 8), (9, 1)):
        chunks = work_chunks(n, batch)
        # Contiguous, in order, every row once.
        assert [lo for lo, _ in chunks] == [0, *(hi for _, hi in chunks[:-1])]
        assert chunks[-1][1] == n
        sizes = [hi - lo for lo, hi in chunks]
        assert all(1 <= s <= batch for s in sizes)
        assert sizes == sorted(sizes, reverse=True)  # whole batches first, then shrinking
        whole = max(0, -(-(n - TAIL_BATCHES * batch) // batch))
        assert sizes[:whole] == [batch] * whole  # only the tail is cut
    assert [hi - lo for lo, hi in work_chunks(200, 8)][-8:] == [4, 3, 3, 2, 1, 1, 1, 1]


def test_driver_threads_write_each_batch_once_with_the_rows_of_one_thread(
    tmp_path: Path,
    model_root: Path,
    sample_photos: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two threads (one backend each) write the same rows as one thread, one part per batch,
    named by its images as the Ray actors name theirs; the bench's timings file records the
    threads and the driver's CPU seconds."""
    from tasks.faces import detect_pending, detections_part_rel, work_chunks
    from tasks.ray_faces import inline_threads

    assert inline_threads(RaySettings(actors=2)) == min(2, len(os.sched_getaffinity(0)))
    assert inline_threads(RaySettings(actors=1)) == 1
    with monkeypatch.context() as m:  # a process pinned to one CPU (taskset, a container)
        m.setattr(os, "sched_getaffinity", lambda pid: {0})
        assert inline_threads(RaySettings(actors=2)) == 1
    assert inline_threads(RaySettings(actors=8, num_gpus_per_actor=0.5)) == 1
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    photos = [sample_photos[k] for k in sorted(sample_photos)][:5]
    st = open_store(str(tmp_path / "store"))
    out: dict[int, pa.Table] = {}
    for threads in (1, 2):
        tdir = tmp_path / f"timings-{threads}"
        tdir.mkdir()
        monkeypatch.setenv("FACELOOP_STAGE_TIMINGS_DIR", str(tdir))
        run_id = f"t{threads}"
        settings = Settings(
            store=str(tmp_path / "store"), models={"root": str(model_root)}, ray={"batch_size": 2}
        )
        pending = _pending(photos, bad, run_id)
        st.write_parquet(layout.staging_pending(run_id), pending)
        rel = detect_pending(settings, st, layout.staging_pending(run_id), run_id, threads=threads)
        assert rel == layout.staging_detections(run_id)
        rows = pending.to_pylist()
        expected = sorted(detections_part_rel(rel, rows[lo:hi]) for lo, hi in work_chunks(6, 2))
        assert sorted(st.parquet_files(rel)) == expected  # one part per range of the work list
        (timings,) = tdir.glob("*-driver.json")
        t = json.loads(timings.read_text())
        assert t["threads"] == threads and t["cpu_s"] > 0 and t["images"] == 6
        det = st.read_parquet(rel)
        out[threads] = det.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    a, b = out[1], out[2]
    assert a.num_rows == b.num_rows > len(photos)
    for col in ("image_uri", "face_id", "face_index", "image_status", "image_reason_code"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    ea = np.array([e for e in a.column("embedding").to_pylist() if e is not None], np.float32)
    eb = np.array([e for e in b.column("embedding").to_pylist() if e is not None], np.float32)
    np.testing.assert_array_equal(ea, eb)  # the same code on the same inputs, thread or not


def test_a_gpu_config_runs_the_driver_stage_on_cuda_or_fails_loudly(
    tmp_path: Path, model_root: Path, sample_photos: dict[str, Path]
) -> None:
    """``ray.num_gpus_per_actor`` > 0 asks for CUDA in the driver's stage as in the actors':
    without CUDA the run fails naming it instead of running on the CPU unnoticed."""
    import onnxruntime as ort

    from faceloop.errors import ModelLoadError
    from tasks.ray_faces import face_providers

    assert face_providers(RaySettings()) is None
    assert face_providers(RaySettings(num_gpus_per_actor=0.25)) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    photos = [sample_photos[k] for k in sorted(sample_photos)][:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    st = open_store(str(tmp_path / "store"))
    settings = Settings(
        store=str(tmp_path / "store"),
        models={"root": str(model_root)},
        ray={"num_gpus_per_actor": 0.25, "face_min_images": 64},
    )
    rel = layout.staging_pending("gpu")
    st.write_parquet(rel, _pending(photos, bad, "gpu"))
    assert runs_inline(settings.ray, 3)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        # A GPU machine: the driver's stage runs there (the backend refuses a CPU fallback).
        res = run_face_stage(settings, st, rel, "gpu", 3)
        assert res.in_driver and res.sent_to_models == len(photos)
        return
    with pytest.raises(ModelLoadError, match="CUDA"):
        run_face_stage(settings, st, rel, "gpu", 3)


def test_a_failed_batch_ends_the_threads_stage_without_the_batches_not_yet_started(
    tmp_path: Path, model_root: Path, sample_photos: dict[str, Path]
) -> None:
    """A store error in one thread's batch fails the stage with that error; the batches no
    thread had started yet are dropped, not processed before the error surfaces."""
    from faceloop.errors import TransientStorageError
    from tasks.faces import detect_pending

    real = open_store(str(tmp_path / "store"))

    class FailingFirstWrite:
        def __init__(self) -> None:
            self.writes = 0

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def write_parquet(self, rel: str, table: pa.Table) -> None:
            self.writes += 1
            if self.writes == 1:
                raise TransientStorageError("store unreachable (test)")
            real.write_parquet(rel, table)

    photos = [sample_photos[k] for k in sorted(sample_photos)] * 4  # 16+ batches of one
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    pending = _pending(photos, bad, "fail")
    real.write_parquet(layout.staging_pending("fail"), pending)
    settings = Settings(
        store=str(tmp_path / "store"), models={"root": str(model_root)}, ray={"batch_size": 1}
    )
    store = FailingFirstWrite()
    with pytest.raises(TransientStorageError, match="unreachable"):
        detect_pending(settings, store, layout.staging_pending("fail"), "fail", threads=2)  # type: ignore[arg-type]
    assert store.writes < pending.num_rows - 4, store.writes


def test_a_backend_loaded_ahead_is_shared_by_the_threads(
    tmp_path: Path,
    model_root: Path,
    sample_photos: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backend the run loaded ahead (the refresh starts it during discovery) is what the
    stage's threads use: no load of their own, and the same rows, embeddings to the bit, as
    threads that each load one. It is handed over once, only for the settings it was loaded
    with; a load that failed hands over nothing (the stage then loads, and fails, itself)."""
    import tasks.backends as backends
    import tasks.faces as faces
    from faceloop.config import ModelSettings

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    photos = [sample_photos[k] for k in sorted(sample_photos)][:4]
    st = open_store(str(tmp_path / "store"))
    settings = Settings(
        store=str(tmp_path / "store"), models={"root": str(model_root)}, ray={"batch_size": 2}
    )
    loads: list[str] = []
    real_load = backends.load_backend

    def counted(models: ModelSettings, providers: object = None) -> object:
        loads.append(models.backend)
        return real_load(models, providers)  # type: ignore[arg-type]

    monkeypatch.setattr(faces, "load_backend", counted)
    out = {}
    for run_id in ("own", "ahead"):
        st.write_parquet(layout.staging_pending(run_id), _pending(photos, bad, run_id))
        if run_id == "ahead":
            loads.clear()
            backends.load_ahead(run_id, settings.models)
        rel = faces.detect_pending(settings, st, layout.staging_pending(run_id), run_id, threads=2)
        det = st.read_parquet(rel)
        out[run_id] = det.sort_by([("image_uri", "ascending"), ("face_index", "ascending")])
    assert loads == [], "the threads loaded a backend of their own"
    assert backends._AHEAD == {}  # handed over, not kept
    a, b = out["own"], out["ahead"]
    assert a.num_rows == b.num_rows > len(photos)
    for col in ("image_uri", "face_id", "bbox", "landmarks", "quality", "aligned_jpeg"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    ea = np.array([e for e in a.column("embedding").to_pylist() if e is not None], np.float32)
    eb = np.array([e for e in b.column("embedding").to_pylist() if e is not None], np.float32)
    np.testing.assert_array_equal(ea, eb)

    # Loaded for other settings, or not loaded at all: nothing is handed over.
    backends.load_ahead("other", settings.models)
    other = settings.models.model_copy(update={"det_size": 320})
    assert backends.take_ahead("other", other) is None
    assert backends.take_ahead("other", settings.models) is None  # handed over once
    with monkeypatch.context() as m:
        from faceloop.errors import ModelLoadError

        def fails(models: ModelSettings, providers: object = None) -> object:
            raise ModelLoadError("weights missing (test)")

        m.setattr(backends, "load_backend", fails)
        backends.load_ahead("failed", settings.models)
        assert backends.take_ahead("failed", settings.models) is None
    backends.load_ahead("dropped", settings.models)
    backends.drop_ahead("dropped")
    assert backends.take_ahead("dropped", settings.models) is None and backends._AHEAD == {}


def test_a_full_disk_fails_the_stage_on_ray_as_in_the_driver(
    tmp_path: Path,
    model_root: Path,
    sample_photos: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An actor's write of its detections failing for want of space (ENOSPC) fails the stage
    with the store's one-line StorageError, as the same write in the driver does: Ray's
    RayTaskError, whose message is the worker's whole traceback, was what the user saw. A
    label pass's or the publish's worker (ray_map) fails the same way."""
    import errno

    import ray

    import tasks.faces
    from faceloop.errors import StorageError
    from tasks.ray_faces import ray_map

    def full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    class DiskFull(tasks.faces.FaceProcessor):  # in the actors: their writes find no space
        def __call__(self, batch):  # type: ignore[no-untyped-def]
            import storage.objectstore

            storage.objectstore.write_chunked = full  # type: ignore[assignment]
            return super().__call__(batch)

    monkeypatch.setattr(tasks.faces, "FaceProcessor", DiskFull)
    photos = [sample_photos[k] for k in sorted(sample_photos)][:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    st = open_store(str(tmp_path / "store"))
    if ray.is_initialized():
        ray.shutdown()
    errors: dict[int, BaseException] = {}
    try:
        for min_images in (64, 0):  # in the driver, then on Ray
            settings = Settings(
                store=str(tmp_path / "store"),
                models={"root": str(model_root)},
                ray={"actors": 1, "num_cpus_per_actor": 0.5, "face_min_images": min_images},
            )
            run_id = f"full{min_images}"
            rel = layout.staging_pending(run_id)
            st.write_parquet(rel, _pending(photos, bad, run_id))
            with monkeypatch.context() as m:
                if min_images:
                    m.setattr("storage.objectstore.write_chunked", full)
                with pytest.raises(StorageError) as failed:
                    run_face_stage(settings, st, rel, run_id, len(photos) + 1)
            errors[min_images] = failed.value
        with pytest.raises(OSError, match=r"^\[Errno 28\] No space left on device$"):
            ray_map(settings, True, "a pass", [{"k": 1}], lambda _st, _it: full())
    finally:
        if ray.is_initialized():
            ray.shutdown()
    for err in errors.values():
        assert type(err) is StorageError
        assert str(err).startswith("no space left on the device writing ")
        assert "\n" not in str(err) and "File " not in str(err) and "ray::" not in str(err)
    # The Ray worker's traceback is still there for -v: the error is raised from Ray's.
    assert isinstance(errors[0].__cause__, ray.exceptions.RayTaskError)


def test_images_the_stage_wrote_no_rows_for_fail_the_stage_on_ray_as_in_the_driver(
    tmp_path: Path,
    model_root: Path,
    sample_photos: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch that came back with no rows written (a Ray node that could not see the store
    took its run for stopped) left its images out of the stage's detections, and the refresh
    went on as if they were done: exit 0, a dataset without them. The stage fails naming how
    many of its images have no rows, in the driver and on Ray alike."""
    import ray

    import tasks.faces
    from faceloop.errors import FaceloopError

    def lost(rows: list[dict]) -> bool:
        return any(str(r["image_uri"]).endswith("broken.jpg") for r in rows)

    class DropsABatch(tasks.faces.FaceProcessor):  # in the actors: as the blind node did
        def __call__(self, batch):  # type: ignore[no-untyped-def]
            if lost(tasks.faces._batch_rows(batch)):
                return pa.table({"rows": pa.array([0], pa.int64())})
            return super().__call__(batch)

    real_write = tasks.faces.write_detections_part

    def drops_a_batch(store, folder, rows, columns):  # type: ignore[no-untyped-def]
        return 0 if lost(rows) else real_write(store, folder, rows, columns)

    monkeypatch.setattr(tasks.faces, "FaceProcessor", DropsABatch)
    photos = [sample_photos[k] for k in sorted(sample_photos)][:4]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    st = open_store(str(tmp_path / "store"))
    if ray.is_initialized():
        ray.shutdown()
    try:
        for min_images, missing in ((64, 1), (0, 2)):  # in the driver, then on Ray
            settings = _stage_settings(tmp_path, model_root, min_images)
            run_id = f"lost{min_images}"
            rel = layout.staging_pending(run_id)
            st.write_parquet(rel, _pending(photos, bad, run_id))
            with monkeypatch.context() as m:
                m.setattr(tasks.faces, "write_detections_part", drops_a_batch)
                with pytest.raises(FaceloopError) as failed:
                    run_face_stage(settings, st, rel, run_id, len(photos) + 1)
            assert str(failed.value).startswith(
                f"{missing} of 5 images were not processed by the face stage: "
            ), failed.value
            assert "\n" not in str(failed.value)
        # No batch wrote anything: the same line, not the missing detections folder's error.
        st.write_parquet(layout.staging_pending("none"), _pending(photos, bad, "none"))
        with monkeypatch.context() as m:
            m.setattr(tasks.faces, "write_detections_part", lambda *_args: 0)
            with pytest.raises(FaceloopError, match=r"^5 of 5 images were not processed"):
                run_face_stage(
                    settings.model_copy(update={"ray": RaySettings()}),
                    st,
                    layout.staging_pending("none"),
                    "none",
                    5,
                )
    finally:
        if ray.is_initialized():
            ray.shutdown()
