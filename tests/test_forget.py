"""``faceloop forget`` end to end: a store built by a real refresh (Prefect, local Ray, real
models), one identity, one ID-card subject and one image forgotten; then no file of the store
holds their face ids, image hashes or crops (raw bytes and every decoded Parquet value), dataset
versions verify, doctor passes, the audit log has the entry without raw ids, Label Studio tasks
left are resumable, and a refresh over the unchanged source takes nothing back in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from faceloop.cli import main
from faceloop.config import SourceSpec, load_settings
from faceloop.demo import build_demo_inputs
from storage import layout
from storage.objectstore import open_store
from storage.tables import read_faces, read_images
from tasks.summary import markdown_table

pytestmark = pytest.mark.integration


def _values(v: object) -> list[bytes]:
    if v is None:
        return []
    if isinstance(v, list):
        return [x for i in v for x in _values(i)]
    if isinstance(v, dict):
        return [x for i in v.values() for x in _values(i)]
    if isinstance(v, str):
        return [v.encode()]
    if isinstance(v, bytes):
        return [v]
    return []


def byte_scan(root: Path, needles: set[bytes]) -> list[str]:
    """``file: needle`` for every needle found in a file's raw bytes or, for Parquet files, in
    any decoded string/binary value (nested lists included)."""
    found = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        hay = [data]
        if p.suffix == ".parquet":
            t = pq.read_table(p)
            for col in t.columns:
                if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
                    continue
                for v in col.to_pylist():
                    hay += _values(v)
        for n in needles:
            if any(n in h for h in hay):
                found.append(f"{p.relative_to(root)}: {n[:24]!r}")
    return found


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _demo_store(model_root: Path, tmp_path: Path) -> tuple[Path, Path, Any]:
    """The demo's albums and ID cards under ``tmp_path/inputs`` (no bad files) and the settings
    of a store at ``tmp_path/store`` reading them: (inputs, store folder, settings)."""
    from tasks.backends import load_backend

    inputs = tmp_path / "inputs"
    backend = load_backend(load_settings(None, models={"root": str(model_root)}).models)
    build_demo_inputs(inputs, backend.detect, copies=1, bad_files=False)
    store_dir = tmp_path / "store"
    settings = load_settings(
        None,
        store=str(store_dir),
        sources=[
            SourceSpec(kind="album", uri=str(inputs / "albums")),
            SourceSpec(kind="idcard", uri=str(inputs / "idcards")),
        ],
        models={"root": str(model_root)},
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
        review={"enabled": False},
    )
    return inputs, store_dir, settings


def test_forget_identity_subject_image(
    prefect_server, ray_session, model_root, tmp_path, monkeypatch, capsys
):
    from flows.refresh import run_refresh
    from storage.forget import plan

    _, store_dir, settings = _demo_store(model_root, tmp_path)
    run_refresh(settings)
    st = open_store(settings.store)
    faces = read_faces(
        st,
        columns=[
            "face_id",
            "image_uri",
            "image_sha256",
            "identity_id",
            "status",
            "source_kind",
            "source_group",
        ],
    ).to_pylist()
    published = {
        r["face_id"]
        for shard in (store_dir / "datasets").rglob("*.parquet")
        if shard.parent.name == "shards"  # the pooled shards (classes/changes are not)
        for r in pq.read_table(shard).to_pylist()
    }
    ident = next(
        f["identity_id"]
        for f in faces
        if f["source_kind"] == "album" and f["face_id"] in published and f["identity_id"]
    )
    subject = next(f["source_group"] for f in faces if f["source_kind"] == "idcard")
    image = next(
        f["image_sha256"]
        for f in faces
        if f["source_kind"] == "album" and f["identity_id"] != ident and f["face_id"] in published
    )
    target = plan(st, [ident], [subject], [image])
    assert target.face_ids and len(target.shas) >= 3
    crops = {
        r["aligned_jpeg"]
        for r in read_faces(st, columns=["face_id", "aligned_jpeg"]).to_pylist()
        if r["face_id"] in target.face_ids and r["aligned_jpeg"]
    }
    needles = {t.encode() for t in target.face_ids | target.shas} | crops
    assert byte_scan(store_dir, needles), "the scan finds them before forget"

    # A pushed review task about one of the faces: Label Studio is unreachable here, so the
    # command scrubs the record, says what is left and --resume stays pending.
    fid = sorted(target.face_ids)[0]
    st.write_parquet(
        f"{layout.REVIEW_TASKS}/20250101T000000-test.parquet",
        pa.Table.from_pylist(
            [{"key": f"duplicate:{fid}:x", "project_id": 1, "task_id": 7, "face_ids": [fid]}]
        ),
    )
    config = tmp_path / "forget.yaml"
    config.write_text(
        f"store: {store_dir}\nreview:\n  url: http://127.0.0.1:9\n  token: t\n  retries: 0\n"
    )
    base = ["forget", "--config", str(config)]
    args = [*base, "--identity", ident, "--subject", subject, "--image", image]
    assert main(args) == 2, "no --yes and stdin is not a terminal: refused"
    assert main([*args, "--yes"]) == 1, "done in the store, Label Studio task left"

    assert byte_scan(store_dir, needles) == []
    assert main(["datasets", "verify", "--all", "--store", str(store_dir), "--name", "faces"]) == 0
    assert main(["doctor", "--store", str(store_dir)]) == 0
    entries = [json.loads(x) for x in (store_dir / layout.AUDIT_FORGET).read_text().splitlines()]
    assert entries[-1]["request"] == {"identity": 1, "subject": 1, "image": 1}
    assert entries[-1]["labelstudio"] == {"deleted": 0, "left": 1}
    assert entries[-1]["removed"]["face_rows"] >= len(target.face_ids)
    assert entries[-1]["removed"]["versions_rewritten"] >= 1
    assert entries[-1]["user"]
    audit_text = (store_dir / layout.AUDIT_FORGET).read_text()
    assert ident not in audit_text
    assert (store_dir / layout.STORE_SECRET).stat().st_mode & 0o777 == 0o600
    pending = json.loads((store_dir / layout.FORGET_PENDING).read_text())
    assert pending["labelstudio_tasks"] == [[1, 7]] and pending["store_done"]
    assert main([*base, "--resume", "--yes"]) == 1, "still unreachable: still pending"

    # The source still holds the photos: the next refresh must not take them back in.
    run_refresh(settings)
    assert byte_scan(store_dir, needles) == []
    again = read_faces(st, columns=["face_id", "source_group", "source_kind"]).to_pylist()
    assert not {f["face_id"] for f in again} & target.face_ids
    assert not any(f["source_kind"] == "idcard" and f["source_group"] == subject for f in again)
    forgotten = [r for r in read_images(st).to_pylist() if r["reason_code"] == "forgotten"]
    assert len(forgotten) >= len(target.uris) - 1
    assert all(r["image_uri"].startswith("forgotten:") and not r["source_group"] for r in forgotten)
    n_forgotten = len(forgotten)
    run_refresh(settings)  # a third run: the placeholders count as seen, no new rows
    assert (
        len([r for r in read_images(st).to_pylist() if r["reason_code"] == "forgotten"])
        == n_forgotten
    )
    assert byte_scan(store_dir, needles) == []
    assert main(["datasets", "verify", "--all", "--store", str(store_dir), "--name", "faces"]) == 0
    assert main(["doctor", "--store", str(store_dir)]) == 0

    # A forget killed after its tombstones and pending record, before the store work: the next
    # refresh finishes it (it republished versions that still held the faces, and doctor kept
    # failing). The image is named by a path relative to the working directory, as `explain`
    # takes it (forget found nothing for it and exited 0).
    left = read_faces(st, columns=["face_id", "image_uri", "image_sha256", "source_kind"])
    victim = next(
        f for f in left.to_pylist() if f["source_kind"] == "album" and f["face_id"] in published
    )
    more = plan(st, [], [], [victim["image_sha256"]])
    needles2 = {t.encode() for t in more.face_ids | more.shas}
    assert byte_scan(store_dir, needles2)
    import storage.forget as forget_mod

    def killed(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # the process dies here: tombstones and pending are written

    src = Path(victim["image_uri"])
    monkeypatch.chdir(src.parent.parent)
    monkeypatch.setattr(forget_mod, "scrub", killed)
    assert main([*base, "--image", f"{src.parent.name}/{src.name}", "--yes"]) == 130
    monkeypatch.undo()
    assert main(["doctor", "--store", str(store_dir)]) == 1  # store work left
    finishing = run_refresh(settings)
    # Said in the run summary too (a warning in the log only): its changes came from the forget.
    assert finishing.run.forget_finished.startswith("yes (")
    assert "an interrupted forget finished first" in markdown_table(finishing)
    assert byte_scan(store_dir, needles2) == []
    assert json.loads((store_dir / layout.FORGET_PENDING).read_text())["store_done"]
    assert main(["datasets", "verify", "--all", "--store", str(store_dir), "--name", "faces"]) == 0
    assert main(["doctor", "--store", str(store_dir)]) == 0
    # Nothing in the store by that name: exit 1, not "done"
    assert main([*base, "--identity", "id-nobody", "--yes"]) == 1
    # explain tells a forgotten photo from one never seen (both said "no face or image").
    capsys.readouterr()
    assert main(["explain", image, "--store", str(store_dir)]) == 1
    assert "was forgotten" in capsys.readouterr().err
    assert main(["explain", "0" * 64, "--store", str(store_dir)]) == 1
    assert "no face or image" in capsys.readouterr().err


def test_label_settings_changed_after_a_forget_relabel_the_store(
    prefect_server, ray_session, model_root, tmp_path
):
    """A forget dropped the label state whole, the fingerprint of the settings it was labelled
    under with it: a threshold edited after it (as by `faceloop calibrate`) never reached the
    stored faces when the next refresh found nothing new, and a refresh that labelled anyway
    recorded the new settings as already applied. Both paths: forget -> refresh -> settings
    change -> refresh, and forget -> settings change -> refresh."""
    from flows.refresh import run_refresh

    inputs, store_dir, settings = _demo_store(model_root, tmp_path)
    key = settings.thresholds_key
    strict = settings.model_copy(
        update={
            "policy": {
                **settings.policy,
                key: settings.policy[key].model_copy(
                    update={"idcard_accept": 0.9999, "idcard_accept_low_quality": 0.9999}
                ),
            }
        }
    )
    st = open_store(settings.store)
    run_refresh(settings)

    def subjects_accepted() -> list[str]:
        return sorted(
            {
                r["source_group"]
                for r in read_faces(
                    st, columns=["source_kind", "source_group", "status"]
                ).to_pylist()
                if r["source_kind"] == "idcard" and r["status"] == "auto"
            }
        )

    accepted = subjects_accepted()
    others = sorted({p.name for p in (inputs / "idcards").iterdir()} - set(accepted))
    assert accepted and len(others) >= 2  # subjects to forget, one to see the settings on
    store = ["--store", str(store_dir)]

    assert main(["forget", *store, "--subject", others[0], "--yes"]) == 0
    assert run_refresh(settings).run.relabelled_all == "no"  # nothing new, nothing to relabel
    summary = run_refresh(strict)
    assert summary.run.relabelled_all == "yes: the label settings or rules changed"
    assert summary.run.changed_faces > 0 and subjects_accepted() == []
    assert run_refresh(settings).run.changed_faces > 0  # back: accepted again
    assert subjects_accepted() == accepted

    assert main(["forget", *store, "--subject", others[1], "--yes"]) == 0
    summary = run_refresh(strict)
    assert summary.run.relabelled_all == "yes: the label settings or rules changed"
    assert subjects_accepted() == []


def test_the_refresh_after_a_forget_says_which_subjects_it_decided_again(
    prefect_server, ray_session, sample_photos, model_root, tmp_path
):
    """Subject B had filed subject A's live photo byte for byte (a duplicate claim). After A was
    forgotten the next refresh decided B again, with nothing new: its summary counted faces
    whose label changed (and a dataset version, when B came out accepted) with no word of why."""
    import shutil

    from flows.refresh import run_refresh

    ids = tmp_path / "idcards"
    for rel, photo in (("A/id.jpg", "tom_hanks"), ("A/live1.jpg", "yaoming"), ("B/id.jpg", "gdp")):
        (ids / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_photos[photo], ids / rel)
    shutil.copyfile(ids / "A" / "live1.jpg", ids / "B" / "live1.jpg")
    store_dir = tmp_path / "store"
    settings = load_settings(
        None,
        store=str(store_dir),
        sources=[SourceSpec(kind="idcard", uri=str(ids))],
        models={"root": str(model_root)},
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
        review={"enabled": False},
    )
    assert run_refresh(settings).run.subjects_decided_again == 0
    claimed = read_faces(open_store(settings.store), columns=["source_group", "reason"])
    assert any(
        r["source_group"] == "B" and (r["reason"] or "").startswith("duplicate_claim")
        for r in claimed.to_pylist()
    )
    assert main(["forget", "--store", str(store_dir), "--subject", "A", "--yes"]) == 0
    summary = run_refresh(settings)
    assert summary.run.new_images == 0 and summary.run.changed_faces > 0
    assert summary.run.subjects_decided_again == 1
    assert (
        "| this run: ID-card subjects decided again (a forget took photos their claims rested"
        " on) | 1 |" in markdown_table(summary).splitlines()
    )
    assert run_refresh(settings).run.subjects_decided_again == 0


def test_forgetting_a_subject_takes_an_album_face_attached_to_it(
    prefect_server, ray_session, sample_photos, model_root, tmp_path
):
    """A reviewer attached an album face to ID-card subject A (identity "A", status human).
    `forget --subject A` removed A's ID-card photos only: the album face stayed, and the next
    refresh published a version whose classes named it "A", the subject's folder name."""
    import shutil

    from flows.refresh import run_refresh
    from storage.tables import faces_files, read_faces_file, write_group
    from storage.versions import list_versions, read_table

    root = tmp_path / "inputs"
    for rel, photo in (("idcards/A/id.jpg", "tom_hanks"), ("albums/trip/p1.jpg", "yaoming")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_photos[photo], root / rel)
    store_dir = tmp_path / "store"
    settings = load_settings(
        None,
        store=str(store_dir),
        sources=[
            SourceSpec(kind="album", uri=str(root / "albums")),
            SourceSpec(kind="idcard", uri=str(root / "idcards")),
        ],
        models={"root": str(model_root)},
        ray={"actors": 1, "num_cpus_per_actor": 0.5, "batch_size": 8},
        review={"enabled": False},
    )
    run_refresh(settings)
    st = open_store(settings.store)
    (rel,) = faces_files(st, kinds=["album"])
    t = read_faces_file(st, rel)
    rows = t.to_pylist()
    rows[0]["identity_id"], rows[0]["status"] = "A", "human"
    write_group(st, "album", rows[0]["source_group"], pa.Table.from_pylist(rows, schema=t.schema))
    attached = rows[0]["face_id"]
    run_refresh(settings)
    assert main(["forget", "--store", str(store_dir), "--subject", "A", "--yes"]) == 0
    assert attached not in read_faces(st, columns=["face_id"]).column("face_id").to_pylist()
    run_refresh(settings)
    for v in list_versions(st, "faces"):
        classes = read_table(st, "faces", v, "classes").column("identity_id").to_pylist()
        assert "A" not in classes and not [c for c in classes if c.startswith("subject-")]
