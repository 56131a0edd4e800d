"""End to end on S3: the refresh flow with the store AND the image sources on a real S3 server
(SeaweedFS fixture), a real Prefect server, real Ray (local) and real models.

Ray workers read the images and write the detections through S3, so they must see the same
``FACELOOP_S3_ENDPOINT`` / ``AWS_*`` environment as the driver: the environment is set for the
whole module *before* Ray starts (a Ray left running by another test module is shut down first,
since its workers would not have the S3 settings), and Ray is shut down at the end.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest

from faceloop.config import SourceSpec, load_settings
from faceloop.demo import build_demo_inputs
from faceloop.schema import FACE_STATUSES
from storage.objectstore import open_store
from storage.tables import faces_files, read_faces, read_images
from tests.checks import assert_rerun_is_noop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_module_env(s3_server):
    """The S3 env for the whole module (the ``s3_env`` fixture is per test), Ray restarted
    after it is set and shut down at the end."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)
        yield s3_server
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="module")
def s3_inputs(s3_module_env, tmp_path_factory, model_root) -> tuple[str, Path, dict]:
    """Demo inputs built locally, uploaded under ``s3://<bucket>/<run prefix>/inputs/``."""
    from faceloop.config import ModelSettings
    from tasks.backends import load_backend

    local = tmp_path_factory.mktemp("s3-inputs")
    backend = load_backend(ModelSettings(root=str(model_root)))
    truth = build_demo_inputs(local, backend.detect, copies=2)
    root = f"s3://{s3_module_env.bucket}/e2e-{uuid.uuid4().hex[:10]}"
    inputs = open_store(f"{root}/inputs")
    for p in sorted(local.rglob("*")):
        if p.is_file() and p.name != "truth.json":
            inputs.put_file(p.relative_to(local).as_posix(), p)
    return root, local, truth


@pytest.fixture(scope="module")
def first_run(prefect_server, s3_inputs, model_root):
    from flows.refresh import run_refresh

    root, _, _ = s3_inputs
    settings = load_settings(
        None,
        store=f"{root}/store",
        sources=[
            SourceSpec(kind="album", uri=f"{root}/inputs/albums"),
            SourceSpec(kind="idcard", uri=f"{root}/inputs/idcards"),
        ],
        models={"root": str(model_root)},
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
        review={"enabled": False},
    )
    assert settings.store.startswith("s3://")
    summary = run_refresh(settings)
    return settings, summary


def test_faces_table_on_s3(first_run, s3_inputs):
    settings, summary = first_run
    st = open_store(settings.store)
    assert faces_files(st), "faces group files written to S3"
    # Ray workers wrote the detections through pyarrow's S3 filesystem next to the work list
    # (the faces below came from them); a successful run then removes its staging.
    run_id = summary.run_id
    assert not [o.rel for o in st.list(f"staging/{run_id}")]
    assert st.exists(f"runs/{run_id}.json")
    faces = read_faces(
        st,
        columns=[
            "face_id",
            "status",
            "reason",
            "identity_id",
            "image_uri",
            "source_kind",
            "embedding",
        ],
    )
    assert len(faces) > 20
    assert set(faces.column("status").to_pylist()) <= set(FACE_STATUSES)
    assert all(r for r in faces.column("reason").to_pylist()), "every decision has a reason"
    assert len(set(faces.column("face_id").to_pylist())) == len(faces)
    assert all(
        u.startswith(f"{s3_inputs[0]}/inputs/") for u in faces.column("image_uri").to_pylist()
    )
    assert {len(e) for e in faces.column("embedding").to_pylist() if e is not None} == {512}
    auto = faces.filter(pc.equal(faces.column("status"), "auto"))
    assert len(auto) >= 10
    assert set(faces.column("source_kind").to_pylist()) == {"album", "idcard"}
    assert summary.totals.faces == len(faces)

    # Bad inputs read from S3 are recorded with their reasons, not fatal.
    images = read_images(st, columns=["image_uri", "status", "reason"]).to_pylist()
    by_name = {r["image_uri"].rsplit("/", 1)[1]: r for r in images}
    for name in s3_inputs[2]["bad_files"]:
        assert by_name[name]["reason"] or by_name[name]["status"] == "no_face", by_name[name]
    assert by_name["bomb.png"]["reason"].startswith("decompression_bomb")
    assert by_name["stray_at_root.jpg"]["reason"].startswith("wrong_layout")
    local_files = [p for p in s3_inputs[1].rglob("*") if p.is_file() and p.name != "truth.json"]
    assert len(images) == len(local_files)


def test_dataset_version_on_s3(first_run):
    from storage.versions import list_versions, read_manifest, verify_version

    settings, summary = first_run
    st = open_store(settings.store)
    assert list_versions(st, settings.dataset.name) == [1]
    assert summary.dataset.version == 1
    m = read_manifest(st, settings.dataset.name, "latest")
    assert st.exists(f"datasets/{settings.dataset.name}/v1/manifest.json")
    assert verify_version(st, settings.dataset.name, 1) == []
    assert m["num_rows"] > 0 and m["num_classes"] > 0
    assert {x["role"] for x in m["models"]} == {"detector", "recognizer"}
    # The CLI agrees, on the same S3 store.
    from faceloop.cli import main

    assert (
        main(["datasets", "verify", "--store", settings.store, "--name", settings.dataset.name])
        == 0
    )


def test_loader_reads_the_s3_version(first_run):
    from storage.dataset import FaceShardDataset, load_version

    settings, _ = first_run
    info = load_version(settings.store, settings.dataset.name)
    assert info.version == 1 and info.store_root == settings.store
    ds = FaceShardDataset(settings.store, settings.dataset.name, rank=0, world_size=1, seed=0)
    seen = list(ds)
    assert len(seen) == info.num_rows
    assert {tuple(img.shape) for img, _ in seen} == {(3, 112, 112)}
    assert {lab for _, lab in seen} == set(range(info.num_classes))


def test_rerun_on_s3_is_a_noop(first_run):
    from storage.versions import list_versions

    settings, _ = first_run
    summary = assert_rerun_is_noop(settings)
    assert summary.run.already_seen > 0
    assert list_versions(open_store(settings.store), settings.dataset.name) == [1]


def test_no_credentials_leak(first_run):
    """Run records and manifests live next to the data, Ray writes logs of its workers: the
    secret must be in none of them."""
    import ray

    settings, _ = first_run
    st = open_store(settings.store)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    checked = 0
    for o in st.list():
        if o.rel.endswith((".json", "latest")):
            assert secret not in st.read_bytes(o.rel), o.rel
            checked += 1
    assert checked >= 2  # at least a run record and a manifest
    assert ray.is_initialized(), "the refresh ran Ray in this process"
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert files, f"no Ray logs under {logs}"
    leaked = [p.name for p in files if secret in p.read_bytes()]
    assert not leaked, f"S3 secret in Ray logs: {leaked}"
