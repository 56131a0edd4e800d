"""Privacy and security of biometric data, unit tier: secrets stay in the process that read them
(settings dumps, Ray actor arguments, the pickled S3 filesystem), owner-only store files,
validated model registry, pseudonymous Label Studio tasks, a bounded webhook receiver."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cloudpickle
import pyarrow as pa
import pytest

from faceloop.config import load_settings
from faceloop.errors import ConfigError
from storage import layout
from storage.objectstore import open_store
from tests.tiny_models import tiny_recognizer

TOKEN = "TOKEN-SENTINEL-7f3a9c"
AWS_SECRET = "AWS-SECRET-SENTINEL-51be02"


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACELOOP_REVIEW__TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSENTINEL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_SECRET + "-session")


# -- 1. secrets stay on the driver -----------------------------------------------------------


def test_settings_dumps_hold_no_token(secret_env, tmp_path):
    s = load_settings(None, store=str(tmp_path))
    assert s.review.token_value() == TOKEN  # read, usable by the HTTP client
    for text in (
        s.model_dump_json(),
        json.dumps(s.model_dump(mode="json")),
        str(s.model_dump()),
        repr(s),
        str(s),
        repr(s.review),
    ):
        assert TOKEN not in text
    s.review.set_token("OTHER-SENTINEL")
    assert "OTHER-SENTINEL" not in s.model_dump_json() + repr(s)


def test_config_show_masks_the_token_it_cannot_dump(secret_env, capsys):
    from faceloop.cli import main

    assert main(["config", "show", "--json"]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out and json.loads(out)["review"]["token"] == "********"


def test_ray_actor_arguments_and_filesystem_pickle_without_secrets(secret_env, tmp_path):
    """What Ray pickles to workers: the FaceProcessor constructor arguments and the store's
    pyarrow filesystem (map_batches' fn_constructor_kwargs, write_parquet's filesystem)."""
    from storage.objectstore import S3Store
    from tasks.ray_faces import actor_kwargs

    s = load_settings(None, store=str(tmp_path))
    blob = cloudpickle.dumps(actor_kwargs(s, None))
    assert TOKEN.encode() not in blob
    st = S3Store("s3://bucket/prefix")
    assert st.config.secret_key == AWS_SECRET  # the driver's own client still has it
    fs, base = st.pyarrow_fs()
    blob = cloudpickle.dumps((fs, base))
    assert AWS_SECRET.encode() not in blob and b"AKIDSENTINEL" not in blob
    # The actor rebuilds its settings from the dump (its own env may hold a token: never sent).
    from faceloop.config import Settings

    rebuilt = Settings(**actor_kwargs(s, None)["settings"])
    assert rebuilt.store == s.store and rebuilt.models == s.models


def test_flow_takes_no_settings_object():
    import inspect

    from flows.refresh import refresh_flow

    params = inspect.signature(refresh_flow.fn).parameters
    assert "settings" not in params
    for name, p in params.items():
        assert p.annotation in ("str | None", "list[str] | None", "bool"), name


# -- 2. owner-only local store ----------------------------------------------------------------


def _modes(root: Path) -> tuple[set[int], set[int]]:
    files, dirs = set(), set()
    for dirpath, dnames, fnames in os.walk(root):
        dirs.update(stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) for d in dnames)
        files.update(stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) for f in fnames)
    return files, dirs


def test_local_store_writes_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        root = tmp_path / "store"
        st = open_store(str(root))
        st.write_bytes("a/b/c.json", b"{}")
        st.write_parquet("tables/x/y.parquet", pa.table({"a": [1]}))
        st.write_if(layout.STORE_LOCK, b"lock", None)
        src = tmp_path / "src.bin"
        src.write_bytes(b"x")
        st.put_file("models/files/m.onnx", src)
        st.move("a/b/c.json", "d/e/c.json")
        st.pyarrow_fs()
        # A file another writer (Ray Data) created with its own modes is fixed by secure_tree.
        st.write_bytes("staging/r1/pending.parquet", b"x")  # as discover does, before Ray
        (root / "staging" / "r1" / "detections").mkdir(mode=0o755)
        (root / "staging" / "r1" / "detections" / "p.parquet").write_bytes(b"x")
        os.chmod(root / "staging" / "r1" / "detections" / "p.parquet", 0o644)
        st.secure_tree("staging/r1/detections")
    finally:
        os.umask(old)
    files, dirs = _modes(root)
    assert files == {0o600} and dirs == {0o700}
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700


def test_store_modes_are_configurable(tmp_path):
    from storage.objectstore import local_modes, set_local_modes

    s = load_settings(None, storage={"file_mode": "0640", "dir_mode": 0o750})
    assert (s.storage.file_mode, s.storage.dir_mode) == (0o640, 0o750)
    with pytest.raises(ConfigError):
        load_settings(None, storage={"file_mode": "rw-"})
    before = local_modes()
    set_local_modes(0o640, 0o750)
    try:
        st = open_store(str(tmp_path / "s"))
        st.write_bytes("a/b.txt", b"x")
        assert _modes(tmp_path / "s") == ({0o640}, {0o750})
    finally:
        set_local_modes(*before)


# -- 3. model registry ------------------------------------------------------------------------


def test_register_with_expected_sha256(tmp_path):
    from training.registry import load_registry, register_model

    onnx_file = tiny_recognizer(tmp_path / "r.onnx")
    sha = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    store = str(tmp_path / "store")
    with pytest.raises(ConfigError, match="not the expected"):
        register_model(store, onnx_file, expected_sha256="0" * 64)
    with pytest.raises(ConfigError, match="64 hex"):
        register_model(store, onnx_file, expected_sha256="abc")
    assert load_registry(store) == []
    entry = register_model(store, onnx_file, expected_sha256=sha.upper())
    assert entry["sha256"] == sha and entry["verified"] == "expected_sha256"


def test_cli_register_refuses_a_wrong_expected_sha256(tmp_path, capsys):
    from faceloop.cli import main

    onnx_file = tiny_recognizer(tmp_path / "r.onnx")
    store = str(tmp_path / "store")
    (tmp_path / "store").mkdir()  # a store (registering into a mistyped path is refused)
    rc = main(
        ["models", "register", str(onnx_file), "--store", store, "--expected-sha256", "f" * 64]
    )
    assert rc != 0 and "not the expected" in capsys.readouterr().err
    assert not (tmp_path / "store" / "models" / "registry.json").exists()


@pytest.mark.parametrize(
    "entry",
    [
        {"sha256": "../../x", "file": "models/files/../../x.onnx"},
        {"sha256": "A" * 64, "file": f"models/files/{'A' * 64}.onnx"},
        {"sha256": "a" * 64, "file": "../elsewhere.onnx"},
        {"sha256": "a" * 64, "file": f"models/files/{'b' * 64}.onnx"},
        "not an object",
    ],
)
def test_bad_registry_entries_are_refused(tmp_path, entry):
    from tasks.reembed import with_registered_model
    from training.registry import load_registry

    store = open_store(str(tmp_path / "store"))
    store.write_bytes(layout.MODEL_REGISTRY, json.dumps([entry]).encode())
    with pytest.raises(ConfigError, match=r"registry\.json"):
        load_registry(store.root)
    models_root = tmp_path / "models"
    s = load_settings(None, store=store.root, models={"root": str(models_root)})
    with pytest.raises(ConfigError):
        with_registered_model(s)
    assert not (tmp_path / "x.onnx").exists() and not models_root.exists()


def test_refresh_verifies_the_downloaded_model(tmp_path):
    from tasks.reembed import with_registered_model
    from training.registry import register_model

    onnx_file = tiny_recognizer(tmp_path / "r.onnx")
    store_root = str(tmp_path / "store")
    entry = register_model(store_root, onnx_file)
    store = open_store(store_root)
    good = store.read_bytes(entry["file"])
    store.write_bytes(entry["file"], good + b"tampered")
    s = load_settings(None, store=store_root, models={"root": str(tmp_path / "models")})
    with pytest.raises(ConfigError, match="refusing"):
        with_registered_model(s)
    assert not (tmp_path / "models" / "registered" / f"{entry['sha256']}.onnx").exists()
    store.write_bytes(entry["file"], good)
    out = with_registered_model(s)
    assert out.models.recognizer_sha256 == entry["sha256"]
    # An out-of-store pin refuses a registry that names another model.
    pinned = load_settings(
        None,
        store=store_root,
        models={"root": str(tmp_path / "models"), "registered_sha256": "1" * 64},
    )
    with pytest.raises(ConfigError, match="pinned"):
        with_registered_model(pinned)
    # ... and a registry emptied or deleted behind the pin's back: every face was re-embedded
    # with the built-in recognizer.
    store.write_bytes(layout.MODEL_REGISTRY, b"[]")
    with pytest.raises(ConfigError, match="no registered recognizer"):
        with_registered_model(pinned)
    store.delete(layout.MODEL_REGISTRY)
    with pytest.raises(ConfigError, match="no registered recognizer"):
        with_registered_model(pinned)


def _jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (112, 112), (90, 120, 150)).save(buf, "JPEG")
    return buf.getvalue()


# -- 6. pseudonyms ----------------------------------------------------------------------------


def test_store_secret_and_pseudonyms(tmp_path):
    from storage.secret import pseudonym, store_secret

    st = open_store(str(tmp_path / "a"))
    secret = store_secret(st)
    assert len(secret) == 32 and st.read_bytes(layout.STORE_SECRET) == secret
    assert stat.S_IMODE(os.stat(st.uri(layout.STORE_SECRET)).st_mode) == 0o600
    p = pseudonym(st, "subject", "alice")
    assert len(p) == 16 and int(p, 16) >= 0
    assert p == pseudonym(st, "subject", "alice") != pseudonym(st, "identity", "alice")
    other = open_store(str(tmp_path / "b"))
    assert pseudonym(other, "subject", "alice") != p  # unlinkable across stores


def test_a_store_made_again_at_the_same_path_has_its_own_secret(tmp_path):
    """A store deleted and made again at its path in one process (a notebook) kept the deleted
    one's secret from a per-process cache and never wrote its own: its pseudonyms were the
    old store's, and a Ray worker, which made the new store's secret, named the subjects
    otherwise than the driver (publish failed from then on)."""
    import shutil

    from storage.secret import pseudonym

    root = tmp_path / "store"
    first = pseudonym(open_store(str(root)), "subject", "alice")
    shutil.rmtree(root)
    again = open_store(str(root))
    p = pseudonym(again, "subject", "alice")
    assert again.exists(layout.STORE_SECRET) and p != first
    assert pseudonym(open_store(str(root)), "subject", "alice") == p  # as another process


def test_label_studio_tasks_carry_no_subject_or_identity_ids(tmp_path):
    from annotate import render, review, sync
    from faceloop.config import PolicyThresholds

    subject = "Alice_Example_Passport_123"
    faces = [
        {
            "face_id": "id1",
            "source_kind": "idcard",
            "source_group": subject,
            "role": "id",
            "identity_id": subject,
            "status": "auto",
            "reason": "idcard_accept: ok",
            "reason_code": "idcard_accept",
            "score": 0.9,
            "quality": 0.9,
            "det_score": 0.9,
            "model": "m",
        },
        {
            "face_id": "live1",
            "source_kind": "idcard",
            "source_group": subject,
            "role": "live",
            "identity_id": subject,
            "status": "review",
            "reason": "idcard_review: cosine 0.31 < 0.34",
            "reason_code": "idcard_review",
            "score": 0.31,
            "quality": 0.9,
            "det_score": 0.9,
            "model": "m",
        },
        *[
            {
                "face_id": f"a{i}",
                "source_kind": "album",
                "source_group": "holiday",
                "role": "album",
                "identity_id": subject,  # an album identity attached to the ID subject
                "status": "review" if i == 0 else "auto",
                "reason": "outlier: similarity 0.21 < 0.30" if i == 0 else "auto: ok",
                "reason_code": "outlier" if i == 0 else "auto",
                "score": 0.21,
                "quality": 0.8,
                "det_score": 0.9,
                "model": "m",
            }
            for i in range(3)
        ],
    ]
    items, _ = review.plan_items(faces, thresholds=PolicyThresholds())
    assert {i.kind for i in items} >= {"idcard_pair", "cluster_check"}
    assert any(subject in i.key for i in items)  # the store's records keep the real key
    st = open_store(str(tmp_path / "store"))
    crop = _jpeg()
    crops = {f["face_id"]: crop for f in faces}
    for item in items:
        task = render.build_task(sync.ls_item(st, item), crops, "m|config:x")
        text = json.dumps(task)
        assert subject not in text and subject.lower() not in text.lower()
        assert task["data"][render.KEY_FIELD] == sync.ls_key(st, item.key)


# -- 4. webhook receiver ----------------------------------------------------------------------


def _post(url: str, body: bytes, secret: str, length: int | None = None) -> int:
    req = urllib.request.Request(url, data=body, method="POST")
    req.add_header("Authorization", f"Bearer {secret}")
    req.add_header("Content-Type", "application/json")
    if length is not None:
        req.add_header("Content-Length", str(length))
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _handlers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "ls-webhook-handler")


def test_webhook_receiver_refuses_oversize_bodies():
    from annotate.server import WebhookReceiver

    calls: list[dict] = []
    with WebhookReceiver(calls.append, "s3cr3t", max_body=1024) as rx:
        ok = json.dumps({"action": "ANNOTATION_CREATED"}).encode()
        assert _post(rx.url, ok, "s3cr3t") == 200
        # A declared length over the cap is refused before a byte of the body is read.
        with socket.create_connection(("127.0.0.1", _port(rx.url))) as c:
            c.sendall(
                b"POST /labelstudio/webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cr3t\r\n"
                b"Content-Length: 10485760\r\n\r\n"
            )
            c.settimeout(5)
            assert b" 413 " in c.recv(64).split(b"\r\n")[0]
        assert _post(rx.url, b"x" * 2048, "s3cr3t") == 413
        assert _post(rx.url, ok, "wrong") == 401


def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def test_webhook_receiver_closes_idle_connections():
    from annotate.server import WebhookReceiver

    with WebhookReceiver(lambda p: None, "s", idle_timeout_s=0.5) as rx:
        c = socket.create_connection(("127.0.0.1", _port(rx.url)))
        c.settimeout(5)
        t0 = time.monotonic()
        assert c.recv(1) == b""  # the server closed it
        assert time.monotonic() - t0 < 4
        c.close()


def test_webhook_receiver_bounds_its_threads():
    from annotate.server import WebhookReceiver

    n = 3
    with WebhookReceiver(lambda p: None, "s", idle_timeout_s=5, max_threads=n) as rx:
        slow = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", _port(rx.url)))
            c.sendall(b"POST /labelstudio/webhook HTTP/1.1\r\n")  # and then nothing
            slow.append(c)
        deadline = time.monotonic() + 5
        while _handlers() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _handlers() == n
        extra = socket.create_connection(("127.0.0.1", _port(rx.url)))
        extra.settimeout(5)
        assert b" 503 " in extra.recv(128)
        assert _handlers() == n
        extra.close()
        for c in slow:
            c.close()
        deadline = time.monotonic() + 5
        while _handlers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _post(rx.url, b"{}", "s") == 200  # slots are given back


def test_webhook_receiver_drops_clients_that_drip_headers_without_the_token():
    """A security probe: connections sending one header line every few seconds (each byte
    restarting the idle timeout) held every slot, without the token, for as long as they liked:
    the real webhook got 503. The request line, headers and token must come within
    header_deadline_s of connecting."""
    from annotate.server import WebhookReceiver

    n = 3
    with WebhookReceiver(
        lambda p: None, "s", idle_timeout_s=5, header_deadline_s=1.0, max_threads=n
    ) as rx:
        drips = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", _port(rx.url)))
            c.sendall(b"POST /labelstudio/webhook HTTP/1.1\r\n")
            drips.append(c)
        stop = time.monotonic() + 4
        closed = 0
        while time.monotonic() < stop and closed < n:
            closed = 0
            for c in drips:
                try:
                    c.sendall(b"X-Drip: 1\r\n")
                except OSError:
                    closed += 1
            time.sleep(0.2)
        assert closed == n, "a dripping client kept its connection past the deadline"
        deadline = time.monotonic() + 5
        while _handlers() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _post(rx.url, b"{}", "s") == 200
        for c in drips:
            c.close()


def test_webhook_receiver_on_a_port_in_use_is_a_config_error():
    """A second `review webhook` on the port of the first was an OSError traceback (exit 1)."""
    from annotate.server import WebhookReceiver
    from faceloop.errors import ConfigError

    with WebhookReceiver(lambda p: None, "s") as rx:
        port = _port(rx.url)
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is in use"):
            WebhookReceiver(lambda p: None, "s", port=port)


# -- 5. SSRF ----------------------------------------------------------------------------------


def test_local_webhooks_are_opt_in_and_warned_about():
    from annotate import server
    from faceloop.cli import build_parser

    args = build_parser().parse_args(["review", "up"])
    assert args.allow_local_webhooks is False
    assert "LS_ALLOW_LOCAL_WEBHOOKS" not in server._env(Path("/x"), 8080, None, False)
    assert server._env(Path("/x"), 8080, None, True)["LS_ALLOW_LOCAL_WEBHOOKS"] == "1"
    warning = server.LOCAL_WEBHOOKS_WARNING
    assert "SSRF" in warning and "EVERY account" in warning and "review pull" in warning


@pytest.mark.parametrize("kind", ["nan", "zeros"])
def test_a_recognizer_with_outputs_nobody_can_be_told_apart_by_is_refused(tmp_path, kind):
    """A model that outputs NaN or zeros passed `models register`'s check ("0 pairs would
    merge"): NaN embeddings then failed every refresh ("distances must be finite"), zeros
    rejected every face and published an empty dataset."""
    from training.registry import load_registry, register_model

    if kind == "nan":
        onnx_file = tiny_recognizer(tmp_path / "r.onnx", offset=float("nan"))
    else:
        onnx_file = tiny_recognizer(tmp_path / "r.onnx", scale=0.0)
    store = str(tmp_path / "store")
    with pytest.raises(ConfigError, match="not finite or are all zero"):
        register_model(store, onnx_file)
    assert load_registry(store) == []


def test_a_model_description_that_is_not_one_is_named(tmp_path):
    """A <stem>.json beside the model that is not `faceloop train`'s description ({"sha256": 5},
    broken JSON, a list) failed with a bare TypeError / JSONDecodeError naming no file."""
    from training.registry import register_model

    onnx_file = tiny_recognizer(tmp_path / "r.onnx")
    for text in ('{"sha256": 5}', "{bad json", '["x"]'):
        (tmp_path / "r.json").write_text(text)
        with pytest.raises(ConfigError, match=r"r\.json \(read as the model's description\)"):
            register_model(str(tmp_path / "store"), onnx_file)


def test_review_judges_faces_by_the_recognizer_that_embedded_them(tmp_path):
    """After a recognizer was registered: review push and pull judged the store's faces by the
    built-in recognizer's thresholds although the registered one had embedded them, and a pull
    before the refresh that re-embeds them published a version naming the registered model for
    faces it never embedded."""
    from tasks.reembed import judged_as_stored, stored_embeddings_current
    from training.registry import register_model

    onnx_file = tiny_recognizer(tmp_path / "r.onnx")
    store_root = str(tmp_path / "store")
    entry = register_model(store_root, onnx_file, name="mine")
    store = open_store(store_root)
    s = load_settings(None, store=store_root)
    built_in = s.thresholds_key
    tag = f"{entry['sha256']}.onnx@sha256:{entry['sha256']}"
    # Registered, not re-embedded yet: the faces are the built-in's.
    store.write_bytes(layout.EMBEDDED_WITH, json.dumps({"model": "edgeface@sha256:x"}).encode())
    assert judged_as_stored(s, store).thresholds_key == built_in
    assert not stored_embeddings_current(store, tag)
    # Every face re-embedded with it: judged as a refresh judges it (no policy of its own: the
    # backend's).
    store.write_bytes(layout.EMBEDDED_WITH, json.dumps({"model": tag}).encode())
    judged = judged_as_stored(s, store)
    assert judged.thresholds_key == s.models.backend != built_in
    assert stored_embeddings_current(store, tag)
    store.write_bytes(layout.RELABEL_PENDING, b"{}")  # re-embedded, not relabelled yet
    assert not stored_embeddings_current(store, tag)


def test_a_registered_recognizer_can_be_taken_out_of_use(tmp_path, capsys):
    """There was no way back from a registration: the warning's advice (set
    models.recognizer) changed nothing, and only a hand-edited registry.json did."""
    from faceloop.cli import main
    from training.registry import current_model, load_registry, register_model

    store = str(tmp_path / "store")
    (tmp_path / "store").mkdir()
    a = register_model(store, tiny_recognizer(tmp_path / "a.onnx"), name="a")
    b = register_model(store, tiny_recognizer(tmp_path / "b.onnx", offset=0.5), name="b")
    assert current_model(store)["sha256"] == b["sha256"]
    # Another writer holds the store: refused at once, or waited for as its --config says
    # (the command had no --config: lock.wait_seconds came from the environment alone).
    import threading

    from storage.lock import StoreLock

    cfg = tmp_path / "wait.yaml"
    cfg.write_text("lock:\n  wait_seconds: 30\n")
    held = StoreLock(open_store(store), "run-other", "refresh").acquire()
    assert main(["models", "unregister", "b", "--store", store]) == 3
    threading.Timer(1.0, held.release).start()
    assert main(["models", "unregister", "b", "--store", store, "--config", str(cfg)]) == 0
    assert current_model(store)["sha256"] == a["sha256"]
    assert "current recognizer: a" in capsys.readouterr().out
    assert main(["models", "unregister", "nope", "--store", store]) == 1  # nothing found
    assert "no recognizer registered as 'nope'" in capsys.readouterr().err
    assert main(["models", "unregister", "--all", "--store", store]) == 0
    assert current_model(store) is None and load_registry(store) == []
    capsys.readouterr()
    assert main(["models", "unregister", "--all", "--store", store]) == 1
    assert "no recognizer is registered" in capsys.readouterr().err
    assert open_store(store).exists(a["file"])  # the files stay: versions name them


def test_a_registered_model_is_copied_to_the_user_cache_when_models_root_is_read_only(
    tmp_path, monkeypatch
):
    """README: "the models folder may be read-only"; with a registered recognizer every refresh
    failed at once on one, copying the model into <models.root>/registered."""
    import tasks.reembed as reembed
    from faceloop.config import MODELS_ENV
    from training.registry import register_model

    store_root = str(tmp_path / "store")
    entry = register_model(store_root, tiny_recognizer(tmp_path / "r.onnx"))
    root = tmp_path / "shared-models"
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "user-cache"))
    monkeypatch.setattr(reembed, "_writable_dir", lambda folder: not folder.is_relative_to(root))
    s = load_settings(None, store=store_root, models={"root": str(root)})
    out = reembed.with_registered_model(s)
    assert out.models.recognizer == str(
        tmp_path / "user-cache" / "registered" / f"{entry['sha256']}.onnx"
    )
    assert not (root / "registered").exists()


def test_models_list_names_the_store_s_registered_recognizer_as_in_use(tmp_path, capsys):
    """`models list` marked the built-in recognizer "in use" for a store whose refreshes use a
    registered one, and listed no registered model at all."""
    from faceloop.cli import main
    from training.registry import register_model

    store = str(tmp_path / "store")
    register_model(store, tiny_recognizer(tmp_path / "r.onnx"), name="mine")
    assert main(["models", "list", "--root", str(tmp_path / "models"), "--store", store]) == 0
    out = capsys.readouterr().out
    assert "registered   recognizer mine" in out and "(in use: the store's current" in out
    assert "(in use: models.recognizer)" not in out


def test_a_registration_waits_for_the_store_lock(tmp_path, capsys):
    """Two `models register` at once both exited 0 and the registry kept one of them (read,
    changed and written whole, without the store lock)."""
    from faceloop.cli import main
    from faceloop.errors import EXIT_LOCKED
    from storage.lock import store_lock
    from training.registry import load_registry

    store = str(tmp_path / "store")
    (tmp_path / "store").mkdir()
    onnx_file = tiny_recognizer(tmp_path / "r.onnx")
    (tmp_path / "cfg.yaml").write_text("lock: {wait_seconds: 0}\n")
    with store_lock(open_store(store), "20260101T000000000000Z-aaaaaa", "refresh"):
        rc = main(
            [
                "models",
                "register",
                str(onnx_file),
                "--store",
                store,
                "--config",
                str(tmp_path / "cfg.yaml"),
            ]
        )
        assert rc == EXIT_LOCKED and load_registry(store) == []
    assert main(["models", "register", str(onnx_file), "--store", store]) == 0
    assert len(load_registry(store)) == 1


def test_nothing_phones_home_when_the_flows_are_used_as_a_library(tmp_path):
    """`faceloop` turned Prefect's telemetry off, but code calling `run_refresh(settings)`
    (README "From your own code") left it on: its temporary server ran Prefect's telemetry."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import flows.refresh\n"
        "from prefect.settings import get_current_settings\n"
        "import os\n"
        "print(get_current_settings().server.analytics_enabled,"
        " os.environ['RAY_USAGE_STATS_ENABLED'], os.environ['DO_NOT_TRACK'])\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_SERVER_ANALYTICS_ENABLED", "RAY_USAGE_STATS_ENABLED", "DO_NOT_TRACK")
    }
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["PREFECT_HOME"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "0", "1"], out.stderr
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"  # the user's own choice stands
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[0] == "True"
