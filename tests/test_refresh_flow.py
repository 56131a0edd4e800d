"""End to end: the refresh flow on a real Prefect server, real Ray (local), real models.

Inputs are built from sample photos that installed packages ship (faceloop.demo): albums of
augmented copies (the same people recur within and across albums), ID-card subjects (one an
impostor) and one file of each kind of bad input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.compute as pc
import pytest

from faceloop.config import DEFAULT_RECOGNIZER, SourceSpec, load_settings
from faceloop.demo import build_demo_inputs
from faceloop.modelstore import BUILTIN_RECOGNIZERS
from faceloop.schema import FACE_STATUSES, SHARD_SCHEMA
from faceloop.vocab import TaskKind, reason_code
from storage.objectstore import open_store
from storage.tables import read_faces, read_images
from tasks.summary import RunSummary
from tests.checks import assert_rerun_is_noop

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory, model_root) -> tuple[Path, dict]:
    from faceloop.config import ModelSettings
    from tasks.backends import load_backend

    out = tmp_path_factory.mktemp("inputs")
    backend = load_backend(ModelSettings(root=str(model_root)))
    truth = build_demo_inputs(out, backend.detect, copies=3)
    return out, truth


@pytest.fixture(scope="module")
def settings_for(model_root, demo_inputs):
    def make(store: Path, inputs: Path | None = None):
        inputs = inputs or demo_inputs[0]
        return load_settings(
            None,
            store=str(store),
            sources=[
                SourceSpec(kind="album", uri=str(inputs / "albums")),
                SourceSpec(kind="idcard", uri=str(inputs / "idcards")),
            ],
            models={"root": str(model_root)},
            ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
            review={"enabled": False},  # never push to a developer's Label Studio
        )

    return make


@pytest.fixture(scope="module")
def first_run(prefect_server, ray_session, settings_for, tmp_path_factory):
    from flows.refresh import run_refresh

    store = tmp_path_factory.mktemp("store")
    settings = settings_for(store)
    summary = run_refresh(settings)
    return settings, summary


def test_first_run_labels_faces_with_reasons(first_run, demo_inputs):
    settings, summary = first_run
    st = open_store(settings.store)
    faces = read_faces(
        st,
        columns=[
            "face_id",
            "status",
            "reason",
            "identity_id",
            "source_kind",
            "source_group",
            "embedding",
            "model",
            "bbox",
        ],
    )
    assert len(faces) > 40
    assert set(faces.column("status").to_pylist()) <= set(FACE_STATUSES)
    assert all(r for r in faces.column("reason").to_pylist()), "every decision has a reason"
    assert len(set(faces.column("face_id").to_pylist())) == len(faces), "face ids are unique"
    # The label stage's parts are timed inside its seconds (the run record's timings).
    parts = [k for k in summary.timings if k.startswith("label_") and k != "label_s"]
    assert {"label_cluster_s", "label_decide_s", "label_commit_s"} <= set(parts)
    assert sum(summary.timings[k] for k in parts) <= summary.timings["label_s"] + 0.01
    edge = BUILTIN_RECOGNIZERS[DEFAULT_RECOGNIZER]  # the insightface backend's default
    assert set(faces.column("model").to_pylist()) == {f"{edge.file}@sha256:{edge.sha256}"}
    # Faces too small to be used, and album faces too poor to be clustered, are never embedded;
    # every other face (ID-card faces always) has a 512-d embedding.
    rows = faces.select(["embedding", "status", "reason", "source_kind"]).to_pylist()
    assert {len(r["embedding"]) for r in rows if r["embedding"] is not None} == {512}
    not_embedded = [r for r in rows if r["embedding"] is None]
    assert all(
        r["status"] == "rejected"
        and (
            r["reason"].startswith("too_small")
            or (r["source_kind"] == "album" and r["reason"].startswith("low_quality"))
        )
        for r in not_embedded
    )
    assert any(r["reason"].startswith("low_quality") for r in not_embedded)
    auto = faces.filter(pc.equal(faces.column("status"), "auto"))
    assert len(auto) >= 20
    # Albums: the three people of t1's left half appear in "family" and in "party": the
    # cross-album merge must give them one identity in both albums.
    by_album: dict[str, set] = {}
    for g, i, k in zip(
        auto.column("source_group").to_pylist(),
        auto.column("identity_id").to_pylist(),
        auto.column("source_kind").to_pylist(),
        strict=False,
    ):
        if k == "album":
            by_album.setdefault(g, set()).add(i)
    assert len(by_album["family"] & by_album["party"]) >= 2
    t = summary.totals
    assert t.faces == len(faces)
    assert t.auto == len(auto)
    assert summary.dataset and summary.dataset.version == 1
    report = Path(summary.report)
    assert report.is_file() and "<img" in report.read_text()
    # The run record is the summary as JSON, snake_case keys.
    record = json.loads(st.read_bytes(f"runs/{summary.run_id}.json"))
    assert record["run"]["new_images"] == summary.run.new_images
    assert RunSummary.from_dict(record) == summary
    # Every stored reason has its code stored beside it, faces and images alike.
    for table in (
        read_faces(st, columns=["reason", "reason_code"]),
        read_images(st, columns=["reason", "reason_code"]),
    ):
        for r in table.to_pylist():
            assert r["reason_code"] == (reason_code(r["reason"]) or None), r
    queue = st.read_parquet("tables/review_queue/queue.parquet")
    assert len(queue) == t.review
    assert set(queue.column("task_kind").drop_null().to_pylist()) <= set(TaskKind)


def test_idcard_decisions(first_run, demo_inputs):
    settings, _ = first_run
    truth = demo_inputs[1]["idcard_subjects"]
    faces = read_faces(
        open_store(settings.store),
        kinds=["idcard"],
        columns=["source_group", "role", "status", "identity_id", "reason"],
    ).to_pylist()
    for subject, info in truth.items():
        live = [f for f in faces if f["source_group"] == subject and f["role"] == "live"]
        auto = [f for f in live if f["status"] == "auto"]
        if info["same_picture"]:
            # Live photos cut from the chip's own photo: the ID picture, not a capture.
            assert not auto, f"{subject}: the ID picture accepted as a capture"
            assert any(
                f["status"] == "review" and f["reason"].startswith("idcard_live_rephotographed")
                for f in live
            ), [f["reason"] for f in live]
        elif info["genuine"]:
            assert auto, f"{subject}: genuine pair not accepted: {[f['reason'] for f in live]}"
            assert all(f["identity_id"] == subject for f in auto)
        else:
            assert not auto, f"{subject}: impostor accepted"
    assert any(i["genuine"] and not i["same_picture"] for i in truth.values())


def test_bad_inputs_are_recorded_not_fatal(first_run, demo_inputs):
    settings, _ = first_run
    expected = demo_inputs[1]["bad_files"]
    images = read_images(
        open_store(settings.store), columns=["image_uri", "status", "reason"]
    ).to_pylist()
    by_name = {Path(r["image_uri"]).name: r for r in images}
    for name in expected:
        assert name in by_name, f"{name} missing from the images table"
        row = by_name[name]
        assert row["status"] in ("quarantined", "no_face"), row
        assert row["reason"], row
    assert by_name["bomb.png"]["reason"].startswith("decompression_bomb")
    assert by_name["zero_bytes.jpg"]["reason"].startswith("empty_file")
    assert by_name["truncated.jpg"]["reason"].startswith("truncated")
    assert by_name["not_an_image.jpg"]["reason"].startswith("not_an_image")
    assert by_name["noise_no_face.png"]["status"] == "no_face"
    assert by_name["notes.txt"]["reason"].startswith("unsupported_extension")
    assert by_name["stray_at_root.jpg"]["reason"].startswith("wrong_layout")
    # Every image in the inputs is accounted for exactly once.
    inputs = [p for p in demo_inputs[0].rglob("*") if p.is_file() and p.name != "truth.json"]
    assert len(images) == len(inputs)
    assert len({r["image_uri"] for r in images}) == len(images)


def test_manifest_matches_shards(first_run):
    from storage.versions import read_manifest, read_shards, verify_version

    settings, _ = first_run
    st = open_store(settings.store)
    m = read_manifest(st, settings.dataset.name, "latest")
    assert verify_version(st, settings.dataset.name, m["version"]) == []
    # Labels come from the version's classes.parquet (the pooled shards store none).
    shards = read_shards(st, settings.dataset.name, m["version"])
    assert shards.schema.names == SHARD_SCHEMA.names
    assert len(shards) == m["num_rows"] == sum(s["rows"] for s in m["shards"])
    labels = sorted(set(shards.column("label").to_pylist()))
    assert labels == list(range(m["num_classes"]))
    assert {x["role"] for x in m["models"]} == {"detector", "recognizer"}
    assert all(len(x["sha256"]) == 64 for x in m["models"])


def test_batched_detector_calls_give_the_same_labels(first_run, settings_for, tmp_path):
    """models.det_batch (the GPU layout) through the whole flow, here on the CPU provider with
    padded calls: the same faces, statuses and identities as the first run, which detected one
    image per call (compared with benchmarks/compare_stores.py, as a GPU run would be)."""
    import pyarrow.parquet as pq

    from benchmarks.compare_stores import compare_stores, export_labels
    from flows.refresh import run_refresh

    settings, _ = first_run
    s2 = settings_for(tmp_path / "store")
    s2.models.det_batch = 4  # ray.batch_size is 8 here: two detector calls per actor batch
    s2.models.fixed_shapes = True
    run_refresh(s2)
    res = compare_stores(settings.store, s2.store)
    assert res["faces_a"] == res["faces_b"] == res["matched"] > 20, res
    assert res["status_agreement"] == 1.0, res
    assert res["identical_partition"], res
    # What leaves a GPU machine: the label columns alone, compared the same way.
    labels = tmp_path / "labels.parquet"
    assert export_labels(s2.store, str(labels)) == res["faces_b"]
    assert pq.read_schema(labels).names == [
        "face_id",
        "image_sha256",
        "bbox",
        "status",
        "identity_id",
    ]
    assert compare_stores(settings.store, str(labels)) == res


def test_rerun_is_a_noop(first_run):
    settings, _ = first_run
    assert_rerun_is_noop(settings)


def _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path):
    """Settings for a copy of the first run's store and of its inputs (new paths, same bytes),
    so that a test can refresh again without changing the other tests' state."""
    settings, _ = first_run
    inputs = tmp_path / "inputs"
    shutil.copytree(demo_inputs[0], inputs)
    store = tmp_path / "store"
    shutil.copytree(settings.store, store)
    return settings_for(store, inputs), inputs


def test_new_photo_keeps_identity_ids(first_run, settings_for, demo_inputs, tmp_path):
    """A new photo in an album relabels without renaming the identities already there."""
    from flows.refresh import run_refresh
    from storage.versions import list_versions

    settings, _ = first_run
    # The images table recorded the original URIs; the copied inputs are new URIs but the same
    # bytes, so the faces must not be duplicated: duplicates are recognised by face_id.
    s2, inputs = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    st = open_store(s2.store)
    old = {
        r["face_id"]: r["identity_id"]
        for r in read_faces(st, columns=["face_id", "identity_id", "status"]).to_pylist()
        if r["status"] == "auto"
    }
    fam = sorted((inputs / "albums" / "family").iterdir())
    shutil.copy(fam[0], inputs / "albums" / "family" / "zz_new_shot.png")  # new URI, new bytes
    from PIL import Image

    Image.open(fam[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        inputs / "albums" / "family" / "zz_new_shot.png"
    )
    summary = run_refresh(s2)
    new = read_faces(st, columns=["face_id", "identity_id", "status"]).to_pylist()
    assert len({r["face_id"] for r in new}) == len(new), "no duplicated faces"
    kept = [r for r in new if r["face_id"] in old and r["status"] == "auto"]
    same = sum(old[r["face_id"]] == r["identity_id"] for r in kept)
    assert same >= 0.95 * len(kept)
    assert summary.run.new_faces >= 4
    assert len(list_versions(st, settings.dataset.name)) == 2

    # A changed file is a new image: same URI, new bytes.
    changed = min((inputs / "albums" / "party").iterdir())
    Image.open(changed).rotate(3).save(changed, format="JPEG", quality=90)
    again = run_refresh(s2)
    assert again.run.new_images == 1
    imgs = [
        r
        for r in read_images(st, columns=["image_uri", "image_sha256"]).to_pylist()
        if r["image_uri"] == str(changed)
    ]
    assert len(imgs) == 2 and imgs[0]["image_sha256"] != imgs[1]["image_sha256"]


def test_an_album_source_not_mounted_keeps_its_faces_and_is_named_in_the_run(
    first_run, settings_for, demo_inputs, tmp_path
):
    """An album source whose mount failed (an empty mount point) refreshed as "0 files listed"
    with no word. Its images and faces stay as they were (no dataset version without them),
    and the run's summary and record name the source."""
    from flows.refresh import run_refresh

    s2, inputs = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    before = run_refresh(s2)  # the copied inputs' paths recorded (moved: no model work)
    assert before.run.empty_sources == "none"
    albums = inputs / "albums"
    shutil.move(albums, tmp_path / "offline")
    albums.mkdir()
    summary = assert_rerun_is_noop(s2)  # faces files and dataset versions as they were
    held = summary.run.empty_sources
    assert held.startswith(f"{albums} (") and held.endswith(" images)"), held
    record = json.loads(open_store(s2.store).read_bytes(f"runs/{summary.run_id}.json"))
    assert record["run"]["empty_sources"] == held
    assert summary.totals == before.totals


def test_changed_label_settings_relabel_the_store_with_nothing_new(
    first_run, settings_for, demo_inputs, tmp_path
):
    """An edited threshold (as after `faceloop calibrate`) reaches the stored faces on the next
    refresh even when no photo is new; the refresh after it, with the same settings, is a no-op
    again, and going back to the old settings gives back the old labels."""
    from flows.refresh import run_refresh

    s2, _ = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    st = open_store(s2.store)
    cols = ["face_id", "status", "reason", "identity_id"]

    def labels() -> dict[str, tuple]:
        return {
            r["face_id"]: (r["status"], r["reason"])
            for r in read_faces(st, columns=cols).to_pylist()
        }

    before = labels()
    key = s2.thresholds_key
    strict = s2.model_copy(
        update={
            "policy": {
                **s2.policy,
                key: s2.policy[key].model_copy(
                    update={"idcard_accept": 0.9999, "idcard_accept_low_quality": 0.9999}
                ),
            }
        }
    )
    summary = run_refresh(strict)
    assert summary.run.new_images == 0 and summary.run.images_sent_to_models == 0
    assert summary.run.relabelled_all == "yes: the label settings or rules changed"
    after = labels()
    moved = {f for f in before if before[f] != after[f]}
    assert summary.run.changed_faces == len(moved) > 0
    assert all(after[f][0] != "auto" for f in moved)  # ID pairs no longer accepted at 0.9999
    noop = run_refresh(strict).run
    assert noop.changed_faces == 0 and noop.relabelled_all == "no"  # nothing to relabel
    back = run_refresh(s2)
    assert back.run.changed_faces == len(moved) and labels() == before


def test_models_load_once_during_discovery_and_not_for_a_noop(
    first_run, settings_for, demo_inputs, tmp_path, monkeypatch
):
    """A small refresh loads the models once, ahead, while discovery reads the new files, and
    the face stage's threads share them; a refresh with nothing new loads none. Nothing loaded
    ahead outlives the run."""
    import threading

    import tasks.backends as backends
    import tasks.faces as faces
    from flows.refresh import run_refresh

    s2, inputs = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    loads: list[str] = []
    real_load = backends.load_backend

    def counted(models, providers=None):
        loads.append(threading.current_thread().name)
        return real_load(models, providers)

    monkeypatch.setattr(backends, "load_backend", counted)  # load_ahead's
    monkeypatch.setattr(faces, "load_backend", counted)  # the stage's threads'
    from PIL import Image

    fam = sorted((inputs / "albums" / "family").iterdir())
    for i in range(3):
        Image.open(fam[i]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
            inputs / "albums" / "family" / f"zz_ahead_{i}.png"
        )
    summary = run_refresh(s2)
    assert summary.run.images_sent_to_models == 3
    assert loads == ["faceloop-load-ahead"], loads
    assert backends._AHEAD == {}
    loads.clear()
    again = run_refresh(s2)
    assert again.run.images_sent_to_models == 0 and loads == []
    assert backends._AHEAD == {}


def test_registered_model_reembeds_and_keeps_ids(first_run, settings_for, model_root, tmp_path):
    """Closing the loop: a registered recognizer re-embeds stored faces on the next refresh.

    The "new" model is the shipped recognizer with different metadata (so a different file and
    sha256, identical weights). Re-embedding starts from the stored aligned JPEG, not the original
    pixels, so embeddings move a little; faces far from any threshold keep their labels and every
    identity keeps its id.
    """
    import onnx

    from flows.refresh import run_refresh
    from storage.versions import read_manifest
    from training.registry import register_model

    settings, _ = first_run
    store = tmp_path / "store"
    shutil.copytree(settings.store, store)
    model = onnx.load(str(next((Path(model_root) / "insightface").glob("w600k_mbf.onnx"))))
    model.doc_string = "faceloop test: same weights, new file"
    new_file = tmp_path / "retrained.onnx"
    onnx.save(model, str(new_file))
    entry = register_model(str(store), new_file, name="retrained")

    st = open_store(str(store))
    before = {
        r["face_id"]: (r["identity_id"], r["status"])
        for r in read_faces(st, columns=["face_id", "identity_id", "status"]).to_pylist()
    }
    s2 = settings_for(store)
    summary = run_refresh(s2)
    assert summary.run.reembedded_faces == len(before)
    after = read_faces(st, columns=["face_id", "identity_id", "status", "model"]).to_pylist()
    assert {r["model"] for r in after} == {f"{entry['sha256']}.onnx@sha256:{entry['sha256']}"}
    now = {r["face_id"]: (r["identity_id"], r["status"]) for r in after}
    assert now.keys() == before.keys()
    same = sum(now[f] == before[f] for f in before)
    assert same >= 0.95 * len(before), f"only {same}/{len(before)} faces kept their label"
    old_ids = {v[0] for v in before.values() if v[1] == "auto"}
    new_ids = {v[0] for v in now.values() if v[1] == "auto"}
    assert len(old_ids & new_ids) >= 0.9 * len(old_ids), "identity ids must survive a re-embed"
    rec = [m for m in summary.models if m["role"] == "recognizer"]
    assert rec and rec[0]["sha256"] == entry["sha256"]
    # The next run has nothing left to re-embed and publishes nothing new.
    version = read_manifest(st, s2.dataset.name, "latest")["version"]
    again = run_refresh(s2)
    assert again.run.reembedded_faces == 0
    assert read_manifest(st, s2.dataset.name, "latest")["version"] == version


def test_a_store_switched_to_another_backend_is_re_embedded_and_relabelled(
    first_run, settings_for, tmp_path, monkeypatch
):
    """A recognizer chosen in the config (here the opencv backend's own SFace, 128-d, over a
    store of the default 512-d recognizer) re-embeds the stored faces as a registered one does:
    the labels used to mix two recognizers' embeddings (the label stage failed on their shapes).
    A run killed after the re-embedding pass, before its label stage, leaves the relabel to the
    next run, which has nothing left to re-embed: its labels are an uninterrupted run's."""
    import flows.refresh as refresh_mod
    from flows.refresh import run_refresh
    from tasks.reembed import relabel_pending

    settings, _ = first_run
    cols = ["face_id", "status", "identity_id", "reason_code", "model"]
    stores = {}
    for name in ("clean", "killed"):
        stores[name] = tmp_path / name
        shutil.copytree(settings.store, stores[name])

    def opencv(store: Path):
        s = settings_for(store)
        s.models.use_backend("opencv")
        return s

    clean = run_refresh(opencv(stores["clean"]))
    n = read_faces(open_store(str(stores["clean"])), columns=["face_id"]).num_rows
    assert clean.run.reembedded_faces == n
    assert clean.run.relabelled_all == "yes: faces re-embedded with another recognizer"
    faces = read_faces(open_store(str(stores["clean"])), columns=[*cols, "embedding"])
    assert {m.split("@")[0] for m in faces.column("model").to_pylist()} == {
        "face_recognition_sface_2021dec_int8bq.onnx"
    }
    assert {len(e) for e in faces.column("embedding").to_pylist() if e is not None} == {128}
    assert [m["name"] for m in clean.models if m["role"] == "recognizer"] == [
        "sface_2021dec_int8bq"
    ]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run stops where its label stage would begin

    monkeypatch.setattr(refresh_mod, "label_step", killed)
    with pytest.raises(KeyboardInterrupt):
        run_refresh(opencv(stores["killed"]))
    st = open_store(str(stores["killed"]))
    assert relabel_pending(st)
    monkeypatch.undo()
    again = run_refresh(opencv(stores["killed"]))
    assert again.run.reembedded_faces == 0 and "label_s" in again.timings
    assert again.run.relabelled_all == "yes: faces an earlier run re-embedded"
    assert not relabel_pending(st)

    def labels(store: Path) -> list[dict]:
        return read_faces(open_store(str(store)), columns=cols).sort_by("face_id").to_pylist()

    assert labels(stores["killed"]) == labels(stores["clean"])


def test_opencv_backend_end_to_end(prefect_server, ray_session, settings_for, tmp_path):
    """The permissively licensed backend (YuNet + SFace) runs the same flow, with its own tags."""
    from PIL import Image

    from faceloop.samples import sample_photos
    from flows.refresh import run_refresh

    album = tmp_path / "inputs" / "albums" / "group"
    album.mkdir(parents=True)
    t1 = Image.open(sample_photos()["t1"]).convert("RGB")
    for i, angle in enumerate((0, 3, -3)):
        t1.rotate(angle).save(album / f"shot{i}.jpg", quality=92)
    (tmp_path / "inputs" / "idcards").mkdir()
    s = settings_for(tmp_path / "store", tmp_path / "inputs")
    s.models.use_backend("opencv")
    summary = run_refresh(s)
    faces = read_faces(
        open_store(s.store), columns=["model", "detector", "embedding", "status"]
    ).to_pylist()
    assert len(faces) >= 15
    assert {f["model"].split("@")[0] for f in faces} == {
        "face_recognition_sface_2021dec_int8bq.onnx"
    }
    assert {f["detector"].split("@")[0] for f in faces} == {
        "face_detection_yunet_2023mar_int8bq.onnx"
    }
    assert {len(f["embedding"]) for f in faces if f["embedding"] is not None} == {128}
    # Six people, three shots each: the clustering with SFace thresholds finds them.
    assert summary.totals.auto >= 12
    assert summary.totals.identities >= 5


def test_flow_run_is_named_after_the_run_id_with_progress_and_report_artifacts(first_run):
    """The Prefect run can be matched to runs/<run_id>.json; its progress artifact reached 100;
    the report artifact is markdown (figures, the report path as text), not a file:// link."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    _settings, summary = first_run
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        (run,) = [r for r in runs if r.name == summary.run_id]
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["refresh-progress", "refresh-report"])
            )
        )
    mine = {a.key: a for a in arts if a.flow_run_id == run.id}
    assert float(mine["refresh-progress"].data) == 100.0
    report = mine["refresh-report"]
    assert report.type == "markdown" and summary.run_id in str(report.data)
    assert "file://" not in str(report.data)
    assert str(report.data).count("](data:image/svg+xml;base64,") == 3  # the plots, inline


def test_a_run_that_lost_the_lock_reports_that_and_leaves_the_store_alone(
    first_run, settings_for, demo_inputs, tmp_path, monkeypatch
):
    """A refresh stopped past its lease, its lock taken over, failed when resumed on what the
    new holder's recovery removed: exit 1, a bare FileNotFoundError. It is the lost lock."""
    import flows.refresh as refresh
    from faceloop.errors import StoreLockedError
    from storage import layout

    settings, _ = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    st = open_store(settings.store)

    def overtaken(settings, run_id, lock, rehash=False):
        st.write_bytes(layout.staging_pending(run_id), b"work list")
        lock._lost = "lost the store lock to refresh run other (pid 1 on elsewhere)"
        raise FileNotFoundError(st.uri(layout.staging_dir(run_id) + "/detections"))

    monkeypatch.setattr(refresh, "_refresh", overtaken)
    with pytest.raises(StoreLockedError, match="lost the store lock"):
        refresh.run_refresh(settings)


@pytest.mark.parametrize(
    "stop", [KeyboardInterrupt, lambda: SystemExit(15), lambda: ConnectionError("cluster gone")]
)
def test_ctrl_c_takes_the_runs_staging_with_it(
    first_run, settings_for, demo_inputs, tmp_path, monkeypatch, stop
):
    """A refresh stopped by Ctrl-C left staging/<run>/ behind, and `faceloop doctor` failed
    ("no orphan staging") until the next refresh's recovery removed it. So did one stopped by
    SIGTERM, which Prefect ends with SystemExit(15), and one that failed (a Ray cluster
    stopped or unreachable: every failed scheduled run)."""
    import flows.refresh as refresh
    from storage import layout
    from storage.recovery import staging_runs

    settings, _ = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    st = open_store(settings.store)

    import pyarrow as pa

    from storage.tables import images_rel

    runs: list[str] = []

    def interrupted(settings, run_id, lock, rehash=False):
        st.write_bytes(layout.staging_pending(run_id), b"work list")
        # Its label commit went in: its images are recorded (a full disk at publish, say).
        st.write_parquet(images_rel(run_id), pa.table({"status": ["ok", "ok"]}))
        runs.append(run_id)
        raise stop()

    monkeypatch.setattr(refresh, "_refresh", interrupted)
    with pytest.raises((KeyboardInterrupt, SystemExit, ConnectionError)) as raised:
        refresh.run_refresh(settings)
    assert staging_runs(st) == []
    # It changed the store: it has a record, as a killed run gets from the next writer (a
    # failed or stopped one had none, its staging gone with what said so).
    record = json.loads(st.read_bytes(layout.run_record(runs[0])))
    failed = isinstance(raised.value, ConnectionError)
    assert record["run"]["images_recorded"] == 2, record
    assert record["interrupted"].startswith(
        "failed (ConnectionError" if failed else "stopped (SIGTERM or Ctrl-C)"
    ), record


def test_a_failed_run_whose_record_cannot_be_written_gets_one_from_the_next_run(
    first_run, settings_for, demo_inputs, tmp_path, monkeypatch
):
    """A refresh that failed after recording its images (a full disk at publish), its run
    record failing too (the same full disk), still removed its staging: the next run's recovery
    had nothing to find, and the run that took images in had no record at all (`faceloop
    status` showed the run before it; doctor said all was well)."""
    import errno

    from PIL import Image

    import flows.refresh as refresh
    from faceloop.commands.doctor import run_checks
    from faceloop.commands.status import store_status
    from storage import layout
    from storage.objectstore import LocalStore
    from storage.tables import image_runs

    settings, inputs = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    st = open_store(settings.store)
    before = set(image_runs(st))
    fam = sorted((inputs / "albums" / "family").iterdir())
    Image.open(fam[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        inputs / "albums" / "family" / "zz_flipped.png"
    )

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = LocalStore.write_bytes

    def no_records(self, rel, data):
        if rel.startswith(f"{layout.RUNS}/"):
            disk_full()
        return real_write(self, rel, data)

    monkeypatch.setattr(refresh, "publish_step", disk_full)
    monkeypatch.setattr(LocalStore, "write_bytes", no_records)
    with pytest.raises(OSError, match="No space left"):
        refresh.run_refresh(settings)
    monkeypatch.undo()
    (failed,) = set(image_runs(st)) - before  # it recorded its images
    assert not st.exists(layout.run_record(failed))
    # Its staging stays for the next writer, and doctor says so.
    staging = {c["check"]: c for c in run_checks(st)}["no orphan staging"]
    assert not staging["ok"] and failed in staging["detail"]

    again = refresh.run_refresh(settings)
    record = json.loads(st.read_bytes(layout.run_record(failed)))
    assert record["run"]["images_recorded"] >= 1 and record["found_by"] == again.run_id
    assert again.run.new_images == 0 and again.run.already_seen == again.run.files_listed
    assert store_status(st)["runs"] == len(list(st.list(layout.RUNS)))
    assert all(c["ok"] for c in run_checks(st)), run_checks(st)


def test_images_the_face_stage_did_not_process_fail_the_run_and_are_taken_again(
    first_run, settings_for, demo_inputs, tmp_path, monkeypatch
):
    """A face stage that came back without rows for some of its images (a Ray node that could
    not see the store wrote none and took its run for stopped) ended in exit 0, "images sent to
    the models" short of the new ones and a dataset without their faces. The run fails naming
    them, records nothing, and the next run processes them."""
    from PIL import Image

    import flows.refresh as refresh
    import tasks.faces
    from faceloop.errors import FaceloopError
    from storage.recovery import staging_runs
    from storage.tables import image_runs

    settings, inputs = _copy_of_first_run(first_run, settings_for, demo_inputs, tmp_path)
    st = open_store(settings.store)
    refresh.run_refresh(settings)  # the copied inputs' paths recorded (moved: no model work)
    before = set(image_runs(st))
    fam = sorted((inputs / "albums" / "family").iterdir())
    Image.open(fam[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        inputs / "albums" / "family" / "zz_flipped.png"
    )
    Image.open(fam[1]).rotate(3).save(inputs / "albums" / "family" / "zz_turned.png")
    real_write = tasks.faces.write_detections_part

    def lost(store, folder, rows, columns):
        if any(r["image_uri"].endswith("zz_flipped.png") for r in rows):
            return 0  # that batch's rows never written
        return real_write(store, folder, rows, columns)

    with monkeypatch.context() as m:
        m.setattr(tasks.faces, "write_detections_part", lost)
        with pytest.raises(FaceloopError, match=r"^1 of 2 images were not processed by the"):
            refresh.run_refresh(settings)
    assert set(image_runs(st)) == before  # nothing recorded as seen
    assert staging_runs(st) == []
    again = refresh.run_refresh(settings)
    assert again.run.new_images == 2 and again.run.images_sent_to_models == 2
