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
        # On Ray however few the images: credentials must not reach the workers.
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8, "face_min_images": 0},
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


def test_s3_listing_reads_no_source_bytes_and_a_moved_album_reuses_its_faces(
    first_run, s3_inputs, sample_photos, monkeypatch, tmp_path
):
    """Issue 10, point 1 on S3: an unchanged refresh GETs no source object (size + ETag from
    the listing vouch for the known sha256); an album moved to a new prefix plus one new photo
    sends one image to the models and the moved images keep their faces' identities."""
    from PIL import Image

    from faceloop.vocab import InputCode
    from flows.refresh import run_refresh
    from storage import objectstore

    settings, _ = first_run
    root = s3_inputs[0]
    gets: list[str] = []
    for name in ("read_bytes", "iter_bytes", "read_versioned"):
        real = getattr(objectstore.S3Store, name)

        def counting(self, rel, *a, _real=real, **kw):
            if "/inputs/" in self.uri(rel):
                gets.append(rel)
            return _real(self, rel, *a, **kw)

        monkeypatch.setattr(objectstore.S3Store, name, counting)
    unchanged = run_refresh(settings)
    assert gets == [], "an unchanged S3 listing read source objects"
    assert unchanged.run.files_hashed == 0 and unchanged.run.images_sent_to_models == 0
    assert unchanged.run.already_seen == unchanged.run.files_listed

    st = open_store(settings.store)
    images = read_images(st, columns=["image_uri", "image_sha256", "status"]).to_pylist()
    by_album: dict[str, list[dict]] = {}
    for r in images:
        parts = r["image_uri"].split("/inputs/albums/")
        if len(parts) == 2 and "/" in parts[1]:
            by_album.setdefault(parts[1].split("/")[0], []).append(r)
    album = max(
        (a for a, rs in by_album.items() if all(r["status"] == "ok" for r in rs)),
        key=lambda a: len(by_album[a]),
    )
    cols = ["face_id", "image_sha256", "identity_id", "status"]
    before = read_faces(st, columns=cols).to_pylist()
    inputs = open_store(f"{root}/inputs")
    moved = []
    for o in inputs.list(f"albums/{album}"):
        dst = o.rel.replace(f"albums/{album}/", f"albums/{album}-moved/")
        inputs.move(o.rel, dst)
        moved.append(f"{root}/inputs/{dst}")
    new_photo = tmp_path / "new.jpg"
    Image.open(sample_photos["yaoming"]).rotate(4).save(new_photo, quality=90)
    inputs.put_file(f"albums/{album}-moved/new_photo.jpg", new_photo)

    gets.clear()
    second = run_refresh(settings)
    assert second.run.images_sent_to_models == 1
    assert second.run.moved == len(moved) and second.run.new_images == 1
    assert second.run.files_hashed == len(moved) + 1
    record = st.read_bytes(f"runs/{second.run_id}.json").decode()
    assert '"images_sent_to_models": 1' in record
    rows = {r["image_uri"]: r for r in read_images(st).to_pylist()}
    assert all(rows[u]["reason_code"] == InputCode.MOVED for u in moved)
    after = {f["face_id"]: f for f in read_faces(st, columns=cols).to_pylist()}
    shas = {rows[u]["image_sha256"] for u in moved}
    kept = [f for f in before if f["image_sha256"] in shas]
    assert kept
    for f in kept:
        assert (after[f["face_id"]]["identity_id"], after[f["face_id"]]["status"]) == (
            f["identity_id"],
            f["status"],
        )
