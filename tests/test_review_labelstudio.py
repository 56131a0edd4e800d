"""Integration: push → annotate through the API → pull → apply, against a real Label Studio."""

from __future__ import annotations

import io
import json
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from annotate import records, render, server, sync
from annotate.client import ReviewClient
from faceloop.config import load_settings
from faceloop.localnet import free_port
from faceloop.schema import FACES_SCHEMA
from faceloop.vocab import is_human
from storage.objectstore import open_store
from storage.tables import read_faces, write_group

pytestmark = pytest.mark.integration


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _emb(angle: float) -> list[float]:
    v = np.zeros(16, dtype=np.float32)
    v[0], v[1] = np.cos(angle), np.sin(angle)
    return v.tolist()


def _face(fid: str, n: int, kind="album", group="album1", role="album", **kw) -> dict:
    row = {name: None for name in FACES_SCHEMA.names}
    row.update(
        face_id=fid,
        image_uri=f"file:///x/{fid}.jpg",
        image_sha256=fid,
        source_kind=kind,
        source_group=group,
        role=role,
        face_index=0,
        quality=0.8,
        det_score=0.9,
        embedding=_emb(0.0),
        aligned_jpeg=_jpeg(n),
        status="auto",
        reason="auto: ok",
        score=0.9,
        run_id="r0",
        labelled_run_id="r0",
        model="w600k_r50.onnx@sha256:ab",
    )
    row.update(kw)
    return row


def _scene(store) -> None:
    album = [
        _face("a1", 1, identity_id="A"),
        _face("a2", 2, identity_id="A"),
        _face(
            "a3",
            3,
            identity_id="A",
            status="review",
            reason="outlier: similarity 0.21 < 0.30",
            score=0.21,
            embedding=_emb(1.2),
        ),
        _face(
            "b1",
            4,
            identity_id="B",
            status="review",
            reason="possible_duplicate_of A: centroid similarity 0.52",
            score=0.52,
            embedding=_emb(0.1),
        ),
        _face("b2", 5, identity_id="B", embedding=_emb(0.1)),
        _face("w1", 6, status="review", reason="unclustered: HDBSCAN noise", embedding=_emb(0.05)),
        _face("w2", 7, status="review", reason="low_quality: q 0.30 < 0.35", embedding=_emb(2.0)),
    ]
    write_group(store, "album", "album1", pa.Table.from_pylist(album, schema=FACES_SCHEMA))
    idc = [
        _face("id1", 8, kind="idcard", group="s1", role="id", identity_id="P1"),
        _face(
            "live1",
            9,
            kind="idcard",
            group="s1",
            role="live",
            identity_id="P1",
            status="review",
            reason="idcard_review: cosine 0.31 < 0.40",
            score=0.31,
        ),
    ]
    write_group(store, "idcard", "s1", pa.Table.from_pylist(idc, schema=FACES_SCHEMA))


@pytest.fixture
def env(labelstudio, tmp_path):
    settings = load_settings(
        store=str(tmp_path / "store"),
        review={
            "url": labelstudio.url,
            "token": labelstudio.token,
            "retries": 2,
            "backoff_s": 0.1,
            "project_prefix": f"t-{uuid.uuid4().hex[:8]}",
        },
    )
    store = open_store(settings.store)
    _scene(store)
    return settings, store, ReviewClient(settings.review)


def _tasks_by_kind(client, store) -> dict[str, tuple[int, dict]]:
    out = {}
    for r in records.read_task_records(store).to_pylist():
        out[r["kind"]] = (r["task_id"], r)
    return out


def _annotate(client, task_id: int, result: list[dict]) -> None:
    client.sdk.annotations.create(id=task_id, result=result)


def _faces(store) -> dict[str, dict]:
    return {r["face_id"]: r for r in read_faces(store).to_pylist()}


def test_push_annotate_pull_apply_roundtrip(env):
    settings, store, client = env
    res = sync.push_review(settings, store, client)
    assert res.created == 3 and res.by_kind == {
        "idcard_pair": 1,
        "cluster_check": 1,
        "duplicate": 1,
    }
    assert res.not_pushed == {"unclustered": 1, "low_quality": 1}

    again = sync.push_review(settings, store, client)
    assert again.created == 0 and again.already_pushed == 3
    tasks = _tasks_by_kind(client, store)
    for tid, rec in tasks.values():
        t = client.sdk.tasks.get(tid)
        assert t.data[render.KEY_FIELD] == sync.ls_key(store, rec["key"])  # in import order
        assert t.data.get("grid", t.data.get("live_image", t.data.get("grid_a"))).startswith(
            "data:image/jpeg;base64,"
        )
        (pred,) = t.predictions
        assert (
            pred["model_version"].startswith("w600k_r50.onnx")
            if isinstance(pred, dict)
            else pred.model_version.startswith("w600k_r50.onnx")
        )
    project_tasks = list(client.sdk.tasks.list(project=tasks["idcard_pair"][1]["project_id"]))
    assert len(project_tasks) == 1  # re-push created no duplicate in Label Studio

    id_tid, _ = tasks["idcard_pair"]
    _annotate(client, id_tid, [render.choice("decision", "live_face", ["same_person"])])
    cl_tid, cl_rec = tasks["cluster_check"]
    a3_number = str(cl_rec["shown"].index("a3") + 1)
    _annotate(
        client,
        cl_tid,
        [
            render.choice("outliers", "grid", [a3_number]),
            render.choice("verdict", "grid", ["marked_do_not_belong"]),
        ],
    )
    dup_tid, _ = tasks["duplicate"]
    _annotate(client, dup_tid, [render.choice("decision", "grid_a", ["same_person"])])

    out = sync.pull_and_apply(settings, store, run_id="review-1", client=client)
    assert out.new_answers == 3 and out.conflicts == 0
    f = _faces(store)
    assert f["live1"]["status"] == "human" and f["live1"]["identity_id"] == "P1"
    assert f["live1"]["reason"].startswith("human_same_person")
    assert f["a3"]["status"] == "human" and f["a3"]["identity_id"] is None  # left the identity
    assert f["b1"]["identity_id"] == "A" and f["b2"]["identity_id"] == "A"  # merged into larger A
    assert f["b1"]["status"] == "human"
    assert f["w1"]["status"] == "auto" and f["w1"]["identity_id"] == "A"  # propagated
    assert f["w1"]["reason"].startswith("propagated")
    assert f["w2"]["status"] == "review"  # far away: still waiting
    assert sum(out.propagated.values()) == 1
    assert all(v >= 1 for v in out.settled_per_answer.values())
    raw = store.read_parquet("tables/reviews/answers", schema=records.ANSWERS_SCHEMA)
    assert raw.num_rows == 3 and '"result"' in raw.column("raw_json")[0].as_py()

    # Incremental: nothing new → nothing recorded, nothing changed.
    again = sync.pull_and_apply(settings, store, run_id="review-2", client=client)
    assert again.new_answers == 0
    assert store.read_parquet("tables/reviews/answers", schema=records.ANSWERS_SCHEMA).num_rows == 3

    # An automatic run that overrode a human decision is corrected on the next pull.
    rows = [r for r in read_faces(store).to_pylist() if r["source_kind"] == "idcard"]
    for r in rows:
        if r["face_id"] == "live1":
            r.update(status="review", reason="idcard_review: cosine 0.31", identity_id=None)
    write_group(store, "idcard", "s1", pa.Table.from_pylist(rows, schema=FACES_SCHEMA))
    sync.pull_and_apply(settings, store, run_id="review-3", client=client)
    assert _faces(store)["live1"]["status"] == "human"

    # The next dataset version includes the human-confirmed faces, not the removed outlier.
    from storage.versions import newest_version, read_shards
    from tasks.publish import publish_dataset

    manifest = publish_dataset(settings, store, "review-3", [])
    assert manifest is not None
    version = newest_version(store, settings.dataset.name)
    shard = read_shards(store, settings.dataset.name, version, columns=["face_id", "identity_id"])
    published = dict(
        zip(
            shard.column("face_id").to_pylist(),
            shard.column("identity_id").to_pylist(),
            strict=False,
        )
    )
    assert published["live1"] == "P1" and published["b1"] == "A" and published["w1"] == "A"
    assert "a3" not in published and "w2" not in published


def test_a_task_only_skipped_is_pulled_and_its_skip_recorded(env):
    """Label Studio counts a skip in cancelled_annotations, not total_annotations: a task an
    annotator only skipped was never pulled, and the skip never recorded."""
    settings, store, client = env
    sync.push_review(settings, store, client)
    tid, _ = _tasks_by_kind(client, store)["idcard_pair"]
    before = _faces(store)
    client.sdk.annotations.create(id=tid, result=[], was_cancelled=True)
    out = sync.pull_and_apply(settings, store, run_id="review-skip", client=client)
    raw = store.read_parquet("tables/reviews/answers", schema=records.ANSWERS_SCHEMA).to_pylist()
    assert out.new_answers == 1 and [r["cancelled"] for r in raw] == [True]
    assert _faces(store) == before  # a skip decides nothing


@pytest.fixture(scope="module")
def annotators(labelstudio) -> list[server.Annotator]:
    """Two annotator logins made the way an operator makes them
    (`faceloop review add-annotator`)."""
    return [
        server.add_annotator(f"annotator{i}@faceloop.test", labelstudio.data_dir) for i in (1, 2)
    ]


def _login(url: str, email: str, password: str) -> int | None:
    """Log in through Label Studio's web form as a browser would; the user id the session
    sees, or None when the server did not let the session in."""
    import http.cookiejar
    import urllib.error
    import urllib.parse
    import urllib.request

    jar = http.cookiejar.CookieJar()
    web = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    web.open(f"{url}/user/login/", timeout=30).read()
    csrf = next(c.value for c in jar if c.name == "csrftoken")
    form = urllib.parse.urlencode(
        {"email": email, "password": password, "csrfmiddlewaretoken": csrf}
    ).encode()
    req = urllib.request.Request(
        f"{url}/user/login/", data=form, headers={"Referer": f"{url}/user/login/"}
    )
    web.open(req, timeout=30).read()
    try:
        with web.open(f"{url}/api/current-user/whoami", timeout=30) as r:
            return int(json.load(r)["id"])
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return None
        raise


def test_label_studio_keeps_its_files_to_its_owner(labelstudio):
    """The SQLite database (answers, task data with face crops) was 0644 inside its 0700
    folder: readable to anyone the folder was ever opened to, and in every copy of it."""
    loose = [
        str(p.relative_to(labelstudio.data_dir))
        for p in labelstudio.data_dir.rglob("*")
        if p.stat().st_mode & 0o077
    ]
    assert (labelstudio.data_dir / "label_studio.sqlite3").exists()
    assert not loose, loose


def test_annotator_accounts_log_in(labelstudio, annotators):
    a = annotators[0]
    assert oct(a.password_file.stat().st_mode & 0o777) == "0o600"
    assert _login(labelstudio.url, a.email, a.password_file.read_text()) == a.id
    again = server.add_annotator(
        a.email, labelstudio.data_dir
    )  # idempotent: same account, same login
    assert (again.id, again.created, again.token) == (a.id, False, a.token)
    assert _login(labelstudio.url, a.email, "not-the-password") is None


def test_conflicting_answers_are_not_applied_and_reasked(env, annotators):
    settings, store, client = env
    sync.push_review(settings, store, client)
    tid, rec = _tasks_by_kind(client, store)["idcard_pair"]
    # Two annotators, each with their own account, disagree.
    first, second = (ReviewClient(settings.review, token=a.token) for a in annotators)
    _annotate(first, tid, [render.choice("decision", "live_face", ["same_person"])])
    _annotate(second, tid, [render.choice("decision", "live_face", ["different_person"])])
    out = sync.pull_and_apply(settings, store, run_id="r1", client=client)
    assert out.conflicts == 1 and out.reasked == 1
    # Held (a human_ reason: no automatic run decides it) until the question asked again is
    # answered; the first question is not pushed again meanwhile.
    live = _faces(store)["live1"]
    assert live["status"] == "review" and live["reason"].startswith("human_conflict")
    answers = [
        r
        for r in store.read_parquet(
            f"{records.REVIEWS}/answers", schema=records.ANSWERS_SCHEMA
        ).to_pylist()
        if r["task_key"] == rec["key"]
    ]
    assert sorted(r["annotator"] for r in answers) == sorted(a.email for a in annotators)
    keys = {r["key"]: r for r in records.read_task_records(store).to_pylist()}
    round2 = keys[sync.conflict_key(rec["key"], 2)]
    # Deleted in Label Studio: the next pull asks it again (it was never re-created, and the
    # conflict stayed open for good).
    client.sdk.tasks.delete(round2["task_id"])
    again = sync.pull_and_apply(settings, store, run_id="r1b", client=client)
    assert again.reasked == 1
    keys = {r["key"]: r for r in records.read_task_records(store).to_pylist()}
    round2 = keys[sync.conflict_key(rec["key"], 2)]
    there = client.sdk.tasks.get(round2["task_id"])  # Label Studio may reuse the id
    assert there.data[render.KEY_FIELD] == sync.ls_key(store, round2["key"])
    assert sync.pull_and_apply(settings, store, run_id="r1c", client=client).reasked == 0
    # Deleted again, and another question pushed since takes its id (Label Studio reuses the
    # newest task's id): the re-asked conflict looked present and was never asked again.
    client.sdk.tasks.delete(round2["task_id"])
    pair2 = [
        _face("id2", 10, kind="idcard", group="s2", role="id", identity_id="P2"),
        _face(
            "live2",
            11,
            kind="idcard",
            group="s2",
            role="live",
            identity_id="P2",
            status="review",
            reason="idcard_review: cosine 0.30 < 0.40",
            score=0.30,
        ),
    ]
    write_group(store, "idcard", "s2", pa.Table.from_pylist(pair2, schema=FACES_SCHEMA))
    assert sync.push_review(settings, store, client).created == 1  # in the same project
    keys = {r["key"]: r for r in records.read_task_records(store).to_pylist()}
    (other,) = [k for k in keys if "live2" in k]
    assert keys[other]["task_id"] == round2["task_id"], "Label Studio reused the id"
    again = sync.pull_and_apply(settings, store, run_id="r1d", client=client)
    assert again.reasked == 1
    keys = {r["key"]: r for r in records.read_task_records(store).to_pylist()}
    round2 = keys[sync.conflict_key(rec["key"], 2)]
    there = client.sdk.tasks.get(round2["task_id"])
    assert there.data[render.KEY_FIELD] == sync.ls_key(store, round2["key"])
    # The third opinion settles it.
    _annotate(
        client, round2["task_id"], [render.choice("decision", "live_face", ["different_person"])]
    )
    out = sync.pull_and_apply(settings, store, run_id="r2", client=client)
    live = _faces(store)["live1"]
    assert live["status"] == "rejected" and is_human(live)
    assert out.reasked == 0


def test_an_answer_counts_for_the_task_it_was_given_on_whatever_key_its_data_carries(
    env, annotators
):
    """Every Label Studio account can edit task data. An annotator who put the cluster check's
    key on the ID-card task and answered it "different person" sent the answer to the cluster
    check's faces (matched by the key in the data). The store's record of the task id counts."""
    settings, store, client = env
    sync.push_review(settings, store, client)
    tasks = _tasks_by_kind(client, store)
    id_tid, _ = tasks["idcard_pair"]
    _, cl_rec = tasks["cluster_check"]
    annotator = ReviewClient(settings.review, token=annotators[0].token)
    task = annotator.sdk.tasks.get(id_tid)
    data = {**task.data, render.KEY_FIELD: sync.ls_key(store, cl_rec["key"])}
    annotator.sdk.tasks.update(id=id_tid, data=data)
    assert client.sdk.tasks.get(id_tid).data[render.KEY_FIELD] == data[render.KEY_FIELD]
    _annotate(annotator, id_tid, [render.choice("decision", "live_face", ["different_person"])])
    before = _faces(store)
    out = sync.pull_and_apply(settings, store, run_id="r1", client=client)
    assert out.edited == [id_tid] and out.new_answers == 1
    after = _faces(store)
    assert after["live1"]["status"] == "rejected" and is_human(after["live1"])
    for fid in cl_rec["face_ids"]:  # the cluster check's faces: untouched
        assert after[fid]["status"] == before[fid]["status"], fid
        assert after[fid]["identity_id"] == before[fid]["identity_id"], fid


def test_outage_during_push_fails_clearly_and_catches_up(env, labelstudio):
    settings, store, client = env
    dead = settings.model_copy(
        update={
            "review": settings.review.model_copy(update={"url": f"http://127.0.0.1:{free_port()}"})
        }
    )
    t0 = time.monotonic()
    with pytest.raises(server.LabelStudioUnavailable, match="unavailable after 3 attempts"):
        sync.push_review(dead, store, ReviewClient(dead.review))
    assert time.monotonic() - t0 < 10
    assert all(r["task_id"] is None for r in records.read_task_records(store).to_pylist())

    # The server took the import but the answer was lost: the next push repairs, no duplicate.
    real_import = client.import_tasks

    def lost_response(project, tasks):
        real_import(project, tasks)
        raise server.LabelStudioUnavailable("connection reset after import")

    client.import_tasks = lost_response  # type: ignore[method-assign]
    with pytest.raises(server.LabelStudioUnavailable):
        sync.push_review(settings, store, client)
    client.import_tasks = real_import  # type: ignore[method-assign]
    res = sync.push_review(settings, store, client)
    assert res.repaired >= 1
    total = sum(
        len(list(client.sdk.tasks.list(project=pid)))
        for pid in {r["project_id"] for r in records.read_task_records(store).to_pylist()}
    )
    assert total == 3 and res.created + res.repaired == 3


def test_webhook_triggers_pull(env, labelstudio):
    settings, store, client = env
    sync.push_review(settings, store, client)
    results = []
    secret = uuid.uuid4().hex
    with server.WebhookReceiver(
        lambda payload: results.append(sync.pull_and_apply(settings, store, "hook", client)), secret
    ) as rx:
        tid, rec = _tasks_by_kind(client, store)["idcard_pair"]
        client.ensure_webhook(rec["project_id"], rx.url, secret)
        client.ensure_webhook(rec["project_id"], rx.url, secret)  # registered once
        assert len(list(client.sdk.webhooks.list(project=str(rec["project_id"])))) == 1
        _annotate(client, tid, [render.choice("decision", "live_face", ["same_person"])])
        deadline = time.monotonic() + 20
        while not results and time.monotonic() < deadline:
            time.sleep(0.2)
    assert results and results[0].new_answers == 1
    assert _faces(store)["live1"]["status"] == "human"


def test_two_stores_push_into_their_own_projects(labelstudio, tmp_path):
    """Two stores with the same faces and the same project prefix, one Label Studio: each
    store gets its own projects, and every task key exists once per project."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    from storage.identity import store_id

    pushed: dict[str, set[int]] = {}
    ids: dict[str, str] = {}
    client = None
    for name in ("store-a", "store-b"):
        settings = load_settings(
            store=str(tmp_path / name),
            review={
                "url": labelstudio.url,
                "token": labelstudio.token,
                "retries": 2,
                "backoff_s": 0.1,
                "project_prefix": prefix,
            },
        )
        store = open_store(settings.store)
        _scene(store)
        client = ReviewClient(settings.review)
        res = sync.push_review(settings, store, client)
        assert res.created == 3
        pushed[name] = {r["project_id"] for r in records.read_task_records(store).to_pylist()}
        ids[name] = store_id(store)[:8]
    assert pushed["store-a"].isdisjoint(pushed["store-b"])
    assert client is not None
    for name in ("store-a", "store-b"):
        for pid in pushed[name]:
            keys = [t.data[render.KEY_FIELD] for t in client.sdk.tasks.list(project=pid)]
            assert keys and len(keys) == len(set(keys))
            title = client.sdk.projects.get(id=pid).title
            # The store's name may be shortened to fit Label Studio's 50 characters; its id stays.
            assert title.startswith(f"{prefix} [") and f"{ids[name]}]: " in title, title


def test_forget_deletes_the_persons_tasks_in_label_studio(env, monkeypatch):
    """`faceloop forget --subject` removes the subject's review task from Label Studio through
    its API (and nothing else there), and leaves nothing pending."""
    from faceloop.cli import main
    from storage.privacy import read_pending

    settings, store, client = env
    res = sync.push_review(settings, store, client)
    assert res.created == 3
    tasks = _tasks_by_kind(client, store)
    id_task, id_rec = tasks["idcard_pair"]
    others = {k: v[0] for k, v in tasks.items() if k != "idcard_pair"}
    assert client.sdk.tasks.get(id=id_task).id == id_task

    monkeypatch.setenv("FACELOOP_REVIEW__URL", settings.review.url)
    monkeypatch.setenv("FACELOOP_REVIEW__TOKEN", settings.review.token_value() or "")
    monkeypatch.setenv("FACELOOP_REVIEW__PROJECT_PREFIX", settings.review.project_prefix)
    assert main(["forget", "--subject", "s1", "--yes", "--store", settings.store]) == 0

    remaining = {t.id for t in client.sdk.tasks.list(project=id_rec["project_id"])}
    assert id_task not in remaining
    for kind, task_id in others.items():  # the other people's questions stay
        assert client.sdk.tasks.get(id=task_id).id == task_id, kind
    pending = read_pending(store)
    assert pending is None or not pending.ls_tasks
    faces = read_faces(store, columns=["face_id"]).column("face_id").to_pylist()
    assert "id1" not in faces and "live1" not in faces and "a1" in faces


def test_tasks_gone_from_label_studio_are_pushed_again(env):
    """A project deleted in Label Studio's UI (or a Label Studio given a new database) and a
    task deleted there: the pull skips the missing project instead of failing on its 404, the
    next push creates the missing tasks again (once), and their answers are applied."""
    from annotate.client import LabelStudioError

    settings, store, client = env
    assert sync.push_review(settings, store, client).created == 3
    tasks = _tasks_by_kind(client, store)
    old_project = tasks["idcard_pair"][1]["project_id"]
    client.sdk.projects.delete(id=old_project)
    client.sdk.tasks.delete(id=str(tasks["cluster_check"][0]))

    pulled = sync.pull_and_apply(settings, store, run_id="r1", client=client)
    assert pulled.projects_gone == [old_project] and pulled.new_answers == 0

    again = sync.push_review(settings, store, client)
    assert (again.created, again.pushed_again, again.already_pushed) == (2, 2, 1)
    tasks = _tasks_by_kind(client, store)
    new_project = tasks["idcard_pair"][1]["project_id"]
    assert new_project != old_project
    for kind in ("idcard_pair", "cluster_check"):
        tid, rec = tasks[kind]
        assert client.sdk.tasks.get(id=tid).data[render.KEY_FIELD] == sync.ls_key(store, rec["key"])
    third = sync.push_review(settings, store, client)
    assert (third.created, third.pushed_again, third.already_pushed) == (0, 0, 3)
    assert len(list(client.sdk.tasks.list(project=new_project))) == 1

    # An answer to a pushed-again task is applied; one whose choice the kind does not have
    # (a labelling config edited in the UI) is recorded, named, and applied to nothing.
    _annotate(
        client, tasks["idcard_pair"][0], [render.choice("decision", "live_face", ["same_person"])]
    )
    _annotate(client, tasks["duplicate"][0], [render.choice("decision", "grid_a", ["maybe"])])
    out = sync.pull_and_apply(settings, store, run_id="r2", client=client)
    assert out.new_answers == 2 and out.projects_gone == []  # no record points there now
    assert out.not_understood == [tasks["duplicate"][0]]
    faces = _faces(store)
    assert faces["live1"]["status"] == "human"
    assert faces["b1"]["status"] == "review" and faces["b1"]["identity_id"] == "B"

    # Any other refusal is one line with Label Studio's own detail, not the HTTP headers.
    with pytest.raises(LabelStudioError, match="answered 404") as refused:
        client.call("get task", lambda: client.sdk.tasks.get(id=str(10**9)))
    assert "set-cookie" not in str(refused.value).lower()


def test_a_review_url_with_a_wrong_path_fails_and_takes_no_project_for_gone(env):
    """review.url `http://host:port/labelstudio`: every project answered 404, so the pull
    reported the live projects deleted (exit 0, their cursors reset) and the push "pushed
    again" tasks it then failed to create. Now both fail naming the URL; nothing changes."""
    from annotate.client import LabelStudioError

    settings, store, client = env
    assert sync.push_review(settings, store, client).created == 3
    before = records.read_task_records(store).to_pylist()
    wrong = settings.model_copy(
        update={
            "review": settings.review.model_copy(
                update={"url": settings.review.url.rstrip("/") + "/labelstudio"}
            )
        }
    )
    for act in (
        lambda: sync.pull_and_apply(wrong, store, run_id="r1", client=ReviewClient(wrong.review)),
        lambda: sync.push_review(wrong, store, ReviewClient(wrong.review)),
    ):
        with pytest.raises(LabelStudioError, match="does not answer as Label Studio's API"):
            act()
    # forget's task deletion too: a 404 there was "already gone", the task dropped from the
    # pending record while its crops stayed in Label Studio.
    task_id = int(before[0]["task_id"])
    with pytest.raises(LabelStudioError, match="does not answer as Label Studio's API"):
        ReviewClient(wrong.review).delete_task(task_id)
    assert client.delete_task(10**9) is False  # a task that is gone, on the right URL
    assert records.read_task_records(store).to_pylist() == before
    again = sync.push_review(settings, store, client)
    assert (again.created, again.pushed_again, again.already_pushed) == (0, 0, 3)
    pulled = sync.pull_and_apply(settings, store, run_id="r2", client=client)
    assert pulled.projects_gone == []


def test_a_pull_killed_after_its_first_group_write_is_completed_by_the_next(env):
    """`faceloop review pull` SIGKILLed right after it replaced its first faces group (answers
    recorded, the other groups not yet written): the next pull applies every answer, publishes
    the dataset version and records every resolution (it used to publish nothing and record
    nothing, having no *new* answer to pull)."""
    import os
    import signal
    import subprocess
    import sys

    from storage.versions import newest_version, read_shards

    settings, store, client = env
    assert sync.push_review(settings, store, client).created == 3
    tasks = _tasks_by_kind(client, store)
    _annotate(
        client, tasks["idcard_pair"][0], [render.choice("decision", "live_face", ["same_person"])]
    )
    _annotate(client, tasks["duplicate"][0], [render.choice("decision", "grid_a", ["same_person"])])
    cmd = [sys.executable, "-m", "faceloop.cli", "review", "pull", "--store", settings.store]
    base = {
        **os.environ,
        "FACELOOP_REVIEW__URL": settings.review.url,
        "FACELOOP_REVIEW__TOKEN": settings.review.token_value() or "",
        "FACELOOP_REVIEW__PROJECT_PREFIX": settings.review.project_prefix,
    }
    killed = subprocess.run(
        cmd, env={**base, "FACELOOP_TEST_CRASH_AT": "label"}, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    half = _faces(store)
    assert [half["live1"]["status"], half["b1"]["identity_id"]].count("human") + (
        half["b1"]["identity_id"] == "A"
    ) == 1, "one of the two groups was written before the kill"

    done = subprocess.run(cmd, env=base, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["new_answers"] == 0 and out["dataset"] is not None
    faces = _faces(store)
    assert faces["live1"]["status"] == "human" and faces["b1"]["identity_id"] == "A"
    version = newest_version(store, settings.dataset.name)
    published = set(
        read_shards(store, settings.dataset.name, version, columns=["face_id"])
        .column("face_id")
        .to_pylist()
    )
    assert {"live1", "b1"} <= published
    applied = {r["task_key"] for r in records.read_applied(store).to_pylist()}
    assert {tasks["idcard_pair"][1]["key"], tasks["duplicate"][1]["key"]} <= applied


def test_a_port_taken_by_another_program_fails_the_start_at_once(tmp_path):
    """With 127.0.0.1:PORT held by another program, label-studio quietly took the next free
    port and `review up` waited its whole 180 s for /health on the wrong one."""
    import socket

    if not server.installed():
        server.install()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(server.LabelStudioUnavailable, match="already in use by another"):
            server.start(tmp_path / "ls", port, token=uuid.uuid4().hex)
        assert time.monotonic() - t0 < 30
    assert not (tmp_path / "ls" / "labelstudio.pid").exists()


def test_an_annotator_who_changes_an_answer_gets_the_new_one_applied(env):
    """An annotation updated in Label Studio after it was pulled (the annotator corrects it)
    is applied in its new form, not taken as a disagreement with itself. One deleted after it
    was pulled stays applied: the store, not Label Studio, is the record (README)."""
    settings, store, client = env
    sync.push_review(settings, store, client)
    tid, _ = _tasks_by_kind(client, store)["idcard_pair"]
    ann = client.sdk.annotations.create(
        id=tid, result=[render.choice("decision", "live_face", ["same_person"])]
    )
    sync.pull_and_apply(settings, store, run_id="review-1", client=client)
    f = _faces(store)["live1"]
    assert f["status"] == "human" and f["identity_id"] == "P1"
    time.sleep(1.1)  # a later updated_at than the first version's
    client.sdk.annotations.update(
        id=ann.id, result=[render.choice("decision", "live_face", ["different_person"])]
    )
    out = sync.pull_and_apply(settings, store, run_id="review-2", client=client)
    assert out.new_answers == 1 and out.conflicts == 0 and out.reasked == 0
    f = _faces(store)["live1"]
    assert f["status"] == "rejected" and f["reason"].startswith("human_different_person")
    client.sdk.annotations.delete(id=ann.id)
    out = sync.pull_and_apply(settings, store, run_id="review-3", client=client)
    assert out.new_answers == 0 and out.faces_changed == 0
    assert _faces(store)["live1"]["reason"].startswith("human_different_person")


def test_a_refresh_pushes_a_backlog_that_never_reached_label_studio(env):
    """Faces labelled for review by a refresh with review off (or Label Studio down) were
    pushed by no later refresh that had nothing new to label: the backlog waited for a manual
    `review push`. A successful push records the faces generation it covered."""
    from flows.refresh import _push_behind

    settings, store, client = env
    assert _push_behind(settings, store)  # never pushed
    sync.push_review(settings, store, client)
    assert sync.review_pushed_current(store) and not _push_behind(settings, store)
    # Faces written since (a pull, a refresh's label commit): the next refresh pushes again.
    rows = read_faces(store, groups=[("album", "album1")]).to_pylist()
    write_group(store, "album", "album1", pa.Table.from_pylist(rows, schema=FACES_SCHEMA))
    assert _push_behind(settings, store)
    off = settings.model_copy(deep=True)
    off.review.enabled = False
    assert not _push_behind(off, store)
